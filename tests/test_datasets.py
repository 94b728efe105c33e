"""Dataset readers on hand-made layouts, their errors, and the test-subset and validation splits."""
from __future__ import annotations

import math
import os
import pathlib

import numpy as np
import pytest
from sklearn.model_selection import GroupShuffleSplit, StratifiedShuffleSplit

from alr_fast.datasets import (
    DATASET_READERS,
    DatasetError,
    published_counts_mismatch,
    read_dataset,
    read_dukemtmc_reid,
    read_market1501,
    read_msmt17,
    select_testing_subset,
    split_validation,
)
from alr_fast.records import ImageRecord, ReidDataset

MARKET_FILES = {
    # Written in unsorted order on purpose: the reader must sort like the reference's glob.
    "bounding_box_train": ["0007_c2s3_000111_01.jpg", "0002_c1s1_000451_03.jpg", "0002_c6s2_012345_00.jpg"],
    "bounding_box_test": [
        "0003_c1s1_000001_01.jpg",
        "-1_c3s1_000401_03.jpg",
        "0000_c2s1_000151_01.jpg",
        "0003_c4s2_000002_01.jpg",
        "Thumbs.db",
    ],
    "query": ["0003_c5s1_000009_02.jpg"],
}
DUKE_FILES = {
    "bounding_box_train": ["0005_c2_f0046985.jpg", "0001_c2_f0046182.jpg", "0001_c8_f0000001.jpg"],
    "bounding_box_test": ["0019_c1_f0063025.jpg", "0000_c3_f0001111.jpg"],
    "query": ["0019_c5_f0100000.jpg"],
}
MSMT_IMAGES = {
    "mask_train_v2": ["0000/0000_000_01_0303morning_0015_0.jpg", "0000/0000_001_07_0302noon_0810_1.jpg",
                      "0011/0011_000_15_0113afternoon_0001_0.jpg"],
    "mask_test_v2": ["0000/0000_000_02_0114morning_0020_2.jpg", "0000/0000_001_03_0114morning_0021_0.jpg",
                     "0004/0004_000_12_0303noon_9999_1.jpg"],
}  # fmt: skip
MSMT_LISTS = {
    "list_train.txt": ["0011/0011_000_15_0113afternoon_0001_0.jpg 11", "0000/0000_000_01_0303morning_0015_0.jpg 0"],
    "list_val.txt": ["0000/0000_001_07_0302noon_0810_1.jpg 0"],
    "list_query.txt": ["0000/0000_000_02_0114morning_0020_2.jpg 0"],
    "list_gallery.txt": ["0000/0000_001_03_0114morning_0021_0.jpg 0", "0004/0004_000_12_0303noon_9999_1.jpg 4"],
}


def _touch_all(folder: pathlib.Path, files: dict[str, list[str]]) -> pathlib.Path:
    for sub, names in files.items():
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / sub / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / sub / name).write_bytes(b"")  # the readers never decode
    return folder


def _write_lists(folder: pathlib.Path, lists: dict[str, list[str]]) -> None:
    for name, lines in lists.items():
        (folder / name).write_text("".join(f"{line}\n" for line in lines))


@pytest.fixture
def market(tmp_path):
    return _touch_all(tmp_path / "Market-1501-v15.09.15", MARKET_FILES)


@pytest.fixture
def duke(tmp_path):
    return _touch_all(tmp_path / "DukeMTMC-reID", DUKE_FILES)


@pytest.fixture
def msmt(tmp_path):
    folder = _touch_all(tmp_path / "MSMT17_V2", MSMT_IMAGES)
    _write_lists(folder, MSMT_LISTS)
    return folder


def _triples(records, folder):
    return [(os.path.relpath(r.path, folder), r.pid, r.camid) for r in records]


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------
def test_market1501_parses_sorts_drops_junk_keeps_distractors(market, tmp_path):
    ds = read_market1501(tmp_path)
    assert ds.name == "market1501" and ds.root == str(market)
    assert _triples(ds.train, market) == [
        ("bounding_box_train/0002_c1s1_000451_03.jpg", 2, 1),
        ("bounding_box_train/0002_c6s2_012345_00.jpg", 2, 6),
        ("bounding_box_train/0007_c2s3_000111_01.jpg", 7, 2),
    ]
    assert _triples(ds.gallery, market) == [
        ("bounding_box_test/0000_c2s1_000151_01.jpg", 0, 2),
        ("bounding_box_test/0003_c1s1_000001_01.jpg", 3, 1),
        ("bounding_box_test/0003_c4s2_000002_01.jpg", 3, 4),
    ]
    assert _triples(ds.query, market) == [("query/0003_c5s1_000009_02.jpg", 3, 5)]
    np.testing.assert_array_equal(ds.classes, [2, 7])
    np.testing.assert_array_equal(ds.train_labels, [0, 0, 1])
    assert all(os.path.isabs(r.path) for r in ds.train)


