"""Re-ID retrieval metrics (Market-1501 protocol): CMC and mAP, chunked so MSMT17 fits anywhere.

For each query the gallery images with the same pid and the same camera are removed; AP is
taken over the remaining ranked list and CMC counts the first correct match; queries without
a correct match are skipped. The ranking breaks distance ties by gallery index, exactly as a
stable argsort of each distance row does.

Sorting every row of an 11,659 x 82,161 matrix is the expensive part, and AP only needs the
positions of the few gallery images that share the query's pid. So the ranks are counted
instead of sorted: the same-pid images of a query are sorted (a few dozen), every gallery
distance is placed among them by binary search (`searchsorted`), and a histogram of those
places gives how many gallery images precede each same-pid image. Same result, a fraction of
the work, and it runs per query chunk on whatever device the distances live on.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# What an evaluation reports (besides the whole CMC curve), as evaluate_features names them.
METRICS = ("mAP", "rank1", "rank5", "rank10")
# Elements of one [chunk, gallery] block (about 20 bytes each are live at once).
CPU_BLOCK = 2**25
CUDA_BLOCK = 2**27


def _as_tensor(x, device=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t if device is None else t.to(device)


class _Gallery:
    """The gallery's pids grouped (indices of each pid contiguous, ascending) for fast lookups."""

    def __init__(self, g_pids: torch.Tensor, g_camids: torch.Tensor):
        if len(g_pids) == 0:
            raise ValueError("evaluate: the gallery is empty")
        self.order = torch.sort(g_pids, stable=True).indices
        self.sorted_pids = g_pids[self.order].contiguous()
        self.camids = g_camids
        self.size = len(g_pids)

    def same_pid(self, q_pids: torch.Tensor, q_camids: torch.Tensor):
        """Padded [c, K] gallery indices sharing each query's pid, with `real` and `junk` masks."""
        start = torch.searchsorted(self.sorted_pids, q_pids)
        count = torch.searchsorted(self.sorted_pids, q_pids, right=True) - start
        k = max(1, int(count.max()) if len(count) else 1)
        col = torch.arange(k, device=q_pids.device)
        real = col < count[:, None]
        pos = (start[:, None] + col).clamp(max=self.size - 1)
        idx = torch.where(real, self.order[pos], 0)
        junk = real & (self.camids[idx] == q_camids[:, None])
        return idx, real, junk


