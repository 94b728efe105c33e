"""Training augmentation of the original trainer (docs/METHOD.md §6.2) as CPU-drawn parameters plus reference ops.

The random parameters (flip, crop offset, erase rectangle) are drawn on the CPU by
``draw_augment_params`` so that the DALI pipeline and this reference pipeline apply the same
augmentation to the same sample. The reference image ops work on uint8 ``[B, 3, H, W]`` RGB
tensors, in the seed's order: horizontal flip, zero pad ``pad`` px on each side, crop H x W at
(crop_y, crop_x) of the padded image, fill the erase rectangle (output coordinates) with
``ERASE_FILL``; then ``normalize`` in the backbone's ``InputStyle`` (torchvision: RGB / 255 with
mean/std (docs/METHOD.md §11); keras: the seed's Caffe preprocessing, BGR minus the ImageNet means in
pixel units). Padding and erasing happen on the uint8 RGB image in both styles, as the seed does.

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
KERAS_BGR_MEAN = (103.939, 116.779, 123.68)  # keras preprocess_input(mode="caffe"), B, G, R, in pixel units


@dataclass(frozen=True)
class InputStyle:
    """How uint8 RGB images become the network's input, per output channel c:

        out[c] = (in[channels[c]] / scale - mean[c]) / std[c]

    ``mean`` and ``std`` are in units of ``in / scale`` and belong to the OUTPUT channel order;
    ``pixel_mean`` / ``pixel_std`` give them in pixel units (DALI's crop_mirror_normalize).
    ``scale`` 1 skips that division (no scaling, the Caffe style).
    """

    name: str
    channels: tuple[int, int, int]  # (0, 1, 2): RGB, (2, 1, 0): BGR
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.channels not in ((0, 1, 2), (2, 1, 0)):
            raise ValueError(f"InputStyle {self.name}: channels must be (0, 1, 2) or (2, 1, 0), got {self.channels}")
        if self.scale <= 0 or min(self.std) <= 0:
            raise ValueError(f"InputStyle {self.name}: scale and std must be positive, got {self.scale}, {self.std}")

    @property
    def bgr(self) -> bool:
        return self.channels == (2, 1, 0)

    @property
    def pixel_mean(self) -> tuple[float, ...]:
        return tuple(self.scale * m for m in self.mean)

    @property
    def pixel_std(self) -> tuple[float, ...]:
        return tuple(self.scale * s for s in self.std)

    def device_tensors(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as float32 ``[1, 3, 1, 1]`` on ``device``, built once per loader."""
        # built once: a per-batch torch.tensor(..., device=cuda) would be a blocking copy
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1).to(device)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1).to(device)
        return mean, std


TORCHVISION_STYLE = InputStyle("torchvision", (0, 1, 2), 255.0, IMAGENET_MEAN, IMAGENET_STD)
# the seed's preprocess_input(mode="caffe"): RGB -> BGR, minus the BGR means, no scaling
KERAS_STYLE = InputStyle("keras", (2, 1, 0), 1.0, KERAS_BGR_MEAN, (1.0, 1.0, 1.0))
INPUT_STYLES = {"torchvision": TORCHVISION_STYLE, "keras": KERAS_STYLE}


def input_style_for(backbone_style: str) -> InputStyle:
    """The preprocessing that belongs to ``model.backbone_style`` (torchvision | keras)."""
    if backbone_style not in INPUT_STYLES:
        raise ValueError(f"unknown backbone style {backbone_style!r}; choose one of {', '.join(INPUT_STYLES)}")
    return INPUT_STYLES[backbone_style]


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
    mean: tuple[float, float, float] | torch.Tensor | None = None,
    std: tuple[float, float, float] | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    style: InputStyle = TORCHVISION_STYLE,
) -> torch.Tensor:
    """``style``'s preprocessing, computed in float32 then cast to ``dtype``.

    images: uint8 RGB ``[B, 3, H, W]``. The channels are reordered first (BGR for the keras style,
    on uint8), then ``(x / style.scale - mean) / std`` per output channel. mean/std default to the
    style's and may be float32 tensors already on the images' device (shape [3] or [1, 3, 1, 1],
    from ``style.device_tensors``) to avoid a host-to-device copy per call. The torchvision style
    is ``torchvision.transforms.functional.normalize(x.float() / 255, mean, std)``; the keras
    style is keras ``preprocess_input(x, mode="caffe")`` on float32 (the same float32 values).
    """
    _check_images(images)
    mean_t = torch.as_tensor(style.mean if mean is None else mean, dtype=torch.float32, device=images.device)
    std_t = torch.as_tensor(style.std if std is None else std, dtype=torch.float32, device=images.device)
    mean_t, std_t = mean_t.view(1, 3, 1, 1), std_t.view(1, 3, 1, 1)
    if style.bgr:
        images = images.flip(1)  # on uint8: 4x fewer bytes than after the conversion; keeps channels_last
    x = images.to(torch.float32)
    # every divisor is a device tensor: CUDA turns a division by a Python scalar into a multiply
    # by its reciprocal (126 of the 256 grey levels then differ by one ulp from the CPU's exact
    # quotient), while a tensor divisor is an IEEE division on both devices
    if style.scale != 1.0:
        x = x.div_(torch.full((), style.scale, device=images.device))
    return x.sub_(mean_t).div_(std_t).to(dtype)
