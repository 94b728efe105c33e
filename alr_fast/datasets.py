"""Readers for the three native re-ID layouts, and the test-subset and validation splits.

Each reader follows docs/METHOD.md §9 exactly: which folders and list files are read, which pids are
dropped (Market's -1 junk) or kept (Market's pid 0 distractors), how pids and camids are parsed,
and how training labels are encoded (scikit-learn ``LabelEncoder`` semantics: the rank of a pid
among the sorted unique training pids). File names are checked against a strict pattern per
layout, so a stray or renamed file fails loudly with its path instead of being misparsed.

The published image counts are deliberately not asserted (the synthetic datasets of
``alr_fast.synthetic`` differ); ``published_counts_mismatch`` reports the differences for the
caller to log.
"""
from __future__ import annotations

import numbers
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from alr_fast.records import ImageRecord, ReidDataset

MARKET1501_FOLDER = "Market-1501-v15.09.15"
DUKEMTMC_REID_FOLDER = "DukeMTMC-reID"
MSMT17_FOLDER = "MSMT17_V2"

# pid: "-1" (junk) or four digits; camera and sequence: one digit each; frame: six digits;
# detection index: two digits. Example: 0002_c1s1_000451_03.jpg
MARKET1501_PATTERN = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
MARKET1501_SCHEME = "PPPP_cCsS_FFFFFF_NN.jpg (PPPP four digits or -1, e.g. 0002_c1s1_000451_03.jpg)"
# Example: 0001_c2_f0046182.jpg
DUKEMTMC_REID_PATTERN = re.compile(r"^(\d{4})_c(\d)_f(\d{7})\.jpg$")
DUKEMTMC_REID_SCHEME = "PPPP_cC_fFFFFFFF.jpg (e.g. 0001_c2_f0046182.jpg)"
# pid, image index within the pid, camera, date + time of day, frame, track.
# Example: 0000_000_01_0303morning_0015_0.jpg
MSMT17_PATTERN = re.compile(r"^(\d{4})_(\d{3,})_(\d{2})_(\d{4}(?:morning|noon|afternoon))_(\d{4,})_(\d+)\.jpg$")
MSMT17_SCHEME = (
    "PPPP_III_CC_DDDD{morning|noon|afternoon}_FFFF_T.jpg (e.g. 0000_000_01_0303morning_0015_0.jpg)"
)
# A list line is "<pidfolder>/<file> <pid>".
MSMT17_LIST_LINE = "<pidfolder>/<file> <pid>, e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0'"

# Published sizes after the readers' own filtering: (train images, train ids, query, gallery).
PUBLISHED_COUNTS = {
    "market1501": {"train": 12936, "train_ids": 751, "query": 3368, "gallery": 15913},
    "dukemtmc_reid": {"train": 16522, "train_ids": 702, "query": 2228, "gallery": 17661},
    "msmt17": {"train": 32621, "train_ids": 1041, "query": 11659, "gallery": 82161},
}

_MAX_LISTED_ENTRIES = 20


class DatasetError(ValueError):
    """A dataset on disk does not match its documented layout; the message names the path."""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
def _describe_contents(folder: str) -> str:
    try:
        names = sorted(os.listdir(folder))
    except OSError as err:
        return f"{folder} cannot be listed ({err.strerror})"
    if not names:
        return f"{folder} is empty"
    shown = ", ".join(names[:_MAX_LISTED_ENTRIES])
    more = f", ... ({len(names) - _MAX_LISTED_ENTRIES} more)" if len(names) > _MAX_LISTED_ENTRIES else ""
    return f"{folder} contains: {shown}{more}"


def _locate_dataset_folder(root: str | os.PathLike, folder_name: str, required: Sequence[str]) -> str:
    """The dataset folder: ``root/folder_name``, or ``root`` itself when it is that folder.

    ``root`` counts as the dataset folder when it is named ``folder_name`` or already holds one of
    the ``required`` entries (a renamed copy of the folder).
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise DatasetError(
            f"dataset root {root} does not exist or is not a folder; expected a folder that "
            f"contains {folder_name}/ (or {folder_name} itself)"
        )
    nested = os.path.join(root, folder_name)
    if os.path.isdir(nested):
        folder = nested
    elif os.path.basename(root) == folder_name or any(os.path.exists(os.path.join(root, r)) for r in required):
        folder = root
    else:
        raise DatasetError(
            f"dataset folder {nested} is missing: expected {folder_name}/ under the root, or the root "
            f"itself to hold {', '.join(required)}; {_describe_contents(root)}"
        )
    for name in required:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise DatasetError(
                f"{path} is missing: a {folder_name} folder holds {', '.join(required)}; "
                f"{_describe_contents(folder)}"
            )
    return folder


def _encode_labels(train: Sequence[ImageRecord]) -> tuple[np.ndarray, np.ndarray]:
    """(classes, labels): sorted unique training pids and each record's rank among them."""
    pids = np.fromiter((r.pid for r in train), dtype=np.int64, count=len(train))
    classes = np.unique(pids)
    return classes, np.searchsorted(classes, pids).astype(np.int64)


