"""The pictures of a run besides its scalars: what detection users look at first.

- ``training_samples``: augmented training images with their boxes, drawn once at the start of a run
  (TensorBoard ``train/augmented_samples`` and ``plots/train_samples.jpg``), so an augmentation that
  moves boxes away from faces shows before the first epoch ends.
- ``ErrorGallery``: crops of the highest-scoring false positives (red; the faces near them green) and
  of the largest missed faces (green; the predictions near them red) at the score threshold, one row
  per face size (small / medium / large, ``eval.size_edges``), every
  ``eval.gallery_every`` epochs (TensorBoard ``gallery/false_positives``, ``gallery/missed_faces``).
- ``pr_curve_png``: the last validation's precision-recall curve, written into ``plots/`` when a run
  ends, for people who do not open TensorBoard (the learning curves beside it, ``plots/curves.png``, are
  ``detlab.analysis.learning_curves_png``).

Everything here works on what validation already has in memory (the batch's input images and the
predictions), so the cost is the crops and the drawing (measured in docs/training.md, "Pictures").
"""

from __future__ import annotations

import heapq
import io
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import cv2
import numpy as np
import torch

from detlab.data.transforms import denormalize
from detlab.metrics import BUCKETS, FP, match_predictions

TILE = 64  # pixels per gallery crop
LABEL_WIDTH = 64
FP_COLOUR, FN_COLOUR, EMPTY = (255, 64, 64), (0, 255, 0), 40  # RGB; grey of an empty slot


def image_grid(images: Sequence[np.ndarray], columns: int, pad: int = 2) -> np.ndarray:
    """RGB uint8 images (any sizes) on a grid of ``columns``, each in a cell of the largest size."""
    height = max(img.shape[0] for img in images)
    width = max(img.shape[1] for img in images)
    rows = math.ceil(len(images) / columns)
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), EMPTY, dtype=np.uint8)
    for index, img in enumerate(images):
        y, x = pad + (index // columns) * (height + pad), pad + (index % columns) * (width + pad)
        grid[y:y + img.shape[0], x:x + img.shape[1]] = img
    return grid


def to_rgb(images: torch.Tensor) -> list[np.ndarray]:
    """Normalised ``[B, 3, H, W]`` -> RGB uint8 ``[H, W, 3]`` arrays."""
    return [img.round().byte().permute(1, 2, 0).numpy() for img in denormalize(images.detach().float().cpu())]


def training_samples(dataset: Any, collate: Callable, count: int, seed: int) -> Optional[np.ndarray]:
    """``count`` training images (a seeded choice) as the loader's augmentation makes them, with their
    boxes drawn; None when every chosen image was skipped as unreadable.

    The augmentation draws from torch's global generator, which the trainer re-seeds at the start of
    every epoch, so drawing these does not change the run (a test checks it).
    """
    from detlab.engine.tensorboard import draw_detections

    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    images, targets = collate([dataset[int(i)] for i in chosen])
    if images.shape[0] == 0:
        return None
    no_boxes = np.zeros((0, 4), dtype=np.float32)
    drawn = [draw_detections(rgb, target["boxes"].numpy(), no_boxes, np.zeros(0))
             for rgb, target in zip(to_rgb(images), targets)]
    return image_grid(drawn, columns=math.ceil(math.sqrt(len(drawn))))


def _bucket(boxes: torch.Tensor, size_edges: Sequence[float]) -> np.ndarray:
    """``detlab.metrics``' size bucket of each box (larger side; a size equal to an edge goes up)."""
    size = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).numpy()
    return np.searchsorted(np.asarray(size_edges, dtype=size.dtype), size, side="right")


