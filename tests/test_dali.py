"""DALI pipelines: parity with the CPU reference pipeline, the loader contract, resume, sharding, bad input.

Every test runs DALI's CPU operators (``device_id=None``); the ``gpu`` variants run the same
checks with nvJPEG and GPU operators where a GPU is present. Measured tolerances (DALI 2.4, CPU
operators): decoding is bit-exact with torchvision; the bilinear resize differs by at most one
grey level; flip, pad, crop and erase are exact on uint8; the normalisation differs by <= 1e-5.
"""
import io
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402

from alr_fast.pipelines.augment import (  # noqa: E402
    ERASE_FILL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentParams,
    augment_batch,
    decode_resize,
    decode_rgb,
    draw_augment_params,
    normalize,
)
from alr_fast.pipelines.dali import (  # noqa: E402
    GPU_DECODE_TOLERANCE,
    DaliEvalLoader,
    DaliTrainLoader,
    augment_graph,
    decode_resize_graph,
    decode_store_dali,
    normalize_graph,
)
from alr_fast.pipelines.gpu_cache import DecodedCacheTrainLoader  # noqa: E402
from alr_fast.pipelines.jpeg_store import CorruptImageError, load_jpeg_store  # noqa: E402
from alr_fast.pipelines.sampler import IdentitySampler  # noqa: E402
from alr_fast.pipelines.torch_loader import TorchEvalLoader, TorchTrainLoader, decode_store  # noqa: E402
from loader_helpers import assert_same_epochs, jpeg_bytes, run_epochs, write_files

pytestmark = pytest.mark.dali

H, W = 32, 16
P, K, STEPS, SEED = 3, 2, 4, 17
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def grey_levels(images: torch.Tensor) -> torch.Tensor:
    """Normalised images back to 0..255 grey levels (float32, not rounded)."""
    return images.float().cpu() * (255 * STD) + 255 * MEAN


