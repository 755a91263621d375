"""Checkpoints: written atomically (temporary file, then rename) and read back with
``weights_only=True``, so a checkpoint from elsewhere can never run code on load.
:func:`read_checkpoint` also checks that a file is one of train.py's checkpoints before a run
relies on it, and says in one line what is wrong with one that is not."""
from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch

# Settings that must agree between a run and the checkpoint it resumes from (the number of
# epochs may grow: a finished run can be continued).
RESUME_KEYS = ("arch", "sources", "target", "batch_size", "num_instances", "height", "width",
               "update_style", "baseline", "iters", "seed", "lr", "weight_decay",
               "temp", "momentum", "rho", "stem_relu", "bn_groups")
# What a checkpoint holds, by use: --evaluate needs the first two, a resume all of them.
EVAL_PARTS = {"config": dict, "model": dict}
TRAIN_PARTS = {**EVAL_PARTS, "epoch": int, "iteration": int, "memories": list, "optimizer": dict,
               "scheduler": dict, "scaler": dict, "best_map": float, "history": list}


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or not one that train.py wrote."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Write `state` to `path` atomically: a crash leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint file atomically (best.pth from latest.pth, without serialising twice)."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: Path, parts: dict[str, type] = TRAIN_PARTS) -> dict:
    """:func:`load_checkpoint` for a run: any problem becomes a :class:`CheckpointError` that
    names the file and what was expected, and the structure is checked (``parts``: name ->
    type), so a damaged or foreign file fails here rather than deep inside the run."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, expected a checkpoint file (latest.pth or best.pth)")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    state = read_torch_file(path, "a checkpoint")
    problem = _structure_problem(state, parts)
    if problem:
        raise CheckpointError(f"{path} is not a train.py checkpoint: {problem}")
    return state


def read_torch_file(path: Path, what: str):
    """``torch.load(weights_only=True)`` of a file that must be ``what``; a file it cannot load
    raises :class:`CheckpointError` saying why in a few words (and torch's warnings about
    unusual pickles stay quiet: the error says it all)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the reason, the file is unusable; say which
        raise CheckpointError(f"{path} cannot be read as {what}: {unreadable_reason(e)}") from None


def unreadable_reason(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words. Torch's own message for a
    refused pickle recommends ``weights_only=False``, which would run whatever code the file
    holds: it is not repeated."""
    if isinstance(e, EOFError):
        return "the file is empty or cut short"
    if isinstance(e, pickle.UnpicklingError):
        return ("it is not a file torch.save wrote with tensors and plain data only (such a file is "
                "never unpickled here: it could run code)")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if "zip archive" in first:
        return "the file is truncated or damaged (an incomplete torch zip archive)"
    return f"{type(e).__name__}: {first[:200]}"


def _structure_problem(state, parts: dict[str, type]) -> str | None:
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, expected a dict"
    missing = [k for k in parts if k not in state]
    if missing:
        return f"it lacks {', '.join(missing)}"
    wrong = [f"{k} is a {type(state[k]).__name__}, expected a {t.__name__}" for k, t in parts.items()
             if not isinstance(state[k], t) and not (t is float and isinstance(state[k], int))]
    if wrong:
        return "; ".join(wrong)
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        return "its model entry holds something other than tensors"
    if "memories" in parts and not all(isinstance(m, torch.Tensor) and m.dim() == 2
                                       for m in state["memories"]):
        return "its memories are not matrices (one [classes, features] tensor per source)"
    return None


def config_differences(saved: dict, current: dict, keys: tuple[str, ...] = RESUME_KEYS) -> list[str]:
    """Human-readable list of the settings that differ between a checkpoint and this run."""
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]
