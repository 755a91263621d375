"""The checks before any work: flags, weights, shards, the target's loader, a resumed
checkpoint's configuration. Each refusal is a :class:`engine.errors.UsageError` naming the flag
and what would work; with several ranks the callers agree on it (:func:`engine.errors.checked`)."""
from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

from engine import distributed as du
from engine.checkpoint import (RESUME_KEYS, CheckpointError, config_differences, read_checkpoint,
                               read_torch_file)
from engine.config import SOURCE_FLAGS, WORKERS, ExecConfig, RunConfig
from engine.device import DeviceError, resolve_device
from engine.errors import UsageError, checked
from engine.precision import amp_dtype
from model.groups import make_layout
from model.resnet import imagenet_weights_file, input_problem
from pipeline.build import build_shards
from pipeline.files import long_name
from pipeline.loader import LoaderConfig, build_eval_loader, select_loader
from pipeline.records import SOURCE_ONLY
from pipeline.shards import BadImage, ShardError, load_manifest, unknown_dataset

log = logging.getLogger("train")
SHARD_BUILD_WAIT = timedelta(hours=24)  # how long the other ranks wait for rank 0's shards


def check_flags(cfg: RunConfig, ex: ExecConfig, world: int) -> None:
    """What the flags alone decide, before any process group, file or device is touched."""
    for flag, path in (("--logs-dir", ex.logs_dir), ("--shards", ex.shards), ("--resume", ex.resume),
                       ("--data-dir", ex.data_dir), ("--pretrained", ex.pretrained)):
        if path is not None and (why := long_name(path)):
            raise UsageError(f"{flag} {path}: {why}")
    try:
        resolve_device(ex.device)
    except DeviceError as e:
        raise UsageError(str(e)) from None
    if ex.evaluate:
        if ex.resume is None:
            raise UsageError("--evaluate needs --resume CHECKPOINT (the checkpoint to evaluate)")
        for name in cfg.targets:
            check_target(name, ex.shards)
        return
    if ex.apex:
        try:
            import apex.optimizers  # noqa: F401
        except ImportError:
            raise UsageError("--apex: NVIDIA apex is not installed (it is not on PyPI; build it from "
                             "NVIDIA's repository), or leave --apex out for torch's fused Adam") from None
    flags = (["--sources"] * len(cfg.sources) if "sources" in ex.given
             else [f"--{f}" for f in SOURCE_FLAGS])
    for flag, name in zip(flags, cfg.sources):
        if why := unknown_dataset(name, ex.shards):
            raise UsageError(f"{flag} {name!r}: {why}")
    for name in cfg.targets:
        check_target(name, ex.shards)
        if name in cfg.sources:
            raise UsageError(f"-d {name}: the target is also a source; it must stay unseen")
    if len(set(cfg.sources)) != len(cfg.sources):  # --sources refuses a name given twice itself
        raise UsageError(f"sources {cfg.sources}: the three sources must differ")
    if cfg.mode == "il" and -(-cfg.height // 4) * -(-cfg.width // 4) < 2:
        raise UsageError(f"--height {cfg.height} --width {cfg.width}: too small for --update-style, whose "
                         "style module takes each image's statistics over layer1's feature map (a quarter "
                         "of the input's height and width): it needs two positions at least (e.g. --height "
                         "8 --width 4)")
    if why := input_problem(cfg.arch, cfg.height, cfg.width):
        raise UsageError(f"-a {cfg.arch} --height {cfg.height} --width {cfg.width}: {why}")
    if cfg.pad >= min(cfg.height, cfg.width):
        raise UsageError(f"--pad {cfg.pad} must be smaller than the input ({cfg.height}x{cfg.width}): "
                         "the crop would hold no part of the image")
    if cfg.batch_size % cfg.num_instances:
        raise UsageError(f"-b {cfg.batch_size} must be a multiple of --num-instances {cfg.num_instances}")
    if cfg.batch_size % world:
        raise UsageError(f"-b {cfg.batch_size} (global per source) must divide over {world} ranks")
    try:  # the statistics groups of the first and of the shuffled second forward
        make_layout([cfg.batch_size // world] * len(cfg.sources), cfg.bn_groups, 0, world)
        make_layout([len(cfg.sources) * cfg.batch_size // world], cfg.bn_groups, 0, world)
    except ValueError as e:
        raise UsageError(f"--bn-groups {cfg.bn_groups} with -b {cfg.batch_size} on {world} rank(s): {e}") \
            from None


def check_target(name: str, shards: Path) -> None:
    if why := unknown_dataset(name, shards):
        raise UsageError(f"-d {name!r}: {why}")
    if name in SOURCE_ONLY:
        raise UsageError(f"-d {name}: has no query/gallery split, it can only be a source")


def check_pretrained(cfg: RunConfig, ex: ExecConfig) -> str:
    """The weights --pretrained names, checked now (their file read safely): 'none', 'imagenet'
    or a path."""
    if ex.resume is not None or ex.pretrained == "none":
        return "none"
    if ex.pretrained == "imagenet":
        try:
            imagenet_weights_file(cfg.arch)
        except RuntimeError as e:
            raise UsageError(f"--pretrained imagenet: {e}") from None
        return "imagenet"
    path = Path(ex.pretrained)
    if not path.is_file():
        raise UsageError(f"--pretrained {ex.pretrained!r}: expected 'imagenet', 'none' or a weights file, "
                         f"and there is no file {path}")
    try:
        read_torch_file(path, "weights")
    except CheckpointError as e:
        raise UsageError(f"--pretrained {e}") from None
    return str(path)



def prepare_shards(ex: ExecConfig, names: list[str], dist_info: du.DistInfo) -> None:
    """Every dataset the run needs must have complete shards of the current format; with
    --data-dir, rank 0 builds the missing ones first while the others wait on a gloo group
    (:func:`engine.distributed.host_group`): building real datasets can outlast the NCCL
    watchdog's and --dist-timeout's limits."""
    missing = [n for n in names if not (ex.shards / n / "manifest.json").is_file()]
    waiting = du.host_group(SHARD_BUILD_WAIT) if ex.data_dir is not None else None
    with checked(dist_info.world, waiting):
        if missing and ex.data_dir is not None and dist_info.is_main:
            build_missing(ex.data_dir, ex.shards, missing)
    with checked(dist_info.world):
        for name in names:
            try:
                load_manifest(ex.shards / name)
            except (FileNotFoundError, ValueError) as e:
                hint = "" if ex.data_dir else (f" (run: python tools/make_shards.py --data-dir DATA --out "
                                               f"{ex.shards} --datasets {name}, or pass --data-dir)")
                raise UsageError(f"shards of {name}: {e}{hint}") from e


def build_missing(data_dir: Path, shards: Path, missing: list[str]) -> None:
    log.info("building shards of %s from %s into %s", ", ".join(missing), data_dir, shards)
    try:
        build_shards(data_dir, shards, missing)
    except (ShardError, ValueError, OSError) as e:
        print(f"make_shards.py: error: {e}", file=sys.stderr)
        skip = ""  # --skip-bad helps with bad images only (a layout or name problem needs a fix)
        if isinstance(e, BadImage):
            skip = (f"; to skip bad images, build them with python tools/make_shards.py --data-dir "
                    f"{data_dir} --out {shards} --datasets {','.join(missing)} --skip-bad")
        raise UsageError(f"building the shards of {', '.join(missing)} from {data_dir} failed "
                         f"(make_shards' error is above{skip})") from None


def loader_config(cfg: RunConfig, ex: ExecConfig, dist_info: du.DistInfo) -> LoaderConfig:
    if ex.workers < WORKERS and "workers" not in ex.given:
        log.info("-j/--workers %d: the default %d data workers per rank, capped at the %d cores available",
                 ex.workers, WORKERS, ex.workers)
    try:
        kind = select_loader(ex.loader)
    except ImportError as e:
        raise UsageError(f"--loader {ex.loader}: {e}") from None
    return cfg.loader_config(workers=ex.workers, dtype=amp_dtype(ex.amp, dist_info.device),
                             device=dist_info.device, rank=dist_info.rank, world=dist_info.world, loader=kind,
                             test_batch_size=ex.test_batch_size)


def build_target_loader(shards: Path, name: str, lcfg: LoaderConfig):
    """Target ``name``'s query + gallery loader (no worker started yet); a target on which no
    query can be ranked is refused now, not after the first epoch."""
    try:
        loader = build_eval_loader(shards, name, "test", lcfg)
    except ShardError as e:
        raise UsageError(f"shards of {name}: {e}") from None
    query = loader.is_query
    cameras: dict[int, set[int]] = {}  # the gallery's cameras of each identity
    for pid, cam in set(zip(loader.pids[~query].tolist(), loader.camids[~query].tolist())):
        cameras.setdefault(pid, set()).add(cam)
    queries = set(zip(loader.pids[query].tolist(), loader.camids[query].tolist()))
    if not any(cameras.get(pid, set()) - {cam} for pid, cam in queries):
        raise UsageError(f"-d {name}: no query image has a gallery image of its identity from another "
                         f"camera, so the target cannot be evaluated (check its shards: "
                         f"{shards / name})")
    return loader



def read_resume(resume: Path | None, cfg: RunConfig) -> dict | None:
    """The --resume checkpoint, refused when it is not one or another configuration wrote it."""
    if resume is None:
        return None
    try:
        ckpt = read_checkpoint(resume)
    except CheckpointError as e:
        raise UsageError(f"--resume {e}") from None
    diffs = config_differences(ckpt["config"], asdict(cfg), RESUME_KEYS)
    if diffs:
        raise UsageError(f"--resume {resume} was written by another configuration: "
                         f"{'; '.join(diffs)}")
    return ckpt
