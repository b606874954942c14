"""``detlab diagnose``: the diagnosis of recorded curves (``detlab.diagnosis.offline``, ``detlab.cli.diagnose``).

Hand-made CSVs with a known answer (the detector and the step or epoch it fires at, worked out from
the default thresholds), a healthy one with none, the recorded run of ``tests/data/replay_frozen_backbone``
(the findings its summary.json recorded), TensorBoard events written here giving the same answer as
the equivalent CSV, and the errors (one line, exit 2).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Sequence

import pytest
from omegaconf import OmegaConf

from detlab.cli.diagnose import main
from detlab.diagnosis import Need, get_detector, list_detectors, register_detector, registered_detectors, unmet_needs
from detlab.diagnosis.offline import (
    ALIASES,
    EPOCH_SIGNALS,
    STEP_SIGNALS,
    SourceError,
    diagnose_path,
    format_report,
    load_curves,
)
from detlab.run_record import METRIC_COLUMNS, read_signals

DATA = Path(__file__).resolve().parent / "data"
FROZEN = DATA / "replay_frozen_backbone"
WHERE = ("detector", "stage", "step", "epoch")


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    cells = [",".join("" if v is None else (repr(v) if isinstance(v, float) else str(v)) for v in row) for row in rows]
    path.write_text("\n".join([",".join(header), *cells]) + "\n")
    return path


def found(report) -> list[tuple]:
    return [(f.detector, f.epoch, f.step) for f in report.findings]


# ------------------------------------------------------------------------- hand-made curves
def falling(s: int) -> float:
    """A training loss that learns: 2.5 falling to 0.5, with a little deterministic noise."""
    return 2.0 * math.exp(-s / 50) + 0.5 + 0.01 * math.sin(s)


def blow_up_csv(tmp_path: Path) -> Path:
    # 100 steps; from step 60 on the loss is 1000, ~600x its running median: divergence's patience of 3
    # steps ends at step 62
    return write_csv(tmp_path / "blow_up.csv", ["step", "loss"],
                     [(s, 1000.0 if s >= 60 else falling(s)) for s in range(100)])


def nan_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "nan.csv", ["step", "loss"],
                     [(s, "nan" if s == 40 else falling(s)) for s in range(100)])


def flat_csv(tmp_path: Path) -> Path:
    # 100 steps of a flat loss: stuck decides at the end of the first part of training, 20% of the
    # steps (stuck.min_fraction), i.e. at step 19
    return write_csv(tmp_path / "flat.csv", ["step", "loss"], [(s, 1.0 + 0.001 * math.sin(s)) for s in range(100)])


def avoidance_csv(tmp_path: Path) -> Path:
    # one row per epoch; the class loss falls 20% an epoch while recall and AP50 stay at zero: epoch 1
    # has no earlier AP50 to compare with and two validations in a row must show it, so avoidance fires at
    # epoch 3
    return write_csv(tmp_path / "avoidance.csv", ["epoch", "cls_loss", "box_loss", "recall", "ap50"],
                     [(e, 2.0 * 0.8 ** e, 0.9 ** e, 0.0, 0.0) for e in range(1, 11)])


def val_loss(e: int) -> float:
    return 2.0 - 0.2 * e if e <= 5 else 1.0 + 0.1 * (e - 5)


def val_ap50(e: int) -> float:
    return 0.08 * e if e <= 5 else 0.4 - 0.03 * (e - 5)


def overfitting_rows() -> list[tuple]:
    # the val loss turns up after epoch 5 while the train loss keeps falling: epochs 5..8 are the
    # first 3 consecutive rises (overfitting.epochs), and the AP50 falls from its best (0.4 at epoch 5) to
    # 0.31, more than overfitting.min_ap50_fall below it, so it fires at epoch 8
    return [(e, 2.0 * 0.9 ** e, val_loss(e), min(0.9, 0.1 * e), val_ap50(e)) for e in range(1, 11)]


def overfitting_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "overfitting.csv", ["epoch", "train_loss", "val_loss", "recall", "ap50"],
                     overfitting_rows())


FPS = [50, 40, 30, 30, 36, 45, 60, 80, 100, 120]


def small_fp_csv(tmp_path: Path) -> Path:
    # false positives rise from epoch 4 on while the class loss stays flat (the box loss falls, so the
    # run is not stuck): epochs 4..7 are 3 rises of 100% in the mid stage (epochs 2..7 of 10)
    return write_csv(tmp_path / "small_fp.csv", ["epoch", "cls_loss", "box_loss", "val_loss", "tp", "fp"],
                     [(e, 1.0, 2.0 * 0.8 ** e, 3.0 * 0.9 ** e, 50, FPS[e - 1]) for e in range(1, 11)])


KNOWN = {
    "blow_up": (blow_up_csv, [("divergence", 1, 62)]),
    "nan": (nan_csv, [("divergence", 1, 40)]),
    "flat": (flat_csv, [("stuck", 1, 19)]),
    "avoidance": (avoidance_csv, [("avoidance", 3, None)]),
    "overfitting": (overfitting_csv, [("overfitting", 8, None)]),
    "small_fp": (small_fp_csv, [("small_fp_explosion", 7, None)]),
}


@pytest.mark.parametrize("case", list(KNOWN))
def test_a_hand_made_csv_gives_its_known_finding(case, tmp_path):
    make, expected = KNOWN[case]
    report = diagnose_path(make(tmp_path))
    assert found(report) == expected, format_report(report)


def test_findings_say_what_when_why_and_what_to_do(tmp_path):
    report = diagnose_path(blow_up_csv(tmp_path))
    (finding,) = report.findings
    assert finding.severity == "critical" and finding.stage == "mid"  # a detlab run stops on it; steps 10-69
    assert finding.evidence.startswith("the class plus box loss was 1000, ") and finding.values["steps"] == 3
    assert "nan" not in finding.evidence  # no learning rate in the curves: none in the words
    assert finding.cause == get_detector("divergence").cause and "optim.lr" in finding.remedy
    text = format_report(report)
    assert "1. Divergence (failure, a detlab run stops on it; mid stage, epoch 1, step 62)" in text
    for label in ("What:", "Cause:", "What to do:"):
        assert label in text
    assert text.splitlines()[-1] == "1 failure found"


def test_a_healthy_csv_gives_no_finding(tmp_path):
    # the loss every step, a validation every 20 steps (the epochs): losses fall, recall and AP50 climb
    rows = []
    for s in range(200):
        validated = s % 20 == 19
        e = s // 20 + 1
        rows.append((s, falling(s), 0.6 * falling(s), 0.4 * falling(s), 1.1 * falling(s) if validated else None,
                     min(0.9, 0.09 * e) if validated else None, min(0.8, 0.08 * e) if validated else None))
    path = write_csv(tmp_path / "healthy.csv", ["step", "loss", "cls_loss", "box_loss", "val_loss", "recall", "ap50"],
                     rows)
    report = diagnose_path(path)
    assert report.findings == [] and report.steps_read == 200 and report.epochs_read == 10
    assert {s.detector for s in report.skipped} == {"unnormalised_input", "unmatched_faces", "empty_images",
                                                    "dead_gradients", "under_confidence", "loss_imbalance",
                                                    "random_large_boxes", "small_fp_explosion",
                                                    "class_loss_at_chance"}
    assert format_report(report).splitlines()[-1] == "no failure found"


def test_skipped_detectors_say_why_in_words(tmp_path):
    report = diagnose_path(overfitting_csv(tmp_path))
    reasons = {s.detector: s.reason for s in report.skipped}
    assert reasons["dead_gradients"] == "needs the model's gradients (recorded only while training a detlab model)"
    assert reasons["unmatched_faces"].startswith("needs the anchors' matching of the training faces")
    assert reasons["avoidance"] == "needs the class loss (a column named cls_loss)"
    assert reasons["small_fp_explosion"] == ("needs the false-positive count and the class loss "
                                             "(columns named fp and cls_loss)")
    assert reasons["class_loss_at_chance"] == ("needs the class loss and the hard negative mining's negatives per "
                                               "face (recorded only while training a detlab model)")
    text = format_report(report)
    assert "skipped: dead gradients — needs the model's gradients" in text
    # the prose names no internal key: the detectors by their title, the signals in words
    prose = text.split("\n\n", 1)[1]
    assert "val/" not in prose and "grad_dead_share" not in prose and "small_fp_explosion" not in prose


def test_records_every_k_steps_are_dated_at_their_own_step(tmp_path):
    # the flat loss of 1000 steps logged every 10: the step checks count records, so stuck decides at
    # the 20th record (20% of the records), step 190
    path = write_csv(tmp_path / "every10.csv", ["iteration", "train_loss"],
                     [(s, 1.0 + 0.001 * math.sin(s)) for s in range(0, 1000, 10)])
    report = diagnose_path(path)
    assert found(report) == [("stuck", 1, 190)] and report.step_every == 10
    assert any("recorded every 10 steps" in note for note in report.notes)


def test_overrides_change_the_thresholds(tmp_path):
    path = flat_csv(tmp_path)
    assert found(diagnose_path(path, ["diagnosis.stuck.enabled=false"])) == []
    report = diagnose_path(path, ["diagnosis.stuck.min_fraction=0.5"])  # decides at step 49
    assert found(report) == [("stuck", 1, 49)] and report.overrides == ["diagnosis.stuck.min_fraction=0.5"]
    assert "diagnosis.stuck.min_fraction=0.5" in format_report(report)


# ------------------------------------------------------------------------------- column names
def test_ultralytics_results_csv_is_read_as_it_is(tmp_path):
    header = ["                  epoch", "      train/box_loss", "      train/cls_loss", "      train/dfl_loss",
              "   metrics/precision(B)", "      metrics/recall(B)", "       metrics/mAP50(B)", "    metrics/mAP50-95(B)",
              "        val/box_loss", "        val/cls_loss", "        val/dfl_loss", "              lr/pg0",
              "              lr/pg1"]
    rows = [(e, 0.9 ** e, 2.0 * 0.8 ** e, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 1.0, 0.01, 0.01) for e in range(1, 11)]
    report = diagnose_path(write_csv(tmp_path / "results.csv", header, rows))
    assert found(report) == [("avoidance", 3, None)]
    assert {k: v.strip() for k, v in report.columns.items()} == {
        "epoch": "epoch", "loss_box": "train/box_loss", "loss_cls": "train/cls_loss", "val/precision":
        "metrics/precision(B)", "val/recall": "metrics/recall(B)", "val/ap50": "metrics/mAP50(B)",
        "val/loss_box": "val/box_loss", "val/loss_cls": "val/cls_loss", "lr": "lr/pg0"}
    assert [n.strip() for n in report.ignored] == ["metrics/mAP50-95(B)", "lr/pg1"]
    curves = load_curves(tmp_path / "results.csv")
    # no total column: the sum of the terms, dfl included
    assert curves.signals["loss_total"][0] == pytest.approx(0.9 + 1.6 + 1.0)
    assert curves.epochs[0]["val/loss_total"] == pytest.approx(4.0)


def test_training_rows_and_validation_rows_of_one_table(tmp_path):
    # PyTorch Lightning's CSVLogger: epochs from 0, a row per logged step, a row per validation; the val
    # loss is lowest after epoch 4 and rises over epochs 5, 6 and 7: overfitting at epoch 7 (counted
    # from 0, as the file does), its validation row's step 79
    rows = []
    for e in range(10):
        rows += [(e, s, falling(s), None) for s in range(10 * e, 10 * e + 10)]
        rows.append((e, 10 * e + 9, None, val_loss(e + 1)))
    report = diagnose_path(write_csv(tmp_path / "lightning.csv", ["epoch", "step", "train_loss", "val_loss"], rows))
    assert found(report) == [("overfitting", 7, 79)]
    assert report.steps_read == 100 and report.epochs_read == 10 and not report.per_epoch


def test_percentages_are_read_as_shares(tmp_path):
    rows = [(e, 2.0 * 0.8 ** e, 0.9 ** e, 0.0, 0.0) for e in range(1, 4)] + [(4, 0.8, 0.6, 50.0, 40.0)]
    curves = load_curves(write_csv(tmp_path / "pct.csv", ["epoch", "cls_loss", "box_loss", "recall", "ap50"], rows))
    assert curves.epochs[-1]["val/recall"] == 0.5 and curves.epochs[-1]["val/ap50"] == 0.4


def test_detlab_metrics_csv_alone_is_read_with_its_own_names(tmp_path):
    shutil.copy(FROZEN / "metrics.csv", tmp_path / "metrics.csv")
    report = diagnose_path(tmp_path / "metrics.csv")
    assert report.ignored == [] and report.per_epoch and report.epochs_read == 3
    assert set(report.columns) == {c for c in METRIC_COLUMNS if not c.endswith("_time_s")} - {
        "train/loss_cls", "train/loss_box", "train/loss_total"} | {"loss_cls", "loss_box", "loss_total"}
    assert "under_confidence" not in {s.detector for s in report.skipped}


def test_every_signal_the_detectors_read_has_a_name():
    for cls in registered_detectors():
        for need in cls.needs:
            assert all(signal in ALIASES or signal.removeprefix("train/") in STEP_SIGNALS
                       for signal in need.signals), (cls.name, need)
    assert set(STEP_SIGNALS) | set(EPOCH_SIGNALS) <= set(ALIASES)


# ---------------------------------------------------------------------------------- detectors
def test_every_built_in_detector_declares_what_it_needs():
    for name in list_detectors():
        cls = get_detector(name)
        if cls.__module__ == "detlab.diagnosis.detectors":
            assert cls.needs and cls.title, name
    curves_only = {"loss_total", "loss_cls", "train/loss_cls", "train/loss_total", "val/loss_total", "val/recall",
                   "val/ap50", "val/fp"}
    runnable = {cls.name for cls in registered_detectors() if not unmet_needs(cls, curves_only)}
    assert {"stuck", "divergence", "avoidance", "overfitting", "small_fp_explosion"} <= runnable
    assert not {"dead_gradients", "loss_imbalance", "unmatched_faces", "unnormalised_input"} & runnable


def test_register_detector_refuses_needs_that_are_not_needs():
    from detlab.diagnosis import Detector, Level

    for needs in [("loss_total",), (Need((), "nothing"),)]:
        toy = type("Toy", (Detector,), {"name": "toy_needs", "level": Level.STEP, "needs": needs,
                                        "check_step": lambda self, when, signals: None})
        with pytest.raises(ValueError, match="needs is a tuple of Need"):
            register_detector(toy)
    assert "toy_needs" not in list_detectors()


# ------------------------------------------------------------------------------ run folders
def recorded(run_dir: Path) -> list[dict]:
    return [{k: f[k] for k in WHERE} for f in json.loads((run_dir / "summary.json").read_text())["findings"]]


def test_a_recorded_run_folder_gives_the_findings_its_summary_recorded():
    report = diagnose_path(FROZEN)
    assert [{k: getattr(f, k) for k in WHERE} for f in report.findings] == recorded(FROZEN)
    assert report.thresholds == "the run's own (its config.yaml)" and report.step_source == "steps.json"
    assert [s.detector for s in report.skipped] == ["class_loss_at_chance"]  # off in the config
    text = format_report(report)
    assert "The run itself recorded: dead gradients (epoch 1, step 10), avoidance (epoch 2, step 50)." in text
    # advice from the run's config: the override with its value now
    assert "loss.adaptive_weights.enabled=true (now false)" in " ".join(text.split())


def write_detlab_events(run_dir: Path, every: int = 1) -> None:
    """The run's step signals as the trainer's TensorBoard logger writes them (train/<signal>, the
    finite values, every ``every`` steps), instead of steps.json."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    for row in json.loads((FROZEN / "steps.json").read_text())["steps"]:
        if row["step"] % every:
            continue
        for key, value in row.items():
            if key not in ("step", "epoch", "weights_ramping") and math.isfinite(value):
                writer.add_scalar(f"train/{key}", value, row["step"])
    writer.close()


