"""Pre-flight checks: what is known to break a run, found before its first optimiser step, in seconds.

The trainer runs them once, after building the run and before the first step, never on a resume
(``diagnosis.preflight``: ``on`` stops the run on a fatal finding, ``warn`` reports only, ``off`` skips
them). They read the training set's parsed annotations (every box at once, vectorised), one batch of
training images as the loader's augmentation makes them, the model's anchors and matcher, the criterion
on that batch with one backward, and the learning-rate schedule stepped on an optimiser of its own:

==========================  ================================================================  ==========
check                       what it names                                                     severity
==========================  ================================================================  ==========
``boxes_*``, ``box_format``  boxes not finite, normalised (0-1), flipped, of zero size,        warning
                            outside their image or past its edge; boxes in another format
                            (``x y w h``, or an ``x1 y1 x2 y2`` file read as WIDER's
                            ``x1 y1 w h``) (``detlab.data.wider.box_problems``)
``empty_images``            the share of images without a face (``diagnosis.empty_images``)  warning
``anchor_coverage``         the share of faces an anchor fits at ``model.match_iou``, per    fatal at 0
                            size bucket (``diagnosis.unmatched_faces.min_coverage``)
``smallest_face``           the smallest face the anchors can fit                             note
``input_statistics``        the input after normalisation (``diagnosis.unnormalised_input``)  warning
``lr_schedule``             an lr still rising at the last step, or a schedule that does not  warning
                            end where its kind says
``first_loss``              a first loss that is not finite                                   fatal
``fp16_overflow``           under fp16 autocast (AMP on CUDA): the first forward overflows, or fatal /
                            within half of float16's range                                    warning
``unreached_parameters``    trainable parameters without a gradient from the loss (frozen    warning
                            ones, ``requires_grad=False``, are left out)
==========================  ================================================================  ==========

Each finding says its evidence in words with numbers and the override or fix. Nothing the run
computes changes: the global generators, the model's buffers (batch-norm statistics) and gradients
are put back; the optimiser and scheduler are not touched. The report (``PreflightReport.to_dict``)
goes into ``summary.json``'s ``preflight`` with its wall time.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from detlab.config import Config
from detlab.data.wider import PAST_EDGE_PIXELS, XYWH, XYXY_READ_AS_XYWH, box_format_guess, box_problems, face_line
from detlab.errors import UserError
from detlab.model.matching import best_anchor_iou, smallest_matchable_face
from detlab.runtime.seeding import rng_state, set_rng_state
from detlab.schedule import expected_final_lr, planned_learning_rates, warmup_steps

log = logging.getLogger(__name__)

FATAL, WARNING, INFO = "fatal", "warning", "info"
SEVERITIES = (FATAL, WARNING, INFO)
BATCH_IMAGES = 16  # images of the one batch drawn (at most train.batch_size)
MODEL_IMAGES = 8  # of them, those the model checks run on (a forward and a backward: the largest cost)
MAX_SIZED_IMAGES = 4000  # images whose size is read from their file header (a seeded sample beyond)
MAX_COVERAGE_FACES = 20000  # faces whose best anchor IoU is computed (a seeded sample beyond)
COVERAGE_BUCKET_SHARE = 0.1  # a size bucket this share of the faces hold is judged on its own
PAST_EDGE_WARNING_SHARE = 0.01  # boxes past their image's edge: a note below this share, a warning above
FLOAT16_MAX = 65504.0
FP16_HEADROOM = 0.5  # an fp16 forward whose largest activation passes this share of FLOAT16_MAX is a warning
GRAD_SCALE = 2.0 ** 16  # the backward's scale under fp16 (GradScaler's first scale): no gradient underflows
WIDER_WIDE_SHARE = 0.008  # WIDER FACE val: boxes at least as wide as their x1 and as tall as their y1


class PreflightError(UserError):
    """A fatal pre-flight finding stopped the run before training (``diagnosis.preflight=on``)."""


@dataclass
class PreflightFinding:
    """One check's verdict: its evidence in words with numbers, and the override or fix."""

    check: str
    severity: str  # fatal | warning | info
    message: str
    fix: str = ""
    evidence: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "severity": self.severity, "message": self.message, "fix": self.fix,
                "evidence": {k: float(v) for k, v in self.evidence.items()}}

    def line(self) -> str:
        return finding_line(self.to_dict())


def finding_line(finding: Mapping[str, Any]) -> str:
    label = {FATAL: "FATAL", WARNING: "warning", INFO: "note"}.get(finding["severity"], finding["severity"])
    fix = f" -> fix: {finding['fix']}" if finding.get("fix") else ""
    return f"{label:<7} {finding['check']}: {finding['message']}{fix}"


@dataclass
class PreflightReport:
    mode: str  # on | warn
    findings: list[PreflightFinding] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part

    def of(self, severity: str) -> list[PreflightFinding]:
        return [f for f in self.findings if f.severity == severity]

    def to_dict(self) -> dict[str, Any]:
        """``summary.json``'s ``preflight``: the findings, fatal first."""
        ordered = sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity))
        return {"mode": self.mode, "seconds": round(self.seconds, 3), "fatal": len(self.of(FATAL)),
                "warnings": len(self.of(WARNING)), "notes": len(self.of(INFO)),
                "timings": {k: round(v, 3) for k, v in self.timings.items()},
                "findings": [f.to_dict() for f in ordered]}


