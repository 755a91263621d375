"""Parsers for the five raw dataset layouts and for users' own Market-style folders
(``parse_custom``; docs/design.md), and the stored bytes of each image.

Each ``parse_<name>(root)`` takes ``root = DATA/<name>`` and returns a
:class:`~pipeline.records.DatasetSplits` whose records are sorted by file, with keys
``f"{split}_{stem}"`` (:func:`pipeline.records.sample_key`: derived where a file name cannot be a
key). Pids are the datasets' own (junk ``-1`` dropped here, Market distractors
``0`` kept in the gallery); relabelling for training is :func:`pipeline.records.mix_labels`.
Anything missing or malformed raises :class:`DatasetError` naming the path and what was expected.
"""
from __future__ import annotations

import io
import os
import re
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import scipy.io
from PIL import Image

from pipeline.records import DATASETS, DatasetSplits, Record, sample_key


class DatasetError(ValueError):
    """A raw dataset is missing, or does not have the layout docs/design.md describes."""


_MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
_MARKET_NAME = re.compile(r"^(-1|\d+)_c(\d+)")  # pid (-1 = junk), camera (1-based)
_MARKET_LAYOUT = "bounding_box_train/, query/ and bounding_box_test/ with files named PPPP_cC..."


def _need_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"missing folder {path}: expected {layout}")
    return path


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"missing file {path}: expected {what}")
    return path


def _market_style(name: str, base: Path, rel_to: Path, cams: int | None, exts: tuple[str, ...],
                  need_images: bool = False) -> DatasetSplits:
    """Market-style folders (Market-1501, DukeMTMC-reID, CUHK03-NP, custom sets): pid and camera
    from the name; ``cams`` None allows any camera number from 1; ``need_images``: a split folder
    without images is refused."""
    _need_dir(base, f"the {name} folder holding {_MARKET_LAYOUT}")
    out = DatasetSplits(name)
    for split, sub in _MARKET_FOLDERS.items():
        folder = _need_dir(base / sub, f"{name} split folder ({_MARKET_LAYOUT})")
        images = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in exts]  # not e.g. Thumbs.db
        if need_images and not images:
            others = sorted(p.name for p in folder.iterdir())
            found = f"{len(others)} other file(s): {', '.join(others[:3])}" if others else "an empty folder"
            raise DatasetError(f"{folder}: expected images ({', '.join(exts)}) named PPPP_cC..., "
                               f"found {found}")
        records, bad = [], []
        for path in images:
            m = _MARKET_NAME.match(path.name)
            if m is None or not 1 <= int(m[2]) <= (cams or int(m[2])):
                bad.append(path.name)
            elif int(m[1]) >= 0:
                records.append(Record(sample_key(split, path.stem), int(m[1]), int(m[2]) - 1, name, split,
                                      path.relative_to(rel_to).as_posix(), str(path)))
        if bad:
            camera = f"camera C in 1..{cams}" if cams else "camera C from 1"
            raise DatasetError(f"{folder}: expected image names PPPP_cC... with {camera} (PPPP the person, "
                               f"-1 for junk), found {len(bad)} other name(s): {', '.join(bad[:5])}")
        setattr(out, split, records)
    return out


def parse_market1501(root: str | Path) -> DatasetSplits:
    """Market-1501 from ``root/Market-1501-v15.09.15``; 6 cameras.

    Real counts (images/ids): train 12936/751, query 3368/750, gallery 15913/751 (750 + the
    distractor id 0; the 3819 junk images are dropped); mix 29419/1501.
    """
    base = Path(root).absolute() / "Market-1501-v15.09.15"
    return _market_style("market1501", base, base, 6, (".jpg", ".jpeg"))


