"""GPU evaluation kernels (``alr_fast.kernels.gpu``).

Two groups:

* always run: the algorithms of ``distance.py``, ``ranking.py`` and ``rerank.py`` on the NumPy backend (``gpu.NUMPY_BACKEND``: NumPy
  emulations of the CUDA kernels, everything around them unchanged) against the NumPy
  reference and the published oracles, with memory budgets small enough to cut every loop into
  many chunks; plus the argument checks of the kernel wrappers and the CPU side of the dispatch.
* ``gpu``: the CuPy kernels themselves, through the public functions (CuPy arrays and torch
  CUDA tensors) and one kernel at a time against its emulation, over float16/float32/float64
  and awkward shapes (1 x 1, non-multiples of the tiles, non-contiguous, ties).

Tolerances: ranking results are exact (integer ranks; mAP summed in float64, 1e-12);
re-ranking on the NumPy backend equals the reference to 1e-6 (bit-identical in practice), the
published code to 1e-5; distances carry float32 GEMM accumulation: rtol 1e-5 and atol 2e-5
times the largest distance.
"""
from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest

from alr_fast import kernels
from alr_fast.kernels import distance, gpu, launch, ranking, reference, rerank
from alr_fast.kernels import host as host_path

from reference_oracles import brute_force_ranking, published_re_ranking

NP = gpu.NUMPY_BACKEND
BUDGETS = [None, 1, 6000]  # default, one row/column per chunk, a few per chunk


def _structured(rng, num_q, num_g, num_ids=30, num_cams=4, dim=32, noise=1.1):
    """Clustered features of identities seen by a few cameras, with distractors and junk."""
    centres = rng.normal(size=(num_ids + 3, dim))
    cam_shift = 0.4 * rng.normal(size=(num_cams, dim))
    q_pids = rng.integers(1, num_ids + 3, num_q)  # the two last pids never reach the gallery
    q_cams = rng.integers(0, num_cams, num_q)
    g_pids = rng.integers(0, num_ids + 1, num_g)  # pid 0: distractors
    g_cams = rng.integers(0, num_cams, num_g)
    qf = centres[q_pids] + cam_shift[q_cams] + noise * rng.normal(size=(num_q, dim))
    gf = centres[g_pids] + cam_shift[g_cams] + noise * rng.normal(size=(num_g, dim))
    gf[g_pids == 0] = 3.0 * rng.normal(size=(int((g_pids == 0).sum()), dim))
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def _tied_problem(rng, num_q, num_g, levels=6):
    """Integer-valued distances (many ties), few pids and cameras, one query without a match."""
    distmat = rng.integers(0, levels, size=(num_q, num_g)).astype(np.float64)
    q_pids = rng.integers(1, 7, num_q)
    q_pids[0] = 6
    g_pids = rng.integers(0, 6, num_g)
    q_cams, g_cams = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    return distmat, q_pids, g_pids, q_cams, g_cams


def _rerank_inputs(rng, num_q, num_g, dtype=np.float32):
    qf, gf = _structured(rng, num_q, num_g)[:2]
    return tuple(reference.compute_distmat(a, b).astype(dtype) for a, b in ((qf, gf), (qf, qf), (gf, gf)))


def _tied_rerank_inputs(rng, num_q, num_g):
    """Integer-valued, asymmetric distances with a non-zero diagonal: ties everywhere."""
    points = rng.integers(0, 6, size=(num_q + num_g, 2)).astype(np.float64)
    full = np.abs(points[:, None] - points[None]).sum(axis=-1) + rng.integers(0, 2, (num_q + num_g,) * 2)
    return full[:num_q, num_q:], full[:num_q, :num_q], full[num_q:, num_q:]


# --------------------------------------------------------------------------------------------
# Keys and small building blocks (NumPy)
# --------------------------------------------------------------------------------------------
def test_rank_keys_order_is_numpy_stable_sort_including_special_values():
    rng = np.random.default_rng(1)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 1e-40, 3.0],
                        dtype=np.float32)
    weird_nan = np.array([0x7FC00001, 0xFFC12345], dtype=np.uint32).view(np.float32)
    values = np.concatenate([rng.choice(specials, 300), weird_nan,
                             rng.integers(-3, 4, 200).astype(np.float32),
                             rng.normal(size=200).astype(np.float32)])
    values = values[rng.permutation(values.size)]
    keys = launch._rank_keys(np, values, np.arange(values.size))
    np.testing.assert_array_equal(np.argsort(keys), np.argsort(values, kind="stable"))


@pytest.mark.parametrize("n_slices", [1, 3, 7])
def test_topk_slices_and_merge_equal_stable_argsort(n_slices):
    rng = np.random.default_rng(10 + n_slices)
    a = rng.integers(0, 4, size=(9, 13)).astype(np.float16)  # stacked [9 + 14, 13]: many ties
    b = rng.integers(0, 4, size=(14, 13)).astype(np.float32)
    col_max, flags = rerank._xp_column_max_sq(np, a, b, np.float32)
    sq = np.concatenate([a.astype(np.float32) ** 2, b ** 2]).T  # dist rows = columns of the stack
    np.testing.assert_array_equal(col_max, sq.max(axis=1))
    np.testing.assert_array_equal(flags, 0)
    for k in (1, 5, 23):
        keys = rerank._xp_column_topk_keys(np, a, b, np.float32, col_max, k, n_slices=n_slices)
        assert keys.shape[1:] == (13, k) and keys.shape[0] == -(-23 // -(-23 // n_slices))
        expected = np.argsort(sq / col_max[:, None], axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(rerank._merge_topk(np, keys, k), expected)


def test_column_max_flags_name_the_matrix_with_non_finite_values():
    a, b = np.ones((3, 4)), np.ones((2, 4))
    a[1, 2], b[0, 3] = np.inf, np.nan
    np.testing.assert_array_equal(rerank._xp_column_max_sq(np, a, b, np.float64)[1], [0, 0, 1, 2])


def test_count_negatives_before_contract_hand_case():
    # One query (pid code 1). Gallery: positives at columns 1 and 4 (distances 0.5, 0.2),
    # negatives at 0 (0.5), 2 (0.1), 3 (0.9), 5 (0.2); the tie 0.2 at columns 4 and 5 puts
    # column 4 first, the tie 0.5 at columns 0 and 1 puts the negative 0 first.
    dist = np.array([[0.5, 0.5, 0.1, 0.9, 0.2, 0.2]], dtype=np.float32)
    g_code = np.array([0, 1, 0, 0, 1, 0], dtype=np.int32)
    pos = np.array([4, 1])  # sorted by key: (0.2, 4) then (0.5, 1)
    keys = launch._rank_keys(np, dist[0, pos], pos)
    counts = ranking._xp_count_negatives_before(
        np, dist, np.array([1], np.int32), g_code, np.array([0, 2]), np.array([2], np.int32), keys)
    # before (0.2, 4): column 2 (0.1); between it and (0.5, 1): columns 5 (0.2) and 0 (0.5, index 0)
    np.testing.assert_array_equal(counts, [1, 2])


def test_cost_chunks_respect_the_budget():
    costs = np.array([5, 1, 1, 7, 2, 2, 2, 30, 1])
    chunks = launch._cost_chunks(costs, budget=8)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(costs)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for start, stop in chunks:
        assert costs[start:stop].sum() <= 8 or stop - start == 1


# --------------------------------------------------------------------------------------------
# evaluate_ranking on the NumPy backend
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("seed", range(4))
def test_xp_ranking_matches_brute_force_and_reference(seed, budget):
    rng = np.random.default_rng(100 + seed)
    problem = _tied_problem(rng, int(rng.integers(15, 40)), int(rng.integers(30, 80)))
    cmc, mAP = gpu.evaluate_ranking(*problem, max_rank=20, memory_budget_bytes=budget, backend=NP)
    ref_cmc, ref_mAP = reference.evaluate_ranking(*problem, max_rank=20)
    brute_cmc, brute_mAP = brute_force_ranking(*problem, max_rank=20)
    assert cmc.dtype == np.float32 and cmc.shape == (20,)
    np.testing.assert_array_equal(cmc, ref_cmc)
    np.testing.assert_allclose(cmc, brute_cmc, rtol=0, atol=1e-6)
    assert mAP == pytest.approx(ref_mAP, abs=1e-12) and mAP == pytest.approx(brute_mAP, abs=1e-12)


def test_xp_ranking_hand_case_and_tie_rule():
    distmat = np.array([[0.5, 0.5, 0.3, 0.1, 0.9], [0.1, 0.7, 0.2, 0.7, 0.3], [0.4, 0.2, 0.6, 0.8, 0.1]])
    q_pids, q_cams = np.array([1, 2, 3]), np.array([0, 0, 0])
    g_pids, g_cams = np.array([1, 2, 1, 0, 2]), np.array([1, 1, 0, 1, 2])
    cmc, mAP = gpu.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams, 4, backend=NP)
    np.testing.assert_array_equal(cmc, np.array([0.0, 0.5, 1.0, 1.0], dtype=np.float32))
    assert mAP == pytest.approx((1 / 2 + (1 / 3 + 2 / 4) / 2) / 2, abs=1e-12)
    perm = np.array([1, 0, 2, 3, 4])  # the negative now wins the 0.5 tie of q0
    cmc, mAP = gpu.evaluate_ranking(distmat[:, perm], q_pids, g_pids[perm], q_cams, g_cams[perm], 4, backend=NP)
    np.testing.assert_array_equal(cmc, np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32))
    assert mAP == pytest.approx((1 / 3 + (1 / 3 + 2 / 4) / 2) / 2, abs=1e-12)


