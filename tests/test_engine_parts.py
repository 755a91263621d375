"""The learning-rate schedule, checkpoints and the second-forward shuffle plan."""
from __future__ import annotations

import argparse
import pickle

import numpy as np
import pytest
import torch

from engine.checkpoint import config_differences, load_checkpoint, save_checkpoint
from engine.optim import build_scheduler, warmup_multistep
from engine.step import shuffle_plan


def test_warmup_multistep_matches_published_schedule():
    # Literal: linear warm-up from 0.1 over 10 epochs, x0.1 at epochs 30 and 50.
    expected = []
    for e in range(70):
        warm = 0.1 * (1 - e / 10) + e / 10 if e < 10 else 1.0
        expected.append(warm * 0.1 ** sum(e >= m for m in (30, 50)))
    assert np.allclose([warmup_multistep(e) for e in range(70)], expected)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=3.5e-4)
    sched = build_scheduler(opt)
    lrs = []
    for _ in range(70):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert np.allclose(lrs, [3.5e-4 * f for f in expected])


def test_checkpoint_roundtrip_is_weights_only_and_atomic(tmp_path):
    state = {"config": {"arch": "resnet18", "sources": ["a", "b", "c"]}, "epoch": 3,
             "memories": [torch.randn(4, 8)], "history": [{"epoch": 1, "mAP": 0.5}]}
    path = tmp_path / "ckpt" / "latest.pth"
    save_checkpoint(state, path)
    back = load_checkpoint(path)
    assert back["epoch"] == 3 and torch.equal(back["memories"][0], state["memories"][0])
    assert [p.name for p in path.parent.iterdir()] == ["latest.pth"]  # no temporary left

    # An arbitrary object in a checkpoint is refused, never unpickled.
    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "evil.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")
    diffs = config_differences({"arch": "resnet50", "seed": 1}, {"arch": "resnet18", "seed": 1})
    assert diffs == ["arch: checkpoint 'resnet50', now 'resnet18'"]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shuffle_plan_routes_every_source_row(world):
    sizes = [16 // world * 1, 16 // world, 16 // world]
    n = sum(sizes)
    # What each rank holds: rows tagged (rank, source, index within that rank's source slice).
    local = [[(r, j, k) for j, s in enumerate(sizes) for k in range(s)] for r in range(world)]
    plans = [shuffle_plan(sizes, world, r, seed=5, epoch=2, it=7) for r in range(world)]
    gathered = [local[r][int(i)] for r in range(world) for i in plans[r].perm]
    for r in range(world):
        assert sorted(plans[r].perm.tolist()) == list(range(n))
        # Every rank computes the same routing of the gathered rows.
        for j in range(3):
            assert torch.equal(plans[r].source_rows[j], plans[0].source_rows[j])
    for j in range(3):
        rows = [gathered[int(i)] for i in plans[0].source_rows[j]]
        assert all(src == j for _, src, _ in rows)
        assert len(rows) == world * sizes[j]
        # In shuffled order: the order the rows appear in the gathered output.
        assert plans[0].source_rows[j].tolist() == sorted(plans[0].source_rows[j].tolist())
    unshuffled = shuffle_plan(sizes, world, 0, 5, 2, 7, shuffle=False)
    assert unshuffled.perm.tolist() == list(range(n))
    assert plans[0].perm.tolist() != list(range(n))
    again = shuffle_plan(sizes, world, 0, seed=5, epoch=2, it=7)
    assert torch.equal(again.perm, plans[0].perm)
    assert not torch.equal(shuffle_plan(sizes, world, 0, 5, 2, 8).perm, plans[0].perm)
