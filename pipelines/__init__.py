"""Data pipelines: the identity sampler, augmentation parameters, the JPEG store and the loaders.

Installed as ``alr_fast.pipelines``. Importing this package needs only torch/torchvision; the
DALI pipelines live in their own module (``alr_fast.pipelines.dali``), imported on first use of
one of its names here; without DALI that raises an ImportError that says what to install.
"""
from .augment import (
    ERASE_FILL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentParams,
    augment_batch,
    decode_resize,
    decode_rgb,
    draw_augment_params,
    normalize,
)
from .eval_cache import CachedEvalLoader, EvalCachePlan, build_eval_cache, eval_cache_bytes
from .gpu_cache import (
    DecodedCacheTrainLoader,
    augment_from_cache,
    build_decoded_cache,
    cache_bytes,
    choose_train_loader_kind,
)
from .jpeg_store import CorruptImageError, JpegStore, find_jpeg_problem, load_jpeg_store
from .sampler import IdentitySampler
from .torch_loader import TorchEvalLoader, TorchTrainLoader, decode_store

__all__ = [
    "ERASE_FILL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentParams",
    "CachedEvalLoader",
    "CorruptImageError",
    "DecodedCacheTrainLoader",
    "EvalCachePlan",
    "IdentitySampler",
    "JpegStore",
    "TorchEvalLoader",
    "TorchTrainLoader",
    "augment_batch",
    "augment_from_cache",
    "build_decoded_cache",
    "build_eval_cache",
    "cache_bytes",
    "choose_train_loader_kind",
    "decode_resize",
    "decode_rgb",
    "decode_store",
    "draw_augment_params",
    "eval_cache_bytes",
    "find_jpeg_problem",
    "load_jpeg_store",
    "normalize",
]

# served by __getattr__, and kept out of __all__ so that a star import works without DALI
_DALI_NAMES = ("DaliEvalLoader", "DaliTrainLoader", "decode_store_dali")


def __getattr__(name: str):
    # DALI is optional and heavy: import it only when one of its loaders is asked for
    if name in _DALI_NAMES:
        from . import dali

        return getattr(dali, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
