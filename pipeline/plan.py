"""The training plan: which rows each rank reads in each iteration, and what the loaders' worker
processes need to read an iteration's bytes, and nothing more.

The identity sampler's plan (:class:`TrainPlan`, with the iteration's random augmentation
parameters from ``pipeline.augment``), the rows of the mix and evaluation sets, the header check
and the PIL decode. This module imports no torch, torchvision or DALI: DALI's spawned workers
unpickle its objects, and every module a worker imports costs memory in each of them (torch
alone about 300 MB); ``pipeline.loader`` re-exports these names.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

from pipeline.augment import augment_params
from pipeline.records import SPLITS, mix_labels
from pipeline.sampler import identity_batches, rank_slice
from pipeline.shards import ShardError, SplitReader, load_manifest

if TYPE_CHECKING:
    from pipeline.batches import LoaderConfig

class Rows:
    """Random access to chosen rows of several splits of one dataset; picklable (workers read it)."""

    def __init__(self, readers: list[SplitReader], part: np.ndarray, row: np.ndarray):
        self.readers, self.part, self.row = readers, part, row

    def __len__(self) -> int:
        return len(self.row)

    def read(self, j: int) -> bytes:
        return self.readers[self.part[j]].read(int(self.row[j]))

    def location(self, j: int) -> str:
        return self.readers[self.part[j]].location(int(self.row[j]))

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        """The rows of ``parts`` one after another."""
        readers, part = [], []
        for p in parts:
            part.append(p.part + len(readers))
            readers += p.readers
        return Rows(readers, np.concatenate(part), np.concatenate([p.row for p in parts]))


def split_rows(dataset_dir: Path, splits: tuple[str, ...]) -> tuple[Rows, np.ndarray, np.ndarray, np.ndarray]:
    """All rows of ``splits`` (those the dataset has) in order: rows, pids, camids, split index."""
    manifest = load_manifest(Path(dataset_dir))  # lists every missing shard
    readers = [SplitReader(Path(dataset_dir), s) for s in splits if s in manifest["splits"]]
    if not readers:
        raise ShardError(f"{dataset_dir}: none of the splits {', '.join(splits)} in its manifest")
    part = np.concatenate([np.full(len(r), k, dtype=np.int64) for k, r in enumerate(readers)])
    row = np.concatenate([np.arange(len(r), dtype=np.int64) for r in readers])
    pids = np.concatenate([r.pids for r in readers])
    camids = np.concatenate([r.camids for r in readers])
    which = np.asarray([SPLITS.index(readers[k].split) for k in part], dtype=np.int64)
    return Rows(readers, part, row), pids, camids, which


class SourceSet(Rows):
    """One dataset's mix training set (train + query + gallery, relabelled, distractors dropped)."""

    def __init__(self, dataset_dir: Path):
        rows, pids, camids, which = split_rows(Path(dataset_dir), SPLITS)
        self.name = load_manifest(Path(dataset_dir))["dataset"]
        labels = np.asarray(mix_labels([(self.name, SPLITS[w], int(p)) for w, p in zip(which, pids)]),
                            dtype=np.int64)
        keep = labels >= 0
        super().__init__(rows.readers, rows.part[keep], rows.row[keep])
        self.labels, self.camids, self.pids = labels[keep], camids[keep], pids[keep]
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self._by_label = np.argsort(self.labels, kind="stable")
        self._label_start = np.searchsorted(self.labels[self._by_label], np.arange(self.num_classes + 1))

    def same_identity(self, j: int) -> np.ndarray:
        """Rows of j's identity, starting at j and going round: the order replacements are tried in."""
        lab = self.labels[j]
        members = self._by_label[self._label_start[lab]:self._label_start[lab + 1]]
        return np.roll(members, -int(np.flatnonzero(members == j)[0]))


def check_header(data: bytes) -> bytes:
    """Cheap check (header parse, no decode) that catches bytes that are not an image at all."""
    Image.open(io.BytesIO(data))
    return data


