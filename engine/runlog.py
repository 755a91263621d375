"""Everything a run reports, on rank 0 only: the progress bar of each epoch, one log line and
one ``metrics.jsonl`` row per epoch, TensorBoard scalars, the ``metrics.png`` plot and the
final table. On other ranks every method does nothing."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("train")


class RunLog:
    """The reports of one run into ``path`` (its --logs-dir; None on ranks other than 0)."""

    def __init__(self, path: Path | None, target: str, epochs: int, title: str, progress: bool = True):
        self.path, self.target, self.epochs, self.title = path, target, epochs, title
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
        if "mAP" in row:
            msg += f"  {self.target} mAP {100 * row['mAP']:.1f} rank-1 {100 * row['rank1']:.1f}"
        log.info(msg)
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row["epoch"])
        save_plot(history, self.path / "metrics.png", self.title)

    def finish(self, history: list[dict]) -> None:
        if self.path is None:
            return
        print_table(history, self.target)
        if self.writer is not None:
            self.writer.close()


def save_plot(history: list[dict], path: Path, title: str) -> None:
    """mAP and rank-1 on the target over epochs, as a PNG beside metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in history if "mAP" in h]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in rows]
    ax.plot(epochs, [100 * h["mAP"] for h in rows], marker="o", label="mAP")
    ax.plot(epochs, [100 * h["rank1"] for h in rows], marker="s", label="rank-1")
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl from a checkpoint's history (atomically): a resumed run continues a log
    that matches its checkpoint, whichever checkpoint it resumed from."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    tmp.replace(path)


def print_table(history: list[dict], target: str) -> None:
    rows = [h for h in history if "mAP" in h]
    if not rows:
        return
    print(f"\nTarget {target}: epoch | mAP | rank-1 | rank-5 | rank-10")
    for h in rows:
        print(f"  {h['epoch']:5d} | {100 * h['mAP']:5.1f} | {100 * h['rank1']:6.1f} | "
              f"{100 * h['rank5']:6.1f} | {100 * h['rank10']:7.1f}")
    best = max(rows, key=lambda h: h["mAP"])
    print(f"  best: epoch {best['epoch']}, mAP {100 * best['mAP']:.1f}, rank-1 {100 * best['rank1']:.1f}")

