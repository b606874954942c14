"""The figures, one of each kind. Built without pyplot (no global figure state; an Agg canvas each), so
a training process, a script and a notebook draw them alike.

- ``plot_sweep_grid``: the Figure-5 grid, one column per run (class loss, box loss, mIoU). The sweep
  report's ``report.png`` draws the train losses as metrics.csv's epoch means; the results page and the
  notebook as every step's loss from the event files (``per_step=True``, smoothed as TensorBoard does);
- ``draw_loss_panel``: the learning-curve panel (train and val class and box losses by epoch, the
  run's findings marked), in ``plot_learning_curves`` (a run's ``plots/curves.png``,
  ``scripts/plot_run.py``: with val recall / precision / mIoU / AP50) and ``plot_stage_run`` (the
  results page: with the false positives and mIoU);
- ``plot_ap_against_box_weight``: WIDER easy / medium / hard AP of each sweep against the box weight.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from detlab.analysis._values import as_float
from detlab.analysis.runs import RunResult, by_box_weight, history_series, step_series
from detlab.analysis.tables import format_counts, status_text
from detlab.run_record import RunStatus
from detlab.runtime.fileio import atomic_binary_writer

STATUS_COLORS: dict[RunStatus, str] = {
    RunStatus.COMPLETED: "#1e1e1e", RunStatus.DIVERGED: "#c0392b", RunStatus.FAILED: "#c0392b",
    RunStatus.STOPPED: "#d35400", RunStatus.RUNNING: "#2471a3",
    RunStatus.INTERRUPTED: "#7d3c98",  # to be resumed
}
UNKNOWN_COLOR = "#7f8c8d"
FAILED_COLOR = STATUS_COLORS[RunStatus.FAILED]
FAILED_FACE = "#fdecea"  # the tint of a diverged or failed run's panels
TRAIN_COLOR, VAL_COLOR, MIOU_COLOR, TEST_COLOR = "#1f77b4", "#ff7f0e", "#2ca02c", "#8e44ad"
SMOOTHING = 0.8  # exponential moving average of the per-step losses, as TensorBoard's slider

# The grid's rows: (label, train column, val column). The losses are unweighted, so runs compare directly.
GRID_ROWS = (
    ("class loss", "train/loss_cls", "val/loss_cls"),
    ("box loss", "train/loss_box", "val/loss_box"),
    ("mIoU", None, "val/miou"),
)
MAX_COLUMNS = 9  # wider sweeps wrap onto further bands of rows
GRID_DPI = 110

# The learning-curve panel's lines: (metrics.csv column, style); class C0, box C1, train solid, val dashed.
LOSS_CURVES = (("train/loss_cls", "C0-"), ("val/loss_cls", "C0--"), ("train/loss_box", "C1-"), ("val/loss_box", "C1--"))
VAL_METRICS = ("val/recall", "val/precision", "val/miou", "val/ap50")


# ------------------------------------------------------------------------------------------ canvas
def new_figure(width: float, height: float, dpi: float = 80) -> Figure:
    """A figure on its own Agg canvas; constrained layout keeps titles and legends outside the panels."""
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_png(fig: Figure, path: Path | str) -> Path:
    """Write the figure as a PNG atomically (the folder is made if needed)."""
    path = Path(path)
    with atomic_binary_writer(path, fsync=False) as handle:
        fig.savefig(handle, format="png")
    return path


def smooth(values: np.ndarray, weight: float = SMOOTHING) -> np.ndarray:
    """Exponential moving average with TensorBoard's debiasing; non-finite values are skipped."""
    out, last, count = np.full(len(values), np.nan), 0.0, 0
    for index, value in enumerate(values):
        if not math.isfinite(value):
            continue
        last, count = last * weight + (1 - weight) * value, count + 1
        out[index] = last / (1 - weight ** count)
    return out


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if math.isfinite(v)]


