"""A small training case shared by tests/test_step.py and the ranks of tests/dist_step_check.py:
the same initial weights, memories and global batches wherever it is built, in float64 so that
rounding cannot grow through Adam's steps into a visible difference (fp32 summation-order noise
in near-zero gradients turns into differences of the step size)."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from model.memory import MemoryClassifier
from model.resnet import build_model
from model.style import UBS
from reference import LiteralUBS

SIZES = [16, 16, 16]  # global rows per source: 4 identities x 4 images (three sources, as published)
CLASSES = [5, 7, 6]
MORE_CLASSES = [8, 5]  # of a fourth and a fifth source
ITERS = 2


def sizes(sources: int = 3) -> list[int]:
    """Global rows per source of a case with ``sources`` sources. One source takes 12 identities,
    so its shuffled second forward has the 48 rows of three sources' and its statistics groups
    as many rows: in groups of 4 rows the fast and the literal forward's float64 roundings drift
    apart by up to 1e-8 in two iterations (measured), above the comparison's tolerance."""
    return [48] if sources == 1 else [SIZES[0]] * sources


def classes(sources: int = 3) -> list[int]:
    return [13] if sources == 1 else (CLASSES + MORE_CLASSES)[:sources]


def build(bn_groups: int, bn_impl: str = "group-norm",
          sources: int = 3) -> tuple[torch.nn.Module, list[MemoryClassifier]]:
    torch.manual_seed(0)
    model = build_model("resnet18", style=UBS(), bn_groups=bn_groups, bn_impl=bn_impl).double().train()
    return model, memories(model.num_features, classes(sources))


def memories(features: int, counts: list[int]) -> list[MemoryClassifier]:
    """A float64 memory per source, of ``counts[j]`` random unit centres, the same wherever made."""
    out = [MemoryClassifier(features, n).double() for n in counts]
    g = torch.Generator().manual_seed(1)
    for m in out:
        m.centers.copy_(F.normalize(torch.randn(m.centers.shape, generator=g, dtype=torch.float64), dim=1))
    return out


def literal(model: torch.nn.Module) -> torch.nn.Module:
    """The same network as the published code ran it: each call normalised as one batch (the
    replicas are made by reference.replica_forward), the step-by-step style module."""
    ref = copy.deepcopy(model)
    ref.bn_groups = 1
    ref.style = LiteralUBS()
    return ref


def batch(it: int, sources: int = 3) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """Global images, labels (sources one after another, sampler order) and labels per source."""
    g = torch.Generator().manual_seed(100 + it)
    rows = sizes(sources)
    images = torch.randn(sum(rows), 3, 16, 8, generator=g, dtype=torch.float64)
    labels = torch.cat([torch.randperm(n, generator=g)[:s // 4].repeat_interleave(4)
                        for n, s in zip(classes(sources), rows)])
    return images, labels, [y.numpy() for y in labels.split(rows)]


def rank_rows(rank: int, world: int, sources: int = 3) -> torch.Tensor:
    """Rows of the global batch that rank holds: its slice of every source."""
    rows = sizes(sources)
    starts = np.cumsum([0] + rows[:-1])
    return torch.cat([torch.arange(s + rank * n // world, s + (rank + 1) * n // world)
                      for s, n in zip(starts, rows)])


def state(model: torch.nn.Module, memories: list[MemoryClassifier]) -> dict[str, torch.Tensor]:
    """Weights, buffers (running statistics, batch counts) and memories, by name."""
    out = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"buffer.{n}": b.clone() for n, b in model.named_buffers()})
    out.update({f"memory.{j}": m.centers.clone() for j, m in enumerate(memories)})
    return out


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-7, atol=1e-9,
                                   msg=lambda m, name=name: f"{name}: {m}")
