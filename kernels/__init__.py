"""Evaluation kernels: distance matrix, Market-protocol CMC/mAP, k-reciprocal re-ranking.

The public functions take NumPy arrays, CuPy arrays or torch tensors and dispatch on them:

* any argument on a CUDA device (a CuPy array, or a torch CUDA tensor, taken through DLPack
  without a copy; bfloat16 tensors are widened to float32 first, CuPy has no bfloat16) runs
  the CuPy kernels on that device (``distance.py``, ``ranking.py``, ``rerank.py``, each beside
  its ``.cu`` file; ``launch.py`` holds the backend and the launches, ``gpu.py`` binds them).
  Host-side arguments of the same call (labels, typically) are copied to the device. Matrices
  come back as the array type of the first device argument (a CuPy array, or a torch tensor
  again through DLPack); ``evaluate_ranking`` returns host values (NumPy cmc, float mAP) on
  both paths. Streams: a call that takes torch tensors runs its CuPy work on torch's current
  stream (``cupy.cuda.ExternalStream``), so it is ordered with the torch work queued before
  and after it, and CuPy's pool reuses memory in that stream's order; CuPy arrays alone run
  on CuPy's current stream. The DLPack exchange passes the consumer's stream both ways.
* everything else runs on the host: the NumPy reference of ``reference.py`` by default
  (sklearn's float64 distances, a stable sort of every row), or the fast host paths of
  ``host.py`` when asked (``precision="float32"``, ``method="count"``); torch CPU tensors are
  viewed as NumPy arrays. CUDA tensors without CuPy installed fall back to the host with a
  warning that names the package to install, up to a size where that would take minutes
  (``HOST_FALLBACK_LIMITS``): beyond it they are an error that says to install CuPy.

Every path rejects NaN or infinite features (``compute_distmat``), distances
(``evaluate_ranking``, ``rerank_k_reciprocal``) with a ValueError naming the argument; on the GPU
that costs one flag read per call.

``memory_budget_bytes`` (default ``launch.DEFAULT_MEMORY_BUDGET_BYTES``, 2 GiB) bounds the
scratch memory of the GPU path beyond inputs and outputs. It is validated on both paths; the
NumPy reference has fixed chunks of ``reference._CHUNK_ELEMENTS`` (tens of MB) and needs one
dense (Q + G)^2 float32 matrix for re-ranking whatever the budget.
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np

from . import _validate as check
from . import gpu, host, reference
from .launch import PRECISIONS, _check_precision

__all__ = ["compute_distmat", "evaluate_ranking", "rerank_k_reciprocal", "PRECISIONS", "RANKING_METHODS"]

RANKING_METHODS = ("sort", "count")
# The host fallback of CUDA inputs without CuPy, per function: beyond these sizes it takes more
# than about a minute, measured on a 2-core Xeon (Sapphire Rapids) with the default reference
# paths: float64 distances at 30-60 GFLOP/s (Market-1501's g-g matrix, 2.1e12 FLOP, took 40-65 s),
# the sorted ranking at ~85 ns per distance (Market q-g: 4.5 s), the dense re-ranking at ~25 ns
# and 4 bytes per element of its (Q + G)^2 matrix (Market: 9 s, 1.5 GB; MSMT17 would need 35 GB).
# Market-1501 stays below every limit (a slow but working fallback); MSMT17 is above all three.
HOST_FALLBACK_LIMITS = {
    "compute_distmat": ("2 Q G D FLOP", 3e12),
    "evaluate_ranking": ("Q G distances", 7e8),
    "rerank_k_reciprocal": ("(Q + G)^2 elements", 2.5e9),
}


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


def _gpu_context(args, function: str, host_size: float):
    """(cupy, device id, kinds of the arguments), or None for the host path.

    ``host_size``: the size of the work in the unit of ``HOST_FALLBACK_LIMITS[function]``, which
    decides between a warning and an error when CUDA arrays arrive without CuPy.
    """
    kinds = [_device_kind(a) for a in args]
    if all(k is None for k in kinds):
        return None
    cupy = _cupy_or_none()
    if cupy is None:
        unit, limit = HOST_FALLBACK_LIMITS[function]
        install = "Install the GPU kernels with `pip install 'alr-fast[cupy]'` (cupy-cuda13x)."
        if host_size > limit:
            raise RuntimeError(
                f"{function}: CUDA arrays were given but CuPy is not installed, and the NumPy fallback "
                f"on host copies would take minutes at this size ({host_size:.3g} {unit}, limit "
                f"{limit:.3g}). {install}"
            )
        warnings.warn(
            f"CUDA arrays were given but CuPy is not installed: running the NumPy path on host copies. {install}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    devices = {_device_index(a, k) for a, k in zip(args, kinds) if k is not None}
    if len(devices) > 1:
        raise ValueError(f"all device arrays must be on one GPU; got devices {sorted(devices)}")
    return cupy, devices.pop(), kinds


def _torch_stream_ptr(device: int) -> int:
    """The raw handle of torch's current CUDA stream on ``device``."""
    import torch

    return torch.cuda.current_stream(device).cuda_stream