def check_decode_difference(what: str, diff: torch.Tensor, max_allowed: float, mean_allowed: float = 1.0) -> None:
    """Print the figures first, then assert: GPU_DECODE_TOLERANCE is an estimate (nvJPEG / the
    hardware decoder against libjpeg-turbo), so the first GPU run must measure it, not fail blind."""
    d = diff.float().flatten()
    q = torch.quantile(d[:: max(1, d.numel() // 1_000_000)], torch.tensor([0.5, 0.99, 0.999])).tolist()
    print(f"decode difference {what}: max {d.max().item():.3f}, mean {d.mean().item():.4f}, p50 {q[0]:.3f}, "
          f"p99 {q[1]:.3f}, p99.9 {q[2]:.3f}, > 1 grey level {(d > 1).float().mean().item():.2%} "
          f"(allowed: max {max_allowed}, mean {mean_allowed})")
    assert d.max().item() <= max_allowed and d.mean().item() < mean_allowed, what






@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """9 identities with 1..6 images of varied sizes, one greyscale, one already H x W."""
    rng = np.random.default_rng(5)
    counts = [5, 6, 4, 3, 6, 5, 4, 6, 1]
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    camids = rng.integers(1, 7, size=len(labels))
    blobs = [jpeg_bytes(rng, int(rng.integers(24, 60)), int(rng.integers(12, 30))) for _ in labels]
    blobs[0] = jpeg_bytes(rng, H, W)
    blobs[1] = jpeg_bytes(rng, 50, 20, mode="L")
    store, kept = load_jpeg_store(write_files(tmp_path_factory.mktemp("dali"), blobs))
    assert len(kept) == len(labels)
    return store, labels, camids


def make_train(cls, dataset, **kw):
    store, labels, camids = dataset
    sampler = IdentitySampler(labels, P, K, STEPS, seed=SEED)
    return cls(store, labels, camids, sampler, height=H, width=W, seed=SEED, **kw)




def assert_within_one_grey_level(got: torch.Tensor, expected: torch.Tensor, atol: float = 1.0) -> None:
    diff = (grey_levels(got) - grey_levels(expected)).abs()
    assert diff.max().item() <= atol + 1e-3, f"max difference {diff.max().item():.3f} grey levels"
    assert (diff > 0.5).float().mean().item() < 0.1  # most pixels agree exactly


# ----------------------------------------------------------------------------- graph functions


def run_graph(graph, samples, batch_size, n_outputs, *, device_id=None):
    """Run ``graph(*inputs)`` over per-sample tuples of numpy arrays; its outputs as CPU torch tensors."""

    def source(info):
        if info.idx_in_epoch >= len(samples):
            raise StopIteration
        return samples[info.idx_in_epoch]

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=device_id, exec_dynamic=True)
    def shell():
        return graph(*fn.external_source(source=source, num_outputs=len(samples[0]), batch=False))

    names = [f"out{i}" for i in range(n_outputs)]
    batches = [[batch[0][k].cpu() for k in names] for batch in DALIGenericIterator(shell(), names)]
    return [torch.cat(parts) for parts in zip(*batches)]


GRAPH_DEVICES = [None, pytest.param(0, marks=pytest.mark.gpu, id="gpu")]


def on_device(node, device_id):
    return node if device_id is None else node.gpu()


@pytest.mark.parametrize("device_id", GRAPH_DEVICES)
def test_augment_graph_applies_params_exactly(device_id):
    """Given the same uint8 images, DALI's flip/pad/crop/erase equals augment_batch bit for bit."""
    rng = np.random.default_rng(21)
    n, pad = 24, 10
    images = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    params = draw_augment_params(rng, n, H, W, pad=pad, erase_p=0.7).to_array()
    params[0, 1:3], params[1, 1:3] = 0, 2 * pad  # the extreme crops

    def graph(x, p):
        aug = augment_graph(on_device(x, device_id), p, height=H, width=W, pad=pad)
        return (
            aug,
            normalize_graph(aug, dtype=types.FLOAT, channels_last=True),
            normalize_graph(aug, dtype=types.FLOAT, channels_last=False),
            normalize_graph(aug, dtype=types.FLOAT16, channels_last=True),
        )

    aug, hwc, chw, half = run_graph(graph, [(images[i], params[i]) for i in range(n)], 8, 4, device_id=device_id)
    expected = augment_batch(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), AugmentParams.from_array(params))
    assert torch.equal(aug.permute(0, 3, 1, 2), expected)
    reference = normalize(expected)
    torch.testing.assert_close(hwc.permute(0, 3, 1, 2), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(chw, reference, atol=1e-5, rtol=0)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.permute(0, 3, 1, 2).float(), reference, atol=2e-3, rtol=1e-3)


def coordinate_images(n: int, height: int, width: int) -> np.ndarray:
    """R = 5*row + 3, G = 8*col + 5, B = 250: every pixel names its position, none is black or ERASE_FILL."""
    rows = np.broadcast_to(np.arange(height)[:, None], (height, width))
    cols = np.broadcast_to(np.arange(width)[None, :], (height, width))
    image = np.stack([5 * rows + 3, 8 * cols + 5, np.full_like(rows, 250)], axis=-1).astype(np.uint8)
    return np.broadcast_to(image, (n, height, width, 3)).copy()


def recover_params(out: np.ndarray, height: int, width: int, pad: int) -> list[int]:
    """[flip, crop_y, crop_x, erase_y, erase_x, erase_h, erase_w] read back from one augmented image."""
    erased = np.all(out == ERASE_FILL, axis=-1)
    if erased.any():
        ys, xs = np.nonzero(erased)
        ey, ex, eh, ew = ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert erased.sum() == eh * ew, "the erased pixels do not form one rectangle"
    else:
        ey = ex = eh = ew = 0
    visible = (out[..., 2] == 250) & ~erased
    i, j = np.nonzero(visible)
    src_row, src_col = (out[i, j, 0].astype(int) - 3) // 5, (out[i, j, 1].astype(int) - 5) // 8
    crop_y = set((src_row - i + pad).tolist())
    assert len(crop_y) == 1, "rows do not come from one crop offset"
    candidates = []
    for flip in (0, 1):
        cols = src_col if not flip else width - 1 - src_col
        crop_x = set((cols - j + pad).tolist())
        if len(crop_x) == 1:
            candidates.append([flip, next(iter(crop_y)), crop_x.pop()])
    assert len(candidates) == 1, f"flip is ambiguous or inconsistent: {candidates}"
    # everything else is zero padding
    assert np.all(out[~visible & ~erased] == 0)
    return candidates[0] + [ey, ex, eh, ew]


@pytest.mark.parametrize("device_id", GRAPH_DEVICES)
def test_augment_graph_recovered_params_and_their_statistics(device_id):
    """Read flip, crop and erase back from DALI's output: they are the drawn ones, with the expected statistics."""
    n, height, width, pad = 256, 40, 24, 10
    rng = np.random.default_rng(8)
    params = draw_augment_params(rng, n, height, width, pad=pad).to_array()
    images = coordinate_images(n, height, width)
    (aug,) = run_graph(
        lambda x, p: (augment_graph(on_device(x, device_id), p, height=height, width=width, pad=pad),),
        [(images[i], params[i]) for i in range(n)],
        8,
        1,
        device_id=device_id,
    )
    recovered = np.array([recover_params(aug[b].numpy(), height, width, pad) for b in range(n)])
    assert np.array_equal(recovered, params)
    flip, crop, erase_h, erase_w = recovered[:, 0], recovered[:, 1:3], recovered[:, 5], recovered[:, 6]
    sigma = 0.5 / np.sqrt(n)
    assert abs(flip.mean() - 0.5) < 4 * sigma
    erased = erase_h > 0
    assert abs(erased.mean() - 0.5) < 4 * sigma
    assert crop.min() == 0 and crop.max() == 2 * pad - 1 and len(np.unique(crop)) == 2 * pad
    area = erase_h[erased] * erase_w[erased] / (height * width)
    aspect = erase_h[erased] / erase_w[erased]
    # U(0.02, 0.4) of the area and U(0.3, 3.33) of the aspect, before rounding h and w
    assert 0.01 < area.min() and area.max() < 0.45 and 0.15 < area.mean() < 0.26
    assert 0.2 < aspect.min() and aspect.max() < 4.5


def test_decode_and_resize_against_reference(dataset):
    """The decoder is bit-exact with torchvision; the resize is within one grey level."""
    store = dataset[0]
    samples = [(np.frombuffer(d, dtype=np.uint8),) for d in store.data]

    def graph(jpegs):
        decoded = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        resized = decode_resize_graph(jpegs, decoder_device="cpu", height=3 * H, width=2 * W)
        return resized, fn.pad(decoded, axes=[0, 1], shape=[64, 32])

    resized, decoded = run_graph(graph, samples, 8, 2)
    for i, data in enumerate(store.data):
        ref = decode_rgb(data)
        h, w = ref.shape[1:]
        assert torch.equal(decoded[i, :h, :w].permute(2, 0, 1), ref)
    reference = torch.stack([decode_resize(d, 3 * H, 2 * W) for d in store.data])
    diff = (resized.permute(0, 3, 1, 2).int() - reference.int()).abs()
    assert diff.max().item() == 1  # measured: never more, and not bit-exact
    assert (diff > 0).float().mean().item() < 0.05
    same_size = decode_store_dali(store, H, W)[0].permute(2, 0, 1)
    assert torch.equal(same_size, decode_rgb(store.data[0]))  # H x W already: untouched


# ----------------------------------------------------------------------------- training loader


def test_train_loader_follows_sampler_and_params(dataset):
    """Same indices, labels and parameters as the reference loader; images within one grey level."""
    loader = make_train(DaliTrainLoader, dataset, num_threads=2)
    assert len(loader) == STEPS
    got = run_epochs(loader, 2)
    expected = run_epochs(make_train(TorchTrainLoader, dataset), 2)
    for epoch_got, epoch_expected in zip(got, expected):
        assert len(epoch_got) == STEPS
        for (x, p, c), (y, q, d) in zip(epoch_got, epoch_expected):
            assert x.shape == (P * K, 3, H, W) and x.dtype == torch.float32 and x.is_contiguous()
            assert p.dtype == torch.int64 and c.dtype == torch.int64
            assert torch.equal(p, q) and torch.equal(c, d)
            assert_within_one_grey_level(x, y)


def test_train_loader_applies_erase_and_padding_exactly(dataset):
    """Erased rectangles hold ERASE_FILL and pad borders hold 0 exactly where the drawn parameters put them."""
    store, labels, _ = dataset
    loader = make_train(DaliTrainLoader, dataset, erase_p=0.9)
    sampler = IdentitySampler(labels, P, K, STEPS, seed=SEED)
    rng = np.random.default_rng([SEED, 0, 1])
    images = torch.cat([b[0] for b in loader])
    params = AugmentParams.from_array(draw_augment_params(rng, len(sampler.next_epoch()), H, W, erase_p=0.9).to_array())
    levels = grey_levels(images).round()
    fill = torch.tensor(ERASE_FILL, dtype=torch.float32).view(3, 1, 1)
    n_erased = 0
    for b in range(len(images)):
        y, x, h, w = (int(v[b]) for v in (params.erase_y, params.erase_x, params.erase_h, params.erase_w))
        if h:
            n_erased += 1
            assert torch.equal(levels[b, :, y : y + h, x : x + w], fill.expand(3, h, w))
        inside = torch.zeros(H, W, dtype=torch.bool)
        inside[y : y + h, x : x + w] = True
        top, left = 10 - int(params.crop_y[b]), 10 - int(params.crop_x[b])
        border = torch.zeros(H, W, dtype=torch.bool)
        border[: max(top, 0)] = True
        border[H + min(top, 0) :] = True
        cols = torch.zeros(W, dtype=torch.bool)
        cols[: max(left, 0)] = True
        cols[W + min(left, 0) :] = True
        border |= cols  # output coordinates: padding and crop come after the flip
        assert torch.all(levels[b][:, border & ~inside] == 0)
    assert n_erased > len(images) // 2


def test_train_loader_resume_abandon_and_state_interchange(dataset):
    expected = run_epochs(make_train(DaliTrainLoader, dataset), 3)
    # resume from a state saved after epoch 1
    first = make_train(DaliTrainLoader, dataset)
    assert_same_epochs(run_epochs(first, 1), expected[:1])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_train(DaliTrainLoader, dataset)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_epochs(run_epochs(resumed, 2), expected[1:])
    # an epoch left after one batch still counts, as in TorchTrainLoader
    abandoned = make_train(DaliTrainLoader, dataset)
    next(iter(abandoned))
    assert_same_epochs(run_epochs(abandoned, 2), expected[1:])
    # a checkpoint of the reference loader continues on DALI with the same batches
    reference = make_train(TorchTrainLoader, dataset)
    torch_epochs = run_epochs(reference, 2)
    from_torch = make_train(DaliTrainLoader, dataset)
    ref_state = make_train(TorchTrainLoader, dataset)
    run_epochs(ref_state, 1)
    from_torch.load_state_dict(ref_state.state_dict())
    (epoch,) = run_epochs(from_torch, 1)
    for (x, p, c), (y, q, d) in zip(epoch, torch_epochs[1]):
        assert torch.equal(p, q) and torch.equal(c, d)
        assert_within_one_grey_level(x, y)


def test_parallel_source_matches_main_thread(dataset):
    expected = run_epochs(make_train(DaliTrainLoader, dataset, num_workers=0), 2)
    assert_same_epochs(run_epochs(make_train(DaliTrainLoader, dataset, num_workers=2), 2), expected)


def test_train_loader_runs_ahead_of_the_trainer(dataset, monkeypatch):
    """When the first batch reaches the trainer, DALI already holds the inputs of the next
    ``prefetch_queue_depth`` batches (the external source runs in the main thread, so it can be counted)."""
    from alr_fast.pipelines import dali

    requested = []
    call = dali._TrainSource.__call__

    def counting(self, info):
        requested.append(info.idx_in_epoch)
        return call(self, info)

    monkeypatch.setattr(dali._TrainSource, "__call__", counting)
    for depth in (1, 3):
        requested.clear()
        batches = iter(make_train(DaliTrainLoader, dataset, prefetch_queue_depth=depth))
        next(batches)
        assert len(requested) >= (depth + 1) * P * K  # batch 0 and the ``depth`` batches behind it
        assert sorted(requested) == list(range(len(requested)))  # in order, none twice


def test_train_loader_streams_per_rank(dataset):
    """Each rank draws its own indices and parameters (seed, rank), the same ones as the reference loader."""
    store, labels, camids = dataset

    def first_epoch(cls, rank):
        sampler = IdentitySampler(labels, P, K, STEPS, seed=SEED, rank=rank)
        return run_epochs(cls(store, labels, camids, sampler, height=H, width=W, seed=SEED, rank=rank), 1)[0]

    rank0, rank1 = first_epoch(DaliTrainLoader, 0), first_epoch(DaliTrainLoader, 1)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(rank0, rank1))  # other identities
    for (x, p, c), (y, q, d) in zip(rank1, first_epoch(TorchTrainLoader, 1)):
        assert torch.equal(p, q) and torch.equal(c, d)
        assert_within_one_grey_level(x, y)


