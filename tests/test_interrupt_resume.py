"""Interruption and resume, as a cluster needs them: SIGINT/SIGTERM end the step in progress with a
checkpoint and an ``interrupted`` record; ``resume=`` continues exactly (the metrics of an uninterrupted
run); submitit's requeue continues the job; a resume refuses overrides that change the run; a resume
with nothing to do leaves the run folder untouched."""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detlab.config import compose_config
from detlab.engine.callbacks import Callback
from detlab.engine.loggers import default_callbacks
from detlab.errors import ConfigError
from detlab.resume import SAFE_ON_RESUME, merge_overrides, override_key, resumed_config
from detlab.run_record import RunStatus, read_signals
from detlab.runtime.interrupt import Interrupted, InterruptSignals, exit_on_interrupt
from detlab.runtime.provenance import code_version

REPO = Path(__file__).resolve().parents[1]

# One tiny run (20 synthetic images at 160x128, batch 8: 2 steps per epoch, 3 epochs), the same in
# process and on the command line; `dataset.root=` is added per test session.
TINY = ["dataset.synthetic.num_images=20", "dataset.synthetic.image_width=160", "dataset.synthetic.image_height=128",
        "model.input_width=160", "model.input_height=128", "train.epochs=3", "train.batch_size=8",
        "eval.num_logged_images=0", "train.sample_grid=0"]


def tiny(root: Path, *extra: str) -> list[str]:
    return [f"dataset.root={root}", *TINY, *extra]


