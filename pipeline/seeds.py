"""The random streams of a run, all keyed by :func:`stream_seed`.

Every random draw of training (the sampler's identities and images, the flips and crops, the
shuffle of the second forward, the style draws) comes from a generator seeded by the run's
``--seed`` and the position it is drawn at: the epoch, and the iteration or source or rank where
the stream needs one, plus a tag that keeps two streams of one position apart. Nothing carries
random state from one iteration to the next, so:

- a run resumed anywhere, even mid-epoch after a SIGTERM, repeats the draws of an uninterrupted
  run exactly: (epoch, iteration) in the checkpoint is the whole random state;
- every rank draws the values of the whole global batch and takes its rows, so 1 and N ranks
  see the same draws.

Streams today: sampler ``(seed, epoch, source)``, flips and crops ``(seed, epoch, it, AUGMENT)``,
shuffle ``(seed, epoch, it, SHUFFLE)``, style draws ``(seed, epoch, it, STYLE)`` (as the one
integer ``torch.manual_seed`` takes, :func:`int_seed`), DALI's pipeline seed
``(seed, rank, g, LOADER)`` (its graph draws nothing: the augmentation comes from the host).
"""
from __future__ import annotations

import numpy as np

AUGMENT = 0xA06  # flips and crops of one iteration
SHUFFLE = 0x5EED  # the second forward's permutation
LOADER = 0xDA1  # a DALI pipeline's own seed
STYLE = 0x57E  # the style module's torch.rand draws of one iteration


def stream_seed(seed: int, *position: int) -> np.random.SeedSequence:
    """The key of the stream drawn at ``position`` of a run seeded with ``seed`` (see the module
    docstring: why a stream depends on nothing but its position)."""
    return np.random.SeedSequence([seed, *position])


def stream_rng(seed: int, *position: int) -> np.random.Generator:
    """A numpy generator of :func:`stream_seed`'s stream (``default_rng([seed, *position])``)."""
    return np.random.default_rng(stream_seed(seed, *position))


def int_seed(seed: int, *position: int) -> int:
    """:func:`stream_seed`'s stream as a 31-bit integer, for libraries that take one (DALI,
    ``torch.manual_seed``)."""
    return int(stream_seed(seed, *position).generate_state(1)[0]) % 2**31
