"""What a run writes, one ``Callback`` per kind of output; ``default_callbacks(cfg)`` is what a run
installs unless its caller passes a list of its own.

- ``TensorBoardLogger``: the event files (scalars, prediction images, PR curves, galleries, findings,
  the HParams record);
- ``Plots``: ``plots/`` (the training-sample grid at the start, learning and PR curves at the end);
- ``ModelCheckpoint``: ``checkpoints/last.pt`` and ``best.pt``, which ``resume`` continues from;
- ``MetricsCsv``: ``metrics.csv``;
- ``SignalsLog``: ``signals.json.gz``, every step's diagnosis signals (``detlab diagnose`` replays them);
- ``ConsoleLogger``: the console: a line per epoch (losses, val metrics, findings so far) and, at the
  end, the run's table (status, final / best / test metrics, the findings' table: finding, when, cause,
  evidence, what to do; where the run folder is and how to open it in TensorBoard);
- ``RunRecordWriter``: ``config.yaml`` and ``summary.json`` (what the sweep report, the results page
  and ``train.py resume=<run dir>`` read).

Paths come from ``detlab.run_record.RunPaths`` (``trainer.paths``); every file is written atomically.
"""

from __future__ import annotations

import logging
import math
import shlex
import textwrap
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from detlab.config import Config
from detlab.diagnosis import FINDING_HEADER, Finding, finding_columns, finding_title
from detlab.engine.callbacks import Callback
from detlab.analysis import learning_curves_png
from detlab.engine.pictures import pr_curve_png
from detlab.engine.step import StepRecord
from detlab.engine.tensorboard import add_pr_curve, add_scalars, open_writer, write_hparams
from detlab.engine.validation import ValidationResult
from detlab.run_record import (
    RunStatus,
    RunSummary,
    read_signals,
    write_config,
    write_metrics,
    write_signals,
    write_summary,
)
from detlab.runtime.checkpoint import all_finite, save_checkpoint
from detlab.runtime.fileio import atomic_write_bytes, write_jpeg

if TYPE_CHECKING:
    from detlab.engine.trainer import Trainer

log = logging.getLogger(__name__)

FINAL_HPARAM_METRICS = ("val/miou", "val/recall", "val/precision", "val/ap50", "val/fp", "val/tp")


