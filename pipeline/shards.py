"""The shard format (docs/design.md): write, index, verify and read WebDataset tars.

Each split of a dataset becomes ``<split>-NNNNNN.tar`` files holding, per sample, one image
member named by its format, ``<key>.jpg`` (JPEG files' own bytes, never re-encoded; CUHK-SYSU
crops, JPEG quality 95) or ``<key>.png`` (CUHK03 arrays, lossless, as the published code saves
them; CUHK03-NP PNG files' own bytes), and ``<key>.json`` (pid, camid, dataset, split, file);
each tar with the index DALI's WebDataset reader takes (the text ``wds2idx`` writes) and one
``manifest.json`` per dataset. Readers take the image bytes whichever the extension; both
loaders decode by content. Format 1 stored CUHK03 arrays as JPEG; its shards are refused
with a message to rebuild. The manifest is written last, so a folder without one is an
unfinished build. Tars are byte-for-byte reproducible (fixed mtime/owner/mode, record order),
so a rebuild gives the same sha256. :class:`SplitReader` reads samples at random at the
index offsets into the tars (``os.pread``), which is what the identity sampler needs.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import mmap
import multiprocessing
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.records import CUSTOM_NAME, DATASETS, SPLITS, DatasetSplits, Record, mix_labels
from pipeline.workers import become_worker, starting_workers

FORMAT_VERSION = 2  # 1: every image a .jpg member (CUHK03 arrays lossy); 2: arrays as lossless .png
IMAGE_EXTS = {"JPEG": "jpg", "PNG": "png"}  # image format (PIL's name) -> member extension
INDEX_VERSION = "v1.2"  # the index text version DALI's wds2idx writes: "ext offset size name" per member
MANIFEST = "manifest.json"
_TMP = ".tmp-"
_OURS = re.compile(rf"^(({'|'.join(SPLITS)})-\d{{6}}\.(tar|idx)|{re.escape(MANIFEST)}|{re.escape(_TMP)}.*)$")
_BLOCK = 512


class ShardError(ValueError):
    """A shard folder, tar or index that is missing, damaged, foreign or of another format."""


class BadImage(ShardError):
    """An image that cannot be read or decoded while building: the one failure ``skip_bad`` skips."""


# ----------------------------------------------------------------------------- writing

def write_dataset(splits: DatasetSplits, out_root: Path, *, shard_size: int = 5000, workers: int = 1,
                  skip_bad: bool = False, progress: bool = True, extra: dict | None = None) -> dict:
    """Write ``out_root/<name>/`` (tars, indexes, manifest) and return the manifest.

    Each worker process builds whole shards under temporary names; only when every shard is
    done are they renamed into place and the manifest written, so a failure (a corrupt image
    without ``skip_bad``) leaves the previous contents, or nothing, behind. ``extra`` keys are
    stored in the manifest (e.g. which CUHK03 variant was built).
    """
    if shard_size < 1:
        raise ShardError(f"shard_size must be at least 1, got {shard_size}")
    out = Path(out_root) / splits.name
    foreign = sorted(p.name for p in out.iterdir() if not _OURS.match(p.name)) if out.is_dir() else []
    if foreign:
        raise ShardError(f"{out} holds files that are not shards of this program ({', '.join(foreign[:5])}): "
                         "refusing to write there; choose another --out or move them")
    for split in SPLITS:
        _check_keys(splits.split(split), out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for split in SPLITS:
        records = splits.split(split)
        for c in range(0, len(records), shard_size):
            tmp = out / f"{_TMP}{split}-{c // shard_size:06d}"
            tasks.append((records[c:c + shard_size], str(tmp) + ".tar", str(tmp) + ".idx", skip_bad))
    total = sum(len(t[0]) for t in tasks)
    bar = tqdm(total=total, desc=splits.name, unit="img", disable=not progress)
    try:
        results = _run(tasks, workers, bar)
    except BaseException:
        _remove_temporaries(out)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        bar.close()
    return _commit(splits, out, tasks, results, extra or {})


def _check_keys(records: list[Record], out: Path) -> None:
    """Keys name tar members and index fields: the index separates its fields by spaces."""
    seen = set()
    for r in records:
        if ("." in r.key or "/" in r.key or not r.key or len(r.key) > 95 or r.key in seen
                or any(c.isspace() for c in r.key)):
            raise ShardError(f"{out}: record key {r.key!r} ({r.file}) must be unique, non-empty, at most "
                             "95 characters, without dots, slashes or whitespace: rename the file")
        seen.add(r.key)


def _run(tasks: list[tuple], workers: int, bar: tqdm) -> list[dict]:
    """Build every shard, in this process (workers <= 1) or in a pool; results in task order."""
    if workers <= 1 or len(tasks) <= 1:
        results = []
        for t in tasks:
            results.append(_build_shard(*t))
            bar.update(len(t[0]))
        return results
    # spawn, not fork: the caller may hold threads (torch, DALI) that a forked child would inherit
    # locked; the workers end with this process and leave its stop signals to it (pipeline.workers)
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx, initializer=become_worker,
                                initargs=(os.getpid(),)) as pool:
        with starting_workers():  # the pool starts its processes as tasks are submitted
            futures = {pool.submit(_build_shard, *t): i for i, t in enumerate(tasks)}
        results: list[dict] = [{}] * len(tasks)
        try:
            for f in cf.as_completed(futures):
                results[futures[f]] = f.result()
                bar.update(len(tasks[futures[f]][0]))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # let running shards finish before cleanup
            raise
    return results


def _build_shard(records: list[Record], tar_path: str, idx_path: str, skip_bad: bool) -> dict:
    """Write one tar (+ index) of ``records``; returns samples, sha256 and the skipped images."""
    from pipeline.datasets import image_bytes  # parsers (h5py, scipy) are only needed for writing

    skipped, members = [], []
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for r in records:
            try:
                data = image_bytes(r)
                ext = _image_ext(data)
            except Exception as e:  # noqa: BLE001 - any failure to read or decode makes the image bad
                reason = (f"{r.path} ({r.dataset} {r.file}): unreadable or corrupt image: "
                          f"{type(e).__name__}: {e}")
                if not skip_bad:
                    raise BadImage(f"{reason} (tools/make_shards.py --skip-bad skips such images)") from None
                skipped.append({"key": r.key, "file": r.file, "error": reason})
                continue
            meta = {"pid": r.pid, "camid": r.camid, "dataset": r.dataset, "split": r.split, "file": r.file}
            members.append(_add_member(tar, f"{r.key}.{ext}", data))
            members.append(_add_member(tar, r.key + ".json", json.dumps(meta, sort_keys=True).encode()))
    samples = len(records) - len(skipped)
    if samples:
        write_index(idx_path, members)  # offsets known from writing: no second pass over the tar
    return {"samples": samples, "sha256": _sha256(tar_path), "skipped": skipped}


def _image_ext(data: bytes) -> str:
    """The member extension of an image, after decoding it whole: a truncated or damaged image
    must fail here, not in training."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format not in IMAGE_EXTS:
            raise ValueError(f"expected JPEG or PNG data, found {im.format}")
        im.load()
        return IMAGE_EXTS[im.format]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[str, int, int]:
    """Append a file with fixed metadata; returns (name, data offset, size) for the index."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
        len(data), 0, 0o644, 0, 0, "", "")
    offset = tar.offset + _BLOCK  # a ustar header of a short name is one block
    tar.addfile(info, io.BytesIO(data))
    return name, offset, len(data)


def _commit(splits: DatasetSplits, out: Path, tasks: list[tuple], results: list[dict], extra: dict) -> dict:
    """Rename finished shards into place, remove stale ones, write the manifest last."""
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete from here until the manifest lands
    skipped = {s["key"] for r in results for s in r["skipped"]}
    manifest: dict = {"format": FORMAT_VERSION, "dataset": splits.name, "splits": {}}
    kept_files = set()
    for split in SPLITS:
        shards = []
        for (records, tmp_tar, tmp_idx, _), res in zip(tasks, results):
            if records[0].split != split:
                continue
            if not res["samples"]:
                os.remove(tmp_tar)
                continue
            name = f"{split}-{len(shards):06d}"
            os.replace(tmp_tar, out / f"{name}.tar")
            os.replace(tmp_idx, out / f"{name}.idx")
            kept_files |= {f"{name}.tar", f"{name}.idx"}
            shards.append({"tar": f"{name}.tar", "idx": f"{name}.idx", "samples": res["samples"],
                           "sha256": res["sha256"]})
        kept = [r for r in splits.split(split) if r.key not in skipped]
        if kept:
            manifest["splits"][split] = {"images": len(kept), "ids": len({r.pid for r in kept}),
                                         "cams": len({r.camid for r in kept}), "shards": shards}
    everything = [r for s in SPLITS for r in splits.split(s) if r.key not in skipped]
    labels = mix_labels([(r.dataset, r.split, r.pid) for r in everything])
    used = [lab for lab in labels if lab >= 0]
    manifest["mix"] = {"images": len(used), "ids": len(set(used))}
    if skipped:
        manifest["skipped"] = {"count": len(skipped),
                               "images": [s for r in results for s in r["skipped"]]}
    manifest.update(extra)
    for p in out.iterdir():
        if p.name != MANIFEST and p.name not in kept_files:
            p.unlink()  # shards of an earlier, larger build, and leftover temporaries
    tmp = out / f"{_TMP}{MANIFEST}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def _remove_temporaries(out: Path) -> None:
    for p in out.glob(_TMP + "*"):
        p.unlink(missing_ok=True)


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- index

def write_index(idx_path: str | Path, members: list[tuple[str, int, int]]) -> None:
    """Write the DALI WebDataset index of a tar (the format of DALI's ``wds2idx``) from the
    ``(name, data_offset, size)`` of its regular-file members, in tar order.

    Line 1 is ``v1.2 <samples>``; then one line per sample (members sharing the name up to the
    first dot of the file name, in tar order): ``ext data_offset size member_name`` repeated for
    each of its regular-file members. ``data_offset`` is where the member's bytes start (just
    after its 512-byte header).
    """
    samples: list[list[str]] = []
    last = None
    for name, offset, size in members:
        key, ext = _split_name(name)
        if not key or key.endswith("/"):  # hidden files and the like are no samples (as in wds2idx)
            continue
        if key != last:
            samples.append([])
            last = key
        samples[-1].append(f"{ext} {offset} {size} {name}")
    with open(idx_path, "w") as f:
        f.write(f"{INDEX_VERSION} {len(samples)}\n")
        f.writelines(" ".join(s) + "\n" for s in samples)


def read_index(idx_path: str | Path) -> list[tuple[str, dict[str, tuple[int, int, str]]]]:
    """Parse an index: per sample ``(key, {ext: (data_offset, size, member_name)})``, in tar order."""
    lines = Path(idx_path).read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardError(f"{idx_path}: expected a '{INDEX_VERSION} <samples>' header, found {lines[:1]}")
    if int(head[1]) != len(lines) - 1:
        raise ShardError(f"{idx_path}: header says {head[1]} samples, the file has {len(lines) - 1} lines")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        tok = line.split(" ")
        if len(tok) % 4:
            raise ShardError(f"{idx_path}:{n}: expected groups of 'ext offset size name', found {line!r}")
        comps = {tok[i]: (int(tok[i + 1]), int(tok[i + 2]), tok[i + 3]) for i in range(0, len(tok), 4)}
        out.append((_split_name(tok[3])[0], comps))
    return out


def _split_name(name: str) -> tuple[str, str]:
    """Sample key and extension: split at the first dot of the file name, as WebDataset does."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def image_member(comps: dict[str, tuple[int, int, str]], where: str) -> tuple[int, int, str]:
    """``(data_offset, size, member_name)`` of a sample's image, its one ``.jpg`` or ``.png``
    member; a sample without exactly one of them, or without its ``.json``, is refused."""
    images = [comps[ext] for ext in IMAGE_EXTS.values() if ext in comps]
    if len(images) != 1 or "json" not in comps:
        raise ShardError(f"{where}: a sample needs one image member (.jpg or .png) and a .json member, "
                         f"it has {', '.join('.' + ext for ext in comps)}")
    return images[0]


