r"""Train Style Interleaved Learning (Tan et al., IEEE TMM 2023) on three source datasets and
evaluate on an unseen target.

    torchrun --nproc_per_node 4 train.py --update-style \
        --dataset_src1 market1501 --dataset_src2 dukemtmc --dataset_src3 cuhk03 -d msmt17v1

One process per GPU (NCCL; gloo on CPU). `-b` is the global batch per source: every rank takes
its slice of each sampled batch, so 1 and N GPUs train on the same global batches.

Everything that can be checked is checked before any work (flags, the logs dir, shards,
weights and checkpoint files); a refusal is one line, `train.py: error: ...`, and exit code 2.
SIGTERM or SIGINT (Ctrl-C), sent to torchrun or to a trainer, stops every rank within two
iterations: latest.pth is saved at the last finished iteration and one line says how to resume
(exit code 128 + the signal); a second Ctrl-C stops at once, keeping the last checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, TextIO

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from engine import distributed as du
from engine.checkpoint import (EVAL_PARTS, RESUME_KEYS, CheckpointError, config_differences, copy_checkpoint,
                               read_checkpoint, read_torch_file, save_checkpoint)
from engine.evaluate import evaluate_target, extract_features
from engine.optim import amp_dtype, build_optimizer, build_scaler, build_scheduler
from engine.runlock import LOCK_NAME, FolderBusy, hold_folder
from engine.step import shuffle_plan, train_step
from model.groups import make_layout
from model.memory import MemoryClassifier
from model.resnet import build_model, imagenet_weights_file
from model.style import UBS
from pipeline.loader import LoaderConfig, build_eval_loader, build_train_loader, select_loader
from pipeline.records import DATASETS, SOURCE_ONLY
from pipeline.shards import ShardError, load_manifest

log = logging.getLogger("train")
RUN_FILES = ("latest.pth", "best.pth", "metrics.jsonl", "metrics.png")  # what a run writes in --logs-dir
# What --evaluate takes from the checkpoint rather than from the flags:
NETWORK_KEYS = ("arch", "stem_relu", "bn_groups", "height", "width")


class UsageError(Exception):
    """A refusal: a flag, file or folder that cannot work. ``main`` prints it as one line and
    exits 2."""


class NonFiniteLoss(RuntimeError):
    pass


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default."""


class Parser(argparse.ArgumentParser):
    """Refuses bad flags through :class:`UsageError` (one line, no usage dump), and records in
    ``args.given`` which flags the command line set (``--evaluate`` takes the others from the
    checkpoint)."""

    def error(self, message: str):
        raise UsageError(message)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        quiet = copy.deepcopy(self)
        for action in quiet._actions:
            action.default = argparse.SUPPRESS
        parsed.given = set(vars(argparse.ArgumentParser.parse_args(quiet, args)))
        return parsed


def at_least(low: int):
    """argparse type: an integer >= low, refused with the flag's name otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def real_in(low: float, high: float = float("inf"), low_open: bool = False):
    """argparse type: a float in [low, high] ((low, high] when ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > low if low_open else value >= low) or value > high:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"expected a number in {bounds}, got {text}")
        return value
    return parse


