"""Turn the raw re-ID datasets into WebDataset shards (docs/design.md), once.

    python tools/make_shards.py --data-dir DATA --out shards --workers 8
    python tools/make_shards.py --custom mycams=/path/to/mycams --out shards   # your own dataset
    python tools/make_shards.py --out shards --verify

A custom set (--custom NAME=DIR) is a folder in Market-1501's layout: DIR/bounding_box_train/,
DIR/query/ and DIR/bounding_box_test/ with images named PPPP_cC... (PPPP the person, C the
camera from 1; -1 is junk, 0000 a distractor, as in Market-1501). Its shards go to OUT/NAME/, and
NAME then works as a source or target wherever --shards OUT is read (train.py, tools/extract.py,
tools/visualize_ranks.py).

Datasets whose shards are already complete are skipped, so an interrupted run can simply be
started again; a dataset whose raw files changed since its shards were built (the manifest
records their count, sizes and names) is rebuilt. One build at a time writes into OUT.

Errors are one line, ``make_shards.py: error: ...``, naming the flag, file or image, with exit
code 2; --verify exits 1 when it finds a problem; Ctrl-C stops at once (exit code 130), keeping
the datasets already complete.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from pipeline import shards
from pipeline.build import PUBLISHED_COUNTS, CustomSetError, build_shards, count_differences
from pipeline.records import DATASETS

_REPO = Path(__file__).resolve().parents[1]
PROG = "make_shards.py"

__all__ = ["main", "PUBLISHED_COUNTS", "count_differences"]  # the last two live in pipeline.build


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, as every other error of this tool (argparse would print the usage first)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path,
                   help="raw datasets, laid out as DATA/<name>/<folder> (README, 'Data'); "
                        "not needed with --verify")
    p.add_argument("--out", type=Path, default=_REPO / "shards",
                   help="output folder; each dataset goes to OUT/<name>/ (tars, .idx indexes, "
                        "manifest.json); default: the repository's shards/")
    p.add_argument("--datasets", default=None,
                   help=f"comma-separated subset of {','.join(DATASETS)} "
                        "(default: every one found in --data-dir; with --verify: every one in --out, "
                        "custom sets included)")
    p.add_argument("--custom", action="append", default=[], metavar="NAME=DIR",
                   help="also build your own dataset: DIR in Market-1501's layout (bounding_box_train/, "
                        "query/, bounding_box_test/, images named PPPP_cC...) into OUT/NAME/; NAME of "
                        "lowercase letters, digits and underscores; may be given several times")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that read, check and pack images in parallel, one shard each (default 1)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per tar (default 5000)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable or corrupt images (counted and listed in manifest.json) "
                        "instead of stopping at the first one")
    p.add_argument("--verify", action="store_true",
                   help="build nothing: re-hash every shard in --out, check every index against its tar, "
                        "exit 1 naming any problem")
    p.add_argument("--cuhk03-labeled", action="store_true",
                   help="CUHK03: use the hand-labelled boxes instead of the detected ones (the default)")
    args = p.parse_args(argv)
    if args.datasets is not None:
        args.datasets = [n.strip() for n in args.datasets.split(",") if n.strip()]
        valid = [*DATASETS, *(shards.custom_sets(args.out) if args.verify else [])]
        unknown = [n for n in args.datasets if n not in valid]
        if unknown or not args.datasets:
            p.error(f"--datasets: unknown name(s) {', '.join(unknown) or '(none given)'}; "
                    f"valid names: {', '.join(valid)}")
    if not args.verify and args.data_dir is None and (args.datasets or not args.custom):
        p.error("--data-dir is required to build shards of the built-in datasets (--custom NAME=DIR alone "
                "builds your own)")
    if args.workers < 1 or args.shard_size < 1:
        p.error("--workers and --shard-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.custom = custom_folders(args.custom)
        return verify(args) if args.verify else build(args)
    except (shards.ShardError, ValueError, OSError) as e:  # CustomSetError (a ValueError) included
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted: the datasets already complete are kept; the same command goes on "
              "from there", file=sys.stderr)
        return 128 + signal.SIGINT


def custom_folders(flags: list[str]) -> dict[str, Path]:
    """NAME -> DIR of each --custom NAME=DIR (the names and folders are checked when building)."""
    custom: dict[str, Path] = {}
    for flag in flags:
        name, eq, folder = flag.partition("=")
        if not eq or not name or not folder:
            raise CustomSetError(f"--custom {flag!r}: expected NAME=DIR (e.g. mycams=/data/mycams)")
        if name in custom:
            raise CustomSetError(f"--custom {flag!r}: the NAME {name} is given twice "
                                 f"(first as {name}={custom[name]})")
        custom[name] = Path(folder)
    return custom


def verify(args: argparse.Namespace) -> int:
    names = args.datasets or [n for n in DATASETS if (args.out / n).is_dir()] + shards.custom_sets(args.out)
    if not names:
        print(f"{PROG}: error: no dataset folders in {args.out}", file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        problems = shards.verify_dataset(args.out / name)
        print(f"{name}: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
        for msg in problems:
            print(f"  {msg}")
        failed += bool(problems)
    return 1 if failed else 0



def build(args: argparse.Namespace) -> int:
    build_shards(args.data_dir, args.out, args.datasets, custom=args.custom, workers=args.workers,
                 skip_bad=args.skip_bad, shard_size=args.shard_size, cuhk03_labeled=args.cuhk03_labeled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
