"""NVIDIA DALI loaders: the training and evaluation pipelines behind the loader contract.

Design note
-----------
What it computes. Training: encoded JPEG bytes (held in host memory) -> ``fn.decoders.image``
(``"mixed"``: nvJPEG on the GPU; ``"cpu"``: libjpeg-turbo) -> bilinear resize to H x W without
antialiasing -> per-sample horizontal flip -> zero pad ``pad`` px and crop H x W (one
``fn.slice`` whose window may leave the image, filled with 0) -> ``fn.erase`` with
``ERASE_FILL`` on uint8, before normalisation -> for the keras style RGB -> BGR
(``fn.color_space_conversion``, a channel swap on uint8) -> ``fn.crop_mirror_normalize``
computing ``(x - pixel_mean) / pixel_std`` of the ``InputStyle`` in float32 (torchvision:
``(x - 255 mean) / (255 std)``; keras: ``x - (103.939, 116.779, 123.68)`` on BGR) and writing
the trainer's dtype. Evaluation: decode,
resize, normalise (the evaluator flips the tensor itself). The per-sample parameters are not
drawn by DALI: the identity sampler and ``draw_augment_params`` draw them on the CPU exactly as
the reference loader does (same streams, same order), and they enter the graph as an int32
``[7]`` row per sample (``AugmentParams.to_array``).

Layout. DALI works in HWC. The normalisation writes HWC (``channels_last=True``), which torch
sees, after a permute and without a copy, as NCHW ``[B, 3, H, W]`` in channels_last memory
format; with ``channels_last=False`` it writes CHW directly (contiguous NCHW).

Tolerance against the CPU reference (``normalize(augment_batch(decode_resize(...)))``), measured
with DALI 2.4 CPU operators on JPEGs of 30..400 px (4:2:0, 4:4:4 and greyscale): the CPU JPEG
decoder is bit-exact with torchvision's; the resize differs by at most 1 grey level (about 3% of
pixels when upscaling 128x64 -> 384x128: ties rounded differently); flip, pad, crop and erase are
exact on uint8; the normalisation differs by at most ~5e-7 (float32 rounding). So after
normalisation: |DALI - reference| <= 1 / min(pixel_std) + 1e-5 = 0.0175 for the torchvision style
and 1 + 1e-4 for the keras style (no scaling: one grey level is 1). The GPU decoder
(nvJPEG / the hardware decoder) is not libjpeg-turbo and differs by a few grey levels; the GPU
tests allow ``GPU_DECODE_TOLERANCE`` (unmeasured here, see tests/test_dali.py).

Randomness and resume. The external source is a per-sample callable (``_TrainSource``) that holds
a copy of the sampler and of the augmentation generator taken when the pipeline was built, and
replays them epoch by epoch (DALI's ``epoch_idx``), so it is stateless in DALI's sense and can
run in parallel worker processes. The loader advances its own sampler and generator by one epoch
in ``__iter__``, so ``state_dict`` has the same format and meaning as ``TorchTrainLoader``'s;
``load_state_dict``, or an epoch abandoned before its end, rebuilds the pipeline from the new
state.

Source modes. With ``num_workers=0`` the callable runs in the main thread: it only slices bytes
that are already in memory (microseconds per sample). ``num_workers > 0`` uses DALI's parallel
external source (worker processes, ``fork`` while no CUDA context exists, else ``spawn``); it pays
when the main thread is busy (a Python-heavy training step), see ``bench/pipeline.py``.

Device use and ordering. With ``device_id=None`` every operator runs on the CPU (CI without a
GPU). With ``device_id=k`` the decoder is ``"mixed"`` and the rest runs on GPU k, the per-sample
parameters staying CPU argument inputs (tests/test_dali_gpu_graph.py checks this placement without a
GPU; ``fn.erase`` works on the uint8 image, as its GPU kernel has no float16); the outputs are
handed to torch through DLPack inside ``DALIGenericIterator.__next__``, which makes the stream
that is current at that moment (the trainer's) wait for DALI's work: a batch is valid on the
stream current when it was produced. DALI runs ``prefetch_queue_depth`` batches ahead in its own
threads, so the step does not wait for decoding.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Iterator

import numpy as np
import torch

try:
    from nvidia.dali import backend as _dali_backend
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by tests/test_gpu_cache.py
    raise ImportError(
        "the DALI loaders need NVIDIA DALI, which is not installed: pip install nvidia-dali-cuda130 "
        "(or pip install 'alr-fast[dali]')"
    ) from exc

from .augment import ERASE_FILL, TORCHVISION_STYLE, InputStyle
from .jpeg_store import CorruptImageError, JpegStore, find_jpeg_problem
from .sampler import IdentitySampler
from .stream import TrainStream
from .torch_loader import _int64_column

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Allowed |DALI GPU - reference| in grey levels (before normalisation) for the nvJPEG decoder;
# an estimate (IDCT and chroma upsampling differ from libjpeg-turbo), not measured on this project.
GPU_DECODE_TOLERANCE = 8
_DALI_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}


# ----------------------------------------------------------------------------- graph functions


def decode_resize_graph(jpegs, *, decoder_device: str, height: int, width: int):
    """Encoded JPEGs -> uint8 RGB HWC ``[height, width, 3]``; bilinear, half-pixel centres, no antialiasing."""
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
    return fn.resize(
        images, resize_x=width, resize_y=height, interp_type=types.INTERP_LINEAR, antialias=False
    )


def augment_graph(images, params, *, height: int, width: int, pad: int):
    """Flip, zero pad ``pad`` px + crop H x W, erase; uint8 HWC in and out.

    params: int32 ``[7]`` per sample, the columns of ``AugmentParams.to_array`` (flip, crop_y,
    crop_x, erase_y, erase_x, erase_h, erase_w); must be a CPU node.
    """
    images = fn.flip(images, horizontal=params[0])
    # padding then cropping at (cy, cx) is one slice starting at (cy - pad, cx - pad) of the
    # unpadded image, with the part outside the image filled with 0
    start = fn.stack(params[1] - pad, params[2] - pad)
    images = fn.slice(
        images, start=start, shape=[height, width], axis_names="HW", out_of_bounds_policy="pad", fill_values=0
    )
    anchor = fn.cast(fn.stack(params[3], params[4]), dtype=types.FLOAT)
    shape = fn.cast(fn.stack(params[5], params[6]), dtype=types.FLOAT)  # 0 x 0: nothing erased
    return fn.erase(images, anchor=anchor, shape=shape, axis_names="HW", fill_value=list(ERASE_FILL))


def normalize_graph(images, *, dtype, channels_last: bool, style: InputStyle = TORCHVISION_STYLE):
    """uint8 RGB HWC -> ``augment.normalize`` of ``style`` as HWC (channels_last) or CHW, in ``dtype``."""
    if style.bgr:
        # a channel swap on uint8 (exact); the means below are in BGR order
        images = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.BGR)
    return fn.crop_mirror_normalize(
        images,
        dtype=dtype,
        output_layout="HWC" if channels_last else "CHW",
        mean=list(style.pixel_mean),
        std=list(style.pixel_std),
    )


# ----------------------------------------------------------------------------- pipeline shells


@pipeline_def(enable_conditionals=False)
def train_pipeline(
    source, *, parallel, source_prefetch, decoder_device, height, width, pad, dtype, channels_last, on_gpu, bytes_hint,
    style=TORCHVISION_STYLE,
):
    """(images, labels, camids) of one training batch; ``source`` is a ``_TrainSource``."""
    jpegs, params, labels, camids = fn.external_source(
        source=source,
        num_outputs=4,
        batch=False,
        parallel=parallel,
        dtype=[types.UINT8, types.INT32, types.INT64, types.INT64],
        ndim=[1, 1, 0, 0],
        prefetch_queue_depth=source_prefetch if parallel else None,  # batches the workers prepare ahead
        bytes_per_sample_hint=bytes_hint if parallel else None,
    )
    images = decode_resize_graph(jpegs, decoder_device=decoder_device, height=height, width=width)
    images = augment_graph(images, params, height=height, width=width, pad=pad)
    images = normalize_graph(images, dtype=dtype, channels_last=channels_last, style=style)
    if on_gpu:
        labels, camids = labels.gpu(), camids.gpu()
    return images, labels, camids


@pipeline_def(enable_conditionals=False)
def eval_pipeline(source, *, decoder_device, height, width, dtype, channels_last, style=TORCHVISION_STYLE):
    """Normalised images of one evaluation batch; ``source`` is an ``_EvalSource``."""
    jpegs = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1)
    images = decode_resize_graph(jpegs, decoder_device=decoder_device, height=height, width=width)
    return normalize_graph(images, dtype=dtype, channels_last=channels_last, style=style)


@pipeline_def(enable_conditionals=False)
def decode_pipeline(source, *, decoder_device, height, width):
    """Decoded and resized uint8 HWC images, for the decode-once cache."""
    jpegs = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1)
    return decode_resize_graph(jpegs, decoder_device=decoder_device, height=height, width=width)


# ----------------------------------------------------------------------------- sources


def pack_store(store: JpegStore) -> tuple[np.ndarray, np.ndarray]:
    """All JPEGs in one uint8 buffer and int64 offsets ``[N + 1]``: cheap to slice and to pickle."""
    offsets = np.zeros(len(store) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in store.data], out=offsets[1:])
    return np.frombuffer(b"".join(store.data), dtype=np.uint8), offsets


class _TrainSource:
    """Per-sample callable for ``fn.external_source``: ``SampleInfo -> (jpeg, params, label, camid)``.

    Epoch ``e`` of the pipeline is the ``e``-th epoch drawn from the sampler and the generator
    as they were when this object was made; each copy (main thread or worker) replays them.
    """

    def __init__(self, blob, offsets, labels, camids, stream: TrainStream) -> None:
        self.blob, self.offsets, self.labels, self.camids = blob, offsets, labels, camids
        self.stream = stream
        self.epoch = -1
        self.indices = self.params = None

    def __call__(self, info) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if info.epoch_idx < self.epoch:
            raise RuntimeError(f"epoch {info.epoch_idx} requested after epoch {self.epoch}")
        while self.epoch < info.epoch_idx:
            self.indices, self.params = self.stream.next_epoch()
            self.epoch += 1
        i = info.idx_in_epoch
        if i >= len(self.indices):
            raise StopIteration
        j = self.indices[i]
        return (
            self.blob[self.offsets[j] : self.offsets[j + 1]],
            self.params[i],
            np.array(self.labels[j], dtype=np.int64),
            np.array(self.camids[j], dtype=np.int64),
        )


class _EvalSource:
    """Batch callable: iteration ``i`` -> the JPEGs of store entries ``indices[i*B : (i+1)*B]``."""

    def __init__(self, blob, offsets, indices: np.ndarray, batch_size: int) -> None:
        self.blob, self.offsets, self.indices, self.batch_size = blob, offsets, indices, batch_size

    def __call__(self, iteration: int) -> list[np.ndarray]:
        rows = self.indices[iteration * self.batch_size : (iteration + 1) * self.batch_size]
        if len(rows) == 0:
            raise StopIteration
        return [self.blob[self.offsets[j] : self.offsets[j + 1]] for j in rows.tolist()]


# ----------------------------------------------------------------------------- helpers


def _check_device(device, device_id: int | None) -> torch.device:
    device = torch.device(device)
    if device_id is not None:
        if device.type != "cuda":
            raise ValueError(f"device_id={device_id} runs DALI on a GPU, so device must be cuda:{device_id}, got {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index != device_id:
            raise ValueError(f"device {device} and device_id={device_id} name different GPUs")
        device = torch.device("cuda", device_id)
    return device


def _dali_dtype(dtype: torch.dtype):
    """DALI output type for the trainer's dtype (bfloat16: float32 from DALI, cast by torch)."""
    if dtype == torch.bfloat16:
        return types.FLOAT
    if dtype not in _DALI_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return _DALI_DTYPES[dtype]


