"""The tables: the sweep report's rows (``report.csv``, ``report.md``), the results page's tables, and
the page's generated blocks.

- ``report_table`` / ``report_csv`` / ``markdown_table`` / ``report_markdown``: one row per run
  (``CSV_COLUMNS``), the sweep report's CSV and Markdown;
- ``findings_table``: one row per finding (run, finding, when, cause, evidence, what to do), in words;
- ``sweep_table``, ``remedy_table``, ``wall_times_table``, ``findings_list``: the results page's tables;
- ``replace_blocks``: puts generated text between ``<!-- results:NAME -->`` and
  ``<!-- /results:NAME -->`` markers, leaving the hand-written text around them alone.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from detlab.analysis._values import as_float, as_int
from detlab.analysis.runs import RunResult, by_box_weight, remedy_label, sweep_elapsed_s
from detlab.diagnosis import FINDING_HEADER, finding_columns, finding_title, finding_when, is_note, step_level_detectors
from detlab.run_record import FAILED_STATUSES, LOSS_KEYS, STAGES, STATUSES, TEST_KEYS, RunStatus


# A compact finding shows the step for the detectors that watch training steps, the epoch for the others
# (the diagnosis's registry owns which is which).
STEP_LEVEL_DETECTORS: frozenset[str] = step_level_detectors()

# Columns of report.csv, in order. ``report.md`` shows the same rows without ``message`` and ``path``
# (the message is listed under the table instead).
CSV_COLUMNS = (
    ["run", "class_weight", "box_weight", "status", "epochs", "epochs_planned",
     "best_miou", "best_epoch", "final_miou", "ap50", "tp", "fp", "fn", "precision", "recall",
     "fp_localisation", "fp_duplicate", "fp_background"]
    + [f"test/{key}" for key in TEST_KEYS]  # the after-training test (eval.test_protocol) at eval.input_size
    + [f"{stage}/{key}" for stage in STAGES for key in LOSS_KEYS]
    + ["findings", "wall_time_s", "message", "path"]
)
TABLE_COLUMNS = [c for c in CSV_COLUMNS if c not in ("message", "path")]

# The order of the counts line ("9 runs: 6 completed, 2 diverged, ..."): how runs ended, the one still
# going last, always counted; a status run_record adds later (interrupted) follows when a run has it.
_ALWAYS_COUNTED = (RunStatus.COMPLETED, RunStatus.DIVERGED, RunStatus.FAILED, RunStatus.STOPPED, RunStatus.RUNNING)
_COUNT_ORDER = _ALWAYS_COUNTED + tuple(s for s in STATUSES if s not in _ALWAYS_COUNTED)

_FINAL_KEYS = {"ap50": "val/ap50", "tp": "val/tp", "fp": "val/fp", "fn": "val/fn",
               "precision": "val/precision", "recall": "val/recall", "fp_localisation": "val/fp_localisation",
               "fp_duplicate": "val/fp_duplicate", "fp_background": "val/fp_background"}
_COUNT_COLUMNS = {"tp", "fp", "fn", "epochs", "epochs_planned", "best_epoch", "fp_localisation", "fp_duplicate",
                  "fp_background", "test/tp", "test/fp", "test/fn"}


# ------------------------------------------------------------------------------------------ cells
def format_value(value: Any) -> str:
    """Compact human formatting for the Markdown tables (4 significant digits)."""
    if value is None:
        return ""
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def format_duration(seconds: Optional[float]) -> str:
    """``5 min 07 s``, ``2 h 03 min``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {secs:02d} s"


def status_text(run: RunResult, compact: bool = False) -> str:
    """The run's status as the tables and the grid show it: ``completed``, ``DIVERGED at step 124
    (2 of 4 epochs done)``, ``running (1 of 4 epochs done)``; ``compact`` (a grid column's title):
    ``DIVERGED @ step 124``, ``running @ epoch 1``. Diverged and failed runs are in capitals. The epochs
    are those completed: a run that diverged in its second epoch has 1 done."""
    status = str(run.status).upper() if run.failed else str(run.status)
    step = run.stop_step
    if compact:
        if run.status != RunStatus.COMPLETED:
            status += f" @ step {step}" if run.failed and step is not None else f" @ epoch {run.epochs}"
        return status
    if run.failed and step is not None:
        status += f" at step {step}"
    if run.status != RunStatus.COMPLETED:
        status += f" ({run.epochs} of {run.epochs_planned or '?'} epochs done)"
    return status


def status_markdown(status: str) -> str:
    """A status cell of the report: failed and diverged in bold capitals, other unfinished in italics."""
    status = str(status)
    if status in FAILED_STATUSES:
        return f"**{status.upper()}**"
    return status if status == RunStatus.COMPLETED else f"*{status}*"