def get_parser() -> argparse.ArgumentParser:
    p = Parser(prog="train.py", description=__doc__, formatter_class=HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset_src1", default="market1501", help="first source dataset")
    d.add_argument("--dataset_src2", default="dukemtmc", help="second source dataset")
    d.add_argument("--dataset_src3", default="cuhk03", help="third source dataset")
    d.add_argument("-d", "--dataset", default="msmt17v1", help="unseen target dataset (evaluation only)")
    d.add_argument("--shards", type=Path, default=Path("shards"),
                   help="folder of shards written by tools/make_shards.py")
    d.add_argument("--data-dir", type=Path, default=None,
                   help="raw datasets (DATA/<name>/...); when given, shards missing from --shards are "
                        "built from it first (once)")
    d.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto",
                   help="DALI GPU pipeline, or the PIL/torchvision DataLoader; auto takes DALI when "
                        "installed")
    d.add_argument("-j", "--workers", type=at_least(0), default=4, help="data worker processes per rank")
    d.add_argument("--height", type=at_least(1), default=256, help="input height")
    d.add_argument("--width", type=at_least(1), default=128, help="input width")
    d.add_argument("-b", "--batch-size", type=at_least(1), default=64,
                   help="global batch per source (identities x --num-instances), split over ranks")
    d.add_argument("--num-instances", type=at_least(1), default=4, help="images per identity in a batch")
    d.add_argument("--test-batch-size", type=at_least(1), default=256,
                   help="batch of feature extraction, per rank")
    m = p.add_argument_group("model")
    m.add_argument("-a", "--arch", choices=("resnet50", "resnet18"), default="resnet50", help="backbone")
    m.add_argument("--pretrained", default="imagenet",
                   help="'imagenet' (torchvision's weights from its cache), a local .pth file, or 'none'")
    m.add_argument("--stem-relu", action="store_true",
                   help="standard ResNet stem with ReLU after the stem BN (the published code has none)")
    m.add_argument("--update-style", action="store_true",
                   help="Style Interleaved Learning: restyle features (UBS) in the memory-update forward")
    m.add_argument("--baseline", choices=("fbf", "fb"), default="fbf",
                   help="without --update-style: fbf = second forward without style, fb = no second "
                        "forward (memories take the first forward's features)")
    m.add_argument("--bn-groups", type=at_least(1), default=4,
                   help="BatchNorm (and style) statistics over this many contiguous groups of each source's "
                        "batch and of the shuffled second forward, as the published 4-GPU DataParallel runs "
                        "computed them; the same groups on any number of GPUs (synchronised where a group "
                        "spans several); 1 = whole-batch statistics")
    m.add_argument("--rho", type=real_in(0), default=3.0, help="UBS style range (mean +- rho * std)")
    m.add_argument("--temp", type=real_in(0, low_open=True), default=0.05,
                   help="memory classifier temperature")
    m.add_argument("--momentum", type=real_in(0, 1), default=0.2, help="memory update momentum")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=real_in(0), default=3.5e-4, help="Adam learning rate")
    o.add_argument("--weight-decay", type=real_in(0), default=5e-4, help="Adam weight decay")
    o.add_argument("--epochs", type=at_least(1), default=70, help="epochs")
    o.add_argument("--iters", type=at_least(1), default=200, help="iterations per epoch")
    o.add_argument("--milestones", type=at_least(0), nargs="+", default=[30, 50],
                   help="epochs where lr drops by 10")
    o.add_argument("--warmup-epochs", type=at_least(0), default=10, help="linear warm-up length (epochs)")
    o.add_argument("--seed", type=at_least(0), default=1, help="seed of sampling, shuffles and style draws")
    s = p.add_argument_group("speed")
    s.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="autocast: auto = bf16 where the GPU has it, else fp16 with a grad scaler; "
                        "fp32 on CPU")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--apex", action="store_true", help="apex FusedAdam instead of torch's fused Adam")
    s.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to train")
    r = p.add_argument_group("evaluation and logging")
    r.add_argument("--eval-every", type=at_least(0), default=1,
                   help="evaluate the target every N epochs (0: at the end only)")
    r.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking at evaluation")
    r.add_argument("--evaluate", action="store_true",
                   help="only evaluate the --resume checkpoint on -d and exit; the network, input size "
                        "and sources come from the checkpoint (warns when -d was one of its sources)")
    r.add_argument("--resume", type=Path, default=None, help="checkpoint to continue from (or to evaluate)")
    r.add_argument("--logs-dir", type=Path, default=Path("logs/il"),
                   help="checkpoints (latest.pth, best.pth), metrics.jsonl, metrics.png, TensorBoard "
                        "events; a folder that holds another run is refused without --resume or --overwrite")
    r.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --logs-dir that holds another one, replacing its files")
    r.add_argument("--log-every", type=at_least(1), default=20,
                   help="iterations between loss checks / bar updates")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (plain log lines)")
    return p


@dataclass
class RunConfig:
    """The settings a checkpoint records and a resume must agree with."""

    arch: str
    sources: list[str]
    target: str
    batch_size: int
    num_instances: int
    height: int
    width: int
    update_style: bool
    baseline: str
    epochs: int
    iters: int
    seed: int
    lr: float
    weight_decay: float
    temp: float
    momentum: float
    rho: float
    stem_relu: bool
    bn_groups: int

    @property
    def mode(self) -> str:
        return "il" if self.update_style else self.baseline


def run_config(args) -> RunConfig:
    return RunConfig(args.arch, [args.dataset_src1, args.dataset_src2, args.dataset_src3], args.dataset,
                     args.batch_size, args.num_instances, args.height, args.width, args.update_style,
                     args.baseline, args.epochs, args.iters, args.seed, args.lr, args.weight_decay,
                     args.temp, args.momentum, args.rho, args.stem_relu, args.bn_groups)


# ------------------------------------------------------------------------------------------ checks

