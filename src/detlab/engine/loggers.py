"""What a run writes, one ``Callback`` per kind of output; ``default_callbacks(cfg)`` is what a run
installs unless its caller passes a list of its own.

- ``TensorBoardLogger``: the event files (scalars, prediction images, PR curves, galleries, findings,
  the HParams record);
- ``Plots``: ``plots/`` (the training-sample grid at the start, learning and PR curves at the end);
- ``ModelCheckpoint``: ``checkpoints/last.pt`` and ``best.pt``, which ``resume`` continues from;
- ``MetricsCsv``: ``metrics.csv``;
- ``RunRecordWriter``: ``config.yaml`` and ``summary.json`` (what the sweep report, the results page
  and ``train.py resume=<run dir>`` read).

Paths come from ``detlab.run_record.RunPaths`` (``trainer.paths``); every file is written atomically.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from detlab.config import Config
from detlab.diagnosis import Finding
from detlab.engine.callbacks import Callback
from detlab.analysis import learning_curves_png
from detlab.engine.pictures import pr_curve_png
from detlab.engine.step import StepRecord
from detlab.engine.tensorboard import add_pr_curve, add_scalars, open_writer, write_hparams
from detlab.engine.validation import ValidationResult
from detlab.run_record import RunStatus, RunSummary, write_config, write_metrics, write_summary
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
        text = "\n".join(f"- {f['detector']} ({f['stage']}, step {f['step']}): {f['message']}"
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
            ModelCheckpoint(), MetricsCsv(), RunRecordWriter()]
