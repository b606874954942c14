"""Replay: the detectors re-run on a run's recorded signals give the findings the run recorded.

``tests/data/replay_frozen_backbone`` is a benchmark run recorded by the diagnosis before it became a
package (``steps.json``: the per-step signals; ``metrics.csv``: the epoch rows; ``summary.json``: its
findings). ``DETLAB_REPLAY_RUNS=<folder of run folders>`` (each with ``steps.json`` as ``SignalRecorder.write``
leaves it, ``metrics.csv``, ``summary.json`` and ``config.yaml``) replays those too; the benchmark's own
recordings are replayed by ``python -m benchmarks.diagnosis.bench_diagnosis --replay``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from detlab.config import Config, load_saved_config
from detlab.diagnosis.replay import replay_findings
from detlab.run_record import read_metrics

DATA = Path(__file__).resolve().parent / "data"
RUNS = [DATA / "replay_frozen_backbone"]
if os.environ.get("DETLAB_REPLAY_RUNS"):
    RUNS += sorted(p for p in Path(os.environ["DETLAB_REPLAY_RUNS"]).iterdir() if (p / "steps.json").is_file())


@pytest.mark.parametrize("run_dir", RUNS, ids=lambda p: p.name)
def test_replaying_a_recorded_run_gives_its_findings_at_the_same_steps(run_dir: Path):
    config = load_saved_config(OmegaConf.load(run_dir / "config.yaml"))
    recorded = json.loads((run_dir / "steps.json").read_text())
    findings = replay_findings(config, recorded["steps"], read_metrics(run_dir / "metrics.csv"),
                               recorded["total_steps"])
    summary = json.loads((run_dir / "summary.json").read_text())
    where = ("detector", "stage", "step", "epoch")
    assert [{k: f.to_dict()[k] for k in where} for f in findings] == [{k: f[k] for k in where}
                                                                      for f in summary["findings"]]


def test_the_committed_run_has_a_step_and_an_epoch_finding():
    summary = json.loads((DATA / "replay_frozen_backbone" / "summary.json").read_text())
    assert [(f["detector"], f["step"]) for f in summary["findings"]] == [("dead_gradients", 10), ("avoidance", 50)]


def test_a_divergence_that_a_rollback_repairs_may_fire_again():
    """As in the training loop: with the rollback repair on, a divergence finding re-arms the detector
    while rollbacks are left; without it, one finding."""
    def steps(bad: set[int]) -> list[dict[str, float]]:
        return [{"step": s, "epoch": s // 10 + 1, "loss_cls": math.nan if s in bad else 1.0, "loss_box": 1.0,
                 "loss_total": math.nan if s in bad else 2.0, "lr": 0.01, "grad_norm": 1.0} for s in range(30)]

    config = Config()
    config.train.epochs = 3
    config.diagnosis.repair, config.diagnosis.repairs.rollback.max_rollbacks = True, 1
    config.diagnosis.stuck.enabled = False  # the flat loss is stuck too
    found = replay_findings(config, steps({3, 8, 15}), [], 30)
    assert [(f.detector, f.step) for f in found] == [("divergence", 3), ("divergence", 8)]  # one rollback, then none
    config.diagnosis.repair = False
    assert [(f.detector, f.step) for f in replay_findings(config, steps({3, 8, 15}), [], 30)] == [("divergence", 3)]


def test_a_replay_at_a_coarser_gradient_sampling_drops_the_samples_it_would_not_have_taken():
    """The committed run sampled its gradients every 5 steps; replayed at every 10, dead_gradients (3 samples)
    decides at the third of steps 0, 10, 20 instead of 0, 5, 10. An interval that is no multiple is refused."""
    run_dir = DATA / "replay_frozen_backbone"
    config = load_saved_config(OmegaConf.load(run_dir / "config.yaml"))
    recorded = json.loads((run_dir / "steps.json").read_text())
    epochs, total = read_metrics(run_dir / "metrics.csv"), recorded["total_steps"]
    assert config.diagnosis.grad_norm_every == 5
    same = replay_findings(config, recorded["steps"], epochs, total, sampled_every=5)
    assert [(f.detector, f.step) for f in same] == [("dead_gradients", 10), ("avoidance", 50)]
    config.diagnosis.grad_norm_every = 10  # after the first part only (steps 15 on here): the same findings
    assert [(f.detector, f.step) for f in replay_findings(config, recorded["steps"], epochs, total,
                                                          sampled_every=5)] == [("dead_gradients", 10), ("avoidance", 50)]
    config.diagnosis.grad_norm_every_first_part = 10
    coarser = replay_findings(config, recorded["steps"], epochs, total, sampled_every=5)
    assert [(f.detector, f.step) for f in coarser] == [("dead_gradients", 20), ("avoidance", 50)]
    config.diagnosis.grad_norm_every = 7
    with pytest.raises(ValueError, match="must be multiples of the recorded interval 5"):
        replay_findings(config, recorded["steps"], epochs, total, sampled_every=5)


def test_the_gradients_are_sampled_densely_in_the_first_part_and_sparsely_after():
    from detlab.diagnosis import Diagnoser, DiagnosisConfig
    from detlab.schedule import StageBoundaries

    diag = Diagnoser(DiagnosisConfig(), StageBoundaries(75, 262), 375, 25)  # the default run: first part 75 steps
    assert diag.run.first_part_end == 75
    sampled = [s for s in range(375) if diag.samples_gradients(s)]
    assert sampled[:15] == list(range(0, 75, 5)) and sampled[15:17] == [80, 100]
    assert len(sampled) == 15 + 15  # 0-70 every 5, 80-360 every 20 (v3; was 10)


def test_a_config_saved_before_version_2_judges_as_version_1_did():
    """keep_v1_judgement: the keys version 2 added take the values that judge as before; a config that has
    them keeps them (today's run folders)."""
    saved = OmegaConf.to_container(OmegaConf.load(DATA / "replay_frozen_backbone" / "config.yaml"))
    assert "box_epochs" not in saved["diagnosis"]["loss_imbalance"]
    old = load_saved_config(saved).diagnosis
    assert old.loss_imbalance.box_epochs == float(saved["train"]["epochs"])
    assert (old.avoidance.rise_validations, old.avoidance.validations) == (1, 1)
    assert not old.class_loss_at_chance.enabled and old.class_loss_at_chance.max_ap50 == 1.0
    assert old.class_loss_at_chance.min_steps == 0
    today = load_saved_config(OmegaConf.to_container(OmegaConf.structured(Config()))).diagnosis
    assert (today.loss_imbalance.box_epochs, today.avoidance.rise_validations, today.avoidance.validations) == (1.0, 2, 2)
    assert today.class_loss_at_chance.enabled and today.class_loss_at_chance.max_ap50 == 0.1
    assert today.class_loss_at_chance.min_steps == 150
    # version 3's overfitting floor: a block saved without it judges as before (0), today's keeps 0.05
    assert old.overfitting.min_best_ap50 == 0.0 and today.overfitting.min_best_ap50 == 0.05
    # version 6's risk note under SGD: a block saved without it judges as before (a failure at once)
    assert "sgd_box_note" not in saved["diagnosis"]["loss_imbalance"]
    assert old.loss_imbalance.sgd_box_note is False and today.loss_imbalance.sgd_box_note is True


PILOT = Path(__file__).resolve().parents[1] / "benchmarks" / "diagnosis" / "recordings" / "v1-repairs"


def _pilot(name: str):
    from benchmarks.diagnosis.recording import read_recording

    path = PILOT / f"{name}.json.gz"
    if not path.is_file():
        pytest.skip(f"{path} is not in this checkout")
    return read_recording(path)


def test_a_repaired_run_replays_to_its_findings_by_its_recorded_repairs():
    # raise_lr three times: stuck judged against the window before each new rate; the third time the loss moved
    # (0.7% to 3.7% a window) but in proportion to the rate, so the rate was still far too low
    rec = _pilot("fault-lr_x0.001-s0")
    live = [(f["detector"], int(f["step"])) for f in rec.summary["findings"]]
    repaired = rec.summary["repairs"]
    assert [(r["repair"], r["step"]) for r in repaired] == [("raise_lr", 74), ("raise_lr", 111), ("raise_lr", 148)]
    replayed = replay_findings(rec.replay_config(None), rec.steps, rec.epochs, rec.total_steps, repaired=repaired)
    assert [(f.detector, f.step) for f in replayed] == live == [("stuck", 74), ("stuck", 111), ("stuck", 148),
                                                                  ("avoidance", 175)]
    assert replayed[2].evidence["gain"] == pytest.approx(0.037 / 0.0074, rel=0.05)
    without = replay_findings(rec.replay_config(None), rec.steps, rec.epochs, rec.total_steps)
    assert [(f.detector, f.step) for f in without] == [("stuck", 74), ("avoidance", 175)]  # the re-arm made them equal


@pytest.mark.parametrize("name, repairs", [
    ("fault-no_warmup_high_lr-s1", [("rollback", 30, True)]),  # to the start: stuck starts afresh
    ("fault-paper_box_0.01-s1", [("rebalance", 10, False)]),  # stuck stands down
])
def test_runs_recorded_with_todays_repairs_replay_to_their_own_findings(name, repairs):
    rec = _pilot(name)
    recorded = rec.summary["repairs"]
    assert [(r["repair"], r["step"], r["to_start"]) for r in recorded] == repairs
    live = [(f["detector"], int(f["step"])) for f in rec.summary["findings"]]
    replayed = replay_findings(rec.replay_config(None), rec.steps, rec.epochs, rec.total_steps, repaired=recorded)
    assert [(f.detector, f.step) for f in replayed] == live


@pytest.mark.parametrize("name, gone", [("fault-paper_box_10-s0", []), ("fault-paper_box_10-s1", []),
                                        ("fault-paper_box_10-s2", [("avoidance", 275)]),
                                        ("fault-paper_box_5-s0", [])])
def test_stuck_stands_down_after_a_rebalance_on_the_paper_recipe(name, gone):
    """These runs were recorded when a rebalance restarted stuck's windows: it then fired at step 110 or 160
    on runs that learnt (their loss had fallen before the repair; a window after it lies on the paper recipe's
    plateau). Stood down, it does not; every other finding replays as it was recorded (raise_lr, the only
    repair that answers stuck, declined after another repair, so the recorded training is today's), but for
    ``gone``: box 10 s2's avoidance at step 275, where its AP50 (0.025) stood 0.024 above the run's floor
    (0.001) while it predicted nothing; its ranking went on to 0.31 with no box above the threshold, which
    under_confidence names at step 375 (version 5's floor rule)."""
    rec = _pilot(name)
    live = [(f["detector"], int(f["step"])) for f in rec.summary["findings"]]
    assert ("stuck", 110) in live or ("stuck", 160) in live
    assert all(found in live for found in gone)
    assert [r["repair"] for r in rec.summary["repairs"]] == ["rebalance"]
    replayed = replay_findings(rec.replay_config(None), rec.steps, rec.epochs, rec.total_steps,
                               repaired=rec.summary["repairs"])
    assert [(f.detector, f.step) for f in replayed] == [found for found in live
                                                        if found[0] != "stuck" and found not in gone]
