"""NumPy reference for the evaluation kernels: distance matrix, Market ranking, re-ranking.

Design note
-----------
These are the semantics the CuPy kernels must reproduce; CPU runs use them directly.
All arrays are row-major: queries are rows, gallery items are columns.

``compute_distmat(qf [Q, D], gf [G, D], metric) -> [Q, G] float32``
    sklearn ``pairwise_distances`` semantics. ``cosine`` is 1 - cos similarity with zero-norm
    rows treated as zero vectors (distance 1), clipped to [0, 2]; ``euclidean`` is the square
    root of the squared distance clamped at 0; ``sqeuclidean`` is that clamped square.
    Inputs (float16/32/64) are promoted to float64, the result is rounded once to float32.
    When ``qf is gf`` the diagonal is set to exactly 0, as sklearn does.
    Tolerance vs sklearn on float64 inputs: float32 rounding (rtol ~1e-6) plus the float64
    cancellation of the |q|^2 + |g|^2 - 2 q.g expansion for the euclidean metrics.
    Memory: the float32 output plus float64 temporaries of at most ``_CHUNK_ELEMENTS``.

``evaluate_ranking(distmat [Q, G], q_pids, g_pids, q_camids, g_camids, max_rank) -> (cmc, mAP)``
    The deep-person-reid v1.0.6 Market-1501 protocol (``eval_market1501``). distmat is cast to
    float32 and every row is sorted ascending with a STABLE sort: equal distances keep
    ascending gallery index. torchreid uses ``np.argsort``'s default (unstable) sort, so its
    order between exactly equal distances is unspecified; we fix it, and the GPU path does the
    same. Gallery items with the query's pid AND camid are removed; same-pid items from other
    cameras are positives; everything else (pid 0 distractors included) is a negative.
    Queries without a positive are skipped. CMC[k-1] is the fraction of valid queries whose
    first positive is within the first k kept items (so it is 1 for ranks past the end of a
    query's kept list, a case torchreid leaves ill-defined). AP is the mean over
    positives of (#positives up to its rank k) / k. cmc is float32 [min(max_rank, G)]; mAP a
    Python float. Accumulation in float64 (torchreid's Cython accumulates in float32), so the
    two agree to ~1e-6. Rows are processed in chunks of ``_CHUNK_ELEMENTS`` distances.

``rerank_k_reciprocal(q_g_dist [Q, G], q_q_dist [Q, Q], g_g_dist [G, G], k1, k2, lambda_value)``
    k-reciprocal re-ranking (Zhong et al., CVPR 2017) exactly as Houjing Huang's
    ``re_ranking`` (the version in the AdaptiveL2Regularization repository) computes it, with
    N = Q + G items:
      1. ``dist[i, j] = M[j, i]^2 / max_k M[k, i]^2`` (float32) with M = [[qq, qg], [qg^T, gg]]:
         the published "square, divide each column by its max, transpose". Squares are taken in
         the inputs' common dtype, then rounded to float32, so ``dist`` is bit-identical.
      2. ``top[i]``: the first max(k1 + 1, k2) entries of a STABLE argsort of ``dist[i]``
         (partition, then an exact (value, index) sort of the survivors; same tie rule as above).
      3. R(i, k) = {j in top[i, :k+1] : i in top[j, :k+1]}. The expanded set of i is R(i, k1)
         plus R(c, round(k1 / 2)) for every c in R(i, k1) with
         |R(c, round(k1/2)) & R(i, k1)| > 2/3 |R(c, round(k1/2))|, where round is NumPy's
         round-half-to-even (k1 = 5 gives 2).
      4. V[i, j] = exp(-dist[i, j]) / sum over the set, stored sparse (CSR), float32 values.
      5. If k2 != 1: V[i] <- mean of the V rows top[i, :k2].
      6. jaccard[i, j] = 1 - m / (2 - m), m = sum_c min(V[i, c], V[j, c]), for query rows i and
         gallery columns j, via an inverted (column) index of V, like the published invIndex.
      7. (1 - lambda) * jaccard + lambda * dist[:Q, Q:], float32 [Q, G].
    Integer steps (ranks, sets) are exact; the weight normalisation, the k2 mean and m are
    summed in float64 and rounded to float32 (the published code sums in float32), so the
    result matches the published function to ~1e-6 (tests use atol 1e-5).
    Memory: O((Q + G)^2): one float32 N x N matrix (``dist``); V is sparse with at most
    (k1 + 1)(round(k1/2) + 2) entries per row before query expansion and k2 times that after.
"""
from __future__ import annotations


