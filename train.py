r"""Train Style Interleaved Learning (Tan et al., IEEE TMM 2023) on three source datasets and
evaluate on an unseen target.

    torchrun --nproc_per_node 4 train.py --update-style \
        --dataset_src1 market1501 --dataset_src2 dukemtmc --dataset_src3 cuhk03 -d msmt17v1

One process per GPU (NCCL; gloo on CPU). `-b` is the global batch per source: every rank takes
its slice of each sampled batch, so 1 and N GPUs train on the same global batches.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from engine import distributed as du
from engine.checkpoint import RESUME_KEYS, config_differences, load_checkpoint, save_checkpoint
from engine.evaluate import evaluate_target, init_memories
from engine.optim import amp_dtype, build_optimizer, build_scaler, build_scheduler
from engine.step import shuffle_plan, train_step
from model.memory import MemoryClassifier
from model.groups import make_layout
from model.resnet import build_model
from model.style import UBS
from pipeline.loader import LoaderConfig, build_eval_loader, build_train_loader, select_loader
from pipeline.records import DATASETS, SOURCE_ONLY
from pipeline.shards import load_manifest

log = logging.getLogger("train")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default."""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
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
    d.add_argument("-j", "--workers", type=int, default=4, help="data worker processes per rank")
    d.add_argument("--height", type=int, default=256, help="input height")
    d.add_argument("--width", type=int, default=128, help="input width")
    d.add_argument("-b", "--batch-size", type=int, default=64,
                   help="global batch per source (identities x --num-instances), split over ranks")
    d.add_argument("--num-instances", type=int, default=4, help="images per identity in a batch")
    d.add_argument("--test-batch-size", type=int, default=256, help="batch of feature extraction, per rank")
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
    m.add_argument("--bn-groups", type=int, default=4,
                   help="BatchNorm (and style) statistics over this many contiguous groups of each source's "
                        "batch and of the shuffled second forward, as the published 4-GPU DataParallel runs "
                        "computed them; the same groups on any number of GPUs (synchronised where a group "
                        "spans several); 1 = whole-batch statistics")
    m.add_argument("--rho", type=float, default=3.0, help="UBS style range (mean +- rho * std)")
    m.add_argument("--temp", type=float, default=0.05, help="memory classifier temperature")
    m.add_argument("--momentum", type=float, default=0.2, help="memory update momentum")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=3.5e-4, help="Adam learning rate")
    o.add_argument("--weight-decay", type=float, default=5e-4, help="Adam weight decay")
    o.add_argument("--epochs", type=int, default=70, help="epochs")
    o.add_argument("--iters", type=int, default=200, help="iterations per epoch")
    o.add_argument("--milestones", type=int, nargs="+", default=[30, 50], help="epochs where lr drops by 10")
    o.add_argument("--warmup-epochs", type=int, default=10, help="linear warm-up length (epochs)")
    o.add_argument("--seed", type=int, default=1, help="seed of sampling, shuffles and style draws")
    s = p.add_argument_group("speed")
    s.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="autocast: auto = bf16 where the GPU has it, else fp16 with a grad scaler; "
                        "fp32 on CPU")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--apex", action="store_true", help="apex FusedAdam instead of torch's fused Adam")
    s.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to train")
    r = p.add_argument_group("evaluation and logging")
    r.add_argument("--eval-every", type=int, default=1,
                   help="evaluate the target every N epochs (0: at the end only)")
    r.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking at evaluation")
    r.add_argument("--evaluate", action="store_true", help="only evaluate (the --resume checkpoint) and exit")
    r.add_argument("--resume", type=Path, default=None, help="checkpoint to continue from (or to evaluate)")
    r.add_argument("--logs-dir", type=Path, default=Path("logs/il"),
                   help="checkpoints (latest.pth, best.pth), metrics.jsonl, metrics.png, TensorBoard events")
    r.add_argument("--log-every", type=int, default=20, help="iterations between loss checks / bar updates")
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


