"""Throughput of the IL training system, across GPU counts, against the published way of running.

Modes (``--mode``):
  data   the loaders alone (DALI, torch fallback, and the published folder-of-JPEGs PIL loader)
  step   one training iteration on tensors already on the device: the model-only bound
  train  the full pipeline as train.py runs it (shards -> loader -> step)
  eval   evaluation: the feature extraction forward (eval mode, on device tensors) and the
         ranking and metrics at MSMT17 size (11,659 queries x 82,161 gallery, 2048-d)
  all    every mode above

``--impl fast`` is this project (channels_last, autocast, fused Adam, chunked BN, fused style,
vectorised memory update, DALI); ``--impl reference`` runs the published procedure's way
(fp32, NCHW, a forward per source, unfused style, per-sample memory loop, PIL folder loader);
``--impl both`` measures the two side by side in one run, so every speed claim is a ratio.

``--gpus 1,2,4,8`` launches ``torchrun --nproc_per_node N`` for each count on this machine (gloo
processes on a CPU-only machine). For several machines, run the worker under your own torchrun
on every node: ``torchrun --nnodes 2 --nproc_per_node 8 ... tools/benchmark.py --worker
--mode train --impl fast --result out.json``. Each figure is the median over ``--repeats`` timed windows of
``--window`` iterations after ``--warmup`` iterations; the table, a JSON file and a PNG plot
(images/s and scaling efficiency against the ideal line) go to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("data", "step", "train", "eval")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES + ("all",), default="step", help="what to measure")
    p.add_argument("--impl", choices=("fast", "reference", "both"), default="both",
                   help="this project, the published way of running, or both side by side")
    p.add_argument("--gpus", default="1", help="comma-separated process counts, one torchrun each")
    p.add_argument("-a", "--arch", choices=("resnet50", "resnet18"), default="resnet50", help="backbone")
    p.add_argument("-b", "--batch-size", type=int, default=64,
                   help="global batch per source (identities x 4 images, split over the processes)")
    p.add_argument("--height", type=int, default=256, help="input height")
    p.add_argument("--width", type=int, default=128, help="input width")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="autocast of the fast implementation (the reference is always fp32)")
    p.add_argument("--shards", type=Path, default=Path("shards"), help="shards for data/train modes")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="raw datasets for the reference folder loader (data/train modes)")
    p.add_argument("--sources", default="market1501,dukemtmc,msmt17v1",
                   help="three source datasets (JPEG-folder datasets, so the reference loader can read them)")
    p.add_argument("-j", "--workers", type=int, default=4, help="loader worker processes per rank")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    p.add_argument("--window", type=int, default=10, help="iterations per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows; the median is reported")
    p.add_argument("--eval-size", default="11659,82161,2048",
                   help="queries,gallery,dim of the eval mode (default: MSMT17)")
    p.add_argument("--test-batch-size", type=int, default=256,
                   help="images per forward in the eval mode's feature extraction")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast model")
    p.add_argument("--bn-groups", type=int, default=4,
                   help="statistics groups of the fast model (train.py --bn-groups); the reference "
                        "normalises each source's batch as one")
    p.add_argument("--out", type=Path, default=Path("logs/benchmark"), help="folder for JSON and PNG")
    p.add_argument("--worker", action="store_true",
                   help="measure in this process group (under torchrun, e.g. across nodes) instead of "
                        "launching one; rank 0 writes --result")
    p.add_argument("--result", type=Path, default=None, help="JSON file a --worker run writes")
    return p


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import nvidia.dali as dali
        info["dali"] = dali.__version__
    except ImportError:
        pass
    return info


def timed_windows(run_iteration, sync, warmup: int, window: int, repeats: int) -> list[float]:
    """Seconds per iteration of each timed window (host and device synchronised at its ends)."""
    for _ in range(warmup):
        run_iteration()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(window):
            run_iteration()
        sync()
        out.append((time.perf_counter() - t0) / window)
    return out


def device_sync(device: torch.device):
    from engine.distributed import barrier

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        barrier()
    return sync


# ---------------------------------------------------------------- step and train (under torchrun)

def build_fast(args, device, world: int, num_classes: list[int]):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from engine.optim import amp_dtype, build_optimizer, build_scaler
    from model.memory import MemoryClassifier
    from model.resnet import build_model
    from model.style import UBS

    dtype = amp_dtype(args.amp, device)
    model = build_model(args.arch, "none", style=UBS(), bn_groups=args.bn_groups)
    model = model.to(device, memory_format=torch.channels_last)
    model.rank, model.world = dist.get_rank() if world > 1 else 0, world
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  gradient_as_bucket_view=True) if world > 1 else model
    if args.compile:
        net = torch.compile(net)
    memories = [MemoryClassifier(model.num_features, n).to(device) for n in num_classes]
    for m in memories:
        m.centers.copy_(torch.nn.functional.normalize(torch.randn_like(m.centers), dim=1))
    opt = build_optimizer(model.parameters(), 3.5e-4, 5e-4, device)
    return net, memories, opt, build_scaler(device, dtype), dtype


def build_reference(args, device, world: int, num_classes: list[int]):
    from torch.nn.parallel import DistributedDataParallel

    from model.resnet import build_model
    from reference import LiteralUBS

    # one forward per source, each normalised as one batch (the published replicas ran on
    # separate GPUs at once; one GPU running them one after another would only be slower)
    model = build_model(args.arch, "none", style=LiteralUBS(), bn_groups=1).to(device)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    centers = [torch.nn.functional.normalize(torch.randn(n, model.num_features, device=device), dim=1)
               for n in num_classes]
    opt = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
    return net, centers, opt


INSTANCES = 4  # images per identity in a batch, as the identity sampler draws them


def random_batch(args, device, world: int, rank: int, num_classes: list[int], channels_last: bool, dtype):
    """Random images and sampler-like labels (batch/4 identities x 4 each, the same global
    batch on every rank, each rank taking its slice), per source, and each source's global
    batch labels (what the sampler hands the training step)."""
    per_rank = args.batch_size // world
    g = torch.Generator().manual_seed(0)
    images, labels, batch_labels = [], [], []
    for n in num_classes:
        x = torch.randn(per_rank, 3, args.height, args.width, device=device, dtype=dtype or torch.float32)
        images.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        ids = torch.randperm(n, generator=g)[:args.batch_size // INSTANCES].repeat_interleave(INSTANCES)
        labels.append(ids[rank * per_rank:(rank + 1) * per_rank].to(device))
        batch_labels.append(ids.numpy())
    return images, labels, batch_labels


def worker_step_or_train(args, impl: str, mode: str) -> dict:
    """One measurement inside a torchrun process group; rank 0's result is returned."""
    from engine import distributed as du
    from engine.step import shuffle_plan, train_step
    from reference import reference_step

    info = du.init_distributed()
    device, world = info.device, info.world
    sources = args.sources.split(",")
    loader = None
    if mode == "train":
        loader, num_classes = make_train_loader(args, impl, info, sources)
    else:
        num_classes = [1041, 702, 767]  # ids of MSMT17, Duke, CUHK03 train sets: realistic memory sizes
    state = {"it": 0, "batches": None}

    if impl == "fast":
        net, memories, opt, scaler, dtype = build_fast(args, device, world, num_classes)
        fixed = random_batch(args, device, world, info.rank, num_classes, True, dtype)

        def next_batch():
            if loader is None:
                x, y, batch_labels = fixed
                return torch.cat(x), torch.cat(y), [len(t) for t in y], batch_labels
            b = next(state["batches"])
            return b.images, b.labels, b.sizes, b.batch_labels

        def iteration():
            images, labels, sizes, batch_labels = next_batch()
            plan = shuffle_plan(sizes, world, info.rank, 0, 0, state["it"], labels=batch_labels)
            train_step(net, memories, images, labels, sizes, opt, scaler, dtype, "il", plan)
            state["it"] += 1
    else:
        net, centers, opt = build_reference(args, device, world, num_classes)
        fixed = random_batch(args, device, world, info.rank, num_classes, False, None)

        def iteration():
            if loader is None:
                images, labels, _ = fixed
            else:
                images, labels = next(state["batches"])
            reference_step(net, centers, images, labels, opt)
            state["it"] += 1

    if loader is not None:
        state["batches"] = iter(loader.epoch(0))
    times = timed_windows(iteration, device_sync(device), args.warmup, args.window, args.repeats)
    per_iter = statistics.median(times)
    result = {"mode": mode, "impl": impl, "world": world, "s_per_iter": per_iter,
              "images_per_s": 3 * args.batch_size / per_iter, "windows_s_per_iter": times,
              "loader": getattr(loader, "name", None) if loader is not None else None}
    du.cleanup()
    return result