def copy_run(tmp_path: Path, steps: bool = False) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("config.yaml", "metrics.csv", "summary.json", *(["steps.json"] if steps else [])):
        shutil.copy(FROZEN / name, run_dir / name)
    return run_dir


def test_a_run_folder_read_from_its_tensorboard_events_gives_the_same_findings(tmp_path):
    run_dir = copy_run(tmp_path)
    write_detlab_events(run_dir)
    report = diagnose_path(run_dir)
    assert [{k: getattr(f, k) for k in WHERE} for f in report.findings] == recorded(FROZEN)
    assert report.step_source == "the TensorBoard events" and report.step_every == 1


def test_events_every_ten_steps_find_the_same_patterns_dated_to_the_record(tmp_path):
    run_dir = copy_run(tmp_path)
    write_detlab_events(run_dir, every=10)
    report = diagnose_path(run_dir)
    # dead gradients shows at the third gradient record (steps 0, 10, 20) instead of the third sample (0, 5, 10)
    assert [(f.detector, f.stage, f.epoch, f.step) for f in report.findings] == [
        ("dead_gradients", "early", 1, 20), ("avoidance", "mid", 2, 50)]
    assert report.step_every == 10


def test_today_replaces_the_runs_own_thresholds(tmp_path):
    run_dir = copy_run(tmp_path, steps=True)
    config = OmegaConf.load(run_dir / "config.yaml")
    config.diagnosis.dead_gradients.max_share = 0.9  # the run's own: 78% dead is under it
    OmegaConf.save(config, run_dir / "config.yaml")
    assert [f.detector for f in diagnose_path(run_dir).findings] == ["avoidance"]
    today = diagnose_path(run_dir, today=True)
    # today's (version 2): the AP50 rose 0.0036 over two validations, so no avoidance
    assert [f.detector for f in today.findings] == ["dead_gradients"]
    assert today.thresholds.startswith("today's")


