"""The plan of the synthetic datasets: which files exist, with which pid, camera and split.

Cheap (no pixels): :func:`plan` lays out every dataset's shots, one planner per dataset layout,
and :func:`expected_counts` is the ground truth the parsers (``pipeline.datasets``) must find.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NAMES = ("market1501", "dukemtmc", "msmt17v1", "cuhk03", "cuhk_sysu")


@dataclass(frozen=True)
class Scale:
    """How much to write: ``mult`` multiplies every identity count; sizes are (height, width)."""

    mult: int
    crop: tuple[int, int]
    scene: tuple[int, int]


# small: tests and `make demo` (a few seconds, a few MB); medium: ~10x the images, at the real
# Market crop size, for throughput measurements.
SCALES = {"small": Scale(1, (64, 32), (144, 256)), "medium": Scale(10, (128, 64), (288, 512))}


@dataclass(frozen=True)
class Shot:
    """One image the generator writes: ``name`` is its path inside the dataset folder (a scene
    for CUHK-SYSU, an image name for CUHK03); ``look`` indexes the dataset's identity looks."""

    split: str  # train | val (MSMT17, counts as train) | query | gallery
    pid: int
    cam: int
    look: int
    name: str
    box: tuple[int, int, int, int] | None = None  # CUHK-SYSU (x, y, w, h), before clipping


def plan(scale: str = "small", seed: int = 0) -> dict[str, list[Shot]]:
    """Every dataset's shots; keys are the dataset names plus ``cuhk03_labeled``."""
    m = SCALES[scale].mult
    rng = {n: np.random.default_rng([seed, i, 0]) for i, n in enumerate(NAMES)}
    shots = {
        "market1501": _plan_market(rng["market1501"], 32 * m, 24 * m),
        "dukemtmc": _plan_duke(rng["dukemtmc"], 30 * m, 24 * m),
        "msmt17v1": _plan_msmt(rng["msmt17v1"], 32 * m, 26 * m),
        "cuhk_sysu": _plan_sysu(rng["cuhk_sysu"], 36 * m, 40 * m, SCALES[scale].scene),
    }
    shots["cuhk03"], shots["cuhk03_labeled"] = _plan_cuhk03(rng["cuhk03"], cuhk03_pairs(scale), 24 * m)
    return shots


def cuhk03_pairs(scale: str) -> list[int]:
    """Persons per camera pair (the real file has 5 pairs of 843, 440, 77, 58, 49)."""
    return [n * SCALES[scale].mult for n in (12, 12, 10, 10, 10)]


def _identity(rng, ncams: int, test: bool) -> list[tuple[str, int]]:
    """(split, camera) of each image of one person: 6-10 images over 2-4 cameras. A test person
    gives one query image in each of two cameras; the gallery keeps the rest, so every query
    has a gallery match in another camera."""
    k = int(rng.integers(2, min(4, ncams) + 1))
    cams = rng.choice(ncams, k, replace=False)
    n = int(rng.integers(6, 11))
    splits = [("query" if i < 2 else "gallery") if test else "train" for i in range(n)]
    return [(split, int(cams[i % k])) for i, split in enumerate(splits)]


def _split_ids(rng, pool: int, n_train: int, n_test: int) -> tuple[list[int], list[int]]:
    """Disjoint, interleaved train and test pids drawn from 1..pool, as in Market and Duke."""
    pids = rng.choice(np.arange(1, pool + 1), n_train + n_test, replace=False)
    return sorted(int(p) for p in pids[:n_train]), sorted(int(p) for p in pids[n_train:])


