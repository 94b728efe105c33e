"""The synthetic generator, read back through the dataset readers."""
from __future__ import annotations

import collections
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from alr_fast.datasets import (
    DUKEMTMC_REID_PATTERN,
    MARKET1501_PATTERN,
    MSMT17_PATTERN,
    read_dataset,
    read_msmt17,
)
from alr_fast.synthetic import MANIFEST_NAME, make_synthetic, synthetic_summary

# Small enough to generate in a fraction of a second, large enough to have every case.
SMALL = dict(num_train_ids=6, num_test_ids=5, num_cameras=3, images_per_camera=2, num_distractors=3)
LAYOUTS = ("market1501", "dukemtmc_reid", "msmt17")
PATTERNS = {"market1501": MARKET1501_PATTERN, "dukemtmc_reid": DUKEMTMC_REID_PATTERN, "msmt17": MSMT17_PATTERN}


def _small(tmp_path: pathlib.Path, layout: str, **overrides) -> pathlib.Path:
    kwargs = dict(SMALL, num_junk=4 if layout == "market1501" else 0)
    kwargs.update(overrides)
    return make_synthetic(tmp_path, layout, **kwargs)


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=LAYOUTS)
def small_dataset(request, tmp_path_factory):
    """(layout, folder, dataset) for a small dataset where every identity is seen by every camera."""
    layout = request.param
    folder = _small(tmp_path_factory.mktemp(layout), layout, min_cameras_per_id=SMALL["num_cameras"])
    return layout, folder, read_dataset(layout, folder.parent)


