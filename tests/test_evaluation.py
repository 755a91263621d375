"""engine/evaluation/targets.py end to end on real shards and a real (untrained) ResNet-18: the target's
query is ranked against its gallery and not the other way round, plain and re-ranked results
equal the literal protocol and the standard re-ranking, memories start as each identity's mean
feature (also when start-up reads the three sources in one pass), and 2 gloo ranks give what 1 rank
gives."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.evaluation.targets import evaluate_target, extract_features
from engine.run import init_memories
from pipeline.loader import SourceSet, build_eval_loader, decode_rgb
from pipeline.shards import SplitReader
from pipeline import transforms
from tests.dist_eval_check import CASES, SOURCE, TARGET, case_config, case_model, run_case
from tests.oracles import literal_market, squared_euclidean, standard_re_ranking

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_rank(synthetic_shards) -> dict:
    return run_case(synthetic_shards, 0, 1)


@pytest.fixture(scope="module")
def split_ids(synthetic_shards) -> tuple[np.ndarray, ...]:
    """Query and gallery pids and camids read from the shards split by split, independently of
    the loader's is_query mask."""
    q, g = (SplitReader(synthetic_shards / TARGET, s) for s in ("query", "gallery"))
    return q.pids, g.pids, q.camids, g.camids


def test_query_is_ranked_against_the_gallery(one_rank, split_ids):
    """The loader lists the query first, then the gallery: evaluate_target must rank the query
    rows against the gallery rows. The case is asymmetric (the gallery has more images per
    person, distractors, and people without a query): the swapped ranking gives another mAP,
    by far more than the tolerance of the comparison."""
    feats, nq = one_rank["features"], len(split_ids[0])
    qf, gf = feats[:nq], feats[nq:]
    cmc, mAP = literal_market(squared_euclidean(qf, gf), *split_ids)
    assert one_rank["plain_mAP"] == pytest.approx(mAP, abs=1e-6)
    np.testing.assert_allclose(one_rank["plain_cmc"].numpy(), cmc, atol=1e-6)
    q_pids, g_pids, q_cams, g_cams = split_ids
    _, swapped = literal_market(squared_euclidean(gf, qf), g_pids, q_pids, g_cams, q_cams)
    assert abs(swapped - mAP) > 1e-3, (swapped, mAP)


def test_reranked_target_matches_the_standard_function(one_rank, split_ids):
    """--rerank: the standard k-reciprocal function (tests/test_rerank.py's transcription) on the
    squared Euclidean blocks of the extracted features, then the literal protocol."""
    feats, nq = one_rank["features"], len(split_ids[0])
    qf, gf = feats[:nq], feats[nq:]
    blocks = [squared_euclidean(a, b) for a, b in ((qf, gf), (qf, qf), (gf, gf))]
    cmc, mAP = literal_market(standard_re_ranking(*blocks), *split_ids)
    assert one_rank["rerank_mAP"] == pytest.approx(mAP, abs=1e-4)
    np.testing.assert_allclose(one_rank["rerank_cmc"].numpy(), cmc, atol=1e-6)
    assert abs(one_rank["rerank_mAP"] - one_rank["plain_mAP"]) > 1e-3  # re-ranking did change the result


