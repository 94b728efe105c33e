"""Decode-once cache: every training image decoded and resized once, augmented per step with torch ops.

Design note
-----------
What it computes. At construction every image of the store is decoded and resized once (DALI
when it is installed and the device is a GPU, else ``augment.decode_resize`` in threads) into a
uint8 tensor kept on the training device. Each step then only runs the random augmentation of
docs/METHOD.md §6.2 on the batch, with the parameters the sampler and ``draw_augment_params`` drew on the CPU
(the same streams as ``TorchTrainLoader``), and normalises. Output equals
``normalize(augment_batch(cache[idx], params))`` exactly (bit for bit on the CPU; the ops are
integer index arithmetic, selects and the same float32 normalisation, so also on the GPU).

Layout. The cache is NHWC, uint8 ``[N, H, W, 3]``: one sample's pixel is 3 contiguous bytes,
DALI's decoders write HWC, and gathering ``[B, H, W, 3]`` and permuting gives NCHW
``[B, 3, H, W]`` in channels_last memory format without a copy.

Per step (no Python loop over samples, no host sync): one gather reads, for every output pixel,
the source pixel that flip + zero pad + crop maps to it (``rows = i + crop_y - pad``,
``cols = j + crop_x - pad``, mirrored when flipped; outside the image -> 0); one select writes
the erase rectangles; then the float32 normalisation of ``augment.normalize``. The epoch's
indices, parameters and labels go to the device in one copy when the epoch starts.

Memory. ``cache_bytes`` = N*H*W*3: Market-1501's 12,936 training images at 384x128 take 1.9 GB,
MSMT17's 32,621 take 4.8 GB. ``choose_train_loader_kind`` picks this loader when that fits a
budget, else per-step DALI decoding.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from .augment import ERASE_FILL, TORCHVISION_STYLE, InputStyle, normalize
from .jpeg_store import JpegStore
from .sampler import IdentitySampler
from .stream import TrainStream
from .torch_loader import _int64_column, decode_store

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def cache_bytes(num_images: int, height: int, width: int, channels: int = 3) -> int:
    """Bytes of a uint8 cache of ``num_images`` decoded images of height x width x channels."""
    if min(num_images, height, width, channels) < 0:
        raise ValueError(f"sizes must be >= 0, got {num_images}, {height}, {width}, {channels}")
    return int(num_images) * int(height) * int(width) * int(channels)


def choose_train_loader_kind(num_images: int, height: int, width: int, budget_bytes: int) -> str:
    """``"cache"`` when the decoded cache fits ``budget_bytes``, else ``"dali"`` (per-step decoding)."""
    return "cache" if cache_bytes(num_images, height, width) <= budget_bytes else "dali"


def build_decoded_cache(
    store: JpegStore,
    height: int,
    width: int,
    *,
    device: str | torch.device = "cpu",
    decoder: str = "auto",
    num_threads: int | None = None,
) -> torch.Tensor:
    """Every image decoded and resized once; uint8 NHWC ``[N, height, width, 3]`` on ``device``.

    decoder: ``"dali"`` (DALI's decoder and resize: nvJPEG on a GPU device, else DALI's CPU
    operators), ``"torch"`` (``augment.decode_resize``, bit-exact with the reference loaders), or
    ``"auto"``: DALI on a GPU device when it is installed, else torch.
    """
    device = torch.device(device)
    if decoder not in ("auto", "dali", "torch"):
        raise ValueError(f"decoder must be auto, dali or torch, got {decoder!r}")
    if decoder == "auto":
        decoder = "torch"
        if device.type == "cuda":
            try:
                from . import dali  # noqa: F401
                decoder = "dali"
            except ImportError:
                pass
    if decoder == "dali":
        from .dali import decode_store_dali

        device_id = None
        if device.type == "cuda":
            device_id = device.index if device.index is not None else torch.cuda.current_device()
        return decode_store_dali(store, height, width, device_id=device_id, num_threads=num_threads).to(device)
    nchw = decode_store(store, height, width, num_threads=num_threads)
    return nchw.permute(0, 2, 3, 1).contiguous().to(device)


def augment_from_cache(
    cache: torch.Tensor,
    indices: torch.Tensor,
    params: torch.Tensor,
    *,
    pad: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    fill: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    style: InputStyle = TORCHVISION_STYLE,
) -> torch.Tensor:
    """Gather, flip, zero pad + crop, erase and normalise a batch; ``[B, 3, H, W]`` in ``dtype``.

    cache: uint8 ``[N, H, W, 3]``; indices: int64 ``[B]``; params: integer ``[B, 7]`` in
    ``AugmentParams.to_array`` column order (crop offsets in [0, 2*pad], not checked here: that
    would need a host sync); all on one device. mean, std: float32 ``[1, 3, 1, 1]`` of ``style``
    (``style.device_tensors``); fill: the
    uint8 ``[3]`` erase colour (``ERASE_FILL``); all on that device, so a step copies nothing.
    Returns channels_last strides with ``channels_last``, else contiguous NCHW.
    """
    if cache.ndim != 4 or cache.shape[3] != 3 or cache.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 [N, H, W, 3] cache, got {cache.dtype} {tuple(cache.shape)}")
    if indices.ndim != 1 or params.shape != (indices.shape[0], 7):
        raise ValueError(f"expected indices [B] and params [B, 7], got {tuple(indices.shape)} and {tuple(params.shape)}")
    if indices.device != cache.device or params.device != cache.device:
        raise ValueError(f"cache on {cache.device}, indices on {indices.device}, params on {params.device}: use one device")
    _, H, W, _ = cache.shape
    dev = cache.device
    p = params.long()
    flip, cy, cx, ey, ex, eh, ew = p.unbind(1)
    # output (i, j) <- padded flipped (i + cy, j + cx) <- image (i + cy - pad, j + cx - pad), mirrored if flipped
    rows = torch.arange(H, device=dev) + (cy - pad)[:, None]  # [B, H]
    cols = torch.arange(W, device=dev) + (cx - pad)[:, None]  # [B, W]
    inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]  # [B, H, W]
    cols = torch.where(flip[:, None].bool(), W - 1 - cols, cols)
    gathered = cache[indices[:, None, None], rows.clamp(0, H - 1)[:, :, None], cols.clamp(0, W - 1)[:, None, :]]
    gathered.masked_fill_(~inside[..., None], 0)  # the zero padding
    ys, xs = torch.arange(H, device=dev), torch.arange(W, device=dev)
    erase = ((ys >= ey[:, None]) & (ys < (ey + eh)[:, None]))[:, :, None] & (
        (xs >= ex[:, None]) & (xs < (ex + ew)[:, None])
    )[:, None, :]
    out = torch.where(erase[..., None], fill, gathered)  # [B, H, W, 3]
    images = out.permute(0, 3, 1, 2)  # NCHW view with channels_last strides
    if not channels_last:
        images = images.contiguous()  # on uint8: 4x fewer bytes than after normalising
    return normalize(images, mean, std, dtype, style=style)


class DecodedCacheTrainLoader:
    """``TorchTrainLoader``'s contract and streams over a decode-once cache on ``device``.

    One iteration = one epoch of ``sampler.steps_per_epoch`` batches ``(images, labels,
    camids)``: images ``[P*K, 3, H, W]`` normalised in ``dtype`` on ``device``; the pids slot
    holds the encoded class labels; int64 ``[P*K]`` on ``device``. With the same arguments it
    draws the same indices and parameters as ``TorchTrainLoader``; with ``decoder="torch"`` the
    images are identical to its output. ``num_workers`` is the number of decoding threads used
    once at construction. The work of a step is queued on the current CUDA stream when the
    batch is produced; nothing here synchronises with the host.
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
        decoder: str = "auto",
        input_style: InputStyle = TORCHVISION_STYLE,
    ) -> None:
        self.stream = TrainStream(sampler, num_images=len(store), seed=seed, rank=rank, height=height, width=width,
                                  pad=pad, flip_p=flip_p, erase_p=erase_p)
        n = len(store)
        self.sampler, self.height, self.width, self.pad = sampler, height, width, pad
        self.flip_p, self.erase_p = flip_p, erase_p
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self._labels = _int64_column(labels, n, "labels")
        self._camids = _int64_column(camids, n, "camids")
        self.cache = build_decoded_cache(
            store, height, width, device=self.device, decoder=decoder, num_threads=num_workers or None
        )
        self.input_style = input_style
        self._mean, self._std = input_style.device_tensors(self.device)  # built once, no per-step copy
        self._fill = torch.tensor(ERASE_FILL, dtype=torch.uint8).to(self.device)

    @property
    def nbytes(self) -> int:
        return self.cache.numel()

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        # drawn eagerly, so state_dict() right after iter() already covers this epoch
        indices, params = self.stream.next_epoch()
        # one host-to-device copy per epoch: [index, 7 params, label, camid] per sample
        plan = np.concatenate(
            [indices[:, None], params.astype(np.int64), self._labels[indices, None], self._camids[indices, None]], axis=1
        )
        host = torch.from_numpy(plan)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return self._epoch(host.to(self.device, non_blocking=True))

    def _epoch(self, plan: torch.Tensor) -> Iterator[Batch]:
        B = self.sampler.batch_size
        indices, params = plan[:, 0].contiguous(), plan[:, 1:8]
        labels, camids = plan[:, 8].contiguous(), plan[:, 9].contiguous()
        for start in range(0, plan.shape[0], B):
            rows = slice(start, start + B)
            images = augment_from_cache(
                self.cache, indices[rows], params[rows], pad=self.pad, mean=self._mean, std=self._std, fill=self._fill,
                dtype=self.dtype, channels_last=self.channels_last, style=self.input_style,
            )
            yield images, labels[rows], camids[rows]

    def state_dict(self) -> dict[str, Any]:
        """Sampler and augmentation streams, in ``TorchTrainLoader``'s format (checkpoints interchange)."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

