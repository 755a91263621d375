"""`make demo`: the whole system end to end on built-in synthetic data, no download.

Writes the five synthetic raw datasets, converts them to shards, trains Style Interleaved
Learning on three sources (DukeMTMC, CUHK03, MSMT17 look-alikes) and evaluates on the unseen
fourth (Market-1501 look-alike) every epoch, then prints the table and writes a plot of mAP
over epochs. On a CPU it runs a small configuration that finishes in minutes; with a GPU it
runs ResNet-50 at 256x128.

The data steps call the libraries (``tools.synthetic``, ``pipeline.build``); training runs
``train.py`` as a command, exactly as a user would type it (the command is printed).

A rerun never deletes what the demo did not make: it resumes the demo's own interrupted run
(stopped with Ctrl-C, say) from its latest.pth, starts again over the demo's own finished run,
and refuses a run folder holding anything else (it says which it does before any work).
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.device import DEVICES, DeviceError, resolve_device
from engine.logsdir import RUN_FILES, is_run_file
from pipeline.build import build_shards
from pipeline.files import write_atomic
from pipeline.runlock import LOCK_NAME
from pipeline.shards import ShardError
from tools.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]

SOURCES = ["--dataset_src1", "dukemtmc", "--dataset_src2", "cuhk03", "--dataset_src3", "msmt17v1",
           "-d", "market1501"]
# -b 32 in 2 statistics groups: 16 images (4 identities) per group, as in the published run.
CPU_RUN = ["-a", "resnet18", "--height", "128", "--width", "64", "-b", "32", "--bn-groups", "2",
           "--epochs", "8", "--iters", "20", "--milestones", "6", "--warmup-epochs", "1", "--workers", "2",
           "--test-batch-size", "128"]
GPU_RUN = ["-a", "resnet50", "--height", "256", "--width", "128", "-b", "64", "--epochs", "12",
           "--iters", "40", "--milestones", "8", "--warmup-epochs", "2", "--workers", "8"]
# Written by the demo into its run folder: the train.py flags of the run and whether it finished,
# so that a rerun knows the folder's run as the demo's own.
DEMO_MARK = "demo.json"


@dataclass
class RunFolder:
    """What a demo run does with its folder: ``flags`` added to train.py's command (``--resume``,
    ``--overwrite`` or none) and ``says``, the console line that tells the user which."""

    flags: list[str]
    says: str


def plan_run_folder(run: Path, train_flags: list[str]) -> RunFolder:
    """A new run in a new or empty folder; the demo's own interrupted run (its mark lists the same
    train.py flags, latest.pth is there) resumed; the demo's own finished run, or one of another
    configuration, replaced by train.py --overwrite (which deletes a run's files only). A folder
    holding anything the demo did not make is refused (ValueError), before any work."""
    if run.exists() and not run.is_dir():
        raise ValueError(f"{run} is a file, expected the demo's run folder")
    found = sorted(p.name for p in run.iterdir() if p.name != LOCK_NAME) if run.is_dir() else []
    if not found:
        return RunFolder([], f"a new run in {run}")
    foreign = [n for n in found if n != DEMO_MARK and not _run_file(n)]
    if foreign or DEMO_MARK not in found:
        names = ", ".join((foreign or found)[:4])
        raise ValueError(f"{run} holds files the demo did not make ({names}): refusing to touch them; "
                         "move them or choose another --out")
    try:
        mark = json.loads((run / DEMO_MARK).read_text())
        earlier, finished = list(mark["flags"]), bool(mark["finished"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{run / DEMO_MARK} is not the demo's mark ({e}): refusing to touch {run}; move "
                         "it or choose another --out") from None
    latest = run / "latest.pth"
    if not finished and earlier == train_flags and latest.is_file():
        return RunFolder(["--resume", str(latest)], f"resuming the interrupted demo run from {latest}")
    why = ("finished" if finished else "of another configuration" if earlier != train_flags
           else "stopped before its first checkpoint")
    return RunFolder(["--overwrite"], f"starting again: the demo's earlier run in {run} ({why}) is replaced")


def _run_file(name: str) -> bool:
    """A file train.py writes in its logs dir (a temporary one left by a kill included)."""
    return is_run_file(name) or any(name.startswith(f".{f}.tmp") for f in RUN_FILES)


def mark_run_folder(run: Path, train_flags: list[str], finished: bool) -> None:
    """The demo's mark in ``run`` (see :func:`plan_run_folder`), written before and after the run."""
    run.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"made_by": "tools/demo.py", "flags": train_flags, "finished": finished}, indent=1)
    write_atomic(run / DEMO_MARK, lambda tmp: tmp.write_text(text + "\n"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("logs/demo"),
                   help="folder for the synthetic data, its shards and the run")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="cuda runs the ResNet-50 configuration, cpu the small one")
    args = p.parse_args(argv)
    try:
        gpu = resolve_device(args.device).type == "cuda"
    except DeviceError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    config = GPU_RUN if gpu else CPU_RUN
    run = args.out / "run"
    train_flags = ["--shards", str(args.out / "shards"), "--logs-dir", str(run), *SOURCES, *config,
                   "--pretrained", "none", "--update-style", "--device", "cuda" if gpu else "cpu"]
    start = time.perf_counter()
    try:
        folder = plan_run_folder(run, train_flags)
        print(f"== run folder: {folder.says}", flush=True)
        print(f"== 1/3 synthetic datasets -> {args.out / 'data'}", flush=True)
        generate(args.out / "data", "small", 0)
        print(f"== 2/3 shards -> {args.out / 'shards'}", flush=True)
        build_shards(args.out / "data", args.out / "shards", workers=2)
        mark_run_folder(run, train_flags, finished=False)
    except (ValueError, OSError, ShardError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    cmd = [sys.executable, str(ROOT / "train.py"), *train_flags, *folder.flags]
    print("== 3/3 Style Interleaved Learning: dukemtmc + cuhk03 + msmt17v1 -> market1501 (unseen)\n"
          f"   configuration ({'GPU' if gpu else 'CPU: a small one, so it ends in minutes'}), random init:\n"
          f"   python {shlex.join(['train.py', *cmd[2:]])}", flush=True)
    code = run_to_the_end(cmd)
    if code == 0:
        mark_run_folder(run, train_flags, finished=True)
        print(f"\nplot: {run / 'metrics.png'}   log: {run / 'metrics.jsonl'}   "
              f"checkpoints: {run / 'best.pth'}")
        print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")
    elif code in (128 + signal.SIGINT, 128 + signal.SIGTERM) and (run / "latest.pth").is_file():
        print(f"demo: stopped; the same command resumes from {run / 'latest.pth'}", file=sys.stderr)
    return code


def run_to_the_end(cmd: list[str]) -> int:
    """Run ``cmd`` and wait for it, also through Ctrl-C: the trainer gets the signal too (one
    process group), saves latest.pth and stops by itself; a second Ctrl-C stops it at once."""
    proc = subprocess.Popen(cmd, cwd=ROOT)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


if __name__ == "__main__":
    sys.exit(main())
