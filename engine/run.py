"""One training run around its epochs: the checks before any work (:meth:`Run.preflight`), the
set-up (:meth:`Run.set_up`: memories, DDP, logs), the end of each epoch (schedule, checkpoint,
evaluation, logs), a stop; and ``--evaluate`` (:func:`evaluate_only`)."""
from __future__ import annotations

import logging
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace

import torch

from engine import distributed as du
from engine.checkpoint import NETWORK_KEYS, CheckpointError, TrainState, copy_checkpoint, \
    network_from_checkpoint, position, save_checkpoint
from engine.config import ExecConfig, RunConfig
from engine.evaluation.targets import evaluate_target, extract_features
from engine.logsdir import LogsDir, claim_logs_dir
from engine.network import build_network, wrap_network
from engine.loop import EpochResult, Trainer
from engine.optim import build_optimizer, build_scaler, build_scheduler
from engine.precision import amp_dtype
from engine.preflight import build_target_loader, check_pretrained, loader_config, prepare_shards, read_resume
from engine.runlog import RunLog, print_targets, target_columns
from engine.errors import UsageError, checked
from model.groups import resolve_bn_impl
from model.memory import MemoryClassifier
from pipeline.loader import build_eval_loader, build_train_loader
from pipeline.shards import ShardError

log = logging.getLogger("train")


def init_memories(model, mix, memories: list, device: torch.device, dtype) -> None:
    """Each memory starts as the L2-normalised mean feature of every identity of its source
    (eval mode, test transform), computed from all ranks' parts so every rank agrees. The
    sources' mix sets are read one after another by one loader (``mix.rows.source`` tells the
    sources apart): one pool of workers starts instead of one per source."""
    feats = extract_features(model, mix, device, dtype)
    source = torch.as_tensor(mix.rows.source, device=feats.device)
    labels = torch.as_tensor(mix.labels, device=feats.device)
    for s, memory in enumerate(memories):
        memory.init_centers(feats[source == s], labels[source == s])


@dataclass
class RunResult:
    """What a run leaves in memory: tests compare it across ranks and runs."""

    exit_code: int
    history: list[dict] = field(default_factory=list)
    model: torch.nn.Module | None = None
    memories: list[MemoryClassifier] = field(default_factory=list)


