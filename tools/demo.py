"""`make demo`: the whole system end to end on built-in synthetic data, no download.

Writes the five synthetic raw datasets, converts them to shards, trains Style Interleaved
Learning on three sources (DukeMTMC, CUHK03, MSMT17 look-alikes) and evaluates on the unseen
fourth (Market-1501 look-alike) every epoch, then prints the table and writes a plot of mAP
over epochs. On a CPU it runs a small configuration that finishes in minutes; with a GPU it
runs ResNet-50 at 256x128.

The data steps call the libraries (``tools.synthetic``, ``pipeline.build``); training runs
``train.py`` as a command, exactly as a user would type it (the command is printed).
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from engine.device import DEVICES, DeviceError, resolve_device
from pipeline.build import build_shards
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
    start = time.perf_counter()
    print(f"== 1/3 synthetic datasets -> {args.out / 'data'}", flush=True)
    try:
        generate(args.out / "data", "small", 0)
        print(f"== 2/3 shards -> {args.out / 'shards'}", flush=True)
        build_shards(args.out / "data", args.out / "shards", workers=2)
    except (ValueError, OSError, ShardError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    run = args.out / "run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "train.py"), "--shards", str(args.out / "shards"), "--logs-dir", str(run),
           *SOURCES, *config, "--pretrained", "none", "--update-style", "--device", "cuda" if gpu else "cpu"]
    print("== 3/3 Style Interleaved Learning: dukemtmc + cuhk03 + msmt17v1 -> market1501 (unseen)\n"
          f"   configuration ({'GPU' if gpu else 'CPU: a small one, so it ends in minutes'}), random init:\n"
          f"   python {shlex.join(['train.py', *cmd[2:]])}", flush=True)
    code = run_to_the_end(cmd)
    if code == 0:
        print(f"\nplot: {run / 'metrics.png'}   log: {run / 'metrics.jsonl'}   "
              f"checkpoints: {run / 'best.pth'}")
        print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")
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
