"""What both loader backends share: the configuration, the training batch, the evaluation
loader's row bookkeeping, and the hand-over of a batch to the device.

The backends (``pipeline.dali``, ``pipeline.torch_loader``) import this module; the factory
that picks one of them is ``pipeline.loader``, which re-exports these names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.augment import resolve_pad
from pipeline.plan import EvalRows
from pipeline.transforms import normalize

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
    pad: int | None = None  # zero padding before the random crop; None: default_pad(width)

    @property
    def batch_size(self) -> int:
        return self.num_ids * self.num_instances

    @property
    def crop_pad(self) -> int:
        """The training crop's padding in pixels (the crop shifts by up to this much)."""
        return resolve_pad(self.pad, self.width)


@dataclass
class TrainBatch:
    """One iteration: the sources' rows for this rank, stacked in source order."""

    images: torch.Tensor  # [sum(sizes), 3, H, W], channels_last, normalised, config dtype
    labels: torch.Tensor  # int64 [sum(sizes)], mix labels of each row's own source
    sizes: list[int]
    batch_labels: list[np.ndarray]  # per source, the global batch (TrainPlan.batch_labels)
    replaced: int = 0  # undecodable images replaced in this batch (replace_bad only)


class EvalLoader:
    """This rank's rows of an evaluation set in order, in batches of ``test_batch_size`` (the
    last one partial), with each row's pid, camera, query flag and mix label. A backend's
    ``__iter__`` yields (images, row indices) on the device."""

    name = ""  # the backend: "dali" or "torch"

    def __init__(self, rows: EvalRows, cfg: LoaderConfig):
        self.rows, self.cfg = rows, cfg
        self.pids, self.camids = rows.pids, rows.camids
        self.is_query, self.labels = rows.is_query, rows.labels

    def __len__(self) -> int:
        return len(self.rows)


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