def loader_config(args, device: torch.device, rank: int = 0, world: int = 1, iters: int = 1):
    from pipeline.loader import LoaderConfig

    return LoaderConfig(height=args.height, width=args.width, num_ids=args.batch_size // 4, num_instances=4,
                        iters=iters, workers=args.workers, device=device, rank=rank, world=world)


def make_train_loader(args, impl: str, info, sources: list[str]):
    """The fast path reads shards through pipeline.loader (DALI when installed); the reference
    reads JPEG files from the raw folders with PIL, as the published code does, and yields
    per-source lists of images and labels."""
    from engine.optim import amp_dtype
    from pipeline.loader import build_train_loader

    total = args.warmup + args.window * args.repeats
    cfg = loader_config(args, info.device, info.rank, info.world, total)
    if impl == "fast":
        cfg.dtype = amp_dtype(args.amp, info.device) or torch.float32
        loader = build_train_loader(args.shards, sources, cfg)
        return loader, loader.num_classes
    from reference import FolderUnavailable, folder_loader
    if args.data_dir is None:
        raise SystemExit("--impl reference in train mode needs --data-dir (the raw JPEG folders)")
    try:
        loader, num_classes = folder_loader(args.data_dir, sources, cfg)
    except FolderUnavailable as err:
        raise SystemExit(f"--impl reference in train mode: {err}") from err
    return FolderBatches(loader, info.device, len(sources)), num_classes


