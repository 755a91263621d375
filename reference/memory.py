"""The memory classifier as published: its loss, and the update one sample at a time."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def loop_update(centers: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                momentum: float) -> None:
    """The memory update as published: one sample at a time, in batch order."""
    for f, y in zip(features, labels.tolist()):
        centers[y] = momentum * centers[y] + (1 - momentum) * f
        centers[y] /= centers[y].norm()


def memory_loss(features: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor,
                temp: float) -> torch.Tensor:
    return F.cross_entropy(features @ centers.t() / temp, labels)
