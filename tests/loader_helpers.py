"""Helpers shared by the loader tests (torch, DALI, decode-once cache)."""
import torch


def run_epochs(loader, n):
    """n epochs of (images, pids, camids) batches, cloned so later epochs cannot alias them."""
    return [[tuple(t.clone() for t in batch) for batch in loader] for _ in range(n)]


def assert_same_epochs(a, b):
    assert len(a) == len(b)
    for epoch_a, epoch_b in zip(a, b):
        assert len(epoch_a) == len(epoch_b)
        for batch_a, batch_b in zip(epoch_a, epoch_b):
            for x, y in zip(batch_a, batch_b):
                assert x.dtype == y.dtype and torch.equal(x, y)