# ----------------------------------------------------------------------------- checking

def load_manifest(dataset_dir: Path) -> dict:
    """Read ``manifest.json``; refuse another format version and list every missing shard file."""
    d = Path(dataset_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} not found: {d} holds no complete shards "
                         "(build them with tools/make_shards.py)")
    try:
        manifest = json.loads(path.read_text())
        fmt = manifest.get("format")
    except (ValueError, AttributeError) as e:
        raise ShardError(f"{path} is not a valid manifest ({e}): rebuild with tools/make_shards.py") from None
    if fmt != FORMAT_VERSION:
        raise ShardError(f"{path}: shards built with format {fmt}, this program reads format "
                         f"{FORMAT_VERSION}: rebuild with {_rebuild_command(manifest, d)}")
    missing = [str(d / s[k]) for info in manifest["splits"].values() for s in info["shards"]
               for k in ("tar", "idx") if not (d / s[k]).is_file()]
    if missing:
        raise ShardError(f"{d}: {len(missing)} shard file(s) named in {MANIFEST} are missing "
                         f"(rebuild with {_rebuild_command(manifest, d)}):\n  " + "\n  ".join(missing))
    return manifest


def _rebuild_command(manifest: dict, dataset_dir: Path) -> str:
    """The command that rebuilds ``dataset_dir``: a custom set needs its folder again."""
    if manifest.get("custom"):
        return f"tools/make_shards.py --custom {dataset_dir.name}=DIR (DIR: the folder it was made from)"
    return "tools/make_shards.py"