# ------------------------------------------------------------------------------------------ Figure-5 grid
def plot_sweep_grid(runs: Sequence[RunResult], title: str = "", per_step: bool = False) -> Figure:
    """The Figure-5 grid: one column per run in order of box weight (class loss, box loss, mIoU by epoch).

    Train losses are metrics.csv's epoch means, or with ``per_step`` every step's loss from the run's
    event files (faint, and smoothed; a run without event files keeps its epoch means); val per epoch
    as dots; the after-training test's mIoU as a star. A row's panels share their limits (log scale
    when the losses span more than 20x). Diverged and failed runs get a red title, frame and tint and a
    red dotted line where they stopped. More than ``MAX_COLUMNS`` runs wrap onto further bands.
    """
    runs = by_box_weight(runs)
    if not runs:  # a sweep that has not started a run yet: a placeholder, not an error
        fig = new_figure(6.0, 1.5, dpi=GRID_DPI)
        fig.text(0.5, 0.5, f"{title or 'sweep'}\nno run directories yet", ha="center", va="center", fontsize=10)
        return fig
    bands = math.ceil(len(runs) / MAX_COLUMNS)
    ncols = math.ceil(len(runs) / bands)  # balanced bands: 12 runs are 2 x 6, not 9 + 3
    width, height = max(6.0, 1.9 * ncols + 1.3), 1.75 * len(GRID_ROWS) * bands + 1.4
    fig = new_figure(width, height, dpi=GRID_DPI)
    axes = fig.subplots(len(GRID_ROWS) * bands, ncols, squeeze=False, sharex=True)

    known = sorted(v for v in (run.steps_per_epoch() for run in runs) if v)
    sweep_steps_per_epoch = known[len(known) // 2] if known else None  # for a run that ended in its first epoch
    steps_per_epoch = [run.steps_per_epoch() or sweep_steps_per_epoch for run in runs]
    train = [_train_curves(run, per_step, spe) for run, spe in zip(runs, steps_per_epoch)]
    limits = {train_key: _loss_limits([curves[train_key][1] for curves in train]
                                      + [run.series(val_key)[1] for run in runs])
              for _, train_key, val_key in GRID_ROWS if train_key}
    tests = [float(run.test["miou"]) for run in runs if run.test.get("miou") is not None]
    miou_top = max([v for run in runs for v in _finite(run.series("val/miou")[1])] + tests + [0.0])
    miou_limits = (0.0, max(0.05, miou_top * 1.15))
    stepwise = any(smoothed is not None for curves in train for _, _, smoothed in curves.values())
    x_max = max([run.epochs_planned or 0 for run in runs] + [run.epochs for run in runs] + [1])
    x_limits = (0.0 if stepwise else 0.5, x_max + 0.5)  # steps start at 0, the first epoch's mean is at 1

    for index in range(ncols * bands):
        band, column = divmod(index, ncols)
        column_axes = [axes[band * len(GRID_ROWS) + r][column] for r in range(len(GRID_ROWS))]
        if index >= len(runs):
            for ax in column_axes:
                ax.set_visible(False)
            continue
        run = runs[index]
        color = STATUS_COLORS.get(run.status, UNKNOWN_COLOR)
        for r, (ax, (label, train_key, val_key)) in enumerate(zip(column_axes, GRID_ROWS)):
            if train_key:
                x, y, smoothed = train[index][train_key]
                if smoothed is None:
                    ax.plot(x, y, color=TRAIN_COLOR, lw=1.4, marker="." if run.epochs < 3 else None)
                else:
                    ax.plot(x, y, color=TRAIN_COLOR, lw=0.5, alpha=0.25)
                    ax.plot(x, smoothed, color=TRAIN_COLOR, lw=1.2)
                ax.plot(*run.series(val_key), "o--", color=VAL_COLOR, ms=3, lw=1.2)
                _loss_axis(ax, *limits[train_key])
            else:
                ax.plot(*run.series(val_key), "o-", color=MIOU_COLOR, ms=3, lw=1.4)
                if run.test.get("miou") is not None:
                    ax.plot([run.epochs], [float(run.test["miou"])], "*", color=TEST_COLOR, ms=9)
                ax.set_ylim(*miou_limits)
                # the mIoU of best.pt's epoch (early_stopping.monitor picks it), which need not be the highest
                best, best_epoch = as_float(run.best.get("val/miou")), run.best.get("epoch")
                if best is not None and math.isfinite(best) and best_epoch is not None:
                    ax.text(0.04, 0.93, f"best ep {int(best_epoch)}: {best:.3f}", fontsize=7, va="top",
                            transform=ax.transAxes)
            ax.set_xlim(*x_limits)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
            ax.grid(True, which="major", alpha=0.3, lw=0.5)
            ax.tick_params(labelsize=7)
            if column == 0:
                ax.set_ylabel(label, fontsize=9)
            else:
                ax.tick_params(labelleft=False, which="both")
            if r == len(GRID_ROWS) - 1:
                ax.set_xlabel("epoch", fontsize=8)
                ax.tick_params(labelbottom=True)
            if run.failed:
                ax.set_facecolor(FAILED_FACE)
                for spine in ax.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(2.0)
                stop = _stop_epoch(run, steps_per_epoch[index])
                if stop is not None:
                    ax.axvline(stop, color=color, ls=":", lw=1.5)
            if not run.history:
                ax.text(0.5, 0.5, "no epoch\nfinished", ha="center", va="center", fontsize=8,
                        color=color, transform=ax.transAxes)
        column_axes[0].set_title(f"{run.weight_label}\n{status_text(run, compact=True)}", fontsize=9, color=color,
                                 fontweight="bold" if run.failed else "normal")

    handles = [Line2D([], [], color=TRAIN_COLOR, lw=1.4, label="train (per step, smoothed)" if stepwise else "train"),
               Line2D([], [], color=VAL_COLOR, lw=1.2, ls="--", marker="o", ms=3, label="val (per epoch)"),
               Line2D([], [], color=MIOU_COLOR, lw=1.4, marker="o", ms=3, label="val mIoU")]
    if tests:
        handles.append(Line2D([], [], color=TEST_COLOR, ls="", marker="*", ms=9, label="test mIoU (eval.input_size)"))
    if any(run.failed for run in runs):
        handles.append(Line2D([], [], color=FAILED_COLOR, lw=1.5, ls=":", label="stopped (diverged/failed)"))
    title = title or format_counts(runs)
    if len(title) * 0.085 > width:  # about 0.085 in per character at 10 pt: break before the counts
        title = title.replace(": ", ":\n", 1)
    fig.suptitle(title, fontsize=10)
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles) if width >= 7 else 2, fontsize=8,
               frameon=False)
    return fig


