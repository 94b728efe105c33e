"""Decode-once cache: the vectorised augmentation equals the reference exactly; the loader keeps the contract."""
import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from alr_fast.pipelines.augment import (
    ERASE_FILL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentParams,
    augment_batch,
    draw_augment_params,
    normalize,
)
from alr_fast.pipelines.gpu_cache import (
    DecodedCacheTrainLoader,
    augment_from_cache,
    build_decoded_cache,
    cache_bytes,
    choose_train_loader_kind,
)
from alr_fast.pipelines.jpeg_store import load_jpeg_store
from alr_fast.pipelines.sampler import IdentitySampler
from alr_fast.pipelines.torch_loader import TorchTrainLoader, decode_store
from loader_helpers import assert_same_epochs, jpeg_bytes, run_epochs, write_files

H, W = 32, 16
P, K, STEPS, SEED = 3, 2, 4, 17


def constants(device="cpu"):
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    fill = torch.tensor(ERASE_FILL, dtype=torch.uint8).to(device)
    return dict(mean=mean, std=std, fill=fill)


def reference(cache_nhwc: torch.Tensor, indices: np.ndarray, params: np.ndarray, pad: int, dtype=torch.float32):
    images = cache_nhwc.cpu()[torch.from_numpy(indices)].permute(0, 3, 1, 2).contiguous()
    return normalize(augment_batch(images, AugmentParams.from_array(params), pad=pad), dtype=dtype)


@pytest.mark.parametrize(
    "height,width,pad,n",
    [(32, 16, 10, 12), (7, 5, 3, 9), (1, 1, 0, 3), (13, 29, 4, 5)],
)
@pytest.mark.parametrize("channels_last", [True, False])
def test_augment_from_cache_equals_reference_exactly(height, width, pad, n, channels_last):
    rng = np.random.default_rng([height, width, pad, channels_last])  # fresh random inputs per case
    cache = torch.from_numpy(rng.integers(1, 256, (n, height, width, 3), dtype=np.uint8))
    B = 2 * n
    indices = rng.integers(0, n, B)  # repeats and any order
    params = draw_augment_params(rng, B, height, width, pad=pad, erase_p=0.8).to_array()
    if pad:  # the extreme crops augment_batch accepts: 0 and 2 * pad
        params[0, 1:3] = 0
        params[1, 1:3] = 2 * pad
        params[1, 0] = 1
    out = augment_from_cache(
        cache, torch.from_numpy(indices), torch.from_numpy(params), pad=pad, channels_last=channels_last, **constants()
    )
    expected = reference(cache, indices, params, pad)
    assert out.shape == (B, 3, height, width) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(out, expected)
    if (params[:, 5] > 0).any():  # erasing really happened, so the comparison covered it
        b = int(np.flatnonzero(params[:, 5] > 0)[0])
        y, x = params[b, 3], params[b, 4]
        fill = normalize(torch.tensor(ERASE_FILL, dtype=torch.uint8).view(1, 3, 1, 1))
        assert torch.equal(out[b, :, y, x], fill[0, :, 0, 0])


def test_augment_from_cache_low_precision_and_bad_shapes():
    rng = np.random.default_rng(3)
    cache = torch.from_numpy(rng.integers(0, 256, (4, H, W, 3), dtype=np.uint8))
    indices = np.array([3, 0, 0, 2])
    params = draw_augment_params(rng, 4, H, W).to_array()
    for dtype in (torch.bfloat16, torch.float16):
        out = augment_from_cache(
            cache, torch.from_numpy(indices), torch.from_numpy(params), pad=10, dtype=dtype, **constants()
        )
        assert out.dtype == dtype and torch.equal(out, reference(cache, indices, params, 10, dtype))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        nchw = cache.permute(0, 3, 1, 2)
        augment_from_cache(nchw, torch.from_numpy(indices), torch.from_numpy(params), pad=10, **constants())
    with pytest.raises(ValueError, match="params"):
        augment_from_cache(cache, torch.from_numpy(indices), torch.from_numpy(params[:3]), pad=10, **constants())


def test_cache_bytes_and_choice():
    market, msmt = cache_bytes(12936, 384, 128), cache_bytes(32621, 384, 128)
    assert market == 12936 * 384 * 128 * 3 and 1.90e9 < market < 1.91e9
    assert 4.80e9 < msmt < 4.82e9
    assert choose_train_loader_kind(12936, 384, 128, 2 * 10**9) == "cache"
    assert choose_train_loader_kind(12936, 384, 128, market) == "cache"  # fits exactly
    assert choose_train_loader_kind(12936, 384, 128, market - 1) == "dali"
    assert choose_train_loader_kind(32621, 384, 128, 2 * 10**9) == "dali"
    with pytest.raises(ValueError):
        cache_bytes(-1, 384, 128)


