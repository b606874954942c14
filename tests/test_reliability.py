"""Faults and user errors: one clear line and exit 2, no lost run, no shared or half-written run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detlab.config import compose_config
from detlab.errors import ConfigError
from detlab.engine.callbacks import Callback
from detlab.runtime.checkpoint import CheckpointError, all_finite, load_checkpoint, load_weights, save_checkpoint
from detlab.runtime.fileio import LockedError, exclusive_lock
from detlab.model import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["dataset.synthetic.num_images=20", "dataset.synthetic.image_width=160", "dataset.synthetic.image_height=128",
        "model.input_width=160", "model.input_height=128", "train.epochs=1", "train.batch_size=8",
        "eval.num_logged_images=0"]


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


# ------------------------------------------------------------------------------------------- units
def test_unknown_key_added_with_plus_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"loss\.box_wieght: unknown key .*did you mean loss\.box_weight\?"):
        compose_config(REPO / "configs", ["+loss.box_wieght=0.5"])


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "config": {}})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: cannot be loaded; it is truncated"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_weights_that_do_not_fit_the_config_give_one_line():
    from detlab.config import ModelConfig

    small = build_model(ModelConfig(input_width=96, input_height=64, width_mult=0.5))
    full = build_model(ModelConfig(input_width=96, input_height=64))
    with pytest.raises(CheckpointError) as caught:
        load_weights(full, small.state_dict(), "checkpoint x.pt")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("checkpoint x.pt: the weights do not fit")
    assert "tensor(s) of another shape, e.g. backbone." in message and "width_mult 1.0" in message
    load_weights(small, small.state_dict(), "same")  # a fitting state dict loads


def test_all_finite():
    assert all_finite({"a": torch.ones(3), "n": torch.tensor([1, 2])})
    assert not all_finite({"a": torch.tensor([1.0, float("nan")])})


@pytest.mark.slow
def test_lock_refuses_a_second_holder_with_its_pid(tmp_path):
    lock = tmp_path / "run" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from detlab.runtime.fileio import exclusive_lock\n"
        f"with exclusive_lock({str(lock)!r}, 'x'):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"run directory .* is in use by another process \\(pid {holder.pid};"):
            with exclusive_lock(lock, f"run directory {lock.parent}"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, "x"):  # released when its holder died (kill -9 included)
        pass


# --------------------------------------------------------------------------------- entry points
@pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    (["loss.box_weight=-1"], "error: config error: loss.box_weight=-1.0: must be >= 0"),
    (["+loss.box_wieght=0.5"], "did you mean loss.box_weight?"),
    (["dataset=widerface", "dataset.root=/nonexistent/wider"], "dataset.root=/nonexistent/wider: no such folder; WIDER FACE"),
])
def test_train_user_errors_are_one_line_and_exit_2(tmp_path, args, expected):
    proc = run_cli("train.py", f"run_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'h'}", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    record = tmp_path / "run" / "summary.json"
    if args[0].startswith("dataset="):  # the run had started: its record says why it failed
        assert json.loads(record.read_text())["status"] == "failed"
    else:
        assert not record.exists()  # a bad config value fails before anything is written


@pytest.mark.slow
def test_debug_switch_shows_the_traceback(tmp_path):
    proc = run_cli("train.py", f"run_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'h'}", "loss.box_weight=-1",
                   env={"DETLAB_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


@pytest.mark.slow
def test_evaluate_checkpoint_with_a_config_that_does_not_fit_its_weights(tmp_path):
    from omegaconf import OmegaConf

    from detlab.config import Config

    cfg = Config()
    cfg.model.input_width, cfg.model.input_height = 96, 64
    weights = build_model(cfg.model).state_dict()
    cfg.model.width_mult = 0.5  # the config says another network than the weights
    path = tmp_path / "edited.pt"
    torch.save({"model": weights, "config": OmegaConf.to_container(OmegaConf.structured(cfg))}, path)
    proc = run_cli("evaluate.py", f"checkpoint={path}", f"hydra.run.dir={tmp_path / 'h'}")
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "the weights do not fit the model its config describes" in lines[0]
    assert "size mismatch" not in proc.stderr


# ------------------------------------------------------------------------------------------- runs
@pytest.fixture
def completed_run(tmp_path, synthetic_root, tiny_config):
    from detlab.engine.trainer import train

    run_dir = tmp_path / "run"
    summary = train(tiny_config(synthetic_root, "eval.num_logged_images=0"), run_dir)
    assert summary["status"] == "completed"
    return run_dir


@pytest.mark.slow
def test_a_failed_resume_never_overwrites_a_completed_run(completed_run, synthetic_root, tiny_config):
    from detlab.engine.run_state import RunExistsError
    from detlab.engine.trainer import train

    record = (completed_run / "summary.json").read_bytes()
    metrics = (completed_run / "metrics.csv").read_bytes()
    last = completed_run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="last.pt: cannot be loaded; it is truncated"):
        train(tiny_config(synthetic_root, "resume=true", "train.epochs=2"), completed_run)
    last.unlink()  # missing
    with pytest.raises(CheckpointError, match="holds a run \\(completed, 1 epochs\\) but no .*last.pt"):
        train(tiny_config(synthetic_root, "resume=true", "train.epochs=2"), completed_run)
    with pytest.raises(RunExistsError, match="resume=true continues it"):
        train(tiny_config(synthetic_root), completed_run)  # a fresh run into it
    assert (completed_run / "summary.json").read_bytes() == record
    assert (completed_run / "metrics.csv").read_bytes() == metrics


@pytest.mark.slow
def test_a_second_writer_exits_2_and_writes_nothing(tmp_path, synthetic_root):
    run_dir = tmp_path / "run"
    with exclusive_lock(run_dir / ".lock", "test holder"):
        proc = run_cli("train.py", f"run_dir={run_dir}", f"dataset.root={synthetic_root}", *TINY,
                       f"hydra.run.dir={tmp_path / 'h'}")
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and f"run directory {run_dir} is in use by another process (pid {os.getpid()};" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


@pytest.mark.slow
def test_resume_removes_temporaries_of_an_interrupted_write(completed_run, synthetic_root, tiny_config):
    from detlab.engine.trainer import train

    stale = completed_run / "checkpoints" / ".last.pt.x1y2.tmp"
    stale.write_bytes(b"half a checkpoint")
    summary = train(tiny_config(synthetic_root, "resume=true", "train.epochs=2"), completed_run)
    assert summary["status"] == "completed" and summary["epochs"] == 2
    assert not stale.exists()


class PoisonAfterEpochTrained(Callback):
    """NaN weights after the last step of epoch ``epoch``, before it is validated and checkpointed."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_step_end(self, trainer, step, record, signals) -> None:
        if step == self.epoch * trainer.steps_per_epoch - 1:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))


