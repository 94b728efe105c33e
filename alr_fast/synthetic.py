"""Synthetic re-ID datasets written as real JPEGs in the three native layouts.

Identities are learnable but not trivial. Each identity has upper- and lower-body clothing colours
with a pattern (plain, horizontal stripes, vertical stripes, checks), a skin and hair colour, maybe
a hat and a bag, and its own body proportions. Each camera has an illumination gain and colour
cast, a blur, a person scale, a background (colour and texture) and a noise level. Each image adds
small pose and position jitter and a walking phase. The same identity seen by two cameras shares
its clothing but not its colours' appearance, background or sharpness.

Everything is drawn from one ``numpy.random.Generator`` in a fixed order, and the JPEGs are
encoded with a fixed quality and chroma subsampling, so one seed gives byte-identical files.
The dataset is written into a hidden temporary folder next to its destination and renamed into
place at the end, so an interrupted run never leaves a half dataset that a reader would accept.
"""
from __future__ import annotations

import colorsys
import json
import os
import pathlib
import shutil
import uuid
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from alr_fast.datasets import DUKEMTMC_REID_FOLDER, MARKET1501_FOLDER, MSMT17_FOLDER

LAYOUT_FOLDERS = {
    "market1501": MARKET1501_FOLDER,
    "dukemtmc_reid": DUKEMTMC_REID_FOLDER,
    "msmt17": MSMT17_FOLDER,
}
# The camera field of a file name has one digit in Market and Duke, two in MSMT17.
_MAX_CAMERAS = {"market1501": 9, "dukemtmc_reid": 9, "msmt17": 99}
MANIFEST_NAME = "synthetic.json"
JPEG_SUBSAMPLING = 2  # 4:2:0, as in the published datasets
_MSMT_DATES = ("0113", "0114", "0302", "0303")
_MSMT_TIMES = ("morning", "noon", "afternoon")

PLAIN, HSTRIPES, VSTRIPES, CHECKS = range(4)


@dataclass(frozen=True)
class _Identity:
    """Appearance of one person; lengths are fractions of the person's height."""

    upper: np.ndarray  # RGB in [0, 255]
    upper2: np.ndarray  # second colour of the upper pattern
    upper_pattern: int
    lower: np.ndarray
    lower2: np.ndarray
    lower_pattern: int
    period: float  # stripe / check period
    skin: np.ndarray
    hair: np.ndarray
    shoes: np.ndarray
    hat: np.ndarray | None
    bag: np.ndarray | None
    bag_side: int  # +1 right, -1 left
    height: float  # multiplies the camera's person scale
    width: float  # shoulder width
    torso: float  # torso length


@dataclass(frozen=True)
class _Camera:
    gain: float
    cast: np.ndarray  # per-channel multiplier
    blur: float  # Gaussian radius in pixels
    scale: float  # person height / image height
    noise: float  # std of additive noise, in [0, 255] units
    background: np.ndarray
    background2: np.ndarray
    floor: np.ndarray
    floor_level: float  # fraction of the image height where the floor starts
    texture: int  # 0 gradient, 1 horizontal bands, 2 vertical bands, 3 blotches
    texture_period: float  # pixels


@dataclass(frozen=True)
class _Shot:
    """One image to write: where it goes and what it shows."""

    split: str  # train, query, gallery
    pid: int
    camera: int  # 0-based
    identity: _Identity | None  # None: junk
    name: str = ""  # file name, filled in per layout
    folder: str = ""  # folder relative to the dataset folder