def metric_rows(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv without its timing columns (what must be equal between two runs)."""
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [{k: float(v) for k, v in row.items() if not k.endswith("_time_s")} for row in rows]


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# ------------------------------------------------------------------------------------ units
def test_a_signal_is_noted_and_the_previous_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with InterruptSignals() as signals:
        assert not signals.requested
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next bytecode
        assert signals.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # again: the run is ending already
        assert signals.signum == signal.SIGTERM
        stop = signals.interrupted("interrupted by SIGTERM")
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C while it ends: now, without a checkpoint
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
    assert isinstance(stop, KeyboardInterrupt) and stop.exit_code == 143

    with InterruptSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C twice
            os.kill(os.getpid(), signal.SIGINT)
    assert signals.interrupted("x").exit_code == 130


def test_an_interrupted_entry_point_prints_one_line_and_exits_128_plus_the_signal(capsys):
    with pytest.raises(SystemExit) as exited, exit_on_interrupt():
        raise Interrupted(signal.SIGTERM, "interrupted by SIGTERM after step 3; resume=x continues the run")
    assert exited.value.code == 143
    assert capsys.readouterr().err == "interrupted by SIGTERM after step 3; resume=x continues the run\n"


def test_in_a_submitit_job_its_requeue_signal_is_caught_and_handed_on_and_sigterm_is_left_to_it(monkeypatch):
    calls = []

    def submitits_requeue(signum, frame):  # stands for submitit's handler: requeue, then exit
        calls.append(signum)
        raise SystemExit(-1)

    def submitits_bypass(signum, frame):
        calls.append(("bypass", signum))

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    previous = signal.signal(signal.SIGUSR2, submitits_requeue), signal.signal(signal.SIGTERM, submitits_bypass)
    try:
        with InterruptSignals() as signals:
            os.kill(os.getpid(), signal.SIGTERM)  # submitit's: bypassed, the run goes on
            assert not signals.requested and calls == [("bypass", signal.SIGTERM)]
            os.kill(os.getpid(), signal.SIGUSR2)
            assert signals.signum == signal.SIGUSR2 and calls == [("bypass", signal.SIGTERM)]
            stop = signals.interrupted("interrupted by SIGUSR2")
        assert signal.getsignal(signal.SIGUSR2) is submitits_requeue
        with pytest.raises(SystemExit) as exited, exit_on_interrupt():
            raise stop
        assert exited.value.code == -1 and calls[-1] == signal.SIGUSR2  # submitit's exit, after its requeue
    finally:
        signal.signal(signal.SIGUSR2, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def test_overrides_are_keyed_and_merged():
    assert [override_key(o) for o in ("model=ssdlite", "+loss.box_weight=2", "~x.y", "hydra/launcher=slurm")] == [
        "model", "loss.box_weight", "x.y", "hydra.launcher"]
    assert merge_overrides(["a=1", "model=x", "b=2"], ["b=3", "model=y", "c=4"]) == ["a=1", "model=y", "b=3", "c=4"]


@pytest.fixture(scope="module")
def saved_run():
    """A run's saved config and overrides (as train.py composed them), and train.py's composition."""
    original = ["loss.box_weight=0.5", "train.epochs=4", "model.input_width=160", "model.input_height=128"]
    return compose_config(overrides=original), original, lambda overrides: compose_config(overrides=overrides)


def test_a_resume_refuses_a_group_override_that_changes_the_run_naming_it(saved_run):
    saved, original, compose = saved_run
    with pytest.raises(ConfigError) as refused:
        resumed_config(saved, compose, original, ["resume=outputs/run", "model=ssdlite"], what="outputs/run")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("config error: resume=outputs/run: model=ssdlite would change")
    assert "model.name: 'ssd_slim' -> 'ssdlite'" in message and "train.epochs (not fewer)" in message
    with pytest.raises(ConfigError, match=r"loss.box_weight=2 would change the run \(loss.box_weight: 0.5 -> 2.0\)"):
        resumed_config(saved, compose, original, ["loss.box_weight=2"], what="true")
    with pytest.raises(ConfigError, match=r"\+preset=paper would change the run .*optim.name: 'adamw' -> 'sgd'"):
        resumed_config(saved, compose, original, ["+preset=paper"], what="true")
    with pytest.raises(ConfigError, match=r"train.epochs=2 would change the run \(train.epochs: 4 -> 2\)"):
        resumed_config(saved, compose, original, ["train.epochs=2"], what="true")


def test_a_resume_takes_the_safe_overrides_and_those_that_change_nothing(saved_run):
    saved, original, compose = saved_run
    given = ["train.epochs=6", "train.device=cpu", "dataset.num_workers=2", "loss.box_weight=0.5", "resume=true"]
    cfg, overrides = resumed_config(saved, compose, original, given, what="true")
    assert (cfg.train.epochs, cfg.train.device, cfg.dataset.num_workers) == (6, "cpu", 2)
    assert cfg.loss.box_weight == 0.5 and cfg.model.input_width == 160 and saved.train.epochs == 4
    assert overrides == ["loss.box_weight=0.5", "train.epochs=6", "model.input_width=160", "model.input_height=128",
                         "train.device=cpu", "dataset.num_workers=2"]
    assert resumed_config(saved, compose, original, ["resume=true"], what="true") == (saved, original)
    assert {"train.epochs", "train.device", "train.torch_threads", "dataset.num_workers", "hydra"} <= set(SAFE_ON_RESUME)


def test_the_skipping_batch_sampler_keeps_the_loaders_order_and_skips_without_loading():
    from detlab.data.loader import build_loader

    class Indices(torch.utils.data.Dataset):
        def __init__(self):
            self.read = []

        def __len__(self):
            return 10

        def __getitem__(self, i):
            self.read.append(i)
            return torch.zeros(3, 2, 2), {"i": i}

    def order(loader):
        return [[t["i"] for t in targets] for _, targets in loader]

    data = Indices()
    plain, skippable = (build_loader(data, 3, shuffle=True, num_workers=0, seed=5, drop_last=True, skippable=s)
                        for s in (False, True))
    first = order(plain)
    assert order(skippable) == first and len(skippable) == 3
    skippable.generator.manual_seed(5)  # the epoch's start again (as TrainingData.start_epoch does)
    skippable.batch_sampler.skip_next(2)
    data.read.clear()
    assert order(skippable) == first[2:] and sorted(data.read) == sorted(first[2])  # the skipped ones not read
    assert len(order(skippable)) == 3  # the next pass is whole again


def test_generator_states_survive_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from detlab.runtime.checkpoint import load_checkpoint, save_checkpoint
    from detlab.runtime.seeding import rng_state, set_rng_state

    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    drawn = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == drawn


def test_the_sweep_report_counts_and_colours_interrupted_runs(tmp_path, make_fake_run):
    from detlab.analysis import STATUS_COLORS, count_statuses, load_sweep

    assert set(STATUS_COLORS) >= {s for s in RunStatus if s is not RunStatus.UNKNOWN}
    make_fake_run(tmp_path / "s" / "a", 1.0, epochs=2)
    assert "interrupted" not in count_statuses(load_sweep(tmp_path / "s"))  # counted when a run has it
    make_fake_run(tmp_path / "s" / "b", 2.0, status="interrupted", epochs=1, epochs_planned=2)
    assert count_statuses(load_sweep(tmp_path / "s")) == {"completed": 1, "diverged": 0, "failed": 0, "stopped": 0,
                                                          "running": 0, "interrupted": 1}


def test_a_requeued_submitit_job_continues_its_interrupted_run(tmp_path, monkeypatch, make_fake_run):
    from detlab.cli.train import requeued_job

    run = make_fake_run(tmp_path / "run", 1.0, status="interrupted", epochs=1, epochs_planned=3)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert not requeued_job(run, False)  # not a submitit job
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert not requeued_job(run, False)  # no checkpoint to continue from
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    assert requeued_job(run, False) and not requeued_job(run, "true")  # resume=true resumes anyway
    killed = make_fake_run(tmp_path / "killed", 1.0, status="running", epochs=1, epochs_planned=3)
    (killed / "checkpoints").mkdir()
    (killed / "checkpoints" / "last.pt").write_bytes(b"")
    assert not requeued_job(killed, False)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM requeued it: killed before it could record
    assert requeued_job(killed, False)


def test_a_fresh_run_never_replaces_one_interrupted_in_its_first_epoch(tmp_path):
    from detlab.engine.run_state import RunExistsError, resume_checkpoint
    from detlab.run_record import RunPaths

    first_epoch = {"status": "interrupted", "epochs": 0, "step": 1}
    with pytest.raises(RunExistsError, match="resume=true continues it"):
        resume_checkpoint(False, RunPaths(tmp_path), first_epoch, torch.device("cpu"))
    assert resume_checkpoint(False, RunPaths(tmp_path), {"status": "failed", "epochs": 0, "step": 0},
                             torch.device("cpu")) is None  # nothing trained: a fresh run may start


# ------------------------------------------------------------------------------------- runs
class SignalAt(Callback):
    """Sends this process ``signum`` after step ``step`` (0-based) or at the end of epoch ``epoch``: a
    signal arriving at a known point, through the Trainer's public callbacks."""

    def __init__(self, signum: int, step: int | None = None, epoch: int | None = None) -> None:
        self.signum, self.step, self.epoch = signum, step, epoch

    def on_step_end(self, trainer, step, record, signals) -> None:
        if step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_epoch_end(self, trainer, row) -> None:
        if row["epoch"] == self.epoch:
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def straight(synthetic_root, tmp_path_factory) -> Path:
    """The uninterrupted 3-epoch tiny run every interrupted one must end as."""
    from detlab.engine.trainer import train

    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert train(compose_config(overrides=tiny(synthetic_root)), run_dir)["status"] == "completed"
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mid-epoch", "epoch end"])
def test_a_run_interrupted_by_sigterm_and_resumed_ends_as_the_uninterrupted_run(where, straight, synthetic_root,
                                                                               tmp_path):
    from detlab.engine.trainer import train

    run_dir = tmp_path / "run"
    cfg = compose_config(overrides=tiny(synthetic_root))
    # mid-epoch: after step 2 (0-based), the first of epoch 2's two; epoch end: while epoch 1 is recorded.
    at = SignalAt(signal.SIGTERM, step=2) if where == "mid-epoch" else SignalAt(signal.SIGTERM, epoch=1)
    with pytest.raises(Interrupted) as stopped:
        train(cfg, run_dir, callbacks=[*default_callbacks(cfg), at])
    assert stopped.value.exit_code == 143 and stopped.value.signum == signal.SIGTERM
    interrupted = record(run_dir)
    assert interrupted["status"] == "interrupted" and interrupted["message"] == stopped.value.message
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    if where == "mid-epoch":
        assert (interrupted["step"], interrupted["epochs"]) == (3, 1)
        assert stopped.value.message.startswith("interrupted by SIGTERM after step 3 (epoch 2, batch 1 of 2);")
        assert last["step"] == 3 and last["progress"]["epoch"] == 2 and last["progress"]["batches"] == 1
    else:
        assert (interrupted["step"], interrupted["epochs"]) == (2, 1)
        assert stopped.value.message.startswith("interrupted by SIGTERM after epoch 1 (step 2);")
        assert last["step"] == 2 and "progress" not in last
    assert f"resume={run_dir} continues the run" in stopped.value.message

    resumed = train(compose_config(overrides=tiny(synthetic_root, "resume=true")), run_dir)
    assert resumed["status"] == "completed" and resumed["step"] == record(straight)["step"] == 6
    assert metric_rows(run_dir) == metric_rows(straight)  # exactly: same batches, draws and updates
    assert resumed["stages"] == record(straight)["stages"]
    assert read_signals(run_dir) == read_signals(straight)  # every step's signals once, as uninterrupted
    assert resumed["code"] == interrupted["code"] == [code_version()]  # one entry: both sessions ran this code


@pytest.mark.slow
def test_sigterm_to_train_py_exits_143_with_one_line_and_resume_finishes_the_run(straight, synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "train.py", f"run_dir={run_dir}", *tiny(synthetic_root), f"hydra.run.dir={tmp_path / 'h'}"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "metrics.csv").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # epoch 1 is recorded; epochs 2 and 3 are to come
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and err.rstrip("\n").splitlines()[-1] == lines[0], err[-3000:]
    assert lines[0].startswith("interrupted by SIGTERM after ") and lines[0].endswith(
        f"checkpoints/last.pt saved: resume={run_dir} continues the run")
    assert record(run_dir)["status"] == "interrupted" and (run_dir / "checkpoints" / "last.pt").is_file()

    again = subprocess.run([sys.executable, "train.py", f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'h2'}"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert record(run_dir)["status"] == "completed"
    assert metric_rows(run_dir) == metric_rows(straight)


@pytest.mark.slow
def test_a_refused_resume_and_a_resume_with_nothing_to_do_leave_the_run_as_it_was(straight, tmp_path):
    files = [straight / "summary.json", straight / "metrics.csv", straight / "signals.json.gz",
             *sorted((straight / "checkpoints").iterdir())]
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
    refused = subprocess.run([sys.executable, "train.py", f"resume={straight}", "model=ssdlite",
                              f"hydra.run.dir={tmp_path / 'h'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"resume={straight}: model=ssdlite would change the run (" in lines[0]
    assert "model.name: 'ssd_slim' -> 'ssdlite'" in lines[0]

    done = subprocess.run([sys.executable, "train.py", f"resume={straight}", "train.device=cpu",
                           f"hydra.run.dir={tmp_path / 'h2'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run already complete (3 epochs); nothing to do" in done.stdout + done.stderr
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files} == before


@pytest.mark.slow
def test_a_submitit_job_preempted_mid_run_requeues_itself_and_ends_as_the_uninterrupted_run(straight, synthetic_root,
                                                                                              tmp_path):
    """Hydra's submitit launcher with submitit's local executor: its preemption signal (SIGUSR2) sent to
    the job's process while it trains; submitit requeues the job (the local executor starts it again),
    which continues its run."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", *tiny(synthetic_root),
                             f"hydra.sweep.dir={sweep_dir}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not glob.glob(str(sweep_dir / "0_*" / "metrics.csv")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run_dir = Path(glob.glob(str(sweep_dir / "0_*" / "metrics.csv"))[0]).parent
    os.kill(int((run_dir / ".lock").read_text()), signal.SIGUSR2)  # the job's process holds the run's lock
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "1 runs: 1 completed" in out
    logs = "".join(Path(p).read_text() for p in glob.glob(str(sweep_dir / ".submitit" / "*" / "*_log.*")))
    assert "interrupted by SIGUSR2 after " in logs and "this job is preempted" in logs
    assert "requeued job: continuing the interrupted run" in logs and "resumed from" in logs
    assert record(run_dir)["status"] == "completed"
    assert metric_rows(run_dir) == metric_rows(straight)
