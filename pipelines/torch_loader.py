"""Reference loaders on torch DataLoader: the CPU reference pipeline behind the loader contract.

Both loaders iterate ``(images, pids, camids)``: images normalised in ``input_style``
(``augment.InputStyle``: torchvision's or the seed's Caffe preprocessing) ``[B, 3, H, W]`` in
``dtype`` on ``device``, pids and camids int64 ``[B]`` (on ``device`` for training, on the host
for evaluation); ``len()`` is the number of batches.

Training: the sampler's indices and the augmentation parameters of a whole epoch are drawn in the
main process (so the output does not depend on ``num_workers``); the DataLoader's items are whole
batches, ``(indices [B], params int32 [B, 7])``, each assembled in one worker (decode or cache
lookup, then flip/pad/crop/erase on uint8). The uint8 batch crosses to the device (pinned,
non-blocking on CUDA) and is normalised there, which moves 4x fewer bytes than float32.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .augment import (
    TORCHVISION_STYLE,
    AugmentParams,
    InputStyle,
    augment_batch,
    decode_resize,
    normalize,
)
from .jpeg_store import JpegStore
from .sampler import IdentitySampler
from .stream import TrainStream

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def decode_store(store: JpegStore, height: int, width: int, num_threads: int | None = None) -> torch.Tensor:
    """Every image of the store decoded and resized; uint8 ``[N, 3, height, width]``."""
    out = torch.empty((len(store), 3, height, width), dtype=torch.uint8)

    def fill(i: int) -> None:
        out[i] = decode_resize(store.data[i], height, width)

    with ThreadPoolExecutor(max_workers=num_threads or min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, range(len(store))))
    return out


def _decode_many(data: list[bytes], indices: np.ndarray, height: int, width: int) -> torch.Tensor:
    return torch.stack([decode_resize(data[i], height, width) for i in indices.tolist()])


class _TrainBatches(Dataset):
    """Items are whole batches: key ``(indices int64 [B], params int32 [B, 7])``."""

    def __init__(self, data, cache, labels, camids, height, width, pad):
        self.data, self.cache = data, cache  # exactly one of them is set
        self.labels, self.camids = labels, camids
        self.height, self.width, self.pad = height, width, pad

    def __getitem__(self, key: tuple[np.ndarray, np.ndarray]) -> Batch:
        indices, params = key
        if self.cache is not None:
            images = self.cache[torch.from_numpy(indices)]
        else:
            images = _decode_many(self.data, indices, self.height, self.width)
        images = augment_batch(images, AugmentParams.from_array(params), pad=self.pad)
        return images, torch.from_numpy(self.labels[indices]), torch.from_numpy(self.camids[indices])


class _EvalBatches(Dataset):
    """Items are whole batches: key ``(start, stop)`` of the store, resized, no augmentation."""

    def __init__(self, data, pids, camids, height, width):
        self.data, self.pids, self.camids = data, pids, camids
        self.height, self.width = height, width

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        indices = np.arange(*key)
        images = _decode_many(self.data, indices, self.height, self.width)
        return images, torch.from_numpy(self.pids[indices]), torch.from_numpy(self.camids[indices])


class _EpochPlan:
    """DataLoader sampler replaying the batch keys set for the current epoch (persistent workers)."""

    def __init__(self) -> None:
        self.keys: list = []

    def __iter__(self) -> Iterator:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _int64_column(values, n: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64)
    if array.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the store, got {array.shape}")
    return array


class _DeviceFinisher:
    """Moves a uint8 batch to the device and normalises it there in ``style``: the one place where
    every loader built on it (torch train and eval loaders, the evaluation cache) normalises.

    ``labels_on_device=False`` (evaluation) leaves pids/camids on the host: extraction never
    needs them on the device, and reading them back would be a synchronisation per batch.
    """

    def __init__(self, device, dtype: torch.dtype, channels_last: bool, style: InputStyle = TORCHVISION_STYLE,
                 labels_on_device: bool = True) -> None:
        self.device, self.dtype, self.channels_last, self.style = torch.device(device), dtype, channels_last, style
        self.labels_on_device = labels_on_device
        # built once: a per-batch torch.tensor(..., device=cuda) would be a blocking copy
        self.mean, self.std = style.device_tensors(self.device)

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] (any strides) -> normalised [B, 3, H, W] in ``dtype`` on the device,
        in the loader's memory format: made on uint8 after the copy, 4x fewer bytes than after
        normalising, and the copy leaves a pinned source as it is."""
        images = images.to(self.device, non_blocking=True)
        images = images.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return normalize(images, self.mean, self.std, self.dtype, style=self.style)

    def __call__(self, batch: Batch) -> Batch:
        images, pids, camids = batch
        if self.labels_on_device:
            pids, camids = pids.to(self.device, non_blocking=True), camids.to(self.device, non_blocking=True)
        return self.images(images), pids, camids