def test_train_loader_channels_last_and_low_precision(dataset):
    (reference,) = run_epochs(make_train(DaliTrainLoader, dataset), 1)
    for dtype in (torch.float16, torch.bfloat16):
        (fast,) = run_epochs(make_train(DaliTrainLoader, dataset, dtype=dtype, channels_last=True), 1)
        for (x, p, _), (y, q, _) in zip(reference, fast):
            assert y.dtype == dtype and y.shape == x.shape
            assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
            torch.testing.assert_close(y.float(), x, atol=0.02, rtol=0.01)
            assert torch.equal(p, q)


def test_train_loader_rejects_bad_arguments(dataset):
    store, labels, camids = dataset
    sampler = IdentitySampler(labels, P, K, STEPS, seed=SEED)
    with pytest.raises(ValueError, match="camids"):
        DaliTrainLoader(store, labels, camids[:-1], sampler, height=H, width=W, seed=0)
    with pytest.raises(ValueError, match="sampler indexes"):
        DaliTrainLoader(store, labels, camids, IdentitySampler(labels[:-1], P, K, STEPS, seed=0), height=H, width=W, seed=0)
    with pytest.raises(ValueError, match="device_id"):
        DaliTrainLoader(store, labels, camids, sampler, height=H, width=W, seed=0, device_id=0)
    with pytest.raises(ValueError, match="dtype"):
        DaliTrainLoader(store, labels, camids, sampler, height=H, width=W, seed=0, dtype=torch.float64)