class FolderBatches:
    """The published loader's batches moved to the device and split per source."""

    name = "folder"

    def __init__(self, loader, device: torch.device, num_sources: int) -> None:
        self.loader, self.device, self.num_sources = loader, device, num_sources

    def epoch(self, e: int):
        """The loader's batches (it samples one epoch of the configured length)."""
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            yield list(images.chunk(self.num_sources)), list(labels.chunk(self.num_sources))


def run_data(args) -> list[dict]:
    """The loaders alone, side by side, with the same worker count, in this process."""
    from pipeline.loader import select_loader
    from tools.bench_loaders import measure_loaders

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kinds = (["dali"] if select_loader("auto") == "dali" else []) + ["torch"]
    kinds += ["folder"] if args.data_dir is not None else []
    # Worker start-up and the prefetch queues need a few iterations before the rate settles.
    warmup, timed = max(args.warmup, 5), max(args.window * args.repeats, 20)
    cfg = loader_config(args, device, iters=warmup + timed)
    return measure_loaders(args.shards, args.data_dir, args.sources.split(","), kinds, cfg, warmup)


# ---------------------------------------------------------------- launching and reporting

def launch(args, argv: list[str], mode: str, impl: str, n: int) -> dict:
    """Run one measurement under `torchrun --nproc_per_node n` and read rank 0's JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(Path(__file__).resolve()), *argv, "--worker", "--mode", mode, "--impl", impl,
               "--result", str(result)]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))})
        if proc.returncode != 0:
            raise SystemExit(f"benchmark worker failed (mode {mode}, impl {impl}, {n} processes): "
                             f"exit {proc.returncode}")
        return json.loads(result.read_text())


def run_eval(args) -> dict:
    from engine.metrics import benchmark_eval

    q, g, d = (int(v) for v in args.eval_size.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = benchmark_eval(q, g, d, device)
    return {"mode": "eval", "impl": "fast", "world": 1, **res,
            "extract_images_per_s": extraction_rate(args, device)}


def extraction_rate(args, device: torch.device) -> float:
    """Images/s of the evaluation forward as train.py runs it (eval mode, channels_last,
    autocast, --test-batch-size) on tensors already on the device: the model-only bound."""
    from engine.optim import amp_dtype, autocast
    from model.resnet import build_model

    dtype = amp_dtype(args.amp, device)
    model = build_model(args.arch, "none").to(device, memory_format=torch.channels_last).eval()
    x = torch.randn(args.test_batch_size, 3, args.height, args.width, device=device)
    x = x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.no_grad(), autocast(device, dtype):
            model(x)
    times = timed_windows(forward, device_sync(device), args.warmup, args.window, args.repeats)
    return args.test_batch_size / statistics.median(times)


def report(results: list[dict], out: Path, info: dict, config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps({"machine": info, "config": config, "results": results},
                                                   indent=1))
    print(f"\nmachine: {info}\nconfiguration: {config}")
    print(f"{'mode':6} {'impl':16} {'procs':>5} {'images/s':>10} {'ms/iter':>9} {'vs ref':>7} {'eff.':>6}")
    for r in results:
        if r["mode"] == "eval":
            print(f"{'eval':6} {'fast':16} {1:5d} {'':>10} {1000 * r['seconds']:9.0f}   "
                  f"(metrics, {r['num_query']} x {r['num_gallery']} x {r['dim']}, {r['device']})")
            print(f"{'eval':6} {'extract':16} {1:5d} {r['extract_images_per_s']:10.1f} {'':>9}   "
                  f"(forward, test batch on the device)")
        elif r["mode"] == "data" and "skipped" in r:
            print(f"{'data':6} {r['loader']:16} skipped: {r['skipped']}")
        elif r["mode"] == "data":
            folder = next((x for x in results if x.get("loader") == "folder" and "images_per_s" in x), None)
            ratio = f"{r['images_per_s'] / folder['images_per_s']:6.2f}x" if folder else ""
            print(f"{'data':6} {r['loader']:16} {1:5d} {r['images_per_s']:10.1f} {'':>9} {ratio:>7}")
        else:
            ref = next((x for x in results if x["mode"] == r["mode"] and x["world"] == 1
                        and x["impl"] == "reference"), None)
            one = next((x for x in results if x["mode"] == r["mode"] and x["impl"] == r["impl"]
                        and x["world"] == 1), None)
            ratio = f"{r['images_per_s'] / ref['images_per_s']:6.2f}x" if ref and r is not ref else ""
            eff = f"{r['images_per_s'] / (one['images_per_s'] * r['world']):5.0%}" if one else ""
            name = r["impl"] + (f"/{r['loader']}" if r.get("loader") else "")
            print(f"{r['mode']:6} {name:16} {r['world']:5d} {r['images_per_s']:10.1f} "
                  f"{1000 * r['s_per_iter']:9.1f} {ratio:>7} {eff:>6}")
    projection(results)
    plot(results, out / "benchmark.png", info)
    print(f"\nwrote {out / 'benchmark.json'} and {out / 'benchmark.png'}")


def projection(results: list[dict]) -> None:
    """Wall time of the published schedule (70 epochs x 200 iterations) at the measured speed,
    and with an evaluation after every epoch when the eval mode ran: extraction of the eval
    size's query + gallery images at the measured forward rate, plus the measured metrics."""
    ev = next((r for r in results if r["mode"] == "eval"), None)
    for r in results:
        if r["mode"] == "train" and r["world"] == 1:
            train_s = 70 * 200 * r["s_per_iter"]
            print(f"projected 14,000 iterations ({r['impl']}, 1 process): {train_s / 3600:.2f} h "
                  f"({train_s / 60:.1f} min) of training")
            if ev is not None:
                images = ev["num_query"] + ev["num_gallery"]
                eval_s = images / ev["extract_images_per_s"] + ev["seconds"]
                print(f"  + 70 evaluations of {images:,} images ({eval_s:.1f} s each, model-only "
                      f"extraction): {(train_s + 70 * eval_s) / 60:.1f} min for the full run")


