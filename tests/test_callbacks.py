"""The Trainer's callbacks and factories: the hooks a run calls and when, what a run writes with only
the callbacks it is given, and datasets and models injected through the constructor."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from detlab.data import build_datasets
from detlab.engine.callbacks import Callback
from detlab.engine.loggers import (ConsoleLogger, MetricsCsv, ModelCheckpoint, Plots, RunRecordWriter, SignalsLog,
                                   TensorBoardLogger, default_callbacks)
from detlab.engine.trainer import Trainer
from detlab.model import build_model
from detlab.run_record import RunStatus, RunSummary


class Recorder(Callback):
    """Every hook call, in order, with what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_build(self, trainer: Trainer) -> None:
        self.calls.append(("on_build", trainer.steps_per_epoch))

    def on_train_start(self, trainer: Trainer, samples: Optional[np.ndarray]) -> None:
        self.calls.append(("on_train_start", None if samples is None else samples.shape))

    def on_step_end(self, trainer: Trainer, step: int, record: Any, signals: dict[str, float]) -> None:
        self.calls.append(("on_step_end", (step, record.updated, signals["loss_total"] == record.loss_total)))

    def on_finding(self, trainer: Trainer, finding: Any) -> None:
        self.calls.append(("on_finding", finding.detector))

    def on_repair(self, trainer: Trainer, repair: dict[str, Any]) -> None:
        self.calls.append(("on_repair", repair["repair"]))

    def on_validation_end(self, trainer: Trainer, row: dict[str, float], result: Any) -> None:
        self.calls.append(("on_validation_end", (row["epoch"], row["step"], "val/miou" in result.metrics)))

    def on_checkpoint(self, trainer: Trainer, name: str) -> None:
        self.calls.append(("on_checkpoint", name))

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        self.calls.append(("on_epoch_end", (row["epoch"], len(trainer.state.history))))

    def on_train_end(self, trainer: Trainer) -> None:
        self.calls.append(("on_train_end", trainer.status))

    def on_end(self, trainer: Trainer, summary: RunSummary) -> None:
        self.calls.append(("on_end", (summary.status, summary.epochs, summary.step)))

    def hooks(self, *names: str) -> list[tuple[str, Any]]:
        return [(hook, given) for hook, given in self.calls if hook in names]


def test_default_callbacks_write_the_record_last():
    from detlab.config import Config

    callbacks = default_callbacks(Config())
    assert [type(c) for c in callbacks] == [TensorBoardLogger, Plots, ModelCheckpoint, MetricsCsv, SignalsLog,
                                            ConsoleLogger, RunRecordWriter]


@pytest.mark.slow
def test_a_callback_gets_every_hook_in_order_and_a_run_without_loggers_writes_nothing(
        synthetic_root, tiny_config, tmp_path):
    # 20 synthetic images: 16 train (batch 8: 2 steps an epoch), 4 val. Diagnosis off: no findings.
    cfg = tiny_config(synthetic_root, "train.epochs=2", "diagnosis.enabled=false")
    recorder = Recorder()
    summary = Trainer(cfg, tmp_path / "run", callbacks=[recorder]).run()

    assert summary["status"] == "completed" and summary["epochs"] == 2 and summary["step"] == 4
    lifecycle = recorder.hooks("on_build", "on_train_start", "on_step_end", "on_validation_end", "on_epoch_end",
                               "on_train_end", "on_end")
    step = [("on_step_end", (i, True, True)) for i in range(4)]
    assert lifecycle == [
        ("on_build", 2), ("on_train_start", lifecycle[1][1]),
        step[0], step[1], ("on_validation_end", (1, 2, True)), ("on_epoch_end", (1, 1)),
        step[2], step[3], ("on_validation_end", (2, 4, True)), ("on_epoch_end", (2, 2)),
        ("on_train_end", RunStatus.COMPLETED), ("on_end", (RunStatus.COMPLETED, 2, 4)),
    ]
    assert lifecycle[1][1] is not None and lifecycle[1][1][2] == 3  # the sample grid, RGB
    assert recorder.hooks("on_finding", "on_repair") == []
    # Per epoch: "best" (epoch 1 always is; epoch 2 when its val/ap50, the default monitor, beats it), then "last", between
    # the validation's end and the epoch's end.
    names = [hook if hook != "on_checkpoint" else given for hook, given in recorder.calls
             if hook in ("on_validation_end", "on_checkpoint", "on_epoch_end")]
    assert names[:4] == ["on_validation_end", "best", "last", "on_epoch_end"]
    assert names[4] == "on_validation_end" and names[-2:] == ["last", "on_epoch_end"] and len(names) in (7, 8)
    # No TensorBoard, plots, checkpoints, metrics.csv, config.yaml or summary.json: only the lock.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


@pytest.mark.slow
def test_factories_given_to_the_trainer_build_the_data_and_the_model(synthetic_root, tiny_config, tmp_path):
    cfg = tiny_config(synthetic_root, "diagnosis.enabled=false", "train.sample_grid=0")
    asked: list[Any] = []

    def twelve_training_images(config):
        asked.append(config)
        train_set, val_set = build_datasets(config)
        return Subset(train_set, range(12)), val_set

    built: list[torch.nn.Module] = []

    def frozen_backbone(model_cfg):
        model = build_model(model_cfg)
        for parameter in model.backbone.parameters():
            parameter.requires_grad_(False)
        built.append(model)
        return model

    recorder = Recorder()
    trainer = Trainer(cfg, tmp_path / "run", callbacks=[recorder], dataset_factory=twelve_training_images,
                      model_factory=frozen_backbone)
    initial: dict[str, torch.Tensor] = {}

    class KeepInitialWeights(Callback):
        def on_build(self, trainer: Trainer) -> None:
            initial.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    trainer.add_callback(KeepInitialWeights())
    summary = trainer.run()

    assert asked == [cfg] and len(built) == 1 and trainer.model is built[0]
    # 12 images in batches of 8, the last partial batch dropped: 1 step (16 images would make 2).
    assert recorder.hooks("on_build") == [("on_build", 1)] and summary["step"] == 1
    assert recorder.hooks("on_step_end") == [("on_step_end", (0, True, True))]
    # The model the factory froze is the one trained: its backbone weights stay, the rest move.
    trained = dict(trainer.model.named_parameters())
    backbone = [k for k in trained if k.startswith("backbone.")]
    assert backbone and all(torch.equal(initial[k], trained[k]) for k in backbone)
    assert any(not torch.equal(initial[k], p) for k, p in trained.items() if k not in backbone)
