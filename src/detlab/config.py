"""Structured configs: the schema every YAML file under ``configs/`` is checked against.

Hydra merges the YAML files onto these dataclasses, so an unknown key or a value of the wrong type
fails when the run starts. ``validate`` then checks the values (ranges, enumerations) and names
the offending key; ``train.py`` calls it before anything is built or written. The ``paths`` group's
schema, ``PathsConfig``, lives with the code that resolves it (``detlab.paths``).
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from detlab.config_compat import (drop_retired_placeholders, keep_v1_judgement, keep_v2_judgement, keep_v5_judgement,
                                  move_repair_keys)
from detlab.diagnosis import DiagnosisConfig, config_problems, preflight_mode
from detlab.errors import ConfigError
from detlab.paths import PathsConfig, config_dir
from detlab.run_record import METRIC_COLUMNS

log = logging.getLogger(__name__)


@dataclass
class AugmentConfig:
    """Training-time augmentation switches; evaluation always uses the deterministic path."""

    random_crop: bool = True  # SSD-style crop/zoom that keeps boxes consistent
    zoom_out: bool = False  # SSD "expand": paste the image on a larger canvas (more small faces)
    zoom_out_max: float = 2.0
    hflip: bool = True
    photometric: bool = True


@dataclass
class SplitConfig:
    """How train and val records are drawn from the annotation files.

    ``official``: train from ``wider_face_train_bbx_gt.txt``, val from ``wider_face_val_bbx_gt.txt``.
    ``random``: one annotation file (``source``) split by ``ratios`` with ``seed``; ``ratios`` holds
    train, val and optionally a third held-out share (the paper used 0.4/0.1/0.5).
    """

    mode: str = "official"
    source: str = "val"
    ratios: list[float] = field(default_factory=lambda: [0.8, 0.2])
    seed: int = 0


@dataclass
class SyntheticConfig:
    num_images: int = 1000
    image_width: int = 320
    image_height: int = 256
    seed: int = 0
    val_fraction: float = 0.2


@dataclass
class DatasetConfig:
    name: str = "synthetic"  # synthetic | widerface
    # widerface: the folder holding WIDER_{train,val,test}/ and wider_face_split/
    # (configs: ${paths.data_dir}/widerface). synthetic: the cache folder the generated dataset is
    # written into and re-used from (configs: ${paths.cache_dir}/synthetic).
    root: str = ".cache/synthetic"
    split: SplitConfig = field(default_factory=SplitConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    drop_invalid: bool = True
    min_face_size: float = 0.0  # pixels, on the larger side of the face box
    keep_empty: bool = True  # keep images without faces as negatives
    on_bad_image: str = "error"  # error | skip
    max_train_images: Optional[int] = None  # None: all
    max_val_images: Optional[int] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    num_workers: Optional[int] = None  # data-loader workers; null: what suits the machine (0 up to 2 cores)
    # Decoded-image cache (detlab.data.cache): none | ram | disk. Each image is decoded once and kept
    # as uint8, its longer side at most cache_max_side pixels (null: as decoded). ram: the default
    # synthetic set (1,000 images at 320x256) takes about 250 MB there; dataset=widerface says none.
    cache: str = "ram"
    cache_max_side: Optional[int] = None
    # dataset.cache=ram: the most bytes one process keeps (past it, images are decoded on every read,
    # said once). Null: a quarter of the machine's memory over the processes holding a copy
    # (detlab.data.cache.default_ram_budget).
    cache_max_bytes: Optional[int] = None
    cache_dir: str = ".cache/decoded"  # dataset.cache=disk only (configs: ${paths.cache_dir}/decoded)


@dataclass
class ModelConfig:
    name: str = "ssd_slim"  # ssd_slim | ssd_mobilenet_v2 | ssdlite | ssd_vgg16
    # ssdlite only: mobilenet_v3_large (torchvision's SSDlite) or mobilenet_v2 (torchvision's ImageNet
    # file mobilenet_v2-b0353104.pth, kept in paths.pretrained_dir for offline use, loads into it).
    backbone: str = "mobilenet_v3_large"
    # ssdlite + mobilenet_v3_large only: MobileNetV3's "reduced tail" (last stage halved). None follows
    # torchvision's SSDlite: reduced without pretrained weights, full with them (the ImageNet weights
    # are for the full tail). Set it explicitly to rebuild a trained model without loading weights.
    reduced_tail: Optional[bool] = None
    input_width: int = 320
    input_height: int = 256
    num_classes: int = 2  # background + face
    batch_norm: bool = True
    # Run the convolutions in channels-last (NHWC) memory format: faster with oneDNN on CPU and
    # with tensor cores under AMP on CUDA. Same state dict either way (outputs equal to float tolerance).
    channels_last: bool = True
    # Backbone weights: "none", "imagenet" (torchvision weights API, needs the network or its cache),
    # or a path to a local state-dict file.
    backbone_weights: str = "none"
    width_mult: float = 1.0
    # Anchors (ssd_slim, ssd_mobilenet_v2): one list of square anchor sizes (pixels) per feature level.
    feature_strides: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    min_sizes: list[list[int]] = field(
        default_factory=lambda: [[10, 16, 24], [32, 48], [64, 96], [128, 192, 256]]
    )
    variances: list[float] = field(default_factory=lambda: [0.1, 0.2])
    # Ultra-Light's and RetinaFace's matching threshold: a 12-px face overlaps its nearest 10/16-px
    # anchors at IoU 0.35-0.45, so at SSD's 0.45-0.5 most small faces would have only their forced
    # anchor. model=ssdlite and model=ssd_vgg16 (torchvision's default boxes) say 0.45.
    match_iou: float = 0.35
    # Anchors whose best IoU is in [ignore_iou, match_iou) are neither face nor background (no loss,
    # never mined); null: every non-positive anchor is background (classic SSD).
    ignore_iou: Optional[float] = None




@dataclass
class AdaptiveWeightsConfig:
    """The paper's refinement: emphasise classification early, ramp the box weight up later.

    Configured as ``loss.adaptive_weights``. The effective weights are ``loss.class_weight * c(step)`` and ``loss.box_weight * b(step)``;
    ``b`` (and ``c``) hold their start factor until ``ramp_start_fraction`` of the training steps,
    then ramp (``shape``) to 1 at ``ramp_end_fraction`` and stay there. Off: constant weights.
    """

    enabled: bool = False
    start_box_factor: float = 0.1
    start_class_factor: float = 1.0
    ramp_start_fraction: float = 0.1
    ramp_end_fraction: float = 0.5
    shape: str = "linear"  # linear | cosine


@dataclass
class RebalanceConfig:
    """``loss.rebalance``: how the criterion corrects an imbalanced weight pair when the rebalance repair
    engages it (``diagnosis.repair``; ``detlab.loss.LossRebalancer``): once, the box weight scaled by
    ``aim / ratio``, ``aim`` being ``target`` for a box-heavy run and ``class_heavy_target`` for a
    class-heavy one.
    """

    target: float = 2.0  # a box-heavy run's aim, inside the healthy band (the detector's advice names it too)
    # A class-heavy run's aim: the low end of the healthy band (the healthy recipes' first-part median ratios
    # are 0.9-2.2). Set on the tune seeds' pilot (v1; decided before its runs: adopt 1 if it rescues more than
    # 0.5 and loses none): paper box 0.01 rescued on 3 of 3 seeds (1 of 3 at 0.5), paper box 0.2 and box
    # weight 0.001 on 2 of 2 as at 0.5 (and on their third seeds, run at 1 only).
    class_heavy_target: float = 1.0
    min_factor: float = 1e-3
    max_factor: float = 1e3
    # Under SGD, the share of a box-heavy correction (in log scale) taken by raising the class weight; the rest
    # lowers the box weight. 0: the box weight alone; 1: the class weight alone (Adam and AdamW always raise,
    # never lower). 0, measured on real WIDER under the paper's SGD: box 10 rescued only at 0 (medium AP 32.7;
    # 0.5: 0.0, 1: 0.0 after a divergence); docs/diagnosis.md, "Repairs while training".
    raise_class_share: float = 0.0


@dataclass
class LossConfig:
    """The criterion (``detlab.loss.MultiBoxLoss``): class/box weights, their schedule, mining."""

    class_weight: float = 1.0
    box_weight: float = 1.0
    box_loss: str = "huber"  # huber | l1
    huber_delta: float = 1.0
    neg_pos_ratio: float = 3.0  # 0: every negative counts (no mining)
    min_negatives: int = 16  # per image, so a batch without faces still learns background
    adaptive_weights: AdaptiveWeightsConfig = field(default_factory=AdaptiveWeightsConfig)
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)


@dataclass
class OptimConfig:
    # sgd | adamw. AdamW learns the default dataset within 20 epochs from scratch on a CPU (SGD needs
    # far more steps). lr 0.01: at 0.003 the default run's val AP50 was 0.02 after 6 epochs, at 0.01
    # it was 0.24 (same seed).
    name: str = "adamw"
    lr: float = 0.01
    momentum: float = 0.9  # sgd
    beta1: float = 0.9  # adamw
    beta2: float = 0.999  # adamw
    nesterov: bool = False
    weight_decay: float = 5e-4
    grad_clip_norm: Optional[float] = None  # None: no clipping


@dataclass
class ScheduleConfig:
    warmup: bool = True
    warmup_epochs: float = 1.0  # used when warmup_steps is None
    warmup_steps: Optional[int] = None
    warmup_start_factor: float = 0.01  # lr at step 0 = lr * this
    after_warmup: str = "cosine"  # constant | multistep | cosine
    milestones: list[float] = field(default_factory=lambda: [0.66, 0.9])  # fractions of training
    gamma: float = 0.1
    min_lr_factor: float = 0.01  # cosine floor, as a fraction of lr


@dataclass
class EvalConfig:
    """Prediction (post-processing) and scoring, shared by validation, ``evaluate.py`` and scripts."""

    # Post-processing: candidates above score_floor (also AP's floor), top pre_nms_top_k per image,
    # NMS at nms_iou, at most max_detections per image.
    score_floor: float = 0.01
    nms_iou: float = 0.4
    pre_nms_top_k: int = 1000
    max_detections: int = 200
    # Scoring.
    iou_threshold: float = 0.5
    score_threshold: float = 0.5  # predictions counted for TP/FP/FN and mIoU
    size_edges: list[float] = field(default_factory=lambda: [16.0, 64.0])
    size_adaptive_iou: bool = False
    # With size_adaptive_iou: a face under size_edges[0] is matched at
    # max(size_adaptive_iou_floor, iou_threshold * size / size_edges[0]) (see detlab.metrics).
    size_adaptive_iou_floor: float = 0.3
    num_logged_images: int = 4  # val images drawn with predictions each epoch
    pr_curve: bool = True  # the val precision-recall curve each epoch (TensorBoard PR curves, plots/pr_curve.png)
    # Every N epochs (and the last): crops of the top-scoring false positives and of the largest missed
    # faces, gallery_size per face size (TensorBoard gallery/*); 0: none.
    gallery_every: int = 5
    gallery_size: int = 8
    # Test-time input of evaluate.py / scripts (not of the per-epoch validation, which uses the model's
    # training size): null = the training size | [W, H] | N (keep aspect, longer side N pixels, padded to
    # a multiple of 64) | original (each image at its own size). A preset records its recommended one.
    input_size: Any = None
    # Scored once after training on last.pt at input_size, into summary.json's "test" (and test.json):
    # null (off) | detection (recall, TP/FP/FN, mIoU, AP50) | wider (also the official easy/medium/hard AP)
    test_protocol: Optional[str] = None


@dataclass
class StageConfig:
    """Boundaries of the early / mid / late stages for per-stage loss summaries.

    ``early_end_fraction`` None: the early stage is the warm-up (or 10% of steps without one).
    """

    early_end_fraction: Optional[float] = None
    late_start_fraction: float = 0.7


@dataclass
class EarlyStoppingConfig:
    """The one owner of "best" (``best.pt``, ``summary.json``'s ``best``) and of early stopping.

    ``monitor`` is a metrics.csv column (``val/ap50``, ``val/miou``, ``val/loss_total``, ...); ``mode``
    ``max`` or ``min`` (``auto``: min for losses, max otherwise). An epoch is an improvement when it
    beats the best by more than ``min_delta``; ``patience`` epochs without one stop the run (null: never).
    """

    monitor: str = "val/ap50"  # not val/miou, which a box-spamming epoch raises (configs/early_stopping)
    mode: str = "auto"  # auto | max | min
    patience: Optional[int] = None
    min_delta: float = 0.0


@dataclass
class TrainConfig:
    # 15 epochs (375 steps on the default set) keep the default run at about 4 minutes on 2 CPU cores (docs/measured.md).
    epochs: int = 15
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # CUDA: float16 autocast with a gradient scaler
    # CPU: bfloat16 autocast (AVX-512 BF16 / AMX CPUs run it faster; see docs/measured.md).
    cpu_bf16: bool = True
    deterministic: bool = False
    log_every: int = 10  # steps between TensorBoard scalar writes
    # Augmented training images with their boxes, drawn once when a run starts (TensorBoard
    # train/augmented_samples, plots/train_samples.jpg); 0: none.
    sample_grid: int = 16
    plots: bool = True  # at the end: plots/curves.png and plots/pr_curve.png in the run folder
    # The metrics.csv column train.py returns to a Hydra sweeper (its value at the last epoch; a run
    # that ends before one validation returns nothing, a failed trial for Optuna).
    objective: str = "val/ap50"
    torch_threads: Optional[int] = None  # None: torch's default (under torchrun: the cores / processes per node)
    # torchrun only (docs/scaling_out.md): the process group's backend (auto: nccl on CUDA, gloo
    # on the CPU), and SyncBatchNorm over the processes on CUDA (PyTorch has none on the CPU, where
    # each process normalises its own batch_size / world_size images).
    dist_backend: str = "auto"
    sync_batchnorm: bool = True


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: StageConfig = field(default_factory=StageConfig)
    diagnosis: DiagnosisConfig = field(default_factory=DiagnosisConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # Resume: false, true (this run directory's checkpoints/last.pt), or a checkpoint path.
    resume: Any = False
    run_dir: Optional[str] = None  # None: Hydra's output directory
    # Where data, pretrained weights and caches are (configs/paths/default.yaml: DETLAB_DATA, ...).
    paths: PathsConfig = field(default_factory=PathsConfig)


# ----------------------------------------------------------------------- the other entry points
@dataclass
class EvaluateConfig:
    """Schema of ``configs/evaluate.yaml`` (``evaluate.py``, ``detlab.evaluation``)."""

    checkpoint: str = MISSING
    dataset: Optional[DatasetConfig] = None  # null: the dataset the checkpoint was trained on
    paths: PathsConfig = field(default_factory=PathsConfig)  # where dataset=widerface looks
    # The training config's ``eval`` group. Only the keys set on the command line override the
    # checkpoint's values (``evaluate_checkpoint``'s ``eval_keys``).
    eval: EvalConfig = field(default_factory=EvalConfig)
    split: str = "val"  # val | val_all (the whole official val file) | test
    protocol: str = "detection"  # detection | wider (adds the official easy/medium/hard AP)
    save_predictions: Optional[str] = None  # folder for the official submission layout
    gt_dir: Optional[str] = None  # WIDER ground truth (.mat); null: <dataset root>/eval_tools/ground_truth
    batch_size: int = 16
    num_workers: Optional[int] = None  # null: what suits the machine (as dataset.num_workers)
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False  # CUDA only
    output_dir: Optional[str] = None  # null: Hydra's output directory


@dataclass
class PredictConfig:
    """Schema of ``configs/predict.yaml`` (``predict.py``, ``detlab.predictor``)."""

    checkpoint: str = MISSING  # train.py's .pt; with backend=onnx, export.py's .onnx
    source: str = MISSING  # an image, a folder of images (searched recursively), or a video file
    out: Optional[str] = None  # null: Hydra's output directory
    # The training config's ``eval`` group: the keys set on the command line override the checkpoint's.
    eval: EvalConfig = field(default_factory=EvalConfig)
    draw: bool = True  # write each image (or the video) with its boxes drawn
    save_wider: bool = False  # also write the WIDER FACE submission layout into <out>/wider (images only)
    backend: str = "torch"  # torch (PyTorch eager) | onnx (ONNX Runtime on the CPU, an export.py file)
    device: str = "auto"  # auto | cpu | cuda (backend=torch)
    amp: bool = False  # CUDA only


@dataclass
class ExportConfig:
    """Schema of ``configs/export.yaml`` (``scripts/export.py``, ``detlab.export``)."""

    checkpoint: str = MISSING
    format: str = "onnx"  # onnx | torchscript
    out: Optional[str] = None  # null: next to the checkpoint, <stem>.onnx or <stem>.torchscript.pt
    input_size: Optional[list[int]] = None  # [W, H] fixed; null: dynamic H and W (TorchScript: the training size)
    opset: int = 17
    # false: PyTorch's TorchScript-based ONNX exporter (deprecated by PyTorch, 3 s here); true: its
    # torch.export-based one (needs onnxscript, 32 s here). Both are checked the same way.
    dynamo: bool = False
    check: bool = True  # compare the export with eager PyTorch on random images before writing it


def typed_entry_config(raw: Any, schema: type, error: type[Exception]) -> Any:
    """An entry point's composed Hydra config as its typed ``schema`` object; a value of the wrong
    type is one ``error`` naming the key."""
    try:
        run = OmegaConf.to_object(raw)
    except OmegaConfBaseException as failure:
        raise error(f"{getattr(failure, 'full_key', '?')}: {str(failure).splitlines()[0]}") from None
    assert isinstance(run, schema)
    return run


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore, so ``configs/*.yaml`` can name them in their
    defaults lists: the entry configs (``config_schema`` of train.py, ``evaluate_schema``,
    ``predict_schema``, ``export_schema``) and the groups'. The entry points call it before Hydra
    composes; nothing registers on import."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="predict_schema", node=PredictConfig)
    store.store(name="export_schema", node=ExportConfig)
    store.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="loss", name="loss_schema", node=LossConfig)
    store.store(group="optim", name="optim_schema", node=OptimConfig)
    store.store(group="schedule", name="schedule_schema", node=ScheduleConfig)
    store.store(group="eval", name="eval_schema", node=EvalConfig)
    store.store(group="diagnosis", name="diagnosis_schema", node=DiagnosisConfig)
    store.store(group="early_stopping", name="early_stopping_schema", node=EarlyStoppingConfig)


def _check(condition: bool, key: str, message: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"config error: {key}={value!r}: {message}")


def _choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, key, f"expected one of {', '.join(allowed)}", value)


def validate(cfg: Config) -> None:
    """Check value ranges that types alone cannot express. Raises ``ConfigError``."""
    d, m, lo, o, s, t, e = cfg.dataset, cfg.model, cfg.loss, cfg.optim, cfg.schedule, cfg.train, cfg.eval
    _choice(d.name, "dataset.name", ("synthetic", "widerface"))
    _choice(d.on_bad_image, "dataset.on_bad_image", ("error", "skip"))
    _choice(d.split.mode, "dataset.split.mode", ("official", "random"))
    _choice(d.split.source, "dataset.split.source", ("train", "val"))
    ratios = list(d.split.ratios)
    _check(len(ratios) in (2, 3) and all(r >= 0 for r in ratios) and 0 < sum(ratios) <= 1 + 1e-9,
           "dataset.split.ratios", "expected 2 or 3 non-negative shares summing to at most 1", ratios)
    _check(d.min_face_size >= 0, "dataset.min_face_size", "must be >= 0", d.min_face_size)
    _check(d.num_workers is None or d.num_workers >= 0, "dataset.num_workers", "must be >= 0 or null (auto)",
           d.num_workers)
    _choice(d.cache, "dataset.cache", ("none", "ram", "disk"))
    _check(d.cache_max_side is None or d.cache_max_side >= 32, "dataset.cache_max_side",
           "must be >= 32 pixels or null", d.cache_max_side)
    _check(d.cache_max_bytes is None or d.cache_max_bytes >= 0, "dataset.cache_max_bytes",
           "must be >= 0 bytes or null (a quarter of the machine's memory)", d.cache_max_bytes)
    _check(d.synthetic.num_images >= 2, "dataset.synthetic.num_images", "must be >= 2", d.synthetic.num_images)
    _check(0 < d.synthetic.val_fraction < 1, "dataset.synthetic.val_fraction", "must be in (0, 1)",
           d.synthetic.val_fraction)
    for key in ("image_width", "image_height"):
        value = getattr(d.synthetic, key)
        _check(value >= 64, f"dataset.synthetic.{key}", "must be >= 64 pixels", value)

    _choice(m.name, "model.name", ("ssd_slim", "ssd_mobilenet_v2", "ssdlite", "ssd_vgg16"))
    _check(m.input_width > 0 and m.input_height > 0, "model.input_width/input_height", "must be > 0",
           (m.input_width, m.input_height))
    _check(m.num_classes >= 2, "model.num_classes", "must be >= 2 (background + face)", m.num_classes)
    _check(len(m.feature_strides) == len(m.min_sizes), "model.min_sizes",
           f"needs one list per feature stride ({len(m.feature_strides)})", m.min_sizes)
    _check(len(m.variances) == 2 and all(v > 0 for v in m.variances), "model.variances",
           "expected two positive numbers", m.variances)
    _check(0 < m.match_iou <= 1, "model.match_iou", "must be in (0, 1]", m.match_iou)
    _check(m.ignore_iou is None or 0 <= m.ignore_iou < m.match_iou, "model.ignore_iou",
           f"must be in [0, model.match_iou={m.match_iou}) or null", m.ignore_iou)

    _check(lo.class_weight >= 0, "loss.class_weight", "must be >= 0", lo.class_weight)
    _check(lo.box_weight >= 0, "loss.box_weight", "must be >= 0", lo.box_weight)
    _check(lo.class_weight + lo.box_weight > 0, "loss.class_weight+box_weight", "must not both be 0",
           (lo.class_weight, lo.box_weight))
    _choice(lo.box_loss, "loss.box_loss", ("huber", "l1"))
    _check(lo.huber_delta > 0, "loss.huber_delta", "must be > 0", lo.huber_delta)
    _check(lo.neg_pos_ratio >= 0, "loss.neg_pos_ratio", "must be >= 0 (0: all negatives)", lo.neg_pos_ratio)
    _check(lo.min_negatives >= 1, "loss.min_negatives", "must be >= 1", lo.min_negatives)
    rb = lo.rebalance
    _check(rb.target >= 1, "loss.rebalance.target", "must be >= 1", rb.target)
    _check(0 < rb.class_heavy_target <= 1, "loss.rebalance.class_heavy_target", "must be in (0, 1]",
           rb.class_heavy_target)
    _check(0 < rb.min_factor <= 1 <= rb.max_factor, "loss.rebalance.min_factor/max_factor",
           "need 0 < min_factor <= 1 <= max_factor", (rb.min_factor, rb.max_factor))
    _check(0 <= rb.raise_class_share <= 1, "loss.rebalance.raise_class_share", "must be in [0, 1]",
           rb.raise_class_share)

    _choice(o.name, "optim.name", ("sgd", "adamw"))
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)", (o.beta1, o.beta2))
    _check(o.lr > 0, "optim.lr", "must be > 0", o.lr)
    _check(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)", o.momentum)
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _check(not o.nesterov or o.momentum > 0, "optim.nesterov", "needs momentum > 0", o.nesterov)
    _check(o.grad_clip_norm is None or o.grad_clip_norm > 0, "optim.grad_clip_norm", "must be > 0 or null",
           o.grad_clip_norm)

    _choice(s.after_warmup, "schedule.after_warmup", ("constant", "multistep", "cosine"))
    _check(s.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0", s.warmup_epochs)
    _check(s.warmup_steps is None or s.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0",
           s.warmup_steps)
    _check(0 < s.warmup_start_factor <= 1, "schedule.warmup_start_factor", "must be in (0, 1]",
           s.warmup_start_factor)
    _check(all(0 < x < 1 for x in s.milestones), "schedule.milestones", "fractions in (0, 1)", s.milestones)
    _check(0 < s.gamma <= 1, "schedule.gamma", "must be in (0, 1]", s.gamma)

    _check(t.epochs >= 1, "train.epochs", "must be >= 1", t.epochs)
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1", t.batch_size)
    _choice(t.device, "train.device", ("auto", "cpu", "cuda"))
    _choice(t.dist_backend, "train.dist_backend", ("auto", "gloo", "nccl"))
    _check(t.log_every >= 1, "train.log_every", "must be >= 1", t.log_every)
    _check(0 <= t.sample_grid <= 64, "train.sample_grid", "must be in [0, 64]", t.sample_grid)
    _check(t.objective in METRIC_COLUMNS and t.objective.startswith("val/"), "train.objective",
           "expected a val/ column of metrics.csv (val/ap50, val/miou, val/recall, ...)", t.objective)

    _check(0 < e.iou_threshold <= 1, "eval.iou_threshold", "must be in (0, 1]", e.iou_threshold)
    _check(0 <= e.score_threshold <= 1, "eval.score_threshold", "must be in [0, 1]", e.score_threshold)
    _check(0 < e.nms_iou <= 1, "eval.nms_iou", "must be in (0, 1]", e.nms_iou)
    _check(0 <= e.score_floor < 1, "eval.score_floor", "must be in [0, 1)", e.score_floor)
    _check(e.pre_nms_top_k >= 1, "eval.pre_nms_top_k", "must be >= 1", e.pre_nms_top_k)
    _check(e.max_detections >= 1, "eval.max_detections", "must be >= 1", e.max_detections)
    _check(e.gallery_every >= 0, "eval.gallery_every", "must be >= 0 (0: no galleries)", e.gallery_every)
    _check(1 <= e.gallery_size <= 32, "eval.gallery_size", "must be in [1, 32]", e.gallery_size)
    _check(e.test_protocol in (None, "detection", "wider"), "eval.test_protocol",
           "expected null, detection or wider", e.test_protocol)
    _check(test_input_size(e.input_size) is not INVALID_SIZE, "eval.input_size",
           "expected null, [W, H], a longer-side length N (int) or original", e.input_size)
    _check(len(e.size_edges) == 2 and 0 < e.size_edges[0] < e.size_edges[1], "eval.size_edges",
           "expected two increasing positive edges (small|medium, medium|large)", e.size_edges)

    st = cfg.stages
    _check(st.early_end_fraction is None or 0 < st.early_end_fraction < 1, "stages.early_end_fraction",
           "must be in (0, 1) or null", st.early_end_fraction)
    _check(0 < st.late_start_fraction < 1, "stages.late_start_fraction", "must be in (0, 1)",
           st.late_start_fraction)
    cfg.diagnosis.preflight = preflight_mode(cfg.diagnosis.preflight)  # a YAML `off` arrives as "False"
    for problem in config_problems(cfg.diagnosis):  # each detector validates its own block
        _check(False, problem.key, problem.message, problem.value)

    es = cfg.early_stopping
    _check(es.monitor in METRIC_COLUMNS and es.monitor.startswith(("val/", "train/")), "early_stopping.monitor",
           "expected a train/ or val/ column of metrics.csv (val/miou, val/ap50, val/loss_total, ...)", es.monitor)
    _choice(es.mode, "early_stopping.mode", ("auto", "max", "min"))
    _check(es.patience is None or es.patience >= 1, "early_stopping.patience", "must be >= 1 or null", es.patience)
    _check(es.min_delta >= 0, "early_stopping.min_delta", "must be >= 0", es.min_delta)

    aw = lo.adaptive_weights
    _choice(aw.shape, "loss.adaptive_weights.shape", ("linear", "cosine"))
    _check(aw.start_box_factor >= 0 and aw.start_class_factor >= 0, "loss.adaptive_weights.start_*_factor",
           "must be >= 0", (aw.start_class_factor, aw.start_box_factor))
    _check(0 <= aw.ramp_start_fraction <= aw.ramp_end_fraction <= 1, "loss.adaptive_weights.ramp_*_fraction",
           "expected 0 <= ramp_start_fraction <= ramp_end_fraction <= 1",
           (aw.ramp_start_fraction, aw.ramp_end_fraction))


INVALID_SIZE = object()


def test_input_size(value: Any) -> Any:
    """``eval.input_size`` normalised: ``None`` | ``(W, H)`` | ``int`` (longer side) | ``"original"``;
    ``INVALID_SIZE`` when it is none of those."""
    if value is None or value == "original":
        return value
    if isinstance(value, bool):
        return INVALID_SIZE
    if isinstance(value, int):
        return value if value >= 32 else INVALID_SIZE
    try:
        size = [int(v) for v in value]
    except (TypeError, ValueError):
        return INVALID_SIZE
    return tuple(size) if len(size) == 2 and all(v >= 32 for v in size) else INVALID_SIZE


def to_config(cfg: DictConfig | Config) -> Config:
    """Turn Hydra's DictConfig into the typed ``Config`` and validate it."""
    if isinstance(cfg, Config):
        obj = cfg
    else:
        container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        try:
            merged = OmegaConf.merge(OmegaConf.structured(Config), container)
            obj = OmegaConf.to_object(merged)
        except OmegaConfBaseException as error:  # an unknown key (``+loss.box_wieght=...``) or a wrong type
            raise ConfigError(_schema_message(error)) from None
    assert isinstance(obj, Config)
    validate(obj)
    return obj


def _schema_message(error: OmegaConfBaseException) -> str:
    """One line for a schema violation: the full key, what is wrong, the closest known key."""
    key = getattr(error, "full_key", None) or "?"
    if isinstance(error, ConfigKeyError):
        parent, _, leaf = key.rpartition(".")
        node: Any = Config()
        for part in parent.split(".") if parent else ():
            node = getattr(node, part, None)
        known = [f.name for f in fields(node)] if node is not None and is_dataclass(node) else []
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
        return f"config error: {key}: unknown key (not in the schema, src/detlab/config.py){hint}"
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"config error: {key}: {reason}"


def load_saved_config(saved: Any) -> Config:
    """A config saved by a run (checkpoint ``config``, run folder ``config.yaml``), typed and validated
    like a new one."""
    container = OmegaConf.to_container(saved, resolve=True) if isinstance(saved, DictConfig) else saved
    container = copy.deepcopy(dict(container))
    drop_retired_placeholders(container)
    move_repair_keys(container)
    keep_v1_judgement(container)
    keep_v2_judgement(container)
    keep_v5_judgement(container)
    return to_config(OmegaConf.create(container))


def compose_config(configs: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> Config:
    """train.py's ``config.yaml`` composed with train.py-style ``overrides`` outside a Hydra app
    (scripts, tests), then typed and validated like train.py's. ``configs``: the config folder,
    by default the installed one (``detlab.paths.config_dir()``)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    folder = Path(configs) if configs is not None else config_dir()
    with initialize_config_dir(config_dir=str(folder.resolve()), version_base="1.3"):
        return to_config(compose("config", overrides=list(overrides)))


def as_flat_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config dataclass into ``{"loss.box_weight": 0.05, ...}`` (HParams, reports)."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            out.update(as_flat_dict(value, prefix=f"{key}."))
        else:
            out[key] = value
    return out