def plot(results: list[dict], path: Path, info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for r in results:
        if r["mode"] in ("step", "train"):
            series.setdefault((r["mode"], r["impl"]), []).append((r["world"], r["images_per_s"]))
    if not series:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for (mode, impl), pts in sorted(series.items()):
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        line, = ax.plot(xs, ys, marker="o", label=f"{mode} {impl}")
        base = dict(pts).get(1)
        if base:
            ax.plot(xs, [base * x for x in xs], ls="--", color=line.get_color(), alpha=0.4)
            ax2.plot(xs, [y / (base * x) for x, y in zip(xs, ys)], marker="o", color=line.get_color(),
                     label=f"{mode} {impl}")
    counts = sorted({x for pts in series.values() for x, _ in pts})
    for a in (ax, ax2):
        a.set_xticks(counts)
    ax.set_xlabel("processes (GPUs)")
    ax.set_ylabel("images/s (dashed: ideal)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax2.set_xlabel("processes (GPUs)")
    ax2.set_ylabel("scaling efficiency")
    ax2.axhline(0.9, color="grey", ls=":")
    ax2.set_ylim(0, 1.1)
    ax2.grid(alpha=0.3)
    fig.suptitle(info.get("gpu", f"CPU, {info['cores']} cores"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_parser().parse_args(argv)
    counts = [int(g) for g in args.gpus.split(",")]
    if any(args.batch_size % (INSTANCES * n) for n in counts):
        raise SystemExit(f"-b/--batch-size {args.batch_size}: must be a multiple of {INSTANCES} images "
                         f"per identity times each process count in --gpus ({args.gpus})")
    if args.worker:
        if args.mode not in ("step", "train") or args.impl == "both" or args.result is None:
            raise SystemExit("--worker measures one --mode step|train with one --impl fast|reference "
                             "and needs --result FILE")
        result = worker_step_or_train(args, args.impl, args.mode)
        if int(os.environ.get("RANK", "0")) == 0:
            args.result.write_text(json.dumps(result))
        return 0
    check_process_counts(counts, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    forwarded = [a for a in _strip(argv, ("--mode", "--impl", "--gpus", "--out"))]
    impls = ("fast", "reference") if args.impl == "both" else (args.impl,)
    modes = MODES if args.mode == "all" else (args.mode,)
    results = []
    for mode in modes:
        if mode == "eval":
            results.append(run_eval(args))
            continue
        if mode == "data":
            results.extend(run_data(args))
            continue
        for n in counts:
            for impl in impls:
                if impl == "reference" and n > 1:
                    continue  # the published code runs one process (nn.DataParallel)
                results.append(launch(args, forwarded, mode, impl, n))
    keys = ("arch", "batch_size", "height", "width", "amp", "workers", "warmup", "window", "repeats",
            "sources", "compile", "test_batch_size")
    config = {k: getattr(args, k) for k in keys}
    report(results, args.out, machine(), config)
    return 0


def check_process_counts(counts: list[int], gpus: int) -> None:
    """Refuse a --gpus count above the ``gpus`` visible GPUs: torchrun would start ranks with no
    GPU of their own, which fail far from the cause. On a CPU-only machine (``gpus`` 0) any count
    runs, as gloo processes sharing the cores."""
    if gpus and max(counts) > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise SystemExit(f"--gpus {','.join(map(str, counts))}: asks for {max(counts)} processes on one "
                         f"machine, which shows {gpus} GPU(s)"
                         + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                         + f"; give counts up to {gpus}, or run --worker under torchrun on several machines")


def _strip(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the given flags (and their values): the parent decides those per launch."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
