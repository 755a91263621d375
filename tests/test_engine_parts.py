"""The learning-rate schedule, checkpoints (and how messages name their positions), the loop's
health check, the second-forward shuffle plan and the metrics plot."""
from __future__ import annotations

import argparse
import pickle

import numpy as np
import pytest
import torch

from engine.checkpoint import (UPGRADES, VERSION, CheckpointError, TrainState, config_differences, position,
                               read_checkpoint, save_checkpoint)
from engine.loop import NonFiniteLoss, check_health
from engine.optim import build_scheduler, warmup_multistep
from engine.runlog import plot_history
from engine.step import shuffle_plan
from model.memory import MemoryClassifier
from tests.runs import load_checkpoint


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
    assert back["version"] == VERSION
    assert [p.name for p in path.parent.iterdir()] == ["latest.pth"]  # no temporary left

    # A save that fails midway (torch.save raises while serialising, its temporary file already
    # open) leaves the previous checkpoint as it was and no temporary behind.
    before = path.read_bytes()
    seen_during_save = []

    class FailsMidway:
        def __reduce__(self):
            seen_during_save.extend(p.name for p in path.parent.iterdir())
            raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space left"):
        save_checkpoint({**state, "epoch": 4, "zz_last": FailsMidway()}, path)
    assert any(name.startswith(".latest.pth.tmp") for name in seen_during_save), seen_during_save
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["latest.pth"]

    # An arbitrary object in a checkpoint is refused, never unpickled.
    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth cannot be read as a checkpoint: .*could run code"):
        read_checkpoint(tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil.pth", weights_only=True)
    with pytest.raises(CheckpointError, match="missing.pth does not exist"):
        read_checkpoint(tmp_path / "missing.pth")
    diffs = config_differences({"arch": "resnet50", "seed": 1}, {"arch": "resnet18", "seed": 1})
    assert diffs == ["arch: checkpoint 'resnet50', now 'resnet18'"]


def _train_state() -> TrainState:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return TrainState({}, model, optimizer, build_scheduler(optimizer), scaler)


def test_checkpoints_of_earlier_releases_read_as_they_were_trained(tmp_path):
    """A version 0 checkpoint as the releases before versions wrote it (torch.save of the dict,
    no ``version``): before -d took several targets it held one ``target``, before --pad every
    size was padded by 10 pixels, and a mid-epoch checkpoint carried neither its epoch's losses
    nor its time. It reads as one target and pad 10 (so resuming it at 128x64 names the padding
    that changed), and a run loads its states from it."""
    old = _train_state()
    torch.save({"config": {"arch": "resnet18", "target": "market1501", "width": 64, "height": 128},
                "epoch": 1, "iteration": 5, "model": old.model.state_dict(), "memories": [torch.randn(4, 8)],
                "optimizer": old.optimizer.state_dict(), "scheduler": old.scheduler.state_dict(),
                "scaler": old.scaler.state_dict(), "best_map": 0.25,
                "history": [{"epoch": 1, "mAP": 0.25, "rank1": 0.5}]}, tmp_path / "old.pth")
    ckpt = read_checkpoint(tmp_path / "old.pth")
    assert ckpt["version"] == VERSION
    assert ckpt["config"]["targets"] == ["market1501"] and ckpt["config"]["best_by"] == "first"
    assert ckpt["config"]["pad"] == 10 and "target" not in ckpt["config"]
    assert ckpt["history"][0]["market1501/mAP"] == 0.25 and ckpt["history"][0]["market1501/rank1"] == 0.5
    assert config_differences(ckpt["config"], {**ckpt["config"], "pad": 5}) == ["pad: checkpoint 10, now 5"]
    state = _train_state()
    state.load_state_dict(ckpt)
    assert (state.epoch, state.iteration, state.epoch_losses, state.epoch_seconds) == (1, 5, [], None)
    assert torch.equal(state.model.weight, old.model.weight)


def test_checkpoints_carry_their_format_version(tmp_path):
    """save_checkpoint writes the version; a current checkpoint reads back as written; one of a
    newer format than this release knows is refused naming the file; an upgrade step per version."""
    assert len(UPGRADES) == VERSION
    state = _train_state()
    state.config = {"arch": "resnet18", "targets": ["market1501"], "pad": 5}
    state.epoch_losses, state.epoch_seconds = [1.5, 1.25], 3.0
    save_checkpoint(state.state_dict(), tmp_path / "latest.pth")
    assert load_checkpoint(tmp_path / "latest.pth")["version"] == VERSION
    ckpt = read_checkpoint(tmp_path / "latest.pth")
    assert ckpt["config"] == state.config
    assert ckpt["epoch_losses"] == [1.5, 1.25] and ckpt["epoch_seconds"] == 3.0
    torch.save({**load_checkpoint(tmp_path / "latest.pth"), "version": VERSION + 1}, tmp_path / "new.pth")
    with pytest.raises(CheckpointError, match=f"new.pth: format version {VERSION + 1}, but this release"):
        read_checkpoint(tmp_path / "new.pth")


def test_positions_read_as_the_stop_line_says_them():
    """(epoch, iteration) of a checkpoint in users' numbering, one for every message."""
    assert position(0, 11) == "epoch 1, iteration 11"
    assert position(2, 0) == "the end of epoch 2"


def test_a_nonfinite_loss_names_a_checkpoint_only_when_there_is_one(tmp_path):
    memories = [MemoryClassifier(4, 3)]
    latest = tmp_path / "latest.pth"
    args = (torch.tensor([1.0, float("nan")]), 0, 1, memories, torch.device("cpu"), 0, latest)
    with pytest.raises(NonFiniteLoss,
                       match="iteration 2: training stopped; no checkpoint had been saved yet$"):
        check_health(*args)
    latest.write_bytes(b"")
    with pytest.raises(NonFiniteLoss, match=rf"the last good checkpoint \({latest}\) is kept"):
        check_health(*args)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shuffle_plan_routes_every_source_row(world):
    """Played out on the host: each rank sends its rows, receives and arranges them, and then
    forwards exactly its contiguous part of the global shuffle, the same on any number of ranks;
    the memory update takes each source's rows in shuffled order, round after round."""
    sizes = [16 // world, 16 // world, 8 // world]
    n, glob = sum(sizes), [s * world for s in sizes]
    # Global rows, tagged (source, index in the source's global batch); rank r holds its slices.
    rows = [(j, k) for j, s in enumerate(glob) for k in range(s)]
    local = [[(j, k) for j, s in enumerate(sizes) for k in range(r * s, (r + 1) * s)] for r in range(world)]
    labels = [np.arange(s) // 4 for s in glob]  # 4 images per identity, sampler order
    plans = [shuffle_plan(sizes, world, r, seed=5, epoch=2, it=7, labels=labels) for r in range(world)]
    perm = plans[0].perm
    assert torch.equal(perm, shuffle_plan(glob, 1, 0, seed=5, epoch=2, it=7, labels=labels).perm)
    outbox = [[local[r][int(i)] for i in p.send] for r, p in enumerate(plans)]
    outbox = [[box[sum(p.send_counts[:q]):sum(p.send_counts[:q + 1])] for q in range(world)]
              for box, p in zip(outbox, plans)]
    forwarded = []
    for r, p in enumerate(plans):
        received = [row for src in range(world) for row in outbox[src][r]]
        assert [len(outbox[src][r]) for src in range(world)] == p.recv_counts
        if p.arrange is not None:
            received = [received[int(i)] for i in p.arrange]
        assert received == [rows[int(g)] for g in perm[r * n:(r + 1) * n]]
        forwarded += received
    for j in range(3):
        got = [forwarded[int(i)] for i in plans[0].source_rows[j]]
        assert sorted(got) == [(j, k) for k in range(glob[j])]
        y = plans[0].labels[j].tolist()
        assert y == [int(labels[j][k]) for _, k in got]
        # round after round: within a round labels differ; each label's rows in shuffled order
        rounds = np.split(np.asarray(y), np.cumsum(plans[0].round_sizes[j])[:-1])
        assert all(len(set(r.tolist())) == len(r) for r in rounds)
        positions = plans[0].source_rows[j].tolist()
        for label in set(y):
            at = [pos for pos, lab in zip(positions, y) if lab == label]
            assert at == sorted(at)
        for p in plans[1:]:
            assert torch.equal(p.source_rows[j], plans[0].source_rows[j])
    unshuffled = shuffle_plan(sizes, world, 0, 5, 2, 7, labels, shuffle=False)
    assert unshuffled.perm.tolist() == list(range(n * world))
    assert perm.tolist() != list(range(n * world))
    assert torch.equal(shuffle_plan(sizes, world, 0, seed=5, epoch=2, it=7, labels=labels).perm, perm)
    assert not torch.equal(shuffle_plan(sizes, world, 0, 5, 2, 8, labels).perm, perm)


@pytest.mark.parametrize("epochs", [1, 2, 70])
def test_the_plot_frames_its_points_with_whole_epochs(epochs):
    """One evaluation is a point in a readable frame (the probe saw ticks 0.945..1.050 around it)."""
    import matplotlib.pyplot as plt

    history = [{"epoch": e, "t/mAP": 0.2 + 0.005 * e, "t/rank1": 0.4 + 0.005 * e}
               for e in range(1, epochs + 1)]
    fig = plot_history(history, ["t"], "title")
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    plt.close(fig)
    assert (lo, hi) == (0.5, epochs + 0.5)
    assert ticks and all(float(t).is_integer() and 1 <= t <= epochs for t in ticks), ticks
    assert ax.get_ylim() == pytest.approx((20 + 0.5 - 5, 40 + 0.5 * epochs + 5))
    assert plot_history([{"epoch": 1, "loss": 1.0}], ["t"], "title") is None  # nothing evaluated yet
