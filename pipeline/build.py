"""Building shards from the raw datasets (docs/design.md, "Raw datasets" and "Shards"): the
library behind ``tools/make_shards.py`` and ``train.py --data-dir``.

Datasets whose shards are already complete are skipped, so an interrupted build can simply be
started again; a dataset whose raw files changed since its shards were built (the manifest
records their count, sizes and names) is rebuilt. One build at a time writes into OUT (a lock,
``pipeline/runlock.py``).
"""
from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from pipeline.runlock import LOCK_NAME, FolderBusy, hold_folder
from pipeline import shards
from pipeline.records import CUSTOM_NAME, DATASETS, MARKER, SPLITS, DatasetSplits

# What OUT itself may hold besides dataset folders (the repository's shards/ keeps a README;
# a build holds OUT/.lock).
_OUT_EXTRAS = {"README.md", ".gitignore", ".gitkeep", LOCK_NAME}

# (images, identities) per split as the datasets' authors publish them (CUHK03: the new
# protocol of Zhong et al. 2017; MSMT17_V1 train = list_train + list_val). A real dataset that
# parses to other counts is incomplete or laid out otherwise than pipeline/datasets.py reads it.
PUBLISHED_COUNTS = {
    "market1501": {"train": (12936, 751), "query": (3368, 750), "gallery": (15913, 751)},
    "dukemtmc": {"train": (16522, 702), "query": (2228, 702), "gallery": (17661, 1110)},
    "cuhk03": {"train": (7365, 767), "query": (1400, 700), "gallery": (5332, 700)},
    "cuhk03_labeled": {"train": (7368, 767), "query": (1400, 700), "gallery": (5328, 700)},
    "msmt17v1": {"train": (32621, 1041), "query": (11659, 3060), "gallery": (82161, 3060)},
}
# The manifest's "custom" entry of a custom set (tools/make_shards.py --custom): the layout it was read in.
CUSTOM_LAYOUT = "market1501"
log = logging.getLogger("make_shards")  # the messages of a build, whoever started it


class CustomSetError(ValueError):
    """A custom set that cannot be built: a name that is not allowed, or a folder that is not in
    Market-1501's layout."""


def build_shards(data_dir: Path | None, out: Path, datasets: list[str] | None = None, *,
                 custom: dict[str, Path] | None = None, workers: int = 1, skip_bad: bool = False,
                 shard_size: int = 5000, cuhk03_labeled: bool = False,
                 progress: Callable[[str], None] = print) -> list[tuple[str, dict, float | None]]:
    """Shards of ``datasets`` (default: every one found in ``data_dir``; none without it) and of
    the ``custom`` sets (name -> a folder in Market-1501's layout, whose layout is checked before
    anything is written) into ``out/<name>/``; ``progress`` takes one line per dataset and the
    summary table. Returns (name, manifest, build seconds or None when skipped) per dataset.
    Raises :class:`CustomSetError` for a custom set's bad name or layout, ``shards.ShardError``,
    ValueError or OSError naming what is wrong."""
    from pipeline.datasets import parse  # the parsers need h5py/scipy; verifying does not

    out, custom = Path(out), {name: Path(folder) for name, folder in (custom or {}).items()}
    data_dir = None if data_dir is None else Path(data_dir)
    names = datasets or ([n for n in DATASETS if (data_dir / n).is_dir()] if data_dir else [])
    if not names and (data_dir is not None or not custom):
        raise shards.ShardError(f"{data_dir}: no dataset folders found (expected some of "
                                f"{', '.join(DATASETS)}, each as DATA/<name>/<folder>)")
    parsed = _parse_custom(custom)
    _check_out(out, list(custom))
    how = {"workers": workers, "skip_bad": skip_bad, "shard_size": shard_size, "progress": progress}
    with _holding(out):
        rows = []
        for name in names:
            options = {"cuhk03_labeled": cuhk03_labeled} if name == "cuhk03" else {}
            rows.append(_build_one(name, data_dir / name, out, options,
                                   partial(parse, name, data_dir, cuhk03_labeled=cuhk03_labeled),
                                   compare_counts=not (data_dir / MARKER).is_file(), **how))
        for name, folder in custom.items():
            rows.append(_build_one(name, folder, out, {"custom": CUSTOM_LAYOUT}, partial(parsed.get, name),
                                   compare_counts=False, **how))
    progress(summary(rows))
    return rows


def _parse_custom(custom: dict[str, Path]) -> dict[str, DatasetSplits]:
    """Each custom set's records, its name and layout checked before anything is written."""
    from pipeline.datasets import DatasetError, parse_custom

    parsed = {}
    for name, folder in custom.items():
        if name in DATASETS or not CUSTOM_NAME.fullmatch(name):
            raise CustomSetError(f"--custom {name}={folder}: expected a NAME of lowercase letters, digits "
                                 f"and underscores, other than the built-in {', '.join(DATASETS)}; "
                                 f"got {name!r}")
        try:
            parsed[name] = parse_custom(name, folder)
        except DatasetError as e:
            raise CustomSetError(f"--custom {name}={folder}: {e}") from None
    return parsed


