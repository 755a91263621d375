"""One training iteration as the published code runs it, through literal DataParallel replicas."""
from __future__ import annotations

import torch

from reference.memory import loop_update, memory_loss


def replica_forward(model, x: torch.Tensor, replicas: int = 1, **kwargs) -> torch.Tensor:
    """``nn.DataParallel(model)`` over ``replicas`` GPUs, literally: the batch is scattered as
    contiguous chunks, each forwarded by its own replica; replica 0 is the module itself, so only
    its in-place running-statistics updates survive, while the others work on copies of the
    buffers (DataParallel broadcasts them) that are dropped after the forward. Parameters are
    shared, so gradients of every replica reach them."""
    if replicas == 1:
        return model(x, **kwargs)
    params = dict(model.named_parameters())
    outs = []
    for k, part in enumerate(x.chunk(replicas)):
        if k == 0:
            outs.append(model(part, **kwargs))
        else:
            buffers = {n: b.clone() for n, b in model.named_buffers()}
            outs.append(torch.func.functional_call(model, {**params, **buffers}, (part,), kwargs))
    return torch.cat(outs)


def reference_step(model, centers: list[torch.Tensor], images: list[torch.Tensor],
                   labels: list[torch.Tensor], optimizer, mode: str = "il", temp: float = 0.05,
                   momentum: float = 0.2, perm: torch.Tensor | None = None, replicas: int = 1) -> float:
    """One iteration as the published code runs it: a forward per source, fp32, the loss, a
    step, then the shuffled second forward (`perm`, or a fresh random permutation) and the
    per-sample memory loop; every forward through ``replicas`` DataParallel replicas (the
    model itself must normalise each call as one batch: ``bn_groups=1``). FB (``mode="fb"``)
    updates the memories with the first forward's features instead. Returns the loss (read back
    to the host every iteration, as the published logging does)."""
    feats = [replica_forward(model, x, replicas) for x in images]
    loss = sum(memory_loss(f, c, y, temp) for f, c, y in zip(feats, centers, labels)) / len(images)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        if mode == "fb":
            for f, c, y in zip(feats, centers, labels):
                loop_update(c, f.detach(), y, momentum)
            return loss.item()
        x = torch.cat(images)
        y = torch.cat(labels)
        src = torch.cat([torch.full((len(t),), j) for j, t in enumerate(labels)])
        perm = torch.randperm(len(x)) if perm is None else perm.cpu()
        f2 = replica_forward(model, x[perm.to(x.device)], replicas, style=mode == "il")
        y, src = y[perm.to(y.device)], src[perm]
        for j, c in enumerate(centers):
            keep = (src == j).to(f2.device)
            loop_update(c, f2[keep], y[keep], momentum)
    return loss.item()
