"""The training augmentation's policy: the published flip probability and crop padding, the
padding at other input sizes, and the random parts of one iteration.

The loaders draw the random parts (flip, crop offset) with :func:`augment_params` from a
generator seeded by (seed, epoch, iteration) rather than inside the decoding workers, so an
iteration's augmentation is the same whichever loader runs it, however many workers and ranks
there are, and after a resume. This module imports no torch: the workers that read the training
plan (``pipeline.plan``) import it.
"""
from __future__ import annotations

import numpy as np

from pipeline.seeds import AUGMENT, stream_rng

PAD = 10  # the published zero padding before the random crop, in pixels at width 128
FLIP_P = 0.5  # probability of the horizontal flip


def default_pad(width: int) -> int:
    """The padding before the random crop at input ``width``: the published 10 pixels at
    256x128, scaled with the width so the crop moves by the same share of the image at any size
    (10 pixels of a 16-pixel-wide image leave little of the person: learning stalls)."""
    return round(PAD * width / 128)


def resolve_pad(pad: int | None, width: int) -> int:
    """A ``--pad`` setting in pixels: ``pad`` as given, or None for :func:`default_pad`."""
    return default_pad(width) if pad is None else pad


def augment_params(seed: int, epoch: int, it: int, n: int, pad: int = PAD) -> tuple[np.ndarray, np.ndarray]:
    """Per image of one iteration's global batch (n rows, the sources one after another):
    mirror flag (p=FLIP_P) and crop shift (dy, dx) in [-pad, pad], i.e. the crop's corner in
    the image padded by ``pad`` minus ``pad``. Ranks take their rows of it, so an image is
    augmented alike whatever the number of ranks."""
    rng = stream_rng(seed, epoch, it, AUGMENT)
    mirror = (rng.random(n) < FLIP_P).astype(np.int32)
    shift = rng.integers(-pad, pad + 1, size=(n, 2)).astype(np.int32)
    return mirror, shift