def custom_sets(shards_dir: Path) -> list[str]:
    """The custom sets (``tools/make_shards.py --custom``) in ``shards_dir``: folders of a custom
    name holding a manifest (complete or not: :func:`unknown_dataset` and ``--verify`` tell)."""
    d = Path(shards_dir)
    return sorted(p.name for p in d.iterdir() if p.name not in DATASETS and CUSTOM_NAME.fullmatch(p.name)
                  and (p / MANIFEST).is_file()) if d.is_dir() else []


def unknown_dataset(name: str, shards_dir: Path) -> str | None:
    """Why ``name`` is no dataset to train or evaluate on, or None when it is one: a built-in name
    (whose shards are checked later), or a custom set with complete shards in ``shards_dir``.
    The reason reads after the flag and name, e.g. ``-d 'x': <reason>``."""
    if name in DATASETS:
        return None
    d = Path(shards_dir) / name
    if CUSTOM_NAME.fullmatch(name) and d.is_dir():
        try:
            load_manifest(d)
            return None
        except ShardError as e:
            return f"not a built-in dataset ({', '.join(DATASETS)}), and {str(e).splitlines()[0]}"
    found = (", ".join(custom_sets(shards_dir))
             or "none there; tools/make_shards.py --custom NAME=DIR makes one")
    return f"unknown dataset; choose from {', '.join(DATASETS)} or a custom set in {shards_dir} ({found})"


