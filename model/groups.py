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

Local groups of equal size are normalised by one of two implementations (``BN_IMPLS``), the
same arithmetic laid out for different devices (``--bn-impl``; :func:`resolve_bn_impl` says how
``auto`` picks):

- ``group-norm``: one native kernel per layer. A batch [K*m, C, H, W] viewed as [K, C, m*H, W] is
  a GroupNorm input with one channel per group, and GroupNorm's statistics per (sample, group)
  are then exactly BatchNorm's per (row group, channel); for a channels_last batch that view
  costs no copy. The fewest operations; on CUDA, GroupNorm runs in fp32 under autocast and in NCHW, so a
  bf16 channels_last batch would be copied there and back. Inputs without a spatial map (the
  neck's [B, C], 1x1 maps) take the per-group kernels below.
- ``batch-norm``: one native ``F.batch_norm`` per group over ``x.split(m)`` (views, channels_last
  kept) and one ``cat``: stays in the training dtype and memory format, at K calls per layer.

Either way the running statistics of group 0 are updated by ``F.batch_norm`` on its rows with the
running buffers: its schema declares that mutation, so ``torch.compile``d graphs keep it
(``torch.batch_norm_update_stats`` declares none, and compiled graphs dropped it).

Groups that span ranks exchange their statistics over the world process group, never over a
sub-communicator: DDP's gradient all-reduces run on the world communicator during the same
backward, and NCCL does not order collectives on different communicators (they can deadlock).
The statistics are a few KB, so every rank gathers all ranks' and keeps its block's.
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


BN_IMPLS = ("group-norm", "batch-norm")


def resolve_bn_impl(name: str, device: torch.device) -> str:
    """The implementation of local groups that ``--bn-impl name`` runs on ``device``: ``auto`` is
    ``group-norm`` on a CPU (one kernel a layer, which keeps channels_last and fp32 there), and
    ``batch-norm`` on CUDA, where it avoids GroupNorm's fp32 NCHW copies under autocast, until
    ``make gpu-check``'s step times of both settle it (docs/design.md)."""
    if name == "auto":
        return "group-norm" if device.type == "cpu" else "batch-norm"
    if name not in BN_IMPLS:
        raise ValueError(f"bn_impl must be 'auto' or one of {', '.join(BN_IMPLS)}, got {name!r}")
    return name


def block_parts(t: torch.Tensor, split: Split) -> torch.Tensor:
    """``t`` of every rank of this rank's block of ``split.span`` ranks, stacked in rank order
    ([span, *t.shape]). Gathered over the world group (see the module docstring); no gradient."""
    parts = [torch.empty_like(t) for _ in range(split.world)]
    dist.all_gather(parts, t.contiguous())
    first = split.rank // split.span * split.span
    return torch.stack(parts[first:first + split.span])


def _as_group_norm_input(x: torch.Tensor, k: int) -> torch.Tensor:
    """[K*m, C, H, W] -> [K, C, m*H, W] (a view for channels_last; a copy otherwise)."""
    return x.unflatten(0, (k, -1)).transpose(1, 2).flatten(2, 3)


def _from_group_norm_output(y: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`_as_group_norm_input`, in x's dtype and memory format."""
    y = y.unflatten(2, (-1, x.shape[2])).transpose(1, 2)
    if y.dtype == x.dtype and x.device.type == "cpu":
        return y.flatten(0, 1)  # a view when x is channels_last (GroupNorm kept the layout)
    out = torch.empty_like(x)  # CUDA's GroupNorm returns NCHW (fp32 under autocast): one copy back
    out.unflatten(0, (k, -1)).copy_(y)
    return out


def _local_groups(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, k: int, firsts: range,
                  impl: str) -> torch.Tensor:
    """k equal groups of local rows, each normalised with its own batch statistics; the groups in
    ``firsts`` update the running statistics (none when empty)."""
    def norm(rows: torch.Tensor, g: int, weight, bias) -> torch.Tensor:
        running = (bn.running_mean, bn.running_var) if g in firsts else (None, None)
        return F.batch_norm(rows, *running, weight, bias, True, bn.momentum, bn.eps)

    if k == 1 or impl == "batch-norm" or x[0, 0].numel() == 1:
        # [B, C] (the neck) and [B, C, 1, 1] too: GroupNorm's CPU gradient of their views has
        # other strides than its meta function says, and a compiled backward fails on a view of it
        ys = [norm(rows, g, bn.weight, bn.bias) for g, rows in enumerate(x.split(x.shape[0] // k))]
        return torch.cat(ys) if k > 1 else ys[0]
    y = F.group_norm(_as_group_norm_input(x, k), x.shape[1], bn.weight, bn.bias, bn.eps)
    m = x.shape[0] // k
    with torch.no_grad():
        for g in firsts:
            norm(x[g * m:(g + 1) * m], g, None, None)
    return _from_group_norm_output(y, x, k)


class _SharedGroupNorm(torch.autograd.Function):
    """BatchNorm over segments whose groups span several ranks: each rank's per-segment mean and
    variance are gathered over the group's ranks and combined (equal counts), and the backward
    sums the two gradient reductions over the same ranks, as SyncBatchNorm does. With DDP's
    gradient averaging this gives the gradient of the whole batch's loss."""

    @staticmethod
    def forward(ctx, x, weight, bias, k: int, eps: float, split: Split):
        xf = x.unflatten(0, (k, -1)).to(torch.promote_types(x.dtype, torch.float32))
        dims = [1, *range(3, xf.dim())]
        var, mean = torch.var_mean(xf, dim=dims, correction=0, keepdim=True)
        parts = block_parts(torch.stack([mean, var]), split)
        mean = parts[:, 0].mean(0)
        var = (parts[:, 1] + (parts[:, 0] - mean) ** 2).mean(0)
        invstd = (var + eps).rsqrt()
        shape = [1, 1, -1] + [1] * (xf.dim() - 3)
        w, b = weight.to(xf.dtype).view(shape), bias.to(xf.dtype).view(shape)
        ctx.save_for_backward(x, mean, invstd, w)
        ctx.k, ctx.split, ctx.count = k, split, xf[0].numel() // xf.shape[2] * len(parts)
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
        sums = block_parts(sums, ctx.split).sum(0)
        dx = (g - sums[0] / ctx.count - xhat * (sums[1] / ctx.count)) * invstd * w
        return dx.to(x.dtype).flatten(0, 1), grad_w, grad_b, None, None, None


def _shared_groups(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, split: Split, k: int,
                   keep: bool) -> torch.Tensor:
    """k local segments, each part of a group shared with the other ranks of its block."""
    y, mean, var = _SharedGroupNorm.apply(x, bn.weight, bn.bias, k, bn.eps, split)
    if keep:
        n = split.group_rows * x[0, 0].numel()
        with torch.no_grad():
            mean, var = mean.view(k, -1), var.view(k, -1) * (n / (n - 1))
            for g in range(k):
                bn.running_mean.lerp_(mean[g].to(bn.running_mean.dtype), bn.momentum)
                bn.running_var.lerp_(var[g].to(bn.running_var.dtype), bn.momentum)
    return y


def batch_norm_groups(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, layout: Layout,
                      impl: str = "group-norm") -> torch.Tensor:
    """Training-mode BatchNorm of a forward laid out as ``layout`` (see the module docstring);
    ``impl``: one of ``BN_IMPLS``, how local groups are normalised."""
    if bn.momentum is None:
        raise ValueError("statistics groups need BatchNorm momentum as a number (cumulative averages "
                         "are not supported)")
    if len(set(layout)) > 1:  # sources of different sizes: one call each
        parts = x.split([s.rows for s in layout])
        first = [batch_norm_groups(p, bn, (s,), impl) for p, s in zip(parts, layout)]
        return torch.cat(first)
    split = layout[0]
    keep = split.rank == 0
    k = len(layout) * split.segments
    if split.span == 1:
        y = _local_groups(x, bn, k, range(0, k, split.segments) if keep else range(0), impl)
    else:
        y = _shared_groups(x, bn, split, k, keep)
    if keep:
        bn.num_batches_tracked.add_(len(layout))
    return y


def gather_group_rows(t: torch.Tensor, split: Split) -> torch.Tensor:
    """Rows of a group shared by several ranks: every rank of the block gets all of them, in
    rank order (= the group's row order). No gradient."""
    return block_parts(t, split).flatten(0, 1)
