"""compute_distmat on a CUDA device (CuPy): cuBLAS GEMM plus the epilogue of ``distance.cu``.

Design note
-----------
``compute_distmat(qf [Q, D], gf [G, D], metric) -> [Q, G] float32``
    cuBLAS GEMM q @ g.T with float32 accumulation (float16 inputs on tensor cores, products
    exact in float32; float32 without TF32; float64 inputs in float64, row-chunked), then one
    epilogue kernel in float64 (norms in float64, as the reference) with a single rounding to
    float32. Tolerance vs the reference: the float32 accumulation, ~1e-6 relative to |q||g|
    (tests: 2e-5 of the largest distance); for ``euclidean`` the square root magnifies the
    cancellation near 0 to ~sqrt(1e-6) |q| (tests compare squares), as any float32 GEMM path.
    ``precision`` picks the GEMM: "float64" (float64 GEMM: the reference to ~1e-15 before the
    float32 rounding), "float32" (the default for float16/float32 features), "tf32" / "bf16"
    (cuBLAS's tensor-core compute types CUBLAS_COMPUTE_32F_FAST_TF32 / _FAST_16BF: inputs
    rounded to 10 / 7 mantissa bits, float32 accumulation; errors ~1e-3 / ~1e-2 of a cosine
    distance, opt-in for matrices that only feed re-ranking; ``host.py`` emulates the rounding).
    Memory: the output plus max(budget, one row) of float64 scratch for float64 inputs.
"""
from __future__ import annotations

import numpy as np

from . import _validate as check
from .launch import (
    Backend, _CUDA_TYPE, _check_budget, _check_precision, _even_chunks, _launch_1d, _ld, _require, _require_shape,
    _round_mantissa, _unit_inner,
)

METRIC_CODES = {"cosine": 0, "euclidean": 1, "sqeuclidean": 2}


def distance_names(dot_dtype) -> tuple[str, ...]:
    """Instantiations of ``distance_epilogue`` for a float32 or float64 product."""
    return tuple(f"distance_epilogue<{_CUDA_TYPE[np.dtype(dot_dtype)]}, {code}>" for code in range(3))



def _xp_gemm_f32(xp, q, g, out, compute: str = "float32") -> None:
    """out = q @ g.T in float32; ``compute`` tf32 / bf16 rounds the inputs first, as tensor cores do."""
    q, g = q.astype(np.float32, copy=False), g.astype(np.float32, copy=False)
    if compute != "float32":
        q, g = _round_mantissa(xp, q, compute), _round_mantissa(xp, g, compute)
    xp.matmul(q, g.T, out=out)


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



# cuBLAS compute types (cublas_api.h), by ``compute`` argument; FAST_16BF lets cuBLAS choose
# bfloat16 or TF32 inputs, so "bf16" bounds the rounding from above
_COMPUTE_TYPES = {"float32": ("CUBLAS_COMPUTE_32F", 68), "tf32": ("CUBLAS_COMPUTE_32F_FAST_TF32", 77),
                  "bf16": ("CUBLAS_COMPUTE_32F_FAST_16BF", 75)}


def _cupy_gemm_f32(q, g, out, compute: str = "float32") -> None:
    """out = q @ g.T, float16/float32 inputs, float32 output, float32 accumulation.

    ``compute``: float32 (no TF32: the default, exact float32 products), tf32 or bf16 (tensor-core
    compute types for float32 inputs: inputs rounded to 10 / 7 mantissa bits).
    """
    import cupy
    from cupy_backends.cuda.api import runtime
    from cupy_backends.cuda.libs import cublas

    _require("q", q, (np.float16, np.float32), 2)
    _require("g", g, q.dtype, 2)
    _require("out", out, np.float32, 2, "contiguous")
    if out.shape != (q.shape[0], g.shape[0]) or q.shape[1] != g.shape[1]:
        raise ValueError(f"gemm shapes disagree: q {q.shape}, g {g.shape}, out {out.shape}")
    if compute != "float32" and q.dtype != np.float32:
        raise ValueError(f"compute={compute} needs float32 inputs; got {check.describe(q)}")
    in_type = runtime.CUDA_R_16F if q.dtype == np.float16 else runtime.CUDA_R_32F
    name, value = _COMPUTE_TYPES[compute]
    compute_type = getattr(cublas, name, value)
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
                compute_type, cublas.CUBLAS_GEMM_DEFAULT,
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


def _gemm_dtype(features_dtype, precision: str | None):
    """dtype the features enter the GEMM in, and the GEMM's compute type (None: a float64 GEMM)."""
    if precision == "float64" or (precision is None and features_dtype == np.float64):
        return np.dtype(np.float64), None
    if precision in (None, "float32"):
        return (np.dtype(np.float32) if features_dtype == np.float64 else features_dtype), "float32"
    return np.dtype(np.float32), precision  # tensor-core compute types take float32 inputs


def compute_distmat(qf, gf, metric: str = "cosine", *, same: bool | None = None, precision: str | None = None,
                    memory_budget_bytes: int | None = None, backend: Backend):
    """Distances [Q, G] float32 (an xp array) between qf [Q, D] and gf [G, D].

    ``same`` (default: ``qf is gf``) zeroes the diagonal as sklearn does for (x, x).
    ``precision`` (see ``launch.PRECISIONS``): None keeps the features' dtype (float64 features:
    a float64 GEMM; float16/float32: float32 accumulation); float64 casts to float64 (the
    reference to ~1e-15 before the float32 rounding); float32 a float32 GEMM; tf32 / bf16 the
    tensor-core compute types (inputs rounded to 10 / 7 mantissa bits, float32 accumulation).
    Non-finite features are an error (one flag read per call).
    """
    xp = backend.xp
    same = (qf is gf) if same is None else same
    check.check_features("qf", qf)
    check.check_features("gf", gf, feature_dim=qf.shape[1], ref_name="qf")
    if metric not in METRIC_CODES:
        raise ValueError(f"metric must be one of {', '.join(METRIC_CODES)}; got {metric!r}")
    _check_precision(precision)
    budget = _check_budget(memory_budget_bytes)
    check.check_finite_device(xp, [("qf", qf)] if same else [("qf", qf), ("gf", gf)])
    dtype, compute = _gemm_dtype(np.result_type(qf.dtype, gf.dtype), precision)
    q = _unit_inner(xp, qf.astype(dtype, copy=False))
    g = q if same else _unit_inner(xp, gf.astype(dtype, copy=False))
    q_stat = _row_stats(xp, q, metric, budget)
    g_stat = q_stat if same else _row_stats(xp, g, metric, budget)

    num_q, num_g = q.shape[0], g.shape[0]
    out = xp.empty((num_q, num_g), dtype=np.float32)
    if compute is None:
        for s, e in _even_chunks(num_q, budget // (8 * num_g)):
            backend.distance_epilogue(q[s:e] @ g.T, out[s:e], q_stat[s:e], g_stat, metric)
    else:
        backend.gemm_f32(q, g, out, compute)
        # the epilogue runs in place; chunks bound the float64 temporaries of the emulation
        for s, e in _even_chunks(num_q, budget // (16 * num_g)):
            backend.distance_epilogue(out[s:e], out[s:e], q_stat[s:e], g_stat, metric)
    if same:
        xp.fill_diagonal(out, 0.0)
    return out
