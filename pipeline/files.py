"""Files written whole or not at all, and output paths checked before the work that fills them."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

NAME_MAX = 255  # bytes in one path component, on every file system Linux mounts for data


class WriteError(OSError):
    """A file that could not be written (a full disk, say): the message names it and says why in
    one line, and whether its previous version is kept."""

    def __str__(self) -> str:
        return self.strerror


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes a temporary file beside ``path``, which then replaces ``path`` in one
    rename: an interrupted write leaves the old file (or none), never half of a new one. An
    OSError (no space left...) becomes a :class:`WriteError` naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        reason = ("no space left on device" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                  else (e.strerror or str(e)).lower())
        kept = f"; the previous {path.name} is kept" if path.is_file() else ""
        raise WriteError(e.errno, f"cannot write {path}: {reason}{kept}") from None
    finally:
        tmp.unlink(missing_ok=True)


def long_name(path: Path) -> str | None:
    """Why ``path`` cannot exist on any file system (a component over NAME_MAX bytes), or None:
    every call on it would fail with 'File name too long', so callers refuse it up front."""
    for part in Path(path).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            return (f"a path component is {len(os.fsencode(part))} bytes long ({part[:24]}...), more than "
                    f"the {NAME_MAX} a file system allows")
    return None


def output_problem(path: Path, folder: bool) -> str | None:
    """Why ``path`` cannot be written, as a folder that files go into (``folder``) or as one file,
    or None: checked before the work, so a long job never ends in a traceback about its output."""
    path = Path(path)
    if why := long_name(path):
        return why
    if path.exists() and path.is_dir() != folder:
        return "is a file, expected a folder" if folder else "is a folder, expected a file name"
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None
