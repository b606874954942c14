"""The results page of the paper's experiment (``docs/results.md``), regenerated from run folders.

``python scripts/results_page.py`` is the command; ``notebooks/sweep_analysis.ipynb`` draws the same
figures. Everything here reads what the runs wrote (summary.json with its after-training ``test``,
metrics.csv, the TensorBoard event files for per-step losses) through ``detlab.report``:

- ``plot_sweep_steps``: the Figure-5 grid, one column per weight pair (class loss, box loss per
  step; val mIoU per epoch, the after-training test's mIoU as a star);
- ``plot_ap_against_box_weight``: WIDER easy / medium / hard AP of each sweep against the box weight;
- ``plot_stage_run``: one run's losses and false positives by epoch, its findings marked;
- ``sweep_table``, ``remedy_table``, ``wall_times_table``, ``findings_list``: the page's tables;
- ``replace_blocks``: puts generated text between ``<!-- results:NAME -->`` and
  ``<!-- /results:NAME -->`` markers, leaving the hand-written text around them alone.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from omegaconf import OmegaConf

from detlab.report import _STATUS_COLORS, RunResult, compact_findings, format_counts, format_value, load_run

STEP_KEYS = ("train/loss_cls", "train/loss_box")
SMOOTHING = 0.8  # exponential moving average of the per-step losses, as TensorBoard's slider


# ------------------------------------------------------------------------------------------ reading
def step_series(run_dir: Path | str, tags: Sequence[str] = STEP_KEYS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-step scalars of a run from its TensorBoard event files: ``{tag: (steps, values)}``.

    A resumed run has several event files; a step logged twice keeps its last value. Missing event
    files or tags give no entry (the caller falls back to metrics.csv's per-epoch means).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    series: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        try:
            accumulator.Reload()
        except Exception:  # a truncated file of a killed run: use what the other files hold
            continue
        available = set(accumulator.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                series[tag].update({event.step: event.value for event in accumulator.Scalars(tag)})
    return {tag: (np.array(sorted(values)), np.array([values[s] for s in sorted(values)]))
            for tag, values in series.items() if values}


def smooth(values: np.ndarray, weight: float = SMOOTHING) -> np.ndarray:
    """Exponential moving average with TensorBoard's debiasing; non-finite values are skipped."""
    out, last, count = np.full(len(values), np.nan), 0.0, 0
    for index, value in enumerate(values):
        if not math.isfinite(value):
            continue
        last, count = last * weight + (1 - weight) * value, count + 1
        out[index] = last / (1 - weight ** count)
    return out


def by_box_weight(runs: Sequence[RunResult]) -> list[RunResult]:
    """Runs in order of box weight (unknown weights last, by name)."""
    return sorted(runs, key=lambda r: (r.box_weight is None, r.box_weight or 0.0, r.name))


def steps_per_epoch(run: RunResult) -> Optional[float]:
    """From the run's step and epoch counts (None before its first epoch)."""
    epochs = [row.get("epoch", math.nan) for row in run.history]
    steps = [row.get("step", math.nan) for row in run.history]
    if epochs and math.isfinite(epochs[0]) and math.isfinite(steps[0]) and epochs[0] > 0:
        return steps[0] / epochs[0]
    return None


def run_command(run: RunResult) -> str:
    """``python train.py <overrides>`` that trained the run (as Hydra recorded them)."""
    return "python train.py " + " ".join(shlex.quote(o) for o in run.overrides)


