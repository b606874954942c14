"""Evaluate a checkpoint: ``python evaluate.py checkpoint=PATH [dataset=...] [split=val] [protocol=wider] ...``

Prints a human table and, as its last line, one JSON object (miou, mean_tp_iou, tp, fp, fn, precision,
recall, f1, ap50, the per-size-bucket values ``small/...``, and ``wider: {easy, medium, hard}`` with
``protocol=wider``); the same JSON is written to ``<output_dir>/metrics.json``. ``save_predictions=DIR``
writes the official WIDER FACE submission layout.

The metrics are those of the per-epoch validation (``detlab.metrics`` over ``detlab.predict``), with
the checkpoint's own settings unless overridden here.

Examples:
    python evaluate.py checkpoint=outputs/2026-11-23/20-00-00/checkpoints/best.pt
    python evaluate.py checkpoint=PATH dataset=widerface split=val protocol=wider save_predictions=preds
    python evaluate.py checkpoint=PATH input_size=original score_floor=0.02 nms_iou=0.3 max_detections=750
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from detlab.config import INVALID_SIZE, Config, ConfigError, DatasetConfig, test_input_size, to_config

log = logging.getLogger("evaluate")

SPLITS = ("val", "val_all", "test")
PROTOCOLS = ("detection", "wider")


@dataclass
class EvalRun:
    """Schema of ``configs/evaluate.yaml`` (null values: take the checkpoint's training config)."""

    checkpoint: str = MISSING
    dataset: Optional[DatasetConfig] = None
    split: str = "val"
    protocol: str = "detection"
    save_predictions: Optional[str] = None
    gt_dir: Optional[str] = None
    input_size: Any = None  # null: the checkpoint's eval.input_size | [W, H] | N (longer side) | "original"
    score_floor: Optional[float] = None
    nms_iou: Optional[float] = None
    max_detections: Optional[int] = None
    pre_nms_top_k: Optional[int] = None
    score_threshold: Optional[float] = None
    iou_threshold: Optional[float] = None
    size_edges: Optional[list[float]] = None
    size_adaptive_iou: Optional[bool] = None
    batch_size: int = 16
    num_workers: int = 0
    device: str = "auto"
    amp: bool = False
    output_dir: Optional[str] = None


ConfigStore.instance().store(name="evaluate_schema", node=EvalRun)


class EvaluationError(ValueError):
    """A bad evaluate.py argument or an unusable checkpoint; the message says which and why."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise EvaluationError(message)


def resolve_config(run: EvalRun, checkpoint_config: dict[str, Any]) -> Config:
    """The checkpoint's training config with this run's dataset and test-time options applied."""
    _check(run.split in SPLITS, f"split={run.split!r}: expected one of {', '.join(SPLITS)}")
    _check(run.protocol in PROTOCOLS, f"protocol={run.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    _check(run.batch_size >= 1, f"batch_size={run.batch_size}: must be >= 1")
    _check(run.device in ("auto", "cpu", "cuda"), f"device={run.device!r}: expected auto, cpu or cuda")
    try:
        cfg = to_config(OmegaConf.create(checkpoint_config))
    except Exception as error:  # noqa: BLE001 - any schema mismatch is reported the same way
        raise EvaluationError(f"checkpoint config does not match the schema: {error}") from None
    if run.dataset is not None:
        cfg.dataset = run.dataset
    requested = run.input_size if run.input_size is not None else cfg.eval.input_size
    size = test_input_size(requested)
    _check(size is not INVALID_SIZE,
           f"input_size={requested!r}: expected null, [W, H], a longer side N (int >= 32) or original")
    cfg.eval.input_size = list(size) if isinstance(size, tuple) else size
    if isinstance(size, tuple):
        cfg.model.input_width, cfg.model.input_height = size
    # The weights come from the checkpoint: never fetch or read backbone weights, and pin the
    # weight-dependent architecture choices so the state dict fits.
    from detlab.model import architecture_config

    cfg.model = architecture_config(cfg.model)
    e = cfg.eval
    for key in ("score_threshold", "iou_threshold", "nms_iou", "size_adaptive_iou"):
        if getattr(run, key) is not None:
            setattr(e, key, getattr(run, key))
    if run.size_edges is not None:
        e.size_edges = list(run.size_edges)
    if run.score_floor is not None:
        e.ap_score_floor = run.score_floor
    if run.max_detections is not None:
        cfg.model.max_detections = run.max_detections
    if run.pre_nms_top_k is not None:
        cfg.model.pre_nms_top_k = run.pre_nms_top_k
    _check(cfg.model.max_detections >= 1, f"max_detections={cfg.model.max_detections}: must be >= 1")
    _check(0 <= e.ap_score_floor < 1, f"score_floor={e.ap_score_floor}: must be in [0, 1)")
    try:
        return to_config(cfg)  # validates the merged values
    except ConfigError as error:
        raise EvaluationError(str(error)) from None


def image_key(path: str) -> str:
    """``"0--Parade/0_Parade_x_1.jpg"`` -> ``"0--Parade/0_Parade_x_1"`` (the WIDER protocol's key)."""
    p = Path(path)
    return f"{p.parent.as_posix()}/{p.stem}" if p.parent.as_posix() != "." else p.stem


def evaluate(run: EvalRun, output_dir: Path) -> dict[str, Any]:
    import torch

    from detlab.data import build_datasets, build_loader, build_predict_dataset
    from detlab.metrics import DetectionEvaluator
    from detlab.model import build_model
    from detlab.predict import OriginalSizeImages, predict_dataset, predict_original_size
    from detlab.wider_eval import evaluate_wider, load_wider_ground_truth, save_predictions, xyxy_to_submission

    path = Path(run.checkpoint)
    _check(path.is_file(), f"checkpoint={run.checkpoint!r}: file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise EvaluationError(f"checkpoint={run.checkpoint!r}: cannot be loaded ({error})") from None
    _check(isinstance(checkpoint, dict) and {"model", "config"} <= set(checkpoint),
           f"checkpoint={run.checkpoint!r}: expected a dict with 'model' and 'config' (written by train.py)")
    cfg = resolve_config(run, checkpoint["config"])
    device = torch.device("cuda" if run.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if run.device == "auto" else run.device))

    if run.split == "val":
        _, dataset = build_datasets(cfg)
    else:
        dataset = build_predict_dataset(cfg, "val" if run.split == "val_all" else "test")
    e, m = cfg.eval, cfg.model
    options = dict(score_floor=e.ap_score_floor, nms_iou=e.nms_iou, max_detections=m.max_detections,
                   pre_nms_top_k=m.pre_nms_top_k, amp=run.amp and device.type == "cuda")
    test_size = cfg.eval.input_size
    if test_size == "original" or isinstance(test_size, int):
        long_side = test_size if isinstance(test_size, int) else None
        images = OriginalSizeImages(dataset.records, dataset.images_dir, long_side=long_side)
        predictions = predict_original_size(m, checkpoint["model"], images, device, **options)
    else:
        model = build_model(m)
        model.load_state_dict(checkpoint["model"])
        model.to(device)
        loader = build_loader(dataset, run.batch_size, shuffle=False, num_workers=run.num_workers, seed=0)
        predictions = predict_dataset(model, loader, device, **options)

    records = dataset.records
    result: dict[str, Any] = {}
    if run.split != "test":
        evaluator = DetectionEvaluator.from_config(e)
        gt = [torch.from_numpy(records[i].boxes).float().reshape(-1, 4) for i, _, _ in predictions]
        evaluator.update([{"boxes": b, "scores": s} for _, b, s in predictions], gt)
        result.update(evaluator.compute())

    by_key = {image_key(records[i].path): xyxy_to_submission(b.numpy(), s.numpy()) for i, b, s in predictions}
    if run.protocol == "wider":
        _check(run.split != "test", "protocol=wider needs ground truth: split=val or val_all, not test")
        gt_dir = Path(run.gt_dir) if run.gt_dir else Path(cfg.dataset.root).expanduser() / "eval_tools" / "ground_truth"
        _check(gt_dir.is_dir(), f"protocol=wider: no WIDER FACE ground truth folder {gt_dir} (set gt_dir=...)")
        wider_gt = load_wider_ground_truth(gt_dir)
        known = set(wider_gt.keys)
        missing = [k for k in by_key if k not in known]
        _check(not missing, f"protocol=wider: {len(missing)} image(s) are not in the official val ground truth, "
                            f"e.g. {missing[0] if missing else ''} (dataset={cfg.dataset.name})")
        result["wider"] = evaluate_wider(by_key, wider_gt, images=list(by_key))
    if run.save_predictions:
        save_predictions(by_key, run.save_predictions)
        result["predictions_dir"] = str(Path(run.save_predictions))

    result.update({
        "checkpoint": str(path), "epoch": checkpoint.get("epoch"), "step": checkpoint.get("step"),
        "dataset": cfg.dataset.name, "split": run.split, "num_images": len(predictions),
        "settings": {"input_size": test_size if (test_size == "original" or isinstance(test_size, int))
                     else [m.input_width, m.input_height],
                     "score_threshold": e.score_threshold, "iou_threshold": e.iou_threshold,
                     "score_floor": e.ap_score_floor, "nms_iou": e.nms_iou, "max_detections": m.max_detections,
                     "size_edges": list(e.size_edges), "size_adaptive_iou": e.size_adaptive_iou},
    })
    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, default=_json_default)
    tmp = output_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    tmp.replace(output_dir / "metrics.json")
    print(format_table(result))
    print(text, flush=True)
    return result


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def format_table(result: dict[str, Any]) -> str:
    """The human-readable part: overall and per-bucket metrics, then the WIDER APs."""
    s = result["settings"]
    lines = [f"checkpoint {result['checkpoint']} (epoch {result['epoch']}), {result['dataset']}/{result['split']}, "
             f"{result['num_images']} images; score >= {s['score_threshold']}, IoU >= {s['iou_threshold']}, "
             f"NMS {s['nms_iou']}, floor {s['score_floor']}"]
    if "tp" in result:
        columns = ("all", "small", "medium", "large")
        rows = ("num_gt", "tp", "fp", "fn", "precision", "recall", "f1", "ap50", "miou", "mean_tp_iou")
        lines.append(f"{'':<12}" + "".join(f"{c:>10}" for c in columns))
        for row in rows:
            cells = []
            for c in columns:
                value = result[row] if c == "all" else result[f"{c}/{row}"]
                cells.append(f"{int(value):>10d}" if row in ("num_gt", "tp", "fp", "fn") else f"{value:>10.4f}")
            lines.append(f"{row:<12}" + "".join(cells))
    if "wider" in result:
        w = result["wider"]
        lines.append(f"WIDER FACE AP  easy {w['easy']:.4f}  medium {w['medium']:.4f}  hard {w['hard']:.4f}")
    if "predictions_dir" in result:
        lines.append(f"predictions written to {result['predictions_dir']}")
    return "\n".join(lines)


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(raw: DictConfig) -> None:
    run = OmegaConf.to_object(raw)
    assert isinstance(run, EvalRun)
    output_dir = Path(run.output_dir or HydraConfig.get().runtime.output_dir)
    try:
        evaluate(run, output_dir)
    except (EvaluationError, FileNotFoundError) as error:
        log.error(str(error))
        sys.exit(2)


if __name__ == "__main__":
    main()