class ErrorGallery:
    """The ``per_size`` highest-scoring false positives and the ``per_size`` largest missed faces of
    each size bucket over one validation pass, matched as ``detlab.metrics`` matches them (greedy, at
    ``iou_threshold``, predictions scoring at least ``score_threshold``).

    Equal keys rank by image (the target's ``image_id``, else the order of arrival), then by order
    within the image, the earlier first, so the gallery of a pass split over processes, ``merge``d,
    is the gallery of the whole pass."""

    def __init__(self, score_threshold: float, iou_threshold: float, size_edges: Sequence[float], per_size: int) -> None:
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.size_edges = list(size_edges)
        self.per_size = per_size
        # per kind and bucket: a min-heap of (rank key, -(image, index), tile) keeping the per_size best
        self._heaps: dict[str, list[list[tuple[float, tuple[int, int], np.ndarray]]]] = {
            kind: [[] for _ in BUCKETS] for kind in ("false_positives", "missed_faces")}
        self._arrivals = 0  # images seen: their order when targets carry no image_id
        self.totals = {kind: np.zeros(len(BUCKETS), dtype=np.int64) for kind in self._heaps}  # all, not just shown

    def update(self, images: torch.Tensor, targets: Sequence[Mapping[str, Any]],
               predictions: Sequence[Mapping[str, torch.Tensor]], gt_boxes: Sequence[torch.Tensor]) -> None:
        """A validation batch: the model's input images, their targets (``scale``), predictions and
        faces in original pixels."""
        for index, (target, pred, gt) in enumerate(zip(targets, predictions, gt_boxes)):
            image = int(target["image_id"]) if "image_id" in target else self._arrivals
            self._arrivals += 1
            keep = pred["scores"] >= self.score_threshold
            boxes, scores = pred["boxes"][keep], pred["scores"][keep]
            match = match_predictions(boxes, scores, gt, self.iou_threshold)
            fp = match.status == FP
            scale = torch.tensor([float(v) for v in target["scale"]] * 2)
            faces_in, boxes_in = gt.reshape(-1, 4) / scale, boxes / scale
            candidates = (  # each crop also shows the other side: the faces near a false positive, and
                # the predictions near a missed face (a near miss is a localisation error, not a blind spot)
                ("false_positives", boxes[fp], scores[fp].tolist(), FP_COLOUR, faces_in, FN_COLOUR),
                ("missed_faces", gt[~match.gt_matched], None, FN_COLOUR, boxes_in, FP_COLOUR),
            )
            for kind, kind_boxes, kind_scores, colour, context, context_colour in candidates:
                if len(kind_boxes) == 0:
                    continue
                sizes = torch.maximum(kind_boxes[:, 2] - kind_boxes[:, 0], kind_boxes[:, 3] - kind_boxes[:, 1])
                keys = kind_scores if kind_scores is not None else sizes.tolist()  # missed: largest first
                buckets = _bucket(kind_boxes, self.size_edges)
                self.totals[kind] += np.bincount(buckets, minlength=len(BUCKETS))
                for j, (box, bucket, key) in enumerate(zip(kind_boxes / scale, buckets, keys)):
                    rank = (float(key), (-image, -j))  # equal keys: the earlier image, then box, ranks higher
                    if self._wanted(kind, bucket, rank):
                        label = f"{key:.2f}" if kind_scores is not None else None
                        self._keep(kind, bucket, (*rank, _tile(images[index], box, colour, label, context,
                                                              context_colour)))

    def merge(self, other: "ErrorGallery") -> None:
        """Add ``other``'s crops and totals: another process's share of the same pass (other images,
        ``image_id``s of the same dataset). The result does not depend on how the pass was split."""
        for kind, heaps in other._heaps.items():
            self.totals[kind] += other.totals[kind]
            for bucket, heap in enumerate(heaps):
                for item in heap:
                    if self._wanted(kind, bucket, item[:2]):
                        self._keep(kind, bucket, item)

    def _wanted(self, kind: str, bucket: int, rank: tuple[float, tuple[int, int]]) -> bool:
        heap = self._heaps[kind][bucket]
        return len(heap) < self.per_size or rank > heap[0][:2]

    def _keep(self, kind: str, bucket: int, item: tuple[float, tuple[int, int], np.ndarray]) -> None:
        heap = self._heaps[kind][bucket]
        (heapq.heappush if len(heap) < self.per_size else heapq.heapreplace)(heap, item)

    def pictures(self) -> dict[str, np.ndarray]:
        """``{"false_positives", "missed_faces"}``: one row per size bucket, best first, label on the left."""
        return {kind: _labelled_rows([(name, int(total), [tile for *_, tile in sorted(heap, key=lambda i: i[:2],
                                                                                       reverse=True)])
                                      for name, total, heap in zip(BUCKETS, self.totals[kind], heaps)], self.per_size)
                for kind, heaps in self._heaps.items()}