class Run:
    """One training run: :meth:`preflight` checks everything it can first, :meth:`set_up` does
    the work before the first iteration; ``state`` is what latest.pth holds."""

    def __init__(self, cfg: RunConfig, ex: ExecConfig, dist_info: du.DistInfo, stack: ExitStack):
        self.cfg, self.ex, self.dist = cfg, ex, dist_info
        self.started = time.monotonic()
        self.device = dist_info.device
        self.dtype = amp_dtype(ex.amp, self.device)
        self.logs = LogsDir(ex.logs_dir)
        stack.callback(lambda: self.logs.release())  # the one preflight claims
        self.ckpt: dict | None = None  # the --resume checkpoint until set-up has copied it
        self.state: TrainState | None = None

    # -------------------------------------------------------------------------------- checks
    def preflight(self) -> None:
        """Every check before any work, each refusal agreed by all ranks."""
        ex, cfg, world = self.ex, self.cfg, self.dist.world
        with checked(world):
            if self.dist.is_main:
                self.logs = claim_logs_dir(ex.logs_dir, ex.resume is not None, ex.overwrite)
            self.ckpt = read_resume(ex.resume, cfg)
            pretrained = check_pretrained(cfg, ex)
            self.lcfg = loader_config(cfg, ex, self.dist)
            self.state = self.build_state(pretrained)
        prepare_shards(ex, cfg.sources + cfg.targets, self.dist)
        with checked(world):
            self.target_loaders = {name: build_target_loader(ex.shards, name, self.lcfg)
                                   for name in cfg.targets}
            try:
                self.train_loader = build_train_loader(ex.shards, cfg.sources, self.lcfg)
            except ValueError as e:  # ShardError, or a source too small for the batch
                raise UsageError(f"sources {', '.join(cfg.sources)}: {e}") from None
            self.check_memories()

    def build_state(self, pretrained: str) -> TrainState:
        """The model (seeded with --seed), optimizer, schedule and scaler, with the checkpoint's
        states loaded now so a damaged one is refused before any work."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        try:
            model = build_network(cfg, self.dist, pretrained)
        except ValueError as e:  # weights of another network, or not a state dict
            raise UsageError(f"--pretrained {e}") from None
        optimizer = build_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, self.device, self.ex.apex)
        scheduler = build_scheduler(optimizer, self.ex.milestones, warmup_epochs=self.ex.warmup_epochs)
        state = TrainState(asdict(cfg), model, optimizer, scheduler, build_scaler(self.device, self.dtype))
        if self.ckpt is not None:
            self.load(state, self.ckpt)
        return state

    def load(self, state: TrainState, ckpt: dict) -> None:
        try:
            state.load_state_dict(ckpt)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"--resume {self.ex.resume}: its states do not fit this run "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if not 0 <= ckpt["iteration"] < self.cfg.iters or ckpt["epoch"] < 0:
            raise UsageError(f"--resume {self.ex.resume}: {position(ckpt['epoch'], ckpt['iteration'])} "
                             f"is not a position in a run of {self.cfg.iters} iterations per epoch")
        if ckpt["epoch"] + (ckpt["iteration"] > 0) > self.cfg.epochs:
            at = position(ckpt["epoch"], ckpt["iteration"])
            raise UsageError(f"--resume {self.ex.resume} is at {at}, past --epochs {self.cfg.epochs}: "
                             "nothing would be trained (raise --epochs to continue it; --evaluate "
                             "evaluates it)")

    def check_memories(self) -> None:
        """A resumed run's memories must be one [classes, features] matrix per source, as the
        sources' shards and the network give them."""
        if self.ckpt is None:
            return
        expected = [(n, self.state.model.num_features) for n in self.train_loader.num_classes]
        found = [tuple(m.shape) for m in self.ckpt["memories"]]
        if found != expected:
            raise UsageError(f"--resume {self.ex.resume}: its memories have shapes {found}, the sources "
                             f"{', '.join(self.cfg.sources)} need {expected} (one [classes, features] per "
                             "source): it belongs to other data")

    # -------------------------------------------------------------------------------- set-up
    def set_up(self) -> None:
        """The work before the first iteration: memories, DDP, logs."""
        cfg, st = self.cfg, self.state
        self.describe()
        st.memories = [MemoryClassifier(st.model.num_features, n, temp=cfg.temp,
                                        momentum=cfg.momentum).to(self.device)
                       for n in self.train_loader.num_classes]
        du.broadcast_state(st.model)
        if self.ckpt is None:
            log.info("initialising memories from source features (%s)",
                     ", ".join(f"{s}: {n} ids" for s, n in zip(cfg.sources, self.train_loader.num_classes)))
            mix = build_eval_loader(self.ex.shards, cfg.sources, "mix", self.lcfg)
            init_memories(st.model, mix, st.memories, self.device, self.dtype)
            del mix  # its workers end now
        else:
            for mem, centers in zip(st.memories, self.ckpt["memories"]):
                mem.centers.copy_(centers)
            log.info("resumed from %s at %s%s", self.ex.resume, position(st.epoch, st.iteration),
                     ": all --epochs are done, nothing left to train" if st.epoch == cfg.epochs else "")
        self.ckpt = None  # its tensors are copied; free them
        net = wrap_network(st.model, self.dist, self.ex.compile)
        self.trainer = Trainer(net, st.memories, st.optimizer, st.scaler, self.dtype, cfg, self.dist)
        self.runlog = RunLog(self.logs.path if self.dist.is_main else None, cfg.targets, cfg.epochs,
                             f"{cfg.mode.upper()}: {'+'.join(cfg.sources)} -> {', '.join(cfg.targets)}",
                             progress=self.ex.progress)
        if self.dist.is_main:
            self.logs.used = True
            self.runlog.open(self.logs.stale, st.history if self.ex.resume is not None else None)

    def describe(self) -> None:
        """The run's set-up in one log line, and a warning for statistics groups too small to learn."""
        cfg, dist_info = self.cfg, self.dist
        backend = ("nccl" if self.device.type == "cuda" else "gloo" if dist_info.world > 1
                   else "single process")
        log.info("device %s x %d ranks (%s), precision %s, channels_last%s, loader %s, mode %s, "
                 "statistics groups %d per batch (%s)", self.device, dist_info.world, backend,
                 self.dtype or "fp32", ", torch.compile" if self.ex.compile else "", self.lcfg.loader,
                 cfg.mode, cfg.bn_groups, resolve_bn_impl(cfg.bn_impl, self.device))
        group_ids = cfg.batch_size // cfg.bn_groups // cfg.num_instances
        if group_ids < 4:
            log.warning("each statistics group holds %d images of %d identities (-b %d / --bn-groups %d); "
                        "the published run had 16 images of 4: with fewer, BatchNorm normalises away much "
                        "of what tells identities apart and training learns little (use a smaller "
                        "--bn-groups)",
                        cfg.batch_size // cfg.bn_groups, group_ids, cfg.batch_size, cfg.bn_groups)

    # -------------------------------------------------------------------------------- epochs
    def end_epoch(self, epoch: int, res: EpochResult) -> None:
        """Schedule, checkpoint, then evaluation (whose failure is reported, not fatal), then the
        checkpoint again with its result, best.pth, and the logs."""
        cfg, ex, st = self.cfg, self.ex, self.state
        st.scheduler.step()
        du.broadcast_state(st.model, buffers_only=True)
        row = {"epoch": epoch + 1, "loss": float(res.losses[res.first:].mean()),
               "lr": st.optimizer.param_groups[0]["lr"],
               "images_per_s": res.timed * len(cfg.sources) * cfg.batch_size / res.seconds,
               "time_s": res.seconds}
        st.history.append(row)
        self.checkpoint(epoch + 1, 0, res)  # before the evaluation: a failed one loses nothing
        if (ex.eval_every and (epoch + 1) % ex.eval_every == 0) or epoch + 1 == cfg.epochs:
            self.evaluate(epoch, row)
            is_best = "mAP" in row and row["mAP"] > st.best_map
            if is_best:
                st.best_map = row["mAP"]
            self.checkpoint(epoch + 1, 0, res)  # with the evaluation's result
            if is_best and self.dist.is_main:
                copy_checkpoint(self.logs.path / "latest.pth", self.logs.path / "best.pth")
        self.runlog.epoch(row, st.history)

    def evaluate(self, epoch: int, row: dict) -> None:
        """Every target in turn; a failed one is reported and recorded (``eval_error``), the others
        go on, and the run's own columns (what best.pth follows) wait for an evaluation of all. A
        target's shard that cannot be read ends the run as a source's does (after the epoch's
        checkpoint)."""
        t1 = time.perf_counter()
        results, errors = {}, []
        for name, loader in self.target_loaders.items():
            try:
                results[name] = evaluate_target(self.state.model, loader, self.device, self.dtype,
                                                self.ex.evaluation)
            except ShardError:  # the data failed: the run ends (exit code 4), latest.pth is saved
                raise
            except ValueError as e:  # e.g. non-finite features: the run goes on, its checkpoint is saved
                errors.append(f"{name}: {e}")
                log.error("epoch %d: evaluation on %s failed: %s; training goes on (latest.pth is saved)",
                          epoch + 1, name, e)
        row.update(target_columns(results, self.cfg.best_by if not errors else None))
        if errors:
            row["eval_error"] = "; ".join(errors)
        row["eval_s"] = time.perf_counter() - t1

    def checkpoint(self, epoch: int, iteration: int, res: EpochResult) -> None:
        """latest.pth (rank 0) at (epoch, iteration), with the epoch's losses before it and
        their time."""
        st = self.state
        st.epoch, st.iteration = epoch, iteration
        if self.dist.is_main:
            st.epoch_losses = res.losses[:iteration].tolist()
            st.epoch_seconds = res.seconds if iteration else 0.0
            save_checkpoint(st.state_dict(), self.logs.path / "latest.pth")

    def stopped(self, epoch: int, res: EpochResult) -> RunResult:
        """Every rank stops here at the same iteration; none exits before latest.pth is written
        (torchrun ends the others as soon as one exits with a non-zero code)."""
        self.checkpoint(epoch, res.stopped_after, res)
        du.barrier()
        signum = res.stop_signal
        if self.dist.is_main:
            name, at = signal.Signals(signum).name, position(epoch, res.stopped_after)
            print(f"train.py: stopped by {name} at {at}: checkpoint saved; resume with: --resume "
                  f"{self.logs.path / 'latest.pth'}", file=sys.stderr, flush=True)
        return RunResult(128 + signum, self.state.history, self.state.model, self.state.memories)

    def finish(self) -> RunResult:
        self.runlog.finish(self.state.history)
        return RunResult(0, self.state.history, self.state.model, self.state.memories)


def evaluate_only(cfg: RunConfig, ex: ExecConfig, dist_info: du.DistInfo) -> RunResult:
    """--evaluate: the checkpoint's network on the target. Only -d is needed; the network, input
    size and sources come from the checkpoint, and a flag that contradicts it is refused."""
    with checked(dist_info.world):
        try:
            model, saved = network_from_checkpoint(ex.resume)
        except CheckpointError as e:
            raise UsageError(f"--resume {e}") from None
        for key in NETWORK_KEYS:
            if key in ex.given and getattr(cfg, key) != saved[key]:
                raise UsageError(f"--resume {ex.resume} was written by another network: {key}: checkpoint "
                                 f"{saved[key]!r}, now {getattr(cfg, key)!r} (leave the flag out)")
        cfg = replace(cfg, **{k: saved[k] for k in NETWORK_KEYS}, sources=list(saved.get("sources", [])))
    for name in cfg.targets:
        if name in cfg.sources:
            log.warning("-d %s was a source of this checkpoint (trained on %s): this is not an unseen-domain "
                        "result", name, ", ".join(cfg.sources))
    prepare_shards(ex, cfg.targets, dist_info)
    with checked(dist_info.world):
        lcfg = loader_config(cfg, ex, dist_info)
        loaders = {name: build_target_loader(ex.shards, name, lcfg) for name in cfg.targets}
    model = model.to(dist_info.device, memory_format=torch.channels_last)
    dtype = amp_dtype(ex.amp, dist_info.device)
    results = {name: evaluate_target(model, loader, dist_info.device, dtype, ex.evaluation)
               for name, loader in loaders.items()}
    if dist_info.is_main:
        print_targets(results)
    return RunResult(0, [dict(res, target=name) for name, res in results.items()], model)
