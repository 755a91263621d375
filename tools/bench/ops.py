"""The ``ops`` command's measurements: each model part timed alone (UBS, the memory update, the
statistics groups' BatchNorm per implementation and ResNet shape) and the ATen operations one IL
iteration dispatches."""
from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tools.bench.timing import device_sync, measure

# ids of the MSMT17, Duke, CUHK03, Market, CUHK-SYSU train sets: realistic memory sizes, the first
# as many as the run has sources
STEP_CLASSES = [1041, 702, 767, 751, 5532]


def bn_shapes(arch: str, size: list[int]) -> collections.Counter:
    """[C, H, W] (or [C] for the neck) of every BatchNorm input of ``arch`` at input ``size``, with
    the number of layers of each shape."""
    from model.resnet import build_model

    shapes: collections.Counter = collections.Counter()
    model = build_model(arch, "none", bn_groups=1).eval()
    hooks = [m.register_forward_pre_hook(lambda m, x: shapes.update([tuple(x[0].shape[1:])]))
             for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        model(torch.zeros(1, 3, *size))
    for h in hooks:
        h.remove()
    return shapes


def time_batch_norms(device: torch.device, args) -> list[dict]:
    """Milliseconds per forward and backward of one grouped BatchNorm layer (the first forward's
    layout: 3 sources of ``--bn-rows``/3 rows, channels_last, in the training dtype under autocast:
    bf16 on a GPU, fp32 on a CPU), per layer shape of the network, ``--bn-groups`` value and
    implementation; the ``all layers`` row weighs each shape by its number of layers.
    ``speedup``: against the first implementation."""
    from engine.precision import amp_dtype, autocast
    from model.groups import batch_norm_groups, make_layout
    from model.resnet import GroupBatchNorm1d, GroupBatchNorm2d

    dtype = amp_dtype("auto", device)
    sync, rows = device_sync(device), []
    for groups in args.bn_groups:
        layout = make_layout([args.bn_rows // 3] * 3, groups)
        totals: collections.Counter = collections.Counter()
        for shape, layers in bn_shapes(args.arch, args.bn_size).items():
            kind = GroupBatchNorm2d if len(shape) == 3 else GroupBatchNorm1d
            bn = kind(shape[0]).to(device)
            x = torch.randn(3 * (args.bn_rows // 3), *shape, device=device, dtype=dtype or torch.float32)
            x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
            x.requires_grad_()
            dy = torch.randn_like(x)

            def step(impl: str) -> None:
                with autocast(device, dtype):
                    y = batch_norm_groups(x, bn, layout, impl)
                y.backward(dy)
            for impl in args.bn_impl:
                ms = 1e3 * measure(lambda: step(impl), sync, args)["s_per_iter"]
                totals[impl] += layers * ms
                rows.append({"mode": "ops", "op": f"batchnorm g{groups} x{layers}", "shape": [len(x), *shape],
                             "dtype": str(x.dtype).split(".")[-1], "device": device.type, "impl": impl,
                             "ms": ms})
        rows += [{"mode": "ops", "op": f"batchnorm g{groups} all", "shape": [args.arch, *args.bn_size],
                  "dtype": str(dtype or torch.float32).split(".")[-1], "device": device.type, "impl": impl,
                  "ms": ms} for impl, ms in totals.items()]
    for r in rows:
        base = next(b for b in rows if b["op"] == r["op"] and b["shape"] == r["shape"])
        r["speedup"] = base["ms"] / r["ms"]
    return rows


def time_parts(device: torch.device, args) -> list[dict]:
    """Milliseconds per call of the fused UBS against ``reference.LiteralUBS`` (fp32, and bf16 on
    a GPU) and of the memory update against the per-sample loop; with the default --window 1
    each call is synchronised, so a figure is the cost of a call, not the stall a read-back causes
    inside a queued iteration. ``speedup``: against the literal version of the same row."""
    import torch.nn.functional as F

    from model.memory import MemoryClassifier, update_rounds
    from model.style import UBS
    from reference import LiteralUBS, loop_update

    sync, rows = device_sync(device), []
    g = torch.Generator(device=device).manual_seed(0)

    def row(op, shape, dtype, impl, fn) -> dict:
        ms = 1e3 * measure(fn, sync, args)["s_per_iter"]
        return {"mode": "ops", "op": op, "shape": shape, "dtype": dtype, "device": device.type, "impl": impl,
                "ms": ms}
    for dtype in [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else []):
        x = torch.randn(args.style_shape, device=device, generator=g).to(dtype)
        x = x.to(memory_format=torch.channels_last)
        for impl, mod in (("literal", LiteralUBS()), ("fused", UBS())):
            with torch.no_grad():
                rows.append(row("ubs", list(args.style_shape), str(dtype).split(".")[-1], impl,
                                lambda: mod.train()(x)))

    feats = F.normalize(torch.randn(args.batch, args.features, device=device, generator=g), dim=1)
    ids = torch.randperm(args.classes, device=device, generator=g)[:args.batch // 4]
    labels = ids.repeat_interleave(4)[torch.randperm(len(ids) * 4, device=device, generator=g)]
    mem = MemoryClassifier(args.features, args.classes).to(device)
    centers = torch.randn(args.classes, args.features, device=device, generator=g)
    mem.centers.copy_(F.normalize(centers, dim=1))
    order, rounds = update_rounds(labels.cpu().numpy())  # training plans them on the host
    order = torch.from_numpy(order).to(device)
    planned = feats.index_select(0, order), labels.index_select(0, order)  # rows round after round
    shape = [args.batch, args.features, args.classes]
    for impl, fn in (("loop", lambda: loop_update(mem.centers, feats, labels, mem.momentum)),
                     ("read-back", lambda: mem.update(feats, labels)),
                     ("rounds", lambda: mem.update(*planned, round_sizes=rounds))):
        rows.append(row("memory_update", shape, "float32", impl, fn))
    base = {(r["op"], r["dtype"]): r["ms"] for r in rows if r["impl"] in ("literal", "loop")}
    for r in rows:
        r["speedup"] = base[(r["op"], r["dtype"])] / r["ms"]
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


def count_step_ops(cfg, batch: int = 64, size: tuple[int, int] = (32, 16)) -> dict[str, int]:
    """ATen operations (views excluded) of one IL iteration of ``engine.step.train_step`` on
    train.py's network for ``cfg`` (CPU, fp32, fused Adam, the sampler's labels known), after one
    warm-up iteration, split into phases by hooks on the model and the optimizer. Counts do not
    depend on the image size, so a small one is used."""
    from engine.distributed import DistInfo
    from engine.network import build_network
    from engine.optim import build_scaler
    from engine.step import shuffle_plan, train_step
    from model.memory import MemoryClassifier

    torch.manual_seed(0)
    model = build_network(cfg, DistInfo(0, 1, 0, torch.device("cpu"))).train()
    classes = STEP_CLASSES[:len(cfg.sources)]
    memories = [MemoryClassifier(model.num_features, n) for n in classes]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scaler = build_scaler(torch.device("cpu"), None)
    sizes = [batch] * len(classes)
    labels = [torch.randperm(n)[:batch // 4].repeat_interleave(4) for n in classes]
    images = torch.randn(len(classes) * batch, 3, *size).contiguous(memory_format=torch.channels_last)
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
        plan = shuffle_plan(sizes, 1, 0, seed=0, epoch=0, it=it, labels=[y.numpy() for y in labels])
        forwards.clear()
        counter.counts.clear()
        with counter:
            train_step(model, memories, images, torch.cat(labels), sizes, opt, scaler, None, "il", plan)
    for h in hooks:
        h.remove()
    counts = {k: v for k, v in counter.counts.items() if k != "set-up"}
    counts["total"] = sum(counts.values())
    return counts
