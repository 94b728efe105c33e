"""Fast host paths of the evaluation kernels: float32 BLAS distances and the sort-free ranking.

Design note
-----------
The NumPy reference (``reference.py``) computes distances in float64, which is what sklearn
does and what the published API promises; at Market-1501 scale with re-ranking its three
matrices are most of a CPU evaluation. These are the paths a CPU evaluation runs instead
(``eval.exact=false``), each with the same signature as the reference plus ``precision``:

``compute_distmat(qf [Q, D], gf [G, D], metric, precision) -> [Q, G] float32``
    Row statistics in float64 (inverse norms for cosine, squared norms for the euclidean
    metrics), rounded once to float32; the GEMM in float32 through NumPy's BLAS (sgemm, ~2x
    the float64 rate); the epilogue in float32, in place. Cosine multiplies unit rows (the
    normalisation is applied to the features, so the epilogue is only 1 - x, clipped to [0, 2]).
    When ``qf is gf`` only the blocks on and above the diagonal are multiplied and the rest is
    mirrored (half the FLOPs; the result is exactly symmetric, with a zero diagonal as sklearn).
    ``precision="tf32"`` / ``"bf16"`` first round the GEMM inputs to nearest-even at 10 / 7
    mantissa bits: the rounding of the GPU's tensor-core compute types, so that their effect on
    the ranking can be measured on a CPU (their speed is a GPU matter: this is no faster).
    Tolerance vs the float64 reference (tests/test_kernels_host.py): float32 accumulation over
    D terms, |error| <= 2e-5 for cosine distances of D <= 4096 features (observed ~2e-6); for
    the euclidean metrics 2e-5 relative to |q|^2 + |g|^2 on the squares (the cancellation of
    |q|^2 + |g|^2 - 2 q.g, as in any float32 GEMM path). The CMC/mAP computed from them agree
    with the exact path's to 1e-3 at worst on the tested data (swaps of near-ties only; 0 on
    most draws).
    Memory: the float32 output plus float32 copies of the features.

``evaluate_ranking(distmat, ...)``
    The sort-free algorithm of ``ranking.py`` (what the GPU runs) on NumPy: per query row a
    binary search of its G keys among the positives' sorted keys instead of a sort of the row.
    Results equal the reference's (same tie rule; mAP summed in another order, 1e-12).
"""
from __future__ import annotations

import numpy as np

from . import _validate as check
from . import gpu, ranking, reference
from .launch import _check_precision, _round_mantissa

METRICS = ("cosine", "euclidean", "sqeuclidean")
# Rows of one GEMM call: large enough for the BLAS to run at its peak, small enough that the
# epilogue's block stays a fraction of the output
_BLOCK_ROWS = 2048
# Side of the square tiles of the mirrored (transposed) copy
_MIRROR_TILE = 512


def _row_stats(x: np.ndarray, metric: str) -> np.ndarray:
    """float64 [n]: inverse norms (cosine; 1 for zero rows, as sklearn's normalize) or squared norms."""
    # products and sums in float64 element by element, without a float64 copy of the features
    # (the copy took 50x longer than the sums at Market-1501's gallery)
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    if metric != "cosine":
        return sq
    norms = np.sqrt(sq)
    norms[norms == 0.0] = 1.0
    return 1.0 / norms


