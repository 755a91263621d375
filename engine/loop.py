"""The iterations of one epoch and their health checks.

The step never waits for the device: the losses stay on it, and every ``log_every`` iterations
(and at the epoch's end, and on a stop) they are averaged over the ranks (each rank's loss is
that of its part of the batch; the mean is the whole batch's, as on one rank) and one read-back
checks them and the memories' refused updates on every rank at once. After every iteration the
ranks agree on a stop request (:class:`engine.stopping.StopRequest`), so all stop after the same
iteration.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import distributed as du
from engine.config import RunConfig
from engine.runlog import RunLog
from engine.step import shuffle_plan, train_step
from engine.stopping import StopRequest
from engine.errors import Divergence
from pipeline.seeds import STYLE, int_seed

log = logging.getLogger("train")


class NonFiniteLoss(Divergence):
    """A non-finite loss or a refused memory update on some rank: the run stops (exit code 3)."""


@dataclass
class EpochResult:
    """One epoch's iterations on this rank: ``losses`` (on the device, one per iteration, the
    whole batch's once averaged at a log point; those from ``first`` on count in the epoch's
    mean), how many ran here, the ``seconds`` that ``timed`` iterations took (with a resumed
    epoch's earlier ones), and the stop signal all ranks agreed on after iteration
    ``stopped_after`` (0: none)."""

    losses: torch.Tensor
    first: int
    done: int
    seconds: float
    stop_signal: int = 0
    stopped_after: int = 0
    timed: int = 0


@dataclass
class Trainer:
    """What the iterations use: the network (DDP-wrapped or not), the memories, the optimizer and
    grad scaler, autocast dtype, the run's settings and rank."""

    net: torch.nn.Module
    memories: list
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    cfg: RunConfig
    dist: du.DistInfo


def train_one_epoch(t: Trainer, loader, epoch: int, start: int, *, stop: StopRequest, runlog: RunLog,
                    log_every: int, resumed_losses: list[float], checkpoint_path: Path,
                    started: float | None = None, resumed_seconds: float | None = None) -> EpochResult:
    """Iterations ``start``.. of ``epoch``; ends early when the ranks agree on a stop request.
    ``resumed_losses``, ``resumed_seconds``: a mid-epoch checkpoint's losses of iterations
    before ``start`` and the time they took; ``started``: when set-up began (the first
    iteration's time is logged)."""
    cfg, device = t.cfg, t.dist.device
    t.net.train()
    res = EpochResult(torch.zeros(cfg.iters, device=device), start, 0, 0.0)
    if start and len(resumed_losses) == start:  # resumed mid-epoch: the earlier losses
        res.losses[:start] = torch.tensor(resumed_losses)
        res.first = 0
        if resumed_seconds is not None:  # (checkpoints of earlier releases carried no time)
            res.seconds, res.timed = resumed_seconds, start
    batches = loader.epoch(epoch, start=start)
    runlog.start_epoch(epoch, start, cfg.iters)
    t0, checked = time.perf_counter(), start
    for it in range(start, cfg.iters):
        res.losses[it] = one_iteration(t, next(batches), epoch, it)
        res.done += 1
        if res.done == 1 and started is not None:
            log.info("first iteration done, %.1f s after set-up began", time.monotonic() - started)
        res.stop_signal = stop.agreed()
        if (it + 1) % log_every == 0 or it + 1 == cfg.iters or res.stop_signal:
            du.mean_over_ranks(res.losses[checked: it + 1])
            check_health(res.losses, checked, it, t.memories, device, epoch, checkpoint_path)
            images = res.done * len(cfg.sources) * cfg.batch_size
            runlog.advance(it + 1, res.losses[it], images / (time.perf_counter() - t0))
            checked = it + 1
        if res.stop_signal:
            res.stopped_after = it + 1
            break
    runlog.end_bar()
    res.seconds += time.perf_counter() - t0
    res.timed += res.done
    return res


def one_iteration(t: Trainer, batch, epoch: int, it: int) -> torch.Tensor:
    """One training step on ``batch``; its loss stays on the device."""
    cfg, d = t.cfg, t.dist
    torch.manual_seed(int_seed(cfg.seed, epoch, it, STYLE))  # the style draws (torch.rand)
    plan = shuffle_plan(batch.sizes, d.world, d.rank, cfg.seed, epoch, it, shuffle=cfg.mode != "fb",
                        labels=batch.batch_labels)
    return train_step(t.net, t.memories, batch.images, batch.labels, batch.sizes, t.optimizer, t.scaler,
                      t.dtype, cfg.mode, plan)


def check_health(losses: torch.Tensor, checked: int, it: int, memories: list, device: torch.device,
                 epoch: int, checkpoint_path: Path) -> None:
    """The loop's only read-back: losses and refused memory updates of iterations checked..it,
    agreed over the ranks; raises :class:`NonFiniteLoss` on every rank when any rank found one."""
    window = losses[checked: it + 1]
    finite = torch.isfinite(window)
    refused = torch.stack([m.refusals.sum() for m in memories]).sum()
    bad_loss, bad_update = torch.stack([~finite.all(), refused > 0]).tolist()
    nonfinite, refusal = du.any_rank([bad_loss, bad_update], device)
    if not (nonfinite or refusal):
        return
    problems = []
    if not finite.all():
        bad = checked + int((~finite).nonzero()[0])
        problems.append(f"non-finite loss at epoch {epoch + 1}, iteration {bad + 1}")
    for m in memories:
        try:
            m.raise_refused()
        except ValueError as e:
            problems.append(f"epoch {epoch + 1}, iterations {checked + 1}-{it + 1}: {e}")
    kept = (f"the last good checkpoint ({checkpoint_path}) is kept" if checkpoint_path.is_file()
            else "no checkpoint had been saved yet")
    raise NonFiniteLoss("; ".join(problems or ["another rank stopped on non-finite values"])
                        + f": training stopped; {kept}")
