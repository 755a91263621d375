"""tools/make_synthetic.py: layouts, ground truth, determinism, size, looks, refusal."""
from __future__ import annotations

import filecmp
import json

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import parse
from tools import make_synthetic


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_layouts_are_the_real_ones(synthetic_data):
    market = synthetic_data / "market1501" / "Market-1501-v15.09.15"
    assert (market / "bounding_box_train" / "Thumbs.db").is_file()
    names = [p.name for p in (market / "bounding_box_test").iterdir()]
    assert any(n.startswith("-1_c") for n in names) and any(n.startswith("0000_c") for n in names)
    msmt = synthetic_data / "msmt17v1" / "MSMT17_V1"
    for lst in ("train", "val", "query", "gallery"):
        first = (msmt / f"list_{lst}.txt").read_text().splitlines()[0].split()
        assert len(first) == 2 and first[0].endswith(".jpg")
    sysu = synthetic_data / "cuhk_sysu" / "CUHK-SYSU"
    assert (sysu / "annotation" / "test" / "train_test" / "TestG50.mat").is_file()
    mat = synthetic_data / "cuhk03" / "cuhk03_release" / "cuhk-03.mat"
    assert mat.read_bytes()[:10] == b"MATLAB 7.3"
    with h5py.File(mat, "r") as f:
        assert f["detected"].shape == (1, 5) and f["labeled"].shape == (1, 5)
        cells = f[f["detected"][0, 0]][()].T
        assert cells.shape == (12, 10)
        shapes = [f[ref].shape for ref in cells.ravel()]
    assert any(len(s) == 1 for s in shapes), "some cells should be empty"
    assert all(s[0] == 3 for s in shapes if len(s) == 3)  # stored transposed: 3 x W x H


def test_ground_truth_shape_and_scales():
    small, medium = make_synthetic.expected_counts("small"), make_synthetic.expected_counts("medium")
    assert set(small) == {"market1501", "dukemtmc", "msmt17v1", "cuhk03", "cuhk03_labeled", "cuhk_sysu"}
    for name, counts in small.items():
        assert 24 <= counts["train"][1] <= 40, name
        if name != "cuhk_sysu":
            assert 20 <= counts["query"][1] <= 30, name
    ratio = sum(c["mix"][0] for c in medium.values()) / sum(c["mix"][0] for c in small.values())
    assert 8 <= ratio <= 12
    assert small["msmt17v1"]["mix"][1] == small["msmt17v1"]["train"][1] + small["msmt17v1"]["query"][1]


def test_small_stays_under_30_mb(synthetic_data):
    assert sum(p.stat().st_size for p in synthetic_data.rglob("*") if p.is_file()) < 30 * 2 ** 20


def test_same_seed_same_bytes_and_rerun_replaces(synthetic_data, tmp_path):
    out = tmp_path / "data"
    assert make_synthetic.main(["--out", str(out), "--seed", "0", "--no-progress"]) == 0
    files = _files(synthetic_data)
    assert files == _files(out)
    match, mismatch, errors = filecmp.cmpfiles(synthetic_data, out, files, shallow=False)
    assert not mismatch and not errors
    # an earlier output may be overwritten; another seed gives other pictures
    assert make_synthetic.main(["--out", str(out), "--seed", "1", "--no-progress"]) == 0
    assert json.loads((out / make_synthetic.MARKER).read_text())["seed"] == 1
    a = synthetic_data / "market1501" / "Market-1501-v15.09.15" / "query"
    b = out / "market1501" / "Market-1501-v15.09.15" / "query"
    assert sorted(p.name for p in a.iterdir()) != sorted(p.name for p in b.iterdir())


def test_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert make_synthetic.main(["--out", str(tmp_path), "--no-progress"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert _files(tmp_path) == ["notes.txt"]


def test_a_rerun_deletes_only_its_own_files(tmp_path, capsys):
    """An earlier output may be replaced, but a file someone else put inside its dataset folders
    is never deleted: the rerun is refused with every file left as it was; so is an earlier
    output whose marker does not list its files (it cannot tell them from the user's)."""
    out = tmp_path / "data"
    assert make_synthetic.main(["--out", str(out), "--no-progress"]) == 0
    notes = out / "market1501" / "extra" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    (out / "mine.txt").write_text("beside the datasets: never touched")
    before = {f: (out / f).read_bytes() for f in _files(out)}
    capsys.readouterr()
    assert make_synthetic.main(["--out", str(out), "--seed", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "market1501/extra/notes.txt" in err and "did not write" in err and len(err.splitlines()) == 1
    assert {f: (out / f).read_bytes() for f in _files(out)} == before
    notes.unlink()
    assert make_synthetic.main(["--out", str(out), "--seed", "1", "--no-progress"]) == 0
    assert (out / "mine.txt").read_text() == "beside the datasets: never touched"
    marker = out / make_synthetic.MARKER
    old = {k: v for k, v in json.loads(marker.read_text()).items() if k != "files"}
    marker.write_text(json.dumps(old))
    capsys.readouterr()
    assert make_synthetic.main(["--out", str(out), "--no-progress"]) == 2
    assert "does not list the files" in capsys.readouterr().err
    assert (out / "market1501").is_dir()


def test_help_names_every_flag(capsys):
    with pytest.raises(SystemExit):
        make_synthetic.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--scale", "--seed", "--no-progress"):
        assert flag in text


def _pixels(records):
    out = []
    for r in records:
        a = np.asarray(Image.open(r.path).convert("RGB").resize((8, 16)), np.float32).ravel()
        out.append((a - a.mean()) / np.linalg.norm(a - a.mean()))
    return np.stack(out)


def test_identities_look_different_and_datasets_have_styles(synthetic_data):
    """Raw-pixel nearest neighbour finds most Market queries (chance is ~4%), and the datasets'
    mean colours differ: enough signal to learn, a real style gap between domains."""
    s = parse("market1501", synthetic_data)
    q, g = _pixels(s.query), _pixels(s.gallery)
    qp, gp = np.array([r.pid for r in s.query]), np.array([r.pid for r in s.gallery])
    qc, gc = np.array([r.camid for r in s.query]), np.array([r.camid for r in s.gallery])
    sim = q @ g.T
    sim[(qp[:, None] == gp[None]) & (qc[:, None] == gc[None])] = -np.inf
    assert np.mean(gp[sim.argmax(1)] == qp) > 0.4
    means = {n: np.mean([np.asarray(Image.open(r.path).convert("RGB"), np.float32).mean((0, 1))
                         for r in parse(n, synthetic_data).train[:40]], 0)
             for n in ("market1501", "dukemtmc", "msmt17v1")}
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(means[a] - means[b]).max() > 15, (a, b)