@contextmanager
def _holding(out: Path) -> Iterator[None]:
    """OUT for this build only: two builds into one folder would write the same shards."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = hold_folder(out)
    except FolderBusy as e:
        raise shards.ShardError(f"--out {e}: another build is writing there; wait for it to end") from None
    with lock:
        yield



def _build_one(name: str, raw_dir: Path, out: Path, options: dict, read: Callable[[], DatasetSplits], *,
               compare_counts: bool, workers: int, skip_bad: bool, shard_size: int,
               progress: Callable[[str], None]) -> tuple[str, dict, float | None]:
    """``name`` from ``raw_dir`` (parsed by ``read``), unless its shards are complete, built with
    ``options`` (stored in the manifest) and from the same raw files."""
    raw = raw_fingerprint(raw_dir)
    reason = _needs_build(out / name, options) or _raw_changed(out / name, raw)
    if reason is None:
        progress(f"{name}: complete in {out / name}, skipped (delete that folder to rebuild)")
        return name, shards.load_manifest(out / name), None
    progress(f"{name}: {reason}, building")
    start = time.perf_counter()
    splits = read()
    if compare_counts:  # synthetic look-alikes and custom sets have no published counts to match
        for msg in count_differences(splits, options.get("cuhk03_labeled", False)):
            log.warning("%s (is %s complete?)", msg, raw_dir)
    manifest = shards.write_dataset(splits, out, shard_size=shard_size, workers=workers,
                                    skip_bad=skip_bad, extra={**options, "raw": raw})
    if "skipped" in manifest:
        progress(f"{name}: skipped {manifest['skipped']['count']} bad image(s), listed in "
                 f"{out / name / shards.MANIFEST}")
    return name, manifest, time.perf_counter() - start


def count_differences(splits, cuhk03_labeled: bool = False) -> list[str]:
    """One sentence per split whose parsed counts differ from the published ones (none for a
    dataset without published counts, CUHK-SYSU)."""
    key = "cuhk03_labeled" if splits.name == "cuhk03" and cuhk03_labeled else splits.name
    out = []
    for split, (images, ids) in PUBLISHED_COUNTS.get(key, {}).items():
        records = splits.split(split)
        found = (len(records), len({r.pid for r in records}))
        if found != (images, ids):
            out.append(f"{key} {split}: found {found[0]} images of {found[1]} identities, the published "
                       f"dataset has {images} images of {ids} identities")
    return out


def _check_out(out: Path, custom: list[str]) -> None:
    """Refuse an OUT that holds anything but our dataset folders (built-in names, the ``custom``
    sets being built, complete custom sets) and a README."""
    if out.exists() and not out.is_dir():
        raise shards.ShardError(f"--out {out} is a file, expected a folder")
    ours = {*DATASETS, *custom, *shards.custom_sets(out), *_OUT_EXTRAS}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
    if foreign:
        raise shards.ShardError(f"--out {out} holds things that are not shards of this program "
                                f"({', '.join(foreign[:5])}): refusing to write there")


def raw_fingerprint(folder: Path) -> dict:
    """What a build reads, cheaply (no file is opened): the count, total size and a digest of
    the names and sizes of every file under DATA/<name>. An added, removed, renamed or resized
    file changes it; an edit that keeps a file's size does not."""
    digest, files, size = hashlib.sha256(), 0, 0
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        n = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\t{n}\n".encode())
        files, size = files + 1, size + n
    return {"files": files, "bytes": size, "digest": digest.hexdigest()}


def _raw_changed(dataset_dir: Path, raw: dict) -> str | None:
    """Why complete shards no longer match their raw data, or None (also for shards built before
    the manifest recorded it)."""
    then = shards.load_manifest(dataset_dir).get("raw")
    if then is None or then == raw:
        return None
    return (f"the raw data changed since the build ({then['files']} files, {then['bytes']} bytes then; "
            f"{raw['files']} files, {raw['bytes']} bytes now)")


def _needs_build(dataset_dir: Path, extra: dict) -> str | None:
    """Why the dataset must be (re)built, or None when its shards are complete (cheap: no hashing)."""
    if not (dataset_dir / shards.MANIFEST).is_file():
        return "no manifest" if not dataset_dir.exists() else "incomplete earlier build"
    try:
        manifest = shards.load_manifest(dataset_dir)
        for info in manifest["splits"].values():
            for s in info["shards"]:
                entries = shards.read_index(dataset_dir / s["idx"])
                end = max(off + n for _, comps in entries for off, n, _ in comps.values())
                if len(entries) != s["samples"] or (dataset_dir / s["tar"]).stat().st_size < end:
                    return f"shard {s['tar']} is incomplete"
    except (shards.ShardError, ValueError, KeyError) as e:
        return f"existing shards unusable ({str(e).splitlines()[0]})"
    if any(manifest.get(k) != v for k, v in extra.items()):
        return f"built with other options ({', '.join(f'{k}={manifest.get(k)}' for k in extra)})"
    return None


def summary(rows: list[tuple[str, dict, float | None]]) -> str:
    """Images/ids per split and of the mix set, build time and speed, one line per dataset."""
    head = f"{'dataset':<11}" + "".join(f"{s + ' img/ids':>16}" for s in SPLITS) + \
        f"{'mix img/ids':>16}{'time s':>9}{'img/s':>9}"
    lines = [head, "-" * len(head)]
    for name, m, secs in rows:
        cells = [f"{m['splits'][s]['images']}/{m['splits'][s]['ids']}" if s in m["splits"] else "-"
                 for s in SPLITS]
        images = sum(info["images"] for info in m["splits"].values())
        timing = f"{secs:>9.1f}{images / secs:>9.0f}" if secs else f"{'skipped':>9}{'':>9}"
        lines.append(f"{name:<11}" + "".join(f"{c:>16}" for c in cells) +
                     f"{m['mix']['images']}/{m['mix']['ids']:<}".rjust(16) + timing)
    return "\n".join(lines)
