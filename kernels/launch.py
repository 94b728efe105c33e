"""Backends and launches of the GPU evaluation kernels, and the helpers the algorithms share.

Design note
-----------
The algorithms of ``distance.py``, ``ranking.py`` and ``rerank.py`` (each beside its ``.cu``
file) are written against an array module ``xp`` and a ``Backend``: the kernel-level operations
they call. ``gpu.cupy_backend()`` runs the CUDA kernels through CuPy (modules built once per
device and file by the memoized ``_raw_module``, never at import), ``gpu.NUMPY_BACKEND`` runs NumPy
emulations of the same kernels, so that the chunking, the index bookkeeping and the whole
algorithm around the kernels are tested on machines without a GPU; ``gpu.kernel_backend(xp,
launch, gemm)`` binds the kernel wrappers (argument checks, launch geometry) to any launcher:
CuPy's RawKernel on a GPU, a g++ build of the same ``.cu`` sources in the CPU tests.

Ties everywhere follow the reference's STABLE ascending sort: items are ordered by the key
(float32 distance, index), packed as one uint64 (distance bits << 32 | index, ``_rank_keys``),
so sorts and top-k selections never depend on the stability of a sort implementation.

Host-device synchronisation is deliberate and O(number of chunks): sizes of index arrays
that must be allocated (``int(...)``), per-row costs for chunking, the input checks (one flag
read per call) and the final results.

The underscore helpers below are package-internal: the algorithm modules import them by name.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable

import numpy as np

from . import _validate as check

DEFAULT_MEMORY_BUDGET_BYTES = 2 << 30
KERNEL_DIR = pathlib.Path(__file__).resolve().parent
# Options passed to cupy.RawModule (CuPy adds -arch, -ftz=true and
# --device-as-default-execution-space itself); the NVRTC test compiles with the same.
COMPILE_OPTIONS = ("-std=c++17",)
_CUDA_TYPE = {np.dtype(np.float16): "half_t", np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
# compute_distmat's ``precision``: float64 (the reference's sklearn semantics), float32 (float32
# GEMM accumulation), and the tensor-core compute types tf32 / bf16 (GEMM inputs rounded to
# 10 / 7 mantissa bits, float32 accumulation), offered for the matrices that feed re-ranking only
PRECISIONS = ("float64", "float32", "tf32", "bf16")
_DROPPED_MANTISSA_BITS = {"tf32": 13, "bf16": 16}  # of float32's 23
_SENTINEL = np.uint64(0xFFFFFFFFFFFFFFFF)
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)


# --------------------------------------------------------------------------------------------
# Kernel sources and the per-device module factory
# --------------------------------------------------------------------------------------------
def kernel_source(filename: str) -> str:
    return (KERNEL_DIR / filename).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def _raw_module(device_id: int, filename: str, names: tuple[str, ...]):
    """One compiled module per (device, file, instantiations); compiled on first use."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=kernel_source(filename), options=COMPILE_OPTIONS, name_expressions=names)


def _kernel(filename: str, names: tuple[str, ...], name: str):
    import cupy

    return _raw_module(cupy.cuda.Device().id, filename, names).get_function(name)


# --------------------------------------------------------------------------------------------
# Small xp helpers
# --------------------------------------------------------------------------------------------
def _host(a) -> np.ndarray:
    """A NumPy copy of a device array (a synchronisation point), NumPy arrays unchanged."""
    return a if isinstance(a, np.ndarray) else a.get()


def _stable_argsort(xp, a):
    return np.argsort(a, kind="stable") if xp is np else xp.argsort(a)  # CuPy's sort is stable


def _check_budget(memory_budget_bytes) -> int:
    if memory_budget_bytes is None:
        return DEFAULT_MEMORY_BUDGET_BYTES
    return check.check_positive_int("memory_budget_bytes", memory_budget_bytes)


