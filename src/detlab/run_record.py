"""The run folder's one owner: where each file lives, what ``summary.json`` holds, the run statuses,
the ``metrics.csv`` columns, and reading and writing them.

The trainer writes a run folder through this module; ``train.py``, the sweep report, the results page,
``detlab diagnose``-style readers and the benchmarks read it through this module. A run folder::

    <run_dir>/
      summary.json        the run record (RunSummary): status, best, final, findings, ...
      metrics.csv         one row per validated epoch (METRIC_COLUMNS)
      config.yaml         the validated config the run trained with
      test.json           the after-training test (eval.test_protocol), when there is one
      checkpoints/        last.pt, best.pt
      plots/              curves.png, pr_curve.png, train_samples.jpg
      events.out.tfevents.*   TensorBoard
      .lock               held while a process trains into the folder
      .hydra/             Hydra's record of the composed config and overrides
"""

from __future__ import annotations

import csv
import enum
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import OmegaConf

from detlab.runtime.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    exclusive_lock,
    remove_stale_temporaries,
    write_csv,
    write_json,
)

log = logging.getLogger(__name__)


class RunStatus(str, enum.Enum):
    """A run's status in ``summary.json``. ``str`` valued, so records and comparisons with the JSON
    text work unchanged (``RunStatus.COMPLETED == "completed"``)."""

    RUNNING = "running"  # written before the first step and at every epoch while training
    COMPLETED = "completed"  # trained every planned epoch
    STOPPED = "stopped"  # ended early on purpose: early stopping or the diagnosis's stop
    DIVERGED = "diverged"  # a non-finite loss or the divergence detector ended it
    FAILED = "failed"  # an error ended it (the message says which)
    # SIGINT/SIGTERM (Ctrl-C, kill, a cluster's preemption) ended it after a step, with checkpoints/last.pt
    # saved there: resume=<run dir> continues it exactly
    INTERRUPTED = "interrupted"
    UNKNOWN = "unknown"  # a reader's answer for an unreadable summary.json; never written

    def __str__(self) -> str:
        return self.value

    @property
    def failed(self) -> bool:
        """A run that produced no usable model: diverged or failed."""
        return self in (RunStatus.DIVERGED, RunStatus.FAILED)

    @classmethod
    def parse(cls, value: Any) -> "RunStatus":
        try:
            return cls(str(value))
        except ValueError:
            return cls.UNKNOWN


STATUSES: tuple[RunStatus, ...] = tuple(s for s in RunStatus if s is not RunStatus.UNKNOWN)
FAILED_STATUSES: tuple[RunStatus, ...] = tuple(s for s in RunStatus if s.failed)

STAGES = ("early", "mid", "late")
LOSS_KEYS = ("loss_cls", "loss_box", "loss_total")

# metrics.csv: one row per validated epoch, these columns in this order.
METRIC_COLUMNS = [
    "epoch", "step", "lr",
    *(f"train/{key}" for key in LOSS_KEYS),
    *(f"val/{key}" for key in LOSS_KEYS),
    "val/miou", "val/mean_tp_iou", "val/tp", "val/fp", "val/fn",
    "val/precision", "val/recall", "val/f1", "val/ap50",
    "val/pred_per_image", "val/pred_mean_size", "val/pred_large_share", "val/fp_small_share",
    "val/fp_localisation", "val/fp_duplicate", "val/fp_background",
    "train_time_s", "val_time_s", "pictures_time_s",
]

# summary.json's "test": the after-training test's headline (the evaluation result's keys, plus
# wider_easy/medium/hard under protocol=wider, and the input size and epoch it was scored at).
TEST_METRIC_KEYS = ("recall", "precision", "tp", "fp", "fn", "miou", "ap50")
WIDER_TEST_KEYS = ("wider_easy", "wider_medium", "wider_hard")
TEST_KEYS = WIDER_TEST_KEYS + TEST_METRIC_KEYS