def verify_dataset(dataset_dir: Path) -> list[str]:
    """Re-hash every shard against the manifest, check each index against its tar, and, when
    those hold, the manifest's names and counts against the samples' records.

    Returns the problems found, one sentence each (empty when the dataset is sound).
    """
    d = Path(dataset_dir)
    try:
        manifest = load_manifest(d)
    except ShardError as e:
        return [str(e)]
    problems = []
    for split, info in manifest["splits"].items():
        for s in info["shards"]:
            tar, idx = d / s["tar"], d / s["idx"]
            digest = _sha256(tar)
            if digest != s["sha256"]:
                problems.append(f"{tar}: sha256 {digest} differs from the manifest's {s['sha256']} "
                                "(the file was changed or damaged)")
            try:
                entries = read_index(idx)
            except (ShardError, ValueError) as e:
                problems.append(f"{idx}: unreadable index: {e}")
                continue
            if len(entries) != s["samples"]:
                problems.append(f"{idx}: {len(entries)} samples, the manifest says {s['samples']}")
            problems += _check_members(tar, entries) + _check_tar_against_index(tar, entries)
        total = sum(s["samples"] for s in info["shards"])
        if total != info["images"]:
            problems.append(f"{d / MANIFEST}: split {split} has {total} samples in its shards, "
                            f"{info['images']} images in its summary")
    return problems or _check_summary(d, manifest)


def _check_summary(d: Path, manifest: dict) -> list[str]:
    """The manifest's dataset name and counts must be those of the records in its shards: the
    hashes cover the tars, not the manifest, so an edited manifest would pass them."""
    where, name = d / MANIFEST, manifest.get("dataset")
    problems = [] if name == d.name else [f"{where}: dataset {name!r}, but the folder is {d.name!r}"]
    everything = []
    for split, info in manifest["splits"].items():
        records = [rec for s in info["shards"] for rec in _records(d / s["tar"], d / s["idx"])]
        others = sorted({f"{r['dataset']}/{r['split']}" for r in records} - {f"{name}/{split}"})
        if others:
            problems.append(f"{where}: split {split} of {name!r} holds records of {', '.join(others[:3])}")
        found = {"images": len(records), "ids": len({r["pid"] for r in records}),
                 "cams": len({r["camid"] for r in records})}
        problems += [f"{where}: split {split} says {key} {info.get(key)}, its shards hold {n}"
                     for key, n in found.items() if info.get(key) != n]
        everything += [(r["dataset"], split, r["pid"]) for r in records]
    used = [label for label in mix_labels(everything) if label >= 0]
    mix = {"images": len(used), "ids": len(set(used))}
    if manifest.get("mix") != mix:
        problems.append(f"{where}: mix says {manifest.get('mix')}, its shards hold {mix}")
    return problems


