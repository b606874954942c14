"""The training loop: builds a run, trains it epoch by epoch, validates, and decides when it ends.

The maths lives in the modules it calls, and what a run writes (TensorBoard, plots, checkpoints,
metrics.csv, summary.json) in the callbacks it calls (``detlab.engine.callbacks``,
``detlab.engine.loggers``); this file decides what happens when.
"""

from __future__ import annotations

import logging
import math
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from detlab.config import Config, ModelConfig, as_flat_dict
from detlab.data import BadImageError, build_datasets
from detlab.diagnosis import DIVERGENCE, Diagnoser, Finding, StopReason
from detlab.diagnosis.repairs import Repairs, RepairTarget, Rollback
from detlab.engine.callbacks import Callback
from detlab.engine.early_stopping import EarlyStopping
from detlab.engine.loggers import default_callbacks
from detlab.engine.pictures import training_samples
from detlab.engine.preflight import PreflightError, preflight_error, report_block, run_preflight
from detlab.engine.run_state import RunState, resume_checkpoint
from detlab.engine.step import TrainingParts, build_training
from detlab.engine.training_data import DatasetFactory, build_training_data
from detlab.engine.validation import ValidationResult, score_after_training, validate
from detlab.model import SSD, build_model
from detlab.run_record import (LOSS_KEYS, RunPaths, RunStatus, RunSummary, clear_test, locked_run_folder, read_summary,
                               read_test)
from detlab.runtime.checkpoint import load_weights
from detlab.runtime.device import select_device
from detlab.runtime.distributed import (all_gather_object, any_rank, broadcast_buffers, broadcast_object, get_rank,
                                        get_world_size, is_initialized, is_main_process, wrap_model)
from detlab.runtime.interrupt import Interrupted, InterruptSignals, signal_name
from detlab.runtime.provenance import code_version
from detlab.runtime.seeding import rng_state, seed_everything, set_rng_state
from detlab.schedule import stage_boundaries, warmup_steps

log = logging.getLogger(__name__)

__all__ = ["Trainer", "train", "DatasetFactory", "ModelFactory"]

ModelFactory = Callable[[ModelConfig], SSD]

# Under torchrun the ranks agree on an interruption (a 1-element all-reduce) every this many steps.
INTERRUPT_CHECK_EVERY = 10


@dataclass
class EpochOutcome:
    """An epoch's mean train losses and, when the run must end, its status and why."""

    means: dict[str, float]
    end: Optional[RunStatus] = None  # DIVERGED or INTERRUPTED (end before validating) or STOPPED
    message: str = ""
    progress: Optional[dict[str, Any]] = None  # INTERRUPTED: where in the epoch (see Trainer.checkpoint)


