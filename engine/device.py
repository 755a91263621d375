"""Which device a run uses (``--device auto|cuda|cpu``), decided in one place for train.py and
every tool. ``auto`` takes CUDA when torch sees a GPU and the CPU when the machine has none; a
machine whose GPUs torch cannot see (a torch wheel built for a newer CUDA than the driver's) is
refused rather than trained on the CPU for days without a word."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch

DEVICES = ("auto", "cuda", "cpu")


class DeviceError(ValueError):
    """A ``--device`` that cannot be had: one line naming the flag and the fix."""


def listed_gpus() -> int:
    """GPUs the machine has whether or not torch sees them: ``nvidia-smi -L``'s lines, or 1 when
    only the driver's device file is there (no nvidia-smi on PATH)."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is not None and done.returncode == 0:
            return sum(line.startswith("GPU ") for line in done.stdout.splitlines())
    return int(Path("/dev/nvidia0").exists())


def resolve_device(choice: str | torch.device = "auto") -> torch.device:
    """``choice`` (auto, cpu, cuda, cuda:N or a device) as a device: ``auto`` is CUDA when torch
    sees a GPU, else the CPU, unless the machine has GPUs torch cannot use (:class:`DeviceError`,
    naming torch's CUDA build and the fix); CUDA without a visible GPU is refused too."""
    if str(choice) == "auto":
        device = torch.device("cuda") if torch.cuda.is_available() else None
    else:
        try:
            device = torch.device(choice)
        except RuntimeError:
            raise DeviceError(f"--device {choice!r}: expected one of {', '.join(DEVICES)}") from None
    if device is not None and (device.type != "cuda" or torch.cuda.is_available()):
        return device
    build = f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" if torch.version.cuda \
        else f"torch {torch.__version__} is a CPU-only build"
    fix = ("install a torch wheel built for the CUDA version the driver supports (README: Install), "
           "or pass --device cpu to run on the CPU anyway")
    if device is not None:
        raise DeviceError(f"--device {choice}: torch sees no CUDA device ({build}): {fix}")
    gpus = listed_gpus()
    if gpus:
        raise DeviceError(f"--device auto: this machine has {gpus} GPU(s) (nvidia-smi -L, /dev/nvidia0) but "
                          f"torch cannot use them ({build}; the driver may be older): {fix}")
    return torch.device("cpu")
