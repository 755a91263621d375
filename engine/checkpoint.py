"""Checkpoints: written atomically (temporary file, then rename) and read back with
``weights_only=True``, so a checkpoint from elsewhere can never run code on load."""
from __future__ import annotations

import os
from pathlib import Path

import torch

# Settings that must agree between a run and the checkpoint it resumes from (the number of
# epochs may grow: a finished run can be continued).
RESUME_KEYS = ("arch", "sources", "target", "batch_size", "num_instances", "height", "width",
               "update_style", "baseline", "iters", "seed", "lr", "weight_decay",
               "temp", "momentum", "rho", "stem_relu", "bn_groups")


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


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def config_differences(saved: dict, current: dict, keys: tuple[str, ...] = RESUME_KEYS) -> list[str]:
    """Human-readable list of the settings that differ between a checkpoint and this run."""
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]
