"""GPU evaluation kernels (CuPy): distance matrix, Market CMC/mAP, exact k-reciprocal re-ranking.

Design note
-----------
Same functions and semantics as ``reference.py``, for arrays on a CUDA device. The algorithms
are written against an array module ``xp`` and a ``Backend``: ``cupy_backend()`` runs the
custom kernels (``distance.cu``, ``ranking.cu``, ``rerank.cu``, built once per device by a
memoized factory, never at import) and ``NUMPY_BACKEND`` runs NumPy emulations of those
kernels, so that the chunking, the index bookkeeping and the whole algorithm around the
kernels are tested on machines without a GPU against the NumPy reference.
``kernel_backend(xp, launch, gemm)`` binds the kernel wrappers (argument checks, launch
geometry) to any launcher: CuPy's RawKernel here, a g++ build of the same ``.cu`` sources in
the CPU tests, so the kernels' own logic runs without a GPU too.

Ties everywhere follow the reference's STABLE ascending sort: items are ordered by the key
(float32 distance, index), packed as one uint64 (distance bits << 32 | index), so sorts and
top-k selections never depend on the stability of a sort implementation.

``compute_distmat(qf [Q, D], gf [G, D], metric) -> [Q, G] float32``
    cuBLAS GEMM q @ g.T with float32 accumulation (float16 inputs on tensor cores, products
    exact in float32; float32 without TF32; float64 inputs in float64, row-chunked), then one
    epilogue kernel in float64 (norms in float64, as the reference) with a single rounding to
    float32. Tolerance vs the reference: the float32 accumulation, ~1e-6 relative to |q||g|
    (tests: 2e-5 of the largest distance); for ``euclidean`` the square root magnifies the
    cancellation near 0 to ~sqrt(1e-6) |q| (tests compare squares), as any float32 GEMM path.
    Memory: the output plus max(budget, one row) of float64 scratch for float64 inputs.

``evaluate_ranking(distmat [Q, G], ...) -> (cmc float32 [min(max_rank, G)], mAP)``
    No row is sorted. For each query, its positives (same pid, other camera) are taken from a
    pid-grouped gallery index and sorted by key; one kernel counts, per query, the negatives
    (other pids) ranked before each positive (binary search of the negative's key among the
    positive keys). Junk (same pid and camera) is simply not counted. Positive m then has kept
    rank m + 1 + #negatives before it, which gives AP (summed in float64) and the first-hit rank
    exactly as the reference's stable argsort. Queries are chunked so that the scratch (float32
    copy of the rows if distmat is not float32 with unit column stride, plus ~100 bytes per
    same-pid gallery item) stays under ``memory_budget_bytes``. Device traffic: one read of the
    distances, so MSMT17 (11,659 x 82,161 float32, 3.8 GB) is bound by memory bandwidth.

``rerank_k_reciprocal(q_g [Q, G], q_q [Q, Q], g_g [G, G], k1, k2, lambda) -> [Q, G] float32``
    SPEC B.10.4 / ``reference.rerank_k_reciprocal``, N = Q + G, without any N x N array:
      1. Row i of the published ``original_dist`` is column i of M = [[qq, qg], [qg^T, gg]],
         squared and divided by its max. Columns are processed in blocks, each a vertical stack
         of two row-major matrices ((qq, qg^T chunk) for query columns, (qg, gg) for gallery
         columns): kernel ``column_max_sq`` (column maxima + non-finite flags), then
         ``column_topk`` (the first max(k1 + 1, k2) keys per column, in row slices merged by a
         sort of the slice lists).
      2. k-reciprocal sets, the 2/3 expansion, weights exp(-d) (d gathered from the inputs for
         the nonzeros only), the sparse V (CSR), query expansion over the top-k2 lists: xp array
         code on O(N k) index arrays, chunked by the budget.
      3. Jaccard: an inverted (column) index over the gallery rows of V; kernel
         ``jaccard_accumulate`` adds min(V[i, c], V[j, c]) into a float64 [rows, G] block,
         ``rerank_finalize`` blends it with lambda * dist[:Q, Q:] into the output.
    dist and the neighbour lists are bit-identical to the reference (explicit round-to-nearest
    PTX, no -ftz, no FMA contraction); the result agrees to ~1e-6 (tests: atol 1e-5).

Memory bound (bytes; s = input itemsize, budget = ``memory_budget_bytes``, default 2 GiB):
    re-ranking   inputs s (QG + Q^2 + G^2) + output 4 QG + top lists 8 N k
                 + V and its inverted index: ~40 bytes per nonzero at peak, nnz(V) at most
                   N min(N, k2 (k1 + 1)(round(k1/2) + 2)), typically 50-300 per row
                 + budget (qg^T column chunks, slice lists, expansion, gathers, query
                   expansion, the float64 Jaccard block of 8 G bytes per query row).
      Market-1501 (Q 3,368, G 15,913, float32): 1.27 GB inputs + 0.21 GB output + < 0.3 GB
                 lists and V + budget: < 4 GB.
      MSMT17 (Q 11,659, G 82,161, N 93,820, float32): 31.4 GB inputs (27.0 GB of them g_g)
                 + 3.83 GB output + ~1 GB lists and V (typical; 6 GB at the worst-case nnz)
                 + 2 GiB budget: ~38 GB typical, < 44 GB worst case, on one 80 GB GPU (the
                 reference would add a dense float32 N x N matrix: 35 GB).
    ranking      distmat + budget (no copy at all for float32 with unit column stride).
    distances    output 4 QG + features + float64 row statistics.

Host-device synchronisation is deliberate and O(number of chunks): sizes of index arrays
that must be allocated (``int(...)``), per-row costs for chunking, and the final results.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable

import numpy as np

from . import _validate as check

__all__ = [
    "Backend",
    "NUMPY_BACKEND",
    "cupy_backend",
    "compute_distmat",
    "evaluate_ranking",
    "rerank_k_reciprocal",
    "DEFAULT_MEMORY_BUDGET_BYTES",
]

DEFAULT_MEMORY_BUDGET_BYTES = 2 << 30
METRIC_CODES = {"cosine": 0, "euclidean": 1, "sqeuclidean": 2}
KERNEL_DIR = pathlib.Path(__file__).resolve().parent
KERNEL_FILES = ("distance.cu", "ranking.cu", "rerank.cu")
# Options passed to cupy.RawModule (CuPy adds -arch, -ftz=true and
# --device-as-default-execution-space itself); the NVRTC test compiles with the same.
COMPILE_OPTIONS = ("-std=c++17",)
TOPK_CAPACITIES = (32, 128)  # per-thread list sizes compiled; a larger k uses the xp sort
_CUDA_TYPE = {np.dtype(np.float16): "half_t", np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_SENTINEL = np.uint64(0xFFFFFFFFFFFFFFFF)
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
_THREADS_TARGET = 1 << 19  # column kernels: resident threads to aim for (H100: 132 SMs x 2048)
_MAX_SLICES = 64


# --------------------------------------------------------------------------------------------
# Kernel names (the NVRTC test compiles exactly these) and the per-device module factory
# --------------------------------------------------------------------------------------------
def distance_names(dot_dtype) -> tuple[str, ...]:
    """Instantiations of ``distance_epilogue`` for a float32 or float64 product."""
    return tuple(f"distance_epilogue<{_CUDA_TYPE[np.dtype(dot_dtype)]}, {code}>" for code in range(3))


RANKING_NAMES = ("count_negatives_before",)


def rerank_column_names(a_dtype, b_dtype, s_dtype) -> tuple[str, ...]:
    """Column kernels for a stack of an ``a_dtype`` over a ``b_dtype`` matrix, squares in S."""
    a, b, s = (_CUDA_TYPE[np.dtype(t)] for t in (a_dtype, b_dtype, s_dtype))
    return (f"column_max_sq<{a}, {b}, {s}>",) + tuple(
        f"column_topk<{a}, {b}, {s}, {cap}>" for cap in TOPK_CAPACITIES
    )


def rerank_jaccard_names(qg_dtype, s_dtype) -> tuple[str, ...]:
    t, s = _CUDA_TYPE[np.dtype(qg_dtype)], _CUDA_TYPE[np.dtype(s_dtype)]
    return ("jaccard_accumulate", f"rerank_finalize<{t}, {s}>")


def runtime_name_expressions() -> dict[str, tuple[str, ...]]:
    """Every instantiation the wrappers can ask for, per file (the NVRTC test compiles them all).

    Re-ranking stacks (q_q over q_g^T) and (q_g over g_g) with squares in S = the inputs'
    common dtype, so any pair (top, bottom) of float dtypes occurs with any S at least as wide.
    """
    floats = tuple(np.dtype(t) for t in (np.float16, np.float32, np.float64))
    rerank: list[str] = []
    for s in floats:
        for a in floats:
            for b in floats:
                if s.itemsize >= max(a.itemsize, b.itemsize):
                    rerank += rerank_column_names(a, b, s)
                    rerank += [n for n in rerank_jaccard_names(b, s) if n not in rerank]
    return {
        "distance.cu": distance_names(np.float32) + distance_names(np.float64),
        "ranking.cu": RANKING_NAMES,
        "rerank.cu": tuple(rerank),
    }


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


def _square_f32(xp, x, s_dtype):
    """float32(x.astype(S) ** 2): the reference's square in the common dtype S."""
    v = x.astype(s_dtype, copy=False)
    return (v * v).astype(np.float32)


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


