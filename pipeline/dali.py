"""DALI loaders: worker processes read JPEG bytes from the shards, DALI decodes and augments.

The graph is the training transform of ``pipeline.transforms``: decode (GPU "mixed", or CPU
when ``device_id`` is None), bicubic resize, a random shift of up to ``PAD`` pixels with zero
fill (= pad 10 then random crop), random mirror, normalise. Images leave DALI as NHWC, so the
NCHW view handed to torch is channels_last without a copy.

Corrupt bytes: workers parse each header and raise (or replace, with ``replace_bad``) a sample
that is not an image; a decoder error from DALI is mapped back to its sample by decoding that
iteration with PIL, then raised naming shard and key, or (``replace_bad``) the sample is marked
bad and the pipeline restarted at that iteration.
"""
from __future__ import annotations

import numpy as np
import torch
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.backend import TensorListGPU
from nvidia.dali.plugin.pytorch import feed_ndarray

from pipeline.loader import EvalRows, LoaderConfig, TrainBatch, TrainPlan, check_header, decode_rgb, to_device
from pipeline.shards import ShardError
from pipeline.transforms import MEAN, STD

DEPTH = 2  # batches prepared ahead, so decoding overlaps the training step
_TORCH = {types.FLOAT: torch.float32, types.FLOAT16: torch.float16}


def _images(jpegs, cfg: LoaderConfig, shift=None, mirror=0):
    """The shared part of both graphs: decode, resize, (shifted crop), (mirror), normalise to
    NHWC. Training passes the random parts in (pipeline.transforms.augment_params)."""
    gpu = cfg.device.type == "cuda"
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
    # Cubic for both up- and downscaling, antialiased: as close to PIL's bicubic as DALI gets.
    images = fn.resize(images, resize_x=cfg.width, resize_y=cfg.height, interp_type=types.INTERP_CUBIC,
                       min_filter=types.INTERP_CUBIC, mag_filter=types.INTERP_CUBIC, antialias=True)
    if shift is not None:
        images = fn.slice(images, start=shift, shape=[cfg.height, cfg.width], axis_names="HW",
                          out_of_bounds_policy="pad", fill_values=0)
    return fn.crop_mirror_normalize(images, mirror=mirror, mean=[m * 255 for m in MEAN],
                                    std=[s * 255 for s in STD], dtype=_dali_dtype(cfg), output_layout="HWC")


@pipeline_def
def _train_graph(source, cfg: LoaderConfig):
    jpegs, labels, replaced, mirror, shift = fn.external_source(
        source=source, num_outputs=5, batch=True, parallel=True, batch_info=True,
        prefetch_queue_depth=max(DEPTH, cfg.workers),
        dtype=[types.UINT8, types.INT64, types.INT64, types.INT32, types.INT32])
    return _images(jpegs, cfg, shift, mirror), labels, replaced


@pipeline_def
def _eval_graph(source, cfg: LoaderConfig):
    jpegs = fn.external_source(source=source, batch=True, parallel=True, batch_info=True,
                               prefetch_queue_depth=max(DEPTH, cfg.workers), dtype=types.UINT8)
    return _images(jpegs, cfg)


def _dali_dtype(cfg: LoaderConfig):
    return types.FLOAT16 if cfg.dtype == torch.float16 else types.FLOAT  # bf16: cast in torch


def _pipeline(graph, source, cfg: LoaderConfig, batch_size: int, seed: int):
    cuda = cfg.device.type == "cuda"
    pipe = graph(source, cfg, batch_size=batch_size, num_threads=max(1, cfg.workers), seed=seed % 2**31,
                 device_id=_device_index(cfg.device) if cuda else None, py_num_workers=max(1, cfg.workers),
                 py_start_method="spawn", prefetch_queue_depth=DEPTH)
    pipe.build()
    return pipe


