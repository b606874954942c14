"""Sweep report: one row per run, a Markdown table, a CSV and a Figure-5-style grid of curves.

A sweep is a folder of run directories (``docs/architecture.md``, "Run directory"), typically a
Hydra multirun with one sub-folder per override set (``loss.box_weight=0.05``). The report reads
only the files the trainer writes (``summary.json``, ``metrics.csv``, ``config.yaml``) and Hydra's
record (``.hydra/overrides.yaml``, ``.hydra/config.yaml``), and tolerates runs that are still
running, that failed before writing metrics, or whose last CSV line is half written.

    runs = load_sweep("multirun/2024-05-01/12-00-00")
    rows = report_table(runs)
    paths = write_report("multirun/2024-05-01/12-00-00")  # report.md, report.csv, report.png
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from omegaconf import DictConfig, ListConfig, OmegaConf

from detlab.runtime.fileio import atomic_binary_writer, atomic_write_text

STATUSES = ("completed", "diverged", "failed", "stopped", "running")
FAILED_STATUSES = ("diverged", "failed")
STAGES = ("early", "mid", "late")
LOSS_KEYS = ("loss_cls", "loss_box", "loss_total")

# Where the override keys that do not name a run are read from when a run folder has no Hydra record
# (``.hydra/hydra.yaml``): the training entry config, as composed for every run.
ENTRY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "config.yaml"
_EXCLUDE_KEYS_PATH = "hydra.job.config.override_dirname.exclude_keys"

# The after-training test (``eval.test_protocol``, summary.json's "test") at the run's eval.input_size.
TEST_KEYS = ("wider_easy", "wider_medium", "wider_hard", "recall", "precision", "tp", "fp", "fn", "miou")

# Columns of report.csv, in order. ``report.md`` shows the same rows without ``message`` and ``path``
# (the message is listed under the table instead).
CSV_COLUMNS = (
    ["run", "class_weight", "box_weight", "status", "epochs", "epochs_planned",
     "best_miou", "best_epoch", "final_miou", "ap50", "tp", "fp", "fn", "precision", "recall",
     "fp_localisation", "fp_duplicate", "fp_background"]
    + [f"test/{key}" for key in TEST_KEYS]
    + [f"{stage}/{key}" for stage in STAGES for key in LOSS_KEYS]
    + ["findings", "wall_time_s", "message", "path"]
)
TABLE_COLUMNS = [c for c in CSV_COLUMNS if c not in ("message", "path")]

# Detectors of ``detlab.diagnosis`` that watch training steps: their compact finding shows the step;
# the others judge whole epochs and show the epoch.
STEP_LEVEL_DETECTORS = frozenset({"stuck", "loss_imbalance", "divergence"})

_FINAL_KEYS = {"ap50": "val/ap50", "tp": "val/tp", "fp": "val/fp", "fn": "val/fn",
               "precision": "val/precision", "recall": "val/recall", "fp_localisation": "val/fp_localisation",
               "fp_duplicate": "val/fp_duplicate", "fp_background": "val/fp_background"}
_COUNT_COLUMNS = {"tp", "fp", "fn", "epochs", "epochs_planned", "best_epoch", "fp_localisation", "fp_duplicate",
                  "fp_background", "test/tp", "test/fp", "test/fn"}

_STATUS_COLORS = {"completed": "#1e1e1e", "diverged": "#c0392b", "failed": "#c0392b",
                  "stopped": "#d35400", "running": "#2471a3"}
_FAILED_FACE = "#fdecea"


@dataclass
class RunResult:
    """Everything the report knows about one run directory."""

    path: Path
    name: str
    status: str  # completed | diverged | failed | stopped | running | unknown
    message: str = ""
    step: Optional[int] = None
    epochs: int = 0  # epochs completed
    epochs_planned: Optional[int] = None
    class_weight: Optional[float] = None
    box_weight: Optional[float] = None
    overrides: list[str] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # metrics.csv rows, floats (nan: missing)
    best: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)  # the after-training test's headline (may be empty)
    findings: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: Optional[float] = None
    warnings: list[str] = field(default_factory=list)  # what was tolerated while reading
    exclude_keys: frozenset[str] = frozenset()  # override keys that do not name the run (Hydra's exclude_keys)

    @property
    def failed(self) -> bool:
        """Diverged or failed: the runs the figure and the report mark in red."""
        return self.status in FAILED_STATUSES

    @property
    def weight_label(self) -> str:
        """``cls 1 : box 0.05``, or the run name when the weights are unknown."""
        if self.box_weight is None:
            return self.name
        cls = "?" if self.class_weight is None else f"{self.class_weight:g}"
        return f"cls {cls} : box {self.box_weight:g}"

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(epochs, values)`` of one metrics.csv column; non-finite values become nan (line gaps)."""
        xs, ys = [], []
        for index, row in enumerate(self.history):
            epoch = row.get("epoch", math.nan)
            xs.append(epoch if math.isfinite(epoch) else float(index + 1))
            value = row.get(key, math.nan)
            ys.append(value if math.isfinite(value) else math.nan)
        return xs, ys