def test_xp_ranking_special_values_dtypes_and_layouts():
    rng = np.random.default_rng(7)
    distmat, q_pids, g_pids, q_cams, g_cams = _tied_problem(rng, 30, 64, levels=3)
    distmat[rng.random(distmat.shape) < 0.1] = -0.0  # ties with +0.0 by index, as NumPy
    distmat[rng.random(distmat.shape) < 0.05] = 3.4e38  # the largest float32s, ties by index
    distmat[rng.random(distmat.shape) < 0.05] = 1e-45  # subnormal: no flush to zero
    expected = reference.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams, 50)
    variants = {
        "float64": distmat,
        "float32": distmat.astype(np.float32),
        "fortran": np.asfortranarray(distmat.astype(np.float32)),
        "strided": np.repeat(distmat.astype(np.float32), 2, axis=1)[:, ::2],
    }
    flipped = distmat.astype(np.float32)[::-1]  # negative row stride: copied, not misread
    np.testing.assert_array_equal(
        gpu.evaluate_ranking(flipped, q_pids[::-1], g_pids, q_cams[::-1], g_cams, 50, backend=NP)[0], expected[0])
    for name, d in variants.items():
        got = gpu.evaluate_ranking(d, q_pids.astype(np.int32), g_pids, q_cams - 5, g_cams - 5, 50,
                                   memory_budget_bytes=3000, backend=NP)
        np.testing.assert_array_equal(got[0], expected[0], err_msg=name)
        assert got[1] == pytest.approx(expected[1], abs=1e-12), name
    ints = rng.integers(0, 4, distmat.shape)
    np.testing.assert_array_equal(gpu.evaluate_ranking(ints, q_pids, g_pids, q_cams, g_cams, backend=NP)[0],
                                  reference.evaluate_ranking(ints, q_pids, g_pids, q_cams, g_cams)[0])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_ranking_rejects_non_finite_distances_on_every_path(value):
    """Issue 12 item 12: an all-NaN distmat used to give a plausible mAP; every path refuses it."""
    rng = np.random.default_rng(17)
    distmat, q_pids, g_pids, q_cams, g_cams = _tied_problem(rng, 12, 40)
    distmat = distmat.astype(np.float32)
    distmat[3, 7] = value
    message = r"^distmat contains NaN or infinite values \(shape \(12, 40\) float32\)$"
    for rank in (reference.evaluate_ranking, host_path.evaluate_ranking,
                 lambda *a: gpu.evaluate_ranking(*a, backend=NP),
                 lambda *a: kernels.evaluate_ranking(*a, method="count"), kernels.evaluate_ranking):
        with pytest.raises(ValueError, match=message):
            rank(distmat, q_pids, g_pids, q_cams, g_cams)
    with pytest.raises(ValueError, match=r"^distmat contains NaN"):
        kernels.evaluate_ranking(np.full((12, 40), np.nan), q_pids, g_pids, q_cams, g_cams)


@pytest.mark.parametrize("precision", [None, "float64", "float32", "tf32", "bf16"])
def test_distmat_rejects_non_finite_features_on_every_path(precision):
    rng = np.random.default_rng(18)
    qf, gf = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(9, 8)).astype(np.float32)
    for name, (q, g) in {"qf": (np.where(np.eye(5, 8) > 0, np.nan, qf), gf),
                         "gf": (qf, np.where(np.eye(9, 8) > 0, -np.inf, gf))}.items():
        shape = q.shape if name == "qf" else g.shape
        message = rf"^{name} contains NaN or infinite values \(shape \({shape[0]}, 8\) float32\)$"
        with pytest.raises(ValueError, match=message):
            kernels.compute_distmat(q, g, precision=precision)
        with pytest.raises(ValueError, match=message):
            gpu.compute_distmat(q, g, precision=precision, backend=NP)
    with pytest.raises(ValueError, match=r"^qf contains NaN"):
        kernels.compute_distmat(np.full((3, 4), np.nan, np.float16), np.ones((2, 4), np.float16), precision=precision)


def test_xp_ranking_structured_one_by_one_and_errors():
    rng = np.random.default_rng(8)
    qf, gf, q_pids, g_pids, q_cams, g_cams = _structured(rng, 80, 400)
    distmat = reference.compute_distmat(qf, gf)
    got = gpu.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams, backend=NP)
    expected = reference.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams)
    assert 0.1 < got[1] < 0.95
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1] == pytest.approx(expected[1], abs=1e-12)
    # 1 x 1: a single positive at rank 1
    one = gpu.evaluate_ranking(np.zeros((1, 1)), [4], [4], [0], [1], max_rank=1, backend=NP)
    assert one[0].tolist() == [1.0] and one[1] == 1.0
    with pytest.raises(ValueError, match="no query has a valid match in the gallery"):
        gpu.evaluate_ranking(np.zeros((1, 1)), [4], [4], [0], [0], max_rank=1, backend=NP)
    with pytest.warns(UserWarning, match="gallery samples is quite small"):
        assert gpu.evaluate_ranking(distmat[:, :7], q_pids, g_pids[:7], q_cams, g_cams[:7], backend=NP)[0].shape == (7,)
    with pytest.raises(ValueError, match=r"g_camids must be 1-D of length 400.*shape \(400, 1\)"):
        gpu.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams[:, None], backend=NP)
    with pytest.raises(ValueError, match="memory_budget_bytes must be an integer >= 1; got 0"):
        gpu.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams, memory_budget_bytes=0, backend=NP)


# --------------------------------------------------------------------------------------------
# compute_distmat on the NumPy backend
# --------------------------------------------------------------------------------------------
def _assert_distances_close(got, expected, metric, exact=False):
    """float32 GEMM tolerance: 2e-5 of the largest value; euclidean compared squared, since
    the square root magnifies the cancellation of |q|^2 + |g|^2 - 2 q.g near 0 (as sklearn's
    float32 path without upcast); ``exact``: float64 arithmetic, one float32 rounding."""
    if exact:
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * expected.max())
    elif metric == "euclidean":
        np.testing.assert_allclose(got.astype(np.float64) ** 2, expected.astype(np.float64) ** 2,
                                   rtol=1e-5, atol=2e-5 * float(expected.max()) ** 2)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5 * max(float(expected.max()), 1.0))


@pytest.mark.parametrize("metric", distance.METRIC_CODES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_xp_distmat_matches_reference(metric, dtype):
    rng = np.random.default_rng(20 + np.dtype(dtype).itemsize)
    qf = rng.normal(size=(37, 48)).astype(dtype)
    gf = rng.normal(size=(53, 48)).astype(dtype)
    gf[5] = qf[3]
    qf[7] = 0.0
    expected = reference.compute_distmat(qf, gf, metric)
    for budget in (None, 500):
        got = gpu.compute_distmat(qf, gf, metric, memory_budget_bytes=budget, backend=NP)
        assert got.dtype == np.float32 and got.shape == (37, 53)
        _assert_distances_close(got, expected, metric, exact=dtype == np.float64)
    same = gpu.compute_distmat(qf, qf, metric, backend=NP)
    np.testing.assert_array_equal(np.diag(same), 0.0)
    if metric == "cosine":
        np.testing.assert_array_equal(got[7], 1.0)  # a zero row is at distance 1 of everything


def test_xp_distmat_validation_names_argument():
    qf = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match=r"^gf must be 2-D float array with the same feature dimension as qf \(8\)"):
        gpu.compute_distmat(qf, np.ones((3, 6), np.float32), backend=NP)
    with pytest.raises(ValueError, match=r"^qf .*got shape \(4, 8\) int64$"):
        gpu.compute_distmat(qf.astype(np.int64), qf, backend=NP)
    with pytest.raises(ValueError, match="metric must be one of cosine, euclidean, sqeuclidean"):
        gpu.compute_distmat(qf, qf, "manhattan", backend=NP)


