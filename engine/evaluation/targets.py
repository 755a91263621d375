"""Feature extraction split over ranks and target-domain evaluation."""
from __future__ import annotations

import torch

from dataclasses import dataclass

import torch.nn.functional as F

from engine.distributed import gather_varying_rows
from engine.evaluation.metrics import evaluate_features
from engine.precision import autocast


@dataclass(frozen=True)
class EvalOptions:
    """How a target is evaluated. The defaults are the published protocol; the others are
    test-time options that users of other re-ID code know (``--rerank``, ``--flip-test``,
    ``--aqe K``)."""

    rerank: bool = False
    flip: bool = False
    aqe: int = 0


@torch.no_grad()
def extract_features(model, loader, device: torch.device, amp_dtype, flip: bool = False) -> torch.Tensor:
    """Features of every row of `loader`, in row order, on every rank: each rank extracts its
    contiguous part and the parts are gathered in rank order. ``flip``: each feature is the
    normalised sum of the image's and its mirror image's (the network's features are already
    normalised, so both count alike)."""
    was_training = model.training
    model.eval()
    parts = []
    for images, _ in loader:
        with autocast(device, amp_dtype):
            feats = model(images).float()
            if flip:
                feats = F.normalize(feats + model(images.flip(3)).float(), dim=1)
        parts.append(feats)
    model.train(was_training)
    local = torch.cat(parts) if parts else torch.empty(0, model.num_features, device=device)
    return gather_varying_rows(local)


def evaluate_target(model, loader, device: torch.device, amp_dtype,
                    options: EvalOptions = EvalOptions()) -> dict:
    """mAP and CMC of the target's query against its gallery (Market-1501 protocol)."""
    feats = extract_features(model, loader, device, amp_dtype, flip=options.flip)
    bad = int((~torch.isfinite(feats).all(dim=1)).sum())
    if bad:  # NaN distances would rank arbitrarily (or fail deep in the metrics): say what is wrong
        raise ValueError(f"evaluate: {bad} of {len(feats)} features are not finite (NaN or inf)")
    q = torch.as_tensor(loader.is_query)
    pids, camids = torch.as_tensor(loader.pids), torch.as_tensor(loader.camids)
    q_dev = q.to(feats.device)
    return evaluate_features(feats[q_dev], feats[~q_dev], pids[q], pids[~q], camids[q], camids[~q],
                             rerank=options.rerank, aqe=options.aqe)
