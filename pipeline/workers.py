"""What every data worker process does first, and how a parent starts workers.

Three rules, for the DALI workers, the torch DataLoader workers and the shard builder's pool:

- A worker ends with its parent. The kernel kills it when the parent dies for any reason,
  SIGKILL and the out-of-memory killer included (Linux ``PR_SET_PDEATHSIG``), so no worker is
  left holding memory after a killed run.
- A stop signal does not kill a worker at once. Schedulers and terminals stop a job by
  signalling a whole process group (torchrun forwards its SIGTERM or SIGINT to each trainer's
  group; Ctrl-C reaches the terminal's foreground group), so workers receive the trainer's stop
  signal too. Dying on it would break the trainer's last iterations before its checkpoint. A
  worker takes it as "end within ``GRACE_S`` seconds" instead (an alarm): the parent's normal
  shutdown or its death ends the worker sooner, and a pool that terminates a stuck worker
  (DALI and ``concurrent.futures`` do, then wait for it) still gets it back.
- A spawned worker imports only what reading bytes needs. ``multiprocessing``'s spawn re-imports
  the parent's ``__main__`` script in every child; for ``train.py`` that is torch, DALI and the
  model, about 300 MB per worker. Our worker callbacks live in torch-free modules
  (``pipeline.reading``, ``pipeline.dali_sources``), so :func:`starting_workers` hides
  ``__main__`` from the children.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

GRACE_S = 120  # beyond torchrun's default 30 s before its SIGKILL: under torchrun a worker never ends first
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def become_worker(parent: int) -> None:
    """Run first in a worker process whose parent is ``parent`` (a pid): stop signals arm the
    grace alarm, the parent's death kills this process. A parent that died before this call
    ends the worker here."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a forked worker may inherit a parent's handler
    for s in STOP_SIGNALS:
        signal.signal(s, _end_soon)
    _die_with_parent()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by starting_workers
    if os.getppid() != parent:
        os._exit(0)


def _end_soon(signum: int, frame) -> None:
    """A stop signal: the default action of SIGALRM ends the process in GRACE_S seconds, unless
    an earlier signal already set a nearer time."""
    remaining = signal.alarm(GRACE_S)
    if remaining:
        signal.alarm(remaining)


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return  # no parent-death signal elsewhere; the loaders' own checks remain
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


@contextmanager
def starting_workers() -> Iterator[None]:
    """Wrap the start of worker processes. Stop signals stay pending in this thread meanwhile
    (none is lost: the handlers run when the block ends), and the children inherit the block
    across fork and exec, so a signal cannot kill a worker before :func:`become_worker` has set
    its handlers. ``__main__`` is hidden from spawned children (see the module docstring); the
    workers' callbacks must then be defined in importable modules, never in a script."""
    main = sys.modules["__main__"]
    hidden = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(hidden)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
