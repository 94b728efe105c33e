"""ONNX export against PyTorch: onnxruntime on the CPU gives the model's features to 1e-4 (both
backbone styles, a batch size other than the traced one, flip-averaged and single pass)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from alr_fast.runs import CHECKPOINT_FORMAT

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx")
ort = pytest.importorskip("onnxruntime", reason="the parity check needs onnxruntime")

from alr_fast.cli import main  # noqa: E402
from alr_fast.config import Config, config_to_dict  # noqa: E402
from alr_fast.task import build_task  # noqa: E402

H, W, CLASSES = 64, 32, 5
# the TorchScript exporter (chosen: no onnxscript needed, same on torch 2.11+) warns that it is deprecated
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _checkpoint(tmp_path, style: str, backbone: str):
    c = Config()
    cfg = dataclasses.replace(c, data=dataclasses.replace(c.data, height=H, width=W),
                              model=dataclasses.replace(c.model, backbone=backbone, backbone_style=style, pretrained="none"))
    torch.manual_seed(0)
    task = build_task(cfg, CLASSES)
    with torch.no_grad():  # non-trivial BN statistics, so the export must carry them
        for m in task.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / f"{style}.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "config": config_to_dict(cfg), "task": task.state_dict(), "num_classes": CLASSES}, path)
    return path, task.model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("style,backbone", [("torchvision", "resnet18"), ("keras", "resnet50")])
def test_onnx_features_match_pytorch(tmp_path, style, backbone):
    ckpt, model = _checkpoint(tmp_path, style, backbone)
    images = torch.from_numpy(np.random.default_rng(1).normal(0, 50 if style == "keras" else 1, (3, 3, H, W)).astype(np.float32))
    for flip in (True, False) if style == "torchvision" else (True,):  # one 300 MB keras export is enough
        out = tmp_path / f"{style}-{flip}.onnx"
        assert main(["export", str(ckpt), "--out", str(out), *([] if flip else ["--no-flip"])]) == 0
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(["features"], {"images": images.numpy()})[0]  # batch 3, traced with 2
        with torch.no_grad():
            expected = model.embed(images, flip=flip).numpy()
        assert got.shape == (3, sum(model.feature_dims))
        err = np.abs(got - expected).max() / np.abs(expected).max()
        assert err <= 1e-4, f"{style} flip={flip}: {err:.2e}"
        meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
        assert meta["input_style"] == style and meta["flip_averaged"] == flip and meta["height"] == H
        assert meta["channels"] == ("BGR" if style == "keras" else "RGB")
