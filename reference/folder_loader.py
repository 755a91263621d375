"""The published way of loading training data: a per-image dataset that opens each JPEG of the raw
folders with PIL and applies the torchvision transforms, and a DataLoader collating the sources'
batches (here one batch of all sources per iteration, drawn by the same identity sampler as the
shard loaders). ``tools/benchmark.py loaders`` measures it beside the shard loaders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.batches import LoaderConfig
from pipeline.records import mix_labels
from pipeline.sampler import identity_batches
from pipeline.transforms import train_transform


class _Files(Dataset):
    """(path, label) per image; PIL decode + torchvision transform per item, as the published code."""

    def __init__(self, items: list[tuple[str, int]], cfg: LoaderConfig):
        self.items, self.transform = items, train_transform(cfg.height, cfg.width, cfg.crop_pad)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return self.transform(Image.open(path).convert("RGB")), label


class FolderUnavailable(ValueError):
    """A source the folder baseline cannot read: its raw images are not files in a folder
    (CUHK03 from cuhk-03.mat, CUHK-SYSU crops of scenes)."""


def folder_loader(data_dir: Path, sources: list[str], cfg: LoaderConfig) -> tuple[DataLoader, list[int]]:
    """A DataLoader of (images, labels) batches read from the raw folders, one per iteration
    (the sources' batches in order), and each source's number of classes."""
    from pipeline.datasets import parse

    items, per_source, num_classes = [], [], []
    for k, name in enumerate(sources):
        splits = parse(name, data_dir)
        records = splits.train + splits.query + splits.gallery
        if any(r.box or r.h5_ref for r in records):
            raise FolderUnavailable(f"{name} in {data_dir} is not a folder of image files, as the folder "
                                    "baseline needs (CUHK03 does as CUHK03-NP's folders, not as cuhk-03.mat)")
        labels = np.asarray(mix_labels([(r.dataset, r.split, r.pid) for r in records]))
        keep = np.flatnonzero(labels >= 0)
        num_classes.append(int(labels.max()) + 1)
        camids = np.asarray([records[i].camid for i in keep])
        rows = identity_batches(labels[keep], camids, num_ids=cfg.num_ids, num_instances=cfg.num_instances,
                                num_batches=cfg.iters, seed=0, epoch=0, source=k)
        per_source.append(len(items) + rows)
        items += [(records[i].path, int(labels[i])) for i in keep]
    order = np.concatenate(per_source, axis=1).reshape(-1).tolist()
    loader = DataLoader(_Files(items, cfg), batch_size=cfg.batch_size * len(sources), sampler=order,
                        num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                        pin_memory=cfg.device.type == "cuda")
    return loader, num_classes
