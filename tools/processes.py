"""Signalling and ending the process trees that tools and tests start (torchrun and its trainers,
a check step's processes), written once: tools/gpu_check.py, tools/leave_one_out.py and the
tests' :class:`tests.live.Live` use it. A process gone already (or never ours) is no error."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def signal_group(pgid: int, sig: int) -> None:
    """``sig`` to every process of process group ``pgid`` (a process started with
    ``start_new_session=True`` leads one, with its id); nothing when the group is gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def signal_each(pids: set[int], sig: int) -> None:
    """``sig`` to each of ``pids``; those gone (or not ours) are skipped."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def marked(marker: str) -> set[int]:
    """Live processes whose environment holds ``marker`` (NAME=value) exactly, from Linux's /proc:
    every process started under the marker inherits it, whatever its session or parent now
    (torchrun's workers run in sessions of their own; orphaned workers change parent)."""
    want, found = marker.encode(), set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if want in environ.read_bytes().split(b"\0"):  # a zombie's reads empty
                found.add(int(environ.parent.name))
        except OSError:
            continue
    return found


def stop_marked(proc: subprocess.Popen, marker: str, grace_s: float) -> int:
    """End ``proc`` and every process of its ``marker``: SIGTERM while it still runs (torchrun
    passes it on to its workers), then, after ``grace_s`` (or 2 s for a ``proc`` that ended by
    itself: workers finishing), SIGKILL to every one left. Returns how many processes other than
    ``proc`` were killed."""
    running = proc.poll() is None
    if running:
        signal_each(marked(marker), signal.SIGTERM)
    deadline = time.monotonic() + (grace_s if running else 2)
    while time.monotonic() < deadline and (proc.poll() is None or marked(marker) - {proc.pid}):
        time.sleep(0.1)
    left = marked(marker) - {proc.pid}
    signal_each(left | ({proc.pid} if proc.poll() is None else set()), signal.SIGKILL)
    proc.wait()
    return len(left)