def _searchsorted_rows(sorted_rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Row-wise searchsorted; torch runs it on one CPU thread, so there the rows are split over
    torch's thread count (the op releases the GIL)."""
    parts = min(torch.get_num_threads(), len(values)) if values.device.type == "cpu" else 1
    if parts < 2:
        return torch.searchsorted(sorted_rows, values)
    out = torch.empty(values.shape, dtype=torch.int64)
    cuts = np.linspace(0, len(values), parts + 1).astype(int)
    with ThreadPoolExecutor(parts) as pool:
        list(pool.map(lambda a, b: torch.searchsorted(sorted_rows[a:b], values[a:b], out=out[a:b]),
                      cuts[:-1], cuts[1:]))
    return out


def _rank_chunk(dist: torch.Tensor, q_pids, q_camids, gallery: _Gallery):
    """AP, first-match rank and validity of each query (row) of one distance block."""
    c, g = dist.shape
    idx, real, junk = gallery.same_pid(q_pids, q_camids)
    k = idx.shape[1]
    ds = torch.where(real, dist.gather(1, idx), torch.inf)
    ds, perm = torch.sort(ds, dim=1, stable=True)  # by (distance, gallery index); padding last
    idx, real, junk = idx.gather(1, perm), real.gather(1, perm), junk.gather(1, perm)
    valid = real & ~junk

    # place[r, j] = number of same-pid images ranked before gallery image j (ties by index).
    place = _searchsorted_rows(ds, dist)
    ds_end = torch.cat([ds, torch.full_like(ds[:, :1], torch.inf)], 1)  # place == k is a valid index
    tie = dist == ds_end.gather(1, place)
    rows, cols = tie.nonzero(as_tuple=True)  # same-pid images themselves, plus rare exact ties
    d_tie = dist[rows, cols]
    earlier = (ds[rows] == d_tie[:, None]) & (idx[rows] < cols[:, None]) & real[rows]
    place[rows, cols] += earlier.sum(1)

    place += (torch.arange(c, device=dist.device) * (k + 1))[:, None]
    hist = torch.bincount(place.view(-1), minlength=c * (k + 1)).view(c, k + 1)[:, :k]
    upto = hist.cumsum(1)  # images ranked at or before same-pid image j, j included
    junk_before = junk.cumsum(1) - junk.long()
    rank = upto - 1 - junk_before  # 0-based position among the kept images
    hits = valid.cumsum(1)
    n_valid = hits[:, -1]
    prec = torch.where(valid, hits.double() / (rank + 1).double(), 0.0)
    ap = prec.sum(1) / n_valid.clamp(min=1)
    first = torch.where(valid, rank, g).min(1).values
    return ap, first, n_valid > 0


def _evaluate_chunks(rows, shape: tuple[int, int], device: torch.device, q_pids, g_pids, q_camids, g_camids,
                     max_rank: int, chunk: int | None):
    """(cmc, mAP) over all queries; `rows(a, b)` gives the distance rows of queries a..b-1."""
    nq, ng = shape
    ids = {}
    for name, x, n in (("q_pids", q_pids, nq), ("g_pids", g_pids, ng),
                       ("q_camids", q_camids, nq), ("g_camids", g_camids, ng)):
        ids[name] = _as_tensor(x, device).long()
        if ids[name].shape != (n,):
            raise ValueError(f"evaluate: {name} has shape {tuple(ids[name].shape)}, expected ({n},) "
                             f"for {nq} queries and {ng} gallery images")
    q_pids, q_camids = ids["q_pids"], ids["q_camids"]
    gallery = _Gallery(ids["g_pids"], ids["g_camids"])
    chunk = chunk or default_chunk(ng, device)
    aps, firsts, oks = [], [], []
    for s in range(0, nq, chunk):
        ap, first, ok = _rank_chunk(rows(s, s + chunk), q_pids[s:s + chunk], q_camids[s:s + chunk], gallery)
        aps.append(ap), firsts.append(first), oks.append(ok)
    ok = torch.cat(oks).cpu() if oks else torch.zeros(0, dtype=torch.bool)
    if not bool(ok.any()):
        raise ValueError("evaluate: no query has a correct match in the gallery (same pid, "
                         "another camera); check the query/gallery pids and camids")
    ap = torch.cat(aps).cpu()[ok]
    first = torch.cat(firsts).cpu()[ok]
    hist = torch.bincount(first.clamp(max=max_rank), minlength=max_rank + 1)[:max_rank]
    cmc = (hist.cumsum(0).double() / len(first)).numpy()
    return cmc, float(ap.mean())


def evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                  chunk: int | None = None):
    """CMC (float array of length max_rank) and mAP of a [num_query, num_gallery] distance matrix.

    Numpy or torch inputs; the work runs on the distance matrix's device, `chunk` query rows
    at a time (default: blocks of a few hundred MB).
    """
    dist = _as_tensor(dist)
    if dist.dim() != 2:
        raise ValueError(f"evaluate_rank: dist must be [num_query, num_gallery], got {tuple(dist.shape)}")
    if not dist.is_floating_point():
        dist = dist.double()
    elif dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.float()  # exact, so ties stay ties
    return _evaluate_chunks(lambda a, b: dist[a:b].contiguous(), dist.shape, dist.device,
                            q_pids, g_pids, q_camids, g_camids, max_rank, chunk)


