"""Feature extraction and the evaluation protocol of SPEC B.10.

Features stay on the model's device; the distance, ranking and re-ranking calls go through
``alr_fast.kernels``, which picks the implementation for the arrays it is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from . import kernels

REPORTED_RANKS = (1, 5, 10, 20)


@dataclass
class FeatureSet:
    """Inference features [N, D] (on the device they were computed on) with pids and camids [N]."""

    features: torch.Tensor
    pids: np.ndarray
    camids: np.ndarray


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    flip: bool = True,
    precision_ctx=None,
    progress: bool = False,
    desc: str = "features",
) -> FeatureSet:
    """Run ``model.embed`` over ``loader`` ((images, pids, camids) batches) in inference mode."""
    was_training = model.training
    model.eval()
    feats, pids, camids = [], [], []
    try:
        for images, p, c in tqdm(loader, desc=desc, disable=not progress, leave=False):
            if precision_ctx is not None:
                with precision_ctx():
                    f = model.embed(images, flip=flip)
            else:
                f = model.embed(images, flip=flip)
            feats.append(f.float())
            pids.append(torch.as_tensor(p).cpu())
            camids.append(torch.as_tensor(c).cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError(f"{desc}: the loader yielded no images")
    return FeatureSet(torch.cat(feats), torch.cat(pids).numpy(), torch.cat(camids).numpy())


def ranking_metrics(cmc: np.ndarray, mAP: float, prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}mAP": float(mAP)}
    for r in REPORTED_RANKS:
        if r <= len(cmc):
            out[f"{prefix}rank{r}"] = float(cmc[r - 1])
    return out


def evaluate_features(
    query: FeatureSet,
    gallery: FeatureSet,
    *,
    metric: str = "cosine",
    re_ranking: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_rank: int = 50,
    memory_budget_bytes: int | None = None,
) -> dict:
    """mAP and CMC of ``query`` against ``gallery``; with ``re_ranking`` also the k-reciprocal ones
    (keys prefixed ``rr_``). ``cmc`` (and ``rr_cmc``) hold the whole curve up to ``max_rank``."""
    budget = dict(memory_budget_bytes=memory_budget_bytes)
    qg = kernels.compute_distmat(query.features, gallery.features, metric=metric, **budget)
    cmc, mAP = kernels.evaluate_ranking(qg, query.pids, gallery.pids, query.camids, gallery.camids, max_rank=max_rank, **budget)
    out: dict = ranking_metrics(cmc, mAP)
    out["cmc"] = [float(v) for v in cmc]
    out["num_query"], out["num_gallery"] = int(len(query.pids)), int(len(gallery.pids))
    if re_ranking:
        qq = kernels.compute_distmat(query.features, query.features, metric=metric, **budget)
        gg = kernels.compute_distmat(gallery.features, gallery.features, metric=metric, **budget)
        rr = kernels.rerank_k_reciprocal(qg, qq, gg, k1=k1, k2=k2, lambda_value=lambda_value, **budget)
        cmc_rr, mAP_rr = kernels.evaluate_ranking(
            rr, query.pids, gallery.pids, query.camids, gallery.camids, max_rank=max_rank, **budget
        )
        out.update(ranking_metrics(cmc_rr, mAP_rr, prefix="rr_"))
        out["rr_cmc"] = [float(v) for v in cmc_rr]
        del qq, gg, rr
    del qg
    _release_cupy_pool(query.features)
    return out


def _release_cupy_pool(features: torch.Tensor) -> None:
    """CuPy keeps freed blocks in its own pool, out of torch's reach: hand them back after an
    evaluation so training does not run short of memory."""
    if features.is_cuda:
        try:
            import cupy
        except ImportError:
            return
        cupy.get_default_memory_pool().free_all_blocks()


def format_metrics(m: dict) -> str:
    parts = [f"mAP {m['mAP']:.4f}"] + [f"rank-{r} {m[f'rank{r}']:.4f}" for r in REPORTED_RANKS if f"rank{r}" in m]
    text = ", ".join(parts)
    if "rr_mAP" in m:
        text += f" | re-ranked mAP {m['rr_mAP']:.4f}, rank-1 {m['rr_rank1']:.4f}"
    return text
