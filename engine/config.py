"""The run's configuration: the settings a checkpoint records (``asdict(cfg)`` is its
``config`` entry) and a resume must agree with, built from the parsed flags by field name."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from engine.usage import UsageError
from pipeline.loader import LoaderConfig
from pipeline.reading import resolve_pad

SOURCE_FLAGS = ("dataset_src1", "dataset_src2", "dataset_src3")  # the published spelling of 3 sources


def setting(flag: str | None = None, resume: bool = True):
    """A field of :class:`RunConfig`: ``flag`` names the parsed flag it comes from (default:
    the field's name); ``resume``: whether a resumed run must agree with the checkpoint on it."""
    return field(metadata={"flag": flag, "resume": resume})


@dataclass
class RunConfig:
    """The settings a checkpoint records and a resume must agree with (the number of epochs may
    grow: a finished run can be continued)."""

    arch: str = setting()
    sources: list[str] = setting()  # --sources or --dataset_src1/2/3 (sources_of)
    targets: list[str] = setting("dataset")
    batch_size: int = setting()
    num_instances: int = setting()
    height: int = setting()
    width: int = setting()
    pad: int | None = setting()  # None (the flag's default): default_pad(width)
    update_style: bool = setting()
    baseline: str = setting()
    epochs: int = setting(resume=False)
    iters: int = setting()
    seed: int = setting()
    lr: float = setting()
    weight_decay: float = setting()
    temp: float = setting()
    momentum: float = setting()
    rho: float = setting()
    stem_relu: bool = setting()
    bn_groups: int = setting()
    bn_impl: str = setting(resume=False)  # how the groups are computed, not what: any resumes any
    best_by: str = setting()

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
