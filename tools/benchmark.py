"""Throughput of the IL training system against the published way of running, one subcommand
per part:

  loaders  the training loaders alone, side by side: DALI, the torch fallback, and the published
           folder-of-JPEGs PIL loader (``reference.folder_loader``), with the same workers
  step     training iterations on tensors already on the device: the model-only bound
  train    training iterations as train.py runs them: shards -> loader -> iteration
  eval     evaluation: the extraction forward (eval mode, on device tensors) and the ranking and
           metrics at MSMT17 size (11,659 queries x 82,161 gallery, 2048-d)
  ops      the model parts that replace slow published code, against their literal versions (the
           fused UBS style module; the vectorised memory update against the per-sample loop, its
           round sizes read back from the device or given by the sampler) and each statistics-group
           implementation (``--bn-impl``) per BatchNorm layer shape of the network; ``--count``
           counts instead the ATen operations one training iteration dispatches, per phase, per
           ``--bn-groups`` value and implementation (on a GPU the step is bound by the host's
           dispatching)
  all      loaders, step, train and eval in one invocation, one table

    python tools/benchmark.py step --impl both --gpus 1,2
    python tools/benchmark.py all --impl both --gpus 1,2,4,8 --shards shards --data-dir DATA
    python tools/benchmark.py SUBCOMMAND --help

Every figure is the median over ``--repeats`` timed windows of ``--window`` iterations (an
iteration: a training step, a loader batch, an extraction forward, one call of a model part),
after ``--warmup`` untimed ones, with host and device synchronised at the end of each window.
Every subcommand writes OUT/benchmark.json (machine, configuration, rows) and OUT/benchmark.md (the
rows as the markdown tables of docs/benchmarks.md under the command, which it also prints:
tools/bench/report.py); train adds the full-run projection, step and train OUT/benchmark.png
(images/s and scaling efficiency against the ideal line).

The flags that mean what train.py's mean (-a, -b, --height, --width, --num-instances, --bn-groups,
--bn-impl, --amp, --compile, --apex, --device, -j, --loader, --shards, --test-batch-size) are train.py's own
(engine/flags.py). The fast implementation is train.py's: its network built, placed and wrapped
(DDP, torch.compile) by engine/network.py, its iteration ``engine.loop.one_iteration``, its loader
configuration ``engine.preflight.loader_config``.

``--impl fast`` is this project (channels_last, autocast, fused Adam, statistics groups, fused
style, vectorised memory update, DALI); ``--impl reference`` runs the published procedure's way
(fp32, NCHW, a forward per source, unfused style, per-sample memory loop, PIL folder loader);
``--impl both`` measures the two side by side in one run, so every speed claim is a ratio.

``--gpus 1,2,4,8`` measures each process count: one process in this one, more under ``torchrun
--nproc_per_node N`` on this machine (gloo processes on a CPU-only machine). For several machines,
run the worker under your own torchrun on every node: ``torchrun --nnodes 2 --nproc_per_node 8 ...
tools/benchmark.py train --worker --impl fast --result out.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from engine.config import ExecConfig, RunConfig
from engine.device import DeviceError, resolve_device
from engine.errors import UsageError
from engine.flags import HelpFormatter, add_train_flags, at_least, source_names
from model.groups import BN_IMPLS
from tools.bench import report
from tools.bench.ops import STEP_CLASSES, count_step_ops, time_batch_norms, time_parts
from tools.bench.timing import device_sync, machine, measure

COMMANDS = {
    "loaders": "the training loaders alone, side by side (DALI, torch, the published folder loader)",
    "step": "training iterations on tensors already on the device: the model-only bound",
    "train": "training iterations as train.py runs them: shards -> loader -> iteration",
    "eval": "evaluation: the extraction forward and the metrics at MSMT17 size",
    "ops": "model parts against their literal versions; --count: ATen operations of one iteration",
    "all": "loaders, step, train and eval in one invocation",
}
ALL = ("loaders", "step", "train", "eval")
CUHK03_SOURCES = ["dukemtmc", "cuhk03", "msmt17v1"]  # the Market-1501 target's sources
LAUNCHER_FLAGS = ("impl", "gpus", "out", "worker", "result")  # decided per launch, not forwarded


# ---------------------------------------------------------------- flags

def process_counts(text: str) -> list[int]:
    """argparse type of --gpus: comma-separated process counts, each at least 1."""
    return [at_least(1)(n) for n in text.split(",")]


def source_list(text: str) -> str:
    """argparse type of --sources: 1 to 5 distinct comma-separated datasets, as train.py's
    --sources (kept as the text: a torchrun worker parses it again)."""
    source_names(text)
    return text


def loader_kinds(text: str) -> str:
    """argparse type of --loaders: comma-separated kinds of dali, torch, folder."""
    unknown = set(text.split(",")) - {"dali", "torch", "folder"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown loader(s) {', '.join(sorted(unknown))}: "
                                         "expected dali, torch, folder")
    return text


def eval_size(text: str) -> tuple[int, int, int]:
    """argparse type of --eval-size: queries,gallery,dim."""
    values = [at_least(1)(n) for n in text.split(",")]
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected queries,gallery,dim, got {text!r}")
    return values[0], values[1], values[2]


def command_parser(name: str) -> argparse.ArgumentParser:
    """The flags of one subcommand (``all``: those of loaders, step, train and eval), without
    --help: :func:`get_parser` adds it, and :func:`argv_for` reads the flags from here."""
    every = name == "all"
    p = argparse.ArgumentParser(add_help=False)
    warmup, window, repeats = {"loaders": (5, 10, 3), "ops": (2, 1, 5)}.get(name, (5, 10, 5))
    t = p.add_argument_group("timing (every figure is the median window)")
    t.add_argument("--warmup", type=at_least(0), default=warmup,
                   help="untimed iterations first (worker start-up, prefetch queues, autotuning, caches)")
    t.add_argument("--window", type=at_least(1), default=window, help="iterations per timed window")
    t.add_argument("--repeats", type=at_least(1), default=repeats,
                   help="timed windows; the median is reported")
    o = p.add_argument_group("device and output")
    add_train_flags(o, "device")
    o.add_argument("--out", type=Path, default=Path("logs/benchmark"),
                   help="folder for benchmark.json, benchmark.md (and benchmark.png for step and train)")
    if name in ("step", "train") or every:
        r = p.add_argument_group("implementations and processes")
        r.add_argument("--impl", choices=("fast", "reference", "both"), default="both",
                       help="this project, the published way of running, or both side by side")
        r.add_argument("--gpus", type=process_counts, default="1",
                       help="comma-separated process counts: 1 runs in this process, N under torchrun "
                            "--nproc_per_node N (the reference runs one process only, as published)")
        r.add_argument("--worker", action="store_true",
                       help="measure in this process group (under torchrun, e.g. across nodes) instead of "
                            "launching one; needs one --impl and --result")
        r.add_argument("--result", type=Path, default=None, help="JSON file a --worker run's rank 0 writes")
        add_train_flags(p.add_argument_group("network (train.py's flags)"), "arch", "bn_groups", "bn_impl",
                        "amp", "compile", "apex")
    if name == "eval":
        add_train_flags(p.add_argument_group("network (train.py's flags)"), "arch", "amp")
    if name != "ops":
        size = p.add_argument_group("images (train.py's flags)")
        add_train_flags(size, "height", "width")
        if name != "eval":
            add_train_flags(size, "batch_size", "num_instances")
    if name in ("loaders", "train") or every:
        add_data_flags(p.add_argument_group("data"), name)
    if name == "eval" or every:
        e = p.add_argument_group("evaluation")
        add_train_flags(e, "test_batch_size", "aqe")
        e.add_argument("--eval-size", type=eval_size, default=(11659, 82161, 2048),
                       help="queries,gallery,dim of the metrics (default: MSMT17's test set)")
    if name == "ops":
        add_ops_flags(p.add_argument_group("model parts"))
    return p


def add_data_flags(d, name: str) -> None:
    """The data flags of the loaders and train subcommands (``all``: both)."""
    add_train_flags(d, "shards")
    d.add_argument("--data-dir", type=Path, default=None,
                   help="raw datasets (DATA/<name>/...), which the published folder loader reads")
    d.add_argument("--sources", type=source_list, default="market1501,dukemtmc,msmt17v1",
                   help="source datasets, as train.py's --sources (JPEG-folder datasets, so the folder "
                        "loader can read them)")
    add_train_flags(d, "workers")
    if name in ("train", "all"):
        add_train_flags(d, "loader")
    if name in ("loaders", "all"):
        d.add_argument("--loaders", type=loader_kinds, default="dali,torch,folder",
                       help="loaders to measure, of dali,torch,folder; one that cannot run here (no "
                            "DALI, no --data-dir) is a row saying why")
        d.add_argument("--cuhk03", action="store_true",
                       help=f"measure again on {','.join(CUHK03_SOURCES)}, whose CUHK03 images are PNG "
                            "(decoded on DALI's CPU threads even on a GPU)")
    if name == "loaders":
        add_train_flags(d, "amp")


def add_ops_flags(m) -> None:
    """The flags of the ops subcommand."""
    add_train_flags(m, "arch")
    m.add_argument("--count", action="store_true",
                   help="count the ATen operations of one IL iteration per phase (CPU, fp32) instead of "
                        "timing the model parts")
    m.add_argument("--bn-groups", type=at_least(1), nargs="+", default=[1, 4],
                   help="the train.py --bn-groups settings to count or time, side by side")
    m.add_argument("--bn-impl", choices=BN_IMPLS, nargs="+", default=list(BN_IMPLS),
                   help="the statistics-group implementations (train.py --bn-impl) to count or time")
    m.add_argument("--bn-rows", type=at_least(3), default=192,
                   help="BatchNorm timings: rows of the first forward (3 sources; 3 x 64 published)")
    m.add_argument("--bn-size", type=at_least(32), nargs=2, default=[256, 128], metavar=("H", "W"),
                   help="BatchNorm timings: the input size that gives the layers' shapes")
    m.add_argument("--style-shape", type=at_least(1), nargs=4, default=[192, 256, 64, 32],
                   metavar=("B", "C", "H", "W"),
                   help="UBS input shape (layer1 output of a 3 x 64 batch at 256x128)")
    m.add_argument("--batch", type=at_least(4), default=192, help="memory update rows (4 per identity)")
    m.add_argument("--features", type=at_least(1), default=2048, help="feature width")
    m.add_argument("--classes", type=at_least(1), default=4101, help="memory classes (MSMT17 mix: 4101)")
    m.add_argument("--threads", type=at_least(0), default=0,
                   help="torch CPU threads (0: torch's default)")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, parents=[command_parser(name)], help=text, description=text,
                       formatter_class=HelpFormatter)
    return p


def argv_for(command: str, args) -> list[str]:
    """The command line of ``command`` that gives it the values ``args`` holds for its flags (the
    launcher's own excepted): a torchrun worker parses its settings from it, whichever subcommand
    launched it."""
    out = [command]
    for action in command_parser(command)._actions:
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest in LAUNCHER_FLAGS or value == action.default:
            continue
        out += [action.option_strings[-1]] if action.nargs == 0 else [action.option_strings[-1], str(value)]
    return out


def run_config(args, **fixed) -> RunConfig:
    """The configuration train.py would record for this benchmark (IL): train.py's defaults, then
    the values of the flags the benchmark shares with it (the sources from --sources), then
    ``fixed``. From it the network, memories and loaders are built by train.py's own functions."""
    shared = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
              if f.name != "sources" and hasattr(args, f.name)}
    if getattr(args, "sources", None):
        shared["sources"] = args.sources.split(",")
    return RunConfig(**{"update_style": True, **shared, **fixed})