def _gemm_operand(x: np.ndarray, stat: np.ndarray, metric: str, precision: str) -> np.ndarray:
    """The float32 matrix the GEMM multiplies: unit rows for cosine (scaled in float32: two
    roundings of ~6e-8 each, far below the GEMM's), the features otherwise."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        x = x * stat.astype(np.float32)[:, None]
    return x if precision == "float32" else _round_mantissa(np, x, precision)


def _epilogue(block: np.ndarray, q_stat32: np.ndarray, g_stat32: np.ndarray, metric: str) -> None:
    """dot products -> distances, in place on a float32 block [r, c]."""
    if metric == "cosine":
        np.subtract(np.float32(1), block, out=block)
        np.clip(block, np.float32(0), np.float32(2), out=block)
        return
    block *= np.float32(-2)
    block += q_stat32[:, None]
    block += g_stat32[None, :]
    np.maximum(block, np.float32(0), out=block)
    if metric == "euclidean":
        np.sqrt(block, out=block)


def _mirror_below(out: np.ndarray, start: int, stop: int) -> None:
    """out[stop:, start:stop] = out[start:stop, stop:].T, in cache-sized tiles, and the diagonal
    block's lower triangle from its upper one: the result is exactly symmetric whatever order the
    BLAS summed (i, j) and (j, i) in."""
    block = out[start:stop, start:stop]
    lower = np.tril_indices(stop - start, -1)
    block[lower] = block.T[lower]
    n = out.shape[0]
    for c0 in range(stop, n, _MIRROR_TILE):
        c1 = min(c0 + _MIRROR_TILE, n)
        out[c0:c1, start:stop] = out[start:stop, c0:c1].T


def compute_distmat(qf, gf, metric: str = "cosine", precision: str = "float32") -> np.ndarray:
    """Distances [Q, G] float32 between qf [Q, D] and gf [G, D] with a float32 (or tf32 / bf16
    rounded) GEMM; see the module note for the tolerance against ``reference.compute_distmat``.
    """
    _check_precision(precision)
    if precision == "float64":
        raise ValueError("precision='float64' is the reference: call reference.compute_distmat")
    qf, gf, same = check.check_distmat_inputs(qf, gf, metric, METRICS)

    q_stat = _row_stats(qf, metric)
    g_stat = q_stat if same else _row_stats(gf, metric)
    q = _gemm_operand(qf, q_stat, metric, precision)
    g = q if same else _gemm_operand(gf, g_stat, metric, precision)
    q_stat32, g_stat32 = q_stat.astype(np.float32), g_stat.astype(np.float32)

    num_q, num_g = q.shape[0], g.shape[0]
    out = np.empty((num_q, num_g), dtype=np.float32)
    for start in range(0, num_q, _BLOCK_ROWS):
        stop = min(start + _BLOCK_ROWS, num_q)
        first = start if same else 0  # symmetric: the blocks left of the diagonal are mirrored
        block = out[start:stop, first:]
        np.matmul(q[start:stop], g[first:].T, out=block)
        _epilogue(block, q_stat32[start:stop], g_stat32[first:], metric)
        if same:
            _mirror_below(out, start, stop)
    if same:
        np.fill_diagonal(out, 0.0)
    return out


def evaluate_ranking(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> tuple[np.ndarray, float]:
    """(cmc float32 [min(max_rank, G)], mAP) of distmat [Q, G]; equal to ``reference.evaluate_ranking``."""
    return ranking.evaluate_ranking(np.asarray(distmat), q_pids, g_pids, q_camids, g_camids, max_rank,
                                    backend=gpu.NUMPY_BACKEND)


def joint_distmat(qf, gf, metric: str = "cosine", precision: str = "float32") -> np.ndarray:
    """Distances [N, N] float32 of all N = Q + G items (queries first), exactly symmetric:
    ``compute_distmat(x, x)`` of x = [qf; gf], whose blocks are the q-q, q-g and g-g matrices."""
    qf, gf = np.asarray(qf), np.asarray(gf)
    check.check_features("qf", qf)
    check.check_features("gf", gf, feature_dim=qf.shape[1], ref_name="qf")
    check.check_finite("qf", qf)
    check.check_finite("gf", gf)
    x = np.concatenate([qf.astype(np.float32, copy=False), gf.astype(np.float32, copy=False)])
    return compute_distmat(x, x, metric, precision)


def rerank_joint(joint: np.ndarray, num_q: int, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked distances [Q, G] float32 from ``joint_distmat``'s matrix, which it overwrites.

    The published ``original_dist`` is the transposed [[qq, qg], [qg^T, gg]], squared, rows
    normalised; for an exactly symmetric matrix that is the matrix itself squared in place, so
    the reference's copy with transposed reads (and a separate g-g matrix) are saved. Equal, bit
    for bit, to ``reference.rerank_k_reciprocal`` of the matrix's blocks (tested).
    """
    check.check_matrix("joint", joint, (joint.shape[0], joint.shape[0]), "(N, N)")
    if not 1 <= num_q < joint.shape[0]:
        raise ValueError(f"num_q must lie in [1, {joint.shape[0]}) for a joint matrix of {joint.shape[0]} items; got {num_q}")
    check.check_finite("joint", joint)
    k1 = check.check_positive_int("k1", k1)
    k2 = check.check_positive_int("k2", k2)
    lambda_value = check.check_unit_interval("lambda_value", lambda_value)
    np.square(joint, out=joint)
    reference._normalise_rows(joint)
    return reference.rerank_normalised(joint, num_q, k1, k2, lambda_value)
