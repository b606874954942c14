"""The training loop: orchestrates data, model, loss, validation, diagnosis and run-directory output.

The maths lives in the modules it calls; this file decides what happens when.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from detlab.config import Config, as_flat_dict
from detlab.run_record import METRIC_COLUMNS, read_test
from detlab.data import BadImageError, build_datasets, build_loader
from detlab.diagnosis import DIVERGENCE, Diagnoser, Finding, StopReason
from detlab.runtime.checkpoint import (
    CheckpointError,
    all_finite,
    find_resume_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from detlab.runtime.device import select_device
from detlab.runtime.distributed import (
    DistributedSetupError,
    any_rank,
    broadcast_object,
    get_rank,
    get_world_size,
    is_initialized,
    is_main_process,
)
from detlab.engine.early_stopping import EarlyStopping
from detlab.engine.repair import Rollback
from detlab.schedule import StageBoundaries, stage_boundaries
from detlab.engine.step import StepRecord, build_training
from detlab.analysis.figures import learning_curves_png as curves_png
from detlab.engine.pictures import pr_curve_png, training_samples
from detlab.engine.tensorboard import DiscardingWriter, add_pr_curve, add_scalars, open_writer, write_hparams
from detlab.engine.validation import ValidationResult, validate
from detlab.errors import UserError
from detlab.runtime.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    exclusive_lock,
    remove_stale_temporaries,
    write_csv,
    write_jpeg,
    write_json,
)

log = logging.getLogger(__name__)

__all__ = ["METRIC_COLUMNS", "Trainer", "train"]

LOSS_KEYS = ("loss_cls", "loss_box", "loss_total")


class RunExistsError(UserError):
    """A fresh run pointed at a folder that already holds a trained run."""


def read_record(run_dir: Path) -> Optional[dict[str, Any]]:
    """The run's ``summary.json`` (None when absent or unreadable)."""
    try:
        record = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record_failure(run_dir: Path | str, message: str, overrides: Optional[list[str]] = None) -> None:
    """Write a ``failed`` ``summary.json`` for a run that could not start (a sweep job with a bad
    value), unless the folder already holds a run's record."""
    run_dir = Path(run_dir)
    if read_record(run_dir) is not None:
        return
    write_json(run_dir / "summary.json", {"status": "failed", "message": message, "step": 0, "epochs": 0,
                                          "overrides": list(overrides or []), "best": {}, "final": {},
                                          "stages": {}, "findings": []})


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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class EpochOutcome:
    """An epoch's mean train losses and, when the run must end, its status and why."""

    means: dict[str, float]
    end_status: Optional[str] = None  # diverged | stopped
    end_message: str = ""


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A seed per (run seed, epoch, rank): a run resumed at an epoch boundary replays the same
    batches; the ranks of a distributed run augment with streams of their own."""
    entropy = [seed, epoch] + ([rank] if rank else [])  # rank 0 draws as a single-process run does
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One training run writing into ``run_dir`` (see docs/architecture.md, "Run directory").

    Under ``torchrun`` (``detlab.runtime.distributed``) every rank builds a Trainer; the model steps
    as a ``DistributedDataParallel`` and rank 0 alone validates and writes files.
    """

    def __init__(self, cfg: Config, run_dir: Path, overrides: Optional[list[str]] = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.overrides = list(overrides or [])
        self.hparams = as_flat_dict(cfg)
        self.state = RunState()
        self.status = "running"
        self.message = ""
        self.notes: list[str] = []  # said in summary.json's message whatever the status (e.g. weights not saved)
        self._session_start = time.time()
        self._last_pr_curve: Optional[dict[str, np.ndarray]] = None  # the last validation's, for plots/
        self.world_size, self.rank = get_world_size(), get_rank()
        self.is_main = is_main_process()
        self.train_sampler: Optional[DistributedSampler] = None

    # ----------------------------------------------------------------------------------- set-up
    def _build(self) -> None:
        cfg = self.cfg
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.train.seed)
        self.device = select_device(cfg.train.device)
        self.train_set, self.val_set = build_datasets(cfg)
        drop_last = len(self.train_set) > cfg.train.batch_size
        if is_initialized():  # torchrun, also with one process: its order is that of any process count
            if len(self.train_set) < self.world_size:
                raise DistributedSetupError(f"{len(self.train_set)} training images cannot feed {self.world_size} "
                                            f"processes; start fewer (torchrun --nproc_per_node)")
            # Rank r takes every world_size-th image of one seeded permutation, so the ranks' batches
            # together are the global batch; set_epoch (in _reseed) draws a new permutation per epoch.
            self.train_sampler = DistributedSampler(self.train_set, num_replicas=self.world_size, rank=self.rank,
                                                    shuffle=True, seed=cfg.train.seed, drop_last=True)
        self.train_loader = build_loader(self.train_set, cfg.train.batch_size // self.world_size, shuffle=True,
                                         num_workers=cfg.dataset.num_workers, seed=cfg.train.seed,
                                         drop_last=drop_last, sampler=self.train_sampler)
        self.val_loader = build_loader(self.val_set, cfg.train.batch_size, shuffle=False,
                                       num_workers=cfg.dataset.num_workers, seed=cfg.train.seed)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch

        parts = build_training(cfg, self.device, self.total_steps, self.steps_per_epoch)
        self.parts = parts
        self.model, self.criterion, self.optimizer = parts.model, parts.criterion, parts.optimizer
        self.scheduler, self.scaler, self.amp = parts.scheduler, parts.scaler, parts.amp
        self.stages: StageBoundaries = stage_boundaries(cfg.stages, cfg.schedule, self.total_steps,
                                                        self.steps_per_epoch)
        self.diagnoser = Diagnoser(cfg.diagnosis, self.stages, self.total_steps, self.steps_per_epoch,
                                   run_config=cfg)
        self.early_stopping = EarlyStopping(cfg.early_stopping)
        self.rollback = Rollback(cfg.diagnosis.divergence)
        # The gradient-norm samples feed the diagnosis and the rebalancing repair.
        self.samples_gradients = cfg.diagnosis.enabled or cfg.loss.rebalance.enabled
        if cfg.eval.test_protocol == "wider":
            from detlab.evaluation import wider_gt_dir

            gt_dir = wider_gt_dir(cfg.dataset.root)
            if cfg.dataset.name != "widerface" or not gt_dir.is_dir():
                raise UserError(f"eval.test_protocol=wider needs WIDER FACE data with its ground truth: "
                                f"dataset {cfg.dataset.name}, no folder {gt_dir} (set eval.test_protocol=detection or null)")

    def _resume(self, previous: Optional[dict[str, Any]]) -> bool:
        path = find_resume_checkpoint(self.cfg.resume, self.run_dir)
        if path is None:
            if previous is not None and int(previous.get("epochs") or 0) > 0:
                what = (f"{self.run_dir} holds a run ({previous.get('status')}, {previous.get('epochs')} epochs)")
                if self.cfg.resume in (False, None) or str(self.cfg.resume).lower() in ("", "false"):
                    raise RunExistsError(f"{what}: resume=true continues it; to train anew, choose another "
                                         f"run_dir (the run is left as it is)")
                raise CheckpointError(f"resume: {what} but no {self.run_dir / 'checkpoints' / 'last.pt'} to "
                                      f"resume from; the run's files are left as they are")
            return False
        ckpt = load_checkpoint(path, map_location=self.device)
        load_weights(self.model, ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(**ckpt["state"])
        self.diagnoser.load_state_dict(ckpt.get("diagnoser", {}))
        self.criterion.load_state_dict(ckpt.get("criterion", {}), strict=False)
        self.rollback.load_state_dict(ckpt.get("rollback", {}))
        self.early_stopping.load_state_dict(ckpt.get("early_stopping") or self._early_stopping_of_old_checkpoint(ckpt))
        log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.step)
        return True

    def _distribute(self) -> None:
        """Under torchrun: the step's model becomes a DistributedDataParallel over ``self.model``, which
        validation, checkpoints and the rollback keep using (its parameters are the same objects)."""
        if not is_initialized():
            return
        cuda = self.device.type == "cuda"
        if cuda and self.cfg.train.sync_batchnorm:
            # The same parameter objects move into the new layers, so the optimiser keeps them.
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.parts.model = DistributedDataParallel(self.model, device_ids=[self.device.index] if cuda else None)
        log.info("DistributedDataParallel: %d processes, %d images per process and step (train.batch_size=%d)%s",
                 self.world_size, self.cfg.train.batch_size // self.world_size, self.cfg.train.batch_size,
                 "" if cuda and self.cfg.train.sync_batchnorm else "; BatchNorm statistics per process")

    # ---------------------------------------------------------------------------------- running
    def run(self) -> dict[str, Any]:
        """Train to the end (or until divergence / an intervention stops it); returns the summary.

        The run directory is locked for the whole run: a second process training into it fails at
        once (``LockedError``). A failure before this session has opened the run's record (while
        building, or resuming from a missing or damaged checkpoint) leaves the files of an earlier
        session, its ``summary.json`` included, as they were.
        """
        if not self.is_main:  # the other ranks of a torchrun job write nothing; rank 0 holds the lock
            return self._run_locked()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.run_dir / ".lock", f"run directory {self.run_dir}"):
            for folder in (self.run_dir, self.run_dir / "checkpoints"):
                for tmp in remove_stale_temporaries(folder):
                    log.info("removed %s, left by an interrupted write", tmp)
            return self._run_locked()

    def _run_locked(self) -> dict[str, Any]:
        previous = read_record(self.run_dir)
        record_open = False  # whether this session may (re)write the run's record
        try:
            self._build()
            resumed = self._resume(previous)
            self._distribute()
            if resumed and self.state.epoch >= self.cfg.train.epochs:
                log.info("run already complete (%d epochs); nothing to do", self.state.epoch)
                self.status = "completed"
                self._test()  # when an interrupted session trained to the end but did not test
                return self._write_summary()
            record_open = True
            if self.is_main:
                (self.run_dir / "test.json").unlink(missing_ok=True)  # scored a shorter run: tested again at the end
                atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(self.cfg)))
                self.writer = open_writer(self.run_dir, self.state.step if resumed else None)
            else:
                self.writer = DiscardingWriter()
            self._write_summary()
            try:
                self._log_training_samples()
                self._loop()
            finally:
                self._write_plots()
                self._finish_tensorboard()
            self._test()
        except KeyboardInterrupt:
            self.status, self.message = "stopped", "interrupted by the user (resume=true continues it)"
            if record_open or previous is None:
                self._write_summary()
            raise
        except Exception as error:
            self.status = "failed"
            self.message = f"{type(error).__name__}: {error}"
            self._traceback = traceback.format_exc(limit=8)
            if record_open or previous is None:
                self._write_summary()
            raise
        return self._write_summary()

    def _loop(self) -> None:
        cfg = self.cfg
        epochs = tqdm(range(self.state.epoch + 1, cfg.train.epochs + 1), desc="epochs", unit="epoch",
                      initial=self.state.epoch, total=cfg.train.epochs, dynamic_ncols=True, disable=not self.is_main)
        self._take_snapshot()
        for epoch in epochs:
            self._reseed(epoch)
            t0 = time.time()
            outcome = self._train_epoch(epoch)
            train_time = time.time() - t0
            if outcome.end_status == "diverged":
                self.status, self.message = "diverged", outcome.end_message
                self._save("last.pt")
                log.error("run diverged: %s", outcome.end_message)
                return
            row, result = self._validate(epoch, outcome, train_time)
            self.state.epoch = epoch
            self.state.history.append(row)
            if result is not None:
                self._last_pr_curve = result.pr_curve
                self._log_epoch(epoch, row, result)
            if self.early_stopping.update(epoch, row):
                self.state.best = dict(row)
                self._save("best.pt")
            findings = self.diagnoser.observe_epoch(epoch, self.state.step, row)
            self._report_findings(findings, self.state.step)
            # A validation loss gone non-finite (weights overflowed) is repaired like a step's divergence.
            repaired = self._repair_divergence(findings, self.state.step, epoch)
            if not repaired and not self.diagnoser.status.stop and math.isfinite(row.get("val/loss_total", math.nan)):
                self._take_snapshot()
            self._save("last.pt")
            if self.is_main:
                write_csv(self.run_dir / "metrics.csv", self.state.history, METRIC_COLUMNS)
            self._write_summary()
            epochs.set_postfix(miou=f"{row.get('val/miou', 0.0):.3f}", recall=f"{row.get('val/recall', 0.0):.3f}")
            end_status, end_message = self._end_of_epoch_decision(outcome)
            if end_status:
                self.status, self.message = end_status, end_message
                log.warning("stopping early: %s", end_message)
                return
        self.status, self.message = "completed", ""

    def _validate(self, epoch: int, outcome: EpochOutcome,
                  train_time: float) -> tuple[dict[str, float], Optional[ValidationResult]]:
        """The epoch's metrics row, and the validation result on the rank that validated.

        Under torchrun rank 0 validates the whole val split alone while the others wait; they receive
        its row, so every rank's early stopping, diagnosis and repairs decide alike.
        """
        cfg, result, row = self.cfg, None, None
        if self.is_main:
            t0 = time.time()
            every = cfg.eval.gallery_every
            result = validate(self.model, self.val_loader, self.criterion, cfg.eval, self.device, self.state.step,
                              amp=self.amp, num_images=cfg.eval.num_logged_images,
                              gallery=every > 0 and (epoch % every == 0 or epoch == cfg.train.epochs))
            val_time = time.time() - t0
            row = {"epoch": epoch, "step": self.state.step, "lr": self.optimizer.param_groups[0]["lr"],
                   **{f"train/{k}": v for k, v in outcome.means.items()}, **result.metrics,
                   "train_time_s": train_time, "val_time_s": val_time, "pictures_time_s": result.pictures_time_s}
        return broadcast_object(row), result

    def _test(self) -> None:
        """``eval.test_protocol``: score last.pt once into test.json (kept; a resumed run does not redo it)."""
        protocol, last = self.cfg.eval.test_protocol, self.run_dir / "checkpoints" / "last.pt"
        if not self.is_main or not protocol or self.status == "diverged" or not last.is_file() or (self.run_dir / "test.json").is_file():
            return
        from detlab.evaluation import test_after_training

        t0 = time.time()
        result = test_after_training(last, protocol, self.cfg.train.device)
        result["test_time_s"] = round(time.time() - t0, 3)
        write_json(self.run_dir / "test.json", result)
        log.info("test (%s, eval.input_size=%s): %s", protocol, self.cfg.eval.input_size,
                 json.dumps(read_test(self.run_dir)))

    def _stop_decision(self) -> tuple[Optional[str], str]:
        """The diagnosis's stop (diverged or stuck), as a run status and message."""
        status = self.diagnoser.status
        if not status.stop:
            return None, ""
        return ("diverged" if status.reason is StopReason.DIVERGED else "stopped"), status.message

    def _end_of_epoch_decision(self, outcome: EpochOutcome) -> tuple[Optional[str], str]:
        end_status, end_message = self._stop_decision()
        if end_status:
            return end_status, end_message
        if self.early_stopping.should_stop:
            return "stopped", self.early_stopping.message()
        return None, ""

    def _reseed(self, epoch: int) -> None:
        seed = epoch_seed(self.cfg.train.seed, epoch, self.rank)
        seed_everything(seed)
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None:
            generator.manual_seed(seed)
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(epoch)

    def _train_epoch(self, epoch: int) -> EpochOutcome:
        cfg = self.cfg
        self.parts.model.train()
        sums = dict.fromkeys(LOSS_KEYS, 0.0)
        seen = 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{cfg.train.epochs}", unit="batch", leave=False,
                   dynamic_ncols=True, disable=not self.is_main)
        for images, targets in bar:
            # Every image of the batch was unreadable (only dataset.on_bad_image=skip leaves such a
            # batch); under torchrun all ranks skip the step together.
            empty = images.shape[0] == 0
            if any_rank(empty, self.device) if cfg.dataset.on_bad_image == "skip" else empty:
                continue
            step = self.state.step
            images = images.to(self.device, non_blocking=True)
            gt_boxes = [t["boxes"].to(self.device, non_blocking=True) for t in targets]
            sample = self.samples_gradients and step % cfg.diagnosis.grad_norm_every == 0
            record = self.parts.step(images, gt_boxes, step, grad_clip_norm=cfg.optim.grad_clip_norm,
                                     sample_gradients=sample)
            signals = record.signals()
            if not record.updated:
                # Recorded as a divergence finding too; then repaired, or the run ends before the bad update.
                new = self.diagnoser.observe_step(step, epoch, signals)
                self._report_findings(new, step)
                if self._repair_divergence(new, step, epoch):
                    continue
                return EpochOutcome(means=self._means(sums, seen), end_status="diverged",
                                    end_message=f"non-finite loss at step {step} (epoch {epoch}): "
                                                f"loss_cls={record.loss_cls}, loss_box={record.loss_box}")
            self.state.step += 1
            for key in LOSS_KEYS:
                sums[key] += signals[key]
            seen += 1
            self._accumulate_stage(step, signals)
            if step % cfg.train.log_every == 0:
                self._log_step(step, record, signals)
            new = self.diagnoser.observe_step(step, epoch, signals)
            self._report_findings(new, step)
            self._repair_divergence(new, step, epoch)
            bar.set_postfix(loss=f"{record.loss_total:.3f}", cls=f"{record.loss_cls:.3f}", box=f"{record.loss_box:.3f}")
            end_status, end_message = self._stop_decision()
            if end_status:
                return EpochOutcome(means=self._means(sums, seen), end_status=end_status, end_message=end_message)
        if seen == 0:
            skipped = getattr(self.train_set, "num_skipped", 0)
            raise BadImageError(f"epoch {epoch}: no readable training image: all {skipped} were skipped as "
                                f"unreadable (dataset.on_bad_image=skip); check dataset.root's images")
        return EpochOutcome(means=self._means(sums, seen))

    def _take_snapshot(self) -> None:
        self.rollback.take(self.state.epoch, self.state.step, self.model, self.optimizer, self.scaler)

    def _repair_divergence(self, findings: list[Finding], step: int, epoch: int) -> bool:
        """With ``diagnosis.divergence.rollback``: a new divergence finding rolls the run back to its
        last good state with a lower learning rate, and the diagnosis watches for divergence anew."""
        if not any(f.detector == DIVERGENCE for f in findings) or not self.rollback.available:
            return False
        what = self.rollback.restore(self.model, self.optimizer, self.scheduler, self.scaler)
        self.diagnoser.rearm(DIVERGENCE)
        self.state.repairs.append({"repair": "rollback", "step": step, "epoch": epoch, "message": what})
        log.warning("[repair] divergence at step %d: %s", step, what)
        self.writer.add_text("diagnosis/repair", what, step)
        return True

    def _log_step(self, step: int, record: StepRecord, signals: dict[str, float]) -> None:
        scalars = {f"train/{k}": v for k, v in signals.items() if k != "weights_ramping"}
        scalars = {k: v for k, v in scalars.items() if math.isfinite(v)}  # e.g. face_coverage of a faceless batch
        scalars["train/class_weight"], scalars["train/box_weight"] = record.class_weight, record.box_weight
        if record.grad_norm_cls and record.grad_norm_box is not None:
            scalars["diagnosis/grad_norm_ratio_box_to_cls"] = record.grad_norm_box / record.grad_norm_cls
        add_scalars(self.writer, scalars, step)

    @staticmethod
    def _means(sums: dict[str, float], seen: int) -> dict[str, float]:
        return {k: v / max(seen, 1) for k, v in sums.items()}

    def _accumulate_stage(self, step: int, values: dict[str, float]) -> None:
        stage = self.stages.stage(step)
        acc = self.state.stage_sums.setdefault(stage, {"steps": 0.0, **dict.fromkeys(LOSS_KEYS, 0.0)})
        acc["steps"] += 1
        for key in LOSS_KEYS:
            acc[key] += values[key]

    def stage_means(self) -> dict[str, dict[str, float]]:
        return {stage: {k: acc[k] / acc["steps"] for k in LOSS_KEYS}
                for stage, acc in self.state.stage_sums.items() if acc["steps"]}

    # ---------------------------------------------------------------------------------- outputs
    def _log_epoch(self, epoch: int, row: dict[str, float], result: ValidationResult) -> None:
        step = self.state.step
        add_scalars(self.writer, {k: v for k, v in row.items() if k.startswith("val/")}, step)
        images = result.images
        if images:
            height = max(img.shape[0] for img in images)
            width = max(img.shape[1] for img in images)
            batch = np.zeros((len(images), height, width, 3), dtype=np.uint8)
            for i, img in enumerate(images):
                batch[i, : img.shape[0], : img.shape[1]] = img
            self.writer.add_images("val/predictions", batch, step, dataformats="NHWC")
        started = time.perf_counter()
        if result.pr_curve is not None:
            add_pr_curve(self.writer, "val/pr_curve", result.pr_curve, step)
        for name, picture in result.galleries.items():
            self.writer.add_image(f"gallery/{name}", picture, step, dataformats="HWC")
        row["pictures_time_s"] += time.perf_counter() - started
        add_scalars(self.writer, {"train/epoch": epoch, "time/train_epoch_s": row["train_time_s"],
                                  "time/val_epoch_s": row["val_time_s"],
                                  "time/pictures_s": row["pictures_time_s"]}, step)
        for stage, means in self.stage_means().items():
            add_scalars(self.writer, {f"stage/{stage}/{k}": v for k, v in means.items()}, step)
        add_scalars(self.writer, {f"diagnosis/{k}": v for k, v in self.diagnoser.scalars().items()}, step)
        self.writer.flush()

    def _log_training_samples(self) -> None:
        """``train.sample_grid`` augmented training images with their boxes, once, before the first step."""
        count = self.cfg.train.sample_grid
        if not self.is_main or not count or self.state.step > 0:
            return
        grid = training_samples(self.train_set, self.train_loader.collate_fn, count, self.cfg.train.seed)
        if grid is not None:
            self.writer.add_image("train/augmented_samples", grid, 0, dataformats="HWC")
            write_jpeg(self.run_dir / "plots" / "train_samples.jpg", grid)

    def _write_plots(self) -> None:
        """``train.plots``: the learning curves and the last validation's PR curve as PNGs in plots/."""
        if not self.is_main or not self.cfg.train.plots or not self.state.history:
            return
        title = f"{self.run_dir.name}: {self.status}, {self.state.epoch} epochs"
        try:
            atomic_write_bytes(self.run_dir / "plots" / "curves.png", curves_png(self.state.history, title))
            curve = self._last_pr_curve
            if curve is not None:
                png = pr_curve_png(curve, self.cfg.eval.score_threshold, f"val PR curve (IoU 0.5), epoch {self.state.epoch}")
                atomic_write_bytes(self.run_dir / "plots" / "pr_curve.png", png)
        except Exception as error:  # noqa: BLE001 - a figure must not turn a finished run into a failed one
            note = f"plots/ not written: {type(error).__name__}: {error}"
            self.notes.append(note)
            log.error(note)

    def _report_findings(self, findings: list[Finding], step: int) -> None:
        for finding in findings:
            log.warning(finding.console_line())
            self.state.findings.append(finding.to_dict())
            self.writer.add_text(f"diagnosis/{finding.detector}", finding.console_line(), step)

    def _save(self, name: str) -> None:
        if not self.is_main:
            return
        model_state = self.model.state_dict()
        if not all_finite(model_state):
            # Never replace a usable checkpoint with NaN weights; say so in the run's record instead.
            note = f"the weights are not finite; {name} keeps the last finite ones"
            if note not in self.notes:
                self.notes.append(note)
            log.error("not writing %s: %s", name, note)
            return
        checkpoint = {
            "model": model_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": {**self.state.to_dict(), "elapsed_s": self._elapsed()},
            "diagnoser": self.diagnoser.state_dict(),
            "criterion": self.criterion.state_dict(),
            "rollback": self.rollback.state_dict(),
            "early_stopping": self.early_stopping.state_dict(),
            "config": OmegaConf.to_container(OmegaConf.structured(self.cfg)),
            "epoch": self.state.epoch,
            "step": self.state.step,
        }
        save_checkpoint(self.run_dir / "checkpoints" / name, checkpoint)

    def _best_by(self) -> dict[str, Any]:
        stopper = getattr(self, "early_stopping", None)  # absent when the run failed while being built
        if stopper is None:
            return {}
        return {"monitor": stopper.monitor, "mode": stopper.mode, "value": stopper.best, "epoch": stopper.best_epoch}

    def _early_stopping_of_old_checkpoint(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """Checkpoints written before ``early_stopping`` existed: best from the run's best row."""
        best = self.state.best.get(self.early_stopping.monitor)
        return {"best": best, "best_epoch": int(self.state.best.get("epoch", 0)),
                "bad_epochs": int(ckpt.get("diagnoser", {}).get("es_bad_epochs", 0))}

    def _elapsed(self) -> float:
        return self.state.elapsed_s + (time.time() - self._session_start)

    def _final_metrics(self) -> dict[str, float]:
        return dict(self.state.history[-1]) if self.state.history else {}

    def _finish_tensorboard(self) -> None:
        if not self.is_main:
            return
        final = self._final_metrics()
        metrics = {k.replace("val/", "final_"): final[k] for k in ("val/miou", "val/recall", "val/precision",
                                                                  "val/ap50", "val/fp", "val/tp") if k in final}
        if self.state.best:
            metrics["best_miou"] = self.state.best.get("val/miou", float("nan"))
        metrics["diverged"] = float(self.status == "diverged")
        write_hparams(self.writer, self.hparams, metrics)
        text = "\n".join(f"- {f['detector']} ({f['stage']}, step {f['step']}): {f['message']}"
                         for f in self.state.findings) or "no findings"
        self.writer.add_text("diagnosis/summary", text, self.state.step)
        self.writer.close()

    def _write_summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "status": self.status,
            "message": "; ".join(m for m in (self.message, *self.notes) if m),
            "step": self.state.step,
            "epochs": self.state.epoch,
            "epochs_planned": self.cfg.train.epochs,
            "hparams": self.hparams,
            "overrides": self.overrides,
            "best": self.state.best,
            "best_by": self._best_by(),
            "final": self._final_metrics(),
            "stages": self.stage_means(),
            "findings": self.state.findings,
            "repairs": self.state.repairs,
            "test": read_test(self.run_dir),
            "wall_time_s": round(self._elapsed(), 3),
            "device": str(getattr(self, "device", "")),
            "processes": self.world_size,  # > 1: torchrun's DistributedDataParallel
        }
        criterion = getattr(self, "criterion", None)
        if self.cfg.loss.rebalance.enabled and criterion is not None:
            summary["loss_rebalance"] = criterion.rebalancer.state_dict()  # the box weight's factor, its updates
        if getattr(self, "_traceback", None):
            summary["traceback"] = self._traceback
        if self.is_main:
            write_json(self.run_dir / "summary.json", summary)
        return summary


def train(cfg: Config, run_dir: Path | str, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Train one run into ``run_dir``; returns the summary written to ``summary.json``."""
    return Trainer(cfg, Path(run_dir), overrides).run()
