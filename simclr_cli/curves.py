"""Training curves of a pretrain run: the per-epoch kNN monitor and curves.png (loss, learning rate, kNN).

matplotlib (and the evaluation modules) are imported inside the functions that use them, so that
importing the CLI stays fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from simclr_cli.files import read_json_lines

CURVES_FILE = "curves.png"
CURVES_SIZE = (1200, 360)  # pixels (width, height) of curves.png: three panels side by side
_DPI = 100
MONITOR_K = 20  # neighbours that vote in the monitor's kNN (evaluate.KNN_KS[0], as linear-eval reports)
MONITOR_WORKERS_ABOVE = 1000  # loader processes only pay off for monitor folders larger than this
MONITOR_SETS = ("reference", "query")  # its two halves, as its messages call them: kNN votes, then the voted-on


class KnnMonitor:
    """A quick frozen-feature kNN on a small labelled folder, measured at the end of every epoch.

    The usual way to watch self-supervised training (Wu et al. 2018, arXiv 1805.01978; the kNN
    monitor of MoCo and DINO): the folder's images are split 80/20 per class (seeded), and each
    held-out image is classified by the weighted vote of its 20 most similar training images, with
    features from the current backbone under its evaluation preprocessing. Cheap enough to run
    every epoch, and it needs no training, so it moves only when the representation does.
    """

    def __init__(self, folder: str | Path, device, precision, seed: int = 0, workers: int = 0,
                 report: Callable[..., None] = lambda kind, **fields: None, run_dir: str | Path | None = None):
        from simclr_cli.evaluate import report_data
        from simclr_cli.labels import load_labelled

        self.folder = Path(folder)
        # One-line errors, before training. The run's own folder, new and maybe inside the folder, is no class.
        self.data = load_labelled(self.folder, seed=seed, flag="--monitor", exclude=run_dir)
        self.device, self.precision, self.report = device, precision, report
        self.paths = self.data.train.paths + self.data.val.paths
        self.workers = workers if len(self.paths) > MONITOR_WORKERS_ABOVE else 0
        self._skipped: set[str] = set()  # files found unreadable when decoded, reported once
        report_data(self.data, report, "kNN monitor: ", MONITOR_SETS)

    def measure(self, backbone, info) -> float:
        """kNN top-1 accuracy in [0, 1] of the held-out images, with `backbone`'s current features; DataError
        when no reference or no query image could be decoded."""
        from simclr_cli.evaluate import knn_scores, split_features
        from simclr_cli.features import compute_features

        was_training = backbone.training
        features, kept, skipped = compute_features(backbone, info, self.paths, self.device, self.precision,
                                                   workers=self.workers)
        backbone.train(was_training)
        for item in skipped:  # the scan reads headers only: a truncated file fails here, the first time
            if item.path not in self._skipped:
                self._skipped.add(item.path)
                self.report("warning", text=f"kNN monitor: skipped {item.path}: {item.reason}")
        train_x, train_y, val_x, val_y = split_features(self.data, features, kept, MONITOR_SETS)
        scores = knn_scores(train_x, train_y, val_x, len(self.data.classes), MONITOR_K)  # (Q, C)
        return (scores.argmax(1) == val_y).double().mean().item()

    def log_epoch(self, run_dir: Path, backbone, info, epoch: int, step: int) -> float | None:
        """Measure, append {"step", "epoch", "knn_top1"} to the run's metrics.jsonl, and return the accuracy;
        None, with a warning, when the folder gave nothing to measure (the run goes on without the monitor).

        The record carries the step at which it was taken, so a resumed run's log is cut at the
        checkpoint's step like the step records.
        """
        from simclr_cli.errors import DataError, WorkerDied

        try:
            accuracy = self.measure(backbone, info)
        except DataError as error:  # a monitor must never cost a run its epoch or its encoder
            self.report("warning", text=f"kNN monitor: {self.folder}: {error}; the run goes on without it")
            return None
        except RuntimeError as error:
            if (how := WorkerDied.how(error)) is None:
                raise
            self.report("warning", text=f"kNN monitor: a loader worker died ({how}), perhaps out of memory; the run "
                                        f"goes on without the monitor")
            return None
        with open(Path(run_dir) / "metrics.jsonl", "a") as log:
            log.write(json.dumps({"step": step, "epoch": epoch, "knn_top1": accuracy}) + "\n")
        return accuracy


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, which hold a loss; epoch records, which hold knn_top1) of a metrics.jsonl."""
    steps, epochs = [], []
    for record in read_json_lines(path):
        if "loss" in record:
            steps.append(record)
        elif "knn_top1" in record:
            epochs.append(record)
    return steps, epochs


def draw_curves(metrics: str | Path, out: str | Path, monitored: bool = False) -> Path:
    """Write curves.png: loss and learning rate per step, kNN top-1 per epoch (when `monitored`)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from simclr_cli.files import atomic_path

    steps, epochs = read_metrics(metrics)
    figure = Figure(figsize=(CURVES_SIZE[0] / _DPI, CURVES_SIZE[1] / _DPI), dpi=_DPI, layout="constrained")
    loss_axes, lr_axes, knn_axes = figure.subplots(1, 3)
    step_numbers = [record["step"] for record in steps]
    marker = "o" if len(steps) == 1 else None  # a line of one point is not drawn
    loss_axes.plot(step_numbers, [record["loss"] for record in steps], linewidth=1, marker=marker)
    loss_axes.set(title="NT-Xent loss", xlabel="step")
    lr_axes.plot(step_numbers, [record["lr"] for record in steps], linewidth=1, color="tab:orange", marker=marker)
    lr_axes.set(title="learning rate", xlabel="step")
    for axes in (loss_axes, lr_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if epochs:
        knn_axes.plot([record["epoch"] for record in epochs], [100 * record["knn_top1"] for record in epochs],
                      marker="o", color="tab:green")
        knn_axes.set(title=f"kNN top-1 (k = {MONITOR_K})", xlabel="epoch", ylabel="%")
        knn_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        knn_axes.set(title="kNN top-1", xticks=[], yticks=[])
        text = "no epoch measured yet" if monitored else "pass --monitor DIR\n(a small labelled folder)"
        knn_axes.text(0.5, 0.5, text, ha="center", va="center", transform=knn_axes.transAxes, color="grey")
    for axes in (loss_axes, lr_axes, knn_axes):
        axes.grid(alpha=0.3)
    out = Path(out)
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=_DPI)
    return out


class CurvesWriter:
    """Draws a run's curves.png at the end of the run, and at checkpoints at most every `interval` seconds."""

    def __init__(self, run_dir: str | Path, report: Callable[..., None], interval: float = 60.0,
                 monitored: bool = False):
        self.run_dir, self.monitored = Path(run_dir), monitored
        self.report = report
        self.interval = interval
        self._last = time.monotonic()

    def draw(self, final: bool = False) -> None:
        if not final and time.monotonic() - self._last < self.interval:
            return
        try:
            draw_curves(self.run_dir / "metrics.jsonl", self.run_dir / CURVES_FILE, self.monitored)
        except Exception as error:  # a plot must never cost a run its encoder
            self.report("warning", text=f"could not draw {self.run_dir / CURVES_FILE}: {error}")
        self._last = time.monotonic()