def check_args(args, cfg: RunConfig, world: int) -> None:
    """Refuse a bad configuration before any work is done."""
    for flag, name in zip(("--dataset_src1", "--dataset_src2", "--dataset_src3", "-d"),
                          cfg.sources + [cfg.target]):
        if name not in DATASETS:
            raise SystemExit(f"{flag} {name!r}: unknown dataset; choose from {', '.join(DATASETS)}")
    if cfg.target in cfg.sources:
        raise SystemExit(f"-d {cfg.target}: the target is also a source; it must stay unseen")
    if len(set(cfg.sources)) != 3:
        raise SystemExit(f"sources {cfg.sources}: the three sources must differ")
    if cfg.target in SOURCE_ONLY:
        raise SystemExit(f"-d {cfg.target}: has no query/gallery split, it can only be a source")
    if cfg.batch_size % cfg.num_instances:
        raise SystemExit(f"-b {cfg.batch_size} must be a multiple of --num-instances {cfg.num_instances}")
    if cfg.batch_size % world:
        raise SystemExit(f"-b {cfg.batch_size} (global per source) must divide over {world} ranks")
    try:  # the statistics groups of the first and of the shuffled second forward
        make_layout([cfg.batch_size // world] * 3, cfg.bn_groups, 0, world)
        make_layout([3 * cfg.batch_size // world], cfg.bn_groups, 0, world)
    except ValueError as e:
        raise SystemExit(f"--bn-groups {cfg.bn_groups} with -b {cfg.batch_size} on {world} rank(s): {e}") from e
    if args.evaluate and args.resume is None:
        raise SystemExit("--evaluate needs --resume CHECKPOINT")


def prepare_shards(args, cfg: RunConfig, dist_info: du.DistInfo) -> None:
    """Every dataset the run needs must have complete shards of the current format; with
    --data-dir, rank 0 builds the missing ones first."""
    needed = cfg.sources + [cfg.target]
    missing = [n for n in needed if not (args.shards / n / "manifest.json").is_file()]
    if missing and args.data_dir is not None and dist_info.is_main:
        from tools import make_shards
        log.info("building shards of %s from %s into %s", ", ".join(missing), args.data_dir, args.shards)
        if make_shards.main(["--data-dir", str(args.data_dir), "--out", str(args.shards),
                             "--datasets", ",".join(missing)]) != 0:
            raise SystemExit(f"building the shards of {', '.join(missing)} from {args.data_dir} failed "
                             "(the error is above)")
    du.barrier()
    for name in needed:
        try:
            load_manifest(args.shards / name)
        except (FileNotFoundError, ValueError) as e:
            hint = "" if args.data_dir else (f" (run: python tools/make_shards.py --data-dir DATA --out "
                                             f"{args.shards} --datasets {name}, or pass --data-dir)")
            raise SystemExit(f"shards of {name}: {e}{hint}") from e


class StopRequest:
    """Set by SIGTERM/SIGINT; the loop saves a checkpoint at the end of the iteration and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, signum, frame) -> None:
        self.signal = signum


class NonFiniteLoss(RuntimeError):
    pass


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


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    cfg = run_config(args)
    dist_info = du.init_distributed(args.device)
    logging.basicConfig(level=logging.INFO if dist_info.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    try:
        check_args(args, cfg, dist_info.world)
        return train(args, cfg, dist_info).exit_code
    finally:
        du.cleanup()


def train(args, cfg: RunConfig, dist_info: du.DistInfo) -> RunResult:
    device = dist_info.device
    stop = StopRequest()  # from the start: a SIGTERM during set-up stops at the first check
    prepare_shards(args, cfg, dist_info)
    dtype = amp_dtype(args.amp, device)
    loader_kind = select_loader(args.loader)
    lcfg = LoaderConfig(height=cfg.height, width=cfg.width, num_ids=cfg.batch_size // cfg.num_instances,
                        num_instances=cfg.num_instances, iters=cfg.iters, seed=cfg.seed, workers=args.workers,
                        dtype=dtype or torch.float32, device=device, rank=dist_info.rank,
                        world=dist_info.world, loader=loader_kind, test_batch_size=args.test_batch_size)
    log.info("device %s x %d ranks (%s), precision %s, channels_last%s, loader %s, mode %s, "
             "statistics groups %d per batch", device, dist_info.world,
             "nccl" if device.type == "cuda" else "gloo" if dist_info.world > 1 else "single process",
             dtype or "fp32", ", torch.compile" if args.compile else "", loader_kind, cfg.mode, cfg.bn_groups)

    target_loader = build_eval_loader(args.shards, cfg.target, "test", lcfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, "none" if args.resume else args.pretrained, stem_relu=cfg.stem_relu,
                        style=UBS(rho=cfg.rho), bn_groups=cfg.bn_groups).to(device, memory_format=torch.channels_last)
    model.rank, model.world = dist_info.rank, dist_info.world
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        # Evaluating needs only the same network; resuming needs the same training run.
        keys = ("arch", "stem_relu") if args.evaluate else RESUME_KEYS
        diffs = config_differences(ckpt["config"], asdict(cfg), keys)
        if diffs:
            raise SystemExit(f"{args.resume} was written by another configuration:\n  " + "\n  ".join(diffs))
        model.load_state_dict(ckpt["model"])
        log.info("resumed from %s (epoch %d, iteration %d)", args.resume, ckpt["epoch"], ckpt["iteration"])

    if args.evaluate:
        res = evaluate_target(model, target_loader, device, dtype, rerank=args.rerank)
        if dist_info.is_main:
            print(f"{cfg.target}: mAP {100 * res['mAP']:.1f}  rank-1 {100 * res['rank1']:.1f}  "
                  f"rank-5 {100 * res['rank5']:.1f}  rank-10 {100 * res['rank10']:.1f}")
        return RunResult(0, [res], model)

    train_loader = build_train_loader(args.shards, cfg.sources, lcfg)
    memories = [MemoryClassifier(model.num_features, n, temp=cfg.temp, momentum=cfg.momentum).to(device)
                for n in train_loader.num_classes]
    du.broadcast_state(model)
    if ckpt is None:
        log.info("initialising memories from source features (%s)",
                 ", ".join(f"{s}: {n} ids" for s, n in zip(cfg.sources, train_loader.num_classes)))
        mix_loaders = [build_eval_loader(args.shards, s, "mix", lcfg) for s in cfg.sources]
        init_memories(model, mix_loaders, memories, device, dtype)
        del mix_loaders  # their workers and buffers are not needed again
    else:
        for mem, centers in zip(memories, ckpt["memories"]):
            mem.centers.copy_(centers)

    net = model
    if dist_info.world > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True)
    if args.compile:
        net = torch.compile(net)
    optimizer = build_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, device, args.apex)
    scheduler = build_scheduler(optimizer, args.milestones, warmup_epochs=args.warmup_epochs)
    scaler = build_scaler(device, dtype)

    start_epoch, start_iter, best_map, history = 0, 0, -1.0, []
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_iter = ckpt["epoch"], ckpt["iteration"]
        best_map, history = ckpt["best_map"], list(ckpt["history"])

    logs = args.logs_dir
    writer = None
    if dist_info.is_main:
        logs.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(logs))
        except ImportError:
            log.info("tensorboard not installed: no event files (metrics.jsonl and metrics.png are written)")

    def checkpoint(epoch: int, iteration: int, name: str = "latest.pth") -> None:
        """Everything a resume needs. The sampler, shuffles, augmentation and style draws are
        functions of (seed, epoch, iteration, rank), so (epoch, iteration) is their whole state."""
        if dist_info.is_main:
            save_checkpoint({"config": asdict(cfg), "epoch": epoch, "iteration": iteration,
                             "model": model.state_dict(), "memories": [m.centers for m in memories],
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict(), "best_map": best_map, "history": history},
                            logs / name)

    images_per_iter = 3 * cfg.batch_size
    show_bar = dist_info.is_main and not args.no_progress
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        losses = torch.zeros(cfg.iters, device=device)
        first = checked = start_iter if epoch == start_epoch else 0
        batches = train_loader.epoch(epoch, start=first)
        bar = None
        if show_bar:
            from tqdm import tqdm
            bar = tqdm(total=cfg.iters, initial=checked, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       dynamic_ncols=True, leave=False)
        t0, n_done = time.perf_counter(), 0
        for it in range(checked, cfg.iters):
            batch = next(batches)
            torch.manual_seed(iteration_seed(cfg.seed, epoch, it))
            plan = shuffle_plan(batch.sizes, dist_info.world, dist_info.rank, cfg.seed, epoch, it,
                                shuffle=cfg.mode != "fb", round_sizes=batch.round_sizes,
                                labels=batch.batch_labels)
            losses[it] = train_step(net, memories, batch.images, batch.labels, batch.sizes, optimizer,
                                    scaler, dtype, cfg.mode, plan)
            n_done += 1
            last = it + 1 == cfg.iters
            if (it + 1) % args.log_every == 0 or last:
                # the loop's only read-back: losses and refused memory updates since the last one
                window = losses[checked: it + 1]
                finite = torch.isfinite(window)
                refused = torch.stack([m.refusals.sum() for m in memories]).sum()
                bad_loss, bad_update = torch.stack([~finite.all(), refused > 0]).tolist()
                nonfinite, refusal, stopping = du.any_rank([bad_loss, bad_update, stop.signal is not None],
                                                           device)
                if nonfinite or refusal:
                    problems = []
                    if not finite.all():
                        bad = checked + int((~finite).nonzero()[0])
                        problems.append(f"non-finite loss at epoch {epoch + 1}, iteration {bad + 1}")
                    for m in memories:
                        try:
                            m.raise_refused()
                        except ValueError as e:
                            problems.append(f"epoch {epoch + 1}, iterations {checked + 1}-{it + 1}: {e}")
                    raise NonFiniteLoss("; ".join(problems or ["another rank stopped on non-finite values"])
                                        + f": training stopped; the last good checkpoint "
                                        f"({logs / 'latest.pth'}) is kept")
                rate = n_done * images_per_iter / (time.perf_counter() - t0)
                if bar is not None:
                    bar.set_postfix(loss=f"{float(losses[it]):.3f}", img_s=f"{rate:.0f}")
                    bar.update(it + 1 - checked)
                checked = it + 1
                if stopping:
                    checkpoint(epoch, it + 1)
                    log.warning("stop signal: checkpoint saved at epoch %d iteration %d; resume with "
                                "--resume %s", epoch + 1, it + 1, logs / "latest.pth")
                    return RunResult(128 + (stop.signal or signal.SIGTERM), history, model, memories)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        scheduler.step()
        du.broadcast_state(model, buffers_only=True)
        row = {"epoch": epoch + 1, "loss": float(losses[first:].mean()),
               "lr": optimizer.param_groups[0]["lr"], "images_per_s": n_done * images_per_iter / elapsed,
               "time_s": elapsed}
        if (args.eval_every and (epoch + 1) % args.eval_every == 0) or epoch + 1 == cfg.epochs:
            t1 = time.perf_counter()
            res = evaluate_target(model, target_loader, device, dtype, rerank=args.rerank)
            row.update(mAP=res["mAP"], rank1=res["rank1"], rank5=res["rank5"], rank10=res["rank10"],
                       eval_s=time.perf_counter() - t1)
        history.append(row)
        is_best = "mAP" in row and row["mAP"] > best_map
        if is_best:
            best_map = row["mAP"]
        checkpoint(epoch + 1, 0)
        if is_best:
            checkpoint(epoch + 1, 0, "best.pth")
        if dist_info.is_main:
            msg = (f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.3f}  lr {row['lr']:.2e}  "
                   f"{row['images_per_s']:.0f} img/s")
            if "mAP" in row:
                msg += f"  {cfg.target} mAP {100 * row['mAP']:.1f} rank-1 {100 * row['rank1']:.1f}"
            log.info(msg)
            with open(logs / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch + 1)
            save_plot(history, logs / "metrics.png", f"{cfg.mode.upper()}: {'+'.join(cfg.sources)} -> "
                                                     f"{cfg.target}")
    if dist_info.is_main:
        print_table(history, cfg.target)
        if writer is not None:
            writer.close()
    return RunResult(0, history, model, memories)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NonFiniteLoss as e:
        logging.getLogger("train").error("%s", e)
        sys.exit(3)
