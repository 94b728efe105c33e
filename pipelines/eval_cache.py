"""Decode-once evaluation cache: query and gallery images decoded and resized once per run.

Design note
-----------
What it computes. ``build_eval_cache`` decodes and resizes every image of an evaluation set once
with ``augment.decode_resize`` (the function ``TorchEvalLoader`` decodes with, in threads) into a
uint8 NHWC tensor ``[N, H, W, 3]``; ``CachedEvalLoader`` then serves it in store order with the
``TorchEvalLoader`` contract, normalising each batch with the same shared finisher
(``torch_loader._DeviceFinisher``: ``augment.normalize`` with the loaders' mean/std), so its
batches equal ``TorchEvalLoader``'s bit for bit (tests/test_eval_cache.py). Every evaluation of a
run (every 10 epochs, both splits) and ``alr-fast evaluate`` read the cache instead of decoding
19,281 (Market-1501) or 93,820 (MSMT17) JPEGs again.

Placement. On a GPU the cache lives in device memory when the run's evaluation sets fit
``eval.cache_budget_gb`` (at 384x128: Market-1501 2.8 GB, MSMT17 13.8 GB), else in pinned host
memory, from which each batch is one asynchronous copy; on a CPU it is host memory when it fits
the budget, else the JPEG loader stays. ``EvalCachePlan`` makes that choice for the sets of a run.

Layout. NHWC, as the training cache: a batch slice permuted to NCHW is already channels_last
(what a GPU model takes, no copy); for a contiguous-NCHW consumer (a CPU) the uint8 batch is made
contiguous before normalising, 4x fewer bytes than after.

Labels. pids and camids are yielded as host int64 tensors: extraction never needs them on the
device, so reading them costs no device-to-host copy.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from .augment import TORCHVISION_STYLE, InputStyle, decode_resize
from .gpu_cache import cache_bytes
from .jpeg_store import JpegStore
from .torch_loader import _DeviceFinisher, _int64_column

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
CACHE_MODES = ("auto", "device", "host", "none")
# images decoded per chunk when the cache goes to a GPU: the pinned staging buffer's size
_STAGING_IMAGES = 1024


eval_cache_bytes = cache_bytes  # the evaluation cache has the training cache's layout: N x H x W x 3 uint8


@dataclass
class EvalCachePlan:
    """Where the evaluation sets of a run go: ``placement(nbytes)`` for each set in turn.

    mode (``eval.cache``): auto (device memory while the sets fit ``budget_bytes``, then pinned
    host memory on a GPU; on a CPU host memory while they fit, then none), device, host, or none.
    """

    mode: str
    budget_bytes: int
    device: torch.device
    used_bytes: int = 0

    def __post_init__(self) -> None:
        if self.mode not in CACHE_MODES:
            raise ValueError(f"eval cache mode must be one of {', '.join(CACHE_MODES)}; got {self.mode!r}")
        self.device = torch.device(self.device)

    def placement(self, nbytes: int) -> str:
        """"device", "host" or "none" for a set of ``nbytes``; device (and CPU host) bytes are counted."""
        fits = self.used_bytes + nbytes <= self.budget_bytes
        if self.mode == "none":
            return "none"
        on_gpu = self.device.type == "cuda"
        if self.mode == "auto":
            choice = ("device" if fits else "host") if on_gpu else ("host" if fits else "none")
        else:
            choice = self.mode
        if choice == "device" or (choice == "host" and not on_gpu):
            self.used_bytes += nbytes
        return choice


def build_eval_cache(
    store: JpegStore,
    height: int,
    width: int,
    *,
    placement: str = "device",
    device: str | torch.device = "cpu",
    num_threads: int | None = None,
    progress: bool = False,
    desc: str = "decoding evaluation images",
) -> torch.Tensor:
    """Every image of ``store`` decoded and resized once: uint8 NHWC ``[N, height, width, 3]``.

    placement "device": on ``device``; "host": host memory (pinned when ``device`` is a GPU, so
    batches copy asynchronously). Decoding is ``augment.decode_resize`` in ``num_threads``
    threads; for a GPU it goes through a pinned staging buffer, one chunk at a time, so the host
    never holds a second copy of the whole set.
    """
    device = torch.device(device)
    if placement not in ("device", "host"):
        raise ValueError(f"placement must be device or host, got {placement!r}")
    n = len(store)
    pinned = device.type == "cuda"
    on_device = placement == "device" and device.type != "cpu"
    shape = (n, height, width, 3)
    cache = torch.empty(shape, dtype=torch.uint8, device=device) if on_device else \
        torch.empty(shape, dtype=torch.uint8, pin_memory=pinned)
    staging = torch.empty((min(n, _STAGING_IMAGES), height, width, 3), dtype=torch.uint8, pin_memory=pinned) \
        if on_device else None
    bar = tqdm(total=n, desc=desc, disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=num_threads or min(16, os.cpu_count() or 1)) as pool:
        for start in range(0, n, _STAGING_IMAGES):
            stop = min(start + _STAGING_IMAGES, n)
            target = staging[: stop - start] if on_device else cache[start:stop]

            def fill(i: int, target=target, start=start) -> None:
                target[i - start] = decode_resize(store.data[i], height, width).permute(1, 2, 0)

            list(pool.map(fill, range(start, stop)))
            if on_device:
                cache[start:stop].copy_(target)  # blocking: the staging buffer is refilled next
            bar.update(stop - start)
    bar.close()
    return cache


class CachedEvalLoader:
    """``TorchEvalLoader``'s contract over a decode-once cache: resize + normalise in store order.

    cache: uint8 ``[N, H, W, 3]`` from ``build_eval_cache`` (on ``device`` or in host memory);
    pids, camids: ``[N]``. Yields ``(images [B, 3, H, W] in dtype on device, pids int64 [B] on the
    host, camids int64 [B] on the host)``; the last batch may be smaller. ``len()`` is the number
    of batches, ``num_images`` the number of images. Nothing here waits for the device.
    """

    def __init__(
        self,
        cache: torch.Tensor,
        pids: np.ndarray,
        camids: np.ndarray,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        input_style: InputStyle = TORCHVISION_STYLE,
    ) -> None:
        if cache.ndim != 4 or cache.shape[3] != 3 or cache.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 [N, H, W, 3] cache, got {cache.dtype} {tuple(cache.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = cache.shape[0]
        self.cache, self.batch_size = cache, batch_size
        self._pids = torch.from_numpy(_int64_column(pids, n, "pids"))
        self._camids = torch.from_numpy(_int64_column(camids, n, "camids"))
        self._finish = _DeviceFinisher(device, dtype, channels_last, input_style, labels_on_device=False)

    @property
    def num_images(self) -> int:
        return self.cache.shape[0]

    @property
    def nbytes(self) -> int:
        return self.cache.numel()

    @property
    def placement(self) -> str:
        return "device" if self.cache.device == self._finish.device and self.cache.device.type != "cpu" else "host"

    def __len__(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, self.num_images, self.batch_size):
            rows = slice(start, start + self.batch_size)
            # an NCHW view with channels_last strides; a pinned host cache of a GPU run is copied
            # asynchronously by the finisher, which then makes the loader's memory format
            yield self._finish((self.cache[rows].permute(0, 3, 1, 2), self._pids[rows], self._camids[rows]))