@pytest.mark.slow
def test_a_tiny_trained_run_gives_the_findings_it_recorded(synthetic_root, tiny_config, tmp_path):
    from detlab.engine.trainer import train

    # thresholds that fire on any run: no loss falls 100% (stuck), no ratio of the two terms' gradient
    # norms is within 0.01% of 1 (loss imbalance, sampled every step in the tiny config)
    cfg = tiny_config(synthetic_root, "train.epochs=3", "diagnosis.stuck.min_drop=1.0",
                      "diagnosis.loss_imbalance.ratio=1.0001", "train.sample_grid=0", "train.plots=false")
    summary = train(cfg, tmp_path / "run", [])
    assert {"stuck", "loss_imbalance"} <= {f["detector"] for f in summary["findings"]}
    signals = read_signals(tmp_path / "run")  # every step, once, in order
    assert [row["step"] for row in signals["steps"]] == list(range(summary["step"]))
    assert signals["total_steps"] == summary["step"]
    report = diagnose_path(tmp_path / "run")
    assert report.step_source == "signals.json.gz" and report.step_every == 1
    assert [{k: getattr(f, k) for k in WHERE} for f in report.findings] == recorded(tmp_path / "run")
    (tmp_path / "run" / "signals.json.gz").unlink()  # without it: the TensorBoard events (train.log_every=1)
    report = diagnose_path(tmp_path / "run")
    assert [{k: getattr(f, k) for k in WHERE} for f in report.findings] == recorded(tmp_path / "run")


