"""The loaders' entry point: the choice of backend and the training and evaluation loaders.

Both backends (``pipeline.dali`` and ``pipeline.torch_loader``, imported here only when chosen)
read the same shards through :class:`TrainPlan`, so they sample the same indices for a given
(seed, epoch, rank) and differ only in how the pixels are decoded and augmented. What they
share (configuration, batches, the device hand-over) is ``pipeline.batches``; the reading side
is the torch-free training plan, ``pipeline.plan`` (the workers import it). This module re-exports both, so
``from pipeline.loader import LoaderConfig, build_train_loader`` is the one import a user needs.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.batches import LOADERS, EvalLoader, LoaderConfig, TrainBatch, to_device
from pipeline.plan import EvalRows, Rows, SourceSet, TrainPlan, check_header, decode_rgb, split_rows

__all__ = ["LOADERS", "LoaderConfig", "TrainBatch", "EvalLoader", "select_loader", "build_train_loader",
           "build_eval_loader", "build_file_loader", "to_device", "EvalRows", "Rows", "SourceSet",
           "TrainPlan", "check_header", "decode_rgb", "split_rows"]
log = logging.getLogger(__name__)


def select_loader(kind: str = "auto") -> str:
    """"dali" when asked (or auto) and importable, else "torch"; says which one runs."""
    if kind not in LOADERS:
        raise ValueError(f"loader={kind!r}: expected one of {', '.join(LOADERS)}")
    if kind != "torch":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as err:
            if kind == "dali":
                raise ImportError("loader='dali' but NVIDIA DALI is not installed: "
                                  "pip install -e '.[dali]', or use loader='torch'") from err
        else:
            log.info("data loader: DALI")
            return "dali"
    log.info("data loader: torch (PIL + torchvision)")
    return "torch"


def build_train_loader(shards_dir: Path, sources: list[str], cfg: LoaderConfig):
    """Training loader over the mix sets of ``sources``: ``.epoch(e, start=0)`` yields the
    TrainBatch of iterations start..cfg.iters-1 of epoch e."""
    plan = TrainPlan([SourceSet(Path(shards_dir) / s) for s in sources], cfg)
    plan.indices(0)  # refuse an unusable source here, not inside a worker
    if select_loader(cfg.loader) == "dali":
        from pipeline.dali import DaliTrainLoader
        return DaliTrainLoader(plan, cfg)
    from pipeline.torch_loader import TorchTrainLoader
    return TorchTrainLoader(plan, cfg)


def build_eval_loader(shards_dir: Path, dataset: str | list[str], what: str, cfg: LoaderConfig) -> EvalLoader:
    """Evaluation loader: "test" (query then gallery), one split ("query", "gallery", "train")
    or "mix" (centre initialisation; of one source, or of several one after another), test
    transform."""
    return eval_loader(EvalRows(shards_dir, dataset, what, cfg), cfg)


def build_file_loader(paths: list[str], cfg: LoaderConfig) -> EvalLoader:
    """Evaluation loader (test transform) over image files, in order."""
    return eval_loader(EvalRows.of_files(paths, cfg), cfg)


def eval_loader(rows: EvalRows, cfg: LoaderConfig) -> EvalLoader:
    if select_loader(cfg.loader) == "dali":
        from pipeline.dali import DaliEvalLoader
        return DaliEvalLoader(rows, cfg)
    from pipeline.torch_loader import TorchEvalLoader
    return TorchEvalLoader(rows, cfg)