def _make_dataset(name: str, folder: str, train, query, gallery) -> ReidDataset:
    classes, labels = _encode_labels(train)
    return ReidDataset(
        name=name,
        root=folder,
        train=tuple(train),
        query=tuple(query),
        gallery=tuple(gallery),
        classes=classes,
        train_labels=labels,
    )


def _read_image_folder(
    folder: str, pattern: re.Pattern, scheme: str, parse: Callable[[re.Match], tuple[int, int]], drop_junk: bool
) -> list[ImageRecord]:
    """Records of the ``*.jpg`` files of ``folder`` in sorted order (the reference's sorted glob).

    Like the glob, names starting with a dot and names not ending in ``.jpg`` are ignored.
    """
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder} is not a folder; {_describe_contents(os.path.dirname(folder))}")
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.name.endswith(".jpg") and not e.name.startswith("."))
    if not names:
        raise DatasetError(f"split folder {folder} holds no .jpg images; expected files named {scheme}")
    records = []
    for name in names:
        match = pattern.match(name)
        if match is None:
            raise DatasetError(
                f"{os.path.join(folder, name)}: file name does not follow the naming scheme {scheme}"
            )
        pid, camid = parse(match)
        if drop_junk and pid == -1:
            continue
        records.append(ImageRecord(os.path.join(folder, name), pid, camid))
    if not records:
        raise DatasetError(f"split folder {folder} holds only junk images (pid -1); expected usable images")
    return records


# --------------------------------------------------------------------------------------------
# Market-1501 and DukeMTMC-reID: one folder of images per split
# --------------------------------------------------------------------------------------------
_FOLDER_SPLITS = ("bounding_box_train", "bounding_box_test", "query")


def _parse_market(match: re.Match) -> tuple[int, int]:
    return int(match.group(1)), int(match.group(2))


def _parse_duke(match: re.Match) -> tuple[int, int]:
    return int(match.group(1)), int(match.group(2))


def read_market1501(root: str | os.PathLike) -> ReidDataset:
    """Market-1501 (docs/METHOD.md §9.1): junk (pid -1) dropped from every split, distractors (pid 0) kept.

    ``root`` contains ``Market-1501-v15.09.15/`` or is that folder.
    """
    folder = _locate_dataset_folder(root, MARKET1501_FOLDER, _FOLDER_SPLITS)
    train, gallery, query = (
        _read_image_folder(os.path.join(folder, s), MARKET1501_PATTERN, MARKET1501_SCHEME, _parse_market, True)
        for s in _FOLDER_SPLITS
    )
    return _make_dataset("market1501", folder, train, query, gallery)


def read_dukemtmc_reid(root: str | os.PathLike) -> ReidDataset:
    """DukeMTMC-reID (docs/METHOD.md §9.2): no junk filtering.

    ``root`` contains ``DukeMTMC-reID/`` or is that folder.
    """
    folder = _locate_dataset_folder(root, DUKEMTMC_REID_FOLDER, _FOLDER_SPLITS)
    train, gallery, query = (
        _read_image_folder(os.path.join(folder, s), DUKEMTMC_REID_PATTERN, DUKEMTMC_REID_SCHEME, _parse_duke, False)
        for s in _FOLDER_SPLITS
    )
    return _make_dataset("dukemtmc_reid", folder, train, query, gallery)


# --------------------------------------------------------------------------------------------
# MSMT17 V2: image folders per pid, splits given by list files
# --------------------------------------------------------------------------------------------
_MSMT17_REQUIRED = (
    "mask_train_v2",
    "mask_test_v2",
    "list_train.txt",
    "list_val.txt",
    "list_query.txt",
    "list_gallery.txt",
)


