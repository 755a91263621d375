"""Write a synthetic copy of the five raw re-ID datasets (docs/design.md), so the whole system
runs end to end with no download.

Every layout is the real one: Market-1501 / DukeMTMC-reID folders and file names (with junk
``-1`` and distractor ``0000`` files and a stray ``Thumbs.db``), MSMT17_V1 list files, CUHK03's
``cuhk-03.mat`` as MATLAB v7.3 (HDF5 with object references, arrays stored transposed, empty
cells) plus its new-protocol configs, and CUHK-SYSU scenes with ``Person.mat``.

The pictures form a small but real domain-generalisation problem: each identity has its own
clothes (head/torso/legs colours, stripes or checks, bag, skirt), each camera shifts brightness,
tint and viewpoint, and each dataset has its own colour cast, contrast, blur, noise and
background, so a model trained on three datasets meets a new style on the fourth.

``expected_counts(scale, seed)`` returns the ground truth the generator lays down, for tests.
The output is byte-identical for the same ``--scale`` and ``--seed``.
"""
from __future__ import annotations

import argparse
import colorsys
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import scipy.io  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402
from tqdm import tqdm  # noqa: E402

MARKER = "SYNTHETIC.json"  # marks a folder as our output, so a rerun may replace it
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


# ----------------------------------------------------------------------------------------------
# The plan: which files exist, with which pid / camera / split. Cheap: no pixels.


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
    shots["cuhk03"], shots["cuhk03_labeled"] = _plan_cuhk03(rng["cuhk03"], _cuhk03_pairs(scale), 24 * m)
    return shots


def _cuhk03_pairs(scale: str) -> list[int]:
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


# ----------------------------------------------------------------------------------------------
# The pictures.


@dataclass(frozen=True)
class Style:
    """A dataset's look: colour cast, contrast, blur radius, noise level, background."""

    cast: tuple[float, float, float]
    contrast: float
    blur: float
    noise: float
    background: str
    base: tuple[int, int, int]


STYLES = {
    "market1501": Style((1.06, 1.0, 0.9), 1.0, 0.0, 4.0, "pavement", (150, 145, 130)),
    "dukemtmc": Style((0.9, 1.02, 1.08), 0.85, 0.7, 3.0, "foliage", (100, 125, 100)),
    "msmt17v1": Style((1.0, 0.94, 1.12), 1.3, 0.0, 9.0, "tiles", (170, 160, 175)),
    "cuhk03": Style((0.95, 0.97, 0.95), 0.7, 1.1, 2.0, "plain", (80, 80, 90)),
    "cuhk_sysu": Style((1.1, 1.03, 0.94), 1.1, 0.4, 5.0, "street", (140, 150, 160)),
}


def _colour(rng, sat=(0.3, 1.0), val=(0.2, 1.0)) -> np.ndarray:
    return 255 * np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val)), np.float32)


def _make_look(rng) -> dict:
    """One identity's clothes and build."""
    return {
        "skin": _colour(rng, (0.2, 0.6), (0.35, 0.95)) * np.float32(0.3) + np.float32([150, 110, 90]) * 0.7,
        "hair": _colour(rng, (0.0, 0.6), (0.05, 0.5)),
        "torso": _colour(rng), "legs": _colour(rng), "shoes": _colour(rng, (0, 0.5), (0.05, 0.6)),
        "pattern": int(rng.integers(5)), "pat_colour": _colour(rng), "freq": float(rng.uniform(8, 20)),
        "sleeves": bool(rng.random() < 0.6), "skirt": bool(rng.random() < 0.2),
        "long_hair": bool(rng.random() < 0.3), "bag": int(rng.integers(-1, 2)), "bag_colour": _colour(rng),
        "width": float(rng.uniform(0.85, 1.2)),
    }


def _make_camera(rng) -> dict:
    """A camera's brightness, tint, background shift and viewpoint (offset, zoom, mirror)."""
    return {"gain": float(rng.uniform(0.8, 1.2)), "tint": rng.uniform(0.9, 1.1, 3).astype(np.float32),
            "bg": rng.uniform(0.8, 1.2, 3).astype(np.float32), "dx": float(rng.uniform(-0.04, 0.04)),
            "zoom": float(rng.uniform(0.88, 1.0)), "flip": bool(rng.random() < 0.5)}


