"""Mixed precision: the autocast dtype a device computes in, and the autocast context of a forward.
The grad scaler fp16 needs steps the optimiser, so it is built beside it
(``engine.optim.build_scaler``)."""
from __future__ import annotations

from contextlib import nullcontext

import torch


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 where the GPU computes in it natively (compute capability 8.0 and
    up), fp16 (with a grad scaler) otherwise, none (fp32) on CPU unless asked. Older GPUs
    emulate bf16, and torch's default check counts emulation as support; it would be slower
    than fp16 there."""
    if choice == "off" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