def _train_curves(run: RunResult, per_step: bool, steps_per_epoch: Optional[float]
                  ) -> dict[str, tuple[Sequence[float], Sequence[float], Optional[np.ndarray]]]:
    """Per train column of the grid: ``(epochs, values, smoothed)``; ``smoothed`` is None for epoch means."""
    steps = step_series(run.path) if per_step and steps_per_epoch else {}
    curves = {}
    for _, key, _ in GRID_ROWS:
        if key is None:
            continue
        if key in steps:
            x, y = steps[key]
            curves[key] = (x / steps_per_epoch, y, smooth(y))
        else:
            curves[key] = (*run.series(key), None)
    return curves


def _loss_limits(series: Sequence[Sequence[float]]) -> tuple[bool, Optional[tuple[float, float]]]:
    """Shared y-limits of a loss row: ``(log scale, limits)``; log when the values span more than 20x."""
    values = [v for values in series for v in _finite(values) if v > 0]
    if not values:
        return False, None
    low, high = min(values), max(values)
    if high / low > 20:
        return True, (low / 1.5, high * 1.5)
    return False, (0.0, high * 1.1)


def _loss_axis(ax: Axes, log_scale: bool, limits: Optional[tuple[float, float]]) -> None:
    if log_scale:
        _log_axis(ax)
    if limits:
        ax.set_ylim(*limits)


def _log_axis(ax: Axes) -> None:
    """A log y axis labelled with plain numbers at 1, 2, 5 x 10^k (a loss spans a few of them)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _stop_epoch(run: RunResult, steps_per_epoch: Optional[float]) -> Optional[float]:
    """Where (in epochs) a diverged or failed run stopped: its step over the steps per epoch, not before
    its last finished epoch."""
    if run.step is not None and steps_per_epoch:
        return max(run.step / steps_per_epoch, float(run.epochs))
    if run.history:
        return float(run.epochs) + 0.5
    return 0.0 if run.step is not None else None


# ------------------------------------------------------------------------------------------ learning curves
def draw_loss_panel(ax: Axes, history: Sequence[Mapping[str, float]],
                    findings: Sequence[Mapping[str, Any]] = ()) -> None:
    """The learning-curve panel: train (solid) and val (dashed) class and box losses by epoch,
    unweighted (runs with other weights compare), log scale; each finding a dotted line at its epoch,
    named."""
    for key, style in LOSS_CURVES:
        ax.plot(*history_series(history, key), style, lw=1.3, marker="." if len(history) < 3 else None, label=key)
    _log_axis(ax)
    ax.set_title("losses (unweighted)", fontsize=9)
    _epoch_axis(ax, findings, named=True)
    ax.legend(fontsize=7)


def _epoch_axis(ax: Axes, findings: Sequence[Mapping[str, Any]], named: bool = False) -> None:
    """An epoch x axis with the findings as dotted lines (``named``: the detector written along each)."""
    ax.set_xlabel("epoch", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3, lw=0.5)
    ax.tick_params(labelsize=7)
    for finding in findings:
        if finding.get("epoch") is None:
            continue
        epoch = float(finding["epoch"])
        ax.axvline(epoch, color=UNKNOWN_COLOR, ls=":", lw=1.0)
        if named:
            ax.text(epoch, 1.0, f" {finding.get('detector')}", rotation=90, fontsize=7, va="top",
                    transform=ax.get_xaxis_transform(), color="#555555")


def plot_learning_curves(history: Sequence[Mapping[str, float]], title: str,
                         findings: Sequence[Mapping[str, Any]] = ()) -> Figure:
    """A run's learning curves: the loss panel, and val recall / precision / mIoU / AP50 by epoch."""
    fig = new_figure(11.0, 4.0, dpi=90)
    losses, metrics = fig.subplots(1, 2)
    draw_loss_panel(losses, history, findings)
    for key in VAL_METRICS:
        metrics.plot(*history_series(history, key), marker=".", label=key)
    metrics.set_ylim(0, 1)
    metrics.set_title("val metrics at the score threshold, IoU 0.5 (AP50: all scores)", fontsize=9)
    _epoch_axis(metrics, findings)
    metrics.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def learning_curves_png(history: Sequence[Mapping[str, float]], title: str,
                        findings: Sequence[Mapping[str, Any]] = ()) -> bytes:
    """``plot_learning_curves`` as PNG bytes: a run's ``plots/curves.png``."""
    return figure_png(plot_learning_curves(history, title, findings))


