"""The style module (UBS) step by step: per-sample statistics, batch statistics of them, uniform draws."""
from __future__ import annotations

import torch

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
