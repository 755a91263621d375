"""The shard format on real files: JPEGs and PNGs written with PIL, real tars, DALI's own reader
and indexer."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import shards
from pipeline.records import DatasetSplits, Record


def index_tar(tar_path: Path, idx_path: Path) -> None:
    """The index of a finished tar, from its members' offsets (the writer knows them as it writes)."""
    with tarfile.open(tar_path, "r:") as tar:
        shards.write_index(idx_path, [(m.name, m.offset_data, m.size) for m in tar if m.isreg()])


def _image(path: Path, seed: int) -> Path:
    """A random 48x24 RGB picture, JPEG or PNG as the suffix says."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (48, 24, 3), dtype=np.uint8)).save(path, quality=90)
    return path


@pytest.fixture
def raw(tmp_path) -> DatasetSplits:
    """A small 'dataset' of real image files: 7 train images, 3 query, 4 gallery; every third
    one a PNG (as CUHK03-NP folders hold), the others JPEG."""
    folder = tmp_path / "raw"
    folder.mkdir()
    splits = DatasetSplits("market1501")
    n = 0
    for split, count in (("train", 7), ("query", 3), ("gallery", 4)):
        for i in range(count):
            pid, cam = 1 + i // 2, i % 3
            name = f"{pid:04d}_c{cam + 1}s1_{n:06d}_00.{'png' if n % 3 == 1 else 'jpg'}"
            path = _image(folder / name, n)
            splits.split(split).append(Record(key=f"{split}_{Path(name).stem}", pid=pid, camid=cam,
                                              dataset="market1501", split=split, file=f"{split}/{name}",
                                              path=str(path)))
            n += 1
    return splits


def _build(raw: DatasetSplits, out: Path, **kw) -> dict:
    return shards.write_dataset(raw, out, shard_size=3, progress=False, **kw)


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_write_then_read_back(raw, tmp_path):
    m = _build(raw, tmp_path / "out")
    d = tmp_path / "out" / "market1501"
    assert m == json.loads((d / "manifest.json").read_text())
    assert m["format"] == 2 and m["dataset"] == "market1501" and "skipped" not in m
    assert {s: (v["images"], v["ids"], v["cams"], len(v["shards"])) for s, v in m["splits"].items()} == {
        "train": (7, 4, 3, 3), "query": (3, 2, 3, 1), "gallery": (4, 2, 3, 2)}
    assert m["mix"] == {"images": 14, "ids": 4 + 2}  # train ids and test ids are kept apart
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["manifest.json"] + [f"{s}-{i:06d}.{e}" for s, k in (("train", 3), ("query", 1), ("gallery", 2))
                             for i in range(k) for e in ("tar", "idx")])
    for split in ("train", "query", "gallery"):
        records = raw.split(split)
        reader = shards.SplitReader(d, split)
        assert len(reader) == len(records)
        assert reader.keys == [r.key for r in records]
        assert reader.pids.tolist() == [r.pid for r in records]
        assert reader.camids.dtype == np.int64 and reader.camids.tolist() == [r.camid for r in records]
        for i, r in enumerate(records):
            assert reader.read(i) == Path(r.path).read_bytes()  # original bytes, not re-encoded
        members = [name for tar in reader.tars for name in tarfile.open(tar).getnames()]
        assert members == [f"{r.key}{e}" for r in records for e in (Path(r.path).suffix, ".json")]
        clone = pickle.loads(pickle.dumps(reader))
        assert not clone._files and clone.read(len(records) - 1) == reader.read(len(records) - 1)
        assert reader.location(0) == f"{d / (split + '-000000.tar')}:{records[0].key}"
    assert shards.verify_dataset(d) == []


def test_index_is_what_dali_wds2idx_writes(raw, tmp_path):
    _build(raw, tmp_path)
    wds2idx = Path(sys.executable).parent / "wds2idx"
    if not wds2idx.exists():
        pytest.skip("DALI's wds2idx is not installed")
    for tar in sorted((tmp_path / "market1501").glob("*.tar")):
        subprocess.run([sys.executable, str(wds2idx), str(tar), str(tmp_path / "dali.idx")],
                       check=True, capture_output=True)
        index_tar(tar, tmp_path / "ours.idx")  # indexing a finished tar gives the same text
        assert (tmp_path / "dali.idx").read_text() == tar.with_suffix(".idx").read_text()
        assert (tmp_path / "ours.idx").read_text() == tar.with_suffix(".idx").read_text()


def test_dali_webdataset_reader_gets_what_split_reader_gets(raw, tmp_path):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    _build(raw, tmp_path)
    d = tmp_path / "market1501"
    reader = shards.SplitReader(d, "train")
    tars = reader.tars
    idxs = [str(Path(t).with_suffix(".idx")) for t in tars]

    @dali.pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        image, meta = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg;png", "json"],
                                            random_shuffle=False, missing_component_behavior="error",
                                            name="r")
        return image, meta

    p = pipe()
    p.build()
    assert p.epoch_size("r") == len(reader)
    got = []
    while len(got) < len(reader):
        images, metas = p.run()
        got += [(np.array(images[j]).tobytes(), json.loads(np.array(metas[j]).tobytes()))
                for j in range(len(images))]
    assert {Path(r.path).suffix for r in raw.train} == {".jpg", ".png"}
    for i, (image, meta) in enumerate(got[:len(reader)]):
        r = raw.train[i]
        assert image == reader.read(i)
        assert meta == {"pid": int(reader.pids[i]), "camid": int(reader.camids[i]), "dataset": "market1501",
                        "split": "train", "file": r.file}


def test_rebuild_is_byte_identical(raw, tmp_path):
    _build(raw, tmp_path / "a")
    os.utime(raw.train[0].path, (1, 1))  # file times must not leak into the tars
    _build(raw, tmp_path / "b")
    assert _files(tmp_path / "a" / "market1501") == _files(tmp_path / "b" / "market1501")
    _build(raw, tmp_path / "a")  # over an existing build: same files again
    assert _files(tmp_path / "a" / "market1501") == _files(tmp_path / "b" / "market1501")


def test_parallel_build_equals_serial(raw, tmp_path):
    _build(raw, tmp_path / "a")
    _build(raw, tmp_path / "b", workers=2)
    assert _files(tmp_path / "a" / "market1501") == _files(tmp_path / "b" / "market1501")


@pytest.mark.parametrize("which", [0, 1])  # query 0 is a PNG, query 1 a JPEG
def test_corrupt_image_stops_and_leaves_nothing(raw, tmp_path, which):
    bad = Path(raw.query[which].path)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(shards.ShardError, match=str(bad)):
        _build(raw, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no shard, manifest, temporary or dataset folder


def test_corrupt_jpeg_keeps_previous_build(raw, tmp_path):
    _build(raw, tmp_path)
    before = _files(tmp_path / "market1501")
    bad = Path(raw.train[0].path)
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(shards.ShardError, match=str(bad)):
        _build(raw, tmp_path)
    assert _files(tmp_path / "market1501") == before


def test_skip_bad_counts_and_lists(raw, tmp_path):
    bad = Path(raw.query[1].path)
    bad.write_bytes(bad.read_bytes()[:200])
    m = _build(raw, tmp_path, skip_bad=True)
    assert m["skipped"]["count"] == 1 and m["skipped"]["images"][0]["file"] == raw.query[1].file
    assert m["splits"]["query"]["images"] == 2 and m["mix"]["images"] == 13
    reader = shards.SplitReader(tmp_path / "market1501", "query")
    assert reader.keys == [raw.query[0].key, raw.query[2].key]
    assert shards.verify_dataset(tmp_path / "market1501") == []


def test_truncated_tar_is_reported(raw, tmp_path):
    _build(raw, tmp_path)
    d = tmp_path / "market1501"
    tar = d / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1500])
    problems = shards.verify_dataset(d)
    assert any("sha256" in p for p in problems)
    assert any(f"{tar} is truncated" in p for p in problems)
    with pytest.raises(shards.ShardError, match="truncated"):
        shards.SplitReader(d, "train")


def test_changed_byte_and_wrong_index_are_reported(raw, tmp_path):
    _build(raw, tmp_path)
    d = tmp_path / "market1501"
    shutil.copy(d / "gallery-000000.idx", d / "gallery-000001.idx")  # an index of another tar
    data = bytearray((d / "query-000000.tar").read_bytes())
    data[600] ^= 0xFF
    (d / "query-000000.tar").write_bytes(bytes(data))
    problems = shards.verify_dataset(d)
    assert any("query-000000.tar: sha256" in p for p in problems)
    assert any("gallery-000001.idx: 3 samples, the manifest says 1" in p for p in problems)
    assert any("does not point at that member" in p for p in problems)


def test_missing_shards_are_all_listed(raw, tmp_path):
    _build(raw, tmp_path)
    d = tmp_path / "market1501"
    (d / "train-000002.tar").unlink()
    (d / "gallery-000000.idx").unlink()
    with pytest.raises(shards.ShardError, match="2 shard file") as e:
        shards.load_manifest(d)
    assert str(d / "train-000002.tar") in str(e.value) and str(d / "gallery-000000.idx") in str(e.value)
    assert shards.verify_dataset(d) == [str(e.value)]


def test_missing_manifest_and_other_format(raw, tmp_path):
    with pytest.raises(shards.ShardError, match="manifest.json not found"):
        shards.load_manifest(tmp_path / "market1501")
    _build(raw, tmp_path)
    path = tmp_path / "market1501" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": 1}))  # CUHK03 still JPEG
    with pytest.raises(shards.ShardError, match="shards built with format 1, this program reads format 2: "
                                                "rebuild with tools/make_shards.py"):
        shards.SplitReader(tmp_path / "market1501", "train")


def test_sample_without_one_image_member_is_refused(raw, tmp_path):
    """A member of another image type (here .bmp) is no image the readers take."""
    _build(raw, tmp_path)
    d = tmp_path / "market1501"
    tar = d / "train-000000.tar"
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as t:
        for m, data in members:
            m.name = m.name.replace(".jpg", ".bmp")
            t.addfile(m, io.BytesIO(data))
    index_tar(tar, tar.with_suffix(".idx"))
    key = raw.train[0].key
    message = (f"{tar}:{key}: a sample needs one image member (.jpg or .png) and a .json member, "
               "it has .bmp, .json")
    assert message in shards.verify_dataset(d)
    with pytest.raises(shards.ShardError, match=re.escape(message)):
        shards.SplitReader(d, "train")


def test_foreign_folder_is_not_overwritten(raw, tmp_path):
    (tmp_path / "market1501").mkdir()
    (tmp_path / "market1501" / "notes.txt").write_text("mine")
    with pytest.raises(shards.ShardError, match="notes.txt"):
        _build(raw, tmp_path)
    assert [p.name for p in (tmp_path / "market1501").iterdir()] == ["notes.txt"]


def test_bad_keys_are_refused(raw, tmp_path):
    raw.gallery.append(raw.gallery[0])
    with pytest.raises(shards.ShardError, match="must be unique"):
        _build(raw, tmp_path)