def exec_config(args) -> ExecConfig:
    """How train.py would execute with the flags the benchmark shares with it (loader, workers,
    precision, shards...), train.py's defaults for the others."""
    return ExecConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExecConfig)
                         if hasattr(args, f.name)})


# ---------------------------------------------------------------- loaders

def source_formats(shards: Path, sources: list[str]) -> dict[str, dict[str, int]]:
    """Per source, how many of its images each format holds (from the shards' indexes)."""
    from pipeline.shards import IMAGE_EXTS, read_index

    out = {}
    for name in sources:
        exts = [ext for idx in sorted((Path(shards) / name).glob("*.idx")) for _, comps in read_index(idx)
                for ext in comps if ext in IMAGE_EXTS.values()]
        out[name] = {ext: exts.count(ext) for ext in sorted(set(exts))}
    return out


def measure_loaders(args) -> list[dict]:
    """Images/s of each --loaders kind with train.py's loader configuration and the same workers,
    on the --sources (and, with --cuhk03, on the Market-1501 target's sources, with CUHK03's PNG)."""
    from engine import distributed as du

    info = du.init_distributed(args.device)
    rows = []
    for sources in [args.sources.split(",")] + [CUHK03_SOURCES] * args.cuhk03:
        formats = source_formats(args.shards, sources)
        for kind in args.loaders.split(","):
            row = {"mode": "loaders", "loader": kind, "sources": sources, "formats": formats}
            rows.append({**row, **measure_loader(args, kind, sources, info)})
    return rows


