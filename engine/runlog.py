"""Everything a run reports, on rank 0 only: the progress bar of each epoch, one log line and
one ``metrics.jsonl`` row per epoch, TensorBoard scalars, the ``metrics.png`` plot and the
final table. On other ranks every method does nothing."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from engine.evaluation.metrics import METRICS
from pipeline.files import write_atomic

log = logging.getLogger("train")


class RunLog:
    """The reports of one run into ``path`` (its --logs-dir; None on ranks other than 0)."""

    def __init__(self, path: Path | None, targets: list[str], epochs: int, title: str, progress: bool = True):
        self.path, self.targets, self.epochs, self.title = path, targets, epochs, title
        self.progress = progress and path is not None
        self.writer = None
        self.bar = None

    def open(self, stale: list[Path], history: list[dict] | None) -> None:
        """Start writing: the earlier run's files (--overwrite) go now, after every check; a
        resumed run (``history`` given) continues a metrics.jsonl that matches its checkpoint."""
        if self.path is None:
            return
        for old in stale:
            old.unlink(missing_ok=True)
        if history is not None:
            write_metrics(self.path / "metrics.jsonl", history)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.path))
        except ImportError:
            log.info("tensorboard not installed: no event files (metrics.jsonl and metrics.png are written)")

    # ---------------------------------------------------------------------------- progress bar
    def start_epoch(self, epoch: int, first: int, iters: int) -> None:
        self.t0, self.done = time.perf_counter(), first
        if self.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=iters, initial=first, desc=f"epoch {epoch + 1}/{self.epochs}",
                            dynamic_ncols=True, leave=False)

    def advance(self, to: int, loss, images_per_s: float) -> None:
        """The bar at iteration ``to`` (``loss``: the last iteration's, a tensor read only here)."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{float(loss):.3f}", img_s=f"{images_per_s:.0f}")
            self.bar.update(to - self.done)
        self.done = to

    def end_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # ---------------------------------------------------------------------------- per epoch, at the end
    def epoch(self, row: dict, history: list[dict]) -> None:
        """One epoch's row: a log line, metrics.jsonl, TensorBoard, the plot of ``history``."""
        if self.path is None:
            return
        msg = (f"epoch {row['epoch']}/{self.epochs}  loss {row['loss']:.3f}  lr {row['lr']:.2e}  "
               f"{row['images_per_s']:.0f} img/s")
        for t in self.targets:
            if f"{t}/mAP" in row:
                msg += f"  {t} mAP {100 * row[f'{t}/mAP']:.1f} rank-1 {100 * row[f'{t}/rank1']:.1f}"
        log.info(msg)
        write_metrics(self.path / "metrics.jsonl", history)  # whole, atomically: a full disk is named
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row["epoch"])
        save_plot(history, self.targets, self.path / "metrics.png", self.title)

    def finish(self, history: list[dict]) -> None:
        if self.path is None:
            return
        print_table(history, self.targets)
        if self.writer is not None:
            self.writer.close()


def save_plot(history: list[dict], targets: list[str], path: Path, title: str) -> None:
    """mAP (solid) and rank-1 (dashed) on each target over epochs, as a PNG beside metrics.jsonl."""
    import matplotlib.pyplot as plt

    fig = plot_history(history, targets, title)
    if fig is None:
        return
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def plot_history(history: list[dict], targets: list[str], title: str):
    """The figure :func:`save_plot` writes (None before any evaluation). The axes are the data's
    with a margin: whole epochs half an epoch either side, percentages 5 points either side within
    0..100, so that one evaluation is a point in a readable frame, not at the centre of ticks
    0.95..1.05."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = {t: [h for h in history if f"{t}/mAP" in h] for t in targets}
    if not any(rows.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs, values = [], []
    for i, t in enumerate(targets):
        x = [h["epoch"] for h in rows[t]]
        maps, rank1 = [100 * h[f"{t}/mAP"] for h in rows[t]], [100 * h[f"{t}/rank1"] for h in rows[t]]
        ax.plot(x, maps, marker="o", color=f"C{i}", label=f"{t} mAP")
        ax.plot(x, rank1, marker="s", ls="--", color=f"C{i}", label=f"{t} rank-1")
        epochs += x
        values += maps + rank1
    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.set_ylim(max(0.0, min(values) - 5), min(100.0, max(values) + 5))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl of ``history``, rewritten whole and atomically at every epoch: a resumed run
    continues a log that matches its checkpoint, whichever checkpoint it resumed from, and a full
    disk fails naming the file (:class:`pipeline.files.WriteError`) with the old log kept."""
    write_atomic(path, lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n" for row in history)))


HEADER = "   mAP rank-1 rank-5 rank-10"


def _cells(values: dict, prefix: str = "") -> str:
    return "".join(f" {100 * values[prefix + m]:{w}.1f}" for m, w in zip(METRICS, (5, 6, 6, 7)))


def print_table(history: list[dict], targets: list[str]) -> None:
    """Every evaluation of the run: one row per epoch, the four metrics of each target."""
    rows = [h for h in history if any(f"{t}/mAP" in h for t in targets)]
    if not rows:
        return
    width = len(HEADER)
    print("\n      " + " |".join(f" {t[:width - 1]:<{width - 1}}" for t in targets))
    print("epoch " + " |".join(HEADER for _ in targets))
    for h in rows:
        print(f"{h['epoch']:5d} " + " |".join(_cells(h, f"{t}/") if f"{t}/mAP" in h else " " * width
                                              for t in targets))
    scored = [h for h in rows if "mAP" in h]
    if scored:
        best = max(scored, key=lambda h: h["mAP"])
        what = "mAP" if len(targets) == 1 else "the run's mAP (--best-by)"
        print(f"best by {what}: epoch {best['epoch']}, mAP {100 * best['mAP']:.1f}, "
              f"rank-1 {100 * best['rank1']:.1f}")


def target_columns(results: dict[str, dict], best_by: str | None) -> dict:
    """One evaluation's metrics.jsonl columns: ``<target>/<metric>`` for every target evaluated,
    and the run's own ``mAP``, ``rank1``, ``rank5``, ``rank10`` (best.pth follows its mAP): the
    first target's (``best_by`` "first") or the mean over the targets ("mean"); none when
    ``best_by`` is None (an evaluation failed)."""
    row = {f"{name}/{m}": res[m] for name, res in results.items() for m in METRICS}
    if best_by == "first":
        row.update({m: next(iter(results.values()))[m] for m in METRICS})
    elif best_by == "mean":
        row.update({m: sum(res[m] for res in results.values()) / len(results) for m in METRICS})
    return row


def print_targets(results: dict[str, dict]) -> None:
    """One evaluation of several targets (--evaluate): a row per target, and their mean."""
    width = max(len("mean"), *map(len, results))
    print(f"{'target':<{width}}{HEADER}")
    for name, res in results.items():
        print(f"{name:<{width}}{_cells(res)}")
    if len(results) > 1:
        print(f"{'mean':<{width}}{_cells(target_columns(results, 'mean'))}")

