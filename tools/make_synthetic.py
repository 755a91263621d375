"""Write a synthetic copy of the five raw re-ID datasets (docs/design.md), so the whole system
runs end to end with no download.

Every layout is the real one: Market-1501 / DukeMTMC-reID folders and file names (with junk
``-1`` and distractor ``0000`` files and a stray ``Thumbs.db``), MSMT17_V1 list files, CUHK03's
``cuhk-03.mat`` as MATLAB v7.3 (HDF5 with object references, arrays stored transposed, empty
cells) plus its new-protocol configs, and CUHK-SYSU scenes with ``Person.mat``.

The pictures form a small but real domain-generalisation problem: each identity has its own
clothes (head/torso/legs colours, stripes or checks, bag, skirt), each camera shifts brightness,
tint and viewpoint, and each dataset has its own colour cast, contrast, blur, noise and
background, so a model trained on three datasets meets a new style on the fourth.

``expected_counts(scale, seed)`` returns the ground truth the generator lays down, for tests.
The output is byte-identical for the same ``--scale`` and ``--seed``. The code is the package
``tools/synthetic/`` (the plan, the drawing, one writer per layout); this is its command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.synthetic import MARKER, NAMES, SCALES, expected_counts, generate, plan

__all__ = ["MARKER", "NAMES", "SCALES", "expected_counts", "generate", "main", "plan"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="folder to write DATA/<name>/<folder> into; must be new, empty, or an earlier "
                        "output of this tool, whose files are replaced (one whose dataset folders hold "
                        "any other file is refused: nothing is deleted that this tool did not write)")
    p.add_argument("--scale", choices=sorted(SCALES), default="small",
                   help="small: ~2.5k images, a few MB, seconds (tests, make demo); medium: ~10x the "
                        "images at 128x64, for throughput measurements (default: small)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; the same seed writes the same bytes (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    try:
        generate(args.out, args.scale, args.seed, progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = expected_counts(args.scale, args.seed)
    for name in NAMES:
        print(f"{name:11s} " + "  ".join(f"{k} {v[0]}/{v[1]}" for k, v in counts[name].items()))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