# ------------------------------------------------------------------------------ TensorBoard
def write_events(folder: Path, series: dict[str, dict[int, float]]) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for tag, values in series.items():
        for step, value in values.items():
            writer.add_scalar(tag, value, step)
    writer.close()
    (events,) = folder.glob("events.out.tfevents.*")
    return events


def test_tensorboard_events_give_the_same_answer_as_the_equivalent_csv(tmp_path):
    # per epoch (the TensorBoard step is the epoch): overfitting at epoch 8
    rows = overfitting_rows()
    events = write_events(tmp_path / "epochs", {
        "train/loss": {r[0]: r[1] for r in rows}, "val/loss": {r[0]: r[2] for r in rows},
        "val/recall": {r[0]: r[3] for r in rows}, "val/ap50": {r[0]: r[4] for r in rows}})
    csv_report, tb_report = diagnose_path(overfitting_csv(tmp_path)), diagnose_path(events)
    assert [(f.detector, f.epoch) for f in tb_report.findings] == [(f.detector, f.epoch) for f in csv_report.findings]
    assert found(tb_report) == [("overfitting", 8, 8)]  # dated by the TensorBoard step too
    assert [s.detector for s in tb_report.skipped] == [s.detector for s in csv_report.skipped]

    # per step, a folder of events: divergence at step 62
    write_events(tmp_path / "steps", {"loss": {s: 1000.0 if s >= 60 else falling(s) for s in range(100)}})
    assert found(diagnose_path(tmp_path / "steps")) == found(diagnose_path(blow_up_csv(tmp_path))) == [
        ("divergence", 1, 62)]