def measure_loader(args, kind: str, sources: list[str], info) -> dict:
    """One loader's figures, or ``skipped`` with the reason it cannot run here."""
    from engine.preflight import loader_config
    from pipeline.loader import build_train_loader
    from reference import FolderUnavailable, folder_loader

    iters = args.warmup + args.window * args.repeats
    lcfg = loader_config(run_config(args, iters=iters), exec_config(args), info)
    lcfg = dataclasses.replace(lcfg, loader="torch" if kind == "folder" else kind)
    try:
        if kind == "folder":
            if args.data_dir is None:
                return {"skipped": "needs --data-dir (the raw JPEG folders)"}
            batches = iter(folder_loader(args.data_dir, sources, lcfg)[0])
        else:
            batches = build_train_loader(args.shards, sources, lcfg).epoch(0)
    except (FolderUnavailable, ImportError, ValueError) as err:
        return {"skipped": str(err)}
    timing = measure(lambda: next(batches), device_sync(info.device), args)
    images = lcfg.batch_size * len(sources)
    return {**timing, "images_per_s": images / timing["s_per_iter"], "workers": lcfg.workers, "batch": images}


# ---------------------------------------------------------------- step and train

def measure_iterations(args, impl: str, mode: str) -> dict:
    """Training iterations of one implementation in this process group (a world of one outside
    torchrun); every rank returns rank 0's row shape, rank 0's figures count."""
    from engine import distributed as du
    from model.groups import resolve_bn_impl

    info = du.init_distributed(args.device)
    iters = args.warmup + args.window * args.repeats
    cfg = run_config(args, iters=iters)
    batches, num_classes, loader = None, STEP_CLASSES[:len(cfg.sources)], None
    if mode == "train":
        batches, num_classes, loader = train_batches(args, cfg, impl, info)
    make = fast_iteration if impl == "fast" else reference_iteration
    timing = measure(make(args, cfg, info, num_classes, batches), device_sync(info.device), args)
    du.cleanup()
    return {"mode": mode, "impl": impl, "world": info.world, **timing, "loader": loader,
            "bn_impl": resolve_bn_impl(cfg.bn_impl, info.device) if impl == "fast" else None,
            "images_per_s": len(cfg.sources) * cfg.batch_size / timing["s_per_iter"]}


