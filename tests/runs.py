"""The flags of a train.py run small enough for 2 CPU cores, and what such a run leaves behind, for
every test that trains (in-process, as a command or under torchrun)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["--dataset_src1", "dukemtmc", "--dataset_src2", "cuhk03", "--dataset_src3", "msmt17v1",
           "-d", "market1501"]
TARGET = "market1501"


def small_run(shards: Path, logs: Path, *extra: str, loader: str = "torch", workers: int = 1,
              sources: list[str] | None = None, device: str = "cpu") -> list[str]:
    """train.py flags: resnet18 at 64x32, 4 ids x 4 per source, 3 iterations of one epoch on
    ``device``; ``sources``: --sources instead of SOURCES' three (the target stays TARGET)."""
    data = SOURCES if sources is None else ["--sources", ",".join(sources), "-d", TARGET]
    return ["--shards", str(shards), "--logs-dir", str(logs), *data, "-a", "resnet18", "--pretrained",
            "none", "--height", "64", "--width", "32", "-b", "16", "--iters", "3", "--epochs", "1",
            "--workers", str(workers), "--test-batch-size", "64", "--loader", loader, "--device", device,
            "--no-progress", "--update-style", *extra]


def history(logs: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per epoch."""
    return [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]


def load_checkpoint(path: Path) -> dict:
    """A checkpoint file as the run saved it (``torch.load``, weights only; no upgrade, no checks)."""
    assert Path(path).is_file(), f"checkpoint {path} does not exist"
    return torch.load(path, map_location="cpu", weights_only=True)
