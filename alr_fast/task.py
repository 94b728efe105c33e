"""The training task: network + adaptive L2 + losses; ``forward`` returns a dict of losses."""
from __future__ import annotations

import dataclasses
import logging
import zipfile
from pathlib import Path

import torch
from torch import nn

from .keras_weights import apply_keras_thetas
from .losses import reid_losses
from .model import PretrainedWeightsError, ReidNet, build_model
from .profiling import Regions
from .regularizer import AdaptiveL2


class ReidTask(nn.Module):
    """``task(images, labels) -> {"ce_0", ..., "triplet_0", ..., "regularization", "total"}``.

    The thetas of the adaptive L2 live in ``self.regularizer`` and are parameters of this module,
    so one optimizer over ``task.parameters()`` trains them with everything else (docs/METHOD.md §3).
    """

    def __init__(self, model: ReidNet, regularizer: AdaptiveL2 | None, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.model = model
        self.regularizer = regularizer
        self.label_smoothing = label_smoothing
        self.regions = Regions(False)  # the Trainer installs its own (profiling / NVTX)

    def set_backbone_frozen(self, frozen: bool) -> None:
        self.model.set_backbone_frozen(frozen)
        if self.regularizer is not None:
            self.regularizer.sync_requires_grad()

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        feats, logits = self.model(images)
        losses = reid_losses(feats, logits, labels, self.label_smoothing)
        total = sum(losses.values())
        if self.regularizer is not None and len(self.regularizer):
            # the penalty is computed outside autocast: parameters and norms stay float32
            with torch.autocast(images.device.type, enabled=False), self.regions("regularizer"):
                losses["regularization"] = self.regularizer()
            total = total + losses["regularization"]
        losses["total"] = total
        return losses


def is_alr_fast_checkpoint(path: str) -> bool:
    """``model.pretrained`` names an alr-fast checkpoint (or a run directory holding one), not a
    torchvision or Keras weights file."""
    from .keras_weights import is_keras_file
    from .runs import BEST, CHECKPOINT

    if path in ("", "none", "imagenet") or is_keras_file(path):
        return False
    p = Path(path).expanduser()
    if p.is_dir():
        return (p / BEST).is_file() or (p / CHECKPOINT).is_file()
    if not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as archive:  # torch.save archives: <name>/data.pkl; ours also hold a config
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return bool(pickles) and b"alr-fast/" in archive.read(pickles[0])


def state_differences(own: dict, source: dict) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, reshaped) names of state dict ``source`` against ``own``: tensors of
    ``own`` that ``source`` lacks, tensors of ``source`` that ``own`` lacks, and tensors of both
    whose shapes differ (in ``own``'s order)."""
    missing = [k for k in own if k not in source]
    unexpected = [k for k in source if k not in own]
    reshaped = [k for k in own if k in source and tuple(own[k].shape) != tuple(source[k].shape)]
    return missing, unexpected, reshaped


def warm_start(task: ReidTask, path: str) -> dict:
    """Initialise ``task`` from an alr-fast checkpoint: every tensor of the same name and shape
    (backbone, heads, BN statistics, thetas). Classifiers of another class count (another
    dataset) keep their initialisation, and so do their thetas. Returns what was loaded."""
    from .runs import load_checkpoint

    source = load_checkpoint(path)["task"]
    own = task.state_dict()
    missing, unexpected, reshaped = state_differences(own, source)
    reshaped = set(reshaped)
    classifiers = {k for k in reshaped if k.startswith("model.classifiers.")}
    if missing or unexpected or reshaped - classifiers:
        first = (missing or unexpected or sorted(reshaped - classifiers))[0]
        raise PretrainedWeightsError(
            f"model.pretrained='{path}' does not fit this model ({len(missing)} tensors missing, {len(unexpected)} "
            f"unexpected, {len(reshaped - classifiers)} of another shape; first: {first}): was it trained with "
            f"another backbone, backbone_style or region_num?"
        )
    kept = set(classifiers)
    if task.regularizer is not None:  # the thetas of the re-initialised classifiers start at 0 too
        kept |= {f"regularizer.thetas.{i}" for i, n in enumerate(task.regularizer.names())
                 if f"model.{n}" in classifiers}
    task.load_state_dict({k: (own[k] if k in kept else v) for k, v in source.items()})
    return {"tensors": len(own) - len(kept), "kept_at_init": sorted(kept)}


def build_task(cfg, num_classes: int) -> ReidTask:
    """Model, regularizer and losses from a Config; ``model.pretrained`` may name an alr-fast
    checkpoint, which then initialises the whole task (``warm_start``)."""
    warm = is_alr_fast_checkpoint(cfg.model.pretrained)
    model_cfg = dataclasses.replace(cfg.model, pretrained="none") if warm else cfg.model
    model = build_model(model_cfg, num_classes)
    r = cfg.regularizer
    factors = {"kernel": r.kernel_factor, "bias": r.bias_factor, "gamma": r.gamma_factor, "beta": r.beta_factor}
    regularizer = AdaptiveL2(model, factors, adaptive=r.adaptive, implementation=r.implementation)
    if model.keras_load_info is not None and model.keras_load_info.thetas:  # a seed training_model.h5
        apply_keras_thetas(regularizer, model.keras_load_info.thetas)
    task = ReidTask(model, regularizer, cfg.optim.label_smoothing)
    if warm:
        info = warm_start(task, cfg.model.pretrained)
        note = (f"; {len(info['kept_at_init'])} classifier tensors and thetas of another class count keep their "
                f"initialisation" if info["kept_at_init"] else "")
        logging.getLogger("alr_fast").info("model.pretrained=%s: %d tensors of an alr-fast checkpoint loaded%s",
                                           cfg.model.pretrained, info["tensors"], note)
    return task