# ------------------------------------------------------------------------------------------ reading
def load_run(run_dir: Path | str) -> RunResult:
    """Read one run directory. Never raises on a partial run; what was tolerated is in ``warnings``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    warnings: list[str] = []
    summary = _read_summary(run_dir / "summary.json", warnings)
    history = read_metrics_csv(run_dir / "metrics.csv", warnings)
    config = _read_config(run_dir, warnings)

    overrides = [str(o) for o in summary.get("overrides") or []] or _read_overrides(run_dir, warnings)
    exclude_keys = _exclude_keys(run_dir, warnings)
    hparams = dict(summary.get("hparams") or {})
    if summary:
        status = str(summary.get("status") or "unknown")
    elif (run_dir / "summary.json").exists():
        status = "unknown"  # unreadable summary: finished or not, we cannot tell
    else:
        status = "running"  # the trainer writes summary.json before the first step

    last_epoch = (_as_int(history[-1].get("epoch")) or len(history)) if history else 0
    # A live run rewrites metrics.csv before summary.json: trust whichever has seen more epochs.
    epochs = max(_as_int(summary.get("epochs")) or 0, last_epoch)

    final = dict(summary.get("final") or {}) or (dict(history[-1]) if history else {})
    return RunResult(
        path=run_dir,
        name=_run_name(overrides, run_dir.name, exclude_keys),
        status=status,
        message=str(summary.get("message") or ""),
        step=_as_int(summary.get("step")),
        epochs=epochs,
        epochs_planned=_as_int(_first(summary.get("epochs_planned"), hparams.get("train.epochs"),
                                      _select(config, "train.epochs"))),
        class_weight=_weight("loss.class_weight", hparams, overrides, config),
        box_weight=_weight("loss.box_weight", hparams, overrides, config),
        overrides=overrides,
        hparams=hparams,
        history=history,
        best=dict(summary.get("best") or {}),
        final=final,
        stages={k: dict(v) for k, v in (summary.get("stages") or {}).items() if isinstance(v, dict)},
        test=dict(summary.get("test") or {}),
        findings=[f for f in summary.get("findings") or [] if isinstance(f, dict)],
        wall_time_s=_as_float(summary.get("wall_time_s")),
        warnings=warnings,
        exclude_keys=exclude_keys,
    )


def is_run_dir(path: Path) -> bool:
    return ((path / "summary.json").is_file() or (path / "metrics.csv").is_file()
            or (path / ".hydra" / "overrides.yaml").is_file())


def find_run_dirs(sweep_dir: Path | str) -> list[Path]:
    """Every run directory at or below ``sweep_dir`` (runs are not nested: no descent into a run)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory not found: {sweep_dir}")
    found = []
    for root, dirs, _files in os.walk(sweep_dir):
        path = Path(root)
        if is_run_dir(path):
            found.append(path)
            dirs[:] = []
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return found


