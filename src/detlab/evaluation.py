"""Score a trained checkpoint: the library behind ``evaluate.py``.

``evaluate_checkpoint(run, eval_overrides)`` rebuilds the checkpoint's model, predicts through
``detlab.prediction`` (the path the per-epoch validation takes) and scores with ``detlab.metrics`` and,
with ``protocol=wider``, the official WIDER FACE easy/medium/hard AP (``detlab.wider_eval``).
Settings are the checkpoint's own training config; only the ``eval.*`` keys given on the command
line (``eval_keys``) and ``dataset`` replace them, so the numbers match the run's validation
unless asked otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from detlab.config import (
    INVALID_SIZE,
    Config,
    ConfigError,
    DatasetConfig,
    EvalConfig,
    EvaluateConfig,
    test_input_size,
    to_config,
    typed_entry_config,
)
from detlab.errors import UserError
from detlab.runtime.device import loader_workers

SPLITS = ("val", "val_all", "test")
PROTOCOLS = ("detection", "wider")


class EvaluationError(UserError, ValueError):
    """A bad evaluate.py argument; the message says which and why."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise EvaluationError(message)


def to_evaluate_config(raw: Any) -> EvaluateConfig:
    """Hydra's composed ``evaluate.yaml`` as a typed ``EvaluateConfig`` (a wrong type: one clear error)."""
    return typed_entry_config(raw, EvaluateConfig, EvaluationError)


