"""JPEG store verification and the torch reference loaders."""
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from alr_fast.pipelines.augment import AugmentParams, augment_batch, decode_resize, draw_augment_params, normalize
from alr_fast.pipelines.jpeg_store import CorruptImageError, JpegStore, load_jpeg_store
from alr_fast.pipelines.sampler import IdentitySampler
from alr_fast.pipelines.torch_loader import TorchEvalLoader, TorchTrainLoader, decode_store
from loader_helpers import assert_same_epochs, jpeg_bytes, run_epochs, write_files

H, W = 32, 16






# ----------------------------------------------------------------------------- JPEG store


@pytest.fixture
def mixed_files(tmp_path):
    """Five good JPEGs and four bad files; returns (paths, indices of the bad ones)."""
    rng = np.random.default_rng(0)
    good = [jpeg_bytes(rng, 40, 20) for _ in range(5)]
    truncated = good[0][: len(good[0]) // 2]
    # garbage over the tables between the header and the scan (damage inside the entropy-coded
    # scan is only a libjpeg warning and cannot be detected by decoding)
    broken_header = bytearray(good[1])
    scan = good[1].find(b"\xff\xda")
    broken_header[20:scan] = rng.integers(0, 256, scan - 20, dtype=np.uint8).tobytes()
    random_bytes = rng.integers(0, 256, 700, dtype=np.uint8).tobytes()
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(png, format="PNG")
    blobs = [good[0], truncated, good[1], bytes(broken_header), good[2], random_bytes, png.getvalue(), good[3], good[4]]
    return write_files(tmp_path, blobs), [1, 3, 5, 6]


def test_store_raises_naming_every_corrupt_file(mixed_files):
    paths, bad = mixed_files
    with pytest.raises(CorruptImageError) as info:
        load_jpeg_store(paths, num_threads=2)
    message = str(info.value)
    assert "4 of 9" in message
    for i, path in enumerate(paths):
        assert (path in message) == (i in bad), path
    assert "truncated" in message and "no SOI marker" in message and "decode failed" in message


def test_store_skip_corrupt_warns_and_drops(mixed_files):
    paths, bad = mixed_files
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", UserWarning)
        store, kept = load_jpeg_store(paths, skip_corrupt=True, progress=True)
    messages = [str(w.message) for w in record if w.category is UserWarning]
    assert len(messages) == 1 and messages[0].startswith("skipping 4 of 9 corrupt image files")
    assert all(paths[i] in messages[0] for i in bad)
    good = [i for i in range(len(paths)) if i not in bad]
    assert kept.dtype == np.int64 and kept.tolist() == good
    assert store.paths == [paths[i] for i in good]
    assert store.data == [open(paths[i], "rb").read() for i in good]
    assert len(store) == 5 and store.nbytes == sum(len(d) for d in store.data)


def test_store_without_verify_keeps_everything(mixed_files):
    paths, _ = mixed_files
    store, kept = load_jpeg_store(paths, verify=False)
    assert len(store) == len(paths) and kept.tolist() == list(range(len(paths)))


def test_store_accepts_trailing_padding_and_rejects_missing(tmp_path):
    padded = jpeg_bytes(np.random.default_rng(1), 16, 8) + b"\0" * 7
    paths = write_files(tmp_path, [padded])
    store, _ = load_jpeg_store(paths)
    assert store.data == [padded]
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(OSError, match="nope.jpg"):
        load_jpeg_store(paths + [missing])
    with pytest.raises(ValueError):
        JpegStore(["a"], [])


# ----------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """9 identities with 3..6 images each, id 8 with one (too few for K=2); varied image sizes."""
    rng = np.random.default_rng(5)
    counts = [5, 6, 4, 3, 6, 5, 4, 6, 1]
    labels = np.repeat(np.arange(len(counts)), counts)
    order = rng.permutation(len(labels))
    labels = labels[order]
    camids = rng.integers(1, 7, size=len(labels))
    blobs = [jpeg_bytes(rng, int(rng.integers(24, 60)), int(rng.integers(12, 30))) for _ in labels]
    paths = write_files(tmp_path_factory.mktemp("reid"), blobs)
    store, kept = load_jpeg_store(paths)
    assert len(kept) == len(paths)
    return store, labels, camids


P, K, STEPS, SEED = 3, 2, 4, 17


def make_train_loader(dataset, **kw):
    store, labels, camids = dataset
    sampler = IdentitySampler(labels, P, K, STEPS, seed=SEED)
    return TorchTrainLoader(store, labels, camids, sampler, height=H, width=W, seed=SEED, **kw)




def test_train_loader_batches_follow_sampler_and_params(dataset):
    store, labels, camids = dataset
    loader = make_train_loader(dataset)
    assert len(loader) == STEPS
    epochs = run_epochs(loader, 2)

    sampler = IdentitySampler(labels, P, K, STEPS, seed=SEED)
    rng = np.random.default_rng([SEED, 0, 1])
    cache = decode_store(store, H, W)
    for epoch in epochs:
        indices = sampler.next_epoch()
        params = draw_augment_params(rng, len(indices), H, W).to_array()
        assert len(epoch) == STEPS
        for b, (images, pids, cams) in enumerate(epoch):
            idx = indices[b * P * K : (b + 1) * P * K]
            assert images.shape == (P * K, 3, H, W) and images.dtype == torch.float32
            assert pids.dtype == torch.int64 and cams.dtype == torch.int64
            assert pids.tolist() == labels[idx].tolist() and cams.tolist() == camids[idx].tolist()
            rows = AugmentParams.from_array(params[b * P * K : (b + 1) * P * K])
            assert torch.equal(images, normalize(augment_batch(cache[idx], rows)))
    all_pids = torch.cat([pids for epoch in epochs for _, pids, _ in epoch])
    assert 8 not in all_pids.tolist() and len(set(all_pids.tolist())) == 8


def test_train_loader_same_output_for_any_worker_count_and_cache(dataset):
    expected = run_epochs(make_train_loader(dataset), 2)
    assert_same_epochs(run_epochs(make_train_loader(dataset, num_workers=2), 2), expected)
    assert_same_epochs(run_epochs(make_train_loader(dataset, decoded_cache=False, num_workers=1), 2), expected)


def test_train_loader_resume_from_state_dict(dataset):
    expected = run_epochs(make_train_loader(dataset), 3)
    first = make_train_loader(dataset)
    assert_same_epochs(run_epochs(first, 1), expected[:1])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_train_loader(dataset)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_epochs(run_epochs(resumed, 2), expected[1:])


def test_train_loader_channels_last_bf16(dataset):
    reference = run_epochs(make_train_loader(dataset), 1)[0]
    fast = run_epochs(make_train_loader(dataset, dtype=torch.bfloat16, channels_last=True), 1)[0]
    for (x, _, _), (y, _, _) in zip(reference, fast):
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y.float(), x, atol=0.02, rtol=0.01)