def sweep_command(sweep_dir: Path | str) -> Optional[str]:
    """``python train.py -m ...`` that made a sweep, from Hydra's ``multirun.yaml`` in its folder."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    record = OmegaConf.load(path)
    task = OmegaConf.select(record, "hydra.overrides.task", default=None)
    if task is None:
        return None
    launcher = OmegaConf.select(record, "hydra.overrides.hydra", default=None) or []
    items = [str(o) for o in task] + [str(o) for o in launcher if not str(o).startswith("hydra.mode")]
    return "python train.py -m " + " ".join(shlex.quote(o) for o in items)


def sweep_elapsed_s(runs: Sequence[RunResult]) -> Optional[float]:
    """First run's start (its ``.hydra`` record) to the last run's end (its summary.json), seconds."""
    starts = [p.stat().st_mtime for r in runs for p in [r.path / ".hydra" / "hydra.yaml"] if p.is_file()]
    ends = [p.stat().st_mtime for r in runs for p in [r.path / "summary.json"] if p.is_file()]
    return max(ends) - min(starts) if starts and ends else None


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {secs:02d} s"


# ------------------------------------------------------------------------------------------ tables
def _pct(value: Any) -> str:
    return "-" if value is None or not math.isfinite(float(value)) else f"{100 * float(value):.1f}"


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    value = float(value)
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def _counts(test: dict[str, Any]) -> str:
    if not all(k in test for k in ("tp", "fp", "fn")):
        return "-"
    return " / ".join(f"{int(test[k]):,}" for k in ("tp", "fp", "fn"))


def _stage_losses(run: RunResult, key: str) -> str:
    return " / ".join(_num(run.stages.get(stage, {}).get(key), 2) for stage in ("early", "mid", "late"))


def _status(run: RunResult) -> str:
    status = run.status.upper() if run.failed else run.status
    # the step the divergence check named (the run's own step counter is one past it)
    named = [f.get("step") for f in run.findings if f.get("detector") == "divergence" and f.get("step") is not None]
    step = named[0] if named else run.step
    if run.failed and step is not None:
        status += f" at step {step}"
    if run.status != "completed":
        status += f" (epoch {run.epochs}/{run.epochs_planned or '?'})"
    return status


def quality_cells(run: RunResult) -> list[str]:
    """Easy, medium, hard AP (%), recall, precision, TP / FP / FN and mIoU of the after-training test."""
    t = run.test
    return [_pct(t.get("wider_easy")), _pct(t.get("wider_medium")), _pct(t.get("wider_hard")),
            _num(t.get("recall")), _num(t.get("precision")), _counts(t), _num(t.get("miou"))]


QUALITY_HEADER = ["easy AP", "medium AP", "hard AP", "recall@0.5", "precision", "TP / FP / FN", "mIoU"]


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def sweep_table(runs: Sequence[RunResult]) -> str:
    """One row per weight pair: status, test quality, per-stage unweighted losses, findings, wall time."""
    header = ["box weight", "status", *QUALITY_HEADER, "cls loss early / mid / late",
              "box loss early / mid / late", "findings", "wall time"]
    rows = [[format_value(r.box_weight), _status(r), *quality_cells(r), _stage_losses(r, "loss_cls"),
             _stage_losses(r, "loss_box"), compact_findings(r.findings) or "none", format_duration(r.wall_time_s)]
            for r in by_box_weight(runs)]
    return _markdown(header, rows)


def remedy_label(run: RunResult) -> str:
    """``NAME`` of the run's ``+remedy=NAME`` override; ``none`` for a run without one (the baseline,
    e.g. the sweep's own run of the pair)."""
    for override in run.overrides:
        if override.lstrip("+").startswith("remedy="):
            return override.split("=", 1)[1]
    return "none"


def remedy_table(runs: Sequence[RunResult], baseline: str = "none") -> str:
    """One row per remedy (the baseline first) with the change in medium AP against the baseline."""
    ordered = sorted(runs, key=lambda r: (remedy_label(r) != baseline, remedy_label(r)))
    base = next((r for r in ordered if remedy_label(r) == baseline), None)
    base_medium = base.test.get("wider_medium") if base else None
    header = ["remedy", "box weight", "status", *QUALITY_HEADER, "medium AP change", "findings"]
    rows = []
    for run in ordered:
        medium = run.test.get("wider_medium")
        change = ("-" if run is base or medium is None or base_medium is None
                  else f"{100 * (float(medium) - float(base_medium)):+.1f}")
        rows.append([remedy_label(run), format_value(run.box_weight), _status(run), *quality_cells(run), change,
                     compact_findings(run.findings) or "none"])
    return _markdown(header, rows)


def findings_list(run: RunResult) -> str:
    """The run's findings, one line each with stage, epoch and the detector's message."""
    if not run.findings:
        return "_no findings_"
    lines = []
    for finding in run.findings:
        place = ", ".join(f"{k} {finding[k]}" for k in ("stage", "epoch", "step") if finding.get(k) is not None)
        lines.append(f"- **{finding.get('detector', '?')}** ({place}): {finding.get('message', '')}")
    return "\n".join(lines)


def wall_times_table(groups: Sequence[tuple[str, Sequence[RunResult], Optional[str]]]) -> str:
    """Per group (label, runs, command): runs, elapsed from first start to last end, summed run time."""
    header = ["what", "runs", "elapsed", "sum of run wall times", "per run (mean)", "command"]
    rows = []
    for label, runs, command in groups:
        total = sum(r.wall_time_s or 0.0 for r in runs)
        rows.append([label, str(len(runs)), format_duration(sweep_elapsed_s(runs)), format_duration(total),
                     format_duration(total / len(runs) if runs else None), f"`{command}`" if command else "-"])
    return _markdown(header, rows)