def _draw_person(look: dict, h: int, w: int, dx: float, top: float, zoom: float, flip: bool):
    """The person's colours and mask on an h x w grid; body coordinates in units of its height."""
    y = ((np.arange(h, dtype=np.float32)[:, None] + 0.5) / h - top) / zoom
    x = (((np.arange(w, dtype=np.float32)[None, :] + 0.5) - w / 2) / h - dx) / zoom
    if flip:
        x = -x
    ax, wf = np.abs(x), look["width"]
    img = np.zeros((h, w, 3), np.float32)
    mask = np.zeros((h, w), bool)

    def paint(region, colour):
        img[region] = colour
        mask[region] = True

    def band(y0, y1):
        return (y >= y0) & (y < y1)

    if look["skirt"]:
        paint(band(0.72, 0.93) & (ax > 0.015) & (ax < 0.05 * wf), look["skin"])
        paint(band(0.53, 0.72) & (ax < 0.08 * wf + (y - 0.53) * 0.25), look["legs"])
    else:
        paint(band(0.53, 0.93) & (ax > 0.012) & (ax < 0.07 * wf), look["legs"])
    paint(band(0.93, 0.985) & (ax > 0.008) & (ax < 0.075 * wf), look["shoes"])
    arms = band(0.2, 0.52) & (ax >= 0.088 * wf) & (ax < 0.118 * wf)
    paint(arms, look["skin"])
    paint(arms & (y < (0.5 if look["sleeves"] else 0.3)), look["torso"])
    torso = band(0.19, 0.55) & (ax < 0.088 * wf)
    paint(torso, look["torso"])
    stripes = {1: np.floor(y * look["freq"]) % 2 == 1, 2: np.floor(x * look["freq"] * 2) % 2 == 1,
               3: (np.floor(y * look["freq"]) + np.floor(x * look["freq"] * 2)) % 2 == 1,
               4: band(0.28, 0.4) & (ax < 0.035)}.get(look["pattern"])
    if stripes is not None:
        paint(torso & stripes, look["pat_colour"])
    head = ((y - 0.11) / 0.075) ** 2 + (x / 0.047) ** 2 < 1
    paint(head, look["skin"])
    paint(head & (y < 0.085), look["hair"])
    if look["long_hair"]:
        paint(band(0.08, 0.26) & (ax > 0.03) & (ax < 0.06), look["hair"])
    if look["bag"]:
        side = x * look["bag"]
        paint(band(0.33, 0.55) & (side > 0.1 * wf) & (side < 0.16 * wf), look["bag_colour"])
    img *= np.clip(1.1 - 0.4 * (x / (0.12 * wf)) ** 2, 0.6, 1.1)[..., None]  # round body shading
    return img, mask


def _background(style: Style, cam: dict, h: int, w: int, rng) -> np.ndarray:
    base = np.float32(style.base) * cam["bg"]
    y = np.arange(h, dtype=np.float32)[:, None, None] / h
    x = np.arange(w, dtype=np.float32)[None, :, None] / w
    phase = rng.uniform(0, 2 * np.pi, 2).astype(np.float32)
    if style.background == "pavement":  # light above, paving lines below
        tex = 0.8 + 0.3 * y - 0.15 * ((np.floor(y * 9 + phase[0]) % 2) * (y > 0.6))
    elif style.background == "foliage":  # green blobs
        tex = 0.9 + 0.15 * np.sin(x * 11 + phase[0]) * np.sin(y * 7 + phase[1])
    elif style.background == "tiles":  # checkered floor and walls
        tex = 0.85 + 0.2 * ((np.floor(x * 4 + phase[0]) + np.floor(y * 8)) % 2)
    elif style.background == "street":  # sky, buildings, road
        blocks = 0.7 + 0.25 * np.sin(np.floor(x * 7 + phase[0]) * 2.3) ** 2
        tex = np.where(y < 0.25, 1.25, np.where(y < 0.6, blocks, 0.75 + 0.1 * y))
    else:  # plain, darker towards the floor
        tex = 1.0 - 0.3 * y
    return np.broadcast_to(base * tex, (h, w, 3)).astype(np.float32)