def _ld(x) -> int:
    """Leading dimension (elements) of a unit-inner matrix: its row stride, or its width for a
    single row, whose stride is arbitrary (cuBLAS rejects ld < columns even where unused)."""
    return x.strides[0] // x.itemsize if x.shape[0] > 1 else x.shape[1]


# --------------------------------------------------------------------------------------------
# NumPy (xp) emulations of the kernels: the contracts the CUDA kernels meet
# --------------------------------------------------------------------------------------------
def _xp_gemm_f32(xp, q, g, out) -> None:
    xp.matmul(q.astype(np.float32, copy=False), g.astype(np.float32, copy=False).T, out=out)


def _xp_distance_epilogue(xp, dot, out, q_stat, g_stat, metric: str) -> None:
    p = dot.astype(np.float64)
    if metric == "cosine":
        v = xp.clip(1.0 - (p * q_stat[:, None]) * g_stat[None, :], 0.0, 2.0)
    else:
        v = p * -2.0
        v += q_stat[:, None]
        v += g_stat[None, :]
        xp.maximum(v, 0.0, out=v)
        if metric == "euclidean":
            xp.sqrt(v, out=v)
    out[...] = v


def _xp_count_negatives_before(xp, dist, q_code, g_code, seg_ptr, pos_len, keys):
    """counts[seg_ptr[r] + m] = #negatives of row r ranked between positives m - 1 and m."""
    counts = xp.zeros(keys.shape[0], dtype=np.int32)
    seg_host, len_host = _host(seg_ptr), _host(pos_len)
    for r in range(dist.shape[0]):  # one row at a time: an emulation for tests, not a fast path
        n_pos, base = int(len_host[r]), int(seg_host[r])
        if n_pos == 0:
            continue
        neg = xp.flatnonzero(g_code != q_code[r])
        slot = xp.searchsorted(keys[base:base + n_pos], _rank_keys(xp, dist[r, neg], neg))
        counts[base:base + n_pos] = xp.bincount(slot[slot < n_pos], minlength=n_pos)
    return counts


