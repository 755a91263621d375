"""What the tools share on the command line. Their flags are parsed by train.py's parser class
(:class:`engine.flags.Parser`) and every refusal is train.py's :class:`engine.errors.UsageError`:
one line, ``<tool>: error: ...``, exit code 2 (:func:`run_tool`). The tools that extract
features (tools/extract.py, tools/visualize_ranks.py) share their flags and the way they read a
checkpoint, a shard split and the output folder."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable

import torch

from engine.checkpoint import CheckpointError
from engine.config import WORKERS, default_workers
from engine.device import DEVICES, DeviceError
from engine.errors import UsageError
from engine.evaluation.features import features_by_loader
from engine.flags import at_least
from pipeline.files import WriteError, output_problem
from pipeline.loader import EvalLoader, LoaderConfig
from pipeline.shards import ShardError, SplitReader, unknown_dataset


def run_tool(prog: str, run: Callable[[], None]) -> int:
    """Exit code of a tool's work ``run`` (its flags' parsing included): 0, or 2 with its
    :class:`UsageError` (or a file it could not write, a full disk say) as one line."""
    try:
        run()
    except (UsageError, WriteError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def check_out_folder(out: Path) -> None:
    """--out, the folder a tool writes its files into, checked before the work (:class:`UsageError`)."""
    if why := output_problem(out, folder=True):
        raise UsageError(f"--out {out}: {why}")


def open_split(shards: Path, dataset: str, split: str) -> SplitReader:
    """A tool's ``--shards SHARDS -d DATASET`` split, refused (:class:`UsageError`) when the
    dataset is unknown, its shards do not read or the split is empty."""
    if why := unknown_dataset(dataset, shards):
        raise UsageError(f"-d {dataset!r}: {why}")
    try:
        reader = SplitReader(shards / dataset, split)
    except (ShardError, OSError) as e:
        raise UsageError(f"--shards {shards} -d {dataset}: {e}") from None
    if len(reader) == 0:
        raise UsageError(f"--shards {shards} -d {dataset}: the {split} split is empty")
    return reader


def add_extraction_flags(p) -> None:
    """The flags of :func:`tool_features`, shared by the tools that extract (--batch-size,
    --device, --workers, --loader, --no-progress)."""
    p.add_argument("--batch-size", type=at_least(1), default=128, help="images per forward (default: 128)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: CUDA when there is a GPU (with autocast), else the CPU")
    p.add_argument("--workers", type=at_least(0), default=default_workers(),
                   help=f"data worker processes that read and decode the images (default: {WORKERS}, or the "
                        f"cores available when fewer, here {default_workers()}; 0: in this process)")
    p.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto",
                   help="decoding as in train.py: DALI (GPU decode on CUDA), or PIL + torchvision; auto "
                        "takes DALI when installed. Each gives the features evaluation gives with the same "
                        "loader (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _bar(loader: EvalLoader) -> Iterable:
    from tqdm import tqdm
    return tqdm(loader, total=loader.rows.num_batches(), unit="batch", desc="extract", file=sys.stderr)


def tool_features(args, make_loaders: Callable[[LoaderConfig], Iterable[EvalLoader]], *, flip: bool = False,
                  progress: bool = True) -> list[torch.Tensor]:
    """:func:`engine.evaluation.features.features_by_loader` for a tool's flags (``--checkpoint``,
    ``--device``, ``--loader``, ``--workers``, ``--batch-size``), with a progress bar per loader;
    what fails is one :class:`UsageError` line naming the flag, or the image that does not decode."""
    try:
        return list(features_by_loader(args.checkpoint, make_loaders, device=args.device, loader=args.loader,
                                       workers=args.workers, batch_size=args.batch_size, flip=flip,
                                       progress=_bar if progress else None))
    except ShardError as e:  # an image that does not decode, named
        raise UsageError(str(e)) from None
    except CheckpointError as e:
        raise UsageError(f"--checkpoint {e}") from None
    except DeviceError as e:  # a device that is not there, or GPUs torch cannot use
        raise UsageError(str(e)) from None
    except ImportError as e:
        raise UsageError(f"--loader {args.loader}: {e}") from None
