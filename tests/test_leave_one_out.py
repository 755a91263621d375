"""tools/leave_one_out.py on the synthetic shards, two targets at tiny settings: the tool stopped by
SIGTERM while its second run trains leaves no process behind; the same command then skips the
finished run (its files untouched), resumes the interrupted one from its latest.pth, and writes
the table with the published figures. Bad flags are refused in one line, exit code 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.live import Live, cmdline, gone_within
from tests.runs import ROOT, load_checkpoint
from tools import leave_one_out
from tools.leave_one_out import read_jsonl
from tools.measure_memory import descendants

TINY = ["-a", "resnet18", "--pretrained", "none", "--height", "32", "--width", "16", "-b", "16",
        "--iters", "2", "--epochs", "1", "--workers", "0", "--test-batch-size", "64", "--loader", "torch",
        "--device", "cpu", "--no-progress"]
FIRST, SECOND = "il_to_market1501", "il_to_cuhk03"


def tool_args(shards: Path, out: Path) -> list[str]:
    return ["--shards", str(shards), "--out", str(out), "--update-style", "--targets", "market1501,cuhk03",
            *TINY]


def snapshot(folder: Path) -> dict[str, tuple[int, bytes | int]]:
    """Every file's mtime and contents (checkpoints by mtime and size only)."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes() if p.suffix != ".pth" else p.stat().st_size)
            for p in sorted(folder.iterdir()) if p.is_file()}


def wait_after(run: Live, first: str, then: str, timeout: float = 240) -> None:
    """Until a line holding ``then`` follows one holding ``first``."""
    deadline = time.monotonic() + timeout
    while True:
        lines = list(run.lines)
        starts = [i for i, line in enumerate(lines) if first in line]
        if starts and any(then in line for line in lines[starts[0]:]):
            return
        assert run.proc.poll() is None, f"ended ({run.proc.returncode}) before {then!r}:\n{run.output}"
        assert time.monotonic() < deadline, f"no {then!r} after {first!r} within {timeout} s:\n{run.output}"
        time.sleep(0.1)


