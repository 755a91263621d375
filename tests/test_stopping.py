"""Real runs stopped and killed: SIGTERM and SIGINT, sent to torchrun or to a trainer's process
group, with either loader, end with latest.pth at the last finished iteration and one line
saying how to resume; a killed trainer or shard build leaves no process behind; a rank with four
DALI workers stays under 2 GB."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.live import Live, alive, cmdline, gone_within, maps_library, torchrun
from tests.runs import ROOT, load_checkpoint, small_run
from tools.measure_memory import children, descendants, pss_bytes

STOP_LINE = re.compile(r"stopped by (SIG\w+) at epoch (\d+), iteration (\d+).*--resume (\S+)")
RANK_MEMORY_GOAL = 2 * 2**30  # bytes of PSS for a whole rank with 4 DALI workers (docs/benchmarks.md)


def rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ") as f:
        env = dict(item.split("=", 1) for item in f.read().split("\0") if "=" in item)
    return int(env["RANK"])


def assert_no_trainer_traceback(out: str) -> None:
    """A traceback may only be torchrun's own report (SignalException when it was signalled,
    ChildFailedError when a trainer ended with 128 + the signal), never a trainer's or a worker's."""
    for block in out.split("Traceback (most recent call last):")[1:]:
        exception = next(line for line in block.splitlines() if line and not line.startswith(" "))
        assert exception.startswith("torch.distributed.elastic."), out
    for sign in ("DataLoader worker", "Worker data receiving", "KeyboardInterrupt", "Error in"):
        assert sign not in out, out


def kill_and_expect_no_leftover(run: Live, tree: list[int], seconds: float = 5) -> None:
    """SIGKILL the command: every process of ``tree`` it started must be gone within ``seconds``."""
    os.kill(run.proc.pid, signal.SIGKILL)
    left = gone_within(tree, seconds)
    assert not left, [cmdline(p) for p in left]


def reap(run: Live, tree: list[int]) -> None:
    """A test's clean-up: the command closed, any process of ``tree`` still alive killed."""
    run.close()
    for p in tree:
        if alive(p):
            os.kill(p, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("loader, signum, to", [
    ("dali", signal.SIGTERM, "torchrun"),
    ("torch", signal.SIGINT, "torchrun"),
    ("dali", signal.SIGINT, "rank 1"),
    ("torch", signal.SIGTERM, "rank 0"),
], ids=["dali-SIGTERM-torchrun", "torch-SIGINT-torchrun", "dali-SIGINT-rank1", "torch-SIGTERM-rank0"])
def test_a_stop_signal_saves_the_last_iteration_and_says_how_to_resume(
        synthetic_shards, tmp_path, loader, signum, to):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    logs = tmp_path / "logs"
    run = Live(torchrun(2, str(ROOT / "train.py"),
                        *small_run(synthetic_shards, logs, "--iters", "200", loader=loader, workers=2)))
    try:
        run.wait_for("first iteration done")
        trainers = {rank_of(p): p for p in children(run.proc.pid)}
        everything = [run.proc.pid, *descendants(run.proc.pid)]
        if to == "torchrun":
            os.kill(run.proc.pid, signum)  # what a scheduler or Ctrl-C does to torchrun
        else:  # one trainer and its workers, as a signal to a process group reaches them
            os.killpg(trainers[int(to.split()[1])], signum)
        run.finish(240)
    finally:
        run.close()
    out = run.output
    stops = STOP_LINE.findall(out)
    assert len(stops) == 1, out
    name, epoch, iteration, resume = stops[0]
    assert name == signal.Signals(signum).name and Path(resume) == logs / "latest.pth"
    ckpt = load_checkpoint(logs / "latest.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (int(epoch) - 1, int(iteration))
    assert 1 <= ckpt["iteration"] < 200
    assert_no_trainer_traceback(out)
    assert not gone_within(everything, 5), [cmdline(p) for p in everything if alive(p)]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_a_killed_trainer_leaves_no_worker_and_a_rank_fits_in_memory(synthetic_shards, tmp_path, loader):
    """SIGKILL (or the out-of-memory killer) gives the trainer no chance to stop its workers:
    they must end by themselves. Before that, the DALI rank's whole process tree (4 workers)
    stays under 2 GB: its workers import no torch, and the memory-initialisation pipelines
    have released theirs."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    workers = 4 if loader == "dali" else 2
    run = Live([sys.executable, str(ROOT / "train.py"),
                *small_run(synthetic_shards, tmp_path / "logs", "--iters", "200", loader=loader,
                          workers=workers)])
    tree: list[int] = []
    try:
        peak, deadline = 0, time.monotonic() + 300
        while not any("first iteration done" in line for line in run.lines):
            assert run.proc.poll() is None and time.monotonic() < deadline, run.output
            peak = max(peak, sum(pss_bytes(p) for p in [run.proc.pid, *descendants(run.proc.pid)]))
            time.sleep(0.2)
        tree = descendants(run.proc.pid)
        pool = [p for p in tree if "resource_tracker" not in cmdline(p)]
        assert len(pool) == workers, [cmdline(p) for p in tree]  # the training loader's workers only
        if loader == "dali":
            assert not [p for p in pool if maps_library(p, "libtorch")], "a DALI worker imported torch"
            assert peak <= RANK_MEMORY_GOAL, f"peak PSS {peak / 2**30:.2f} GiB"
        kill_and_expect_no_leftover(run, tree)
    finally:
        reap(run, tree)


@pytest.mark.slow
def test_killing_torchrun_ends_its_trainers_and_their_workers(synthetic_shards, tmp_path):
    """SIGKILL to torchrun gives it no chance to stop its trainers: they notice that their
    launcher has gone and stop as on SIGTERM (ended by an alarm when that takes too long), all
    within 10 s, their workers with them; latest.pth, if any, is a whole checkpoint."""
    logs = tmp_path / "logs"
    run = Live(torchrun(2, str(ROOT / "train.py"), *small_run(synthetic_shards, logs, "--iters", "200")))
    tree: list[int] = []
    try:
        run.wait_for("first iteration done")
        tree = descendants(run.proc.pid)
        assert len(children(run.proc.pid)) == 2 and len(tree) > 2, [cmdline(p) for p in tree]
        kill_and_expect_no_leftover(run, tree, seconds=10)
    finally:
        reap(run, tree)
    assert "the launcher (pid" in run.output, run.output
    if (logs / "latest.pth").exists():  # saved at the stop (the usual case), never half-written
        assert load_checkpoint(logs / "latest.pth")["iteration"] >= 1


def shard_build(synthetic_data: Path, out: Path) -> Live:
    """tools/make_shards.py started as a command, with its 2 worker processes."""
    return Live([sys.executable, str(ROOT / "tools" / "make_shards.py"), "--data-dir", str(synthetic_data),
                 "--out", str(out), "--workers", "2", "--shard-size", "8"])


def workers_started(run: Live) -> list[int]:
    """Waits until the build's 2 spawned workers run; its process tree then."""
    deadline = time.monotonic() + 120
    while len([p for p in descendants(run.proc.pid) if "spawn_main" in cmdline(p)]) < 2:
        assert run.proc.poll() is None and time.monotonic() < deadline, run.output
        time.sleep(0.02)
    return descendants(run.proc.pid)


def test_a_killed_shard_build_leaves_no_worker_behind(synthetic_data, tmp_path):
    run = shard_build(synthetic_data, tmp_path / "shards")
    tree: list[int] = []
    try:
        tree = workers_started(run)
        kill_and_expect_no_leftover(run, tree)
    finally:
        reap(run, tree)


def test_ctrl_c_on_a_shard_build_is_one_line(synthetic_data, tmp_path):
    """Ctrl-C reaches the terminal's whole process group: the build and its workers."""
    run = shard_build(synthetic_data, tmp_path / "shards")
    tree: list[int] = []
    try:
        tree = workers_started(run)
        os.killpg(run.proc.pid, signal.SIGINT)
        assert run.finish(120) == 128 + signal.SIGINT, run.output
    finally:
        reap(run, tree)
    assert run.lines[-1].startswith("make_shards.py: interrupted: the datasets already complete are kept")
    assert "Traceback" not in run.output and "KeyboardInterrupt" not in run.output, run.output


@pytest.mark.slow
def test_a_second_ctrl_c_names_no_checkpoint_that_is_not_there(synthetic_shards, tmp_path):
    logs = tmp_path / "logs"
    run = Live([sys.executable, str(ROOT / "train.py"), *small_run(synthetic_shards, logs, "--iters", "200",
                                                                   workers=0)])
    try:
        run.wait_for("initialising memories")  # before the first iteration, so before any checkpoint
        run.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)  # the first one is taken (a stop at the next iteration) before the second comes
        run.proc.send_signal(signal.SIGINT)
        assert run.finish(120) == 128 + signal.SIGINT, run.output
    finally:
        run.close()
    assert run.lines[-1].strip() == "train.py: interrupted twice: stopped at once; no checkpoint was saved"
    assert "Traceback" not in run.output and not (logs / "latest.pth").exists()


def test_spawned_workers_have_the_stop_signals_blocked_from_birth():
    """A DALI worker or a build's worker (spawned) imports for a while before it can take stop
    signals itself; until then they must stay blocked, or a Ctrl-C kills it with a traceback."""
    script = """
import multiprocessing, time
from pipeline.workers import starting_workers
with starting_workers():
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(30,))
    child.start()
with open(f"/proc/{child.pid}/status") as f:
    blocked = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
child.kill()
child.join()
print(blocked)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    blocked = int(out.stdout)
    assert blocked & (1 << signal.SIGINT - 1) and blocked & (1 << signal.SIGTERM - 1), hex(blocked)
