"""Data pipelines: the identity sampler, augmentation parameters, the JPEG store and the loaders.

Installed as ``alr_fast.pipelines``. Importing this package needs only torch/torchvision; the
DALI pipelines live in their own module and import DALI lazily.
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
from .jpeg_store import CorruptImageError, JpegStore, find_jpeg_problem, load_jpeg_store
from .sampler import IdentitySampler
from .torch_loader import TorchEvalLoader, TorchTrainLoader, decode_store

__all__ = [
    "ERASE_FILL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentParams",
    "CorruptImageError",
    "IdentitySampler",
    "JpegStore",
    "TorchEvalLoader",
    "TorchTrainLoader",
    "augment_batch",
    "decode_resize",
    "decode_rgb",
    "decode_store",
    "draw_augment_params",
    "find_jpeg_problem",
    "load_jpeg_store",
    "normalize",
]