class Trainer:
    """One training run writing into ``run_dir`` (see docs/architecture.md, "Run directory").

    ``callbacks``: what the run writes (default ``default_callbacks(cfg)``; a list replaces them,
    ``add_callback`` adds one). ``dataset_factory(cfg) -> (train_set, val_set)`` and
    ``model_factory(cfg.model) -> SSD`` build the data and the network (a test or a benchmark injects
    a fault there). Under ``torchrun`` every rank builds a Trainer; the model steps as a
    ``DistributedDataParallel``, every rank validates its share of the val batches, and rank 0
    scores the gathered whole and alone runs the callbacks.
    """

    def __init__(self, cfg: Config, run_dir: Path | str, overrides: Optional[list[str]] = None,
                 callbacks: Optional[Sequence[Callback]] = None, dataset_factory: DatasetFactory = build_datasets,
                 model_factory: ModelFactory = build_model) -> None:
        self.cfg = cfg
        self.paths = RunPaths(Path(run_dir))
        self.overrides = list(overrides or [])
        self.callbacks = list(default_callbacks(cfg) if callbacks is None else callbacks)
        self.dataset_factory, self.model_factory = dataset_factory, model_factory
        self.hparams = as_flat_dict(cfg)
        self.state = RunState()
        self.status, self.message = RunStatus.RUNNING, ""
        self.notes: list[str] = []  # said in summary.json's message whatever the status (e.g. weights not saved)
        self.traceback: Optional[str] = None
        self.resumed = False
        self.early_stopping = EarlyStopping(cfg.early_stopping)
        self.repairs = Repairs(cfg.diagnosis)  # those diagnosis.repair turns on
        self.world_size, self.rank, self.is_main = get_world_size(), get_rank(), is_main_process()
        # Built by _build; a run that fails before has neither in its summary.
        self.device: Optional[torch.device] = None
        self.parts: Optional[TrainingParts] = None
        self._session_start = time.time()
        # SIGINT / SIGTERM (and submitit's requeue signal) only note that they came while the run
        # trains; the loop ends after the step in progress (see detlab.runtime.interrupt).
        self.signals = InterruptSignals()
        self._progress: Optional[dict[str, Any]] = None  # the epoch in progress, in a mid-epoch checkpoint
        self._resumed_progress: Optional[dict[str, Any]] = None  # the same, read back by a resumed session

    def add_callback(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def run_callbacks(self, hook: str, *args: Any) -> None:
        """``hook`` of every callback, in order; on rank 0 alone (the process that writes)."""
        if self.is_main:
            for callback in self.callbacks:
                getattr(callback, hook)(self, *args)

    def add_note(self, note: str) -> None:
        """A line for summary.json's message, whatever the status (e.g. a checkpoint not written)."""
        if note not in self.notes:
            self.notes.append(note)

    # ----------------------------------------------------------------------------------- set-up
    def _build(self) -> None:
        cfg = self.cfg
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.train.seed)
        self.device = select_device(cfg.train.device)
        self.data = build_training_data(cfg, self.dataset_factory, self.world_size, self.rank)
        self.steps_per_epoch = len(self.data.train_loader)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.parts = build_training(cfg, self.device, self.total_steps, self.steps_per_epoch, self.model_factory)
        self.model = self.parts.model  # the module itself: validation, checkpoints and the repairs use it
        self.stages = stage_boundaries(cfg.stages, cfg.schedule, self.total_steps, self.steps_per_epoch)
        self.diagnoser = Diagnoser(cfg.diagnosis, self.stages, self.total_steps, self.steps_per_epoch, run_config=cfg)
        # The gradient-norm samples feed the diagnosis and, once the rebalance repair engages it, the criterion.
        self.samples_gradients = cfg.diagnosis.enabled

    def _preflight(self) -> None:
        """The pre-flight checks (``detlab.engine.preflight``) of a fresh run, after it is built and before
        its first step, on rank 0 (the others wait for its report): logged as one block with its wall
        time and kept in ``summary.json``'s ``preflight``. A fatal finding under ``diagnosis.preflight=on``
        ends the run on every rank: ``PreflightError``, one line and exit code 2 from train.py."""
        report = None
        if self.is_main:
            report = run_preflight(self.cfg, self.data.train_set, self.data.train_loader.collate_fn, self.model,
                                   self.parts.criterion, self.device, self.parts.amp, self.total_steps,
                                   self.steps_per_epoch).to_dict()
            (log.warning if report["fatal"] or report["warnings"] else log.info)("%s", report_block(report))
        report = broadcast_object(report)
        self.state.preflight = report
        if report["fatal"] and report["mode"] == "on":
            raise preflight_error(report)

    def _resume(self, previous: Optional[dict[str, Any]]) -> bool:
        found = resume_checkpoint(self.cfg.resume, self.paths, previous, self.device)
        if found is None:
            return False
        path, ckpt = found
        load_weights(self.model, ckpt["model"], path)
        self.parts.criterion.load_state_dict(ckpt["criterion"], strict=False)
        for key, part in self._resumable().items():
            part.load_state_dict(ckpt[key])
        self.state = RunState(**ckpt["state"])
        self._resumed_progress = ckpt.get("progress")
        progress = self._resumed_progress
        within = (f" (in epoch {progress['epoch']}, after batch {progress['batches']} of {self.steps_per_epoch})"
                  if progress else "")
        log.info("resumed from %s at epoch %d, step %d%s", path, self.state.epoch, self.state.step, within)
        return True

    def _resumable(self) -> dict[str, Any]:
        """The parts a checkpoint holds the state_dict of (besides model and criterion), by key."""
        parts = self.parts
        return {"optimizer": parts.optimizer, "scheduler": parts.scheduler, "scaler": parts.scaler,
                "diagnoser": self.diagnoser, "repairs": self.repairs, "early_stopping": self.early_stopping}

    # ---------------------------------------------------------------------------------- running
    def run(self) -> dict[str, Any]:
        """Train to the end (or until divergence / an intervention stops it); returns the summary.

        The run directory is locked for the whole run: a second process training into it fails at
        once (``LockedError``). A failure before this session has opened the run's record (while
        building, or resuming from a missing or damaged checkpoint) leaves the files of an earlier
        session, its ``summary.json`` included, as they were; so does a resume that finds nothing to
        do (a completed run, already tested). A fresh run opens its record before its pre-flight
        checks: a fatal finding (``PreflightError``) leaves a ``failed`` record that says why, and
        nothing else (no config.yaml, checkpoint, metrics.csv or event file).

        SIGINT or SIGTERM ends the step in progress; the run then writes ``checkpoints/last.pt`` (the
        epoch's progress included: a resumed session continues the epoch where it stopped) and an
        ``interrupted`` record, and raises ``Interrupted`` (a ``KeyboardInterrupt``; ``train.py``
        turns it into one line and exit code 128 + the signal's number).
        """
        with self.signals:
            if not self.is_main:  # the other ranks of a torchrun job write nothing; rank 0 holds the lock
                return self._run_session()
            with locked_run_folder(self.paths.root):
                return self._run_session()

    def _run_session(self) -> dict[str, Any]:
        previous = read_summary(self.paths.root)
        record_open = previous is None  # whether this session may (re)write the run's record
        trained = tested = False
        try:
            self._build()
            self.run_callbacks("on_build")
            self.resumed = self._resume(previous)
            self.state.note_code(code_version())
            if not self.resumed and self.cfg.diagnosis.preflight != "off":
                # A fresh run (resume_checkpoint refuses a folder with trained steps): its record is this
                # session's from here, so a fatal finding is recorded with its reason.
                record_open = True
                self._preflight()
            if is_initialized():  # the step's model becomes a DistributedDataParallel over self.model
                self.model, self.parts.model = wrap_model(self.model, self.device, self.cfg.train.sync_batchnorm,
                                                          self.cfg.train.batch_size)
            if self.resumed and self.state.epoch >= self.cfg.train.epochs:
                log.info("run already complete (%d epochs); nothing to do", self.state.epoch)
                self.status = RunStatus.COMPLETED
            else:
                record_open = trained = True
                self._train()
            # Also when an earlier session trained to the end but was stopped before its test; not
            # when a signal asks this one to end (the test can take minutes; a resume runs it). Under
            # torchrun every rank takes part (its share of the images) and rank 0 decides.
            tested = score_after_training(self.paths, self.cfg, wanted=(
                self.status not in (RunStatus.DIVERGED, RunStatus.INTERRUPTED) and not self.signals.requested))
        except KeyboardInterrupt as interrupt:  # a second Ctrl-C, or one raised by a callback: no checkpoint
            self.status, self.message = RunStatus.INTERRUPTED, (
                f"interrupted (KeyboardInterrupt) at step {self.state.step}, without a checkpoint of its own: "
                f"resume={self.paths.root} continues from the last epoch's end")
            self._end(record_open)
            raise Interrupted(signal.SIGINT, self.message) from interrupt
        except Exception as error:
            self.status, self.message = RunStatus.FAILED, f"{type(error).__name__}: {error}"
            # A pre-flight stop is a verdict on the config and data, not a bug: its message says it all.
            self.traceback = None if isinstance(error, PreflightError) else traceback.format_exc(limit=8)
            self._end(record_open)
            raise
        unchanged = (not trained and not tested and previous is not None
                     and RunStatus.parse(previous.get("status")) is RunStatus.COMPLETED)
        # Nothing happened: the record, metrics.csv and the checkpoints stay as they are, byte for byte.
        summary = previous if unchanged else self._end(record_open=True)
        if self.status is RunStatus.INTERRUPTED:
            raise self.signals.interrupted(self.message)
        if self.signals.requested:  # it came after the last step: the run ended as recorded
            message = f"{signal_name(self.signals.signum)} came after the run ended ({self.status})"
            test_due = self.cfg.eval.test_protocol and self.status is not RunStatus.DIVERGED
            if test_due and not self.paths.test.is_file():
                message += f"; the after-training test did not run: resume={self.paths.root} runs it"
            raise self.signals.interrupted(message)
        return summary

    def _interrupt_due(self, within_epoch: bool) -> bool:
        """Whether a signal asks the run to end: the handler's flag (no host sync). Under torchrun the
        ranks decide together (any rank's signal), so all end at the same step; that takes a
        collective, done every ``INTERRUPT_CHECK_EVERY`` steps within an epoch and at its end."""
        if not is_initialized():
            return self.signals.requested
        if within_epoch and self.state.step % INTERRUPT_CHECK_EVERY:
            return False
        return any_rank(self.signals.requested, self.device)

    def _interrupted_message(self, epoch: int, batches: Optional[int] = None) -> str:
        where = (f"after epoch {epoch} (step {self.state.step})" if batches is None else
                 f"after step {self.state.step} (epoch {epoch}, batch {batches} of {self.steps_per_epoch})")
        return (f"interrupted by {signal_name(self.signals.signum or signal.SIGINT)} {where}; "
                f"{self.paths.last.relative_to(self.paths.root)} saved: resume={self.paths.root} continues the run")

    def _end(self, record_open: bool) -> dict[str, Any]:
        summary = self.summary()
        if record_open:
            self.run_callbacks("on_end", summary)
        return summary.to_dict()

    def _train(self) -> None:
        if self.is_main:
            clear_test(self.paths.root)  # it scored a shorter run: tested again at the end
        cfg, samples = self.cfg.train, None
        if self.is_main and cfg.sample_grid and self.state.step == 0:  # drawn once, before the first step
            samples = training_samples(self.data.train_set, self.data.train_loader.collate_fn, cfg.sample_grid, cfg.seed)
        self.run_callbacks("on_train_start", samples)
        try:
            self._loop()
        finally:
            self.run_callbacks("on_train_end")

    def _loop(self) -> None:
        cfg = self.cfg
        epochs = tqdm(range(self.state.epoch + 1, cfg.train.epochs + 1), desc="epochs", unit="epoch",
                      initial=self.state.epoch, total=cfg.train.epochs, dynamic_ncols=True, disable=not self.is_main)
        progress, self._resumed_progress = self._resumed_progress, None
        rollback = self.repairs.get(Rollback.name)
        if progress is not None and rollback is not None:  # the snapshot of the epoch's start, not of now
            rollback.load_snapshot(progress.get("rollback"), self.device)
        else:
            self._good_state()
        for epoch in epochs:
            within = progress if progress is not None and progress["epoch"] == epoch else None
            self.data.start_epoch(cfg.train.seed, epoch, self.rank, skip_batches=within["batches"] if within else 0)
            if within is not None:  # the generators as they were when the earlier session stopped
                self._restore_generators(within["rng"])
            progress = None
            t0 = time.time()
            outcome = self._train_epoch(epoch, within)
            train_time = time.time() - t0 + (within["train_time_s"] if within else 0.0)
            if outcome.end is RunStatus.DIVERGED:
                self.status, self.message = outcome.end, outcome.message
                self.run_callbacks("on_checkpoint", "last")
                log.error("run diverged: %s", outcome.message)
                return
            if outcome.end is RunStatus.INTERRUPTED:
                self._checkpoint_within_epoch({**outcome.progress, "train_time_s": train_time})
                self.status, self.message = outcome.end, self._interrupted_message(epoch, outcome.progress["batches"])
                return
            row, result = self._validate(epoch, outcome, train_time)
            self.state.epoch = epoch
            self.state.history.append(row)
            self.run_callbacks("on_validation_end", row, result)
            if self.early_stopping.update(epoch, row):
                self.state.best = dict(row)
                self.run_callbacks("on_checkpoint", "best")
            findings = self.diagnoser.observe_epoch(epoch, self.state.step, row)
            self._report(findings)
            # A validation loss gone non-finite (weights overflowed) is repaired like a step's divergence.
            repaired = self._repair(findings, self.state.step, epoch)
            if not repaired and not self.diagnoser.status.stop and math.isfinite(row.get("val/loss_total", math.nan)):
                self._good_state()
            self.run_callbacks("on_checkpoint", "last")
            self.run_callbacks("on_epoch_end", row)
            epochs.set_postfix(miou=f"{row.get('val/miou', 0.0):.3f}", recall=f"{row.get('val/recall', 0.0):.3f}")
            end, message = self._stop_decision()
            if end is None and self.early_stopping.should_stop:
                end, message = RunStatus.STOPPED, self.early_stopping.message()
            if end is not None:
                self.status, self.message = end, message
                log.warning("stopping early: %s", message)
                return
            if epoch < cfg.train.epochs and self._interrupt_due(within_epoch=False):  # this epoch's last.pt is written
                self.status, self.message = RunStatus.INTERRUPTED, self._interrupted_message(epoch)
                return
        self.status, self.message = RunStatus.COMPLETED, ""

    def _checkpoint_within_epoch(self, progress: dict[str, Any]) -> None:
        """``last.pt`` at an interruption mid-epoch: the state after the last step, and where the epoch
        stood (``progress``: epoch, batches taken from the loader, the loss sums so far, every rank's
        generators, the rollback's epoch-start snapshot), so a resumed session goes on exactly from there."""
        rng = all_gather_object(rng_state())  # a collective: every rank takes part
        rollback = self.repairs.get(Rollback.name)
        self._progress = {**progress, "rng": rng, "rollback": rollback.snapshot_state() if rollback else None}
        try:
            self.run_callbacks("on_checkpoint", "last")
        finally:
            self._progress = None

    def _restore_generators(self, states: list[dict[str, Any]]) -> None:
        if len(states) != self.world_size:
            log.warning("resumed mid-epoch with %d processes instead of %d: the epoch goes on in the same order, "
                        "with other augmentation draws", self.world_size, len(states))
            return
        set_rng_state(states[self.rank])

    def _train_epoch(self, epoch: int, resumed: Optional[dict[str, Any]] = None) -> EpochOutcome:
        """One epoch's steps; ``resumed``: the progress of an earlier session that stopped within it (the
        loader already leaves out the batches it took)."""
        cfg = self.cfg
        self.parts.model.train()
        sums, seen, taken = dict.fromkeys(LOSS_KEYS, 0.0), 0, 0
        if resumed is not None:
            sums, seen, taken = dict(resumed["sums"]), int(resumed["seen"]), int(resumed["batches"])
        bar = tqdm(self.data.train_loader, desc=f"epoch {epoch}/{cfg.train.epochs}", unit="batch", leave=False,
                   dynamic_ncols=True, disable=not self.is_main, initial=taken)
        for batch, (images, targets) in enumerate(bar, start=taken + 1):
            # Every image of the batch was unreadable (only dataset.on_bad_image=skip leaves such a
            # batch); under torchrun all ranks skip the step together.
            empty = images.shape[0] == 0
            if not (any_rank(empty, self.device) if cfg.dataset.on_bad_image == "skip" else empty):
                step = self.state.step
                images = images.to(self.device, non_blocking=True)
                gt_boxes = [t["boxes"].to(self.device, non_blocking=True) for t in targets]
                sample = self.samples_gradients and self.diagnoser.samples_gradients(step)
                record = self.parts.step(images, gt_boxes, step, grad_clip_norm=cfg.optim.grad_clip_norm,
                                         sample_gradients=sample)
                signals = record.signals()
                if record.updated:
                    self.state.step += 1
                    for key in LOSS_KEYS:
                        sums[key] += signals[key]
                    seen += 1
                    self.state.add_to_stage(self.stages.stage(step), signals)
                self.run_callbacks("on_step_end", step, record, signals)
                findings = self.diagnoser.observe_step(step, epoch, signals)
                self._report(findings)
                if self.repairs.repairs and record.updated:
                    self.repairs.after_step(self._repair_target())  # a change spread over steps (warm restart)
                repaired = self._repair(findings, step, epoch)
                # A divergence finding too: repaired (the run goes on), or it ends before the bad update.
                if not record.updated and not repaired:
                    return EpochOutcome(self._means(sums, seen), RunStatus.DIVERGED,
                                        f"non-finite loss at step {step} (epoch {epoch}): "
                                        f"loss_cls={record.loss_cls}, loss_box={record.loss_box}")
                if record.updated:
                    bar.set_postfix(loss=f"{record.loss_total:.3f}", cls=f"{record.loss_cls:.3f}",
                                    box=f"{record.loss_box:.3f}")
                    end, message = self._stop_decision()
                    if end is not None:
                        return EpochOutcome(self._means(sums, seen), end, message)
            # A signal ends the run after the step in progress (a flag the handler set: no host sync
            # of its own); `batch` batches of the epoch are taken, and the generators stand where the
            # next batch would start drawing.
            if self._interrupt_due(within_epoch=True):
                return EpochOutcome(self._means(sums, seen), RunStatus.INTERRUPTED,
                                    progress={"epoch": epoch, "batches": batch, "sums": dict(sums), "seen": seen})
        if seen == 0:
            skipped = getattr(self.data.train_set, "num_skipped", 0)
            raise BadImageError(f"epoch {epoch}: no readable training image: all {skipped} were skipped as "
                                f"unreadable (dataset.on_bad_image=skip); check dataset.root's images")
        return EpochOutcome(self._means(sums, seen))

    def _validate(self, epoch: int, outcome: EpochOutcome,
                  train_time: float) -> tuple[dict[str, float], Optional[ValidationResult]]:
        """The epoch's metrics row, and the validation result on rank 0.

        Under torchrun each rank validates its share of the val batches (with rank 0's BatchNorm
        statistics, those its checkpoint holds) and rank 0 scores them all (``validate``); the
        others receive its row, so every rank's early stopping, diagnosis and repairs decide alike.
        """
        cfg, row = self.cfg, None
        t0 = time.time()
        broadcast_buffers(self.model)
        every = cfg.eval.gallery_every
        result = validate(self.model, self.data.val_loader, self.parts.criterion, cfg.eval, self.device,
                          self.state.step, amp=self.parts.amp, num_images=cfg.eval.num_logged_images,
                          gallery=every > 0 and (epoch % every == 0 or epoch == cfg.train.epochs))
        log.debug("validation: %d images on rank %d", result.shard_images, self.rank)
        if self.is_main:
            val_time = time.time() - t0
            row = {"epoch": epoch, "step": self.state.step, "lr": self.parts.optimizer.param_groups[0]["lr"],
                   **{f"train/{k}": v for k, v in outcome.means.items()}, **result.metrics,
                   "train_time_s": train_time, "val_time_s": val_time, "pictures_time_s": result.pictures_time_s}
        return broadcast_object(row), result if self.is_main else None

    def _stop_decision(self) -> tuple[Optional[RunStatus], str]:
        """The diagnosis's stop (diverged or stuck), as a run status and message."""
        status = self.diagnoser.status
        if not status.stop:
            return None, ""
        return (RunStatus.DIVERGED if status.reason is StopReason.DIVERGED else RunStatus.STOPPED), status.message

    def _repair_target(self) -> RepairTarget:
        parts = self.parts
        return RepairTarget(self.model, parts.optimizer, parts.scheduler, parts.scaler, parts.criterion,
                            self.steps_per_epoch, warmup_steps(self.cfg.schedule, self.steps_per_epoch))

    def _good_state(self) -> None:
        """The run stands at a good point (its start, or an epoch's end with finite weights): the rollback's copy."""
        self.repairs.good_state(self._repair_target(), self.state.epoch, self.state.step)

    def _repair(self, findings: list[Finding], step: int, epoch: int) -> bool:
        """With ``diagnosis.repair``: the new findings to the repairs that answer them (each repair recorded,
        logged and handed to the callbacks; the detectors it names re-armed). True when a
        divergence was repaired (the run goes on)."""
        if not (findings and self.repairs.repairs):
            return False
        done = self.repairs.respond(findings, self._repair_target(), step, epoch)
        for record, rearm in done:
            for detector, how in rearm:
                self.diagnoser.rearm(detector, how)
            repair = record.to_dict()
            self.state.repairs.append(repair)
            log.warning("[repair] %s at step %d: %s", record.detector.replace("_", " "), step, record.message)
            self.run_callbacks("on_repair", repair)
        return any(record.detector == DIVERGENCE for record, _ in done)

    def _report(self, findings: list[Finding]) -> None:
        for finding in findings:
            # a failure pattern is a warning; a note on a run that learns is information
            log.log(logging.WARNING if finding.failure else logging.INFO, finding.console_line())
            self.state.findings.append(finding.to_dict())
            self.run_callbacks("on_finding", finding)

    @staticmethod
    def _means(sums: dict[str, float], seen: int) -> dict[str, float]:
        return {k: v / max(seen, 1) for k, v in sums.items()}

    # --------------------------------------------------------------------------- the run's record
    def checkpoint(self) -> dict[str, Any]:
        """What ``checkpoints/*.pt`` hold: the weights, the config, and all a resume restores. ``epoch``:
        the epochs completed; a run interrupted mid-epoch adds ``progress`` (where the epoch in
        progress stood: epoch, batches taken, loss sums, the generators' states, see
        ``_checkpoint_within_epoch``), and its resumed session continues that epoch exactly."""
        checkpoint = {"model": self.model.state_dict(), "criterion": self.parts.criterion.state_dict(),
                      **{key: part.state_dict() for key, part in self._resumable().items()},
                      "state": {**self.state.to_dict(), "elapsed_s": self._elapsed()},
                      "config": OmegaConf.to_container(OmegaConf.structured(self.cfg)),
                      "epoch": self.state.epoch, "step": self.state.step}
        if self._progress is not None:
            checkpoint["progress"] = self._progress
        return checkpoint

    def summary(self) -> RunSummary:
        """The run's record as it stands (``summary.json``)."""
        stopper, state = self.early_stopping, self.state
        rebalance = self.parts is not None and self.parts.criterion.rebalancer.aim is not None
        return RunSummary(
            status=self.status, message="; ".join(m for m in (self.message, *self.notes) if m),
            step=state.step, epochs=state.epoch, epochs_planned=self.cfg.train.epochs, hparams=self.hparams,
            overrides=self.overrides, best=state.best,
            best_by={"monitor": stopper.monitor, "mode": stopper.mode, "value": stopper.best,
                     "epoch": stopper.best_epoch},
            final=dict(state.history[-1]) if state.history else {}, stages=state.stage_means(),
            findings=state.findings, repairs=state.repairs, test=read_test(self.paths.root),
            wall_time_s=round(self._elapsed(), 3), device="" if self.device is None else str(self.device),
            processes=self.world_size,  # > 1: torchrun's DistributedDataParallel
            loss_rebalance=self.parts.criterion.rebalancer.state_dict() if rebalance else None,
            traceback=self.traceback, preflight=state.preflight, diagnosis_errors=self._diagnosis_errors(),
            code=state.code or [code_version()])

    def _diagnosis_errors(self) -> Optional[dict[str, str]]:
        """The detectors whose check raised (each off for the rest of the run), for the record; None when none
        did or the run ended before its diagnosis was built."""
        diagnoser = getattr(self, "diagnoser", None)
        return dict(diagnoser.broken) if diagnoser is not None and diagnoser.broken else None

    def _elapsed(self) -> float:
        return self.state.elapsed_s + (time.time() - self._session_start)


def train(cfg: Config, run_dir: Path | str, overrides: Optional[list[str]] = None,
          callbacks: Optional[Sequence[Callback]] = None, dataset_factory: DatasetFactory = build_datasets,
          model_factory: ModelFactory = build_model) -> dict[str, Any]:
    """Train one run into ``run_dir`` (see ``Trainer``); returns the summary written to ``summary.json``."""
    return Trainer(cfg, run_dir, overrides, callbacks, dataset_factory, model_factory).run()
