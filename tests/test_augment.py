"""Augmentation parameters and the reference image ops (docs/METHOD.md §6.2)."""
import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from alr_fast.pipelines.augment import (
    ERASE_FILL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentParams,
    augment_batch,
    decode_resize,
    draw_augment_params,
    normalize,
)


def scalar_params(rng, n, H, W, pad=10, flip_p=0.5, erase_p=0.5, area=(0.02, 0.4), aspect=(0.3, 1 / 0.3), attempts=100):
    """Plain per-sample loops over scalar draws, in the draw order the module documents."""
    gates = [[rng.random() for _ in range(4)] for _ in range(n)]
    gated = [i for i in range(n) if gates[i][3] < erase_p]
    tries = {i: [(rng.random(), rng.random()) for _ in range(attempts)] for i in gated}
    where = {i: (rng.random(), rng.random()) for i in gated}
    rows = []
    for i, (u_flip, u_cy, u_cx, _) in enumerate(gates):
        rect = (0, 0, 0, 0)
        for u_area, u_aspect in tries.get(i, []):
            target = (area[0] + (area[1] - area[0]) * u_area) * (H * W)
            r = aspect[0] + (aspect[1] - aspect[0]) * u_aspect
            h, w = round(math.sqrt(target * r)), round(math.sqrt(target / r))
            if w < W and h < H:
                rect = (int(where[i][0] * (H - h)), int(where[i][1] * (W - w)), h, w)
                break
        rows.append((int(u_flip < flip_p), int(2 * pad * u_cy), int(2 * pad * u_cx)) + rect)
    return np.array(rows, dtype=np.int64).reshape(n, 7)


@pytest.mark.parametrize("shape", [(384, 128), (40, 16), (7, 5)])
def test_params_equal_scalar_reference(shape):
    H, W = shape
    fast = draw_augment_params(np.random.default_rng(42), 300, H, W)
    slow = scalar_params(np.random.default_rng(42), 300, H, W)
    np.testing.assert_array_equal(fast.to_array(), slow)
    assert fast.flip.dtype == bool and fast.crop_y.dtype == np.int32
    again = AugmentParams.from_array(fast.to_array())
    np.testing.assert_array_equal(again.to_array(), fast.to_array())
    np.testing.assert_array_equal(again.flip, fast.flip)


def test_params_statistics():
    H, W, n = 384, 128, 20000
    p = draw_augment_params(np.random.default_rng(0), n, H, W)
    assert abs(p.flip.mean() - 0.5) < 0.02
    erased = p.erase_h > 0
    assert abs(erased.mean() - 0.5) < 0.02
    for crop in (p.crop_y, p.crop_x):
        counts = np.bincount(crop, minlength=20)
        assert len(counts) == 20  # offsets 0..19 only
        assert np.all(np.abs(counts - n / 20) < 200)
    h, w, y, x = (a[erased].astype(np.int64) for a in (p.erase_h, p.erase_w, p.erase_y, p.erase_x))
    assert np.all((p.erase_w[~erased] == 0) & (p.erase_y[~erased] == 0) & (p.erase_x[~erased] == 0))
    frac = h * w / (H * W)
    assert frac.min() >= 0.02 * 0.9 and frac.max() <= 0.4 * 1.1  # rounding of h and w
    assert frac.min() < 0.022 and frac.max() > 0.37
    ratio = h / w
    assert ratio.min() >= 0.3 * 0.9 and ratio.max() <= (1 / 0.3) * 1.1
    assert np.all((h < H) & (w < W) & (y >= 0) & (x >= 0) & (y + h <= H) & (x + w <= W))
    assert (y + h == H).any() or (y + h).max() >= H - 2  # positions reach the far edge


def test_aspect_is_drawn_linearly():
    # small areas in a big image always fit at the first attempt, so h/w follows r's law:
    # mean 1.817 for U(0.3, 3.33), 1.26 if it were log-uniform
    p = draw_augment_params(np.random.default_rng(1), 20000, 1000, 1000, erase_p=1.0, erase_area=(0.02, 0.05))
    assert np.all(p.erase_h > 0)
    ratio = p.erase_h / p.erase_w
    assert abs(ratio.mean() - (0.3 + 1 / 0.3) / 2) < 0.04


def test_no_pad_and_no_erase():
    p = draw_augment_params(np.random.default_rng(2), 100, 20, 10, pad=0, erase_p=0.0)
    assert not p.crop_y.any() and not p.crop_x.any() and not p.erase_h.any()
    with pytest.raises(ValueError):
        draw_augment_params(np.random.default_rng(2), 5, 0, 10)


def params_of(**cols) -> AugmentParams:
    n = len(next(iter(cols.values())))
    names = ("crop_y", "crop_x", "erase_y", "erase_x", "erase_h", "erase_w")
    full = {name: np.zeros(n, dtype=np.int32) for name in names}
    full.update({k: np.asarray(v, dtype=np.int32) for k, v in cols.items() if k != "flip"})
    return AugmentParams(flip=np.asarray(cols.get("flip", [False] * n), dtype=bool), **full)


def random_images(B=2, H=24, W=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (B, 3, H, W), dtype=torch.uint8, generator=g)  # no zeros, so padding shows


def test_centre_crop_is_identity_and_flip_is_horizontal():
    img = random_images()
    out = augment_batch(img, params_of(crop_y=[10, 10], crop_x=[10, 10]))
    assert torch.equal(out, img)
    out = augment_batch(img, params_of(flip=[True, False], crop_y=[10, 10], crop_x=[10, 10]))
    assert torch.equal(out[0], img[0].flip(-1)) and torch.equal(out[1], img[1])


