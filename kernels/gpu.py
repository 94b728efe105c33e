"""The GPU path of ``alr_fast.kernels``: the backends assembled from the per-algorithm modules.

``distance.py``, ``ranking.py`` and ``rerank.py`` hold each algorithm beside its ``.cu`` file,
``launch.py`` the ``Backend`` type, the module factory and the launches. This module binds them:
``NUMPY_BACKEND`` (NumPy emulations of every kernel, for tests without a GPU), ``kernel_backend``
(the CUDA kernels behind any launcher), ``cupy_backend`` (CuPy on the current device), the list
of kernel instantiations the runtime compiles, and the three entry points with the CuPy backend
as default.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from . import distance, ranking, rerank
from .launch import DEFAULT_MEMORY_BUDGET_BYTES, Backend, _cupy_launch, _partial

__all__ = [
    "Backend",
    "NUMPY_BACKEND",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "KERNEL_FILES",
    "cupy_backend",
    "kernel_backend",
    "runtime_name_expressions",
    "compute_distmat",
    "evaluate_ranking",
    "rerank_k_reciprocal",
]

KERNEL_FILES = ("distance.cu", "ranking.cu", "rerank.cu")
_cupy_gemm_f32 = distance._cupy_gemm_f32  # the GEMM whose peak `bench kernels` measures

NUMPY_BACKEND = Backend(
    xp=np,
    gemm_f32=_partial(distance._xp_gemm_f32, np),
    distance_epilogue=_partial(distance._xp_distance_epilogue, np),
    count_negatives_before=_partial(ranking._xp_count_negatives_before, np),
    column_max_sq=_partial(rerank._xp_column_max_sq, np),
    column_topk_keys=_partial(rerank._xp_column_topk_keys, np),
    jaccard_accumulate=_partial(rerank._xp_jaccard_accumulate, np),
    rerank_finalize=_partial(rerank._xp_rerank_finalize, np),
    column_scratch_bytes=lambda n_rows, k: 48 * n_rows + 16 * k,
    jaccard_pair_bytes=48,
)


def kernel_backend(xp, launch: Callable, gemm_f32: Callable) -> Backend:
    """The CUDA kernels behind ``launch(file, names, name, grid, block, args)`` on ``xp`` arrays."""

    def bind(fn):
        return functools.partial(fn, xp, launch)

    return Backend(
        xp=xp,
        gemm_f32=gemm_f32,
        distance_epilogue=bind(distance._k_distance_epilogue),
        count_negatives_before=bind(ranking._k_count_negatives_before),
        column_max_sq=bind(rerank._k_column_max_sq),
        column_topk_keys=bind(rerank._k_column_topk_keys),
        jaccard_accumulate=bind(rerank._k_jaccard_accumulate),
        rerank_finalize=bind(rerank._k_rerank_finalize),
        column_scratch_bytes=lambda n_rows, k: rerank._MAX_SLICES * (8 * k + 8) + 8 + (
            48 * n_rows if k > rerank.TOPK_CAPACITIES[-1] else 0),
        jaccard_pair_bytes=0,
    )


@functools.lru_cache(maxsize=None)
def cupy_backend() -> Backend:
    """The CUDA kernels (compiled per device on first use) on CuPy arrays, cuBLAS GEMM."""
    import cupy

    return kernel_backend(cupy, _cupy_launch, distance._cupy_gemm_f32)


def runtime_name_expressions() -> dict[str, tuple[str, ...]]:
    """Every instantiation the wrappers can ask for, per file (the NVRTC test compiles them all).

    Re-ranking stacks (q_q over q_g^T) and (q_g over g_g) with squares in S = the inputs'
    common dtype, so any pair (top, bottom) of float dtypes occurs with any S at least as wide.
    """
    floats = tuple(np.dtype(t) for t in (np.float16, np.float32, np.float64))
    names: list[str] = []
    for s in floats:
        for a in floats:
            for b in floats:
                if s.itemsize >= max(a.itemsize, b.itemsize):
                    names += rerank.rerank_column_names(a, b, s)
                    names += [n for n in rerank.rerank_jaccard_names(b, s) if n not in names]
    return {
        "distance.cu": distance.distance_names(np.float32) + distance.distance_names(np.float64),
        "ranking.cu": ranking.RANKING_NAMES,
        "rerank.cu": tuple(names),
    }


def compute_distmat(qf, gf, metric: str = "cosine", *, backend: Backend | None = None, **kwargs):
    """``distance.compute_distmat`` on ``backend`` (default: the CuPy kernels)."""
    return distance.compute_distmat(qf, gf, metric, backend=backend or cupy_backend(), **kwargs)


def evaluate_ranking(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, *,
                     backend: Backend | None = None, **kwargs):
    """``ranking.evaluate_ranking`` on ``backend`` (default: the CuPy kernels)."""
    return ranking.evaluate_ranking(distmat, q_pids, g_pids, q_camids, g_camids, max_rank,
                                    backend=backend or cupy_backend(), **kwargs)


def rerank_k_reciprocal(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
                        backend: Backend | None = None, **kwargs):
    """``rerank.rerank_k_reciprocal`` on ``backend`` (default: the CuPy kernels)."""
    return rerank.rerank_k_reciprocal(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value,
                                      backend=backend or cupy_backend(), **kwargs)
