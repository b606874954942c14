"""The pre-flight checks (``detlab.engine.preflight``): known answers for each check on its own, the
checks on a built run (nothing it computes changes), and the run's stop, record and exit code."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from detlab.config import Config, ModelConfig, ScheduleConfig, compose_config, load_saved_config
from detlab.data.wider import (XYWH, XYXY_READ_AS_XYWH, WiderFaceDataset, box_format_guess, box_problems, face_line,
                               parse_wider_annotations)
from detlab.engine.preflight import (FATAL, INFO, WARNING, PreflightError, anchor_coverage, box_findings,
                                     coverage_findings, empty_image_findings, input_findings, model_findings,
                                     preflight_error, report_block, run_preflight, schedule_findings)
from detlab.errors import ConfigError
from detlab.loss import build_criterion
from detlab.model import build_model, generate_anchors
from detlab.model.matching import best_anchor_iou, smallest_matchable_face

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 320, 256
ANYWHERE_DEFAULT = 13.0  # ssd_slim at 320 x 256: at the worst offset from the anchors' centres, a 16-px anchor fits it


def faces(n: int = 200, seed: int = 0, width: int = WIDTH, height: int = HEIGHT, sides=(12.0, 60.0)) -> np.ndarray:
    """``n`` face boxes xyxy inside a ``width x height`` image, 1.25 times taller than wide."""
    g = np.random.default_rng(seed)
    w = g.uniform(*sides, n)
    h = 1.25 * w
    x1, y1 = g.uniform(0, width - w), g.uniform(0, height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1)


def sizes(n: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    return np.tile([float(width), float(height)], (n, 1))


def checks(findings, severity=None) -> list[str]:
    return [f.check for f in findings if severity is None or f.severity == severity]


def locate(i: int) -> str:
    return f"box #{i}"


# ------------------------------------------------------------------------------------------ boxes
def test_box_problems_name_each_box_once_in_their_order_of_precedence():
    boxes = np.array([[10, 10, 30, 40],      # fine
                      [30, 10, 10, 40],      # flipped (x)
                      [10, 10, 10, 40],      # zero width
                      [0.1, 0.2, 0.3, 0.5],  # normalised
                      [np.nan, 1, 2, 3],     # not finite
                      [400, 10, 420, 40],    # wholly outside a 320 x 256 image
                      [300, 10, 330, 40],    # 10 px past its right edge
                      [0.5, 0.5, 0.5, 0.9]])  # within [0, 1] but of zero width: zero_size, not normalised
    problems = box_problems(boxes, sizes(len(boxes)))
    named = {name: np.flatnonzero(mask).tolist() for name, mask in problems.items() if mask.any()}
    assert named == {"flipped": [1], "zero_size": [2, 7], "normalised": [3], "not_finite": [4],
                     "outside_image": [5], "past_edge": [6]}
    assert "outside_image" not in box_problems(boxes)  # without the images' sizes: not judged


def test_flipped_zero_size_and_outside_boxes_are_counted_with_the_first_one_named():
    boxes = faces()
    boxes[[7, 20, 40]] = boxes[[7, 20, 40]][:, [2, 1, 0, 3]]  # x1 and x2 swapped on three boxes
    boxes[[50, 51]] = np.concatenate([boxes[[50, 51], :2], boxes[[50, 51], :2]], axis=1)  # collapsed to a point
    boxes[[60]] += [WIDTH, 0, WIDTH, 0]  # shifted right by the image's width
    found = {f.check: f for f in box_findings(boxes, sizes(len(boxes)), "in the test set", locate)}
    assert set(found) == {"boxes_flipped", "boxes_zero_size", "boxes_outside_image"}
    assert found["boxes_flipped"].message == ("3 of 200 (1.5%) boxes in the test set are flipped (x2 < x1 or y2 < y1); "
                                              "first at box #7")
    assert found["boxes_zero_size"].message.startswith("2 of 200 (1.0%) boxes in the test set have zero width or height")
    assert found["boxes_outside_image"].message.startswith("1 of 200 (0.5%) boxes in the test set lie wholly outside")
    assert all(f.severity == WARNING and f.fix for f in found.values())
    assert found["boxes_flipped"].fix == "swap the coordinates so that x1 < x2 and y1 < y2 (xyxy)"


def test_xywh_boxes_are_named_as_a_format_not_as_flipped_boxes():
    boxes = faces()
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    problems = box_problems(xywh, sizes(200))
    assert box_format_guess(xywh, problems, sizes(200)) == XYWH
    found = box_findings(xywh, sizes(200), "in the test set", locate)
    assert checks(found) == ["box_format"]
    assert "look like x y w h where x1 y1 x2 y2 is expected" in found[0].message
    assert found[0].message.startswith(f"{int(problems['flipped'].sum())} of 200 (")
    assert "x2 = x + w" in found[0].fix
    # Only x1 and x2 swapped (y is right): a flip, not a format.
    swapped = faces()[:, [2, 1, 0, 3]]
    assert box_format_guess(swapped, box_problems(swapped, sizes(200)), sizes(200)) is None
    assert checks(box_findings(swapped, sizes(200), "here", locate)) == ["boxes_flipped"]


def test_normalised_boxes_are_named_and_no_face_can_then_be_matched():
    boxes = faces() / [WIDTH, HEIGHT, WIDTH, HEIGHT]
    found = box_findings(boxes, sizes(200), "in the test set", locate)
    assert checks(found) == ["boxes_normalised"]
    assert found[0].message.startswith("200 of 200 (100.0%) boxes in the test set lie within [0, 1] in every coordinate")
    coverage = anchor_coverage(torch.zeros((0, 4)), slim_anchors(), 0.35, (16, 64))
    verdict = coverage_findings(coverage, None, 0.35, 0.3, (10, 256), (6.0, 9.5), unusable=200)
    assert [(f.check, f.severity) for f in verdict] == [("anchor_coverage", FATAL)]
    assert verdict[0].message.startswith("no face can be matched: none of the 200 annotated boxes is usable")


def test_an_xyxy_annotation_file_read_as_wider_xywh_is_named_with_its_line(tmp_path):
    boxes = faces(40).round()
    lines = []
    for k in range(4):
        lines += [f"0--Event/{k}.jpg", "10"]
        lines += [f"{int(x1)} {int(y1)} {int(x2)} {int(y2)} 0 0 0 0 0 0" for x1, y1, x2, y2 in boxes[10 * k:10 * k + 10]]
    path = tmp_path / "wider_face_train_bbx_gt.txt"
    path.write_text("\n".join(lines) + "\n")
    records = parse_wider_annotations(path)
    read = np.concatenate([r.boxes for r in records])  # x1 y1 x2 y2 taken for x1 y1 w h
    assert box_format_guess(read, box_problems(read, sizes(40)), sizes(40)) == XYXY_READ_AS_XYWH
    # The parsed box of image 2's fourth face is on line 2 * 12 + 2 + 4 of the file.
    assert face_line(path, "0--Event/2.jpg", records[2].boxes[3]) == 2 * 12 + 2 + 4
    found = box_findings(read, sizes(40), "in the training annotations",
                         lambda i: f"{path}:{face_line(path, records[i // 10].path, read[i])}")
    assert checks(found) == ["box_format"]
    assert "the annotation file looks like x1 y1 x2 y2 where WIDER's x1 y1 w h is expected; first at " \
           f"{path}:3" in found[0].message
    # A true WIDER file (x1 y1 w h) is not.
    assert box_format_guess(boxes, box_problems(boxes, sizes(40)), sizes(40)) is None


# ----------------------------------------------------------------------------------- empty images
def test_ninety_percent_of_images_without_faces_is_a_warning():
    counts = np.array([0] * 90 + [3] * 10)
    found = empty_image_findings(counts, None, max_share=0.6, keep_empty=True)
    assert [(f.check, f.severity) for f in found] == [("empty_images", WARNING)]
    assert found[0].message.startswith("90 of 100 (90.0%) training images have no face in the annotations")
    assert "dataset.keep_empty=false" in found[0].fix
    healthy = empty_image_findings(np.array([0] * 8 + [2] * 92), np.array([1, 2, 0, 3]), 0.6, True)
    assert [(f.check, f.severity) for f in healthy] == [("empty_images", INFO)]
    # Faces in the annotations, none in the batch: lost on the way.
    lost = empty_image_findings(np.array([2] * 100), np.array([0] * 7 + [1]), 0.6, True)
    assert [f.severity for f in lost] == [INFO, WARNING] and "faces are lost on the way" in lost[1].message


# -------------------------------------------------------------------------------- anchor coverage
def slim_anchors(scale: float = 1.0, size=(WIDTH, HEIGHT)) -> torch.Tensor:
    cfg = ModelConfig()
    return generate_anchors(size, cfg.feature_strides, [[s * scale for s in level] for level in cfg.min_sizes])


def test_best_anchor_iou_equals_box_iou_over_every_anchor():
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

    from detlab.model import default_box_anchors

    g = torch.Generator().manual_seed(0)
    corner = torch.rand(3000, 2, generator=g) * 300
    boxes = torch.cat([corner, corner + 1 + torch.rand(3000, 2, generator=g) * 120], dim=1)
    generator = DefaultBoxGenerator([[2, 3]] * 3, min_ratio=0.2, max_ratio=0.95)
    maps = [torch.zeros(1, 8, 320 // s, 320 // s) for s in (16, 32, 64)]
    for anchors in (slim_anchors(), default_box_anchors(generator, (320, 320), maps),
                    slim_anchors()[torch.randperm(4700, generator=g)[:1000]]):  # the last: no grid, box_iou
        expected = box_iou(boxes, anchors).amax(dim=1)
        assert torch.allclose(best_anchor_iou(boxes, anchors), expected, atol=1e-5)


def test_the_smallest_matchable_face_is_the_smallest_anchor_times_the_root_of_the_threshold():
    anchors = generate_anchors((64, 64), [8], [[10]])
    somewhere, anywhere = smallest_matchable_face(anchors, 0.35, (64, 64))
    assert somewhere == 6.0  # 10 * sqrt(0.35) = 5.92, on a 0.5 px grid
    # 4 px off in x and y (half the stride) no square face reaches 0.35 with a 10-px anchor: at most
    # 100 / 18**2 = 0.31 (the anchor inside an 18-px face).
    assert anywhere == math.inf
    assert smallest_matchable_face(slim_anchors(), 0.35, (WIDTH, HEIGHT)) == (6.0, ANYWHERE_DEFAULT)


def test_anchors_four_times_too_large_match_no_face_a_fatal_finding():
    small = faces(300, sides=(10.0, 20.0))
    coverage = anchor_coverage(torch.from_numpy(small), slim_anchors(4.0), 0.35, (16, 64))
    assert coverage.faces == 300 and coverage.covered == 0
    found = coverage_findings(coverage, (40, 0), 0.35, 0.3, (40, 1024), (24.0, 38.0))
    assert [(f.check, f.severity) for f in found] == [("anchor_coverage", FATAL), ("smallest_face", INFO)]
    assert found[0].message.startswith("no face can be matched: an anchor fits 0 of 300 (0.0%) training faces at "
                                       "model.match_iou=0.35")
    assert "model.min_sizes" in found[0].fix and "model.match_iou=0.25" in found[0].fix
    # The default anchors fit them all.
    fitted = anchor_coverage(torch.from_numpy(small), slim_anchors(), 0.35, (16, 64))
    assert fitted.covered == 300 and fitted.buckets["small (< 16 px)"][0] == int((small[:, 3] - small[:, 1] < 16).sum())
    verdict = coverage_findings(fitted, (40, 39), 0.35, 0.3, (10, 256), (6.0, 9.5))
    assert checks(verdict, FATAL) + checks(verdict, WARNING) == []
    # Only the batch (a dataset without records): no face of ten or more matched is fatal too.
    assert checks(coverage_findings(None, (12, 0), 0.35, 0.3, (40, 1024), (24.0, 38.0)), FATAL) == ["anchor_coverage"]


# ------------------------------------------------------------------------------------- the input
def test_raw_pixels_are_named_and_normalised_ones_are_not():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (4, 3, 32, 32), generator=g).float()
    found = input_findings(raw, 0.05, 5.0, 3.0)
    assert [(f.check, f.severity) for f in found] == [("input_statistics", WARNING)]
    assert "raw 0-255 pixels, not normalised" in found[0].message and "Normalize" in found[0].fix
    normal = input_findings(torch.randn(4, 3, 32, 32, generator=g), 0.05, 5.0, 3.0)
    assert [(f.check, f.severity) for f in normal] == [("input_statistics", INFO)]


# ------------------------------------------------------------------------------- the lr schedule
def schedule_config(epochs: int, **schedule) -> Config:
    cfg = Config()
    cfg.train.epochs = epochs
    cfg.schedule = ScheduleConfig(**schedule)
    return cfg


def test_a_warm_up_longer_than_the_run_is_a_warning_with_the_override():
    cfg = schedule_config(2, warmup_epochs=5.0)  # 5 epochs of warm-up in a 2-epoch run of 25 steps each
    found = schedule_findings(cfg, 50, 25)
    assert [(f.check, f.severity) for f in found] == [("lr_schedule", WARNING)]
    assert found[0].message.startswith("the learning rate still rises at the last step: the warm-up (125 steps) is "
                                       "as long as the run (2 epochs of 25 steps = 50)")
    assert found[0].fix.startswith("schedule.warmup_epochs=0.2 (a tenth of the run)")
    steps = schedule_findings(schedule_config(2, warmup_steps=80), 50, 25)
    assert steps[0].fix.startswith("schedule.warmup_steps=5")


def test_the_default_schedule_ends_where_it_should_and_a_collapsed_multistep_does_not():
    healthy = schedule_findings(schedule_config(15), 375, 25)
    assert [(f.check, f.severity) for f in healthy] == [("lr_schedule", INFO)]
    assert healthy[0].evidence["final_lr"] == pytest.approx(1e-4) and healthy[0].evidence["peak_lr"] == 0.01
    # One step: both milestones of multistep fall on it, so the lr ends at lr x 0.1, not lr x 0.01.
    short = schedule_findings(schedule_config(1, warmup=False, after_warmup="multistep"), 1, 1)
    assert [(f.check, f.severity) for f in short] == [("lr_schedule", WARNING)]
    assert short[0].message.startswith("the schedule ends at lr 0.001, not at 0.0001 (multistep ends at")


# ------------------------------------------------------------------------------------- the model
def tiny_model(**changes) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    cfg = Config()
    cfg.model.input_width, cfg.model.input_height = 160, 128
    for key, value in changes.items():
        setattr(cfg.loss, key, value)
    model = build_model(cfg.model)
    return model, build_criterion(cfg, model)


def tiny_batch() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 128, 160, generator=g)
    boxes = [torch.from_numpy(faces(5, seed=i, width=160, height=128, sides=(10.0, 70.0))).float() for i in range(4)]
    return images, boxes


def test_a_healthy_model_gives_a_finite_first_loss_and_reaches_every_parameter():
    model, criterion = tiny_model()
    images, boxes = tiny_batch()
    found = model_findings(model, criterion, images, boxes, autocast=None)
    assert [(f.check, f.severity) for f in found] == [("first_loss", INFO)]
    assert all(p.grad is None for p in model.parameters())  # the backward's gradients are dropped


def test_a_layer_the_loss_does_not_reach_is_named_and_a_frozen_backbone_is_not():
    model, criterion = tiny_model()
    model.unused = nn.Linear(8, 8)  # an extra layer the forward never calls
    found = model_findings(model, criterion, *tiny_batch(), autocast=None)
    unreached = [f for f in found if f.check == "unreached_parameters"]
    assert len(unreached) == 1 and unreached[0].severity == WARNING
    assert "the loss does not reach 2 of" in unreached[0].message and "unused.weight, unused.bias" in unreached[0].message
    assert unreached[0].evidence["weights"] == 72

    frozen, criterion = tiny_model()
    for parameter in frozen.backbone.parameters():
        parameter.requires_grad_(False)
    assert checks(model_findings(frozen, criterion, *tiny_batch(), autocast=None)) == ["first_loss"]
    # A zero box weight leaves the regression head without a gradient from this loss: configured, not unreached.
    model, criterion = tiny_model(box_weight=0.0)
    assert checks(model_findings(model, criterion, *tiny_batch(), autocast=None)) == ["first_loss"]


def test_a_non_finite_first_loss_is_fatal_and_names_the_parameter():
    model, criterion = tiny_model()
    with torch.no_grad():
        model.head.classification[0][-1].bias.fill_(float("nan"))
    found = model_findings(model, criterion, *tiny_batch(), autocast=None)
    assert [(f.check, f.severity) for f in found] == [("first_loss", FATAL)]
    assert found[0].message.startswith("the first loss is not finite (loss_cls=nan")
    assert "the parameters head.classification.0.2.bias hold NaN or infinite values" in found[0].message
    assert "model.backbone_weights" in found[0].fix


def test_a_float16_overflow_of_the_first_forward_is_fatal_and_named_as_such():
    from benchmarks.diagnosis.faults import model_factory

    torch.manual_seed(0)
    model = model_factory("fp16_overflow")(ModelConfig(input_width=160, input_height=128))  # conv1 x 1e6
    criterion = build_criterion(Config(), model)
    # float16 autocast as AMP on CUDA runs it (here on the CPU, which autocasts float16 the same way)
    images, boxes = tiny_batch()
    found = model_findings(model, criterion, images[:2], boxes[:2], autocast=torch.float16)
    assert [(f.check, f.severity) for f in found] == [("fp16_overflow", FATAL)]
    assert found[0].message.startswith("under float16 autocast the first forward overflows: the output of "
                                       "backbone.stages.0.0.0 is the first to overflow")
    assert found[0].fix.startswith("train.amp=false")
    assert math.isfinite(found[0].evidence["fp32_loss_total"]) and not math.isfinite(found[0].evidence["loss_total"])
    # bfloat16 (AMP on the CPU) has float32's range: no overflow
    assert checks(model_findings(model, criterion, *tiny_batch(), autocast=torch.bfloat16)) == ["first_loss"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (AMP float16)")
def test_a_float16_overflow_on_cuda_is_found_by_the_whole_check(synthetic_root, tiny_config):
    from benchmarks.diagnosis.faults import model_factory

    trainer = built(tiny_config, synthetic_root, "train.device=cuda", "train.amp=true",
                    model_factory=model_factory("fp16_overflow"))
    report = preflight(trainer)
    assert [f.check for f in report.findings if f.severity == FATAL] == ["fp16_overflow"]


# ----------------------------------------------------------------------------------- the report
def test_a_fatal_report_stops_with_one_line_naming_the_fix():
    report = {"mode": "on", "seconds": 1.234, "fatal": 1, "warnings": 0, "notes": 1, "findings": [
        {"check": "first_loss", "severity": FATAL, "message": "the first loss is not finite", "fix": "check x",
         "evidence": {}},
        {"check": "lr_schedule", "severity": INFO, "message": "lr 0.01", "fix": "", "evidence": {}}]}
    error = preflight_error(report)
    assert isinstance(error, PreflightError) and "\n" not in str(error)
    assert str(error) == ("pre-flight: first_loss: the first loss is not finite; fix: check x; the run stopped before "
                          "training (diagnosis.preflight=warn trains anyway)")
    assert report_block(report).splitlines() == [
        "pre-flight (diagnosis.preflight=on): 1 fatal, 0 warnings, 1 note in 1.23 s",
        "  FATAL   first_loss: the first loss is not finite -> fix: check x",
        "  note    lr_schedule: lr 0.01"]


def test_the_end_of_run_table_counts_the_preflight_and_names_what_it_found():
    from detlab.engine.loggers import summary_table
    from detlab.run_record import RunStatus, RunSummary

    preflight = {"mode": "on", "seconds": 1.234, "fatal": 1, "warnings": 1, "notes": 0, "findings": [
        {"check": "first_loss", "severity": FATAL, "message": "m", "fix": "f", "evidence": {}},
        {"check": "lr_schedule", "severity": WARNING, "message": "m", "fix": "f", "evidence": {}}]}
    table = summary_table(RunSummary(status=RunStatus.FAILED, preflight=preflight), "/runs/x").splitlines()
    assert table[-3] == "pre-flight: 1 fatal, 1 warning(s), 0 note(s) in 1.2 s: first_loss (fatal), lr_schedule (warning)"
    assert not any("pre-flight" in line for line in summary_table(RunSummary(), "/runs/x").splitlines())


# ----------------------------------------------------------------------------------- the config
def test_the_preflight_key_takes_on_warn_off_and_names_them_otherwise():
    assert compose_config().diagnosis.preflight == "on"
    assert compose_config(overrides=["diagnosis.preflight=warn"]).diagnosis.preflight == "warn"
    # YAML 1.1 reads a bare off / on as a boolean: it still means off / on.
    assert compose_config(overrides=["diagnosis.preflight=false"]).diagnosis.preflight == "off"
    with pytest.raises(ConfigError, match=r"^config error: diagnosis\.preflight='maybe': expected one of on, warn, off$"):
        compose_config(overrides=["diagnosis.preflight=maybe"])


def test_a_config_saved_before_the_key_existed_loads_with_it_on():
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.structured(Config()))
    del saved["diagnosis"]["preflight"]
    assert load_saved_config(saved).diagnosis.preflight == "on"
    saved["diagnosis"]["preflight"] = False  # a hand-written `preflight: off`
    assert load_saved_config(saved).diagnosis.preflight == "off"


# ------------------------------------------------------------------------ the checks on a built run
def built(tiny_config, root: Path, *overrides: str, **factories):
    """A Trainer of the tiny config, built (data, model, criterion, schedule) but not run."""
    from detlab.engine.trainer import Trainer

    trainer = Trainer(tiny_config(root, *overrides), root / "unused", **factories)
    trainer._build()
    return trainer


def preflight(trainer):
    return run_preflight(trainer.cfg, trainer.data.train_set, trainer.data.train_loader.collate_fn, trainer.model,
                         trainer.parts.criterion, trainer.device, trainer.parts.amp, trainer.total_steps,
                         trainer.steps_per_epoch)


def test_a_healthy_run_gets_notes_only_and_keeps_its_state(synthetic_root, tiny_config):
    trainer = built(tiny_config, synthetic_root, "train.epochs=10")  # 20 steps: the 2-step warm-up fits
    buffers = {k: v.clone() for k, v in trainer.model.named_buffers()}
    weights = {k: v.clone() for k, v in trainer.model.named_parameters()}
    generator = torch.get_rng_state()
    report = preflight(trainer)
    assert [f.line() for f in report.findings if f.severity != INFO] == []
    assert {"anchor_coverage", "smallest_face", "empty_images", "input_statistics", "lr_schedule",
            "first_loss"} <= set(checks(report.findings))
    assert all(torch.equal(buffers[k], v) for k, v in trainer.model.named_buffers())  # batch-norm statistics too
    assert all(torch.equal(weights[k], p) and p.grad is None for k, p in trainer.model.named_parameters())
    assert torch.equal(torch.get_rng_state(), generator)
    record = report.to_dict()
    assert record["fatal"] == record["warnings"] == 0 and record["seconds"] > 0 and "model" in record["timings"]
    json.dumps(record)  # summary.json's "preflight"


@pytest.mark.slow  # builds a run (data, model): seconds
def test_an_xyxy_annotation_file_is_named_at_its_line_in_a_built_run(synthetic_root, tiny_config, tmp_path):
    from detlab.data import ensure_synthetic_dataset

    cfg = tiny_config(tmp_path)
    root = ensure_synthetic_dataset(tmp_path, cfg.dataset.synthetic)
    path = root / "wider_face_split" / "wider_face_train_bbx_gt.txt"
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):  # every face line x1 y1 w h -> x1 y1 x2 y2
        fields = line.split()
        if len(fields) == 10 and int(fields[2]) > 0:
            x, y, w, h = (int(v) for v in fields[:4])
            lines[i] = " ".join([str(x), str(y), str(x + w), str(y + h), *fields[4:]])
    path.write_text("\n".join(lines) + "\n")
    report = preflight(built(tiny_config, tmp_path))
    found = {f.check: f for f in report.findings}
    assert found["box_format"].severity == WARNING
    assert f"first at {path}:" in found["box_format"].message


@pytest.mark.slow  # builds a run (data, model): seconds
def test_faults_of_the_benchmark_are_named_in_the_batch(synthetic_root, tiny_config):
    from benchmarks.diagnosis.faults import dataset_factory

    xywh = preflight(built(tiny_config, synthetic_root, dataset_factory=dataset_factory("xywh_boxes")))
    box = [f for f in xywh.findings if f.check == "box_format"]
    assert len(box) == 1 and "in a training batch (after augmentation)" in box[0].message
    raw = preflight(built(tiny_config, synthetic_root, dataset_factory=dataset_factory("not_normalised")))
    assert [f.severity for f in raw.findings if f.check == "input_statistics"] == [WARNING]


@pytest.mark.slow  # builds a run (data, model): seconds
def test_flipped_annotations_are_counted_from_the_records(synthetic_root, tiny_config):
    from detlab.data import build_datasets

    def flip_three_images(cfg):
        train, val = build_datasets(cfg)
        for record in [r for r in train.records if r.num_faces][:3]:
            record.boxes = record.boxes[:, [2, 1, 0, 3]].copy()
        return train, val

    trainer = built(tiny_config, synthetic_root, dataset_factory=flip_three_images)
    flipped = sum(r.num_faces for r in [r for r in trainer.data.train_set.records if r.num_faces][:3])
    total = sum(r.num_faces for r in trainer.data.train_set.records)
    found = [f for f in preflight(trainer).findings if f.check == "boxes_flipped"]
    assert len(found) == 1
    assert found[0].message.startswith(f"{flipped} of {total} (")
    assert "in the training annotations are flipped" in found[0].message and "wider_face_train_bbx_gt.txt:" in found[0].message


@pytest.mark.slow  # builds a run (data, model): seconds
def test_an_unused_layer_added_by_a_model_factory_is_named(synthetic_root, tiny_config):
    def with_an_unused_layer(model_cfg):
        model = build_model(model_cfg)
        model.extra = nn.Conv2d(3, 4, 1)  # never called by the forward
        return model

    report = preflight(built(tiny_config, synthetic_root, model_factory=with_an_unused_layer))
    found = [f for f in report.findings if f.check == "unreached_parameters"]
    assert len(found) == 1 and found[0].severity == WARNING and "extra.weight, extra.bias" in found[0].message


@pytest.mark.slow  # generates the default 1,000-image set and builds the default run
def test_the_default_config_gets_no_warning(tmp_path):
    from detlab.engine.trainer import Trainer

    trainer = Trainer(compose_config(overrides=[f"dataset.root={tmp_path}"]), tmp_path / "unused")
    trainer._build()
    report = preflight(trainer)
    assert [f.line() for f in report.findings if f.severity != INFO] == []
    assert {"anchor_coverage", "smallest_face", "empty_images", "input_statistics", "lr_schedule",
            "first_loss"} == set(checks(report.findings))


def test_real_wider_face_annotations_have_no_box_problem(widerface_root):
    from detlab.data.transforms import build_transforms

    records = parse_wider_annotations(widerface_root / "wider_face_split" / "wider_face_val_bbx_gt.txt")
    dataset = WiderFaceDataset(records, widerface_root / "WIDER_val" / "images", build_transforms(None, (320, 256), False),
                               (320, 256))
    boxes = np.concatenate([r.boxes for r in records])
    owner = np.repeat(np.arange(len(records)), [r.num_faces for r in records])
    image_sizes = dataset.image_sizes(range(len(records)))[owner]
    assert np.isfinite(image_sizes).all()
    assert checks(box_findings(boxes, image_sizes, "in WIDER val", locate), WARNING) == []


# ------------------------------------------------------------------------------------ in a run
def nan_head(model_cfg):
    model = build_model(model_cfg)
    with torch.no_grad():
        model.head.classification[0][-1].bias.fill_(float("nan"))
    return model


@pytest.mark.slow
def test_a_fatal_finding_stops_the_run_before_training_and_the_record_says_why(synthetic_root, tiny_config, tmp_path):
    from detlab.engine.trainer import Trainer

    run = tmp_path / "run"
    with pytest.raises(PreflightError, match=r"^pre-flight: first_loss: the first loss is not finite"):
        Trainer(tiny_config(synthetic_root), run, model_factory=nan_head).run()
    record = json.loads((run / "summary.json").read_text())
    assert record["status"] == "failed" and record["step"] == 0 and "traceback" not in record
    assert record["message"].startswith("PreflightError: pre-flight: first_loss:")
    assert record["preflight"]["fatal"] == 1 and record["preflight"]["mode"] == "on"
    assert record["preflight"]["findings"][0]["check"] == "first_loss"
    assert sorted(p.name for p in run.iterdir()) == [".lock", "summary.json"]  # nothing half-written

    # warn: reported, and the run trains (to its first, non-finite step)
    summary = Trainer(tiny_config(synthetic_root, "diagnosis.preflight=warn"), tmp_path / "warn",
                      model_factory=nan_head).run()
    assert summary["status"] == "diverged" and summary["preflight"]["fatal"] == 1


@pytest.mark.slow
def test_preflight_changes_nothing_a_run_computes_runs_once_and_off_runs_nothing(
        synthetic_root, tiny_config, tmp_path, monkeypatch):
    from detlab.engine import trainer as trainer_module
    from detlab.engine.trainer import train

    on = train(tiny_config(synthetic_root, "train.sample_grid=0"), tmp_path / "on")
    assert on["preflight"]["mode"] == "on" and on["preflight"]["fatal"] == 0

    def refuse(*args, **kwargs):
        raise AssertionError("the pre-flight ran")

    monkeypatch.setattr(trainer_module, "run_preflight", refuse)
    off = train(tiny_config(synthetic_root, "train.sample_grid=0", "diagnosis.preflight=off"), tmp_path / "off")
    assert "preflight" not in off
    assert on["final"] == {**off["final"], **{k: on["final"][k] for k in ("train_time_s", "val_time_s",
                                                                            "pictures_time_s")}}
    # A resumed run does not check again, and keeps the first session's report.
    resumed = train(tiny_config(synthetic_root, "train.sample_grid=0", "train.epochs=2", "resume=true"),
                    tmp_path / "on")
    assert resumed["epochs"] == 2 and resumed["preflight"] == on["preflight"]


@pytest.mark.slow
def test_train_py_exits_2_with_one_line_when_no_face_can_be_matched(synthetic_root, tmp_path):
    run = tmp_path / "run"
    args = [f"dataset.root={synthetic_root}", "dataset.synthetic.num_images=20", "dataset.synthetic.image_width=160",
            "dataset.synthetic.image_height=128", "model.input_width=160", "model.input_height=128",
            "train.batch_size=8", "model.min_sizes=[[400],[500],[600],[700]]", f"run_dir={run}",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: pre-flight: anchor_coverage: no face can be matched")
    record = json.loads((run / "summary.json").read_text())
    assert record["status"] == "failed" and record["preflight"]["fatal"] >= 1
    assert "pre-flight (diagnosis.preflight=on): 1 fatal" in proc.stdout + proc.stderr
    assert math.isfinite(record["preflight"]["seconds"])
