"""Fallback loaders for machines without DALI: PIL + torchvision in a torch DataLoader.

Same sampler (through :class:`pipeline.plan.TrainPlan`) and transforms as the DALI path;
one DataLoader item is one whole iteration (all sources), built in a worker as a uint8 NHWC
tensor (decode, resize, crop, mirror); ``to_device`` normalises it where it lands, so the NCHW
view is channels_last, like the DALI path's output. The workers end with the trainer and
leave stop signals sent to its process group to the trainer (``pipeline.workers``).
"""
from __future__ import annotations

import os
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.batches import EvalLoader, LoaderConfig, TrainBatch, to_device
from pipeline.plan import EvalRows, TrainPlan, decode_rgb
from pipeline.shards import ShardError
from pipeline.transforms import test_pixels, train_pixels
from pipeline.workers import become_worker, starting_workers


class _Iterations(Dataset):
    """Item (epoch, it) = that iteration's images (NHWC), labels and replaced count."""

    def __init__(self, plan: TrainPlan, cfg: LoaderConfig):
        self.plan, self.size = plan, (cfg.height, cfg.width)

    def __len__(self) -> int:
        return self.plan.iters

    def __getitem__(self, key: tuple[int, int]):
        images, labels, replaced = self.plan.iteration(*key, decode_rgb)
        mirror, shift = self.plan.augmentation(*key)
        pixels = np.stack([train_pixels(im, m, dy, dx, *self.size)
                           for im, m, (dy, dx) in zip(images, mirror, shift)])
        return torch.from_numpy(pixels), torch.from_numpy(labels), int(replaced.sum())


class _EpochSampler(Sampler):
    """Yields (epoch, iteration) keys; read in the main process, so setting ``epoch`` is enough."""

    def __init__(self, iters: int):
        self.iters, self.epoch, self.start = iters, 0, 0

    def __len__(self) -> int:
        return self.iters - self.start

    def __iter__(self):
        return ((self.epoch, it) for it in range(self.start, self.iters))


def _data_loader(dataset: Dataset, sampler, cfg: LoaderConfig) -> DataLoader:
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=cfg.workers,
                      pin_memory=cfg.device.type == "cuda", persistent_workers=cfg.workers > 0,
                      prefetch_factor=2 if cfg.workers > 0 else None,
                      worker_init_fn=partial(_init_worker, os.getpid()))


def _init_worker(parent: int, worker_id: int) -> None:
    become_worker(parent)


def _batches(loader: DataLoader):
    """An iterator over ``loader``; its first one starts the (persistent) worker processes."""
    with starting_workers():
        return iter(loader)


class TorchTrainLoader:
    name = "torch"

    def __init__(self, plan: TrainPlan, cfg: LoaderConfig):
        self.plan, self.cfg = plan, cfg
        self.num_classes = [s.num_classes for s in plan.sets]
        self.replaced = 0
        self._sampler = _EpochSampler(plan.iters)
        self._loader = _data_loader(_Iterations(plan, cfg), self._sampler, cfg)

    def epoch(self, e: int, start: int = 0):
        self._sampler.epoch, self._sampler.start = e, start
        for it, (images, labels, replaced) in enumerate(_from_workers(_batches(self._loader)), start):
            images, labels = to_device(images, labels, self.cfg)
            self.replaced += replaced
            yield TrainBatch(images, labels, list(self.plan.sizes), self.plan.batch_labels(e, it), replaced)


class _EvalBatches(Dataset):
    def __init__(self, rows: EvalRows, cfg: LoaderConfig):
        self.rows, self.size = rows, (cfg.height, cfg.width)

    def __len__(self) -> int:
        return self.rows.num_batches()

    def __getitem__(self, b: int):
        index = self.rows.batch_rows(b)
        images = []
        for j in index.tolist():
            data = self.rows.rows.read(j)  # a shard that cannot be read: ShardError
            try:
                images.append(decode_rgb(data))
            except Exception as err:
                raise ShardError(f"{self.rows.rows.location(j)}: cannot decode the image ({err})") from err
        pixels = np.stack([test_pixels(im, *self.size) for im in images])
        return torch.from_numpy(pixels), torch.from_numpy(index)


class TorchEvalLoader(EvalLoader):
    name = "torch"

    def __init__(self, rows: EvalRows, cfg: LoaderConfig):
        super().__init__(rows, cfg)
        self._loader = _data_loader(_EvalBatches(rows, cfg), range(rows.num_batches()), cfg)

    def __iter__(self):
        for images, index in _from_workers(_batches(self._loader)):
            yield to_device(images, index, self.cfg)


def _from_workers(batches):
    """``batches`` as they come; a worker's :class:`ShardError`, which torch re-raises with the
    worker's traceback in its message, raised again as one line naming the shard or image."""
    try:
        yield from batches
    except ShardError as e:
        raise ShardError(_worker_message(e)) from e


def _worker_message(e: Exception) -> str:
    """A worker's error as it was raised: the last line of the traceback torch appends, without
    the exception's type (one line, naming the image)."""
    text = str(e).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(f"{ShardError.__module__}.ShardError: ") else last
