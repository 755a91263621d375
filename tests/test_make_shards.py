"""tools/make_shards.py end to end on the synthetic raw datasets."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from pipeline.runlock import LOCK_NAME
from pipeline import shards
from pipeline.records import DATASETS, SPLITS, mix_labels
from tools import make_shards


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        make_shards.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data-dir", "--out", "--datasets", "--custom", "--workers", "--shard-size", "--skip-bad",
                 "--verify", "--cuhk03-labeled"):
        assert flag in text


def test_unknown_dataset_is_named_with_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        make_shards.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                          "--datasets", "market,dukemtmc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("make_shards.py: error: --datasets: unknown name(s) market")
    assert err.count("\n") == 1
    assert all(n in err for n in DATASETS)


def test_counts_equal_the_parsers(synthetic_data, synthetic_shards):
    from pipeline.datasets import parse

    for name in DATASETS:
        parsed = parse(name, synthetic_data)
        m = shards.load_manifest(synthetic_shards / name)
        everything = []
        for split in SPLITS:
            records = parsed.split(split)
            everything += records
            if not records:
                assert split not in m["splits"]
                continue
            info = m["splits"][split]
            assert (info["images"], info["ids"], info["cams"]) == (
                len(records), len({r.pid for r in records}), len({r.camid for r in records})), (name, split)
            reader = shards.SplitReader(synthetic_shards / name, split)
            assert reader.keys == [r.key for r in records]
            assert reader.pids.tolist() == [r.pid for r in records]
            assert reader.camids.tolist() == [r.camid for r in records]
        labels = mix_labels([(r.dataset, r.split, r.pid) for r in everything])
        assert m["mix"] == {"images": sum(x >= 0 for x in labels), "ids": len({x for x in labels if x >= 0})}
    assert make_shards.main(["--out", str(synthetic_shards), "--verify"]) == 0


def test_rerun_skips_and_changes_nothing(synthetic_data, tmp_path, capsys):
    args = ["--data-dir", str(synthetic_data), "--out", str(tmp_path), "--datasets", "market1501,cuhk03"]
    assert make_shards.main(args + ["--shard-size", "50"]) == 0
    before = _hashes(tmp_path)
    capsys.readouterr()
    assert make_shards.main(args) == 0
    out = capsys.readouterr().out
    assert "market1501: complete" in out and "cuhk03: complete" in out and "skipped" in out
    assert _hashes(tmp_path) == before
    (tmp_path / "market1501" / "query-000000.tar").unlink()  # an incomplete dataset is rebuilt, identically
    assert make_shards.main(args + ["--shard-size", "50"]) == 0
    assert _hashes(tmp_path) == before


def test_verify_names_a_damaged_shard(synthetic_shards, tmp_path, capsys):
    shutil.copytree(synthetic_shards / "dukemtmc", tmp_path / "dukemtmc")
    tar = tmp_path / "dukemtmc" / "gallery-000000.tar"
    tar.write_bytes(tar.read_bytes()[:-20000])
    capsys.readouterr()
    assert make_shards.main(["--out", str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "dukemtmc: 2 problem(s)" in out and f"{tar} is truncated" in out


def test_foreign_out_folder_is_refused(synthetic_data, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    assert make_shards.main(["--data-dir", str(synthetic_data), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("make_shards.py: error: --out ") and "photos" in err and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]


def test_corrupt_image_stops_or_is_skipped(synthetic_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data / "market1501", data / "market1501")
    from pipeline.datasets import parse

    bad = Path(parse("market1501", data).query[5].path)
    bad.write_bytes(bad.read_bytes()[:300])
    args = ["--data-dir", str(data), "--out", str(tmp_path / "out"), "--workers", "2", "--shard-size", "40"]
    assert make_shards.main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("make_shards.py: error: ") and str(bad) in last, last
    assert [p.name for p in (tmp_path / "out").iterdir()] == [LOCK_NAME]  # only the build lock, no shard
    assert make_shards.main(args + ["--skip-bad"]) == 0
    m = json.loads((tmp_path / "out" / "market1501" / "manifest.json").read_text())
    assert m["skipped"]["count"] == 1 and m["skipped"]["images"][0]["file"].endswith(bad.name)
    assert shards.verify_dataset(tmp_path / "out" / "market1501") == []


def _image_exts(dataset_dir: Path) -> set[str]:
    return {ext for idx in dataset_dir.glob("*.idx") for _, comps in shards.read_index(idx)
            for ext in comps if ext != "json"}


def test_each_dataset_stores_its_images_in_its_format(synthetic_shards):
    """CUHK03 arrays losslessly as PNG; JPEG files as they are, CUHK-SYSU crops as JPEG."""
    assert {name: _image_exts(synthetic_shards / name) for name in DATASETS} == {
        "market1501": {"jpg"}, "dukemtmc": {"jpg"}, "msmt17v1": {"jpg"}, "cuhk03": {"png"},
        "cuhk_sysu": {"jpg"}}


def test_shards_of_format_1_are_rebuilt(synthetic_data, tmp_path, capsys):
    """Format 1 stored CUHK03 arrays as JPEG: a rerun rebuilds such a set instead of failing."""
    args = ["--data-dir", str(synthetic_data), "--out", str(tmp_path), "--datasets", "cuhk03"]
    assert make_shards.main(args) == 0
    manifest = tmp_path / "cuhk03" / shards.MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": 1}))
    capsys.readouterr()
    assert make_shards.main(args) == 0
    out = capsys.readouterr().out
    assert "cuhk03: existing shards unusable (" in out and "shards built with format 1" in out
    assert shards.load_manifest(tmp_path / "cuhk03")["format"] == shards.FORMAT_VERSION
    assert make_shards.main(["--out", str(tmp_path), "--verify"]) == 0
