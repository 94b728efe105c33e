"""The decode-once evaluation cache: the JPEG reference loader's batches, bit for bit, from memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from alr_fast.pipelines import eval_cache
from alr_fast.pipelines.eval_cache import CachedEvalLoader, EvalCachePlan, build_eval_cache, eval_cache_bytes
from alr_fast.pipelines.jpeg_store import JpegStore
from alr_fast.pipelines.torch_loader import TorchEvalLoader
from loader_helpers import jpeg_bytes

H, W = 32, 16


@pytest.fixture
def eval_set():
    """37 JPEGs of mixed sizes (so decode_resize really resizes), grey and CMYK among them."""
    rng = np.random.default_rng(3)
    sizes = [(int(rng.integers(20, 90)), int(rng.integers(10, 45))) for _ in range(37)]
    modes = ["RGB"] * 35 + ["L", "CMYK"]
    store = JpegStore([f"img_{i}.jpg" for i in range(37)], [jpeg_bytes(rng, h, w, m) for (h, w), m in zip(sizes, modes)])
    pids, camids = rng.integers(-1, 50, 37), rng.integers(1, 7, 37)
    return store, pids, camids


@pytest.mark.parametrize("channels_last", [False, True])
def test_cached_batches_equal_the_jpeg_loaders(eval_set, channels_last, monkeypatch):
    store, pids, camids = eval_set
    monkeypatch.setattr(eval_cache, "_STAGING_IMAGES", 10)  # decode in chunks of 10: every edge
    cache = build_eval_cache(store, H, W, num_threads=2)
    assert cache.shape == (37, H, W, 3) and cache.dtype == torch.uint8 and cache.is_contiguous()
    reference = list(TorchEvalLoader(store, pids, camids, height=H, width=W, batch_size=8))
    loader = CachedEvalLoader(cache, pids, camids, batch_size=8, channels_last=channels_last)
    cached = list(loader)
    assert len(loader) == len(cached) == len(reference) == 5 and loader.num_images == 37
    assert [b[0].shape[0] for b in cached] == [8, 8, 8, 8, 5]
    for (x, p, c), (y, q, d) in zip(cached, reference):
        assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y)
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert p.device.type == c.device.type == "cpu" and p.dtype == torch.int64  # labels on the host
        assert torch.equal(p, q) and torch.equal(c, d)
    assert torch.cat([b[1] for b in cached]).tolist() == pids.tolist()
    assert torch.equal(torch.cat([b[0] for b in loader]), torch.cat([b[0] for b in cached]))  # a second pass
    assert loader.nbytes == eval_cache_bytes(37, H, W) == 37 * H * W * 3 and loader.placement == "host"


def test_cached_batches_take_the_keras_input_style(eval_set):
    """The seed's Caffe preprocessing (BGR minus the Keras means) through the cache equals the JPEG
    loader in that style, and differs from the torchvision style."""
    from alr_fast.pipelines.augment import input_style_for

    store, pids, camids = eval_set
    keras = input_style_for("keras")
    cache = build_eval_cache(store, H, W, num_threads=2)
    reference = torch.cat([b[0] for b in TorchEvalLoader(store, pids, camids, height=H, width=W, batch_size=8,
                                                         input_style=keras)])
    cached = torch.cat([b[0] for b in CachedEvalLoader(cache, pids, camids, batch_size=8, input_style=keras)])
    assert torch.equal(cached, reference)
    torchvision = torch.cat([b[0] for b in CachedEvalLoader(cache, pids, camids, batch_size=8)])
    assert cached.abs().max() > 50 > torchvision.abs().max()  # pixel units minus the mean, not unit scale


def test_cached_loader_casts_to_the_requested_dtype(eval_set):
    store, pids, camids = eval_set
    cache = build_eval_cache(store, H, W, placement="host")
    full = torch.cat([b[0] for b in CachedEvalLoader(cache, pids, camids, batch_size=16)])
    half = torch.cat([b[0] for b in CachedEvalLoader(cache, pids, camids, batch_size=16, dtype=torch.bfloat16)])
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.to(torch.bfloat16))


@pytest.mark.parametrize("mode,device,sizes,expected", [
    ("auto", "cuda", [3, 4, 5], ["device", "device", "host"]),  # budget 10: the third set spills to pinned host
    ("auto", "cpu", [3, 4, 5], ["host", "host", "none"]),  # a CPU keeps the JPEG loader beyond the budget
    ("device", "cuda", [30], ["device"]),
    ("host", "cuda", [3, 30], ["host", "host"]),  # pinned host memory is not counted against the budget
    ("host", "cpu", [30], ["host"]),
    ("none", "cuda", [1], ["none"]),
])
def test_cache_plan_places_each_set(mode, device, sizes, expected):
    plan = EvalCachePlan(mode, 10, torch.device(device))  # constructing a cuda device needs no GPU
    assert [plan.placement(n) for n in sizes] == expected


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"eval cache mode must be one of auto, device, host, none; got 'gpu'"):
        EvalCachePlan("gpu", 1, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"expected a uint8 \[N, H, W, 3\] cache, got torch.float32 \(2, 3, 4, 3\)"):
        CachedEvalLoader(torch.zeros(2, 3, 4, 3), np.zeros(2), np.zeros(2), batch_size=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        CachedEvalLoader(torch.zeros(2, 3, 4, 3, dtype=torch.uint8), np.zeros(2), np.zeros(2), batch_size=0)
    with pytest.raises(ValueError, match=r"pids must have shape \(2,\)"):
        CachedEvalLoader(torch.zeros(2, 3, 4, 3, dtype=torch.uint8), np.zeros(3), np.zeros(2), batch_size=1)
    with pytest.raises(ValueError, match="placement must be device or host"):
        build_eval_cache(JpegStore([], []), H, W, placement="disk")


@pytest.mark.gpu
def test_gpu_cache_on_device_and_pinned_host_equal_the_cpu_batches(eval_set):
    store, pids, camids = eval_set
    expected = torch.cat([b[0] for b in TorchEvalLoader(store, pids, camids, height=H, width=W, batch_size=8)])
    for placement in ("device", "host"):
        cache = build_eval_cache(store, H, W, placement=placement, device="cuda")
        assert cache.is_cuda == (placement == "device") and (placement == "device" or cache.is_pinned())
        loader = CachedEvalLoader(cache, pids, camids, batch_size=8, device="cuda", channels_last=True)
        batches = list(loader)
        assert all(b[0].is_cuda and not b[1].is_cuda for b in batches)
        got = torch.cat([b[0] for b in batches]).cpu()
        # normalize divides by device tensors, so CUDA computes the CPU's quotients exactly
        assert torch.equal(got, expected), (got - expected).abs().max()
