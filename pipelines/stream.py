"""What every training loader draws on the CPU per epoch: the identity sampler's image indices and
each sample's augmentation parameters, from one seed per rank.

The torch, DALI and decode-once-cache loaders all consume a ``TrainStream``, so for the same
seed they produce the same epochs, and their checkpoints (``state_dict``) interchange.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .augment import draw_augment_params
from .sampler import IdentitySampler


class TrainStream:
    """Epochs of ``(indices int64 [steps*P*K], params int32 [steps*P*K, 7])`` over a store of
    ``num_images`` images (checked against the sampler)."""

    def __init__(
        self,
        sampler: IdentitySampler,
        *,
        num_images: int,
        seed: int,
        rank: int = 0,
        height: int,
        width: int,
        pad: int = 10,
        flip_p: float = 0.5,
        erase_p: float = 0.5,
    ) -> None:
        if sampler.num_images != num_images:
            raise ValueError(f"the sampler indexes {sampler.num_images} images but the store holds {num_images}")
        self.sampler = sampler
        self.rng = np.random.default_rng([int(seed), int(rank), 1])
        self.augment = dict(height=height, width=width, pad=pad, flip_p=flip_p, erase_p=erase_p)

    def next_epoch(self) -> tuple[np.ndarray, np.ndarray]:
        indices = self.sampler.next_epoch()
        params = draw_augment_params(self.rng, len(indices), **self.augment).to_array()
        return indices, params

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "augment_rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.rng.bit_generator.state = state["augment_rng"]