# --------------------------------------------------------------------------------------------
# rerank_k_reciprocal on the NumPy backend
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "k1, k2, lambda_value",
    [(20, 6, 0.3), (5, 6, 0.3), (5, 1, 0.3), (20, 6, 0.0), (20, 6, 1.0), (3, 10, 0.5)],
)
def test_xp_rerank_matches_reference_and_published(k1, k2, lambda_value):
    rng = np.random.default_rng(300 + 31 * k1 + 7 * k2 + int(10 * lambda_value))
    num_q, num_g = int(rng.integers(40, 90)), int(rng.integers(150, 300))
    inputs = _rerank_inputs(rng, num_q, num_g)
    expected = reference.rerank_k_reciprocal(*inputs, k1, k2, lambda_value)
    published = published_re_ranking(*inputs, k1, k2, lambda_value)
    for budget in (None, 20000):
        got = gpu.rerank_k_reciprocal(*inputs, k1, k2, lambda_value, memory_budget_bytes=budget, backend=NP)
        assert got.dtype == np.float32 and got.shape == (num_q, num_g)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got, published, rtol=0, atol=1e-5)
    assert np.ptp(got) > 0.1


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_xp_rerank_ties_and_dtypes(seed, dtype):
    rng = np.random.default_rng(400 + seed)
    inputs = tuple(x.astype(dtype) for x in _tied_rerank_inputs(rng, 25, 70))
    for k1, k2, lam in [(20, 6, 0.3), (5, 1, 0.0), (7, 3, 0.5)]:
        got = gpu.rerank_k_reciprocal(*inputs, k1, k2, lam, memory_budget_bytes=2000, backend=NP)
        np.testing.assert_allclose(got, reference.rerank_k_reciprocal(*inputs, k1, k2, lam), rtol=0, atol=1e-6)
    if dtype == np.float64:
        expected = published_re_ranking(*inputs, 20, 6, 0.3, sort_kind="stable")
        np.testing.assert_allclose(gpu.rerank_k_reciprocal(*inputs, backend=NP), expected, rtol=0, atol=1e-5)


def test_xp_rerank_mixed_dtypes_and_tiny_sizes():
    rng = np.random.default_rng(5)
    q_g, q_q, g_g = _rerank_inputs(rng, 30, 90)
    mixed = (q_g.astype(np.float16), q_q.astype(np.float64), g_g)
    np.testing.assert_allclose(gpu.rerank_k_reciprocal(*mixed, backend=NP),
                               reference.rerank_k_reciprocal(*mixed), rtol=0, atol=1e-6)
    for num_q, num_g in [(1, 1), (1, 2), (3, 5), (2, 40)]:
        inputs = _rerank_inputs(rng, num_q, num_g)
        for k1, k2 in [(20, 6), (1, 1), (2, 3)]:
            np.testing.assert_allclose(gpu.rerank_k_reciprocal(*inputs, k1, k2, backend=NP),
                                       reference.rerank_k_reciprocal(*inputs, k1, k2), rtol=0, atol=1e-6)
    # a hand-worked case: Q = 1, G = 2, k1 = 1, k2 = 1
    got = gpu.rerank_k_reciprocal(np.array([[1.0, 2.0]]), np.array([[0.0]]), np.array([[0.0, 3.0], [3.0, 0.0]]),
                                  1, 1, 0.0, backend=NP)
    v0 = np.array([1.0, np.exp(-0.25)]) / (1.0 + np.exp(-0.25))
    v1 = np.array([np.exp(-1 / 9), 1.0]) / (1.0 + np.exp(-1 / 9))
    m = np.minimum(v0, v1).sum()
    np.testing.assert_allclose(got[0], [1 - m / (2 - m), 1.0], rtol=0, atol=1e-6)


