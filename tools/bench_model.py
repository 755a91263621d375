"""Micro-benchmark of the model parts that replace slow published code: the fused UBS style
module against its step-by-step version, and the vectorised memory update against the
per-sample loop, both with its round sizes read back from the device ("read-back") and given
by the sampler as in training ("rounds"). Median of repeats after warm-up; CUDA timings
synchronise after every call, so they show the cost of a call, not the stall a read-back
causes inside a queued iteration.

``--ops`` counts instead the ATen operations one training iteration dispatches (views
excluded), per phase and per ``--bn-groups`` value: on a GPU the step is bound by the host's
dispatching, so the count is the cost that statistics groups must not multiply.

    python tools/bench_model.py [--device cpu,cuda] [--repeats 5] [--json out.json]
    python tools/bench_model.py --ops [--bn-groups 1 4] [--arch resnet50] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from model.memory import MemoryClassifier
from model.style import UBS
from pipeline.reading import round_sizes
from reference import LiteralUBS, loop_update
from tools.benchmark import device_sync, timed_windows


def time_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of one call: tools/benchmark.py's timed windows, one call each."""
    return 1e3 * statistics.median(timed_windows(fn, device_sync(device), warmup, 1, repeats))


def bench_device(device: torch.device, args) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        x = torch.randn(args.style_shape, device=device, generator=g).to(dtype)
        x = x.to(memory_format=torch.channels_last)
        for impl, mod in (("literal", LiteralUBS()), ("fused", UBS())):
            with torch.no_grad():
                ms = time_ms(lambda: mod.train()(x), device, args.warmup, args.repeats)
            rows.append({"op": "ubs", "shape": list(args.style_shape), "impl": impl, "ms": ms,
                         "dtype": str(dtype).split(".")[-1], "device": device.type})

    feats = F.normalize(torch.randn(args.batch, args.features, device=device, generator=g), dim=1)
    ids = torch.randperm(args.classes, device=device, generator=g)[:args.batch // 4]
    labels = ids.repeat_interleave(4)[torch.randperm(args.batch, device=device, generator=g)]
    mem = MemoryClassifier(args.features, args.classes).to(device)
    centers = torch.randn(args.classes, args.features, device=device, generator=g)
    mem.centers.copy_(F.normalize(centers, dim=1))
    rounds = round_sizes(labels.cpu().numpy())  # what the sampler hands over in training
    for impl, fn in (("loop", lambda: loop_update(mem.centers, feats, labels, mem.momentum)),
                     ("read-back", lambda: mem.update(feats, labels)),
                     ("rounds", lambda: mem.update(feats, labels, round_sizes=rounds))):
        ms = time_ms(fn, device, args.warmup, args.repeats)
        rows.append({"op": "memory_update", "shape": [args.batch, args.features, args.classes],
                     "dtype": "float32", "device": device.type, "impl": impl, "ms": ms})
    return rows


class OpCounter(TorchDispatchMode):
    """Counts dispatched ATen operations (views excluded) under the current ``phase``."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "set-up"
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[self.phase] += 1
        return func(*args, **(kwargs or {}))


def count_step_ops(arch: str, bn_groups: int, mode: str = "il", batch: int = 64,
                   size: tuple[int, int] = (32, 16)) -> dict[str, int]:
    """ATen operations of one training iteration (engine.step.train_step, CPU, fp32, fused Adam,
    the sampler's labels known), after one warm-up iteration, split into phases by hooks on the
    model and the optimizer. Counts do not depend on the image size, so a small one is used."""
    from engine.optim import build_scaler
    from engine.step import shuffle_plan, train_step
    from model.resnet import build_model

    torch.manual_seed(0)
    model = build_model(arch, style=UBS(), bn_groups=bn_groups).train().to(memory_format=torch.channels_last)
    classes = [1041, 702, 767]
    memories = [MemoryClassifier(model.num_features, n) for n in classes]
    opt = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4, fused=True)
    scaler = build_scaler(torch.device("cpu"), None)
    sizes = [batch] * 3
    labels = [torch.randperm(n)[:batch // 4].repeat_interleave(4) for n in classes]
    images = torch.randn(3 * batch, 3, *size).contiguous(memory_format=torch.channels_last)
    counter, forwards = OpCounter(), []

    def forward_pre(*_):
        counter.phase = "forward 1" if not forwards else "forward 2 (with shuffle)"

    def forward_post(*_):
        forwards.append(1)
        counter.phase = "loss + backward" if len(forwards) == 1 else "memory update"

    def optimizer_pre(*_):
        counter.phase = "optimizer"

    def optimizer_post(*_):
        counter.phase = "forward 2 (with shuffle)"

    hooks = [model.register_forward_pre_hook(forward_pre), model.register_forward_hook(forward_post),
             opt.register_step_pre_hook(optimizer_pre), opt.register_step_post_hook(optimizer_post)]
    for it in range(2):
        plan = shuffle_plan(sizes, 1, 0, seed=0, epoch=0, it=it, shuffle=mode != "fb",
                            labels=[y.numpy() for y in labels])
        forwards.clear()
        counter.counts.clear()
        with counter:
            train_step(model, memories, images, torch.cat(labels), sizes, opt, scaler, None, mode, plan)
    for h in hooks:
        h.remove()
    counts = {k: v for k, v in counter.counts.items() if k != "set-up"}
    counts["total"] = sum(counts.values())
    return counts


def print_ops(args) -> list[dict]:
    rows = [{"bn_groups": g, "arch": args.arch, "mode": "il", **count_step_ops(args.arch, g)}
            for g in args.bn_groups]
    phases = [k for k in rows[0] if k not in ("bn_groups", "arch", "mode")]
    print(f"ATen operations of one IL iteration ({args.arch}, views excluded), by --bn-groups")
    print(f"{'phase':<26}" + "".join(f"{'groups ' + str(r['bn_groups']):>12}" for r in rows))
    for k in phases:
        print(f"{k:<26}" + "".join(f"{r.get(k, 0):>12}" for r in rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu,cuda",
                   help="comma-separated devices to time; cuda is skipped when unavailable")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs")
    p.add_argument("--style-shape", type=int, nargs=4, default=[192, 256, 64, 32],
                   metavar=("B", "C", "H", "W"),
                   help="UBS input shape (layer1 output of a 3 x 64 batch at 256x128)")
    p.add_argument("--batch", type=int, default=192, help="memory update rows (4 per identity)")
    p.add_argument("--features", type=int, default=2048, help="feature width")
    p.add_argument("--classes", type=int, default=4101, help="memory classes (MSMT17 mix: 4101)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    p.add_argument("--ops", action="store_true",
                   help="count the ATen operations of one training iteration per phase instead of timing")
    p.add_argument("--bn-groups", type=int, nargs="+", default=[1, 4],
                   help="--ops: statistics-group settings to count (train.py --bn-groups)")
    p.add_argument("--arch", choices=("resnet50", "resnet18"), default="resnet50", help="--ops: backbone")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ops:
        rows = print_ops(args)
        if args.json:
            args.json.write_text(json.dumps({"torch": torch.__version__, "ops": rows}, indent=2))
        return 0
    devices = [d for d in args.device.split(",") if d != "cuda" or torch.cuda.is_available()]
    rows = []
    for d in devices:
        rows += bench_device(torch.device(d), args)

    base = {(r["op"], r["device"], r["dtype"]): r["ms"] for r in rows if r["impl"] in ("literal", "loop")}
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}"
          + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print(f"{'op':<14}{'device':<8}{'dtype':<10}{'impl':<12}{'median ms':>11}{'speed-up':>10}")
    for r in rows:
        r["speedup"] = base[(r["op"], r["device"], r["dtype"])] / r["ms"]
        print(f"{r['op']:<14}{r['device']:<8}{r['dtype']:<10}{r['impl']:<12}"
              f"{r['ms']:>11.2f}{r['speedup']:>9.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
