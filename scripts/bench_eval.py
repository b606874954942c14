"""Benchmark: detlab's vectorised WIDER FACE scorer against a straightforward port of the official
evaluation (the tests' oracle, ``tests/oracles/wider_reference.py``), on a fixed prediction set derived from the ground truth with
a fixed seed, written in the submission layout (sorted by score, as the official MATLAB
``read_pred.m`` sorts) and read back by both loaders.

Usage: ``python scripts/bench_eval.py [--root DIR] [--seed 0] [--repeat 3]`` (``--root``: by default
``<paths.data_dir>/widerface``, ``DETLAB_DATA`` setting ``paths.data_dir``)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from detlab.errors import report_user_errors
from detlab.paths import widerface_root
from detlab.wider_eval import (
    evaluate_wider,
    load_predictions,
    load_wider_ground_truth,
    save_predictions,
)

# The port is the tests' oracle and ships with the tests, not with the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracles.wider_reference import (  # noqa: E402
    get_gt_boxes,
    get_preds,
    local_val_images,
    reference_evaluation,
    synthetic_predictions,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="WIDER FACE root (default: <paths.data_dir>/widerface)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of the detlab scorer (best kept)")
    args = parser.parse_args()
    root = Path(args.root) if args.root else widerface_root()
    gt_dir = root / "eval_tools" / "ground_truth"
    if not gt_dir.is_dir():
        print(f"no ground truth at {gt_dir}; nothing to benchmark")
        return 1

    t0 = time.perf_counter()
    gt = load_wider_ground_truth(gt_dir)
    t_gt_ours = time.perf_counter() - t0
    images = local_val_images(root) or list(gt.keys)
    subset = set(images)
    predictions = synthetic_predictions(gt, images, seed=args.seed)
    num_boxes = sum(len(v) for v in predictions.values())
    print(f"images: {len(images)} (of {len(gt.keys)} in the val ground truth), predictions: {num_boxes}")

    with tempfile.TemporaryDirectory() as tmp:
        save_predictions(predictions, tmp)
        t0 = time.perf_counter()
        ours_loaded = load_predictions(tmp)
        t_load_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        port_loaded = get_preds(tmp)
        t_load_port = time.perf_counter() - t0
    t0 = time.perf_counter()
    port_gt = get_gt_boxes(str(gt_dir))
    t_gt_port = time.perf_counter() - t0

    times = []
    for _ in range(max(args.repeat, 1)):
        t0 = time.perf_counter()
        ours = evaluate_wider(ours_loaded, gt, images=images)
        times.append(time.perf_counter() - t0)
    t_ours = min(times)

    t0 = time.perf_counter()
    with np.errstate(invalid="ignore", divide="ignore"):  # the port divides 0 by 0 at empty thresholds
        ref = reference_evaluation(port_loaded, port_gt, subset=subset)
    t_port = time.perf_counter() - t0

    print(f"{'':<22}{'easy':>12}{'medium':>12}{'hard':>12}")
    print(f"{'detlab.wider_eval':<22}" + "".join(f"{ours[s]:>12.8f}" for s in ("easy", "medium", "hard")))
    print(f"{'official port':<22}" + "".join(f"{ref[s]:>12.8f}" for s in ("easy", "medium", "hard")))
    diff = max(abs(ours[s] - ref[s]) for s in ours)
    print(f"max |AP difference|: {diff:.3e}")
    print(f"scoring time, detlab (best of {len(times)}): {t_ours:.3f} s")
    print(f"scoring time, official port:              {t_port:.3f} s")
    print(f"speed-up: {t_port / t_ours:.1f}x")
    print(f"loading (not in the scoring times): predictions detlab {t_load_ours:.2f} s / port {t_load_port:.2f} s, "
          f"ground truth detlab {t_gt_ours:.2f} s / port {t_gt_port:.2f} s")
    import torch

    threads = torch.get_num_threads()
    t_det, det = time_detection_evaluator(gt, predictions)
    torch.set_num_threads(1)
    t_det1, _ = time_detection_evaluator(gt, predictions)
    torch.set_num_threads(threads)
    print(f"detlab.metrics.DetectionEvaluator on the same set (update per image + compute): {t_det:.3f} s with "
          f"{threads} torch threads, {t_det1:.3f} s with 1 (ap50 {det['ap50']:.4f}, miou {det['miou']:.4f}, "
          f"tp {det['tp']:.0f}, fp {det['fp']:.0f}, fn {det['fn']:.0f})")
    return 0 if diff <= 1e-6 else 3


def time_detection_evaluator(gt, predictions: dict[str, np.ndarray]) -> tuple[float, dict[str, float]]:
    """The per-epoch metric's cost on the same predictions (batches of 32, CPU tensors)."""
    import torch

    from detlab.metrics import DetectionEvaluator

    index = gt.index()
    preds, gts = [], []
    for key, array in predictions.items():
        boxes = torch.from_numpy(array[:, :4]).float()
        boxes[:, 2:] += boxes[:, :2]
        preds.append({"boxes": boxes, "scores": torch.from_numpy(array[:, 4]).float()})
        faces = torch.from_numpy(gt.boxes[index[key]]).float()
        faces[:, 2:] += faces[:, :2]
        gts.append(faces)
    evaluator = DetectionEvaluator()
    t0 = time.perf_counter()
    for start in range(0, len(preds), 32):
        evaluator.update(preds[start:start + 32], gts[start:start + 32])
    result = evaluator.compute()
    return time.perf_counter() - t0, result


if __name__ == "__main__":
    with report_user_errors():  # a bad argument, config value or file: one line, exit 2
        sys.exit(main())
