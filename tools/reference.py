"""The published procedure's way of computing, written literally from docs/design.md.

Two users: the tests hold the fast code (``model.style.UBS``, ``MemoryClassifier.update``) against
these step-by-step versions, and ``tools/benchmark.py --impl reference`` runs a training
iteration the way the published code runs it (fp32, NCHW, one forward per source, a Python loop
over every sample to update the memories, the unfused style module), so every speed claim is a
ratio measured side by side on the same machine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.style import UBS


class LiteralUBS(UBS):
    """UBS step by step: per-sample statistics, batch statistics of them, uniform draws."""

    def restyle(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        mu = xf.mean(dim=(2, 3), keepdim=True)
        var = xf.var(dim=(2, 3), keepdim=True)
        sig = (var + self.eps).sqrt()
        x_norm = (xf - mu) / sig
        mu_b = mu.view(B, C)
        std_b = var.sqrt().view(B, C)
        mu_mean, mu_std = mu_b.mean(dim=0), mu_b.std(dim=0).clamp(min=self.eps)
        sig_mean, sig_std = std_b.mean(dim=0), std_b.std(dim=0).clamp(min=self.eps)
        r_mu = torch.rand((B, C), device=x.device)
        r_sig = torch.rand((B, C), device=x.device)
        mu_new = mu_mean - self.rho * mu_std + 2 * self.rho * mu_std * r_mu
        sig_new = sig_mean - self.rho * sig_std + 2 * self.rho * sig_std * r_sig
        out = x_norm * sig_new.view(B, C, 1, 1) + mu_new.view(B, C, 1, 1)
        return out.to(x.dtype)


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
