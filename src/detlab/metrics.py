"""Detection metrics: TP/FP/FN, precision, recall, F1, AP50 and mIoU, overall and per face-size bucket.

Definitions (all boxes pixel ``xyxy``; predictions and ground truth in the same frame):

- **Matching** (``match_predictions``): greedy and one-to-one, predictions taken in descending score
  order (ties keep their input order: the sort is stable). Each prediction takes, among the faces
  not yet matched whose IoU with it reaches the threshold, the one of highest IoU (ties: lower face
  index). A prediction with no such face is a false positive, including a second prediction on an
  already matched face. A face left unmatched is a false negative.
- **Ignored faces** (``gt_ignore``): a prediction that finds no free face but reaches the threshold
  with an ignored face is neither TP nor FP (it is "ignored"); ignored faces never count as FN, are
  left out of ``num_gt``, mIoU and recall, and can absorb any number of predictions (like COCO crowds).
  A free non-ignored face is always preferred to an ignored one.
- **TP/FP/FN, precision, recall, F1** count the predictions with ``score >= score_threshold``.
- **AP50** (``ap50``): VOC all-point interpolated AP at IoU 0.5 over every prediction with
  ``score >= ap_score_floor`` (``eval.score_floor``). The precision-recall curve is evaluated only at distinct scores, so
  the order among tied scores cannot change the value.
- **mIoU** (``miou``): the mean over ground-truth faces of the best IoU with any kept prediction
  (``score >= score_threshold``), 0 for a face without one. It does not depend on the matching (one
  prediction may be the best for two faces). ``mean_tp_iou`` is the mean IoU of the matched TP pairs.
- **Size buckets**: a box's size is its larger side ``max(x2 - x1, y2 - y1)``; ``small`` is size
  ``< size_edges[0]``, ``medium`` is ``< size_edges[1]``, ``large`` the rest. Faces (TP, FN, mIoU,
  ``num_gt``) go to their own face's bucket; a TP goes to its matched face's bucket; a false
  positive has no face, so it goes to the bucket of the predicted box's own size. Per-bucket
  ``num_pred`` is ``tp + fp`` of the bucket; the overall ``num_pred`` also counts ignored predictions.
- **Size-adaptive IoU** (``size_adaptive_iou=True``, off by default): a face smaller than
  ``size_edges[0]`` is matched at ``max(adaptive_iou_floor, iou_threshold * size / size_edges[0])``:
  the threshold falls linearly with the face size below the small edge, never under the floor.
  (A localisation error of a pixel or two costs a 10-pixel face far more IoU than a 100-pixel one.)
  The same rule, with base 0.5, applies to the AP50 matching.

- **Error breakdown** (TIDE-style, for one class): each false positive at ``score_threshold`` is a
  ``localisation`` error (IoU >= 0.1 with a face no prediction found), a ``duplicate`` (otherwise
  IoU >= 0.1 with a face another prediction found) or ``background`` (IoU < 0.1 with every face):
  ``fp_localisation + fp_duplicate + fp_background = fp``; missed faces are ``fn``. Per bucket too
  (a false positive goes to its own box's bucket, like ``fp``).

Counting at ``score_threshold`` and AP over everything above ``ap_score_floor`` look like two
matchings, but the greedy matching visits predictions in descending score order, so a prediction's
fate depends only on predictions scored higher: the matching of the thresholded set is exactly the
score-sorted prefix of the matching of the floor set. ``update`` therefore matches once (a second
matching only when ``iou_threshold`` differs from AP50's 0.5); a test checks the identity against
two independent matchings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torchvision.ops import box_iou

BUCKETS = ("small", "medium", "large")
AP_IOU = 0.5
# The kinds of a false positive at the score threshold (``fp_<kind>``, summing to ``fp``), and the IoU
# with a face from which a false positive counts as that face's localisation error or duplicate.
FP_KINDS = ("localisation", "duplicate", "background")
LOCALISATION_MIN_IOU = 0.1

# Per-prediction match status.
FP, TP, IGNORED = 0, 1, -1


@dataclass
class MatchResult:
    """Outcome of ``match_predictions``; per-prediction fields follow the input order."""

    status: torch.Tensor  # [K] int8: 1 TP, 0 FP, -1 ignored (matched an ignored face only)
    matched_gt: torch.Tensor  # [K] int64, index of the matched face, -1 for FP
    matched_iou: torch.Tensor  # [K] float32, IoU with the matched face, 0 for FP
    gt_matched: torch.Tensor  # [N] bool, face matched by a TP
    iou: torch.Tensor  # [K, N] float32 IoU matrix


def ap_voc(recall: Any, precision: Any) -> float:
    """VOC all-point interpolated AP (the area under the precision envelope).

    ``recall`` ascending, ``precision`` aligned with it. Same arithmetic as the official VOC and
    WIDER FACE ``voc_ap`` (sentinels (0, 0) and (1, 0), envelope from the right, sum over recall steps).
    """
    rec = np.asarray(recall, dtype=np.float64).ravel()
    prec = np.asarray(precision, dtype=np.float64).ravel()
    if rec.shape != prec.shape:
        raise ValueError(f"recall and precision differ in length: {rec.shape} vs {prec.shape}")
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope, right to left
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def size_adaptive_thresholds(
    gt_boxes: torch.Tensor, iou_threshold: float, small_edge: float, floor: float
) -> torch.Tensor:
    """Per-face IoU threshold ``max(floor, iou_threshold * min(1, size / small_edge))``; ``[N]``."""
    size = _max_side(gt_boxes)
    scale = torch.clamp(size / small_edge, max=1.0)
    return torch.clamp(iou_threshold * scale, min=min(floor, iou_threshold))


def match_predictions(
    pred_boxes: torch.Tensor,
    pred_scores: torch.Tensor,
    gt_boxes: torch.Tensor,
    iou_threshold: Union[float, torch.Tensor],
    gt_ignore: Optional[torch.Tensor] = None,
) -> MatchResult:
    """Greedy one-to-one matching in descending score order (see the module docstring).

    ``pred_boxes`` ``[K, 4]``, ``pred_scores`` ``[K]``, ``gt_boxes`` ``[N, 4]`` xyxy;
    ``iou_threshold`` a float or a per-face ``[N]`` tensor; ``gt_ignore`` ``[N]`` bool or None.
    """
    pred_boxes = pred_boxes.detach().float().cpu().reshape(-1, 4)
    pred_scores = pred_scores.detach().float().cpu().reshape(-1)
    gt_boxes = gt_boxes.detach().float().cpu().reshape(-1, 4)
    if pred_boxes.shape[0] != pred_scores.shape[0]:
        raise ValueError(f"{pred_boxes.shape[0]} boxes but {pred_scores.shape[0]} scores")
    num_gt = gt_boxes.shape[0]
    ignore = np.zeros(num_gt, dtype=bool) if gt_ignore is None else _as_bool(gt_ignore, num_gt)
    thresholds = np.broadcast_to(np.asarray(torch.as_tensor(iou_threshold, dtype=torch.float32).cpu()),
                                 (num_gt,))
    order = _score_order(pred_scores.numpy())
    iou = box_iou(pred_boxes, gt_boxes)  # [K, N]
    status_sorted, gt_sorted = _greedy_match(iou.numpy()[order], thresholds, ignore)
    status = np.empty_like(status_sorted)
    matched = np.empty_like(gt_sorted)
    status[order] = status_sorted
    matched[order] = gt_sorted
    matched_iou = np.zeros(len(order), dtype=np.float32)
    has = matched >= 0
    matched_iou[has] = iou.numpy()[np.nonzero(has)[0], matched[has]]
    gt_matched = np.zeros(num_gt, dtype=bool)
    gt_matched[matched[status == TP]] = True
    return MatchResult(
        status=torch.from_numpy(status), matched_gt=torch.from_numpy(matched),
        matched_iou=torch.from_numpy(matched_iou), gt_matched=torch.from_numpy(gt_matched), iou=iou,
    )


class DetectionEvaluator:
    """Accumulates per-image matchings; ``compute`` turns them into the metrics dict.

    ``update`` is cheap (one ``box_iou`` and one greedy matching per image) and stores, for AP,
    only ``(score, is_tp, bucket)`` per prediction, so ``compute`` is a single sort.
    """

    def __init__(
        self,
        iou_threshold: float = 0.5,
        score_threshold: float = 0.5,
        size_edges: Sequence[float] = (16.0, 64.0),
        size_adaptive_iou: bool = False,
        ap_score_floor: float = 0.01,
        adaptive_iou_floor: float = 0.3,
    ) -> None:
        edges = tuple(float(e) for e in size_edges)
        if len(edges) != 2 or not 0 < edges[0] < edges[1]:
            raise ValueError(f"size_edges: expected two increasing positive edges, got {size_edges!r}")
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
        if not 0 < adaptive_iou_floor <= 1:
            raise ValueError(f"adaptive_iou_floor must be in (0, 1], got {adaptive_iou_floor!r}")
        self.iou_threshold = float(iou_threshold)
        self.score_threshold = float(score_threshold)
        self.size_edges = edges
        self.size_adaptive_iou = bool(size_adaptive_iou)
        self.ap_score_floor = float(ap_score_floor)
        self.adaptive_iou_floor = float(adaptive_iou_floor)
        self.reset()

    @classmethod
    def from_config(cls, cfg: Any) -> "DetectionEvaluator":
        """Build from an ``EvalConfig`` (or anything with the same attributes)."""
        return cls(
            iou_threshold=cfg.iou_threshold, score_threshold=cfg.score_threshold,
            size_edges=tuple(cfg.size_edges), size_adaptive_iou=cfg.size_adaptive_iou,
            ap_score_floor=cfg.score_floor,
            adaptive_iou_floor=getattr(cfg, "size_adaptive_iou_floor", 0.3),
        )

    def reset(self) -> None:
        nb = len(BUCKETS)
        self._tp = np.zeros(nb, dtype=np.int64)
        self._fp = np.zeros(nb, dtype=np.int64)
        self._fn = np.zeros(nb, dtype=np.int64)
        self._fp_kind = np.zeros((len(FP_KINDS), nb), dtype=np.int64)  # FP_KINDS x buckets
        self._num_gt = np.zeros(nb, dtype=np.int64)
        self._best_iou_sum = np.zeros(nb, dtype=np.float64)  # mIoU numerators
        self._tp_iou_sum = np.zeros(nb, dtype=np.float64)
        self._num_ignored = 0
        self._num_images = 0
        self._ap_scores: list[np.ndarray] = []
        self._ap_is_tp: list[np.ndarray] = []
        self._ap_bucket: list[np.ndarray] = []

    def update(
        self,
        predictions: Sequence[dict[str, torch.Tensor]],
        gt_boxes: Sequence[torch.Tensor],
        gt_ignore: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ) -> None:
        """Add a batch: ``predictions[i] = {"boxes": [K, 4], "scores": [K]}`` (already NMSed),
        ``gt_boxes[i]`` ``[N, 4]``, ``gt_ignore[i]`` ``[N]`` bool or None; same frame for both."""
        if len(predictions) != len(gt_boxes):
            raise ValueError(f"{len(predictions)} predictions but {len(gt_boxes)} ground-truth entries")
        if gt_ignore is not None and len(gt_ignore) != len(gt_boxes):
            raise ValueError(f"{len(gt_ignore)} ignore masks but {len(gt_boxes)} ground-truth entries")
        for i, (pred, gt) in enumerate(zip(predictions, gt_boxes)):
            ignore = None if gt_ignore is None else gt_ignore[i]
            self._update_image(pred["boxes"], pred["scores"], gt, ignore)

    def _update_image(
        self, boxes: torch.Tensor, scores: torch.Tensor, gt: torch.Tensor, ignore: Optional[torch.Tensor]
    ) -> None:
        boxes = boxes.detach().float().cpu().reshape(-1, 4)  # [K, 4]
        scores_np = scores.detach().float().cpu().reshape(-1).numpy()  # [K]
        gt = torch.as_tensor(gt).detach().float().cpu().reshape(-1, 4)  # [N, 4]
        num_gt = gt.shape[0]
        ignored = np.zeros(num_gt, dtype=bool) if ignore is None else _as_bool(ignore, num_gt)
        self._num_images += 1

        # One matching over the floor set, in score order; the thresholded set is its prefix.
        floor = min(self.ap_score_floor, self.score_threshold)
        keep = np.nonzero(scores_np >= floor)[0]
        order = keep[_score_order(scores_np[keep])]
        boxes, scores_np = boxes[torch.from_numpy(order)], scores_np[order]
        num_kept = int(np.count_nonzero(scores_np >= self.score_threshold))  # prefix length

        gt_np = gt.numpy()
        gt_bucket = self._bucket(gt_np)  # [N]
        pred_bucket = self._bucket(boxes.numpy())  # [K]
        iou = box_iou(boxes, gt).numpy()  # [K, N]
        thresholds = self._thresholds(gt, self.iou_threshold)
        status, matched = _greedy_match(iou, thresholds, ignored)

        # Counts at the score threshold (the prefix).
        head_status, head_matched = status[:num_kept], matched[:num_kept]
        tp_rows = np.nonzero(head_status == TP)[0]
        tp_gt = head_matched[tp_rows]
        fp_rows = np.nonzero(head_status == FP)[0]
        counted = ~ignored
        nb = len(BUCKETS)
        self._tp += np.bincount(gt_bucket[tp_gt], minlength=nb)
        self._fp += np.bincount(pred_bucket[fp_rows], minlength=nb)
        kind = _false_positive_kinds(iou[fp_rows], head_matched[head_status == TP], ignored)  # [F]
        np.add.at(self._fp_kind, (kind, pred_bucket[fp_rows]), 1)
        self._num_gt += np.bincount(gt_bucket[counted], minlength=nb)
        gt_hit = np.zeros(num_gt, dtype=bool)
        gt_hit[tp_gt] = True
        self._fn += np.bincount(gt_bucket[counted & ~gt_hit], minlength=nb)
        self._tp_iou_sum += np.bincount(gt_bucket[tp_gt], weights=iou[tp_rows, tp_gt], minlength=nb)
        self._num_ignored += int(np.count_nonzero(head_status == IGNORED))
        if num_kept > 0 and num_gt > 0:
            best = iou[:num_kept].max(axis=0)  # [N]
            self._best_iou_sum += np.bincount(gt_bucket[counted], weights=best[counted], minlength=nb)

        # AP50 over the floor set (prefix-free: every prediction above the floor).
        ap_rows = scores_np >= self.ap_score_floor
        if self.iou_threshold != AP_IOU:
            status, matched = _greedy_match(iou, self._thresholds(gt, AP_IOU), ignored)
        rows = np.nonzero(ap_rows & (status != IGNORED))[0]
        is_tp = status[rows] == TP
        bucket = np.where(is_tp, gt_bucket[np.maximum(matched[rows], 0)] if num_gt else 0, pred_bucket[rows])
        self._ap_scores.append(scores_np[rows])
        self._ap_is_tp.append(is_tp)
        self._ap_bucket.append(bucket.astype(np.int64))

    def compute(self) -> dict[str, float]:
        """All metrics as plain floats (counts too, so the dict is uniform)."""
        scores = np.concatenate(self._ap_scores) if self._ap_scores else np.zeros(0, dtype=np.float32)
        is_tp = np.concatenate(self._ap_is_tp) if self._ap_is_tp else np.zeros(0, dtype=bool)
        bucket = np.concatenate(self._ap_bucket) if self._ap_bucket else np.zeros(0, dtype=np.int64)
        order = _score_order(scores)  # the single sort
        scores, is_tp, bucket = scores[order], is_tp[order], bucket[order]

        out = self._summary(self._tp.sum(), self._fp.sum(), self._fn.sum(), self._num_gt.sum(),
                            self._best_iou_sum.sum(), self._tp_iou_sum.sum())
        out["ap50"] = _average_precision(scores, is_tp, int(self._num_gt.sum()))
        out.update({f"fp_{name}": float(self._fp_kind[k].sum()) for k, name in enumerate(FP_KINDS)})
        out["num_pred"] = float(self._tp.sum() + self._fp.sum() + self._num_ignored)
        out["num_ignored"] = float(self._num_ignored)
        out["num_images"] = float(self._num_images)
        for b, name in enumerate(BUCKETS):
            part = self._summary(self._tp[b], self._fp[b], self._fn[b], self._num_gt[b],
                                 self._best_iou_sum[b], self._tp_iou_sum[b])
            in_bucket = bucket == b
            part["ap50"] = _average_precision(scores[in_bucket], is_tp[in_bucket], int(self._num_gt[b]))
            part["num_pred"] = float(self._tp[b] + self._fp[b])
            part.update({f"fp_{name}": float(self._fp_kind[k, b]) for k, name in enumerate(FP_KINDS)})
            out.update({f"{name}/{k}": v for k, v in part.items()})
        return out

    def pr_curve(self, num_thresholds: int = 101) -> dict[str, np.ndarray]:
        """TP / FP / FN, precision and recall at the score thresholds ``linspace(0, 1, num_thresholds)``,
        from the AP50 matching (IoU 0.5, predictions above ``ap_score_floor``, ignored ones left out):
        a face never predicted counts in FN at every threshold. Precision is 0 where nothing scores."""
        scores = np.concatenate(self._ap_scores) if self._ap_scores else np.zeros(0, dtype=np.float32)
        is_tp = np.concatenate(self._ap_is_tp) if self._ap_is_tp else np.zeros(0, dtype=bool)
        order = np.argsort(scores, kind="stable")
        scores, is_tp = scores[order], is_tp[order]
        thresholds = np.linspace(0.0, 1.0, num_thresholds)
        # compared in the scores' own precision, as the counts at score_threshold are (float32 0.9 >= 0.9)
        first = np.searchsorted(scores, thresholds.astype(scores.dtype), side="left")  # first score >= t
        tp_from = np.concatenate((np.cumsum(is_tp[::-1])[::-1], [0]))  # TPs at index >= i
        fp_from = np.concatenate((np.cumsum(~is_tp[::-1])[::-1], [0]))
        tp, fp = tp_from[first].astype(np.int64), fp_from[first].astype(np.int64)
        fn = int(self._num_gt.sum()) - tp
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        return {"thresholds": thresholds, "tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall}

    @staticmethod
    def _summary(tp: Any, fp: Any, fn: Any, num_gt: Any, best_iou_sum: float, tp_iou_sum: float) -> dict[str, float]:
        tp, fp, fn, num_gt = int(tp), int(fp), int(fn), int(num_gt)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "miou": float(best_iou_sum) / num_gt if num_gt else 0.0,
            "mean_tp_iou": float(tp_iou_sum) / tp if tp else 0.0,
            "tp": float(tp), "fp": float(fp), "fn": float(fn),
            "precision": precision, "recall": recall, "f1": f1,
            "num_gt": float(num_gt),
        }

    def _bucket(self, boxes: np.ndarray) -> np.ndarray:
        """Bucket index per box (0 small, 1 medium, 2 large); a size equal to an edge goes up."""
        size = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        return np.searchsorted(np.asarray(self.size_edges, dtype=size.dtype), size, side="right")

    def _thresholds(self, gt: torch.Tensor, base: float) -> np.ndarray:
        if not self.size_adaptive_iou:
            return np.full(gt.shape[0], base, dtype=np.float32)
        return size_adaptive_thresholds(gt, base, self.size_edges[0], self.adaptive_iou_floor).numpy()


def _average_precision(scores_desc: np.ndarray, is_tp: np.ndarray, num_gt: int) -> float:
    """VOC AP from predictions sorted by descending score; the curve is read at distinct scores."""
    if num_gt == 0 or scores_desc.size == 0:
        return 0.0
    tp_cum = np.cumsum(is_tp)
    fp_cum = np.cumsum(~is_tp)
    last_of_tie = np.append(scores_desc[1:] != scores_desc[:-1], True)
    tp_cum, fp_cum = tp_cum[last_of_tie], fp_cum[last_of_tie]
    return ap_voc(tp_cum / num_gt, tp_cum / (tp_cum + fp_cum))


def _false_positive_kinds(fp_iou: np.ndarray, tp_faces: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """Kind of each false positive (index into ``FP_KINDS``), TIDE-style for one class.

    ``fp_iou`` ``[F, N]`` are the false positives' IoUs with the faces, ``tp_faces`` the faces matched
    by true positives (so the rest are missed), ``ignored`` ``[N]``. ``localisation``: IoU of at least
    ``LOCALISATION_MIN_IOU`` with a missed face (it found the face, badly placed); ``duplicate``: not
    that, but at least ``LOCALISATION_MIN_IOU`` with a face another prediction found; ``background``:
    below ``LOCALISATION_MIN_IOU`` with every counted face. Ignored faces count for none.
    """
    kinds = np.full(fp_iou.shape[0], FP_KINDS.index("background"), dtype=np.int64)
    if fp_iou.size == 0:
        return kinds
    found = np.zeros(fp_iou.shape[1], dtype=bool)
    found[tp_faces] = True
    near = fp_iou >= LOCALISATION_MIN_IOU  # [F, N]
    duplicate = (near & found[None, :] & ~ignored[None, :]).any(axis=1)
    localisation = (near & ~found[None, :] & ~ignored[None, :]).any(axis=1)
    kinds[duplicate] = FP_KINDS.index("duplicate")
    kinds[localisation] = FP_KINDS.index("localisation")
    return kinds


def _greedy_match(iou: np.ndarray, thresholds: np.ndarray, ignore: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of score-sorted predictions (rows of ``iou`` ``[K, N]``) to faces.

    Returns ``status`` ``[K]`` int8 (TP / FP / IGNORED) and ``matched`` ``[K]`` int64 (-1: none).
    The greedy choice is inherently sequential; the loop runs over candidate pairs (IoU above the
    face's threshold) only, which after NMS are a handful per face.
    """
    num_pred = iou.shape[0]
    status = np.full(num_pred, FP, dtype=np.int8)
    matched = np.full(num_pred, -1, dtype=np.int64)
    if num_pred == 0 or iou.shape[1] == 0:
        return status, matched
    rows, cols = np.nonzero(iou >= thresholds[None, :])
    if rows.size == 0:
        return status, matched
    values = iou[rows, cols]
    # Visit pairs by prediction rank, then free faces before ignored ones, then IoU (high first),
    # then face index: the first usable pair of each prediction is its greedy choice.
    visit = np.lexsort((cols, -values, ignore[cols], rows))
    taken = np.zeros(iou.shape[1], dtype=bool)
    done = np.zeros(num_pred, dtype=bool)
    for r, c in zip(rows[visit].tolist(), cols[visit].tolist()):
        if done[r]:
            continue
        if ignore[c]:
            status[r], matched[r], done[r] = IGNORED, c, True
        elif not taken[c]:
            status[r], matched[r], done[r], taken[c] = TP, c, True, True
    return status, matched


def _score_order(scores: np.ndarray) -> np.ndarray:
    """Descending score, stable (ties keep input order)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def _max_side(boxes: torch.Tensor) -> torch.Tensor:
    boxes = boxes.reshape(-1, 4)
    return torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def _as_bool(mask: Any, length: int) -> np.ndarray:
    array = np.asarray(torch.as_tensor(mask).detach().cpu().numpy(), dtype=bool).reshape(-1)
    if array.shape[0] != length:
        raise ValueError(f"gt_ignore has {array.shape[0]} entries for {length} faces")
    return array
