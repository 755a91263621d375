"""Uncertainty-guided batch style (UBS): the style module of Style Interleaved Learning.

Each sample's per-channel style (mean, std) is replaced by one drawn uniformly within
mean +- rho * std of its statistics group's style statistics (docs/design.md; the groups are
those of ``model.groups``: the published runs took them per DataParallel replica). The
computation is fused into one reduction pass (per-sample channel variance and mean, fp32, without
an fp32 copy of a bf16 batch: :func:`sample_stats`) and one multiply-add pass:
``x_norm * sig_new + mu_new`` equals ``x * a + b`` with ``a = sig_new / sig`` and
``b = mu_new - mu * a``. ``reference/style.py`` holds the step-by-step version.
"""
from __future__ import annotations

import torch
from torch import nn

from model.groups import Layout, Split, gather_group_rows


def _group_stats(v: torch.Tensor, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased std and mean over each statistics group of per-sample values v [B, C]:
    [K, 1, C] each, K local segments (rows of a group shared by several ranks are gathered)."""
    if split.span > 1:
        v = gather_group_rows(v, split)
    std, mean = torch.std_mean(v.unflatten(0, (-1, split.group_rows)), dim=1, correction=1, keepdim=True)
    return std, mean


def sample_stats(x: torch.Tensor, chunk: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample channel variance (unbiased) and mean of x [B, C, H, W], in fp32 at least. A
    lower-precision batch (bf16 layer-1 output) is converted a few rows at a time, about
    ``chunk`` elements each, so no fp32 copy of the whole batch exists at any point."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if x.dtype == dtype:
        return torch.var_mean(x, dim=(2, 3), correction=1)
    stats = [torch.var_mean(rows.to(dtype), dim=(2, 3), correction=1)
             for rows in x.split(max(1, chunk // x[0].numel()))]
    return torch.cat([v for v, _ in stats]), torch.cat([m for _, m in stats])


def _draws(split: Split, channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the uniform draws of the whole batch: per group, ``rand((rows, C))``
    for the means, then for the stds, group after group, so a group draws what a DataParallel
    replica drew on its own (on a CPU generator exactly) whichever rank forwards it."""
    r = torch.rand((split.groups, 2, split.group_rows, channels), device=device)
    rows = slice(split.start, split.start + split.rows)
    return r[:, 0].flatten(0, 1)[rows], r[:, 1].flatten(0, 1)[rows]


def ubs(x: torch.Tensor, rho: float = 3.0, eps: float = 1e-6, layout: Layout | None = None) -> torch.Tensor:
    """Restyle a batch [B, C, H, W]; statistics in fp32, output in x's dtype and memory format.

    ``layout`` (one source) says which rows form each statistics group; None: the whole batch is
    one group. The random draws come from the default generator on x's device, so a seeded run
    reproduces them. The statistics are treated as constants for autograd (no gradient through
    them), as in the MixStyle family; in IL the module only runs in the gradient-free
    memory-update forward.
    """
    if x.dim() != 4:
        raise ValueError(f"UBS expects features [B, C, H, W], got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    split = Split(B) if layout is None else layout[0]
    if layout is not None and (len(layout) != 1 or split.rows != B):
        raise ValueError(f"UBS restyles one batch (the shuffled second forward), got the layout {layout} "
                         f"for {B} rows")
    if split.group_rows < 2:
        raise ValueError(f"UBS needs at least 2 samples per statistics group, got {split.group_rows}")
    with torch.no_grad():
        var, mu = sample_stats(x.detach())
        std = var.sqrt()
        sig = (var + eps).sqrt()
        mu_std, mu_mean = _group_stats(mu, split)
        std_std, std_mean = _group_stats(std, split)
        r_mu, r_std = (r.to(mu.dtype).unflatten(0, (-1, split.segment)) for r in _draws(split, C, x.device))
        mu_new = mu_mean + (2 * r_mu - 1) * (rho * mu_std.clamp(min=eps))
        sig_new = std_mean + (2 * r_std - 1) * (rho * std_std.clamp(min=eps))
        a = sig_new.flatten(0, 1) / sig
        b = mu_new.flatten(0, 1) - mu * a
    a, b = a.view(B, C, 1, 1), b.view(B, C, 1, 1)
    if x.dtype == a.dtype:
        return torch.addcmul(b, x, a)
    if not (torch.is_grad_enabled() and x.requires_grad):
        # computed in fp32, rounded once on the write: no full-size fp32 intermediate
        return torch.addcmul(b, x, a, out=torch.empty_like(x))
    return torch.addcmul(b, x, a).to(x.dtype)


class UBS(nn.Module):
    """Style module placed after layer1; identity in eval mode. ``layout`` is set by the model
    for the duration of a grouped forward."""

    layout: Layout | None = None

    def __init__(self, rho: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.rho, self.eps = rho, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.restyle(x) if self.training else x

    def restyle(self, x: torch.Tensor) -> torch.Tensor:
        """The training-mode transform (reference.LiteralUBS overrides it step by step)."""
        return ubs(x, self.rho, self.eps, self.layout)

    def extra_repr(self) -> str:
        return f"rho={self.rho}, eps={self.eps}"