def compact_findings(findings: Sequence[Mapping[str, Any]]) -> str:
    """``avoidance@e1; loss_imbalance@s200(x3); under_confidence@e2 (note)``: per detector, its first
    alarm (else its first note, marked ``(note)``: a note is said of a run that learns, not an alarm), at
    its step for step-level detectors (``STEP_LEVEL_DETECTORS``), else at its epoch (whichever is known)."""
    first: dict[str, Mapping[str, Any]] = {}
    counts: Counter = Counter()
    for finding in findings:
        detector = str(finding.get("detector", "?"))
        counts[detector] += 1
        if detector not in first or (is_note(first[detector]) and not is_note(finding)):
            first[detector] = finding
    parts = []
    for detector, finding in first.items():
        epoch, step = as_int(finding.get("epoch")), as_int(finding.get("step"))
        if detector in STEP_LEVEL_DETECTORS:
            where = f"@s{step}" if step is not None else f"@e{epoch}" if epoch is not None else ""
        else:
            where = f"@e{epoch}" if epoch is not None else f"@s{step}" if step is not None else ""
        repeat = f"(x{counts[detector]})" if counts[detector] > 1 else ""
        parts.append(f"{detector}{where}{repeat}{' (note)' if is_note(finding) else ''}")
    return "; ".join(parts)


def count_statuses(runs: Sequence[RunResult]) -> dict[str, int]:
    """``{"completed": n, "diverged": n, "failed": n, "stopped": n, "running": n[, "interrupted": n][, "unknown": n]}``
    (the first five always, a later status when a run has it)."""
    counts = Counter(run.status for run in runs)
    return {**{str(s): counts.get(s, 0) for s in _COUNT_ORDER if s in _ALWAYS_COUNTED or counts.get(s)},
            **{str(s): n for s, n in counts.items() if s not in _COUNT_ORDER}}


def format_counts(runs: Sequence[RunResult]) -> str:
    """``9 runs: 6 completed, 2 diverged, 1 failed, 0 stopped, 0 running``."""
    counts = count_statuses(runs)
    return f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items())


def print_summary_counts(runs: Sequence[RunResult]) -> str:
    line = format_counts(runs)
    print(line, flush=True)
    return line


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table of ready-made cells (``|`` escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ sweep report
def report_row(run: RunResult) -> dict[str, Any]:
    """One report row (keys: ``CSV_COLUMNS``); unknown values are None."""
    row: dict[str, Any] = {
        "run": run.name, "class_weight": run.class_weight, "box_weight": run.box_weight,
        "status": str(run.status), "epochs": run.epochs, "epochs_planned": run.epochs_planned,
        "best_miou": as_float(run.best.get("val/miou")), "best_epoch": as_int(run.best.get("epoch")),
        "final_miou": as_float(run.final.get("val/miou")),
    }
    for column, key in _FINAL_KEYS.items():
        row[column] = as_float(run.final.get(key))
    for key in TEST_KEYS:
        row[f"test/{key}"] = as_float(run.test.get(key))
    for stage in STAGES:
        for key in LOSS_KEYS:
            row[f"{stage}/{key}"] = as_float(run.stages.get(stage, {}).get(key))
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


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """Report rows as a Markdown table; failed and diverged runs are in bold capitals."""
    return _render(columns, [[status_markdown(row[c]) if c == "status" else format_value(row.get(c)) for c in columns]
                             for row in rows])


def present_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> list[str]:
    """``columns`` less the test columns that no row has a value for: report.md of a sweep without
    ``eval.test_protocol`` keeps its width."""
    return [c for c in columns if not c.startswith("test/") or any(row.get(c) is not None for row in rows)]


def report_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = CSV_COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_cell(row.get(c)) for c in columns})
    return buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest string that reads back to the same float
    return value


def run_notes(run: RunResult) -> str:
    """The report's list item of a run: where it ended, its message, its findings, read warnings."""
    where = []
    if run.stop_step is not None and run.status != RunStatus.COMPLETED:
        where.append(f"step {run.stop_step}")
    planned = f"/{run.epochs_planned}" if run.epochs_planned else ""
    where.append(f"epoch {run.epochs}{planned}")
    text = f"- `{run.name}` ({run.weight_label}): {status_markdown(run.status)} at {', '.join(where)}"
    if run.message:
        text += f": {run.message.splitlines()[0]}"
    if run.findings:  # their cause, evidence and what to do: the findings' table
        for finding in run.findings:
            text += f"\n  - {finding_title(finding)}: {finding_when(finding)}"
    else:
        text += "; no findings"
    for warning in run.warnings:
        text += f"\n  - read warning: {warning}"
    return text


def findings_table(runs: Sequence[RunResult], with_run: bool = True) -> str:
    """Every finding of ``runs`` in words, one row each: (the run,) finding, when, cause, evidence and
    what to do (summary.json's findings; an older record takes its title and cause from the detector)."""
    header = (["run"] if with_run else []) + list(FINDING_HEADER)
    rows = [([f"`{run.name}`"] if with_run else []) + list(finding_columns(finding))
            for run in runs for finding in run.findings]
    return _render(header, rows)