def _even_chunks(num_rows: int, rows_per_chunk: int) -> list[tuple[int, int]]:
    step = max(1, int(rows_per_chunk))
    return [(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


def _cost_chunks(row_bytes: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive row ranges whose summed cost stays within ``budget`` (or a single row)."""
    csum = np.concatenate([[0], np.cumsum(np.asarray(row_bytes, dtype=np.float64))])
    bounds, start, n = [], 0, len(row_bytes)
    while start < n:
        stop = int(np.searchsorted(csum, csum[start] + budget, side="right")) - 1
        stop = min(n, max(stop, start + 1))
        bounds.append((start, stop))
        start = stop
    return bounds


def _indptr(xp, rows, n: int):
    """CSR row pointer [n + 1] int64 of ascending ``rows``."""
    ptr = xp.zeros(n + 1, dtype=np.int64)
    if rows.size:
        ptr[1:] = xp.cumsum(xp.bincount(rows, minlength=n), dtype=np.int64)
    return ptr


def _owner(xp, ptr, total: int):
    """Row of each of the ``total`` entries of the CSR pointer ``ptr``."""
    return xp.searchsorted(ptr[1:], xp.arange(total, dtype=ptr.dtype), side="right")


def _ranges(xp, starts, lengths, total: int):
    """(concatenate([arange(s, s + l) ...]), the segment of each entry); total = sum(lengths)."""
    ptr = xp.zeros(lengths.size + 1, dtype=np.int64)
    ptr[1:] = xp.cumsum(lengths, dtype=np.int64)
    owner = _owner(xp, ptr, total)
    return starts[owner] + (xp.arange(total, dtype=np.int64) - ptr[owner]), owner


def _rank_keys(xp, dist, cols):
    """uint64 keys (order-preserving float32 bits << 32 | column): sorting them is a stable sort.

    -0 is folded onto +0 and every NaN onto one NaN after +inf, as NumPy orders them. Bit
    operations only (CuPy compiles elementwise kernels with flush-to-zero).
    """
    bits = xp.ascontiguousarray(dist, dtype=np.float32).view(np.uint32)
    mag = bits & np.uint32(0x7FFFFFFF)
    bits = xp.where(mag == 0, np.uint32(0), xp.where(mag > np.uint32(0x7F800000), np.uint32(0x7FC00000), bits))
    ordered = xp.where(bits >= np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    return (ordered.astype(np.uint64) << _SHIFT) | cols.astype(np.uint64)



def _is_unit_inner(x) -> bool:
    """Rows addressable as ``base + row * ld + col`` (unit column stride, ld >= columns).

    The stride of an axis of length 1 is never used (NumPy and CuPy leave it arbitrary).
    """
    if x.size == 0:
        return True
    inner = x.shape[-1] == 1 or x.strides[-1] == x.itemsize
    rows = x.ndim == 1 or x.shape[0] == 1 or x.strides[0] >= x.shape[-1] * x.itemsize
    return inner and rows


def _unit_inner(xp, x):
    """x itself if the kernels can index it (see ``_is_unit_inner``), else a C-contiguous copy."""
    return x if _is_unit_inner(x) else xp.ascontiguousarray(x)


def _check_precision(precision) -> None:
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (or None); got {precision!r}")


def _round_mantissa(xp, x, precision: str):
    """float32 ``x`` rounded to nearest (ties to even) at the mantissa width of ``precision``.

    ``"tf32"`` keeps 10 mantissa bits, ``"bf16"`` 7: the values a tensor-core GEMM multiplies
    (products of such values are exact in float32). Finite inputs only (they are checked).
    Bit operations, so CuPy's flush-to-zero elementwise kernels cannot change subnormals.
    """
    drop = _DROPPED_MANTISSA_BITS[precision]
    bits = xp.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    half = np.uint32((1 << (drop - 1)) - 1)
    bits = bits + (((bits >> np.uint32(drop)) & np.uint32(1)) + half)
    return (bits & np.uint32((0xFFFFFFFF >> drop) << drop)).view(np.float32)


def _ld(x) -> int:
    """Leading dimension (elements) of a unit-inner matrix: its row stride, or its width for a
    single row, whose stride is arbitrary (cuBLAS rejects ld < columns even where unused)."""
    return x.strides[0] // x.itemsize if x.shape[0] > 1 else x.shape[1]



# --------------------------------------------------------------------------------------------
# Launches: layout checks, geometry, CuPy's RawKernel
# --------------------------------------------------------------------------------------------
def _require(name: str, x, dtypes, ndim: int, layout: str = "unit_inner") -> None:
    """ValueError naming ``x`` unless it has ``ndim`` dims, a dtype in ``dtypes`` and the layout."""
    dtypes = tuple(np.dtype(d) for d in (dtypes if isinstance(dtypes, tuple) else (dtypes,)))
    ok = x.ndim == ndim and np.dtype(x.dtype) in dtypes
    if ok and layout == "contiguous":
        ok = x.flags.c_contiguous
    elif ok and layout == "unit_inner":
        ok = _is_unit_inner(x)
    if not ok:
        want = " or ".join(d.name for d in dtypes)
        raise ValueError(
            f"{name} must be a {ndim}-D {want} array ({layout.replace('_', ' ')}); "
            f"got {check.describe(x)} with strides {tuple(x.strides)}"
        )


def _require_shape(name: str, x, shape: tuple[int, ...], what: str) -> None:
    """ValueError naming ``x`` unless its shape is ``shape`` (``what`` says where it comes from)."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}); got {check.describe(x)}")


def _launch_1d(total: int, threads: int = 256) -> tuple[tuple[int], tuple[int]]:
    return (max(1, min(-(-total // threads), 1 << 16)),), (threads,)


def _cupy_launch(filename: str, names: tuple[str, ...], name: str, grid, block, args) -> None:
    """Launch ``name`` from the module of ``filename`` built with ``names`` on this device."""
    _kernel(filename, names, name)(grid, block, args)



# --------------------------------------------------------------------------------------------
# The backend: an array module and the kernel-level operations the algorithms call
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Backend:
    """An array module and the kernel-level operations the algorithms below are written on."""

    xp: Any
    gemm_f32: Callable
    distance_epilogue: Callable
    count_negatives_before: Callable
    column_max_sq: Callable
    column_topk_keys: Callable
    jaccard_accumulate: Callable
    rerank_finalize: Callable
    column_scratch_bytes: Callable  # (n_rows, k) -> scratch bytes per column of a column block
    jaccard_pair_bytes: int  # scratch bytes per (query entry, gallery entry) pair


def _partial(fn, xp):
    return functools.partial(fn, xp)
