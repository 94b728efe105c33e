"""Losses of docs/METHOD.md §4: label-smoothed cross-entropy and batch-hard soft-margin triplet, per branch.

Both are computed in float32 whatever the autocast precision (features are clipped GAP vectors
in [0, 1]; logits are upcast), so bf16 training does not change the loss definitions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_euclidean(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[B, D] -> [B, B] with sqrt(sum(diff^2) + eps), as the seed's ``cdist`` (explicit differences)."""
    diff = features.unsqueeze(1) - features.unsqueeze(0)
    return (diff.square().sum(-1) + eps).sqrt()


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft-margin batch-hard triplet (Hermans et al.): mean of softplus(d_ap_max - d_an_min).

    features [B, D] (float32), labels [B] int. As the seed's ``triplet_hermans.batch_hard``: an
    anchor without a positive has d_ap = max(D * mask) = 0; an anchor without a negative has
    d_an = min over an empty set = +inf (TF's ``reduce_min`` of an empty tensor), so its loss is
    softplus(-inf) = 0 and it passes no gradient. It still counts in the batch mean.
    """
    dist = pairwise_euclidean(features.float())
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    hardest_pos = (dist * (same & ~eye)).amax(dim=1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(dim=1)
    return F.softplus(hardest_pos - hardest_neg).mean()


def identity_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Keras categorical cross-entropy with label smoothing: targets (1-e)*onehot + e/C."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def reid_losses(
    features: list[torch.Tensor],
    logits: list[torch.Tensor],
    labels: torch.Tensor,
    label_smoothing: float = 0.1,
) -> dict[str, torch.Tensor]:
    """One CE and one triplet term per branch (keys ce_0.., triplet_0..), all weighted 1."""
    out: dict[str, torch.Tensor] = {}
    for i, (f, z) in enumerate(zip(features, logits)):
        out[f"ce_{i}"] = identity_loss(z, labels, label_smoothing)
        out[f"triplet_{i}"] = batch_hard_triplet(f, labels)
    return out
