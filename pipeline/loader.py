"""The loaders' common API: configuration, the training batch, the mix set, and the choice of backend.

Both backends (``pipeline.dali`` and ``pipeline.torch_loader``) read the same shards through
:class:`TrainPlan`, so they sample the same indices for a given (seed, epoch, rank) and differ
only in how the pixels are decoded and augmented.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.reading import (EvalRows, Rows, SourceSet, TrainPlan, check_header, decode_rgb,
                              round_sizes, split_rows)
from pipeline.transforms import normalize

# The reading side lives in the torch-free pipeline.reading (the workers import it); it is
# part of this module's API too.
__all__ = ["LOADERS", "LoaderConfig", "TrainBatch", "select_loader", "build_train_loader",
           "build_eval_loader", "to_device", "EvalRows", "Rows", "SourceSet", "TrainPlan", "check_header",
           "decode_rgb", "round_sizes", "split_rows"]
log = logging.getLogger(__name__)
LOADERS = ("auto", "dali", "torch")


@dataclass
class LoaderConfig:
    """What both loaders need. Batch sizes are GLOBAL: each of ``world`` ranks gets its slice."""

    height: int = 256
    width: int = 128
    num_ids: int = 16
    num_instances: int = 4  # batch per source = num_ids * num_instances
    iters: int = 200
    seed: int = 0
    workers: int = 4
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    loader: str = "auto"
    test_batch_size: int = 256
    replace_bad: bool = False  # replace undecodable images by another of the same identity (counted)

    @property
    def batch_size(self) -> int:
        return self.num_ids * self.num_instances


@dataclass
class TrainBatch:
    """One iteration: the three sources' rows for this rank, stacked in source order."""

    images: torch.Tensor  # [sum(sizes), 3, H, W], channels_last, normalised, config dtype
    labels: torch.Tensor  # int64 [sum(sizes)], mix labels of each row's own source
    sizes: list[int]
    replaced: int = 0  # undecodable images replaced in this batch (replace_bad only)
    round_sizes: list[list[int]] | None = None  # per source, over all ranks (TrainPlan.round_sizes)
    batch_labels: list[np.ndarray] | None = None  # per source, the global batch (TrainPlan.batch_labels)

    def per_source(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-source (images, labels) views, no copies."""
        return list(zip(self.images.split(self.sizes), self.labels.split(self.sizes)))


def select_loader(kind: str = "auto") -> str:
    """"dali" when asked (or auto) and importable, else "torch"; says which one runs."""
    if kind not in LOADERS:
        raise ValueError(f"loader={kind!r}: expected one of {', '.join(LOADERS)}")
    if kind != "torch":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as err:
            if kind == "dali":
                raise ImportError("loader='dali' but NVIDIA DALI is not installed: "
                                  "pip install -e '.[dali]', or use loader='torch'") from err
        else:
            log.info("data loader: DALI")
            return "dali"
    log.info("data loader: torch (PIL + torchvision)")
    return "torch"


def build_train_loader(shards_dir: Path, sources: list[str], cfg: LoaderConfig):
    """Training loader over the mix sets of ``sources``: ``.epoch(e, start=0)`` yields the
    TrainBatch of iterations start..cfg.iters-1 of epoch e."""
    plan = TrainPlan([SourceSet(Path(shards_dir) / s) for s in sources], cfg)
    plan.indices(0)  # refuse an unusable source here, not inside a worker
    if select_loader(cfg.loader) == "dali":
        from pipeline.dali import DaliTrainLoader
        return DaliTrainLoader(plan, cfg)
    from pipeline.torch_loader import TorchTrainLoader
    return TorchTrainLoader(plan, cfg)


def build_eval_loader(shards_dir: Path, dataset: str | list[str], what: str, cfg: LoaderConfig):
    """Evaluation loader: "test" (query then gallery) or "mix" (centre initialisation; of one
    source, or of several one after another), test transform."""
    rows = EvalRows(shards_dir, dataset, what, cfg)
    if select_loader(cfg.loader) == "dali":
        from pipeline.dali import DaliEvalLoader
        return DaliEvalLoader(rows, cfg)
    from pipeline.torch_loader import TorchEvalLoader
    return TorchEvalLoader(rows, cfg)


def to_device(images: torch.Tensor, labels: torch.Tensor,
              cfg: LoaderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """NHWC batch -> NCHW channels_last view on the device in the config dtype; uint8 pixels (the
    torch loader's) are normalised there, after the copy. Host tensors go through pinned
    memory, so the copies are queued without the host waiting."""
    cuda = cfg.device.type == "cuda"
    if cuda:
        images, labels = (t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t
                          for t in (images, labels))
    images = images.to(cfg.device, non_blocking=cuda)
    if images.dtype == torch.uint8:
        images = normalize(images)
    images = images.to(cfg.dtype)
    return images.permute(0, 3, 1, 2), labels.to(cfg.device, non_blocking=cuda)