def fast_iteration(args, cfg, info, num_classes: list[int], batches) -> Callable[[], object]:
    """train.py's iteration (``engine.loop.one_iteration``) on train.py's network, memories (random
    unit centres) and optimizer; ``batches`` None: one random batch on the device, again and again."""
    from engine.loop import Trainer, one_iteration
    from engine.network import build_network, wrap_network
    from engine.optim import build_optimizer, build_scaler
    from engine.precision import amp_dtype
    from model.memory import MemoryClassifier
    from pipeline.loader import TrainBatch

    dtype = amp_dtype(args.amp, info.device)
    model = build_network(cfg, info)
    memories = [MemoryClassifier(model.num_features, n, temp=cfg.temp, momentum=cfg.momentum).to(info.device)
                for n in num_classes]
    for m in memories:
        m.centers.copy_(torch.nn.functional.normalize(torch.randn_like(m.centers), dim=1))
    optimizer = build_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, info.device, args.apex)
    trainer = Trainer(wrap_network(model, info, args.compile), memories, optimizer,
                      build_scaler(info.device, dtype), dtype, cfg, info)
    if batches is None:
        x, y, batch_labels = random_batch(cfg, info, num_classes, True, dtype)
        batches = itertools.repeat(TrainBatch(torch.cat(x), torch.cat(y), [len(t) for t in y],
                                              batch_labels=batch_labels))
    count = itertools.count()
    return lambda: one_iteration(trainer, next(batches), 0, next(count))


