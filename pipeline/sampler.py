"""Identity (PK) sampler of the published method, vectorised over a whole epoch.

Per source, identities are visited in random order; each gives one random anchor image and
``num_instances - 1`` more images of the same identity, taken from other cameras when it has
any (the published ``RandomMultipleGallerySampler`` rule), else from its other images. Each
pass over the identities (a fresh permutation) gives ``floor(identities / num_ids)`` global
batches and drops its incomplete last batch, as the published sampler does, so no batch ever
holds an identity twice. Every rank, whatever the world size, slices the same global batches
(:func:`rank_slice`).
"""
from __future__ import annotations

import numpy as np

from pipeline.seeds import stream_rng


def identity_batches(labels: np.ndarray, camids: np.ndarray, *, num_ids: int = 16,
                     num_instances: int = 4, num_batches: int, seed: int, epoch: int,
                     source: int = 0, name: str | None = None) -> np.ndarray:
    """Global batches ``[num_batches, num_ids * num_instances]`` of indices into ``labels``.

    Deterministic for ``(seed, epoch, source)``. Rows with a negative label are never drawn;
    identities with a single image are skipped (they cannot give a positive pair). A source
    with fewer such identities than ``num_ids`` cannot fill one batch of distinct identities
    and is refused. ``name`` only makes the error message clearer.
    """
    labels = np.asarray(labels, dtype=np.int64)
    camids = np.asarray(camids, dtype=np.int64)
    if labels.shape != camids.shape:
        raise ValueError(f"labels {labels.shape} and camids {camids.shape} differ in shape")
    rng = stream_rng(seed, epoch, source)

    # Group rows by (label, camera): an identity is a block, a camera a sub-block in it.
    keep = np.flatnonzero(labels >= 0)
    order = keep[np.lexsort((camids[keep], labels[keep]))]
    lab, cam = labels[order], camids[order]
    ids, id_start, id_count = np.unique(lab, return_index=True, return_counts=True)
    good = id_count >= 2
    if good.sum() < num_ids:
        raise ValueError(f"source {name or source}: {good.sum()} identities have 2 or more images, "
                         f"fewer than the {num_ids} distinct identities a batch needs; "
                         "lower the batch size or leave this source out")
    ids, id_start, id_count = ids[good], id_start[good], id_count[good]
    # Start and size of each row's camera sub-block, per position in `order`.
    new_group = np.r_[True, (lab[1:] != lab[:-1]) | (cam[1:] != cam[:-1])]
    group_id = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    group_count = np.diff(np.r_[group_start, len(order)])

    pick = _identity_order(rng, len(ids), num_ids, num_batches)
    need = len(pick)
    start, count = id_start[pick], id_count[pick]
    anchor = start + (rng.random(need) * count).astype(np.int64)
    g = group_id[anchor]
    cam_start, cam_count = group_start[g], group_count[g]

    # Candidates: other cameras if any, else the identity's other images. A candidate rank r
    # in [0, n) maps to a position in the block by skipping the excluded run [skip, skip+gap).
    cross = count > cam_count
    n = np.where(cross, count - cam_count, count - 1)
    skip = np.where(cross, cam_start, anchor) - start
    gap = np.where(cross, cam_count, 1)
    k = num_instances - 1
    # The published rule draws without replacement only when n >= num_instances.
    replace = n < num_instances
    ranks = np.empty((need, k), dtype=np.int64)
    for j in range(k):
        # Without replacement: draw in [0, n - j) and step over earlier picks in sorted order.
        r = (rng.random(need) * np.where(replace, n, n - j)).astype(np.int64)
        for prev in np.sort(ranks[:, :j], axis=1).T:
            r += ~replace & (r >= prev)
        ranks[:, j] = r
    others = start[:, None] + ranks + (ranks >= skip[:, None]) * gap[:, None]
    rows = order[np.concatenate([anchor[:, None], others], axis=1)]
    return rows.reshape(num_batches, num_ids * num_instances)


def _identity_order(rng: np.random.Generator, num_identities: int, num_ids: int,
                    num_batches: int) -> np.ndarray:
    """Identity positions of ``num_batches`` batches of ``num_ids``, batch after batch.

    Enough passes, each a fresh permutation of the identities, each cut to whole batches: the
    incomplete last batch of a pass is dropped (the published sampler's rule), so a batch never
    spans two passes and never repeats an identity.
    """
    per_pass = num_identities // num_ids
    passes = -(-num_batches // per_pass)
    order = rng.permuted(np.tile(np.arange(num_identities), (passes, 1)), axis=1)
    return order[:, :per_pass * num_ids].reshape(-1)[:num_batches * num_ids]


def rank_slice(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous part of a global batch (whole identities when world divides num_ids)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    if len(batch) % world:
        raise ValueError(f"global batch of {len(batch)} images does not split over {world} ranks; "
                         "choose a batch size divisible by the world size")
    step = len(batch) // world
    return batch[rank * step:(rank + 1) * step]
