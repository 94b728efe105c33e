"""ONNX export of the inference model (``alr-fast export``), both backbone styles.

The exported graph maps preprocessed images ``images`` float32 [batch, 3, H, W] (the backbone
style's normalisation, ``augment.InputStyle``: written into the model's metadata as
``input_style``, ``channels``, ``mean``, ``std``, ``scale``) to ``features`` float32
[batch, sum(C_b)] (4096 for ResNet-50): the clipped pre-BN GAP features of the three branches,
concatenated, averaged with those of the horizontally flipped images when ``flip`` (the seed's
evaluation; ``--no-flip`` exports the single pass). The batch dimension is dynamic; H and W are
fixed by the config (the stripes are cut from the map's height). The preprocessing stays outside
the graph, so callers that decode with other libraries feed it in the documented layout.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from .pipelines.augment import input_style_for


class InferenceFeatures(nn.Module):
    """``images [B, 3, H, W] -> features [B, sum(C_b)]``, as ``ReidNet.embed`` computes them."""

    def __init__(self, model: nn.Module, flip: bool = True) -> None:
        super().__init__()
        self.model, self.flip = model, flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images, flip=self.flip)


def load_inference_task(checkpoint: str | Path, config: str | None = None, overrides: list[str] | None = None):
    """(task, cfg) of an alr-fast checkpoint or run directory, or of a seed training_model.h5 (with ``config``)."""
    from .config import apply_overrides, config_from_dict, load_config
    from .keras_weights import is_keras_file, load_keras_training_model
    from .runs import load_checkpoint
    from .task import build_task
    from .trainer import load_task_state

    if is_keras_file(checkpoint):
        cfg = load_config(config, overrides or [])
        task, _ = load_keras_training_model(checkpoint, cfg)
        return task, cfg
    state = load_checkpoint(checkpoint)
    cfg = apply_overrides(config_from_dict(state["config"], source=str(checkpoint)), overrides or [])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained="none"))
    task = build_task(cfg, int(state["num_classes"]))
    load_task_state(task, state["task"], Path(checkpoint))
    return task, cfg


def export_onnx(model: nn.Module, out: str | Path, *, height: int, width: int, backbone_style: str,
                flip: bool = True, opset: int = 17) -> Path:
    """Write ``InferenceFeatures(model, flip)`` to ``out`` as ONNX with a dynamic batch; returns the path."""
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("ONNX export needs onnx: pip install onnx onnxruntime (or pip install 'alr-fast[export]')") from exc
    wrapper = InferenceFeatures(model.eval(), flip).eval()
    dummy = torch.zeros(2, 3, height, width)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        # the TorchScript exporter: no onnxscript needed, and the same on torch 2.11 and later
        torch.onnx.export(
            wrapper, (dummy,), str(out), input_names=["images"], output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=opset, dynamo=False,
        )
    proto = onnx.load(str(out))
    style = input_style_for(backbone_style)
    meta = {"input_style": style.name, "channels": "BGR" if style.bgr else "RGB", "scale": style.scale,
            "mean": list(style.mean), "std": list(style.std), "height": height, "width": width, "flip_averaged": flip}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(out))
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, config: str | None = None,
                      overrides: list[str] | None = None, flip: bool = True) -> Path:
    """``alr-fast export``: a run directory, checkpoint or training_model.h5 -> ONNX file."""
    task, cfg = load_inference_task(checkpoint, config, overrides)
    return export_onnx(task.model, out, height=cfg.data.height, width=cfg.data.width,
                       backbone_style=cfg.model.backbone_style, flip=flip)