# ------------------------------------------------------------------------------------------ figures
def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_sweep_steps(runs: Sequence[RunResult], title: str = "") -> Figure:
    """The Figure-5 grid: per weight pair, the class and box loss of every step (unweighted, smoothed;
    val per epoch as dots), and val mIoU per epoch with the after-training test's mIoU as a star.

    Runs without event files fall back to metrics.csv's per-epoch train means."""
    runs = by_box_weight(runs)
    n = max(len(runs), 1)
    fig = _new_figure(max(6.0, 1.55 * n + 0.9), 5.2)
    axes = fig.subplots(3, n, squeeze=False, sharex="col", sharey="row")
    tests = [float(r.test["miou"]) for r in runs if r.test.get("miou") is not None]
    miou_top = max([0.05, *tests] + [v for r in runs for v in r.series("val/miou")[1] if math.isfinite(v)]) * 1.15
    rows = (("class loss", "train/loss_cls", "val/loss_cls"), ("box loss", "train/loss_box", "val/loss_box"),
            ("mIoU", None, "val/miou"))
    known = sorted(v for v in (steps_per_epoch(r) for r in runs) if v)
    fallback = known[len(known) // 2] if known else 1.0  # a run that ended in its first epoch: its sweep's
    for column, run in enumerate(runs):
        per_epoch = steps_per_epoch(run) or fallback
        steps = step_series(run.path)
        color = _STATUS_COLORS.get(run.status, "#7f8c8d")
        for r, (label, train_key, val_key) in enumerate(rows):
            ax = axes[r][column]
            if train_key:
                if train_key in steps:
                    x, y = steps[train_key]
                    ax.plot(x / per_epoch, y, color="#1f77b4", lw=0.5, alpha=0.25)
                    ax.plot(x / per_epoch, smooth(y), color="#1f77b4", lw=1.2)
                else:
                    ax.plot(*run.series(train_key), color="#1f77b4", lw=1.2)
                ax.plot(*run.series(val_key), "o--", color="#ff7f0e", ms=3, lw=1.0)
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            else:
                ax.plot(*run.series(val_key), "o-", color="#2ca02c", ms=3, lw=1.2)
                if run.test.get("miou") is not None:
                    ax.plot([run.epochs], [float(run.test["miou"])], "*", color="#8e44ad", ms=9)
                ax.set_ylim(0, miou_top)
                ax.set_xlabel("epoch", fontsize=8)
            if run.failed:
                ax.set_facecolor("#fdecea")
                if run.step is not None:
                    ax.axvline(run.step / per_epoch, color=color, ls=":", lw=1.5)
            ax.grid(True, alpha=0.3, lw=0.5)
            ax.tick_params(labelsize=7)
            if column == 0:
                ax.set_ylabel(label, fontsize=9)
            else:
                ax.tick_params(labelleft=False, which="both")
        axes[0][column].set_title(f"box {format_value(run.box_weight)}\n{_status(run)}", fontsize=8, color=color)
    handles = [axes[0][0].plot([], [], color="#1f77b4", label="train (per step, smoothed)")[0],
               axes[0][0].plot([], [], "o--", color="#ff7f0e", ms=3, label="val (per epoch)")[0],
               axes[0][0].plot([], [], "o-", color="#2ca02c", ms=3, label="val mIoU (training size)")[0],
               axes[0][0].plot([], [], "*", color="#8e44ad", ms=9, label="test mIoU (eval.input_size)")[0]]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title or format_counts(runs), fontsize=10)
    return fig


