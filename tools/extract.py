"""Features of any images from a trained checkpoint (the features evaluation uses: eval mode,
the published test transform at the checkpoint's input size, L2-normalised).

    python tools/extract.py --checkpoint logs/run/best.pth --images photos/ --out feats/
    python tools/extract.py --checkpoint logs/run/best.pth --images 'cams/*/*.jpg' list.txt --out feats/
    python tools/extract.py --checkpoint logs/run/best.pth --shards shards -d market1501 \\
        --split query --out feats/market_query

Writes OUT/features.npy (float32 [N, D], rows of norm 1) and OUT/images.txt (one image per
row, same order); with --shards, images.txt holds the shard keys and OUT/pids.npy and
OUT/camids.npy the identities and cameras. Files are written under temporary names and
renamed, so OUT never holds half-written ones. Errors are one line and exit code 2.
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np

from pipeline.files import write_atomic
from engine.errors import UsageError
from engine.flags import Parser
from pipeline.loader import build_eval_loader, build_file_loader, select_loader
from tools.cli import add_extraction_flags, check_out_folder, open_split, run_tool, tool_features

PROG = "extract.py"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a train.py checkpoint (latest.pth or best.pth); the network and input size "
                        "come from it. Read with weights_only: it cannot run code")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="PATH",
                     help="images to extract: a folder (searched recursively for .jpg/.jpeg/.png, "
                          "sorted), a glob pattern (quote it; ** recurses), a .txt file of image paths "
                          "(one per line, relative to the current folder), or an image file; several "
                          "are taken in the order given")
    src.add_argument("--shards", type=Path,
                     help="a shards folder (tools/make_shards.py): extract a split of dataset -d")
    p.add_argument("-d", "--dataset", help="with --shards: the dataset (e.g. market1501)")
    p.add_argument("--split", choices=("query", "gallery", "train"), default="query",
                   help="with --shards: the split to extract (default: query)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (made if needed) for features.npy and images.txt "
                        "(and pids.npy, camids.npy with --shards)")
    p.add_argument("--flip-test", action="store_true",
                   help="each feature is the normalised sum of the image's and its mirror image's features, "
                        "as train.py --flip-test evaluates")
    add_extraction_flags(p)
    args = p.parse_args(argv)
    if args.shards is not None and not args.dataset:
        p.error("--shards needs -d/--dataset")
    return args


def _folder_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def collect_images(specs: list[str]) -> list[str]:
    """The image paths named by folders, glob patterns, .txt lists and files, in order."""
    paths: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = _folder_images(path)
            if not found:
                raise UsageError(f"--images {spec}: the folder holds no .jpg/.jpeg/.png images")
        elif path.is_file() and path.suffix.lower() == ".txt":
            found = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not found:
                raise UsageError(f"--images {spec}: the list is empty")
            missing = [p for p in found if not Path(p).is_file()]
            if missing:
                raise UsageError(f"--images {spec}: {len(missing)} listed image(s) do not exist, first "
                                f"{missing[0]}")
        elif path.is_file():
            found = [spec]
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise UsageError(f"--images {spec}: the pattern matches no files")
        else:
            raise UsageError(f"--images {spec}: no such file or folder")
        paths.extend(found)
    return paths


def write_outputs(out: Path, features: np.ndarray, names: list[str], **arrays: np.ndarray) -> None:
    """OUT/features.npy, OUT/images.txt and OUT/<name>.npy for each of ``arrays``, each atomically."""
    out.mkdir(parents=True, exist_ok=True)

    def saver(array):
        def write(tmp):
            with open(tmp, "wb") as f:
                np.save(f, array)
        return write

    write_atomic(out / "features.npy", saver(np.ascontiguousarray(features, dtype=np.float32)))
    for name, array in arrays.items():
        write_atomic(out / f"{name}.npy", saver(array))
    write_atomic(out / "images.txt", lambda tmp: tmp.write_text("".join(f"{n}\n" for n in names)))


def run(args: argparse.Namespace) -> None:
    check_out_folder(args.out)
    if args.shards is not None:
        reader = open_split(args.shards, args.dataset, args.split)
        names = list(reader.keys)
        extra = {"pids": reader.pids.astype(np.int64), "camids": reader.camids.astype(np.int64)}

        def loaders(cfg):
            yield build_eval_loader(args.shards, args.dataset, args.split, cfg)
    else:
        names, extra = collect_images(args.images), {}

        def loaders(cfg):
            yield build_file_loader(names, cfg)
    (feats,) = tool_features(args, loaders, flip=args.flip_test,
                             progress=len(names) > args.batch_size and not args.no_progress)
    write_outputs(args.out, feats.numpy(), names, **extra)
    print(f"{len(names)} images ({select_loader(args.loader)} loader) -> {args.out / 'features.npy'} "
          f"[{feats.shape[0]}, {feats.shape[1]}] and {args.out / 'images.txt'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run_tool(PROG, lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
