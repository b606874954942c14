"""The official WIDER FACE evaluation (easy / medium / hard AP), vectorised, and the submission layout.

Rules of the official evaluation (``eval_tools/wider_eval.m`` and its widely used Python port),
reproduced exactly:

- Scores are min-max normalised over the whole prediction set, with the port's initial values
  ``max = 0`` and ``min = 1`` (so the range always covers [min(scores, 1), max(scores, 0)]).
- Predictions of an image are sorted by descending score (stable: ties keep file order).
- IoU uses the inclusive-pixel convention: a box ``x y w h`` spans ``x .. x + w`` and its side is
  ``w + 1``; intersections and areas add 1 pixel.
- Each prediction is assigned to the face of highest IoU among *all* faces (first one on ties). If
  that IoU reaches 0.5: a face outside the setting's keep list makes the prediction neither TP nor
  FP; a kept face is recalled (a second prediction on it is not a TP but still counts as a proposal).
- Precision and recall are read at 1,000 score thresholds ``1 - (t + 1) / 1000``; the number of
  faces is the number of kept faces of the evaluated images; AP is VOC all-point (``voc_ap``).
- An image without faces or without predictions contributes nothing but its kept-face count.

Where the port would fail or produce NaN we choose: an image missing from the predictions has no
predictions (its faces are all missed); a prediction set whose normalised range is empty (all
scores equal) gets normalised scores of 1; a setting with no faces scores 0.

The port loops over predictions and over the 1,000 thresholds in Python, per image. Here the
per-image work is one IoU matrix and an argmax; the threshold sweep is one ``searchsorted`` over the
whole data set, because with scores sorted per image "the first n predictions of the image" is
exactly "the image's predictions scored at or above the threshold".

Submission layout: ``<out_dir>/<event>/<name>.txt`` holding the image name, the number of boxes and
one ``x y w h score`` line per box. Reading a folder back is strict where the port is silently
wrong: a non-finite number (nan, inf) or a negative width/height, which the port accepts and which
changes the normalisation and the AP, and two files naming the same image, of which the port keeps
whichever ``os.listdir`` gives last, raise ``PredictionFileError`` naming the file(s) and line.

CLI: ``python -m detlab.wider_eval PRED_DIR [--gt GT_DIR] [--images predicted|all]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np

from detlab.errors import UserError, debug_requested, one_line
from detlab.runtime.fileio import atomic_write_text
from detlab.metrics import ap_voc

SETTINGS = ("easy", "medium", "hard")
GT_FILES = {"all": "wider_face_val.mat", "easy": "wider_easy_val.mat", "medium": "wider_medium_val.mat",
            "hard": "wider_hard_val.mat"}
THRESH_NUM = 1000


class PredictionFileError(UserError, ValueError):
    """A bad prediction file: ``"<path>:<line>: <what is wrong>; expected ..."`` (``line`` 0: the whole file)."""

    def __init__(self, path: os.PathLike | str, line: int, message: str) -> None:
        self.path = str(path)
        self.line = line
        super().__init__(f"{path}:{line}: {message}" if line > 0 else f"{path}: {message}")


class MissingPredictionsError(UserError, FileNotFoundError):
    """The prediction folder does not exist (a ``FileNotFoundError`` too, for existing callers)."""


@dataclass
class WiderGroundTruth:
    """The official val ground truth, flattened to one entry per image (in the .mat order)."""

    keys: list[str]  # "event/name" (no extension)
    boxes: list[np.ndarray]  # per image [N, 4] float64, x y w h
    keep: dict[str, list[np.ndarray]]  # setting -> per image, 1-based indices of the kept faces
    events: list[str]

    def index(self) -> dict[str, int]:
        return {key: i for i, key in enumerate(self.keys)}


def load_wider_ground_truth(gt_dir: str | os.PathLike) -> WiderGroundTruth:
    """Read ``wider_face_val.mat`` and the easy / medium / hard keep lists from ``gt_dir``."""
    from scipy.io import loadmat  # imported here: only the WIDER protocol needs scipy

    gt_dir = Path(gt_dir)
    missing = [name for name in GT_FILES.values() if not (gt_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"WIDER FACE ground truth incomplete in {gt_dir}: missing {', '.join(missing)}")
    full = loadmat(str(gt_dir / GT_FILES["all"]))
    for key in ("event_list", "file_list", "face_bbx_list"):
        if key not in full:
            raise ValueError(f"{gt_dir / GT_FILES['all']}: no '{key}' variable")
    events = [str(e[0][0]) for e in full["event_list"]]
    keys: list[str] = []
    boxes: list[np.ndarray] = []
    for i, event in enumerate(events):
        files = full["file_list"][i][0]
        faces = full["face_bbx_list"][i][0]
        for j in range(len(files)):
            keys.append(f"{event}/{files[j][0][0]}")
            boxes.append(np.asarray(faces[j][0], dtype=np.float64).reshape(-1, 4))
    keep: dict[str, list[np.ndarray]] = {}
    for setting in SETTINGS:
        path = gt_dir / GT_FILES[setting]
        mat = loadmat(str(path))
        if "gt_list" not in mat:
            raise ValueError(f"{path}: no 'gt_list' variable")
        lists = [np.asarray(mat["gt_list"][i][0][j][0], dtype=np.int64).reshape(-1)
                 for i in range(len(events)) for j in range(len(mat["gt_list"][i][0]))]
        if len(lists) != len(keys):
            raise ValueError(f"{path}: {len(lists)} images, {GT_FILES['all']} has {len(keys)}")
        keep[setting] = lists
    return WiderGroundTruth(keys=keys, boxes=boxes, keep=keep, events=events)


def normalise_scores(predictions: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official min-max normalisation over the whole set (copies; the input is not changed)."""
    arrays = [np.asarray(v, dtype=np.float64).reshape(-1, 5) for v in predictions.values()]
    scores = [a[:, 4] for a in arrays if len(a)]
    lo, hi = 1.0, 0.0  # the port's initial values
    if scores:
        all_scores = np.concatenate(scores)
        lo, hi = min(float(all_scores.min()), lo), max(float(all_scores.max()), hi)
    diff = hi - lo
    out = {}
    for key, a in zip(predictions.keys(), arrays):
        a = a.copy()
        a[:, 4] = (a[:, 4] - lo) / diff if diff > 0 else 1.0
        out[key] = a
    return out