def _data_loader(dataset: Dataset, sampler, num_workers: int, pin_memory: bool, persistent: bool) -> DataLoader:
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,  # items are already batches
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent and num_workers > 0,
        generator=torch.Generator(),  # keeps the DataLoader's seed draw off torch's global RNG
    )


class TorchTrainLoader:
    """One iteration = one epoch of ``sampler.steps_per_epoch`` augmented P x K batches.

    The pids slot holds the encoded class LABELS (``labels[i]``, 0..C-1), what the losses need,
    not the dataset's raw pids. With ``decoded_cache`` all images are decoded and resized once
    into a uint8 ``[N, 3, H, W]`` tensor (N*H*W*3 bytes of host memory, shared with forked
    workers); otherwise each batch is decoded in its worker.
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
        decoded_cache: bool = True,
        input_style: InputStyle = TORCHVISION_STYLE,
    ) -> None:
        self.stream = TrainStream(sampler, num_images=len(store), seed=seed, rank=rank, height=height, width=width,
                                  pad=pad, flip_p=flip_p, erase_p=erase_p)
        self.sampler, self.height, self.width, self.pad = sampler, height, width, pad
        self.flip_p, self.erase_p = flip_p, erase_p
        self._finish = _DeviceFinisher(device, dtype, channels_last, input_style)
        cache = decode_store(store, height, width) if decoded_cache else None
        dataset = _TrainBatches(
            None if decoded_cache else store.data,
            cache,
            _int64_column(labels, len(store), "labels"),
            _int64_column(camids, len(store), "camids"),
            height,
            width,
            pad,
        )
        self._plan = _EpochPlan()
        self._loader = _data_loader(dataset, self._plan, num_workers, self._finish.pin_memory, persistent=True)

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        # drawn eagerly, so state_dict() right after iter() already covers this epoch
        indices, params = self.stream.next_epoch()
        B = self.sampler.batch_size
        self._plan.keys = [(indices[i : i + B], params[i : i + B]) for i in range(0, len(indices), B)]
        return (self._finish(batch) for batch in self._loader)

    def state_dict(self) -> dict[str, Any]:
        """Sampler and augmentation streams; saved at an epoch end, loading it replays the next epoch."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


class TorchEvalLoader:
    """Resize + normalise every image in store order; the last batch may be smaller.

    Yields ``(images [B, 3, H, W] in dtype on device, pids int64 [B], camids int64 [B])`` with the
    labels on the HOST (extraction never needs them on the device). Test-time flipping is the
    evaluator's job (on the device tensor), not the loader's. ``num_images``: the store's size.
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
        input_style: InputStyle = TORCHVISION_STYLE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(store)
        dataset = _EvalBatches(
            store.data, _int64_column(pids, n, "pids"), _int64_column(camids, n, "camids"), height, width
        )
        keys = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
        self.num_images, self.batch_size = n, batch_size
        self._finish = _DeviceFinisher(device, dtype, channels_last, input_style, labels_on_device=False)
        self._loader = _data_loader(dataset, keys, num_workers, self._finish.pin_memory, persistent=False)
        self._num_batches = math.ceil(n / batch_size)

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[Batch]:
        return (self._finish(batch) for batch in self._loader)
