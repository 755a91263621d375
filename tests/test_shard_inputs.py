"""tools/make_shards.py on raw data a user may really have: file names with a space or a dot, .jpeg
files, a garbage .mat, raw data changed after a build, an edited manifest, two builds into one
folder; and train.py --data-dir pointing at a bad image."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

import train
from pipeline.runlock import hold_folder
from pipeline.shards import SplitReader
from tests.runs import small_run
from tools import make_shards

MARKET = Path("market1501") / "Market-1501-v15.09.15"


@pytest.fixture
def raw_market(synthetic_data, tmp_path) -> Path:
    """A writable copy of the synthetic Market-1501 raw folder (DATA with one dataset)."""
    shutil.copytree(synthetic_data / "market1501", tmp_path / "raw" / "market1501")
    return tmp_path / "raw"


def build(raw: Path, out: Path, *extra: str) -> int:
    return make_shards.main(["--data-dir", str(raw), "--out", str(out), "--datasets", "market1501", *extra])


def test_any_name_after_the_person_and_camera_is_accepted(raw_market, tmp_path):
    """A space, a dot or a long suffix cannot be in a sample key (the index splits at spaces, the
    extension starts at the first dot, a tar member name holds 100 bytes): such images get a derived
    key, unique, and their JSON record keeps the file name."""
    query = raw_market / MARKET / "query"
    first = sorted(query.iterdir())[0]
    names = [f"{first.stem} (1).jpg", f"{first.stem}.v2.jpg", f"{first.stem}_{'x' * 100}.jpg",
             f"{first.stem}_{'x' * 99}y.jpg"]
    for name in names:
        shutil.copy(first, query / name)
    out = tmp_path / "shards"
    assert build(raw_market, out) == 0
    files = {}  # the JSON record's file -> the sample's key
    for tar in sorted((out / "market1501").glob("query-*.tar")):
        with tarfile.open(tar) as t:
            files.update({json.loads(t.extractfile(m).read())["file"]: m.name[:-len(".json")]
                          for m in t.getmembers() if m.name.endswith(".json")})
    assert len(files) == len(set(files.values())) == len(list(query.iterdir()))
    assert sorted(SplitReader(out / "market1501", "query").keys) == sorted(files.values())
    for name in names:
        key = files[f"query/{name}"]
        assert key.startswith(f"query_{first.stem}_") and len(key) <= 95 and not set(key) & set(" ."), key
    assert files[f"query/{first.name}"] == f"query_{first.stem}"  # a name that is a key stays one
    assert make_shards.main(["--out", str(out), "--verify"]) == 0


def test_jpeg_files_count_and_changed_raw_data_rebuilds(raw_market, tmp_path, capsys):
    query = raw_market / MARKET / "query"
    jpgs = sorted(query.iterdir())
    jpgs[0].rename(jpgs[0].with_suffix(".jpeg"))
    out = tmp_path / "shards"
    assert build(raw_market, out) == 0
    manifest = json.loads((out / "market1501" / "manifest.json").read_text())
    assert manifest["splits"]["query"]["images"] == len(jpgs)

    capsys.readouterr()
    assert build(raw_market, out) == 0
    assert "complete" in capsys.readouterr().out  # unchanged raw data: skipped
    jpgs[1].unlink()
    assert build(raw_market, out) == 0
    assert "the raw data changed since the build" in capsys.readouterr().out
    manifest = json.loads((out / "market1501" / "manifest.json").read_text())
    assert manifest["splits"]["query"]["images"] == len(jpgs) - 1


def test_a_garbage_mat_file_is_one_line(synthetic_data, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(synthetic_data / "cuhk03", raw / "cuhk03")
    config = raw / "cuhk03" / "cuhk03_new_protocol_config_detected.mat"
    config.write_bytes(b"MATLAB 5.0 MAT-file".ljust(128, b" ") + bytes(range(256)) * 4)
    assert make_shards.main(["--data-dir", str(raw), "--out", str(tmp_path / "shards")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("make_shards.py: error: ") and f"{config}: not readable as a MATLAB v5 file" in err
    assert "Traceback" not in err


def test_verify_checks_the_manifest_against_the_records(synthetic_shards, tmp_path, capsys):
    for edit, problem in [(lambda m: m.update(dataset="dukemtmc"), "dataset 'dukemtmc', but the folder is"),
                          (lambda m: m["splits"]["query"].update(ids=m["splits"]["query"]["ids"] + 1),
                           "split query says ids")]:
        out = tmp_path / "shards"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(synthetic_shards / "market1501", out / "market1501")
        path = out / "market1501" / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
        capsys.readouterr()
        assert make_shards.main(["--out", str(out), "--verify"]) == 1
        assert problem in capsys.readouterr().out


def test_two_builds_into_one_folder(raw_market, tmp_path, capsys):
    out = tmp_path / "shards"
    out.mkdir()
    with hold_folder(out):  # this process is the first build
        assert build(raw_market, out) == 2
    assert "is in use by another process" in capsys.readouterr().err
    assert build(raw_market, out) == 0


def sources_beside(synthetic_shards: Path, shards: Path) -> Path:
    """A shards folder holding the three sources' shards (links), without market1501's."""
    shards.mkdir()
    for name in ("dukemtmc", "cuhk03", "msmt17v1"):
        (shards / name).symlink_to(synthetic_shards / name)
    return shards


def test_train_data_dir_with_a_bad_image_says_how_to_skip_it(raw_market, synthetic_shards, tmp_path, capsys):
    bad = sorted((raw_market / MARKET / "query").iterdir())[0]
    bad.write_bytes(b"\xff\xd8\xff" + bytes(200))  # a JPEG header, then nothing decodable
    shards = sources_beside(synthetic_shards, tmp_path / "shards")
    capsys.readouterr()
    assert train.main([*small_run(shards, tmp_path / "logs"), "--data-dir", str(raw_market)]) == 2
    err = capsys.readouterr().err
    assert "tools/make_shards.py --skip-bad skips such images" in err and "use --skip-bad" not in err
    line = next(line for line in err.splitlines() if line.startswith("train.py: error: "))
    assert "python tools/make_shards.py --data-dir" in line and "--skip-bad" in line


def test_train_data_dir_with_a_misnamed_image_does_not_advise_skip_bad(raw_market, synthetic_shards, tmp_path,
                                                                       capsys):
    """--skip-bad skips images that do not decode; a name the layout refuses needs a rename."""
    query = raw_market / MARKET / "query"
    shutil.copy(sorted(query.iterdir())[0], query / "0001_c9s1_000001_01.jpg")  # camera 9 of 6
    shards = sources_beside(synthetic_shards, tmp_path / "shards")
    capsys.readouterr()
    assert train.main([*small_run(shards, tmp_path / "logs"), "--data-dir", str(raw_market)]) == 2
    err = capsys.readouterr().err
    assert "0001_c9s1_000001_01.jpg" in err and "--skip-bad" not in err, err