def decode_rgb(data: bytes) -> Image.Image:
    """Full PIL decode; raises on truncated or garbled data."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class TrainPlan:
    """Which rows this rank reads in each iteration, and how they are fetched. Picklable."""

    def __init__(self, sets: list[SourceSet], cfg: LoaderConfig):
        self.sets = sets
        self.num_ids, self.num_instances, self.iters = cfg.num_ids, cfg.num_instances, cfg.iters
        self.seed, self.rank, self.world = cfg.seed, cfg.rank, cfg.world
        self.pad = cfg.crop_pad
        self.replace_bad = cfg.replace_bad
        self.bad: set[tuple[int, int]] = set()  # (source, row) found undecodable
        self._cache: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        rank_slice(np.zeros(cfg.batch_size), cfg.rank, cfg.world)  # refuse a batch that does not split
        self.sizes = [cfg.batch_size // cfg.world] * len(sets)

    def indices(self, epoch: int) -> list[np.ndarray]:
        """Per source, this rank's rows for every iteration of ``epoch``: [iters, batch / world]."""
        return self._epoch(epoch)[0]

    def batch_labels(self, epoch: int, it: int) -> list[np.ndarray]:
        """Per source, the labels of the GLOBAL batch of an iteration in sampler order: the
        training step plans the shuffle and the memory updates with them on the host."""
        return [labels[it] for labels in self._epoch(epoch)[1]]

    def _epoch(self, epoch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """This rank's rows and the global batches' labels, per source, of one epoch."""
        if epoch not in self._cache:
            batches = [identity_batches(
                s.labels, s.camids, num_ids=self.num_ids, num_instances=self.num_instances,
                num_batches=self.iters, seed=self.seed, epoch=epoch, source=k, name=s.name)
                for k, s in enumerate(self.sets)]
            mine = [np.stack([rank_slice(b, self.rank, self.world) for b in g]) for g in batches]
            self._cache = {epoch: (mine, [s.labels[g] for s, g in zip(self.sets, batches)])}
        return self._cache[epoch]

    def fetch(self, s: int, j: int, decode: Callable[[bytes], object]) -> tuple[object, bool]:
        """``decode`` of row j of source s, or (replace_bad) of the next good row of its identity."""
        src = self.sets[s]
        for k in src.same_identity(j):
            if (s, int(k)) in self.bad:
                continue
            data = src.read(int(k))  # a shard that cannot be read stops the run (ShardError)
            try:
                return decode(data), int(k) != j
            except Exception as err:
                if not self.replace_bad:
                    raise ShardError(f"{src.location(int(k))}: cannot decode the image ({err})") from err
                self.bad.add((s, int(k)))
        raise ShardError(f"{src.name}: no decodable image left for label {src.labels[j]}")

    def iteration(self, epoch: int, it: int,
                  decode: Callable[[bytes], object]) -> tuple[list, np.ndarray, np.ndarray]:
        """Decoded items, labels and replaced flags of one iteration's rows (sources in order)."""
        items, labels, replaced = [], [], []
        for s, rows in enumerate(self.indices(epoch)):
            for j in rows[it]:
                item, swapped = self.fetch(s, int(j), decode)
                items.append(item)
                replaced.append(swapped)
            labels.append(self.sets[s].labels[rows[it]])
        return items, np.concatenate(labels), np.asarray(replaced, dtype=np.int64)

    def augmentation(self, epoch: int, it: int) -> tuple[np.ndarray, np.ndarray]:
        """Mirror flags and crop shifts of this rank's images of one iteration: its rows of the
        global batch's draws (each source's slice, as :func:`rank_slice` takes them)."""
        n = self.num_ids * self.num_instances
        rows = np.concatenate([s * n + rank_slice(np.arange(n), self.rank, self.world)
                               for s in range(len(self.sets))])
        return tuple(a[rows] for a in augment_params(self.seed, epoch, it, n * len(self.sets), self.pad))

    def find_bad(self, epoch: int, iterations: range) -> list[tuple[int, int]]:
        """Rows that fail a full decode in these iterations (maps a decoder error back to samples)."""
        found = []
        for g in iterations:  # past the epoch's end: the next epoch's first iterations
            e, it = epoch + g // self.iters, g % self.iters
            for s, rows in enumerate(self.indices(e)):
                for j in rows[it]:
                    data = self.sets[s].read(int(j))  # a shard that cannot be read: ShardError
                    try:
                        decode_rgb(data)
                    except Exception:
                        if (s, int(j)) not in self.bad:
                            found.append((s, int(j)))
        return found


class FileRows:
    """Image files as rows (``tools/extract.py --images``): the loaders read them as they read
    shard members, and a problem names the file."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, j: int) -> bytes:
        try:
            return Path(self.paths[j]).read_bytes()
        except OSError as e:
            raise ShardError(f"{self.location(j)}: cannot read it ({e.strerror or e})") from None

    def location(self, j: int) -> str:
        return f"image {self.paths[j]}"


class EvalRows:
    """Rows of an evaluation pass in order, and this rank's contiguous part of them: a target's
    query + gallery ("test"), one split ("query", "gallery" or "train"), or the mix sets of one
    or several sources one after another ("mix"; ``source`` gives each row's source), so that
    one pass, with one pool of workers, gives the features every memory starts from."""

    def __init__(self, shards_dir: Path, dataset: str | list[str], what: str, cfg: LoaderConfig):
        if what == "test" or what in SPLITS:
            splits = ("query", "gallery") if what == "test" else (what,)
            rows, pids, camids, which = split_rows(Path(shards_dir) / dataset, splits)
            self.rows, self.pids, self.camids = rows, pids, camids
            self.is_query = which == SPLITS.index("query")
            self.labels = self.source = None
        elif what == "mix":
            names = [dataset] if isinstance(dataset, str) else dataset
            sets = [SourceSet(Path(shards_dir) / name) for name in names]
            self.rows = Rows.concat(sets)
            self.pids, self.camids, self.labels = (np.concatenate([getattr(s, k) for s in sets])
                                                   for k in ("pids", "camids", "labels"))
            self.source = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
            self.is_query = np.zeros(len(self.rows), dtype=bool)
        else:
            raise ValueError(f"what={what!r}: expected 'test' (query + gallery), a split or 'mix'")
        self._place(cfg)

    @classmethod
    def of_files(cls, paths: list[str], cfg: LoaderConfig) -> "EvalRows":
        """Image files in order, without identities (pids and camids -1)."""
        self = cls.__new__(cls)
        self.rows = FileRows(paths)
        self.pids = self.camids = np.full(len(paths), -1, dtype=np.int64)
        self.is_query = np.zeros(len(paths), dtype=bool)
        self.labels = self.source = None
        self._place(cfg)
        return self

    def _place(self, cfg: LoaderConfig) -> None:
        """This rank's contiguous part and the batch size."""
        n = len(self.rows)
        self.start, self.stop = n * cfg.rank // cfg.world, n * (cfg.rank + 1) // cfg.world
        self.batch = cfg.test_batch_size

    def __len__(self) -> int:
        return len(self.rows)

    def num_batches(self) -> int:
        return -(-(self.stop - self.start) // self.batch)

    def batch_rows(self, b: int) -> np.ndarray:
        return np.arange(self.start + b * self.batch, min(self.stop, self.start + (b + 1) * self.batch))