# ----------------------------------------------------------------------------- evaluation loader


def test_eval_loader_order_shards_and_last_batch(dataset):
    store, labels, camids = dataset
    pids = labels * 10 + 3
    n = len(store)
    full = DaliEvalLoader(store, pids, camids, height=H, width=W, batch_size=8, num_threads=2)
    batches = list(full)
    assert len(full) == len(batches) == -(-n // 8)
    assert [len(b[0]) for b in batches] == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    images = torch.cat([b[0] for b in batches])
    assert torch.cat([b[1] for b in batches]).tolist() == pids.tolist()
    assert torch.cat([b[2] for b in batches]).tolist() == camids.tolist()
    expected = torch.cat([b[0] for b in TorchEvalLoader(store, pids, camids, height=H, width=W, batch_size=16)])
    assert_within_one_grey_level(images, expected)
    assert torch.equal(torch.cat([b[0] for b in full]), images)  # a second pass reuses the pipeline
    shards = [
        DaliEvalLoader(store, pids, camids, height=H, width=W, batch_size=8, shard_id=r, num_shards=3) for r in range(3)
    ]
    parts = [list(s) for s in shards]
    assert [sum(len(b[0]) for b in part) for part in parts] == [n * (r + 1) // 3 - n * r // 3 for r in range(3)]
    assert torch.equal(torch.cat([b[0] for part in parts for b in part]), images)
    assert torch.cat([b[1] for part in parts for b in part]).tolist() == pids.tolist()
    tiny = DaliEvalLoader(store, pids, camids, height=H, width=W, batch_size=8, shard_id=0, num_shards=n + 1)
    assert len(tiny) == 0 and list(tiny) == []
    half = DaliEvalLoader(store, pids, camids, height=H, width=W, batch_size=8, channels_last=True, dtype=torch.float16)
    out = torch.cat([b[0] for b in half])
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), images, atol=0.02, rtol=0.01)
    with pytest.raises(ValueError, match="shard_id"):
        DaliEvalLoader(store, pids, camids, height=H, width=W, batch_size=8, shard_id=3, num_shards=3)


