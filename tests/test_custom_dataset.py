"""Users' own datasets: ``tools/make_shards.py --custom NAME=DIR`` turns a folder in Market-1501's
layout into shards under NAME, which then trains as a source and evaluates as a target; a bad
name or layout is refused in one line (exit 2) with nothing written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine.run
import train
from pipeline import shards
from tests.runs import small_run
from tools import extract, make_shards

MARKET = Path("market1501") / "Market-1501-v15.09.15"
FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def kept(folder: Path) -> list[Path]:
    """The images a Market-style split keeps: every JPEG but the junk (-1)."""
    return [p for p in folder.iterdir() if p.suffix == ".jpg" and not p.name.startswith("-1_")]


@pytest.fixture(scope="module")
def custom(synthetic_data, synthetic_shards, tmp_path_factory) -> tuple[Path, Path]:
    """A user's folder (the synthetic Market-1501's three folders, real JPEGs with junk and
    distractors, under another root) converted as "mycams" into a shards folder beside the other
    sources' shards; (shards folder, the user's folder)."""
    root = tmp_path_factory.mktemp("custom")
    own, out = root / "my cameras", root / "shards"
    for sub in FOLDERS.values():
        shutil.copytree(synthetic_data / MARKET / sub, own / sub)
    out.mkdir()
    for name in ("market1501", "dukemtmc", "cuhk03"):
        (out / name).symlink_to(synthetic_shards / name)
    assert make_shards.main(["--custom", f"mycams={own}", "--out", str(out)]) == 0
    return out, own


@pytest.mark.slow
def test_a_custom_folder_converts_trains_as_a_source_and_evaluates_as_a_target(custom, synthetic_shards,
                                                                               tmp_path, monkeypatch, capsys):
    out, own = custom
    manifest = shards.load_manifest(out / "mycams")
    assert manifest["dataset"] == "mycams" and manifest["custom"] == "market1501" and manifest["raw"]["files"]
    for split, sub in FOLDERS.items():
        assert manifest["splits"][split]["images"] == len(kept(own / sub)), split
    # the same images as the synthetic Market-1501: the same mix set, its distractors (0000) left out
    assert manifest["mix"] == shards.load_manifest(synthetic_shards / "market1501")["mix"]
    capsys.readouterr()
    assert make_shards.main(["--out", str(out), "--verify", "--datasets", "mycams"]) == 0
    assert "mycams: ok" in capsys.readouterr().out

    logs = tmp_path / "logs"
    small = ("--height", "32", "--width", "16", "--workers", "0")  # half small_run's time on 2 cores
    run = small_run(out, logs, "--dataset_src3", "mycams", "--iters", "1", "--eval-every", "0", *small)
    assert train.main(run) == 0
    ckpt = torch.load(logs / "latest.pth", weights_only=True)
    assert ckpt["config"]["sources"][2] == "mycams"
    assert ckpt["memories"][2].shape[0] == manifest["mix"]["ids"]  # one memory row per identity

    evaluated = []

    def counting(model, loader, *a, **k):
        evaluated.append((int(loader.is_query.sum()), int((~loader.is_query).sum())))
        return evaluate_target(model, loader, *a, **k)

    evaluate_target = engine.run.evaluate_target
    monkeypatch.setattr(engine.run, "evaluate_target", counting)
    capsys.readouterr()
    assert train.main(small_run(out, logs, "--evaluate", "--resume", str(logs / "latest.pth"), "-d", "mycams",
                                *small)) == 0
    assert evaluated == [(len(kept(own / "query")), len(kept(own / "bounding_box_test")))]
    assert "mycams" in capsys.readouterr().out

    feats = tmp_path / "feats"
    assert extract.main(["--checkpoint", str(logs / "latest.pth"), "--shards", str(out), "-d", "mycams",
                         "--out", str(feats), "--device", "cpu", "--workers", "1", "--no-progress"]) == 0
    assert np.load(feats / "features.npy").shape[0] == len(kept(own / "query"))


def test_unknown_names_list_the_built_in_and_custom_sets(custom, tmp_path, capsys):
    out, _ = custom
    capsys.readouterr()
    assert train.main(small_run(out, tmp_path / "logs", "-d", "viper")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("train.py: error: -d 'viper': unknown dataset; choose from market1501")
    assert f"or a custom set in {out} (mycams)" in line


def test_a_damaged_custom_set_says_how_to_rebuild_it(custom, tmp_path):
    """The rebuild command of a custom set names --custom (its folder is not recorded)."""
    out, _ = custom
    copy = tmp_path / "mycams"
    shutil.copytree(out / "mycams", copy)
    next(copy.glob("gallery-*.tar")).unlink()
    with pytest.raises(shards.ShardError, match=r"rebuild with tools/make_shards.py --custom mycams=DIR"):
        shards.load_manifest(copy)


def write_folder(root: Path, files: dict[str, list[str]]) -> Path:
    """A Market-style folder: ``files`` per subfolder, each a small JPEG."""
    for sub, names in files.items():
        (root / sub).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.new("RGB", (16, 32), (20 * i, 80, 160)).save(root / sub / name)
    return root


GOOD = {"bounding_box_train": ["0001_c1s1_01.jpg", "0001_c2s1_02.jpg", "0002_c1s1_03.jpg"],
        "query": ["0003_c1s1_04.jpg"],
        "bounding_box_test": ["0003_c2s1_05.jpg", "0000_c1s1_06.jpg", "-1_c3s1_07.jpg"]}


def test_junk_distractors_and_a_changed_folder(tmp_path, capsys):
    own, out = write_folder(tmp_path / "own", GOOD), tmp_path / "out"
    assert make_shards.main(["--custom", f"mine={own}", "--out", str(out)]) == 0
    m = json.loads((out / "mine" / shards.MANIFEST).read_text())
    assert m["splits"]["gallery"]["images"] == 2  # the junk image dropped, the distractor kept
    assert m["mix"] == {"images": 5, "ids": 3}  # the distractor out of the mix
    capsys.readouterr()
    assert make_shards.main(["--custom", f"mine={own}", "--out", str(out)]) == 0
    assert "mine: complete" in capsys.readouterr().out
    (own / "bounding_box_train" / GOOD["bounding_box_train"][0]).unlink()
    assert make_shards.main(["--custom", f"mine={own}", "--out", str(out)]) == 0
    assert "mine: the raw data changed since the build" in capsys.readouterr().out
    assert shards.load_manifest(out / "mine")["splits"]["train"]["images"] == 2


def test_anything_may_follow_the_person_and_camera(tmp_path):
    """docs/training.md, "Your own dataset": a dot, a space or a long suffix after PPPP_cC is a
    name like any other."""
    odd = ["0003_c1s2_020569_07.v2.jpg", "0003_c1 copy.jpg", f"0003_c1_{'long' * 30}.jpg"]
    own, out = write_folder(tmp_path / "own", {**GOOD, "query": GOOD["query"] + odd}), tmp_path / "out"
    assert make_shards.main(["--custom", f"mine={own}", "--out", str(out)]) == 0
    keys = shards.SplitReader(out / "mine", "query").keys
    assert len(set(keys)) == 4 and "query_0003_c1s1_04" in keys
    assert all(len(k) <= 95 and "." not in k and " " not in k for k in keys)


@pytest.mark.parametrize("layout, flag, message", [
    (GOOD, "mine", "--custom 'mine': expected NAME=DIR"),
    (GOOD, "My-Cams={own}", "expected a NAME of lowercase letters, digits and underscores, other than "
                            "the built-in market1501, dukemtmc, cuhk03, msmt17v1, cuhk_sysu; got 'My-Cams'"),
    (GOOD, "dukemtmc={own}", "got 'dukemtmc'"),
    (GOOD, "mine={own}/nothing",
     "missing folder {own}/nothing: expected a folder holding bounding_box_train/"),
    ({"bounding_box_train": GOOD["bounding_box_train"], "test": GOOD["query"]}, "mine={own}",
     "query/, bounding_box_test/ missing, found bounding_box_train/, test/"),
    ({**GOOD, "query": []}, "mine={own}",
     "{own}/query: expected images (.jpg, .jpeg, .png) named PPPP_cC..., found an empty folder"),
    ({**GOOD, "query": ["0003_c1s1_04.jpg", "IMG_0001.jpg", "0004_s1_08.jpg", "0005_c0s1_09.jpg"]},
     "mine={own}",
     "{own}/query: expected image names PPPP_cC... with camera C from 1 (PPPP the person, -1 for junk), "
     "found 3 other name(s): 0004_s1_08.jpg, 0005_c0s1_09.jpg, IMG_0001.jpg"),
])
def test_bad_layouts_are_refused_in_one_line(tmp_path, capsys, layout, flag, message):
    own, out = write_folder(tmp_path / "own", layout), tmp_path / "out"
    capsys.readouterr()
    assert make_shards.main(["--custom", flag.format(own=own), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("make_shards.py: error: --custom ") and len(err.strip().splitlines()) == 1, err
    assert message.format(own=own) in err
    assert not out.exists()  # nothing written, not even the folder