class TensorBoardLogger(Callback):
    """Event files in the run folder: step scalars every ``log_every`` steps; per epoch the val
    metrics, drawn predictions, PR curve, error galleries, timings, stage means and detector states;
    findings and repairs as text; at the end the HParams record with the final metrics."""

    writer: SummaryWriter  # open from on_train_start to on_train_end

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every

    def on_train_start(self, trainer: Trainer, samples: Optional[np.ndarray]) -> None:
        # A resumed session drops the events a killed one wrote after its checkpoint.
        self.writer = open_writer(trainer.paths.tensorboard, trainer.state.step if trainer.resumed else None)
        if samples is not None:
            self.writer.add_image("train/augmented_samples", samples, 0, dataformats="HWC")

    def on_step_end(self, trainer: Trainer, step: int, record: StepRecord, signals: dict[str, float]) -> None:
        if not record.updated or step % self.log_every:
            return
        scalars = {f"train/{k}": v for k, v in signals.items() if k != "weights_ramping"}
        scalars = {k: v for k, v in scalars.items() if math.isfinite(v)}  # e.g. face_coverage of a faceless batch
        scalars["train/class_weight"], scalars["train/box_weight"] = record.class_weight, record.box_weight
        if record.grad_norm_cls and record.grad_norm_box is not None:
            scalars["diagnosis/grad_norm_ratio_box_to_cls"] = record.grad_norm_box / record.grad_norm_cls
        add_scalars(self.writer, scalars, step)

    def on_finding(self, trainer: Trainer, finding: Finding) -> None:
        self.writer.add_text(f"diagnosis/{finding.detector}", finding.console_line(), finding.step)

    def on_repair(self, trainer: Trainer, repair: dict[str, Any]) -> None:
        self.writer.add_text("diagnosis/repair", repair["message"], repair["step"])

    def on_validation_end(self, trainer: Trainer, row: dict[str, float], result: ValidationResult) -> None:
        step = trainer.state.step
        add_scalars(self.writer, {k: v for k, v in row.items() if k.startswith("val/")}, step)
        if result.images:
            height = max(img.shape[0] for img in result.images)
            width = max(img.shape[1] for img in result.images)
            batch = np.zeros((len(result.images), height, width, 3), dtype=np.uint8)
            for i, img in enumerate(result.images):
                batch[i, : img.shape[0], : img.shape[1]] = img
            self.writer.add_images("val/predictions", batch, step, dataformats="NHWC")
        started = time.perf_counter()
        if result.pr_curve is not None:
            add_pr_curve(self.writer, "val/pr_curve", result.pr_curve, step)
        for name, picture in result.galleries.items():
            self.writer.add_image(f"gallery/{name}", picture, step, dataformats="HWC")
        row["pictures_time_s"] += time.perf_counter() - started
        add_scalars(self.writer, {"train/epoch": row["epoch"], "time/train_epoch_s": row["train_time_s"],
                                  "time/val_epoch_s": row["val_time_s"],
                                  "time/pictures_s": row["pictures_time_s"]}, step)
        for stage, means in trainer.state.stage_means().items():
            add_scalars(self.writer, {f"stage/{stage}/{k}": v for k, v in means.items()}, step)
        add_scalars(self.writer, {f"diagnosis/{k}": v for k, v in trainer.diagnoser.scalars().items()}, step)
        self.writer.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        state = trainer.state
        final = state.history[-1] if state.history else {}
        metrics = {k.replace("val/", "final_"): final[k] for k in FINAL_HPARAM_METRICS if k in final}
        if state.best:
            metrics["best_miou"] = state.best.get("val/miou", math.nan)
        metrics["diverged"] = float(trainer.status is RunStatus.DIVERGED)
        write_hparams(self.writer, trainer.hparams, metrics)
        text = "\n".join("- **{}**, {}: {} (cause: {}; what to do: {})".format(*finding_columns(f))
                         for f in state.findings) or "no findings"
        self.writer.add_text("diagnosis/summary", text, state.step)
        self.writer.close()


class Plots(Callback):
    """``plots/``: ``train_samples.jpg`` when a run starts; with ``curves`` (``train.plots``) the
    learning curves and the last validation's PR curve as PNGs when it ends."""

    def __init__(self, curves: bool, score_threshold: float) -> None:
        self.curves = curves
        self.score_threshold = score_threshold
        self.last_pr_curve: Optional[dict[str, np.ndarray]] = None

    def on_train_start(self, trainer: Trainer, samples: Optional[np.ndarray]) -> None:
        if samples is not None:
            write_jpeg(trainer.paths.train_samples, samples)

    def on_validation_end(self, trainer: Trainer, row: dict[str, float], result: ValidationResult) -> None:
        self.last_pr_curve = result.pr_curve

    def on_train_end(self, trainer: Trainer) -> None:
        history, paths = trainer.state.history, trainer.paths
        if not self.curves or not history:
            return
        try:
            title = f"{paths.root.name}: {trainer.status}, {trainer.state.epoch} epochs"
            atomic_write_bytes(paths.curves, learning_curves_png(history, title, trainer.state.findings))
            if self.last_pr_curve is not None:
                title = f"val PR curve (IoU 0.5), epoch {trainer.state.epoch}"
                atomic_write_bytes(paths.pr_curve, pr_curve_png(self.last_pr_curve, self.score_threshold, title))
        except Exception as error:  # noqa: BLE001 - a figure must not turn a finished run into a failed one
            note = f"plots/ not written: {type(error).__name__}: {error}"
            trainer.add_note(note)
            log.error(note)


