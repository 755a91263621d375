"""One training iteration of Style Interleaved Learning and of its two baselines.

IL (``--update-style``): forward the sources' batches (statistics per group of each
source, ``model.groups``), loss = mean over sources of the memory loss, backward, optimizer step;
then, without gradients, forward the shuffled concatenation once more with the style module on
and update each source's memory with its own rows of that output in shuffled order. FBF: the
same second forward without style. FB: no second forward, the memories take the detached
first-forward features.

The shuffle is one permutation of the GLOBAL batch (all ranks' rows), the same on any number of
ranks: rank r forwards the r-th contiguous part of the shuffled order, so the second forward's
statistics groups are the same images as on one GPU, and the gathered features come back in
the global shuffled order, as the published DataParallel gather returned them. The rows move
between ranks with one all-to-all.

The step reads nothing back from the GPU: the shuffle, the exchange, the per-source row
positions and, from the global batch's labels (the sampler's), the memory-update rounds are
planned on the host, so the host only queues work and stays ahead of the device (with bf16;
fp16's GradScaler checks its gradients on the host).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from engine.distributed import all_gather_rows, exchange_rows
from engine.precision import autocast
from model.memory import update_rounds
from pipeline.seeds import SHUFFLE, stream_rng

MODES = ("il", "fbf", "fb")


@dataclass(frozen=True)
class ShufflePlan:
    """Everything an iteration's second half needs to know about rows, computed on the host.

    ``perm``: the global shuffle (position -> global row; global rows are the sources' global
    batches one after another). ``send``: this rank's rows in the order they leave it, the first
    ``send_counts[0]`` to rank 0 and so on; ``recv_counts`` rows arrive from each rank and
    ``arrange`` puts them in shuffled order (None: already are; one rank needs neither).
    ``source_rows``: per source, the positions of its rows among the gathered features, in the
    order the memory takes them: grouped round after round (``round_sizes``) for the memory
    update, with their ``labels``.
    """

    perm: torch.Tensor
    send: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    arrange: torch.Tensor | None
    source_rows: list[torch.Tensor]
    labels: list[torch.Tensor]
    round_sizes: list[list[int]]

    def on(self, device: torch.device) -> "ShufflePlan":
        """The plan with its index tensors on ``device``: one pinned buffer, one asynchronous copy."""
        groups = {n: getattr(self, n) for n in ("send", "arrange", "source_rows", "labels")
                  if getattr(self, n) is not None}
        tensors = [t for v in groups.values() for t in (v if isinstance(v, list) else [v])]
        flat = torch.cat(tensors)
        if device.type == "cuda":
            flat = flat.pin_memory()
        parts = iter(flat.to(device, non_blocking=True).split([len(t) for t in tensors]))
        moved = {n: ([next(parts) for _ in v] if isinstance(v, list) else next(parts))
                 for n, v in groups.items()}
        return dataclasses.replace(self, **moved)


def shuffle_plan(sizes: list[int], world: int, rank: int, seed: int, epoch: int, it: int,
                 labels: list[np.ndarray], shuffle: bool = True) -> ShufflePlan:
    """Plan an iteration's second forward and memory updates for this rank. ``sizes``: this
    rank's rows per source; ``labels``: per source, the labels of the global batch in sampler
    order (``TrainBatch.batch_labels``), with which the plan takes over the memory update's
    label work. ``shuffle=False`` (FB) plans the memory update over the gathered first-forward
    features, in the global sampler order."""
    sizes = [int(s) for s in sizes]
    n, total = sum(sizes), sum(sizes) * world
    glob = np.asarray(sizes) * world
    source = np.repeat(np.arange(len(sizes)), glob)  # of each global row
    within = np.arange(total) - np.repeat(np.cumsum(glob) - glob, glob)
    per_rank = np.asarray(sizes)[source]
    owner = within // per_rank
    local = np.repeat(np.cumsum(sizes) - sizes, glob) + within % per_rank
    if shuffle:
        perm = stream_rng(seed, epoch, it, SHUFFLE).permutation(total)
        position = np.empty(total, dtype=np.int64)
        position[perm] = np.arange(total)  # of each global row among the gathered features
    else:
        perm = np.arange(total)
        position = owner * n + local  # the gathered first-forward features, rank after rank
    mine = (owner[perm] == rank)  # shuffled positions whose row this rank holds
    send = local[perm[mine]]
    send_counts = np.bincount(np.flatnonzero(mine) // n, minlength=world).tolist()
    block = owner[perm[rank * n:(rank + 1) * n]]
    recv_counts = np.bincount(block, minlength=world).tolist()
    arrange = None
    if world > 1:
        arrange = np.empty(n, dtype=np.int64)
        arrange[np.argsort(block, kind="stable")] = np.arange(n)
    if len(labels) != len(sizes):
        raise ValueError(f"labels: expected the global batch labels of {len(sizes)} sources, "
                         f"got {len(labels)}")
    rows, plan_labels, rounds = [], [], []
    for j in range(len(sizes)):
        members = np.flatnonzero(source == j)
        order = np.argsort(position[members], kind="stable") if shuffle else np.arange(len(members))
        members = members[order]
        y = np.asarray(labels[j], dtype=np.int64)
        if y.shape != (len(members),):
            raise ValueError(f"labels of source {j}: expected the {len(members)} labels of its global "
                             f"batch, got shape {y.shape}")
        by_round, r = update_rounds(y[order])
        members, y = members[by_round], y[order][by_round]
        rows.append(torch.from_numpy(position[members]))
        plan_labels.append(torch.from_numpy(y))
        rounds.append(r)
    return ShufflePlan(torch.from_numpy(perm), torch.from_numpy(send), send_counts, recv_counts,
                       None if arrange is None else torch.from_numpy(arrange), rows, plan_labels, rounds)


def shuffled_rows(images: torch.Tensor, plan: ShufflePlan) -> torch.Tensor:
    """This rank's part of the shuffled global batch, channels_last (row gathers on the NHWC view
    keep the layout; ``index_select`` on NCHW would return a contiguous NCHW copy)."""
    rows = images.permute(0, 2, 3, 1).index_select(0, plan.send)
    if plan.arrange is not None:
        rows = exchange_rows(rows, plan.send_counts, plan.recv_counts).index_select(0, plan.arrange)
    return rows.permute(0, 3, 1, 2)


def under_ddp(model: torch.nn.Module) -> bool:
    """Whether ``model`` (``torch.compile``d or not) is in DDP. Its gradients are then views into
    DDP's all-reduce buckets (``gradient_as_bucket_view``, engine/network.py) and must be zeroed,
    not set to None: a None gradient is allocated anew by the backward pass and copied into its
    bucket, every iteration."""
    return isinstance(getattr(model, "_orig_mod", model), DistributedDataParallel)


def train_step(model, memories, images: torch.Tensor, labels: torch.Tensor, sizes: list[int],
               optimizer, scaler, amp_dtype, mode: str, plan: ShufflePlan) -> torch.Tensor:
    """Run one iteration; returns the loss as a 0-d tensor on the device (not synchronised)."""
    device = images.device
    with autocast(device, amp_dtype):
        feats = model(images, sizes=sizes)
    losses = [mem(f, y) for mem, f, y in zip(memories, feats.split(sizes), labels.split(sizes))]
    loss = torch.stack(losses).mean()
    optimizer.zero_grad(set_to_none=not under_ddp(model))
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()

    with torch.no_grad():
        plan = plan.on(device)
        if mode == "fb":
            feats2 = feats.detach()
        else:
            with autocast(device, amp_dtype):
                feats2 = model(shuffled_rows(images, plan), style=mode == "il")
        all_feats = all_gather_rows(feats2)
        for mem, rows, y, r in zip(memories, plan.source_rows, plan.labels, plan.round_sizes):
            mem.update(all_feats.index_select(0, rows), y, round_sizes=r)
    return loss.detach()