def eval_keys_of(overrides: Sequence[str]) -> list[str]:
    """The keys of the ``eval.<key>=value`` items of a Hydra override list (``["input_size"]``)."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    return [k.removeprefix("eval.") for k in keys if k.startswith("eval.")]


def resolve_config(run: EvaluateConfig, trained: Config, eval_keys: Sequence[str] = ()) -> Config:
    """The checkpoint's training config with this run's dataset and the ``run.eval`` values of
    ``eval_keys`` (the ones set on the command line) applied."""
    _check(run.split in SPLITS, f"split={run.split!r}: expected one of {', '.join(SPLITS)}")
    _check(run.protocol in PROTOCOLS, f"protocol={run.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    _check(run.batch_size >= 1, f"batch_size={run.batch_size}: must be >= 1")
    _check(run.device in ("auto", "cpu", "cuda"), f"device={run.device!r}: expected auto, cpu or cuda")
    cfg = with_eval_overrides(trained, run.eval, eval_keys, run.dataset)
    size = test_input_size(cfg.eval.input_size)
    _check(size is not INVALID_SIZE, f"eval.input_size={cfg.eval.input_size!r}: expected null, [W, H], "
                                     "a longer side N (int >= 32) or original")
    if isinstance(size, tuple):
        cfg.model.input_width, cfg.model.input_height = size
    # The weights come from the checkpoint: never fetch or read backbone weights, and pin the
    # weight-dependent architecture choices so the state dict fits.
    from detlab.model import architecture_config

    cfg.model = architecture_config(cfg.model)
    return cfg


def with_eval_overrides(trained: Config, values: EvalConfig, eval_keys: Sequence[str] = (),
                        dataset: Optional[DatasetConfig] = None) -> Config:
    """The checkpoint's training config with ``values``' ``eval_keys`` (those set on the command line)
    and ``dataset`` applied, validated: a bad value is one ``EvaluationError`` naming the key."""
    cfg = OmegaConf.structured(trained)
    if dataset is not None:
        cfg.dataset = OmegaConf.structured(dataset)
    for key in eval_keys:
        setattr(cfg.eval, key, getattr(values, key))
    try:
        return to_config(cfg)
    except ConfigError as error:
        raise EvaluationError(str(error)) from None


def evaluate_checkpoint(run: EvaluateConfig, eval_keys: Sequence[str] = ()) -> Optional[dict[str, Any]]:
    """Predict and score; returns the result dict ``evaluate.py`` prints (see its docstring).

    In a torchrun process group (the after-training test of a DistributedDataParallel run) a
    collective: each rank predicts its share of the images (the batches, or the images at their own
    size, of ``shard_positions``), rank 0 gathers them in order and scores them as one process does;
    the other ranks return None."""
    from detlab.data import build_datasets, build_loader, build_predict_dataset
    from detlab.runtime.distributed import gather_in_order, get_rank, get_world_size, is_initialized, shard_positions
    from detlab.runtime.checkpoint import load_weights
    from detlab.trained import load_trained
    from detlab.runtime.device import select_device
    from detlab.metrics import DetectionEvaluator
    from detlab.model import build_model
    from detlab.prediction import (
        ModelsBySize,
        OriginalSizeImages,
        predict_dataset,
        predict_original_size,
    )
    from detlab.wider_eval import (
        evaluate_wider,
        image_key,
        load_wider_ground_truth,
        save_predictions,
        xyxy_to_submission,
    )

    trained, checkpoint = load_trained(run.checkpoint)
    cfg = resolve_config(run, trained, eval_keys)
    device = select_device(run.device)
    if run.split == "val":
        _, dataset = build_datasets(cfg)
    else:
        dataset = build_predict_dataset(cfg, "val" if run.split == "val_all" else "test")
    settings, amp = cfg.eval, run.amp and device.type == "cuda"
    test_size = settings.input_size
    if test_size == "original" or isinstance(test_size, int):
        long_side = test_size if isinstance(test_size, int) else None
        images = OriginalSizeImages(dataset.records, dataset.images_dir, long_side=long_side)
        predictions = predict_original_size(ModelsBySize(cfg.model, checkpoint["model"], device), images, device,
                                            settings, amp, indices=shard_positions(len(images)))
    else:
        model = build_model(cfg.model)
        load_weights(model, checkpoint["model"], f"checkpoint {run.checkpoint}")
        model.to(device)
        shard = (get_rank(), get_world_size()) if is_initialized() else None
        loader = build_loader(dataset, run.batch_size, shuffle=False, num_workers=loader_workers(run.num_workers, run.device),
                              seed=0, shard=shard)
        predictions = predict_dataset(model, loader, device, settings, amp)
    predictions = gather_in_order(predictions, key=lambda prediction: prediction[0])  # by image, on rank 0
    if predictions is None:
        return None

    records = dataset.records
    result: dict[str, Any] = {}
    if run.split != "test":
        evaluator = DetectionEvaluator.from_config(settings)
        gt = [torch_boxes(records[i].boxes) for i, _, _ in predictions]
        evaluator.update([{"boxes": b, "scores": s} for _, b, s in predictions], gt)
        result.update(evaluator.compute())

    by_key = {image_key(records[i].path): xyxy_to_submission(b.numpy(), s.numpy()) for i, b, s in predictions}
    if run.protocol == "wider":
        _check(run.split != "test", "protocol=wider needs ground truth: split=val or val_all, not test")
        gt_dir = wider_gt_dir(cfg.dataset.root, run.gt_dir)
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
        "checkpoint": str(run.checkpoint), "epoch": checkpoint.get("epoch"), "step": checkpoint.get("step"),
        "dataset": cfg.dataset.name, "split": run.split, "num_images": len(predictions),
        "settings": {"input_size": test_size if (test_size == "original" or isinstance(test_size, int))
                     else [cfg.model.input_width, cfg.model.input_height],
                     **{key: getattr(settings, key) for key in (
                         "score_threshold", "iou_threshold", "score_floor", "nms_iou", "pre_nms_top_k",
                         "max_detections", "size_edges", "size_adaptive_iou")}},
    })
    result["settings"]["size_edges"] = list(settings.size_edges)
    return result


def wider_gt_dir(dataset_root: str, gt_dir: Optional[str] = None) -> Path:
    """The official WIDER FACE ground-truth folder: ``gt_dir``, else ``<dataset root>/eval_tools/ground_truth``."""
    return Path(gt_dir).expanduser() if gt_dir else Path(dataset_root).expanduser() / "eval_tools" / "ground_truth"


def test_after_training(checkpoint: Path | str, protocol: str, device: str = "auto") -> Optional[dict[str, Any]]:
    """``eval.test_protocol``: score a run's checkpoint with its own config (``eval.input_size``)
    on its val split, as ``python evaluate.py checkpoint=... protocol=...`` does (under torchrun:
    split over the ranks, the result on rank 0, None on the others)."""
    return evaluate_checkpoint(EvaluateConfig(checkpoint=str(checkpoint), protocol=protocol, device=device))




def torch_boxes(boxes: Any) -> Any:
    """A record's ``[G, 4]`` numpy boxes as a float tensor."""
    import torch

    return torch.from_numpy(boxes).float().reshape(-1, 4)


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