class ModelCheckpoint(Callback):
    """``checkpoints/<name>.pt`` (``last``, ``best``) from ``trainer.checkpoint()``; weights that are
    not finite never replace a usable checkpoint (the run's message says so instead)."""

    def on_checkpoint(self, trainer: Trainer, name: str) -> None:
        path = trainer.paths.best if name == "best" else trainer.paths.last
        checkpoint = trainer.checkpoint()
        if not all_finite(checkpoint["model"]):
            note = f"the weights are not finite; {path.name} keeps the last finite ones"
            trainer.add_note(note)
            log.error("not writing %s: %s", path.name, note)
            return
        save_checkpoint(path, checkpoint)


class MetricsCsv(Callback):
    """``metrics.csv``: every validated epoch's row, rewritten at each epoch end."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        write_metrics(trainer.paths.root, trainer.state.history)


class SignalsLog(Callback):
    """``signals.json.gz``: every optimiser step's diagnosis signals (floats the diagnosis already has on
    the host), written at each checkpoint and when the session ends. A resumed session keeps the steps
    its checkpoint had done and appends its own."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.total_steps: Optional[int] = None

    def on_build(self, trainer: Trainer) -> None:
        self.total_steps = int(trainer.total_steps)

    def on_train_start(self, trainer: Trainer, samples: Optional[np.ndarray]) -> None:
        done = trainer.state.step
        recorded = read_signals(trainer.paths.root) if done else None
        self.steps = [row for row in (recorded or {}).get("steps", []) if row["step"] < done]

    def on_step_end(self, trainer: Trainer, step: int, record: StepRecord, signals: dict[str, float]) -> None:
        self.steps.append({"step": int(step), "epoch": trainer.state.epoch + 1, **signals})

    def on_checkpoint(self, trainer: Trainer, name: str) -> None:
        if name == "last":
            write_signals(trainer.paths.root, self.total_steps, self.steps)

    def on_end(self, trainer: Trainer, summary: RunSummary) -> None:
        if self.steps:
            write_signals(trainer.paths.root, self.total_steps, self.steps)


class ConsoleLogger(Callback):
    """What ``python train.py`` prints besides the progress bars: one line per validated epoch
    (``epoch_line``) and, when the run ends, its table (``summary_table``).

    Both go through ``logging`` (logger ``detlab.engine.loggers``, level INFO): under ``train.py``
    Hydra's handlers show them on the console and keep them in the run's ``train.log``. While the run
    trains, the console handlers write through tqdm (``logging_redirect_tqdm``), which clears the bars
    before a line and draws them again after it, so no line (the diagnosis's findings included) lands
    inside a bar.
    """

    def __init__(self) -> None:
        self._redirect: Optional[AbstractContextManager[Any]] = None

    def on_train_start(self, trainer: Trainer, samples: Optional[np.ndarray]) -> None:
        self._redirect = logging_redirect_tqdm(tqdm_class=tqdm)
        self._redirect.__enter__()

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        log.info(epoch_line(row, trainer.cfg.train.epochs, trainer.state.findings))

    def on_train_end(self, trainer: Trainer) -> None:
        self._restore_handlers()

    def on_end(self, trainer: Trainer, summary: RunSummary) -> None:
        self._restore_handlers()  # also when a later callback's on_train_start failed (no on_train_end then)
        log.info(summary_table(summary, trainer.paths.root))

    def _restore_handlers(self) -> None:
        if self._redirect is not None:
            redirect, self._redirect = self._redirect, None
            redirect.__exit__(None, None, None)


# The columns of the console table: header, the metrics row key ("val/<key>" in a metrics row, "<key>"
# in summary.json's test), and whether it is a count.
CONSOLE_COLUMNS = (("recall", "recall", False), ("precision", "precision", False), ("mIoU", "miou", False),
                   ("AP50", "ap50", False), ("TP", "tp", True), ("FP", "fp", True), ("FN", "fn", True))


