"""Evaluation kernels: distance matrix, Market-protocol CMC/mAP, k-reciprocal re-ranking.

The public functions take NumPy arrays, CuPy arrays or torch tensors and dispatch on them:

* any argument on a CUDA device (a CuPy array, or a torch CUDA tensor, taken through DLPack
  without a copy; bfloat16 tensors are widened to float32 first, CuPy has no bfloat16) runs
  the CuPy kernels on that device (``distance.py``, ``ranking.py``, ``rerank.py``, each beside
  its ``.cu`` file; ``launch.py`` holds the backend and the launches, ``gpu.py`` binds them). Host-side arguments of the same call (labels,
  typically) are copied to the device. Matrices come back as the array type of the first
  device argument (a CuPy array, or a torch tensor again through DLPack); ``evaluate_ranking``
  returns host values (NumPy cmc, float mAP) on both paths. Streams: the kernels run on
  CuPy's current stream; the DLPack exchange in both directions passes the consumer's stream
  (``cupy.from_dlpack`` / ``torch.from_dlpack``), so work queued on torch's current stream
  before the call, and work queued on it after the call, is ordered with the kernels without
  a device-wide synchronisation.
* everything else runs the NumPy reference of ``reference.py``; torch CPU tensors are viewed as
  NumPy arrays. CUDA tensors without CuPy installed fall back to it too, with a warning that
  names the package to install.

``memory_budget_bytes`` (default ``launch.DEFAULT_MEMORY_BUDGET_BYTES``, 2 GiB) bounds the
scratch memory of the GPU path beyond inputs and outputs. It is validated on both paths; the
NumPy reference has fixed chunks of ``reference._CHUNK_ELEMENTS`` (tens of MB) and needs one
dense (Q + G)^2 float32 matrix for re-ranking whatever the budget.
"""
from __future__ import annotations

import warnings

import numpy as np

from . import _validate as check
from . import gpu, reference

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


def _device_kind(x) -> str | None:
    """"cupy" or "torch" for arrays on a CUDA device, None for host values. Imports nothing."""
    module = type(x).__module__.split(".", 1)[0]
    if module == "cupy":
        return "cupy"
    if module == "torch" and getattr(x, "is_cuda", False):
        return "torch"
    return None


def _cupy_or_none():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def _gpu_context(args):
    """(cupy, device id, kind of the first device argument), or None for the NumPy path."""
    kinds = [_device_kind(a) for a in args]
    first = next((i for i, k in enumerate(kinds) if k is not None), None)
    if first is None:
        return None
    cupy = _cupy_or_none()
    if cupy is None:
        warnings.warn(
            "CUDA arrays were given but CuPy is not installed: running the NumPy reference on "
            "host copies. Install the GPU kernels with `pip install 'alr-fast[cupy]'` "
            "(cupy-cuda13x).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    devices = {_device_index(a, k) for a, k in zip(args, kinds) if k is not None}
    if len(devices) > 1:
        raise ValueError(f"all device arrays must be on one GPU; got devices {sorted(devices)}")
    return cupy, devices.pop(), kinds[first]


def _device_index(x, kind: str) -> int:
    if kind == "cupy":
        return x.device.id
    return x.device.index if x.device.index is not None else 0


def _as_cupy(cupy, x):
    """A CuPy view of a device array (DLPack, no copy), a device copy of a host value."""
    kind = _device_kind(x)
    if kind == "cupy":
        return x
    if kind == "torch":
        import torch

        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()  # CuPy has no bfloat16: the one copy of this path
        return cupy.from_dlpack(x)
    return cupy.asarray(_to_numpy(x))


def _like(kind: str, array):
    if kind == "torch":
        import torch

        return torch.from_dlpack(array)
    return array


def _budget(memory_budget_bytes):
    if memory_budget_bytes is not None:
        check.check_positive_int("memory_budget_bytes", memory_budget_bytes)
    return memory_budget_bytes


def compute_distmat(qf, gf, metric: str = "cosine", *, memory_budget_bytes: int | None = None):
    """Distances [Q, G] float32 between qf [Q, D] and gf [G, D]; see ``reference.compute_distmat``.

    On the GPU: float16/float32 features use a float32-accumulating cuBLAS GEMM (float64 ones
    a float64 GEMM); the result agrees with the float64 reference to ~1e-6 relative to |q||g|.
    """
    budget = _budget(memory_budget_bytes)
    same = gf is qf  # keep identity: sklearn zeroes the diagonal of (x, x)
    ctx = _gpu_context((qf, gf))
    if ctx is None:
        q = _to_numpy(qf)
        g = q if same else _to_numpy(gf)
        return reference.compute_distmat(q, g, metric)
    cupy, device, kind = ctx
    with cupy.cuda.Device(device):
        q = _as_cupy(cupy, qf)
        g = q if same else _as_cupy(cupy, gf)
        out = gpu.compute_distmat(q, g, metric, same=same, memory_budget_bytes=budget)
    return _like(kind, out)


def evaluate_ranking(
    distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, *,
    memory_budget_bytes: int | None = None,
) -> tuple[np.ndarray, float]:
    """(cmc float32 [max_rank], mAP) under the Market protocol; see ``reference.evaluate_ranking``.

    Ties are ordered by ascending gallery index on both paths.
    """
    budget = _budget(memory_budget_bytes)
    args = (distmat, q_pids, g_pids, q_camids, g_camids)
    ctx = _gpu_context(args)
    if ctx is None:
        return reference.evaluate_ranking(*(_to_numpy(a) for a in args), max_rank)
    cupy, device, _ = ctx
    with cupy.cuda.Device(device):
        return gpu.evaluate_ranking(*(_as_cupy(cupy, a) for a in args), max_rank,
                                    memory_budget_bytes=budget)


def rerank_k_reciprocal(
    q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
    memory_budget_bytes: int | None = None,
):
    """Re-ranked distances [Q, G] float32; see ``reference.rerank_k_reciprocal``.

    The GPU path never forms the (Q + G)^2 matrix: see ``gpu.rerank_k_reciprocal``.
    """
    budget = _budget(memory_budget_bytes)
    args = (q_g_dist, q_q_dist, g_g_dist)
    ctx = _gpu_context(args)
    if ctx is None:
        return reference.rerank_k_reciprocal(*(_to_numpy(a) for a in args), k1, k2, lambda_value)
    cupy, device, kind = ctx
    with cupy.cuda.Device(device):
        out = gpu.rerank_k_reciprocal(*(_as_cupy(cupy, a) for a in args), k1, k2, lambda_value,
                                      memory_budget_bytes=budget)
    return _like(kind, out)