def load_sweep(sweep_dir: Path | str) -> list[RunResult]:
    """All runs below ``sweep_dir``, sorted by box weight (numerically; unknown last), then name."""
    sweep_dir = Path(sweep_dir)
    runs = [load_run(path) for path in find_run_dirs(sweep_dir)]
    _drop_shared_overrides_from_names(runs)
    names = Counter(run.name for run in runs)
    for run in runs:  # two runs with the same overrides (nested sweeps): name them by their folder
        if names[run.name] > 1:
            run.name = run.path.relative_to(sweep_dir).as_posix() or run.name
    return sorted(runs, key=lambda r: (r.box_weight is None, r.box_weight or 0.0, r.name))


def read_metrics_csv(path: Path, warnings: Optional[list[str]] = None) -> list[dict[str, float]]:
    """metrics.csv rows as floats ("nan", "inf" and empty cells become nan/inf/nan).

    Missing or empty file: ``[]``. The trainer rewrites the file atomically, but a copy taken while
    another writer appends can end in a half-written line: a last line without its newline and with
    fewer cells than the header is dropped (a full-width unterminated line is kept; only its last
    cell, ``pictures_time_s``, could be cut short).
    """
    warnings = warnings if warnings is not None else []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as error:
        warnings.append(f"{path}: unreadable ({error})")
        return []
    lines = text.splitlines(keepends=True)
    if not lines:
        return []
    header = next(csv.reader([lines[0]]))
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = next(csv.reader([line]))
        if len(cells) != len(header):
            if number == len(lines) and not line.endswith("\n"):
                warnings.append(f"{path}:{number}: dropped a partially written last line")
            else:
                warnings.append(f"{path}:{number}: expected {len(header)} cells, found {len(cells)}; skipped")
            continue
        rows.append({key: _parse_cell(cell, path, number, key, warnings) for key, cell in zip(header, cells)})
    return rows


def _parse_cell(cell: str, path: Path, line: int, key: str, warnings: list[str]) -> float:
    cell = cell.strip()
    if not cell:
        return math.nan
    try:
        return float(cell)
    except ValueError:
        warnings.append(f"{path}:{line}: column {key!r}: not a number: {cell!r}")
        return math.nan


def _read_summary(path: Path, warnings: list[str]) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        warnings.append(f"{path}: unreadable ({error})")
        return {}
    if not isinstance(summary, dict):
        warnings.append(f"{path}: expected a JSON object")
        return {}
    return summary


def _read_yaml(path: Path, warnings: list[str]) -> Optional[DictConfig | ListConfig]:
    if not path.is_file():
        return None
    try:
        return OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - any YAML problem only costs this fallback
        warnings.append(f"{path}: unreadable ({error})")
        return None


def _read_config(run_dir: Path, warnings: list[str]) -> Optional[DictConfig]:
    """The trainer's resolved ``config.yaml``, else Hydra's ``.hydra/config.yaml``."""
    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        config = _read_yaml(path, warnings)
        if isinstance(config, DictConfig):
            return config
    return None


def _read_overrides(run_dir: Path, warnings: list[str]) -> list[str]:
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml", warnings)
    return [str(o) for o in overrides] if isinstance(overrides, ListConfig) else []