def overlaps_plus_one(pred_xyxy: np.ndarray, gt_xyxy: np.ndarray) -> np.ndarray:
    """IoU ``[K, N]`` with the +1-pixel convention, same arithmetic as the official ``bbox_overlaps``."""
    gt_area = (gt_xyxy[:, 2] - gt_xyxy[:, 0] + 1) * (gt_xyxy[:, 3] - gt_xyxy[:, 1] + 1)  # [N]
    iw = np.minimum(pred_xyxy[:, None, 2], gt_xyxy[None, :, 2]) - np.maximum(pred_xyxy[:, None, 0], gt_xyxy[None, :, 0]) + 1
    ih = np.minimum(pred_xyxy[:, None, 3], gt_xyxy[None, :, 3]) - np.maximum(pred_xyxy[:, None, 1], gt_xyxy[None, :, 1]) + 1
    pred_area = (pred_xyxy[:, 2] - pred_xyxy[:, 0] + 1) * (pred_xyxy[:, 3] - pred_xyxy[:, 1] + 1)  # [K]
    ua = pred_area[:, None] + gt_area[None, :] - iw * ih
    inside = (iw > 0) & (ih > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inside, iw * ih / ua, 0.0)


def _to_xyxy(xywh: np.ndarray) -> np.ndarray:
    out = np.array(xywh[:, :4], dtype=np.float64)
    out[:, 2] += out[:, 0]
    out[:, 3] += out[:, 1]
    return out


