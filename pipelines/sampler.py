"""Identity (P x K) sampler of the original trainer (docs/METHOD.md §5), resumable and seeded per rank.

The sampler is a continuous stream of *passes* over the training set. A pass shuffles the images
of every identity that has at least K of them, cuts them into chunks of K, and then repeatedly
picks P distinct identities uniformly at random (not weighted by how many chunks they have left)
and takes the last chunk of each. Every ``steps_per_epoch * P * K`` indices form one epoch; a
pass ends when fewer than P identities have chunks left, and its leftovers are discarded. The
pass state carries over from one epoch to the next.

Random draws, in this order (``rng = np.random.default_rng([seed, rank])``):
- at the start of a pass, for each qualifying label in ascending order:
  ``rng.permutation(indices_of_label)`` (indices ascending);
- for each batch: ``rng.choice(len(remaining), size=P, replace=False)`` over the labels that
  still have chunks, in ascending label order.
The DALI and torch loaders consume the same index stream.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class IdentitySampler:
    """Draws epochs of ``steps_per_epoch`` batches of P identities x K images.

    ``next_epoch()`` returns dataset indices, int64 ``[steps_per_epoch * P * K]``; batch ``i``
    is ``out[i*P*K:(i+1)*P*K]``, with the K images of one identity contiguous. Identities with
    fewer than K images are never drawn (they stay classes of the classifier).
    With ``identity_balancing`` each identity gives at most one chunk per pass.
    """

    def __init__(
        self,
        labels: np.ndarray,
        P: int,
        K: int,
        steps_per_epoch: int,
        seed: int,
        rank: int = 0,
        identity_balancing: bool = False,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
        for name, value in (("P", P), ("K", K), ("steps_per_epoch", steps_per_epoch)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.P, self.K, self.steps_per_epoch = int(P), int(K), int(steps_per_epoch)
        self.identity_balancing = bool(identity_balancing)
        self.num_images = len(labels)
        order = np.argsort(labels, kind="stable")
        uniq, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        # label -> its dataset indices, ascending; only labels that can fill a chunk of K
        self._groups = {
            int(lab): order[s : s + c].astype(np.int64)
            for lab, s, c in zip(uniq, starts, counts)
            if c >= self.K
        }
        if len(self._groups) < self.P:
            raise ValueError(
                f"the identity sampler needs at least P={self.P} identities with >= K={self.K} images, "
                f"but only {len(self._groups)} of {len(uniq)} identities qualify"
            )
        self._rng = np.random.default_rng([int(seed), int(rank)])
        self._chunks: dict[int, list[np.ndarray]] = {}  # current pass: label -> remaining chunks

    @property
    def batch_size(self) -> int:
        return self.P * self.K

    @property
    def num_identities(self) -> int:
        """Number of identities that can be drawn (those with >= K images)."""
        return len(self._groups)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _start_pass(self) -> None:
        chunks = {}
        for label in sorted(self._groups):
            perm = self._rng.permutation(self._groups[label])
            usable = len(perm) // self.K * self.K
            chunks[label] = list(perm[:usable].reshape(-1, self.K))
        self._chunks = chunks

    def _next_batch(self) -> list[np.ndarray]:
        if len(self._chunks) < self.P:
            self._start_pass()  # leftovers of the previous pass are discarded
        keys = list(self._chunks)  # ascending: dict keeps insertion order through deletions
        batch = []
        for pick in self._rng.choice(len(keys), size=self.P, replace=False):
            label = keys[pick]
            remaining = self._chunks[label]
            batch.append(remaining.pop())
            if not remaining or self.identity_balancing:
                del self._chunks[label]
        return batch

    def next_epoch(self) -> np.ndarray:
        """Indices of the next epoch, int64 ``[steps_per_epoch * P * K]``."""
        chunks = []
        for _ in range(self.steps_per_epoch):
            chunks.extend(self._next_batch())
        return np.concatenate(chunks).astype(np.int64, copy=False)

    def _config(self) -> dict[str, Any]:
        return {
            "P": self.P,
            "K": self.K,
            "steps_per_epoch": self.steps_per_epoch,
            "identity_balancing": self.identity_balancing,
            "num_images": self.num_images,
        }

    def state_dict(self) -> dict[str, Any]:
        """Generator state and the current pass, as plain picklable Python types."""
        return {
            "config": self._config(),
            "rng": self._rng.bit_generator.state,
            "pass": [[label, [c.tolist() for c in chunks]] for label, chunks in self._chunks.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream saved by ``state_dict`` (a sampler built with the same arguments)."""
        if state["config"] != self._config():
            raise ValueError(f"sampler state was saved with {state['config']}, this sampler has {self._config()}")
        self._rng.bit_generator.state = state["rng"]
        self._chunks = {
            int(label): [np.asarray(c, dtype=np.int64) for c in chunks] for label, chunks in state["pass"]
        }