# --------------------------------------------------------------------------------------------
# Drawing the identities and cameras
# --------------------------------------------------------------------------------------------
def _colour(rng: np.random.Generator, grey_prob: float = 0.2) -> np.ndarray:
    if rng.random() < grey_prob:
        v = rng.uniform(0.08, 0.95)
        return np.array([v, v, v], dtype=np.float32) * 255
    h, s, v = rng.random(), rng.uniform(0.35, 1.0), rng.uniform(0.3, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255


def _contrast_colour(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A pattern colour clearly different from ``base``."""
    for _ in range(20):
        other = _colour(rng)
        if np.abs(other - base).sum() > 150:
            return other
    return 255 - base


def _draw_identity(rng: np.random.Generator) -> _Identity:
    upper = _colour(rng)
    lower = _colour(rng, grey_prob=0.35)
    skin_tone = rng.uniform(0.25, 0.95)
    skin = np.array([235, 200, 170], dtype=np.float32) * skin_tone + np.array([20, 10, 5], dtype=np.float32)
    return _Identity(
        upper=upper,
        upper2=_contrast_colour(rng, upper),
        upper_pattern=int(rng.choice(4, p=[0.4, 0.2, 0.2, 0.2])),
        lower=lower,
        lower2=_contrast_colour(rng, lower),
        lower_pattern=int(rng.choice(4, p=[0.7, 0.1, 0.1, 0.1])),
        period=float(rng.uniform(0.035, 0.065)),
        skin=skin,
        hair=_colour(rng, grey_prob=0.7) * 0.6,
        shoes=_colour(rng, grey_prob=0.6) * 0.5,
        hat=_colour(rng) if rng.random() < 0.25 else None,
        bag=_colour(rng) if rng.random() < 0.35 else None,
        bag_side=int(rng.choice([-1, 1])),
        height=float(rng.uniform(0.9, 1.0)),
        width=float(rng.uniform(0.85, 1.15)),
        torso=float(rng.uniform(0.32, 0.42)),
    )


def _draw_camera(rng: np.random.Generator) -> _Camera:
    background = _colour(rng, grey_prob=0.4) * 0.8 + 25
    return _Camera(
        gain=float(rng.uniform(0.7, 1.25)),
        cast=rng.uniform(0.85, 1.15, size=3).astype(np.float32),
        blur=float(rng.uniform(0.0, 1.2)),
        scale=float(rng.uniform(0.78, 0.95)),
        noise=float(rng.uniform(2.0, 7.0)),
        background=background,
        background2=np.clip(background + rng.uniform(-60, 60, size=3), 0, 255).astype(np.float32),
        floor=_colour(rng, grey_prob=0.7) * 0.7 + 30,
        floor_level=float(rng.uniform(0.72, 0.88)),
        texture=int(rng.integers(4)),
        texture_period=float(rng.uniform(6.0, 20.0)),
    )


# --------------------------------------------------------------------------------------------
# Rendering (float32 RGB canvas of shape [H, W, 3], values in [0, 255])
# --------------------------------------------------------------------------------------------
def _render_background(camera: _Camera, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    height, width = yy.shape
    phase = rng.uniform(0, camera.texture_period)
    if camera.texture == 0:
        mix = yy / height
    elif camera.texture == 1:
        mix = ((yy + phase) // camera.texture_period) % 2
    elif camera.texture == 2:
        mix = ((xx + phase) // camera.texture_period) % 2
    else:
        coarse = rng.random((height // 8 + 2, width // 8 + 2)).astype(np.float32)
        mix = np.kron(coarse, np.ones((8, 8), dtype=np.float32))[:height, :width]
    mix = mix.astype(np.float32)[..., None]
    canvas = camera.background * (1 - mix) + camera.background2 * mix
    floor_y = camera.floor_level * height + rng.uniform(-2, 2)
    canvas[yy[:, 0] >= floor_y] = camera.floor
    return canvas


def _pattern_mask(kind: int, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Where the second colour of a pattern shows; ``u``, ``v`` are body coordinates."""
    if kind == HSTRIPES:
        return (np.floor(u / period) % 2).astype(bool)
    if kind == VSTRIPES:
        return (np.floor(v / period) % 2).astype(bool)
    if kind == CHECKS:
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 1
    return np.zeros(u.shape, dtype=bool)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    canvas[mask] = colour


def _render_person(
    canvas: np.ndarray,
    person: _Identity,
    rng: np.random.Generator,
    yy: np.ndarray,
    xx: np.ndarray,
    scale: float,
    cx: float,
    feet: float,
) -> None:
    """Draws ``person`` onto ``canvas``: person height ``scale`` x image height, feet at ``feet``."""
    height = yy.shape[0]
    ph = scale * height * person.height * rng.uniform(0.97, 1.03)
    top = feet - ph
    flip = int(rng.choice([-1, 1]))  # facing direction: which side the bag hangs
    pw = 0.34 * ph * person.width  # shoulder width
    u, v = (yy - top) / ph, (xx - cx) / ph  # body coordinates for the patterns
    lean = rng.uniform(-0.02, 0.02) * ph  # upper body shifted against the legs

    torso_top, torso_bottom = top + 0.15 * ph, top + (0.15 + person.torso) * ph
    # Legs, with a walking phase that spreads or closes them.
    stride = rng.uniform(0.0, 0.06) * ph
    leg_w = 0.17 * ph * person.width
    gap = 0.015 * ph
    shoe_top = feet - 0.045 * ph
    legs_y = (yy >= torso_bottom - 1) & (yy < feet)
    for side in (-1, 1):
        centre = cx + side * (gap / 2 + leg_w / 2 + stride / 2)
        leg = legs_y & (np.abs(xx - centre) < leg_w / 2)
        trousers = leg & (yy < shoe_top)
        _paint(canvas, trousers, person.lower)
        _paint(canvas, trousers & _pattern_mask(person.lower_pattern, u, v, person.period), person.lower2)
        _paint(canvas, leg & (yy >= shoe_top), person.shoes)
    # Torso, slightly narrower at the waist.
    taper = 1 - 0.12 * np.clip((yy - torso_top) / max(torso_bottom - torso_top, 1), 0, 1)
    torso = (yy >= torso_top) & (yy < torso_bottom) & (np.abs(xx - cx - lean) < pw / 2 * taper)
    _paint(canvas, torso, person.upper)
    _paint(canvas, torso & _pattern_mask(person.upper_pattern, u, v, person.period), person.upper2)
    # Arms swing opposite to the legs; sleeves a shade darker than the shirt.
    arm_w = 0.065 * ph
    for side in (-1, 1):
        swing = rng.uniform(-0.04, 0.04) * ph
        centre = cx + lean + side * (pw / 2 + arm_w / 2)
        arm_end = torso_top + 0.85 * (torso_bottom - torso_top) + swing
        arm = (yy >= torso_top + 0.01 * ph) & (yy < arm_end) & (np.abs(xx - centre) < arm_w / 2)
        _paint(canvas, arm, person.upper * 0.85)
        hand = (yy >= arm_end) & (yy < arm_end + 0.05 * ph) & (np.abs(xx - centre) < arm_w / 2)
        _paint(canvas, hand, person.skin)
    # Head with hair or a hat.
    hx, hy = cx + lean + rng.uniform(-0.01, 0.01) * ph, top + 0.075 * ph
    rx, ry = 0.055 * ph, 0.075 * ph
    head = ((xx - hx) / rx) ** 2 + ((yy - hy) / ry) ** 2 <= 1
    _paint(canvas, head, person.skin)
    if person.hat is not None:
        crown = head & (yy < hy - 0.15 * ry)
        brim = (np.abs(yy - (hy - 0.15 * ry)) < 0.06 * ph * 0.5) & (np.abs(xx - hx) < rx * 1.35)
        _paint(canvas, crown | brim, person.hat)
    else:
        _paint(canvas, head & (yy < hy - 0.35 * ry), person.hair)
    # Bag at the hip on the side the person faces.
    if person.bag is not None:
        side = person.bag_side * flip
        bx = cx + lean + side * (pw / 2 + 0.04 * ph)
        bag = (np.abs(xx - bx) < 0.07 * ph) & (yy >= torso_top + 0.55 * (torso_bottom - torso_top))
        bag &= yy < torso_bottom + 0.08 * ph
        _paint(canvas, bag, person.bag)


def _render_shot(
    shot: _Shot, camera: _Camera, rng: np.random.Generator, size: tuple[int, int], grid: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """The uint8 RGB image [H, W, 3] of one shot."""
    height, width = size
    yy, xx = grid
    canvas = _render_background(camera, rng, yy, xx)
    cx = width / 2 + rng.uniform(-0.06, 0.06) * width
    feet = height * rng.uniform(0.955, 0.985)
    scale = camera.scale * rng.uniform(0.96, 1.04)
    if shot.identity is not None:
        _render_person(canvas, shot.identity, rng, yy, xx, scale, cx, feet)
    else:
        # Junk: a bad detection, i.e. mostly background, a person cut by the border, or one far away.
        kind = int(rng.integers(3))
        if kind > 0:
            stranger = _draw_identity(rng)
            if kind == 1:
                cx += float(rng.choice([-1, 1])) * rng.uniform(0.45, 0.7) * width
            else:
                scale *= rng.uniform(0.3, 0.45)
            _render_person(canvas, stranger, rng, yy, xx, scale, cx, feet)
    light = camera.gain * rng.uniform(0.95, 1.05)
    canvas = np.clip(canvas * (light * camera.cast), 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas)
    if camera.blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(camera.blur))
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, camera.noise, size=(height, width, 3))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Planning the splits and naming the files
# --------------------------------------------------------------------------------------------
def _plan_identity_shots(
    rng: np.random.Generator,
    split: str,
    pid: int,
    identity: _Identity,
    num_cameras: int,
    min_cameras_per_id: int,
    images_per_camera: int,
) -> list[_Shot]:
    """Shots of one identity over a random set of cameras; test ids get one query per camera."""
    count = int(rng.integers(min_cameras_per_id, num_cameras + 1))
    cameras = np.sort(rng.choice(num_cameras, size=count, replace=False))
    shots = []
    for cam in cameras:
        query_at = int(rng.integers(images_per_camera)) if split == "test" else -1
        for k in range(images_per_camera):
            kind = "train" if split == "train" else ("query" if k == query_at else "gallery")
            shots.append(_Shot(kind, pid, int(cam), identity))
    return shots


def _draw_pids(rng: np.random.Generator, layout: str, num_train: int, num_test: int, num_extra: int):
    """(train pids, test pids, extra gallery-only pids) in the numbering of ``layout``.

    Market and Duke draw distinct four-digit pids at random (train and test interleave, as in
    the published sets); MSMT17 numbers train and test from 0 in separate spaces.
    """
    if layout == "msmt17":
        return (
            list(range(num_train)),
            list(range(num_test)),
            list(range(num_test, num_test + num_extra)),
        )
    pool = rng.choice(np.arange(1, 10000), size=num_train + num_test + num_extra, replace=False)
    train = sorted(int(p) for p in pool[:num_train])
    test = sorted(int(p) for p in pool[num_train : num_train + num_test])
    extra = sorted(int(p) for p in pool[num_train + num_test :])
    return train, test, extra


def _name_shots(rng: np.random.Generator, layout: str, shots: list[_Shot], num_cameras: int) -> list[_Shot]:
    """Each shot with its file name and folder, following the layout's naming scheme."""
    frames = rng.integers(1, 5000, size=num_cameras)  # per-camera frame counter: unique names
    per_pid_index: dict[tuple[str, int], int] = {}
    named = []
    for shot in shots:
        frames[shot.camera] += rng.integers(1, 25)
        frame, cam = int(frames[shot.camera]), shot.camera + 1
        if layout == "market1501":
            pid = "-1" if shot.pid == -1 else f"{shot.pid:04d}"
            name = f"{pid}_c{cam}s{rng.integers(1, 7)}_{frame:06d}_{rng.integers(1, 9):02d}.jpg"
            folder = {"train": "bounding_box_train", "gallery": "bounding_box_test", "query": "query"}[shot.split]
        elif layout == "dukemtmc_reid":
            name = f"{shot.pid:04d}_c{cam}_f{frame:07d}.jpg"
            folder = {"train": "bounding_box_train", "gallery": "bounding_box_test", "query": "query"}[shot.split]
        else:
            space = "mask_train_v2" if shot.split == "train" else "mask_test_v2"
            index = per_pid_index.get((space, shot.pid), 0)
            per_pid_index[(space, shot.pid)] = index + 1
            when = f"{rng.choice(_MSMT_DATES)}{rng.choice(_MSMT_TIMES)}"
            name = f"{shot.pid:04d}_{index:03d}_{cam:02d}_{when}_{frame % 10000:04d}_{rng.integers(3)}.jpg"
            folder = f"{space}/{shot.pid:04d}"
        named.append(_Shot(shot.split, shot.pid, shot.camera, shot.identity, name, folder))
    return named


def _write_msmt17_lists(rng: np.random.Generator, folder: pathlib.Path, shots: list[_Shot]) -> dict[str, int]:
    """The four list files; one random image of each training identity goes to list_val."""
    by_pid: dict[int, list[str]] = {}
    lists: dict[str, list[str]] = {"list_train.txt": [], "list_val.txt": [], "list_query.txt": [], "list_gallery.txt": []}
    for shot in shots:
        line = f"{shot.folder.split('/')[1]}/{shot.name} {shot.pid}"
        if shot.split == "train":
            by_pid.setdefault(shot.pid, []).append(line)
        else:
            lists[f"list_{shot.split}.txt"].append(line)
    for pid in sorted(by_pid):
        lines = by_pid[pid]
        val = int(rng.integers(len(lines)))
        lists["list_val.txt"].append(lines[val])
        lists["list_train.txt"].extend(line for k, line in enumerate(lines) if k != val)
    for name, lines in lists.items():
        (folder / name).write_text("".join(f"{line}\n" for line in sorted(lines)), encoding="utf-8")
    return {name[len("list_") : -len(".txt")]: len(lines) for name, lines in lists.items()}


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
# smallest allowed value of each count: every query needs a match in another camera (2 cameras,
# 2 images per camera: one query, one gallery image)
ARGUMENT_MINIMUMS = {
    "num_train_ids": 1, "num_test_ids": 1, "num_cameras": 2, "images_per_camera": 2, "num_distractors": 0,
    "num_junk": 0,
}


def _check_arguments(
    layout: str,
    num_train_ids: int,
    num_test_ids: int,
    num_cameras: int,
    min_cameras_per_id: int,
    images_per_camera: int,
    num_distractors: int,
    num_junk: int,
    image_size: tuple[int, int],
    quality: int,
) -> None:
    if layout not in LAYOUT_FOLDERS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUT_FOLDERS)}")
    for name, value in (
        ("num_train_ids", num_train_ids),
        ("num_test_ids", num_test_ids),
        ("num_cameras", num_cameras),
        ("images_per_camera", images_per_camera),
        ("num_distractors", num_distractors),
        ("num_junk", num_junk),
    ):
        low = ARGUMENT_MINIMUMS[name]
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if num_cameras > _MAX_CAMERAS[layout]:
        raise ValueError(f"num_cameras must be <= {_MAX_CAMERAS[layout]} for {layout} file names, got {num_cameras}")
    if not 2 <= min_cameras_per_id <= num_cameras:
        raise ValueError(f"min_cameras_per_id must lie in [2, num_cameras={num_cameras}], got {min_cameras_per_id}")
    if num_junk and layout != "market1501":
        raise ValueError(f"num_junk must be 0 for {layout}: junk images (pid -1) exist only in Market-1501")
    if layout != "msmt17" and num_train_ids + num_test_ids + num_distractors > 9999:
        raise ValueError(f"{layout} pids have four digits: at most 9999 identities, distractors included")
    if layout == "msmt17" and max(num_train_ids, num_test_ids + num_distractors) > 10000:
        raise ValueError("msmt17 pids have four digits: at most 10000 identities per split")
    if layout == "msmt17" and num_cameras * images_per_camera > 1000:
        raise ValueError("msmt17 file names number the images of a pid with three digits: at most 1000")
    if len(image_size) != 2 or image_size[0] < 32 or image_size[1] < 16:
        raise ValueError(f"image_size is (height, width) with height >= 32 and width >= 16, got {image_size!r}")
    if not 1 <= quality <= 95:
        raise ValueError(f"quality must lie in [1, 95], got {quality!r}")


