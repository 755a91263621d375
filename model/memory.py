"""Per-source memory classifier: identity centres, a temperature-scaled cosine loss and the
momentum update of the published method (docs/design.md)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class NonFiniteFeatures(ValueError):
    """NaN/inf features offered to a memory (refused: the memory is left unchanged)."""


def _nonfinite_rows(features: torch.Tensor) -> torch.Tensor:
    """Rows with a NaN/inf value, found through their sums (one cheap reduction). A finite row
    whose sum overflows float32 (values near 3e38) is caught too: its update could not be
    normalised either."""
    return ~torch.isfinite(features.sum(dim=1))


def update_rounds(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The per-sample update loop regrouped into independent rounds: the order of the rows round
    after round (a row's round is how often its label occurred before it; within a round, batch
    order) and the size of each round. Computed on the host, where the sampler knows the labels."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels)
    occurrence = np.empty(len(labels), dtype=np.int64)
    occurrence[order] = np.arange(len(labels)) - first
    by_round = np.argsort(occurrence, kind="stable")
    return by_round, np.bincount(occurrence).tolist()


class MemoryClassifier(nn.Module):
    """Class centres ``[num_classes, num_features]`` (a buffer: no gradient reaches them).

    The loss is the cross-entropy of ``features @ centers.T / temp``. ``update`` gives the same
    result as the published per-sample loop (``c[y] = m*c[y] + (1-m)*f; c[y] /= ||c[y]||`` in
    batch order) with one vectorised round per repeat of a label in the batch
    (:func:`update_rounds`).
    """

    def __init__(self, num_features: int, num_classes: int, temp: float = 0.05,
                 momentum: float = 0.2) -> None:
        super().__init__()
        self.num_features, self.num_classes = num_features, num_classes
        self.temp, self.momentum = temp, momentum
        self.register_buffer("centers", torch.zeros(num_classes, num_features))
        # updates with planned rounds refused for NaN/inf feature rows; not saved
        self.register_buffer("refusals", torch.zeros((), dtype=torch.long), persistent=False)

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
                          bad_rows: int) -> None:
        """Called with the counts read back from the device."""
        if bad_labels:
            bad = labels[(labels < 0) | (labels >= self.num_classes)].unique()[:10].tolist()
            raise ValueError(f"{bad_labels} label(s) outside [0, {self.num_classes}), e.g. {bad}; "
                             "the memory was not changed")
        if bad_rows:
            rows = _nonfinite_rows(features).nonzero().flatten().tolist()
            raise NonFiniteFeatures(f"NaN/inf values in {bad_rows} feature row(s) (rows {rows[:10]}); "
                                    "the memory was not changed")

    def raise_refused(self) -> None:
        """Report the updates refused since the last call (``update`` with ``round_sizes``): reads
        ``refusals`` back from the device, so call it where the loop synchronises anyway."""
        refused = int(self.refusals)
        if not refused:
            return
        self.refusals.zero_()
        raise NonFiniteFeatures(f"memory updates refused ({refused} with NaN/inf feature rows); "
                                "the memory was left unchanged by each")

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarities over the temperature, in the centres' dtype (fp32, or fp64 for
        exact comparisons) even under autocast."""
        with torch.autocast(features.device.type, enabled=False):
            return features.to(self.centers.dtype) @ self.centers.t() / self.temp

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Memory loss. Label values are not read back to the host here (that would stall the
        GPU every iteration); cross-entropy itself rejects out-of-range labels."""
        self._check_shapes(features, labels)
        return F.cross_entropy(self.logits(features), labels)

    def _apply_round(self, f: torch.Tensor, y: torch.Tensor, refused: torch.Tensor | None) -> None:
        """One round (every label at most once): c[y] = m*c[y] + (1-m)*f, then c[y] /= |c[y]|."""
        old = self.centers.index_select(0, y)
        c = torch.lerp(f, old, self.momentum)
        c /= c.norm(dim=1, keepdim=True)
        self.centers.index_copy_(0, y, c if refused is None else torch.where(refused, old, c))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor,
               round_sizes: list[int] | None = None) -> None:
        """Momentum update in place, identical to the per-sample loop in batch order.

        Each sample's rank among the earlier samples of its label decides its round
        (:func:`update_rounds`); within a round every label occurs at most once, so one gather
        and one index_copy apply it. Training plans the rounds on the host, where the sampler
        knows the labels (``engine.step.shuffle_plan``), and passes the rows already round after
        round with ``round_sizes`` (the labels are then trusted): nothing is read back from the
        device, and a batch with a NaN/inf feature row leaves the memory unchanged and is counted
        in ``refusals`` for :meth:`raise_refused`. Without ``round_sizes`` the labels are read
        back once to plan the rounds here, and a bad batch (a label out of range, a NaN/inf row)
        raises at once.
        """
        self._check_shapes(features, labels)
        n = labels.shape[0]
        if n == 0:
            return
        f, labels = features.detach().to(self.centers.dtype), labels.long()
        refused = None
        if round_sizes is None:
            host = torch.cat([_nonfinite_rows(f).sum().view(1), labels]).tolist()  # the one read-back
            bad_labels = sum(not 0 <= y < self.num_classes for y in host[1:])
            self._raise_bad_values(f, labels, bad_labels, host[0])
            order, round_sizes = update_rounds(np.asarray(host[1:], dtype=np.int64))
            order = torch.from_numpy(order).to(labels.device)
            f, labels = f.index_select(0, order), labels.index_select(0, order)
        else:
            if sum(round_sizes) != n or min(round_sizes) < 1:
                raise ValueError(f"round_sizes {round_sizes} must be positive and add up to the batch "
                                 f"size {n}")
            refused = _nonfinite_rows(f).any()
            self.refusals += refused
        for rows in zip(f.split(round_sizes), labels.split(round_sizes)):
            self._apply_round(*rows, refused)

    @torch.no_grad()
    def init_centers(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Each centre becomes the L2-normalised mean feature of its identity; every class needs
        at least one feature."""
        self._check_shapes(features, labels)
        f = features.detach().to(self.centers.dtype)
        labels = labels.long()
        bad_labels = int(((labels < 0) | (labels >= self.num_classes)).sum())
        self._raise_bad_values(f, labels, bad_labels, int(_nonfinite_rows(f).sum()))
        counts = torch.bincount(labels, minlength=self.num_classes)
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"init_centers: {len(missing)} of {self.num_classes} classes have no "
                             f"feature, e.g. {missing[:20]}; the memory was not changed")
        sums = torch.zeros_like(self.centers).index_add_(0, labels, f)
        self.centers.copy_(F.normalize(sums / counts.unsqueeze(1).to(sums.dtype), dim=1))
