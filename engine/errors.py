"""The errors a run stops with and their exit codes (:class:`RunError` and its kinds), and how a
refusal is made: a flag, file or folder that cannot work is refused before any work, as one line
(``train.py: error: ...``, or the tool's name) and exit code 2, by every rank together."""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch.distributed as dist


class RunError(Exception):
    """Why a run cannot go on. ``train.main`` prints it as one line, ``train.py: error: ...``,
    and returns its kind's ``exit_code``: the one place where errors become exit codes, so
    ``train.main()`` called from Python and ``python train.py`` behave alike."""

    exit_code = 1


class UsageError(RunError):
    """A refusal, before any work: a flag, file or folder that cannot work."""

    exit_code = 2


class Divergence(RunError):
    """Training produced non-finite values (loss, features, a memory update)."""

    exit_code = 3


class DataError(RunError):
    """The data failed during the run: an image that does not decode, a shard that went away."""

    exit_code = 4


class OutputError(RunError):
    """A file of the run could not be written (a full disk): like failed data, the machine, not
    the flags, stopped the run, hence the same exit code."""

    exit_code = 4



def agree(error: UsageError | None, world: int, group: dist.ProcessGroup | None = None) -> None:
    """Every rank raises the first refusal found on any rank (in rank order), so all ranks exit 2
    together instead of some waiting in a collective for ranks that have left; ``group``: the
    process group that waits (default: the world's)."""
    if world > 1:
        found: list[str | None] = [None] * world
        dist.all_gather_object(found, None if error is None else str(error), group=group)
        error = next((UsageError(m) for m in found if m is not None), None)
    if error is not None:
        raise error


@contextmanager
def checked(world: int, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """A block of checks that may fail on some ranks only; every rank leaves it together (waiting
    in ``group``'s collective, the world's by default)."""
    error = None
    try:
        yield
    except UsageError as e:
        error = e
    agree(error, world, group)



def refuse(line: str, is_main: bool) -> None:
    """Why the run cannot go on: one line on rank 0's stderr and, under torchrun, in the error
    file torchrun reads, so that its failure report repeats the line under "Root Cause"
    (docs/operations.md, "Reading torchrun's report")."""
    if is_main:
        print(line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))

