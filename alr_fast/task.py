"""The training task: network + adaptive L2 + losses; ``forward`` returns a dict of losses."""
from __future__ import annotations

import torch
from torch import nn

from .keras_weights import apply_keras_thetas
from .losses import reid_losses
from .model import ReidNet, build_model
from .profiling import Regions
from .regularizer import AdaptiveL2


class ReidTask(nn.Module):
    """``task(images, labels) -> {"ce_0", ..., "triplet_0", ..., "regularization", "total"}``.

    The thetas of the adaptive L2 live in ``self.regularizer`` and are parameters of this module,
    so one optimizer over ``task.parameters()`` trains them with everything else (SPEC B.5).
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


def build_task(cfg, num_classes: int) -> ReidTask:
    """Model, regularizer and losses from a Config."""
    model = build_model(cfg.model, num_classes)
    r = cfg.regularizer
    factors = {"kernel": r.kernel_factor, "bias": r.bias_factor, "gamma": r.gamma_factor, "beta": r.beta_factor}
    regularizer = AdaptiveL2(model, factors, adaptive=r.adaptive, implementation=r.implementation)
    if model.keras_load_info is not None and model.keras_load_info.thetas:  # a seed training_model.h5
        apply_keras_thetas(regularizer, model.keras_load_info.thetas)
    return ReidTask(model, regularizer, cfg.optim.label_smoothing)