def _plan_market(rng, n_train: int, n_test: int) -> list[Shot]:
    folder = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    train, test = _split_ids(rng, 1501, n_train, n_test)
    people = [(p, False) for p in train] + [(p, True) for p in test]
    shots, frame = [], 0

    def add(split, pid, cam, look):
        nonlocal frame
        frame += int(rng.integers(1, 150))
        tag = "-1" if pid < 0 else f"{pid:04d}"
        name = f"{tag}_c{cam + 1}s{rng.integers(1, 7)}_{frame:06d}_{rng.integers(0, 9):02d}.jpg"
        shots.append(Shot(split, pid, cam, look, f"{folder[split]}/{name}"))

    for look, (pid, is_test) in enumerate(people):
        for split, cam in _identity(rng, 6, is_test):
            add(split, pid, cam, look)
    extra = len(people)  # every distractor and junk image shows someone new
    for pid, n in ((0, len(test) // 3), (-1, len(test) // 4)):  # distractors stay in the gallery, junk goes
        for _ in range(n):
            add("gallery", pid, int(rng.integers(6)), extra)
            extra += 1
    return shots


def _plan_duke(rng, n_train: int, n_test: int) -> list[Shot]:
    folder = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    n_distractor = max(1, n_test // 4)  # people seen in the gallery only (Duke has 408 of them)
    train, test = _split_ids(rng, 7140, n_train, n_test + n_distractor)
    people = [(p, "train") for p in train] + [(p, "test") for p in test[:n_test]] + \
        [(p, "distractor") for p in test[n_test:]]
    shots, frame = [], 0
    for look, (pid, role) in enumerate(people):
        cams = [("gallery", int(rng.integers(8)))] * int(rng.integers(1, 4)) if role == "distractor" \
            else _identity(rng, 8, role == "test")
        for split, cam in cams:
            frame += int(rng.integers(1, 3000))
            name = f"{folder[split]}/{pid:04d}_c{cam + 1}_f{frame:07d}.jpg"
            shots.append(Shot(split, pid, cam, look, name))
    return shots


def _plan_msmt(rng, n_train: int, n_test: int) -> list[Shot]:
    """Train pids 0..n_train-1 and test pids 0..n_test-1 (different people); ~10% of the train
    images are listed in list_val.txt."""
    shots = []
    for side, n in (("train", n_train), ("test", n_test)):
        for pid in range(n):
            look = pid if side == "train" else n_train + pid
            date = f"{rng.integers(1, 5):02d}{rng.integers(10, 30):02d}"
            for i, (split, cam) in enumerate(_identity(rng, 15, side == "test")):
                if split == "train" and rng.random() < 0.1:
                    split = "val"
                tod = ("morning", "noon", "afternoon")[int(rng.integers(3))]
                frame = f"{rng.integers(1, 9999):04d}_{rng.integers(3)}"
                name = f"{pid:04d}_{i:03d}_{cam + 1:02d}_{date}{tod}_{frame}"
                shots.append(Shot(split, pid, cam, look, f"{side}/{pid:04d}/{name}.jpg"))
    return shots


def _plan_cuhk03(rng, pairs: list[int], n_test: int) -> tuple[list[Shot], list[Shot]]:
    """Detected and labeled shots of the new protocol. Each person has 10 cells (5 per view);
    a view may miss one image (an empty cell), independently for detected and labeled. Labels
    run 1..P over all pairs; a test person gives one query image per view."""
    people = [(pair, lp) for pair, n in enumerate(pairs, 1) for lp in range(1, n + 1)]
    test = set(int(i) for i in rng.choice(len(people), n_test, replace=False))
    out = []
    for _kind in ("detected", "labeled"):
        shots = []
        for label, (pair, lp) in enumerate(people, 1):
            for view in (1, 2):
                imgs = list(range(5 * view - 4, 5 * view + 1))
                if rng.random() < 0.25:
                    imgs.remove(int(rng.choice(imgs)))
                query = int(rng.choice(imgs))
                for img in imgs:
                    split = "train" if label - 1 not in test else "query" if img == query else "gallery"
                    name = f"{pair}_{lp:03d}_{view}_{img:02d}.png"
                    shots.append(Shot(split, label, view - 1, label - 1, name))
        out.append(shots)
    return out[0], out[1]


def _plan_sysu(rng, n_persons: int, n_scenes: int, size: tuple[int, int]) -> list[Shot]:
    """2-4 labelled persons per scene, side by side; the first scene's last box runs past the
    right edge (the parser clips it). Persons never drawn into a scene are not in Person.mat."""
    height, width = size
    pids = sorted(int(p) for p in rng.choice(np.arange(1, 11935), n_persons, replace=False))
    scenes = sorted(int(s) for s in rng.choice(np.arange(1, 18185), n_scenes, replace=False))
    shots = []
    for si, scene in enumerate(scenes):
        k = int(rng.integers(2, 5))
        slot = width // k
        for j, look in enumerate(rng.choice(n_persons, k, replace=False)):
            h = int(height * rng.uniform(0.4, 0.55))
            w = int(h * rng.uniform(0.38, 0.48))
            x = j * slot + int(rng.integers(0, max(1, slot - w)))
            if si == 0 and j == k - 1:
                x = width - w + 5
            y = int(rng.integers(height // 3, height - h))
            shots.append(Shot("train", pids[look], 0, int(look), f"Image/SSM/s{scene}.jpg", (x, y, w, h)))
    return shots


def expected_counts(scale: str = "small", seed: int = 0) -> dict[str, dict[str, tuple[int, int]]]:
    """Ground truth per dataset (and ``cuhk03_labeled``): ``{split: (images, ids)}`` for train,
    query, gallery and mix, as the parsers must find them (junk dropped; MSMT17 val in train;
    mix = all three splits with train and test ids apart, Market distractors left out)."""
    out = {}
    for name, shots in plan(scale, seed).items():
        kept = [s for s in shots if s.pid != -1]
        counts = {}
        for split in ("train", "query", "gallery"):
            sel = [s for s in kept if (s.split == "val" and split == "train") or s.split == split]
            counts[split] = (len(sel), len({s.pid for s in sel}))
        distractor = name == "market1501"  # its pid 0
        mix = [(s.split in ("train", "val"), s.pid) for s in kept if not (distractor and s.pid == 0)]
        counts["mix"] = (len(mix), len(set(mix)))
        out[name] = counts
    return out