def parse_dukemtmc(root: str | Path) -> DatasetSplits:
    """DukeMTMC-reID from ``root/DukeMTMC-reID``; names ``PPPP_cC_fFFFFFFF.jpg``, 8 cameras.

    Real counts: train 16522/702, query 2228/702, gallery 17661/1110 (702 + 408 ids seen only
    in the gallery); mix 36411/1812.
    """
    base = Path(root).absolute() / "DukeMTMC-reID"
    return _market_style("dukemtmc", base, base, 8, (".jpg", ".jpeg"))


def parse_custom(name: str, folder: str | Path) -> DatasetSplits:
    """A user's own dataset in Market-1501's layout (``tools/make_shards.py --custom NAME=DIR``):
    ``folder`` holds bounding_box_train/, query/ and bounding_box_test/, each with images
    (.jpg, .jpeg or .png) named ``PPPP_cC...``, any camera number from 1; as in Market-1501, pid
    ``-1`` is junk (dropped) and ``0000`` a distractor (kept in the gallery only)."""
    base = _need_dir(Path(folder).absolute(), f"a folder holding {_MARKET_LAYOUT}")
    missing = [f"{sub}/" for sub in _MARKET_FOLDERS.values() if not (base / sub).is_dir()]
    if missing:
        found = sorted(p.name + "/" * p.is_dir() for p in base.iterdir())
        raise DatasetError(f"{base}: expected {_MARKET_LAYOUT}; {', '.join(missing)} missing, found "
                           f"{', '.join(found[:8]) if found else 'an empty folder'}")
    return _market_style(name, base, base, None, (".jpg", ".jpeg", ".png"), need_images=True)


def parse_msmt17v1(root: str | Path) -> DatasetSplits:
    """MSMT17_V1 from ``root/MSMT17_V1``: its four list files, ``relpath label`` per line.

    ``list_train.txt`` and ``list_val.txt`` (under ``train/``) form the train split;
    ``list_query.txt`` and ``list_gallery.txt`` are under ``test/``, where pids restart at 0.
    Camera = third ``_`` field of the file name (01..15).
    Real counts: train+val 32621/1041, query 11659/3060, gallery 82161/3060; mix 126441/4101.
    """
    base = Path(root).absolute() / "MSMT17_V1"
    _need_dir(base, "MSMT17_V1 holding train/, test/ and list_{train,val,query,gallery}.txt")
    out = DatasetSplits("msmt17v1")
    for split, sub, lists in (("train", "train", ("train", "val")), ("query", "test", ("query",)),
                              ("gallery", "test", ("gallery",))):
        folder = _need_dir(base / sub, f"the MSMT17_V1 image folder {sub}/")
        records = []
        for lst in lists:
            path = _need_file(base / f"list_{lst}.txt", f"the MSMT17_V1 list of {lst} images")
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split()
                fields = Path(parts[0]).stem.split("_")
                if len(parts) != 2 or not re.fullmatch(r"\d+", parts[1]) or len(fields) < 3 \
                        or not re.fullmatch(r"\d+", fields[2]) or not 1 <= int(fields[2]) <= 15:
                    raise DatasetError(f"{path}:{n}: expected '<relative path> <label>' with a file name "
                                       f"PPPP_NNN_CC_... (camera CC in 01..15), got {line!r}")
                image = folder / parts[0]
                if not image.is_file():
                    raise DatasetError(f"{path}:{n}: lists {image}, which does not exist")
                records.append(Record(sample_key(split, image.stem), int(parts[1]), int(fields[2]) - 1,
                                      "msmt17v1", split, f"{sub}/{parts[0]}", str(image)))
        setattr(out, split, sorted(records, key=lambda r: r.file))
    return out