def default_chunk(num_gallery: int, device: torch.device) -> int:
    """Query rows per chunk when none is given: a [chunk, gallery] block of the device's size."""
    block = CUDA_BLOCK if device.type == "cuda" else CPU_BLOCK
    return max(1, block // max(num_gallery, 1))


def _distance(x: torch.Tensor, y: torch.Tensor, metric: str, y_sq: torch.Tensor) -> torch.Tensor:
    """Distances of fp32 rows already prepared: normalised for cosine, `y_sq` = squared norms of y."""
    if metric == "cosine":
        return torch.addmm(torch.ones(1, device=x.device), x, y.T, alpha=-1)
    return torch.addmm(y_sq[None], x, y.T, alpha=-2).add_(x.pow(2).sum(1)[:, None])


def _prepare(f: torch.Tensor, metric: str) -> torch.Tensor:
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    f = f.float()
    return torch.nn.functional.normalize(f, dim=1) if metric == "cosine" else f


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """Squared Euclidean or cosine (1 - cos) distances between the rows of x and y, in fp32."""
    x, y = _prepare(x, metric), _prepare(y, metric)
    return _distance(x, y, metric, y.pow(2).sum(1))


def expand_queries(qf: torch.Tensor, gf: torch.Tensor, k: int, metric: str = "euclidean",
                   chunk: int | None = None) -> torch.Tensor:
    """Average query expansion: each query feature summed with its ``k`` nearest gallery features
    and L2-normalised (the mean's direction). Per query chunk, as the ranking, so it runs at
    MSMT17 size; features as :func:`evaluate_features` prepared them."""
    k = min(k, len(gf))
    g_sq = gf.pow(2).sum(1)
    chunk = chunk or default_chunk(len(gf), qf.device)
    out = torch.empty_like(qf)
    for s in range(0, len(qf), chunk):
        near = _distance(qf[s:s + chunk], gf, metric, g_sq).topk(k, dim=1, largest=False).indices
        out[s:s + chunk] = qf[s:s + chunk] + gf[near].sum(1)
    return torch.nn.functional.normalize(out, dim=1)


def evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, *, max_rank: int = 50,
                      chunk: int | None = None, metric: str = "euclidean", rerank: bool = False,
                      aqe: int = 0) -> dict:
    """mAP / CMC of query vs gallery features; distances are made and ranked per query chunk.

    Runs on the features' device; the full distance matrix never exists (except with
    `rerank`, which needs it and refuses sizes above `rerank.MAX_BYTES`). ``aqe`` > 0 expands
    each query first (:func:`expand_queries`).
    Returns `{"mAP", "rank1", "rank5", "rank10", "cmc"}`.
    """
    qf = _prepare(_as_tensor(qf), metric)
    gf = _prepare(_as_tensor(gf).to(qf.device), metric)
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"evaluate_features: expected [num_query, dim] and [num_gallery, dim] features, "
                         f"got {tuple(qf.shape)} and {tuple(gf.shape)}")
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: it would reorder near-tied distances
    try:
        if aqe:
            qf = expand_queries(qf, gf, aqe, metric, chunk)
        if rerank:
            from engine.evaluation.rerank import check_size, re_ranking

            check_size(len(qf), len(gf))
            dist = re_ranking(*(_distance(x, y, metric, y.pow(2).sum(1)).cpu().numpy()
                                for x, y in ((qf, gf), (qf, qf), (gf, gf))))
            cmc, mAP = evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids, max_rank, chunk)
        else:
            g_sq = gf.pow(2).sum(1)
            cmc, mAP = _evaluate_chunks(lambda a, b: _distance(qf[a:b], gf, metric, g_sq), (len(qf), len(gf)),
                                        qf.device, q_pids, g_pids, q_camids, g_camids, max_rank, chunk)
    finally:
        torch.set_float32_matmul_precision(precision)
    return {"mAP": mAP, "rank1": float(cmc[0]), "rank5": float(cmc[min(4, max_rank - 1)]),
            "rank10": float(cmc[min(9, max_rank - 1)]), "cmc": cmc}