def _as_float(value: Any) -> Optional[float]:
    """``value`` as a float; None when it is absent or not a number (the table then prints '-')."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _number(value: Any, digits: int = 3) -> str:
    """A value with ``digits`` significant digits, as Ultralytics prints its metrics; '-' when absent."""
    number = _as_float(value)
    return "-" if number is None else f"{number:.{digits}g}"


def _count(value: Any) -> str:
    number = _as_float(value)
    if number is None:
        return "-"
    return str(int(number)) if math.isfinite(number) else _number(number)


def finding_names(findings: list[dict[str, Any]]) -> list[str]:
    """The findings' names in words, each once, in the order they first fired."""
    return list(dict.fromkeys(finding_title(f) for f in findings))


def epoch_line(row: dict[str, Any], epochs: int, findings: list[dict[str, Any]]) -> str:
    """The console line of a validated epoch: its train losses (mean over the epoch), its val metrics
    and the findings so far, e.g. ``epoch 2/20  train loss cls 2.801 box 4.354 total 7.155 | val
    recall 0.412 precision 0.533 mIoU 0.301 AP50 0.287 | findings 1: loss imbalance``."""
    losses = " ".join(f"{name} {_number(row.get(f'train/loss_{name}'), 4)}" for name in ("cls", "box", "total"))
    metrics = " ".join(f"{header} {_number(row.get(f'val/{key}'))}" for header, key, count in CONSOLE_COLUMNS
                       if not count)
    names = finding_names(findings)
    seen = f"findings {len(findings)}" + (f": {', '.join(names)}" if names else "")
    return f"epoch {_count(row.get('epoch'))}/{epochs}  train loss {losses} | val {metrics} | {seen}"


def _duration(value: Any) -> str:
    seconds = _as_float(value)
    if seconds is None:
        return "-"
    if not math.isfinite(seconds) or seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d} min"


def _input_size(size: Any) -> str:
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return f"{size[0]}x{size[1]}"
    if isinstance(size, int):
        return f"longer side {size}"
    return "the model's" if size is None else str(size)


# The findings' table: the widths of its columns (finding, when, cause, evidence, what to do), in characters.
FINDING_WIDTHS = (20, 17, 30, 34, 36)


def _cell_lines(text: str, width: int, items: bool = False) -> list[str]:
    """``text`` wrapped to ``width`` (a config override or a path is never split, so it may run over);
    ``items``: each "; "-separated part on lines of its own, marked "- " when there are several."""
    parts = text.split("; ") if items else [text]
    marker = "- " if len(parts) > 1 else ""
    lines: list[str] = []
    for part in parts:
        lines += textwrap.wrap(part, width, initial_indent=marker, subsequent_indent=" " * len(marker),
                               break_long_words=False, break_on_hyphens=False) or [""]
    return lines


def findings_table(findings: list[dict[str, Any]], widths: tuple[int, ...] = FINDING_WIDTHS) -> list[str]:
    """The findings as a table with wrapped cells: finding, when, cause, evidence and what to do (each of
    its instructions on lines of its own), from their records (summary.json's ``findings``)."""
    def row(cells: list[list[str]]) -> list[str]:
        height = max(len(cell) for cell in cells)
        return ["  " + "  ".join(f"{(cell[i] if i < len(cell) else ''):<{width}}" for cell, width in zip(cells, widths)).rstrip()
                for i in range(height)]

    lines = row([[header] for header in FINDING_HEADER])
    lines.append("  " + "  ".join("-" * width for width in widths))
    for finding in findings:
        columns = finding_columns(finding)
        lines += row([_cell_lines(text, width, items=(i == len(columns) - 1))
                      for i, (text, width) in enumerate(zip(columns, widths))])
    return lines


