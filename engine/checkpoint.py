"""Checkpoints: written atomically (temporary file, then rename) and read back with
``weights_only=True``, so a checkpoint from elsewhere can never run code on load.
:func:`read_checkpoint` also checks that a file is one of train.py's checkpoints before a run
relies on it, and says in one line what is wrong with one that is not.

A checkpoint carries its format's ``version`` (:data:`VERSION`, written by
:func:`save_checkpoint`). A change of format raises it and adds one step to :data:`UPGRADES`;
:func:`upgrade` brings a checkpoint of any earlier version up step by step, so the code that
reads checkpoints only ever sees the current format."""
from __future__ import annotations

import pickle
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.config import RunConfig
from engine.evaluation.metrics import METRICS
from model.resnet import build_model
from pipeline.files import write_atomic

# Settings that must agree between a run and the checkpoint it resumes from (the number of
# epochs may grow: a finished run can be continued).
RESUME_KEYS = RunConfig.resume_keys()
VERSION = 1  # of the checkpoint format; files without a version entry are version 0
# What a checkpoint holds, by use: --evaluate needs the first two, a resume all of them.
EVAL_PARTS = {"config": dict, "model": dict}
TRAIN_PARTS = {**EVAL_PARTS, "epoch": int, "iteration": int, "memories": list, "optimizer": dict,
               "scheduler": dict, "scaler": dict, "best_map": float, "history": list}
# The config entries that give a checkpoint's evaluation network and its input size (--evaluate
# takes them from the checkpoint rather than from the flags):
NETWORK_KEYS = ("arch", "stem_relu", "bn_groups", "height", "width")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or not one that train.py wrote."""


@dataclass
class TrainState:
    """Everything a resume needs, as latest.pth holds it. The sampler, shuffles, augmentation and
    style draws are functions of (seed, epoch, iteration, rank) (``pipeline.seeds``), so
    (epoch, iteration) is their whole state. ``memories`` are the memory classifiers (their
    ``centers`` are saved); ``epoch_losses`` the losses of the epoch's iterations before
    ``iteration`` and ``epoch_seconds`` their time (a mid-epoch resume reports the whole epoch's
    mean loss, time and speed; None: a version 0 checkpoint, without the time)."""

    config: dict
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    scaler: Any
    memories: list = field(default_factory=list)
    epoch: int = 0
    iteration: int = 0
    best_map: float = -1.0
    history: list[dict] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    epoch_seconds: float | None = None

    def state_dict(self) -> dict:
        """The checkpoint file's dict (keys and order as train.py always wrote them; the version
        is added by :func:`save_checkpoint`)."""
        return {"config": self.config, "epoch": self.epoch, "iteration": self.iteration,
                "model": self.model.state_dict(), "memories": [m.centers for m in self.memories],
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "best_map": self.best_map, "history": self.history,
                "epoch_losses": self.epoch_losses, "epoch_seconds": self.epoch_seconds}

    def load_state_dict(self, ckpt: dict) -> None:
        """The states and position of a checkpoint dict (:func:`read_checkpoint`); the memories'
        centres are copied by whoever makes the memories (``ckpt["memories"]``). Raises
        RuntimeError, ValueError or KeyError when the states do not fit."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.iteration = ckpt["epoch"], ckpt["iteration"]
        self.best_map, self.history = ckpt["best_map"], list(ckpt["history"])
        self.epoch_losses = [float(x) for x in ckpt["epoch_losses"]][:self.iteration]
        seconds = ckpt["epoch_seconds"]
        self.epoch_seconds = None if seconds is None else float(seconds)


def position(epoch: int, iteration: int) -> str:
    """A checkpoint's (epoch, iteration) as users read them, the same in every message: epochs
    count from 1 and ``iteration`` iterations of the next epoch are done, so (0, 11) is "epoch 1,
    iteration 11" and (2, 0) "the end of epoch 2"."""
    return f"epoch {epoch + 1}, iteration {iteration}" if iteration else f"the end of epoch {epoch}"


def save_checkpoint(state: dict, path: Path) -> None:
    """Write `state` to `path` atomically, with the format's :data:`VERSION`: a crash leaves the
    previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: _save({**state, "version": VERSION}, tmp))


def _save(state: dict, path: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk raises OSError (ENOSPC), which
    write_atomic names; given a path, torch's own writer fails with an unexplained RuntimeError
    (and through a file, closing its archive after the OSError raises one: the OSError is meant)."""
    with open(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:
            cause = e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint file atomically (best.pth from latest.pth, without serialising twice)."""
    write_atomic(Path(dst), lambda tmp: shutil.copyfile(src, tmp))


def read_checkpoint(path: Path, parts: dict[str, type] = TRAIN_PARTS) -> dict:
    """A checkpoint for a run, in the current format (:func:`upgrade`): any problem becomes a
    :class:`CheckpointError` that names the file and what was expected, and the structure is
    checked (``parts``: name -> type), so a damaged or foreign file fails here rather than deep
    inside the run."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, expected a checkpoint file (latest.pth or best.pth)")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    state = read_torch_file(path, "a checkpoint")
    problem = _structure_problem(state, parts)
    if problem:
        raise CheckpointError(f"{path} is not a train.py checkpoint: {problem}")
    try:
        return upgrade(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _from_version_0(state: dict) -> dict:
    """Version 0, the releases before versions, told apart by what they lack: before -d took
    several targets the config held one ``target`` (read as if written with one, its history
    columns named for it); before --pad every size was padded by 10 pixels; before a mid-epoch
    checkpoint carried its epoch's losses and time it carried neither."""
    config = state["config"]
    config.setdefault("pad", 10)  # the published padding, then used at every size
    if "target" in config:
        target = config.pop("target")
        config.update(targets=[target], best_by="first")
        for row in state.get("history", []):
            row.update({f"{target}/{m}": row[m] for m in METRICS if m in row})
    state.setdefault("epoch_losses", [])
    state.setdefault("epoch_seconds", None)
    return state


UPGRADES = [_from_version_0]  # UPGRADES[v] takes a checkpoint of version v to version v + 1


def upgrade(state: dict) -> dict:
    """A checkpoint dict of any version up to :data:`VERSION` in the current format, brought up
    one version at a time (in place)."""
    version = state.get("version", 0)
    if type(version) is not int or not 0 <= version <= VERSION:
        raise CheckpointError(f"format version {version!r}, but this release reads versions 0 to {VERSION} "
                              "(a newer release wrote it?)")
    for step in UPGRADES[version:]:
        state = step(state)
    state["version"] = VERSION
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


def network_from_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The evaluation network of a train.py checkpoint (eval mode, CPU, no style module) and
    its config. Raises :class:`CheckpointError` naming the file when it cannot be used."""
    ckpt = read_checkpoint(Path(path), EVAL_PARTS)
    cfg = ckpt["config"]
    missing = [k for k in NETWORK_KEYS if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: its config lacks {', '.join(missing)} (not a train.py checkpoint)")
    try:
        model = build_model(cfg["arch"], "none", stem_relu=cfg["stem_relu"], bn_groups=cfg["bn_groups"])
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: its weights do not fit its network "
                              f"({str(e).strip().splitlines()[0]})") from None
    return model.eval(), cfg
