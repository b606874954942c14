"""End-to-end training runs on a tiny synthetic dataset: files, TensorBoard tags, resume, divergence."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detlab.engine.callbacks import Callback
from detlab.engine.loggers import default_callbacks
from detlab.engine.trainer import train
from detlab.run_record import METRIC_COLUMNS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def scalar_tags(run_dir: Path) -> set[str]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return set(events.Tags()["scalars"]), set(events.Tags()["images"]), events


def test_one_epoch_run_writes_every_file_and_tensorboard_tag(synthetic_root, tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(tiny_config(synthetic_root), run_dir, ["loss.box_weight=1.0"])

    assert summary["status"] == "completed" and summary["epochs"] == 1
    for name in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert list(rows[0].keys()) == METRIC_COLUMNS and len(rows) == 1
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for key in ("status", "epochs", "best", "final", "stages", "findings", "wall_time_s"):
        assert key in on_disk
    assert on_disk["final"]["val/miou"] == pytest.approx(float(rows[0]["val/miou"]), abs=1e-5)
    assert set(on_disk["stages"]) <= {"early", "mid", "late"} and "early" in on_disk["stages"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and "model" in checkpoint and checkpoint["config"]["loss"]["box_weight"] == 1.0

    scalars, images, events = scalar_tags(run_dir)
    expected = {
        "train/loss_cls", "train/loss_box", "train/loss_total", "train/lr",
        "val/loss_cls", "val/loss_box", "val/loss_total", "val/miou", "val/tp", "val/fp", "val/fn",
        "val/precision", "val/recall", "val/pred_per_image", "val/pred_mean_size",
        "stage/early/loss_cls", "stage/early/loss_box", "stage/early/loss_total",
        "diagnosis/grad_norm_ratio_box_to_cls", "hparam/final_miou",
    }
    assert expected <= scalars, expected - scalars
    assert "val/predictions" in images
    assert any(tag.startswith("diagnosis/") for tag in scalars - {"diagnosis/grad_norm_ratio_box_to_cls"})
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)


class InterruptAfterEpochTrained(Callback):
    """Ctrl-C after the last step of epoch ``epoch``, before its validation and checkpoint: like a kill mid-run."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_step_end(self, trainer, step, record, signals) -> None:
        if step == self.epoch * trainer.steps_per_epoch - 1:
            raise KeyboardInterrupt


def test_resumed_run_reproduces_the_uninterrupted_run(synthetic_root, tiny_config, tmp_path):
    overrides = ("train.epochs=2",)
    straight = train(tiny_config(synthetic_root, *overrides), tmp_path / "straight")

    cfg = tiny_config(synthetic_root, *overrides)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "killed", callbacks=[*default_callbacks(cfg), InterruptAfterEpochTrained(epoch=2)])
    killed = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert killed["status"] == "interrupted" and killed["epochs"] == 1 and killed["step"] == 4
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1

    resumed = train(tiny_config(synthetic_root, *overrides, "resume=true"), tmp_path / "killed")
    assert resumed["status"] == "completed" and resumed["epochs"] == 2
    straight_rows = list(csv.DictReader(open(tmp_path / "straight" / "metrics.csv")))
    resumed_rows = list(csv.DictReader(open(tmp_path / "killed" / "metrics.csv")))
    assert len(straight_rows) == len(resumed_rows) == 2
    for a, b in zip(straight_rows, resumed_rows):
        for column in METRIC_COLUMNS:
            if column.endswith("_time_s"):
                continue
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-5, abs=1e-6), column
    assert straight["final"]["val/loss_total"] == pytest.approx(resumed["final"]["val/loss_total"], rel=1e-5)


