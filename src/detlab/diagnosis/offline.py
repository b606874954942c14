"""The diagnosis of recorded curves: a finished run folder, a CSV file or TensorBoard events from any
training, read into curves and replayed through the detectors (``detlab diagnose``).

    report = diagnose_path("outputs/2024-05-01/12-00-00")       # a run folder
    report = diagnose_path("results.csv", ["diagnosis.stuck.min_drop=0.05"])
    print(format_report(report))

``load_curves`` reads a source into ``Curves`` (the per-step training signals and the per-epoch rows,
as columns); ``diagnose`` replays them (``detlab.diagnosis.replay.replay_findings``: the detectors' own
code, in the training loop's order) and returns a ``Report``: the findings, and the detectors it
skipped with the reason (a detector runs only where the signals it ``needs`` were recorded, see
``Detector.needs``; one switched off in the config is skipped too).

Sources:

- a run folder (``summary.json`` / ``metrics.csv``): the per-step signals from ``steps.json`` when a
  ``SignalRecorder`` left one (every step), else from the run's TensorBoard events (``train/<signal>``,
  every ``train.log_every`` steps); the epoch rows from ``metrics.csv``; the run's ``config.yaml``
  (its schedule, stages and diagnosis block: the run's own thresholds unless ``today``); the findings
  it recorded (``summary.json``), for comparison;
- a CSV file with a header, or a TensorBoard event file (or a folder of them): columns or scalar tags
  recognised by name (``ALIASES``, case and surrounding spaces ignored; the first alias present wins):

  ==========================  ===================================================================
  curve                       names (CSV columns or TensorBoard tags)
  ==========================  ===================================================================
  step, epoch                 step, global_step, iteration, iter; epoch, epochs
  training loss (total)       loss_total, train/loss_total, train_loss, train/loss, loss, total_loss
  class loss                  loss_cls, train/loss_cls, cls_loss, train/cls_loss, class_loss,
                              loss_classifier
  box loss                    loss_box, train/loss_box, box_loss, train/box_loss, bbox_loss,
                              loss_bbox, loss_box_reg, reg_loss
  other loss terms            dfl_loss, train/dfl_loss, obj_loss, train/obj_loss, loss_objectness,
                              loss_rpn_box_reg (only summed into the total when there is none)
  learning rate, grad norm    lr, train/lr, learning_rate, lr/pg0; grad_norm, train/grad_norm
  validation loss             val/loss_total, val_loss, val/loss, validation_loss, loss/val (or the
                              sum of val/loss_cls | val/cls_loss, val/loss_box | val/box_loss, ...)
  recall, precision           val/recall, recall, val_recall, metrics/recall(B); the same for
                              precision (metrics/precision(B))
  AP50                        val/ap50, ap50, val_ap50, map50, val/map50, metrics/mAP50(B), map_50
  TP / FP / FN counts         val/tp, tp, true_positives; val/fp, fp, false_positives; val/fn, fn
  mIoU, predictions/image     val/miou, miou; val/pred_per_image, pred_per_image
  detlab's own                every metrics.csv column and step signal by its name (train/<signal>
                              for a step signal), e.g. val/fp_small_share, face_coverage
  ==========================  ===================================================================

  detlab's ``metrics.csv`` and Ultralytics' ``results.csv`` are read as they are. A source whose
  every training row also has validation values (one row per epoch: those two, a hand-made table
  of epochs) gives the step checks one training loss per epoch; otherwise rows with training values
  are steps and rows with validation values are the epochs' validations (epoch from the epoch column,
  else counted: a step belongs to the first validation at or after it; epochs counted from 0 are
  reported so). A total loss missing is the sum of the loss terms present; recall, precision, AP50
  and mIoU above 1 are read as percentages. Another training's curves are judged with today's
  thresholds, generic remedies, and stages of the first 10% (early) and the last 30% (late) of its
  steps: set ``stages.*`` to change them.

Signals recorded every ``k`` steps (TensorBoard at ``train.log_every``, a CSV logged every k
iterations) are replayed as consecutive records: the detectors' step windows count records, the
stages are the training's (from the run's config), counted in records, and a finding is dated at
the step of the record that showed it.

This module reads files once and prepares the signals with numpy; the detectors' per-step loop is
``replay_findings``. It sits below the engine (it imports no ``detlab.engine`` module).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detlab.config import Config, load_saved_config, to_config
from detlab.diagnosis.detector import Detector, Need
from detlab.diagnosis.diagnoser import Finding
from detlab.diagnosis.registry import block_of, get_detector, registered_detectors, unmet_needs
from detlab.diagnosis.replay import replay_findings
from detlab.diagnosis.schema import DiagnosisConfig
from detlab.errors import ConfigError, UserError
from detlab.paths import config_dir
from detlab.run_record import METRIC_COLUMNS, RunPaths, read_metrics, read_signals, read_summary
from detlab.schedule import StageBoundaries, stage_boundaries

RUN_FOLDER, CSV_FILE, TENSORBOARD = "run folder", "CSV file", "TensorBoard events"

# The training loop's per-step signals (``StepRecord.signals``), as the step detectors read them.
STEP_SIGNALS = ("loss_cls", "loss_box", "loss_total", "lr", "grad_norm", "num_pos", "neg_per_pos", "face_coverage",
                "empty_image_share", "grad_norm_cls", "grad_norm_box", "grad_dead_share", "input_mean", "input_std",
                "weights_ramping")
# The epoch rows' validation columns (metrics.csv's, and what the detectors read besides).
EPOCH_SIGNALS = tuple(dict.fromkeys([*(c for c in METRIC_COLUMNS if c.startswith("val/")),
                                     "val/small/fp_background", "val/mean_score"]))
LOSS_TERMS = ("loss_cls", "loss_box")
VAL_LOSS_TERMS = ("val/loss_cls", "val/loss_box")
SHARES = ("val/recall", "val/precision", "val/ap50", "val/miou", "val/f1")

_EXTRA_ALIASES: dict[str, tuple[str, ...]] = {
    "loss_total": ("train_loss", "train/loss", "loss", "total_loss", "train/total_loss", "train_loss_total"),
    "loss_cls": ("cls_loss", "train/cls_loss", "class_loss", "train/class_loss", "loss_classifier",
                 "train_cls_loss"),
    "loss_box": ("box_loss", "train/box_loss", "bbox_loss", "loss_bbox", "loss_box_reg", "reg_loss",
                 "train_box_loss"),
    "lr": ("learning_rate", "lr/pg0"),
    "grad_norm": ("gradient_norm",),
    "val/loss_total": ("val_loss", "val/loss", "validation_loss", "val_loss_total", "loss/val"),
    "val/loss_cls": ("val/cls_loss", "val_cls_loss"),
    "val/loss_box": ("val/box_loss", "val_box_loss"),
    "val/recall": ("recall", "val_recall", "metrics/recall(b)", "metrics/recall"),
    "val/precision": ("precision", "val_precision", "metrics/precision(b)", "metrics/precision"),
    "val/ap50": ("ap50", "val_ap50", "map50", "val/map50", "metrics/map50(b)", "map_50", "ap_50"),
    "val/miou": ("miou", "val_miou"),
    "val/tp": ("tp", "true_positives"),
    "val/fp": ("fp", "false_positives"),
    "val/fn": ("fn", "false_negatives"),
    "val/f1": ("f1",),
    "val/pred_per_image": ("pred_per_image", "predictions_per_image"),
    "val/pred_large_share": ("pred_large_share",),
    "val/fp_small_share": ("fp_small_share", "small_fp_share"),
    "val/mean_score": ("mean_score",),
}
# canonical signal -> the names it is recognised by, in order of preference (lower case)
ALIASES: dict[str, tuple[str, ...]] = {
    **{key: (key, f"train/{key}", *_EXTRA_ALIASES.get(key, ())) for key in STEP_SIGNALS},
    **{key: (key, *_EXTRA_ALIASES.get(key, ())) for key in EPOCH_SIGNALS},
}
STEP_NAMES = ("step", "global_step", "iteration", "iter", "steps")
EPOCH_NAMES = ("epoch", "epochs")
# Further loss terms (Ultralytics' distribution focal loss, YOLOv5's objectness, torchvision's RPN):
# summed into the total when the source has no total.
EXTRA_TRAIN_TERMS = ("dfl_loss", "train/dfl_loss", "obj_loss", "train/obj_loss", "loss_objectness",
                     "loss_rpn_box_reg")
EXTRA_VAL_TERMS = ("val/dfl_loss", "val/obj_loss", "val_dfl_loss", "val_obj_loss")
QUIETLY_IGNORED = ("train_time_s", "val_time_s", "pictures_time_s")  # metrics.csv's timings

# detlab's TensorBoard: step signals as train/<signal>; train/epoch and val/* at each validation.
DETLAB_EPOCH_TAG = "train/epoch"


class SourceError(UserError):
    """A source that cannot be read as curves; the message names the file (and line) and what was expected."""


# ----------------------------------------------------------------------------------------- curves
@dataclass
class Curves:
    """A source read as the training loop's signals.

    ``steps``: the step number of each training record (in the source's numbering, in the order
    trained; ``dated`` False when the source has none), ``step_epochs`` its epoch; ``signals`` / ``present``:
    per step signal (``STEP_SIGNALS``) its values (NaN where recorded as NaN) and where it was recorded.
    ``epochs``: one row per validated epoch: ``epoch``, ``step`` (steps done, detlab's ``metrics.csv``
    convention; NaN unknown) and the validation columns the source has (``train/*`` means too).
    """

    source: str
    kind: str
    steps: np.ndarray
    step_epochs: np.ndarray
    signals: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    epochs: list[dict[str, float]]
    per_epoch: bool = False  # one training record per epoch
    dated: bool = True  # ``steps`` are the source's step numbers (False: row numbers of a per-epoch table)
    total_steps: Optional[int] = None  # the planned length (a run folder), in the source's steps
    config: Optional[Config] = None  # a run folder's config.yaml
    recorded: Optional[list[dict[str, Any]]] = None  # a run folder's findings (summary.json)
    repaired: Optional[list[dict[str, Any]]] = None  # a run folder's repairs (summary.json), for the replay
    epoch_offset: int = 0  # the source counts epochs from 1 - epoch_offset
    columns: dict[str, str] = field(default_factory=dict)  # signal -> the column or tag it was read from
    ignored: list[str] = field(default_factory=list)  # columns or tags not recognised
    notes: list[str] = field(default_factory=list)
    step_source: str = ""  # where the step signals came from, in words
    epoch_source: str = ""
    report_steps: Optional[np.ndarray] = None  # per-epoch rows: each training record's step in the source (NaN: none)

    def available(self) -> set[str]:
        """The signals recorded at least once: step signals, epoch columns, and the ``train/*`` epoch
        means the step signals give."""
        out = {key for key, mask in self.present.items() if mask.any()}
        out |= {f"train/{key}" for key in out & {"loss_cls", "loss_box", "loss_total"}}
        for row in self.epochs:
            out.update(k for k in row if k not in ("epoch", "step", "report_step"))
        return out

    def step_rows(self, steps: np.ndarray) -> list[dict[str, float]]:
        """The step records as the replay takes them, numbered ``steps``."""
        keys = [k for k in STEP_SIGNALS if k in self.signals and self.present[k].any()]
        values = [self.signals[k].tolist() for k in keys]
        masks = [self.present[k].tolist() for k in keys]
        rows = []
        for i, (step, epoch) in enumerate(zip(steps.tolist(), self.step_epochs.tolist())):
            row: dict[str, float] = {"step": step, "epoch": epoch}
            for key, column, mask in zip(keys, values, masks):
                if mask[i]:
                    row[key] = column[i]
            rows.append(row)
        return rows


def load_curves(path: Path | str) -> Curves:
    """A run folder, a CSV file, a TensorBoard event file or a folder of event files, as ``Curves``.
    Raises ``SourceError`` (one line naming the file) when the path is none of those."""
    path = Path(path)
    expected = "expected a run folder, a CSV file or a TensorBoard event file"
    if path.is_dir():
        paths = RunPaths(path)
        if paths.is_run():
            return _load_run_folder(path)
        events = _event_files(path)
        if events:
            return _load_events(path, events)
        raise SourceError(f"{path}: neither a run folder (no summary.json or metrics.csv) nor a folder of "
                          f"TensorBoard event files; {expected}")
    if path.is_file():
        if "tfevents" in path.name:
            return _load_events(path, [path])
        if path.suffix.lower() in (".csv", ".tsv", ".txt"):
            return _load_csv(path)
        raise SourceError(f"{path}: not a .csv file or a TensorBoard event file (events.out.tfevents.*); {expected}")
    raise SourceError(f"{path}: no such file or folder; {expected}")


def _event_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("events.out.tfevents.*") if p.is_file())


# ---------------------------------------------------------------------------------- run folders
def _load_run_folder(root: Path) -> Curves:
    paths = RunPaths(root)
    notes: list[str] = []
    warnings: list[str] = []
    config = load_saved_config(OmegaConf.load(paths.config)) if paths.config.is_file() else None
    if config is None:
        notes.append("the run folder has no config.yaml: the default config's schedule and thresholds are assumed")
    rows = read_metrics(root, warnings)
    notes += warnings
    epochs = [dict(row) for row in rows if math.isfinite(row.get("epoch", math.nan))]
    for row in epochs:
        for key in QUIETLY_IGNORED:
            row.pop(key, None)
    summary = read_summary(root, notes)
    recorded = list(summary.get("findings") or []) if summary else None
    repaired = list(summary.get("repairs") or []) if summary else None
    total = None
    recorder = root / "steps.json"
    try:
        signals = read_signals(root)
    except (OSError, EOFError, ValueError) as error:
        raise SourceError(f"{paths.signals}: unreadable ({error}); expected the per-step signals a run writes") from None
    if signals is not None:  # every step, as the run's diagnosis saw it
        total = int(signals["total_steps"]) if signals.get("total_steps") else None
        curves = _curves_from_step_dicts(list(signals["steps"]))
        curves.step_source = paths.signals.name
    elif recorder.is_file():
        try:
            record = json.loads(recorder.read_text())
            steps = list(record["steps"])
            total = int(record["total_steps"]) if record.get("total_steps") else None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SourceError(f"{recorder}: unreadable ({error}); expected the per-step signals a "
                              "SignalRecorder writes") from None
        curves = _curves_from_step_dicts(steps)
        curves.step_source = "steps.json"
    else:
        events = _event_files(paths.tensorboard)
        series = _read_events(events, notes, tensors=False) if events else {}
        curves = _detlab_step_curves(series, [row["step"] for row in epochs if math.isfinite(row.get("step", math.nan))])
        curves.step_source = "the TensorBoard events" if events else ""
        if summary and summary.get("status") == "diverged":
            notes.append("the run diverged: its last step's non-finite loss is not in the TensorBoard events "
                         "(only finite values are logged), so a divergence the run recorded may be missing here")
        if config is not None and config.loss.adaptive_weights.enabled and len(curves.steps):
            _add_weights_ramping(curves, config, _planned_steps(config, epochs, curves))
    curves.source, curves.kind = str(root), RUN_FOLDER
    curves.epochs, curves.config, curves.recorded, curves.repaired = epochs, config, recorded, repaired
    curves.epoch_source = "metrics.csv"
    curves.total_steps = total or (_planned_steps(config, epochs, curves) if config is not None else None)
    curves.notes = notes + curves.notes
    if not len(curves.steps) and not epochs:
        raise SourceError(f"{root}: nothing recorded yet (metrics.csv has no epoch and there are no step signals: "
                          "no steps.json, no TensorBoard events)")
    return curves


def _planned_steps(config: Config, epochs: Sequence[Mapping[str, float]], curves: Curves) -> Optional[int]:
    """The run's planned steps: its steps per epoch (the first validated epoch's steps done) times its epochs."""
    for row in epochs:
        epoch, step = row.get("epoch", math.nan), row.get("step", math.nan)
        if math.isfinite(epoch) and math.isfinite(step) and epoch >= 1 and step > 0:
            return int(round(step / epoch)) * config.train.epochs
    return int(curves.steps[-1]) + 1 if len(curves.steps) else None


def _add_weights_ramping(curves: Curves, config: Config, total_steps: Optional[int]) -> None:
    """The TensorBoard events leave out whether the adaptive loss weights ramp (loss_imbalance skips
    those samples): the schedule says it, from the run's config."""
    from detlab.loss import LossWeightSchedule  # the loss's own schedule (torch): only for such a run

    lo = config.loss
    schedule = LossWeightSchedule(lo.adaptive_weights, lo.class_weight, lo.box_weight, total_steps or len(curves.steps))
    curves.signals["weights_ramping"] = np.array([float(schedule.ramping(int(s))) for s in curves.steps])
    curves.present["weights_ramping"] = np.ones(len(curves.steps), dtype=bool)


def _curves_from_step_dicts(steps: Sequence[Mapping[str, Any]]) -> Curves:
    """``steps.json``'s records (``step``, ``epoch`` and the signals) as columns."""
    n = len(steps)
    keys = [k for k in STEP_SIGNALS if any(k in row for row in steps)]
    signals = {k: np.array([float(row.get(k, math.nan)) for row in steps], dtype=np.float64) for k in keys}
    present = {k: np.array([k in row for row in steps], dtype=bool) for k in keys}
    return Curves(source="", kind=RUN_FOLDER, steps=np.array([int(r["step"]) for r in steps], dtype=np.int64).reshape(n),
                  step_epochs=np.array([int(r["epoch"]) for r in steps], dtype=np.int64).reshape(n),
                  signals=signals, present=present, epochs=[])


def _detlab_step_curves(series: Mapping[str, Mapping[int, float]], validated: Sequence[float]) -> Curves:
    """detlab's ``train/<signal>`` scalars as step records; a step's epoch is one more than the
    validations done by then (``validated``: their steps done)."""
    tags = {key: series[f"train/{key}"] for key in STEP_SIGNALS if f"train/{key}" in series}
    steps = np.array(sorted({s for values in tags.values() for s in values}), dtype=np.int64)
    signals, present = {}, {}
    for key, values in tags.items():
        signals[key], present[key] = _column(values, steps)
    epochs = 1 + np.searchsorted(np.sort(np.asarray(validated, dtype=np.float64)), steps, side="right")
    return Curves(source="", kind=TENSORBOARD, steps=steps, step_epochs=epochs.astype(np.int64), signals=signals,
                  present=present, epochs=[], columns={key: f"train/{key}" for key in tags})


def _column(values: Mapping[int, float], steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``{step: value}`` on the ``steps`` axis: values (NaN where absent) and where present."""
    keys = np.fromiter(values.keys(), dtype=np.int64, count=len(values))
    vals = np.fromiter(values.values(), dtype=np.float64, count=len(values))
    at = np.searchsorted(steps, keys)
    column, mask = np.full(len(steps), np.nan), np.zeros(len(steps), dtype=bool)
    column[at], mask[at] = vals, True
    return column, mask


# ----------------------------------------------------------------------------------- TensorBoard
def _read_events(files: Sequence[Path], notes: list[str], tensors: bool = True) -> dict[str, dict[int, float]]:
    """Every scalar of the event files: ``{tag: {step: value}}``; a later file's value for a step
    wins (a resumed run). Scalars written as tensors (TensorFlow 2's summaries) count too unless
    ``tensors`` is False (detlab's own events: its tensors are text and PR curves)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # slow import: only here
    from tensorboard.util import tensor_util

    series: dict[str, dict[int, float]] = {}
    for path in files:
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0 if tensors else 1})
        try:
            accumulator.Reload()
        except Exception as error:  # noqa: BLE001 - a truncated or foreign file: say so, read the others
            notes.append(f"{path.name}: unreadable as TensorBoard events ({type(error).__name__}), skipped")
            continue
        tags = accumulator.Tags()
        for tag in tags.get("scalars", []):
            series.setdefault(tag, {}).update({int(e.step): float(e.value) for e in accumulator.Scalars(tag)})
        for tag in tags.get("tensors", []) if tensors else ():
            for event in accumulator.Tensors(tag):
                try:
                    value = tensor_util.make_ndarray(event.tensor_proto)
                except Exception:  # noqa: BLE001 - not a numeric tensor (text, hparams)
                    break
                if value.size != 1 or value.dtype.kind not in "fiu":
                    break
                series.setdefault(tag, {})[int(event.step)] = float(value.reshape(()))
    return series


def _load_events(path: Path, files: Sequence[Path]) -> Curves:
    notes: list[str] = []
    series = _read_events(files, notes)
    if not series:
        raise SourceError(f"{path}: no scalar in the TensorBoard events; {_EXPECTED_NAMES}")
    if DETLAB_EPOCH_TAG in series:  # detlab's own events: the epoch rows are at its validations
        return _load_detlab_events(path, series, notes)
    steps = np.array(sorted({s for values in series.values() for s in values}), dtype=np.int64)
    columns = {}
    for tag, values in series.items():
        columns[tag] = _column(values, steps)
    curves = _curves_from_columns(path, TENSORBOARD, columns, steps.astype(np.float64), "tag", notes)
    curves.step_source = curves.epoch_source = "the TensorBoard events"
    return curves


def _load_detlab_events(path: Path, series: Mapping[str, Mapping[int, float]], notes: list[str]) -> Curves:
    validations = series[DETLAB_EPOCH_TAG]
    curves = _detlab_step_curves(series, list(validations))
    for at, epoch in sorted(validations.items()):
        row = {"epoch": float(epoch), "step": float(at)}
        row.update({key: float(series[key][at]) for key in EPOCH_SIGNALS if at in series.get(key, {})})
        curves.epochs.append(row)
    _add_epoch_means(curves)
    curves.source, curves.kind, curves.notes = str(path), TENSORBOARD, notes
    curves.step_source = curves.epoch_source = "the TensorBoard events"
    curves.columns.update({key: key for key in EPOCH_SIGNALS if key in series})
    return curves


# ------------------------------------------------------------------------------------------- CSV
_NAMES = "step, epoch, loss (or train_loss), cls_loss, box_loss, val_loss, recall, precision, ap50, tp, fp"
_EXPECTED_NAMES = f"expected names such as {_NAMES}"


def _load_csv(path: Path) -> Curves:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SourceError(f"{path}: not a text file; expected a CSV file with a header line") from None
    except OSError as error:
        raise SourceError(f"{path}: unreadable ({error.strerror or error})") from None
    lines = text.splitlines(keepends=True)
    if not lines or not lines[0].strip():
        raise SourceError(f"{path}:1: no header line; expected a CSV file whose first line names the columns, "
                          f"such as {_NAMES}")
    first = lines[0]
    delimiter = "\t" if "\t" in first and "," not in first else ";" if ";" in first and "," not in first else ","
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    notes: list[str] = []
    cells: list[list[str]] = []
    numbers: list[int] = []
    try:
        header = [name.strip() for name in next(reader)]
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                if reader.line_num == len(lines) and not lines[-1].endswith(("\n", "\r")):
                    notes.append(f"line {reader.line_num} was cut short (written while being read): left out")
                    continue
                raise SourceError(f"{path}:{reader.line_num}: {len(row)} cells where the header has {len(header)}; "
                                  "expected one cell per column")
            cells.append(row)
            numbers.append(reader.line_num)
    except csv.Error as error:
        raise SourceError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None
    recognised = [i for i, name in enumerate(header) if _canonical(name) is not None]
    if not any(_canonical(header[i]) not in ("step", "epoch") for i in recognised):
        shown = ", ".join(header[:8]) + (", ..." if len(header) > 8 else "")
        raise SourceError(f"{path}: no recognised column in the header ({shown}); {_EXPECTED_NAMES}")
    if not cells:
        raise SourceError(f"{path}: a header but no rows; expected one row per logged step or epoch")
    columns = {}
    for i in recognised:
        raw = np.array([row[i].strip() for row in cells], dtype=object)
        mask = raw != ""
        try:
            values = np.where(mask, raw, "nan").astype(np.float64)
        except ValueError:
            bad = next(j for j, cell in enumerate(raw) if cell and not _is_number(cell))
            raise SourceError(f"{path}:{numbers[bad]}: column {header[i]!r}: {raw[bad]!r} is not a number") from None
        columns[header[i]] = (values, mask)
    curves = _curves_from_columns(path, CSV_FILE, columns, None, "column", notes,
                                  ignored=[name for i, name in enumerate(header) if i not in recognised])
    curves.step_source = curves.epoch_source = path.name
    return curves


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------- named columns to curves
def _canonical(name: str) -> Optional[str]:
    """The signal a column or tag name stands for ("step", "epoch", a signal, or "+" for a further
    loss term, "+val" for a further validation loss term); None: not recognised."""
    key = name.strip().lower()
    return _LOOKUP.get(key)


def _build_lookup() -> dict[str, str]:
    lookup: dict[str, str] = {}
    for name in STEP_NAMES:
        lookup.setdefault(name, "step")
    for name in EPOCH_NAMES + (DETLAB_EPOCH_TAG,):
        lookup.setdefault(name, "epoch")
    for key, names in ALIASES.items():
        for name in names:
            lookup.setdefault(name, key)
    for name in EXTRA_TRAIN_TERMS:
        lookup.setdefault(name, "+")
    for name in EXTRA_VAL_TERMS:
        lookup.setdefault(name, "+val")
    return lookup


_LOOKUP = _build_lookup()


_PRIORITY = {name: i for i, name in enumerate(_LOOKUP)}


def _preferred(names: Iterable[str]) -> dict[str, str]:
    """signal -> the source name it is read from: of several names for one signal, the first alias."""
    chosen: dict[str, str] = {}
    for name in names:
        key = _canonical(name)
        if key is None or key in ("+", "+val"):
            continue
        if key not in chosen or _PRIORITY[name.strip().lower()] < _PRIORITY[chosen[key].strip().lower()]:
            chosen[key] = name
    return chosen


def _curves_from_columns(path: Path, kind: str, columns: Mapping[str, tuple[np.ndarray, np.ndarray]],
                         steps: Optional[np.ndarray], unit: str, notes: list[str],
                         ignored: Sequence[str] = ()) -> Curves:
    """Named columns of one table (rows in order; ``steps``: the rows' step numbers when the source
    numbers them, as TensorBoard does) as ``Curves`` (see the module docstring)."""
    chosen = _preferred(columns)
    ignored = list(ignored) + [n for n in columns if _canonical(n) is None]
    ignored += [n for n in columns if _canonical(n) not in (None, "+", "+val") and chosen.get(_canonical(n)) != n]
    ignored = [n for n in dict.fromkeys(ignored) if n.strip().lower() not in QUIETLY_IGNORED]
    rows = len(next(iter(columns.values()))[0])
    data = {key: columns[name] for key, name in chosen.items() if key not in ("step", "epoch")}
    if not data and not any(_canonical(n) in ("+", "+val") for n in columns):
        names = sorted(columns)
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise SourceError(f"{path}: no recognised {unit} ({shown}); {_EXPECTED_NAMES}")
    _derive_total(data, "loss_total", LOSS_TERMS, [columns[n] for n in columns if _canonical(n) == "+"],
                  notes, "the training loss is the sum of the loss terms (the source has no total)")
    _derive_total(data, "val/loss_total", VAL_LOSS_TERMS, [columns[n] for n in columns if _canonical(n) == "+val"],
                  notes, "the validation loss is the sum of its terms (the source has no total)")
    percent = [key for key in SHARES if key in data and _above_one(*data[key])]
    for key in percent:
        data[key] = (data[key][0] / 100.0, data[key][1])
    if percent:
        notes.append(f"{', '.join(chosen[k] for k in percent)} read as percentages (values above 1)")

    train_keys = [k for k in STEP_SIGNALS if k in data]
    val_keys = [k for k in EPOCH_SIGNALS if k in data]
    train_row = np.zeros(rows, dtype=bool)
    for key in train_keys:
        train_row |= data[key][1]
    val_row = np.zeros(rows, dtype=bool)
    for key in val_keys:
        val_row |= data[key][1]
    if steps is None and "step" in chosen:
        values, mask = columns[chosen["step"]]
        steps = np.where(mask, values, np.nan)
    dated = steps is not None
    per_epoch = bool(val_row.any()) and not bool((train_row & ~val_row).any())
    epoch_values = None
    if "epoch" in chosen:
        values, mask = columns[chosen["epoch"]]
        epoch_values = _fill(np.where(mask, values, np.nan))
    offset = 0
    if epoch_values is not None and np.isfinite(epoch_values).any() and np.nanmin(epoch_values) == 0:
        offset = 1  # counted from 0 (PyTorch Lightning): the detectors count from 1
        notes.append("the epochs are counted from 0 in the source; the report counts them the same way")

    if per_epoch:
        keep = np.flatnonzero(train_row | val_row)
        epochs = np.arange(1, len(keep) + 1, dtype=np.float64)
        if epoch_values is not None:
            given = epoch_values[keep] + offset
            if np.isfinite(given).all() and (np.diff(given) > 0).all():
                epochs = given
            else:
                notes.append("the epoch column does not increase row by row: the rows are counted as epochs instead")
                offset = 0
        sample = keep[train_row[keep]]
        curves = _step_curves(data, train_keys, sample, epochs[train_row[keep]])
        curves.steps = np.flatnonzero(train_row[keep]).astype(np.int64)  # a record per row: its position
        row_steps = steps[keep] if dated else np.full(len(keep), np.nan)
        curves.epochs = [_epoch_row(data, val_keys, i, epochs[j], row_steps[j], j + 1) for j, i in enumerate(keep)]
        curves.per_epoch, curves.dated = True, False
        curves.report_steps = np.asarray(steps[sample], dtype=np.float64) if dated else None
        if not dated:
            notes.append("one row per epoch: the step checks read one training loss per epoch")
        else:
            notes.append("one row per validated step: the step checks read one training loss per validation")
    else:
        order = np.arange(rows, dtype=np.float64) if steps is None else steps
        if not np.isfinite(order[train_row | val_row]).all():
            raise SourceError(f"{path}: rows without a step number; expected one in every row of the "
                              f"{chosen.get('step', 'step')} {unit}")
        sample = np.flatnonzero(train_row)
        sample = sample[np.argsort(order[sample], kind="stable")]
        validations = np.flatnonzero(val_row)
        validations = validations[np.argsort(order[validations], kind="stable")]
        if epoch_values is not None and np.isfinite(epoch_values).all():
            sample_epochs = epoch_values[sample] + offset
            val_epochs = epoch_values[validations] + offset
        else:  # a step belongs to the next validation at or after it
            val_epochs = np.arange(1, len(validations) + 1, dtype=np.float64)
            sample_epochs = 1.0 + np.searchsorted(order[validations], order[sample], side="left")
        curves = _step_curves(data, train_keys, sample, sample_epochs)
        curves.steps = order[sample].astype(np.int64)
        if steps is None:
            notes.append("the source numbers no steps: its rows are counted as steps, from 0")
        # steps done at each validation: one more than the last step of its epoch and those before
        by_epoch = np.argsort(curves.step_epochs, kind="stable")
        last = np.maximum.accumulate(curves.steps[by_epoch]) if len(by_epoch) else np.zeros(0, dtype=np.int64)
        before = np.searchsorted(curves.step_epochs[by_epoch], val_epochs, side="right")
        done = np.where(before > 0, last[np.maximum(before - 1, 0)] + 1 if len(last) else 0, 0)
        merged: dict[float, dict[str, float]] = {}
        for j, (i, epoch) in enumerate(zip(validations.tolist(), val_epochs.tolist())):
            merged.setdefault(epoch, {}).update(_epoch_row(data, val_keys, i, epoch, order[i], done[j]))
        curves.epochs = [merged[e] for e in sorted(merged)]
    curves.source, curves.kind, curves.epoch_offset = str(path), kind, offset
    curves.columns = {k: n for k, n in chosen.items()}
    curves.ignored, curves.notes = ignored, notes + curves.notes
    _add_epoch_means(curves)
    return curves


def _above_one(values: np.ndarray, mask: np.ndarray) -> bool:
    finite = values[mask & np.isfinite(values)]
    return bool(finite.size) and float(finite.max()) > 1.0


def _fill(values: np.ndarray) -> np.ndarray:
    """NaN cells take the previous value (the first ones the next)."""
    finite = np.isfinite(values)
    if not finite.any():
        return values
    index = np.where(finite, np.arange(len(values)), 0)
    np.maximum.accumulate(index, out=index)
    out = values[index]
    first = np.flatnonzero(finite)[0]
    out[:first] = values[first]
    return out


def _derive_total(data: dict[str, tuple[np.ndarray, np.ndarray]], total: str, terms: Sequence[str],
                  extra: Sequence[tuple[np.ndarray, np.ndarray]], notes: list[str], note: str) -> None:
    parts = [data[t] for t in terms if t in data] + list(extra)
    if total in data or not parts:
        return
    values = np.sum([p[0] for p in parts], axis=0)
    mask = np.logical_and.reduce([p[1] for p in parts])
    data[total] = (np.where(mask, values, np.nan), mask)
    notes.append(note)


def _step_curves(data: Mapping[str, tuple[np.ndarray, np.ndarray]], keys: Sequence[str], rows: np.ndarray,
                 epochs: np.ndarray) -> Curves:
    signals = {k: data[k][0][rows] for k in keys}
    present = {k: data[k][1][rows] for k in keys}
    return Curves(source="", kind="", steps=np.arange(len(rows), dtype=np.int64),
                  step_epochs=np.asarray(epochs, dtype=np.int64), signals=signals, present=present, epochs=[])


def _epoch_row(data: Mapping[str, tuple[np.ndarray, np.ndarray]], keys: Sequence[str], i: int, epoch: float,
               step: float, done: float) -> dict[str, float]:
    row = {"epoch": float(epoch), "step": float(done), "report_step": float(step)}
    row.update({k: float(data[k][0][i]) for k in keys if data[k][1][i]})
    return row


def _add_epoch_means(curves: Curves) -> None:
    """The epoch rows' ``train/loss_*`` (metrics.csv's epoch means) from the step records, where the
    source has no such column: the mean of each epoch's finite values."""
    if not curves.epochs or not len(curves.steps):
        return
    index = {int(row["epoch"]): i for i, row in enumerate(curves.epochs)}
    slot = np.array([index.get(int(e), -1) for e in curves.step_epochs.tolist()], dtype=np.int64)
    for key in ("loss_cls", "loss_box", "loss_total"):
        if key not in curves.signals or any(f"train/{key}" in row for row in curves.epochs):
            continue
        values = curves.signals[key]
        use = (slot >= 0) & curves.present[key] & np.isfinite(values)
        sums = np.bincount(slot[use], weights=values[use], minlength=len(curves.epochs))
        counts = np.bincount(slot[use], minlength=len(curves.epochs))
        for i, row in enumerate(curves.epochs):
            if counts[i]:
                row[f"train/{key}"] = float(sums[i] / counts[i])


# --------------------------------------------------------------------------------------- report
@dataclass
class ReportFinding:
    """One finding, said in words: when (``step`` None: the source has no step numbers), what the
    detector saw (``evidence``), why it happens (``cause``) and what to do (``remedy``)."""

    detector: str
    title: str
    severity: str  # "critical" (a detlab run stops on it) | "failure" | "note" (a run that learns)
    stage: str
    epoch: Optional[int]
    step: Optional[int]
    evidence: str
    cause: str
    remedy: str
    values: dict[str, float] = field(default_factory=dict)  # the detector's numbers behind it

    def to_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, "title": self.title, "severity": self.severity, "stage": self.stage,
                "epoch": self.epoch, "step": self.step, "evidence": self.evidence, "cause": self.cause,
                "remedy": self.remedy, "values": {k: _finite_or_none(v) for k, v in self.values.items()}}


@dataclass
class Skipped:
    detector: str
    title: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"detector": self.detector, "title": self.title, "reason": self.reason}


@dataclass
class Report:
    """What ``diagnose`` found on a source, and what it could not check."""

    source: str
    kind: str
    steps_read: int
    epochs_read: int
    thresholds: str
    findings: list[ReportFinding]
    skipped: list[Skipped]
    overrides: list[str] = field(default_factory=list)
    step_every: int = 1  # the training records' spacing in steps (1: every step)
    per_epoch: bool = False
    step_source: str = ""
    epoch_source: str = ""
    first_step: Optional[int] = None
    last_step: Optional[int] = None
    columns: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recorded: Optional[list[dict[str, Any]]] = None  # the run's own findings (a run folder)

    @property
    def failures(self) -> list[ReportFinding]:
        return [f for f in self.findings if f.severity != "note"]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "steps_read": self.steps_read,
                "epochs_read": self.epochs_read, "step_every": self.step_every, "per_epoch": self.per_epoch,
                "first_step": self.first_step, "last_step": self.last_step, "thresholds": self.thresholds,
                "overrides": list(self.overrides), "columns": dict(self.columns), "ignored": list(self.ignored),
                "notes": list(self.notes), "findings": [f.to_dict() for f in self.findings],
                "skipped": [s.to_dict() for s in self.skipped],
                "recorded": None if self.recorded is None else [
                    {k: f.get(k) for k in ("detector", "stage", "step", "epoch")} for f in self.recorded],
                "failure_found": bool(self.failures)}


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


def todays_diagnosis() -> Any:
    """Today's thresholds: ``configs/diagnosis/default.yaml`` on the schema (``DiagnosisConfig``)."""
    path = config_dir() / "diagnosis" / "default.yaml"
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DiagnosisConfig), OmegaConf.load(path))
    except OmegaConfBaseException as error:
        raise ConfigError(f"{path}: {str(error).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)


def with_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """``config`` with ``key=value`` overrides (``diagnosis.stuck.min_drop=0.05``), typed and validated
    like a run's (``ConfigError`` names a bad key or value)."""
    if not overrides:
        return config
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. diagnosis.stuck.min_drop=0.05")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
        merged = OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(config))), dotlist)
    except OmegaConfBaseException as error:
        raise ConfigError(f"--set: {str(error).splitlines()[0]}") from None
    return to_config(merged)


def _foreign_config(curves: Curves) -> Config:
    """The config another training's curves are replayed with: today's thresholds, no warm-up known
    (stages: the first 10% and the last 30% of the steps), its epochs."""
    config = Config()
    config.schedule.warmup = False
    epochs = [int(e) for e in curves.step_epochs.tolist()] + [int(row["epoch"]) for row in curves.epochs]
    config.train.epochs = max([1, *epochs])
    return config


def diagnose(curves: Curves, overrides: Sequence[str] = (), today: bool = False) -> Report:
    """Replay ``curves`` through the detectors that can run on them (see the module docstring):
    a run folder with its own config (its diagnosis block unless ``today``), other sources with
    today's thresholds; ``overrides`` (``key=value``) on top."""
    own = curves.config is not None
    config = copy.deepcopy(curves.config) if own else _foreign_config(curves)
    if today or not own:
        config.diagnosis = todays_diagnosis()
    config = with_overrides(config, overrides)
    if own and today:
        thresholds = "today's (configs/diagnosis/default.yaml)"
    elif own:
        thresholds = "the run's own (its config.yaml)"
    else:
        thresholds = "today's (configs/diagnosis/default.yaml)"

    skipped = _skip(config, curves)
    n = len(curves.steps)
    every = max(1, int(np.median(np.diff(curves.steps)))) if n > 1 and curves.dated else 1
    replay_steps, total, stages, epoch_rows = _replay_axis(curves, config, every)
    findings = replay_findings(config, curves.step_rows(replay_steps), epoch_rows, total, advice=own, stages=stages,
                               repaired=curves.repaired)

    report_steps = _report_steps(curves, replay_steps)
    row_steps = {int(row["epoch"]): row.get("report_step", row["step"]) for row in curves.epochs}
    out = [_report_finding(f, config, curves, report_steps, row_steps) for f in findings]
    notes = list(curves.notes)
    if every > 1 and not curves.per_epoch:
        notes.append(f"the training signals were recorded every {every} steps: the step checks count records, "
                     "not steps, and date a finding at the record that showed it")
    if not own and not any(o.startswith(("stages.", "schedule.")) for o in overrides):
        notes.append("stages: the early stage is the first 10% of the training, the late stage the last 30% "
                     "(--set stages.early_end_fraction=... stages.late_start_fraction=... changes them)")
    return Report(source=curves.source, kind=curves.kind, steps_read=n, epochs_read=len(curves.epochs),
                  thresholds=thresholds, findings=out, skipped=skipped, overrides=list(overrides),
                  step_every=every, per_epoch=curves.per_epoch, step_source=curves.step_source,
                  epoch_source=curves.epoch_source,
                  first_step=int(curves.steps[0]) if n and curves.dated else None,
                  last_step=int(curves.steps[-1]) if n and curves.dated else None,
                  columns=dict(curves.columns), ignored=list(curves.ignored), notes=notes, recorded=curves.recorded)


def _replay_axis(curves: Curves, config: Config, every: int) -> tuple[np.ndarray, int, Optional[StageBoundaries],
                                                                     list[dict[str, float]]]:
    """The steps the replay numbers the training records with, its total steps, its stage boundaries
    (None: from the config) and the epoch rows with their steps done on that axis.

    Every step recorded: the source's own step numbers. One row per epoch: each row is a step.
    Recorded every ``every`` > 1 steps: the records are numbered 0, 1, ... and the stages are the
    training's, counted in records (the detectors' step windows then count records)."""
    n = len(curves.steps)
    rows = [{k: v for k, v in row.items() if k != "report_step"} for row in curves.epochs]
    records_done = np.searchsorted(np.sort(curves.step_epochs), [row["epoch"] for row in rows], side="right")
    if curves.per_epoch:  # the rows' own positions: the epoch rows' steps are already rows done
        return curves.steps, max(1, len(rows), int(curves.steps[-1]) + 1 if n else 0), None, rows
    if every == 1:
        for row, done in zip(rows, records_done.tolist()):
            if not math.isfinite(row["step"]):
                row["step"] = float(done)
        last = int(curves.steps.max()) + 1 if n else 0
        total = max(1, curves.total_steps or 0, last, *(int(r["step"]) for r in rows))
        return curves.steps, total, None, rows
    for row, done in zip(rows, records_done.tolist()):
        row["step"] = float(done)  # records done by this validation
    after = (curves.total_steps - 1 - int(curves.steps[-1])) // every if curves.total_steps else 0
    planned = max(curves.total_steps or 0, int(curves.steps[-1]) + 1)
    trained = stage_boundaries(config.stages, config.schedule, planned, max(1, planned // config.train.epochs))
    early = max(1, int(np.searchsorted(curves.steps, trained.early_end)))
    stages = StageBoundaries(early, max(early, int(np.searchsorted(curves.steps, trained.late_start))),
                             warmup_end=int(np.searchsorted(curves.steps, trained.warmup_end)))
    return np.arange(n, dtype=np.int64), max(1, n + max(0, after)), stages, rows


def diagnose_path(path: Path | str, overrides: Sequence[str] = (), today: bool = False) -> Report:
    """``diagnose(load_curves(path), overrides, today)``."""
    return diagnose(load_curves(path), overrides, today)


def _report_steps(curves: Curves, replay_steps: np.ndarray) -> dict[int, Optional[int]]:
    """Replayed step -> the step the report names (None: the source numbers no steps)."""
    source = curves.report_steps
    if curves.per_epoch:
        if source is None:
            return {}
        return {int(i): (int(s) if math.isfinite(s) else None) for i, s in zip(replay_steps.tolist(), source.tolist())}
    return {int(i): int(s) for i, s in zip(replay_steps.tolist(), curves.steps.tolist())}


def _skip(config: Config, curves: Curves) -> list[Skipped]:
    """The detectors that cannot or may not run, each switched off in ``config`` (a copy), with the reason."""
    available = curves.available()
    skipped = []
    for cls in registered_detectors():
        block = block_of(config.diagnosis, cls)
        if not config.diagnosis.enabled:
            reason = "the diagnosis is switched off in the config"
        elif not block.enabled:
            reason = f"switched off in the config (--set diagnosis.{cls.name}.enabled=true runs it)"
        else:
            unmet = unmet_needs(cls, available)
            if not unmet:
                continue
            reason = _needs_in_words(unmet, curves)
            block.enabled = False
        skipped.append(Skipped(cls.name, cls.title, reason))
    return skipped


# The name a skipped detector's reason suggests for a missing column or tag.
_HINTS = {"loss_total": "loss", "train/loss_total": "loss", "loss_cls": "cls_loss", "train/loss_cls": "cls_loss",
          "val/recall": "recall", "val/precision": "precision", "val/ap50": "ap50", "val/fp": "fp",
          "val/loss_total": "val_loss", "val/pred_per_image": "pred_per_image",
          "val/pred_large_share": "pred_large_share"}


def _listed(items: Iterable[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    items = list(dict.fromkeys(items))
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _needs_in_words(unmet: Sequence[Need], curves: Curves) -> str:
    said = _listed(need.what for need in unmet)
    if curves.kind == RUN_FOLDER:
        return f"needs {said}, which this run folder did not record"
    if any(need.model for need in unmet):
        return f"needs {said} (recorded only while training a detlab model)"
    unit = "column" if curves.kind == CSV_FILE else "tag"
    hints = [_HINTS.get(need.signals[0], need.signals[0]) for need in unmet]
    named = f"a {unit} named {hints[0]}" if len(set(hints)) == 1 else f"{unit}s named {_listed(hints)}"
    return f"needs {said} ({named})"


def _report_finding(finding: Finding, config: Config, curves: Curves, report_steps: Mapping[int, Optional[int]],
                    row_steps: Mapping[int, float]) -> ReportFinding:
    cls: type[Detector] = get_detector(finding.detector)
    stops = cls.stop_reason is not None and getattr(block_of(config.diagnosis, cls), "stop", False)
    severity = "note" if not finding.failure else "critical" if stops else "failure"
    if cls.level.value == "epoch":
        step = row_steps.get(finding.epoch)
        step = int(step) if step is not None and math.isfinite(step) else None
    else:
        step = report_steps.get(finding.step)
    remedy = finding.remedy
    return ReportFinding(detector=finding.detector, title=finding.title or cls.title, severity=severity,
                         stage=finding.stage, epoch=finding.epoch - curves.epoch_offset, step=step,
                         evidence=finding.message, cause=finding.cause or cls.cause,
                         remedy=remedy[:1].upper() + remedy[1:], values=dict(finding.evidence))


# ------------------------------------------------------------------------------------- printing
def _when(f: ReportFinding) -> str:
    parts = [f"{f.stage} stage"]
    if f.epoch is not None:
        parts.append(f"epoch {f.epoch}")
    if f.step is not None:
        parts.append(f"step {f.step}")
    return ", ".join(parts)


def _wrap(label: str, text: str, width: int = 100) -> str:
    return textwrap.fill(text, width=width, initial_indent=f"  {label:<12}", subsequent_indent=" " * 14,
                         break_on_hyphens=False)


_SEVERITY_WORDS = {"critical": "failure, a detlab run stops on it", "note": "note, not a failure"}


def format_report(report: Report) -> str:
    """The report as a person reads it: what was read, one block per finding, what was skipped and why."""
    lines = [f"Diagnosis of {report.source} ({report.kind})"]
    if report.per_epoch:
        read = f"Read {report.epochs_read} epochs (one row each)"
    else:
        read = f"Read {report.steps_read} training records"
        if report.first_step is not None and report.steps_read:
            every = "every step" if report.step_every == 1 else f"every {report.step_every} steps"
            read += f" (steps {report.first_step} to {report.last_step}, {every})"
        read += f" and {report.epochs_read} validated epochs"
    sources = [s for s in dict.fromkeys((report.step_source, report.epoch_source)) if s]
    lines.append(read + (f" from {' and '.join(sources)}." if sources else "."))
    if report.columns and report.kind != RUN_FOLDER:
        unit = "Columns" if report.kind == CSV_FILE else "Tags"
        lines.append(textwrap.fill(f"{unit} read: " + ", ".join(report.columns.values()) + ".", width=100,
                                   subsequent_indent="  "))
    if report.ignored:
        lines.append(textwrap.fill("Not recognised, ignored: " + ", ".join(report.ignored) + ".", width=100,
                                   subsequent_indent="  "))
    thresholds = f"Thresholds: {report.thresholds}"
    if report.overrides:
        thresholds += f", with {' '.join(report.overrides)}"
    lines.append(thresholds + ".")
    for note in report.notes:
        lines.append(textwrap.fill(f"Note: {note}.", width=100, subsequent_indent="  "))
    if report.recorded is not None:
        said = ", ".join(f"{_recorded_title(f)} ({_recorded_when(f)})" for f in report.recorded)
        lines.append(textwrap.fill(f"The run itself recorded: {said or 'no finding'}.", width=100,
                                   subsequent_indent="  "))
    for number, f in enumerate(report.findings, start=1):
        severity = _SEVERITY_WORDS.get(f.severity, f.severity)
        lines += ["", f"{number}. {f.title[:1].upper() + f.title[1:]} ({severity}; {_when(f)})",
                  _wrap("What:", f.evidence), _wrap("Cause:", f.cause), _wrap("What to do:", f.remedy)]
    if report.skipped:
        lines.append("")
        lines += [f"skipped: {s.title} — {s.reason}" for s in report.skipped]
    lines.append("")
    failures = report.failures
    notes = len(report.findings) - len(failures)
    if failures:
        lines.append(f"{len(failures)} failure{'s' if len(failures) > 1 else ''} found"
                     + (f", {notes} note{'s' if notes > 1 else ''}" if notes else ""))
    else:
        lines.append("no failure found" + (f" ({notes} note{'s' if notes > 1 else ''})" if notes else ""))
    return "\n".join(lines)


def _recorded_title(finding: Mapping[str, Any]) -> str:
    try:
        return get_detector(str(finding.get("detector"))).title
    except KeyError:
        return str(finding.get("detector"))


def _recorded_when(finding: Mapping[str, Any]) -> str:
    parts = []
    if finding.get("epoch") is not None:
        parts.append(f"epoch {finding['epoch']}")
    if finding.get("step") is not None:
        parts.append(f"step {finding['step']}")
    return ", ".join(parts)


def report_json(report: Report) -> str:
    """The report as strict JSON (a non-finite number is null)."""
    return json.dumps(report.to_dict(), indent=2, allow_nan=False)