def _claim_destination(out_root: pathlib.Path, folder_name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(final folder, fresh temporary folder beside it); refuses an existing non-empty folder."""
    final = out_root / folder_name
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final} already exists and is not empty; refusing to write a synthetic dataset there")
    out_root.mkdir(parents=True, exist_ok=True)
    staging = out_root / f".{folder_name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return final, staging


def make_synthetic(
    out_root: str | os.PathLike,
    layout: str,
    *,
    num_train_ids: int = 32,
    num_test_ids: int = 32,
    num_cameras: int = 4,
    images_per_camera: int = 3,
    min_cameras_per_id: int = 2,
    num_distractors: int = 16,
    num_junk: int | None = None,
    image_size: tuple[int, int] = (128, 64),
    seed: int = 0,
    quality: int = 90,
    progress: bool = False,
) -> pathlib.Path:
    """Writes a synthetic dataset in the native ``layout`` under ``out_root``; returns its folder.

    Each identity appears in ``min_cameras_per_id``..``num_cameras`` cameras (drawn per identity)
    with ``images_per_camera`` images in each. For every test identity one image per camera is a
    query and the others go to the gallery, so every query has a match in another camera.
    ``num_distractors`` gallery images show people absent from the query: pid 0 in Market-1501,
    fresh gallery-only pids in DukeMTMC-reID and MSMT17. ``num_junk`` (Market-1501 only, default
    16 there) adds pid -1 bad detections to ``bounding_box_test``. MSMT17 puts one image of each
    training identity in ``list_val.txt``. ``image_size`` is (height, width) in pixels. A
    ``synthetic.json`` manifest with the parameters and counts goes into the dataset folder.

    Raises ``FileExistsError`` when the dataset folder exists and is not empty.
    """
    if num_junk is None:
        num_junk = 16 if layout == "market1501" else 0
    _check_arguments(
        layout, num_train_ids, num_test_ids, num_cameras, min_cameras_per_id, images_per_camera,
        num_distractors, num_junk, tuple(image_size), quality,
    )
    height, width = int(image_size[0]), int(image_size[1])
    final, staging = _claim_destination(pathlib.Path(out_root), LAYOUT_FOLDERS[layout])
    try:
        rng = np.random.default_rng(seed)
        cameras = [_draw_camera(rng) for _ in range(num_cameras)]
        num_extra_ids = 0 if layout == "market1501" else num_distractors
        train_pids, test_pids, extra_pids = _draw_pids(rng, layout, num_train_ids, num_test_ids, num_extra_ids)
        shots: list[_Shot] = []
        for split, pids in (("train", train_pids), ("test", test_pids)):
            for pid in pids:
                shots += _plan_identity_shots(
                    rng, split, pid, _draw_identity(rng), num_cameras, min_cameras_per_id, images_per_camera
                )
        for k in range(num_distractors):
            pid = 0 if layout == "market1501" else extra_pids[k]
            shots.append(_Shot("gallery", pid, int(rng.integers(num_cameras)), _draw_identity(rng)))
        shots += [_Shot("gallery", -1, int(rng.integers(num_cameras)), None) for _ in range(num_junk)]
        shots = _name_shots(rng, layout, shots, num_cameras)

        grid = tuple(a.astype(np.float32) + 0.5 for a in np.mgrid[0:height, 0:width])
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(shots), desc=f"synthetic {layout}", unit="img")
        for shot in shots:
            pixels = _render_shot(shot, cameras[shot.camera], rng, (height, width), grid)
            target = staging / shot.folder
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(
                target / shot.name, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING, optimize=False
            )
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        if layout == "msmt17":
            list_counts = _write_msmt17_lists(rng, staging, shots)
        else:
            for sub in ("bounding_box_train", "bounding_box_test", "query"):
                (staging / sub).mkdir(exist_ok=True)
            list_counts = None
        parameters = {
            "num_train_ids": num_train_ids,
            "num_test_ids": num_test_ids,
            "num_cameras": num_cameras,
            "images_per_camera": images_per_camera,
            "min_cameras_per_id": min_cameras_per_id,
            "num_distractors": num_distractors,
            "num_junk": num_junk,
            "image_size": [height, width],
            "seed": seed,
            "quality": quality,
        }
        manifest = _manifest(layout, shots, list_counts, parameters)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        try:
            os.rename(staging, final)  # replaces an empty folder atomically; fails on a non-empty one
        except OSError as err:
            raise FileExistsError(f"{final} appeared while the synthetic dataset was written: {err}") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # only the folder this call created
        raise
    return final


def _manifest(layout: str, shots: list[_Shot], list_counts: dict[str, int] | None, parameters: dict) -> dict:
    counts = {
        "train_images": sum(s.split == "train" for s in shots),
        "train_ids": len({s.pid for s in shots if s.split == "train"}),
        "query_images": sum(s.split == "query" for s in shots),
        "query_ids": len({s.pid for s in shots if s.split == "query"}),
        "gallery_images": sum(s.split == "gallery" and s.pid != -1 for s in shots),
        "junk_images": sum(s.pid == -1 for s in shots),
    }
    if list_counts is not None:
        counts["msmt17_lists"] = list_counts
    return {"generator": "alr_fast.synthetic", "layout": layout, "parameters": parameters, "counts": counts}


def synthetic_summary(path: str | os.PathLike) -> str:
    """One line describing the synthetic dataset folder ``path`` (as ``make_synthetic`` returns it)."""
    manifest_path = pathlib.Path(path) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing: {path} was not written by make_synthetic")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    p, c = manifest["parameters"], manifest["counts"]
    junk = f", {c['junk_images']} junk (pid -1, dropped by the reader)" if c["junk_images"] else ""
    lists = ""
    if "msmt17_lists" in c:
        lists = f"; list_train {c['msmt17_lists']['train']} + list_val {c['msmt17_lists']['val']}"
    return (
        f"synthetic {manifest['layout']} (seed {p['seed']}) at {path}: "
        f"train {c['train_images']} images / {c['train_ids']} ids{lists}, "
        f"query {c['query_images']} / {c['query_ids']} ids, "
        f"gallery {c['gallery_images']} incl. {p['num_distractors']} distractors{junk}; "
        f"{p['num_cameras']} cameras, {p['image_size'][0]}x{p['image_size'][1]} JPEG q{p['quality']}"
    )
