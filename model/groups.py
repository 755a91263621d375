"""Statistics groups: BatchNorm and style statistics over fixed groups of rows, as the published
runs computed them, on any number of ranks.

The published numbers were trained with ``nn.DataParallel`` on 4 GPUs. Every source's batch of
64 was scattered as 4 contiguous groups of 16 rows, so every BatchNorm (the neck too) normalised
each group on its own, and only replica 0's in-place running-statistics updates survived. The
shuffled second forward (192 rows) was scattered the same way: 4 groups of 48 rows, each with its
own BatchNorm and style (UBS) statistics.

Here a forward's rows are one or more *sources*. Each source is a global batch spread evenly over
the ranks (rank r holds its r-th contiguous part) and cut into ``groups`` contiguous groups, so
the groups are the same sets of images whatever the number of ranks. On one rank a source's part
is either a whole number of groups (statistics are local) or a part of one group that spans
several ranks (statistics are combined over exactly those ranks, the rest of the world not
involved). The running statistics follow replica 0: group 0 of each source, in source order, and
group 0 of every source lives on rank 0, so only rank 0 updates them (DDP broadcasts rank 0's
buffers at every forward, and evaluation uses rank 0's).

Local groups of equal size are normalised by one native kernel per layer: a batch [K*m, C, H, W]
viewed as [K, C, m*H, W] is a GroupNorm input with one channel per group, and GroupNorm's
statistics per (sample, group) are then exactly BatchNorm's per (row group, channel). For a
channels_last batch that view costs no copy. The running statistics of group 0 come from one
``batch_norm_update_stats`` call on its rows, which updates them as ``nn.BatchNorm`` would.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Split:
    """One source's rows on this rank: part ``rank`` of ``world`` equal parts of a global batch
    of ``rows * world`` rows, which is cut into ``groups`` contiguous groups."""

    rows: int
    groups: int = 1
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        total = self.rows * self.world
        if self.rows <= 0 or self.groups <= 0 or total % self.groups:
            raise ValueError(f"bn_groups={self.groups}: a batch of {total} rows ({self.rows} on each of "
                             f"{self.world} ranks) does not split into {self.groups} equal groups")
        size = total // self.groups
        if self.rows % size and size % self.rows:
            raise ValueError(f"bn_groups={self.groups}: groups of {size} rows do not line up with the "
                             f"{self.rows} rows of each of {self.world} ranks (one must divide the other)")

    @property
    def group_rows(self) -> int:
        return self.rows * self.world // self.groups

    @property
    def span(self) -> int:
        """Ranks that share one group (1: this rank holds whole groups)."""
        return max(1, self.group_rows // self.rows)

    @property
    def segment(self) -> int:
        """Rows of one local segment: a whole group, or this rank's part of a shared group."""
        return min(self.rows, self.group_rows)

    @property
    def segments(self) -> int:
        return self.rows // self.segment

    @property
    def start(self) -> int:
        """Position of this rank's first row in the global batch."""
        return self.rank * self.rows


Layout = tuple[Split, ...]


def make_layout(sizes: list[int], groups: int, rank: int = 0, world: int = 1) -> Layout:
    """One Split per source of a forward (``sizes`` are this rank's rows per source)."""
    return tuple(Split(int(s), groups, rank, world) for s in sizes)


_SPAN_GROUPS: dict[tuple[object, int], dist.ProcessGroup] = {}


def span_group(split: Split) -> dist.ProcessGroup:
    """This rank's process group among consecutive blocks of ``split.span`` ranks. Every rank
    creates all blocks, in the same order, the first time a span is needed (all ranks run the
    same forwards, so they get here together); keyed by the world group, which a new
    ``init_process_group`` replaces."""
    key = (dist.group.WORLD, split.span)
    if key not in _SPAN_GROUPS:
        _SPAN_GROUPS[key] = dist.new_subgroups(group_size=split.span)[0]
    return _SPAN_GROUPS[key]


def _as_group_norm_input(x: torch.Tensor, k: int) -> torch.Tensor:
    """[K*m, C, *S] -> [K, C, m*S0, *S1:] (a view for channels_last 4-D and for contiguous 2-D-free
    layouts where it exists; a copy otherwise)."""
    v = x.unflatten(0, (k, -1)).transpose(1, 2)
    return v.flatten(2, 3) if x.dim() == 4 else v


