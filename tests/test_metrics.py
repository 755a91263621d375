"""engine.evaluation.metrics against a literal per-query Market-1501 implementation (tests/oracles.py), and
pairwise_distance against torch.cdist."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.evaluation.metrics import evaluate_features, evaluate_rank, pairwise_distance
from tests.oracles import literal_market


def make_ids(rng, nq, ng, num_ids, num_cams):
    q_pids = rng.integers(0, num_ids, nq)
    g_pids = rng.integers(0, num_ids, ng)
    q_cams = rng.integers(0, num_cams, nq)
    g_cams = rng.integers(0, num_cams, ng)
    q_pids[0] = num_ids + 5  # a pid absent from the gallery
    g_pids[g_pids == q_pids[1]] = num_ids + 6  # query 1: only same-camera matches (all removed)
    g_pids[:2], g_cams[:2] = q_pids[1], q_cams[1]
    return q_pids, g_pids, q_cams, g_cams


def check(dist, ids, max_rank=50, chunk=None, to_torch=False):
    ref_cmc, ref_map = literal_market(np.asarray(dist), *ids, max_rank=max_rank)
    args = [torch.from_numpy(np.asarray(a)) for a in (dist, *ids)] if to_torch else [dist, *ids]
    cmc, mAP = evaluate_rank(*args, max_rank=max_rank, chunk=chunk)
    assert isinstance(cmc, np.ndarray) and cmc.dtype.kind == "f" and cmc.shape == (max_rank,)
    assert isinstance(mAP, float) and 0.0 <= mAP <= 1.0
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert abs(mAP - ref_map) < 1e-6


@pytest.mark.parametrize("to_torch", [False, True])
@pytest.mark.parametrize("chunk", [None, 7])
def test_evaluate_rank_random(to_torch, chunk):
    rng = np.random.default_rng(0)
    ids = make_ids(rng, 40, 300, 15, 4)
    check(rng.random((40, 300), dtype=np.float32), ids, chunk=chunk, to_torch=to_torch)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_evaluate_rank_ties(dtype):
    """Few distinct distances: ties everywhere, broken by gallery index like a stable sort."""
    rng = np.random.default_rng(1)
    ids = make_ids(rng, 50, 200, 10, 3)
    dist = rng.integers(0, 4, (50, 200)).astype(dtype)
    check(dist, ids, chunk=16)
    check(dist, ids, to_torch=True)


def test_evaluate_rank_negative_and_short_gallery():
    rng = np.random.default_rng(2)
    ids = make_ids(rng, 20, 30, 5, 2)
    dist = np.round(rng.normal(size=(20, 30)), 1)  # negative values, -0.0 and ties
    dist[3, :5] = -0.0
    check(dist, ids, max_rank=50)  # max_rank longer than the gallery
    check(dist.astype(np.float32), ids, max_rank=5, to_torch=True)


def test_evaluate_rank_no_valid_query():
    with pytest.raises(ValueError, match="no query has a correct match"):
        evaluate_rank(np.zeros((2, 3)), [1, 2], [1, 3, 4], [0, 0], [0, 1, 1])
    with pytest.raises(ValueError, match="g_pids has shape"):
        evaluate_rank(np.zeros((2, 3)), [1, 2], [1, 3], [0, 0], [0, 1, 1])


def features(rng, n, dim, dtype=torch.float32):
    return torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(n, dim))).float(), dim=1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluate_features_matches_full_matrix(dtype):
    rng = np.random.default_rng(3)
    ids = make_ids(rng, 60, 400, 20, 6)
    qf, gf = features(rng, 60, 32, dtype), features(rng, 400, 32, dtype)
    cmc, mAP = evaluate_rank(pairwise_distance(qf, gf), *ids)
    res = evaluate_features(qf, gf, *ids, chunk=9)
    assert set(res) == {"mAP", "rank1", "rank5", "rank10", "cmc"}
    np.testing.assert_allclose(res["cmc"], cmc, atol=1e-6)
    assert abs(res["mAP"] - mAP) < 1e-6
    assert res["rank1"] == cmc[0] and res["rank5"] == cmc[4] and res["rank10"] == cmc[9]
    if dtype != torch.float32:
        return  # re-normalising rounded bf16 features moves distances: compare rankings in fp32 only
    cos = evaluate_features(qf, gf, *ids, chunk=13, metric="cosine")
    np.testing.assert_allclose(cos["cmc"], cmc, atol=1e-6)
    assert abs(cos["mAP"] - mAP) < 1e-6


@pytest.mark.parametrize("chunk", [None, 7])
def test_query_expansion_is_chunk_independent_and_literal(chunk):
    """aqe=K: each query replaced by the normalised sum of itself and its K nearest gallery
    features (a full float64 argsort here), then ranked as usual; any chunk gives the same."""
    rng = np.random.default_rng(5)
    ids = make_ids(rng, 60, 400, 20, 6)
    qf, gf = features(rng, 60, 32), features(rng, 400, 32)
    q64, g64 = qf.double(), gf.double()
    nearest = torch.cdist(q64, g64).argsort(dim=1)[:, :4]
    expanded = torch.nn.functional.normalize(q64 + g64[nearest].sum(1), dim=1)
    cmc, mAP = literal_market((torch.cdist(expanded, g64) ** 2).numpy(), *ids)
    res = evaluate_features(qf, gf, *ids, chunk=chunk, aqe=4)
    np.testing.assert_allclose(res["cmc"], cmc, atol=1e-6)
    assert abs(res["mAP"] - mAP) < 1e-6
    assert abs(res["mAP"] - evaluate_features(qf, gf, *ids)["mAP"]) > 1e-4  # expansion changed the ranking


def test_evaluate_features_rerank_and_errors():
    rng = np.random.default_rng(4)
    ids = make_ids(rng, 30, 120, 10, 3)
    qf, gf = features(rng, 30, 16), features(rng, 120, 16)
    res = evaluate_features(qf, gf, *ids, rerank=True)
    assert 0.0 <= res["mAP"] <= 1.0 and np.isfinite(res["cmc"]).all()
    with pytest.raises(ValueError, match="metric"):
        evaluate_features(qf, gf, *ids, metric="l1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluate_features_cuda_matches_cpu():
    rng = np.random.default_rng(5)
    ids = make_ids(rng, 64, 500, 20, 6)
    qf, gf = features(rng, 64, 64), features(rng, 500, 64)
    cpu = evaluate_features(qf, gf, *ids, chunk=10)
    gpu = evaluate_features(qf.cuda(), gf.cuda(), *[torch.from_numpy(a).cuda() for a in ids], chunk=10)
    np.testing.assert_allclose(gpu["cmc"], cpu["cmc"], atol=1e-6)
    assert abs(gpu["mAP"] - cpu["mAP"]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pairwise_distance_equals_cdist(dtype):
    """Squared Euclidean and cosine (1 - cos) distances, in fp32 whatever the input, against
    torch.cdist in float64 on the same (fp32-rounded) values."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 19, generator=g) * 3 + 1).to(dtype)
    y = (torch.randn(53, 19, generator=g) * 3).to(dtype)
    x64, y64 = x.float().double(), y.float().double()
    d = pairwise_distance(x, y)
    assert d.dtype == torch.float32 and d.shape == (37, 53)
    want = torch.cdist(x64, y64) ** 2
    torch.testing.assert_close(d.double(), want, rtol=1e-5, atol=1e-4)
    cos = pairwise_distance(x, y, metric="cosine")
    want_cos = torch.cdist(F.normalize(x64, dim=1), F.normalize(y64, dim=1)) ** 2 / 2  # |a - b|^2 = 2 - 2 cos
    torch.testing.assert_close(cos.double(), want_cos, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="metric"):
        pairwise_distance(x, y, metric="l1")
