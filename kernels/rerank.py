"""rerank_k_reciprocal on a CUDA device (CuPy): exact k-reciprocal re-ranking, kernels in ``rerank.cu``.

Design note
-----------
``rerank_k_reciprocal(q_g [Q, G], q_q [Q, Q], g_g [G, G], k1, k2, lambda) -> [Q, G] float32``
    docs/METHOD.md §8.3 / ``reference.rerank_k_reciprocal``, N = Q + G, without any N x N array:
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
    inputs s (QG + Q^2 + G^2) + output 4 QG + top lists 8 N k
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
"""
from __future__ import annotations

import numpy as np

from . import _validate as check
from .launch import (
    Backend, _CUDA_TYPE, _LOW32, _SENTINEL, _SHIFT, _check_budget, _cost_chunks, _even_chunks, _host, _indptr,
    _is_unit_inner, _launch_1d, _ld, _owner, _ranges, _require, _require_shape, _stable_argsort, _unit_inner,
)

TOPK_CAPACITIES = (32, 128)  # per-thread list sizes compiled; a larger k uses the xp sort
_THREADS_TARGET = 1 << 19  # column kernels: resident threads to aim for (H100: 132 SMs x 2048)
_MAX_SLICES = 64


def rerank_column_names(a_dtype, b_dtype, s_dtype) -> tuple[str, ...]:
    """Column kernels for a stack of an ``a_dtype`` over a ``b_dtype`` matrix, squares in S."""
    a, b, s = (_CUDA_TYPE[np.dtype(t)] for t in (a_dtype, b_dtype, s_dtype))
    return (f"column_max_sq<{a}, {b}, {s}>",) + tuple(
        f"column_topk<{a}, {b}, {s}, {cap}>" for cap in TOPK_CAPACITIES
    )


def rerank_jaccard_names(qg_dtype, s_dtype) -> tuple[str, ...]:
    t, s = _CUDA_TYPE[np.dtype(qg_dtype)], _CUDA_TYPE[np.dtype(s_dtype)]
    return ("jaccard_accumulate", f"rerank_finalize<{t}, {s}>")



def _square_f32(xp, x, s_dtype):
    """float32(x.astype(S) ** 2): the reference's square in the common dtype S."""
    v = x.astype(s_dtype, copy=False)
    return (v * v).astype(np.float32)



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
        raise ValueError(check.nonfinite_message(nonfinite[0], x))
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
                        backend: Backend):
    """Re-ranked distances [Q, G] float32 (an xp array); see the module note.

    q_g_dist [Q, G], q_q_dist [Q, Q], g_g_dist [G, G]: float16, float32 or float64.
    """
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