def py_start_method(device_id: int | None) -> str:
    """``fork`` is only safe while this process has no CUDA context; otherwise ``spawn``."""
    if device_id is None and not torch.cuda.is_initialized() and not _dali_backend.IsDriverInitialized():
        return "fork"
    return "spawn"


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))



def _to_images(out: torch.Tensor, channels_last: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """DALI HWC/CHW batch -> ``[B, 3, H, W]`` (channels_last strides when HWC) in dtype on device."""
    images = out.permute(0, 3, 1, 2) if channels_last else out
    if images.dtype != dtype:
        images = images.to(dtype)  # bfloat16; keeps the memory format
    if images.device != device:  # CPU mode feeding a GPU trainer: a plain (blocking) copy
        images = images.to(device)
    return images


# ----------------------------------------------------------------------------- loaders


class DaliTrainLoader:
    """``TorchTrainLoader``'s contract and streams, with DALI doing the image work.

    One iteration = one epoch of ``sampler.steps_per_epoch`` batches ``(images, labels, camids)``:
    images ``[P*K, 3, H, W]`` normalised, in ``dtype``, on ``device`` (channels_last strides
    with ``channels_last``); the pids slot holds the encoded class labels; int64 ``[P*K]``.
    Same indices and augmentation parameters as ``TorchTrainLoader`` built with the same
    arguments; the images agree within the tolerance of the module docstring.

    device_id: None runs every DALI operator on the CPU; k decodes with nvJPEG and augments on
    GPU k (``device`` must then be ``cuda:k``). num_workers: 0 runs the external source in the
    main thread, > 0 in that many DALI worker processes. num_threads: DALI's CPU threads.
    prefetch_queue_depth: batches DALI prepares ahead.
    """

    def __init__(
        self,
        store: JpegStore,
        labels: np.ndarray,
        camids: np.ndarray,
        sampler: IdentitySampler,
        *,
        height: int,
        width: int,
        pad: int = 10,
        flip_p: float = 0.5,
        erase_p: float = 0.5,
        seed: int,
        rank: int = 0,
        num_workers: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        device_id: int | None = None,
        num_threads: int | None = None,
        prefetch_queue_depth: int = 2,
        input_style: InputStyle = TORCHVISION_STYLE,
    ) -> None:
        self.input_style = input_style
        self.stream = TrainStream(sampler, num_images=len(store), seed=seed, rank=rank, height=height, width=width,
                                  pad=pad, flip_p=flip_p, erase_p=erase_p)
        if num_workers < 0 or prefetch_queue_depth < 1:
            raise ValueError(
                f"num_workers must be >= 0 and prefetch_queue_depth >= 1, got {num_workers}, {prefetch_queue_depth}"
            )
        self.sampler, self.height, self.width, self.pad = sampler, height, width, pad
        self.flip_p, self.erase_p = flip_p, erase_p
        self.device = _check_device(device, device_id)
        self.device_id, self.dtype, self.channels_last = device_id, dtype, channels_last
        self.num_workers, self.prefetch_queue_depth = num_workers, prefetch_queue_depth
        self.num_threads = num_threads or _default_threads()
        self._dali_dtype = _dali_dtype(dtype)
        self._labels = _int64_column(labels, len(store), "labels")
        self._camids = _int64_column(camids, len(store), "camids")
        self._blob, self._offsets = pack_store(store)
        self._max_jpeg = int(np.diff(self._offsets).max(initial=0))
        self._iterator: DALIGenericIterator | None = None
        self._in_sync = False  # True when the pipeline's next epoch is this loader's next epoch

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def _build(self) -> None:
        """A new pipeline whose epoch 0 is the epoch the sampler and generator draw next."""
        self._iterator = None  # drop the old pipeline (and its workers) first
        source = _TrainSource(
            self._blob, self._offsets, self._labels, self._camids, copy.deepcopy(self.stream)
        )
        parallel = self.num_workers > 0
        pipe = train_pipeline(
            source,
            parallel=parallel,
            source_prefetch=self.prefetch_queue_depth,
            decoder_device="cpu" if self.device_id is None else "mixed",
            height=self.height,
            width=self.width,
            pad=self.pad,
            dtype=self._dali_dtype,
            channels_last=self.channels_last,
            on_gpu=self.device_id is not None,
            bytes_hint=self._max_jpeg + 4096,
            style=self.input_style,
            batch_size=self.sampler.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch_queue_depth,
            exec_dynamic=True,  # outputs are handed over through DLPack and stay valid
            py_num_workers=max(self.num_workers, 1),
            py_start_method=py_start_method(self.device_id),
        )
        self._iterator = DALIGenericIterator(pipe, ["images", "labels", "camids"], prepare_first_batch=False)
        self._in_sync = True

    def __iter__(self) -> Iterator[Batch]:
        if not self._in_sync:
            self._build()
        self._in_sync = False
        # the loader's own streams advance now, so state_dict() right after iter() covers this epoch
        self.stream.next_epoch()
        return self._epoch(self._iterator)

    def _epoch(self, iterator: DALIGenericIterator) -> Iterator[Batch]:
        steps = len(self)
        for step in range(steps):
            out = next(iterator)[0]
            if step == steps - 1:
                self._close_epoch(iterator)
            images = _to_images(out["images"], self.channels_last, self.dtype, self.device)
            yield images, out["labels"].to(self.device), out["camids"].to(self.device)  # no-ops unless CPU mode feeds a GPU

    def _close_epoch(self, iterator: DALIGenericIterator) -> None:
        try:
            next(iterator)
        except StopIteration:
            iterator.reset()  # DALI starts on the next epoch now, while the trainer finishes this one
            self._in_sync = True
            return
        raise RuntimeError("the DALI pipeline produced more batches than the sampler's epoch")

    def state_dict(self) -> dict[str, Any]:
        """Sampler and augmentation streams, in ``TorchTrainLoader``'s format (checkpoints interchange)."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._in_sync = False


class DaliEvalLoader:
    """``TorchEvalLoader``'s contract with DALI: resize + normalise, in store order, last batch smaller.

    Sharded for several ranks: shard ``shard_id`` of ``num_shards`` is the contiguous block
    ``[n*shard_id // num_shards, n*(shard_id+1) // num_shards)`` of the store, so gathering the
    shards in rank order restores the store order. pids/camids are those of the shard.
    ``num_workers`` is accepted for a common signature and not used: the source only slices
    bytes that are already in memory. Test-time flipping is the evaluator's job. pids and camids
    are yielded as host tensors, as ``TorchEvalLoader`` does; ``num_images`` is the shard's size.
    """

    def __init__(
        self,
        store: JpegStore,
        pids: np.ndarray,
        camids: np.ndarray,
        *,
        height: int,
        width: int,
        batch_size: int,
        num_workers: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        device_id: int | None = None,
        num_threads: int | None = None,
        prefetch_queue_depth: int = 2,
        shard_id: int = 0,
        num_shards: int = 1,
        input_style: InputStyle = TORCHVISION_STYLE,
    ) -> None:
        self.input_style = input_style
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must lie in [0, {num_shards}), got {shard_id}")
        n = len(store)
        pids, camids = _int64_column(pids, n, "pids"), _int64_column(camids, n, "camids")
        self.height, self.width, self.batch_size = height, width, batch_size
        self.device = _check_device(device, device_id)
        self.device_id, self.dtype, self.channels_last = device_id, dtype, channels_last
        self.num_threads, self.prefetch_queue_depth = num_threads or _default_threads(), prefetch_queue_depth
        self._dali_dtype = _dali_dtype(dtype)
        start, stop = n * shard_id // num_shards, n * (shard_id + 1) // num_shards
        self.indices = np.arange(start, stop, dtype=np.int64)
        self._blob, self._offsets = pack_store(store)
        # on the host: extraction never needs them on the device (reading device labels back
        # would be a synchronisation per batch)
        self._pids = torch.from_numpy(pids[start:stop])
        self._camids = torch.from_numpy(camids[start:stop])
        self.num_images = stop - start
        self._iterator: DALIGenericIterator | None = None
        self._in_sync = False

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def _build(self) -> None:
        self._iterator = None
        pipe = eval_pipeline(
            _EvalSource(self._blob, self._offsets, self.indices, self.batch_size),
            decoder_device="cpu" if self.device_id is None else "mixed",
            height=self.height,
            width=self.width,
            dtype=self._dali_dtype,
            channels_last=self.channels_last,
            style=self.input_style,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch_queue_depth,
            exec_dynamic=True,
        )
        self._iterator = DALIGenericIterator(pipe, ["images"], prepare_first_batch=False)
        self._in_sync = True

    def __iter__(self) -> Iterator[Batch]:
        if len(self) == 0:
            return iter(())
        if not self._in_sync:
            self._build()
        self._in_sync = False
        return self._pass(self._iterator)

    def _pass(self, iterator: DALIGenericIterator) -> Iterator[Batch]:
        steps = len(self)
        for step in range(steps):
            images = next(iterator)[0]["images"]
            if step == steps - 1:
                try:
                    next(iterator)
                    raise RuntimeError("the DALI pipeline produced more batches than the shard holds")
                except StopIteration:
                    iterator.reset()
                    self._in_sync = True
            rows = slice(step * self.batch_size, step * self.batch_size + images.shape[0])
            yield _to_images(images, self.channels_last, self.dtype, self.device), self._pids[rows], self._camids[rows]


# ----------------------------------------------------------------------------- decode once


def _decode_batches(store: JpegStore, indices: np.ndarray, height: int, width: int, device_id, batch_size, num_threads):
    pipe = decode_pipeline(
        _EvalSource(*pack_store(store), indices, batch_size),
        decoder_device="cpu" if device_id is None else "mixed",
        height=height,
        width=width,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        exec_dynamic=True,
    )
    return DALIGenericIterator(pipe, ["images"], prepare_first_batch=False)


def _undecodable(store: JpegStore, rows: np.ndarray, height: int, width: int, device_id) -> list[tuple[str, str]]:
    """Which of ``rows`` DALI's decoder rejects, by bisection (a pipeline that failed is unusable)."""
    try:
        for _ in _decode_batches(store, rows, height, width, device_id, min(len(rows), 256), 1):
            pass
        return []
    except RuntimeError as err:
        if len(rows) == 1:
            j = int(rows[0])
            why = find_jpeg_problem(store.data[j]) or f"DALI decoder failed: {str(err).strip().splitlines()[-1]}"
            return [(store.paths[j], why)]
    half = len(rows) // 2
    first = _undecodable(store, rows[:half], height, width, device_id)
    return first + _undecodable(store, rows[half:], height, width, device_id)


def decode_store_dali(
    store: JpegStore,
    height: int,
    width: int,
    *,
    device_id: int | None = None,
    batch_size: int = 256,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Every image decoded and resized by DALI; uint8 ``[N, height, width, 3]`` (NHWC) on GPU ``device_id`` or the CPU.

    A file DALI cannot decode raises ``CorruptImageError`` naming it (stores built with
    ``load_jpeg_store(verify=True)`` have been checked with torchvision already).
    """
    device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
    out = torch.empty((len(store), height, width, 3), dtype=torch.uint8, device=device)
    if len(store) == 0:
        return out
    indices = np.arange(len(store), dtype=np.int64)
    iterator = _decode_batches(store, indices, height, width, device_id, batch_size, num_threads or _default_threads())
    start = 0
    try:
        for batch in iterator:
            images = batch[0]["images"]
            out[start : start + images.shape[0]].copy_(images)  # ordered on the current stream
            start += images.shape[0]
    except RuntimeError as err:
        rows = indices[start:]  # the failing batch is the next one, or one DALI prefetched after it
        bad = _undecodable(store, rows, height, width, device_id)
        if not bad:
            raise
        raise CorruptImageError(
            f"{len(bad)} image files cannot be decoded by DALI:\n" + "\n".join(f"  {p}: {w}" for p, w in bad)
        ) from err
    return out
