"""Optimiser, learning-rate schedule and the grad scaler that steps the optimiser under fp16, as
the published method sets them (the autocast dtype itself: ``engine.precision``)."""
from __future__ import annotations

import bisect
import logging

import torch

log = logging.getLogger(__name__)


def build_optimizer(params, lr: float, weight_decay: float, device: torch.device,
                    use_apex: bool = False) -> torch.optim.Optimizer:
    """Adam (lr 3.5e-4, weight decay 5e-4 by default): torch's fused kernel on GPU, apex's
    FusedAdam only when it is installed and asked for."""
    params = [p for p in params if p.requires_grad]
    if use_apex:
        try:
            from apex.optimizers import FusedAdam
        except ImportError as e:
            raise RuntimeError("--apex was given but NVIDIA apex is not installed "
                               "(it is not on PyPI; build it from NVIDIA's repository)") from e
        log.info("optimizer: apex FusedAdam")
        return FusedAdam(params, lr=lr, weight_decay=weight_decay, adam_w_mode=False)
    fused = device.type == "cuda"
    log.info("optimizer: torch Adam (%s)", "fused" if fused else "foreach")
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def warmup_multistep(epoch: int, milestones: tuple[int, ...] = (30, 50), gamma: float = 0.1,
                     warmup_factor: float = 0.1, warmup_epochs: int = 10) -> float:
    """Learning-rate factor of an epoch: linear warm-up from `warmup_factor` over
    `warmup_epochs`, then `gamma` at each milestone (the schedule is stepped once per epoch)."""
    factor = 1.0
    if epoch < warmup_epochs:
        alpha = epoch / warmup_epochs
        factor = warmup_factor * (1 - alpha) + alpha
    return factor * gamma ** bisect.bisect_right(milestones, epoch)


def build_scheduler(optimizer, milestones=(30, 50), gamma=0.1, warmup_factor=0.1,
                    warmup_epochs=10) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: warmup_multistep(e, tuple(milestones), gamma, warmup_factor, warmup_epochs))


def build_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A grad scaler that is active for fp16 only (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