def test_market1501_accepts_the_dataset_folder_itself(market, tmp_path):
    nested, direct = read_market1501(tmp_path), read_market1501(market)
    assert (direct.root, direct.train, direct.query, direct.gallery) == (
        nested.root, nested.train, nested.query, nested.gallery
    )
    renamed = tmp_path / "market"
    market.rename(renamed)
    assert len(read_market1501(renamed).gallery) == 3


def test_dukemtmc_reid_parses_without_junk_filter(duke, tmp_path):
    ds = read_dukemtmc_reid(tmp_path)
    assert _triples(ds.train, duke) == [
        ("bounding_box_train/0001_c2_f0046182.jpg", 1, 2),
        ("bounding_box_train/0001_c8_f0000001.jpg", 1, 8),
        ("bounding_box_train/0005_c2_f0046985.jpg", 5, 2),
    ]
    assert _triples(ds.gallery, duke) == [
        ("bounding_box_test/0000_c3_f0001111.jpg", 0, 3),
        ("bounding_box_test/0019_c1_f0063025.jpg", 19, 1),
    ]
    np.testing.assert_array_equal(ds.train_labels, [0, 0, 1])
    np.testing.assert_array_equal(ds.classes, [1, 5])


def test_msmt17_train_is_train_then_val_in_list_order(msmt, tmp_path):
    ds = read_dataset("msmt17", tmp_path)
    assert _triples(ds.train, msmt) == [
        ("mask_train_v2/0011/0011_000_15_0113afternoon_0001_0.jpg", 11, 15),
        ("mask_train_v2/0000/0000_000_01_0303morning_0015_0.jpg", 0, 1),
        ("mask_train_v2/0000/0000_001_07_0302noon_0810_1.jpg", 0, 7),
    ]
    assert _triples(ds.query, msmt) == [("mask_test_v2/0000/0000_000_02_0114morning_0020_2.jpg", 0, 2)]
    assert _triples(ds.gallery, msmt) == [
        ("mask_test_v2/0000/0000_001_03_0114morning_0021_0.jpg", 0, 3),
        ("mask_test_v2/0004/0004_000_12_0303noon_9999_1.jpg", 4, 12),
    ]
    np.testing.assert_array_equal(ds.classes, [0, 11])
    np.testing.assert_array_equal(ds.train_labels, [1, 0, 0])


def test_msmt17_tolerates_blank_lines_and_crlf(msmt):
    (msmt / "list_val.txt").write_text("0000/0000_001_07_0302noon_0810_1.jpg 0\r\n\n")
    assert len(read_msmt17(msmt).train) == 3


def test_read_dataset_dispatches_and_rejects_unknown_names(duke, tmp_path):
    assert set(DATASET_READERS) == {"market1501", "dukemtmc_reid", "msmt17"}
    assert read_dataset("dukemtmc_reid", tmp_path).name == "dukemtmc_reid"
    with pytest.raises(ValueError, match="cuhk03"):
        read_dataset("cuhk03", tmp_path)


def test_published_counts_mismatch_lists_each_difference(market, tmp_path):
    lines = published_counts_mismatch(read_market1501(tmp_path))
    assert lines == [
        "market1501 train: 3 found, 12936 published",
        "market1501 train_ids: 2 found, 751 published",
        "market1501 query: 1 found, 3368 published",
        "market1501 gallery: 3 found, 15913 published",
    ]
    rec = ImageRecord("x.jpg", 1, 1)
    full = ReidDataset(
        "msmt17", "r", (rec,) * 32621, (rec,) * 11659, (rec,) * 82161, np.arange(1041), np.zeros(32621, int)
    )
    assert published_counts_mismatch(full) == []