def summary_table(summary: RunSummary, run_dir: Path | str) -> str:
    """The console table at a run's end, from its record (``summary.json``): the status and best
    epoch; the final, best and after-training test metrics (header row, aligned columns); the findings'
    table (finding, when, cause, evidence, what to do); the repairs; the run folder and the TensorBoard
    command."""
    best_by, best, final = summary.best_by or {}, summary.best or {}, summary.final or {}
    planned = summary.epochs_planned if summary.epochs_planned is not None else "?"
    steps = f"{summary.step} step" + ("" if summary.step == 1 else "s")
    headline = f"run {summary.status}: {summary.epochs}/{planned} epochs, {steps}, {_duration(summary.wall_time_s)}"
    if best:  # the row of the epoch early stopping chose (best.pt)
        headline += f"; best epoch {_count(best.get('epoch'))}"
        monitor = best_by.get("monitor")
        if monitor:
            headline += f" ({monitor} {_number(best.get(monitor, best_by.get('value')))}, {best_by.get('mode', 'max')})"
    lines = [headline]
    if summary.message:
        lines.append(f"message: {summary.message}")

    rows: list[tuple[str, dict[str, Any], str]] = []  # label, values, key prefix
    if final:
        rows.append((f"final (epoch {_count(final.get('epoch'))})", final, "val/"))
    if best:
        rows.append((f"best (epoch {_count(best.get('epoch'))})", best, "val/"))
    test = summary.test
    if test:
        rows.append((f"test (epoch {_count(test.get('epoch'))})", test, ""))
    if rows:
        width = max(len(label) for label, _, _ in rows) + 2
        lines.append(" " * width + "".join(f"{header:>11}" for header, _, _ in CONSOLE_COLUMNS))
        for label, values, prefix in rows:
            cells = [(_count if count else _number)(values.get(prefix + key)) for _, key, count in CONSOLE_COLUMNS]
            lines.append(f"{label:<{width}}" + "".join(f"{cell:>11}" for cell in cells))
    else:
        lines.append("no validated epoch: no metrics")
    if test:
        wider = "".join(f", WIDER AP {key.removeprefix('wider_')} {_number(test[key])}"
                        for key in ("wider_easy", "wider_medium", "wider_hard") if key in test)
        lines.append(f"test: checkpoints/last.pt scored after training (eval.test_protocol), input size "
                     f"{_input_size(test.get('input_size'))}{wider}; test.json")

    findings = summary.findings or []
    lines.append(f"findings ({len(findings)}):" if findings else "findings: none")
    if findings:
        lines += findings_table(findings)
    for repair in summary.repairs or []:
        lines.append(f"repair: {repair.get('repair', '?')} at step {repair.get('step', '?')} "
                     f"(epoch {repair.get('epoch', '?')}): {repair.get('message', '')}")
    if summary.preflight:  # the checks before the first step (detlab.engine.preflight): counts, what they named
        preflight = summary.preflight
        named = [f"{f.get('check')} ({f.get('severity')})" for f in preflight.get("findings", [])
                 if f.get("severity") in ("fatal", "warning")]
        lines.append(f"pre-flight: {preflight.get('fatal', 0)} fatal, {preflight.get('warnings', 0)} warning(s), "
                     f"{preflight.get('notes', 0)} note(s) in {_duration(preflight.get('seconds'))}"
                     + (f": {', '.join(named)}" if named else ""))
    folder = shlex.quote(str(run_dir))
    lines.append(f"run folder:  {run_dir}")
    lines.append(f"TensorBoard: tensorboard --logdir {folder}")
    return "\n".join(lines)


class RunRecordWriter(Callback):
    """``config.yaml`` when training starts; ``summary.json`` then, after every epoch and at the end.
    Install it last, so each summary holds what the other callbacks noted."""

    def on_train_start(self, trainer: Trainer, samples: Optional[np.ndarray]) -> None:
        write_config(trainer.paths.root, trainer.cfg)
        write_summary(trainer.paths.root, trainer.summary())

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        write_summary(trainer.paths.root, trainer.summary())

    def on_end(self, trainer: Trainer, summary: RunSummary) -> None:
        write_summary(trainer.paths.root, summary)


def default_callbacks(cfg: Config) -> list[Callback]:
    """The callbacks of a ``python train.py`` run, in the order they are called."""
    return [TensorBoardLogger(cfg.train.log_every), Plots(cfg.train.plots, cfg.eval.score_threshold),
            ModelCheckpoint(), MetricsCsv(), SignalsLog(), ConsoleLogger(), RunRecordWriter()]
