"""The run's --logs-dir: created, locked for the run's lifetime, and refused when it holds
another run's files (unless resumed or overwritten)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pipeline.runlock import LOCK_NAME, FolderBusy, hold_folder
from engine.errors import UsageError

RUN_FILES = ("latest.pth", "best.pth", "metrics.jsonl", "metrics.png")  # what a run writes in --logs-dir


def is_run_file(name: str) -> bool:
    """A file a run writes in its --logs-dir: RUN_FILES and TensorBoard's event files."""
    return name in RUN_FILES or name.startswith("events.out.")


@dataclass
class LogsDir:
    """The run's --logs-dir, locked for the run's lifetime (rank 0 holds it); ``stale`` are the
    files of an earlier run that --overwrite replaces once every check has passed; a folder this
    run created is removed again when the run is refused before writing into it."""

    path: Path
    lock: TextIO | None = None
    stale: list[Path] = field(default_factory=list)
    created: bool = False
    used: bool = False

    def release(self) -> None:
        if self.lock is None:
            return
        self.lock.close()
        self.lock = None
        if self.created and not self.used:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            self.path.rmdir()


def claim_logs_dir(path: Path, resume: bool, overwrite: bool) -> LogsDir:
    """Create and lock --logs-dir; refuse a file, an unwritable folder, a folder another live run
    holds, and one that holds another run's files without --resume or --overwrite."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--logs-dir {path} is a file, expected a folder")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = hold_folder(path)
    except FolderBusy as e:
        raise UsageError(f"--logs-dir {e}: two runs cannot write into one folder; wait for it to end "
                         "or choose another --logs-dir") from None
    except OSError as e:
        raise UsageError(f"--logs-dir {path}: cannot create or write this folder ({e.strerror or e})") \
            from None
    found = sorted(p for p in path.iterdir() if is_run_file(p.name))
    if found and not (resume or overwrite):
        lock.close()
        names = ", ".join(p.name for p in found)
        raise UsageError(f"--logs-dir {path} holds another run ({names}): continue it with --resume "
                         f"{path / 'latest.pth'}, replace it with --overwrite, or choose another --logs-dir")
    return LogsDir(path, lock, found if overwrite and not resume else [], created)

