"""One training iteration of Style Interleaved Learning and of its two baselines.

IL (``--update-style``): forward the three sources' batches (BN over each source alone), loss =
mean over sources of the memory loss, backward, optimizer step; then, without gradients, forward
the shuffled concatenation once more with the style module on and update each source's memory
with its own rows of that output in shuffled order. FBF: the same second forward without style.
FB: no second forward, the memories take the detached first-forward features.

The step reads nothing back from the GPU: the shuffle and the per-source row positions are
planned on the host from a seeded generator, and the sizes of the memory-update rounds come from
the sampler, so the host only queues work and stays ahead of the device (with bf16; fp16's
GradScaler checks its gradients on the host).
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
    among all ranks' gathered second-forward rows (rank order, shuffled order within a rank).
    ``round_sizes``: per source, the memory-update rounds of those rows (the sampler's
    ``TrainBatch.round_sizes``); None makes each memory update read them back from the device."""

    perm: torch.Tensor
    source_rows: list[torch.Tensor]
    round_sizes: list[list[int]] | None = None

    def on(self, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The index tensors on ``device``: one pinned buffer, one asynchronous copy."""
        flat = torch.cat([self.perm, *self.source_rows])
        if device.type == "cuda":
            flat = flat.pin_memory()
        perm, *rows = flat.to(device, non_blocking=True).split([len(self.perm),
                                                               *map(len, self.source_rows)])
        return perm, rows


def shuffle_plan(sizes: list[int], world: int, rank: int, seed: int, epoch: int, it: int,
                 shuffle: bool = True, round_sizes: list[list[int]] | None = None) -> ShufflePlan:
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
    return ShufflePlan(torch.from_numpy(perms[rank]), rows, round_sizes)


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
        perm, source_rows = plan.on(device)
        if mode == "fb":
            feats2, labels2 = feats.detach(), labels
        else:
            with autocast(device, amp_dtype):
                shuffled = images.index_select(0, perm).contiguous(memory_format=torch.channels_last)
                feats2 = model(shuffled, style=mode == "il")
            labels2 = labels.index_select(0, perm)
        all_feats = all_gather_rows(feats2.float())
        all_labels = all_gather_rows(labels2)
        sizes = plan.round_sizes or [None] * len(memories)
        for mem, rows, r in zip(memories, source_rows, sizes):
            mem.update(all_feats.index_select(0, rows), all_labels.index_select(0, rows), round_sizes=r)
    return loss.detach()