def _finish(img: np.ndarray, style: Style, gain: float, tint: np.ndarray, rng) -> np.ndarray:
    """Camera gain/tint and dataset cast/contrast, then blur and sensor noise; uint8 out."""
    img = ((img - 128) * style.contrast + 128) * (gain * tint * np.float32(style.cast))
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if style.blur:
        out = out.filter(ImageFilter.GaussianBlur(style.blur))
    noisy = np.asarray(out, np.float32) + rng.normal(0, style.noise, img.shape).astype(np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _photo(look: dict, cam: dict, style: Style, h: int, w: int, rng, mode: str = "normal") -> np.ndarray:
    """A person crop: tight (normal), loose (detected), badly framed (distractor) or a fragment
    (junk)."""
    jitter = {"normal": 0.01, "detected": 0.04, "distractor": 0.08, "junk": 0.15}[mode]
    dx = cam["dx"] + rng.normal(0, jitter)
    top = 0.02 + rng.normal(0, jitter)
    zoom = cam["zoom"] * (1 + rng.normal(0, jitter))
    if mode == "junk":
        top, zoom = -rng.uniform(0.3, 0.8), 2.0
    person, mask = _draw_person(look, h, w, dx, top, zoom, cam["flip"])
    img = np.where(mask[..., None], person, _background(style, cam, h, w, rng))
    return _finish(img, style, cam["gain"], cam["tint"], rng)


def _size(rng, crop: tuple[int, int], spread: float) -> tuple[int, int]:
    """Crop size: fixed when spread is 0 (Market), else varying like Duke/MSMT17/CUHK03 boxes."""
    if not spread:
        return crop
    h = int(crop[0] * rng.uniform(1 - spread / 2, 1 + spread))
    return h, max(8, int(h * rng.uniform(0.36, 0.5)))


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Writers


def _write_crops(root: Path, name: str, shots: list[Shot], cfg: Scale, rng, bar, spread: float) -> None:
    """Market, Duke, MSMT17: one JPEG per shot."""
    style = STYLES[name]
    looks = {}
    cams = [_make_camera(rng) for _ in range(15)]
    for s in shots:
        if s.look not in looks:
            looks[s.look] = _make_look(rng)
        mode = "junk" if s.pid < 0 else "distractor" if name == "market1501" and s.pid == 0 else "normal"
        h, w = _size(rng, cfg.crop, spread)
        path = root / s.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(_photo(looks[s.look], cams[s.cam], style, h, w, rng, mode)))
        bar.update()


