"""The ``detlab`` command (``detlab.cli``): the dispatcher, each subcommand's ``--help`` (in process), and one
tiny real call per subcommand through ``python -m detlab.cli`` (what the console script runs)."""

from __future__ import annotations

import importlib
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import detlab.cli
from detlab.cli import SUBCOMMANDS

from conftest import tiny_sweep_overrides, untrained_checkpoint_with_photos

REPO = Path(__file__).resolve().parents[1]

# What each subcommand's --help shows that the others' do not.
HELP = {
    "train": ("train is powered by Hydra", "box_weight:"),
    "evaluate": ("evaluate is powered by Hydra", "protocol: detection"),
    "predict": ("predict is powered by Hydra", "source: ???"),
    "export": ("export is powered by Hydra", "opset: 17"),
    "report": ("usage: detlab report", "sweep_dir"),
    "diagnose": ("usage: detlab diagnose", "RUN_DIR_OR_FILE"),
}
# The top-level scripts that run the same commands.
SCRIPTS = {"train": "train.py", "evaluate": "evaluate.py", "predict": "predict.py", "export": "scripts/export.py",
           "report": "scripts/sweep_report.py", "diagnose": "scripts/diagnose.py"}
HYDRA_COMMANDS = ("train", "evaluate", "predict", "export")


