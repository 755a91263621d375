"""One writer per raw dataset layout, and :func:`generate`, which runs them all.

Every layout is the real one: Market-1501 / DukeMTMC-reID folders and file names (with junk
``-1`` and distractor ``0000`` files and a stray ``Thumbs.db``), MSMT17_V1 list files, CUHK03's
``cuhk-03.mat`` as MATLAB v7.3 (HDF5 with object references, arrays stored transposed, empty
cells) plus its new-protocol configs, and CUHK-SYSU scenes with ``Person.mat``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from pipeline.records import MARKER
from tools.synthetic.drawing import (STYLES, background, crop_size, draw_person, finish, jpeg, make_camera,
                                     make_look, photo)
from tools.synthetic.matlab import cell, ref_name, savemat, stamp_v73_header
from tools.synthetic.planning import NAMES, SCALES, Scale, Shot, cuhk03_pairs, plan


def _write_crops(root: Path, name: str, shots: list[Shot], cfg: Scale, rng, bar, spread: float) -> None:
    """Market, Duke, MSMT17: one JPEG per shot."""
    style = STYLES[name]
    looks = {}
    cams = [make_camera(rng) for _ in range(15)]
    for s in shots:
        if s.look not in looks:
            looks[s.look] = make_look(rng)
        mode = "junk" if s.pid < 0 else "distractor" if name == "market1501" and s.pid == 0 else "normal"
        h, w = crop_size(rng, cfg.crop, spread)
        path = root / s.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(photo(looks[s.look], cams[s.cam], style, h, w, rng, mode)))
        bar.update()


def write_market1501(data: Path, shots, cfg, rng, bar) -> None:
    root = data / "market1501" / "Market-1501-v15.09.15"
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (root / sub).mkdir(parents=True)
    _write_crops(root, "market1501", shots, cfg, rng, bar, 0.0)
    (root / "bounding_box_train" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0not an image")


def write_dukemtmc(data: Path, shots, cfg, rng, bar) -> None:
    _write_crops(data / "dukemtmc" / "DukeMTMC-reID", "dukemtmc", shots, cfg, rng, bar, 0.3)


def write_msmt17v1(data: Path, shots, cfg, rng, bar) -> None:
    root = data / "msmt17v1" / "MSMT17_V1"
    _write_crops(root, "msmt17v1", shots, cfg, rng, bar, 0.4)
    for split in ("train", "val", "query", "gallery"):
        lines = [f"{s.name.split('/', 1)[1]} {s.pid}\n" for s in shots if s.split == split]
        (root / f"list_{split}.txt").write_text("".join(lines))


def write_cuhk03(data: Path, detected: list[Shot], labeled: list[Shot], pairs: list[int], cfg: Scale,
                  rng, bar) -> None:
    """cuhk-03.mat as MATLAB v7.3 writes it, and the two new-protocol configs (MATLAB v5)."""
    root = data / "cuhk03"
    (root / "cuhk03_release").mkdir(parents=True)
    style = STYLES["cuhk03"]
    looks = [make_look(rng) for _ in range(sum(pairs))]
    cams = [make_camera(rng) for _ in range(2 * len(pairs))]
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
                            ds = refs.create_dataset(ref_name(next(counter)), data=np.zeros(2, np.uint64),
                                                     track_times=False)
                            ds.attrs["MATLAB_class"] = np.bytes_("double")
                            ds.attrs["MATLAB_empty"] = np.uint8(1)
                        else:
                            h, w = crop_size(rng, cfg.crop, 0.4)
                            arr = photo(looks[shot.look], cams[2 * (pair - 1) + shot.cam], style, h, w, rng,
                                         "detected" if kind == "detected" else "normal")
                            ds = refs.create_dataset(ref_name(next(counter)), data=arr.T, track_times=False)
                            ds.attrs["MATLAB_class"] = np.bytes_("uint8")
                            bar.update()
                        cells[lp - 1, img - 1] = ds.ref
                ds = refs.create_dataset(ref_name(next(counter)), data=cells.T, track_times=False)
                ds.attrs["MATLAB_class"] = np.bytes_("cell")
                pair_refs.append(ds.ref)
            ds = f.create_dataset(kind, data=np.array([pair_refs], dtype=h5py.ref_dtype), track_times=False)
            ds.attrs["MATLAB_class"] = np.bytes_("cell")
    stamp_v73_header(mat)
    for kind, shots in (("detected", detected), ("labeled", labeled)):
        index = {split: [i + 1 for i, s in enumerate(shots) if s.split == split]
                 for split in ("train", "query", "gallery")}
        savemat(root / f"cuhk03_new_protocol_config_{kind}.mat", {
            "filelist": cell([s.name for s in shots]),
            "labels": np.array([[s.pid] for s in shots], np.float64),
            "camId": np.array([[s.cam + 1] for s in shots], np.float64),
            **{f"{split}_idx": np.array(idx, np.float64)[:, None] for split, idx in index.items()},
        })


def write_cuhk_sysu(data: Path, shots: list[Shot], cfg: Scale, rng, bar) -> None:
    """Scenes with the labelled persons pasted at their boxes, Person.mat, Train.mat, TestG50.mat."""
    root = data / "cuhk_sysu" / "CUHK-SYSU"
    (root / "Image" / "SSM").mkdir(parents=True)
    (root / "annotation" / "test" / "train_test").mkdir(parents=True)
    style = STYLES["cuhk_sysu"]
    looks = [make_look(rng) for _ in range(max(s.look for s in shots) + 1)]
    height, width = cfg.scene
    for scene in sorted({s.name for s in shots}, key=lambda n: int(n[11:-4])):
        cam = make_camera(rng)
        img = background(style, cam, height, width, rng)
        for s in (s for s in shots if s.name == scene):
            x, y, w, h = s.box
            flip = bool(rng.random() < 0.5)
            person, mask = draw_person(looks[s.look], h, w, rng.normal(0, 0.01), 0.02, 0.96, flip)
            cw = min(w, width - x)
            region = img[y:y + h, x:x + cw]
            region[mask[:, :cw]] = person[:, :cw][mask[:, :cw]]
        (root / scene).write_bytes(jpeg(finish(img, style, cam["gain"], cam["tint"], rng)))
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
    savemat(root / "annotation" / "Person.mat", {"Person": person})
    train = np.empty((len(people), 1), dtype=object)
    for i in range(len(people)):
        train[i, 0] = person[:, i:i + 1]
    savemat(root / "annotation" / "test" / "train_test" / "Train.mat", {"Train": train})
    # The real TestG50.mat describes the search test set, which a source-only dataset never uses.
    query = np.zeros((1, 1), dtype=[("imname", object), ("idlocate", object), ("idname", object)])
    query[0, 0] = (shots[0].name.rsplit("/", 1)[1], np.array([shots[0].box], np.float64), f"p{shots[0].pid}")
    test = np.zeros((1, 1), dtype=[("Query", object), ("Gallery", object)])
    test[0, 0] = (query, np.zeros((1, 0)))
    savemat(root / "annotation" / "test" / "train_test" / "TestG50.mat", {"TestG50": test})


def generate(out: Path, scale: str = "small", seed: int = 0, progress: bool = True) -> None:
    """Write all five layouts under ``out`` (see the module docstring). ``out`` must be new, empty,
    or an earlier output (its marker lists the files it wrote): only those are replaced; files
    anyone else put there are never deleted (a folder that holds any is refused, untouched)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, expected a folder")
    if out.is_dir() and any(out.iterdir()):
        for name in _earlier_output(out):
            shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    cfg, shots = SCALES[scale], plan(scale, seed)
    scenes = len({s.name for s in shots["cuhk_sysu"]})
    total = sum(len(s) for n, s in shots.items() if n != "cuhk_sysu") + scenes
    rng = {n: np.random.default_rng([seed, i, 1]) for i, n in enumerate(NAMES)}
    with tqdm(total=total, desc="synthetic data", unit="img", disable=not progress) as bar:
        write_market1501(out, shots["market1501"], cfg, rng["market1501"], bar)
        write_dukemtmc(out, shots["dukemtmc"], cfg, rng["dukemtmc"], bar)
        write_msmt17v1(out, shots["msmt17v1"], cfg, rng["msmt17v1"], bar)
        write_cuhk03(out, shots["cuhk03"], shots["cuhk03_labeled"], cuhk03_pairs(scale), cfg, rng["cuhk03"],
                      bar)
        write_cuhk_sysu(out, shots["cuhk_sysu"], cfg, rng["cuhk_sysu"], bar)
    (out / MARKER).write_text(json.dumps({"generator": "tools/make_synthetic.py", "scale": scale,
                                          "seed": seed, "files": _dataset_files(out)}, indent=1) + "\n")


