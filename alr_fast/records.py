"""Plain records shared by the dataset readers, the samplers and the loaders."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ImageRecord:
    """One image of a re-ID dataset: its file, identity and camera as the dataset names them."""

    path: str
    pid: int
    camid: int


@dataclass(frozen=True)
class ReidDataset:
    """The three splits of a dataset, with training labels encoded on the training pids.

    ``train_labels[i]`` is the class index of ``train[i]``: the rank of its pid among the sorted
    unique training pids (scikit-learn ``LabelEncoder`` semantics). ``classes`` holds those pids.
    """

    name: str
    root: str
    train: tuple[ImageRecord, ...]
    query: tuple[ImageRecord, ...]
    gallery: tuple[ImageRecord, ...]
    classes: np.ndarray = field(repr=False)
    train_labels: np.ndarray = field(repr=False)

    @property
    def num_classes(self) -> int:
        return int(len(self.classes))

    def summary(self) -> str:
        def ids(recs):
            return len({r.pid for r in recs})

        return (
            f"{self.name} at {self.root}: train {len(self.train)} images / {ids(self.train)} ids, "
            f"query {len(self.query)} / {ids(self.query)}, gallery {len(self.gallery)} / {ids(self.gallery)}"
        )
