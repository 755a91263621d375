"""engine.evaluation.rerank against a step-by-step transcription of the standard re_ranking function."""
from __future__ import annotations

import operator

import numpy as np
import pytest
import torch

from engine.evaluation.metrics import evaluate_features, evaluate_rank, pairwise_distance
from engine.evaluation.rerank import _nearest, check_size, re_ranking
from tests.oracles import standard_re_ranking


def clustered(seed=0, ids=12, per_id=6, nq=12, dim=8, spread=0.6):
    """Identities as Gaussian clusters; the first image of each of `nq` identities is a query.

    Distances are squared Euclidean, as engine.evaluation.metrics passes them.
    """
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


def tied(seed, nq, ng, dim=3, levels=3, copies=4):
    """Integer features on a coarse grid, each repeated `copies` times: many exactly equal distances."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, levels, size=(-(-(nq + ng) // copies), dim))
    x = rng.permutation(np.repeat(base, copies, axis=0))[:nq + ng].astype(np.float32)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    return d[:nq, nq:], d[:nq, :nq], d[nq:, nq:]


def assert_standard(blocks, **kw):
    out = re_ranking(*blocks, **kw)
    assert out.dtype == np.float32 and out.shape == blocks[0].shape and np.isfinite(out).all()
    np.testing.assert_allclose(out, standard_re_ranking(*blocks, **kw), rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed,ids,per_id,nq,k1,k2,lam", [
    (0, 12, 6, 12, 20, 6, 0.3),   # the published setting
    (1, 30, 5, 20, 5, 3, 0.5),    # round(5 / 2) = 2: numpy rounds half to even
    (2, 10, 7, 4, 3, 1, 0.0),     # k2 = 1: no query expansion; pure Jaccard
    (3, 25, 4, 25, 7, 10, 0.9),
    (4, 3, 4, 2, 20, 30, 0.3),    # a 12-image pool: k1 + 1 and k2 exceed it
    (5, 10, 4, 5, 0, 3, 0.3),     # k1 = 0: R(p) is p alone
])
def test_matches_standard(seed, ids, per_id, nq, k1, k2, lam):
    blocks, _ = clustered(seed, ids, per_id, nq)
    assert_standard(blocks, k1=k1, k2=k2, lambda_value=lam)


@pytest.mark.parametrize("blocks", [clustered(5, 15, 5, 10)[0], tied(4, 10, 40)], ids=["clustered", "tied"])
def test_matches_standard_in_small_blocks(blocks, monkeypatch):
    monkeypatch.setattr("engine.evaluation.rerank.TRIPLETS_PER_BLOCK", 50)
    monkeypatch.setattr("engine.evaluation.rerank.KEYS_PER_BLOCK", 200)
    monkeypatch.setattr("engine.evaluation.rerank.TILE", 7)
    assert_standard(blocks, k1=6, k2=3)


def test_matches_standard_for_float64_input():
    blocks, _ = clustered(6, 12, 5, 8)
    assert_standard([b.astype(np.float64) for b in blocks], k1=6, k2=3)


@pytest.mark.parametrize("k", [1, 4, 11, 40])
def test_nearest_is_a_stable_argsort(k):
    """Rows tied at the k-th place take the exact-key path, the others the float top-k path."""
    d = np.random.default_rng(k).integers(0, 25, size=(40, 40)).astype(np.float32)
    expected = np.argsort(d, axis=1, kind="stable")[:, :k]
    if k < len(d):
        ranked = np.sort(d, axis=1)
        boundary_tie = ranked[:, k - 1] == ranked[:, k]
        assert boundary_tie.any() and not boundary_tie.all()
    np.testing.assert_array_equal(_nearest(torch.from_numpy(d), k).numpy(), expected)


@pytest.mark.parametrize("seed,k1,k2", [(0, 20, 6), (1, 4, 1), (2, 2, 3), (3, 2, 1)])
def test_matches_standard_under_ties(seed, k1, k2):
    # Some images have more copies than fit in their own k1 + 1 nearest: their soft sets are empty.
    assert_standard(tied(seed, 16, 60), k1=k1, k2=k2)


def test_asymmetric_blocks_follow_the_column_scaling():
    """The standard divides column i by its maximum and then transposes; only asymmetric input
    tells that from dividing each row by its own maximum."""
    rng = np.random.default_rng(6)
    q_g, q_q, g_g = (rng.uniform(0.1, 1.0, size=s).astype(np.float32) for s in ((8, 30), (8, 8), (30, 30)))
    assert_standard((q_g, q_q, g_g), k1=6, k2=3)
    assert not np.allclose(re_ranking(q_g, q_q.T, g_g.T, k1=6, k2=3), re_ranking(q_g, q_q, g_g, k1=6, k2=3),
                           rtol=0, atol=1e-3)


def test_expansion_threshold_is_strict():
    """A candidate set of 3 with 2 members inside R(p) must not be added (2 > 2/3 * 3 is false)."""
    blocks, _ = clustered(seed=0, ids=8, per_id=4, nq=8, dim=4, spread=0.8)
    kw = dict(k1=4, k2=2)
    assert not np.allclose(standard_re_ranking(*blocks, **kw, expand_if=operator.ge),
                           standard_re_ranking(*blocks, **kw), rtol=0, atol=1e-3)
    assert_standard(blocks, **kw)


@pytest.mark.parametrize("kw", [dict(k1=6, k2=3), dict()])
def test_improves_map_on_clustered_data(kw):
    """Overlapping identities (mAP about 0.52 plain): the reciprocal neighbourhoods must help."""
    blocks, ids = clustered(seed=3, ids=20, per_id=8, nq=20, spread=0.9)
    _, base = evaluate_rank(blocks[0], *ids)
    _, rr = evaluate_rank(re_ranking(*blocks, **kw), *ids)
    assert rr > base + 0.01


def test_evaluate_features_rerankssquared_euclidean_distances():
    """engine.evaluation.metrics feeds squared Euclidean distances, which the standard code then squares again
    (as in the IL code's evaluator)."""
    gen = torch.Generator().manual_seed(7)
    centres = torch.randn(15, 16, generator=gen)
    pids = torch.arange(15).repeat_interleave(6)
    feats = centres[pids] + 0.7 * torch.randn(len(pids), 16, generator=gen)
    qi = torch.arange(15) * 6
    gi = torch.tensor([i for i in range(len(pids)) if i % 6])
    ids = (pids[qi].numpy(), pids[gi].numpy(), (qi % 6).numpy(), (gi % 6).numpy())
    qf, gf = feats[qi], feats[gi]
    blocks = [pairwise_distance(a, b).numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf))]
    _, expected = evaluate_rank(standard_re_ranking(*blocks), *ids)
    assert abs(evaluate_features(qf, gf, *ids, rerank=True)["mAP"] - expected) < 1e-6


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
    with pytest.raises(ValueError, match="k2"):
        re_ranking(np.ones((2, 3)), np.ones((2, 2)), np.ones((3, 3)), k2=0)
    with pytest.raises(ValueError, match="11659 queries \\+ 82161 gallery"):
        check_size(11659, 82161)
    check_size(3368, 15913)  # Market-1501 fits
