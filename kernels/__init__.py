"""Evaluation kernels: distance matrix, Market-protocol CMC/mAP, k-reciprocal re-ranking.

The public functions take NumPy arrays or torch tensors (any device) and dispatch on the array
type. Today every input goes to the NumPy reference in ``reference.py`` (torch tensors are
copied to host memory); the CuPy kernels, with identical semantics, will slot in beside it.
"""
from __future__ import annotations

import numpy as np

from . import reference

__all__ = ["compute_distmat", "evaluate_ranking", "rerank_k_reciprocal"]


def _to_numpy(x):
    """A NumPy view or copy of ``x``; torch tensors are detached and moved to the CPU.

    torch is imported only when ``x`` is a torch object. bfloat16 tensors (no NumPy dtype)
    are widened to float32.
    """
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.split(".", 1)[0] == "torch":
        import torch

        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def compute_distmat(qf, gf, metric: str = "cosine") -> np.ndarray:
    """Distances [Q, G] float32 between qf [Q, D] and gf [G, D]; see ``reference.compute_distmat``."""
    q = _to_numpy(qf)
    g = q if gf is qf else _to_numpy(gf)  # keep identity: sklearn zeroes the diagonal of (x, x)
    return reference.compute_distmat(q, g, metric)


def evaluate_ranking(
    distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50
) -> tuple[np.ndarray, float]:
    """(cmc float32 [max_rank], mAP) under the Market protocol; see ``reference.evaluate_ranking``."""
    return reference.evaluate_ranking(
        _to_numpy(distmat),
        _to_numpy(q_pids),
        _to_numpy(g_pids),
        _to_numpy(q_camids),
        _to_numpy(g_camids),
        max_rank,
    )


def rerank_k_reciprocal(
    q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> np.ndarray:
    """Re-ranked distances [Q, G] float32; see ``reference.rerank_k_reciprocal``."""
    return reference.rerank_k_reciprocal(
        _to_numpy(q_g_dist), _to_numpy(q_q_dist), _to_numpy(g_g_dist), k1, k2, lambda_value
    )
