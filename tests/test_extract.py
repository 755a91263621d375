"""engine/evaluation/features.py and tools/extract.py: a trained checkpoint on any images gives the
features evaluation uses."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.evaluation.targets import extract_features
from engine.checkpoint import network_from_checkpoint
from engine.evaluation.features import FeatureExtractor, ImageError
from pipeline.loader import LoaderConfig, build_eval_loader
from pipeline.plan import decode_rgb
from pipeline.shards import SplitReader
from pipeline.transforms import test_transform as eval_transform
from tests.runs import TARGET
from tools import extract

@pytest.fixture(scope="module")
def query(synthetic_shards):
    return SplitReader(synthetic_shards / TARGET, "query")


@pytest.fixture(scope="module")
def eval_query_features(trained_checkpoint, synthetic_shards) -> torch.Tensor:
    """The query rows' features as evaluation computes them (engine.evaluation.targets on the eval loader)."""
    model, cfg = network_from_checkpoint(trained_checkpoint)
    model = model.to(memory_format=torch.channels_last)
    lcfg = LoaderConfig(height=cfg["height"], width=cfg["width"], workers=0, loader="torch",
                        test_batch_size=64)
    loader = build_eval_loader(synthetic_shards, TARGET, "test", lcfg)
    feats = extract_features(model, loader, torch.device("cpu"), None)
    return feats[torch.as_tensor(loader.is_query)]


@pytest.fixture(scope="module")
def image_folder(query, tmp_path_factory) -> Path:
    """The query images as files in a folder tree (the first half in a subfolder)."""
    root = tmp_path_factory.mktemp("images")
    for i, key in enumerate(query.keys):
        data = query.read(i)
        ext = {"JPEG": ".jpg", "PNG": ".png"}[Image.open(io.BytesIO(data)).format]
        sub = root / ("a" if i < len(query) // 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"{i:05d}{ext}").write_bytes(data)
    return root


def test_extractor_gives_evaluation_features(trained_checkpoint, query, eval_query_features):
    ext = FeatureExtractor.from_checkpoint(trained_checkpoint, device="cpu", batch_size=7)
    images = [decode_rgb(query.read(i)) for i in range(len(query))]
    feats = ext(images)
    assert feats.dtype == torch.float32 and feats.shape == eval_query_features.shape
    torch.testing.assert_close(feats, eval_query_features, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(feats)))
    # normalised tensors (the published test transform) give the same rows
    tf = eval_transform(ext.height, ext.width)
    batch = torch.stack([tf(im) for im in images[:5]])
    torch.testing.assert_close(ext(batch), eval_query_features[:5], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="expected normalised images"):
        ext(torch.zeros(2, 3, ext.height + 1, ext.width))


def test_extractor_names_bad_images(trained_checkpoint, tmp_path):
    ext = FeatureExtractor.from_checkpoint(trained_checkpoint, device="cpu")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="broken.jpg"):
        ext([bad])
    with pytest.raises(ImageError, match="missing.jpg"):
        ext([tmp_path / "missing.jpg"])


def run_tool(args, capsys) -> tuple[int, str]:
    code = extract.main([*args, "--device", "cpu", "--no-progress"])
    return code, capsys.readouterr().err


def read_out(out: Path) -> tuple[np.ndarray, list[str]]:
    return np.load(out / "features.npy"), (out / "images.txt").read_text().splitlines()


def test_tool_folder_glob_and_list_agree(trained_checkpoint, image_folder, query, eval_query_features,
                                         tmp_path, capsys):
    listing = tmp_path / "list.txt"
    names = sorted(str(p) for p in image_folder.rglob("*.*"))
    listing.write_text("\n".join(names) + "\n")
    results = {}
    for how, spec in (("folder", [str(image_folder)]), ("glob", [f"{image_folder}/**/*.*"]),
                      ("txt", [str(listing)])):
        out = tmp_path / how
        code, err = run_tool(["--checkpoint", str(trained_checkpoint), "--images", *spec, "--out", str(out),
                              "--batch-size", "16"], capsys)
        assert code == 0, err
        results[how] = read_out(out)
        assert sorted(p.name for p in out.iterdir()) == ["features.npy", "images.txt"]  # no temporaries
    feats, rows = results["folder"]
    assert rows == names and feats.dtype == np.float32 and feats.shape == tuple(eval_query_features.shape)
    for how in ("glob", "txt"):
        assert results[how][1] == rows
        np.testing.assert_allclose(results[how][0], feats, atol=1e-6)
    # the files are the query rows in order: the folder's names are their indices
    np.testing.assert_allclose(feats, eval_query_features.numpy(), atol=1e-5, rtol=1e-4)


