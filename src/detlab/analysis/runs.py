"""Reading run folders and sweeps: one ``RunResult`` per run folder.

A sweep is a folder of run folders (``docs/architecture.md``, "Run directory"), typically a Hydra
multirun with one sub-folder per override set (``loss.box_weight=0.05``). The run's own files are read
through ``detlab.run_record`` (summary.json, metrics.csv); besides them only Hydra's record
(``.hydra/overrides.yaml``, ``.hydra/config.yaml``, ``.hydra/hydra.yaml``, the sweep's
``multirun.yaml``) and the TensorBoard event files (per-step losses) are read. Runs that are still
running, that failed before writing metrics, or whose last CSV line is half written are tolerated.

    runs = load_sweep("multirun/2024-05-01/12-00-00")   # sorted by box weight
    run = load_run("outputs/2024-05-01/12-00-00")
"""

from __future__ import annotations

import math
import os
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from detlab.analysis._values import as_float, as_int
from detlab.paths import config_dir
from detlab.run_record import (
    FAILED_STATUSES,
    RunPaths,
    RunStatus,
    RunSummary,
    read_metrics,
    read_summary,
)

# The per-step scalars the trainer logs to TensorBoard that the figures draw (unweighted losses).
STEP_LOSS_TAGS = ("train/loss_cls", "train/loss_box")

_EXCLUDE_KEYS_PATH = "hydra.job.config.override_dirname.exclude_keys"


def entry_config_path() -> Path:
    """The training entry config (``configs/config.yaml``), as composed for every run: where the
    override keys that do not name a run are read from when a run folder has no Hydra record."""
    return config_dir() / "config.yaml"


@dataclass
class RunResult:
    """Everything the analysis knows about one run folder."""

    path: Path
    name: str
    status: RunStatus
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
    repairs: list[dict[str, Any]] = field(default_factory=list)  # what a repair did (diagnosis.repair)
    wall_time_s: Optional[float] = None
    warnings: list[str] = field(default_factory=list)  # what was tolerated while reading
    exclude_keys: frozenset[str] = frozenset()  # override keys that do not name the run (Hydra's exclude_keys)

    @property
    def failed(self) -> bool:
        """Diverged or failed: the runs the figures and the tables mark in red."""
        return self.status in FAILED_STATUSES

    @property
    def weight_label(self) -> str:
        """``cls 1 : box 0.05``, or the run name when the weights are unknown."""
        if self.box_weight is None:
            return self.name
        cls = "?" if self.class_weight is None else f"{self.class_weight:g}"
        return f"cls {cls} : box {self.box_weight:g}"

    @property
    def stop_step(self) -> Optional[int]:
        """The step the run stopped at: the one its divergence check named (the run's own step counter
        is one past it), else its last step."""
        named = [f.get("step") for f in self.findings if f.get("detector") == "divergence" and f.get("step") is not None]
        return as_int(named[0]) if named else self.step

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(epochs, values)`` of one metrics.csv column; see ``history_series``."""
        return history_series(self.history, key)

    def steps_per_epoch(self) -> Optional[float]:
        """From the run's step and epoch counts (None before its first epoch)."""
        if self.history:
            epoch, step = self.history[0].get("epoch", math.nan), self.history[0].get("step", math.nan)
            if math.isfinite(epoch) and math.isfinite(step) and epoch > 0:
                return step / epoch
        return None


