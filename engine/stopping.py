"""Stopping a run on SIGTERM or SIGINT: every rank stops after the same iteration; and a trainer
whose launcher (torchrun) died stops as on SIGTERM (:func:`follow_launcher`)."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist


LAUNCHER_GRACE_S = 6  # seconds: a trainer whose launcher died ends this long after its stop request
_LAUNCHER_POLL_S = 0.2


def follow_launcher() -> None:
    """Under torchrun, end this trainer when torchrun dies. torchrun forwards a stop signal to
    its trainers, but when it is killed (SIGKILL, the out-of-memory killer, a lost session) the
    trainers, reparented, would train on, holding the logs dir's lock and the GPUs. A thread
    watches the parent (polling ``os.getppid()``: the kernel's parent-death signal would follow
    the thread that started this process, not the launcher) and, once it has gone, sends this
    process SIGTERM: the ranks stop together at the next iterations and save latest.pth, as on
    torchrun's own SIGTERM. A trainer not gone ``LAUNCHER_GRACE_S`` seconds later (in an
    evaluation, waiting for a rank that has gone, or still tearing down the interpreter, where
    no Python thread runs) is ended by the kernel (an alarm, SIGALRM); checkpoints are written
    atomically, so that leaves the last whole one. A plain ``python train.py`` is left alone: its
    parent may be a shell that detached it (nohup) and exited."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        threading.Thread(target=_watch_launcher, args=(os.getppid(),), name="launcher", daemon=True).start()


def _watch_launcher(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(_LAUNCHER_POLL_S)
    if os.environ.get("RANK", "0") == "0":
        try:
            print(f"train.py: the launcher (pid {launcher}) has gone: stopping as on SIGTERM",
                  file=sys.stderr, flush=True)
        except OSError:  # its terminal or pipe went with it
            pass
    signal.alarm(LAUNCHER_GRACE_S)  # then SIGALRM's default action ends the process, whatever it does
    os.kill(os.getpid(), signal.SIGTERM)


class StopRequest:
    """SIGTERM and SIGINT ask the run to stop; every rank then stops at the same iteration, saves
    latest.pth and exits. A second SIGINT raises KeyboardInterrupt at once.

    The loop calls :meth:`agreed` after every iteration. With several ranks, each call starts an
    asynchronous all-reduce (max) of the signal this rank received (0: none) over a gloo group on
    the host and returns the result of the previous call's: every rank sees the same answer at
    the same iteration, within two iterations of the signal, and the step never waits for the
    device (nor, in practice, for the other hosts: the reduction had a whole iteration to
    complete)."""

    def __init__(self) -> None:
        self.signal = 0  # the first stop signal this process received
        self._group = None
        self._received = torch.zeros(1, dtype=torch.int32)
        self._pending = None
        self._previous = {s: signal.signal(s, self._set) for s in (signal.SIGTERM, signal.SIGINT)}

    def _set(self, signum: int, frame) -> None:
        if not self.signal:
            self.signal = signum
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def attach(self, world: int) -> None:
        """Make the agreement group; a collective, so every rank calls it once."""
        if world > 1:
            self._group = dist.new_group(backend="gloo")

    def agreed(self) -> int:
        """The stop signal all ranks agree on now (the same on every rank), 0 to go on."""
        if self._group is None:
            return self.signal
        agreed = 0
        if self._pending is not None:
            self._pending.wait()
            agreed = int(self._received.item())
        self._received = torch.tensor([self.signal], dtype=torch.int32)
        self._pending = dist.all_reduce(self._received, op=dist.ReduceOp.MAX, group=self._group,
                                        async_op=True)
        return agreed

    def close(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        for s, handler in self._previous.items():
            signal.signal(s, handler)