def test_corner_crops_shift_and_zero_fill():
    img = random_images()
    out = augment_batch(img, params_of(crop_y=[0, 20], crop_x=[0, 20]))
    assert torch.equal(out[0, :, 10:, 10:], img[0, :, :-10, :-10])
    assert not out[0, :, :10].any() and not out[0, :, :, :10].any()
    assert torch.equal(out[1, :, :-10, :-10], img[1, :, 10:, 10:])
    assert not out[1, :, -10:].any() and not out[1, :, :, -10:].any()


def test_flip_happens_before_pad_and_crop():
    img = random_images(B=1)
    out = augment_batch(img, params_of(flip=[True], crop_y=[10], crop_x=[13]))
    assert torch.equal(out[0, :, :, :-3], img[0].flip(-1)[:, :, 3:])
    assert not out[0, :, :, -3:].any()  # zeros on the right: padding came after the flip


def test_erase_fills_exactly_the_rectangle():
    img = random_images(B=2)
    rect = dict(erase_y=[2, 0], erase_x=[3, 0], erase_h=[5, 0], erase_w=[4, 0])
    out = augment_batch(img, params_of(crop_y=[10, 10], crop_x=[10, 10], **rect))
    inside = torch.zeros(24, 16, dtype=torch.bool)
    inside[2:7, 3:7] = True
    for c, value in enumerate(ERASE_FILL):
        assert torch.all(out[0, c][inside] == value)
    assert torch.equal(out[0][:, ~inside], img[0][:, ~inside])
    assert torch.equal(out[1], img[1])


def numpy_augment(images: np.ndarray, p: AugmentParams, pad: int) -> np.ndarray:
    out = []
    H, W = images.shape[2:]
    for i, img in enumerate(images):
        img = img[:, :, ::-1] if p.flip[i] else img
        img = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
        img = img[:, p.crop_y[i] : p.crop_y[i] + H, p.crop_x[i] : p.crop_x[i] + W].copy()
        y, x, h, w = p.erase_y[i], p.erase_x[i], p.erase_h[i], p.erase_w[i]
        img[:, y : y + h, x : x + w] = np.array(ERASE_FILL, dtype=np.uint8)[:, None, None]
        out.append(img)
    return np.stack(out)


@pytest.mark.parametrize("pad", [10, 3])
def test_augment_batch_matches_numpy_on_random_params(pad):
    img = random_images(B=16, H=30, W=14, seed=pad)
    p = draw_augment_params(np.random.default_rng(pad), 16, 30, 14, pad=pad)
    assert p.flip.any() and (p.erase_h > 0).any()
    np.testing.assert_array_equal(augment_batch(img, p, pad=pad).numpy(), numpy_augment(img.numpy(), p, pad))
    with pytest.raises(ValueError, match="crop offsets"):
        augment_batch(img, p, pad=0)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        augment_batch(img.float(), p, pad=pad)


def test_normalize_matches_torchvision():
    img = random_images(B=3, seed=7)
    expected = TF.normalize(img.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(normalize(img), expected)
    half = normalize(img, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=0.02, rtol=0.01)
    with pytest.raises(ValueError, match=r"\(3, 24, 16\)"):
        normalize(img[0])


def test_normalize_divides_only_by_tensors():
    """CUDA computes x / python_scalar as x * (1 / scalar), one ulp off the CPU's exact quotient for
    126 grey levels; a tensor divisor is a true division on both devices, so the GPU cache and
    loaders give the CPU's values. Recorded on the CPU: every division in normalize takes a tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    divisors = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.div, torch.ops.aten.div_):
                divisors.append(args[1])
            return func(*args, **(kwargs or {}))

    img = random_images(B=2, seed=3)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for m, s in ((IMAGENET_MEAN, IMAGENET_STD), (mean, std)):
        with Record():
            normalize(img, m, s)
    assert len(divisors) == 4 and all(isinstance(d, torch.Tensor) for d in divisors), divisors
    # all 256 grey levels: the same float32 as the exact quotient
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    expected = (levels.double() / 255 - mean.double()) / std.double()
    torch.testing.assert_close(normalize(levels).double(), expected, atol=1e-6, rtol=0)


def numpy_bilinear(src: np.ndarray, H: int, W: int) -> np.ndarray:
    """cv2 INTER_LINEAR semantics: half-pixel centres, edge clamping, float math, round."""
    h, w = src.shape[:2]

    def axis(out_size, in_size):
        s = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0)
        i0 = np.minimum(np.floor(s).astype(int), in_size - 1)
        return i0, np.minimum(i0 + 1, in_size - 1), s - i0

    y0, y1, fy = axis(H, h)
    x0, x1, fx = axis(W, w)
    src = src.astype(np.float64)
    top = src[y0][:, x0] * (1 - fx)[None, :, None] + src[y0][:, x1] * fx[None, :, None]
    bottom = src[y1][:, x0] * (1 - fx)[None, :, None] + src[y1][:, x1] * fx[None, :, None]
    out = top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def jpeg_bytes(h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("src_shape", [(40, 24), (37, 23), (200, 100), (96, 20)])
def test_decode_resize_matches_pil_and_numpy_bilinear(src_shape):
    data = jpeg_bytes(*src_shape, seed=src_shape[0])
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    out = decode_resize(data, 96, 48)
    assert out.dtype == torch.uint8 and out.shape == (3, 96, 48)
    diff = np.abs(out.permute(1, 2, 0).numpy().astype(int) - numpy_bilinear(pil, 96, 48).astype(int))
    assert diff.max() <= 1


def test_decode_resize_keeps_matching_size():
    data = jpeg_bytes(32, 16, seed=3)
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode_resize(data, 32, 16).permute(1, 2, 0).numpy(), pil)