def _read_msmt17_list(list_path: str, image_folder: str, folder_listings: dict[str, frozenset]) -> list[ImageRecord]:
    """Records of one list file; each pid folder is listed once (``folder_listings`` caches it).

    One ``os.scandir`` per pid folder instead of one ``stat`` per line: MSMT17 has ~126k lines
    over ~4k folders.
    """
    records = []
    with open(list_path, encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{list_path}, line {lineno}"
            fields = line.split()
            parts = fields[0].split("/") if len(fields) == 2 else []
            if len(parts) != 2 or not parts[0] or not re.fullmatch(r"-?\d+", fields[1]):
                raise DatasetError(f"{where}: malformed line {line.rstrip()!r}; expected {MSMT17_LIST_LINE}")
            pid_folder, file_name = parts
            pid = int(fields[1])
            if not pid_folder.isdigit() or int(pid_folder) != pid:
                raise DatasetError(
                    f"{where}: pid {pid} does not match its folder {pid_folder!r}; expected the pid to "
                    f"equal int(<pidfolder>)"
                )
            match = MSMT17_PATTERN.match(file_name)
            if match is None:
                raise DatasetError(
                    f"{where}: {os.path.join(image_folder, pid_folder, file_name)}: file name does not "
                    f"follow the naming scheme {MSMT17_SCHEME}"
                )
            folder_path = os.path.join(image_folder, pid_folder)
            listing = folder_listings.get(folder_path)
            if listing is None:
                try:
                    with os.scandir(folder_path) as entries:
                        listing = frozenset(e.name for e in entries)
                except (FileNotFoundError, NotADirectoryError):
                    listing = frozenset()
                folder_listings[folder_path] = listing
            image_path = os.path.join(folder_path, file_name)
            if file_name not in listing:
                raise DatasetError(f"{where}: image {image_path} does not exist")
            records.append(ImageRecord(image_path, pid, int(match.group(3))))
    if not records:
        raise DatasetError(f"list file {list_path} holds no entries; expected lines {MSMT17_LIST_LINE}")
    return records


def read_msmt17(root: str | os.PathLike) -> ReidDataset:
    """MSMT17 V2 (docs/METHOD.md §9.3): train = list_train + list_val; test pids have their own numbering.

    ``root`` contains ``MSMT17_V2/`` or is that folder.
    """
    folder = _locate_dataset_folder(root, MSMT17_FOLDER, _MSMT17_REQUIRED)
    train_images = os.path.join(folder, "mask_train_v2")
    test_images = os.path.join(folder, "mask_test_v2")
    listings: dict[str, frozenset] = {}
    train = _read_msmt17_list(os.path.join(folder, "list_train.txt"), train_images, listings)
    train += _read_msmt17_list(os.path.join(folder, "list_val.txt"), train_images, listings)
    query = _read_msmt17_list(os.path.join(folder, "list_query.txt"), test_images, listings)
    gallery = _read_msmt17_list(os.path.join(folder, "list_gallery.txt"), test_images, listings)
    return _make_dataset("msmt17", folder, train, query, gallery)


DATASET_READERS: dict[str, Callable[[str | os.PathLike], ReidDataset]] = {
    "market1501": read_market1501,
    "dukemtmc_reid": read_dukemtmc_reid,
    "msmt17": read_msmt17,
}


def read_dataset(name: str, root: str | os.PathLike) -> ReidDataset:
    """The dataset ``name`` (a key of ``DATASET_READERS``) found under ``root``."""
    reader = DATASET_READERS.get(name)
    if reader is None:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_READERS)}")
    return reader(root)


def published_counts_mismatch(ds: ReidDataset) -> list[str]:
    """One line per split whose size differs from the published one; empty when all match."""
    published = PUBLISHED_COUNTS.get(ds.name)
    if published is None:
        return [f"no published counts are known for dataset {ds.name!r}"]
    found = {"train": len(ds.train), "train_ids": ds.num_classes, "query": len(ds.query), "gallery": len(ds.gallery)}
    return [
        f"{ds.name} {key}: {found[key]} found, {published[key]} published"
        for key in ("train", "train_ids", "query", "gallery")
        if found[key] != published[key]
    ]