def test_tool_reads_a_shard_split(trained_checkpoint, synthetic_shards, query, eval_query_features, tmp_path,
                                  capsys):
    out = tmp_path / "out"
    code, err = run_tool(["--checkpoint", str(trained_checkpoint), "--shards", str(synthetic_shards),
                          "-d", TARGET, "--split", "query", "--out", str(out)], capsys)
    assert code == 0, err
    feats, rows = read_out(out)
    assert rows == list(query.keys)
    np.testing.assert_array_equal(np.load(out / "pids.npy"), query.pids)
    np.testing.assert_array_equal(np.load(out / "camids.npy"), query.camids)
    np.testing.assert_allclose(feats, eval_query_features.numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_tool_loaders_give_their_evaluation_features(loader, trained_checkpoint, synthetic_shards,
                                                     image_folder, tmp_path, capsys):
    """--loader dali|torch, worker processes, --flip-test: image files and a shard split give the
    features evaluation computes with that loader (and --flip-test) on the target's query rows."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    model, cfg = network_from_checkpoint(trained_checkpoint)
    lcfg = LoaderConfig(height=cfg["height"], width=cfg["width"], workers=0, loader=loader,
                        test_batch_size=64)
    target = build_eval_loader(synthetic_shards, TARGET, "test", lcfg)
    expected = extract_features(model.to(memory_format=torch.channels_last), target, torch.device("cpu"),
                                None, flip=True)[torch.as_tensor(target.is_query)].numpy()
    common = ["--checkpoint", str(trained_checkpoint), "--loader", loader, "--workers", "2", "--flip-test",
              "--batch-size", "16"]
    for spec in (["--images", str(image_folder)], ["--shards", str(synthetic_shards), "-d", TARGET]):
        out = tmp_path / spec[0].strip("-")
        code, err = run_tool([*common, *spec, "--out", str(out)], capsys)
        assert code == 0 and f"({loader} loader)" in err, err
        np.testing.assert_allclose(read_out(out)[0], expected, atol=1e-5, rtol=1e-4)


def test_tool_refuses_in_one_line(trained_checkpoint, image_folder, tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 100)
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(image_folder / "a", broken)
    bad = sorted(broken.iterdir())[1]
    bad.write_bytes(b"garbage")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{next(image_folder.rglob('*.*'))}\n{tmp_path / 'nowhere.jpg'}\n")
    ckpt = ["--checkpoint", str(trained_checkpoint)]
    cases = [(["--checkpoint", str(garbage), "--images", str(image_folder)], "garbage.pth"),
             (["--checkpoint", str(tmp_path / "none.pth"), "--images", str(image_folder)], "none.pth"),
             (["--checkpoint", str(trained_checkpoint), "--images", str(empty)], "no .jpg/.jpeg/.png"),
             ([*ckpt, "--images", str(tmp_path / "x" / "*.jpg")], "matches no files"),
             (["--checkpoint", str(trained_checkpoint), "--images", str(broken)], bad.name),
             ([*ckpt, "--images", str(broken), "--loader", "torch", "--workers", "1"], bad.name),
             (["--checkpoint", str(trained_checkpoint), "--images", str(listing)], "nowhere.jpg"),
             ([*ckpt, "--shards", str(tmp_path)], "--shards needs -d/--dataset"),
             ([*ckpt, "--images", str(image_folder), "--batch-size", "0"], "argument --batch-size: expected")]
    for args, needle in cases:
        out = tmp_path / "out"
        code, err = run_tool([*args, "--out", str(out)], capsys)
        assert code == 2, err
        assert err.startswith("extract.py: error: ") and err.count("\n") == 1 and needle in err, err
        assert not out.exists()


def test_tool_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        extract.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--images", "--shards", "--dataset", "--split", "--out", "--batch-size",
                 "--device", "--workers", "--loader", "--flip-test", "--no-progress"):
        assert flag in text


def test_an_unusable_out_is_refused_before_any_work(tmp_path, capsys):
    """--out a file (or below one, or a name too long for any file system) is refused first: not
    with a traceback after extracting everything (the checkpoint is not even read)."""
    a_file = tmp_path / "feats"
    a_file.write_text("mine")
    for out, why in ((a_file, "is a file, expected a folder"), (a_file / "sub", f"{a_file} is a file"),
                     (tmp_path / ("x" * 256), "256 bytes long")):
        code = extract.main(["--checkpoint", str(tmp_path / "none.pth"), "--images", str(tmp_path),
                             "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"extract.py: error: --out {out}: ") and why in err, err
        assert len(err.splitlines()) == 1
    assert a_file.read_text() == "mine"