def reference_iteration(args, cfg, info, num_classes: list[int], batches) -> Callable[[], object]:
    """The published iteration (``reference.reference_step``): one forward per source, each
    normalised as one batch (the published replicas ran on separate GPUs at once; one GPU running
    them one after another would only be slower), fp32, NCHW, torch's Adam."""
    from engine.network import wrap_network
    from model.resnet import build_model
    from reference import LiteralUBS, reference_step

    model = build_model(cfg.arch, "none", style=LiteralUBS(), bn_groups=1).to(info.device)
    net = wrap_network(model, info)
    centers = [torch.nn.functional.normalize(torch.randn(n, model.num_features, device=info.device), dim=1)
               for n in num_classes]
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if batches is None:
        batches = itertools.repeat(random_batch(cfg, info, num_classes, False, None)[:2])
    return lambda: reference_step(net, centers, *next(batches), optimizer)


def random_batch(cfg, info, num_classes: list[int], channels_last: bool, dtype):
    """Random images and sampler-like labels (identities x --num-instances each, the same global
    batch on every rank, each rank taking its slice), per source, and each source's global batch
    labels (what the sampler hands the training step)."""
    per_rank, k = cfg.batch_size // info.world, cfg.num_instances
    g = torch.Generator().manual_seed(0)
    images, labels, batch_labels = [], [], []
    for n in num_classes:
        x = torch.randn(per_rank, 3, cfg.height, cfg.width, device=info.device, dtype=dtype or torch.float32)
        images.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        ids = torch.randperm(n, generator=g)[:cfg.batch_size // k].repeat_interleave(k)
        labels.append(ids[info.rank * per_rank:(info.rank + 1) * per_rank].to(info.device))
        batch_labels.append(ids.numpy())
    return images, labels, batch_labels


def train_batches(args, cfg, impl: str, info):
    """The fast path reads shards through train.py's loader (DALI when installed, or --loader);
    the reference reads JPEG files from the raw folders with PIL, as the published code does, and
    yields per-source lists of images and labels on the device. Returns (batches, classes per
    source, loader name)."""
    from engine.preflight import loader_config
    from pipeline.loader import build_train_loader
    from reference import FolderUnavailable, folder_loader

    lcfg = loader_config(cfg, exec_config(args), info)
    if impl == "fast":
        loader = build_train_loader(args.shards, cfg.sources, lcfg)
        return loader.epoch(0), loader.num_classes, getattr(loader, "name", None)
    if args.data_dir is None:
        raise UsageError("--impl reference in train needs --data-dir (the raw JPEG folders)")
    try:
        loader, num_classes = folder_loader(args.data_dir, cfg.sources,
                                            dataclasses.replace(lcfg, loader="torch"))
    except FolderUnavailable as err:
        raise UsageError(f"--impl reference in train: {err}") from err

    def per_source():
        for images, labels in loader:
            images = images.to(info.device, non_blocking=True)
            labels = labels.to(info.device, non_blocking=True)
            yield list(images.chunk(len(cfg.sources))), list(labels.chunk(len(cfg.sources)))
    return per_source(), num_classes, "folder"


def launch(args, mode: str, impl: str, n: int) -> dict:
    """One measurement: in this process for one process, else under `torchrun --nproc_per_node n`,
    whose rank 0 writes its row to a JSON file read here. Each process computes with the CPU
    threads OMP_NUM_THREADS gives, by default its share of the cores, whoever called (a caller's
    own torch.set_num_threads would otherwise time one process differently from N)."""
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    if n == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return measure_iterations(args, impl, mode)
        finally:
            torch.set_num_threads(previous)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(Path(__file__).resolve()), *argv_for(mode, args), "--worker", "--impl", impl,
               "--result", str(result)]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": threads})
        if proc.returncode != 0:
            raise SystemExit(f"benchmark worker failed ({mode}, impl {impl}, {n} processes): "
                             f"exit {proc.returncode}")
        return json.loads(result.read_text())


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


# ---------------------------------------------------------------- eval

def time_metrics(num_query: int = 11659, num_gallery: int = 82161, dim: int = 2048,
                 device: str | torch.device = "cpu", *, num_ids: int = 3060, num_cams: int = 15,
                 chunk: int | None = None, seed: int = 0, aqe: int = 0) -> dict:
    """Time ``engine.evaluation.metrics.evaluate_features`` on random L2-normalised features (MSMT17 test size
    by default), with ``aqe`` query expansion when > 0."""
    from engine.evaluation.metrics import default_chunk, evaluate_features

    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    qf = torch.nn.functional.normalize(torch.randn(num_query, dim, generator=gen), dim=1).to(device)
    gf = torch.nn.functional.normalize(torch.randn(num_gallery, dim, generator=gen), dim=1).to(device)
    q_pids = torch.randint(num_ids, (num_query,), generator=gen)
    g_pids = torch.randint(num_ids, (num_gallery,), generator=gen)
    q_cams = torch.randint(num_cams, (num_query,), generator=gen)
    g_cams = torch.randint(num_cams, (num_gallery,), generator=gen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    res = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, chunk=chunk, aqe=aqe)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "num_query": num_query, "num_gallery": num_gallery, "dim": dim,
            "device": str(device), "threads": torch.get_num_threads(),
            "chunk": chunk or default_chunk(num_gallery, device), "aqe": aqe, "mAP": res["mAP"],
            "rank1": res["rank1"]}


