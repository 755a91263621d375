"""Micro-benchmark of the model parts that replace slow published code: the fused UBS style
module against its step-by-step version, and the vectorised memory update against the
per-sample loop, both with its round sizes read back from the device ("read-back") and given
by the sampler as in training ("rounds"). Median of repeats after warm-up; CUDA timings
synchronise after every call, so they show the cost of a call, not the stall a read-back
causes inside a queued iteration.

    python tools/bench_model.py [--device cpu,cuda] [--repeats 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model.memory import MemoryClassifier  # noqa: E402
from pipeline.loader import round_sizes  # noqa: E402
from model.style import UBS  # noqa: E402
from tools.benchmark import device_sync, timed_windows  # noqa: E402
from tools.reference import LiteralUBS, loop_update  # noqa: E402


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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
