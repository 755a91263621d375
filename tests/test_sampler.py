"""The identity sampler: the published sampling rule, determinism, rank slices, refusals, speed."""
from __future__ import annotations

import time

import numpy as np
import pytest

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
    b = identity_batches(labels, camids, num_ids=4, num_batches=50, seed=0, epoch=0)
    assert b.shape == (50, 16)
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


def test_identity_passes_fill_the_epoch():
    labels, camids = _toy()
    b = identity_batches(labels, camids, num_ids=3, num_batches=2, seed=1, epoch=0)
    first_pass = labels[_groups(b)[:3, 0]]
    assert sorted(first_pass) == [0, 1, 3]  # each usable identity once per pass


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
    b = identity_batches(labels, camids, num_ids=4, num_batches=20, seed=0, epoch=0)
    assert (labels[b] >= 0).all()


def test_rank_slices_disjoint_and_covering():
    labels, camids = _toy()
    batch = identity_batches(labels, camids, num_ids=4, num_batches=1, seed=0, epoch=0)[0]
    for world in (1, 2, 4):
        parts = [rank_slice(batch, r, world) for r in range(world)]
        np.testing.assert_array_equal(np.concatenate(parts), batch)
        assert {len(p) for p in parts} == {16 // world}
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        rank_slice(batch, 0, 3)


def test_refuses_a_source_without_pairs():
    with pytest.raises(ValueError, match="source dukemtmc: every identity has fewer than 2 images"):
        identity_batches(np.arange(10), np.zeros(10), num_batches=1, seed=0, epoch=0, name="dukemtmc")


def test_msmt17_size_is_fast():
    rng = np.random.default_rng(0)
    labels, camids = rng.integers(0, 4101, 126441), rng.integers(0, 15, 126441)
    t = time.perf_counter()
    for source in range(3):
        b = identity_batches(labels, camids, num_batches=200, seed=0, epoch=5, source=source)
    assert time.perf_counter() - t < 0.5
    assert b.shape == (200, 64)
