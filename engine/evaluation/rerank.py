"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), with the semantics of the standard `re_ranking(q_g_dist, q_q_dist, g_g_dist,
k1, k2, lambda_value)` that the published IL code, torchreid and fast-reid ship.

Queries and gallery images form one pool, and for each image p:
  - R(p): those of its k1 + 1 nearest images that also count p among their own k1 + 1 nearest;
  - R*(p): R(p) grown by R_half(c) (the same with round(k1 / 2)) of each member c when more than
    2/3 of R_half(c) lies inside R(p);
  - V_p: the members of R*(p) weighted by exp(-d), normalised to sum 1, then (k2 != 1) averaged
    over p's k2 nearest images (local query expansion);
  - Jaccard distance 1 - m / (2 - m), with m = sum_j min(V_q[j], V_g[j]).
The result is (1 - lambda) * Jaccard + lambda * d for the query x gallery block.

Details of the standard code that the paper does not state are kept, because they change the
numbers and published results were measured with them: the input distances are squared before
use (our callers pass squared Euclidean distances, as the IL code does, so d is their square);
d[i, j] is d[j, i] divided by the maximum of column i (the standard scales columns, then
transposes: for symmetric inputs that is each row over its own maximum); the 2/3 test is strict
(`>`, in float64 as written there); k2 == 1 leaves V alone rather than replacing V_p by the V of p's
nearest image; and the Jaccard denominator is the constant 2 - m (sum_j max(V_q[j], V_g[j]) when both
soft sets sum to 1, kept as 2 - m also for an image left with no members under exact ties).
Equal distances are ordered by pool index (a stable sort). The standard's plain `np.argsort` leaves
their order to numpy's sort kernel, so there exact ties have no single published answer.

Unlike the standard code, nothing here loops over images, and nothing but the distances is N x N:
neighbour lists come from one top-k, sets are sorted arrays of (image, member) keys, and V is
sparse (tens to a few hundred members per image), so the Jaccard numerators are summed over
shared members only. The pool's full distance matrix is still needed, which is why the size is
capped (`MAX_BYTES`).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

MAX_BYTES = 4 * 2**30  # the (query + gallery)^2 float32 distance matrix
TRIPLETS_PER_BLOCK = 2**23  # (query, gallery, shared member) terms summed at once
KEYS_PER_BLOCK = 2**24  # int64 sort keys built at once by `_nearest_by_key`
TILE = 256  # rows and columns of a block copied at once by `_put_squared`


def check_size(num_query: int, num_gallery: int) -> None:
    """Refuse pools whose full float32 distance matrix exceeds MAX_BYTES."""
    n = num_query + num_gallery
    need = 4 * n * n
    if need > MAX_BYTES:
        raise ValueError(f"re-ranking needs the full {n} x {n} distance matrix of {num_query} queries "
                         f"+ {num_gallery} gallery images ({need / 2**30:.1f} GiB as float32), above "
                         f"the {MAX_BYTES / 2**30:.0f} GiB limit (engine.evaluation.rerank.MAX_BYTES); "
                         "evaluate without re-ranking")


def _pool_distances(q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray) -> np.ndarray:
    """The standard's `original_dist`: the pool matrix squared, columns over their maxima, transposed.

    Built straight from the transposed blocks, [[q_q.T, q_g], [q_g.T, g_g.T]], with each row over its
    maximum: the same matrix, without first building the untransposed one.
    """
    nq, ng = q_g.shape
    d = np.empty((nq + ng, nq + ng), np.float32)
    for dst, src in ((d[:nq, :nq], q_q.T), (d[:nq, nq:], q_g), (d[nq:, :nq], q_g.T), (d[nq:, nq:], g_g.T)):
        _put_squared(dst, src)
    d /= d.max(1, keepdims=True)
    return d


def _put_squared(dst: np.ndarray, src: np.ndarray) -> None:
    """dst = src ** 2, squared in src's dtype (as the standard code does) before the float32 store.

    Copied tile by tile: src is mostly a transposed view, and copying a large one whole strides
    through memory (several times slower at Market-1501 size).
    """
    for a in range(0, src.shape[0], TILE):
        for b in range(0, src.shape[1], TILE):
            dst[a:a + TILE, b:b + TILE] = np.square(src[a:a + TILE, b:b + TILE])


def _nearest(d: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] each row's k nearest pool images in (distance, index) order, i.e. a stable argsort.

    One float top-k finds them; only rows whose k-th and (k + 1)-th distances are equal (a tie on
    the boundary, where top-k may pick either) are ranked again by exact int64 keys.
    """
    n = len(d)
    dist, index = d.topk(min(k + 1, n), 1, largest=False)
    index, by_index = index[:, :k].sort(1)
    nn = index.gather(1, dist[:, :k].gather(1, by_index).sort(dim=1, stable=True).indices)
    if k < n:
        tied = torch.nonzero(dist[:, k - 1] == dist[:, k]).flatten()
        if len(tied):
            nn[tied] = _nearest_by_key(d, tied, k)
    return nn


def _nearest_by_key(d: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """`_nearest` of the given rows through keys (bits << 32 | index): int64 with no ties.

    The distances are >= 0 (squares), and non-negative float32 values order like their bit patterns.
    """
    index = torch.arange(len(d))
    step = max(1, KEYS_PER_BLOCK // len(d))
    keys = [((d[r].view(torch.int32).long() << 32) | index).topk(k, 1, largest=False).values
            for r in rows.split(step)]
    return torch.cat(keys) & 0xFFFFFFFF


def _reciprocal(nn: np.ndarray) -> np.ndarray:
    """mask[i, a]: image i is among the neighbours (nn rows) of its neighbour nn[i, a]."""
    return (nn[nn] == np.arange(len(nn))[:, None, None]).any(-1)


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which of `keys` occur in the sorted 1-D array `sorted_keys`."""
    if not len(sorted_keys):
        return np.zeros(keys.shape, bool)
    pos = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def _starts(group: np.ndarray, n: int) -> np.ndarray:
    """[n + 1] offsets of each group's entries among entries sorted by `group` (CSR row pointers)."""
    return np.concatenate([[0], np.cumsum(np.bincount(group, minlength=n))])


def _soft_sets(d: np.ndarray, nn: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """V before query expansion as sparse (rows, cols, weights) sorted by row, then column.

    Row p holds the members of R*(p) weighted by exp(-d) and normalised to sum 1 (no entries for an
    image that is not among its own k1 + 1 nearest and has no reciprocal neighbours, possible under
    exact ties). `nn` holds each image's nearest pool images in order (at least k1 + 1, or all N).
    A pair (p, j) is handled as the key p * N + j, so sets are sorted key arrays.
    """
    n = len(d)
    full, half = nn[:, :k1 + 1], nn[:, :int(np.around(k1 / 2)) + 1]
    in_r, in_half = _reciprocal(full), _reciprocal(half)
    own = np.arange(n)[:, None] * n
    r_keys = np.sort((own + full)[in_r])

    # For every forward neighbour c of p: R_half(c), and how much of it lies inside R(p).
    sub_keys, sub_ok = own[:, :, None] + half[full], in_half[full]  # [N, K, Kh]
    shared = (_contains(r_keys, sub_keys) & sub_ok).sum(-1)
    grow = in_r & (shared > 2.0 / 3 * sub_ok.sum(-1))
    keys = np.unique(np.concatenate([r_keys, sub_keys[sub_ok & grow[..., None]]]))
    rows, cols = np.divmod(keys, n)
    w = np.exp(-d[rows, cols])
    return rows, cols, (w / np.bincount(rows, weights=w, minlength=n)[rows]).astype(np.float32)


def _expanded(rows: np.ndarray, cols: np.ndarray, w: np.ndarray, nn: np.ndarray,
              k2: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """V after local query expansion (k2 != 1): row p becomes the mean of its k2 nearest images' rows."""
    if k2 == 1:
        return rows, cols, w  # the standard code skips the expansion, even when p is not its own nearest
    n, nbr = len(nn), nn[:, :k2]
    ptr = _starts(rows, n)
    src = nbr.ravel()
    length = ptr[src + 1] - ptr[src]
    take = np.arange(length.sum()) + np.repeat(ptr[src] - (np.cumsum(length) - length), length)
    dest = np.repeat(np.arange(n), length.reshape(nbr.shape).sum(1))
    keys, where = np.unique(dest * n + cols[take], return_inverse=True)
    mean = np.bincount(where, weights=w[take]) / nbr.shape[1]
    return *np.divmod(keys, n), mean.astype(np.float32)


def _min_overlap(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, num_query: int,
                 num_gallery: int) -> np.ndarray:
    """[Q, G] sums over members j of min(V[q, j], V[g, j]) for query rows vs gallery rows.

    Only members shared by a query and a gallery image give a term: every query entry meets the
    gallery entries of its column. Blocks of query rows keep each block near TRIPLETS_PER_BLOCK terms.
    """
    n = num_query + num_gallery
    split = np.searchsorted(rows, num_query)  # entries are sorted by row: queries come first
    q_row, q_col, q_val = rows[:split], cols[:split], vals[:split]
    by_col = np.argsort(cols[split:], kind="stable")  # gallery entries grouped by member
    g_row, g_val = rows[split:][by_col] - num_query, vals[split:][by_col]
    g_ptr = _starts(cols[split:], n)

    count = g_ptr[q_col + 1] - g_ptr[q_col]  # gallery entries sharing each query entry's member
    first = np.concatenate([[0], np.cumsum(count)])  # first term of each query entry
    q_ptr = _starts(q_row, num_query)
    bounds = np.searchsorted(first[q_ptr], np.arange(TRIPLETS_PER_BLOCK, first[-1], TRIPLETS_PER_BLOCK))
    out = np.empty((num_query, num_gallery), np.float32)
    for r0, r1 in itertools.pairwise(np.unique(np.concatenate([[0], bounds, [num_query]]))):
        e0, e1 = q_ptr[r0], q_ptr[r1]
        c = count[e0:e1]
        take = np.arange(first[e0], first[e1]) + np.repeat(g_ptr[q_col[e0:e1]] - first[e0:e1], c)
        cell = np.repeat((q_row[e0:e1] - r0) * num_gallery, c) + g_row[take]
        term = np.minimum(np.repeat(q_val[e0:e1], c), g_val[take])
        out[r0:r1] = np.bincount(cell, weights=term, minlength=(r1 - r0) * num_gallery).reshape(r1 - r0, -1)
    return out


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked [num_query, num_gallery] float32 distances, as the standard function returns them.

    The blocks are query-gallery [Q, G], query-query [Q, Q] and gallery-gallery [G, G] distances
    (engine.evaluation.metrics passes squared Euclidean ones); k1, k2 and lambda_value default to the paper's.
    """
    q_g, q_q, g_g = (np.asarray(x) for x in (q_g_dist, q_q_dist, g_g_dist))
    nq, ng = q_g.shape
    if q_q.shape != (nq, nq) or g_g.shape != (ng, ng):
        raise ValueError(f"re_ranking: expected q_q_dist {nq}x{nq} and g_g_dist {ng}x{ng} for a "
                         f"{nq}x{ng} q_g_dist, got {q_q.shape} and {g_g.shape}")
    if k1 < 0 or k2 < 1:
        raise ValueError(f"re_ranking: expected k1 >= 0 and k2 >= 1, got k1={k1}, k2={k2}")
    check_size(nq, ng)
    d = _pool_distances(q_g, q_q, g_g)
    nn = _nearest(torch.from_numpy(d), min(max(k1 + 1, k2), len(d))).numpy()
    v = _expanded(*_soft_sets(d, nn, k1), nn, k2)
    overlap = _min_overlap(*v, nq, ng)
    jaccard = 1 - overlap / (2 - overlap)
    lam = float(lambda_value)  # a numpy float64 scalar would promote the float32 result
    return jaccard * (1 - lam) + d[:nq, nq:] * lam
