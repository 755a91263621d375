"""Oracles the tests compare the project against: the Market-1501 protocol written out one query at a
time, the standard k-reciprocal re-ranking transcribed step by step, and squared Euclidean distances
through float64. Test modules import these from here, never from one another."""
from __future__ import annotations

import operator

import numpy as np
import torch


def literal_market(dist, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The protocol written out plainly: one query at a time, a stable argsort of its row."""
    all_cmc, all_ap = [], []
    for i in range(len(q_pids)):
        order = np.argsort(dist[i], kind="stable")
        remove = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        hits = (g_pids[order] == q_pids[i])[~remove].astype(np.float64)
        if not hits.any():
            continue
        cmc = np.minimum(hits.cumsum(), 1.0)
        cmc = np.concatenate([cmc, np.ones(max(0, max_rank - len(cmc)))])[:max_rank]
        all_cmc.append(cmc)
        precision = hits.cumsum() / np.arange(1, len(hits) + 1)
        all_ap.append((precision * hits).sum() / hits.sum())
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap))


def standard_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3, expand_if=operator.gt):
    """The standard k-reciprocal re_ranking (IL code, torchreid, fast-reid), one image at a time.

    Two departures, both for the tests' sake: the sort is stable (the standard's plain np.argsort
    leaves the order of equal distances to numpy's sort kernel), and `expand_if` lets a test check
    that its data tells the standard strict `>` from `>=`.
    """
    num_query = q_g_dist.shape[0]
    original_dist = np.concatenate([np.concatenate([q_q_dist, q_g_dist], axis=1),
                                    np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    all_num = original_dist.shape[0]
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)

    def k_reciprocal(i, k):
        forward = initial_rank[i, :k + 1]
        backward = initial_rank[forward, :k + 1]
        return forward[np.where(backward == i)[0]]

    for i in range(all_num):
        k_reciprocal_index = k_reciprocal(i, k1)
        k_reciprocal_expansion_index = k_reciprocal_index
        for candidate in k_reciprocal_index:
            candidate_k_reciprocal_index = k_reciprocal(candidate, int(np.around(k1 / 2.0)))
            if expand_if(len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)),
                         2.0 / 3 * len(candidate_k_reciprocal_index)):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index,
                                                         candidate_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = 1.0 * weight / np.sum(weight)
    original_dist = original_dist[:num_query, ]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    inv_index = [np.where(V[:, i] != 0)[0] for i in range(all_num)]

    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(num_query):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        ind_non_zero = np.where(V[i, :] != 0)[0]
        for j in ind_non_zero:
            rows = inv_index[j]
            temp_min[0, rows] = temp_min[0, rows] + np.minimum(V[i, j], V[rows, j])
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)

    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:num_query, num_query:]


def squared_euclidean(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (torch.cdist(a.double(), b.double()) ** 2).float().numpy()