# --------------------------------------------------------------------------------------------
# Reader errors: each names the offending path
# --------------------------------------------------------------------------------------------
def _raises_naming(path, reader, *args) -> str:
    with pytest.raises(DatasetError) as info:
        reader(*args)
    assert str(path) in str(info.value)
    return str(info.value)


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    message = _raises_naming(missing, read_market1501, missing)
    assert "does not exist" in message


def test_missing_dataset_folder_lists_the_root(tmp_path):
    (tmp_path / "Market-1501").mkdir()  # a near miss
    message = _raises_naming(tmp_path / "Market-1501-v15.09.15", read_market1501, tmp_path)
    assert "contains: Market-1501" in message


def test_missing_sub_folder_lists_the_dataset_folder(market, tmp_path):
    for path in (market / "query").iterdir():
        path.unlink()
    (market / "query").rmdir()
    message = _raises_naming(market / "query", read_market1501, tmp_path)
    assert "bounding_box_test, bounding_box_train" in message


def test_misnamed_file_is_named_with_the_scheme(market, tmp_path):
    (market / "bounding_box_train" / "abc.jpg").write_bytes(b"")
    message = _raises_naming(market / "bounding_box_train" / "abc.jpg", read_market1501, tmp_path)
    assert "PPPP_cCsS_FFFFFF_NN.jpg" in message


def test_duke_name_in_market_scheme_is_rejected(duke, tmp_path):
    (duke / "query" / "0019_c5s1_000009_02.jpg").write_bytes(b"")
    message = _raises_naming(duke / "query" / "0019_c5s1_000009_02.jpg", read_dukemtmc_reid, tmp_path)
    assert "PPPP_cC_fFFFFFFF.jpg" in message


def test_empty_split_is_named(duke, tmp_path):
    for path in (duke / "query").iterdir():
        path.unlink()
    (duke / "query" / "Thumbs.db").write_bytes(b"")  # ignored, as by the glob
    _raises_naming(duke / "query", read_dukemtmc_reid, tmp_path)


def test_split_of_only_junk_is_named(market, tmp_path):
    for path in (market / "query").iterdir():
        path.unlink()
    (market / "query" / "-1_c1s1_000001_01.jpg").write_bytes(b"")
    _raises_naming(market / "query", read_market1501, tmp_path)


def test_msmt17_missing_list_file(msmt, tmp_path):
    (msmt / "list_val.txt").unlink()
    _raises_naming(msmt / "list_val.txt", read_msmt17, tmp_path)


def test_msmt17_list_entry_without_image(msmt, tmp_path):
    lines = MSMT_LISTS["list_gallery.txt"] + ["0004/0004_001_12_0303noon_9999_1.jpg 4"]
    _write_lists(msmt, {"list_gallery.txt": lines})
    message = _raises_naming(msmt / "mask_test_v2" / "0004" / "0004_001_12_0303noon_9999_1.jpg", read_msmt17, msmt)
    assert f"{msmt / 'list_gallery.txt'}, line 3" in message


def test_msmt17_list_entry_in_a_missing_folder(msmt, tmp_path):
    _write_lists(msmt, {"list_query.txt": ["0077/0077_000_02_0114morning_0020_2.jpg 77"]})
    message = _raises_naming(msmt / "mask_test_v2" / "0077" / "0077_000_02_0114morning_0020_2.jpg", read_msmt17, msmt)
    assert "line 1" in message


def test_msmt17_pid_folder_mismatch(msmt, tmp_path):
    _write_lists(msmt, {"list_train.txt": MSMT_LISTS["list_train.txt"] + ["0000/0000_000_01_0303morning_0015_0.jpg 3"]})
    message = _raises_naming(msmt / "list_train.txt", read_msmt17, tmp_path)
    assert "line 3" in message and "pid 3" in message


@pytest.mark.parametrize(
    "line",
    [
        "0000/0000_000_01_0303morning_0015_0.jpg",  # no pid
        "0000/0000_000_01_0303morning_0015_0.jpg 0 5",  # extra field
        "0000_000_01_0303morning_0015_0.jpg 0",  # no pid folder
        "0000/0000_000_01_0303morning_0015_0.jpg zero",  # pid not an integer
    ],
)
def test_msmt17_malformed_line(msmt, tmp_path, line):
    _write_lists(msmt, {"list_val.txt": ["0000/0000_001_07_0302noon_0810_1.jpg 0", line]})
    message = _raises_naming(msmt / "list_val.txt", read_msmt17, tmp_path)
    assert "line 2" in message and "<pidfolder>/<file> <pid>" in message