def _records(tar: Path, idx: Path) -> list[dict]:
    """Each sample's JSON record (pid, camid, dataset, split, file), in tar order."""
    records = []
    with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for _, comps in read_index(idx):
            off, n, _ = comps["json"]
            records.append(json.loads(mm[off:off + n]))
    return records


def _check_members(tar: Path, entries: list) -> list[str]:
    """Every sample must be what the readers take: one image (.jpg or .png) and a .json."""
    for key, comps in entries:
        try:
            image_member(comps, f"{tar}:{key}")
        except ShardError as e:
            return [str(e)]
    return []


def _check_tar_against_index(tar: Path, entries: list) -> list[str]:
    """Each index entry must point at a member header of that name and size; the lists must agree."""
    size = tar.stat().st_size
    if size == 0:
        return [f"{tar} is empty"]
    indexed = [c for _, comps in entries for c in comps.values()]
    with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for off, n, name in indexed:
            if off + n > size:
                return [f"{tar} is truncated: member {name} ends at byte {off + n}, "
                        f"the file has {size} bytes"]
            header = mm[off - _BLOCK:off]
            h_name = header[:100].split(b"\0", 1)[0].decode(errors="replace")
            try:
                h_size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                h_size = -1
            if off < _BLOCK or h_name != name or h_size != n:
                return [f"{tar}: index entry {name} (offset {off}, {n} bytes) does not point at that member "
                        f"(header there: {h_name!r}, {h_size} bytes)"]
    try:
        with tarfile.open(tar, "r:") as t:
            members = [(m.offset_data, m.size, m.name) for m in t if m.isreg()]
    except tarfile.TarError as e:
        return [f"{tar}: unreadable tar: {e}"]
    if members != indexed:
        return [f"{tar}: holds {len(members)} members, its index lists {len(indexed)} (or they differ)"]
    return []


# ----------------------------------------------------------------------------- reading

class SplitReader:
    """Random access to one split's samples: ``read(i)`` gives the image bytes (JPEG or PNG)
    of sample ``i``.

    Keys and labels are read once, when the reader is made (each tar opened once); each process
    that reads opens the tars itself, when it first reads one, so the reader pickles small and
    works in DataLoader workers.
    """

    def __init__(self, dataset_dir: Path, split: str):
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        manifest = load_manifest(self.dataset_dir)
        if split not in manifest["splits"]:
            raise ShardError(f"{self.dataset_dir}: no split {split!r} "
                             f"(it has {', '.join(manifest['splits'])})")
        shards = manifest["splits"][split]["shards"]
        self.tars = [str(self.dataset_dir / s["tar"]) for s in shards]
        self.keys: list[str] = []
        shard, offsets, sizes, pids, camids = [], [], [], [], []
        for si, s in enumerate(shards):
            entries = read_index(self.dataset_dir / s["idx"])
            with open(self.tars[si], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                for key, comps in entries:
                    (jo, jn, _), (mo, mn, _) = image_member(comps, f"{self.tars[si]}:{key}"), comps["json"]
                    if max(jo + jn, mo + mn) > len(mm):
                        raise ShardError(f"{self.tars[si]} is truncated (sample {key}): run "
                                         "tools/make_shards.py --verify")
                    meta = json.loads(mm[mo:mo + mn])
                    self.keys.append(key)
                    shard.append(si)
                    offsets.append(jo)
                    sizes.append(jn)
                    pids.append(meta["pid"])
                    camids.append(meta["camid"])
        self._shard = np.asarray(shard, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self.pids = np.asarray(pids, dtype=np.int64)
        self.camids = np.asarray(camids, dtype=np.int64)
        self._files: dict[int, int] = {}  # shard -> file descriptor, opened in each process that reads

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> bytes:
        """Sample i's image bytes; a shard cut short since the reader was made (a reference past
        the end of a memory map would kill the reading process with SIGBUS) raises a
        :class:`ShardError` naming the sample."""
        si, off, size = int(self._shard[i]), int(self._offsets[i]), int(self._sizes[i])
        fd = self._files.get(si)
        if fd is None:
            fd = self._files[si] = os.open(self.tars[si], os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(fd, size, off)
        if len(data) < size:
            raise ShardError(f"{self.location(i)}: the shard is truncated (it ends at byte "
                             f"{os.fstat(fd).st_size}, this sample at byte {off + size}): run "
                             "tools/make_shards.py --verify")
        return data

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)

    def location(self, i: int) -> str:
        return f"{self.tars[int(self._shard[i])]}:{self.keys[i]}"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}  # each process opens the tars itself
        return state