def check_flags(args, cfg: RunConfig, world: int) -> None:
    """What the flags alone decide, before any process group, file or device is touched."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device (use --device cpu, or auto)")
    if args.evaluate:
        if args.resume is None:
            raise UsageError("--evaluate needs --resume CHECKPOINT (the checkpoint to evaluate)")
        check_target(cfg.target)
        return
    if args.apex:
        try:
            import apex.optimizers  # noqa: F401
        except ImportError:
            raise UsageError("--apex: NVIDIA apex is not installed (it is not on PyPI; build it from "
                             "NVIDIA's repository), or leave --apex out for torch's fused Adam") from None
    for flag, name in zip(("--dataset_src1", "--dataset_src2", "--dataset_src3"), cfg.sources):
        if name not in DATASETS:
            raise UsageError(f"{flag} {name!r}: unknown dataset; choose from {', '.join(DATASETS)}")
    check_target(cfg.target)
    if cfg.target in cfg.sources:
        raise UsageError(f"-d {cfg.target}: the target is also a source; it must stay unseen")
    if len(set(cfg.sources)) != 3:
        raise UsageError(f"sources {cfg.sources}: the three sources must differ")
    if cfg.batch_size % cfg.num_instances:
        raise UsageError(f"-b {cfg.batch_size} must be a multiple of --num-instances {cfg.num_instances}")
    if cfg.batch_size % world:
        raise UsageError(f"-b {cfg.batch_size} (global per source) must divide over {world} ranks")
    try:  # the statistics groups of the first and of the shuffled second forward
        make_layout([cfg.batch_size // world] * 3, cfg.bn_groups, 0, world)
        make_layout([3 * cfg.batch_size // world], cfg.bn_groups, 0, world)
    except ValueError as e:
        raise UsageError(f"--bn-groups {cfg.bn_groups} with -b {cfg.batch_size} on {world} rank(s): {e}") \
            from None


def check_target(name: str) -> None:
    if name not in DATASETS:
        raise UsageError(f"-d {name!r}: unknown dataset; choose from {', '.join(DATASETS)}")
    if name in SOURCE_ONLY:
        raise UsageError(f"-d {name}: has no query/gallery split, it can only be a source")


def check_pretrained(args) -> str:
    """The weights --pretrained names, checked now (their file read safely): 'none', 'imagenet'
    or a path."""
    if args.resume is not None or args.pretrained == "none":
        return "none"
    if args.pretrained == "imagenet":
        try:
            imagenet_weights_file(args.arch)
        except RuntimeError as e:
            raise UsageError(f"--pretrained imagenet: {e}") from None
        return "imagenet"
    path = Path(args.pretrained)
    if not path.is_file():
        raise UsageError(f"--pretrained {args.pretrained!r}: expected 'imagenet', 'none' or a weights file, "
                         f"and there is no file {path}")
    try:
        read_torch_file(path, "weights")
    except CheckpointError as e:
        raise UsageError(f"--pretrained {e}") from None
    return str(path)


def agree(error: UsageError | None, world: int) -> None:
    """Every rank raises the first refusal found on any rank (in rank order), so all ranks exit 2
    together instead of some waiting in a collective for ranks that have left."""
    if world > 1:
        found: list[str | None] = [None] * world
        dist.all_gather_object(found, None if error is None else str(error))
        error = next((UsageError(m) for m in found if m is not None), None)
    if error is not None:
        raise error


@contextmanager
def checked(world: int) -> Iterator[None]:
    """A block of checks that may fail on some ranks only; every rank leaves it together."""
    error = None
    try:
        yield
    except UsageError as e:
        error = e
    agree(error, world)


# ------------------------------------------------------------------------------------------ logs dir

@dataclass
class LogsDir:
    """The run's --logs-dir, locked for the run's lifetime (rank 0 holds it); ``stale`` are the
    files of an earlier run that --overwrite replaces once every check has passed; a folder this
    run created is removed again when the run is refused before writing into it."""

    path: Path
    lock: TextIO | None = None
    stale: list[Path] = field(default_factory=list)
    created: bool = False
    used: bool = False

    def release(self) -> None:
        if self.lock is None:
            return
        self.lock.close()
        self.lock = None
        if self.created and not self.used:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            self.path.rmdir()


def claim_logs_dir(path: Path, resume: bool, overwrite: bool) -> LogsDir:
    """Create and lock --logs-dir; refuse a file, an unwritable folder, a folder another live run
    holds, and one that holds another run's files without --resume or --overwrite."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--logs-dir {path} is a file, expected a folder")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = hold_folder(path)
    except FolderBusy as e:
        raise UsageError(f"--logs-dir {e}: two runs cannot write into one folder; wait for it to end "
                         "or choose another --logs-dir") from None
    except OSError as e:
        raise UsageError(f"--logs-dir {path}: cannot create or write this folder ({e.strerror or e})") \
            from None
    found = sorted(p for p in path.iterdir() if p.name in RUN_FILES or p.name.startswith("events.out."))
    if found and not (resume or overwrite):
        lock.close()
        names = ", ".join(p.name for p in found)
        raise UsageError(f"--logs-dir {path} holds another run ({names}): continue it with --resume "
                         f"{path / 'latest.pth'}, replace it with --overwrite, or choose another --logs-dir")
    return LogsDir(path, lock, found if overwrite and not resume else [], created)


# ------------------------------------------------------------------------------------------ stopping