# ------------------------------------------------------------------------------------ the CLI
def test_the_cli_prints_the_report_or_json(tmp_path, capsys):
    path = flat_csv(tmp_path)
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Diagnosis of {path} (CSV file)\nRead 100 training records (steps 0 to 99, every step)")
    assert "1. Stuck (failure; mid stage, epoch 1, step 19)" in out
    assert main([str(path), "--json", "--set", "diagnosis.stuck.enabled=false"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["findings"] == [] and record["failure_found"] is False
    assert {"detector": "stuck", "title": "stuck", "reason": "switched off in the config "
            "(--set diagnosis.stuck.enabled=true runs it)"} in record["skipped"]
    assert record["columns"] == {"step": "step", "loss_total": "loss"}


def test_json_is_strict_when_evidence_is_not_finite(tmp_path, capsys):
    assert main([str(nan_csv(tmp_path)), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)  # NaN would not parse as strict JSON ...
    assert record["findings"][0]["values"]["loss_total"] is None  # ... it is null


def bad_cell_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "bad.csv", ["step", "loss"], [(0, 1.0), (1, "abc")])


def empty_csv(tmp_path: Path) -> Path:
    (tmp_path / "empty.csv").write_text("")
    return tmp_path / "empty.csv"


@pytest.mark.parametrize("make,expected", [
    (lambda p: p / "missing.csv", "missing.csv: no such file or folder; expected a run folder, a CSV file or a "
                                  "TensorBoard event file"),
    (lambda p: write_csv(p / "other.csv", ["a", "b"], [(1, 2)]), "other.csv: no recognised column in the header (a, b)"),
    (bad_cell_csv, "bad.csv:3: column 'loss': 'abc' is not a number"),
    (lambda p: write_csv(p / "ragged.csv", ["step", "loss"], [(0, 1.0, 3), (1, 1.0)]),
     "ragged.csv:2: 3 cells where the header has 2"),
    (empty_csv, "empty.csv:1: no header line"),
    (lambda p: p, "neither a run folder"),
])
def test_errors_are_one_line_naming_the_file_and_exit_2(tmp_path, capsys, make, expected):
    path = make(tmp_path)
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: {tmp_path}") and expected in captured.err


def test_a_bad_override_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(flat_csv(tmp_path)), "--set", "diagnosis.stuck.min_dro=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diagnosis.stuck.min_dro: unknown key" in err and "min_drop" in err


def test_a_csv_without_rows_or_with_only_step_numbers_is_refused(tmp_path):
    with pytest.raises(SourceError, match="a header but no rows"):
        load_curves(write_csv(tmp_path / "header.csv", ["step", "loss"], []))
    with pytest.raises(SourceError, match="no recognised column"):
        load_curves(write_csv(tmp_path / "steps.csv", ["step", "epoch", "note"], [(0, 1, "x")]))


@pytest.mark.slow
def test_the_script_is_the_cli(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "scripts" / "diagnose.py"), str(flat_csv(tmp_path))],
                          capture_output=True, text=True, cwd=repo)
    assert done.returncode == 0 and "1. Stuck" in done.stdout
    missing = subprocess.run([sys.executable, str(repo / "scripts" / "diagnose.py"), str(tmp_path / "nope.csv")],
                             capture_output=True, text=True, cwd=repo)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