@contextlib.contextmanager
def _on_device(cupy, device: int, kinds):
    """CuPy's current device, and, when torch tensors take part, torch's current stream as
    CuPy's: the kernels are then ordered with the torch work before and after the call, and
    CuPy's pool (which orders block reuse by stream) sees the stream the memory is used on."""
    with cupy.cuda.Device(device):
        if "torch" not in kinds:
            yield
            return
        with cupy.cuda.ExternalStream(_torch_stream_ptr(device), device):
            yield


def _shape(x) -> tuple[int, ...]:
    """Shape of an array of any kind (or a nested list) without copying it."""
    shape = x.shape if hasattr(x, "shape") else np.shape(x)
    return tuple(int(v) for v in shape)


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


def compute_distmat(qf, gf, metric: str = "cosine", *, precision: str | None = None,
                    memory_budget_bytes: int | None = None):
    """Distances [Q, G] float32 between qf [Q, D] and gf [G, D]; see ``reference.compute_distmat``.

    ``precision`` (one of ``PRECISIONS``, or None for the path's default):
      host arrays: None / ``"float64"``: the reference, float64 as sklearn; ``"float32"``: the
      float32 BLAS path of ``host.py`` (~2x faster, half the FLOPs for ``qf is gf``; |error|
      <= 2e-5 on cosine distances); ``"tf32"`` / ``"bf16"``: that path with the inputs rounded
      as tensor cores round them (to measure their effect on the ranking).
      device arrays: None: float16/float32 features with float32 accumulation (no TF32),
      float64 features in float64; ``"float64"``: a float64 GEMM; ``"float32"``; ``"tf32"`` /
      ``"bf16"``: tensor-core compute types (for matrices that only feed re-ranking).
    On the GPU the float32 result agrees with the float64 reference to ~1e-6 relative to |q||g|.
    """
    budget = _budget(memory_budget_bytes)
    _check_precision(precision)
    same = gf is qf  # keep identity: sklearn zeroes the diagonal of (x, x)
    size = 2.0 * _shape(qf)[0] * _shape(gf)[0] * (_shape(qf)[-1] if _shape(qf) else 1)
    ctx = _gpu_context((qf, gf), "compute_distmat", size)
    if ctx is None:
        q = _to_numpy(qf)
        g = q if same else _to_numpy(gf)
        if precision in (None, "float64"):
            return reference.compute_distmat(q, g, metric)
        return host.compute_distmat(q, g, metric, precision)
    cupy, device, kinds = ctx
    with _on_device(cupy, device, kinds):  # the result is handed over on the stream it was made on
        q = _as_cupy(cupy, qf)
        g = q if same else _as_cupy(cupy, gf)
        out = gpu.compute_distmat(q, g, metric, same=same, precision=precision, memory_budget_bytes=budget)
        return _like(next(k for k in kinds if k), out)


def evaluate_ranking(
    distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, *,
    method: str | None = None, memory_budget_bytes: int | None = None,
) -> tuple[np.ndarray, float]:
    """(cmc float32 [max_rank], mAP) under the Market protocol; see ``reference.evaluate_ranking``.

    Ties are ordered by ascending gallery index on both paths. ``method`` (host arrays only):
    None / ``"sort"``: the reference, a stable sort of every row; ``"count"``: the sort-free
    algorithm the GPU runs (same results, ~5x faster on a CPU at Market scale). Device arrays
    are always ranked by counting.
    """
    budget = _budget(memory_budget_bytes)
    if method is not None and method not in RANKING_METHODS:
        raise ValueError(f"method must be one of {', '.join(RANKING_METHODS)} (or None); got {method!r}")
    args = (distmat, q_pids, g_pids, q_camids, g_camids)
    shape = _shape(distmat)
    ctx = _gpu_context(args, "evaluate_ranking", float(np.prod(shape)) if shape else 0.0)
    if ctx is None:
        ranker = host.evaluate_ranking if method == "count" else reference.evaluate_ranking
        return ranker(*(_to_numpy(a) for a in args), max_rank)
    cupy, device, kinds = ctx
    with _on_device(cupy, device, kinds):
        return gpu.evaluate_ranking(*(_as_cupy(cupy, a) for a in args), max_rank,
                                    memory_budget_bytes=budget)


def rerank_k_reciprocal(
    q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
    memory_budget_bytes: int | None = None,
):
    """Re-ranked distances [Q, G] float32; see ``reference.rerank_k_reciprocal``.

    The GPU path never forms the (Q + G)^2 matrix: see ``rerank.rerank_k_reciprocal``.
    """
    budget = _budget(memory_budget_bytes)
    args = (q_g_dist, q_q_dist, g_g_dist)
    shape = _shape(q_g_dist)
    ctx = _gpu_context(args, "rerank_k_reciprocal", float(sum(shape)) ** 2 if len(shape) == 2 else 0.0)
    if ctx is None:
        return reference.rerank_k_reciprocal(*(_to_numpy(a) for a in args), k1, k2, lambda_value)
    cupy, device, kinds = ctx
    with _on_device(cupy, device, kinds):
        out = gpu.rerank_k_reciprocal(*(_as_cupy(cupy, a) for a in args), k1, k2, lambda_value,
                                      memory_budget_bytes=budget)
        return _like(next(k for k in kinds if k), out)
