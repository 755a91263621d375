"""What every data worker process does first, and how a parent starts workers.

Three rules, for the DALI workers, the torch DataLoader workers and the shard builder's pool:

- A worker ends with its parent. The kernel kills it when the parent dies for any reason,
  SIGKILL and the out-of-memory killer included (Linux ``PR_SET_PDEATHSIG``), so no worker is
  left holding memory after a killed run.
- A stop signal is for the parent. Schedulers and terminals stop a job by signalling a whole
  process group (torchrun forwards its SIGTERM or SIGINT to each trainer's group; Ctrl-C reaches
  the terminal's foreground group), so workers receive the trainer's stop signal too; dying on
  it would break the trainer's last iterations before its checkpoint. A worker keeps SIGTERM
  and SIGINT blocked and a thread takes them with ``sigwaitinfo``: one sent by the parent itself
  (a pool's ``terminate()``, multiprocessing's clean-up at exit) ends the worker at once, any
  other is left to the parent, which ends its workers when it is done.
- A spawned worker imports only what reading bytes needs. ``multiprocessing``'s spawn re-imports
  the parent's ``__main__`` script in every child; for ``train.py`` that is torch, DALI and the
  model, about 300 MB per worker. Our worker callbacks live in torch-free modules
  (``pipeline.plan``, ``pipeline.dali_sources``), so :func:`starting_workers` hides
  ``__main__`` from the children.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from contextlib import contextmanager
from multiprocessing import resource_tracker
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def become_worker(parent: int) -> None:
    """Run first in a worker process whose parent is ``parent`` (a pid): stop signals are
    obeyed from the parent only, and the parent's death kills this process. A parent that died
    before this call ends the worker here."""
    # Normally blocked since birth (starting_workers): every thread of the worker inherits it.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_obey_parent_only, args=(parent,), name="stop signals", daemon=True).start()
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)


def _obey_parent_only(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_pid == parent:
            os._exit(128 + info.si_signo)


def die_with_parent(signum: int) -> None:
    """This process gets ``signum`` when its parent dies (Linux; SIGKILL included). The caller
    checks ``os.getppid()`` afterwards: a parent that died before the call is not signalled."""
    if not sys.platform.startswith("linux"):
        return  # no parent-death signal elsewhere; the loaders' own checks remain
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


@contextmanager
def starting_workers() -> Iterator[None]:
    """Wrap the start of worker processes. Stop signals stay pending in this thread meanwhile
    (none is lost: the handlers run when the block ends), and the children inherit the block
    across fork and exec, so every thread of a worker has them blocked from its start and a
    signal cannot kill a worker before :func:`become_worker` has run. ``__main__`` is hidden
    from spawned children (see the module docstring); the workers' callbacks must then be
    defined in importable modules, never in a script.

    multiprocessing's resource tracker is started first: starting it (with the first spawned
    child) unblocks SIGINT and SIGTERM in the calling thread, which would undo the block for
    every child spawned after it (a Ctrl-C while a DALI worker imports DALI killed it with a
    traceback, and the pipeline waited for it for ever)."""
    resource_tracker.ensure_running()
    main = sys.modules["__main__"]
    hidden = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        with _deferring_stop_signals():
            yield
    finally:
        main.__dict__.update(hidden)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


@contextmanager
def _deferring_stop_signals() -> Iterator[None]:
    """Python's handlers of the stop signals run in the main thread even while it blocks them,
    as soon as another thread (a pool's manager, a progress bar's monitor) takes the signal:
    a KeyboardInterrupt in the middle of a child's start left it half-fed (an ``EOFError``
    traceback from the child). Meanwhile a stop signal is only noted, and raised again after."""
    # Handlers can only be set from the main thread, and one set outside Python not restored.
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal,
                                                                                  STOP_SIGNALS):
        yield
        return
    noted: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(noted):
            signal.raise_signal(s)