def _dataset_files(out: Path) -> list[str]:
    """Every file under the dataset folders of ``out``, relative to it."""
    return sorted(p.relative_to(out).as_posix() for name in NAMES if (out / name).is_dir()
                  for p in (out / name).rglob("*") if p.is_symlink() or not p.is_dir())


def _earlier_output(out: Path) -> list[str]:
    """The dataset folders of an earlier output in the non-empty ``out`` that hold only the files
    its marker lists (they may be replaced); refuses (ValueError) a folder without the marker,
    and one whose dataset folders hold anything else (a user's notes would be deleted)."""
    advice = "refusing to write there (give an empty or new folder)"
    try:
        listed = set(json.loads((out / MARKER).read_text())["files"])
    except FileNotFoundError:
        raise ValueError(f"--out {out} is not empty and holds no {MARKER} of an earlier synthetic "
                         f"output: {advice}") from None
    except (OSError, ValueError, TypeError, KeyError):
        raise ValueError(f"--out {out}: its {MARKER} does not list the files this tool wrote (an older "
                         f"version's, or damaged), so they cannot be told from others: {advice}") from None
    foreign = [f for f in _dataset_files(out) if f not in listed]
    if foreign:
        raise ValueError(f"--out {out} holds {len(foreign)} file(s) this tool did not write "
                         f"({', '.join(foreign[:3])}): {advice}, or move them")
    return [name for name in NAMES if (out / name).is_dir()]
