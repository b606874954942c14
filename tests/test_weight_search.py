"""+experiment=weight_search: Hydra's Optuna sweeper searches the box weight and the negative ratio,
maximising the val AP50 that train.py returns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_sweep_overrides
from omegaconf import OmegaConf

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_search_returns_the_best_trial_and_the_report_reads_its_runs(tmp_path):
    sweep_dir = tmp_path / "search"
    tiny = tiny_sweep_overrides(tmp_path, sweep_dir)
    proc = subprocess.run([sys.executable, "train.py", "-m", "+experiment=weight_search", "hydra.sweeper.n_trials=3",
                           *tiny], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("trial_*/summary.json"))]
    assert len(summaries) == 3 and all(s["status"] == "completed" for s in summaries)
    for summary in summaries:  # the search space
        assert 0.01 <= summary["hparams"]["loss.box_weight"] <= 10
        assert summary["hparams"]["loss.neg_pos_ratio"] in (0, 1, 3, 7)
    best = max(summaries, key=lambda s: s["final"]["val/ap50"])  # train.py returned the last epoch's AP50
    result = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert result.best_value == pytest.approx(best["final"]["val/ap50"])
    assert result.best_params["loss.box_weight"] == pytest.approx(best["hparams"]["loss.box_weight"])
    assert result.best_params["loss.neg_pos_ratio"] == best["hparams"]["loss.neg_pos_ratio"]
    report = (sweep_dir / "report.md").read_text()
    assert "3 runs: 3 completed" in report
    assert all(f"| loss.box_weight={s['hparams']['loss.box_weight']},loss.neg_pos_ratio=" in report for s in summaries)


def test_the_objective_must_be_a_val_column(synthetic_root, tiny_config):
    with pytest.raises(ValueError, match=r"train\.objective"):
        tiny_config(synthetic_root, "train.objective=train/loss_cls")