def parse_cuhk03(root: str | Path, labeled: bool = False) -> DatasetSplits:
    """CUHK03, new protocol (767 train / 700 test ids), detected boxes unless ``labeled``.

    Reads ``root/cuhk03_release/cuhk-03.mat`` (MATLAB v7.3) with
    ``root/cuhk03_new_protocol_config_{detected,labeled}.mat``; without ``cuhk03_release``, the
    pre-extracted CUHK03-NP folders ``root/cuhk03-np/{detected,labeled}/`` (Market-style, PNG).
    pid = the config's label; camid = view - 1 (the two cameras of each pair).
    Real counts, detected: train 7365/767, query 1400/700, gallery 5332/700; mix 14097/1467.
    """
    root = Path(root).absolute()
    kind = "labeled" if labeled else "detected"
    if (root / "cuhk03_release").is_dir():
        return _cuhk03_release(root, kind)
    if (root / "cuhk03-np").is_dir():
        return _market_style("cuhk03", root / "cuhk03-np" / kind, root, 2, (".png", ".jpg", ".jpeg"))
    raise DatasetError(f"missing folder {root / 'cuhk03_release'} (holding cuhk-03.mat, with "
                       f"{root / f'cuhk03_new_protocol_config_{kind}.mat'} beside it) or, instead, the "
                       f"CUHK03-NP folder {root / 'cuhk03-np' / kind} holding {_MARKET_LAYOUT}")


def _cuhk03_release(root: Path, kind: str) -> DatasetSplits:
    mat = _need_file(root / "cuhk03_release" / "cuhk-03.mat", "the CUHK03 release (MATLAB v7.3)")
    config_path = _need_file(root / f"cuhk03_new_protocol_config_{kind}.mat",
                             "the CUHK03 new-protocol split (MATLAB v5)")
    config = _loadmat(config_path)
    names = [_mat_str(x) for x in _mat_field(config, "filelist", config_path).ravel()]
    labels = _mat_field(config, "labels", config_path).ravel()
    if len(labels) != len(names):
        raise DatasetError(f"{config_path}: 'labels' has {len(labels)} entries, 'filelist' {len(names)}")
    out = DatasetSplits("cuhk03")
    try:
        f = h5py.File(mat, "r")
    except OSError as e:
        raise DatasetError(f"{mat}: not readable as MATLAB v7.3 (HDF5): {e}") from None
    with f:
        if kind not in f:
            raise DatasetError(f"{mat}: no field '{kind}' (expected 'detected' and 'labeled' cell arrays)")
        if not _is_cell(f[kind]):
            raise DatasetError(f"{mat}: '{kind}' is not a cell array (of HDF5 object references)")
        pairs = [f[ref] for ref in f[kind][()].ravel()]
        if not all(_is_cell(cells) for cells in pairs):
            raise DatasetError(f"{mat}: '{kind}' holds something other than cell arrays, one per camera pair")
        pairs = [cells[()].T for cells in pairs]  # each: persons x 10 image references
        if any(cells.ndim != 2 or cells.shape[1] != 10 for cells in pairs):
            raise DatasetError(f"{mat}: '{kind}' cells of shapes {[c.shape for c in pairs]}, "
                               "expected persons x 10 images per camera pair")
        names_of = _h5_names(f)
        for split in ("train", "query", "gallery"):
            records = []
            for i in _mat_field(config, f"{split}_idx", config_path).ravel().astype(np.int64):
                if not 1 <= i <= len(names):
                    raise DatasetError(f"{config_path}: {split}_idx {i} is outside filelist "
                                       f"(1..{len(names)})")
                name = names[i - 1]
                image = _cuhk03_image(f, pairs, name, f"{config_path} names {name!r}, ")
                view = int(name.split("_")[2])
                records.append(Record(f"{split}_{Path(name).stem}", int(labels[i - 1]), view - 1, "cuhk03",
                                      split, f"cuhk03_release/cuhk-03.mat:{kind}/{name}", str(mat),
                                      h5_ref=names_of[image.id]))
            setattr(out, split, sorted(records, key=lambda r: r.file))
    return out


def _is_cell(obj) -> bool:
    return isinstance(obj, h5py.Dataset) and h5py.check_dtype(ref=obj.dtype) is not None