@pytest.mark.slow
def test_non_finite_weights_never_replace_last_pt(tmp_path, synthetic_root, tiny_config):
    from detlab.engine.loggers import default_callbacks
    from detlab.engine.trainer import train

    cfg = tiny_config(synthetic_root, "train.epochs=2")
    summary = train(cfg, tmp_path / "run", callbacks=[*default_callbacks(cfg), PoisonAfterEpochTrained(epoch=2)])
    assert "the weights are not finite; last.pt keeps the last finite ones" in summary["message"]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and all_finite(checkpoint["model"])


@pytest.mark.slow
def test_sweep_records_an_invalid_value_as_failed_and_never_shares_a_folder(tmp_path):
    sweep_dir = tmp_path / "sweep"
    roots = f"{tmp_path / 'a'},{tmp_path / 'b'}"
    proc = run_cli("train.py", "-m", "loss.box_weight=-1,1", f"dataset.root={roots}", *TINY,
                   f"hydra.sweep.dir={sweep_dir}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 runs: 2 completed, 0 diverged, 2 failed" in proc.stdout
    records = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}
    assert len(records) == 4  # four folders: dataset.root (left out of the names) cannot merge two runs
    failed = [r for r in records.values() if r["status"] == "failed"]
    assert len(failed) == 2 and all("loss.box_weight=-1.0: must be >= 0" in r["message"] for r in failed)
    roots_trained = {r["hparams"]["dataset.root"] for r in records.values() if r["status"] == "completed"}
    assert roots_trained == {str(tmp_path / "a"), str(tmp_path / "b")}


@pytest.mark.slow
def test_a_run_whose_training_images_are_all_unreadable_fails_clearly(tmp_path, tiny_config):
    from detlab.data import BadImageError
    from detlab.engine.trainer import train

    cfg = tiny_config(tmp_path / "synthetic", "dataset.on_bad_image=skip")
    from detlab.data import ensure_synthetic_dataset

    root = ensure_synthetic_dataset(cfg.dataset.root, cfg.dataset.synthetic)
    for image in (Path(root) / "WIDER_train" / "images").rglob("*.jpg"):
        image.write_bytes(image.read_bytes()[:300])  # truncated: skipped, so every batch is empty
    with pytest.raises(BadImageError, match="epoch 1: no readable training image: all 16 were skipped"):
        train(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_report_user_errors_one_line_exit_2_and_debug_switch(capsys, monkeypatch):
    from detlab.errors import UserError, report_user_errors

    monkeypatch.delenv("DETLAB_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        with report_user_errors():
            raise UserError("bad thing\n  on two lines")
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: bad thing on two lines\n"
    with pytest.raises(SystemExit):
        with report_user_errors():
            raise PermissionError(13, "Permission denied", "/root/run")
    assert capsys.readouterr().err == "error: [Errno 13] Permission denied: '/root/run'\n"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        with report_user_errors():
            raise KeyError("x")
    monkeypatch.setenv("DETLAB_DEBUG", "1")
    with pytest.raises(UserError):
        with report_user_errors():
            raise UserError("shown with its traceback")
