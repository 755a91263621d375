"""Export a trained checkpoint's evaluation network (style module off) for serving.

    python tools/export.py --checkpoint logs/run/best.pth --format onnx --out reid.onnx
    python tools/export.py --checkpoint logs/run/best.pth --format torchscript --out reid.pt

The exported graph takes float32 images [B, 3, H, W] (any batch size B; H x W the checkpoint's
input size, 256x128 for the published runs), already normalised with ImageNet's mean and std
after a bicubic resize (``pipeline.transforms.test_transform``), and returns float32 features
[B, D] of norm 1: the features evaluation ranks with. The file is written under a temporary
name and renamed. ONNX needs the ``onnx`` and ``onnxscript`` packages (the ``export`` extra); run
it with onnxruntime, for example. Errors are one line and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.checkpoint import CheckpointError, network_from_checkpoint
from engine.errors import UsageError
from engine.flags import Parser
from pipeline.files import output_problem, write_atomic
from tools.cli import run_tool

PROG = "export.py"
OPSET = 18


class Embedder(torch.nn.Module):
    """The evaluation network as a plain function: normalised images -> unit-norm float32
    features (re-normalised in float32, so the output has norm 1 whatever the network's dtype)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(images).float(), dim=1)


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"],
                                    output_names=["features"], dynamic_shapes=({0: batch},),
                                    opset_version=OPSET, external_data=False, verbose=False)
    program.save(str(path), external_data=False)


def export_torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
        traced = torch.jit.freeze(traced)
        torch.jit.save(traced, str(path))


def export(checkpoint: Path, fmt: str, out: Path) -> dict:
    """Write ``out``; returns the checkpoint's config (the input size is there)."""
    model, cfg = network_from_checkpoint(checkpoint)
    module = Embedder(model).eval()
    # two rows: a batch of one would let a tracer treat the batch size as a constant
    example = torch.randn(2, 3, cfg["height"], cfg["width"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        write = export_onnx if fmt == "onnx" else export_torchscript
        write_atomic(out, lambda tmp: write(module, example, tmp))
    return cfg


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a train.py checkpoint (latest.pth or best.pth), read with weights_only")
    p.add_argument("--format", choices=("onnx", "torchscript"), required=True,
                   help="onnx (opset %d, dynamic batch) or torchscript (traced and frozen)" % OPSET)
    p.add_argument("--out", type=Path, required=True, help="the file to write (its folder is made if needed)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if args.format == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"--format onnx needs {' and '.join(missing)} (pip install onnx onnxscript)")
    if why := output_problem(args.out, folder=False):
        raise UsageError(f"--out {args.out}: {why}")
    try:
        cfg = export(args.checkpoint, args.format, args.out)
    except CheckpointError as e:
        raise UsageError(f"--checkpoint {e}") from None
    print(f"{args.out}: {args.format}, input float32 [B, 3, {cfg['height']}, {cfg['width']}] normalised "
          f"images, output float32 [B, D] unit-norm features", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run_tool(PROG, lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