def _xp_column_max_sq(xp, a, b, s_dtype):
    """(max over rows of float32 squares [c], non-finite flags [c]: 1 in a, 2 in b)."""
    col_max = xp.maximum(_square_f32(xp, a, s_dtype).max(axis=0), _square_f32(xp, b, s_dtype).max(axis=0))
    flags = (~xp.isfinite(a)).any(axis=0).astype(np.int32) | 2 * (~xp.isfinite(b)).any(axis=0).astype(np.int32)
    return col_max, flags


def _xp_column_topk_keys(xp, a, b, s_dtype, col_max, k: int, n_slices: int = 2):
    """[n_slices, c, k] uint64: the k smallest keys (dist bits << 32 | row) per column and slice.

    Rows are split into slices as the kernel does; short slices are padded with the sentinel.
    """
    rows_a, n_rows, c = a.shape[0], a.shape[0] + b.shape[0], a.shape[1]
    per_slice = -(-n_rows // max(1, min(n_slices, n_rows)))
    bounds = _even_chunks(n_rows, per_slice)
    out = xp.full((len(bounds), c, k), _SENTINEL, dtype=np.uint64)
    for si, (r0, r1) in enumerate(bounds):
        parts = [a[r0:min(r1, rows_a)], b[max(r0, rows_a) - rows_a:max(r1 - rows_a, 0)]]
        sq = xp.concatenate([_square_f32(xp, p, s_dtype) for p in parts if p.shape[0]], axis=0)
        bits = xp.ascontiguousarray((sq / col_max[None, :]).T).view(np.uint32)  # [c, rows]
        keys = (bits.astype(np.uint64) << _SHIFT) | xp.arange(r0, r1, dtype=np.uint64)[None, :]
        keys = xp.sort(keys, axis=1)[:, :k]
        out[si, :, :keys.shape[1]] = keys
    return out


def _xp_jaccard_accumulate(xp, indptr, cols, vals, col_ptr, col_items, col_vals, start, stop, num_g):
    """float64 [stop - start, G]: sum over c of min(V[i, c], V[Q + g, c]) for i in [start, stop)."""
    e0, e1 = int(indptr[start]), int(indptr[stop])
    e_cols, e_vals = cols[e0:e1], vals[e0:e1]
    lengths = col_ptr[e_cols + 1] - col_ptr[e_cols]
    total = int(lengths.sum())
    pos, entry = _ranges(xp, col_ptr[e_cols], lengths, total)
    e_rows = _owner(xp, indptr[start:stop + 1] - e0, e1 - e0)
    mins = xp.minimum(e_vals[entry], col_vals[pos])
    acc = xp.bincount(e_rows[entry] * num_g + col_items[pos], weights=mins, minlength=(stop - start) * num_g)
    return acc.reshape(stop - start, num_g)


def _xp_rerank_finalize(xp, acc, qg_rows, col_max_rows, s_dtype, w_jaccard, w_original, out) -> None:
    t = acc.astype(np.float32)
    jaccard = np.float32(1) - t / (np.float32(2) - t)
    original = _square_f32(xp, qg_rows, s_dtype) / col_max_rows[:, None]
    out[...] = jaccard * w_jaccard + original * w_original


# --------------------------------------------------------------------------------------------
# CuPy wrappers of the CUDA kernels: check layouts, then launch
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


def _cupy_gemm_f32(q, g, out) -> None:
    """out = q @ g.T, float16/float32 inputs, float32 output, float32 accumulation (no TF32)."""
    import cupy
    from cupy_backends.cuda.api import runtime
    from cupy_backends.cuda.libs import cublas

    _require("q", q, (np.float16, np.float32), 2)
    _require("g", g, q.dtype, 2)
    _require("out", out, np.float32, 2, "contiguous")
    if out.shape != (q.shape[0], g.shape[0]) or q.shape[1] != g.shape[1]:
        raise ValueError(f"gemm shapes disagree: q {q.shape}, g {g.shape}, out {out.shape}")
    in_type = runtime.CUDA_R_16F if q.dtype == np.float16 else runtime.CUDA_R_32F
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    num_g, dim = g.shape
    try:
        # Row-major out[Q, G] is column-major out^T = g q^T; at most 2^31 outputs per call.
        for s, e in _even_chunks(q.shape[0], max(1, (1 << 31) // max(1, num_g))):
            cublas.gemmEx(
                handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, num_g, e - s, dim,
                one.ctypes.data, g.data.ptr, in_type, _ld(g),
                q[s:e].data.ptr, in_type, _ld(q[s:e]),
                zero.ctypes.data, out[s:e].data.ptr, runtime.CUDA_R_32F, num_g,
                cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT,
            )
    finally:
        cublas.setPointerMode(handle, mode)


# Kernel wrappers: ``xp`` allocates, ``launch(file, names, name, grid, block, args)`` runs the
# kernel: CuPy's RawKernel on a GPU, or (tests) a host build of the same .cu sources.
def _k_distance_epilogue(xp, launch, dot, out, q_stat, g_stat, metric: str) -> None:
    _require("dot", dot, (np.float32, np.float64), 2)
    _require("out", out, np.float32, 2)
    _require("q_stat", q_stat, np.float64, 1, "contiguous")
    _require("g_stat", g_stat, np.float64, 1, "contiguous")
    rows, cols = out.shape
    _require_shape("dot", dot, (rows, cols), "the shape of out")
    _require_shape("q_stat", q_stat, (rows,), "one per row of out")
    _require_shape("g_stat", g_stat, (cols,), "one per column of out")
    names = distance_names(dot.dtype)
    grid, block = _launch_1d(rows * cols)
    launch("distance.cu", names, names[METRIC_CODES[metric]], grid, block,
           (dot, np.int64(_ld(dot)), q_stat, g_stat, np.int64(rows), np.int64(cols), out, np.int64(_ld(out))))


def _k_count_negatives_before(xp, launch, dist, q_code, g_code, seg_ptr, pos_len, keys):
    _require("dist", dist, np.float32, 2)
    _require("q_code", q_code, np.int32, 1, "contiguous")
    _require("g_code", g_code, np.int32, 1, "contiguous")
    _require("seg_ptr", seg_ptr, np.int64, 1, "contiguous")
    _require("pos_len", pos_len, np.int32, 1, "contiguous")
    _require("keys", keys, np.uint64, 1, "contiguous")
    rows, cols = dist.shape
    _require_shape("q_code", q_code, (rows,), "one per row of dist")
    _require_shape("g_code", g_code, (cols,), "one per column of dist")
    _require_shape("seg_ptr", seg_ptr, (rows + 1,), "row pointer of the rows of dist")
    _require_shape("pos_len", pos_len, (rows,), "one per row of dist")
    counts = xp.zeros(keys.shape[0], dtype=np.int32)
    if keys.size and dist.shape[0]:
        launch("ranking.cu", RANKING_NAMES, "count_negatives_before", (dist.shape[0],), (256,),
               (dist, np.int64(_ld(dist)), np.int64(cols), q_code, g_code, seg_ptr,
                pos_len, keys, counts))
    return counts


def _column_slices(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(number of row slices, rows per slice) so that enough threads run for few columns."""
    n_slices = max(1, min(_MAX_SLICES, -(-_THREADS_TARGET // n_cols), n_rows // 256))
    per_slice = -(-n_rows // n_slices)
    return -(-n_rows // per_slice), per_slice


def _column_args(a, b):
    for name, x in (("top", a), ("bottom", b)):
        _require(name, x, tuple(_CUDA_TYPE), 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"stacked matrices need the same columns; got {check.describe(a)} over {check.describe(b)}")
    return (a, np.int64(_ld(a)), np.int64(a.shape[0]), b, np.int64(_ld(b)), np.int64(b.shape[0]),
            np.int64(a.shape[1]))


def _k_column_max_sq(xp, launch, a, b, s_dtype):
    args = _column_args(a, b)
    n_cols = a.shape[1]
    n_slices, per_slice = _column_slices(a.shape[0] + b.shape[0], n_cols)
    bits = xp.empty((n_slices, n_cols), dtype=np.uint32)
    flags = xp.empty((n_slices, n_cols), dtype=np.int32)
    names = rerank_column_names(a.dtype, b.dtype, s_dtype)
    launch("rerank.cu", names, names[0], (-(-n_cols // 128), n_slices), (128,),
           args + (np.int64(per_slice), bits, flags))
    return bits.max(axis=0).view(np.float32), (flags & 1).max(axis=0) | (flags & 2).max(axis=0)


def _k_column_topk_keys(xp, launch, a, b, s_dtype, col_max, k: int):
    caps = [c for c in TOPK_CAPACITIES if c >= k]
    if not caps:  # beyond the compiled list sizes: the sort-based version, on the device
        return _xp_column_topk_keys(xp, a, b, s_dtype, col_max, k)
    args = _column_args(a, b)
    _require("col_max", col_max, np.float32, 1, "contiguous")
    n_cols = a.shape[1]
    _require_shape("col_max", col_max, (n_cols,), "one per column of the stack")
    if k < 1:  # the kernel would leave out unwritten
        raise ValueError(f"k must be >= 1; got {k}")
    n_slices, per_slice = _column_slices(a.shape[0] + b.shape[0], n_cols)
    out = xp.empty((n_slices, n_cols, k), dtype=np.uint64)
    names = rerank_column_names(a.dtype, b.dtype, s_dtype)
    launch("rerank.cu", names, names[1 + TOPK_CAPACITIES.index(caps[0])], (-(-n_cols // 128), n_slices), (128,),
           args + (np.int64(per_slice), col_max, np.int32(k), out))
    return out


def _k_jaccard_accumulate(xp, launch, indptr, cols, vals, col_ptr, col_items, col_vals, start, stop, num_g):
    for name, x, dtype in (("indptr", indptr, np.int64), ("cols", cols, np.int32), ("vals", vals, np.float32),
                           ("col_ptr", col_ptr, np.int64), ("col_items", col_items, np.int32),
                           ("col_vals", col_vals, np.float32)):
        _require(name, x, dtype, 1, "contiguous")
    n = indptr.shape[0] - 1
    _require_shape("vals", vals, cols.shape, "one per entry of cols")
    _require_shape("col_ptr", col_ptr, indptr.shape, "a pointer over the N columns, as indptr over the N rows")
    _require_shape("col_vals", col_vals, col_items.shape, "one per entry of col_items")
    if not 0 <= start < stop <= n:
        raise ValueError(f"query rows [{start}, {stop}) must lie within the {n} rows of indptr")
    acc = xp.zeros((stop - start, num_g), dtype=np.float64)
    names = rerank_jaccard_names(np.float32, np.float32)  # the kernel is not a template
    launch("rerank.cu", names, "jaccard_accumulate", (stop - start,), (256,),
           (indptr, cols, vals, col_ptr, col_items, col_vals, np.int64(start), np.int64(num_g), acc))
    return acc


def _k_rerank_finalize(xp, launch, acc, qg_rows, col_max_rows, s_dtype, w_jaccard, w_original, out) -> None:
    _require("acc", acc, np.float64, 2, "contiguous")
    _require("qg_rows", qg_rows, tuple(_CUDA_TYPE), 2)
    _require("col_max_rows", col_max_rows, np.float32, 1, "contiguous")
    _require("out", out, np.float32, 2)
    rows, num_g = out.shape
    _require_shape("acc", acc, (rows, num_g), "the shape of out")
    _require_shape("qg_rows", qg_rows, (rows, num_g), "the shape of out")
    _require_shape("col_max_rows", col_max_rows, (rows,), "one per row of out")
    names = rerank_jaccard_names(qg_rows.dtype, s_dtype)
    grid, block = _launch_1d(rows * num_g)
    launch("rerank.cu", names, names[1], grid, block,
           (acc, qg_rows, np.int64(_ld(qg_rows)), col_max_rows, np.int64(rows), np.int64(num_g),
            np.float32(w_jaccard), np.float32(w_original), out, np.int64(_ld(out))))


# --------------------------------------------------------------------------------------------
# Backends
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


NUMPY_BACKEND = Backend(
    xp=np,
    gemm_f32=_partial(_xp_gemm_f32, np),
    distance_epilogue=_partial(_xp_distance_epilogue, np),
    count_negatives_before=_partial(_xp_count_negatives_before, np),
    column_max_sq=_partial(_xp_column_max_sq, np),
    column_topk_keys=_partial(_xp_column_topk_keys, np),
    jaccard_accumulate=_partial(_xp_jaccard_accumulate, np),
    rerank_finalize=_partial(_xp_rerank_finalize, np),
    column_scratch_bytes=lambda n_rows, k: 48 * n_rows + 16 * k,
    jaccard_pair_bytes=48,
)


def kernel_backend(xp, launch: Callable, gemm_f32: Callable) -> Backend:
    """The CUDA kernels behind ``launch`` (see the wrappers above) on ``xp`` arrays."""

    def bind(fn):
        return functools.partial(fn, xp, launch)

    return Backend(
        xp=xp,
        gemm_f32=gemm_f32,
        distance_epilogue=bind(_k_distance_epilogue),
        count_negatives_before=bind(_k_count_negatives_before),
        column_max_sq=bind(_k_column_max_sq),
        column_topk_keys=bind(_k_column_topk_keys),
        jaccard_accumulate=bind(_k_jaccard_accumulate),
        rerank_finalize=bind(_k_rerank_finalize),
        column_scratch_bytes=lambda n_rows, k: _MAX_SLICES * (8 * k + 8) + 8 + (
            48 * n_rows if k > TOPK_CAPACITIES[-1] else 0),
        jaccard_pair_bytes=0,
    )


@functools.lru_cache(maxsize=None)
def cupy_backend() -> Backend:
    """The CUDA kernels (compiled per device on first use) on CuPy arrays, cuBLAS GEMM."""
    import cupy

    return kernel_backend(cupy, _cupy_launch, _cupy_gemm_f32)


# --------------------------------------------------------------------------------------------
# compute_distmat
# --------------------------------------------------------------------------------------------
def _row_stats(xp, x, metric: str, budget: int):
    """float64 [n]: inverse norms (cosine; 1 for zero rows) or squared norms (euclidean)."""
    sq = xp.empty(x.shape[0], dtype=np.float64)
    for s, e in _even_chunks(x.shape[0], budget // (8 * x.shape[1])):
        block = x[s:e].astype(np.float64)
        sq[s:e] = (block * block).sum(axis=1)
    if metric != "cosine":
        return sq
    norms = xp.sqrt(sq)
    norms[norms == 0.0] = 1.0  # sklearn's normalize: a zero row stays a zero vector
    return 1.0 / norms


def compute_distmat(qf, gf, metric: str = "cosine", *, same: bool | None = None,
                    memory_budget_bytes: int | None = None, backend: Backend | None = None):
    """Distances [Q, G] float32 (an xp array) between qf [Q, D] and gf [G, D].

    ``same`` (default: ``qf is gf``) zeroes the diagonal as sklearn does for (x, x).
    """
    backend = backend or cupy_backend()
    xp = backend.xp
    same = (qf is gf) if same is None else same
    check.check_features("qf", qf)
    check.check_features("gf", gf, feature_dim=qf.shape[1], ref_name="qf")
    if metric not in METRIC_CODES:
        raise ValueError(f"metric must be one of {', '.join(METRIC_CODES)}; got {metric!r}")
    budget = _check_budget(memory_budget_bytes)
    dtype = np.result_type(qf.dtype, gf.dtype)
    q = _unit_inner(xp, qf.astype(dtype, copy=False))
    g = q if same else _unit_inner(xp, gf.astype(dtype, copy=False))
    q_stat = _row_stats(xp, q, metric, budget)
    g_stat = q_stat if same else _row_stats(xp, g, metric, budget)

    num_q, num_g = q.shape[0], g.shape[0]
    out = xp.empty((num_q, num_g), dtype=np.float32)
    if dtype == np.float64:
        for s, e in _even_chunks(num_q, budget // (8 * num_g)):
            backend.distance_epilogue(q[s:e] @ g.T, out[s:e], q_stat[s:e], g_stat, metric)
    else:
        backend.gemm_f32(q, g, out)
        # the epilogue runs in place; chunks bound the float64 temporaries of the emulation
        for s, e in _even_chunks(num_q, budget // (16 * num_g)):
            backend.distance_epilogue(out[s:e], out[s:e], q_stat[s:e], g_stat, metric)
    if same:
        xp.fill_diagonal(out, 0.0)
    return out


# --------------------------------------------------------------------------------------------
# evaluate_ranking
# --------------------------------------------------------------------------------------------
def _label_codes(xp, q_labels, g_labels):
    """Dense int32 codes of query and gallery labels (equal labels, equal codes) and their count."""
    uniq, inverse = xp.unique(xp.concatenate([q_labels, g_labels]), return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int32)
    return inverse[:q_labels.shape[0]], inverse[q_labels.shape[0]:], int(uniq.shape[0])


def _segment_sums(xp, values, seg_ptr):
    """Integer sums of ``values`` over the CSR segments ``seg_ptr`` (exact, no atomics)."""
    c = xp.zeros(values.size + 1, dtype=np.int64)
    c[1:] = xp.cumsum(values, dtype=np.int64)
    return c[seg_ptr[1:]] - c[seg_ptr[:-1]]


def _rank_chunk(backend, dist, q_code, q_cam, g_code, g_cam, g_order, pid_ptr, total: int):
    """(first-hit rank, 0 without a positive; AP) for a block of query rows [r, G] float32."""
    xp = backend.xp
    r = dist.shape[0]
    starts = pid_ptr[q_code]
    lengths = pid_ptr[q_code + 1] - starts
    seg_ptr = xp.zeros(r + 1, dtype=np.int64)
    seg_ptr[1:] = xp.cumsum(lengths, dtype=np.int64)
    if total == 0:
        return xp.zeros(r, dtype=np.int64), xp.zeros(r, dtype=np.float64)
    pos, owner = _ranges(xp, starts, lengths, total)
    cols = g_order[pos]
    is_pos = g_cam[cols] != q_cam[owner]
    # Per row: positives sorted by key, then junk (sentinel keys; the kernel reads only pos_len)
    keys = xp.where(is_pos, _rank_keys(xp, dist[owner, cols], cols), _SENTINEL)
    order = _stable_argsort(xp, keys)
    keys = keys[order[_stable_argsort(xp, owner[order])]]
    pos_len = _segment_sums(xp, is_pos, seg_ptr).astype(np.int32)

    counts = backend.count_negatives_before(dist, q_code, g_code, seg_ptr, pos_len, keys)
    csum = xp.zeros(total + 1, dtype=np.int64)
    csum[1:] = xp.cumsum(counts, dtype=np.int64)
    m = xp.arange(total, dtype=np.int64) - seg_ptr[owner]  # index of the entry within its row
    neg_before = csum[1:] - csum[seg_ptr[owner]]
    precision = xp.where(m < pos_len[owner], (m + 1) / (m + 1 + neg_before), 0.0)
    ap = xp.bincount(owner, weights=precision, minlength=r) / xp.maximum(pos_len, 1)
    first = xp.where(pos_len > 0, 1 + counts[xp.minimum(seg_ptr[:-1], total - 1)], 0)
    return first.astype(np.int64), ap


def evaluate_ranking(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, *,
                     memory_budget_bytes: int | None = None, backend: Backend | None = None):
    """(cmc float32 NumPy [min(max_rank, G)], mAP float) of distmat [Q, G], Market protocol.

    Labels may be host arrays; they are moved to the device. Ties: ascending gallery index.
    """
    backend = backend or cupy_backend()
    xp = backend.xp
    check.check_matrix("distmat", distmat)
    num_q, num_g = distmat.shape
    q_pids, g_pids, q_camids, g_camids = (xp.asarray(a) for a in (q_pids, g_pids, q_camids, g_camids))
    max_rank = check.check_ranking_inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    budget = _check_budget(memory_budget_bytes)

    q_code, g_code, n_codes = _label_codes(xp, q_pids, g_pids)
    q_cam, g_cam, _ = _label_codes(xp, q_camids, g_camids)
    g_order = _stable_argsort(xp, g_code)
    pid_ptr = _indptr(xp, g_code[g_order], n_codes)
    seg_len = _host(pid_ptr[q_code + 1] - pid_ptr[q_code])  # sync: sizes the index arrays
    copy_rows = np.dtype(distmat.dtype) != np.float32 or not _is_unit_inner(distmat)
    row_bytes = (4 * num_g if copy_rows else 0) + 96 * seg_len + 64

    hist = xp.zeros(max_rank + 2, dtype=np.int64)  # [0]: no positive; [max_rank + 1]: later
    ap_sum = xp.zeros((), dtype=np.float64)
    for s, e in _cost_chunks(row_bytes, budget):
        rows = distmat[s:e]
        if copy_rows:
            rows = xp.ascontiguousarray(rows, dtype=np.float32)
        first, ap = _rank_chunk(backend, rows, q_code[s:e], q_cam[s:e], g_code, g_cam, g_order,
                                pid_ptr, int(seg_len[s:e].sum()))
        hist += xp.bincount(xp.minimum(first, max_rank + 1), minlength=max_rank + 2)
        ap_sum += ap.sum()

    hist = _host(hist)  # sync: the results
    num_valid = num_q - int(hist[0])
    if num_valid == 0:
        raise ValueError(
            "no query has a valid match in the gallery (every query identity is absent from the "
            "gallery or only seen by the query's own camera)"
        )
    cmc = np.cumsum(hist[1:max_rank + 1]) / num_valid
    return cmc.astype(np.float32), float(ap_sum) / num_valid


# --------------------------------------------------------------------------------------------
# rerank_k_reciprocal
# --------------------------------------------------------------------------------------------
_RERANK_NAMES = ("q_g_dist", "q_q_dist", "g_g_dist")


def _column_blocks(xp, q_g, q_q, g_g, budget: int, scratch_per_col: int):
    """Blocks (first column, top, bottom, (top name, bottom name)) of the columns of M.

    M = [[qq, qg], [qg^T, gg]]; column i < Q stacks qq[:, i] over qg[i, :] (a transposed copy
    of a few rows of qg), column Q + j stacks qg[:, j] over gg[:, j] (views, no copy).
    """
    num_q, num_g = q_g.shape
    unit = [_is_unit_inner(x) for x in (q_g, q_q, g_g)]
    per_col = scratch_per_col + num_g * q_g.itemsize + (0 if unit[1] else num_q * q_q.itemsize)
    for s, e in _even_chunks(num_q, budget // per_col):
        yield s, _unit_inner(xp, q_q[:, s:e]), xp.ascontiguousarray(q_g[s:e].T), _RERANK_NAMES[1::-1]
    per_col = scratch_per_col + (0 if unit[0] else num_q * q_g.itemsize) + (0 if unit[2] else num_g * g_g.itemsize)
    for s, e in _even_chunks(num_g, budget // per_col):
        names = (_RERANK_NAMES[0], _RERANK_NAMES[2])
        yield num_q + s, _unit_inner(xp, q_g[:, s:e]), _unit_inner(xp, g_g[:, s:e]), names


def _merge_topk(xp, keys, k: int):
    """[S, c, k] slice lists of keys -> [c, k] int64 row indices of the k smallest keys."""
    n_slices, c, _ = keys.shape
    merged = xp.sort(keys.transpose(1, 0, 2).reshape(c, n_slices * k), axis=1)[:, :k]
    return (merged & _LOW32).astype(np.int64)


def _column_maxima(backend, q_g, q_q, g_g, s_dtype, budget: int, scratch_per_col: int):
    """(col_max float32 [N]: per-row maxima of the squared dist, names of non-finite inputs)."""
    xp = backend.xp
    col_max = xp.empty(q_g.shape[0] + q_g.shape[1], dtype=np.float32)
    flags = []
    for c0, a, b, names in _column_blocks(xp, q_g, q_q, g_g, budget, scratch_per_col):
        col_max[c0:c0 + a.shape[1]], block_flags = backend.column_max_sq(a, b, s_dtype)
        flags.append(((block_flags & 1).max() > 0, names[0]))
        flags.append(((block_flags & 2).max() > 0, names[1]))
    seen = _host(xp.stack([f for f, _ in flags]))  # sync: input errors
    bad = {name for (_, name), hit in zip(flags, seen) if hit}
    return col_max, [name for name in _RERANK_NAMES if name in bad]


def _check_column_maxima(xp, col_max, nonfinite, inputs) -> None:
    """The reference's errors, in its order: non-finite inputs, then unusable maxima."""
    if nonfinite:
        x = dict(zip(_RERANK_NAMES, inputs))[nonfinite[0]]
        raise ValueError(f"{nonfinite[0]} contains NaN or infinite values ({check.describe(x)})")
    bits = col_max.view(np.uint32)  # non-negative floats: bit tests, immune to flush-to-zero
    bad = _host(xp.flatnonzero((bits == 0) | (bits >= np.uint32(0x7F800000))))
    if bad.size:
        value = _host(col_max[int(bad[0]):int(bad[0]) + 1])[0]
        raise ValueError(
            f"cannot normalise distances: item {bad[0]} (of {col_max.shape[0]} = Q + G) has a "
            f"maximum squared distance of {value} (zero to every item, or overflow)"
        )


def _neighbour_lists(backend, q_g, q_q, g_g, s_dtype, col_max, k: int, budget: int, scratch_per_col: int):
    """top [N, k] int64: the first k entries of a stable argsort of every row of dist."""
    xp = backend.xp
    top = xp.empty((col_max.shape[0], k), dtype=np.int64)
    for c0, a, b, _ in _column_blocks(xp, q_g, q_q, g_g, budget, scratch_per_col):
        c1 = c0 + a.shape[1]
        top[c0:c1] = _merge_topk(xp, backend.column_topk_keys(a, b, s_dtype, col_max[c0:c1], k), k)
    return top


def _reciprocal_mask(xp, forward, budget: int):
    """mask[i, a]: is i among the forward neighbours of forward[i, a]? forward: [N, w]."""
    n, width = forward.shape
    mask = xp.empty((n, width), dtype=bool)
    for s, e in _even_chunks(n, budget // (10 * width * width)):
        backward = forward[forward[s:e]]  # [c, w, w]
        mask[s:e] = (backward == xp.arange(s, e)[:, None, None]).any(axis=2)
    return mask


def _expanded_sets(xp, top, k1: int, budget: int):
    """COO (rows, cols) of every item's expanded k-reciprocal set; cols ascending per row."""
    n = top.shape[0]
    half = int(np.around(k1 / 2.0))  # round half to even, as published
    fwd, fwd_half = top[:, :k1 + 1], top[:, :half + 1]
    mask, mask_half = _reciprocal_mask(xp, fwd, budget), _reciprocal_mask(xp, fwd_half, budget)
    a, b = fwd.shape[1], fwd_half.shape[1]
    rows_out, cols_out = [], []
    for s, e in _even_chunks(n, budget // (3 * a * b * a + 48 * a * b + 48 * a)):
        f, m = fwd[s:e], mask[s:e]  # [c, a]
        cand, cand_m = fwd_half[f], mask_half[f]  # [c, a, b]: each candidate's half set
        in_own = ((cand[..., None] == f[:, None, None, :]) & m[:, None, None, :]).any(axis=3)
        overlap = (in_own & cand_m).sum(axis=2)
        accept = m & (overlap > 2.0 / 3 * cand_m.sum(axis=2))
        members = xp.concatenate(
            [xp.where(m, f, n), xp.where(accept[..., None] & cand_m, cand, n).reshape(e - s, -1)], axis=1
        )
        members = xp.sort(members, axis=1)
        new = xp.ones(members.shape, dtype=bool)
        new[:, 1:] = members[:, 1:] != members[:, :-1]
        r, c = xp.nonzero(new & (members < n))
        rows_out.append(r + s)
        cols_out.append(members[r, c])
    return xp.concatenate(rows_out), xp.concatenate(cols_out)


def _gather_dist(xp, q_g, q_q, g_g, rows, cols, col_max, s_dtype):
    """dist[rows, cols] = sq(M[cols, rows]) / col_max[rows] (float32), read from the inputs."""
    num_q = q_q.shape[0]
    qi, qj = xp.minimum(rows, num_q - 1), xp.minimum(cols, num_q - 1)  # clipped: read, then masked
    gi, gj = xp.maximum(rows - num_q, 0), xp.maximum(cols - num_q, 0)
    row_q, col_q = rows < num_q, cols < num_q
    v = xp.where(
        col_q,
        xp.where(row_q, q_q[qj, qi].astype(s_dtype), q_g[qj, gi].astype(s_dtype)),
        xp.where(row_q, q_g[qi, gj].astype(s_dtype), g_g[gj, gi].astype(s_dtype)),
    )
    return (v * v).astype(np.float32) / col_max[rows]


def _query_expand(xp, neighbours, indptr, cols, vals, n: int, budget: int):
    """CSR of V_qe[i] = mean of V[neighbours[i]] (sums in float64, float32 values)."""
    k = neighbours.shape[1]
    row_nnz = indptr[1:] - indptr[:-1]
    entries = _host(row_nnz[neighbours].sum(axis=1))  # sync: sizes of the chunks' index arrays
    rows_out, cols_out, vals_out = [], [], []
    for s, e in _cost_chunks(64 * entries + 16, budget):
        total = int(entries[s:e].sum())
        if total == 0:
            continue
        src = neighbours[s:e].ravel()
        pos, entry = _ranges(xp, indptr[src], row_nnz[src], total)
        keys, inverse = xp.unique((entry // k) * n + cols[pos], return_inverse=True)
        sums = xp.bincount(inverse.reshape(-1), weights=vals[pos], minlength=keys.shape[0])
        rows_out.append(keys // n + s)
        cols_out.append(keys % n)
        vals_out.append((sums / k).astype(np.float32))
    if not rows_out:
        return xp.zeros(n + 1, dtype=np.int64), xp.zeros(0, np.int64), xp.zeros(0, np.float32)
    rows = xp.concatenate(rows_out)
    return _indptr(xp, rows, n), xp.concatenate(cols_out), xp.concatenate(vals_out)


def _jaccard_into(backend, out, indptr, cols, vals, q_g, col_max, s_dtype, lambda_value, budget):
    """out [Q, G] = (1 - lambda) Jaccard + lambda dist[:Q, Q:], query rows chunked."""
    xp = backend.xp
    num_q, num_g = q_g.shape
    n = num_q + num_g
    cols = cols.astype(np.int32)
    g_first = int(indptr[num_q])  # sync: where the gallery rows start
    g_rows = _owner(xp, indptr[num_q:] - g_first, int(indptr[n]) - g_first).astype(np.int32)
    g_cols = cols[g_first:]
    by_col = _stable_argsort(xp, g_cols)
    col_items, col_vals = g_rows[by_col], vals[g_first:][by_col]
    col_ptr = _indptr(xp, g_cols, n)

    row_bytes = np.full(num_q, 8.0 * num_g + 64)
    if backend.jaccard_pair_bytes:  # the emulation expands (entry, gallery entry) pairs
        col_len = (col_ptr[1:] - col_ptr[:-1]).astype(np.float64)
        q_rows = _owner(xp, indptr[:num_q + 1], g_first)
        pairs = _host(xp.bincount(q_rows, weights=col_len[cols[:g_first]], minlength=num_q))
        row_bytes += backend.jaccard_pair_bytes * pairs
    w_jaccard, w_original = np.float32(1 - lambda_value), np.float32(lambda_value)
    for s, e in _cost_chunks(row_bytes, budget):
        acc = backend.jaccard_accumulate(indptr, cols, vals, col_ptr, col_items, col_vals, s, e, num_g)
        backend.rerank_finalize(acc, _unit_inner(xp, q_g[s:e]), col_max[s:e], s_dtype, w_jaccard,
                                w_original, out[s:e])


def rerank_k_reciprocal(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3, *, memory_budget_bytes: int | None = None,
                        backend: Backend | None = None):
    """Re-ranked distances [Q, G] float32 (an xp array); see the module note.

    q_g_dist [Q, G], q_q_dist [Q, Q], g_g_dist [G, G]: float16, float32 or float64.
    """
    backend = backend or cupy_backend()
    xp = backend.xp
    check.check_matrix("q_g_dist", q_g_dist)
    num_q, num_g = q_g_dist.shape
    check.check_matrix("q_q_dist", q_q_dist, (num_q, num_q), f"(Q, Q) with Q = {num_q} from q_g_dist")
    check.check_matrix("g_g_dist", g_g_dist, (num_g, num_g), f"(G, G) with G = {num_g} from q_g_dist")
    for name, x in zip(_RERANK_NAMES, (q_g_dist, q_q_dist, g_g_dist)):
        if np.dtype(x.dtype) not in _CUDA_TYPE:
            raise ValueError(f"{name} must be float16, float32 or float64 on the GPU; got {check.describe(x)}")
    k1 = check.check_positive_int("k1", k1)
    k2 = check.check_positive_int("k2", k2)
    lambda_value = check.check_unit_interval("lambda_value", lambda_value)
    budget = _check_budget(memory_budget_bytes)
    s_dtype = np.result_type(q_g_dist.dtype, q_q_dist.dtype, g_g_dist.dtype)
    n = num_q + num_g
    k = min(max(k1 + 1, k2), n)

    inputs = (q_g_dist, q_q_dist, g_g_dist)
    scratch = backend.column_scratch_bytes(n, k)
    col_max, nonfinite = _column_maxima(backend, *inputs, s_dtype, budget, scratch)
    _check_column_maxima(xp, col_max, nonfinite, inputs)
    top = _neighbour_lists(backend, *inputs, s_dtype, col_max, k, budget, scratch)

    rows, cols = _expanded_sets(xp, top, k1, budget)
    weights = xp.empty(rows.shape[0], dtype=np.float32)
    for s, e in _even_chunks(rows.shape[0], budget // 128):  # ~15 temporaries per entry
        weights[s:e] = xp.exp(-_gather_dist(xp, *inputs, rows[s:e], cols[s:e], col_max, s_dtype))
    sums = xp.bincount(rows, weights=weights, minlength=n).astype(np.float32)
    vals = weights / sums[rows]
    indptr = _indptr(xp, rows, n)
    if k2 != 1:
        indptr, cols, vals = _query_expand(xp, top[:, :k2], indptr, cols, vals, n, budget)

    out = xp.empty((num_q, num_g), dtype=np.float32)
    _jaccard_into(backend, out, indptr, cols, vals, q_g_dist, col_max, s_dtype, lambda_value, budget)
    return out
