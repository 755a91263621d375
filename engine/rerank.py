"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), written from the paper's description.

Queries and gallery images form one pool. For each image p:
  - R(p, k1): those of its k1 + 1 nearest images (p itself first) that also count p among
    their own k1 + 1 nearest (k-reciprocal neighbours: far fewer false matches than plain
    nearest neighbours);
  - R*(p, k1): R(p, k1) grown by R(c, k1/2) of each member c whose half-size set mostly
    (at least 2/3) lies inside R(p, k1), to win back true matches a pose change pushed out;
  - V_p: the members of R*(p) weighted by exp(-d), normalised to sum 1 (a soft set),
    then averaged over p's k2 nearest neighbours (local query expansion);
  - the Jaccard distance 1 - sum min(V_p, V_g) / sum max(V_p, V_g) compares two soft sets.
The result is (1 - lambda) * Jaccard + lambda * d, with d scaled per row to [0, 1] so both terms
weigh alike (a per-row scale keeps each query's original ranking, so lambda=1 changes nothing).

The soft sets are sparse (a few hundred images each), so V is a sparse matrix and the Jaccard
numerators are summed over shared members only. The pool's full distance matrix is needed,
which is why the size is capped (`MAX_BYTES`).
"""
from __future__ import annotations

import numpy as np
import torch

MAX_BYTES = 4 * 2**30  # the (query + gallery)^2 float32 distance matrix
TRIPLETS_PER_BLOCK = 2**23  # (query, gallery, shared member) terms summed at once


def check_size(num_query: int, num_gallery: int) -> None:
    """Refuse pools whose full float32 distance matrix exceeds MAX_BYTES."""
    n = num_query + num_gallery
    need = 4 * n * n
    if need > MAX_BYTES:
        raise ValueError(f"re-ranking needs the full {n} x {n} distance matrix of {num_query} queries "
                         f"+ {num_gallery} gallery images ({need / 2**30:.1f} GiB as float32), above "
                         f"the {MAX_BYTES / 2**30:.0f} GiB limit (engine.rerank.MAX_BYTES); "
                         "evaluate without re-ranking")


def _reciprocal(nn: torch.Tensor) -> torch.Tensor:
    """mask[i, a]: image i is among the neighbours (nn rows) of its neighbour nn[i, a]."""
    own = torch.arange(len(nn))[:, None, None]
    return (nn[nn] == own).any(-1)


def _soft_sets(d: torch.Tensor, nn: torch.Tensor, k1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """V as padded rows: members [N, M] of R*(p, k1) (N where empty) and weights exp(-d) summing to 1.

    `nn` holds each image's nearest neighbours in order (p itself first).
    """
    n = len(d)
    nn = nn[:, :k1 + 1]
    half = nn[:, :min(int(round(k1 / 2)) + 1, n)]
    in_r, in_half = _reciprocal(nn), _reciprocal(half)

    # For every member c of R(p): its half set, and how much of it lies inside R(p).
    sub, sub_ok = half[nn], in_half[nn]  # [N, K, Kh]
    inside = ((sub[..., None] == nn[:, None, None, :]) & in_r[:, None, None, :]).any(-1) & sub_ok
    grow = in_r & (3 * inside.sum(-1) >= 2 * sub_ok.sum(-1))
    members = torch.cat([nn, sub.flatten(1)], 1)
    keep = torch.cat([in_r, (sub_ok & grow[..., None]).flatten(1)], 1)

    # One entry per distinct member (a member can be reached through several c).
    members = torch.where(keep, members, n).sort(1).values
    members[:, 1:][members[:, 1:] == members[:, :-1]] = n
    keep = members < n
    w = torch.where(keep, torch.exp(-d.gather(1, members.clamp(max=n - 1))), 0.0)
    return members, w / w.sum(1, keepdim=True)


def _min_overlap(v: torch.Tensor, num_query: int) -> torch.Tensor:
    """[Q, G] sums over members j of min(V[q, j], V[g, j]) for query rows vs gallery rows."""
    rows, cols = v.indices()
    vals = v.values()
    is_q = rows < num_query
    q_row, q_col, q_val = rows[is_q], cols[is_q], vals[is_q]
    g_row, g_col, g_val = rows[~is_q] - num_query, cols[~is_q], vals[~is_q]
    by_col = torch.sort(g_col, stable=True).indices  # gallery entries grouped by member
    g_row, g_val = g_row[by_col], g_val[by_col]
    starts = torch.cumsum(torch.bincount(g_col, minlength=v.shape[1]), 0)
    starts = torch.cat([starts.new_zeros(1), starts])

    count = starts[q_col + 1] - starts[q_col]  # gallery entries sharing each query entry's member
    out = torch.zeros(num_query, v.shape[0] - num_query, dtype=vals.dtype)
    ends = torch.cumsum(count, 0)
    total = int(ends[-1]) if len(ends) else 0
    bounds = torch.searchsorted(ends, torch.tensor(range(TRIPLETS_PER_BLOCK, total, TRIPLETS_PER_BLOCK),
                                                   dtype=ends.dtype)).tolist()
    for a, b in zip([0] + bounds, bounds + [len(count)]):
        n_each = count[a:b]
        which = torch.repeat_interleave(torch.arange(a, b), n_each)  # query entry of each term
        first = torch.cumsum(n_each, 0) - n_each
        pos = starts[q_col[which]] + torch.arange(len(which)) - torch.repeat_interleave(first, n_each)
        out.index_put_((q_row[which], g_row[pos]), torch.minimum(q_val[which], g_val[pos]), accumulate=True)
    return out


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked [num_query, num_gallery] float32 distances from the three distance blocks."""
    q_g, q_q, g_g = (torch.as_tensor(np.asarray(x), dtype=torch.float32)
                     for x in (q_g_dist, q_q_dist, g_g_dist))
    nq, ng = q_g.shape
    if q_q.shape != (nq, nq) or g_g.shape != (ng, ng):
        raise ValueError(f"re_ranking: expected q_q_dist {nq}x{nq} and g_g_dist {ng}x{ng} for a "
                         f"{nq}x{ng} q_g_dist, got {tuple(q_q.shape)} and {tuple(g_g.shape)}")
    check_size(nq, ng)
    d = torch.empty(nq + ng, nq + ng)
    d[:nq, :nq], d[:nq, nq:], d[nq:, :nq], d[nq:, nq:] = q_q, q_g, q_g.T, g_g
    d /= d.max(1, keepdim=True).values.clamp(min=torch.finfo(d.dtype).tiny)

    n = len(d)
    nn = d.topk(min(max(k1 + 1, k2), n), dim=1, largest=False).indices
    members, w = _soft_sets(d, nn, k1)
    # Local query expansion: V_p becomes the mean of the soft sets of p's k2 nearest neighbours
    # (entries of the same member are summed by coalesce).
    nn = nn[:, :k2]
    cols, vals = members[nn].flatten(1), w[nn].flatten(1) / nn.shape[1]
    keep = cols < n
    rows = torch.arange(n)[:, None].expand_as(cols)[keep]
    v = torch.sparse_coo_tensor(torch.stack([rows, cols[keep]]), vals[keep], (n, n),
                                check_invariants=False).coalesce()

    overlap = _min_overlap(v, nq)
    mass = torch.zeros(len(d)).index_add_(0, v.indices()[0], v.values())
    union = mass[:nq, None] + mass[None, nq:] - overlap
    jaccard = 1 - overlap / union.clamp(min=torch.finfo(union.dtype).tiny)
    return ((1 - lambda_value) * jaccard + lambda_value * d[:nq, nq:]).numpy()
