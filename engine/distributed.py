"""The few torch.distributed helpers training needs: setup from torchrun's environment and
row gathers in rank order (so every rank ends up with the same memories and features)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout: timedelta | None = None) -> DistInfo:
    """Initialise from torchrun's variables (NCCL on GPU, gloo on CPU; ``timeout``: of every
    collective, torch's default when None); a plain `python train.py` runs as a world of one
    without a process group."""
    use_cuda = resolve_device(device).type == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                timeout=timeout)
    return DistInfo(rank, world, local_rank, dev)


def host_group(timeout: timedelta) -> dist.ProcessGroup | None:
    """A gloo group of every rank, for waiting on work of the host that may outlast the process
    group's timeout (rank 0 building shards): NCCL's watchdog kills a collective of the NCCL group
    after its timeout (10 min by default), and gloo's group waits at most its own (30). Every rank
    must call it (it is a collective); None for a world of one."""
    return dist.new_group(backend="gloo", timeout=timeout) if world_size() > 1 else None


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` (same shape on every rank) along dim 0, in rank order."""
    world = world_size()
    if world == 1:
        return x
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    if x.device.type == "cuda":
        dist.all_gather_into_tensor(out, x.contiguous())
    else:
        dist.all_gather(list(out.chunk(world)), x.contiguous())
    return out


def exchange_rows(x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """All-to-all over rows: the first ``send_counts[0]`` rows of x go to rank 0, the next
    ``send_counts[1]`` to rank 1...; returns the rows received, rank 0's first."""
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts)
    return out


def gather_varying_rows(x: torch.Tensor) -> torch.Tensor:
    """Like all_gather_rows for per-rank row counts that differ (evaluation slices)."""
    world = world_size()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = all_gather_rows(n).tolist()
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    rows = all_gather_rows(padded).chunk(world)
    return torch.cat([r[:c] for r, c in zip(rows, counts)])


def broadcast_state(module: torch.nn.Module, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters and buffers to every rank. Only rank 0 updates the BatchNorm
    running statistics (it holds group 0 of every batch, ``model.groups``), so they are copied to
    the other ranks before every evaluation and checkpoint. The tensors of each dtype travel as
    one flat tensor: one collective per dtype (two for a ResNet), not one per tensor (over 300)."""
    if world_size() == 1:
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    for dtype in dict.fromkeys(t.dtype for t in tensors):  # one collective per dtype, not per tensor
        same = [t.data for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.broadcast(flat, src=0)
        if dist.get_rank() != 0:
            for t, piece in zip(same, flat.split([t.numel() for t in same])):
                t.copy_(piece.view(t.shape))  # into the tensor as it is laid out (channels_last)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def mean_over_ranks(values: torch.Tensor) -> None:
    """``values`` (on the device, in place) averaged over the ranks: one all-reduce."""
    world = world_size()
    if world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag, whether it is set on any rank: one small all-reduce, so that all ranks
    stop (on a signal or a non-finite loss) at the same iteration."""
    if world_size() == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