def plot_ap_against_box_weight(sweeps: Sequence[tuple[str, Sequence[RunResult]]]) -> Figure:
    """WIDER easy / medium / hard AP (after-training test) against the box weight, one panel per
    sweep; a run that diverged or failed is a red cross on the axis."""
    fig = _new_figure(4.2 * max(len(sweeps), 1) + 0.4, 3.4)
    axes = fig.subplots(1, max(len(sweeps), 1), squeeze=False, sharey=True)[0]
    for ax, (label, runs) in zip(axes, sweeps):
        runs = [r for r in by_box_weight(runs) if r.box_weight is not None and r.box_weight > 0]
        for key, color in (("wider_easy", "#2471a3"), ("wider_medium", "#27ae60"), ("wider_hard", "#d35400")):
            points = [(r.box_weight, 100 * float(r.test[key])) for r in runs if r.test.get(key) is not None]
            if points:
                ax.plot(*zip(*points), "o-", color=color, lw=1.4, ms=4, label=key.removeprefix("wider_"))
        failed = [r.box_weight for r in runs if r.failed or r.test.get("wider_medium") is None]
        if failed:
            ax.plot(failed, [0.0] * len(failed), "x", color=_STATUS_COLORS["diverged"], ms=8, mew=2,
                    label="no test (diverged / failed)")
        ax.set_xscale("log")
        ax.set_xlabel("box weight (class weight 1)", fontsize=9)
        ax.set_title(label, fontsize=9)
        ax.grid(True, which="major", alpha=0.3, lw=0.5)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("WIDER FACE AP (%)", fontsize=9)
    axes[0].legend(fontsize=7)
    return fig


def plot_stage_run(run: RunResult, title: str = "") -> Figure:
    """One run by epoch: train and val losses (left), val false positives overall and the small
    ones (``val/fp_small_share``), and val mIoU (right); its findings as vertical lines."""
    fig = _new_figure(9.0, 3.4)
    losses, fps = fig.subplots(1, 2)
    for key, style in (("train/loss_cls", "C0-"), ("val/loss_cls", "C0--"), ("train/loss_box", "C1-"),
                       ("val/loss_box", "C1--")):
        losses.plot(*run.series(key), style, lw=1.3, label=key)
    losses.set_yscale("log")
    losses.set_title("losses (unweighted)", fontsize=9)
    fps.plot(*run.series("val/fp"), "C3-", lw=1.3, label="val FP (score 0.5)")
    epochs, fp = run.series("val/fp")
    share = run.series("val/fp_small_share")[1]
    if len(share) == len(fp):
        fps.plot(epochs, [f * s for f, s in zip(fp, share)], "C3:", lw=1.3, label="small FP (under 16 px)")
    fps.set_yscale("symlog", linthresh=10)
    miou = fps.twinx()
    miou.plot(*run.series("val/miou"), "C2-", lw=1.3, label="val mIoU")
    miou.set_ylim(0, max([0.05] + [v for v in run.series("val/miou")[1] if math.isfinite(v)]) * 1.2)
    fps.set_title("false positives and mIoU", fontsize=9)
    for ax in (losses, fps):
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(True, alpha=0.3, lw=0.5)
        ax.tick_params(labelsize=7)
        for finding in run.findings:
            if finding.get("epoch") is not None:
                ax.axvline(float(finding["epoch"]), color="#7f8c8d", ls=":", lw=1.0)
                if ax is losses:
                    ax.text(float(finding["epoch"]), 1.0, f" {finding.get('detector')}", rotation=90, fontsize=7,
                            va="top", transform=ax.get_xaxis_transform(), color="#555555")
    losses.legend(fontsize=7)
    handles = fps.get_legend_handles_labels()[0] + miou.get_legend_handles_labels()[0]
    fps.legend(handles=handles, fontsize=7, loc="upper left")
    fig.suptitle(title or run.name, fontsize=10)
    return fig


def save_png(fig: Figure, path: Path | str) -> Path:
    from detlab.runtime.fileio import atomic_binary_writer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_binary_writer(path, fsync=False) as handle:
        fig.savefig(handle, format="png")
    return path


# ------------------------------------------------------------------------------------------ page
_BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def replace_blocks(page: str, blocks: dict[str, str]) -> tuple[str, list[str]]:
    """The page with each ``<!-- results:NAME -->`` block's body replaced by ``blocks[NAME]``.

    Returns the new page and the names of blocks the page has but ``blocks`` does not (left as they were)."""
    untouched: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in blocks:
            untouched.append(name)
            return match.group(0)
        return f"{match.group(1)}{blocks[name].rstrip()}\n{match.group(4)}"

    return _BLOCK.sub(substitute, page), untouched


def block_names(page: str) -> list[str]:
    """The names of the page's ``<!-- results:NAME -->`` blocks, in order."""
    return [match.group("name") for match in _BLOCK.finditer(page)]


def load_runs(paths: Sequence[Path | str]) -> list[RunResult]:
    """Run folders, or sweep folders (every run folder under them)."""
    from detlab.report import is_run_dir, load_sweep

    runs: list[RunResult] = []
    for path in map(Path, paths):
        runs.extend([load_run(path)] if is_run_dir(path) else load_sweep(path))
    return runs
