"""engine.rerank: k-reciprocal re-ranking against a set-by-set reading of the paper."""
from __future__ import annotations

import numpy as np
import pytest

from engine.metrics import evaluate_rank
from engine.rerank import check_size, re_ranking


def literal_rerank(q_g, q_q, g_g, k1=20, k2=6, lam=0.3):
    """Plain Python sets and dense arrays, one image at a time."""
    nq = len(q_q)
    d = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64)
    d /= d.max(1, keepdims=True)
    n = len(d)
    order = np.argsort(d, axis=1, kind="stable")

    def reciprocal(p, k):
        return [c for c in order[p, :k + 1] if p in order[c, :k + 1]]

    v = np.zeros((n, n))
    for p in range(n):
        r = reciprocal(p, k1)
        grown = set(r)
        for c in r:
            h = reciprocal(c, int(round(k1 / 2)))
            if len(set(h) & set(r)) >= 2 / 3 * len(h):
                grown |= set(h)
        members = sorted(grown)
        v[p, members] = np.exp(-d[p, members])
        v[p] /= v[p].sum()
    v = np.stack([v[order[p, :k2]].mean(0) for p in range(n)])
    jac = np.array([[1 - np.minimum(v[q], v[nq + g]).sum() / np.maximum(v[q], v[nq + g]).sum()
                     for g in range(n - nq)] for q in range(nq)])
    return (1 - lam) * jac + lam * d[:nq, nq:]


def clustered(seed=0, ids=12, per_id=6, nq=12, dim=8, spread=0.6):
    """Identities as Gaussian clusters; the first image of each of `nq` identities is a query."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim))
    pids = np.repeat(np.arange(ids), per_id)
    x = centres[pids] + spread * rng.normal(size=(len(pids), dim))
    qi = np.arange(nq) * per_id
    gi = np.setdiff1d(np.arange(len(pids)), qi)
    cams = np.arange(len(pids)) % per_id  # every image of an identity on its own camera

    def dist(a, b):
        return ((x[a][:, None] - x[b][None]) ** 2).sum(-1).astype(np.float32)

    return (dist(qi, gi), dist(qi, qi), dist(gi, gi)), (pids[qi], pids[gi], cams[qi], cams[gi])


@pytest.mark.parametrize("k1,k2,lam,block", [(20, 6, 0.3, None), (5, 3, 0.5, 50), (4, 1, 0.0, None)])
def test_matches_literal(k1, k2, lam, block, monkeypatch):
    if block:  # sum the Jaccard terms in many small blocks
        monkeypatch.setattr("engine.rerank.TRIPLETS_PER_BLOCK", block)
    blocks, _ = clustered(seed=k1)
    out = re_ranking(*blocks, k1=k1, k2=k2, lambda_value=lam)
    assert out.dtype == np.float32 and out.shape == blocks[0].shape and np.isfinite(out).all()
    np.testing.assert_allclose(out, literal_rerank(*blocks, k1=k1, k2=k2, lam=lam), atol=1e-5)


def test_does_not_hurt_clustered_data():
    blocks, ids = clustered(seed=3, ids=20, per_id=8, nq=20, spread=0.9)
    _, base = evaluate_rank(blocks[0], *ids)
    _, rr = evaluate_rank(re_ranking(*blocks, k1=6, k2=3), *ids)
    assert rr >= base - 1e-6


def test_identical_query_stays_first_and_lambda_one_keeps_ranking():
    blocks, _ = clustered(seed=4)
    q_g, q_q, g_g = (b.copy() for b in blocks)
    q_g[0] = g_g[7]  # query 0 is gallery image 7
    q_g[0, 7] = 0.0
    q_q[0, 1:] = q_g[1:, 7]
    q_q[1:, 0] = q_g[1:, 7]
    assert re_ranking(q_g, q_q, g_g).argmin(1)[0] == 7
    same = re_ranking(q_g, q_q, g_g, lambda_value=1.0)
    np.testing.assert_array_equal(np.argsort(same, 1, kind="stable"), np.argsort(q_g, 1, kind="stable"))


def test_errors():
    with pytest.raises(ValueError, match="g_g_dist"):
        re_ranking(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="11659 queries \\+ 82161 gallery"):
        check_size(11659, 82161)
    check_size(3368, 15913)  # Market-1501 fits
