"""Validation and the after-training test split over torchrun's processes score exactly as one process.

Each rank predicts whole batches of the one-process pass (batch i goes to rank i % world_size, no
padding), rank 0 gathers the batches' losses and predictions in order and scores them with the code
one process runs: the metrics are equal with ``==``, not approximately. The slow tests run this file
itself as the worker (``torchrun --nproc_per_node=2 tests/test_distributed_validation.py ...``, gloo on
the CPU, or plain ``python`` for the one-process reference), as tests/test_distributed.py runs train.py.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from detlab.data.loader import ShardBatchSampler
from detlab.engine.pictures import ErrorGallery
from detlab.runtime.distributed import gather_in_order, merge_in_order, shard_positions

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------------- the split
@pytest.mark.parametrize("count", [0, 1, 2, 7, 8, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_the_shards_are_disjoint_cover_every_position_and_merge_back_in_order(count, world_size):
    shards = [list(shard_positions(count, rank, world_size)) for rank in range(world_size)]
    flat = [p for shard in shards for p in shard]
    assert sorted(flat) == list(range(count)) and len(set(flat)) == count  # disjoint, covering, no padding
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    items = [[(p, f"item {p}") for p in shard] for shard in shards]
    assert merge_in_order(items, key=lambda item: item[0]) == [(p, f"item {p}") for p in range(count)]
    assert merge_in_order(reversed(items), key=lambda item: item[0]) == [(p, f"item {p}") for p in range(count)]


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 is not one of 2"):
        shard_positions(5, 2, 2)


def test_without_a_process_group_the_gather_is_the_items_in_order():
    assert gather_in_order([(2, "c"), (0, "a"), (1, "b")], key=lambda item: item[0]) == [(0, "a"), (1, "b"), (2, "c")]
    assert gather_in_order([], key=lambda item: item) == []


def test_the_batch_shards_are_the_one_process_batches():
    """7 images in batches of 2: (0, 1) (2, 3) (4, 5) (6); rank 0 takes batches 0 and 2, rank 1 batches 1 and 3."""
    plain = list(BatchSampler(SequentialSampler(range(7)), 2, drop_last=False))
    shards = [ShardBatchSampler(SequentialSampler(range(7)), 2, rank, 2) for rank in range(2)]
    assert [list(s) for s in shards] == [[[0, 1], [4, 5]], [[2, 3], [6]]]
    assert [len(s) for s in shards] == [2, 2]
    assert merge_in_order([list(s) for s in shards], key=lambda batch: batch[0]) == plain
    three = [list(ShardBatchSampler(SequentialSampler(range(7)), 2, rank, 3)) for rank in range(3)]
    assert three == [[[0, 1], [6]], [[2, 3]], [[4, 5]]]
    assert len(ShardBatchSampler(SequentialSampler(range(1)), 2, 1, 2)) == 0  # more ranks than batches


def test_the_galleries_of_a_split_pass_merged_are_the_gallery_of_the_whole_pass():
    """Equal scores and equal face sizes in several images (ties), 2 crops per size: the crops kept do
    not depend on how the images were split or in which order the shares are merged."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for image_id in range(6):
        images = torch.randn(1, 3, 64, 96, generator=generator)
        faces = torch.tensor([[10.0, 10, 30, 30], [50, 20, 70, 40], [5, 40, 13, 48]])  # same sizes everywhere
        boxes = torch.tensor([[60.0, 30, 80, 50], [0, 0, 20, 20], [70, 5, 90, 25], [10, 10, 30, 30]])
        scores = torch.tensor([0.9, 0.8, 0.9, 0.7]) if image_id % 2 else torch.tensor([0.8, 0.9, 0.6, 0.95])
        batches.append((images, [{"image_id": image_id, "scale": torch.tensor([1.0, 1.0])}],
                        [{"boxes": boxes, "scores": scores}], [faces]))

    def gallery(parts):
        galleries = []
        for part in parts:
            g = ErrorGallery(score_threshold=0.5, iou_threshold=0.5, size_edges=[16, 64], per_size=2)
            for index in part:
                g.update(*batches[index])
            galleries.append(g)
        for other in galleries[1:]:
            galleries[0].merge(other)
        return galleries[0]

    whole = gallery([range(6)])
    for parts in ([[0, 2, 4], [1, 3, 5]], [[1, 3, 5], [0, 2, 4]], [[5], [0, 1], [2, 3, 4]]):
        split = gallery(parts)
        assert {k: v.tolist() for k, v in split.totals.items()} == {k: v.tolist() for k, v in whole.totals.items()}
        for kind, picture in whole.pictures().items():
            assert np.array_equal(split.pictures()[kind], picture), (parts, kind)
    assert whole.totals["false_positives"].sum() == 6 * 3


