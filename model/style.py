"""Uncertainty-guided batch style (UBS): the style module of Style Interleaved Learning.

Each sample's per-channel style (mean, std) is replaced by one drawn uniformly within
mean +- rho * std of the batch's style statistics (DESIGN.md section 5). The computation is
fused into one reduction pass (per-sample channel variance and mean, fp32) and one
multiply-add pass: ``x_norm * sig_new + mu_new`` equals ``x * a + b`` with ``a = sig_new / sig``
and ``b = mu_new - mu * a``. ``tools/reference.py`` holds the step-by-step version.
"""
from __future__ import annotations

import torch
from torch import nn


def ubs(x: torch.Tensor, rho: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Restyle a batch [B, C, H, W]; statistics in fp32, output in x's dtype and memory format.

    The random draws are ``torch.rand((B, C))`` for the means first, then for the stds, on x's
    device with the default generator, so a seeded run reproduces the published draws. The
    statistics are treated as constants for autograd (no gradient through them), as in the
    MixStyle family; in IL the module only runs in the gradient-free memory-update forward.
    """
    if x.dim() != 4:
        raise ValueError(f"UBS expects features [B, C, H, W], got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    if B < 2:
        raise ValueError(f"UBS needs at least 2 samples for the batch style statistics, got {B}")
    with torch.no_grad():
        var, mu = torch.var_mean(x.detach().float(), dim=(2, 3), correction=1)
        std = var.sqrt()
        sig = (var + eps).sqrt()
        mu_std, mu_mean = torch.std_mean(mu, dim=0, correction=1)
        std_std, std_mean = torch.std_mean(std, dim=0, correction=1)
        r_mu = torch.rand((B, C), device=x.device)
        r_std = torch.rand((B, C), device=x.device)
        mu_new = mu_mean + (2 * r_mu - 1) * (rho * mu_std.clamp(min=eps))
        sig_new = std_mean + (2 * r_std - 1) * (rho * std_std.clamp(min=eps))
        a = sig_new / sig
        b = mu_new - mu * a
    a, b = a.view(B, C, 1, 1), b.view(B, C, 1, 1)
    if x.dtype == torch.float32:
        return torch.addcmul(b, x, a)
    if not (torch.is_grad_enabled() and x.requires_grad):
        # computed in fp32, rounded once on the write: no full-size fp32 intermediate
        return torch.addcmul(b, x, a, out=torch.empty_like(x))
    return torch.addcmul(b, x, a).to(x.dtype)


class UBS(nn.Module):
    """Style module placed after layer1; identity in eval mode."""

    def __init__(self, rho: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.rho, self.eps = rho, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.restyle(x) if self.training else x

    def restyle(self, x: torch.Tensor) -> torch.Tensor:
        """The training-mode transform (tools/reference.LiteralUBS overrides it step by step)."""
        return ubs(x, self.rho, self.eps)

    def extra_repr(self) -> str:
        return f"rho={self.rho}, eps={self.eps}"
