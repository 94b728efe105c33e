"""NumPy reference evaluation kernels: distances, Market-protocol CMC/mAP, re-ranking.

Each test draws its own random inputs from a fixed per-test seed. The oracles live in
``reference_oracles.py``: a pure-Python brute force, and loop-form transliterations of
torchreid's ``eval_market1501`` and of the published ``re_ranking``.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import pairwise_distances

from alr_fast import kernels
from alr_fast.kernels import compute_distmat, evaluate_ranking, reference, rerank_k_reciprocal

from reference_oracles import brute_force_ranking, published_re_ranking, torchreid_eval_market1501


@pytest.fixture(params=["default_chunks", "tiny_chunks"])
def chunking(request, monkeypatch):
    """Run a test with the default chunk size and with chunks of a few rows (chunk edges)."""
    if request.param == "tiny_chunks":
        monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 97)
    return request.param


def _structured_split(rng, num_q, num_g, num_ids=30, num_cams=4, dim=32, noise=1.1):
    """Clustered features of ``num_ids`` identities seen by a few cameras.

    The gallery holds pid-0 distractors (random features) and same-camera copies of query
    identities (junk); two query identities never appear in the gallery (no valid match).
    """
    centres = rng.normal(size=(num_ids + 3, dim))
    cam_shift = 0.4 * rng.normal(size=(num_cams, dim))

    def draw(pids, cams):
        return centres[pids] + cam_shift[cams] + noise * rng.normal(size=(len(pids), dim))

    q_pids = rng.integers(1, num_ids + 3, num_q)  # pids num_ids+1, num_ids+2: query only
    q_cams = rng.integers(0, num_cams, num_q)
    num_distractors = num_g // 10
    g_pids = np.concatenate([rng.integers(1, num_ids + 1, num_g - num_distractors),
                             np.zeros(num_distractors, dtype=np.int64)])
    g_cams = rng.integers(0, num_cams, num_g)
    qf = draw(q_pids, q_cams)
    gf = draw(g_pids, g_cams)
    gf[g_pids == 0] = 3.0 * rng.normal(size=(num_distractors, dim))
    order = rng.permutation(num_g)
    return qf, gf[order], q_pids, g_pids[order], q_cams, g_cams[order]


def _tied_ranking_problem(rng, num_q, num_g):
    """Integer-valued distances (many ties), few pids and cameras (junk, distractors, no-match)."""
    distmat = rng.integers(0, 6, size=(num_q, num_g)).astype(np.float64)
    q_pids = rng.integers(1, 7, num_q)
    q_pids[0] = 6  # at least one query without any match
    g_pids = rng.integers(0, 6, num_g)  # pid 0 = distractor; pid 6 never in the gallery
    g_pids[0] = 0
    q_cams = rng.integers(0, 3, num_q)
    g_cams = rng.integers(0, 3, num_g)
    return distmat, q_pids, g_pids, q_cams, g_cams


# --------------------------------------------------------------------------------------------
# evaluate_ranking
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_evaluate_matches_brute_force_with_ties(seed, chunking):
    rng = np.random.default_rng(1000 + seed)
    num_q, num_g = int(rng.integers(15, 40)), int(rng.integers(30, 80))
    problem = _tied_ranking_problem(rng, num_q, num_g)
    q_pids, g_pids, q_cams, g_cams = problem[1:]
    assert (g_pids == 0).any() and not np.isin(q_pids, g_pids).all()
    assert ((q_pids[:, None] == g_pids) & (q_cams[:, None] == g_cams)).any()  # junk present

    cmc, mAP = evaluate_ranking(*problem, max_rank=20)
    ref_cmc, ref_mAP = brute_force_ranking(*problem, max_rank=20)
    assert cmc.dtype == np.float32 and cmc.shape == (20,)
    np.testing.assert_allclose(cmc, ref_cmc, rtol=0, atol=1e-6)
    assert mAP == pytest.approx(ref_mAP, abs=1e-6)


def _hand_case():
    """2 real queries + 1 with no match, 5 gallery items; distances with ties (see test)."""
    distmat = np.array([
        [0.5, 0.5, 0.3, 0.1, 0.9],  # q0
        [0.1, 0.7, 0.2, 0.7, 0.3],  # q1
        [0.4, 0.2, 0.6, 0.8, 0.1],  # q2: pid 3 is not in the gallery -> skipped
    ])
    q_pids, q_cams = np.array([1, 2, 3]), np.array([0, 0, 0])
    g_pids, g_cams = np.array([1, 2, 1, 0, 2]), np.array([1, 1, 0, 1, 2])
    return distmat, q_pids, g_pids, q_cams, g_cams


def test_evaluate_hand_computed_stable_ties():
    # q0 (pid 1, cam 0), stable order 3, 2, 0, 1, 4. Item 2 is junk (pid 1, cam 0). Items 0
    # (positive) and 1 (negative) tie at 0.5: index 0 first, so the kept list is
    # [neg, POS, neg, neg]: first hit at rank 2, AP = 1/2.
    # q1 (pid 2), stable order 0, 2, 4, 1, 3. Items 1 (positive) and 3 (pid-0 distractor) tie
    # at 0.7: index 1 first, so [neg, neg, POS, POS, neg]: first hit at 3, AP = (1/3 + 2/4) / 2.
    cmc, mAP = evaluate_ranking(*_hand_case(), max_rank=4)
    np.testing.assert_array_equal(cmc, np.array([0.0, 0.5, 1.0, 1.0], dtype=np.float32))
    assert mAP == pytest.approx((1 / 2 + (1 / 3 + 2 / 4) / 2) / 2, abs=1e-12)


def test_evaluate_hand_computed_tie_rule_is_by_gallery_index():
    # Swap gallery items 0 and 1 of the hand case: now the negative has the lower index and
    # wins the 0.5 tie for q0, which pushes its positive to rank 3 (AP 1/3).
    distmat, q_pids, g_pids, q_cams, g_cams = _hand_case()
    perm = np.array([1, 0, 2, 3, 4])
    cmc, mAP = evaluate_ranking(distmat[:, perm], q_pids, g_pids[perm], q_cams, g_cams[perm], 4)
    # q1 after the swap: order 1, 2, 4, 0, 3 -> [neg, neg, POS, POS, neg], unchanged.
    np.testing.assert_array_equal(cmc, np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32))
    assert mAP == pytest.approx((1 / 3 + (1 / 3 + 2 / 4) / 2) / 2, abs=1e-12)


def test_evaluate_no_valid_query_raises():
    distmat, q_pids, g_pids, q_cams, g_cams = _hand_case()
    with pytest.raises(ValueError, match="no query has a valid match in the gallery"):
        evaluate_ranking(distmat[2:], q_pids[2:], g_pids, q_cams[2:], g_cams, max_rank=5)
    # a query whose only same-pid items share its camera is invalid too
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate_ranking(distmat[:1], q_pids[:1], g_pids, q_cams[:1], np.array([0, 1, 0, 1, 2]), 5)


def test_evaluate_max_rank_larger_than_gallery_warns_and_shortens():
    rng = np.random.default_rng(7)
    problem = _tied_ranking_problem(rng, 25, 12)
    with pytest.warns(UserWarning, match="gallery samples is quite small"):
        cmc, mAP = evaluate_ranking(*problem, max_rank=50)
    ref_cmc, ref_mAP = brute_force_ranking(*problem, max_rank=50)
    assert cmc.shape == (12,) and len(ref_cmc) == 12
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert mAP == pytest.approx(ref_mAP, abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate_ranking(*problem, max_rank=12)[0].shape == (12,)


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_matches_torchreid_on_structured_data(seed):
    rng = np.random.default_rng(2000 + seed)
    num_q, num_g = int(rng.integers(40, 121)), int(rng.integers(200, 501))
    qf, gf, q_pids, g_pids, q_cams, g_cams = _structured_split(rng, num_q, num_g)
    distmat = compute_distmat(qf, gf)
    cmc, mAP = evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50)
    ref_cmc, ref_mAP = torchreid_eval_market1501(distmat, q_pids, g_pids, q_cams, g_cams, 50)
    assert 0.1 < mAP < 0.95  # neither trivial nor hopeless
    np.testing.assert_allclose(cmc, ref_cmc, rtol=0, atol=1e-6)
    assert mAP == pytest.approx(ref_mAP, abs=1e-6)


def test_evaluate_accepts_torch_and_validates_shapes():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    problem = _tied_ranking_problem(rng, 20, 40)
    expected = evaluate_ranking(*problem, max_rank=10)
    as_torch = [torch.from_numpy(np.ascontiguousarray(a)) for a in problem]
    got = evaluate_ranking(*as_torch, max_rank=10)
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1] == expected[1]

    distmat, q_pids, g_pids, q_cams, g_cams = problem
    with pytest.raises(ValueError, match=r"distmat .*shape \(40,\)"):
        evaluate_ranking(distmat[0], q_pids, g_pids, q_cams, g_cams)
    with pytest.raises(ValueError, match=r"q_pids must be 1-D of length 20.*shape \(19,\)"):
        evaluate_ranking(distmat, q_pids[:19], g_pids, q_cams, g_cams)
    with pytest.raises(ValueError, match=r"g_camids must be 1-D of length 40.*shape \(40, 1\)"):
        evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams[:, None])
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=0)


# --------------------------------------------------------------------------------------------
# compute_distmat
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", reference.METRICS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_distmat_matches_sklearn(metric, dtype, chunking):
    # Inputs of every dtype are promoted to float64, so the tolerance is the one float32
    # rounding of the result whatever the input dtype (plus cancellation near 0, via atol).
    rng = np.random.default_rng(500 + 10 * reference.METRICS.index(metric) + np.dtype(dtype).itemsize)
    qf = rng.normal(size=(37, 24)).astype(dtype)
    gf = rng.normal(size=(53, 24)).astype(dtype)
    gf[5] = qf[3]  # an exact match: distance 0
    # sklearn on the same values in float64 (what we promise: float64 math, one float32 rounding)
    expected = pairwise_distances(qf.astype(np.float64), gf.astype(np.float64), metric=metric)
    got = compute_distmat(qf, gf, metric=metric)
    assert got.dtype == np.float32 and got.shape == (37, 53)
    scale = expected.max()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * scale)
    assert got[3, 5] == pytest.approx(0.0, abs=1e-6 * scale)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "sqeuclidean"])
def test_distmat_same_input_has_zero_diagonal_like_sklearn(metric):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 16)).astype(np.float32) + 2.0
    got = compute_distmat(x, x, metric=metric)
    expected = pairwise_distances(x.astype(np.float64), metric=metric)
    np.testing.assert_array_equal(np.diag(got), 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.max())


def test_distmat_cosine_zero_rows_are_distance_one():
    rng = np.random.default_rng(6)
    qf, gf = rng.normal(size=(6, 8)), rng.normal(size=(9, 8))
    qf[2] = 0.0
    gf[4] = 0.0
    got = compute_distmat(qf, gf)
    np.testing.assert_array_equal(got[2], 1.0)
    np.testing.assert_array_equal(got[:, 4], 1.0)
    np.testing.assert_allclose(got, pairwise_distances(qf, gf, metric="cosine"), atol=1e-6)
    # anti-parallel vectors: distance 2; parallel ones: 0, never below (clipped to [0, 2])
    assert compute_distmat(gf[:1], -3.0 * gf[:1])[0, 0] == pytest.approx(2.0, abs=1e-6)
    x = rng.normal(size=(200, 7))
    parallel = np.diag(compute_distmat(x, 3.0 * x))
    assert parallel.min() == 0.0 and parallel.max() < 1e-6


def test_distmat_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    qf = rng.normal(size=(12, 10)).astype(np.float32)
    gf = rng.normal(size=(20, 10)).astype(np.float32)
    expected = compute_distmat(qf, gf)
    q_t = torch.from_numpy(qf).requires_grad_(True)
    np.testing.assert_array_equal(compute_distmat(q_t, torch.from_numpy(gf)), expected)
    # bfloat16 has no NumPy dtype: widened to float32 first
    q_bf, g_bf = q_t.detach().bfloat16(), torch.from_numpy(gf).bfloat16()
    np.testing.assert_array_equal(
        compute_distmat(q_bf, g_bf, "euclidean"),
        compute_distmat(q_bf.float().numpy(), g_bf.float().numpy(), "euclidean"),
    )
    # the same tensor twice keeps sklearn's (x, x) rule: exact zero diagonal
    np.testing.assert_array_equal(np.diag(compute_distmat(q_t, q_t)), 0.0)


def test_distmat_validation_names_argument():
    rng = np.random.default_rng(9)
    qf = rng.normal(size=(4, 8)).astype(np.float32)
    gf = rng.normal(size=(10, 6)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^gf must be 2-D float array with the same feature "
                                         r"dimension as qf \(8\); got shape \(10, 6\) float32$"):
        compute_distmat(qf, gf)
    with pytest.raises(ValueError, match=r"^qf .*got shape \(8,\) float32$"):
        compute_distmat(qf[0], gf)
    with pytest.raises(ValueError, match=r"^qf .*got shape \(4, 8\) int64$"):
        compute_distmat(qf.astype(np.int64), gf[:, :6])
    with pytest.raises(ValueError, match=r"^gf .*got shape \(2, 5, 8\) float64$"):
        compute_distmat(qf, rng.normal(size=(2, 5, 8)))
    with pytest.raises(ValueError, match=r"metric must be one of cosine, euclidean, sqeuclidean; "
                                         r"got 'manhattan'"):
        compute_distmat(qf, qf, metric="manhattan")


def test_to_numpy_passes_numpy_through_and_converts_lists():
    x = np.random.default_rng(10).normal(size=(3, 2))
    assert kernels._to_numpy(x) is x
    np.testing.assert_array_equal(kernels._to_numpy(x.tolist()), x)


# --------------------------------------------------------------------------------------------
# rerank_k_reciprocal
# --------------------------------------------------------------------------------------------
def _rerank_inputs(rng, num_q, num_g):
    qf, gf = _structured_split(rng, num_q, num_g)[:2]
    return compute_distmat(qf, gf), compute_distmat(qf, qf), compute_distmat(gf, gf)


@pytest.mark.parametrize(
    "k1, k2, lambda_value",
    [
        (20, 6, 0.3),  # the recipe
        (5, 6, 0.3),  # odd k1: round(5 / 2) = 2 (half to even)
        (5, 1, 0.3),  # k2 = 1: no query expansion
        (20, 6, 0.0),  # Jaccard only
        (20, 6, 1.0),  # original distance only
        (3, 10, 0.5),  # k2 > k1 + 1
    ],
)
def test_rerank_matches_published_on_structured_data(k1, k2, lambda_value):
    rng = np.random.default_rng(3000 + 31 * k1 + 7 * k2 + int(10 * lambda_value))
    num_q, num_g = int(rng.integers(40, 121)), int(rng.integers(200, 501))
    q_g, q_q, g_g = _rerank_inputs(rng, num_q, num_g)
    got = rerank_k_reciprocal(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value)
    expected = published_re_ranking(q_g, q_q, g_g, k1, k2, lambda_value)
    assert got.dtype == np.float32 and got.shape == (num_q, num_g)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.ptp(got) > 0.1  # not a degenerate (constant) result


@pytest.mark.parametrize("seed", range(3))
def test_rerank_ties_follow_stable_order(seed, chunking):
    # Integer-valued distances: many exact ties, which the published code resolves with the
    # unstable default sort; ours equals it run with a stable sort.
    rng = np.random.default_rng(4000 + seed)
    num_q, num_g = 25, 70
    points = rng.integers(0, 6, size=(num_q + num_g, 2)).astype(np.float64)
    full = np.abs(points[:, None] - points[None]).sum(axis=-1)
    full += rng.integers(0, 2, full.shape)  # not symmetric, non-zero diagonal: the general case
    q_g, q_q, g_g = full[:num_q, num_q:], full[:num_q, :num_q], full[num_q:, num_q:]
    for k1, k2, lam in [(20, 6, 0.3), (5, 1, 0.0), (7, 3, 0.5)]:
        got = rerank_k_reciprocal(q_g, q_q, g_g, k1, k2, lam)
        expected = published_re_ranking(q_g, q_q, g_g, k1, k2, lam, sort_kind="stable")
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_rerank_tiny_problem_hand_computed():
    # Q = 1, G = 2, k1 = 1 (expansion with round(0.5) = 0 neighbours), k2 = 1.
    # Squared, column-normalised, transposed:
    #   dist = [[0, 1/4, 1], [1/9, 0, 1], [4/9, 1, 0]]
    # k-reciprocal sets (k1 = 1): item 0 -> {0, 1}, item 1 -> {0, 1}, item 2 -> {2}.
    q_g = np.array([[1.0, 2.0]])
    q_q = np.array([[0.0]])
    g_g = np.array([[0.0, 3.0], [3.0, 0.0]])
    v0 = np.array([1.0, math.exp(-0.25)]) / (1.0 + math.exp(-0.25))
    v1 = np.array([math.exp(-1 / 9), 1.0]) / (1.0 + math.exp(-1 / 9))
    overlap = np.minimum(v0, v1).sum()
    jaccard = np.array([1 - overlap / (2 - overlap), 1.0])  # item 2 shares nothing with item 0
    for lam in (0.0, 0.3, 1.0):
        got = rerank_k_reciprocal(q_g, q_q, g_g, k1=1, k2=1, lambda_value=lam)
        expected = (1 - lam) * jaccard + lam * np.array([0.25, 1.0])
        np.testing.assert_allclose(got[0], expected, rtol=0, atol=1e-6)


def test_rerank_small_gallery_and_torch_inputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    q_g, q_q, g_g = _rerank_inputs(rng, 3, 5)  # k1 + 1 > Q + G: full sort path
    expected = published_re_ranking(q_g, q_q, g_g, 20, 6, 0.3)
    np.testing.assert_allclose(rerank_k_reciprocal(q_g, q_q, g_g), expected, atol=1e-5)
    got = rerank_k_reciprocal(*(torch.from_numpy(a) for a in (q_g, q_q, g_g)))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_rerank_validation_names_argument():
    rng = np.random.default_rng(13)
    q_g, q_q, g_g = _rerank_inputs(rng, 6, 20)
    with pytest.raises(ValueError, match=r"q_q_dist must have shape \(6, 6\).*shape \(5, 5\)"):
        rerank_k_reciprocal(q_g, q_q[:5, :5], g_g)
    with pytest.raises(ValueError, match=r"g_g_dist must have shape \(20, 20\).*shape \(20, 19\)"):
        rerank_k_reciprocal(q_g, q_q, g_g[:, :19])
    with pytest.raises(ValueError, match=r"q_g_dist .*shape \(20,\)"):
        rerank_k_reciprocal(q_g[0], q_q, g_g)
    with pytest.raises(ValueError, match="k1 must be an integer >= 1; got 0"):
        rerank_k_reciprocal(q_g, q_q, g_g, k1=0)
    with pytest.raises(ValueError, match="k2 must be an integer >= 1; got 2.5"):
        rerank_k_reciprocal(q_g, q_q, g_g, k2=2.5)
    with pytest.raises(ValueError, match=r"lambda_value must be a number in \[0, 1\]; got 1.5"):
        rerank_k_reciprocal(q_g, q_q, g_g, lambda_value=1.5)
    bad = g_g.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="g_g_dist contains NaN"):
        rerank_k_reciprocal(q_g, q_q, bad)
