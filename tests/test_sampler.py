"""The identity sampler: the published sampling rule, passes of distinct identities,
determinism, rank slices, refusals."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.loader import LoaderConfig, SourceSet, TrainPlan
from pipeline.sampler import identity_batches, rank_slice


def _toy():
    """Identity 0: 3 cameras x 3 images; 1: one camera, 6 images; 2: one image; 3: cams (0, 0, 1)."""
    labels = np.array([0] * 9 + [1] * 6 + [2] + [3] * 3)
    camids = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2] + [4] * 6 + [0] + [0, 0, 1])
    return labels, camids


def _groups(batches: np.ndarray) -> np.ndarray:
    return batches.reshape(-1, 4)


def test_four_images_per_identity_and_camera_rule():
    labels, camids = _toy()
    b = identity_batches(labels, camids, num_ids=3, num_batches=50, seed=0, epoch=0)
    assert b.shape == (50, 12)
    for g in _groups(b):
        lab, cam = labels[g], camids[g]
        assert (lab == lab[0]).all()
        assert lab[0] != 2  # the single-image identity is never drawn
        if lab[0] == 0:  # 6 images on other cameras: 3 distinct ones, none on the anchor's camera
            assert (cam[1:] != cam[0]).all() and len(set(g[1:])) == 3
        elif lab[0] == 1:  # one camera: the other images, 5 >= 4 so without replacement
            assert g[0] not in g[1:] and len(set(g[1:])) == 3
        elif cam[0] == 0:  # identity 3 anchored on camera 0: its single other-camera image, repeated
            assert (g[1:] == 18).all()
        else:  # anchored on camera 1: the two camera-0 images, with replacement
            assert set(g[1:]) <= {16, 17}


def _source(num_identities: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Identities 0..n-1 with 2 to 6 images each over 3 cameras, rows shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_identities), rng.integers(2, 7, num_identities))
    labels = rng.permutation(labels)
    return labels, rng.integers(0, 3, len(labels))


def test_no_batch_repeats_an_identity():
    labels, camids = _source(37)  # 37 = 2 * 16 + 5: each pass leaves 5 identities out
    for epoch in range(30):
        b = identity_batches(labels, camids, num_batches=9, seed=0, epoch=epoch)
        anchors = labels[b.reshape(9, 16, 4)]
        assert (anchors == anchors[..., :1]).all()
        assert all(len(set(batch)) == 16 for batch in anchors[..., 0])


def test_each_pass_draws_every_identity_once():
    labels, camids = _source(37)
    b = identity_batches(labels, camids, num_batches=8, seed=2, epoch=3)
    ids = labels[_groups(b)[:, 0]].reshape(4, 32)  # 4 passes of floor(37 / 16) = 2 batches
    for one_pass in ids:
        assert len(set(one_pass)) == 32  # 32 distinct identities; the other 5 dropped this pass
    assert len(set(ids.reshape(-1))) > 32  # the dropped identities change from pass to pass


def test_toy_passes_use_every_usable_identity():
    labels, camids = _toy()
    b = identity_batches(labels, camids, num_ids=3, num_batches=4, seed=1, epoch=0)
    for batch in _groups(b)[:, 0].reshape(4, 3):
        assert sorted(labels[batch]) == [0, 1, 3]  # one batch per pass, each usable identity once


def test_deterministic_and_varies_with_epoch_and_source():
    rng = np.random.default_rng(0)
    labels, camids = rng.integers(0, 50, 600), rng.integers(0, 6, 600)
    kw = dict(num_batches=20, seed=3)
    a = identity_batches(labels, camids, epoch=1, **kw)
    np.testing.assert_array_equal(a, identity_batches(labels, camids, epoch=1, **kw))
    assert not np.array_equal(a, identity_batches(labels, camids, epoch=2, **kw))
    assert not np.array_equal(a, identity_batches(labels, camids, epoch=1, source=1, **kw))
    assert not np.array_equal(a, identity_batches(labels, camids, epoch=1, num_batches=20, seed=4))


def test_negative_labels_never_drawn():
    labels, camids = _toy()
    labels = np.r_[labels, [-1, -1, -1]]
    camids = np.r_[camids, [0, 1, 2]]
    b = identity_batches(labels, camids, num_ids=3, num_batches=20, seed=0, epoch=0)
    assert (labels[b] >= 0).all()


def test_rank_slices_disjoint_and_covering():
    labels, camids = _toy()
    batch = identity_batches(labels, camids, num_ids=3, num_batches=1, seed=0, epoch=0)[0]
    for world in (1, 2, 3, 4):
        parts = [rank_slice(batch, r, world) for r in range(world)]
        np.testing.assert_array_equal(np.concatenate(parts), batch)
        assert {len(p) for p in parts} == {12 // world}
    with pytest.raises(ValueError, match="does not split over 5 ranks"):
        rank_slice(batch, 0, 5)


def test_refuses_a_source_without_pairs():
    with pytest.raises(ValueError, match="source dukemtmc: 0 identities have 2 or more images"):
        identity_batches(np.arange(10), np.zeros(10), num_batches=1, seed=0, epoch=0, name="dukemtmc")


def test_refuses_fewer_identities_than_a_batch_needs():
    labels, camids = _toy()  # 3 usable identities: identity 2 has a single image
    with pytest.raises(ValueError, match="source cuhk03: 3 identities have 2 or more images, "
                                         "fewer than the 4 distinct identities a batch needs"):
        identity_batches(labels, camids, num_ids=4, num_batches=1, seed=0, epoch=0, name="cuhk03")


@pytest.mark.parametrize("world", [1, 2])
def test_each_source_has_its_own_batches_whatever_the_number_of_sources(synthetic_shards, world):
    """The training plan samples each source's identity batches from its own stream (seed, epoch,
    position): a source's rows are the same in a run of 1, 2 or 4 sources, and an iteration holds
    -b rows of each source (its rank's slice), their labels, round sizes and augmentations."""
    names = ["dukemtmc", "cuhk03", "msmt17v1", "cuhk_sysu"]
    sets = {n: SourceSet(synthetic_shards / n) for n in names}
    cfg = LoaderConfig(num_ids=4, num_instances=4, iters=3, seed=5, rank=world - 1, world=world, workers=0)
    plans = {k: TrainPlan([sets[n] for n in names[:k]], cfg) for k in (1, 2, 4)}
    for k, plan in plans.items():
        rows = plan.indices(1)
        assert len(rows) == k and plan.sizes == [16 // world] * k
        for j in range(k):
            np.testing.assert_array_equal(rows[j], plans[4].indices(1)[j])
            assert rows[j].shape == (3, 16 // world)
        assert [len(y) for y in plan.batch_labels(1, 2)] == [16] * k
        assert all(len(a) == k * 16 // world for a in plan.augmentation(1, 2))
    mirror, _ = plans[4].augmentation(1, 2)
    np.testing.assert_array_equal(plans[1].augmentation(1, 2)[0], mirror[:16 // world])
