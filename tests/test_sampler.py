"""Identity sampler (docs/METHOD.md §5): structure, determinism, resume, and parity with the pseudo-code."""
import io
import pickle

import numpy as np
import pytest
import torch

from alr_fast.pipelines.sampler import IdentitySampler


def make_labels(seed: int = 0, num_ids: int = 23) -> np.ndarray:
    """Labels in shuffled order, 1..13 images per id, so some ids have fewer than K=4."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_ids) * 3 + 5, rng.integers(1, 14, size=num_ids))
    return rng.permutation(labels)


def reference_epochs(labels, P, K, steps, seed, rank=0, balancing=False):
    """The sampler's pseudo-code (docs/METHOD.md §5), written out plainly, with the documented RNG calls."""
    rng = np.random.default_rng([seed, rank])
    pool = {}
    for i, lab in enumerate(labels.tolist()):
        pool.setdefault(lab, []).append(i)
    buf = []
    while True:  # one pass
        chunks = {}
        for pid in sorted(pool):
            if len(pool[pid]) < K:
                continue
            paths = rng.permutation(np.array(pool[pid])).tolist()
            keep = len(paths) // K * K
            chunks[pid] = [paths[j : j + K] for j in range(0, keep, K)]
        while len(chunks) >= P:
            keys = sorted(chunks)
            ids = [keys[j] for j in rng.choice(len(keys), size=P, replace=False)]
            for pid in ids:
                buf += chunks[pid].pop()
                if balancing or not chunks[pid]:
                    del chunks[pid]
            if len(buf) == steps * P * K:
                yield buf
                buf = []


@pytest.mark.parametrize("balancing", [False, True])
def test_matches_reference_pseudo_code(balancing):
    labels = make_labels(1)
    P, K, steps = 4, 4, 7
    sampler = IdentitySampler(labels, P, K, steps, seed=11, identity_balancing=balancing)
    ref = reference_epochs(labels, P, K, steps, seed=11, balancing=balancing)
    for _ in range(6):  # several passes, with pass boundaries inside epochs
        assert sampler.next_epoch().tolist() == next(ref)


def test_batches_are_p_distinct_ids_of_k_contiguous_images():
    labels = make_labels(2)
    P, K, steps = 5, 4, 9
    counts = {lab: n for lab, n in zip(*np.unique(labels, return_counts=True))}
    qualifying = {lab for lab, n in counts.items() if n >= K}
    sampler = IdentitySampler(labels, P, K, steps, seed=0)
    assert sampler.num_identities == len(qualifying)
    seen = set()
    for _ in range(5):
        epoch = sampler.next_epoch()
        assert epoch.dtype == np.int64 and epoch.shape == (steps * P * K,)
        batches = labels[epoch].reshape(steps, P, K)
        assert (batches == batches[:, :, :1]).all()  # K contiguous images of one id
        for batch in batches[:, :, 0]:
            assert len(set(batch.tolist())) == P
        seen |= set(labels[epoch].tolist())
    assert seen <= qualifying
    assert len(seen) > len(qualifying) // 2


def test_each_chunk_used_once_per_pass():
    # every id has exactly K images and there are steps*P ids: one pass is exactly one epoch,
    # so an epoch must be a permutation of all images
    P, K, steps = 3, 4, 5
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(P * steps), K))
    sampler = IdentitySampler(labels, P, K, steps, seed=5)
    epochs = [sampler.next_epoch() for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(len(labels)))
    assert epochs[0].tolist() != epochs[1].tolist()


def test_identity_balancing_gives_one_chunk_per_id_per_pass():
    P, K = 4, 2
    labels = np.repeat(np.arange(9), 10)  # 5 chunks per id; a balanced pass is 2 batches of 4 ids
    sampler = IdentitySampler(labels, P, K, steps_per_epoch=2, seed=0, identity_balancing=True)
    for _ in range(10):
        ids = labels[sampler.next_epoch()][::K]
        assert len(set(ids.tolist())) == 2 * P
    unbalanced = IdentitySampler(labels, P, K, steps_per_epoch=2, seed=0)
    repeats = [len(set(labels[unbalanced.next_epoch()][::K].tolist())) < 2 * P for _ in range(10)]
    assert any(repeats)


def test_determinism_seed_and_rank():
    labels = make_labels(4)

    def first(seed, rank):
        return IdentitySampler(labels, 4, 4, 6, seed=seed, rank=rank).next_epoch().tolist()

    assert first(7, 0) == first(7, 0)
    assert first(7, 0) != first(8, 0)
    assert first(7, 0) != first(7, 1)


def test_state_dict_round_trip_continues_the_stream():
    labels = make_labels(5)
    args = dict(labels=labels, P=4, K=4, steps_per_epoch=5, seed=3)
    full = IdentitySampler(**args)
    expected = [full.next_epoch().tolist() for _ in range(3)]

    first = IdentitySampler(**args)
    assert first.next_epoch().tolist() == expected[0]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # plain types: loads with weights_only
    buffer.seek(0)
    state = pickle.loads(pickle.dumps(torch.load(buffer, weights_only=True)))
    assert state["pass"], "the saved state should hold a pass in progress"

    resumed = IdentitySampler(**args)
    resumed.load_state_dict(state)
    assert [resumed.next_epoch().tolist() for _ in range(2)] == expected[1:]


def test_load_state_dict_rejects_other_config():
    labels = make_labels(5)
    state = IdentitySampler(labels, 4, 4, 5, seed=0).state_dict()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        IdentitySampler(labels, 4, 4, 6, seed=0).load_state_dict(state)


def test_too_few_identities_error():
    labels = np.array([0] * 4 + [1] * 5 + [2] * 4 + [3] * 3 + [4] * 1)
    with pytest.raises(ValueError, match=r"P=4 .*K=4.* only 3 of 5 identities qualify"):
        IdentitySampler(labels, P=4, K=4, steps_per_epoch=1, seed=0)
    with pytest.raises(ValueError, match="1-D integer"):
        IdentitySampler(labels.astype(float), P=2, K=4, steps_per_epoch=1, seed=0)
