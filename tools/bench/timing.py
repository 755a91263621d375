"""The timed windows every figure of ``tools/benchmark.py`` is the median of, and the machine it
was measured on."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def device_sync(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work and for every rank."""
    from engine.distributed import barrier

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        barrier()
    return sync


def measure(run_iteration: Callable[[], object], sync: Callable[[], None], args) -> dict:
    """Seconds per iteration: ``--warmup`` untimed iterations, then ``--repeats`` windows of
    ``--window`` iterations, each ending with ``sync()``. ``s_per_iter`` is the median window,
    which one disturbed window (a busy machine, a collection) does not move; every window is
    kept in ``windows_s_per_iter``."""
    for _ in range(args.warmup):
        run_iteration()
    sync()
    windows = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.window):
            run_iteration()
        sync()
        windows.append((time.perf_counter() - t0) / args.window)
    return {"s_per_iter": statistics.median(windows), "windows_s_per_iter": windows}


def machine() -> dict:
    """The CPU, its cores and torch's threads, the GPU when there is one, and the versions."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import nvidia.dali as dali
        info["dali"] = dali.__version__
    except ImportError:
        pass
    return info
