"""Feature extraction: no host sync per batch, the flip in one batch of 2B, eval.precision, the
evaluation's distance paths and what evaluate_splits keeps alive.

The sync test records the aten ops of the extraction loop on the CPU, in the style of
tests/test_step_syncs.py: a CPU run dispatches the ops a GPU run would, so an op that would make
the host wait for a GPU (.item(), nonzero, mask indexing, ...) is caught without one.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from alr_fast.runs import CHECKPOINT_FORMAT
from torch.utils._python_dispatch import TorchDispatchMode

from alr_fast.config import Config, load_config
from alr_fast.evaluation import (
    FeatureExtractor, FeatureSet, auto_batch_size, eval_input_dtype, evaluate_features, extract_features,
)
from alr_fast.model import ReidNet
from alr_fast.pipelines.eval_cache import CachedEvalLoader, build_eval_cache
from alr_fast.pipelines.jpeg_store import JpegStore
from alr_fast.pipelines.torch_loader import TorchEvalLoader
from alr_fast.task import build_task
from alr_fast.trainer import evaluate_splits
from loader_helpers import jpeg_bytes
from test_step_syncs import sync_reason

H, W = 64, 32  # the smallest input at which a random ResNet-18 gives non-degenerate features


class _Record(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.add(str(func.overloadpacket))
        reason = sync_reason(func, args, kwargs)
        if reason:
            self.syncs.append(reason)
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def images():
    """21 JPEGs (not a multiple of the batch), pids and camids."""
    rng = np.random.default_rng(12)
    store = JpegStore([f"{i}.jpg" for i in range(21)], [jpeg_bytes(rng, 40, 20) for _ in range(21)])
    return store, rng.integers(1, 6, 21), rng.integers(1, 4, 21)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = ReidNet(5, "resnet18")
    net.eval()
    return net


def _cached(images, batch_size=8, **kw):
    store, pids, camids = images
    return CachedEvalLoader(build_eval_cache(store, H, W), pids, camids, batch_size=batch_size, **kw)


@pytest.mark.parametrize("kind", ["cache", "jpeg"])
def test_extraction_loop_dispatches_no_host_sync(images, model, kind):
    """With the cache the loader's work (slice, normalise) is device work and is recorded too;
    the JPEG loader decodes on the host (its DataLoader draws a seed with .item(), on the host),
    so its batches are made first and the loop over them is recorded."""
    store, pids, camids = images
    if kind == "cache":
        loader = _cached(images)
    else:
        jpeg = TorchEvalLoader(store, pids, camids, height=H, width=W, batch_size=8)
        loader = type("Batches", (list,), {"num_images": 21})(jpeg)
    extractor = FeatureExtractor(model, flip=True, capture=False)
    with _Record() as rec:
        fs = extractor(loader)
    assert rec.syncs == []
    assert "aten.convolution" in rec.ops and "aten.flip" in rec.ops  # the loop really was recorded
    assert fs.features.shape == (21, sum(model.feature_dims)) and fs.pids.tolist() == pids.tolist()
    assert fs.camids.tolist() == camids.tolist() and torch.isfinite(fs.features).all()


def test_recorder_sees_a_loader_that_synchronises(images, model):
    """The negative control: labels built with .item() per batch (what reading device labels
    back amounts to on a GPU) are caught."""
    loader = _cached(images)

    def syncing():
        for x, p, c in loader:
            yield x, torch.tensor([int(v.item()) for v in p]), c

    with _Record() as rec:
        FeatureExtractor(model, capture=False)(syncing())
    assert rec.syncs.count("aten._local_scalar_dense.default") == 21


def test_flip_in_one_batch_equals_the_models_embedding(images, model):
    loader = _cached(images)
    batches = list(loader)
    with torch.no_grad():
        expected = torch.cat([model.embed(x, flip=True) for x, _, _ in batches])
        no_flip = torch.cat([model.embed(x, flip=False) for x, _, _ in batches])
    got = extract_features(model, loader)
    torch.testing.assert_close(got.features, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(extract_features(model, loader, flip=False).features, no_flip, rtol=1e-5, atol=1e-6)
    # a loader without num_images: features concatenated instead of written into one tensor
    generic = extract_features(model, [b for b in loader])
    assert torch.equal(generic.features, got.features) and generic.pids.tolist() == got.pids.tolist()
    assert model.training is False


def test_bf16_extraction_is_close_to_fp32_and_really_bf16(images, model):
    loader = _cached(images)
    fp32 = extract_features(model, loader).features
    bf16 = extract_features(model, loader, precision="bf16").features
    assert bf16.dtype == torch.float32  # features leave the clipped GAP in float32
    rel = (bf16 - fp32).norm() / fp32.norm()
    assert 1e-5 < float(rel) < 5e-2


def test_extraction_errors_are_clear(images, model):
    loader = _cached(images)
    with pytest.raises(ValueError, match="gallery: the loader yielded no images"):
        extract_features(model, [], desc="gallery")
    with pytest.raises(ValueError, match="eval precision must be one of fp32, bf16, fp16; got 'int8'"):
        FeatureExtractor(model, precision="int8")
    with pytest.raises(ValueError, match="capture=True needs images on a CUDA device"):
        extract_features(model, loader, capture=True)

    class Liar(list):
        num_images = 5

    with pytest.raises(RuntimeError, match=r"^query: the loader yielded 8 images or more but announced num_images=5$"):
        extract_features(model, Liar([next(iter(loader))]), desc="query")
    Liar.num_images = 9
    with pytest.raises(RuntimeError, match=r"^query: the loader yielded 8 images but announced num_images=9$"):
        extract_features(model, Liar([next(iter(loader))]), desc="query")


def test_batch_size_and_input_dtype_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert auto_batch_size(0, cpu, 384, 128, torch.float32) == 64 and auto_batch_size(48, cuda, 384, 128, torch.bfloat16) == 48
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(80e9), int(140e9)))
    assert auto_batch_size(0, cuda, 384, 128, torch.bfloat16) == 256  # the cap: 512 images per forward
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(2e9), int(140e9)))
    assert auto_batch_size(0, cuda, 384, 128, torch.bfloat16) == 64  # 2 GB free: ~6 MB per image leaves 64
    expected = {("fp32", cuda): torch.float32, ("bf16", cuda): torch.bfloat16, ("fp16", cuda): torch.float16,
                ("bf16", cpu): torch.float32, ("fp16", cpu): torch.float32}
    assert {k: eval_input_dtype(*k) for k in expected} == expected
    with pytest.raises(ValueError, match="eval precision"):
        eval_input_dtype("fp64", cpu)


def _feature_sets(seed=5, num_q=40, num_g=160, dim=64):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, (13, dim))

    def draw(n):
        pids = rng.integers(1, 13, n)
        f = np.clip(centres[pids] + 0.6 * rng.normal(size=(n, dim)), 0, 1).astype(np.float32)
        return FeatureSet(torch.from_numpy(f), pids, rng.integers(0, 4, n))

    return draw(num_q), draw(num_g)


def test_fast_and_exact_evaluation_agree_and_report_stage_times():
    q, g = _feature_sets()
    times: dict = {}
    fast = evaluate_features(q, g, re_ranking=True, stage_times=times)
    exact = evaluate_features(q, g, re_ranking=True, exact=True)
    assert set(times) == {"distance", "ranking", "re_ranking"} and all(t > 0 for t in times.values())
    assert 0.05 < exact["mAP"] < 0.95
    for key in ("mAP", "rank1", "rr_mAP", "rr_rank1"):
        assert fast[key] == pytest.approx(exact[key], abs=1e-3), key
    bf16 = evaluate_features(q, g, re_ranking=True, rerank_gemm="bf16")
    assert bf16["mAP"] == fast["mAP"]  # the q-g matrix CMC/mAP read is never reduced
    assert bf16["rr_mAP"] == pytest.approx(fast["rr_mAP"], abs=2e-2)


def test_evaluate_splits_keeps_features_only_when_asked(images):
    cfg = load_config(None, ["model.backbone=resnet18", "model.pretrained=none", f"data.height={H}", f"data.width={W}"])
    torch.manual_seed(0)
    task = build_task(cfg, 5)
    loaders = {"test": (_cached(images), _cached(images)), "valid": (_cached(images), _cached(images))}
    times: dict = {}
    out = evaluate_splits(task, loaders, cfg, progress=False, splits=["test"], stage_times=times)
    assert set(out) == {"test"} and out["test"][1] is None
    metrics = out["test"][0]
    assert metrics["num_query"] == metrics["num_gallery"] == 21 and 0 < metrics["mAP"] <= 1
    assert set(times) >= {"extraction", "distance", "ranking"}
    exact_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, exact=True))
    exact, kept = evaluate_splits(task, loaders, exact_cfg, False, ["test"], keep_features=True)["test"]
    q, g = kept
    assert isinstance(q, FeatureSet) and q.features.shape[0] == 21 and torch.equal(q.features, g.features)
    assert exact["mAP"] == pytest.approx(metrics["mAP"], abs=1e-3)
    assert Config().eval.precision == "fp32" and Config().eval.batch_size == 0


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_captured_extraction_equals_eager_and_never_synchronises(images, precision):
    torch.manual_seed(0)
    net = ReidNet(5, "resnet18").cuda().to(memory_format=torch.channels_last).eval()
    dtype = eval_input_dtype(precision, torch.device("cuda"))
    loader = _cached(images, device="cuda", dtype=dtype, channels_last=True)
    eager = extract_features(net, loader, precision=precision, capture=False)
    extractor = FeatureExtractor(net, precision=precision)
    first = extractor(loader)  # captures on the first batch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = extractor(loader)  # replays only: any synchronising call raises
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(first.features, again.features) and first.pids.tolist() == eager.pids.tolist()
    tol = 1e-5 if precision == "fp32" else 2e-2
    err = float((first.features - eager.features).abs().max())
    print(f"captured vs eager ({precision}): max |diff| {err:.3g}")
    assert err <= tol * float(eager.features.abs().max())


def test_evaluate_checkpoint_reads_the_cache_and_saves_features_only_when_asked(tmp_path):
    """``alr-fast evaluate``: the test set through the evaluation cache, features written when
    eval.save_features asks, the report next to the checkpoint."""
    from alr_fast.bench.synthetic_fast import scaled_counts, write_dataset
    from alr_fast.config import config_to_dict
    from alr_fast.runs import save_checkpoint
    from alr_fast.trainer import evaluate_checkpoint

    counts = scaled_counts("market1501", 0.003)
    write_dataset(tmp_path / "data", "market1501", counts)
    cfg = load_config(None, ["model.backbone=resnet18", "model.pretrained=none", f"data.height={H}",
                             f"data.width={W}", f"data.root={tmp_path / 'data'}", "run.progress=false",
                             "run.device=cpu", "data.num_workers=0"])
    torch.manual_seed(0)
    task = build_task(cfg, counts["train_ids"])
    save_checkpoint(tmp_path / "best.pt", {"format": CHECKPOINT_FORMAT, "config": config_to_dict(cfg),
                                           "task": task.state_dict(), "num_classes": counts["train_ids"]})
    m = evaluate_checkpoint(tmp_path / "best.pt", [], out=tmp_path / "a")
    assert m["num_query"] == counts["query"] and m["num_gallery"] == counts["gallery"] and 0 < m["mAP"] <= 1
    assert not list((tmp_path / "a").glob("features-*.npz")) and list((tmp_path / "a").glob("evaluation-*.json"))
    exact = evaluate_checkpoint(tmp_path / "best.pt", ["eval.save_features=true", "eval.exact=true",
                                                       "eval.cache=none"], out=tmp_path / "b")
    assert exact["mAP"] == pytest.approx(m["mAP"], abs=1e-3)  # the JPEG loader and float64: the same ranking
    (npz,) = (tmp_path / "b").glob("features-*.npz")
    saved = np.load(npz)
    assert saved["query"].shape == (counts["query"], sum(task.model.feature_dims)) and len(saved["gallery_pids"]) == counts["gallery"]


@pytest.mark.parametrize("overrides,message", [
    (["eval.precision=fp64"], "config key 'eval.precision' must be one of fp32, bf16, fp16; got 'fp64'"),
    (["eval.rerank_gemm=fp16"], "config key 'eval.rerank_gemm' must be one of float32, tf32, bf16; got 'fp16'"),
    (["eval.cache=gpu"], "config key 'eval.cache' must be one of auto, device, host, none; got 'gpu'"),
    (["eval.batch_size=-1"], "config key 'eval.batch_size' must be >= 0; got -1"),
    (["eval.cache_budget_gb=-2"], "config key 'eval.cache_budget_gb' must be >= 0; got -2.0"),
    (["eval.exact=true", "eval.rerank_gemm=tf32"],
     "config key 'eval.rerank_gemm=tf32' contradicts eval.exact=true (the exact path computes every matrix in "
     "float64); use eval.rerank_gemm=float32"),
])
def test_eval_keys_reject_bad_values_naming_the_key(overrides, message):
    from alr_fast.config import ConfigError

    with pytest.raises(ConfigError, match=f"^{__import__('re').escape(message)}$"):
        load_config(None, overrides)
