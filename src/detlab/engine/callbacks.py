"""The Trainer's hooks: what a run writes, and what a caller adds, hangs on a ``Callback``.

A callback overrides the hooks it needs; the others do nothing. The Trainer calls each hook on its
callbacks in list order (``Trainer.run_callbacks``), on rank 0 alone under torchrun (the process
that validates and writes). In the order they come in a run:

==================================================  ==============================================
``on_build(trainer)``                               datasets, loaders, model, criterion, optimiser
                                                    and diagnosis are built (before a resume loads
                                                    its checkpoint)
``on_train_start(trainer, samples)``                the run folder is open for this session,
                                                    after the pre-flight checks (a fresh run's),
                                                    before the first step; ``samples``: the
                                                    augmented training-sample grid (RGB uint8) or
                                                    None (``train.sample_grid=0``, a resumed run)
``on_step_end(trainer, step, record, signals)``     after every optimiser step (``step``: its
                                                    index); ``record.updated`` is False when the
                                                    loss was not finite and no update was made
``on_finding(trainer, finding)``                    the diagnosis found a pattern (a step's or an
                                                    epoch's)
``on_repair(trainer, repair)``                      a repair ran (``summary.json``'s ``repairs``
                                                    entry: repair, step, epoch, message)
``on_validation_end(trainer, row, result)``         the epoch's metrics row and the validation's
                                                    pictures, before early stopping and the
                                                    diagnosis see the row (a logger adds the time
                                                    it spends on pictures to
                                                    ``row["pictures_time_s"]``)
``on_checkpoint(trainer, name)``                    a checkpoint is due: ``"best"`` (a new best
                                                    epoch), ``"last"`` (every epoch end, when the
                                                    run diverges, and when a signal interrupts it
                                                    mid-epoch); ``trainer.checkpoint()`` holds
                                                    what resume restores
``on_epoch_end(trainer, row)``                      the epoch is recorded (history, best, findings,
                                                    repairs)
``on_train_end(trainer)``                           training stopped, also by an error; paired with
                                                    ``on_train_start``
``on_end(trainer, summary)``                        the run's record (``RunSummary``) is final;
                                                    also for a run that failed or was interrupted,
                                                    unless this session failed before opening a run
                                                    folder that holds an earlier session's record
==================================================  ==============================================

``on_step_end`` runs on the hot path: keep it free of host syncs and I/O except every few steps
(``TensorBoardLogger`` writes every ``train.log_every``). A callback may read anything on the
trainer (``cfg``, ``paths``, ``state``, ``model``, ``parts``, ``diagnoser``, ``status``, ...); the
default ones change nothing the run computes, and say what went wrong on their side through
``trainer.add_note`` (a part of ``summary.json``'s message).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:
    from detlab.diagnosis import Finding
    from detlab.engine.step import StepRecord
    from detlab.engine.trainer import Trainer
    from detlab.engine.validation import ValidationResult
    from detlab.run_record import RunSummary

class Callback:
    """Base class of the Trainer's callbacks; see the module docstring for when each hook runs."""

    def on_build(self, trainer: Trainer) -> None:
        pass

    def on_train_start(self, trainer: Trainer, samples: Optional[np.ndarray]) -> None:
        pass

    def on_step_end(self, trainer: Trainer, step: int, record: StepRecord, signals: dict[str, float]) -> None:
        pass

    def on_finding(self, trainer: Trainer, finding: Finding) -> None:
        pass

    def on_repair(self, trainer: Trainer, repair: dict[str, Any]) -> None:
        pass

    def on_validation_end(self, trainer: Trainer, row: dict[str, float], result: ValidationResult) -> None:
        pass

    def on_checkpoint(self, trainer: Trainer, name: str) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass

    def on_end(self, trainer: Trainer, summary: RunSummary) -> None:
        pass