def _write_market(data: Path, shots, cfg, rng, bar) -> None:
    root = data / "market1501" / "Market-1501-v15.09.15"
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (root / sub).mkdir(parents=True)
    _write_crops(root, "market1501", shots, cfg, rng, bar, 0.0)
    (root / "bounding_box_train" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0not an image")


def _write_duke(data: Path, shots, cfg, rng, bar) -> None:
    _write_crops(data / "dukemtmc" / "DukeMTMC-reID", "dukemtmc", shots, cfg, rng, bar, 0.3)


def _write_msmt(data: Path, shots, cfg, rng, bar) -> None:
    root = data / "msmt17v1" / "MSMT17_V1"
    _write_crops(root, "msmt17v1", shots, cfg, rng, bar, 0.4)
    for split in ("train", "val", "query", "gallery"):
        lines = [f"{s.name.split('/', 1)[1]} {s.pid}\n" for s in shots if s.split == split]
        (root / f"list_{split}.txt").write_text("".join(lines))


def _write_cuhk03(data: Path, detected: list[Shot], labeled: list[Shot], pairs: list[int], cfg: Scale,
                  rng, bar) -> None:
    """cuhk-03.mat as MATLAB v7.3 writes it, and the two new-protocol configs (MATLAB v5)."""
    root = data / "cuhk03"
    (root / "cuhk03_release").mkdir(parents=True)
    style = STYLES["cuhk03"]
    looks = [_make_look(rng) for _ in range(sum(pairs))]
    cams = [_make_camera(rng) for _ in range(2 * len(pairs))]
    mat = root / "cuhk03_release" / "cuhk-03.mat"
    with h5py.File(mat, "w", userblock_size=512, libver="earliest") as f:
        refs = f.create_group("#refs#")
        counter = iter(range(10 ** 9))
        for kind, shots in (("detected", detected), ("labeled", labeled)):
            present = {s.name[:-4]: s for s in shots}
            pair_refs = []
            for pair, n in enumerate(pairs, 1):
                cells = np.empty((n, 10), dtype=h5py.ref_dtype)
                for lp in range(1, n + 1):
                    for img in range(1, 11):
                        shot = present.get(f"{pair}_{lp:03d}_{(img - 1) // 5 + 1}_{img:02d}")
                        if shot is None:  # how MATLAB stores an empty cell
                            ds = refs.create_dataset(_ref_name(next(counter)), data=np.zeros(2, np.uint64),
                                                     track_times=False)
                            ds.attrs["MATLAB_class"] = np.bytes_("double")
                            ds.attrs["MATLAB_empty"] = np.uint8(1)
                        else:
                            h, w = _size(rng, cfg.crop, 0.4)
                            arr = _photo(looks[shot.look], cams[2 * (pair - 1) + shot.cam], style, h, w, rng,
                                         "detected" if kind == "detected" else "normal")
                            ds = refs.create_dataset(_ref_name(next(counter)), data=arr.T, track_times=False)
                            ds.attrs["MATLAB_class"] = np.bytes_("uint8")
                            bar.update()
                        cells[lp - 1, img - 1] = ds.ref
                ds = refs.create_dataset(_ref_name(next(counter)), data=cells.T, track_times=False)
                ds.attrs["MATLAB_class"] = np.bytes_("cell")
                pair_refs.append(ds.ref)
            ds = f.create_dataset(kind, data=np.array([pair_refs], dtype=h5py.ref_dtype), track_times=False)
            ds.attrs["MATLAB_class"] = np.bytes_("cell")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 1970 " \
        b"HDF5 schema 1.00 ."
    with open(mat, "r+b") as fh:
        fh.write(header.ljust(116) + bytes(8) + b"\x00\x02IM" + bytes(512 - 128))
    for kind, shots in (("detected", detected), ("labeled", labeled)):
        index = {split: [i + 1 for i, s in enumerate(shots) if s.split == split]
                 for split in ("train", "query", "gallery")}
        _savemat(root / f"cuhk03_new_protocol_config_{kind}.mat", {
            "filelist": _cell([s.name for s in shots]),
            "labels": np.array([[s.pid] for s in shots], np.float64),
            "camId": np.array([[s.cam + 1] for s in shots], np.float64),
            **{f"{split}_idx": np.array(idx, np.float64)[:, None] for split, idx in index.items()},
        })


def _ref_name(i: int) -> str:
    """MATLAB's names for referenced objects: a, b, ..., z, ba, bb, ..."""
    name = ""
    while True:
        name = chr(ord("a") + i % 26) + name
        i //= 26
        if not i:
            return name


def _write_sysu(data: Path, shots: list[Shot], cfg: Scale, rng, bar) -> None:
    """Scenes with the labelled persons pasted at their boxes, Person.mat, Train.mat, TestG50.mat."""
    root = data / "cuhk_sysu" / "CUHK-SYSU"
    (root / "Image" / "SSM").mkdir(parents=True)
    (root / "annotation" / "test" / "train_test").mkdir(parents=True)
    style = STYLES["cuhk_sysu"]
    looks = [_make_look(rng) for _ in range(max(s.look for s in shots) + 1)]
    height, width = cfg.scene
    for scene in sorted({s.name for s in shots}, key=lambda n: int(n[11:-4])):
        cam = _make_camera(rng)
        img = _background(style, cam, height, width, rng)
        for s in (s for s in shots if s.name == scene):
            x, y, w, h = s.box
            flip = bool(rng.random() < 0.5)
            person, mask = _draw_person(looks[s.look], h, w, rng.normal(0, 0.01), 0.02, 0.96, flip)
            cw = min(w, width - x)
            region = img[y:y + h, x:x + cw]
            region[mask[:, :cw]] = person[:, :cw][mask[:, :cw]]
        (root / scene).write_bytes(_jpeg(_finish(img, style, cam["gain"], cam["tint"], rng)))
        bar.update()
    people = {}
    for s in shots:
        people.setdefault(s.pid, []).append(s)
    person = np.zeros((1, len(people)), dtype=[("idname", object), ("nAppear", object), ("scene", object)])
    for i, (pid, seen) in enumerate(sorted(people.items())):
        scene = np.zeros((1, len(seen)), dtype=[("imname", object), ("idlocate", object), ("ishard", object)])
        for j, s in enumerate(seen):
            hard = np.array([[float(j == 1)]])
            scene[0, j] = (s.name.rsplit("/", 1)[1], np.array([s.box], np.float64), hard)
        person[0, i] = (f"p{pid}", np.array([[float(len(seen))]]), scene)
    _savemat(root / "annotation" / "Person.mat", {"Person": person})
    train = np.empty((len(people), 1), dtype=object)
    for i in range(len(people)):
        train[i, 0] = person[:, i:i + 1]
    _savemat(root / "annotation" / "test" / "train_test" / "Train.mat", {"Train": train})
    # The real TestG50.mat describes the search test set, which a source-only dataset never uses.
    query = np.zeros((1, 1), dtype=[("imname", object), ("idlocate", object), ("idname", object)])
    query[0, 0] = (shots[0].name.rsplit("/", 1)[1], np.array([shots[0].box], np.float64), f"p{shots[0].pid}")
    test = np.zeros((1, 1), dtype=[("Query", object), ("Gallery", object)])
    test[0, 0] = (query, np.zeros((1, 0)))
    _savemat(root / "annotation" / "test" / "train_test" / "TestG50.mat", {"TestG50": test})


def _cell(strings: list[str]) -> np.ndarray:
    out = np.empty((len(strings), 1), dtype=object)
    out[:, 0] = strings
    return out


def _savemat(path: Path, variables: dict) -> None:
    """scipy's MATLAB v5 writer with a fixed header text (it stamps the time), so the bytes repeat."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, format="5", oned_as="column")
    data = bytearray(buf.getvalue())
    data[:116] = b"MATLAB 5.0 MAT-file, Platform: posix, Created on: Thu Jan  1 00:00:00 1970".ljust(116)
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------


def generate(out: Path, scale: str = "small", seed: int = 0, progress: bool = True) -> None:
    """Write all five layouts under ``out`` (see the module docstring)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, expected a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ValueError(f"--out {out} is not empty and holds no {MARKER} of an earlier synthetic "
                             "output: refusing to write there (give an empty or new folder)")
        for name in NAMES:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg, shots = SCALES[scale], plan(scale, seed)
    scenes = len({s.name for s in shots["cuhk_sysu"]})
    total = sum(len(s) for n, s in shots.items() if n != "cuhk_sysu") + scenes
    rng = {n: np.random.default_rng([seed, i, 1]) for i, n in enumerate(NAMES)}
    with tqdm(total=total, desc="synthetic data", unit="img", disable=not progress) as bar:
        _write_market(out, shots["market1501"], cfg, rng["market1501"], bar)
        _write_duke(out, shots["dukemtmc"], cfg, rng["dukemtmc"], bar)
        _write_msmt(out, shots["msmt17v1"], cfg, rng["msmt17v1"], bar)
        _write_cuhk03(out, shots["cuhk03"], shots["cuhk03_labeled"], _cuhk03_pairs(scale), cfg, rng["cuhk03"],
                      bar)
        _write_sysu(out, shots["cuhk_sysu"], cfg, rng["cuhk_sysu"], bar)
    (out / MARKER).write_text(json.dumps({"generator": "tools/make_synthetic.py", "scale": scale,
                                          "seed": seed}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="folder to write DATA/<name>/<folder> into; must be new, empty, or an earlier "
                        "output of this tool (which is replaced)")
    p.add_argument("--scale", choices=sorted(SCALES), default="small",
                   help="small: ~2.5k images, a few MB, seconds (tests, make demo); medium: ~10x the "
                        "images at 128x64, for throughput measurements (default: small)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; the same seed writes the same bytes (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    try:
        generate(args.out, args.scale, args.seed, progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = expected_counts(args.scale, args.seed)
    for name in NAMES:
        print(f"{name:11s} " + "  ".join(f"{k} {v[0]}/{v[1]}" for k, v in counts[name].items()))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