def test_xp_rerank_errors_match_reference():
    q_g, q_q, g_g = np.array([[1.0, 2.0]]), np.array([[0.0]]), np.array([[0.0, 3.0], [3.0, 0.0]])
    for args, message in [
        ((q_g, q_q, np.where(np.eye(2) > 0, np.nan, g_g)), "g_g_dist contains NaN or infinite values"),
        ((q_g, np.full((1, 1), np.inf), g_g * np.nan), "q_q_dist contains NaN"),
        ((q_g * np.inf, np.full((1, 1), np.inf), g_g), "q_g_dist contains NaN"),
        ((np.zeros((1, 2)), q_q, np.array([[0.0, 1.0], [1.0, 0.0]])),
         r"cannot normalise distances: item 0 \(of 3 = Q \+ G\) has a maximum squared distance of 0.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            reference.rerank_k_reciprocal(*args)
        with pytest.raises(ValueError, match=message):
            gpu.rerank_k_reciprocal(*args, backend=NP)
    with pytest.raises(ValueError, match=r"g_g_dist must have shape \(2, 2\).*shape \(2, 1\)"):
        gpu.rerank_k_reciprocal(q_g, q_q, g_g[:, :1], backend=NP)
    with pytest.raises(ValueError, match=r"q_q_dist must be float16, float32 or float64 on the GPU; "
                                         r"got shape \(1, 1\) int64"):
        gpu.rerank_k_reciprocal(q_g, q_q.astype(np.int64), g_g, backend=NP)
    with pytest.raises(ValueError, match="k1 must be an integer >= 1; got 0"):
        gpu.rerank_k_reciprocal(q_g, q_q, g_g, k1=0, backend=NP)


def test_xp_rerank_memory_stays_far_below_the_dense_matrix():
    # tracemalloc sees NumPy's allocations. The reference holds a float32 (Q + G)^2 matrix
    # (36 MB here) besides its inputs; the blocked algorithm needs the output (3.2 MB), the
    # O(N k) lists and V (~40 bytes per nonzero at peak) and the budget.
    inputs = _rerank_inputs(np.random.default_rng(6), 300, 2700)
    n = 3000
    tracemalloc.start()
    try:
        got = gpu.rerank_k_reciprocal(*inputs, memory_budget_bytes=1 << 20, backend=NP)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * 4 * n * n, peak
    assert got.shape == (300, 2700) and 0.5 < float(got.mean()) < 1.0


# --------------------------------------------------------------------------------------------
# Wrapper checks and the CPU side of the dispatch (no GPU needed)
# --------------------------------------------------------------------------------------------
def test_kernel_wrappers_reject_wrong_dtype_and_layout():
    with pytest.raises(ValueError, match=r"^dist must be a 2-D float32 array \(unit inner\); "
                                         r"got shape \(3, 4\) float64"):
        launch._require("dist", np.zeros((3, 4)), np.float32, 2)
    with pytest.raises(ValueError, match=r"^dist .*got shape \(3, 2\) float32 with strides \(16, 8\)"):
        launch._require("dist", np.zeros((3, 4), np.float32)[:, ::2], np.float32, 2)
    with pytest.raises(ValueError, match=r"^keys must be a 1-D uint64 array \(contiguous\)"):
        launch._require("keys", np.zeros(8, np.uint64)[::2], np.uint64, 1, "contiguous")
    with pytest.raises(ValueError, match=r"^top must be a 2-D .*got shape \(4,\)"):
        rerank._column_args(np.zeros(4), np.zeros((2, 4)))
    launch._require("dist", np.zeros((3, 4), np.float32)[1:], np.float32, 2)  # row views are fine


# --------------------------------------------------------------------------------------------
# Launch arguments against the .cu signatures (no GPU, no compiler needed)
# --------------------------------------------------------------------------------------------
# CuPy passes an ndarray as a pointer and a NumPy scalar by value with the size of its dtype,
# with no check against the kernel's parameters: a count, order or width mismatch reads garbage
# on the device. These tests parse every __global__ signature and compare each launch.
_C_TYPES = {"half_t": np.float16, "float": np.float32, "double": np.float64, "int": np.int32,
            "long long": np.int64, "unsigned int": np.uint32, "unsigned long long": np.uint64}


def _kernel_signatures(source: str) -> dict[str, tuple[list[str], list[tuple[str, bool]]]]:
    """{kernel: (template parameter names, [(C type, is pointer)])} of every __global__."""
    sigs = {}
    for m in re.finditer(r"(?:template\s*<([^>]*)>\s*)?__global__\s+void\s+(\w+)\s*\(([^)]*)\)", source):
        tparams = [p.split()[-1] for p in m.group(1).split(",")] if m.group(1) else []
        params = []
        for p in m.group(3).split(","):
            p = " ".join(p.replace("__restrict__", "").replace("const ", " ").split())
            pointer = "*" in p
            ctype = p.split("*")[0].strip() if pointer else p.rsplit(" ", 1)[0]
            params.append((ctype, pointer))
        sigs[m.group(2)] = (tparams, params)
    return sigs


def _launch_mismatches(source: str, name: str, args) -> list[str]:
    """Differences between the launch ``args`` of name expression ``name`` and its C++ signature."""
    kernel, _, targs = name.partition("<")
    tparams, params = _kernel_signatures(source)[kernel]
    binding = dict(zip(tparams, [t.strip() for t in targs.rstrip(">").split(",")] if targs else []))
    if len(binding) != len(tparams):
        return [f"{name}: {len(binding)} template arguments for {tparams}"]
    if len(args) != len(params):
        return [f"{name}: {len(args)} arguments for {len(params)} parameters"]
    problems = []
    for i, ((ctype, pointer), arg) in enumerate(zip(params, args)):
        want = np.dtype(_C_TYPES[binding.get(ctype, ctype)])
        if pointer and not (isinstance(arg, np.ndarray) and arg.dtype == want):
            problems.append(f"{name} argument {i}: {want.name} array expected, got {type(arg).__name__} "
                            f"{getattr(arg, 'dtype', '')}")
        elif not pointer and (isinstance(arg, np.ndarray) or type(arg) is not want.type):
            problems.append(f"{name} argument {i}: numpy.{want.name} scalar expected, got {type(arg).__name__}")
    return problems


class RecordingLauncher:
    """A ``launch`` that only records (filename, names, name, grid, block, args)."""

    def __init__(self):
        self.calls = []

    def __call__(self, filename, names, name, grid, block, args):
        self.calls.append((filename, names, name, tuple(grid), tuple(block), tuple(args)))


def _launch_every_instantiation(backend) -> None:
    """Call each kernel wrapper once per dtype combination it can dispatch to."""
    floats = [np.dtype(t) for t in _FLOATS]
    for dot_dtype in (np.float32, np.float64):
        for metric in distance.METRIC_CODES:
            backend.distance_epilogue(np.zeros((3, 5), dot_dtype), np.zeros((3, 5), np.float32),
                                      np.ones(3), np.ones(5), metric)
    backend.count_negatives_before(np.zeros((3, 5), np.float32), np.zeros(3, np.int32), np.ones(5, np.int32),
                                   np.array([0, 1, 1, 2]), np.array([1, 0, 1], np.int32), np.zeros(2, np.uint64))
    for s in floats:
        for a in floats:
            for b in floats:
                if s.itemsize < max(a.itemsize, b.itemsize):
                    continue
                top, bottom = np.ones((4, 6), a), np.ones((300, 6), b)
                backend.column_max_sq(top, bottom, s)
                for k in (1, rerank.TOPK_CAPACITIES[0] + 1):  # the two compiled list sizes
                    backend.column_topk_keys(top, bottom, s, np.ones(6, np.float32), k)
            if s.itemsize >= a.itemsize:
                backend.rerank_finalize(np.zeros((2, 6)), np.ones((2, 6), a), np.ones(2, np.float32), s,
                                        np.float32(0.7), np.float32(0.3), np.zeros((2, 6), np.float32))
    ptr = np.array([0, 2, 3, 4])
    backend.jaccard_accumulate(ptr, np.array([0, 2, 1, 2], np.int32), np.ones(4, np.float32), ptr,
                               np.array([0, 1, 1, 0], np.int32), np.ones(4, np.float32), 0, 1, 2)



def test_every_launch_matches_the_kernel_signature_and_covers_every_instantiation():
    rec = RecordingLauncher()
    _launch_every_instantiation(gpu.kernel_backend(np, rec, gpu.NUMPY_BACKEND.gemm_f32))
    sources = {f: launch.kernel_source(f) for f in gpu.KERNEL_FILES}
    problems = []
    for filename, names, name, grid, block, args in rec.calls:
        assert name in names, (name, names)
        problems += _launch_mismatches(sources[filename], name, args)
        # CUDA limits: gridDim.x < 2^31, gridDim.y/z <= 65535, whole warps (jaccard uses lanes)
        assert 1 <= grid[0] < 2 ** 31 and all(1 <= g <= 65535 for g in grid[1:]), (name, grid)
        assert len(block) == 1 and 32 <= block[0] <= 1024 and block[0] % 32 == 0, (name, block)
    assert not problems, "\n".join(problems)
    launched = {(f, n) for f, _, n, *_ in rec.calls}
    compiled = {(f, n) for f, names in gpu.runtime_name_expressions().items() for n in names}
    assert launched == compiled, (compiled - launched, launched - compiled)


def test_signature_check_catches_count_width_and_template_mismatches():
    source = launch.kernel_source("distance.cu")
    name = distance.distance_names(np.float32)[0]
    args = (np.zeros((2, 2), np.float32), np.int64(2), np.ones(2), np.ones(2), np.int64(2), np.int64(2),
            np.zeros((2, 2), np.float32), np.int64(2))
    assert _launch_mismatches(source, name, args) == []
    assert _launch_mismatches(source, name, args[:-1]) == [f"{name}: 7 arguments for 8 parameters"]
    assert "argument 1: numpy.int64 scalar expected, got int32" in _launch_mismatches(
        source, name, args[:1] + (np.int32(2),) + args[2:])[0]
    double_name = distance.distance_names(np.float64)[0]
    assert "argument 0: float64 array expected" in _launch_mismatches(source, double_name, args)[0]
    narrowed = source.replace("long long ld_dot", "int ld_dot")
    assert "argument 1: numpy.int32 scalar expected, got int64" in _launch_mismatches(narrowed, name, args)[0]
    rerank = launch.kernel_source("rerank.cu")
    sigs = _kernel_signatures(rerank)
    assert sigs["column_topk"][0] == ["TA", "TB", "S", "CAP"] and len(sigs["column_topk"][1]) == 11
    assert sigs["jaccard_accumulate"] == ([], [("long long", True), ("int", True), ("float", True),
                                              ("long long", True), ("int", True), ("float", True),
                                              ("long long", False), ("long long", False), ("double", True)])


def test_kernel_wrappers_check_shapes_against_each_other():
    backend = gpu.kernel_backend(np, RecordingLauncher(), gpu.NUMPY_BACKEND.gemm_f32)
    out = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match=r"^g_stat must have shape \(5,\) \(one per column of out\); got shape \(4,\)"):
        backend.distance_epilogue(out, out, np.ones(3), np.ones(4), "cosine")
    with pytest.raises(ValueError, match=r"^dot must have shape \(3, 5\)"):
        backend.distance_epilogue(np.zeros((3, 6), np.float32), out, np.ones(3), np.ones(5), "cosine")
    with pytest.raises(ValueError, match=r"^seg_ptr must have shape \(4,\) .*got shape \(3,\) int64"):
        backend.count_negatives_before(out, np.zeros(3, np.int32), np.zeros(5, np.int32), np.zeros(3, np.int64),
                                       np.zeros(3, np.int32), np.zeros(1, np.uint64))
    with pytest.raises(ValueError, match=r"^col_max must have shape \(6,\)"):
        backend.column_topk_keys(np.ones((2, 6)), np.ones((3, 6)), np.float64, np.ones(5, np.float32), 3)
    with pytest.raises(ValueError, match=r"^k must be >= 1; got 0"):
        backend.column_topk_keys(np.ones((2, 6)), np.ones((3, 6)), np.float64, np.ones(6, np.float32), 0)
    ptr = np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"query rows \[1, 3\) must lie within the 2 rows of indptr"):
        backend.jaccard_accumulate(ptr, np.zeros(2, np.int32), np.ones(2, np.float32), ptr, np.zeros(2, np.int32),
                                   np.ones(2, np.float32), 1, 3, 1)
    with pytest.raises(ValueError, match=r"^col_max_rows must have shape \(3,\)"):
        backend.rerank_finalize(np.zeros((3, 5)), out, np.ones(2, np.float32), np.float32, np.float32(1),
                                np.float32(0), out)