def _from_group_norm_output(y: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`_as_group_norm_input`, in x's dtype and memory format."""
    if x.dim() == 4:
        y = y.unflatten(2, (-1, x.shape[2]))
    y = y.transpose(1, 2)
    if y.dtype == x.dtype and x.device.type == "cpu":
        return y.flatten(0, 1)  # a view when x is channels_last (GroupNorm kept the layout)
    out = torch.empty_like(x)  # CUDA's GroupNorm returns NCHW (fp32 under autocast): one copy back
    out.unflatten(0, (k, -1)).copy_(y)
    return out


def _local_groups(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, k: int, keep: bool,
                  firsts: range) -> torch.Tensor:
    """k equal groups of local rows, each normalised with its own batch statistics."""
    running = (bn.running_mean, bn.running_var) if keep else (None, None)
    if k == 1:
        return F.batch_norm(x, *running, bn.weight, bn.bias, True, bn.momentum, bn.eps)
    y = F.group_norm(_as_group_norm_input(x, k), x.shape[1], bn.weight, bn.bias, bn.eps)
    if keep:
        m = x.shape[0] // k
        with torch.no_grad():
            for g in firsts:
                torch.batch_norm_update_stats(x[g * m:(g + 1) * m], *running, bn.momentum)
    return _from_group_norm_output(y, x, k)


class _SharedGroupNorm(torch.autograd.Function):
    """BatchNorm over segments whose groups span several ranks: each rank's per-segment mean and
    variance are gathered over the group's ranks and combined (equal counts), and the backward
    sums the two gradient reductions over the same ranks, as SyncBatchNorm does. With DDP's
    gradient averaging this gives the gradient of the whole batch's loss."""

    @staticmethod
    def forward(ctx, x, weight, bias, k: int, eps: float, group):
        xf = x.unflatten(0, (k, -1)).to(torch.promote_types(x.dtype, torch.float32))
        dims = [1, *range(3, xf.dim())]
        var, mean = torch.var_mean(xf, dim=dims, correction=0, keepdim=True)
        parts = [torch.empty_like(torch.stack([mean, var])) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, torch.stack([mean, var]), group=group)
        parts = torch.stack(parts)
        mean = parts[:, 0].mean(0)
        var = (parts[:, 1] + (parts[:, 0] - mean) ** 2).mean(0)
        invstd = (var + eps).rsqrt()
        shape = [1, 1, -1] + [1] * (xf.dim() - 3)
        w, b = weight.to(xf.dtype).view(shape), bias.to(xf.dtype).view(shape)
        ctx.save_for_backward(x, mean, invstd, w)
        ctx.k, ctx.group, ctx.count = k, group, xf[0].numel() // xf.shape[2] * len(parts)
        scale = invstd * w
        rows = (k, xf.shape[1])  # per-row scale and shift: the output is a new tensor, not a view
        y = torch.addcmul((b - mean * scale).expand(*rows, *scale.shape[2:]).flatten(0, 1), x,
                          scale.expand(*rows, *scale.shape[2:]).flatten(0, 1))
        mean, var = mean.flatten().clone(), var.flatten().clone()
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, dy, _mean, _var):
        x, mean, invstd, w = ctx.saved_tensors
        xf = x.unflatten(0, (ctx.k, -1)).to(mean.dtype)
        g = dy.unflatten(0, (ctx.k, -1)).to(mean.dtype)
        dims = [1, *range(3, xf.dim())]
        xhat = (xf - mean) * invstd
        sums = torch.stack([g.sum(dims, keepdim=True), (g * xhat).sum(dims, keepdim=True)])
        grad_w, grad_b = sums[1].sum(0).flatten(), sums[0].sum(0).flatten()
        dist.all_reduce(sums, group=ctx.group)
        dx = (g - sums[0] / ctx.count - xhat * (sums[1] / ctx.count)) * invstd * w
        return dx.to(x.dtype).flatten(0, 1), grad_w, grad_b, None, None, None


def _shared_groups(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, split: Split, k: int,
                   keep: bool) -> torch.Tensor:
    """k local segments, each part of a group shared with the other ranks of its block."""
    y, mean, var = _SharedGroupNorm.apply(x, bn.weight, bn.bias, k, bn.eps, span_group(split))
    if keep:
        n = split.group_rows * x[0, 0].numel()
        with torch.no_grad():
            mean, var = mean.view(k, -1), var.view(k, -1) * (n / (n - 1))
            for g in range(k):
                bn.running_mean.lerp_(mean[g].to(bn.running_mean.dtype), bn.momentum)
                bn.running_var.lerp_(var[g].to(bn.running_var.dtype), bn.momentum)
    return y


def batch_norm_groups(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, layout: Layout) -> torch.Tensor:
    """Training-mode BatchNorm of a forward laid out as ``layout`` (see the module docstring)."""
    if bn.momentum is None:
        raise ValueError("statistics groups need BatchNorm momentum as a number (cumulative averages "
                         "are not supported)")
    if len(set(layout)) > 1:  # sources of different sizes: one call each
        parts = x.split([s.rows for s in layout])
        first = [batch_norm_groups(p, bn, (s,)) for p, s in zip(parts, layout)]
        return torch.cat(first)
    split = layout[0]
    keep = split.rank == 0
    k = len(layout) * split.segments
    if split.span == 1:
        y = _local_groups(x, bn, k, keep, range(0, k, split.segments))
    else:
        y = _shared_groups(x, bn, split, k, keep)
    if keep:
        bn.num_batches_tracked.add_(len(layout))
    return y


def gather_group_rows(t: torch.Tensor, split: Split) -> torch.Tensor:
    """Rows of a group shared by several ranks: every rank of the block gets all of them, in
    rank order (= the group's row order). No gradient."""
    group = span_group(split)
    parts = [torch.empty_like(t) for _ in range(split.span)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)
