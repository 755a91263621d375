"""tools/visualize_ranks.py: one picture per query of its ranked gallery, frames coloured by
correctness under the Market-1501 protocol."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.evaluation.features import FeatureExtractor
from pipeline.plan import decode_rgb
from pipeline.shards import SplitReader
from tests.runs import TARGET
from tools import extract, visualize_ranks as vr

NUM_QUERIES = 5
TOPK = 6


@pytest.fixture(scope="module")
def drawn(trained_checkpoint, synthetic_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    code = vr.main(["--checkpoint", str(trained_checkpoint), "--shards", str(synthetic_shards), "-d", TARGET,
                    "--out", str(out), "--num-queries", str(NUM_QUERIES), "--topk", str(TOPK),
                    "--device", "cpu", "--no-progress"])
    assert code == 0
    return out


def pngs(out: Path) -> list[Path]:
    return sorted(out.glob("query_*.png"))


def test_frames_show_protocol_correctness(trained_checkpoint, synthetic_shards, drawn):
    readers = {s: SplitReader(synthetic_shards / TARGET, s) for s in ("query", "gallery")}
    ext = FeatureExtractor.from_checkpoint(trained_checkpoint, device="cpu")
    feats = {s: ext([decode_rgb(r.read(i)) for i in range(len(r))]) for s, r in readers.items()}
    q, g = readers["query"], readers["gallery"]
    dist = torch.cdist(feats["query"].double(), feats["gallery"].double())
    chosen = np.random.default_rng(0).permutation(len(q))[:NUM_QUERIES]

    files = pngs(drawn)
    assert [p.name for p in files] == [f"query_{i:04d}.png" for i in range(NUM_QUERIES)]
    assert not [p for p in drawn.iterdir() if p.name.startswith(".")]  # no temporaries left
    colours = set()
    for path, qi in zip(files, chosen):
        image = Image.open(path)
        image.load()
        assert image.mode == "RGB" and image.height == vr.canvas_size(TOPK)[1]
        row = dist[qi].clone()
        row[torch.as_tensor((g.pids == q.pids[qi]) & (g.camids == q.camids[qi]))] = torch.inf  # protocol
        ranked = torch.argsort(row, stable=True)[:TOPK]
        assert torch.isfinite(row[ranked]).all()
        x, y = vr.tile_origin(0)
        assert image.getpixel((x + 1, y + 1)) == vr.QUERY_COLOUR
        for j, gi in enumerate(ranked.tolist(), start=1):
            x, y = vr.tile_origin(j)
            expected = vr.GREEN if g.pids[gi] == q.pids[qi] else vr.RED
            for px in ((x + 1, y + 1), (x + vr.TILE_W - 2, y + vr.TILE_H - 2)):
                assert image.getpixel(px) == expected, (path.name, j)
            colours.add(expected)
        assert image.width == vr.tile_origin(TOPK)[0] + vr.TILE_W + vr.MARGIN
    assert colours == {vr.GREEN, vr.RED}  # both kinds occur, so the check means something

    page = (drawn / "index.html").read_text()
    for path, qi in zip(files, chosen):
        assert f'src="{path.name}"' in page and q.keys[qi] in page


def test_features_from_extract_give_identical_pictures(trained_checkpoint, synthetic_shards, drawn, tmp_path,
                                                       capsys):
    feats = tmp_path / "feats"
    for split in ("query", "gallery"):
        assert extract.main(["--checkpoint", str(trained_checkpoint), "--shards", str(synthetic_shards),
                             "-d", TARGET, "--split", split, "--out", str(feats / split),
                             "--device", "cpu", "--no-progress"]) == 0
    out = tmp_path / "ranks"
    code = vr.main(["--features", str(feats), "--shards", str(synthetic_shards), "-d", TARGET,
                    "--out", str(out), "--num-queries", str(NUM_QUERIES), "--topk", str(TOPK),
                    "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert [p.name for p in pngs(out)] == [p.name for p in pngs(drawn)]
    for a, b in zip(pngs(out), pngs(drawn)):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert (out / "index.html").read_bytes() == (drawn / "index.html").read_bytes()
    Image.open(io.BytesIO(pngs(out)[0].read_bytes())).verify()


def test_errors(synthetic_shards, trained_checkpoint, tmp_path, capsys):
    code = vr.main(["--checkpoint", str(trained_checkpoint), "--shards", str(synthetic_shards),
                    "-d", "nosuch", "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("visualize_ranks.py: error: ") and "nosuch" in err
    assert len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    code = vr.main(["--checkpoint", str(bad), "--shards", str(synthetic_shards), "-d", TARGET,
                    "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("visualize_ranks.py: error: --checkpoint") and "bad.pth" in err
    code = vr.main(["--checkpoint", str(trained_checkpoint), "--shards", str(synthetic_shards), "-d", TARGET,
                    "--out", str(tmp_path / "o"), "--topk", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err == "visualize_ranks.py: error: --topk must be at least 1, got 0\n", err
    assert not (tmp_path / "o").exists()


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "ranks"
    a_file.write_text("mine")
    code = vr.main(["--checkpoint", str(tmp_path / "none.pth"), "--shards", str(tmp_path), "-d", TARGET,
                    "--out", str(a_file)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"visualize_ranks.py: error: --out {a_file}: is a file, expected a folder\n"
    assert a_file.read_text() == "mine"
