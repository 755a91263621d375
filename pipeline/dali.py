"""DALI loaders: worker processes read image bytes from the shards, DALI decodes and augments.

The graph is the training transform of ``pipeline.transforms``: decode (GPU "mixed", or CPU
when ``device_id`` is None; by content, so JPEG and PNG members alike), bicubic resize, a
random shift of up to ``LoaderConfig.crop_pad`` pixels with zero fill (= pad then random crop), random
mirror, normalise. Images leave DALI as NHWC, so the NCHW view handed to torch is
channels_last without a copy.

Corrupt bytes: workers parse each header and raise (or replace, with ``replace_bad``) a sample
that is not an image; a decoder error from DALI is mapped back to its sample by decoding that
iteration with PIL, then raised naming shard and key, or (``replace_bad``) the sample is marked
bad and the pipeline restarted at that iteration. PIL and DALI's decoders do not accept the same
files (DALI refuses GIF, which PIL reads), so when PIL decodes every image, DALI's decoder is
tried on them one at a time to find the one it refuses, and the error says which decoder
refused it; when neither refuses any image, the error says that it is not an image's.

On a GPU, the pipeline returns its outputs ordered on PyTorch's current stream and the copy out
is queued on that stream: the hand-over never waits on the host for DALI's GPU work.
"""
from __future__ import annotations

import numpy as np
import torch
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.backend import TensorListGPU
from nvidia.dali.plugin.pytorch import feed_ndarray

from pipeline.batches import EvalLoader, LoaderConfig, TrainBatch, to_device
from pipeline.dali_sources import EvalSource, TrainSource
from pipeline.plan import EvalRows, TrainPlan, decode_rgb
from pipeline.seeds import LOADER, int_seed
from pipeline.shards import ShardError
from pipeline.transforms import MEAN, STD
from pipeline.workers import starting_workers

DEPTH = 2  # batches prepared ahead, so decoding overlaps the training step
# The training dtype as DALI's output dtype, so that DALI hands the batch over as training uses
# it. DALI 2.4 has no bfloat16: bf16 runs take fp32 and cast once on the device (an fp16 output
# cast to bf16 would round 49 of the 768 normalised pixel values one bf16 step differently).
_DALI = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}
if hasattr(types.DALIDataType, "BFLOAT16"):
    _DALI[torch.bfloat16] = types.DALIDataType.BFLOAT16
_TORCH = {v: k for k, v in _DALI.items()}


def _decode(encoded, cfg: LoaderConfig):
    """JPEG or PNG bytes -> HWC uint8 RGB, the format found from the bytes. "mixed" decodes JPEG
    on the GPU and, as DALI documents, other formats (PNG: CUHK03) on the CPU before the copy."""
    device = "mixed" if cfg.device.type == "cuda" else "cpu"
    return fn.decoders.image(encoded, device=device, output_type=types.RGB)


def _images(encoded, cfg: LoaderConfig, shift=None, mirror=0):
    """The shared part of both graphs: decode, resize, (shifted crop), (mirror), normalise to
    NHWC. Training passes the random parts in (pipeline.augment.augment_params)."""
    images = _decode(encoded, cfg)
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
    encoded, labels, replaced, mirror, shift = fn.external_source(
        source=source, num_outputs=5, batch=True, parallel=True, batch_info=True,
        prefetch_queue_depth=max(DEPTH, cfg.workers),
        dtype=[types.UINT8, types.INT64, types.INT64, types.INT32, types.INT32])
    return _images(encoded, cfg, shift, mirror), labels, replaced


@pipeline_def
def _eval_graph(source, cfg: LoaderConfig):
    encoded = fn.external_source(source=source, batch=True, parallel=True, batch_info=True,
                                 prefetch_queue_depth=max(DEPTH, cfg.workers), dtype=types.UINT8)
    return _images(encoded, cfg)


def _dali_dtype(cfg: LoaderConfig):
    return _DALI.get(cfg.dtype, types.FLOAT)


def _pipeline(graph, source, cfg: LoaderConfig, batch_size: int, seed: int):
    cuda = cfg.device.type == "cuda"
    pipe = graph(source, cfg, batch_size=batch_size, num_threads=max(1, cfg.workers), seed=seed % 2**31,
                 device_id=_device_index(cfg.device) if cuda else None, py_num_workers=max(1, cfg.workers),
                 py_start_method="spawn", prefetch_queue_depth=DEPTH)
    with starting_workers():  # workers that import no torch and survive a stop signal
        pipe.build()
    return pipe


def _device_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def _stream(device: torch.device) -> torch.cuda.Stream | None:
    """PyTorch's current stream on a CUDA device, None on the CPU. ``pipe.run(stream)`` returns
    the outputs ordered on it rather than waiting on the host until DALI's GPU work is done."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    if isinstance(tl, TensorListGPU):
        tensor = tl.as_tensor()
        out = torch.empty(tensor.shape(), dtype=_TORCH[tensor.dtype], device=device)
        feed_ndarray(tensor, out, cuda_stream=_stream(device))
        return out
    return torch.from_numpy(tl.as_array())


@pipeline_def(batch_size=1, num_threads=1, exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
def _decode_graph(cfg: LoaderConfig):
    return _decode(fn.external_source(name="encoded", dtype=types.UINT8), cfg)


class _SingleDecoder:
    """The loaders' DALI decoder ("mixed" on a GPU) run on one image at a time, to name the
    image behind a batch's decoder error that PIL does not reproduce."""

    def __init__(self, cfg: LoaderConfig):
        self.cfg, self._pipe = cfg, None

    def decodes(self, data: bytes) -> bool:
        if self._pipe is None:
            cuda = self.cfg.device.type == "cuda"
            self._pipe = _decode_graph(self.cfg, device_id=_device_index(self.cfg.device) if cuda else None)
            self._pipe.build()
        try:
            self._pipe.run(encoded=[np.frombuffer(data, dtype=np.uint8)])
        except Exception:
            self._pipe = None  # DALI invalidates a pipeline that raised
            return False
        return True


