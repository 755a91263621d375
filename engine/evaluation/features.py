"""A trained checkpoint on any images: :class:`FeatureExtractor` gives the L2-normalised features
evaluation uses (eval mode, the published test transform, the checkpoint's input size).

    extractor = FeatureExtractor.from_checkpoint("logs/run/best.pth")
    feats = extractor(["a.jpg", "b.jpg"])            # float32 [2, D], rows of norm 1
    sims = feats @ feats.T                           # cosine similarities

The network comes from the checkpoint's ``config`` (``engine.checkpoint.NETWORK_KEYS``: arch, stem_relu,
bn_groups, height, width); the normalisation is ImageNet's (``pipeline.transforms``), as in
training, so nothing else is needed.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from engine.checkpoint import network_from_checkpoint
from engine.device import resolve_device
from engine.evaluation.targets import extract_features
from engine.precision import amp_dtype, autocast
from pipeline.loader import EvalLoader, LoaderConfig, select_loader
from pipeline.plan import decode_rgb
from pipeline.transforms import normalize, test_pixels


class ImageError(ValueError):
    """An image that is missing or cannot be decoded; the message names it."""


def open_image(path: str | Path) -> Image.Image:
    """An image file as RGB; :class:`ImageError` naming the file when it is missing or does not
    decode."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"image {path} cannot be read: {e.strerror or type(e).__name__}") from None
    try:
        return decode_rgb(data)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds; the file is unusable either way
        raise ImageError(f"image {path} cannot be decoded: {str(e).strip() or type(e).__name__}") from None


def features_by_loader(checkpoint: str | Path, make_loaders: Callable[[LoaderConfig], Iterable[EvalLoader]],
                       *, device: str = "auto", loader: str = "auto", workers: int = 4, batch_size: int = 128,
                       flip: bool = False,
                       progress: Callable[[EvalLoader], Iterable] | None = None) -> Iterator[torch.Tensor]:
    """Features (float32, CPU) of each loader ``make_loaders(cfg)`` builds (a shard split, image
    files), read by train.py's evaluation loaders (``loader``: auto, dali, torch) and extracted as
    evaluation extracts them: the tools' features equal evaluation's with that loader. Raises
    :class:`DeviceError` for a device that is not there, :class:`CheckpointError`, ``ImportError``
    for a loader that is not installed; an image that does not decode raises ``ShardError`` naming it."""
    dev = resolve_device(device)
    model, config = network_from_checkpoint(checkpoint)
    kind = select_loader(loader)
    dtype = amp_dtype("auto", dev)
    cfg = LoaderConfig(height=config["height"], width=config["width"], workers=workers,
                       dtype=dtype or torch.float32, device=dev, loader=kind, test_batch_size=batch_size)
    model = model.to(dev, memory_format=torch.channels_last)
    for rows in make_loaders(cfg):
        yield extract_features(model, progress(rows) if progress else rows, dev, dtype, flip=flip).cpu()


class FeatureExtractor:
    """Callable: a list of image paths, a list of PIL images, or a float tensor [B, 3, H, W] of
    normalised images -> float32 features [N, D] on the CPU, L2-normalised, in input order.

    Images are decoded by ``workers`` threads, resized (bicubic) to the checkpoint's height x
    width and normalised exactly as the evaluation loaders do, and run ``batch_size`` at a time
    (autocast on CUDA, as evaluation: ``engine.precision.amp_dtype``)."""

    def __init__(self, model: torch.nn.Module, height: int, width: int, device: str | torch.device = "auto",
                 batch_size: int = 128, amp: str = "auto", workers: int = 4) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.height, self.width = int(height), int(width)
        self.batch_size, self.workers = int(batch_size), max(1, int(workers))
        self.dtype = amp_dtype(amp, self.device)
        self.config: dict = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", batch_size: int = 128,
                        amp: str = "auto", workers: int = 4) -> "FeatureExtractor":
        """The network of a train.py checkpoint (latest.pth or best.pth), read safely
        (``weights_only``); :class:`engine.checkpoint.CheckpointError` names a bad file."""
        model, cfg = network_from_checkpoint(path)
        ext = cls(model, cfg["height"], cfg["width"], device=device, batch_size=batch_size, amp=amp,
                  workers=workers)
        ext.config = dict(cfg)
        return ext

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """The test transform up to normalisation: uint8 [H, W, 3] (normalised on the device)."""
        return test_pixels(image.convert("RGB"), self.height, self.width)

    @torch.no_grad()
    def forward_normalised(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of normalised images [B, 3, H, W] (any device), float32 on the CPU, ``batch_size``
        rows at a time."""
        if batch.dim() != 4 or batch.shape[1] != 3 or tuple(batch.shape[2:]) != (self.height, self.width):
            raise ValueError(f"expected normalised images [B, 3, {self.height}, {self.width}], "
                             f"got {list(batch.shape)}")
        if not batch.is_floating_point():
            raise ValueError(f"expected a float tensor of normalised images, got {batch.dtype}")
        out = [self._run(batch[i:i + self.batch_size].to(self.device, torch.float32))
               for i in range(0, len(batch), self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.num_features)

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.dtype):
            return self.model(images).float().cpu()

    def _pixels_batch(self, pixels: list[np.ndarray]) -> torch.Tensor:
        """uint8 [H, W, 3] arrays -> features, normalised where the batch lands (the torch
        evaluation loader's arithmetic)."""
        x = torch.from_numpy(np.stack(pixels)).to(self.device, non_blocking=True)
        return self._run(normalize(x).permute(0, 3, 1, 2))

    @torch.no_grad()
    def extract(self, items: Sequence, load: Callable[[object], Image.Image] = open_image,
                progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
        """Features of ``items`` (anything ``load`` turns into a PIL image), in order. ``progress``
        wraps the iterator of batches (tqdm, say)."""
        starts = range(0, len(items), self.batch_size)
        batches = (items[i:i + self.batch_size] for i in starts)
        if progress is not None:
            batches = progress(batches)
        out = []
        with ThreadPoolExecutor(self.workers) as pool:
            def prep(item):
                return self.preprocess(load(item))
            pending = None  # decode the next batch while this one runs
            for chunk in batches:
                nxt = pool.map(prep, chunk)
                if pending is not None:
                    out.append(self._pixels_batch(list(pending)))
                pending = nxt
            if pending is not None:
                out.append(self._pixels_batch(list(pending)))
        return torch.cat(out) if out else torch.empty(0, self.num_features)

    def __call__(self, images, progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return self.forward_normalised(images)
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        images = list(images)
        if all(isinstance(im, Image.Image) for im in images):
            return self.extract(images, load=lambda im: im, progress=progress)
        if all(isinstance(im, (str, Path)) for im in images):
            return self.extract(images, progress=progress)
        raise TypeError("expected image paths, PIL images, or a float tensor [B, 3, H, W] of normalised "
                        "images")