def _tile(image: torch.Tensor, box: torch.Tensor, colour: tuple[int, int, int], label: Optional[str],
          context: torch.Tensor, context_colour: tuple[int, int, int]) -> np.ndarray:
    """A ``TILE`` x ``TILE`` crop centred on ``box`` (input pixels) with as much context again around
    it, the ``context`` boxes drawn thin in ``context_colour``, then the box; parts outside the image are grey."""
    x1, y1, x2, y2 = box.tolist()
    side = max(2.0 * max(x2 - x1, y2 - y1), 8.0)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = int(math.floor(cx - side / 2)), int(math.floor(cy - side / 2))
    right, bottom = left + int(math.ceil(side)), top + int(math.ceil(side))
    height, width = image.shape[-2:]
    canvas = np.full((bottom - top, right - left, 3), EMPTY, dtype=np.uint8)
    sx1, sy1, sx2, sy2 = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    if sx2 > sx1 and sy2 > sy1:
        [crop] = to_rgb(image[:, sy1:sy2, sx1:sx2].unsqueeze(0))
        canvas[sy1 - top:sy2 - top, sx1 - left:sx2 - left] = crop
    zoom = TILE / canvas.shape[0]
    tile = cv2.resize(canvas, (TILE, TILE), interpolation=cv2.INTER_NEAREST if zoom >= 2 else cv2.INTER_AREA)
    tile = np.ascontiguousarray(tile)
    zoom_x = TILE / canvas.shape[1]

    def corners(b: Sequence[float]) -> tuple[tuple[int, int], tuple[int, int]]:
        return ((int(round((b[0] - left) * zoom_x)), int(round((b[1] - top) * zoom))),
                (int(round((b[2] - left) * zoom_x)), int(round((b[3] - top) * zoom))))

    near = context[(context[:, 2] > left) & (context[:, 0] < right) & (context[:, 3] > top) & (context[:, 1] < bottom)]
    for other in near.tolist():
        if other != [x1, y1, x2, y2]:
            cv2.rectangle(tile, *corners(other), context_colour, 1, cv2.LINE_4)
    cv2.rectangle(tile, *corners((x1, y1, x2, y2)), colour, 1)
    if label:
        cv2.putText(tile, label, (2, TILE - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, colour, 1, cv2.LINE_AA)
    return tile


def _labelled_rows(rows: Sequence[tuple[str, int, Sequence[np.ndarray]]], per_row: int, pad: int = 2) -> np.ndarray:
    """One row of tiles per ``(name, total, tiles)``, the name and the total (all of them, not only the
    ones shown) on the left."""
    grid = np.full((len(rows) * (TILE + pad) + pad, LABEL_WIDTH + per_row * (TILE + pad) + pad, 3), EMPTY,
                   dtype=np.uint8)
    for r, (name, total, tiles) in enumerate(rows):
        y = pad + r * (TILE + pad)
        cv2.putText(grid, name, (4, y + TILE // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (230, 230, 230), 1, cv2.LINE_AA)
        cv2.putText(grid, f"{total} in all", (4, y + TILE // 2 + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.32, (160, 160, 160),
                    1, cv2.LINE_AA)
        for c, tile in enumerate(tiles):
            x = LABEL_WIDTH + pad + c * (TILE + pad)
            grid[y:y + TILE, x:x + TILE] = tile
    return grid


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def pr_curve_png(curve: Mapping[str, np.ndarray], score_threshold: float, title: str) -> bytes:
    """Precision against recall over the score thresholds (``DetectionEvaluator.pr_curve``), the
    score threshold's point marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.5))
    axes = fig.subplots()
    scored = (curve["tp"] + curve["fp"]) > 0
    axes.plot(curve["recall"][scored], curve["precision"][scored], "C0-")
    at = int(np.argmin(np.abs(curve["thresholds"] - score_threshold)))
    if scored[at]:
        axes.plot([curve["recall"][at]], [curve["precision"][at]], "C3o",
                  label=f"score {score_threshold:g}: recall {curve['recall'][at]:.2f}, precision {curve['precision'][at]:.2f}")
        axes.legend(fontsize=8, loc="lower left")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)