def test_counts_follow_the_parameters(small_dataset):
    layout, folder, ds = small_dataset
    cams, per_cam = SMALL["num_cameras"], SMALL["images_per_camera"]
    assert len(ds.train) == SMALL["num_train_ids"] * cams * per_cam
    assert len(ds.query) == SMALL["num_test_ids"] * cams  # one query per identity and camera
    assert len(ds.gallery) == SMALL["num_test_ids"] * cams * (per_cam - 1) + SMALL["num_distractors"]
    assert ds.num_classes == SMALL["num_train_ids"]
    assert ds.root == str(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["counts"]["train_images"] == len(ds.train)
    assert manifest["counts"]["query_images"] == len(ds.query)
    assert manifest["counts"]["gallery_images"] == len(ds.gallery)


def test_pids_camids_and_names(small_dataset):
    layout, folder, ds = small_dataset
    for rec in ds.train + ds.query + ds.gallery:
        name = os.path.basename(rec.path)
        assert PATTERNS[layout].match(name), name
        assert 1 <= rec.camid <= SMALL["num_cameras"]
        assert os.path.isfile(rec.path)
    query_pids = {r.pid for r in ds.query}
    gallery_pids = collections.Counter(r.pid for r in ds.gallery)
    assert len(query_pids) == SMALL["num_test_ids"]
    assert query_pids <= set(gallery_pids)
    extra = set(gallery_pids) - query_pids
    if layout == "market1501":
        assert extra == {0} and gallery_pids[0] == SMALL["num_distractors"]
    else:  # distractors are gallery-only identities with one image each
        assert len(extra) == SMALL["num_distractors"] and all(gallery_pids[p] == 1 for p in extra)
    if layout != "msmt17":  # Market and Duke number train and test identities in one space
        assert not {r.pid for r in ds.train} & (query_pids | set(gallery_pids))
    # One query per (identity, camera), each with a gallery match from another camera.
    assert len({(r.pid, r.camid) for r in ds.query}) == len(ds.query)
    gallery_cams = collections.defaultdict(set)
    for r in ds.gallery:
        gallery_cams[r.pid].add(r.camid)
    assert all(gallery_cams[r.pid] - {r.camid} for r in ds.query)


def test_labels_encode_sorted_training_pids(small_dataset):
    _, _, ds = small_dataset
    pids = np.array([r.pid for r in ds.train])
    np.testing.assert_array_equal(ds.classes, np.array(sorted(set(pids.tolist()))))
    expected = np.array([sorted(set(pids.tolist())).index(p) for p in pids])
    np.testing.assert_array_equal(ds.train_labels, expected)
    assert ds.train_labels.min() == 0 and ds.train_labels.max() == ds.num_classes - 1


def test_images_are_decodable_jpegs_of_the_requested_size(small_dataset):
    _, _, ds = small_dataset
    with Image.open(ds.gallery[0].path) as image:
        assert image.format == "JPEG"
        assert image.size == (64, 128)  # PIL gives (width, height)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # not a blank picture


def test_market_junk_is_on_disk_and_dropped(tmp_path):
    folder = _small(tmp_path, "market1501", num_junk=5)
    junk = sorted((folder / "bounding_box_test").glob("-1_*.jpg"))
    distractors = sorted((folder / "bounding_box_test").glob("0000_*.jpg"))
    assert len(junk) == 5 and len(distractors) == SMALL["num_distractors"]
    ds = read_dataset("market1501", tmp_path)
    assert all(r.pid != -1 for r in ds.train + ds.query + ds.gallery)
    assert sum(r.pid == 0 for r in ds.gallery) == SMALL["num_distractors"]
    on_disk = len(list((folder / "bounding_box_test").glob("*.jpg")))
    assert len(ds.gallery) == on_disk - 5


def test_msmt17_train_is_list_train_then_list_val(tmp_path):
    folder = _small(tmp_path, "msmt17")
    ds = read_msmt17(folder)  # the dataset folder itself is accepted as root

    def entries(name):
        lines = (folder / name).read_text().splitlines()
        return [(line.split()[0], int(line.split()[1])) for line in lines]

    train, val = entries("list_train.txt"), entries("list_val.txt")
    expected = [(str(folder / "mask_train_v2" / rel), pid) for rel, pid in train + val]
    assert [(r.path, r.pid) for r in ds.train] == expected
    assert len(val) == SMALL["num_train_ids"]  # one validation image per training identity
    assert {pid for _, pid in val} == {pid for _, pid in train}
    assert {r.pid for r in ds.train} == set(range(SMALL["num_train_ids"]))
    # Test pids have their own numbering space starting at 0, under mask_test_v2.
    assert {r.pid for r in ds.query} == set(range(SMALL["num_test_ids"]))
    assert all("/mask_test_v2/" in r.path for r in ds.query + ds.gallery)
    # The image index field counts the images of a pid folder.
    for pid_folder in (folder / "mask_train_v2").iterdir():
        indices = sorted(int(p.name.split("_")[1]) for p in pid_folder.iterdir())
        assert indices == list(range(len(indices)))


def test_cameras_per_identity_vary_but_never_below_two(tmp_path):
    ds = read_dataset("dukemtmc_reid", make_synthetic(tmp_path, "dukemtmc_reid", num_cameras=5, seed=3).parent)
    cams = collections.defaultdict(set)
    for r in ds.train + ds.query + ds.gallery:
        cams[r.pid].add(r.camid)
    counts = [len(cams[p]) for p in {r.pid for r in ds.train + ds.query}]
    assert min(counts) >= 2 and max(counts) <= 5 and len(set(counts)) > 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path, layout):
    first = _files(_small(tmp_path / "a", layout, seed=7))
    second = _files(_small(tmp_path / "b", layout, seed=7))
    other = _files(_small(tmp_path / "c", layout, seed=8))
    assert first == second
    assert len(first) > 30
    jpegs = {k: v for k, v in first.items() if k.endswith(".jpg")}
    other_jpegs = {k: v for k, v in other.items() if k.endswith(".jpg")}
    assert sorted(jpegs.values()) != sorted(other_jpegs.values())
    # Not only the names: the pixels differ too.
    assert not set(jpegs.values()) & set(other_jpegs.values())


