"""tools/export.py: the ONNX and TorchScript files give the PyTorch evaluation features."""
from __future__ import annotations


import pytest
import torch

from engine.checkpoint import network_from_checkpoint
from pipeline.plan import decode_rgb
from pipeline.shards import SplitReader
from pipeline.transforms import test_transform as eval_transform
from tests.runs import TARGET
from tools import export


@pytest.fixture(scope="module")
def reference(trained_checkpoint, synthetic_shards) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised real images (synthetic shards, query then gallery) and the PyTorch features."""
    model, cfg = network_from_checkpoint(trained_checkpoint)
    tf = eval_transform(cfg["height"], cfg["width"])
    images = []
    for split in ("query", "gallery"):
        reader = SplitReader(synthetic_shards / TARGET, split)
        images += [tf(decode_rgb(reader.read(i))) for i in range(min(4, len(reader)))]
    x = torch.stack(images)
    with torch.no_grad():
        return x, model(x)


def assert_same_features(got, want) -> None:
    got = torch.as_tensor(got)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(got)), atol=1e-5, rtol=0)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert cos.min() >= 0.9999, cos


def test_onnx_matches_pytorch(trained_checkpoint, reference, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "reid.onnx"
    assert export.main(["--checkpoint", str(trained_checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x, want = reference
    for rows in (slice(0, len(x)), slice(0, 3), slice(5, 6)):  # the batch size is free
        (got,) = session.run(None, {session.get_inputs()[0].name: x[rows].numpy()})
        assert_same_features(got, want[rows])


def test_torchscript_matches_pytorch(trained_checkpoint, reference, tmp_path):
    out = tmp_path / "reid.pt"
    assert export.main(["--checkpoint", str(trained_checkpoint), "--format", "torchscript",
                        "--out", str(out)]) == 0
    loaded = torch.jit.load(str(out))
    x, want = reference
    with torch.no_grad():
        for rows in (slice(0, len(x)), slice(0, 3), slice(5, 6)):
            assert_same_features(loaded(x[rows]), want[rows])
    assert [p.name for p in tmp_path.iterdir()] == ["reid.pt"]  # no temporaries


def test_bad_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_text("nope")
    out = str(tmp_path / "m.pt")
    assert export.main(["--checkpoint", str(bad), "--format", "torchscript", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export.py: error: --checkpoint ") and "bad.pth" in err and err.count("\n") == 1
    assert not (tmp_path / "m.pt").exists()


def test_an_out_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    code = export.main(["--checkpoint", str(tmp_path / "none.pth"), "--format", "torchscript",
                        "--out", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"export.py: error: --out {folder}: is a folder, expected a file name\n"
    assert list(folder.iterdir()) == []


def test_a_bad_flag_is_one_line(tmp_path, capsys):
    """The tools' parser (train.py's: engine.flags.Parser): no usage dump, exit code 2."""
    code = export.main(["--checkpoint", str(tmp_path / "none.pth"), "--format", "onnxx", "--out", "m.onnx"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("export.py: error: argument --format: invalid choice") and \
        err.count("\n") == 1, err
