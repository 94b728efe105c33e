"""The fast host paths (``alr_fast.kernels.host``) against the float64 reference.

Stated tolerances (module note of ``host.py``): cosine distances within 2e-5 of the float64
reference; euclidean squares within 2e-5 of |q|^2 + |g|^2; CMC and mAP (also after
re-ranking) within 1e-3 of the exact path's; the ranking by counting equal to the sort.
tf32 / bf16 round to nearest-even at 10 / 7 mantissa bits, checked against an independent
frexp oracle and torch's bfloat16 conversion.
"""
from __future__ import annotations

import numpy as np
import pytest

from alr_fast import kernels
from alr_fast.kernels import host, launch, reference

COSINE_ATOL = 2e-5
SQUARE_RTOL = 2e-5
METRIC_ATOL = 1e-3


def _split(rng, num_q, num_g, dim, num_ids=40, num_cams=4, noise=0.9):
    """Clipped non-negative features (like the model's clipped GAP vectors) of a few identities."""
    centres = rng.uniform(0, 1, (num_ids + 1, dim))
    cams = 0.2 * rng.normal(size=(num_cams, dim))
    q_pids, g_pids = rng.integers(1, num_ids + 1, num_q), rng.integers(0, num_ids + 1, num_g)
    q_cams, g_cams = rng.integers(0, num_cams, num_q), rng.integers(0, num_cams, num_g)

    def draw(p, c):
        return np.clip(centres[p] + cams[c] + noise * rng.normal(size=(len(p), dim)), 0, 1).astype(np.float32)

    return draw(q_pids, q_cams), draw(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


@pytest.fixture(params=["default_blocks", "tiny_blocks"])
def blocks(request, monkeypatch):
    """Default GEMM blocks, and blocks / mirror tiles of a few rows (every block edge)."""
    if request.param == "tiny_blocks":
        monkeypatch.setattr(host, "_BLOCK_ROWS", 7)
        monkeypatch.setattr(host, "_MIRROR_TILE", 5)
    return request.param


@pytest.mark.parametrize("dim,dtype", [(16, np.float32), (4096, np.float32), (300, np.float16), (300, np.float64)])
def test_float32_cosine_within_tolerance_of_the_reference(dim, dtype, blocks):
    """The same 2e-5 for every input dtype: float16 features are exact in float32, float64 ones
    add one float32 rounding (~6e-8) of the unit rows."""
    rng = np.random.default_rng(100 + dim)
    qf, gf = (x.astype(dtype) for x in _split(rng, 37, 61, dim)[:2])
    qf[4] = 0.0  # a zero row: distance 1 to everything, as sklearn
    gf[9] = 3.0 * qf[2]  # parallel: distance 0
    expected = reference.compute_distmat(qf, gf)
    got = host.compute_distmat(qf, gf)
    assert got.dtype == np.float32 and got.shape == (37, 61)
    np.testing.assert_allclose(got, expected, rtol=0, atol=COSINE_ATOL)
    np.testing.assert_array_equal(got[4], 1.0)
    assert 0.0 <= got[2, 9] < COSINE_ATOL and got.min() >= 0.0 and got.max() <= 2.0
    assert np.abs(got - expected).max() > 0  # really another path than the float64 one


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_float32_euclidean_squares_within_tolerance(metric, blocks):
    rng = np.random.default_rng(7)
    qf, gf = rng.normal(size=(23, 48)).astype(np.float32), rng.normal(size=(41, 48)).astype(np.float32)
    gf[3] = qf[5]
    expected = reference.compute_distmat(qf, gf, metric).astype(np.float64)
    got = host.compute_distmat(qf, gf, metric).astype(np.float64)
    if metric == "euclidean":
        got, expected = got ** 2, expected ** 2
    scale = (qf.astype(np.float64) ** 2).sum(1)[:, None] + (gf.astype(np.float64) ** 2).sum(1)[None, :]
    assert (np.abs(got - expected) <= SQUARE_RTOL * scale).all()
    assert got[5, 3] <= SQUARE_RTOL * scale[5, 3]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_symmetric_path_multiplies_half_and_is_exactly_symmetric(metric, blocks, monkeypatch):
    rng = np.random.default_rng(3)
    x = _split(rng, 50, 1, 24)[0]
    calls = []
    real = np.matmul
    monkeypatch.setattr(host.np, "matmul", lambda a, b, out: calls.append(a.shape[0] * b.shape[1]) or real(a, b, out=out))
    sym = host.compute_distmat(x, x, metric)
    multiplied = sum(calls)
    calls.clear()
    full = host.compute_distmat(x, x.copy(), metric)
    assert sum(calls) == 50 * 50
    if blocks == "tiny_blocks":  # 8 row blocks of 7: the ones below the diagonal are copies
        upper = sum((min(s + 7, 50) - s) * (50 - s) for s in range(0, 50, 7))
        assert multiplied == upper < 0.6 * 50 * 50
    np.testing.assert_array_equal(sym, sym.T)
    np.testing.assert_array_equal(np.diag(sym), 0.0)
    off = ~np.eye(50, dtype=bool)
    np.testing.assert_allclose(sym[off], full[off], rtol=0, atol=COSINE_ATOL if metric == "cosine" else 1e-4)
    np.testing.assert_allclose(sym, reference.compute_distmat(x, x, metric), rtol=1e-4, atol=1e-4)


def _frexp_round(x: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Independent oracle: round to nearest-even at ``mantissa_bits`` stored bits (+1 implicit)."""
    m, e = np.frexp(x.astype(np.float64))  # x = m 2^e, 0.5 <= |m| < 1
    scale = 2.0 ** (mantissa_bits + 1)
    return np.ldexp(np.round(m * scale) / scale, e).astype(np.float32)  # np.round: half to even


@pytest.mark.parametrize("precision,bits", [("tf32", 10), ("bf16", 7)])
def test_mantissa_rounding_is_round_to_nearest_even(precision, bits):
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=5000), rng.uniform(-1e30, 1e30, 100), [0.0, -0.0, 1.0, -2.5, 1e-38]])
    x = x.astype(np.float32)
    # exact ties: the bit just below the kept ones set, nothing below it
    ties = (np.arange(1, 200, dtype=np.uint32) << np.uint32(23 - bits)) | np.uint32(1 << (22 - bits)) | np.uint32(0x3F800000)
    x = np.concatenate([x, ties.view(np.float32)])
    got = launch._round_mantissa(np, x, precision)
    np.testing.assert_array_equal(got, _frexp_round(x, bits))
    assert (got.view(np.uint32) & np.uint32((1 << (23 - bits)) - 1) == 0).all()
    if precision == "bf16":
        torch = pytest.importorskip("torch")
        np.testing.assert_array_equal(got, torch.from_numpy(x).bfloat16().float().numpy())


@pytest.mark.parametrize("precision,atol", [("tf32", 4e-3), ("bf16", 2e-2)])
def test_tensor_core_emulations_round_their_inputs(precision, atol):
    """Unit rows rounded at 10 (tf32) / 7 (bf16) bits: cosine errors up to ~2^-10 / 2^-7 of the
    products' sum, far above the float32 path's."""
    rng = np.random.default_rng(11)
    qf, gf = _split(rng, 20, 30, 256)[:2]
    expected = reference.compute_distmat(qf, gf)
    got = kernels.compute_distmat(qf, gf, precision=precision)
    err = np.abs(got - expected).max()
    assert 10 * COSINE_ATOL < err < atol
    np.testing.assert_array_equal(got, host.compute_distmat(qf, gf, precision=precision))


def test_float32_metrics_and_re_ranking_match_the_exact_path():
    rng = np.random.default_rng(21)
    qf, gf, q_pids, g_pids, q_cams, g_cams = _split(rng, 90, 500, 512)
    labels = (q_pids, g_pids, q_cams, g_cams)
    exact = [reference.compute_distmat(a, b) for a, b in ((qf, gf), (qf, qf), (gf, gf))]
    fast = [kernels.compute_distmat(a, b, precision="float32") for a, b in ((qf, gf), (qf, qf), (gf, gf))]
    for e, f in zip(exact, fast):
        np.testing.assert_allclose(f, e, rtol=0, atol=COSINE_ATOL)
    cmc_e, map_e = reference.evaluate_ranking(exact[0], *labels)
    cmc_f, map_f = kernels.evaluate_ranking(fast[0], *labels, method="count")
    assert 0.05 < map_e < 0.95
    assert abs(map_f - map_e) <= METRIC_ATOL and np.abs(cmc_f - cmc_e).max() <= METRIC_ATOL
    rr_e = reference.evaluate_ranking(reference.rerank_k_reciprocal(*exact), *labels)
    rr_f = kernels.evaluate_ranking(kernels.rerank_k_reciprocal(*fast), *labels, method="count")
    assert abs(rr_f[1] - rr_e[1]) <= METRIC_ATOL and np.abs(rr_f[0] - rr_e[0]).max() <= METRIC_ATOL


def test_counting_ranking_equals_the_sort_on_ties():
    rng = np.random.default_rng(4)
    distmat = rng.integers(0, 5, size=(40, 120)).astype(np.float32)
    labels = (rng.integers(1, 8, 40), rng.integers(0, 8, 120), rng.integers(0, 3, 40), rng.integers(0, 3, 120))
    cmc, mAP = kernels.evaluate_ranking(distmat, *labels, method="count", max_rank=30)
    ref_cmc, ref_mAP = reference.evaluate_ranking(distmat, *labels, max_rank=30)
    np.testing.assert_array_equal(cmc, ref_cmc)
    assert mAP == pytest.approx(ref_mAP, abs=1e-12)


def test_public_arguments_are_validated():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"^precision must be one of float64, float32, tf32, bf16 \(or None\); got 'fp32'$"):
        kernels.compute_distmat(x, x, precision="fp32")
    with pytest.raises(ValueError, match=r"^method must be one of sort, count \(or None\); got 'fast'$"):
        kernels.evaluate_ranking(np.zeros((1, 1)), [1], [1], [0], [1], method="fast")
    with pytest.raises(ValueError, match="precision='float64' is the reference"):
        host.compute_distmat(x, x, precision="float64")
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(x + np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(kernels.compute_distmat(t, t, precision="float32"),
                                  host.compute_distmat(t.numpy(), t.numpy()))


def test_joint_rerank_equals_the_reference_on_its_blocks_bit_for_bit(blocks):
    """The CPU's fused re-ranking: one exactly symmetric matrix of all items, squared in place."""
    rng = np.random.default_rng(8)
    qf, gf = _split(rng, 45, 230, 64)[:2]
    joint = host.joint_distmat(qf, gf)
    assert joint.shape == (275, 275) and np.array_equal(joint, joint.T) and not np.diag(joint).any()
    np.testing.assert_allclose(joint[:45, 45:], reference.compute_distmat(qf, gf), rtol=0, atol=COSINE_ATOL)
    blocks_ = joint[:45, 45:].copy(), joint[:45, :45].copy(), joint[45:, 45:].copy()
    for k1, k2, lam in ((20, 6, 0.3), (5, 1, 0.0)):
        expected = reference.rerank_k_reciprocal(*blocks_, k1, k2, lam)
        got = host.rerank_joint(joint.copy(), 45, k1, k2, lam)
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match=r"num_q must lie in \[1, 275\)"):
        host.rerank_joint(joint.copy(), 275)
    with pytest.raises(ValueError, match=r"^gf contains NaN or infinite values"):
        host.joint_distmat(qf, np.where(gf > 0.99, np.nan, gf))