# ----------------------------------------------------------------------------------- the worker
def worker(checkpoint: Path, out: Path, gt_dir: str) -> None:
    """Validate ``checkpoint`` as the trainer does (its config's batch size, loss at its step) and
    run the after-training test three ways; each rank pickles what it got to ``out/rank<r>.pkl``.
    Under torchrun each rank takes its share; under plain ``python``, one process does it all."""
    from detlab.config import EvaluateConfig
    from detlab.data import build_datasets, build_loader
    from detlab.engine.validation import validate
    from detlab.evaluation import evaluate_checkpoint
    from detlab.loss import build_criterion
    from detlab.model import build_model
    from detlab.runtime import distributed
    from detlab.trained import load_trained

    torch.set_num_threads(1)  # as every process of the comparison (a convolution's rounding may follow it)
    distributed.init_from_environment("gloo", "cpu", batch_size=int(os.environ.get("WORLD_SIZE", "1")))
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    cfg, state = load_trained(checkpoint)
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    criterion = build_criterion(cfg, model, total_steps=max(state["step"], 1))  # a finished run's last step
    if "criterion" in state:
        criterion.load_state_dict(state["criterion"], strict=False)
    _, val = build_datasets(cfg)
    shard = (rank, world_size) if distributed.is_initialized() else None
    loader = build_loader(val, cfg.train.batch_size, shuffle=False, num_workers=0, seed=0, shard=shard)
    result = validate(model, loader, criterion, cfg.eval, torch.device("cpu"), state["step"],
                      amp=cfg.train.cpu_bf16, num_images=cfg.eval.num_logged_images, gallery=True)
    tests = {"default": evaluate_checkpoint(EvaluateConfig(checkpoint=str(checkpoint), device="cpu")),
             "batch_2": evaluate_checkpoint(EvaluateConfig(checkpoint=str(checkpoint), device="cpu", batch_size=2))}
    if gt_dir:
        run = EvaluateConfig(checkpoint=str(checkpoint), device="cpu", protocol="wider", gt_dir=gt_dir)
        run.eval.input_size = "original"
        tests["wider_original"] = evaluate_checkpoint(run, eval_keys=["input_size"])
    with open(out / f"rank{rank}.pkl", "wb") as file:
        pickle.dump({"world_size": world_size, "shard_images": result.shard_images, "metrics": result.metrics,
                     "images": result.images, "pr_curve": result.pr_curve, "galleries": result.galleries,
                     "tests": tests}, file)
    distributed.shutdown()


def run_worker(nproc: int, checkpoint: Path, out: Path, gt_dir: str = "") -> list[dict]:
    """``nproc`` 2: torchrun's 2 gloo processes; 1: plain python, no process group. One thread each."""
    out.mkdir(parents=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launcher, str(HERE), str(checkpoint), str(out), gt_dir], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [pickle.loads((out / f"rank{rank}.pkl").read_bytes()) for rank in range(nproc)]


def assert_same_result(split: dict, one: dict) -> None:
    assert split["metrics"] == one["metrics"]  # every val/ number, exactly
    assert len(split["images"]) == len(one["images"]) > 0
    assert all(np.array_equal(a, b) for a, b in zip(split["images"], one["images"]))
    assert split["pr_curve"].keys() == one["pr_curve"].keys()
    assert all(np.array_equal(split["pr_curve"][k], one["pr_curve"][k]) for k in one["pr_curve"])
    assert split["galleries"].keys() == one["galleries"].keys() == {"false_positives", "missed_faces"}
    assert all(np.array_equal(split["galleries"][k], one["galleries"][k]) for k in one["galleries"])


