"""Build the dataset and its loaders from a Config: the one place that picks a loader backend.

Every loader keeps the contract ``(images [B,3,H,W] on device, pids [B], camids [B])`` plus
``len()``, so the training loop never branches on the backend. Training loaders put the encoded
class labels in the pids slot.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from . import preflight
from .datasets import published_counts_mismatch, read_dataset, select_testing_subset, split_validation
from .evaluation import auto_batch_size, eval_input_dtype
from .pipelines.eval_cache import CachedEvalLoader, EvalCachePlan, build_eval_cache, eval_cache_bytes
from .pipelines.augment import input_style_for
from .pipelines.gpu_cache import DecodedCacheTrainLoader, choose_train_loader_kind
from .pipelines.jpeg_store import load_jpeg_store
from .pipelines.sampler import IdentitySampler
from .pipelines.torch_loader import TorchEvalLoader, TorchTrainLoader
from .distributed import DistEnv, shard_range
from .records import ImageRecord, ReidDataset

log = logging.getLogger("alr_fast")


@dataclass
class DataBundle:
    dataset: ReidDataset
    num_classes: int
    train_loader: object | None
    # split name ("test", "valid") -> (query loader, gallery loader)
    eval_loaders: dict[str, tuple[object, object]] = field(default_factory=dict)


def _load_store(records: tuple[ImageRecord, ...] | list[ImageRecord], what: str, cfg, progress: bool):
    store, kept = load_jpeg_store(
        [r.path for r in records],
        verify=cfg.data.verify_images,
        skip_corrupt=cfg.data.skip_corrupt,
        progress=progress,
    )
    if len(kept) < len(records):
        log.warning("%s: %d unreadable images skipped (data.skip_corrupt=true)", what, len(records) - len(kept))
    return store, [records[i] for i in kept], kept


def _device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None  # DALI's CPU operators
    return device.index if device.index is not None else torch.cuda.current_device()


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_loader_kind(requested: str, device: torch.device, num_images: int, height: int, width: int, budget_gb: float) -> str:
    """``data.loader`` -> the backend to build: torch | dali | cache."""
    if requested == "auto":
        if device.type != "cuda":
            return "torch"
        kind = choose_train_loader_kind(num_images, height, width, int(budget_gb * 2**30))
        if kind == "dali" and not _dali_available():
            log.warning("DALI is not installed (pip install nvidia-dali-cuda130): using the torch DataLoader")
            return "torch"
        return kind
    if requested == "dali" and not _dali_available():
        raise ImportError("data.loader=dali needs NVIDIA DALI: pip install nvidia-dali-cuda130")
    return requested


def _eval_loader_options(cfg, device, channels_last: bool) -> dict:
    """What every evaluation loader of a run shares: images in the dtype of ``eval.precision``, one
    batch size (auto: chosen once, before any evaluation cache takes device memory, so the query
    and the gallery batches have the one shape the captured extraction replays)."""
    dtype = eval_input_dtype(cfg.eval.precision, device)
    batch_size = auto_batch_size(cfg.eval.batch_size, device, cfg.data.height, cfg.data.width, dtype)
    return dict(batch_size=batch_size, device=device, dtype=dtype, channels_last=channels_last,
                input_style=input_style_for(cfg.model.backbone_style))


def _eval_loader(records, what: str, cfg, device, progress: bool, env: DistEnv, kind: str, plan: EvalCachePlan,
                 common: dict):
    """The loader of one evaluation set: the decode-once cache where ``plan`` places it, else the
    JPEG loader (DALI or torch), with the run's ``common`` options (``_eval_loader_options``)."""
    start, stop = shard_range(len(records), env)  # contiguous shards: gathering restores the order
    store, records, _ = _load_store(list(records)[start:stop], what, cfg, progress)
    pids = np.array([r.pid for r in records], dtype=np.int64)
    camids = np.array([r.camid for r in records], dtype=np.int64)
    height, width = cfg.data.height, cfg.data.width
    placement = plan.placement(eval_cache_bytes(len(store), height, width))
    if placement != "none":
        cache = build_eval_cache(store, height, width, placement=placement, device=device,
                                 num_threads=cfg.data.num_workers or None, progress=progress, desc=f"decoding {what}")
        log.info("%s: %d images decoded once into %s memory (%.2f GB)", what, len(store),
                 "device" if placement == "device" and device.type == "cuda" else "host", cache.numel() / 1e9)
        return CachedEvalLoader(cache, pids, camids, **common)
    if kind == "dali":
        from .pipelines.dali import DaliEvalLoader

        return DaliEvalLoader(store, pids, camids, height=height, width=width, **common, device_id=_device_id(device),
                              num_threads=cfg.data.dali_threads, prefetch_queue_depth=cfg.data.dali_prefetch)
    return TorchEvalLoader(store, pids, camids, height=height, width=width, **common, num_workers=cfg.data.num_workers)


def train_augmentation(d) -> dict:
    """pad, flip_p and erase_p of a DataConfig: the seed's augmentation flag gates its whole image
    augmentor, random erasing included (``use_data_augmentation_in_training=False``: no augmentor)."""
    return dict(pad=d.padding if d.augmentation else 0, flip_p=0.5 if d.augmentation else 0.0,
                erase_p=0.5 if d.augmentation and d.random_erasing else 0.0)