def detlab_command(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    """``detlab ARGS`` in a subprocess, as ``python -m detlab.cli ARGS`` (the console script's code)."""
    return subprocess.run([sys.executable, "-m", "detlab.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_detlab_help_lists_each_command_on_one_line(capsys):
    assert detlab.cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "evaluate", "predict", "export", "report", "diagnose"):
        assert len([line for line in out.splitlines() if re.match(rf"\s+{name}\s+\S", line)]) == 1, out


@pytest.mark.parametrize("argv", [["bogus"], ["trian", "loss.box_weight=0.05"], []])
def test_an_unknown_or_missing_command_is_one_line_and_exit_2(argv, capsys):
    assert detlab.cli.main(argv) == 2
    err = capsys.readouterr().err
    if argv:
        assert err.count("\n") == 1 and err.startswith(f"error: unknown command {argv[0]!r}; choose from train, ")
    else:
        assert err.startswith("usage: detlab <command>")


@pytest.mark.parametrize("name", sorted(HELP))
def test_each_commands_help_exits_0_and_shows_its_own_options(name, capsys):
    assert detlab.cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert all(text in out for text in HELP[name]), out[:2000]
    others = [text for other, texts in HELP.items() if other != name for text in texts[:1]]
    assert not any(text in out for text in others)


@pytest.mark.slow  # a Hydra app each (about 3 s): the same help the dispatcher test reads
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_the_scripts_run_the_same_commands(name, capsys, monkeypatch):
    """``python train.py --help`` (and the other scripts) run the package's command."""
    monkeypatch.setattr(sys, "argv", [SCRIPTS[name], "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / SCRIPTS[name]), run_name="__main__")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    expected = [text.replace("usage: detlab report", "usage: sweep_report.py").replace("usage: detlab diagnose",
                                                                                         "usage: diagnose.py")
                for text in HELP[name]]
    assert all(text in out for text in expected), out[:2000]


def test_the_console_script_is_the_dispatcher():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["detlab"].partition(":")
    assert getattr(importlib.import_module(module), function) is detlab.cli.main


def test_every_command_is_a_module_with_main():
    for name, (module, summary) in SUBCOMMANDS.items():
        assert summary and "\n" not in summary
        assert callable(detlab.cli.subcommand(name))
        assert module == f"detlab.cli.{name}"


def test_diagnose_reads_a_recorded_run(capsys):
    """``detlab diagnose`` on a recorded run (the frozen-backbone replay fixture) names its failure."""
    assert detlab.cli.main(["diagnose", str(REPO / "tests" / "data" / "replay_frozen_backbone")]) == 0
    out = capsys.readouterr().out
    assert "dead" in out.lower() and "no failure found" not in out


@pytest.mark.parametrize("name", HYDRA_COMMANDS)
def test_hydra_jobs_keep_the_scripts_names_and_configs(name, capsys):
    """Hydra's job name (the log file's name) is the script's, and the configs are ``config_dir()``'s."""
    from detlab.paths import config_dir

    assert detlab.cli.main([name, "--cfg", "hydra"]) == 0
    hydra = capsys.readouterr().out
    assert re.search(rf"^  job:\n    name: {name}$", hydra, re.MULTILINE), hydra[:3000]
    assert f"- path: {config_dir()}\n      schema: file\n      provider: main\n" in hydra


def test_overrides_and_hydra_flags_reach_hydra(capsys):
    assert detlab.cli.main(["train", "--cfg", "job", "loss.box_weight=0.05", "model=ssdlite"]) == 0
    job = capsys.readouterr().out
    assert "box_weight: 0.05" in job and "name: ssdlite" in job and "hydra:" not in job
    assert detlab.cli.main(["train", "--cfg", "job", "no_such_key=1"]) == 1  # Hydra's own error and status
    assert "no_such_key" in capsys.readouterr().err


def test_without_configs_a_hydra_command_is_one_line_and_exit_2(monkeypatch, capsys):
    from detlab import paths

    def missing():
        raise paths.MissingConfigsError("no configs/config.yaml in /nowhere; reinstall detlab")

    monkeypatch.setattr(paths, "config_dir", missing)
    assert detlab.cli.main(["evaluate", "checkpoint=x.pt"]) == 2
    assert capsys.readouterr().err == "error: no configs/config.yaml in /nowhere; reinstall detlab\n"


# One tiny real call per command. --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``detlab train -m``: two one-epoch tiny runs (20 synthetic images at 160x128)."""
    tmp = tmp_path_factory.mktemp("cli_sweep")
    sweep_dir = tmp / "sweep"
    proc = detlab_command("train", "-m", "loss.box_weight=0.5,2", *tiny_sweep_overrides(tmp, sweep_dir, epochs=1))
    return sweep_dir, proc


@pytest.mark.slow
def test_detlab_train_sweeps_and_resumes(sweep, tmp_path):
    sweep_dir, proc = sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 runs: 2 completed" in proc.stdout  # the sweep's Hydra callback
    runs = sorted(p.parent for p in sweep_dir.glob("*/summary.json"))
    assert [json.loads((r / "summary.json").read_text())["status"] for r in runs] == ["completed"] * 2
    assert all((r / "train.log").is_file() and "loss.box_weight=" in r.name for r in runs)
    again = detlab_command("train", f"resume='{runs[0]}'", f"hydra.run.dir={tmp_path / 'h'}")  # '=' in the name
    assert again.returncode == 0, again.stderr[-3000:]
    assert "run already complete (1 epochs); nothing to do" in again.stdout + again.stderr


@pytest.mark.slow
def test_detlab_report_writes_the_sweeps_report(sweep, tmp_path):
    sweep_dir, _ = sweep
    proc = detlab_command("report", str(sweep_dir), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("2 runs: 2 completed") and "| loss.box_weight=2 |" in proc.stdout
    assert all((tmp_path / name).is_file() for name in ("report.md", "report.csv", "report.png"))
    missing = detlab_command("report", str(tmp_path / "missing"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: sweep directory not found")


@pytest.mark.slow
def test_detlab_train_user_errors_and_sigterm_keep_their_exit_codes(synthetic_root, tmp_path):
    bad = detlab_command("train", "loss.box_weight=-1", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert [line for line in bad.stderr.splitlines() if "error" in line] == [
        "error: config error: loss.box_weight=-1.0: must be >= 0"]

    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", f"dataset.root={synthetic_root}", "dataset.synthetic.num_images=20",
            "dataset.synthetic.image_width=160", "dataset.synthetic.image_height=128", "model.input_width=160",
            "model.input_height=128", "train.epochs=20", "train.batch_size=8", "eval.num_logged_images=0",
            "train.sample_grid=0", f"hydra.run.dir={tmp_path / 'h'}"]
    proc = subprocess.Popen([sys.executable, "-m", "detlab.cli", "train", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "metrics.csv").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # epoch 1 is recorded, 19 to come
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM after ") and last.endswith(f"resume={run_dir} continues the run")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert (tmp_path / "h" / "train.log").is_file()  # Hydra's job name is train, as with train.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """An untrained ssd_slim checkpoint (160x128) of a 12-image synthetic set, and a folder of two images."""
    return untrained_checkpoint_with_photos(tmp_path_factory.mktemp("cli_checkpoint"), photos=2)


@pytest.mark.slow
def test_detlab_evaluate_scores_a_checkpoint(checkpoint, tmp_path):
    path, _ = checkpoint
    proc = detlab_command("evaluate", f"checkpoint={path}", "split=val", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"miou", "tp", "fp", "fn", "ap50"} <= set(result)
    assert json.loads((tmp_path / "metrics.json").read_text()) == result
    assert (tmp_path / "evaluate.log").is_file()


@pytest.mark.slow
def test_detlab_predict_writes_predictions(checkpoint, tmp_path):
    path, photos = checkpoint
    proc = detlab_command("predict", f"checkpoint={path}", f"source={photos}", f"out={tmp_path}",
                          "eval.score_threshold=0.0", "eval.max_detections=3", f"hydra.run.dir={tmp_path / 'h'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == 2 and result["faces"] == 6
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert sorted(predictions) == sorted(p.name for p in photos.iterdir())
    assert len(list((tmp_path / "images").iterdir())) == 2 and (tmp_path / "h" / "predict.log").is_file()


@pytest.mark.slow
def test_detlab_export_writes_a_checked_export(checkpoint, tmp_path):
    path, _ = checkpoint
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    proc = detlab_command("export", f"checkpoint={path}", f"out={out}", "input_size=[160,128]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["out"] == str(out) and out.is_file()
    assert not os.path.exists(path.with_suffix(".onnx"))  # out= was followed
