"""What a run carries from one session to the next: its counters, history and findings
(``RunState``), and the checkpoint a session resumes from (``resume_checkpoint``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from detlab.errors import UserError
from detlab.run_record import LOSS_KEYS, RunPaths
from detlab.runtime.checkpoint import CheckpointError, find_resume_checkpoint, load_checkpoint

# What a checkpoint must hold for a run to continue from it (Trainer.checkpoint writes them all).
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "state", "diagnoser", "criterion", "repairs",
               "early_stopping")


class RunExistsError(UserError):
    """A fresh run pointed at a folder that already holds a trained run."""


@dataclass
class RunState:
    """Everything a resumed run needs beyond the model and optimiser (plain types only)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)
    stage_sums: dict[str, dict[str, float]] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    repairs: list[dict[str, Any]] = field(default_factory=list)  # what a repair did, and when
    elapsed_s: float = 0.0  # wall time of earlier sessions of this run
    preflight: Optional[dict[str, Any]] = None  # the pre-flight report of the run's first session
    # The code of the first session, then of each resumed session whose code differs from the one before
    # (detlab.runtime.provenance.code_version)
    code: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def add_to_stage(self, stage: str, losses: Mapping[str, float]) -> None:
        """One step's losses into its stage's sums (``summary.json``'s ``stages``)."""
        sums = self.stage_sums.setdefault(stage, {"steps": 0.0, **dict.fromkeys(LOSS_KEYS, 0.0)})
        sums["steps"] += 1
        for key in LOSS_KEYS:
            sums[key] += losses[key]

    def note_code(self, version: Mapping[str, Any]) -> None:
        """This session's code into ``code``, unless it is the code of the session before."""
        if not self.code or self.code[-1] != dict(version):
            self.code.append(dict(version))

    def stage_means(self) -> dict[str, dict[str, float]]:
        return {stage: {k: sums[k] / sums["steps"] for k in LOSS_KEYS}
                for stage, sums in self.stage_sums.items() if sums["steps"]}


def resume_checkpoint(resume: Any, paths: RunPaths, previous: Optional[Mapping[str, Any]],
                      device: torch.device) -> Optional[tuple[Path, dict[str, Any]]]:
    """The checkpoint this session continues from (``resume``: see ``find_resume_checkpoint``), or
    None for a fresh run. A fresh run never overwrites a folder whose record (``previous``) shows
    trained epochs or steps (a run interrupted in its first epoch): ``RunExistsError``, or
    ``CheckpointError`` when resuming finds no checkpoint."""
    path = find_resume_checkpoint(resume, paths.root)
    if path is None:
        if previous is not None and (int(previous.get("epochs") or 0) > 0 or int(previous.get("step") or 0) > 0):
            what = f"{paths.root} holds a run ({previous.get('status')}, {previous.get('epochs')} epochs)"
            if resume in (False, None) or str(resume).lower() in ("", "false"):
                raise RunExistsError(f"{what}: resume=true continues it; to train anew, choose another "
                                     f"run_dir (the run is left as it is)")
            raise CheckpointError(f"resume: {what} but no {paths.last} to resume from; the run's files are left "
                                  f"as they are")
        return None
    checkpoint = load_checkpoint(path, map_location=device)
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path}: no {', '.join(missing)}; a run continues only from a checkpoint "
                              f"written by this version of train.py")
    return path, checkpoint