def report_markdown(sweep_dir: Path | str, runs: Sequence[RunResult], figure_name: str = "report.png") -> str:
    """``report.md``: the counts, the table, the grid, the findings' table and each run's status."""
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
        "## Diagnosis findings",
        "",
        findings_table(runs) if any(run.findings for run in runs) else "_none_",
        "",
        "## Runs: status and diagnosis findings",
        "",
        *([run_notes(run) for run in runs] or ["_none_"]),
        "",
    ]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ results page
QUALITY_HEADER = ["easy AP", "medium AP", "hard AP", "recall@0.5", "precision", "TP / FP / FN", "mIoU"]


def quality_cells(run: RunResult) -> list[str]:
    """Easy, medium, hard AP (%), recall, precision, TP / FP / FN and mIoU of the after-training test."""
    t = run.test
    return [_pct(t.get("wider_easy")), _pct(t.get("wider_medium")), _pct(t.get("wider_hard")),
            _num(t.get("recall")), _num(t.get("precision")), _counts(t), _num(t.get("miou"))]


def sweep_table(runs: Sequence[RunResult]) -> str:
    """One row per weight pair: status, test quality, per-stage unweighted losses, findings, wall time."""
    header = ["box weight", "status", *QUALITY_HEADER, "cls loss early / mid / late",
              "box loss early / mid / late", "findings", "wall time"]
    rows = [[format_value(r.box_weight), status_text(r), *quality_cells(r), _stage_losses(r, "loss_cls"),
             _stage_losses(r, "loss_box"), compact_findings(r.findings) or "none", format_duration(r.wall_time_s)]
            for r in by_box_weight(runs)]
    return _render(header, rows)


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
        rows.append([remedy_label(run), format_value(run.box_weight), status_text(run), *quality_cells(run), change,
                     compact_findings(run.findings) or "none"])
    return _render(header, rows)


def compact_repairs(repairs: Sequence[Mapping[str, Any]]) -> str:
    """``rebalance@s40; rollback@s39``: each repair at the step it acted, in order."""
    return "; ".join(f"{r.get('repair', '?')}@s{as_int(r.get('step'))}" for r in repairs)


def repair_table(runs: Sequence[RunResult]) -> str:
    """One row per weight pair trained with the repairs on (``diagnosis.repair=true``): status, test quality,
    what the repairs did and when, the findings."""
    header = ["box weight", "status", *QUALITY_HEADER, "repairs", "findings"]
    rows = [[format_value(r.box_weight), status_text(r), *quality_cells(r), compact_repairs(r.repairs) or "none",
             compact_findings(r.findings) or "none"] for r in by_box_weight(runs)]
    return _render(header, rows)


def findings_list(run: RunResult) -> str:
    """The run's findings as a table: finding, when, cause, evidence and what to do."""
    if not run.findings:
        return "_no findings_"
    return findings_table([run], with_run=False)


def wall_times_table(groups: Sequence[tuple[str, Sequence[RunResult], Optional[str]]]) -> str:
    """Per group (label, runs, command): runs, elapsed from first start to last end, summed run time."""
    header = ["what", "runs", "elapsed", "sum of run wall times", "per run (mean)", "command"]
    rows = []
    for label, runs, command in groups:
        total = sum(r.wall_time_s or 0.0 for r in runs)
        rows.append([label, str(len(runs)), format_duration(sweep_elapsed_s(runs)), format_duration(total),
                     format_duration(total / len(runs) if runs else None), f"`{command}`" if command else "-"])
    return _render(header, rows)


def _pct(value: Any) -> str:
    return "-" if value is None or not math.isfinite(float(value)) else f"{100 * float(value):.1f}"


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    value = float(value)
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def _counts(test: Mapping[str, Any]) -> str:
    if not all(k in test for k in ("tp", "fp", "fn")):
        return "-"
    return " / ".join(f"{int(test[k]):,}" for k in ("tp", "fp", "fn"))


def _stage_losses(run: RunResult, key: str) -> str:
    return " / ".join(_num(run.stages.get(stage, {}).get(key), 2) for stage in STAGES)


# ------------------------------------------------------------------------------------------ page blocks
_BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def replace_blocks(page: str, blocks: Mapping[str, str]) -> tuple[str, list[str]]:
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


def page_blocks(page: str) -> dict[str, str]:
    """The bodies of the page's ``<!-- results:NAME -->`` blocks, by name."""
    return {match.group("name"): match.group("body") for match in _BLOCK.finditer(page)}


def block_names(page: str) -> list[str]:
    """The names of the page's ``<!-- results:NAME -->`` blocks, in order."""
    return [match.group("name") for match in _BLOCK.finditer(page)]