def report_block(report: Mapping[str, Any]) -> str:
    """The log's block: a headline with the counts and the wall time, then one line per finding."""
    def plural(n: int, word: str) -> str:
        return f"{n} {word}" + ("" if n == 1 else "s")

    headline = (f"pre-flight (diagnosis.preflight={report['mode']}): {report['fatal']} fatal, "
                f"{plural(report['warnings'], 'warning')}, {plural(report['notes'], 'note')} in "
                f"{report['seconds']:.2f} s")
    return "\n".join([headline, *(f"  {finding_line(f)}" for f in report["findings"])])


def preflight_error(report: Mapping[str, Any]) -> PreflightError:
    """The one line a fatal report ends the run with: the first fatal finding and its fix."""
    fatal = [f for f in report["findings"] if f["severity"] == FATAL]
    first = fatal[0]
    more = f" (and {len(fatal) - 1} more fatal, see the log)" if len(fatal) > 1 else ""
    fix = f"; fix: {first['fix']}" if first.get("fix") else ""
    return PreflightError(f"pre-flight: {first['check']}: {first['message']}{fix}{more}; the run stopped before "
                          f"training (diagnosis.preflight=warn trains anyway)")


# ------------------------------------------------------------------------------------ wording
def _share(count: int, total: int) -> str:
    return f"{count:,} of {total:,} ({100.0 * count / max(total, 1):.1f}%)"


def _px(value: float) -> str:
    return f"{value:.1f} px" if math.isfinite(value) else "none"


# ---------------------------------------------------------------------------------------- boxes
BOX_TEXT = {
    "not_finite": ("have a NaN or infinite coordinate",
                   "fix or drop these boxes: every coordinate must be a finite number of pixels"),
    "normalised": ("lie within [0, 1] in every coordinate: fractions of the image, not pixels",
                   "multiply x by the image's width and y by its height: the boxes must be xyxy in pixels"),
    "flipped": ("are flipped (x2 < x1 or y2 < y1)", "swap the coordinates so that x1 < x2 and y1 < y2 (xyxy)"),
    "zero_size": ("have zero width or height",
                  "fix or drop them: a face needs x2 > x1 and y2 > y1 (the matcher cannot use it)"),
    "outside_image": ("lie wholly outside their image",
                      "check these annotations: such boxes are dropped when their image is read"),
    "past_edge": (f"reach more than {PAST_EDGE_PIXELS:g} px past their image's edge",
                  "check these annotations: the augmentation clips such boxes to the image"),
}