def _cuhk03_image(f: h5py.File, pairs: list[np.ndarray], name: str, where: str) -> h5py.Dataset:
    """The array of image ``{pair}_{person:03d}_{view}_{image:02d}`` (1-based) in its cell."""
    m = re.fullmatch(r"(\d+)_(\d+)_([12])_(\d+)", Path(name).stem)
    pair, person, image = (int(m[1]), int(m[2]), int(m[4])) if m else (0, 0, 0)
    if not (1 <= pair <= len(pairs) and 1 <= person <= len(pairs[pair - 1]) and 1 <= image <= 10):
        raise DatasetError(f"{where}expected pair_person_view_image within {f.filename}'s {len(pairs)} pairs")
    array = f[pairs[pair - 1][person - 1, image - 1]]
    if array.ndim != 3:
        raise DatasetError(f"{where}which is an empty cell in {f.filename}")
    return array


def _h5_names(f: h5py.File) -> dict:
    """Path of every dataset by object id: asking a dereferenced object its ``.name`` searches
    the file each time, too slow for the ~28k images of the real ``cuhk-03.mat``."""
    names = {}

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset):
            names[obj.id] = name

    f.visititems(visit)
    return names


def parse_cuhk_sysu(root: str | Path) -> DatasetSplits:
    """CUHK-SYSU, source only: every labelled person box of ``annotation/Person.mat`` becomes a
    train record cropped from its scene in ``Image/SSM/`` (box clipped to the image); camid 0
    (no cameras); pid = the number in ``idname`` ('p123' -> 123)."""
    base = Path(root).absolute() / "CUHK-SYSU"
    _need_dir(base, "CUHK-SYSU holding Image/SSM/*.jpg and annotation/Person.mat")
    mat = _need_file(base / "annotation" / "Person.mat", "the CUHK-SYSU person annotations")
    sizes: dict[str, tuple[int, int]] = {}
    records = []
    for person in _mat_field(_loadmat(mat), "Person", mat).ravel():
        idname = _mat_str(_struct_field(person, "idname", mat))
        if not re.fullmatch(r"p\d+", idname):
            raise DatasetError(f"{mat}: Person.idname {idname!r}, expected p<number>")
        for j, scene in enumerate(_struct_field(person, "scene", mat).ravel()):
            imname = _mat_str(_struct_field(scene, "imname", mat))
            where = f"{mat}: person {idname} in scene {imname}:"
            box = np.asarray(_struct_field(scene, "idlocate", mat), np.float64).ravel()
            image = base / "Image" / "SSM" / imname
            if imname not in sizes:
                if not image.is_file():
                    raise DatasetError(f"{where} {image} does not exist")
                try:
                    with Image.open(image) as im:
                        sizes[imname] = im.size
                except (OSError, SyntaxError) as e:
                    raise DatasetError(f"{where} cannot read {image}: {e}") from None
            width, height = sizes[imname]
            if box.size != 4:
                raise DatasetError(f"{where} idlocate {box}, expected [x y w h]")
            x0, y0 = max(0, round(box[0])), max(0, round(box[1]))
            x1, y1 = min(width, round(box[0] + box[2])), min(height, round(box[1] + box[3]))
            if x1 <= x0 or y1 <= y0:
                raise DatasetError(f"{where} box {box.tolist()} has no area "
                                   f"inside the {width}x{height} image")
            records.append(Record(f"train_{idname}_{j}_{Path(imname).stem}", int(idname[1:]), 0, "cuhk_sysu",
                                  "train", f"Image/SSM/{imname}", str(image), box=(x0, y0, x1 - x0, y1 - y0)))
    # by scene, so a worker crops consecutive persons from one decoded scene
    return DatasetSplits("cuhk_sysu", train=sorted(records, key=lambda r: (r.file, r.key)))


