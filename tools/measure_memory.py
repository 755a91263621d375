"""Peak memory and start-up time of one rank, measured from outside: run a command (train.py
...), sample the proportional set size (PSS) of its whole process tree (the trainer and every
worker; PSS counts a page shared by k processes as 1/k in each, so the sum is what the tree
really holds) from /proc/<pid>/smaps_rollup, and report the peak, the most processes seen, and
when a line of the run's output (by default train.py's "first iteration done") appeared.

    python tools/measure_memory.py -- python train.py --loader dali --workers 4 ...

Linux only (/proc). docs/benchmarks.md, "Worker memory and start-up of one rank", has its figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass


def children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    return found


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


@dataclass
class Footprint:
    exit_code: int
    wall_s: float
    peak_pss_gib: float
    peak_at_s: float
    peak_processes: int
    marker_at_s: float | None  # when the marker line appeared, seconds after the start


def measure(cmd: list[str], marker: str, period: float = 0.2) -> Footprint:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[str, float] = {}

    def read() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            if marker in line and "marker" not in seen:
                seen["marker"] = time.monotonic() - start

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak, peak_at, most = 0, 0.0, 0
    while proc.poll() is None:
        tree = [proc.pid, *descendants(proc.pid)]
        total = sum(pss_bytes(p) for p in tree)
        if total > peak:
            peak, peak_at = total, time.monotonic() - start
        most = max(most, len(tree))
        time.sleep(period)
    reader.join()
    return Footprint(proc.returncode, round(time.monotonic() - start, 1), round(peak / 2**30, 2),
                     round(peak_at, 1), most, round(seen["marker"], 1) if "marker" in seen else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--marker", default="first iteration done", help="output line whose time is reported")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give the command to measure after --")
    result = measure(cmd, args.marker)
    print(json.dumps(asdict(result)))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