def plot_stage_run(run: RunResult, title: str = "") -> Figure:
    """One run by epoch: the loss panel (left); val false positives overall and the small ones
    (``val/fp_small_share``), and val mIoU (right); its findings as vertical lines."""
    fig = new_figure(9.0, 3.4)
    losses, fps = fig.subplots(1, 2)
    draw_loss_panel(losses, run.history, run.findings)
    epochs, fp = run.series("val/fp")
    fps.plot(epochs, fp, "C3-", lw=1.3, label="val FP (score 0.5)")
    share = run.series("val/fp_small_share")[1]
    if len(share) == len(fp):
        fps.plot(epochs, [f * s for f, s in zip(fp, share)], "C3:", lw=1.3, label="small FP (under 16 px)")
    fps.set_yscale("symlog", linthresh=10)
    miou = fps.twinx()
    miou.plot(*run.series("val/miou"), "C2-", lw=1.3, label="val mIoU")
    miou.set_ylim(0, max([0.05] + _finite(run.series("val/miou")[1])) * 1.2)
    fps.set_title("false positives and mIoU", fontsize=9)
    _epoch_axis(fps, run.findings)
    handles = fps.get_legend_handles_labels()[0] + miou.get_legend_handles_labels()[0]
    fps.legend(handles=handles, fontsize=7, loc="upper left")
    fig.suptitle(title or run.name, fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------ quality
def plot_ap_against_box_weight(sweeps: Sequence[tuple[str, Sequence[RunResult]]]) -> Figure:
    """WIDER easy / medium / hard AP (after-training test) against the box weight, one panel per
    sweep; a run that diverged or failed is a red cross on the axis."""
    fig = new_figure(4.2 * max(len(sweeps), 1) + 0.4, 3.4)
    axes = fig.subplots(1, max(len(sweeps), 1), squeeze=False, sharey=True)[0]
    for ax, (label, runs) in zip(axes, sweeps):
        runs = [r for r in by_box_weight(runs) if r.box_weight is not None and r.box_weight > 0]
        for key, color in (("wider_easy", "#2471a3"), ("wider_medium", "#27ae60"), ("wider_hard", "#d35400")):
            points = [(r.box_weight, 100 * float(r.test[key])) for r in runs if r.test.get(key) is not None]
            if points:
                ax.plot(*zip(*points), "o-", color=color, lw=1.4, ms=4, label=key.removeprefix("wider_"))
        failed = [r.box_weight for r in runs if r.failed or r.test.get("wider_medium") is None]
        if failed:
            ax.plot(failed, [0.0] * len(failed), "x", color=FAILED_COLOR, ms=8, mew=2,
                    label="no test (diverged / failed)")
        ax.set_xscale("log")
        ax.set_xlabel("box weight (class weight 1)", fontsize=9)
        ax.set_title(label, fontsize=9)
        ax.grid(True, which="major", alpha=0.3, lw=0.5)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("WIDER FACE AP (%)", fontsize=9)
    axes[0].legend(fontsize=7)
    return fig
