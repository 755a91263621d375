"""What a parsed dataset is: image records, the three splits, and the "mix" training set.

Every raw-dataset parser (``pipeline.datasets``) returns a :class:`DatasetSplits`; the shard
writer (``pipeline.shards``) stores each :class:`Record` as ``<key>.jpg`` or ``<key>.png``
(the format of its image) + ``<key>.json``; the loaders rebuild the mix training set from the
shards with :func:`mix_labels`, so the relabelling rule lives in one place.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

DATASETS = ("market1501", "dukemtmc", "cuhk03", "msmt17v1", "cuhk_sysu")
SPLITS = ("train", "query", "gallery")
SOURCE_ONLY = ("cuhk_sysu",)  # has a train split only; never an evaluation target
# A custom set's name (tools/make_shards.py --custom NAME=DIR): also its folder in the shards folder.
CUSTOM_NAME = re.compile(r"[a-z0-9_]+")
# The file that marks a folder of synthetic raw data (tools/make_synthetic.py writes it): its small
# look-alikes have other counts than the real datasets, so a shard build does not compare them.
MARKER = "SYNTHETIC.json"
# A sample key's longest: a ustar member name holds 100 bytes, "<key>.json" among them.
KEY_BYTES = 95
_KEY_BREAKERS = re.compile(r"[\s./]")  # the extension starts at a dot; the index splits at spaces


def sample_key(split: str, stem: str) -> str:
    """The sample key of the image ``stem`` (its file name without the extension) of ``split``:
    ``f"{split}_{stem}"`` when that can be a key, else a derived one, so that any file name works:
    characters other than ASCII letters, digits, "_" and "-" become "_", the result is cut to fit
    KEY_BYTES, and a hash of the whole name keeps keys unique. The JSON record keeps the file name."""
    key = f"{split}_{stem}"
    if not _KEY_BREAKERS.search(key) and len(key.encode()) <= KEY_BYTES:
        return key
    digest = hashlib.sha1(stem.encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', key)[:KEY_BYTES - len(digest) - 1]}-{digest}"


@dataclass(frozen=True)
class Record:
    """One person image.

    ``path`` is the file that holds the pixels: a JPEG or PNG whose bytes are copied as they
    are, or, when ``box`` is set, a scene image to crop (x, y, w, h) and encode once (JPEG), or,
    when ``h5_ref`` is set, the CUHK03 ``cuhk-03.mat`` with the HDF5 path of the image array
    (encoded once, losslessly, as PNG).
    """

    key: str  # unique within the dataset, no dots: the WebDataset sample key
    pid: int  # original person id (MSMT17 test ids restart at 0, as in its lists)
    camid: int  # 0-based camera index
    dataset: str
    split: str  # train | query | gallery
    file: str  # original path relative to the dataset folder, for the user's reference
    path: str  # absolute path of the file that holds the pixels
    box: tuple[int, int, int, int] | None = None
    h5_ref: str | None = None


@dataclass
class DatasetSplits:
    """A parsed dataset: its name and the records of each split (empty lists for absent splits)."""

    name: str
    train: list[Record] = field(default_factory=list)
    query: list[Record] = field(default_factory=list)
    gallery: list[Record] = field(default_factory=list)

    def split(self, name: str) -> list[Record]:
        return getattr(self, name)



def mix_labels(entries: list[tuple[str, str, int]]) -> list[int]:
    """Relabel the "mix" training set of one source: train + query + gallery together.

    ``entries`` are ``(dataset, split, pid)`` per image. Returns, per image, a label in
    ``0..num_ids-1`` or ``-1`` for an image that is left out (distractors, pid 0, of Market-1501
    and of custom sets, and junk, pid -1). Train ids and test (query/gallery) ids are kept apart, so MSMT17's
    test ids, which restart at 0, land past its train ids. Labels follow first appearance
    in the order train, query, gallery, so they do not depend on the order of ``entries``.
    """
    order = {"train": 0, "query": 1, "gallery": 2}
    keys: dict[tuple[bool, int], int] = {}
    ranked = sorted(range(len(entries)), key=lambda i: (order[entries[i][1]], entries[i][2]))
    for i in ranked:
        dataset, split, pid = entries[i]
        if _dropped_from_mix(dataset, pid):
            continue
        keys.setdefault((split == "train", pid), len(keys))
    return [
        -1 if _dropped_from_mix(d, p) else keys[(s == "train", p)]
        for d, s, p in entries
    ]


def _dropped_from_mix(dataset: str, pid: int) -> bool:
    # pid 0: the distractors of Market-1501 and of custom sets (any name but the built-in ones:
    # tools/make_shards.py --custom reads Market's layout only)
    return pid < 0 or (pid == 0 and (dataset == "market1501" or dataset not in DATASETS))
