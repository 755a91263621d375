"""One training iteration of Style Interleaved Learning and of its two baselines.

IL (``--update-style``): forward the three sources' batches (BN over each source alone), loss =
mean over sources of the memory loss, backward, optimizer step; then, without gradients, forward
the shuffled concatenation once more with the style module on and update each source's memory
with its own rows of that output in shuffled order. FBF: the same second forward without style.
FB: no second forward, the memories take the detached first-forward features.

The step keeps everything on the device: the shuffle and the per-source row positions are
planned on the host from a seeded generator, so no value has to come back from the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.distributed import all_gather_rows
from engine.optim import autocast

MODES = ("il", "fbf", "fb")


@dataclass(frozen=True)
class ShufflePlan:
    """The local permutation of this rank's rows and, per source, the positions of its rows
    among all ranks' gathered second-forward rows (rank order, shuffled order within a rank)."""

    perm: torch.Tensor
    source_rows: list[torch.Tensor]


def shuffle_plan(sizes: list[int], world: int, rank: int, seed: int, epoch: int, it: int,
                 shuffle: bool = True) -> ShufflePlan:
    """Every rank can compute every rank's permutation, so the gathered layout is known here."""
    n = sum(sizes)
    source_of_row = np.repeat(np.arange(len(sizes)), sizes)
    gathered_sources, perms = [], []
    for r in range(world):
        if shuffle:
            rng = np.random.default_rng([seed, epoch, it, r, 0x5EED])
            p = rng.permutation(n)
        else:
            p = np.arange(n)
        perms.append(p)
        gathered_sources.append(source_of_row[p])
    gathered_sources = np.concatenate(gathered_sources)
    rows = [torch.from_numpy(np.flatnonzero(gathered_sources == j)) for j in range(len(sizes))]
    return ShufflePlan(torch.from_numpy(perms[rank]), rows)


def train_step(model, memories, images: torch.Tensor, labels: torch.Tensor, sizes: list[int],
               optimizer, scaler, amp_dtype, mode: str, plan: ShufflePlan) -> torch.Tensor:
    """Run one iteration; returns the loss as a 0-d tensor on the device (not synchronised)."""
    device = images.device
    with autocast(device, amp_dtype):
        feats = model(images, sizes=sizes)
    losses = [mem(f.float(), y) for mem, f, y in zip(memories, feats.split(sizes), labels.split(sizes))]
    loss = torch.stack(losses).mean()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()

    with torch.no_grad():
        if mode == "fb":
            feats2, labels2 = feats.detach(), labels
        else:
            perm = plan.perm.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                shuffled = images.index_select(0, perm).contiguous(memory_format=torch.channels_last)
                feats2 = model(shuffled, style=mode == "il")
            labels2 = labels[perm]
        all_feats = all_gather_rows(feats2.float())
        all_labels = all_gather_rows(labels2)
        for mem, rows in zip(memories, plan.source_rows):
            rows = rows.to(device, non_blocking=True)
            mem.update(all_feats[rows], all_labels[rows])
    return loss.detach()