def _failure(data: bytes, decoder: _SingleDecoder) -> str | None:
    """Why an image breaks a DALI batch, or None when PIL and DALI's decoder both decode it."""
    try:
        decode_rgb(data)
    except Exception:
        return "cannot decode the image"
    if not decoder.decodes(data):
        return ("DALI's decoder cannot decode the image although PIL can (they accept different "
                "files; the torch loader reads it with PIL)")
    return None


def _not_an_image_error(what: str, err: Exception) -> RuntimeError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return RuntimeError(f"DALI failed on {what}, but PIL and DALI's decoder, one image at a time, decode "
                        f"every image of it: the error is not an image's, so none is named or replaced "
                        f"({first})")


def _rows_fed(plan: TrainPlan, epoch: int, iterations: range) -> list[tuple[int, int]]:
    """(source, row) of each image these iterations of ``epoch`` (past its end: the next epoch's)
    hand DALI, as TrainPlan.fetch picks them: a row found bad is replaced by the next row of its
    identity not found bad."""
    fed = []
    for g in iterations:
        e, it = divmod(epoch * plan.iters + g, plan.iters)
        for s, rows in enumerate(plan.indices(e)):
            same = plan.sets[s].same_identity
            fed += [(s, next((int(k) for k in same(int(j)) if (s, int(k)) not in plan.bad), int(j)))
                    for j in rows[it]]
    return fed


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
            yield TrainBatch(images, labels, list(self.plan.sizes), self.plan.batch_labels(e, it), count)

    def _run(self, g: int):
        while True:
            if self._next != g:
                self._pipe = None  # shuts its workers down
                seed = int_seed(self.cfg.seed, self.cfg.rank, g, LOADER)
                self._pipe = _pipeline(_train_graph, TrainSource(self.plan, g), self.cfg,
                                       sum(self.plan.sizes), seed)
                self._next = g
            try:
                outs = self._pipe.run(_stream(self.cfg.device))
            except Exception as err:
                self._pipe, self._next = None, None
                bad, why = self._undecodable(g, err)
                if not self.plan.replace_bad:
                    s, j = bad[0]
                    raise ShardError(f"{self.plan.sets[s].location(j)}: {why}") from err
                self.plan.bad.update(bad)  # the restarted workers replace them
                continue
            self._next = g + 1
            return outs

    def _undecodable(self, g: int, err: Exception) -> tuple[list[tuple[int, int]], str]:
        """The rows behind a DALI error in global iteration g or the ones prefetched after it,
        and why the first is bad. Each call finds rows not yet marked bad, or raises, so a
        ``replace_bad`` loader cannot restart for ever."""
        epoch, it = divmod(g, self.plan.iters)
        iterations = range(it, it + DEPTH + 1)
        bad = self.plan.find_bad(epoch, iterations)
        if bad:
            return bad, "cannot decode the image"
        decoder = _SingleDecoder(self.cfg)
        found = [(row, why) for row in dict.fromkeys(_rows_fed(self.plan, epoch, iterations))
                 if (why := _failure(self.plan.sets[row[0]].read(row[1]), decoder))]
        if not found:
            raise _not_an_image_error(f"epoch {epoch}, iterations {it}-{it + DEPTH}", err) from err
        return [row for row, _ in found], found[0][1]


class DaliEvalLoader(EvalLoader):
    """The evaluation rows through a DALI pipeline, kept between complete passes."""

    name = "dali"

    def __init__(self, rows: EvalRows, cfg: LoaderConfig):
        super().__init__(rows, cfg)
        self._pipe = None

    def __iter__(self):
        if self._pipe is None:
            source = EvalSource(self.rows)
            self._pipe = _pipeline(_eval_graph, source, self.cfg, self.rows.batch, self.cfg.seed)
        pipe, self._pipe = self._pipe, None  # given back only after a complete pass
        for b in range(self.rows.num_batches()):
            index = torch.from_numpy(self.rows.batch_rows(b))
            try:
                (images,) = pipe.run(_stream(self.cfg.device))
            except Exception as err:
                decoder = _SingleDecoder(self.cfg)
                for j in index.tolist():
                    if why := _failure(self.rows.rows.read(j), decoder):
                        raise ShardError(f"{self.rows.rows.location(j)}: {why}") from err
                raise _not_an_image_error(f"evaluation batch {b}", err) from err
            images, index = to_device(_to_torch(images, self.cfg.device), index, self.cfg)
            yield images, index
        try:
            pipe.run()
        except StopIteration:
            pipe.reset()
            self._pipe = pipe
