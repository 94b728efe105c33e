"""Training augmentation of the original trainer (SPEC B.8) as CPU-drawn parameters plus reference ops.

The random parameters (flip, crop offset, erase rectangle) are drawn on the CPU by
``draw_augment_params`` so that the DALI pipeline and this reference pipeline apply the same
augmentation to the same sample. The reference image ops work on uint8 ``[B, 3, H, W]`` RGB
tensors, in the seed's order: horizontal flip, zero pad ``pad`` px on each side, crop H x W at
(crop_y, crop_x) of the padded image, fill the erase rectangle (output coordinates) with
``ERASE_FILL``; then ``normalize`` (torchvision mean/std, SPEC A.3.1).

Draw order of ``draw_augment_params`` (all draws are doubles U in [0, 1) from ``rng.random``,
so the stream is easy to reproduce anywhere):
1. ``rng.random((n, 4))``: per sample [flip, crop_y, crop_x, erase gate];
   flip = U < flip_p, crop = int(2*pad*U) (0 .. 2*pad-1), erase when U < erase_p.
2. ``rng.random((m, erase_attempts, 2))`` for the m gated samples, in sample order: per attempt
   [area, aspect]; area = (a0 + (a1-a0)*U) * (H*W), r = r0 + (r1-r0)*U (linear, not log),
   h = round(sqrt(area*r)), w = round(sqrt(area/r)) (round half to even, as Python's round).
   The first attempt with h < H and w < W wins; all attempts are drawn whatever the outcome.
3. ``rng.random((m, 2))``: per gated sample [y, x]; y = int(U*(H-h)), x = int(U*(W-w)), i.e.
   randint(0, H-h) with an exclusive bound. Samples where no attempt fits are not erased.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

ERASE_FILL = (125, 122, 113)  # uint8(255 * (0.4914, 0.4822, 0.4465)), truncated as in the seed
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentParams:
    """Per-sample augmentation parameters, numpy arrays of length n.

    flip: bool; crop_y, crop_x: top-left of the crop in the padded image, px;
    erase_y, erase_x, erase_h, erase_w: erase rectangle in output coordinates, px
    (erase_h = erase_w = 0: no erasing). Integers are int32.
    """

    flip: np.ndarray
    crop_y: np.ndarray
    crop_x: np.ndarray
    erase_y: np.ndarray
    erase_x: np.ndarray
    erase_h: np.ndarray
    erase_w: np.ndarray

    def __len__(self) -> int:
        return len(self.flip)

    def to_array(self) -> np.ndarray:
        """int32 ``[n, 7]`` in field order (flip as 0/1), compact for worker queues and DALI."""
        return np.stack([getattr(self, f.name).astype(np.int32) for f in fields(self)], axis=1)

    @classmethod
    def from_array(cls, array: np.ndarray) -> "AugmentParams":
        array = np.asarray(array)
        if array.ndim != 2 or array.shape[1] != len(fields(cls)):
            raise ValueError(f"expected an [n, {len(fields(cls))}] array, got shape {array.shape}")
        cols = {f.name: array[:, i].astype(np.int32) for i, f in enumerate(fields(cls))}
        cols["flip"] = cols["flip"].astype(bool)
        return cls(**cols)


def draw_augment_params(
    rng: np.random.Generator,
    n: int,
    height: int,
    width: int,
    *,
    pad: int = 10,
    flip_p: float = 0.5,
    erase_p: float = 0.5,
    erase_area: tuple[float, float] = (0.02, 0.4),
    erase_aspect: tuple[float, float] = (0.3, 1 / 0.3),
    erase_attempts: int = 100,
) -> AugmentParams:
    """Parameters for n samples of an H x W image; the draw order is in the module docstring."""
    if n < 0 or height < 1 or width < 1 or pad < 0 or erase_attempts < 1:
        raise ValueError(f"bad arguments: n={n}, height={height}, width={width}, pad={pad}, attempts={erase_attempts}")
    u = rng.random((n, 4))
    flip = u[:, 0] < flip_p
    crop_y = np.floor(2 * pad * u[:, 1]).astype(np.int32)
    crop_x = np.floor(2 * pad * u[:, 2]).astype(np.int32)
    gated = np.flatnonzero(u[:, 3] < erase_p)

    tries = rng.random((len(gated), erase_attempts, 2))
    area = (erase_area[0] + (erase_area[1] - erase_area[0]) * tries[..., 0]) * (height * width)
    aspect = erase_aspect[0] + (erase_aspect[1] - erase_aspect[0]) * tries[..., 1]
    h = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (h < height) & (w < width)
    first = fits.argmax(axis=1)
    rows = np.arange(len(gated))
    ok = fits[rows, first]
    h, w = np.where(ok, h[rows, first], 0), np.where(ok, w[rows, first], 0)
    pos = rng.random((len(gated), 2))
    y = np.floor(pos[:, 0] * (height - h)).astype(np.int64)
    x = np.floor(pos[:, 1] * (width - w)).astype(np.int64)

    erase = np.zeros((4, n), dtype=np.int32)
    erase[:, gated] = np.where(ok, np.stack([y, x, h, w]), 0)
    return AugmentParams(flip, crop_y, crop_x, erase[0], erase[1], erase[2], erase[3])


def decode_rgb(jpeg: bytes) -> torch.Tensor:
    """Decode JPEG bytes to RGB (grey and CMYK files converted); uint8 ``[3, h, w]``."""
    return decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_resize(jpeg: bytes, height: int, width: int) -> torch.Tensor:
    """Decode a JPEG to RGB and resize it like cv2 INTER_LINEAR; uint8 ``[3, height, width]``.

    Bilinear with half-pixel centres and no antialiasing, computed in float32 and rounded; it
    matches cv2's fixed-point result within one grey level.
    """
    image = decode_rgb(jpeg)
    if image.shape[1:] == (height, width):
        return image
    resized = F.interpolate(
        image[None].float(), size=(height, width), mode="bilinear", align_corners=False, antialias=False
    )
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")


def augment_batch(images: torch.Tensor, params: AugmentParams, *, pad: int = 10) -> torch.Tensor:
    """Flip, zero pad ``pad`` px, crop back to H x W, erase; uint8 ``[B, 3, H, W]`` in and out."""
    _check_images(images)
    if len(params) != images.shape[0]:
        raise ValueError(f"{len(params)} parameter rows for a batch of {images.shape[0]} images")
    B, _, H, W = images.shape
    crops = np.concatenate([params.crop_y, params.crop_x])
    if crops.size and (crops.min() < 0 or crops.max() > 2 * pad):
        raise ValueError(f"crop offsets must lie in [0, {2 * pad}] for pad={pad}")
    flip = torch.from_numpy(np.asarray(params.flip, dtype=bool)).to(images.device)
    flipped = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(flipped, (pad, pad, pad, pad))
    out = torch.empty_like(images)
    for b, (cy, cx) in enumerate(zip(params.crop_y.tolist(), params.crop_x.tolist())):
        out[b] = padded[b, :, cy : cy + H, cx : cx + W]
    fill = torch.tensor(ERASE_FILL, dtype=torch.uint8, device=images.device)
    for b in np.flatnonzero((params.erase_h > 0) & (params.erase_w > 0)).tolist():
        y, x = int(params.erase_y[b]), int(params.erase_x[b])
        out[b, :, y : y + int(params.erase_h[b]), x : x + int(params.erase_w[b])] = fill[:, None, None]
    return out


def normalize(
    images: torch.Tensor,
    mean: tuple[float, float, float] | torch.Tensor = IMAGENET_MEAN,
    std: tuple[float, float, float] | torch.Tensor = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(x / 255 - mean) / std per channel, computed in float32 then cast to ``dtype``.

    images: uint8 ``[B, 3, H, W]``. mean/std may be float32 tensors already on the images'
    device (shape [3] or [1, 3, 1, 1]) to avoid a host-to-device copy per call. Same operations
    as ``torchvision.transforms.functional.normalize(x.float() / 255, mean, std)``.
    """
    _check_images(images)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    # every divisor is a device tensor: CUDA turns a division by a Python scalar into a multiply
    # by its reciprocal (126 of the 256 grey levels then differ by one ulp from the CPU's exact
    # quotient), while a tensor divisor is an IEEE division on both devices
    x = images.to(torch.float32).div_(torch.full((), 255.0, device=images.device))
    return x.sub_(mean_t).div_(std_t).to(dtype)