def _select(config: Optional[DictConfig], key: str) -> Any:
    if config is None:
        return None
    try:
        return OmegaConf.select(config, key, default=None, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: treat as unknown
        return None


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _exclude_keys(run_dir: Path, warnings: list[str]) -> frozenset[str]:
    """Hydra's ``override_dirname.exclude_keys`` as composed for this run (its ``.hydra/hydra.yaml``),
    else as the training entry config sets them: the keys that name a sweep sub-folder name the run."""
    for path in (run_dir / ".hydra" / "hydra.yaml", ENTRY_CONFIG):
        config = _read_yaml(path, warnings) if path.is_file() else None
        keys = _select(config, _EXCLUDE_KEYS_PATH) if isinstance(config, DictConfig) else None
        if keys is not None:
            return frozenset(str(k) for k in keys)
    return frozenset()


def _run_name(overrides: list[str], folder: str, exclude_keys: frozenset[str] = frozenset()) -> str:
    defining = [o for o in overrides if "=" in o and _override_key(o) not in exclude_keys]
    return ",".join(defining) or folder


def _drop_shared_overrides_from_names(runs: list[RunResult]) -> None:
    """In a sweep of several runs, name each by what sets it apart (``loss.box_weight=0.05``):
    overrides every run shares (the dataset, the preset) say nothing about the run."""
    if len(runs) < 2:
        return
    shared = set.intersection(*(set(run.overrides) for run in runs))
    for run in runs:
        if run.overrides:
            distinct = [o for o in run.overrides if o not in shared]
            run.name = _run_name(distinct, run.path.name, run.exclude_keys) if distinct else run.name


def _weight(key: str, hparams: dict[str, Any], overrides: list[str], config: Optional[DictConfig]) -> Optional[float]:
    if key in hparams:
        return _as_float(hparams[key])
    for override in overrides:
        if "=" in override and _override_key(override) == key:
            return _as_float(override.split("=", 1)[1])
    return _as_float(_select(config, key))


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _as_float(value: Any) -> Optional[float]:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _as_int(value: Any) -> Optional[int]:
    number = _as_float(value)
    return int(number) if number is not None and math.isfinite(number) else None


# ------------------------------------------------------------------------------------------- table
def compact_findings(findings: Sequence[dict[str, Any]]) -> str:
    """``avoidance@e1; loss_imbalance@s200(x3)``: first occurrence per detector, at its step for
    step-level detectors (``STEP_LEVEL_DETECTORS``), else at its epoch (whichever is known)."""
    first: dict[str, dict[str, Any]] = {}
    counts: Counter = Counter()
    for finding in findings:
        detector = str(finding.get("detector", "?"))
        counts[detector] += 1
        first.setdefault(detector, finding)
    parts = []
    for detector, finding in first.items():
        epoch, step = _as_int(finding.get("epoch")), _as_int(finding.get("step"))
        if detector in STEP_LEVEL_DETECTORS:
            where = f"@s{step}" if step is not None else f"@e{epoch}" if epoch is not None else ""
        else:
            where = f"@e{epoch}" if epoch is not None else f"@s{step}" if step is not None else ""
        repeat = f"(x{counts[detector]})" if counts[detector] > 1 else ""
        parts.append(f"{detector}{where}{repeat}")
    return "; ".join(parts)


def report_row(run: RunResult) -> dict[str, Any]:
    """One report row (keys: ``CSV_COLUMNS``); unknown values are None."""
    row: dict[str, Any] = {
        "run": run.name, "class_weight": run.class_weight, "box_weight": run.box_weight,
        "status": run.status, "epochs": run.epochs, "epochs_planned": run.epochs_planned,
        "best_miou": _as_float(run.best.get("val/miou")), "best_epoch": _as_int(run.best.get("epoch")),
        "final_miou": _as_float(run.final.get("val/miou")),
    }
    for column, key in _FINAL_KEYS.items():
        row[column] = _as_float(run.final.get(key))
    for key in TEST_KEYS:
        row[f"test/{key}"] = _as_float(run.test.get(key))
    for stage in STAGES:
        for key in LOSS_KEYS:
            row[f"{stage}/{key}"] = _as_float(run.stages.get(stage, {}).get(key))
    row["findings"] = compact_findings(run.findings)
    row["wall_time_s"] = run.wall_time_s
    row["message"] = run.message
    row["path"] = str(run.path)
    for column in _COUNT_COLUMNS:
        if isinstance(row[column], float) and math.isfinite(row[column]):
            row[column] = int(row[column])
    return row


def report_table(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    return [report_row(run) for run in runs]


def count_statuses(runs: Sequence[RunResult]) -> dict[str, int]:
    """``{"completed": n, "diverged": n, "failed": n, "stopped": n, "running": n, ...others}``."""
    counts = Counter(run.status for run in runs)
    return {**{s: counts.get(s, 0) for s in STATUSES}, **{s: n for s, n in counts.items() if s not in STATUSES}}


def format_counts(runs: Sequence[RunResult]) -> str:
    """``9 runs: 6 completed, 2 diverged, 1 failed, 0 stopped, 0 running``."""
    counts = count_statuses(runs)
    return f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items())


def print_summary_counts(runs: Sequence[RunResult]) -> str:
    line = format_counts(runs)
    print(line, flush=True)
    return line


def format_value(value: Any) -> str:
    """Compact human formatting for the Markdown table (4 significant digits)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _status_cell(status: str) -> str:
    if status in FAILED_STATUSES:
        return f"**{status.upper()}**"
    return status if status == "completed" else f"*{status}*"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """A GitHub-flavoured Markdown table; failed and diverged runs are in bold capitals."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [_status_cell(str(row[c])) if c == "status" else format_value(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def present_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> list[str]:
    """``columns`` less the test columns that no row has a value for: report.md of a sweep without
    ``eval.test_protocol`` keeps its width."""
    return [c for c in columns if not c.startswith("test/") or any(row.get(c) is not None for row in rows)]


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest string that reads back to the same float
    return value


def _run_notes(run: RunResult) -> str:
    status = _status_cell(run.status)
    where = []
    if run.step is not None and run.status != "completed":
        where.append(f"step {run.step}")
    planned = f"/{run.epochs_planned}" if run.epochs_planned else ""
    where.append(f"epoch {run.epochs}{planned}")
    text = f"- `{run.name}` ({run.weight_label}): {status} at {', '.join(where)}"
    if run.message:
        text += f": {run.message.splitlines()[0]}"
    if run.findings:
        for finding in run.findings:
            place = ", ".join(f"{k} {finding[k]}" for k in ("stage", "epoch", "step") if finding.get(k) is not None)
            line = f"\n  - {finding.get('detector', '?')} ({place})"
            detail = finding.get("message") or finding.get("remedy")
            text += line + (f": {detail}" if detail else "")
    else:
        text += "; no findings"
    for warning in run.warnings:
        text += f"\n  - read warning: {warning}"
    return text


def report_markdown(sweep_dir: Path | str, runs: Sequence[RunResult], figure_name: str = "report.png") -> str:
    rows = report_table(runs)
    parts = [
        "# Sweep report",
        "",
        f"Sweep: `{sweep_dir}`",
        "",
        f"**{format_counts(runs)}**",
        "",
        markdown_table(rows, present_columns(rows)) if rows else "_No run directories found yet._",
        "",
        f"![curves per run]({figure_name})",
        "",
        "## Runs: status and diagnosis findings",
        "",
        *([_run_notes(run) for run in runs] or ["_none_"]),
        "",
    ]
    return "\n".join(parts)


def report_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] = CSV_COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_cell(row.get(c)) for c in columns})
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ figure
# (row label, train column, val column); the box loss is unweighted, so runs compare directly.
FIGURE_ROWS = (
    ("cls loss", "train/loss_cls", "val/loss_cls"),
    ("box loss", "train/loss_box", "val/loss_box"),
    ("val mIoU", None, "val/miou"),
)
MAX_COLUMNS = 9  # wider sweeps wrap onto further bands of rows


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _loss_limits(runs: Sequence[RunResult], keys: Sequence[str]) -> tuple[bool, tuple[float, float] | None]:
    """Shared y-limits for a loss row; log scale when the values span more than 20x."""
    values = [v for run in runs for key in keys for v in _finite(run.series(key)[1]) if v > 0]
    if not values:
        return False, None
    low, high = min(values), max(values)
    if high / low > 20:
        return True, (low / 1.5, high * 1.5)
    return False, (0.0, high * 1.1)