def _loadmat(path: Path) -> dict:
    try:
        return scipy.io.loadmat(path)
    except Exception as e:  # noqa: BLE001 - scipy raises many types (MatReadError, TypeError...) on bad files
        raise DatasetError(f"{path}: not readable as a MATLAB v5 file: {type(e).__name__}: {e}") from None


def _mat_field(mat: dict, name: str, path: Path) -> np.ndarray:
    if name not in mat:
        raise DatasetError(f"{path}: no field '{name}'")
    return mat[name]


def _struct_field(struct: np.void, name: str, path: Path):
    if struct.dtype.names is None or name not in struct.dtype.names:
        raise DatasetError(f"{path}: struct lacks the field '{name}' (has {struct.dtype.names})")
    return struct[name]


def _mat_str(x) -> str:
    """The text of a MATLAB char array, however deep scipy wrapped it in cells."""
    while isinstance(x, np.ndarray):
        if x.dtype.kind in "US":
            return "".join(str(c) for c in x.ravel())
        x = x.ravel()[0]
    return str(x)


_PARSERS = {"market1501": parse_market1501, "dukemtmc": parse_dukemtmc, "msmt17v1": parse_msmt17v1,
            "cuhk_sysu": parse_cuhk_sysu}


def parse(name: str, data_dir: str | Path, *, cuhk03_labeled: bool = False) -> DatasetSplits:
    """Parse dataset ``name`` from ``data_dir/<name>/`` (docs/design.md)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    root = Path(data_dir) / name
    splits = parse_cuhk03(root, labeled=cuhk03_labeled) if name == "cuhk03" else _PARSERS[name](root)
    keys = [r.key for split in ("train", "query", "gallery") for r in splits.split(split)]
    if len(set(keys)) != len(keys):
        dup = sorted(k for k, n in Counter(keys).items() if n > 1)[:5]
        raise DatasetError(f"{root}: the same image is listed twice ({', '.join(dup)})")
    return splits


# ----------------------------------------------------------------------------------------------
# Image bytes, callable in worker processes: HDF5 files and the last scene are cached per process.

_h5_files: dict[tuple[int, str], h5py.File] = {}
_last_scene: dict[int, tuple[str, Image.Image]] = {}


def image_bytes(record: Record) -> bytes:
    """The image to store for ``record``, encoded at most once (the shard writer names the
    member by the format: ``.jpg`` or ``.png``).

    A JPEG file: its own bytes, unchanged. A CUHK03 array: PNG, lossless, as the published code
    saves it, so the pixels are the array's. A PNG file (CUHK03-NP): its own bytes when it is
    8-bit RGB, else converted to RGB once and stored as PNG. A CUHK-SYSU crop: JPEG quality 95,
    like the JPEG scene it is cut from.
    """
    if record.h5_ref is not None:
        key = (os.getpid(), record.path)
        if key not in _h5_files:
            _h5_files[key] = h5py.File(record.path, "r")
        return _png(Image.fromarray(np.ascontiguousarray(_h5_files[key][record.h5_ref][()].T)))
    if record.box is not None:
        cached = _last_scene.get(os.getpid())
        if cached is None or cached[0] != record.path:
            with Image.open(record.path) as im:
                cached = _last_scene[os.getpid()] = (record.path, im.convert("RGB"))
        x, y, w, h = record.box
        return _jpeg(cached[1].crop((x, y, x + w, y + h)))
    data = Path(record.path).read_bytes()
    if record.path.lower().endswith((".jpg", ".jpeg")) or _is_png_rgb8(data):
        return data
    with Image.open(io.BytesIO(data)) as im:
        return _png(im.convert("RGB"))


def _is_png_rgb8(data: bytes) -> bool:
    """An 8-bit RGB PNG (IHDR bit depth 8, colour type 2), which PIL and DALI decode to the same
    pixels; other PNGs (16-bit, palette, alpha) could decode differently in the two loaders."""
    return data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[24:26] == b"\x08\x02"


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    """Lossless: whoever decodes it gets exactly these pixels."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()