def test_msmt17_misnamed_image_in_list(msmt, tmp_path):
    (msmt / "mask_train_v2" / "0000" / "img.jpg").write_bytes(b"")
    _write_lists(msmt, {"list_val.txt": ["0000/img.jpg 0"]})
    message = _raises_naming(msmt / "mask_train_v2" / "0000" / "img.jpg", read_msmt17, tmp_path)
    assert "list_val.txt, line 1" in message


def test_msmt17_empty_list(msmt, tmp_path):
    _write_lists(msmt, {"list_query.txt": []})
    _raises_naming(msmt / "list_query.txt", read_msmt17, tmp_path)


# --------------------------------------------------------------------------------------------
# select_testing_subset
# --------------------------------------------------------------------------------------------
def _test_records(rng: np.random.Generator):
    """A test split: 20 identities, a query per camera, plus pid 0 distractors in the gallery."""
    query, gallery = [], []
    for pid in rng.choice(np.arange(1, 1500), size=20, replace=False):
        cams = rng.choice(np.arange(1, 7), size=int(rng.integers(2, 5)), replace=False)
        for cam in cams:
            query.append(ImageRecord(f"q/{pid}_{cam}.jpg", int(pid), int(cam)))
            for k in range(int(rng.integers(1, 4))):
                gallery.append(ImageRecord(f"g/{pid}_{cam}_{k}.jpg", int(pid), int(cam)))
    gallery += [ImageRecord(f"g/0_{k}.jpg", 0, int(rng.integers(1, 7))) for k in range(7)]
    order = rng.permutation(len(gallery))
    return tuple(query), tuple(gallery[i] for i in order)


@pytest.mark.parametrize("testing_size", [0.5, 0.3, 5, 5.0])
def test_testing_subset_matches_sklearn_on_the_concatenation(testing_size):
    query, gallery = _test_records(np.random.default_rng(11))
    both = query + gallery
    groups = np.array([r.pid for r in both])
    size = int(testing_size) if testing_size > 1 else testing_size
    _, kept = next(GroupShuffleSplit(n_splits=1, test_size=size, random_state=0).split(both, groups=groups))
    kept = np.sort(kept)

    sub_query, sub_gallery = select_testing_subset(query, gallery, testing_size)
    assert sub_query == tuple(both[i] for i in kept if i < len(query))
    assert sub_gallery == tuple(both[i] for i in kept if i >= len(query))
    kept_groups = {r.pid for r in sub_query + sub_gallery}
    expected_groups = testing_size if testing_size > 1 else math.ceil(testing_size * 21)  # 20 ids + pid 0
    assert len(kept_groups) == expected_groups
    # Whole identities are kept: every image of a kept pid, from both sides.
    assert sum(r.pid in kept_groups for r in both) == len(sub_query) + len(sub_gallery)


def test_testing_subset_distractors_form_one_group():
    query, gallery = _test_records(np.random.default_rng(5))
    for size in (0.3, 0.5, 0.7, 3, 9):
        _, sub_gallery = select_testing_subset(query, gallery, size)
        distractors = sum(r.pid == 0 for r in sub_gallery)
        assert distractors in (0, 7)


def test_testing_subset_one_keeps_all_and_zero_keeps_none():
    query, gallery = _test_records(np.random.default_rng(2))
    assert select_testing_subset(query, gallery, 1) == (query, gallery)
    assert select_testing_subset(list(query), list(gallery), 1.0) == (query, gallery)
    assert select_testing_subset(query, gallery, 0) == ((), ())


@pytest.mark.parametrize("bad", [-0.1, 2.5, float("nan"), True, "0.5"])
def test_testing_subset_rejects_bad_sizes(bad):
    query, gallery = _test_records(np.random.default_rng(2))
    with pytest.raises(ValueError, match="testing_size"):
        select_testing_subset(query, gallery, bad)


def test_testing_subset_more_groups_than_exist_says_so():
    query, gallery = _test_records(np.random.default_rng(2))
    with pytest.raises(DatasetError, match=r"data.testing_size=50 does not fit the test split: it has 21 identity groups"):
        select_testing_subset(query, gallery, 50)