@dataclass(frozen=True)
class RunPaths:
    """Where each file of a run folder lives."""

    root: Path

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def test(self) -> Path:
        return self.root / "test.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def signals(self) -> Path:
        return self.root / "signals.json.gz"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def train_samples(self) -> Path:
        return self.plots / "train_samples.jpg"

    @property
    def curves(self) -> Path:
        return self.plots / "curves.png"

    @property
    def pr_curve(self) -> Path:
        return self.plots / "pr_curve.png"

    @property
    def hydra(self) -> Path:
        return self.root / ".hydra"

    @property
    def tensorboard(self) -> Path:
        return self.root  # event files sit in the run folder, so `tensorboard --logdir <sweep>` finds every run

    def is_run(self) -> bool:
        """Whether the folder holds (or held the start of) a run."""
        return self.summary.is_file() or self.metrics.is_file() or (self.hydra / "overrides.yaml").is_file()


@contextmanager
def locked_run_folder(run_dir: Path | str) -> Iterator[RunPaths]:
    """Create the run folder and hold its lock while inside (a second process training into it fails
    at once with ``LockedError``); temporary files an interrupted write left there are removed."""
    paths = RunPaths(Path(run_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(paths.lock, f"run directory {paths.root}"):
        for folder in (paths.root, paths.checkpoints):
            for tmp in remove_stale_temporaries(folder):
                log.info("removed %s, left by an interrupted write", tmp)
        yield paths


@dataclass
class RunSummary:
    """``summary.json``: the run record. The trainer rewrites it at the start, after every epoch and at
    the end; a run that could not start gets a ``failed`` one (``record_failure``)."""

    status: RunStatus = RunStatus.RUNNING
    message: str = ""
    step: int = 0
    epochs: int = 0
    epochs_planned: Optional[int] = None
    hparams: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)  # the metrics row of the best epoch
    best_by: dict[str, Any] = field(default_factory=dict)  # monitor, mode, value, epoch
    final: dict[str, float] = field(default_factory=dict)  # the last metrics row
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # mean losses per stage
    findings: list[dict[str, Any]] = field(default_factory=list)
    repairs: list[dict[str, Any]] = field(default_factory=list)
    test: Optional[dict[str, Any]] = None
    wall_time_s: Optional[float] = None
    device: str = ""
    processes: int = 1  # > 1: torchrun's DistributedDataParallel
    loss_rebalance: Optional[dict[str, Any]] = None  # only once the rebalance repair engaged
    traceback: Optional[str] = None  # only for a failed run
    # The pre-flight checks of the run's first session (detlab.engine.preflight): mode, seconds, counts,
    # findings (check, severity, message, fix, evidence); absent with diagnosis.preflight=off.
    preflight: Optional[dict[str, Any]] = None
    # detector -> the error its check raised; that detector was off for the rest of the run (only when one did)
    diagnosis_errors: Optional[dict[str, str]] = None
    # The code that trained the run: versions and git commit (detlab.runtime.provenance), one entry per
    # session whose code differed from the one before (more than one only when resumed with other code).
    code: list[dict[str, Any]] = field(default_factory=list)

    _OPTIONAL = ("loss_rebalance", "traceback", "preflight", "diagnosis_errors")

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["status"] = self.status.value
        for key in self._OPTIONAL:  # written only when set
            if record[key] is None:
                del record[key]
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "RunSummary":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        values["status"] = RunStatus.parse(record.get("status"))
        return cls(**values)


def read_summary(run_dir: Path | str, warnings: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """The run's ``summary.json`` as written (None when absent, unreadable or not an object; an
    unreadable one is noted in ``warnings``)."""
    path = RunPaths(Path(run_dir)).summary
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        if warnings is not None:
            warnings.append(f"{path}: unreadable ({error})")
        return None
    if not isinstance(record, dict):
        if warnings is not None:
            warnings.append(f"{path}: expected a JSON object")
        return None
    return record


def write_summary(run_dir: Path | str, summary: RunSummary) -> dict[str, Any]:
    """Write ``summary.json`` atomically; returns the record as written."""
    record = summary.to_dict()
    write_json(RunPaths(Path(run_dir)).summary, record)
    return record


def record_failure(run_dir: Path | str, message: str, overrides: Optional[list[str]] = None) -> None:
    """Write a ``failed`` ``summary.json`` for a run that could not start (a sweep job with a bad
    value), unless the folder already holds a run's record."""
    if read_summary(run_dir) is not None:
        return
    write_summary(run_dir, RunSummary(status=RunStatus.FAILED, message=message, overrides=list(overrides or [])))


def write_metrics(run_dir: Path | str, rows: list[dict[str, float]]) -> None:
    """Rewrite ``metrics.csv`` atomically with every epoch's row."""
    write_csv(RunPaths(Path(run_dir)).metrics, rows, METRIC_COLUMNS)


def read_metrics(run_dir_or_csv: Path | str, warnings: Optional[list[str]] = None) -> list[dict[str, float]]:
    """``metrics.csv`` rows as floats ("nan", "inf" and empty cells become nan/inf/nan); accepts the run
    folder or the file itself.

    Missing or empty file: ``[]``. The trainer rewrites the file atomically, but a copy taken while
    another writer appends can end in a half-written line: a last line without its newline and with
    fewer cells than the header is dropped (a full-width unterminated line is kept; only its last
    cell, ``pictures_time_s``, could be cut short).
    """
    path = Path(run_dir_or_csv)
    if path.is_dir():
        path = RunPaths(path).metrics
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


def test_headline(result: dict[str, Any]) -> dict[str, Any]:
    """The headline of an evaluation result, as ``summary.json``'s ``test`` holds it."""
    headline: dict[str, Any] = {key: result[key] for key in TEST_METRIC_KEYS if key in result}
    if "wider" in result:
        for key in WIDER_TEST_KEYS:
            headline[key] = result["wider"][key.removeprefix("wider_")]
    headline["input_size"] = result["settings"]["input_size"]
    headline["epoch"] = result.get("epoch")
    return headline


def write_config(run_dir: Path | str, cfg: Any) -> None:
    """``config.yaml``: the validated config (a ``detlab.config.Config``) the run trains with."""
    atomic_write_text(RunPaths(Path(run_dir)).config, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def write_test(run_dir: Path | str, result: dict[str, Any]) -> None:
    write_json(RunPaths(Path(run_dir)).test, result)


def clear_test(run_dir: Path | str) -> None:
    """Remove ``test.json``: it scored an earlier state of the run (a resumed run is tested again)."""
    RunPaths(Path(run_dir)).test.unlink(missing_ok=True)


def read_test(run_dir: Path | str) -> Optional[dict[str, Any]]:
    """The headline of the run's after-training test (``test.json``), or None."""
    try:
        return test_headline(json.loads(RunPaths(Path(run_dir)).test.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_signals(root: Path | str, total_steps: Optional[int], steps: list[dict[str, float]]) -> None:
    """``signals.json.gz``: every optimiser step's diagnosis signals (``{"step", "epoch", <signal>: value}``)
    and the run's planned steps, what ``detlab diagnose`` replays exactly (TensorBoard keeps every
    ``train.log_every``-th step and no non-finite value). Gzip'd JSON: about 80 bytes a step."""
    import gzip

    data = json.dumps({"total_steps": total_steps, "steps": steps}, separators=(",", ":"), allow_nan=True)
    atomic_write_bytes(RunPaths(Path(root)).signals, gzip.compress(data.encode(), mtime=0))


def read_signals(root: Path | str) -> Optional[dict[str, Any]]:
    """``signals.json.gz`` as written (``total_steps``, ``steps``); None when the run has none."""
    import gzip

    path = RunPaths(Path(root)).signals
    if not path.is_file():
        return None
    return json.loads(gzip.decompress(path.read_bytes()).decode())
