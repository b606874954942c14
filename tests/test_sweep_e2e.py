"""A two-run multirun in which one run diverges: both summaries, a report marking it, a clean exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_sweep_overrides

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_multirun_survives_a_diverging_run_and_reports_it(tmp_path):
    sweep_dir = tmp_path / "sweep"
    tiny = tiny_sweep_overrides(tmp_path, sweep_dir)
    sweep = subprocess.run(
        [sys.executable, "train.py", "-m", "optim.lr=0.01,1e12", *tiny],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "2 runs: 1 completed, 1 diverged, 0 failed" in sweep.stdout
    # the sweep writes its own report when it ends
    assert f"Report: {sweep_dir / 'report.md'}" in sweep.stdout
    assert "DIVERGED" in (sweep_dir / "report.md").read_text()
    (sweep_dir / "report.md").unlink()

    summaries = {json.loads(p.read_text())["hparams"]["optim.lr"]: json.loads(p.read_text())
                 for p in sweep_dir.rglob("summary.json")}
    # Run folders are named by their overrides (paths such as dataset.root excluded).
    assert all("optim.lr=" in p.parent.name for p in sweep_dir.rglob("summary.json"))
    assert summaries[0.01]["status"] == "completed"
    diverged = summaries[1e12]
    assert diverged["status"] == "diverged" and diverged["step"] >= 0 and "non-finite" in diverged["message"]

    report = subprocess.run([sys.executable, "scripts/sweep_report.py", str(sweep_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    markdown = (sweep_dir / "report.md").read_text()
    assert "DIVERGED" in markdown
    # Runs are named by what sets them apart, not by the overrides every run shares.
    assert "| optim.lr=0.01 |" in markdown and "| optim.lr=1000000000000.0 |" in markdown
    assert (sweep_dir / "report.csv").read_text().count("\n") == 3  # header + two runs
    assert (sweep_dir / "report.png").stat().st_size > 10_000


def test_a_sweep_through_submitits_local_executor_completes_and_is_reported(tmp_path):
    """The SLURM launcher's path without a cluster: Hydra's submitit launcher, local executor."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    tiny = tiny_sweep_overrides(tmp_path, sweep_dir, epochs=1)
    sweep = subprocess.run([sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "loss.box_weight=0.5,2",
                            *tiny], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "2 runs: 2 completed" in sweep.stdout
    weights = sorted(json.loads(p.read_text())["hparams"]["loss.box_weight"] for p in sweep_dir.rglob("summary.json"))
    assert weights == [0.5, 2.0]
    assert list(sweep_dir.rglob(".submitit"))  # the jobs went through submitit