# ----------------------------------------------------------------------------- bad input


def test_corrupt_files_found_at_load_and_skipped(tmp_path, dataset):
    rng = np.random.default_rng(2)
    good = [jpeg_bytes(rng, 40, 20) for _ in range(8)]
    truncated = good[0][: len(good[0]) // 2]
    garbage = rng.integers(0, 256, 600, dtype=np.uint8).tobytes()
    paths = write_files(tmp_path, good[:3] + [truncated] + good[3:6] + [garbage] + good[6:])
    with pytest.raises(CorruptImageError) as info:
        load_jpeg_store(paths)
    assert paths[3] in str(info.value) and paths[7] in str(info.value) and paths[0] not in str(info.value)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", UserWarning)
        store, kept = load_jpeg_store(paths, skip_corrupt=True)
    assert any(paths[3] in str(w.message) and paths[7] in str(w.message) for w in record)
    assert kept.tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    sampler = IdentitySampler(labels, 2, 2, 2, seed=0)
    loader = DaliTrainLoader(store, labels, labels, sampler, height=H, width=W, seed=0)
    assert [b[0].shape[0] for b in loader] == [4, 4]
    # a store that skipped verification: DALI's own decoder failure names the file
    unchecked, _ = load_jpeg_store(paths, verify=False)
    with pytest.raises(CorruptImageError, match="garbage|not a JPEG") as info:
        decode_store_dali(unchecked, H, W, batch_size=4)
    assert paths[7] in str(info.value)


def test_decode_store_dali_and_cache_loader(dataset):
    store = dataset[0]
    cache = decode_store_dali(store, H, W, batch_size=8)
    assert cache.shape == (len(store), H, W, 3) and cache.dtype == torch.uint8
    diff = (cache.permute(0, 3, 1, 2).int() - decode_store(store, H, W).int()).abs()
    assert diff.max().item() <= 1
    loader = make_train(DecodedCacheTrainLoader, dataset, decoder="dali")
    assert torch.equal(loader.cache, cache)
    for (x, p, c), (y, q, d) in zip(run_epochs(loader, 1)[0], run_epochs(make_train(TorchTrainLoader, dataset), 1)[0]):
        assert torch.equal(p, q) and torch.equal(c, d)
        assert_within_one_grey_level(x, y)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_train_loader_matches_cpu_mode(dataset, dtype):
    """nvJPEG + GPU operators vs the CPU operators, in each trainer dtype: fp16 leaves DALI as
    fp16 (erase ran on uint8 before), bf16 is cast by torch; both keep channels_last strides."""
    cpu = run_epochs(make_train(DaliTrainLoader, dataset), 2)
    gpu_loader = make_train(DaliTrainLoader, dataset, device="cuda:0", device_id=0, channels_last=True, dtype=dtype)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the batches must be ready on the stream current when they are made
        gpu = [[tuple(t.clone() for t in b) for b in gpu_loader] for _ in range(2)]
    stream.synchronize()
    rounding = 0.0 if dtype == torch.float32 else 1.0  # grey levels lost to a 16-bit float (bf16: <= ~0.6)
    for epoch_cpu, epoch_gpu in zip(cpu, gpu):
        for (x, p, c), (y, q, d) in zip(epoch_cpu, epoch_gpu):
            assert y.is_cuda and q.is_cuda and d.is_cuda and y.dtype == dtype and y.shape == x.shape
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(p, q.cpu()) and torch.equal(c, d.cpu())
            check_decode_difference(f"train loader {dtype}", (grey_levels(x) - grey_levels(y)).abs(),
                                    GPU_DECODE_TOLERANCE + rounding)


@pytest.mark.gpu
def test_gpu_parallel_source_spawn_matches(dataset):
    kw = dict(device="cuda:0", device_id=0)
    expected = run_epochs(make_train(DaliTrainLoader, dataset, num_workers=0, **kw), 1)
    (got,) = run_epochs(make_train(DaliTrainLoader, dataset, num_workers=2, **kw), 1)  # spawned workers
    for (x, p, c), (y, q, d) in zip(got, expected[0]):
        assert torch.equal(p, q) and torch.equal(c, d)
        check_decode_difference("parallel source", (grey_levels(x) - grey_levels(y)).abs(), GPU_DECODE_TOLERANCE)


@pytest.mark.gpu
def test_gpu_eval_loader_and_cache(dataset):
    store, labels, camids = dataset
    cpu = torch.cat([b[0] for b in DaliEvalLoader(store, labels, camids, height=H, width=W, batch_size=8)])
    loader = DaliEvalLoader(store, labels, camids, height=H, width=W, batch_size=8, device="cuda", device_id=0)
    batches = list(loader)
    assert all(b[0].is_cuda and not b[1].is_cuda for b in batches)  # labels stay on the host
    diff = (grey_levels(torch.cat([b[0] for b in batches])) - grey_levels(cpu)).abs()
    check_decode_difference("eval loader", diff, GPU_DECODE_TOLERANCE)
    cache = decode_store_dali(store, H, W, device_id=0)
    assert cache.is_cuda
    diff = (cache.cpu().int() - decode_store_dali(store, H, W).int()).abs()
    check_decode_difference("decode-once cache, GPU vs CPU operators", diff, GPU_DECODE_TOLERANCE)
    cached = make_train(DecodedCacheTrainLoader, dataset, device="cuda", decoder="dali")
    assert cached.cache.is_cuda
    check_decode_difference("cache loader vs decode_store_dali", (cached.cache.int() - cache.int()).abs(),
                            GPU_DECODE_TOLERANCE)
