"""torchrun --nproc_per_node=N train.py: DistributedDataParallel over gloo on the CPU.

Two processes with 4 images each must train like one process with 8: the same global batches
(DistributedSampler's order does not depend on the process count), the criterion normalising over
all ranks, DDP averaging the gradients. What remains is float summation order and the ties hard
negative mining breaks differently when the per-process batch is smaller (equal losses of anchors
over identical padding), hence the tolerances below. BatchNorm and augmentation are off here:
on the CPU each process normalises its own half batch (PyTorch's SyncBatchNorm needs CUDA), and
each process augments with its own random stream.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detlab.errors import ConfigError
from detlab.runtime import distributed

REPO = Path(__file__).resolve().parents[1]


def _tiny(tmp_path: Path, epochs: int) -> list[str]:
    return [f"dataset.root={tmp_path / 'synthetic'}", "dataset.synthetic.num_images=40",
            "dataset.synthetic.image_width=160", "dataset.synthetic.image_height=128", "model.input_width=160",
            "model.input_height=128", f"train.epochs={epochs}", "train.batch_size=8", "train.log_every=1",
            "eval.num_logged_images=1", "train.sample_grid=0", "model.batch_norm=false", "train.cpu_bf16=false",
            "dataset.augment.random_crop=false", "dataset.augment.hflip=false", "dataset.augment.photometric=false",
            # A constant learning rate: a 1-epoch run continued to 2 epochs follows the 2-epoch run's schedule.
            "schedule=constant", f"hydra.run.dir={tmp_path / 'hydra'}"]


def torchrun(nproc: int, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """2-epoch runs with 1 and with 2 processes, and a 2-process run of 1 epoch continued to 2 with
    ``resume=true`` (under torchrun, from its checkpoint)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    folders = {}
    for name, nproc, epochs, extra in (("one", 1, 2, ()), ("two", 2, 2, ()), ("resumed", 2, 1, ()),
                                       ("resumed", 2, 2, ("resume=true",))):
        folders[name] = tmp_path / name
        proc = torchrun(nproc, *_tiny(tmp_path, epochs), f"run_dir={folders[name]}", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr + proc.stdout
    return folders


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    one, two = (json.loads((runs[k] / "summary.json").read_text()) for k in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["status"] == two["status"] == "completed"
    # Step 0, before any update: the same 8 images, so the same loss and positives to float precision.
    for tag in ("train/loss_total", "train/num_pos", "train/face_coverage"):
        assert scalars(runs["two"], tag)[0] == pytest.approx(scalars(runs["one"], tag)[0], rel=1e-6), tag
    # The gradients: DDP averages the ranks' (a sum would double the norm; Adam alone would hide it),
    # and the diagnosis's box-to-class ratio, combined over the ranks; mining ties move them by < 1%.
    for tag in ("train/grad_norm", "diagnosis/grad_norm_ratio_box_to_cls"):
        assert scalars(runs["two"], tag)[0] == pytest.approx(scalars(runs["one"], tag)[0], rel=0.01), tag
    # Both epochs: train and val losses within 0.5% (measured: at most 0.2%). Two epochs on 40 images
    # teach no detection yet (AP50 about 0.002 in both, decided by a few near-tied scores), so the two
    # runs' metrics are not compared; the next test checks that rank 0's validation scores exactly as
    # one process does.
    history = {k: [line.split(",") for line in (runs[k] / "metrics.csv").read_text().splitlines()] for k in runs}
    header = history["one"][0]
    for key in ("train/loss_total", "train/loss_cls", "train/loss_box", "val/loss_total", "val/loss_cls"):
        col = header.index(key)
        for row_one, row_two in zip(history["one"][1:], history["two"][1:]):
            assert float(row_two[col]) == pytest.approx(float(row_one[col]), rel=5e-3), key


@pytest.mark.slow
def test_only_rank_zero_writes_and_a_resumed_run_replays_its_batches(runs):
    two, resumed = runs["two"], runs["resumed"]
    assert len(list(two.glob("events.out.tfevents.*"))) == 1  # one TensorBoard writer
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert len((two / "metrics.csv").read_text().splitlines()) == 3  # header and 2 epochs, written once each
    # The 1-epoch run resumed under torchrun ends where the uninterrupted 2-epoch run ends.
    a, b = (json.loads((d / "summary.json").read_text()) for d in (two, resumed))
    assert b["status"] == "completed" and b["epochs"] == 2
    for key in ("train/loss_total", "val/loss_total", "val/ap50"):
        assert b["final"][key] == pytest.approx(a["final"][key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_rank_zero_validation_scores_as_one_process_does(runs):
    from detlab.config import EvaluateConfig
    from detlab.evaluation import evaluate_checkpoint

    recorded = json.loads((runs["two"] / "summary.json").read_text())["final"]
    rescored = evaluate_checkpoint(EvaluateConfig(checkpoint=str(runs["two"] / "checkpoints" / "last.pt"),
                                                  device="cpu"))
    for key in ("ap50", "tp", "fp", "fn", "miou"):
        assert rescored[key] == pytest.approx(recorded[f"val/{key}"], rel=1e-6, abs=1e-9), key


def test_a_batch_that_does_not_split_over_the_processes_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"train.batch_size=8 does not split over the 3"):
        distributed.init_from_environment("gloo", "cpu", batch_size=8)
    assert not distributed.is_initialized()


def test_nccl_needs_cuda():
    assert distributed.choose_backend("auto", "cpu") == "gloo"
    assert distributed.choose_backend("gloo", "cpu") == "gloo"
    with pytest.raises(ConfigError, match="train.dist_backend=nccl needs CUDA"):
        distributed.choose_backend("nccl", "cpu")


def test_without_torchrun_the_helpers_are_single_process(monkeypatch):
    import torch

    monkeypatch.delenv("RANK", raising=False)
    assert not distributed.launched_by_torchrun()
    assert (distributed.get_world_size(), distributed.get_rank(), distributed.is_main_process()) == (1, 0, True)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.combined_grad_norm(2.5, torch.device("cpu")) == 2.5
    assert distributed.any_rank(True, torch.device("cpu")) is True


@pytest.mark.parametrize("wait_for_others, barrier_fails, expected", [
    (True, False, ["barrier", "destroy"]),  # a normal end: every rank leaves together
    (False, False, ["destroy"]),  # after an exception: never held waiting for a rank that will not come
    (True, True, ["barrier", "destroy"]),  # another rank left first: this one still leaves, without an error
])
def test_leaving_the_process_group_waits_for_the_other_ranks_only_after_a_normal_end(
        monkeypatch, tmp_path, wait_for_others, barrier_fails, expected):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    calls = []
    real_barrier, real_destroy = dist.barrier, dist.destroy_process_group

    def barrier(*args, **kwargs):
        calls.append("barrier")
        if barrier_fails:
            raise dist.DistBackendError("Connection closed by peer")
        return real_barrier(*args, **kwargs)

    def destroy(*args, **kwargs):
        calls.append("destroy")
        return real_destroy(*args, **kwargs)

    monkeypatch.setattr(dist, "barrier", barrier)
    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    try:
        distributed.shutdown(wait_for_others=wait_for_others)
    finally:
        if dist.is_initialized():
            real_destroy()
    assert calls == expected
    assert not distributed.is_initialized()
    distributed.shutdown()  # without a process group: nothing to do


def test_the_backend_is_validated_with_its_key_named(tiny_config, synthetic_root):
    with pytest.raises(ConfigError, match=r"train.dist_backend='mpi'"):
        tiny_config(synthetic_root, "train.dist_backend=mpi")


@pytest.mark.slow
def test_a_batch_that_does_not_split_stops_every_rank_with_one_line_each(tmp_path):
    # Each rank says it (a rank that stayed silent could be stopped by torchrun before rank 0 speaks).
    proc = torchrun(2, "train.batch_size=7", f"hydra.run.dir={tmp_path / 'h'}", f"run_dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "train.batch_size=7 does not split over the 2" in line]
    assert lines and all(line.startswith("error: config error:") for line in lines)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_sweep_under_torchrun_is_refused_in_one_line(tmp_path):
    proc = torchrun(1, "-m", "train.epochs=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode != 0
    assert "-m (a sweep) under torchrun" in proc.stderr
    assert not (tmp_path / "sweep").exists() or not list((tmp_path / "sweep").glob("*/summary.json"))
