"""A benchmark run's compact recording: everything the scoring and the replay need, nothing else.

One gzip'd JSON file per run, ``<root>/v<spec version>/<run name>.json.gz`` (``root`` is
``benchmarks/diagnosis/recordings``, meant to be committed): the planned run (kind, class, seed, overrides,
injection), the spec's version and sha256, the per-step signals and the per-epoch rows (column names once,
then rows of values; a signal a step does not have is null, a NaN stays NaN), the summary's status,
message, findings, repairs and wall time, and the config sections the replay and the remedies read. No
checkpoint, no TensorBoard file, no picture.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from omegaconf import OmegaConf

from detlab.runtime.fileio import atomic_write_bytes

FORMAT = "detlab-diagnosis-recording/1"
RECORDINGS = Path(__file__).resolve().parent / "recordings"
# The run config's sections a replay needs (the diagnosis reads train, schedule, stages and its own block;
# the remedies read loss, optim, dataset, model, eval and early_stopping). paths, resume and run_dir stay out.
CONFIG_SECTIONS = ("train", "schedule", "stages", "diagnosis", "loss", "optim", "dataset", "model", "eval",
                   "early_stopping")
SUMMARY_KEYS = ("status", "message", "step", "epochs", "findings", "repairs", "wall_time_s")


def to_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"columns": [...], "rows": [[...], ...]}``: the keys in first-seen order, None where a row lacks one."""
    columns: dict[str, None] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, None)
    names = list(columns)
    return {"columns": names, "rows": [[row.get(k) for k in names] for row in rows]}


def from_columns(table: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``to_columns`` undone: a None cell is a key the row did not have."""
    names = table["columns"]
    return [{k: v for k, v in zip(names, values) if v is not None} for values in table["rows"]]


def recording_path(root: Path | str, version: int | str, name: str) -> Path:
    return Path(root) / f"v{version}" / f"{name}.json.gz"


def encode(record: Mapping[str, Any]) -> bytes:
    """Compact JSON (NaN and inf as JSON's extensions, as Python reads them), gzip'd with no timestamp."""
    text = json.dumps(record, separators=(",", ":"), allow_nan=True)
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def write_recording(path: Path | str, record: Mapping[str, Any]) -> int:
    """Write ``record`` to ``path`` atomically; returns the bytes written."""
    data = encode(record)
    atomic_write_bytes(path, data)
    return len(data)


@dataclass
class Recording:
    """A recording read back: ``steps`` and ``epochs`` as lists of dicts again."""

    path: Path
    spec_version: int
    spec_sha256: str
    run: dict[str, Any]  # the PlannedRun's fields
    total_steps: int
    steps_per_epoch: Optional[int]
    steps: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any]  # the CONFIG_SECTIONS of the run's resolved config
    shortened: bool
    size_bytes: int
    # the run's process CPU time and the machine's steal time over it (v6; empty in older recordings)
    process: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.run["name"])

    def replay_config(self, diagnosis: Any = None) -> Any:
        """The run's config (``detlab.config.Config``), its ``diagnosis`` block replaced by ``diagnosis``
        (a ``DiagnosisConfig``; None keeps the recorded one)."""
        from detlab.config import load_saved_config

        sections = {k: v for k, v in self.config.items() if k != "diagnosis" or diagnosis is None}
        cfg = load_saved_config(sections)
        if diagnosis is not None:
            cfg.diagnosis = diagnosis
        return cfg


def read_recording(path: Path | str) -> Recording:
    path = Path(path)
    data = path.read_bytes()
    record = json.loads(gzip.decompress(data))
    if record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {record.get('format')!r})")
    return Recording(path=path, spec_version=int(record["spec"]["version"]), spec_sha256=record["spec"]["sha256"],
                     run=dict(record["run"]), total_steps=int(record["total_steps"]),
                     steps_per_epoch=record.get("steps_per_epoch"), steps=from_columns(record["steps"]),
                     epochs=from_columns(record["epochs"]), summary=dict(record["summary"]),
                     config=dict(record["config"]), shortened=bool(record.get("shortened", False)),
                     size_bytes=len(data), process=dict(record.get("process") or {}))


def build_record(run: Mapping[str, Any], spec_version: int, spec_sha256: str, total_steps: Optional[int],
                 steps_per_epoch: Optional[int], steps: Sequence[Mapping[str, Any]],
                 epochs: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], config: Mapping[str, Any],
                 shortened: bool = False, extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The recording of one run (see the module docstring); ``config``: the resolved run config as a dict."""
    return {
        "format": FORMAT,
        "spec": {"version": int(spec_version), "sha256": spec_sha256},
        "run": dict(run),
        "shortened": bool(shortened),
        "total_steps": int(total_steps or len(steps) or 0),
        "steps_per_epoch": None if steps_per_epoch is None else int(steps_per_epoch),
        "steps": to_columns(steps),
        "epochs": to_columns([_plain_row(r) for r in epochs]),
        "summary": {k: summary[k] for k in SUMMARY_KEYS if k in summary},
        "config": {k: config[k] for k in CONFIG_SECTIONS if k in config},
        **(dict(extra) if extra else {}),
    }


def _plain_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: float(v) if isinstance(v, (int, float)) else v for k, v in row.items()}


def record_run_folder(run_dir: Path | str, run: Mapping[str, Any], spec_version: int, spec_sha256: str,
                      recorder: Any, shortened: bool = False,
                      extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The recording of a run folder the trainer just wrote (``metrics.csv``, ``summary.json``,
    ``config.yaml``) and of the ``SignalRecorder`` that watched it."""
    from detlab.run_record import RunPaths, read_metrics, read_summary

    paths = RunPaths(Path(run_dir))
    summary = read_summary(run_dir) or {"status": "missing"}
    config = OmegaConf.to_container(OmegaConf.load(paths.config), resolve=True) if paths.config.is_file() else {}
    return build_record(run, spec_version, spec_sha256, recorder.total_steps, recorder.steps_per_epoch,
                        recorder.steps, read_metrics(run_dir), summary, config, shortened, extra)


def list_recordings(root: Path | str, version: int | str) -> list[Path]:
    folder = Path(root) / f"v{version}"
    return sorted(folder.glob("*.json.gz")) if folder.is_dir() else []


def bytes_per_step(recordings: Iterable[Recording]) -> Optional[float]:
    """Recorded bytes per recorded step, over ``recordings``."""
    sizes = [(r.size_bytes, len(r.steps)) for r in recordings]
    steps = sum(n for _, n in sizes)
    return sum(b for b, _ in sizes) / steps if steps else None


def is_finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