def _region_colours(path: str) -> np.ndarray:
    """Mean colour of six horizontal bands of the image's centre strip, divided by their mean.

    The division cancels most of a camera's gain and colour cast.
    """
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w, _ = pixels.shape
    strip = pixels[h // 8 :, 3 * w // 8 : 5 * w // 8]
    bands = np.stack([band.reshape(-1, 3).mean(axis=0) for band in np.array_split(strip, 6, axis=0)])
    return (bands / bands.mean(axis=0, keepdims=True)).ravel()


def test_identities_are_learnable_across_cameras_but_not_trivial(tmp_path):
    ds = read_dataset("market1501", make_synthetic(tmp_path, "market1501").parent)  # defaults
    q = np.stack([_region_colours(r.path) for r in ds.query])
    g = np.stack([_region_colours(r.path) for r in ds.gallery])
    qp, gp = np.array([r.pid for r in ds.query]), np.array([r.pid for r in ds.gallery])
    qc, gc = np.array([r.camid for r in ds.query]), np.array([r.camid for r in ds.gallery])
    dist = ((q[:, None] - g[None]) ** 2).sum(-1)
    same_id = qp[:, None] == gp[None]
    same_cam = qc[:, None] == gc[None]
    within_camera = dist[same_id & same_cam].mean()
    across_cameras = dist[same_id & ~same_cam].mean()
    other_ids = dist[~same_id].mean()

    dist[same_id & same_cam] = np.inf  # Market protocol: only matches from other cameras count
    rank1 = float((gp[dist.argmin(axis=1)] == qp).mean())
    chance = 1 / len(set(gp.tolist()))
    assert rank1 > 5 * chance, (rank1, chance)
    # Cameras change the appearance clearly, identities more.
    assert across_cameras > 2 * within_camera
    assert other_ids > 2 * across_cameras


def test_defaults_make_a_quick_demo_dataset(tmp_path):
    folder = make_synthetic(tmp_path, "market1501", progress=True)
    assert folder == tmp_path / "Market-1501-v15.09.15"
    ds = read_dataset("market1501", tmp_path)
    assert ds.num_classes == 32 and len({r.pid for r in ds.query}) == 32
    assert 200 <= len(ds.train) <= 400
    summary = synthetic_summary(folder)
    assert f"train {len(ds.train)} images / 32 ids" in summary
    assert "16 junk" in summary and "seed 0" in summary


def test_refuses_a_non_empty_destination_and_accepts_an_empty_one(tmp_path):
    existing = tmp_path / "DukeMTMC-reID"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="DukeMTMC-reID"):
        _small(tmp_path, "dukemtmc_reid")
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DukeMTMC-reID"]  # no staging left behind

    empty_root = tmp_path / "empty"
    (empty_root / "MSMT17_V2").mkdir(parents=True)
    folder = _small(empty_root, "msmt17")
    assert (folder / "list_gallery.txt").is_file()
    assert sorted(p.name for p in empty_root.iterdir()) == ["MSMT17_V2"]


@pytest.mark.parametrize(
    "layout, overrides, message",
    [
        ("dukemtmc_reid", dict(num_junk=2), "num_junk"),
        ("market1501", dict(images_per_camera=1), "images_per_camera"),
        ("market1501", dict(num_cameras=10), "num_cameras"),
        ("market1501", dict(min_cameras_per_id=4), "min_cameras_per_id"),
        ("cuhk03", {}, "unknown layout"),
    ],
)
def test_bad_arguments_raise_before_writing(tmp_path, layout, overrides, message):
    with pytest.raises(ValueError, match=message):
        _small(tmp_path, layout, **overrides)
    assert list(tmp_path.iterdir()) == []


def test_summary_requires_the_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        synthetic_summary(tmp_path)


def test_bigger_images_scale(tmp_path):
    folder = _small(tmp_path, "market1501", image_size=(256, 96))
    with Image.open(next((folder / "query").glob("*.jpg"))) as image:
        assert image.size == (96, 256)
    assert json.loads((folder / MANIFEST_NAME).read_text())["parameters"]["image_size"] == [256, 96]
