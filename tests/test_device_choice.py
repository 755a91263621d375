"""No silent CPU fallback: on a machine with GPUs that torch cannot use (a wheel built for a newer
CUDA than the driver's), ``--device auto`` is refused in one line, exit code 2, by train.py and
the tools, naming torch's CUDA build and the fix; ``--device cpu`` still runs. The machine's GPUs
come from a fake ``nvidia-smi`` first on PATH, and CUDA is hidden from torch, so this holds on a
GPU machine too."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.device import DeviceError, listed_gpus, resolve_device
from tests.runs import ROOT, small_run

LISTING = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n"
BUILD = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"


def fake_smi(folder: Path, stdout: str, code: int = 0) -> Path:
    """A folder holding an ``nvidia-smi`` that prints ``stdout`` and exits with ``code``."""
    folder.mkdir(exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nexit {code}\n")
    smi.chmod(0o755)
    return folder


def gpu_machine_env(tmp_path: Path) -> dict[str, str]:
    """A machine whose nvidia-smi lists two GPUs that torch cannot see."""
    smi = fake_smi(tmp_path / "bin", LISTING)
    return {**os.environ, "PATH": f"{smi}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["train.py"],
    ["tools/benchmark.py", "ops"],
    ["tools/extract.py", "--checkpoint", "none.pth", "--images", "a.jpg", "--out", "feats"],
    ["tools/gpu_check.py", "--out", "check"],
], ids=["train", "benchmark", "extract", "gpu_check"])
def test_auto_refuses_gpus_that_torch_cannot_use(tmp_path, command):
    Image.new("RGB", (32, 64)).save(tmp_path / "a.jpg")
    done = subprocess.run([sys.executable, str(ROOT / command[0]), *command[1:]], cwd=tmp_path,
                          env=gpu_machine_env(tmp_path), capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    prog = Path(command[0]).name
    assert lines[0].startswith(f"{prog}") and "error: --device auto: this machine has 2 GPU(s)" in lines[0]
    assert BUILD in lines[0] and "torch wheel built for the CUDA version" in lines[0]
    assert "--device cpu" in lines[0]
    assert not (tmp_path / "check").exists()  # refused before any work


@pytest.mark.slow
def test_cpu_is_taken_as_asked_on_such_a_machine(tmp_path, synthetic_shards):
    """--device cpu trains there (a tiny run to its end)."""
    done = subprocess.run([sys.executable, "train.py", *small_run(synthetic_shards, tmp_path / "logs")],
                          cwd=ROOT, env=gpu_machine_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and (tmp_path / "logs" / "best.pth").is_file(), done.stderr[-2000:]


def test_the_choice_in_process(tmp_path, monkeypatch):
    """Which machines refuse: GPUs listed and unseen; a failing nvidia-smi (no driver) is no GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", str(fake_smi(tmp_path / "gpus", LISTING)))
    assert listed_gpus() == 2
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="--device auto: this machine has 2 GPU"):
        resolve_device("auto")
    with pytest.raises(DeviceError, match="--device cuda: torch sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="--device 'gpu': expected one of auto, cuda, cpu"):
        resolve_device("gpu")
    monkeypatch.setenv("PATH", str(fake_smi(tmp_path / "broken", "NVIDIA-SMI has failed", code=9)))
    if not Path("/dev/nvidia0").exists():
        assert listed_gpus() == 0 and resolve_device("auto") == torch.device("cpu")