def test_train_loader_rejects_mismatched_inputs(dataset):
    store, labels, camids = dataset
    sampler = IdentitySampler(labels, P, K, STEPS, seed=SEED)
    with pytest.raises(ValueError, match="camids"):
        TorchTrainLoader(store, labels, camids[:-1], sampler, height=H, width=W, seed=0)
    other = IdentitySampler(labels[:-1], P, K, STEPS, seed=SEED)
    with pytest.raises(ValueError, match="sampler indexes"):
        TorchTrainLoader(store, labels, camids, other, height=H, width=W, seed=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_loader_order_and_last_batch(dataset, num_workers):
    store, labels, camids = dataset
    pids = labels * 10 + 3  # any raw pids
    loader = TorchEvalLoader(store, pids, camids, height=H, width=W, batch_size=16, num_workers=num_workers)
    batches = list(loader)
    n = len(store)
    assert len(loader) == len(batches) == -(-n // 16)
    assert [len(b[0]) for b in batches] == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    images = torch.cat([b[0] for b in batches])
    assert torch.cat([b[1] for b in batches]).tolist() == pids.tolist()
    assert torch.cat([b[2] for b in batches]).tolist() == camids.tolist()
    expected = normalize(torch.stack([decode_resize(d, H, W) for d in store.data]))
    assert torch.equal(images, expected)


@pytest.mark.gpu
def test_loaders_on_cuda_match_cpu(dataset):
    store, labels, camids = dataset
    cpu = run_epochs(make_train_loader(dataset), 1)[0]
    gpu = run_epochs(make_train_loader(dataset, device="cuda", num_workers=1), 1)[0]
    # decoding on the CPU and normalize dividing by device tensors (true IEEE divisions on both
    # devices): the GPU batches are the CPU's bit for bit; the largest difference is printed first
    for (x, p, c), (y, q, d) in zip(cpu, gpu):
        assert y.is_cuda and q.is_cuda and d.is_cuda
        print(f"train batch: max |gpu - cpu| {(y.cpu() - x).abs().max().item():.3g}")
        assert torch.equal(y.cpu(), x)
        assert torch.equal(q.cpu(), p) and torch.equal(d.cpu(), c)
    loader = TorchEvalLoader(store, labels, camids, height=H, width=W, batch_size=8, device="cuda")
    images = torch.cat([b[0] for b in loader]).cpu()
    expected = normalize(torch.stack([decode_resize(d, H, W) for d in store.data]))
    print(f"eval images: max |gpu - cpu| {(images - expected).abs().max().item():.3g}")
    assert torch.equal(images, expected)