class Mirrored(torch.nn.Module):
    """The network on mirror images: extract_features of it gives each image's flipped feature."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.num_features = net, net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flip(3))


def test_flip_test_and_query_expansion_follow_their_definitions(synthetic_shards, one_rank, split_ids):
    """--flip-test --aqe 4, written out: each feature the normalised sum of the image's and its
    mirror image's features; each query the normalised sum of itself and its 4 nearest gallery
    features (float64, a full argsort); then the literal protocol. (K = 4: the 4th and 5th
    neighbours of every query are far enough apart that fp32 distances order them alike; at
    K = 3 one query has a near tie, 2.5e-6.)"""
    loader = build_eval_loader(synthetic_shards, TARGET, "test", case_config(0, 1))
    mirrored = extract_features(Mirrored(case_model()), loader, torch.device("cpu"), None)
    feats = F.normalize(one_rank["features"].double() + mirrored.double(), dim=1)
    nq = len(split_ids[0])
    qf, gf = feats[:nq], feats[nq:]
    dist, order = torch.cdist(qf, gf).sort(dim=1)
    assert float((dist[:, 4] - dist[:, 3]).min()) > 1e-5
    nearest = order[:, :4]
    qf = F.normalize(qf + gf[nearest].sum(1), dim=1)
    cmc, mAP = literal_market(squared_euclidean(qf, gf), *split_ids)
    assert one_rank["flip_aqe_mAP"] == pytest.approx(mAP, abs=1e-6)
    np.testing.assert_allclose(one_rank["flip_aqe_cmc"].numpy(), cmc, atol=1e-6)
    assert abs(one_rank["flip_aqe_mAP"] - one_rank["plain_mAP"]) > 1e-3  # the options did change the result


def test_memories_start_as_each_identitys_mean_feature(synthetic_shards, one_rank):
    """The memory initialisation against the definition, computed another way: every mix image decoded with
    PIL, test transform, forwarded alone through the model in eval mode, then per label the mean,
    L2-normalised."""
    model = case_model().eval()
    cfg = case_config(0, 1)
    source = SourceSet(synthetic_shards / SOURCE)
    pixels = np.stack([transforms.test_pixels(decode_rgb(source.read(j)), cfg.height, cfg.width)
                       for j in range(len(source))])
    images = transforms.normalize(torch.from_numpy(pixels)).permute(0, 3, 1, 2)
    with torch.no_grad():
        feats = torch.cat([model(x) for x in images.split(64)])
    labels = torch.from_numpy(source.labels)
    means = torch.stack([feats[labels == k].mean(0) for k in range(source.num_classes)])
    torch.testing.assert_close(one_rank["centers"], F.normalize(means, dim=1), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_ranks_evaluate_as_one(synthetic_shards, one_rank, tmp_path):
    """Each rank extracts its contiguous part (uneven: 205 rows) and the parts are gathered in
    rank order: features, plain and re-ranked results, and every rank's memory equal 1 rank's."""
    result = tmp_path / "two.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_eval_check.py"), str(synthetic_shards), str(result)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = torch.load(result)
    assert len(two["features"]) == len(one_rank["features"]) == 205
    # Other batch compositions may change the last bits of a convolution, nothing more.
    torch.testing.assert_close(two["features"], one_rank["features"], rtol=1e-5, atol=1e-6)
    for name in CASES:
        assert two[f"{name}_mAP"] == pytest.approx(one_rank[f"{name}_mAP"], abs=1e-6)
        torch.testing.assert_close(two[f"{name}_cmc"], one_rank[f"{name}_cmc"], rtol=0, atol=1e-9)
    for centers in two["all_centers"]:
        torch.testing.assert_close(centers, one_rank["centers"], rtol=1e-5, atol=1e-6)


def test_extract_features_keeps_the_mode_and_the_row_order(synthetic_shards, one_rank):
    """Rows come back in the loader's order whatever the batch size, and a model in training
    mode is evaluated in eval mode and handed back in training mode."""
    model = case_model().train()
    cfg = dataclasses.replace(case_config(0, 1), test_batch_size=7)
    feats = extract_features(model, build_eval_loader(synthetic_shards, TARGET, "test", cfg),
                             torch.device("cpu"), None)
    assert model.training
    torch.testing.assert_close(feats, one_rank["features"], rtol=1e-5, atol=1e-6)
    res = evaluate_target(model, build_eval_loader(synthetic_shards, TARGET, "test", cfg),
                          torch.device("cpu"), None)
    assert res["mAP"] == pytest.approx(one_rank["plain_mAP"], abs=1e-6)


def test_memories_start_from_one_pass_over_the_sources(synthetic_shards):
    """Start-up reads the three sources' mix sets with one loader (one pool of workers, not
    three) and starts each memory exactly as a loader of its source alone would."""
    from model.memory import MemoryClassifier
    from model.resnet import build_model
    from pipeline.loader import LoaderConfig, build_eval_loader

    cfg = LoaderConfig(height=64, width=32, workers=0, loader="torch", test_batch_size=64)
    sources = ["dukemtmc", "cuhk03", "msmt17v1"]
    torch.manual_seed(0)
    model = build_model("resnet18").to(memory_format=torch.channels_last)
    mix = build_eval_loader(synthetic_shards, sources, "mix", cfg)
    alone = [build_eval_loader(synthetic_shards, s, "mix", cfg) for s in sources]
    assert len(mix) == sum(len(a) for a in alone)
    classes = [int(a.labels.max()) + 1 for a in alone]
    one, each = ([MemoryClassifier(model.num_features, n) for n in classes] for _ in range(2))
    init_memories(model, mix, one, torch.device("cpu"), None)
    for loader, memory in zip(alone, each):  # a loader per source: its features, each identity's mean
        feats = extract_features(model, loader, torch.device("cpu"), None)
        memory.init_centers(feats, torch.from_numpy(loader.labels))
    for a, b in zip(one, each):
        torch.testing.assert_close(a.centers, b.centers, rtol=1e-5, atol=1e-6)
