"""One writer per output folder: a training run holds its logs dir, a shard build its output
folder, for as long as it runs.

The lock is ``fcntl.flock`` on a ``.lock`` file in the folder: the kernel releases it when the
holder exits, however it ends (a crash or SIGKILL leaves no stale lock to clean up). The file
holds the holder's pid, so a refused process can say who holds the folder.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TextIO

LOCK_NAME = ".lock"


class FolderBusy(RuntimeError):
    """Another live process holds the folder."""


def hold_folder(folder: Path) -> TextIO:
    """Lock ``folder`` (which must exist) for this process; keep the returned file open for as
    long as the lock must hold (closing it releases the lock). Raises :class:`FolderBusy`, or
    ``OSError`` when the folder is not writable."""
    f = open(Path(folder) / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise FolderBusy(f"{folder} is in use by another process (pid {holder})") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