import numpy as np

from . import _validate as check

METRICS = ("cosine", "euclidean", "sqeuclidean")

# Elements per temporary block: bounds the scratch memory of every chunked loop below
# (about 4M elements, i.e. tens of MB of int64/float64 temporaries).
_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(num_rows: int, row_cost: int):
    """(start, stop) ranges of rows whose total cost stays near ``_CHUNK_ELEMENTS``."""
    step = max(1, _CHUNK_ELEMENTS // max(1, row_cost))
    return [(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


# --------------------------------------------------------------------------------------------
# Distance matrix
# --------------------------------------------------------------------------------------------
def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0.0] = 1.0  # sklearn's normalize: a zero row stays a zero vector
    return x / norms[:, None]


def compute_distmat(qf, gf, metric: str = "cosine") -> np.ndarray:
    """Pairwise distances between query features qf [Q, D] and gallery features gf [G, D].

    Returns float32 [Q, G]. ``metric`` is one of ``METRICS``; see the module note for the exact
    semantics (sklearn ``pairwise_distances``, computed in float64).
    """
    qf, gf, same = check.check_distmat_inputs(qf, gf, metric, METRICS)

    q = qf.astype(np.float64)
    g = q if same else gf.astype(np.float64)
    if metric == "cosine":
        q = _unit_rows(q)
        g = q if same else _unit_rows(g)
    else:
        q_sq = np.einsum("ij,ij->i", q, q)
        g_sq = q_sq if same else np.einsum("ij,ij->i", g, g)

    out = np.empty((q.shape[0], g.shape[0]), dtype=np.float32)
    for start, stop in _row_chunks(q.shape[0], g.shape[0]):
        block = q[start:stop] @ g.T
        if metric == "cosine":
            block = np.clip(1.0 - block, 0.0, 2.0)
        else:
            # Same operation order as sklearn's euclidean_distances.
            block *= -2.0
            block += q_sq[start:stop, None]
            block += g_sq[None, :]
            np.maximum(block, 0.0, out=block)
            if metric == "euclidean":
                np.sqrt(block, out=block)
        out[start:stop] = block
    if same:
        np.fill_diagonal(out, 0.0)
    return out


# --------------------------------------------------------------------------------------------
# CMC / mAP
# --------------------------------------------------------------------------------------------
def _rank_chunk(dist, q_pids, g_pids, q_camids, g_camids):
    """First-positive rank (1-based, 0 if none) and AP (0 if none) for a block of queries."""
    order = np.argsort(dist, axis=1, kind="stable")
    same_pid = g_pids[order] == q_pids[:, None]
    keep = ~(same_pid & (g_camids[order] == q_camids[:, None]))
    positive = same_pid & keep
    kept_rank = np.cumsum(keep, axis=1)  # rank k of each item within the kept list
    hits_so_far = np.cumsum(positive, axis=1)
    num_pos = hits_so_far[:, -1]

    precision = np.divide(hits_so_far, kept_rank, out=np.zeros(dist.shape), where=positive)
    ap = precision.sum(axis=1) / np.maximum(num_pos, 1)
    rows = np.arange(dist.shape[0])
    first_rank = np.where(num_pos > 0, kept_rank[rows, np.argmax(positive, axis=1)], 0)
    return first_rank, ap


def evaluate_ranking(
    distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50
) -> tuple[np.ndarray, float]:
    """CMC and mAP of a distance matrix [Q, G] under the Market-1501 protocol.

    q_pids, q_camids: [Q]; g_pids, g_camids: [G]. Ties in a row are broken by ascending
    gallery index (stable sort). Returns (cmc float32 [min(max_rank, G)], mAP float), both
    fractions in [0, 1]. Raises ValueError if no query has a positive left in the gallery.
    """
    distmat = np.asarray(distmat)
    check.check_matrix("distmat", distmat)
    num_q, num_g = distmat.shape
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    max_rank = check.check_ranking_inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    check.check_finite("distmat", distmat)
    distmat = distmat.astype(np.float32, copy=False)

    first_rank_hist = np.zeros(num_g + 1, dtype=np.int64)  # index 0 counts invalid queries
    ap_sum = 0.0
    for start, stop in _row_chunks(num_q, num_g):
        first_rank, ap = _rank_chunk(
            distmat[start:stop], q_pids[start:stop], g_pids, q_camids[start:stop], g_camids
        )
        first_rank_hist += np.bincount(first_rank, minlength=num_g + 1)
        ap_sum += float(ap.sum())

    return check.cmc_and_map(first_rank_hist, ap_sum, num_q, max_rank)


# --------------------------------------------------------------------------------------------
# k-reciprocal re-ranking
# --------------------------------------------------------------------------------------------
# Side of the square tiles of the transposed copies: a tile's source and destination stay in
# cache, where a copy of whole transposed rows strides through memory (2-3x slower at Market)
_TRANSPOSE_TILE = 128


def _fill_squared(out: np.ndarray, block: np.ndarray, dtype, transpose: bool) -> None:
    """out = float32(block ** 2) (of block.T if ``transpose``), squared in ``dtype``."""
    if not transpose:
        for start, stop in _row_chunks(out.shape[0], out.shape[1]):
            out[start:stop] = np.square(block[start:stop].astype(dtype, copy=False)).astype(np.float32, copy=False)
        return
    rows, cols = out.shape
    for r0 in range(0, rows, _TRANSPOSE_TILE):
        for c0 in range(0, cols, _TRANSPOSE_TILE):
            src = block[c0:c0 + _TRANSPOSE_TILE, r0:r0 + _TRANSPOSE_TILE].T
            tile = out[r0:r0 + _TRANSPOSE_TILE, c0:c0 + _TRANSPOSE_TILE]
            if src.dtype == dtype == np.float32:
                np.square(src, out=tile)  # no temporary
            else:
                tile[...] = np.square(src.astype(dtype, copy=False))


def _normalised_square_dist(q_g_dist, q_q_dist, g_g_dist) -> np.ndarray:
    """The published ``original_dist`` [N, N] float32, built directly in its transposed layout."""
    num_q, num_g = q_g_dist.shape
    n = num_q + num_g
    dtype = np.result_type(q_g_dist, q_q_dist, g_g_dist)  # what np.concatenate would give
    dist = np.empty((n, n), dtype=np.float32)
    # transpose([[qq, qg], [qg^T, gg]]) == [[qq^T, qg], [qg^T, gg^T]]
    _fill_squared(dist[:num_q, :num_q], q_q_dist, dtype, transpose=True)
    _fill_squared(dist[:num_q, num_q:], q_g_dist, dtype, transpose=False)
    _fill_squared(dist[num_q:, :num_q], q_g_dist, dtype, transpose=True)
    _fill_squared(dist[num_q:, num_q:], g_g_dist, dtype, transpose=True)
    _normalise_rows(dist)
    return dist


def _normalise_rows(dist: np.ndarray) -> None:
    """dist /= its row maxima, in place; the maxima must be finite and positive."""
    n = dist.shape[0]
    row_max = dist.max(axis=1, keepdims=True)  # the column max of the untransposed matrix
    bad = np.flatnonzero(~(np.isfinite(row_max[:, 0]) & (row_max[:, 0] > 0)))
    if bad.size:
        raise ValueError(
            f"cannot normalise distances: item {bad[0]} (of {n} = Q + G) has a maximum squared "
            f"distance of {row_max[bad[0], 0]} (zero to every item, or overflow)"
        )
    dist /= row_max


def _top_k_stable(dist: np.ndarray, k: int) -> np.ndarray:
    """Indices [N, k] of the k smallest entries per row, ordered by (value, column)."""
    n_rows, n_cols = dist.shape
    out = np.empty((n_rows, k), dtype=np.int64)
    for start, stop in _row_chunks(n_rows, n_cols):
        block = dist[start:stop]
        if k >= n_cols:
            out[start:stop] = np.argsort(block, axis=1, kind="stable")[:, :k]
            continue
        kth = np.partition(block, k - 1, axis=1)[:, k - 1:k]
        rows, cols = np.nonzero(block <= kth)  # >= k survivors per row, more with ties at kth
        order = np.lexsort((cols, block[rows, cols], rows))
        rows, cols = rows[order], cols[order]
        row_start = np.searchsorted(rows, np.arange(stop - start))
        rank = np.arange(rows.size) - row_start[rows]
        sel = rank < k
        out[start + rows[sel], rank[sel]] = cols[sel]
    return out


def _reciprocal_mask(forward: np.ndarray) -> np.ndarray:
    """mask[i, a]: is i among the forward neighbours of forward[i, a]? forward: [N, k+1]."""
    mask = np.empty(forward.shape, dtype=bool)
    width = forward.shape[1]
    for start, stop in _row_chunks(forward.shape[0], width * width):
        backward = forward[forward[start:stop]]  # [c, k+1, k+1]
        mask[start:stop] = (backward == np.arange(start, stop)[:, None, None]).any(axis=2)
    return mask


def _expanded_sets(top: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """COO (rows, cols) of every item's expanded k-reciprocal set; cols ascending per row."""
    n = top.shape[0]
    half = int(np.around(k1 / 2.0))  # round half to even, as published
    fwd = top[:, :k1 + 1]
    fwd_half = top[:, :half + 1]
    mask = _reciprocal_mask(fwd)
    mask_half = _reciprocal_mask(fwd_half)

    rows_out, cols_out = [], []
    cost = fwd.shape[1] * fwd_half.shape[1] * fwd.shape[1]
    for start, stop in _row_chunks(n, cost):
        f, m = fwd[start:stop], mask[start:stop]  # [c, a]
        cand, cand_m = fwd_half[f], mask_half[f]  # [c, a, b]: each candidate's half set
        in_own = ((cand[..., None] == f[:, None, None, :]) & m[:, None, None, :]).any(axis=3)
        overlap = (in_own & cand_m).sum(axis=2)
        accept = m & (overlap > 2.0 / 3 * cand_m.sum(axis=2))
        members = np.concatenate(
            [np.where(m, f, n), np.where(accept[..., None] & cand_m, cand, n).reshape(len(f), -1)],
            axis=1,
        )
        members.sort(axis=1)
        new = np.ones(members.shape, dtype=bool)
        new[:, 1:] = members[:, 1:] != members[:, :-1]
        r, c = np.nonzero(new & (members < n))
        rows_out.append(r + start)
        cols_out.append(members[r, c])
    return np.concatenate(rows_out), np.concatenate(cols_out)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concatenate([arange(s, s + l) for s, l in zip(starts, lengths)])."""
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))


def _indptr(rows: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])


def _query_expand(neighbours, indptr, cols, vals, n):
    """CSR of V_qe[i] = mean of V[neighbours[i]] (float32); neighbours: [N, k2]."""
    k = neighbours.shape[1]
    row_nnz = np.diff(indptr)
    rows_out, cols_out, vals_out = [], [], []
    for start, stop in _row_chunks(n, k * max(1, int(row_nnz.max()))):
        src = neighbours[start:stop].ravel()
        lengths = row_nnz[src]
        pos = _ranges(indptr[src], lengths)
        owner = np.repeat(np.repeat(np.arange(stop - start), k), lengths)
        keys, inverse = np.unique(owner * n + cols[pos], return_inverse=True)
        sums = np.bincount(inverse, weights=vals[pos])
        rows_out.append(keys // n + start)
        cols_out.append(keys % n)
        vals_out.append((sums / k).astype(np.float32))
    rows = np.concatenate(rows_out)
    return _indptr(rows, n), np.concatenate(cols_out), np.concatenate(vals_out)


def _jaccard_query_gallery(indptr, cols, vals, num_q):
    """Jaccard distance [Q, G] float32 between the V rows of queries and of gallery items."""
    n = indptr.size - 1
    num_g = n - num_q
    # Inverted index over the gallery rows: for each column c, the gallery items using it.
    g_first = indptr[num_q]
    g_rows = np.repeat(np.arange(num_g), np.diff(indptr[num_q:]))
    g_cols = cols[g_first:]
    by_col = np.argsort(g_cols, kind="stable")
    col_items, col_vals = g_rows[by_col], vals[g_first:][by_col]
    col_ptr = _indptr(g_cols, n)
    col_len = np.diff(col_ptr)

    # Chunk the queries so that the (query entry, gallery entry) pairs plus the dense
    # [chunk, G] accumulator stay near _CHUNK_ELEMENTS.
    q_rows = np.repeat(np.arange(num_q), np.diff(indptr[:num_q + 1]))
    cost = np.bincount(q_rows, weights=col_len[cols[:g_first]], minlength=num_q) + num_g
    chunk_id = (np.cumsum(cost) - cost) // _CHUNK_ELEMENTS
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(chunk_id)) + 1, [num_q]])

    out = np.empty((num_q, num_g), dtype=np.float32)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        e0, e1 = indptr[start], indptr[stop]
        e_cols, e_vals = cols[e0:e1], vals[e0:e1]
        lengths = col_len[e_cols]
        pos = _ranges(col_ptr[e_cols], lengths)
        pair_rows = np.repeat(q_rows[e0:e1] - start, lengths)
        mins = np.minimum(np.repeat(e_vals, lengths), col_vals[pos])
        temp = np.bincount(
            pair_rows * num_g + col_items[pos], weights=mins, minlength=(stop - start) * num_g
        )
        temp = temp.reshape(stop - start, num_g).astype(np.float32)
        out[start:stop] = 1 - temp / (2.0 - temp)
    return out


def _check_rerank_inputs(q_g_dist, q_q_dist, g_g_dist):
    check.check_matrix("q_g_dist", q_g_dist)
    num_q, num_g = q_g_dist.shape
    check.check_matrix("q_q_dist", q_q_dist, (num_q, num_q), f"(Q, Q) with Q = {num_q} from q_g_dist")
    check.check_matrix("g_g_dist", g_g_dist, (num_g, num_g), f"(G, G) with G = {num_g} from q_g_dist")
    for name, x in (("q_g_dist", q_g_dist), ("q_q_dist", q_q_dist), ("g_g_dist", g_g_dist)):
        check.check_finite(name, x)


def rerank_k_reciprocal(
    q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> np.ndarray:
    """k-reciprocal re-ranking of a query-gallery distance matrix.

    q_g_dist [Q, G], q_q_dist [Q, Q], g_g_dist [G, G] (e.g. cosine distances). Returns the
    re-ranked float32 [Q, G] distances: (1 - lambda_value) * Jaccard + lambda_value * the
    normalised squared original. Ties in the neighbour ranking are broken by ascending index.
    Needs O((Q + G)^2) memory; see the module note for the steps.
    """
    q_g_dist, q_q_dist, g_g_dist = np.asarray(q_g_dist), np.asarray(q_q_dist), np.asarray(g_g_dist)
    _check_rerank_inputs(q_g_dist, q_q_dist, g_g_dist)
    k1 = check.check_positive_int("k1", k1)
    k2 = check.check_positive_int("k2", k2)
    lambda_value = check.check_unit_interval("lambda_value", lambda_value)
    dist = _normalised_square_dist(q_g_dist, q_q_dist, g_g_dist)
    return rerank_normalised(dist, q_g_dist.shape[0], k1, k2, lambda_value)


def rerank_normalised(dist: np.ndarray, num_q: int, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    """Steps 2-7 of the module note on the published ``original_dist`` [N, N] float32 (rows
    normalised; item i < num_q a query). ``dist`` is read, not changed. Returns [Q, G] float32."""
    n = dist.shape[0]
    top = _top_k_stable(dist, min(max(k1 + 1, k2), n))

    rows, cols = _expanded_sets(top, k1)
    weights = np.exp(-dist[rows, cols])
    sums = np.bincount(rows, weights=weights, minlength=n).astype(np.float32)
    vals = weights / sums[rows]
    indptr = _indptr(rows, n)
    if k2 != 1:
        indptr, cols, vals = _query_expand(top[:, :k2], indptr, cols, vals, n)

    final = _jaccard_query_gallery(indptr, cols, vals, num_q)
    final *= 1 - lambda_value
    final += dist[:num_q, num_q:] * lambda_value
    return final