def _failure_x(run: RunResult) -> Optional[float]:
    """Where (in epochs) a diverged/failed run stopped: its step over the steps per epoch."""
    if run.history:
        last = run.history[-1]
        steps, epoch = last.get("step", math.nan), last.get("epoch", math.nan)
        if run.step is not None and math.isfinite(steps) and math.isfinite(epoch) and steps > 0 and epoch > 0:
            return max(run.step / (steps / epoch), epoch)
        return float(run.epochs) + 0.5
    return 0.0 if run.step is not None else None


def plot_sweep(runs: Sequence[RunResult], title: str = "") -> Figure:
    """Figure-5-style grid: one column per run (cls loss, box loss, val mIoU over epochs).

    Diverged and failed runs get a red title, frame and tint, their curves up to the failure and a
    red dotted line where they stopped. Built without pyplot (no global state; Agg canvas).
    """
    if not runs:  # a sweep that has not started a run yet: a placeholder, not an error
        fig = Figure(figsize=(6.0, 1.5), dpi=110)
        FigureCanvasAgg(fig)
        fig.text(0.5, 0.5, f"{title or 'sweep'}\nno run directories yet", ha="center", va="center", fontsize=10)
        return fig
    n = len(runs)
    bands = math.ceil(n / MAX_COLUMNS)
    ncols = math.ceil(n / bands)  # balanced bands: 12 runs are 2 x 6, not 9 + 3
    nrows = len(FIGURE_ROWS) * bands
    width, height = max(6.0, 1.9 * ncols + 1.3), 1.75 * nrows + 1.4
    # Constrained layout sizes each row's margins on its own (a band's titles do not widen every gap)
    # and keeps the suptitle and the legend outside the panels.
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)

    limits = [_loss_limits(runs, [k for k in (train, val) if k]) if train else None
              for _, train, val in FIGURE_ROWS]
    miou_top = max([v for run in runs for v in _finite(run.series("val/miou")[1])] + [0.0])
    miou_limits = (0.0, max(0.05, miou_top * 1.15))
    x_max = max([run.epochs_planned or 0 for run in runs] + [run.epochs for run in runs] + [1])

    for index in range(ncols * bands):
        band, column = divmod(index, ncols)
        column_axes = [axes[band * len(FIGURE_ROWS) + r][column] for r in range(len(FIGURE_ROWS))]
        if index >= len(runs):
            for ax in column_axes:
                ax.set_visible(False)
            continue
        run = runs[index]
        color = _STATUS_COLORS.get(run.status, "#7f8c8d")
        for r, (ax, (label, train_key, val_key)) in enumerate(zip(column_axes, FIGURE_ROWS)):
            if train_key:
                ax.plot(*run.series(train_key), color="#1f77b4", lw=1.4, marker="." if run.epochs < 3 else None)
            ax.plot(*run.series(val_key), color="#2ca02c" if train_key is None else "#ff7f0e",
                    lw=1.4, ls="-" if train_key is None else "--", marker="." if run.epochs < 3 else None)
            if train_key:
                log_scale, lim = limits[r]
                if log_scale:
                    ax.set_yscale("log")
                    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                    ax.yaxis.set_minor_formatter(NullFormatter())
                if lim:
                    ax.set_ylim(*lim)
            else:
                ax.set_ylim(*miou_limits)
                best = _as_float(run.best.get("val/miou"))
                if best is not None and math.isfinite(best):
                    ax.text(0.04, 0.93, f"best {best:.3f}", fontsize=7, va="top", transform=ax.transAxes)
            ax.set_xlim(0.5, x_max + 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
            ax.grid(True, which="major", alpha=0.3, lw=0.5)
            ax.tick_params(labelsize=7)
            if column == 0:
                ax.set_ylabel(label, fontsize=9)
            else:
                ax.tick_params(labelleft=False)
                ax.yaxis.set_tick_params(which="minor", labelleft=False)
            if r == len(FIGURE_ROWS) - 1:
                ax.set_xlabel("epoch", fontsize=8)
                ax.tick_params(labelbottom=True)
            if run.failed:
                ax.set_facecolor(_FAILED_FACE)
                for spine in ax.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(2.0)
                stop = _failure_x(run)
                if stop is not None:
                    ax.axvline(stop, color=color, ls=":", lw=1.5)
            if not run.history:
                ax.text(0.5, 0.5, "no epoch\nfinished", ha="center", va="center", fontsize=8,
                        color=color, transform=ax.transAxes)
        status = run.status.upper() if run.failed else run.status
        if run.status != "completed":
            status += f" @ {'step ' + str(run.step) if run.step is not None and run.failed else 'epoch ' + str(run.epochs)}"
        column_axes[0].set_title(f"{run.weight_label}\n{status}", fontsize=9, color=color,
                                 fontweight="bold" if run.failed else "normal")

    handles = [Line2D([], [], color="#1f77b4", lw=1.4, label="train"),
               Line2D([], [], color="#ff7f0e", lw=1.4, ls="--", label="val"),
               Line2D([], [], color="#2ca02c", lw=1.4, label="val mIoU"),
               Line2D([], [], color=_STATUS_COLORS["diverged"], lw=1.5, ls=":", label="stopped (diverged/failed)")]
    title = title or format_counts(runs)
    if len(title) * 0.085 > width:  # about 0.085 in per character at 10 pt: break before the counts
        title = title.replace(": ", ":\n", 1)
    fig.suptitle(title, fontsize=10)
    fig.legend(handles=handles, loc="outside lower center", ncol=4 if width >= 7 else 2, fontsize=8, frameon=False)
    return fig


# ------------------------------------------------------------------------------------------ writing
def write_report(sweep_dir: Path | str, out_dir: Path | str | None = None,
                 runs: Optional[Sequence[RunResult]] = None) -> dict[str, Path]:
    """Write report.md, report.csv and report.png (default: into the sweep folder).

    ``runs``: already loaded with ``load_sweep(sweep_dir)`` (saves reading the sweep twice).
    Returns ``{"md": path, "csv": path, "png": path}``. Works on a partial sweep.
    """
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    runs = load_sweep(sweep_dir) if runs is None else list(runs)
    paths = {"md": out_dir / "report.md", "csv": out_dir / "report.csv", "png": out_dir / "report.png"}
    markdown = report_markdown(sweep_dir, runs, figure_name=paths["png"].name)
    atomic_write_text(paths["md"], markdown)
    table_csv = report_csv(report_table(runs))
    atomic_write_text(paths["csv"], table_csv)
    figure = plot_sweep(runs, title=f"{sweep_dir.name or sweep_dir}: {format_counts(runs)}")
    with atomic_binary_writer(paths["png"], fsync=False) as handle:
        figure.savefig(handle, format="png")
    return paths


# ---------------------------------------------------------------------------------------------- command
def main(argv: list[str] | None = None) -> int:
    """``python scripts/sweep_report.py SWEEP_DIR [--out DIR]``: write the report and print its table."""
    parser = argparse.ArgumentParser(prog="sweep_report.py",
                                     description="Write the report of a sweep (report.md, report.csv, report.png) "
                                                 "and print its table. Works on a sweep that is still running.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder holding one sub-folder per run")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: SWEEP_DIR)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: sweep directory not found: {args.sweep_dir}", file=sys.stderr)
        return 2

    runs = load_sweep(args.sweep_dir)
    paths = write_report(args.sweep_dir, args.out, runs=runs)
    print(format_counts(runs))
    print()
    print(markdown_table(report_table(runs)) if runs else "(no run directories found yet)")
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
