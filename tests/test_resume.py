"""A real `python train.py` stopped by SIGTERM in the middle of an epoch, then resumed, repeats
the run that was never stopped: the same evaluations, memories, weights and optimizer state;
so does a run resumed at an epoch's end."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from tests.runs import ROOT, history, load_checkpoint, small_run

pytestmark = pytest.mark.slow  # each test trains (train.main or train.py)

FLAGS = ("--epochs", "2", "--iters", "3")


@pytest.fixture(scope="module")
def runs(synthetic_shards, tmp_path_factory) -> tuple[Path, Path, str, float]:
    """The uninterrupted run, and the stopped-then-resumed one with the stopped run's output and
    the time its checkpoint says the stopped epoch had taken."""
    whole, part = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("part")
    assert train.main(small_run(synthetic_shards, whole, *FLAGS)) == 0
    args = small_run(synthetic_shards, part, *FLAGS)
    # The stopped run computes with as many threads as this process (summation order follows them).
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            # Logged during set-up, before the first iteration: the run stops after iteration 1,
            # however long this process takes to send the signal.
            if "initialising memories" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out = "".join(lines) + proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:  # only when the test failed above: leave no process behind
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM at epoch 1, iteration 1" in out, out
    ckpt = load_checkpoint(part / "latest.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 1) and ckpt["history"] == []
    assert train.main([*args, "--resume", str(part / "latest.pth")]) == 0
    return whole, part, out, ckpt["epoch_seconds"]


def test_resumed_run_evaluates_as_the_uninterrupted_one(runs):
    whole, part, *_ = runs
    a, b = history(whole), history(part)
    assert [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert rb["lr"] == ra["lr"]
        for key in ("mAP", "rank1", "rank5", "rank10"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), key
    assert b[1]["loss"] == pytest.approx(a[1]["loss"], rel=1e-5)


def test_resumed_run_ends_with_the_same_state(runs):
    """Weights, running statistics, memories and Adam's moments after 6 iterations: equal up to
    rounding (the same arithmetic in the same order; tolerances only for safety)."""
    whole, part, *_ = runs
    a, b = load_checkpoint(whole / "latest.pth"), load_checkpoint(part / "latest.pth")
    assert (a["epoch"], a["iteration"]) == (b["epoch"], b["iteration"]) == (2, 0)
    for name, t in a["model"].items():
        torch.testing.assert_close(b["model"][name], t, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for ma, mb in zip(a["memories"], b["memories"], strict=True):
        torch.testing.assert_close(mb, ma, rtol=1e-5, atol=1e-6)
    for k, state in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b["optimizer"]["state"][k][name], state[name], rtol=1e-5, atol=1e-9,
                                       msg=lambda m: f"optimizer state {k} {name}: {m}")
    assert b["scheduler"] == a["scheduler"]


def test_interrupted_epoch_logs_the_loss_of_all_its_iterations(runs):
    """The checkpoint carries the losses of its epoch's iterations before the stop."""
    whole, part, *_ = runs
    assert history(part)[0]["loss"] == pytest.approx(history(whole)[0]["loss"], rel=1e-5)


def test_interrupted_epoch_logs_the_time_and_speed_of_all_its_iterations(runs):
    """The checkpoint carries the time of its epoch's iterations before the stop: the resumed
    epoch's time_s holds it, and images_per_s counts all 3 iterations' images (3 x 3 x 16)."""
    part, seconds = runs[1], runs[3]
    row = history(part)[0]
    assert 0 < seconds < row["time_s"]
    assert row["images_per_s"] == pytest.approx(3 * 3 * 16 / row["time_s"], rel=1e-9)


def test_a_run_resumed_at_an_epochs_end_repeats_the_uninterrupted_one(runs, synthetic_shards, tmp_path):
    whole = runs[0]
    part = tmp_path / "part"
    assert train.main(small_run(synthetic_shards, part, "--epochs", "1", "--iters", "3")) == 0
    assert train.main(small_run(synthetic_shards, part, *FLAGS, "--resume", str(part / "latest.pth"))) == 0
    a, b = history(whole), history(part)
    assert [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
        assert rb["mAP"] == pytest.approx(ra["mAP"], abs=1e-6)
    ca, cb = load_checkpoint(whole / "latest.pth"), load_checkpoint(part / "latest.pth")
    for ma, mb in zip(ca["memories"], cb["memories"], strict=True):
        torch.testing.assert_close(mb, ma, rtol=1e-5, atol=1e-6)
    assert (part / "best.pth").is_file() and (part / "metrics.png").stat().st_size > 0