def test_leading_dimension_of_single_rows_and_launch_geometry_at_msmt17_scale():
    # A single row's stride is arbitrary (a transposed column has stride 1 element): cuBLAS
    # needs ld >= the row length, so the width is passed; matrices pass their row stride.
    column = np.ones((7, 1), np.float32)
    assert launch._is_unit_inner(column.T) and launch._ld(column.T) == 7
    assert launch._ld(np.ones((4, 10), np.float16)[:, 2:5]) == 10
    num_q, num_g = 11659, 82161
    grid, block = launch._launch_1d(num_q * num_g)  # grid-stride loops past 65,536 blocks
    assert grid[0] == 1 << 16 and block[0] == 256
    for n_cols in (1, 128, 3000, num_g):
        n_slices, per_slice = rerank._column_slices(num_q + num_g, n_cols)
        assert 1 <= n_slices <= rerank._MAX_SLICES  # gridDim.y
        assert (n_slices - 1) * per_slice < num_q + num_g <= n_slices * per_slice


def test_dispatch_keeps_host_inputs_on_the_reference_and_checks_the_budget():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    problem = _tied_problem(rng, 20, 40)
    assert kernels._device_kind(problem[0]) is None
    assert kernels._device_kind(torch.zeros(2)) is None
    expected = reference.evaluate_ranking(*problem, max_rank=10)
    got = kernels.evaluate_ranking(*problem, max_rank=10, memory_budget_bytes=1 << 20)
    np.testing.assert_array_equal(got[0], expected[0])
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="memory_budget_bytes must be an integer >= 1"):
            kernels.evaluate_ranking(*problem, memory_budget_bytes=bad)
    qf = rng.normal(size=(5, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        kernels.compute_distmat(qf, qf, memory_budget_bytes=0)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        kernels.rerank_k_reciprocal(np.ones((1, 2)), np.ones((1, 1)), np.ones((2, 2)), memory_budget_bytes=-1)


def test_dispatch_device_arrays_without_cupy_fall_back_with_a_warning(monkeypatch):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(14)
    qf = torch.from_numpy(rng.normal(size=(6, 5)).astype(np.float32))
    monkeypatch.setattr(kernels, "_device_kind", lambda x: "torch" if isinstance(x, torch.Tensor) else None)
    monkeypatch.setattr(kernels, "_cupy_or_none", lambda: None)
    with pytest.warns(RuntimeWarning, match=r"CuPy is not installed.*pip install 'alr-fast\[cupy\]'"):
        got = kernels.compute_distmat(qf, qf)
    host = qf.numpy()
    np.testing.assert_array_equal(got, reference.compute_distmat(host, host))
    # with CuPy present, device arrays on two GPUs are refused before any work
    monkeypatch.setattr(kernels, "_cupy_or_none", lambda: object())
    monkeypatch.setattr(kernels, "_device_index", lambda x, kind: 0 if x is qf else 1)
    with pytest.raises(ValueError, match=r"all device arrays must be on one GPU; got devices \[0, 1\]"):
        kernels.compute_distmat(qf, qf + 1)


def test_dispatch_without_cupy_refuses_sizes_that_would_take_minutes(monkeypatch):
    """CUDA tensors without CuPy: a warning and the host path while that takes seconds, an error
    that says to install CuPy beyond ``HOST_FALLBACK_LIMITS`` (scaled down here: the rule is under
    test, not the timing; the real limits are checked against the two datasets' sizes)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(kernels, "_device_kind", lambda x: "torch" if isinstance(x, torch.Tensor) else None)
    monkeypatch.setattr(kernels, "_cupy_or_none", lambda: None)
    limits = dict(kernels.HOST_FALLBACK_LIMITS)
    monkeypatch.setattr(kernels, "HOST_FALLBACK_LIMITS", {"compute_distmat": ("2 Q G D FLOP", 1000.0),
                                                          "evaluate_ranking": ("Q G distances", 400.0),
                                                          "rerank_k_reciprocal": ("(Q + G)^2 elements", 2000.0)})
    rng = np.random.default_rng(2)
    g = torch.from_numpy(rng.normal(size=(20, 5)).astype(np.float32))
    with pytest.raises(RuntimeError, match=r"^compute_distmat: CUDA arrays were given but CuPy is not installed, "
                                           r"and the NumPy fallback on host copies would take minutes at this size "
                                           r"\(1\.2e\+03 2 Q G D FLOP, limit 1e\+03\)\. Install .*alr-fast\[cupy\]"):
        kernels.compute_distmat(g[:6], g)
    with pytest.warns(RuntimeWarning, match="CuPy is not installed"):
        small = kernels.compute_distmat(g[:4], g)  # 800 FLOP: the host path
    np.testing.assert_array_equal(small, reference.compute_distmat(g[:4].numpy(), g.numpy()))
    distmat, *labels = _tied_problem(rng, 12, 40)
    with pytest.raises(RuntimeError, match=r"^evaluate_ranking: .*\(480 Q G distances, limit 400\)"):
        kernels.evaluate_ranking(torch.from_numpy(distmat), *labels)
    with pytest.raises(RuntimeError, match=r"^rerank_k_reciprocal: .*\(2\.7e\+03 \(Q \+ G\)\^2 elements"):
        kernels.rerank_k_reciprocal(*(torch.from_numpy(x) for x in _rerank_inputs(rng, 12, 40)))
    # the measured limits: Market-1501 falls back (slowly), MSMT17 is refused, for every function
    for (q, g_), refused in (((3368, 15913), False), ((11659, 82161), True)):
        sizes = {"compute_distmat": 2.0 * max(q, g_) ** 2 * 4096, "evaluate_ranking": float(q * g_),
                 "rerank_k_reciprocal": float(q + g_) ** 2}
        assert all((sizes[f] > limits[f][1]) == refused for f in sizes), (q, g_)


class _FakeCupy:
    """Just enough of CuPy's API to see which stream the dispatch runs the GPU path on."""

    def __init__(self):
        self.current, self.entered = "cupy-default", []
        fake = self

        class _Context:
            def __init__(self, name):
                self.name = name

            def __enter__(self):
                self.previous, fake.current = fake.current, self.name
                fake.entered.append(self.name)

            def __exit__(self, *exc):
                fake.current = self.previous

        self.cuda = type("cuda", (), {"Device": staticmethod(lambda dev: _Context(f"device {dev}")),
                                      "ExternalStream": staticmethod(lambda ptr, dev: _Context(f"stream {ptr} on {dev}"))})


def test_dispatch_runs_cupy_work_on_torchs_current_stream(monkeypatch):
    """Issue 9 section 4: CuPy calls that take torch tensors enter an ExternalStream of torch's
    current stream (pool reuse is then stream-ordered); CuPy arrays keep CuPy's stream."""
    torch = pytest.importorskip("torch")
    fake, seen = _FakeCupy(), []
    monkeypatch.setattr(kernels, "_cupy_or_none", lambda: fake)
    monkeypatch.setattr(kernels, "_device_kind", lambda x: "torch" if isinstance(x, torch.Tensor) else (
        "cupy" if isinstance(x, np.ndarray) and x.dtype == np.float16 else None))
    monkeypatch.setattr(kernels, "_device_index", lambda x, kind: 3)
    monkeypatch.setattr(kernels, "_torch_stream_ptr", lambda dev: 4242 + dev)
    monkeypatch.setattr(kernels, "_as_cupy", lambda cp, x: x.numpy() if isinstance(x, torch.Tensor) else x)

    def record(name, result):
        return lambda *a, **k: seen.append((name, fake.current, k.get("precision"))) or result

    monkeypatch.setattr(gpu, "compute_distmat", record("distmat", np.zeros((2, 2), np.float32)))
    monkeypatch.setattr(gpu, "evaluate_ranking", record("ranking", (np.ones(1, np.float32), 1.0)))
    monkeypatch.setattr(gpu, "rerank_k_reciprocal", record("rerank", np.zeros((1, 2), np.float32)))
    real_like = kernels._like
    monkeypatch.setattr(kernels, "_like", lambda kind, a: seen.append(("hand-over", fake.current, kind)) or
                        real_like(kind, a))
    t = torch.ones(2, 3)
    out = kernels.compute_distmat(t, t, precision="tf32")
    assert isinstance(out, torch.Tensor)  # back as the first device argument's type
    kernels.evaluate_ranking(torch.zeros(1, 2), [1], [1, 2], [0], [1, 1], max_rank=1)
    kernels.rerank_k_reciprocal(torch.zeros(1, 2), torch.zeros(1, 1), torch.zeros(2, 2))
    kernels.compute_distmat(np.ones((2, 3), np.float16), np.ones((2, 3), np.float16))  # CuPy arrays only
    # results go back to torch on the stream that made them (no cross-stream event needed)
    assert seen == [("distmat", "stream 4245 on 3", "tf32"), ("hand-over", "stream 4245 on 3", "torch"),
                    ("ranking", "stream 4245 on 3", None), ("rerank", "stream 4245 on 3", None),
                    ("hand-over", "stream 4245 on 3", "torch"), ("distmat", "device 3", None),
                    ("hand-over", "device 3", "cupy")]
    assert fake.current == "cupy-default"  # every context was left


def test_import_needs_no_cupy_and_names_are_consistent():
    names = gpu.runtime_name_expressions()
    assert set(names) == set(gpu.KERNEL_FILES)
    assert "column_topk<half_t, half_t, half_t, 32>" in names["rerank.cu"]
    assert distance.distance_names(np.float32)[distance.METRIC_CODES["euclidean"]] == "distance_epilogue<float, 1>"


# --------------------------------------------------------------------------------------------
# Host build of the CUDA sources: the kernels' own logic, run on the CPU
# --------------------------------------------------------------------------------------------
# The .cu files compile as C++ without __CUDA_ARCH__. This prelude supplies the CUDA built-ins;
# a launch runs every block and thread of the grid on the host: threads one after another, or,
# for kernels that synchronise (__syncthreads), as real threads meeting at a std::barrier.
HOST_PRELUDE = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
struct Dim3 { unsigned x, y, z; };
thread_local Dim3 blockIdx, threadIdx;
Dim3 blockDim, gridDim;
std::barrier<>* block_barrier = nullptr;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
inline void __syncthreads() { if (block_barrier) block_barrier->arrive_and_wait(); }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline long long __double_as_longlong(double d) { long long u; std::memcpy(&u, &d, 8); return u; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline unsigned int max(unsigned int a, unsigned int b) { return a < b ? b : a; }
using std::memcpy;
"""

HOST_LAUNCHER = r"""
template <typename... A, std::size_t... I>
void call_with(void (*k)(A...), void** args, std::index_sequence<I...>)
{
    k(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}
template <typename... A>
void run_grid(void (*k)(A...), unsigned gx, unsigned gy, unsigned bx, void** args, int threaded)
{
    gridDim = {gx, gy, 1};
    blockDim = {bx, 1, 1};
    for (unsigned y = 0; y < gy; ++y) {
        for (unsigned x = 0; x < gx; ++x) {
            if (!threaded) {
                for (unsigned t = 0; t < bx; ++t) {
                    blockIdx = {x, y, 0};
                    threadIdx = {t, 0, 0};
                    call_with(k, args, std::index_sequence_for<A...>{});
                }
                continue;
            }
            std::barrier<> bar(bx);
            block_barrier = &bar;
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < bx; ++t) {
                threads.emplace_back([=] {
                    blockIdx = {x, y, 0};
                    threadIdx = {t, 0, 0};
                    call_with(k, args, std::index_sequence_for<A...>{});
                });
            }
            for (auto& th : threads) th.join();
            block_barrier = nullptr;
        }
    }
}
"""

_FLOATS = (np.float16, np.float32, np.float64)


class HostKernels:
    """ctypes launcher of the g++-built kernels, with the signature of launch._cupy_launch."""

    def __init__(self, build_dir):
        import ctypes
        import subprocess

        self._ctypes = ctypes
        self._libs, self._shims, self._threaded = {}, {}, {}
        for filename in gpu.KERNEL_FILES:
            source = launch.kernel_source(filename)
            names = gpu.runtime_name_expressions()[filename]  # every instantiation the wrappers use
            shims = [f'extern "C" void shim_{i}(unsigned gx, unsigned gy, unsigned bx, void** a, int t)'
                     f' {{ run_grid(&{name}, gx, gy, bx, a, t); }}' for i, name in enumerate(names)]
            path = build_dir / filename.replace(".cu", ".cpp")
            path.write_text("\n".join([HOST_PRELUDE, source, HOST_LAUNCHER, *shims]))
            lib = build_dir / filename.replace(".cu", ".so")
            subprocess.run(["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
                            "-w", str(path), "-o", str(lib)], check=True, capture_output=True, text=True)
            self._libs[filename] = ctypes.CDLL(str(lib))
            for i, name in enumerate(names):
                self._shims[(filename, name)] = f"shim_{i}"
                kernel = name.split("<")[0]
                body = source[source.index(f"void {kernel}("):]
                self._threaded[(filename, name)] = "__syncthreads" in body.split("__global__")[0]
        self.launches = []

    def _arg(self, a):
        c = self._ctypes
        if isinstance(a, np.ndarray):
            return c.c_void_p(a.ctypes.data)
        return {np.int64: c.c_longlong, np.int32: c.c_int, np.float32: c.c_float}[type(a)](a.item())

    def __call__(self, filename, names, name, grid, block, args):
        assert name in names, (name, names)
        self.launches.append(name)
        held = [self._arg(a) for a in args]
        pointers = (self._ctypes.c_void_p * len(held))(*[self._ctypes.addressof(h) for h in held])
        threaded = self._threaded[(filename, name)]
        gx, gy = (tuple(grid) + (1,))[:2]
        bx = min(block[0], 8) if threaded else block[0]  # kernels are block-size agnostic
        getattr(self._libs[filename], self._shims[(filename, name)])(gx, gy, bx, pointers, int(threaded))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    import shutil
    import subprocess

    if shutil.which("g++") is None:
        pytest.skip("g++ is needed to build the kernels for the host")
    try:
        launcher = HostKernels(tmp_path_factory.mktemp("host_kernels"))
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"host build of the kernels failed:\n{exc.stderr[-3000:]}")
    return gpu.kernel_backend(np, launcher, NP.gemm_f32), launcher


def test_host_kernels_run_the_whole_ranking(host):
    backend, launcher = host
    for seed in range(3):
        rng = np.random.default_rng(600 + seed)
        problem = _tied_problem(rng, int(rng.integers(10, 40)), int(rng.integers(30, 300)), levels=4)
        distmat = problem[0] - 2.0  # negative distances too: the sign handling of the keys
        for value, share in ((-0.0, 0.1), (1e-45, 0.03), (-1e-45, 0.03), (3.4e38, 0.03), (-3.4e38, 0.03)):
            distmat[rng.random(distmat.shape) < share] = value
        problem = (distmat,) + problem[1:]
        expected = reference.evaluate_ranking(*problem, max_rank=20)
        for budget in (None, 2000):
            got = gpu.evaluate_ranking(*problem, max_rank=20, memory_budget_bytes=budget, backend=backend)
            np.testing.assert_array_equal(got[0], expected[0])
            assert got[1] == pytest.approx(expected[1], abs=1e-12)
    # > 2,048 positives for a query: the global-memory path of count_negatives_before
    distmat = rng.integers(0, 30, size=(3, 4500)).astype(np.float32)
    labels = (np.array([1, 2, 1]), rng.integers(1, 3, 4500), np.array([0, 1, 1]), rng.integers(0, 2, 4500))
    got = gpu.evaluate_ranking(distmat, *labels, backend=backend)
    expected = reference.evaluate_ranking(distmat, *labels)
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1] == pytest.approx(expected[1], abs=1e-12)
    assert "count_negatives_before" in launcher.launches


@pytest.mark.parametrize("metric", distance.METRIC_CODES)
def test_host_kernels_run_the_distance_epilogue(host, metric):
    backend, _ = host
    rng = np.random.default_rng(30)
    for dtype in _FLOATS:
        qf, gf = rng.normal(size=(13, 20)).astype(dtype), rng.normal(size=(29, 20)).astype(dtype)
        qf[2] = 0.0
        gf[:8] = qf[5:] * rng.integers(1, 4, (8, 1)).astype(dtype)  # parallel pairs: the clip at 0
        for budget in (None, 300):
            got = gpu.compute_distmat(qf, gf, metric, memory_budget_bytes=budget, backend=backend)
            np.testing.assert_array_equal(got, gpu.compute_distmat(qf, gf, metric, backend=NP))
        np.testing.assert_array_equal(np.diag(gpu.compute_distmat(qf, qf, metric, backend=backend)), 0.0)


def test_host_kernels_run_the_whole_rerank(host):
    backend, launcher = host
    rng = np.random.default_rng(31)
    cases = [(_rerank_inputs(rng, 41, 170), 20, 6, 0.3), (_tied_rerank_inputs(rng, 25, 70), 7, 3, 0.5),
             (_rerank_inputs(rng, 1, 1), 20, 6, 0.3), (_rerank_inputs(rng, 3, 5, np.float16), 2, 3, 0.3)]
    q_g, q_q, g_g = _rerank_inputs(rng, 30, 90)
    cases.append(((q_g.astype(np.float16), q_q.astype(np.float64), g_g), 20, 6, 0.3))  # mixed dtypes
    cases.append((_rerank_inputs(rng, 20, 180), 140, 4, 0.3))  # k > 128: the sort-based top-k
    for inputs, k1, k2, lam in cases:
        expected = reference.rerank_k_reciprocal(*inputs, k1, k2, lam)
        for budget in (None, 15000):
            got = gpu.rerank_k_reciprocal(*inputs, k1, k2, lam, memory_budget_bytes=budget, backend=backend)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert {"jaccard_accumulate", "column_max_sq<half_t, float, double>"} <= set(launcher.launches)
    bad = q_q.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="q_q_dist contains NaN or infinite values"):
        gpu.rerank_k_reciprocal(q_g, bad, g_g, backend=backend)


def test_host_kernels_equal_their_emulations_one_by_one(host):
    backend, _ = host
    rng = np.random.default_rng(32)
    a = rng.integers(0, 9, size=(300, 140)).astype(np.float16)  # 140 columns: not a tile multiple
    b = rng.random((500, 140)).astype(np.float32)
    mx, flags = backend.column_max_sq(a, b, np.float32)
    mx_np, flags_np = NP.column_max_sq(a, b, np.float32)
    np.testing.assert_array_equal(mx, mx_np)
    np.testing.assert_array_equal(flags, flags_np)
    for k in (1, 21, 32, 100):
        np.testing.assert_array_equal(rerank._merge_topk(np, backend.column_topk_keys(a, b, np.float32, mx, k), k),
                                      rerank._merge_topk(np, NP.column_topk_keys(a, b, np.float32, mx, k), k))
    a[3, 5], b[7, 9] = np.inf, np.nan
    np.testing.assert_array_equal(backend.column_max_sq(a, b, np.float32)[1], NP.column_max_sq(a, b, np.float32)[1])
    acc = rng.random((6, 50))
    qg = rng.random((6, 50)).astype(np.float16)
    col_max = (qg.astype(np.float32) ** 2).max(axis=1) + np.float32(0.5)
    outs = [np.empty((6, 50), np.float32) for _ in range(2)]
    for be, out in zip((backend, NP), outs):
        be.rerank_finalize(acc, qg, col_max, np.float64, np.float32(0.7), np.float32(0.3), out)
    np.testing.assert_array_equal(outs[0], outs[1])


# --------------------------------------------------------------------------------------------
# GPU: the CuPy kernels (skipped without a CUDA GPU)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def cp():
    cupy = pytest.importorskip("cupy")
    try:
        cupy.zeros(1)
    except Exception as exc:  # a CuPy wheel without a usable device
        pytest.skip(f"CuPy cannot allocate on a GPU: {exc}")
    return cupy


def _noncontiguous(cp, x):
    """The same values in a column-strided device view (non-contiguous)."""
    wide = cp.repeat(cp.asarray(x), 2, axis=1)
    return wide[:, ::2]


@pytest.mark.gpu
@pytest.mark.parametrize("metric", distance.METRIC_CODES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 53, 24), (129, 257, 72)])
def test_gpu_distmat_matches_reference(cp, metric, dtype, shape):
    num_q, num_g, dim = shape
    rng = np.random.default_rng(num_q + num_g + np.dtype(dtype).itemsize)
    qf = rng.normal(size=(num_q, dim)).astype(dtype)
    gf = rng.normal(size=(num_g, dim)).astype(dtype)
    gf[-1] = qf[0]
    expected = reference.compute_distmat(qf, gf, metric)
    for q_dev, g_dev in [(cp.asarray(qf), cp.asarray(gf)), (_noncontiguous(cp, qf), _noncontiguous(cp, gf))]:
        got = kernels.compute_distmat(q_dev, g_dev, metric, memory_budget_bytes=4096)
        assert isinstance(got, cp.ndarray) and got.dtype == np.float32 and got.shape == (num_q, num_g)
        _assert_distances_close(cp.asnumpy(got), expected, metric, exact=dtype == np.float64)
    x = cp.asarray(qf)
    np.testing.assert_array_equal(cp.asnumpy(cp.diag(kernels.compute_distmat(x, x, metric))), 0.0)


@pytest.mark.gpu
def test_gpu_torch_tensors_pass_through_dlpack_without_copies(cp):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    qf = torch.from_numpy(rng.normal(size=(40, 16)).astype(np.float32)).cuda().requires_grad_(True)
    gf = torch.from_numpy(rng.normal(size=(70, 16)).astype(np.float32)).cuda()
    view = kernels._as_cupy(cp, gf)
    assert view.data.ptr == gf.data_ptr()  # a view of the tensor's memory, not a copy
    got = kernels.compute_distmat(qf, gf)
    assert isinstance(got, torch.Tensor) and got.is_cuda and got.dtype == torch.float32
    expected = reference.compute_distmat(qf.detach().cpu().numpy(), gf.cpu().numpy())
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-5, atol=2e-5)
    np.testing.assert_array_equal(torch.diagonal(kernels.compute_distmat(gf, gf)).cpu().numpy(), 0.0)
    half = kernels.compute_distmat(qf.detach().half(), gf.half(), "euclidean")
    ref_half = reference.compute_distmat(qf.detach().half().cpu().numpy(), gf.half().cpu().numpy(), "euclidean")
    _assert_distances_close(half.cpu().numpy(), ref_half, "euclidean")
    bf16 = kernels.compute_distmat(qf.detach().bfloat16(), gf.bfloat16())
    ref_bf = reference.compute_distmat(qf.detach().bfloat16().float().cpu().numpy(),
                                       gf.bfloat16().float().cpu().numpy())
    np.testing.assert_allclose(bf16.cpu().numpy(), ref_bf, rtol=1e-5, atol=2e-5)


@pytest.mark.gpu
def test_gpu_single_row_views_and_a_torch_side_stream(cp):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(15)
    gf = rng.normal(size=(90, 24)).astype(np.float32)
    for dtype in (np.float16, np.float32):
        # (1, D) transposed column: row stride of one element, which cuBLAS refuses as ld < D
        q = cp.asarray(rng.normal(size=(24, 1)).astype(dtype)).T
        assert q.strides[0] == q.itemsize and q.shape == (1, 24)
        g = cp.asarray(gf.astype(dtype))
        expected = reference.compute_distmat(cp.asnumpy(q), gf.astype(dtype))
        _assert_distances_close(cp.asnumpy(kernels.compute_distmat(q, g)), expected, "cosine")
        _assert_distances_close(cp.asnumpy(kernels.compute_distmat(g, q)), expected.T, "cosine")
    # features produced on a non-default torch stream: DLPack orders CuPy's work after it and
    # the returned tensor's consumers after CuPy's
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        feats = torch.from_numpy(gf).cuda() * 3.0
        got = kernels.compute_distmat(feats, feats, "sqeuclidean").cpu().numpy()
    scaled = 3.0 * gf
    _assert_distances_close(got, reference.compute_distmat(scaled, scaled, "sqeuclidean"), "sqeuclidean")


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [None, 1, 20000])
@pytest.mark.parametrize("seed", range(3))
def test_gpu_ranking_matches_reference_exactly(cp, seed, budget):
    rng = np.random.default_rng(500 + seed)
    problem = _tied_problem(rng, int(rng.integers(15, 300)), int(rng.integers(30, 700)))
    expected = reference.evaluate_ranking(*problem, max_rank=20)
    distmat, labels = problem[0], problem[1:]
    for dev in (cp.asarray(distmat, dtype=cp.float32), cp.asarray(distmat, dtype=cp.float16),
                cp.asarray(distmat), _noncontiguous(cp, distmat.astype(np.float32)),
                cp.asfortranarray(cp.asarray(distmat, dtype=cp.float32))):
        got = kernels.evaluate_ranking(dev, *labels, max_rank=20, memory_budget_bytes=budget)
        np.testing.assert_array_equal(got[0], expected[0])
        assert got[1] == pytest.approx(expected[1], abs=1e-12)


@pytest.mark.gpu
def test_gpu_ranking_many_positives_one_by_one_and_torch(cp):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    # 6,000 gallery items of 2 pids: queries with > 2,048 positives take the global-memory path
    distmat = rng.integers(0, 50, size=(7, 6000)).astype(np.float32)
    q_pids, g_pids = rng.integers(1, 3, 7), rng.integers(1, 3, 6000)
    q_cams, g_cams = rng.integers(0, 2, 7), rng.integers(0, 2, 6000)
    expected = reference.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams)
    got = kernels.evaluate_ranking(torch.from_numpy(distmat).cuda(), q_pids, g_pids, q_cams, g_cams)
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1] == pytest.approx(expected[1], abs=1e-12)
    one = kernels.evaluate_ranking(cp.zeros((1, 1), cp.float32), [4], [4], [0], [1], max_rank=1)
    assert one[0].tolist() == [1.0] and one[1] == 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("sizes", [(1, 1), (3, 5), (41, 259), (150, 700)])
def test_gpu_rerank_matches_reference(cp, dtype, sizes):
    rng = np.random.default_rng(sum(sizes) + np.dtype(dtype).itemsize)
    inputs = _rerank_inputs(rng, *sizes, dtype=dtype)
    for k1, k2, lam in [(20, 6, 0.3), (5, 1, 0.0), (3, 10, 0.5)]:
        expected = reference.rerank_k_reciprocal(*inputs, k1, k2, lam)
        for budget in (None, 50000):
            got = kernels.rerank_k_reciprocal(*(cp.asarray(x) for x in inputs), k1, k2, lam,
                                              memory_budget_bytes=budget)
            assert isinstance(got, cp.ndarray) and got.dtype == np.float32
            np.testing.assert_allclose(cp.asnumpy(got), expected, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_gpu_rerank_ties_noncontiguous_torch_and_large_k(cp):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    inputs = _tied_rerank_inputs(rng, 25, 70)
    expected = reference.rerank_k_reciprocal(*inputs, 20, 6, 0.3)
    views = [_noncontiguous(cp, x.astype(np.float32)) for x in inputs]
    np.testing.assert_allclose(cp.asnumpy(kernels.rerank_k_reciprocal(*views)), expected, atol=1e-5)
    tensors = [torch.from_numpy(x.astype(np.float32)).cuda() for x in inputs]
    got = kernels.rerank_k_reciprocal(*tensors)
    assert isinstance(got, torch.Tensor) and got.is_cuda
    np.testing.assert_allclose(got.cpu().numpy(), expected, atol=1e-5)
    # k1 + 1 > the largest compiled list (128): the sort-based top-k on the device
    big = _rerank_inputs(rng, 60, 300)
    np.testing.assert_allclose(
        cp.asnumpy(kernels.rerank_k_reciprocal(*(cp.asarray(x) for x in big), k1=150, k2=4)),
        reference.rerank_k_reciprocal(*big, k1=150, k2=4), atol=1e-5)
    bad = cp.asarray(inputs[2].astype(np.float32))
    bad[3, 4] = cp.nan
    with pytest.raises(ValueError, match="g_g_dist contains NaN"):
        kernels.rerank_k_reciprocal(*(cp.asarray(x.astype(np.float32)) for x in inputs[:2]), bad)


@pytest.mark.gpu
def test_gpu_kernels_equal_their_emulations(cp):
    cb = gpu.cupy_backend()
    rng = np.random.default_rng(13)
    # column passes, float16 over float32 with squares in float32, 300 columns, 1,000 rows
    a = rng.integers(0, 9, size=(400, 300)).astype(np.float16)
    b = rng.random((600, 300)).astype(np.float32)
    mx_np, fl_np = rerank._xp_column_max_sq(np, a, b, np.float32)
    mx, fl = cb.column_max_sq(cp.asarray(a), cp.asarray(b), np.float32)
    np.testing.assert_array_equal(cp.asnumpy(mx), mx_np)
    np.testing.assert_array_equal(cp.asnumpy(fl), fl_np)
    for k in (1, 21, 32, 100):
        keys = cb.column_topk_keys(cp.asarray(a), cp.asarray(b), np.float32, mx, k)
        expected = rerank._merge_topk(np, rerank._xp_column_topk_keys(np, a, b, np.float32, mx_np, k), k)
        np.testing.assert_array_equal(cp.asnumpy(rerank._merge_topk(cp, keys, k)), expected)
    # ranking counts on a tied block
    distmat, q_pids, g_pids, q_cams, g_cams = _tied_problem(rng, 50, 3000)
    cmc_np = gpu.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams, backend=NP)
    cmc_cp = gpu.evaluate_ranking(cp.asarray(distmat), *(cp.asarray(x) for x in (q_pids, g_pids, q_cams, g_cams)),
                                  backend=cb)
    np.testing.assert_array_equal(cmc_cp[0], cmc_np[0])
    assert cmc_cp[1] == pytest.approx(cmc_np[1], abs=1e-12)
    # Jaccard accumulation and the final blend on a random sparse V
    inputs = _rerank_inputs(rng, 30, 120)
    got = gpu.rerank_k_reciprocal(*(cp.asarray(x) for x in inputs), backend=cb, memory_budget_bytes=30000)
    np.testing.assert_allclose(cp.asnumpy(got), gpu.rerank_k_reciprocal(*inputs, backend=NP), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"^dist must be a 2-D float32 array"):
        cb.count_negatives_before(cp.zeros((2, 3)), cp.zeros(2, cp.int32), cp.zeros(3, cp.int32),
                                  cp.zeros(3, cp.int64), cp.zeros(2, cp.int32), cp.zeros(0, cp.uint64))


@pytest.mark.gpu
def test_gpu_distance_precisions_against_reference_and_emulation(cp):
    """precision=float64 is the reference to 1e-6; tf32 / bf16 (tensor cores) stay within the
    bound of their input rounding and close to the host emulation (host.py). Printed first, so
    that the first GPU run measures the figures even if a bound is off."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(31)
    qf, gf, *_ = _structured(rng, 300, 2000, dim=512)
    qf, gf = np.clip(qf, 0, None).astype(np.float32), np.clip(gf, 0, None).astype(np.float32)
    exact = reference.compute_distmat(qf, gf)
    cq, cg = cp.asarray(qf), cp.asarray(gf)
    errors = {p: float(np.abs(cp.asnumpy(kernels.compute_distmat(cq, cg, precision=p)) - exact).max())
              for p in (None, "float64", "float32", "tf32", "bf16")}
    emulated = {p: float(np.abs(cp.asnumpy(kernels.compute_distmat(cq, cg, precision=p))
                                - host_path.compute_distmat(qf, gf, precision=p)).max()) for p in ("tf32", "bf16")}
    print(f"max |GPU - float64 reference| by precision: {errors}; |GPU - host emulation|: {emulated}")
    assert errors["float64"] < 1e-6 and errors[None] == errors["float32"] < 2e-5
    assert errors["tf32"] < 4e-3 and errors["bf16"] < 2e-2
    assert emulated["tf32"] < 4e-3 and emulated["bf16"] < 2e-2
    t = torch.from_numpy(qf).cuda()
    same = kernels.compute_distmat(t, t, precision="bf16")  # torch in, torch out, zero diagonal
    assert isinstance(same, torch.Tensor) and same.is_cuda and float(same.diagonal().abs().max()) == 0.0
    bad = cq.copy()
    bad[1, 2] = cp.nan
    with pytest.raises(ValueError, match=r"^qf contains NaN or infinite values"):
        kernels.compute_distmat(bad, cg)
    with pytest.raises(ValueError, match=r"^distmat contains NaN or infinite values"):
        kernels.evaluate_ranking(cp.full((3, 4), cp.inf, dtype=cp.float32), [1, 2, 3], [1, 1, 2, 3], [0, 0, 0],
                                 [1, 1, 1, 1])