def wider_pr_curves(
    predictions: Mapping[str, np.ndarray],
    gt: WiderGroundTruth,
    images: Optional[Iterable[str]] = None,
    iou_threshold: float = 0.5,
    thresh_num: int = THRESH_NUM,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per setting ``(precision [T], recall [T])`` at the official thresholds (see the module docstring)."""
    index = gt.index()
    if images is None:
        selected = list(range(len(gt.keys)))
    else:
        selected = []
        for key in images:
            key = image_key(key)
            if key not in index:
                raise KeyError(f"image '{key}' is not in the WIDER FACE val ground truth")
            selected.append(index[key])
        selected = sorted(set(selected))
    preds = normalise_scores(predictions)

    # Per image, independent of the setting: sorted scores, each prediction's best face and hit flag.
    scores, best_gt, hit, image_of = [], [], [], []
    gt_offset = np.zeros(len(gt.keys) + 1, dtype=np.int64)
    gt_offset[1:] = np.cumsum([len(b) for b in gt.boxes])
    for i in selected:
        pred = preds.get(gt.keys[i])
        faces = gt.boxes[i]
        if pred is None or len(pred) == 0 or len(faces) == 0:
            continue
        pred = pred[np.argsort(-pred[:, 4], kind="stable")]
        overlaps = overlaps_plus_one(_to_xyxy(pred), _to_xyxy(faces))  # [K, N]
        best = overlaps.argmax(axis=1)
        scores.append(pred[:, 4])
        best_gt.append(gt_offset[i] + best)
        hit.append(overlaps[np.arange(len(best)), best] >= iou_threshold)
        image_of.append(np.full(len(best), i))
    score = np.concatenate(scores) if scores else np.zeros(0)
    best_gt_all = np.concatenate(best_gt) if best_gt else np.zeros(0, dtype=np.int64)
    hit_all = np.concatenate(hit) if hit else np.zeros(0, dtype=bool)

    # Thresholds exactly as the port computes them: 1 - (t + 1) / thresh_num.
    thresholds = 1 - (np.arange(thresh_num) + 1) / thresh_num

    curves = {}
    for setting in SETTINGS:
        kept = np.zeros(gt_offset[-1], dtype=bool)  # over all faces of the ground truth
        count_face = 0
        for i in selected:
            keep_index = gt.keep[setting][i]
            count_face += len(keep_index)
            kept[gt_offset[i] + keep_index - 1] = True
        face_kept = kept[best_gt_all]
        proposal = ~(hit_all & ~face_kept)  # neither TP nor FP when the best face is not kept
        recalled = hit_all & face_kept
        # A face is recalled by its first hitting prediction (arrays are in per-image score order).
        first = np.zeros_like(recalled)
        _, first_index = np.unique(best_gt_all[recalled], return_index=True)
        first[np.nonzero(recalled)[0][first_index]] = True
        num_proposals = _count_at_or_above(score[proposal], thresholds)  # [T]
        num_recalled = _count_at_or_above(score[first], thresholds)  # [T]
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = num_recalled / num_proposals  # NaN where nothing is proposed, as in the port
            recall = num_recalled / count_face if count_face else np.zeros(thresh_num)
        curves[setting] = (precision, recall)
    return curves


def evaluate_wider(
    predictions: Mapping[str, np.ndarray],
    gt: WiderGroundTruth,
    images: Optional[Iterable[str]] = None,
    iou_threshold: float = 0.5,
) -> dict[str, float]:
    """Official easy / medium / hard AP.

    ``predictions``: ``"event/name" -> ndarray [N, 5]`` (x, y, w, h, score), original pixels.
    ``images``: optional subset of "event/name" keys; only those images' faces count.
    """
    curves = wider_pr_curves(predictions, gt, images=images, iou_threshold=iou_threshold)
    return {setting: ap_voc(recall, precision) for setting, (precision, recall) in curves.items()}


def _count_at_or_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``[(values >= t).sum() for t in thresholds]`` with one sort."""
    ordered = np.sort(values)
    return (len(ordered) - np.searchsorted(ordered, thresholds, side="left")).astype(np.float64)


def image_key(path: str) -> str:
    """The protocol's key of an image: ``"0--Parade/0_Parade_x_1.jpg"`` -> ``"0--Parade/0_Parade_x_1"``
    (forward slashes; an image extension is dropped, any other suffix kept)."""
    key = str(path).replace("\\", "/")
    stem, dot, suffix = key.rpartition(".")
    return stem if dot and suffix.lower() in ("jpg", "jpeg", "png") and "/" not in suffix else key


# ----------------------------------------------------------------------------- submission layout


def xyxy_to_submission(boxes_xyxy: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``[N, 4]`` xyxy + ``[N]`` scores -> ``[N, 5]`` (x, y, w, h, score) float64."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    out = np.empty((boxes.shape[0], 5), dtype=np.float64)
    out[:, :2] = boxes[:, :2]
    out[:, 2:4] = boxes[:, 2:4] - boxes[:, :2]
    out[:, 4] = np.asarray(scores, dtype=np.float64).reshape(-1)
    return out


def save_predictions(predictions: Mapping[str, np.ndarray], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``<out_dir>/<event>/<name>.txt`` per image: name line, count line, ``x y w h score`` lines.

    Boxes are written by descending score with round-trip precision, so a saved folder scores
    exactly like the in-memory predictions. Each file is written to a temporary file and renamed.
    """
    out_dir = Path(out_dir)
    written = []
    for key, array in predictions.items():
        key = image_key(key)
        event, _, name = key.rpartition("/")
        if not event or not name:
            raise ValueError(f"prediction key '{key}': expected 'event/name'")
        array = np.asarray(array, dtype=np.float64).reshape(-1, 5)
        array = array[np.argsort(-array[:, 4], kind="stable")]
        lines = [name, str(len(array))] + [" ".join(repr(float(v)) for v in row) for row in array]
        path = out_dir / event / f"{name}.txt"
        atomic_write_text(path, "\n".join(lines) + "\n")
        written.append(path)
    return written


def load_predictions(pred_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a submission folder back: ``"event/name" -> ndarray [N, 5]`` (file order kept).

    The name comes from the file's first line (as in the official evaluation), the event from its
    folder. Raises ``PredictionFileError`` for a malformed file (see ``_read_prediction_file``) and
    for two files naming the same image (naming both: which one counts would depend on the order
    the folder is listed in), ``MissingPredictionsError`` when the folder is absent.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise MissingPredictionsError(f"prediction folder not found: {pred_dir}")
    out: dict[str, np.ndarray] = {}
    source: dict[str, Path] = {}
    for event_dir in sorted(p for p in pred_dir.iterdir() if p.is_dir()):
        for path in sorted(event_dir.glob("*.txt")):
            name, boxes = _read_prediction_file(path)
            key = f"{event_dir.name}/{name}"
            if key in source:
                raise PredictionFileError(path, 1, f"names image '{key}', which {source[key]} names too; "
                                                   f"expected one prediction file per image")
            out[key], source[key] = boxes, path
    return out


def _read_prediction_file(path: Path) -> tuple[str, np.ndarray]:
    """``(name, [N, 5] float64)`` of one ``<name>.txt``; ``PredictionFileError`` (file, line) if malformed."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PredictionFileError(path, 0, f"cannot be read ({error.strerror or error}); expected a "
                                           f"prediction text file") from None
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte-order mark is dropped
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise PredictionFileError(path, line, f"byte 0x{data[error.start]:02X} is not valid UTF-8; expected "
                                              f"UTF-8 text") from None
    lines = text.splitlines()
    if len(lines) < 2:
        raise PredictionFileError(path, 0, f"expected a name line and a count line, found {len(lines)} line(s)")
    name = image_key(lines[0].strip().split("/")[-1])
    if not name:
        raise PredictionFileError(path, 1, "empty name line; expected the image name, e.g. '0_Parade_marchingband_1_20'")
    try:
        count = int(lines[1].strip() or "0")
    except ValueError:
        count = -1
    if count < 0:
        raise PredictionFileError(path, 2, f"expected the number of boxes (an integer >= 0), found {lines[1]!r}")
    rows = [(lineno, line) for lineno, line in enumerate(lines[2:], start=3) if line.strip()]
    if len(rows) != count:
        raise PredictionFileError(path, 2, f"count line says {count} boxes, file has {len(rows)}")
    boxes = np.zeros((count, 5), dtype=np.float64)
    for k, (lineno, line) in enumerate(rows):
        values = line.split()
        try:
            if len(values) != 5:
                raise ValueError
            boxes[k] = [float(v) for v in values]
        except ValueError:
            raise PredictionFileError(path, lineno, f"expected 'x y w h score', found {line!r}") from None
    finite = np.isfinite(boxes)  # float() accepts nan, inf and 1e999 (inf)
    bad = ~finite.all(axis=1) | (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
    if bad.any():
        k = int(np.argmax(bad))
        if not finite[k].all():
            field = int(np.argmin(finite[k]))
            what = f"{('x', 'y', 'w', 'h', 'score')[field]}={boxes[k, field]} is not a finite number"
        else:
            what = f"negative box size w={boxes[k, 2]:g} h={boxes[k, 3]:g}"
        raise PredictionFileError(path, rows[k][0], f"{what} in {rows[k][1].strip()!r}; expected finite "
                                                    f"'x y w h score' with w >= 0 and h >= 0")
    return name, boxes


# ----------------------------------------------------------------------------- CLI


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m detlab.wider_eval",
        description="Score a saved WIDER FACE prediction folder with the official easy/medium/hard protocol.",
    )
    parser.add_argument("pred_dir", help="folder in the submission layout: <event>/<name>.txt")
    parser.add_argument("--gt", default=None,
                        help="folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat "
                             "(default: <paths.data_dir>/widerface/eval_tools/ground_truth; DETLAB_DATA sets paths.data_dir)")
    parser.add_argument("--images", choices=("predicted", "all"), default="predicted",
                        help="predicted: only images with a prediction file count (default); "
                             "all: every val image, a missing file meaning no predictions")
    args = parser.parse_args(argv)
    from detlab.paths import widerface_root

    gt_dir = Path(args.gt) if args.gt else widerface_root() / "eval_tools" / "ground_truth"
    try:
        gt = load_wider_ground_truth(gt_dir)
        predictions = load_predictions(args.pred_dir)
        known = set(gt.keys)
        unknown = [k for k in predictions if k not in known]
        if unknown:
            raise KeyError(f"{len(unknown)} prediction file(s) name images outside the val ground truth, "
                           f"e.g. '{unknown[0]}'")
        images = list(predictions) if args.images == "predicted" else None
        aps = evaluate_wider(predictions, gt, images=images)
    except (UserError, OSError, ValueError, KeyError) as error:
        # One line on stderr, exit code 2, as detlab.errors.report_user_errors does for the other entry points.
        if isinstance(error, UserError) and debug_requested():
            raise
        if isinstance(error, KeyError) and error.args:  # str(KeyError) would quote the message
            error = LookupError(error.args[0])
        print(one_line(error), file=sys.stderr)
        return 2
    num_images = len(gt.keys) if images is None else len(images)
    print(f"WIDER FACE val, {num_images} images")
    for setting in SETTINGS:
        print(f"  {setting:<6} AP {aps[setting]:.4f}")
    print(json.dumps({"wider": aps, "num_images": num_images}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