# --------------------------------------------------------------------------------------------
# Subsets and splits (scikit-learn, imported lazily)
# --------------------------------------------------------------------------------------------
def _check_split_size(value: float, what: str) -> float | int:
    """The reference's rule: a value in [0, 1] is a fraction (0 and 1 special), above 1 a count.

    Returns an ``int`` for counts (scikit-learn tells counts from fractions by type).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    if value > 1:
        if float(value) != int(value):
            raise ValueError(f"{what} above 1 is an absolute count and must be an integer, got {value!r}")
        return int(value)
    return 1 if value == 1 else float(value)


def select_testing_subset(
    query: Sequence[ImageRecord], gallery: Sequence[ImageRecord], testing_size: float
) -> tuple[tuple[ImageRecord, ...], tuple[ImageRecord, ...]]:
    """The (query, gallery) subset used for in-training evaluation (docs/METHOD.md §9.5).

    ``testing_size`` 1 keeps everything, 0 keeps nothing; a fraction in (0, 1) keeps that share of
    the identity groups (rounded up), an integer > 1 that many groups. Groups are pids over the
    concatenation query + gallery, so Market's pid 0 distractors form one group. The result keeps
    the original order of the records.
    """
    size = _check_split_size(testing_size, "testing_size")
    if size == 1:
        return tuple(query), tuple(gallery)
    if size == 0:
        return (), ()
    from sklearn.model_selection import GroupShuffleSplit

    records = tuple(query) + tuple(gallery)
    groups = np.fromiter((r.pid for r in records), dtype=np.int64, count=len(records))
    splitter = GroupShuffleSplit(n_splits=1, test_size=size, random_state=0)
    try:
        _, kept = next(splitter.split(np.arange(len(records)), groups=groups))
    except ValueError as err:
        raise DatasetError(
            f"data.testing_size={testing_size:g} does not fit the test split: it has {len(np.unique(groups))} "
            f"identity groups ({len(query)} query + {len(gallery)} gallery images, distractors one group), and "
            f"the subset must leave at least one of them out"
        ) from None
    kept = np.sort(kept)
    return (
        tuple(records[i] for i in kept if i < len(query)),
        tuple(records[i] for i in kept if i >= len(query)),
    )


def _stratified_split(labels: np.ndarray, size: float | int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of ``StratifiedShuffleSplit(test_size=size, random_state=0)``.

    ``size`` 1 returns all indices on both sides, as the reference does.
    """
    if size == 1:
        return np.arange(len(labels)), np.arange(len(labels))
    from sklearn.model_selection import StratifiedShuffleSplit

    splitter = StratifiedShuffleSplit(n_splits=1, test_size=size, random_state=0)
    try:
        return next(splitter.split(np.arange(len(labels)), y=labels))
    except ValueError as err:
        raise DatasetError(
            f"{what} with test_size={size!r} over {len(labels)} images of {len(np.unique(labels))} "
            f"identities failed: {err}"
        ) from None


def split_validation(
    dataset: ReidDataset, validation_size: float, gallery_fraction: float | None = None
) -> tuple[tuple[ImageRecord, ...], np.ndarray, tuple[ImageRecord, ...], tuple[ImageRecord, ...]]:
    """(train, train_labels, valid_query, valid_gallery) carved from the training split (docs/METHOD.md §9.6).

    ``validation_size`` (fraction in (0, 1) or an integer image count > 1) of the training images
    is held out, stratified by identity, then split into valid query and gallery with
    ``gallery_fraction`` going to the gallery (default: |G| / (|Q| + |G|) of the test split).
    Both splits use ``StratifiedShuffleSplit(random_state=0)`` and keep its index order, as the
    reference does. Labels stay those of the full training split, so the classifier keeps all
    training identities. 0 disables validation.
    """
    size = _check_split_size(validation_size, "validation_size")
    if size == 0:
        return dataset.train, dataset.train_labels, (), ()
    if gallery_fraction is None:
        total = len(dataset.query) + len(dataset.gallery)
        if total == 0:
            raise ValueError("gallery_fraction cannot be derived: the dataset has no query or gallery images")
        gallery_fraction = len(dataset.gallery) / total
    fraction = _check_split_size(gallery_fraction, "gallery_fraction")
    if fraction == 0:
        raise ValueError("gallery_fraction must be > 0: the validation gallery would be empty")

    labels = np.asarray(dataset.train_labels)
    train_idx, valid_idx = _stratified_split(labels, size, f"data.validation_size={validation_size!r}: the validation split of {dataset.name} training images")
    query_idx, gallery_idx = _stratified_split(
        labels[valid_idx], fraction, f"data.validation_size={validation_size!r}: the split of the {dataset.name} validation images into query and gallery"
    )
    valid = [dataset.train[i] for i in valid_idx]
    return (
        tuple(dataset.train[i] for i in train_idx),
        labels[train_idx],
        tuple(valid[i] for i in query_idx),
        tuple(valid[i] for i in gallery_idx),
    )