def _device_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    if isinstance(tl, TensorListGPU):
        tensor = tl.as_tensor()
        out = torch.empty(tensor.shape(), dtype=_TORCH[tensor.dtype], device=device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(tl.as_array())


class _TrainSource:
    """Batch callback run in DALI's worker processes; iteration k of the stream starting at ``first``."""

    def __init__(self, plan: TrainPlan, first: int):
        self.plan, self.first = plan, first

    def __call__(self, info):
        epoch, it = divmod(self.first + info.iteration, self.plan.iters)
        items, labels, replaced = self.plan.iteration(epoch, it, check_header)
        mirror, shift = self.plan.augmentation(epoch, it)
        return [np.frombuffer(b, dtype=np.uint8) for b in items], labels, replaced, mirror, shift


class DaliTrainLoader:
    """``epoch(e)`` yields ``iters`` :class:`TrainBatch`; consecutive epochs stream without a pause."""

    name = "dali"

    def __init__(self, plan: TrainPlan, cfg: LoaderConfig):
        self.plan, self.cfg = plan, cfg
        self.num_classes = [s.num_classes for s in plan.sets]
        self.replaced = 0  # images replaced so far (replace_bad)
        self._pipe, self._next = None, None  # the pipeline and the global iteration it yields next

    def epoch(self, e: int, start: int = 0):
        for it in range(start, self.plan.iters):
            images, labels, replaced = self._run(e * self.plan.iters + it)
            labels = torch.from_numpy(labels.as_array())
            images, labels = to_device(_to_torch(images, self.cfg.device), labels, self.cfg)
            count = int(replaced.as_array().sum())
            self.replaced += count
            yield TrainBatch(images, labels, list(self.plan.sizes), count, self.plan.round_sizes(e, it))

    def _run(self, g: int):
        while True:
            if self._next != g:
                self._pipe = None  # shuts its workers down
                seed = self.cfg.seed * 1_000_003 + self.cfg.rank * 7919 + g
                self._pipe = _pipeline(_train_graph, _TrainSource(self.plan, g), self.cfg,
                                       sum(self.plan.sizes), seed)
                self._next = g
            try:
                outs = self._pipe.run()
            except Exception as err:
                self._pipe, self._next = None, None
                epoch, it = divmod(g, self.plan.iters)
                bad = self.plan.find_bad(epoch, range(it, it + DEPTH + 1))
                if not bad:
                    raise
                if not self.plan.replace_bad:
                    s, j = bad[0]
                    raise ShardError(f"{self.plan.sets[s].location(j)}: cannot decode the image; "
                                     "replace_bad=True replaces such images") from err
                self.plan.bad.update(bad)  # the restarted workers replace them
                continue
            self._next = g + 1
            return outs


class _EvalSource:
    def __init__(self, rows: EvalRows):
        self.rows = rows

    def __call__(self, info):
        if info.iteration >= self.rows.num_batches():
            raise StopIteration
        out = []
        for j in self.rows.batch_rows(info.iteration):
            try:
                out.append(np.frombuffer(check_header(self.rows.rows.read(int(j))), dtype=np.uint8))
            except Exception as err:
                where = self.rows.rows.location(int(j))
                raise ShardError(f"{where}: cannot decode the image ({err})") from err
        return out


class DaliEvalLoader:
    """This rank's rows in order, in batches of ``test_batch_size`` (the last one partial)."""

    name = "dali"

    def __init__(self, rows: EvalRows, cfg: LoaderConfig):
        self.rows, self.cfg = rows, cfg
        self.pids, self.camids = rows.pids, rows.camids
        self.is_query, self.labels = rows.is_query, rows.labels
        self._pipe = None

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        if self._pipe is None:
            source = _EvalSource(self.rows)
            self._pipe = _pipeline(_eval_graph, source, self.cfg, self.rows.batch, self.cfg.seed)
        pipe, self._pipe = self._pipe, None  # given back only after a complete pass
        for b in range(self.rows.num_batches()):
            index = torch.from_numpy(self.rows.batch_rows(b))
            try:
                (images,) = pipe.run()
            except Exception as err:
                for j in index.tolist():
                    try:
                        decode_rgb(self.rows.rows.read(j))
                    except Exception:
                        raise ShardError(f"{self.rows.rows.location(j)}: cannot decode the image") from err
                raise
            images, index = to_device(_to_torch(images, self.cfg.device), index, self.cfg)
            yield images, index
        try:
            pipe.run()
        except StopIteration:
            pipe.reset()
            self._pipe = pipe
