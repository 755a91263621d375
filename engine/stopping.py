"""Stopping a run on SIGTERM or SIGINT: every rank stops after the same iteration."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist


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

