"""Per-source memory classifier: identity centres, a temperature-scaled cosine loss and the
momentum update of the published method (DESIGN.md section 5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NonFiniteFeatures(ValueError):
    """NaN/inf features offered to a memory (refused: the memory is left unchanged)."""


class MemoryClassifier(nn.Module):
    """Class centres ``[num_classes, num_features]`` (a buffer: no gradient reaches them).

    The loss is the cross-entropy of ``features @ centers.T / temp``. ``update`` gives the same
    result as the published per-sample loop (``c[y] = m*c[y] + (1-m)*f; c[y] /= ||c[y]||`` in
    batch order) with one vectorised round per repeat of a label in the batch.
    """

    def __init__(self, num_features: int, num_classes: int, temp: float = 0.05,
                 momentum: float = 0.2) -> None:
        super().__init__()
        self.num_features, self.num_classes = num_features, num_classes
        self.temp, self.momentum = temp, momentum
        self.register_buffer("centers", torch.zeros(num_classes, num_features))

    def extra_repr(self) -> str:
        return (f"num_features={self.num_features}, num_classes={self.num_classes}, "
                f"temp={self.temp}, momentum={self.momentum}")

    def _check_shapes(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must be [N, {self.num_features}], got {tuple(features.shape)}")
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must be [{features.shape[0]}] (one per feature row), "
                             f"got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        if features.device != self.centers.device or labels.device != self.centers.device:
            raise ValueError(f"features ({features.device}) and labels ({labels.device}) must be on "
                             f"the memory's device ({self.centers.device})")

    def _raise_bad_values(self, features: torch.Tensor, labels: torch.Tensor, bad_labels: int,
                          suspect_rows: int) -> None:
        """Called with the counts read back from the device; `suspect_rows` counts rows whose
        sum is not finite (cheap to compute), confirmed here element by element."""
        if bad_labels:
            bad = labels[(labels < 0) | (labels >= self.num_classes)].unique()[:10].tolist()
            raise ValueError(f"{bad_labels} label(s) outside [0, {self.num_classes}), e.g. {bad}; "
                             "the memory was not changed")
        if suspect_rows:
            rows = (~torch.isfinite(features)).any(dim=1).nonzero().flatten().tolist()
            if rows:
                raise NonFiniteFeatures(f"NaN/inf values in {len(rows)} feature row(s) (rows {rows[:10]}); "
                                 "the memory was not changed")

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarities over the temperature, in fp32 even under autocast."""
        with torch.autocast(features.device.type, enabled=False):
            return features.float() @ self.centers.t() / self.temp

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Memory loss. Label values are not read back to the host here (that would stall the
        GPU every iteration); cross-entropy itself rejects out-of-range labels."""
        self._check_shapes(features, labels)
        return F.cross_entropy(self.logits(features), labels)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Momentum update in place, identical to the per-sample loop in batch order.

        Each sample's rank among the earlier samples of its label decides its round; within a
        round every label occurs at most once, so one gather and one index_copy apply it. The
        only host sync reads the validation counts and the number of samples per round.
        """
        self._check_shapes(features, labels)
        n = labels.shape[0]
        if n == 0:
            return
        f = features.detach().float()
        labels = labels.long()
        sorted_labels, order = torch.sort(labels, stable=True)
        first = torch.searchsorted(sorted_labels, sorted_labels)
        rank = torch.empty_like(labels)
        rank[order] = torch.arange(n, device=labels.device) - first
        by_round = torch.argsort(rank, stable=True)
        per_round = torch.zeros(n, dtype=torch.long, device=labels.device)
        per_round.index_add_(0, rank, torch.ones_like(rank))
        bad_labels = ((labels < 0) | (labels >= self.num_classes)).sum()
        suspect_rows = (~torch.isfinite(f.sum(dim=1))).sum()
        counts = torch.cat([torch.stack([bad_labels, suspect_rows]), per_round]).tolist()
        self._raise_bad_values(f, labels, counts[0], counts[1])
        m, start = self.momentum, 0
        for size in counts[2:]:
            if size == 0:
                break
            rows = by_round[start:start + size]
            start += size
            y = labels[rows]
            c = m * self.centers.index_select(0, y) + (1 - m) * f.index_select(0, rows)
            c /= c.norm(dim=1, keepdim=True)
            self.centers.index_copy_(0, y, c)

    @torch.no_grad()
    def init_centers(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Each centre becomes the L2-normalised mean feature of its identity; every class needs
        at least one feature."""
        self._check_shapes(features, labels)
        f = features.detach().float()
        labels = labels.long()
        bad_labels = int(((labels < 0) | (labels >= self.num_classes)).sum())
        self._raise_bad_values(f, labels, bad_labels, int((~torch.isfinite(f.sum(dim=1))).sum()))
        counts = torch.bincount(labels, minlength=self.num_classes)
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"init_centers: {len(missing)} of {self.num_classes} classes have no "
                             f"feature, e.g. {missing[:20]}; the memory was not changed")
        sums = torch.zeros_like(self.centers).index_add_(0, labels, f)
        self.centers.copy_(F.normalize(sums / counts.unsqueeze(1).to(sums.dtype), dim=1))