@pytest.mark.slow
def test_stopped_then_rerun_skips_the_finished_run_and_resumes_the_other(synthetic_shards, tmp_path, capsys):
    out = tmp_path / "loo"
    cmd = [sys.executable, str(ROOT / "tools" / "leave_one_out.py"), *tool_args(synthetic_shards, out)]
    run = Live(cmd)
    tree: list[int] = []
    try:
        # Logged during set-up, before the first iteration: the run stops after iteration 1.
        wait_after(run, "[2/2]", "initialising memories")
        tree = [run.proc.pid, *descendants(run.proc.pid)]
        assert any("torch.distributed.run" in cmdline(p) for p in tree), [cmdline(p) for p in tree]
        os.kill(run.proc.pid, signal.SIGTERM)
        code = run.finish(240)
    finally:
        run.close()
    stopped = run.output
    assert code == 128 + signal.SIGTERM, stopped
    assert "[1/2] il_to_market1501 finished: mAP" in stopped, stopped
    assert "train.py: stopped by SIGTERM at epoch 1, iteration 1" in stopped, stopped
    assert "leave_one_out.py: stopped by SIGTERM during run 2/2 (il_to_cuhk03" in stopped, stopped
    left = gone_within(tree, 5)
    assert not left, [cmdline(p) for p in left]
    first, second = out / FIRST, out / SECOND
    assert (first / "done.json").is_file() and not (second / "done.json").exists()
    ckpt = load_checkpoint(second / "latest.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 1)
    assert "| CUHK03-NP | IL |" in (out / "table.md").read_text()  # the table so far: not finished
    kept = snapshot(first)

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, text
    assert "[1/2] il_to_market1501: finished earlier, skipped" in text, text
    assert f"[2/2] IL: market1501 + dukemtmc + msmt17v1 -> cuhk03: resuming from {second / 'latest.pth'}" \
        in text, text
    assert f"resumed from {second / 'latest.pth'} at epoch 1, iteration 1" in text, text  # as the stop line
    assert snapshot(first) == kept  # the finished run was not touched
    assert [r["epoch"] for r in read_jsonl(second / "metrics.jsonl")] == [1]
    attempts = read_jsonl(second / "sessions.jsonl")
    assert [s["exit_code"] == 0 for s in attempts] == [False, True]
    assert attempts[0]["stopped_by"] == "SIGTERM" and "--resume" not in attempts[0]["command"]
    assert attempts[1]["command"][-2:] == ["--resume", str(second / "latest.pth")]

    table = json.loads((out / "table.json").read_text())
    rows = {r["run"]: r for r in table["runs"]}
    assert list(rows) == [FIRST, SECOND]
    for name, target, sources, published in [
            (FIRST, "market1501", ["dukemtmc", "cuhk03", "msmt17v1"], {"mAP": 65.4, "rank1": 86.5}),
            (SECOND, "cuhk03", ["market1501", "dukemtmc", "msmt17v1"], {"mAP": 38.2, "rank1": 40.7})]:
        r = rows[name]
        assert (r["target"], r["sources"], r["mode"], r["finished"]) == (target, sources, "il", True)
        assert r["published"] == published and r["epochs_run"] == 1
        history = read_jsonl(out / name / "metrics.jsonl")
        assert r["mAP"] == pytest.approx(100 * history[-1]["mAP"], abs=1e-3)
        assert r["rank1"] == pytest.approx(100 * history[-1]["rank1"], abs=1e-3)
        assert r["diff"]["mAP"] == pytest.approx(r["mAP"] - published["mAP"], abs=1e-3)
        assert r["command"][r["command"].index("-d") + 1] == target and r["train_flags"] == TINY
        walls = [s["wall_s"] for s in read_jsonl(out / name / "sessions.jsonl")]
        assert r["wall_s"] == pytest.approx(sum(walls), abs=1e-2)
    assert rows[SECOND]["sessions"] == 2 and rows[FIRST]["sessions"] == 1
    md = (out / "table.md").read_text()
    assert "final epoch's evaluation" in md
    for title, published in [("Market-1501", "| 65.4 |"), ("CUHK03-NP", "| 38.2 |")]:
        line = next(line for line in md.splitlines() if line.startswith(f"| {title} | IL |"))
        assert published in line and f"{rows[FIRST if title == 'Market-1501' else SECOND]['mAP']:.1f}" in line

    # Everything finished: a third call trains nothing and writes the same table.
    capsys.readouterr()
    assert leave_one_out.main(tool_args(synthetic_shards, out)) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    assert json.loads((out / "table.json").read_text()) == table


@pytest.mark.parametrize("flags, message", [
    (["-d", "market1501"], "-d is set by this tool for each run"),
    (["--dataset_src2", "dukemtmc"], "--dataset_src2 is set by this tool"),
    (["--logs", "x"], "--logs-dir is set by this tool"),  # train.py's parser would take the abbreviation
    (["--resume", "x.pth"], "--resume is set by this tool"),
    (["--overwrite"], "--overwrite is set by this tool"),
    (["--update-s"], "write this tool's --update-style in full"),
    (["--base", "fb"], "write this tool's --baseline in full"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["-b", "0"], "expected an integer >= 1, got 0"),
    (["--targets", "cuhk_sysu"], "--targets: expected distinct names of market1501, dukemtmc, cuhk03"),
    (["--nproc-per-node", "0"], "--nproc_per_node: expected an integer >= 1, got 0"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_flags_are_refused_in_one_line(tmp_path, capsys, flags, message):
    code = leave_one_out.main(["--shards", str(tmp_path / "none"), "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("leave_one_out.py: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_missing_shards_are_named(synthetic_shards, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("market1501", "dukemtmc"):
        (shards / name).symlink_to(synthetic_shards / name)
    code = leave_one_out.main(["--shards", str(shards), "--out", str(tmp_path / "out"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--shards {shards} lacks complete shards of cuhk03, msmt17v1" in err, err


def plan(*flags: str) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    args, _ = leave_one_out.get_parser().parse_known_args(["--out", "x", "--update-style", *flags])
    return [(job.name, job.sources, job.targets) for job in leave_one_out.jobs_of(args)]


def test_protocols_plan_their_runs():
    """leave-one-out: the published sources of each target; no-duke: the other two targets and
    CUHK-SYSU; single: one dataset, evaluated on the other three (those of --targets); --seeds:
    every run once per seed, each in its own folder."""
    assert plan() == [("il_to_market1501", ("dukemtmc", "cuhk03", "msmt17v1"), ("market1501",)),
                      ("il_to_dukemtmc", ("market1501", "cuhk03", "msmt17v1"), ("dukemtmc",)),
                      ("il_to_cuhk03", ("market1501", "dukemtmc", "msmt17v1"), ("cuhk03",)),
                      ("il_to_msmt17v1", ("market1501", "dukemtmc", "cuhk03"), ("msmt17v1",))]
    assert plan("--protocol", "no-duke") == [
        ("il_noduke_to_market1501", ("msmt17v1", "cuhk_sysu", "cuhk03"), ("market1501",)),
        ("il_noduke_to_cuhk03", ("market1501", "msmt17v1", "cuhk_sysu"), ("cuhk03",)),
        ("il_noduke_to_msmt17v1", ("market1501", "cuhk_sysu", "cuhk03"), ("msmt17v1",))]
    assert plan("--protocol", "single") == [
        ("il_from_market1501", ("market1501",), ("dukemtmc", "cuhk03", "msmt17v1")),
        ("il_from_dukemtmc", ("dukemtmc",), ("market1501", "cuhk03", "msmt17v1")),
        ("il_from_cuhk03", ("cuhk03",), ("market1501", "dukemtmc", "msmt17v1")),
        ("il_from_msmt17v1", ("msmt17v1",), ("market1501", "dukemtmc", "cuhk03"))]
    assert plan("--protocol", "single", "--targets", "cuhk03")[0] == (
        "il_from_market1501", ("market1501",), ("cuhk03",))
    assert [name for name, *_ in plan("--targets", "cuhk03", "--seeds", "2,0", "--both")] == [
        "il_to_cuhk03_seed2", "il_to_cuhk03_seed0", "fbf_to_cuhk03_seed2", "fbf_to_cuhk03_seed0"]


@pytest.mark.parametrize("flags, message", [
    (["--protocol", "no-duke", "--targets", "dukemtmc"],
     "--targets dukemtmc: not a target of --protocol no-duke (its targets: market1501, cuhk03, msmt17v1)"),
    (["--protocol", "all"], "argument --protocol: invalid choice: 'all'"),
    (["--seeds", "0,0"], "--seeds: a seed is given twice in '0,0'"),
    (["--seeds", "0,-1"], "--seeds: expected an integer >= 0, got -1"),
    (["--seeds", "0,1", "--seed", "3"], "--seed is set by this tool for each run with --seeds"),
    (["--sources", "market1501"], "--sources is set by this tool for each run"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_protocol_and_seed_flags_are_checked(tmp_path, capsys, flags, message):
    code = leave_one_out.main(["--shards", str(tmp_path / "none"), "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("leave_one_out.py: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_no_duke_over_seeds_gives_mean_and_deviation(synthetic_shards, tmp_path):
    """--protocol no-duke --seeds 0,1 on one target: a run per seed in its own folder (train.py
    --seed N), a table row with the mean and sample standard deviation of the seeds' final
    figures, each seed's figures in table.json, no published figures; a second call trains
    nothing."""
    out = tmp_path / "loo"
    argv = ["--shards", str(synthetic_shards), "--out", str(out), "--update-style", "--protocol", "no-duke",
            "--targets", "cuhk03", "--seeds", "0,1", *TINY]
    assert leave_one_out.main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    assert table["protocol"] == "no-duke" and table["seeds"] == [0, 1] and table["published_by"] is None
    [row] = table["runs"]
    assert (row["target"], row["sources"], row["finished"], row["published"], row["diff"]) == (
        "cuhk03", ["market1501", "msmt17v1", "cuhk_sysu"], True, None, None)
    assert [s["seed"] for s in row["seeds"]] == [0, 1]
    for seed in row["seeds"]:
        logs = out / f"il_noduke_to_cuhk03_seed{seed['seed']}"
        assert seed["run"] == logs.name
        assert load_checkpoint(logs / "latest.pth")["config"]["seed"] == seed["seed"]
        last = read_jsonl(logs / "metrics.jsonl")[-1]
        assert seed["mAP"] == pytest.approx(100 * last["mAP"], abs=1e-3)
        assert seed["command"][seed["command"].index("--sources") + 1] == "market1501,msmt17v1,cuhk_sysu"
    for key in ("mAP", "rank1"):
        values = [s[key] for s in row["seeds"]]
        assert row[key] == pytest.approx(sum(values) / 2, abs=1e-3)
        assert row[f"{key}_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5, abs=1e-3)
    md = (out / "table.md").read_text()
    assert md.startswith("# Leave-one-out without DukeMTMC-reID: ours (mAP / rank-1, %)")
    line = next(line for line in md.splitlines() if line.startswith("| CUHK03-NP | IL |"))
    assert f"| 0, 1 | {row['mAP']:.1f} ± {row['mAP_std']:.1f} |" in line, line
    assert "published" not in md.split("\n\n")[2]  # no published columns
    assert leave_one_out.main(argv) == 0
    assert json.loads((out / "table.json").read_text()) == table


@pytest.mark.slow
def test_single_source_runs_are_evaluated_on_the_other_datasets(synthetic_shards, tmp_path):
    """--protocol single: a run per source (train.py --sources with one dataset), each evaluated
    on the targets that are not its source; a table row per (source, target) pair."""
    out = tmp_path / "single"
    argv = ["--shards", str(synthetic_shards), "--out", str(out), "--update-style", "--protocol", "single",
            "--targets", "market1501,cuhk03", *TINY, "--iters", "1"]
    assert leave_one_out.main(argv) == 0
    rows = json.loads((out / "table.json").read_text())["runs"]
    pairs = [(r["sources"], r["target"]) for r in rows]
    assert pairs == [(["dukemtmc"], "market1501"), (["cuhk03"], "market1501"), (["msmt17v1"], "market1501"),
                     (["market1501"], "cuhk03"), (["dukemtmc"], "cuhk03"), (["msmt17v1"], "cuhk03")]
    for r in rows:
        last = read_jsonl(out / r["run"] / "metrics.jsonl")[-1]
        assert r["finished"] and r["published"] is None
        assert r["mAP"] == pytest.approx(100 * last[f"{r['target']}/mAP"], abs=1e-3)
    assert (out / "table.md").read_text().startswith("# Single source: ours (mAP / rank-1, %)")
