"""train.py's flags, in groups that other commands reuse (``tools/benchmark.py`` takes the model
and speed flags from here, so a benchmark runs what train.py runs).

The published code's spellings are accepted as aliases (``--epoch``, ``--updateStyle``), so its
command lines run unchanged."""
from __future__ import annotations

import argparse
import copy
from datetime import timedelta
from pathlib import Path

from engine.config import WORKERS, ExecConfig, RunConfig, default_workers
from engine.device import DEVICES
from engine.errors import UsageError
from engine.evaluation.targets import EvalOptions
from model.groups import BN_IMPLS

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default."""


class Parser(argparse.ArgumentParser):
    """The parser of train.py and of every tool: refuses bad flags through :class:`UsageError`
    (one line, ``<prog>: error: ...``, exit code 2; no usage dump), and records in the parsed
    namespace's ``given`` which flags the command line set (``--evaluate`` takes the others from the
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


def duration(text: str) -> timedelta:
    """argparse type: a positive time, in minutes (``30``) or with its unit (``90s``, ``45m``, ``2h``)."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "m")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected minutes, or a number with s, m or h, got {text!r}") \
            from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected a positive time, got {text!r}")
    return timedelta(seconds=seconds)


def names(text: str) -> list[str]:
    """argparse type: a comma-separated list of distinct dataset names."""
    items = [n.strip() for n in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected dataset names separated by commas, got {text!r}")
    if len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(f"a dataset is named twice in {text!r}")
    return items


MAX_SOURCES = 5  # the datasets make_shards knows; each source is a memory and a batch per iteration


def source_names(text: str) -> list[str]:
    """argparse type of --sources: 1 to MAX_SOURCES distinct dataset names, comma-separated."""
    items = names(text)
    if len(items) > MAX_SOURCES:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_SOURCES} datasets, got {len(items)} in "
                                         f"{text!r}")
    return items


def train_parser(description: str) -> Parser:
    """Every flag of train.py."""
    p = Parser(prog="train.py", description=description, formatter_class=HelpFormatter)
    add_data_flags(p.add_argument_group("data"))
    add_model_flags(p.add_argument_group("model"))
    add_training_flags(p.add_argument_group("optimisation"), p.add_argument_group("speed"))
    add_report_flags(p.add_argument_group("evaluation and logging"))
    return p


def add_data_flags(d) -> None:
    d.add_argument("--sources", type=source_names, default=None, metavar="SRC[,SRC...]",
                   help=f"source datasets, comma-separated, 1 to {MAX_SOURCES}: each has its own memory "
                        "classifier and its own identity batches of -b images (default: the three of "
                        "--dataset_src1/2/3)")
    d.add_argument("--dataset_src1", default="market1501",
                   help="first source dataset (--dataset_src1/2/3: the published spelling of three sources)")
    d.add_argument("--dataset_src2", default="dukemtmc", help="second source dataset")
    d.add_argument("--dataset_src3", default="cuhk03", help="third source dataset")
    d.add_argument("-d", "--dataset", type=names, default=["msmt17v1"], metavar="TARGET[,TARGET...]",
                   help="unseen target dataset(s), comma-separated: each is evaluated at every evaluation "
                        "point (evaluation only; best.pth follows --best-by)")
    d.add_argument("--shards", type=Path, default=Path("shards"),
                   help="folder of shards written by tools/make_shards.py")
    d.add_argument("--data-dir", type=Path, default=None,
                   help="raw datasets (DATA/<name>/...); when given, shards missing from --shards are "
                        "built from it first (once)")
    d.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto",
                   help="DALI GPU pipeline, or the PIL/torchvision DataLoader; auto takes DALI when "
                        "installed")
    d.add_argument("-j", "--workers", type=at_least(0), default=default_workers(),
                   help=f"data worker processes per rank (by default {WORKERS}, or the cores available when "
                        "fewer)")
    d.add_argument("--height", type=at_least(1), default=256, help="input height")
    d.add_argument("--width", type=at_least(1), default=128, help="input width")
    d.add_argument("--pad", type=at_least(0), default=None,
                   help="zero padding in pixels before the training crop, which shifts by up to this much "
                        "(default: the published 10 at width 128, scaled with --width: 5 at 64, 1 at 16)")
    d.add_argument("-b", "--batch-size", type=at_least(1), default=64,
                   help="global batch per source (identities x --num-instances), split over ranks")
    d.add_argument("--num-instances", type=at_least(1), default=4, help="images per identity in a batch")
    d.add_argument("--test-batch-size", type=at_least(1), default=256,
                   help="batch of feature extraction, per rank")


def add_model_flags(m) -> None:
    m.add_argument("-a", "--arch", choices=("resnet50", "resnet18", "resnet50_ibn_a"), default="resnet50",
                   help="backbone (resnet50_ibn_a: ResNet-50 with IBN-Net's instance-batch normalisation in "
                        "layer1-3)")
    m.add_argument("--pretrained", default="imagenet",
                   help="'imagenet' (torchvision's weights from its cache), a local .pth file, or 'none' "
                        "(resnet50_ibn_a's ImageNet weights: IBN-Net's released resnet50_ibn_a-d9d0bb7b.pth, "
                        "passed as a file)")
    m.add_argument("--stem-relu", action="store_true",
                   help="standard ResNet stem with ReLU after the stem BN (the published code has none)")
    m.add_argument("--update-style", "--updateStyle", action="store_true",
                   help="Style Interleaved Learning: restyle features (UBS) in the memory-update forward "
                        "(--updateStyle: the published spelling)")
    m.add_argument("--baseline", choices=("fbf", "fb"), default="fbf",
                   help="without --update-style: fbf = second forward without style, fb = no second "
                        "forward (memories take the first forward's features)")
    m.add_argument("--bn-groups", type=at_least(1), default=4,
                   help="BatchNorm (and style) statistics over this many contiguous groups of each source's "
                        "batch and of the shuffled second forward, as the published 4-GPU DataParallel runs "
                        "computed them; the same groups on any number of GPUs (synchronised where a group "
                        "spans several); 1 = whole-batch statistics")
    m.add_argument("--bn-impl", choices=("auto", *BN_IMPLS), default="auto",
                   help="how the statistics groups are computed (the same result): group-norm = one "
                        "GroupNorm kernel per layer over a view of the batch (fewest operations), batch-norm "
                        "= one BatchNorm kernel per group (stays in bf16 and channels_last on CUDA); auto = "
                        "group-norm on CPU, batch-norm on CUDA")
    m.add_argument("--rho", type=real_in(0), default=3.0, help="UBS style range (mean +- rho * std)")
    m.add_argument("--temp", type=real_in(0, low_open=True), default=0.05,
                   help="memory classifier temperature")
    m.add_argument("--momentum", type=real_in(0, 1), default=0.2, help="memory update momentum")


def add_training_flags(o, s) -> None:
    o.add_argument("--lr", type=real_in(0), default=3.5e-4, help="Adam learning rate")
    o.add_argument("--weight-decay", type=real_in(0), default=5e-4, help="Adam weight decay")
    o.add_argument("--epochs", "--epoch", type=at_least(1), default=70,
                   help="epochs (--epoch: the published spelling)")
    o.add_argument("--iters", type=at_least(1), default=200, help="iterations per epoch")
    o.add_argument("--milestones", type=at_least(0), nargs="+", default=[30, 50],
                   help="epochs where lr drops by 10")
    o.add_argument("--warmup-epochs", type=at_least(0), default=10, help="linear warm-up length (epochs)")
    o.add_argument("--seed", type=at_least(0), default=1, help="seed of sampling, shuffles and style draws")
    s.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="autocast: auto = bf16 where the GPU has it, else fp16 with a grad scaler; "
                        "fp32 on CPU")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--apex", action="store_true", help="apex FusedAdam instead of torch's fused Adam")
    s.add_argument("--dist-timeout", type=duration, default=None, metavar="TIME",
                   help="timeout of the process group's collectives (init_process_group), in minutes or "
                        "with a unit (90s, 45m, 2h); default torch's: 10 min with NCCL, 30 with gloo. Rank "
                        "0 building shards (--data-dir) is waited for without it")
    s.add_argument("--device", choices=DEVICES, default="auto",
                   help="where to train: auto = CUDA when torch sees a GPU, else the CPU (refused when the "
                        "machine has GPUs this torch cannot use: --device cpu to insist)")


def add_report_flags(r) -> None:
    r.add_argument("--eval-every", type=at_least(0), default=1,
                   help="evaluate the target every N epochs (0: at the end only)")
    r.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking at evaluation")
    r.add_argument("--flip-test", action="store_true",
                   help="test-time option: a feature is the normalised sum of the image's and its mirror "
                        "image's features (off: the published protocol)")
    r.add_argument("--aqe", type=at_least(0), default=0, metavar="K",
                   help="test-time option: average query expansion, each query feature averaged with its "
                        "K nearest gallery features and normalised again (0: off, the published protocol)")
    r.add_argument("--best-by", choices=("first", "mean"), default="first",
                   help="with several targets (-d a,b): best.pth and the run's mAP/rank-1 columns follow the "
                        "first target's mAP, or the mean over the targets")
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


def add_train_flags(group, *dests: str) -> None:
    """Adds to ``group`` (a parser or an argument group) train.py's flags whose destinations are
    ``dests``, exactly as train.py defines them: spellings, type, choices, default and help. A
    command that shares a setting with train.py (``tools/benchmark.py``) takes the flag from here
    rather than a copy, so the two cannot drift apart; train.py's own groups are left as they are."""
    actions = {a.dest: a for a in train_parser("")._actions}
    for dest in dests:
        group._add_action(copy.copy(actions[dest]))


def configs(args: argparse.Namespace) -> tuple[RunConfig, ExecConfig]:
    """train.py's parsed flags as the configuration ``engine/`` takes: the one place that reads
    them."""
    return RunConfig.from_args(args), ExecConfig(
        shards=args.shards, data_dir=args.data_dir, loader=args.loader, workers=args.workers,
        test_batch_size=args.test_batch_size, pretrained=args.pretrained, amp=args.amp, compile=args.compile,
        apex=args.apex, device=args.device, dist_timeout=args.dist_timeout, milestones=args.milestones,
        warmup_epochs=args.warmup_epochs, eval_every=args.eval_every,
        evaluation=EvalOptions(rerank=args.rerank, flip=args.flip_test, aqe=args.aqe), evaluate=args.evaluate,
        resume=args.resume, logs_dir=args.logs_dir, overwrite=args.overwrite, log_every=args.log_every,
        progress=not args.no_progress, given=frozenset(getattr(args, "given", ())))