def box_findings(boxes: np.ndarray, image_sizes: Optional[np.ndarray], where: str,
                 locate: Callable[[int], str], sized_note: str = "") -> list[PreflightFinding]:
    """The box problems of ``boxes`` (``[N, 4]`` xyxy pixels; ``image_sizes`` ``[N, 2]``, NaN where
    unknown) as findings; ``where`` says whose boxes they are, ``locate(i)`` where box ``i`` comes from."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    total = len(boxes)
    if total == 0:
        return []
    problems = box_problems(boxes, image_sizes)
    guess = box_format_guess(boxes, problems, image_sizes)
    findings = []
    if guess == XYWH:
        flipped = problems["flipped"]
        first = int(np.flatnonzero(flipped)[0])
        findings.append(PreflightFinding(
            "box_format", WARNING,
            f"{_share(int(flipped.sum()), total)} boxes {where} are flipped, most in both axes (x2 < x1 and "
            f"y2 < y1), and read as x y w h they fit their images: the boxes look like x y w h where x1 y1 x2 y2 "
            f"is expected; first at {locate(first)}",
            "convert them to xyxy (x2 = x + w, y2 = y + h) where the dataset builds its targets (there is no "
            "dataset.box_format setting)",
            {"boxes": total, "flipped": int(flipped.sum())}))
    elif guess == XYXY_READ_AS_XYWH:
        wide = (boxes[:, 2] - boxes[:, 0] >= boxes[:, 0]) & (boxes[:, 3] - boxes[:, 1] >= boxes[:, 1])
        findings.append(PreflightFinding(
            "box_format", WARNING,
            f"{_share(int(wide.sum()), total)} boxes {where} are at least as wide as their x1 and as tall as their "
            f"y1 ({100 * WIDER_WIDE_SHARE:.1f}% are in WIDER FACE): the annotation file looks like x1 y1 x2 y2 where "
            f"WIDER's x1 y1 w h is expected; first at {locate(int(np.flatnonzero(wide)[0]))}",
            "write each face line as x1 y1 w h (w = x2 - x1, h = y2 - y1)",
            {"boxes": total, "wide": int(wide.sum())}))
    for name, mask in problems.items():
        count = int(mask.sum())
        if count == 0 or (name == "flipped" and guess == XYWH) or (name == "past_edge" and guess == XYXY_READ_AS_XYWH):
            continue
        what, fix = BOX_TEXT[name]
        sized = name in ("outside_image", "past_edge")
        denominator = int(np.isfinite(image_sizes).all(axis=1).sum()) if sized and image_sizes is not None else total
        severity = INFO if name == "past_edge" and count < PAST_EDGE_WARNING_SHARE * denominator else WARNING
        note = f" {sized_note}" if sized and sized_note else ""
        findings.append(PreflightFinding(
            f"boxes_{name}", severity,
            f"{_share(count, denominator)} boxes {where}{note} {what}; first at {locate(int(np.flatnonzero(mask)[0]))}",
            fix, {"boxes": denominator, name: count}))
    return findings


def usable_boxes(boxes: np.ndarray, image_sizes: Optional[np.ndarray] = None) -> np.ndarray:
    """``[N]`` bool: the boxes a matcher can use (finite, in pixels, positive size, overlapping their image)."""
    problems = box_problems(boxes, image_sizes)
    bad = problems["not_finite"] | problems["normalised"] | problems["flipped"] | problems["zero_size"]
    return ~(bad | problems.get("outside_image", np.zeros_like(bad)))


# ---------------------------------------------------------------------------------- empty images
def empty_image_findings(faces_per_image: Optional[np.ndarray], batch_faces_per_image: Optional[np.ndarray],
                         max_share: float, keep_empty: bool) -> list[PreflightFinding]:
    """The share of the training images without a face: in the annotations, and in the drawn batch
    (faces lost between the annotations and the network: a loader bug)."""
    findings = []
    fix = "check the annotation file and how the dataset reads it"
    if keep_empty:
        fix += ("; to train without the images that have no face: dataset.keep_empty=false; if they are negatives on "
                "purpose, raise diagnosis.empty_images.max_share")
    share = None
    if faces_per_image is not None and len(faces_per_image):
        empty, total = int((faces_per_image == 0).sum()), len(faces_per_image)
        share = empty / total
        severity = WARNING if share > max_share else INFO
        findings.append(PreflightFinding(
            "empty_images", severity,
            f"{_share(empty, total)} training images have no face in the annotations"
            + (f" (above diagnosis.empty_images.max_share={max_share:g})" if severity == WARNING else ""),
            fix if severity == WARNING else "", {"images": total, "empty": empty}))
    if batch_faces_per_image is not None and len(batch_faces_per_image):
        empty, total = int((batch_faces_per_image == 0).sum()), len(batch_faces_per_image)
        if empty / total > max_share and (share is None or share <= max_share):
            lost = "" if share is None else f", against {100 * share:.1f}% in the annotations: faces are lost on the way"
            findings.append(PreflightFinding(
                "empty_images", WARNING,
                f"{_share(empty, total)} images of a training batch (after augmentation) have no face{lost}",
                "check the dataset's __getitem__ and the transforms (a target without its boxes)",
                {"batch_images": total, "batch_empty": empty}))
    return findings


# ------------------------------------------------------------------------------- anchor coverage
@dataclass
class Coverage:
    """Faces an anchor fits at the matching threshold, overall and per size bucket (``detlab.metrics``'
    buckets: a face's larger side, ``eval.size_edges``)."""

    faces: int
    covered: int
    buckets: dict[str, tuple[int, int]]  # name -> (faces, covered)
    sizes: np.ndarray  # the faces' larger sides (pixels)

    @property
    def share(self) -> float:
        return self.covered / self.faces if self.faces else math.nan


def anchor_coverage(faces: Tensor, anchors: Tensor, match_iou: float, size_edges: Sequence[float]) -> Coverage:
    """The coverage of ``faces`` (``[F, 4]`` xyxy in input pixels, usable boxes) by ``anchors``."""
    faces = faces.detach().float().cpu().reshape(-1, 4)
    covered = (best_anchor_iou(faces, anchors) >= match_iou).numpy()
    sizes = torch.maximum(faces[:, 2] - faces[:, 0], faces[:, 3] - faces[:, 1]).numpy()
    bucket = np.searchsorted(np.asarray(size_edges, dtype=np.float64), sizes, side="right")
    small, medium = size_edges[0], size_edges[1]
    names = (f"small (< {small:g} px)", f"medium ({small:g}-{medium:g} px)", f"large (>= {medium:g} px)")
    buckets = {name: (int((bucket == k).sum()), int(covered[bucket == k].sum())) for k, name in enumerate(names)}
    return Coverage(len(faces), int(covered.sum()), buckets, sizes)


def coverage_findings(coverage: Optional[Coverage], batch: Optional[tuple[int, int]], match_iou: float,
                      min_coverage: float, anchor_sides: tuple[float, float], smallest: tuple[float, float],
                      unusable: int = 0, sample_note: str = "") -> list[PreflightFinding]:
    """Findings of the anchors' coverage: ``coverage`` of the annotated faces (mapped to input pixels),
    ``batch``: (faces, covered) of the drawn batch by the criterion's own matcher; ``anchor_sides``: the
    smallest and largest anchor side; ``smallest``: ``smallest_matchable_face``'s two sides; ``unusable``:
    annotated boxes no anchor can fit (the box findings name them)."""
    findings = []
    somewhere, anywhere = smallest
    what = f"model.match_iou={match_iou:g}"
    batch_text = ""
    if batch is not None and batch[0]:
        batch_text = f"; in a training batch (after augmentation) {_share(batch[1], batch[0])} faces"
    low, high = anchor_sides
    faces_span = ""
    if coverage is not None and coverage.faces:
        p5, p95 = np.percentile(coverage.sizes, [5, 95])
        faces_span = f", the faces {p5:.0f}-{p95:.0f} px (5th-95th percentile of their larger side)"
    fix = (f"make the anchor sizes span the faces (model.min_sizes for ssd_slim and ssd_mobilenet_v2; the anchors "
           f"span {low:.0f}-{high:.0f} px{faces_span}) or lower the threshold "
           f"(model.match_iou={max(round(match_iou - 0.1, 2), 0.2):g}); if the boxes are wrong, see the box findings")
    evidence: dict[str, float] = {"match_iou": match_iou, "smallest_face_px": somewhere, "smallest_face_anywhere_px": anywhere}
    if batch is not None:
        evidence.update(batch_faces=batch[0], batch_covered=batch[1])
    if coverage is not None and (coverage.faces or unusable):
        unusable_text = f"; {unusable:,} more boxes no anchor can fit (see the box findings)" if unusable else ""
        evidence.update(faces=coverage.faces, covered=coverage.covered, unusable=unusable,
                        **{f"covered_{name.split()[0]}": c / n for name, (n, c) in coverage.buckets.items() if n})
        if coverage.faces == 0:
            findings.append(PreflightFinding(
                "anchor_coverage", FATAL, f"no face can be matched: none of the {unusable:,} annotated boxes is "
                f"usable (see the box findings){batch_text}", "fix the boxes (see the box findings)", evidence))
            return findings
        buckets = ", ".join(f"{name} {100 * c / n:.0f}% of {n:,}" for name, (n, c) in coverage.buckets.items() if n)
        message = (f"an anchor fits {_share(coverage.covered, coverage.faces)} training faces{sample_note} at {what} "
                   f"({buckets}){unusable_text}{batch_text}")
        if coverage.covered == 0:
            findings.append(PreflightFinding("anchor_coverage", FATAL, f"no face can be matched: {message}", fix, evidence))
        elif coverage.share < min_coverage:
            findings.append(PreflightFinding(
                "anchor_coverage", WARNING,
                f"{message}: below diagnosis.unmatched_faces.min_coverage={min_coverage:g}", fix, evidence))
        else:
            weak = [(name, n, c) for name, (n, c) in coverage.buckets.items()
                    if n >= COVERAGE_BUCKET_SHARE * coverage.faces and c / n < min_coverage]
            if weak:
                names = ", ".join(f"{name}: {100 * c / n:.0f}%" for name, n, c in weak)
                findings.append(PreflightFinding(
                    "anchor_coverage", WARNING, f"{message}: the anchors fit few faces of a size the data has many "
                    f"of ({names}, below diagnosis.unmatched_faces.min_coverage={min_coverage:g})", fix, evidence))
            else:
                findings.append(PreflightFinding("anchor_coverage", INFO, message, "", evidence))
        below = int((coverage.sizes < somewhere).sum())
        findings.append(PreflightFinding(
            "smallest_face", INFO,
            f"the anchors fit a square face of {_px(somewhere)} at best and of {_px(anywhere)} wherever it lies "
            f"({what}); {_share(below, coverage.faces)} training faces{sample_note} are smaller than {_px(somewhere)}",
            "", {"smallest_face_px": somewhere, "smallest_face_anywhere_px": anywhere, "faces_below": below}))
    elif batch is not None and batch[0]:
        message = f"an anchor fits {_share(batch[1], batch[0])} faces of a training batch (after augmentation) at {what}"
        if batch[1] == 0:
            findings.append(PreflightFinding("anchor_coverage", FATAL, f"no face can be matched: {message}", fix, evidence))
        elif batch[1] / batch[0] < min_coverage:
            findings.append(PreflightFinding(
                "anchor_coverage", WARNING, f"{message}: below diagnosis.unmatched_faces.min_coverage={min_coverage:g}",
                fix, evidence))
        else:
            findings.append(PreflightFinding("anchor_coverage", INFO, message, "", evidence))
    # The batch is what the network sees: with no face of at least ten matched, nothing can be learnt.
    if (batch is not None and batch[0] >= 10 and batch[1] == 0
            and not any(f.check == "anchor_coverage" and f.severity == FATAL for f in findings)):
        findings = [f for f in findings if f.check != "anchor_coverage"]
        findings.append(PreflightFinding(
            "anchor_coverage", FATAL, f"no face can be matched in a training batch (after augmentation): 0 of "
            f"{batch[0]:,} faces have an anchor at {what}", fix, evidence))
    return findings


# ------------------------------------------------------------------------------------- the input
def input_findings(images: Tensor, min_std: float, max_std: float, max_abs_mean: float) -> list[PreflightFinding]:
    """The batch's pixel statistics after the pipeline's normalisation (``diagnosis.unnormalised_input``'s
    bounds): raw 0-255 pixels, or an input normalised twice, reach the network."""
    x = images.detach().float()
    finite = torch.isfinite(x)
    bad = int((~finite).sum())
    x = x[finite] if bad else x
    if x.numel() == 0:
        return [PreflightFinding("input_statistics", WARNING, "the training batch's images hold no finite value",
                                 "check the data pipeline", {"non_finite": bad})]
    std, mean = (float(v) for v in torch.std_mean(x))
    low, high = float(x.min()), float(x.max())
    evidence = {"mean": mean, "std": std, "min": low, "max": high, "non_finite": bad}
    text = (f"the network's input has mean {mean:.3g} and standard deviation {std:.3g} (min {low:.3g}, max {high:.3g}) "
            f"on a training batch of {images.shape[0]} images")
    findings = []
    if bad:
        findings.append(PreflightFinding("input_statistics", WARNING,
                                         f"{bad:,} input values are NaN or infinite; {text}",
                                         "check the images and the transforms", evidence))
    if not (min_std <= std <= max_std) or abs(mean) > max_abs_mean:
        if low >= 0 and high > 2 and std > max_std:
            why = "raw 0-255 pixels, not normalised"
        elif std < min_std:
            why = "nearly constant: normalised twice, or blank images"
        else:
            why = "not normalised as the pipeline normalises (about 0 and 1)"
        findings.append(PreflightFinding(
            "input_statistics", WARNING,
            f"{text}: {why} (diagnosis.unnormalised_input: std in [{min_std:g}, {max_std:g}], |mean| <= {max_abs_mean:g})",
            "normalise the images once, as detlab.data.transforms does (ToDtype(scale=True), then Normalize with the "
            "ImageNet mean and std), before they reach the model", evidence))
    elif not bad:
        findings.append(PreflightFinding("input_statistics", INFO, text, "", evidence))
    return findings


# ------------------------------------------------------------------------------ the lr schedule
def schedule_findings(cfg: Config, total_steps: int, steps_per_epoch: int) -> list[PreflightFinding]:
    """The run's learning-rate schedule, stepped over its ``total_steps`` on an optimiser of its own: an
    lr still rising at the last step (a warm-up as long as the run), or a schedule that does not end
    where its kind says (``expected_final_lr``)."""
    s, lr = cfg.schedule, cfg.optim.lr
    if total_steps < 1:
        return []
    rates = planned_learning_rates(s, lr, total_steps, steps_per_epoch)
    used, end = rates[:-1], rates[-1]
    expected, why = expected_final_lr(s, lr)
    warm = warmup_steps(s, steps_per_epoch)
    peak = int(np.argmax(used))
    evidence = {"total_steps": total_steps, "warmup_steps": warm, "first_lr": used[0], "peak_lr": used[peak],
                "last_lr": used[-1], "final_lr": end, "expected_final_lr": expected}
    summary = (f"lr {used[0]:.3g} at step 0, {used[peak]:.3g} at its peak (step {peak}), {used[-1]:.3g} at the last "
               f"step ({total_steps - 1}), {end:.3g} after it; a warm-up of {warm} steps in a run of {total_steps} "
               f"(schedule.after_warmup={s.after_warmup})")
    findings = []
    rising = len(used) >= 2 and used[-1] > used[-2] * (1 + 1e-9)
    if rising:
        epochs = cfg.train.epochs
        target = max(1, total_steps // 10)
        fix = (f"schedule.warmup_steps={target}" if s.warmup_steps is not None else
               f"schedule.warmup_epochs={max(round(target / max(steps_per_epoch, 1), 2), 0.01):g}")
        findings.append(PreflightFinding(
            "lr_schedule", WARNING,
            f"the learning rate still rises at the last step: the warm-up ({warm} steps) is as long as the run "
            f"({epochs} epochs of {steps_per_epoch} steps = {total_steps}), so the run ends before it reaches "
            f"optim.lr and never decays; {summary}",
            f"{fix} (a tenth of the run), or train longer (train.epochs)", evidence))
    if not math.isclose(end, expected, rel_tol=1e-3, abs_tol=1e-3 * lr):
        findings.append(PreflightFinding(
            "lr_schedule", WARNING,
            f"the schedule ends at lr {end:.3g}, not at {expected:.3g} ({why}); {summary}",
            "train longer (train.epochs), or give multistep fewer schedule.milestones that fall on distinct steps"
            if s.after_warmup == "multistep" else "train longer (train.epochs) or shorten the warm-up", evidence))
    if not findings:
        findings.append(PreflightFinding("lr_schedule", INFO, summary, "", evidence))
    return findings


# ------------------------------------------------------------------------------------ the model
def _count_non_finite(tensors: Sequence[Tensor]) -> int:
    if not tensors:
        return 0
    return int(torch.stack([(~torch.isfinite(t.detach())).sum() for t in tensors]).sum())


@contextmanager
def _activation_peaks(model: nn.Module, peaks: list[tuple[str, Tensor]]) -> Iterator[None]:
    """Collects each leaf module's name and largest |output| (inf for a NaN: an overflow made it) into
    ``peaks``, in the order the forward runs them."""
    def hook_of(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor) and output.is_floating_point() and output.numel():
                peaks.append((name, output.detach().abs().amax().float().nan_to_num(nan=math.inf)))
        return hook

    handles = [m.register_forward_hook(hook_of(name)) for name, m in model.named_modules() if not list(m.children())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _fp16_evidence(peaks: list[tuple[str, Tensor]]) -> tuple[float, str]:
    """The largest finite activation, and the first module whose output is not finite ("" if none)."""
    if not peaks:
        return 0.0, ""
    values = torch.stack([v for _, v in peaks]).cpu()
    finite = torch.isfinite(values)
    largest = float(values[finite].max()) if bool(finite.any()) else math.inf
    overflowing = [peaks[i][0] for i in torch.nonzero(~finite).flatten().tolist()]
    return largest, overflowing[0] if overflowing else ""


def _names(names: Sequence[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def autocast_dtype(device: torch.device, amp: bool) -> Optional[torch.dtype]:
    """The autocast type of the training step (``detlab.engine.step``): float16 on CUDA, bfloat16 on
    the CPU, None without AMP."""
    if not amp:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def model_findings(model: nn.Module, criterion: nn.Module, images: Tensor, gt_boxes: Sequence[Tensor],
                   autocast: Optional[torch.dtype] = None) -> list[PreflightFinding]:
    """The criterion on one batch as the training step computes it (``autocast``: its autocast type,
    ``autocast_dtype``): a first loss that is not finite (fatal; under float16, an overflow when
    float32 gives a finite one), a float16 forward near overflow, and the trainable parameters one
    backward leaves without a gradient. The caller puts the model's state back."""
    device = images.device
    fp16 = autocast == torch.float16
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    model.train()
    model.zero_grad(set_to_none=True)
    peaks: list[tuple[str, Tensor]] = []
    with _activation_peaks(model, peaks) if fp16 else _nothing():
        with torch.autocast(device_type=device.type, dtype=autocast, enabled=autocast is not None):
            outputs = model(images)
    losses = criterion(outputs, gt_boxes, 0)
    values = losses.values()
    total = values["loss_total"]
    findings = []
    batch = f"a training batch of {images.shape[0]} images"
    evidence = {"loss_cls": values["loss_cls"], "loss_box": values["loss_box"], "loss_total": total,
                "num_pos": values["num_pos"]}
    peak, first_overflow = _fp16_evidence(peaks)
    if fp16:
        evidence["fp16_peak"] = peak
    if not math.isfinite(total):
        if fp16:
            with torch.no_grad():
                fp32 = criterion(model(images), gt_boxes, 0).values()
            if math.isfinite(fp32["loss_total"]):
                where = f"the output of {first_overflow} is the first to overflow" if first_overflow else "it overflows"
                return [PreflightFinding(
                    "fp16_overflow", FATAL,
                    f"under float16 autocast the first forward overflows: {where} (float16 ends at {FLOAT16_MAX:g}); "
                    f"the loss on {batch} is {total:.4g} in float16 and {fp32['loss_total']:.4g} in float32, so the "
                    f"first step would end the run as diverged",
                    "train.amp=false (float32 on CUDA), or find the layer whose output is so large (its "
                    "initialisation or input scale)", {**evidence, "fp32_loss_total": fp32["loss_total"]})]
        bad_params = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
        bad_outputs = _count_non_finite([o for o in outputs.values() if isinstance(o, Tensor)])
        bad_inputs = int((~torch.isfinite(images)).sum())
        bad_boxes = _count_non_finite(list(gt_boxes))
        causes = []
        if bad_params:
            causes.append(f"the parameters {_names(bad_params)} hold NaN or infinite values")
        if bad_inputs:
            causes.append(f"the images hold {bad_inputs:,} NaN or infinite values")
        if bad_boxes:
            causes.append(f"the boxes hold {bad_boxes:,} NaN or infinite coordinates")
        if bad_outputs and not causes:
            causes.append(f"the model's outputs hold {bad_outputs:,} NaN or infinite values from finite weights and "
                          f"input (an overflow in the forward)")
        fix = ("check the model's initialisation and weights (model.backbone_weights, a model factory)" if bad_params
               else "check the images and the transforms" if bad_inputs
               else "check the boxes (see the box findings)" if bad_boxes
               else "find the layer whose output overflows (its initialisation or input scale); a lower optim.lr "
                    "does not help: no update has been made yet")
        evidence.update(non_finite_parameters=len(bad_params), non_finite_outputs=bad_outputs,
                        non_finite_inputs=bad_inputs, non_finite_boxes=bad_boxes)
        return [PreflightFinding(
            "first_loss", FATAL,
            f"the first loss is not finite (loss_cls={values['loss_cls']:.4g}, loss_box={values['loss_box']:.4g}) on "
            f"{batch}" + (f": {'; '.join(causes)}" if causes else ""), fix, evidence)]
    findings.append(PreflightFinding(
        "first_loss", INFO,
        f"loss_cls {values['loss_cls']:.4g}, loss_box {values['loss_box']:.4g}, weighted total {total:.4g} on {batch} "
        f"({values['num_pos']:.0f} face anchors)", "", evidence))
    if fp16 and peak > FP16_HEADROOM * FLOAT16_MAX:
        findings.append(PreflightFinding(
            "fp16_overflow", WARNING,
            f"under float16 autocast the first forward's largest activation is {peak:.3g}, "
            f"{100 * peak / FLOAT16_MAX:.0f}% of float16's range ({FLOAT16_MAX:g}): a little weight growth overflows it",
            "train.amp=false, or find the layer whose output is so large", evidence))
    # One backward (scaled under fp16 as the GradScaler scales it, so that no gradient underflows to zero).
    scale = GRAD_SCALE if fp16 else 1.0
    (losses.total * scale).backward(retain_graph=True)
    missing = _without_gradient(params)
    if missing:
        # Zero from this batch's loss alone (a level without a face, a zero loss weight) is not "unreached":
        # only what the model's outputs do not depend on either.
        model.zero_grad(set_to_none=True)
        probe = sum(o.float().sum() for o in outputs.values() if isinstance(o, Tensor) and o.requires_grad)
        if isinstance(probe, Tensor):
            (probe * scale).backward()
        reached = set(n for n, _ in params) - set(_without_gradient(params))
        missing = [name for name in missing if name not in reached]
    model.zero_grad(set_to_none=True)
    if missing:
        sizes = dict((n, p.numel()) for n, p in params)
        weights = sum(sizes[n] for n in missing)
        trainable = sum(sizes.values())
        frozen_note = f"; {frozen:,} frozen weights (requires_grad=False) are left out" if frozen else ""
        findings.append(PreflightFinding(
            "unreached_parameters", WARNING,
            f"the loss does not reach {len(missing)} of {len(params)} trainable parameter tensors "
            f"({_share(weights, trainable)} weights): {_names(missing)} get no gradient from one backward on "
            f"{batch}{frozen_note}",
            "remove the unused layer, or the .detach() / torch.no_grad() that cuts it off; freeze it on purpose with "
            "requires_grad=False", {"parameters": len(missing), "weights": weights, "trainable_weights": trainable}))
    return findings


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _without_gradient(params: Sequence[tuple[str, Tensor]]) -> list[str]:
    """The names of ``params`` whose gradient is absent or exactly zero (one host sync)."""
    if not params:
        return []
    device = params[0][1].device
    alive = torch.stack([p.grad.detach().abs().amax() > 0 if p.grad is not None and p.grad.numel()
                         else torch.zeros((), dtype=torch.bool, device=device) for _, p in params]).tolist()
    return [name for (name, _), ok in zip(params, alive) if not ok]


# ------------------------------------------------------------------------------ the whole check
@dataclass
class AnnotatedSet:
    """What the checks read of a training set: its parsed records, how to read its images' sizes, and
    the annotation file they came from (None: not a file, or not known)."""

    records: list[Any]
    image_sizes: Optional[Callable[[Sequence[int]], np.ndarray]]
    annotations: Optional[Path]


def annotated_set(dataset: Dataset) -> Optional[AnnotatedSet]:
    """The records of a ``WiderFaceDataset`` (through a ``Subset`` or a wrapper that forwards its
    attributes); None for a dataset without them."""
    if isinstance(dataset, Subset):
        inner = annotated_set(dataset.dataset)
        if inner is None:
            return None
        indices = [int(i) for i in dataset.indices]
        sizes = inner.image_sizes
        return AnnotatedSet([inner.records[i] for i in indices],
                            None if sizes is None else (lambda chosen: sizes([indices[int(i)] for i in chosen])),
                            inner.annotations)
    records = getattr(dataset, "records", None)
    if records is None:
        return None
    return AnnotatedSet(list(records), getattr(dataset, "image_sizes", None), getattr(dataset, "annotations", None))


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started


def run_preflight(cfg: Config, train_set: Dataset, collate: Callable, model: nn.Module, criterion: nn.Module,
                  device: torch.device, amp: bool, total_steps: int, steps_per_epoch: int) -> PreflightReport:
    """All the checks on a built run (see the module docstring); the model's state, its gradients and
    the global generators are as they were afterwards."""
    started = time.perf_counter()
    timer = _Timer()
    report = PreflightReport(mode=cfg.diagnosis.preflight)
    generators = rng_state()
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    try:
        report.findings = _checks(cfg, train_set, collate, model, criterion, device, amp, total_steps,
                                  steps_per_epoch, timer)
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        set_rng_state(generators)
    report.timings = timer.timings
    report.seconds = time.perf_counter() - started
    return report


def _checks(cfg: Config, train_set: Dataset, collate: Callable, model: nn.Module, criterion: nn.Module,
            device: torch.device, amp: bool, total_steps: int, steps_per_epoch: int,
            timer: _Timer) -> list[PreflightFinding]:
    d, m = cfg.diagnosis, cfg.model
    input_size = (m.input_width, m.input_height)
    anchors = model.anchors.detach().float().cpu()
    findings: list[PreflightFinding] = []

    # The annotations: every box at once.
    coverage, unusable, sample_note, faces_per_image = None, 0, "", None
    annotated = annotated_set(train_set)
    if annotated is not None and annotated.records:
        with timer("annotations"):
            records = annotated.records
            counts = np.fromiter((r.boxes.shape[0] for r in records), dtype=np.int64, count=len(records))
            faces_per_image = counts
            boxes = (np.concatenate([np.asarray(r.boxes, dtype=np.float64).reshape(-1, 4) for r in records])
                     if counts.sum() else np.zeros((0, 4)))
            owner = np.repeat(np.arange(len(records)), counts)
            offsets = np.cumsum(counts) - counts
            # Image sizes (file headers) for the checks that need them: every image with a face, or a sample.
            with_faces, sized_note = np.flatnonzero(counts), ""
            sized = with_faces
            if len(with_faces) > MAX_SIZED_IMAGES:
                rng = np.random.default_rng(cfg.train.seed)
                sized = np.sort(rng.choice(with_faces, MAX_SIZED_IMAGES, replace=False))
                sized_note = f"(in {len(sized):,} sampled images)"
            box_sizes = None
            if annotated.image_sizes is not None:
                per_image = np.full((len(records), 2), np.nan)
                if len(sized):
                    with timer("image_headers"):
                        per_image[sized] = annotated.image_sizes(sized)
                box_sizes = per_image[owner]

            def locate(i: int) -> str:
                record = records[owner[i]]
                line = face_line(annotated.annotations, record.path, boxes[i]) if annotated.annotations else None
                within = f"face {i - offsets[owner[i]] + 1} of image {record.path}"
                return f"{annotated.annotations}:{line} ({within})" if line else within

            findings += box_findings(boxes, box_sizes, "in the training annotations", locate, sized_note)
        with timer("anchor_coverage"):
            if box_sizes is not None and len(boxes):
                known = np.isfinite(box_sizes).all(axis=1)
                usable = usable_boxes(boxes, box_sizes) & known
                unusable = int((~usable & known).sum())
                chosen = np.flatnonzero(usable)
                notes = [f"in {len(sized):,} sampled images"] if sized_note else []
                if len(chosen) > MAX_COVERAGE_FACES:
                    rng = np.random.default_rng(cfg.train.seed)
                    chosen = np.sort(rng.choice(chosen, MAX_COVERAGE_FACES, replace=False))
                    notes.append(f"a seeded sample of {MAX_COVERAGE_FACES:,}")
                sample_note = f" ({', '.join(notes)})" if notes else ""
                sizes = np.concatenate([box_sizes[chosen], box_sizes[chosen]], axis=1)  # [F, 4]: W, H, W, H
                faces = np.clip(boxes[chosen], 0, sizes)  # as the transforms clip them
                # In input pixels, as validation resizes the whole image (training crops zoom in).
                faces = faces * np.array(input_size * 2, dtype=np.float64) / sizes
                coverage = anchor_coverage(torch.from_numpy(faces), anchors, m.match_iou, cfg.eval.size_edges)

    # One batch of training images, as the loader's augmentation makes them.
    with timer("batch"):
        count = min(len(train_set), cfg.train.batch_size, BATCH_IMAGES)
        chosen_images = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.train.seed))[:count]
        images, targets = collate([train_set[int(i)] for i in chosen_images])
    batch_coverage = None
    batch_faces = None
    if images.shape[0]:
        gt_boxes = [t["boxes"].float().reshape(-1, 4) for t in targets]
        batch_faces = np.asarray([len(b) for b in gt_boxes])
        with timer("batch_checks"):
            if sum(batch_faces):
                flat = torch.cat(gt_boxes).numpy()
                owners = np.repeat(np.arange(len(gt_boxes)), batch_faces)
                image_ids = [int(t.get("image_id", i)) for i, t in enumerate(targets)]

                def locate_batch(i: int) -> str:
                    index = image_ids[owners[i]]
                    name = (f"image {annotated.records[index].path}"
                            if annotated is not None and 0 <= index < len(annotated.records) else f"image {index}")
                    return f"{name} (training set index {index})"

                reported = {f.check for f in findings}
                sizes = np.tile(np.asarray(input_size, dtype=np.float64), (len(flat), 1))
                findings += [f for f in box_findings(flat, sizes, "in a training batch (after augmentation)",
                                                     locate_batch) if f.check not in reported]
                labels = criterion.match([b.to(device) for b in gt_boxes])
                batch_coverage = (int(sum(batch_faces)), int(labels.covered))
            findings += input_findings(images, d.unnormalised_input.min_std, d.unnormalised_input.max_std,
                                       d.unnormalised_input.max_abs_mean)
    findings += empty_image_findings(faces_per_image, batch_faces, d.empty_images.max_share, cfg.dataset.keep_empty)
    with timer("anchor_coverage"):
        sides = torch.minimum(anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1])
        smallest = smallest_matchable_face(anchors, m.match_iou, input_size)
        findings += coverage_findings(coverage, batch_coverage, m.match_iou, d.unmatched_faces.min_coverage,
                                      (float(sides.min()), float(sides.max())), smallest, unusable, sample_note)
    with timer("lr_schedule"):
        findings += schedule_findings(cfg, total_steps, steps_per_epoch)
    if images.shape[0]:
        with timer("model"):
            findings += model_findings(model, criterion, images[:MODEL_IMAGES].to(device),
                                       [t["boxes"].float().reshape(-1, 4).to(device) for t in targets[:MODEL_IMAGES]],
                                       autocast_dtype(device, amp))
    else:
        findings.append(PreflightFinding("first_loss", WARNING, "the drawn training batch is empty (every image "
                                         "unreadable and skipped): the model checks did not run",
                                         "check dataset.root's images"))
    return findings
