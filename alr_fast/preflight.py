"""Checks that need more than the config alone, run before any image is decoded.

``validate_config`` (alr_fast.config) decides everything the config itself determines. What is
left needs the model's shapes (``check_model_input``: the regional stripes against the height of
the feature map they are cut from) or the dataset's records (``check_records``: enough identities
with K images for the sampler, a test or validation split that can be evaluated at all). Both
run before training starts, so that a value that would only fail at the first evaluation, or
train at chance, is an error naming the key while nothing has been written yet.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from .config import ConfigError
from .records import ImageRecord


class _Shape(Exception):
    """Carries a feature map's shape out of a forward hook (the rest of the forward is not needed)."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape = shape


def feature_map_size(model_cfg, height: int, width: int) -> tuple[int, int] | None:
    """(rows, columns) of the map the regional branch cuts into stripes, for a height x width input.

    Derived from the model itself: the network of ``model_cfg`` is built on the meta device (no
    memory, no weights loaded) and run on a meta input up to its regional trunk, so every
    stride and padding (last_stride, the backbone's style) counts. None for a model without a
    regional branch.
    """
    from .model import build_model

    cfg = dataclasses.replace(model_cfg, pretrained="none", region_num=max(model_cfg.region_num, 1))
    with torch.device("meta"):
        net = build_model(cfg, 1)
    trunk = getattr(net, "layer4_regional", None)
    if trunk is None:
        return None

    def stop(module, inputs, output):
        raise _Shape(output.shape)

    trunk.register_forward_hook(stop)
    try:
        net.branch_features(torch.empty(1, 3, height, width, device="meta"))
    except _Shape as found:
        return int(found.shape[2]), int(found.shape[3])
    return None


def check_model_input(cfg) -> None:
    """``model.region_num`` must not exceed the rows of the feature map it cuts (each stripe at
    least one row); raises ConfigError naming the key and the map's size."""
    n = cfg.model.region_num
    if n == 0:
        return
    size = feature_map_size(cfg.model, cfg.data.height, cfg.data.width)
    if size is None:
        return
    rows, cols = size
    if n > rows:
        raise ConfigError(
            f"config key 'model.region_num'={n} exceeds the {rows} rows of the {rows}x{cols} feature map that "
            f"the regional branch cuts into stripes (data.height={cfg.data.height}, "
            f"model.last_stride={cfg.model.last_stride}); use at most {rows}, or a larger data.height"
        )


def check_sampler(labels: np.ndarray, P: int, K: int, num_classes: int) -> None:
    """The P x K sampler needs P identities with at least K training images each."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    usable = int((counts >= K).sum())
    if usable < P:
        raise ConfigError(
            f"config key 'data.images_per_identity'={K}: only {usable} of {int((counts > 0).sum())} training "
            f"identities have {K} or more images (the most any has is {int(counts.max(initial=0))}), but "
            f"data.identities_per_batch={P} needs {P} of them per batch; lower one of the two"
        )


def _valid_queries(query: Sequence[ImageRecord], gallery: Sequence[ImageRecord]) -> int:
    """Queries with a gallery image of their identity from another camera (the Market protocol)."""
    cameras: dict[int, set[int]] = defaultdict(set)
    for r in gallery:
        cameras[r.pid].add(r.camid)
    return sum(1 for r in query if cameras.get(r.pid, set()) - {r.camid})


def check_evaluable(query: Sequence[ImageRecord], gallery: Sequence[ImageRecord], split: str, key: str) -> None:
    """Some query of ``split`` must have a valid match, or its evaluation fails (docs/METHOD.md §8.2)."""
    if not query or not gallery:
        raise ConfigError(
            f"the {split} split selected by '{key}' has {len(query)} query and {len(gallery)} gallery images; "
            f"both must be non-empty to evaluate it"
        )
    if _valid_queries(query, gallery) == 0:
        cams = sorted({r.camid for r in (*query, *gallery)})
        raise ConfigError(
            f"the {split} split cannot be evaluated: none of its {len(query)} queries has a gallery image of the "
            f"same identity from another camera (cameras present: {', '.join(map(str, cams))}); check the "
            f"dataset, or change '{key}'"
        )