@pytest.mark.slow
def test_two_gloo_processes_validate_and_test_exactly_as_one(tmp_path, write_wider_gt):
    """7 val images (odd) in batches of 2 over 2 processes: rank 0 predicts batches 0 and 2 (4 images),
    rank 1 batches 1 and 3 (3 images); the metrics, pictures and after-training tests are one process's."""
    from conftest import save_untrained_checkpoint, tiny_predict_config
    from detlab.data import build_datasets
    from test_evaluate_cli import wider_ground_truth_for

    cfg = tiny_predict_config(tmp_path, num_images=28)
    cfg.train.batch_size = 2
    cfg.eval.score_threshold = 0.3  # an untrained model scores around 0.5: keep some above, some below
    cfg.eval.num_logged_images = 3  # 2 from rank 0's first batch, 1 from rank 1's
    checkpoint = tmp_path / "last.pt"
    save_untrained_checkpoint(cfg, checkpoint)
    _, val = build_datasets(cfg)
    assert len(val) == 7
    gt_dir = wider_ground_truth_for(val.records, tmp_path / "gt", write_wider_gt)

    [one] = run_worker(1, checkpoint, tmp_path / "one", str(gt_dir))
    zero, first = run_worker(2, checkpoint, tmp_path / "two", str(gt_dir))
    print("images validated per rank:", zero["shard_images"], first["shard_images"], "one process:",
          one["shard_images"])
    assert (one["world_size"], zero["world_size"]) == (1, 2)
    assert (zero["shard_images"], first["shard_images"], one["shard_images"]) == (4, 3, 7)
    metrics = one["metrics"]
    print({k: metrics[k] for k in ("val/loss_total", "val/tp", "val/fp", "val/recall", "val/precision", "val/miou",
                                   "val/ap50", "val/num_images")})
    assert metrics["val/num_images"] == 7 and metrics["val/tp"] > 0 and metrics["val/fp"] > 0
    assert_same_result(zero, one)
    assert first["metrics"] == {} and first["images"] == [] and first["galleries"] == {}  # rank 1 only predicted
    for name, test in one["tests"].items():
        assert test["num_images"] == 7 and test["tp"] > 0, name
        assert zero["tests"][name] == test, name  # every metric, the WIDER APs, the settings
        assert first["tests"][name] is None, name
    assert one["tests"]["batch_2"]["ap50"] == metrics["val/ap50"]  # evaluate.py's numbers are validation's
    print("wider:", one["tests"]["wider_original"]["wider"])


@pytest.mark.slow
def test_a_two_process_run_records_the_validation_one_process_makes_of_its_weights(tmp_path):
    """A 1-epoch run under torchrun (2 gloo processes; 11 val images in batches of 4: rank 0 validates
    7, rank 1 4; BatchNorm on) records in metrics.csv, summary.json and test.json exactly what one
    process computes from its last.pt. DistributedDataParallel's training differs from one process's
    in float rounding (tests/test_distributed.py), so the comparison is with the same weights."""
    run_dir = tmp_path / "run"
    overrides = [f"dataset.root={tmp_path / 'synthetic'}", "dataset.synthetic.num_images=44",
                 "dataset.synthetic.val_fraction=0.25", "dataset.synthetic.image_width=160",
                 "dataset.synthetic.image_height=128", "model.input_width=160", "model.input_height=128",
                 "train.epochs=1", "train.batch_size=4", "train.torch_threads=1", "train.sample_grid=0",
                 "eval.num_logged_images=3", "eval.gallery_every=1", "eval.score_threshold=0.3",
                 "eval.test_protocol=detection", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *overrides], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["status"] == "completed"

    [one] = run_worker(1, run_dir / "checkpoints" / "last.pt", tmp_path / "one")
    metrics = one["metrics"]
    assert metrics["val/num_images"] == 11
    recorded = {k: v for k, v in summary["final"].items() if k.startswith("val/")}
    print({k: (recorded[k], metrics[k]) for k in ("val/loss_total", "val/tp", "val/fp", "val/miou", "val/ap50")})
    assert recorded == metrics  # every val/ number of the row, exactly
    [row] = list(csv.DictReader(open(run_dir / "metrics.csv")))
    val_columns = [k for k in row if k.startswith("val/")]
    assert val_columns and all(row[k] == f"{metrics[k]:.6g}" for k in val_columns)

    test = json.loads((run_dir / "test.json").read_text())
    expected = one["tests"]["default"]
    assert test.pop("test_time_s") >= 0 and test == json.loads(json.dumps(expected))
    print("test.json:", {k: test[k] for k in ("tp", "fp", "ap50", "miou", "num_images")})


if __name__ == "__main__":  # the worker: tests/test_distributed_validation.py CHECKPOINT OUT [GT_DIR]
    worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