# --------------------------------------------------------------------------------------------
# split_validation
# --------------------------------------------------------------------------------------------
def _train_dataset(rng: np.random.Generator, num_ids: int = 30) -> ReidDataset:
    train = []
    for pid in sorted(rng.choice(np.arange(1, 3000), size=num_ids, replace=False)):
        for k in range(int(rng.integers(6, 14))):
            train.append(ImageRecord(f"t/{pid}_{k}.jpg", int(pid), int(rng.integers(1, 7))))
    pids = np.array([r.pid for r in train])
    classes = np.unique(pids)
    query = tuple(ImageRecord(f"q/{k}.jpg", 1, 1) for k in range(10))
    gallery = tuple(ImageRecord(f"g/{k}.jpg", 1, 2) for k in range(30))  # |G| / (|Q| + |G|) = 0.75
    return ReidDataset("market1501", "r", tuple(train), query, gallery, classes, np.searchsorted(classes, pids))


def test_split_validation_zero_keeps_the_training_split():
    ds = _train_dataset(np.random.default_rng(0))
    train, labels, valid_query, valid_gallery = split_validation(ds, 0)
    assert train == ds.train and valid_query == () and valid_gallery == ()
    np.testing.assert_array_equal(labels, ds.train_labels)


@pytest.mark.parametrize("validation_size", [0.3, 100])
def test_split_validation_sizes_stratification_and_parity(validation_size):
    ds = _train_dataset(np.random.default_rng(1))
    train, labels, valid_query, valid_gallery = split_validation(ds, validation_size, gallery_fraction=0.5)
    n = len(ds.train)
    n_valid = validation_size if validation_size > 1 else math.ceil(validation_size * n)
    assert len(valid_query) + len(valid_gallery) == n_valid and len(train) == n - n_valid
    assert set(train) | set(valid_query) | set(valid_gallery) == set(ds.train)
    # Labels are those of the full training split: all classes stay.
    assert all(ds.classes[label] == r.pid for r, label in zip(train, labels))
    # Stratified: every identity keeps training images, and shows up in the validation split.
    assert {r.pid for r in train} == set(ds.classes.tolist())
    assert {r.pid for r in valid_query + valid_gallery} == set(ds.classes.tolist())
    assert len(valid_gallery) == math.ceil(0.5 * n_valid)
    # Same indices, in the same order, as scikit-learn called directly.
    tr, va = next(StratifiedShuffleSplit(1, test_size=validation_size, random_state=0).split(ds.train, ds.train_labels))
    q, g = next(StratifiedShuffleSplit(1, test_size=0.5, random_state=0).split(va, ds.train_labels[va]))
    assert train == tuple(ds.train[i] for i in tr)
    assert valid_query == tuple(ds.train[va[i]] for i in q)
    assert valid_gallery == tuple(ds.train[va[i]] for i in g)


def test_split_validation_is_deterministic_and_defaults_to_the_test_gallery_fraction():
    ds = _train_dataset(np.random.default_rng(3), num_ids=10)
    first = split_validation(ds, 0.5)
    second = split_validation(ds, 0.5)
    assert first[0] == second[0] and first[2] == second[2] and first[3] == second[3]
    np.testing.assert_array_equal(first[1], second[1])
    n_valid = len(first[2]) + len(first[3])
    assert len(first[3]) == math.ceil(0.75 * n_valid)  # |G| / (|Q| + |G|) of the test split


def test_split_validation_one_uses_everything_on_both_sides():
    ds = _train_dataset(np.random.default_rng(4))
    train, _, valid_query, valid_gallery = split_validation(ds, 1, gallery_fraction=0.5)
    assert sorted(train, key=lambda r: r.path) == sorted(ds.train, key=lambda r: r.path)
    assert len(valid_query) + len(valid_gallery) == len(ds.train)


def test_split_validation_explains_which_split_failed():
    ds = _train_dataset(np.random.default_rng(5))
    with pytest.raises(ValueError, match="validation split of market1501 training images .* failed"):
        split_validation(ds, 5)  # fewer held-out images than identities
    with pytest.raises(ValueError, match="split of the market1501 validation images into query and gallery"):
        split_validation(ds, 40)  # some identities get a single validation image
    with pytest.raises(ValueError, match="validation_size"):
        split_validation(ds, -1)
