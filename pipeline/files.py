"""Files written whole or not at all."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes a temporary file beside ``path``, which then replaces ``path`` in one
    rename: an interrupted write leaves the old file (or none), never half of a new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