# ----------------------------------------------------------------------------- the loader




@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """9 identities with 1..6 images of varied sizes (id 8 has one: never sampled with K=2)."""
    rng = np.random.default_rng(11)
    counts = [5, 6, 4, 3, 6, 5, 4, 6, 1]
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    camids = rng.integers(1, 7, size=len(labels))
    folder = tmp_path_factory.mktemp("cache")
    blobs = [jpeg_bytes(rng, int(rng.integers(24, 60)), int(rng.integers(12, 30))) for _ in labels]
    store, _ = load_jpeg_store(write_files(folder, blobs))
    return store, labels, camids


def make_loader(cls, dataset, **kw):
    store, labels, camids = dataset
    sampler = IdentitySampler(labels, P, K, STEPS, seed=SEED)
    return cls(store, labels, camids, sampler, height=H, width=W, seed=SEED, **kw)




def test_cache_loader_equals_torch_loader(dataset):
    cached = make_loader(DecodedCacheTrainLoader, dataset, decoder="torch")
    assert len(cached) == STEPS and cached.nbytes == cache_bytes(len(dataset[0]), H, W)
    assert cached.cache.shape == (len(dataset[0]), H, W, 3)
    assert torch.equal(cached.cache, decode_store(dataset[0], H, W).permute(0, 2, 3, 1))
    expected = run_epochs(make_loader(TorchTrainLoader, dataset), 3)
    got = run_epochs(cached, 3)
    assert_same_epochs(got, expected)
    images, labels, camids = got[0][0]
    assert images.shape == (P * K, 3, H, W) and images.is_contiguous()
    assert labels.dtype == torch.int64 and camids.dtype == torch.int64


def test_cache_loader_resume_and_state_interchange(dataset):
    expected = run_epochs(make_loader(DecodedCacheTrainLoader, dataset, decoder="torch"), 3)
    first = make_loader(TorchTrainLoader, dataset)  # a checkpoint written by the reference loader
    run_epochs(first, 1)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_loader(DecodedCacheTrainLoader, dataset, decoder="torch")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_epochs(run_epochs(resumed, 2), expected[1:])


def test_cache_loader_channels_last_bf16(dataset):
    reference_epoch = run_epochs(make_loader(DecodedCacheTrainLoader, dataset, decoder="torch"), 1)[0]
    fast_loader = make_loader(DecodedCacheTrainLoader, dataset, decoder="torch", dtype=torch.bfloat16, channels_last=True)
    fast = run_epochs(fast_loader, 1)[0]
    for (x, p, c), (y, q, d) in zip(reference_epoch, fast):
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, x.to(torch.bfloat16)) and torch.equal(p, q) and torch.equal(c, d)


def test_build_decoded_cache_rejects_unknown_decoder(dataset):
    with pytest.raises(ValueError, match="decoder"):
        build_decoded_cache(dataset[0], H, W, decoder="opencv")
    assert torch.equal(build_decoded_cache(dataset[0], H, W), build_decoded_cache(dataset[0], H, W, decoder="torch"))


def test_pipelines_import_without_dali():
    """Without DALI the package imports, the cache loader works, and the DALI names say what to install."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["nvidia.dali"] = None  # as if DALI were not installed
        import alr_fast.pipelines as p
        from alr_fast.pipelines import *  # noqa: F403
        from alr_fast.pipelines.jpeg_store import JpegStore
        assert p.build_decoded_cache(JpegStore([], []), 8, 4).shape == (0, 8, 4, 3)  # auto -> torch
        try:
            p.DaliTrainLoader
        except ImportError as err:
            print("IMPORT-ERROR:", err)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "IMPORT-ERROR:" in result.stdout and "pip install nvidia-dali-cuda130" in result.stdout


@pytest.mark.gpu
def test_cache_loader_on_cuda_matches_cpu_without_host_syncs(dataset):
    expected = run_epochs(make_loader(DecodedCacheTrainLoader, dataset, decoder="torch"), 2)
    loader = make_loader(DecodedCacheTrainLoader, dataset, decoder="torch", device="cuda", channels_last=True)
    assert loader.cache.is_cuda
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync inside the epoch raises
    try:
        got = [[batch for batch in loader] for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for epoch_a, epoch_b in zip(got, expected):
        for (x, p, c), (y, q, d) in zip(epoch_a, epoch_b):
            assert x.is_cuda and p.is_cuda and c.is_cuda
            assert x.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(x.cpu(), y) and torch.equal(p.cpu(), q) and torch.equal(c.cpu(), d)
