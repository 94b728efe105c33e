"""Slow, straightforward oracles for the evaluation kernels (tests only).

* ``brute_force_ranking``: pure-Python loops, one query at a time, no NumPy sorting.
* ``torchreid_eval_market1501``: loop-form transliteration of deep-person-reid's Python
  ``eval_market1501`` (v1.0.6), with ``np.argsort``'s default sort as published.
* ``published_re_ranking``: loop-form transliteration of Houjing Huang's ``re_ranking``
  (AdaptiveL2Regularization ``evaluation/post_processing/re_ranking_ranklist.py``), including
  its float32 casts; ``sort_kind`` defaults to the published default sort.
"""
from __future__ import annotations

import numpy as np


def brute_force_ranking(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """CMC list and mAP with Python lists; ties broken by gallery index (Python's sort)."""
    num_q, num_g = len(distmat), len(distmat[0])
    max_rank = min(max_rank, num_g)
    cmc_totals = [0.0] * max_rank
    ap_total = 0.0
    num_valid = 0
    for qi in range(num_q):
        ranked = sorted(range(num_g), key=lambda gi: (float(np.float32(distmat[qi][gi])), gi))
        labels = []  # True for a positive, False for a negative, junk dropped
        for gi in ranked:
            same_pid = g_pids[gi] == q_pids[qi]
            if same_pid and g_camids[gi] == q_camids[qi]:
                continue
            labels.append(bool(same_pid))
        if True not in labels:
            continue
        num_valid += 1
        first = labels.index(True) + 1  # 1-based rank of the first positive
        for k in range(1, max_rank + 1):
            if first <= k:
                cmc_totals[k - 1] += 1.0
        hits, precisions = 0, []
        for k, is_pos in enumerate(labels, start=1):
            if is_pos:
                hits += 1
                precisions.append(hits / k)
        ap_total += sum(precisions) / len(precisions)
    if num_valid == 0:
        raise ValueError("no valid query")
    return [c / num_valid for c in cmc_totals], ap_total / num_valid


def torchreid_eval_market1501(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """deep-person-reid v1.0.6 ``eval_market1501`` (Python version), loop form."""
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        max_rank = num_g
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap = [], []
    num_valid_q = 0.0
    for q_idx in range(num_q):
        q_pid, q_camid = q_pids[q_idx], q_camids[q_idx]
        order = indices[q_idx]
        remove = (g_pids[order] == q_pid) & (g_camids[order] == q_camid)
        keep = np.invert(remove)
        raw_cmc = matches[q_idx][keep]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_valid_q += 1.0
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum()
        tmp_cmc = np.asarray([x / (i + 1.0) for i, x in enumerate(tmp_cmc)]) * raw_cmc
        all_ap.append(tmp_cmc.sum() / num_rel)
    assert num_valid_q > 0, "Error: all query identities do not appear in gallery"
    all_cmc = np.asarray(all_cmc).astype(np.float32)
    all_cmc = all_cmc.sum(0) / num_valid_q
    return all_cmc, np.mean(all_ap)


def _k_reciprocal(initial_rank, i, k):
    forward = initial_rank[i, :k + 1]
    backward = initial_rank[forward, :k + 1]
    return forward[np.where(backward == i)[0]]


def published_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3,
                         sort_kind=None):
    """Houjing Huang's ``re_ranking``, loop form, float32 where the original is float32."""
    original_dist = np.concatenate(
        [np.concatenate([q_q_dist, q_g_dist], axis=1),
         np.concatenate([q_g_dist.T, g_g_dist], axis=1)],
        axis=0,
    )
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist, kind=sort_kind).astype(np.int32)

    query_num = q_g_dist.shape[0]
    all_num = q_g_dist.shape[0] + q_g_dist.shape[1]
    half = int(np.around(k1 / 2.0))
    for i in range(all_num):
        k_reciprocal_index = _k_reciprocal(initial_rank, i, k1)
        expansion = k_reciprocal_index
        for candidate in k_reciprocal_index:
            candidate_set = _k_reciprocal(initial_rank, candidate, half)
            if len(np.intersect1d(candidate_set, k_reciprocal_index)) > 2.0 / 3 * len(candidate_set):
                expansion = np.append(expansion, candidate_set)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = 1.0 * weight / np.sum(weight)
    original_dist = original_dist[:query_num, ]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    inv_index = [np.where(V[:, c] != 0)[0] for c in range(all_num)]

    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        nonzero = np.where(V[i, :] != 0)[0]
        for c in nonzero:
            rows = inv_index[c]
            temp_min[0, rows] = temp_min[0, rows] + np.minimum(V[i, c], V[rows, c])
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)

    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:]
