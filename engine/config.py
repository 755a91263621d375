"""The run's configuration, the only input of ``engine/``: :class:`RunConfig`, the settings a
checkpoint records (``asdict(cfg)`` is its ``config`` entry) and a resume must agree with, and
:class:`ExecConfig`, how this run executes (data, logs, device, speed, evaluation options).
train.py's flags become both in one place (``engine.flags.configs``); ``tools/benchmark.py``
builds them directly. The defaults are train.py's."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import torch

from engine.errors import UsageError
from engine.evaluation.targets import EvalOptions
from pipeline.loader import LoaderConfig
from pipeline.augment import resolve_pad

SOURCE_FLAGS = ("dataset_src1", "dataset_src2", "dataset_src3")  # the published spelling of 3 sources
WORKERS = 4  # data worker processes per rank by default, where as many cores are available


def default_workers() -> int:
    """WORKERS, capped at the cores this process may run on: more workers than cores only make
    them wait (and torch warns about it for every loader)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(WORKERS, cores)


def setting(default, flag: str | None = None, resume: bool = True):
    """A field of :class:`RunConfig` with train.py's ``default`` (a list is copied for each
    instance): ``flag`` names the parsed flag it comes from (default: the field's name);
    ``resume``: whether a resumed run must agree with the checkpoint on it."""
    metadata = {"flag": flag, "resume": resume}
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """The settings a checkpoint records and a resume must agree with (the number of epochs may
    grow: a finished run can be continued)."""

    arch: str = setting("resnet50")
    sources: list[str] = setting(["market1501", "dukemtmc", "cuhk03"])  # --sources or --dataset_src1/2/3
    targets: list[str] = setting(["msmt17v1"], "dataset")
    batch_size: int = setting(64)
    num_instances: int = setting(4)
    height: int = setting(256)
    width: int = setting(128)
    pad: int | None = setting(None)  # None (the flag's default): default_pad(width)
    update_style: bool = setting(False)
    baseline: str = setting("fbf")
    epochs: int = setting(70, resume=False)
    iters: int = setting(200)
    seed: int = setting(1)
    lr: float = setting(3.5e-4)
    weight_decay: float = setting(5e-4)
    temp: float = setting(0.05)
    momentum: float = setting(0.2)
    rho: float = setting(3.0)
    stem_relu: bool = setting(False)
    bn_groups: int = setting(4)
    bn_impl: str = setting("auto", resume=False)  # how the groups are computed, not what: any resumes any
    best_by: str = setting("first")

    @classmethod
    def from_args(cls, args) -> "RunConfig":
        """The configuration of parsed flags (an ``argparse.Namespace``)."""
        values = {}
        for f in fields(cls):
            flag = f.metadata["flag"] or f.name
            values[f.name] = sources_of(args) if f.name == "sources" else getattr(args, flag)
        return cls(**values)

    def __post_init__(self) -> None:
        self.pad = resolve_pad(self.pad, self.width)

    @classmethod
    def resume_keys(cls) -> tuple[str, ...]:
        """The settings a resumed run must share with its checkpoint."""
        return tuple(f.name for f in fields(cls) if f.metadata["resume"])

    @property
    def mode(self) -> str:
        return "il" if self.update_style else self.baseline

    def loader_config(self, *, workers: int, dtype: torch.dtype | None, device: torch.device, rank: int,
                      world: int, loader: str, test_batch_size: int) -> LoaderConfig:
        """The loaders' settings for this run on one rank (``dtype`` None: fp32)."""
        return LoaderConfig(height=self.height, width=self.width,
                            num_ids=self.batch_size // self.num_instances, num_instances=self.num_instances,
                            iters=self.iters, seed=self.seed, workers=workers, dtype=dtype or torch.float32,
                            device=device, rank=rank, world=world, loader=loader,
                            test_batch_size=test_batch_size, pad=self.pad)


def sources_of(args) -> list[str]:
    """The run's sources: --sources, or the published --dataset_src1/2/3 (three sources, their
    defaults the published Market-1501, DukeMTMC-reID, CUHK03); the two spellings together are
    refused rather than one silently winning."""
    if getattr(args, "sources", None) is None:
        return [getattr(args, f) for f in SOURCE_FLAGS]
    published = [f for f in SOURCE_FLAGS if f in getattr(args, "given", ())]
    if published:
        raise UsageError(f"--sources and --{published[0]}: two spellings of the sources; give --sources "
                         "a,b,... or --dataset_src1/2/3, not both")
    return list(args.sources)


@dataclass
class ExecConfig:
    """How this run executes, beside what its checkpoint records: where its data and logs are,
    the loaders, device and speed options, the learning-rate schedule's shape (the scheduler's
    state is in the checkpoint), when and how targets are evaluated, ``--evaluate`` and
    ``--resume``. ``given``: the flags (argparse destinations) the command line set."""

    shards: Path = Path("shards")
    data_dir: Path | None = None
    loader: str = "auto"
    workers: int = field(default_factory=default_workers)
    test_batch_size: int = 256
    pretrained: str = "imagenet"
    amp: str = "auto"
    compile: bool = False
    apex: bool = False
    device: str = "auto"
    dist_timeout: timedelta | None = None
    milestones: list[int] = field(default_factory=lambda: [30, 50])
    warmup_epochs: int = 10
    eval_every: int = 1
    evaluation: EvalOptions = EvalOptions()
    evaluate: bool = False
    resume: Path | None = None
    logs_dir: Path = Path("logs/il")
    overwrite: bool = False
    log_every: int = 20
    progress: bool = True
    given: frozenset[str] = frozenset()