def test_non_finite_loss_ends_the_run_as_diverged(synthetic_root, tiny_config, tmp_path):
    summary = train(tiny_config(synthetic_root, "optim.lr=1e12", "train.epochs=3"), tmp_path / "run")
    assert summary["status"] == "diverged"
    assert summary["step"] < 3 * 2  # stopped before the planned steps
    assert "step" in summary["message"]
    assert any(f["detector"] == "divergence" for f in summary["findings"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "diverged"


def test_extreme_weight_pair_records_the_imbalance_finding(synthetic_root, tiny_config, tmp_path):
    # a box-dominant ratio is judged in the first box_epochs epochs: 2 steps an epoch here, so both
    summary = train(tiny_config(synthetic_root, "loss.box_weight=100", "train.epochs=2",
                                "diagnosis.loss_imbalance.box_epochs=2"), tmp_path / "run")
    imbalance = [f for f in summary["findings"] if f["detector"] == "loss_imbalance"]
    assert imbalance, summary["findings"]
    assert imbalance[0]["evidence"]["ratio_box_to_cls"] > 10 and imbalance[0]["evidence"]["box_dominates"] == 1.0
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert any(f["detector"] == "loss_imbalance" for f in on_disk["findings"])


def test_cli_resume_of_a_run_directory_uses_that_runs_config(synthetic_root, tiny_config, tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    tiny = [f"dataset.root={synthetic_root}", "dataset.synthetic.num_images=20", "dataset.synthetic.image_width=160",
            "dataset.synthetic.image_height=128", "model.input_width=160", "model.input_height=128",
            "train.epochs=1", "train.batch_size=8", "eval.num_logged_images=0"]
    first = subprocess.run([sys.executable, "train.py", f"run_dir={run_dir}", "loss.box_weight=0.5", *tiny],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run([sys.executable, "train.py", f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'h'}"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "run already complete" in again.stdout + again.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["hparams"]["loss.box_weight"] == 0.5 and "loss.box_weight=0.5" in summary["overrides"]


def test_train_and_val_totals_are_weighted_alike_under_adaptive_weights(synthetic_root, tiny_config, tmp_path):
    from detlab.loss import LossWeightSchedule

    cfg = tiny_config(synthetic_root, "loss.adaptive_weights.enabled=true", "loss.box_weight=2.0", "train.epochs=2",
                      "loss.adaptive_weights.ramp_end_fraction=1.0")
    summary = train(cfg, tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    schedule = LossWeightSchedule(cfg.loss.adaptive_weights, 1.0, 2.0, summary["step"])
    assert [schedule.weights(int(row["step"]))[1] < 2.0 for row in rows] == [True, False]  # ramping, then not
    for row in rows:
        class_weight, box_weight = schedule.weights(int(row["step"]))
        expected = class_weight * float(row["val/loss_cls"]) + box_weight * float(row["val/loss_box"])
        assert float(row["val/loss_total"]) == pytest.approx(expected, rel=1e-4)


def test_best_checkpoint_and_early_stop_follow_the_monitor(synthetic_root, tiny_config, tmp_path):
    summary = train(tiny_config(synthetic_root, "train.epochs=4", "early_stopping.monitor=val/loss_total",
                                "early_stopping.min_delta=1000", "early_stopping.patience=2"), tmp_path / "run")
    # With a min_delta no epoch can beat, epoch 1 stays the best and two epochs without improvement stop the run.
    assert summary["status"] == "stopped" and summary["epochs"] == 3
    assert "early stopping: val/loss_total has not improved for 2 epochs" in summary["message"]
    assert summary["best"]["epoch"] == 1
    assert summary["best_by"] == {"monitor": "val/loss_total", "mode": "min", "value": summary["best"]["val/loss_total"],
                                  "epoch": 1}
    assert torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)["epoch"] == 1


def test_after_training_test_scores_last_checkpoint_as_evaluate_does(synthetic_root, tiny_config, tmp_path):
    from detlab.config import EvaluateConfig
    from detlab.evaluation import evaluate_checkpoint

    run_dir = tmp_path / "run"
    summary = train(tiny_config(synthetic_root, "eval.test_protocol=detection"), run_dir)

    scored = json.loads((run_dir / "test.json").read_text())
    direct = evaluate_checkpoint(EvaluateConfig(checkpoint=str(run_dir / "checkpoints" / "last.pt")))
    assert scored["tp"] == direct["tp"] and scored["fp"] == direct["fp"] and scored["miou"] == direct["miou"]
    assert summary["test"]["tp"] == direct["tp"] and summary["test"]["recall"] == direct["recall"]
    assert summary["test"]["epoch"] == 1 and "wider_easy" not in summary["test"]
    assert json.loads((run_dir / "summary.json").read_text())["test"] == summary["test"]


def test_wider_test_protocol_on_data_without_wider_ground_truth_fails_before_training(
        synthetic_root, tiny_config, tmp_path):
    from detlab.errors import UserError

    with pytest.raises(UserError, match=r"eval\.test_protocol=wider needs WIDER FACE data"):
        train(tiny_config(synthetic_root, "eval.test_protocol=wider"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