def history_series(history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    """``(epochs, values)`` of one metrics.csv column; a row without an epoch counts as its position,
    non-finite values become nan (gaps in a line)."""
    xs, ys = [], []
    for index, row in enumerate(history):
        epoch = row.get("epoch", math.nan)
        xs.append(epoch if math.isfinite(epoch) else float(index + 1))
        value = row.get(key, math.nan)
        ys.append(value if math.isfinite(value) else math.nan)
    return xs, ys


# ------------------------------------------------------------------------------------------ one run
def load_run(run_dir: Path | str) -> RunResult:
    """Read one run folder. Never raises on a partial run; what was tolerated is in ``warnings``."""
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        raise FileNotFoundError(f"run directory not found: {paths.root}")
    warnings: list[str] = []
    record = read_summary(paths.root, warnings)
    history = read_metrics(paths.root, warnings)
    config = _read_config(paths, warnings)

    summary = RunSummary.from_dict(record or {})
    if record is not None:
        status, step = summary.status, as_int(summary.step)
    elif paths.summary.exists():  # unreadable: finished or not, we cannot tell
        status, step = RunStatus.UNKNOWN, None
    else:  # the trainer writes summary.json before the first step: none yet is a run starting
        status, step = RunStatus.RUNNING, None
    overrides = [str(o) for o in summary.overrides or []] or _read_overrides(paths, warnings)
    exclude_keys = _exclude_keys(paths, warnings)
    hparams = dict(summary.hparams or {})

    last_epoch = (as_int(history[-1].get("epoch")) or len(history)) if history else 0
    # A live run rewrites metrics.csv before summary.json: trust whichever has seen more epochs.
    epochs = max(as_int(summary.epochs) or 0, last_epoch)
    final = dict(summary.final or {}) or (dict(history[-1]) if history else {})
    return RunResult(
        path=paths.root,
        name=_run_name(overrides, paths.root.name, exclude_keys),
        status=status,
        message=str(summary.message or ""),
        step=step,
        epochs=epochs,
        epochs_planned=as_int(_first(summary.epochs_planned, hparams.get("train.epochs"),
                                      _select(config, "train.epochs"))),
        class_weight=_weight("loss.class_weight", hparams, overrides, config),
        box_weight=_weight("loss.box_weight", hparams, overrides, config),
        overrides=overrides,
        hparams=hparams,
        history=history,
        best=dict(summary.best or {}),
        final=final,
        stages={k: dict(v) for k, v in (summary.stages or {}).items() if isinstance(v, dict)},
        test=dict(summary.test or {}),
        findings=[f for f in summary.findings or [] if isinstance(f, dict)],
        repairs=[r for r in summary.repairs or [] if isinstance(r, dict)],
        wall_time_s=as_float(summary.wall_time_s),
        warnings=warnings,
        exclude_keys=exclude_keys,
    )


def step_series(run_dir: Path | str, tags: Sequence[str] = STEP_LOSS_TAGS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-step scalars of a run from its TensorBoard event files: ``{tag: (steps, values)}``.

    A resumed run has several event files; a step logged twice keeps its last value. Missing event
    files or tags give no entry (the caller falls back to metrics.csv's per-epoch means).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # slow import: only here

    folder = RunPaths(Path(run_dir)).tensorboard
    series: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    for events in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        try:
            accumulator.Reload()
        except Exception:  # noqa: BLE001 - a truncated file of a killed run: use what the other files hold
            continue
        available = set(accumulator.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                series[tag].update({event.step: event.value for event in accumulator.Scalars(tag)})
    return {tag: (np.array(sorted(values)), np.array([values[s] for s in sorted(values)]))
            for tag, values in series.items() if values}


# ------------------------------------------------------------------------------------------ sweeps
def find_run_dirs(sweep_dir: Path | str) -> list[Path]:
    """Every run folder at or below ``sweep_dir`` (runs are not nested: no descent into a run)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory not found: {sweep_dir}")
    found = []
    for root, dirs, _files in os.walk(sweep_dir):
        path = Path(root)
        if RunPaths(path).is_run():
            found.append(path)
            dirs[:] = []
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return found


def by_box_weight(runs: Sequence[RunResult]) -> list[RunResult]:
    """Runs in order of box weight (numerically; unknown weights last), then name."""
    return sorted(runs, key=lambda r: (r.box_weight is None, r.box_weight or 0.0, r.name))


def load_sweep(sweep_dir: Path | str) -> list[RunResult]:
    """All runs below ``sweep_dir``, in order of box weight, each named by what sets it apart."""
    sweep_dir = Path(sweep_dir)
    runs = [load_run(path) for path in find_run_dirs(sweep_dir)]
    _drop_shared_overrides_from_names(runs)
    names = Counter(run.name for run in runs)
    for run in runs:  # two runs with the same overrides (nested sweeps): name them by their folder
        if names[run.name] > 1:
            run.name = run.path.relative_to(sweep_dir).as_posix() or run.name
    return by_box_weight(runs)


def load_runs(paths: Sequence[Path | str]) -> list[RunResult]:
    """Run folders, or sweep folders (every run folder under them)."""
    runs: list[RunResult] = []
    for path in map(Path, paths):
        runs.extend([load_run(path)] if RunPaths(path).is_run() else load_sweep(path))
    return runs


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
    records = [RunPaths(r.path) for r in runs]
    starts = [p.stat().st_mtime for p in (r.hydra / "hydra.yaml" for r in records) if p.is_file()]
    ends = [p.stat().st_mtime for p in (r.summary for r in records) if p.is_file()]
    return max(ends) - min(starts) if starts and ends else None


def remedy_label(run: RunResult) -> str:
    """``NAME`` of the run's ``+remedy=NAME`` override; ``none`` for a run without one (the baseline,
    e.g. the sweep's own run of the pair)."""
    for override in run.overrides:
        if override.lstrip("+").startswith("remedy="):
            return override.split("=", 1)[1]
    return "none"


# ------------------------------------------------------------------------------------------ Hydra's record
def _read_yaml(path: Path, warnings: list[str]) -> Optional[DictConfig | ListConfig]:
    if not path.is_file():
        return None
    try:
        return OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - any YAML problem only costs this fallback
        warnings.append(f"{path}: unreadable ({error})")
        return None


def _read_config(paths: RunPaths, warnings: list[str]) -> Optional[DictConfig]:
    """The trainer's resolved ``config.yaml``, else Hydra's ``.hydra/config.yaml``."""
    for path in (paths.config, paths.hydra / "config.yaml"):
        config = _read_yaml(path, warnings)
        if isinstance(config, DictConfig):
            return config
    return None


def _read_overrides(paths: RunPaths, warnings: list[str]) -> list[str]:
    overrides = _read_yaml(paths.hydra / "overrides.yaml", warnings)
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


def _exclude_keys(paths: RunPaths, warnings: list[str]) -> frozenset[str]:
    """Hydra's ``override_dirname.exclude_keys`` as composed for this run (its ``.hydra/hydra.yaml``),
    else as the training entry config sets them: the keys that name a sweep sub-folder name the run."""
    for path in (paths.hydra / "hydra.yaml", entry_config_path()):
        config = _read_yaml(path, warnings)
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
        return as_float(hparams[key])
    for override in overrides:
        if "=" in override and _override_key(override) == key:
            return as_float(override.split("=", 1)[1])
    return as_float(_select(config, key))


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)