def measure_eval(args) -> list[dict]:
    """The metrics at --eval-size (one run of :func:`time_metrics`: at MSMT17 size it
    takes half a minute on a CPU) and the extraction forward as train.py evaluates (train.py's
    network in eval mode, autocast, --test-batch-size) on tensors already on the device."""
    from engine import distributed as du
    from engine.network import build_network
    from engine.precision import amp_dtype, autocast

    info = du.init_distributed(args.device)
    res = time_metrics(*args.eval_size, info.device)
    if args.aqe:
        with_aqe = time_metrics(*args.eval_size, info.device, aqe=args.aqe)
        res.update(aqe_k=args.aqe, aqe_seconds=with_aqe["seconds"])
    dtype = amp_dtype(args.amp, info.device)
    model = build_network(run_config(args), info).eval()
    x = torch.randn(args.test_batch_size, 3, args.height, args.width, device=info.device)
    x = x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.no_grad(), autocast(info.device, dtype):
            model(x)
    timing = measure(forward, device_sync(info.device), args)
    return [{"mode": "eval", "impl": "fast", "world": 1, **res, **timing,
             "extract_images_per_s": args.test_batch_size / timing["s_per_iter"]}]


# ---------------------------------------------------------------- ops

def measure_ops(args) -> list[dict]:
    """--count: the ATen operations per --bn-groups value and implementation; else the model
    parts' timings."""
    if args.count:
        return [{"mode": "ops", "op": "aten-count", "arch": args.arch, "step": "il", "bn_groups": g,
                 "bn_impl": impl, "counts": count_step_ops(run_config(args, bn_groups=g, bn_impl=impl))}
                for g in args.bn_groups for impl in args.bn_impl]
    from engine import distributed as du

    device = du.init_distributed(args.device).device
    return time_parts(device, args) + time_batch_norms(device, args)


# ---------------------------------------------------------------- main

def run(command: str, args) -> list[dict]:
    """The rows of one subcommand (``all``: each of ALL in turn)."""
    if command == "all":
        return [row for c in ALL for row in run(c, args)]
    if command == "loaders":
        return measure_loaders(args)
    if command == "eval":
        return measure_eval(args)
    if command == "ops":
        return measure_ops(args)
    impls = ("fast", "reference") if args.impl == "both" else (args.impl,)
    # the published code runs one process (nn.DataParallel): no reference beyond one
    return [launch(args, command, impl, n) for n in args.gpus for impl in impls if impl == "fast" or n == 1]


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    counts = getattr(args, "gpus", [1])
    if hasattr(args, "batch_size") and any(args.batch_size % (args.num_instances * n) for n in counts):
        raise SystemExit(f"-b/--batch-size {args.batch_size}: must be a multiple of --num-instances "
                         f"{args.num_instances} times each process count in --gpus ({counts})")
    try:
        if hasattr(args, "device"):
            resolve_device(args.device)  # refused before any work (engine/device.py)
        if getattr(args, "worker", False):
            if args.command not in ("step", "train") or args.impl == "both" or args.result is None:
                raise SystemExit("--worker measures step or train with one --impl fast|reference and needs "
                                 "--result FILE")
            row = measure_iterations(args, args.impl, args.command)
            if int(os.environ.get("RANK", "0")) == 0:
                args.result.write_text(json.dumps(row))
            return 0
        if hasattr(args, "gpus"):
            check_process_counts(counts, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        rows = run(args.command, args)
        config = {k: v for k, v in vars(args).items() if k not in ("worker", "result")}
        command = shlex.join(["python", "tools/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
        print(report.write(args.out, command, machine(), config, rows))
    except (UsageError, DeviceError) as e:
        print(f"benchmark.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