def _train_loader(kind: str, store, labels, camids, sampler, cfg, *, rank, device, dtype, channels_last):
    d = cfg.data
    common = dict(
        height=d.height, width=d.width, **train_augmentation(d),
        seed=cfg.run.seed, rank=rank, device=device, dtype=dtype, channels_last=channels_last,
        input_style=input_style_for(cfg.model.backbone_style),
    )
    if kind == "dali":
        from .pipelines.dali import DaliTrainLoader

        return DaliTrainLoader(store, labels, camids, sampler, **common, num_workers=d.dali_source_workers,
                               device_id=_device_id(device), num_threads=d.dali_threads,
                               prefetch_queue_depth=d.dali_prefetch)
    if kind == "cache":
        return DecodedCacheTrainLoader(store, labels, camids, sampler, **common, num_workers=d.num_workers)
    return TorchTrainLoader(store, labels, camids, sampler, **common, num_workers=d.num_workers)


def build_data(
    cfg,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    train: bool = True,
    progress: bool = True,
    dist_env: DistEnv | None = None,
) -> DataBundle:
    """Read the dataset of ``cfg.data``, verify its JPEGs, and build the train and eval loaders.

    ``dtype`` is the training loader's image dtype; evaluation loaders take that of
    ``eval.precision``, and decode their sets once into the evaluation cache (``eval.cache``).

    With several processes, each rank gets its own sampler stream (seeded with its rank) and a
    contiguous shard of every evaluation set.
    """
    env = dist_env or DistEnv()
    rank = env.rank
    d = cfg.data
    dataset = read_dataset(d.dataset, d.root)
    log.info("%s", dataset.summary())
    for note in published_counts_mismatch(dataset):
        log.info("note: %s", note)
    bundle = DataBundle(dataset, dataset.num_classes, None)
    kind = resolve_loader_kind(d.loader, device, len(dataset.train), d.height, d.width, d.gpu_cache_budget_gb)
    # evaluation decodes with DALI when training does, or next to the cache on a GPU (when the
    # evaluation cache is off or full: otherwise every set is decoded once into the cache)
    eval_kind = "dali" if kind == "dali" or (kind == "cache" and device.type == "cuda" and _dali_available()) else "torch"
    plan = EvalCachePlan(cfg.eval.cache, int(cfg.eval.cache_budget_gb * 2**30), device)

    # every record set first, checked before any image is decoded (alr_fast.preflight)
    train_records, train_labels = list(dataset.train), np.asarray(dataset.train_labels)
    valid = None
    if train and d.validation_size > 0:
        gallery_fraction = len(dataset.gallery) / max(len(dataset.query) + len(dataset.gallery), 1)
        train_records, train_labels, vq, vg = split_validation(dataset, d.validation_size, gallery_fraction)
        train_labels = np.asarray(train_labels)
        log.info("validation split: %d train images, %d valid query, %d valid gallery", len(train_records), len(vq), len(vg))
        preflight.check_evaluable(vq, vg, "validation", "data.validation_size")
        valid = (vq, vg)
    test = None
    if d.testing_size > 0:
        test = select_testing_subset(dataset.query, dataset.gallery, d.testing_size)
        if d.testing_size != 1:
            log.info("testing_size=%s: %d query and %d gallery images", d.testing_size, len(test[0]), len(test[1]))
        preflight.check_evaluable(*test, "test", "data.testing_size")
    if train:
        preflight.check_sampler(train_labels, d.identities_per_batch, d.images_per_identity, dataset.num_classes)

    common = _eval_loader_options(cfg, device, channels_last) if valid is not None or test is not None else {}
    if valid is not None:
        bundle.eval_loaders["valid"] = (
            _eval_loader(valid[0], "valid query", cfg, device, progress, env, eval_kind, plan, common),
            _eval_loader(valid[1], "valid gallery", cfg, device, progress, env, eval_kind, plan, common),
        )
    if test is not None:
        bundle.eval_loaders["test"] = (
            _eval_loader(test[0], "query", cfg, device, progress, env, eval_kind, plan, common),
            _eval_loader(test[1], "gallery", cfg, device, progress, env, eval_kind, plan, common),
        )

    if train:
        store, kept_records, kept = _load_store(train_records, "train", cfg, progress)
        labels = np.asarray(train_labels)[kept]
        if len(kept) < len(train_records):  # data.skip_corrupt dropped some: the sampler's rule again
            preflight.check_sampler(labels, d.identities_per_batch, d.images_per_identity, dataset.num_classes)
        sampler = IdentitySampler(
            labels,
            P=d.identities_per_batch,
            K=d.images_per_identity,
            steps_per_epoch=d.steps_per_epoch,
            seed=cfg.run.seed,
            rank=rank,
            identity_balancing=d.identity_balancing,
        )
        bundle.train_loader = _train_loader(
            kind, store, labels, np.array([r.camid for r in kept_records], dtype=np.int64), sampler, cfg,
            rank=rank, device=device, dtype=dtype, channels_last=channels_last,
        )
        log.info("train loader: %s", kind)
    return bundle