class StopRequest:
    """SIGTERM and SIGINT ask the run to stop; every rank then stops at the same iteration, saves
    latest.pth and exits. A second SIGINT raises KeyboardInterrupt at once.

    The loop calls :meth:`agreed` after every iteration. With several ranks, each call starts an
    asynchronous all-reduce (max) of the signal this rank received (0: none) over a gloo group on
    the host and returns the result of the previous call's: every rank sees the same answer at
    the same iteration, within two iterations of the signal, and the step never waits for the
    device (nor, in practice, for the other hosts: the reduction had a whole iteration to
    complete)."""

    def __init__(self) -> None:
        self.signal = 0  # the first stop signal this process received
        self._group = None
        self._received = torch.zeros(1, dtype=torch.int32)
        self._pending = None
        self._previous = {s: signal.signal(s, self._set) for s in (signal.SIGTERM, signal.SIGINT)}

    def _set(self, signum: int, frame) -> None:
        if not self.signal:
            self.signal = signum
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def attach(self, world: int) -> None:
        """Make the agreement group; a collective, so every rank calls it once."""
        if world > 1:
            self._group = dist.new_group(backend="gloo")

    def agreed(self) -> int:
        """The stop signal all ranks agree on now (the same on every rank), 0 to go on."""
        if self._group is None:
            return self.signal
        agreed = 0
        if self._pending is not None:
            self._pending.wait()
            agreed = int(self._received.item())
        self._received = torch.tensor([self.signal], dtype=torch.int32)
        self._pending = dist.all_reduce(self._received, op=dist.ReduceOp.MAX, group=self._group,
                                        async_op=True)
        return agreed

    def close(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------------------------------ results

@dataclass
class RunResult:
    """What a run leaves in memory: tests compare it across ranks and runs."""

    exit_code: int
    history: list[dict] = field(default_factory=list)
    model: torch.nn.Module | None = None
    memories: list[MemoryClassifier] = field(default_factory=list)


def iteration_seed(seed: int, epoch: int, it: int) -> int:
    """The style draws of every iteration are seeded from (seed, epoch, iteration), so a run
    resumed anywhere, even mid-epoch after a SIGTERM, repeats them exactly; every rank draws
    the whole batch's values and takes its rows (model.style), so any number of ranks does too."""
    return (seed * 1_000_003 + epoch) * 100_003 + it


def save_plot(history: list[dict], path: Path, title: str) -> None:
    """mAP and rank-1 on the target over epochs, as a PNG beside metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in history if "mAP" in h]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in rows]
    ax.plot(epochs, [100 * h["mAP"] for h in rows], marker="o", label="mAP")
    ax.plot(epochs, [100 * h["rank1"] for h in rows], marker="s", label="rank-1")
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl from a checkpoint's history (atomically): a resumed run continues a log
    that matches its checkpoint, whichever checkpoint it resumed from."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    tmp.replace(path)


def print_table(history: list[dict], target: str) -> None:
    rows = [h for h in history if "mAP" in h]
    if not rows:
        return
    print(f"\nTarget {target}: epoch | mAP | rank-1 | rank-5 | rank-10")
    for h in rows:
        print(f"  {h['epoch']:5d} | {100 * h['mAP']:5.1f} | {100 * h['rank1']:6.1f} | "
              f"{100 * h['rank5']:6.1f} | {100 * h['rank10']:7.1f}")
    best = max(rows, key=lambda h: h["mAP"])
    print(f"  best: epoch {best['epoch']}, mAP {100 * best['mAP']:.1f}, rank-1 {100 * best['rank1']:.1f}")


def refuse(line: str, is_main: bool) -> None:
    """Why the run cannot go on: one line on rank 0's stderr and, under torchrun, in the error
    file torchrun reads, so that its failure report repeats the line under "Root Cause" (README:
    reading torchrun's report)."""
    if is_main:
        print(line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    """Run train.py; returns the exit code (2 for a refusal, printed as one line)."""
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        args = get_parser().parse_args(argv)
        cfg = run_config(args)
        check_flags(args, cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except UsageError as e:
        refuse(f"train.py: error: {e}", is_main)
        return 2
    dist_info = du.init_distributed(args.device)
    logging.basicConfig(level=logging.INFO if dist_info.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    try:
        return train(args, cfg, dist_info).exit_code
    except UsageError as e:
        refuse(f"train.py: error: {e}", dist_info.is_main)
        return 2
    finally:
        du.cleanup()


def train(args, cfg: RunConfig, dist_info: du.DistInfo) -> RunResult:
    """The run after its flags passed: more checks (files, folders, shards: :class:`UsageError`
    on every rank), then the work."""
    with ExitStack() as stack:
        stop = StopRequest()  # from the start: a signal during set-up stops at the first iteration
        stack.callback(stop.close)
        if args.evaluate:
            return evaluate_only(args, cfg, dist_info)
        return Run(args, cfg, dist_info, stop, stack).fit()


def prepare_shards(args, names: list[str], dist_info: du.DistInfo) -> None:
    """Every dataset the run needs must have complete shards of the current format; with
    --data-dir, rank 0 builds the missing ones first."""
    missing = [n for n in names if not (args.shards / n / "manifest.json").is_file()]
    with checked(dist_info.world):
        if missing and args.data_dir is not None and dist_info.is_main:
            from tools import make_shards
            log.info("building shards of %s from %s into %s", ", ".join(missing), args.data_dir, args.shards)
            if make_shards.main(["--data-dir", str(args.data_dir), "--out", str(args.shards),
                                 "--datasets", ",".join(missing)]) != 0:
                raise UsageError(f"building the shards of {', '.join(missing)} from {args.data_dir} failed "
                                 f"(make_shards' error is above; to skip bad images, build them with "
                                 f"python tools/make_shards.py --data-dir {args.data_dir} --out "
                                 f"{args.shards} --datasets {','.join(missing)} --skip-bad)")
    with checked(dist_info.world):
        for name in names:
            try:
                load_manifest(args.shards / name)
            except (FileNotFoundError, ValueError) as e:
                hint = "" if args.data_dir else (f" (run: python tools/make_shards.py --data-dir DATA --out "
                                                 f"{args.shards} --datasets {name}, or pass --data-dir)")
                raise UsageError(f"shards of {name}: {e}{hint}") from e


def loader_config(args, cfg: RunConfig, dist_info: du.DistInfo) -> LoaderConfig:
    try:
        kind = select_loader(args.loader)
    except ImportError as e:
        raise UsageError(f"--loader {args.loader}: {e}") from None
    dtype = amp_dtype(args.amp, dist_info.device)
    return LoaderConfig(height=cfg.height, width=cfg.width, num_ids=cfg.batch_size // cfg.num_instances,
                        num_instances=cfg.num_instances, iters=cfg.iters, seed=cfg.seed, workers=args.workers,
                        dtype=dtype or torch.float32, device=dist_info.device, rank=dist_info.rank,
                        world=dist_info.world, loader=kind, test_batch_size=args.test_batch_size)


def build_target_loader(args, cfg: RunConfig, lcfg: LoaderConfig):
    """The target's query + gallery loader (no worker started yet); a target on which no query
    can be ranked is refused now, not after the first epoch."""
    try:
        loader = build_eval_loader(args.shards, cfg.target, "test", lcfg)
    except ShardError as e:
        raise UsageError(f"shards of {cfg.target}: {e}") from None
    query = loader.is_query
    cameras: dict[int, set[int]] = {}  # the gallery's cameras of each identity
    for pid, cam in set(zip(loader.pids[~query].tolist(), loader.camids[~query].tolist())):
        cameras.setdefault(pid, set()).add(cam)
    queries = set(zip(loader.pids[query].tolist(), loader.camids[query].tolist()))
    if not any(cameras.get(pid, set()) - {cam} for pid, cam in queries):
        raise UsageError(f"-d {cfg.target}: no query image has a gallery image of its identity from another "
                         f"camera, so the target cannot be evaluated (check its shards: "
                         f"{args.shards / cfg.target})")
    return loader


def init_memories_in_one_pass(model, mix, memories: list[MemoryClassifier], device: torch.device,
                              dtype) -> None:
    """engine.evaluate.init_memories over the sources' mix sets read one after another by one
    loader (``mix.rows.source`` tells the sources apart): one pool of workers starts instead of
    one per source."""
    feats = extract_features(model, mix, device, dtype)
    source = torch.as_tensor(mix.rows.source, device=feats.device)
    labels = torch.as_tensor(mix.labels, device=feats.device)
    for s, memory in enumerate(memories):
        memory.init_centers(feats[source == s], labels[source == s])


def evaluate_only(args, cfg: RunConfig, dist_info: du.DistInfo) -> RunResult:
    """--evaluate: the checkpoint's network on the target. Only -d is needed; the network, input
    size and sources come from the checkpoint, and a flag that contradicts it is refused."""
    with checked(dist_info.world):
        try:
            ckpt = read_checkpoint(args.resume, EVAL_PARTS)
        except CheckpointError as e:
            raise UsageError(f"--resume {e}") from None
        saved = ckpt["config"]
        given = getattr(args, "given", set())
        for key in NETWORK_KEYS:
            if key not in saved:
                raise UsageError(f"--resume {args.resume}: its config lacks {key!r} "
                                 "(not a train.py checkpoint)")
            if key in given and getattr(args, key) != saved[key]:
                raise UsageError(f"--resume {args.resume} was written by another network: {key}: checkpoint "
                                 f"{saved[key]!r}, now {getattr(args, key)!r} (leave the flag out)")
        cfg = replace(cfg, **{k: saved[k] for k in NETWORK_KEYS}, sources=list(saved.get("sources", [])))
    if cfg.target in cfg.sources:
        log.warning("-d %s was a source of this checkpoint (trained on %s): this is not an unseen-domain "
                    "result", cfg.target, ", ".join(cfg.sources))
    prepare_shards(args, [cfg.target], dist_info)
    with checked(dist_info.world):
        lcfg = loader_config(args, cfg, dist_info)
        loader = build_target_loader(args, cfg, lcfg)
        model = build_model(cfg.arch, "none", stem_relu=cfg.stem_relu, style=UBS(rho=cfg.rho),
                            bn_groups=cfg.bn_groups)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UsageError(f"--resume {args.resume}: its weights do not fit its network "
                             f"({str(e).splitlines()[0]})") from None
    model = model.to(dist_info.device, memory_format=torch.channels_last)
    res = evaluate_target(model, loader, dist_info.device, amp_dtype(args.amp, dist_info.device),
                          rerank=args.rerank)
    if dist_info.is_main:
        print(f"{cfg.target}: mAP {100 * res['mAP']:.1f}  rank-1 {100 * res['rank1']:.1f}  "
              f"rank-5 {100 * res['rank5']:.1f}  rank-10 {100 * res['rank10']:.1f}")
    return RunResult(0, [res], model)


class Run:
    """One training run: :meth:`fit` checks everything it can first, then trains."""

    def __init__(self, args, cfg: RunConfig, dist_info: du.DistInfo, stop: StopRequest, stack: ExitStack):
        self.args, self.cfg, self.dist, self.stop = args, cfg, dist_info, stop
        self.started = time.monotonic()
        self.device = dist_info.device
        self.dtype = amp_dtype(args.amp, self.device)
        self.logs = LogsDir(args.logs_dir)
        stack.callback(lambda: self.logs.release())  # the one preflight claims
        self.history: list[dict] = []
        self.best_map = -1.0
        self.start_epoch = self.start_iter = 0
        self.resumed_losses: list[float] = []  # a checkpoint's losses of its epoch's earlier iterations
        self.stopping = 0  # the stop signal every rank agreed on

    # -------------------------------------------------------------------------------- checks
    def preflight(self) -> None:
        """Every check before any work, each refusal agreed by all ranks."""
        args, cfg, world = self.args, self.cfg, self.dist.world
        with checked(world):
            if self.dist.is_main:
                self.logs = claim_logs_dir(args.logs_dir, args.resume is not None, args.overwrite)
            self.ckpt = self.read_resume()
            pretrained = check_pretrained(args)
            self.lcfg = loader_config(args, cfg, self.dist)
            torch.manual_seed(cfg.seed)
            try:
                self.model = build_model(cfg.arch, pretrained, stem_relu=cfg.stem_relu,
                                         style=UBS(rho=cfg.rho), bn_groups=cfg.bn_groups)
            except ValueError as e:  # weights of another network, or not a state dict
                raise UsageError(f"--pretrained {e}") from None
            self.load_weights()
        prepare_shards(args, cfg.sources + [cfg.target], self.dist)
        with checked(world):
            self.target_loader = build_target_loader(args, cfg, self.lcfg)
            try:
                self.train_loader = build_train_loader(args.shards, cfg.sources, self.lcfg)
            except ValueError as e:  # ShardError, or a source too small for the batch
                raise UsageError(f"sources {', '.join(cfg.sources)}: {e}") from None
            self.check_memories()

    def read_resume(self) -> dict | None:
        args = self.args
        if args.resume is None:
            return None
        try:
            ckpt = read_checkpoint(args.resume)
        except CheckpointError as e:
            raise UsageError(f"--resume {e}") from None
        diffs = config_differences(ckpt["config"], asdict(self.cfg), RESUME_KEYS)
        if diffs:
            raise UsageError(f"--resume {args.resume} was written by another configuration: "
                             f"{'; '.join(diffs)}")
        return ckpt

    def load_weights(self) -> None:
        """The model, optimizer, schedule and scaler states of the checkpoint, loaded now so a
        damaged one is refused before any work."""
        self.model.rank, self.model.world = self.dist.rank, self.dist.world
        self.model = self.model.to(self.device, memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model.parameters(), self.cfg.lr, self.cfg.weight_decay,
                                         self.device, self.args.apex)
        self.scheduler = build_scheduler(self.optimizer, self.args.milestones,
                                         warmup_epochs=self.args.warmup_epochs)
        self.scaler = build_scaler(self.device, self.dtype)
        ckpt = self.ckpt
        if ckpt is None:
            return
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"--resume {self.args.resume}: its states do not fit this run "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if not 0 <= ckpt["iteration"] < self.cfg.iters or ckpt["epoch"] < 0:
            raise UsageError(f"--resume {self.args.resume}: epoch {ckpt['epoch']}, iteration "
                             f"{ckpt['iteration']} is not a position in a run of {self.cfg.iters} "
                             "iterations per epoch")
        self.start_epoch, self.start_iter = ckpt["epoch"], ckpt["iteration"]
        self.best_map, self.history = ckpt["best_map"], list(ckpt["history"])
        self.resumed_losses = [float(x) for x in ckpt.get("epoch_losses", [])][:self.start_iter]

    def check_memories(self) -> None:
        """A resumed run's memories must be one [classes, features] matrix per source, as the
        sources' shards and the network give them."""
        if self.ckpt is None:
            return
        expected = [(n, self.model.num_features) for n in self.train_loader.num_classes]
        found = [tuple(m.shape) for m in self.ckpt["memories"]]
        if found != expected:
            raise UsageError(f"--resume {self.args.resume}: its memories have shapes {found}, the sources "
                             f"{', '.join(self.cfg.sources)} need {expected} (one [classes, features] per "
                             "source): it belongs to other data")

    # -------------------------------------------------------------------------------- set-up
    def set_up(self) -> None:
        """The work before the first iteration: memories, DDP, logs."""
        cfg, dist_info = self.cfg, self.dist
        backend = ("nccl" if self.device.type == "cuda" else "gloo" if dist_info.world > 1
                   else "single process")
        log.info("device %s x %d ranks (%s), precision %s, channels_last%s, loader %s, mode %s, "
                 "statistics groups %d per batch", self.device, dist_info.world, backend,
                 self.dtype or "fp32", ", torch.compile" if self.args.compile else "", self.lcfg.loader,
                 cfg.mode, cfg.bn_groups)
        group_ids = cfg.batch_size // cfg.bn_groups // cfg.num_instances
        if group_ids < 4:
            log.warning("each statistics group holds %d images of %d identities (-b %d / --bn-groups %d); "
                        "the published run had 16 images of 4: with fewer, BatchNorm normalises away much "
                        "of what tells identities apart and training learns little (use a smaller "
                        "--bn-groups)",
                        cfg.batch_size // cfg.bn_groups, group_ids, cfg.batch_size, cfg.bn_groups)
        self.memories = [MemoryClassifier(self.model.num_features, n, temp=cfg.temp,
                                          momentum=cfg.momentum).to(self.device)
                         for n in self.train_loader.num_classes]
        du.broadcast_state(self.model)
        if self.ckpt is None:
            log.info("initialising memories from source features (%s)",
                     ", ".join(f"{s}: {n} ids" for s, n in zip(cfg.sources, self.train_loader.num_classes)))
            mix = build_eval_loader(self.args.shards, cfg.sources, "mix", self.lcfg)
            init_memories_in_one_pass(self.model, mix, self.memories, self.device, self.dtype)
            del mix  # its workers end now
        else:
            for mem, centers in zip(self.memories, self.ckpt["memories"]):
                mem.centers.copy_(centers)
            log.info("resumed from %s (epoch %d, iteration %d)", self.args.resume, self.start_epoch,
                     self.start_iter)
        self.ckpt = None  # its tensors are copied; free them
        self.net = self.model
        if dist_info.world > 1:
            self.net = DistributedDataParallel(self.net, device_ids=[self.device.index]
                                               if self.device.type == "cuda" else None,
                                               gradient_as_bucket_view=True)
        if self.args.compile:
            self.net = torch.compile(self.net)
        self.writer = None
        if dist_info.is_main:
            self.set_up_logs()

    def set_up_logs(self) -> None:
        logs = self.logs.path
        self.logs.used = True
        for stale in self.logs.stale:  # --overwrite: the earlier run's files go now, after every check
            stale.unlink(missing_ok=True)
        if self.args.resume is not None:
            write_metrics(logs / "metrics.jsonl", self.history)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(logs))
        except ImportError:
            log.info("tensorboard not installed: no event files (metrics.jsonl and metrics.png are written)")

    # -------------------------------------------------------------------------------- training
    def fit(self) -> RunResult:
        self.preflight()
        self.set_up()
        self.stop.attach(self.dist.world)
        for epoch in range(self.start_epoch, self.cfg.epochs):
            start = self.start_iter if epoch == self.start_epoch else 0
            stopped_at = self.train_epoch(epoch, start)
            if stopped_at is not None:
                return self.stopped(epoch, stopped_at)
            self.end_epoch(epoch)
        if self.dist.is_main:
            print_table(self.history, self.cfg.target)
            if self.writer is not None:
                self.writer.close()
        return RunResult(0, self.history, self.model, self.memories)

    def train_epoch(self, epoch: int, first: int) -> int | None:
        """Iterations first.. of an epoch; the iteration the run stopped after, on a stop request."""
        cfg, args, dist_info = self.cfg, self.args, self.dist
        self.net.train()
        self.losses = torch.zeros(cfg.iters, device=self.device)
        self.first, self.checked = first, first
        if first and len(self.resumed_losses) == first:  # resumed mid-epoch: the earlier losses
            self.losses[:first] = torch.tensor(self.resumed_losses)
            self.first = 0
        batches = self.train_loader.epoch(epoch, start=first)
        bar = None
        if dist_info.is_main and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.iters, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       dynamic_ncols=True, leave=False)
        self.t0, self.n_done = time.perf_counter(), 0
        for it in range(first, cfg.iters):
            batch = next(batches)
            torch.manual_seed(iteration_seed(cfg.seed, epoch, it))
            plan = shuffle_plan(batch.sizes, dist_info.world, dist_info.rank, cfg.seed, epoch, it,
                                shuffle=cfg.mode != "fb", round_sizes=batch.round_sizes,
                                labels=batch.batch_labels)
            self.losses[it] = train_step(self.net, self.memories, batch.images, batch.labels, batch.sizes,
                                         self.optimizer, self.scaler, self.dtype, cfg.mode, plan)
            self.n_done += 1
            if self.n_done == 1 and epoch == self.start_epoch:
                log.info("first iteration done, %.1f s after set-up began", time.monotonic() - self.started)
            self.stopping = self.stop.agreed()
            if (it + 1) % args.log_every == 0 or it + 1 == cfg.iters or self.stopping:
                self.log_point(epoch, it, bar)
            if self.stopping:
                if bar is not None:
                    bar.close()
                return it + 1
        if bar is not None:
            bar.close()
        return None

    def log_point(self, epoch: int, it: int, bar) -> None:
        """The loop's only read-back: losses and refused memory updates since the last one."""
        window = self.losses[self.checked: it + 1]
        finite = torch.isfinite(window)
        refused = torch.stack([m.refusals.sum() for m in self.memories]).sum()
        bad_loss, bad_update = torch.stack([~finite.all(), refused > 0]).tolist()
        nonfinite, refusal = du.any_rank([bad_loss, bad_update], self.device)
        if nonfinite or refusal:
            problems = []
            if not finite.all():
                bad = self.checked + int((~finite).nonzero()[0])
                problems.append(f"non-finite loss at epoch {epoch + 1}, iteration {bad + 1}")
            for m in self.memories:
                try:
                    m.raise_refused()
                except ValueError as e:
                    problems.append(f"epoch {epoch + 1}, iterations {self.checked + 1}-{it + 1}: {e}")
            raise NonFiniteLoss("; ".join(problems or ["another rank stopped on non-finite values"])
                                + f": training stopped; the last good checkpoint "
                                f"({self.logs.path / 'latest.pth'}) is kept")
        if bar is not None:
            rate = self.n_done * 3 * self.cfg.batch_size / (time.perf_counter() - self.t0)
            bar.set_postfix(loss=f"{float(self.losses[it]):.3f}", img_s=f"{rate:.0f}")
            bar.update(it + 1 - self.checked)
        self.checked = it + 1

    def stopped(self, epoch: int, iteration: int) -> RunResult:
        """Every rank stops here at the same iteration; none exits before latest.pth is written
        (torchrun ends the others as soon as one exits with a non-zero code)."""
        self.checkpoint(epoch, iteration)
        du.barrier()
        signum = self.stopping
        if self.dist.is_main:
            print(f"train.py: stopped by {signal.Signals(signum).name} at epoch {epoch + 1}, iteration "
                  f"{iteration}: checkpoint saved; resume with: --resume {self.logs.path / 'latest.pth'}",
                  file=sys.stderr, flush=True)
        return RunResult(128 + signum, self.history, self.model, self.memories)

    def end_epoch(self, epoch: int) -> None:
        """Schedule, checkpoint, then evaluation (whose failure is reported, not fatal), then the
        checkpoint again with its result, best.pth, and the logs."""
        cfg, args = self.cfg, self.args
        elapsed = time.perf_counter() - self.t0
        self.scheduler.step()
        du.broadcast_state(self.model, buffers_only=True)
        row = {"epoch": epoch + 1, "loss": float(self.losses[self.first:].mean()),
               "lr": self.optimizer.param_groups[0]["lr"],
               "images_per_s": self.n_done * 3 * cfg.batch_size / elapsed, "time_s": elapsed}
        self.history.append(row)
        self.checkpoint(epoch + 1, 0)  # before the evaluation: a failed or interrupted one loses nothing
        if (args.eval_every and (epoch + 1) % args.eval_every == 0) or epoch + 1 == cfg.epochs:
            self.evaluate(epoch, row)
            is_best = "mAP" in row and row["mAP"] > self.best_map
            if is_best:
                self.best_map = row["mAP"]
            self.checkpoint(epoch + 1, 0)  # with the evaluation's result
            if is_best and self.dist.is_main:
                copy_checkpoint(self.logs.path / "latest.pth", self.logs.path / "best.pth")
        if self.dist.is_main:
            self.log_epoch(row)

    def evaluate(self, epoch: int, row: dict) -> None:
        t1 = time.perf_counter()
        try:
            res = evaluate_target(self.model, self.target_loader, self.device, self.dtype,
                                  rerank=self.args.rerank)
        except ValueError as e:  # e.g. non-finite features: the run goes on, its checkpoint is saved
            row["eval_error"] = str(e)
            log.error("epoch %d: evaluation on %s failed: %s; training goes on (latest.pth is saved)",
                      epoch + 1, self.cfg.target, e)
            return
        row.update(mAP=res["mAP"], rank1=res["rank1"], rank5=res["rank5"], rank10=res["rank10"],
                   eval_s=time.perf_counter() - t1)

    def log_epoch(self, row: dict) -> None:
        cfg, logs = self.cfg, self.logs.path
        msg = (f"epoch {row['epoch']}/{cfg.epochs}  loss {row['loss']:.3f}  lr {row['lr']:.2e}  "
               f"{row['images_per_s']:.0f} img/s")
        if "mAP" in row:
            msg += f"  {cfg.target} mAP {100 * row['mAP']:.1f} rank-1 {100 * row['rank1']:.1f}"
        log.info(msg)
        with open(logs / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row["epoch"])
        save_plot(self.history, logs / "metrics.png",
                  f"{cfg.mode.upper()}: {'+'.join(cfg.sources)} -> {cfg.target}")

    def checkpoint(self, epoch: int, iteration: int) -> None:
        """latest.pth: everything a resume needs. The sampler, shuffles, augmentation and style
        draws are functions of (seed, epoch, iteration, rank), so (epoch, iteration) is their
        whole state."""
        if self.dist.is_main:
            save_checkpoint({"config": asdict(self.cfg), "epoch": epoch, "iteration": iteration,
                             "model": self.model.state_dict(), "memories": [m.centers for m in self.memories],
                             "optimizer": self.optimizer.state_dict(),
                             "scheduler": self.scheduler.state_dict(),
                             "scaler": self.scaler.state_dict(), "best_map": self.best_map,
                             "history": self.history, "epoch_losses": self.losses[:iteration].tolist()},
                            self.logs.path / "latest.pth")


if __name__ == "__main__":
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        sys.exit(main())
    except NonFiniteLoss as e:
        refuse(f"train.py: error: {e}", is_main)
        sys.exit(3)
    except KeyboardInterrupt:
        if is_main:
            print("train.py: interrupted twice: stopped at once; latest.pth holds the last saved checkpoint",
                  file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
