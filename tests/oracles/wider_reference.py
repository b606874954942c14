"""A port of the official WIDER FACE evaluation, kept as the oracle for ``detlab.wider_eval``.

It lives with the tests, outside the package (nothing in ``detlab`` imports it): the tests import it as
``oracles.wider_reference``, ``scripts/bench_eval.py`` from ``tests/oracles``.

The reference is the widely used WiderFace-Evaluation Python port (``evaluation.py``:
``get_gt_boxes``, ``read_pred_file``, ``get_preds``, ``norm_score``, ``image_eval``, ``img_pr_info``,
``dataset_pr_info``, ``voc_ap``, ``evaluation``), kept as written except:

- ``bbox_overlaps`` is the Cython ``box_overlaps.pyx`` of the port rewritten with numpy broadcasting
  (same arithmetic, +1-pixel convention); it is not what makes the port slow;
- ``evaluation`` takes already loaded predictions and ground truth (``reference_evaluation``) so both
  scorers run on the same in-memory input, and an optional image subset (images outside it are
  skipped, their faces not counted; a missing event or image means no predictions instead of a KeyError);
- no tqdm progress bars.

``synthetic_predictions`` derives a fixed prediction set from the ground truth with a fixed seed
(jittered boxes, random scores, false positives; no model needed). ``scripts/bench_eval.py`` times
both scorers on it; ``tests/test_wider_eval.py`` checks they agree.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy.io import loadmat


def bbox_overlaps(boxes, query_boxes):
    """Port of box_overlaps.pyx: boxes [N, 4], query_boxes [K, 4] (x1 y1 x2 y2) -> [N, K], +1 convention."""
    boxes = boxes.astype(np.float64)
    query_boxes = query_boxes.astype(np.float64)
    box_area = (query_boxes[:, 2] - query_boxes[:, 0] + 1) * (query_boxes[:, 3] - query_boxes[:, 1] + 1)
    iw = np.minimum(boxes[:, None, 2], query_boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], query_boxes[None, :, 0]) + 1
    ih = np.minimum(boxes[:, None, 3], query_boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], query_boxes[None, :, 1]) + 1
    ua = (boxes[:, None, 2] - boxes[:, None, 0] + 1) * (boxes[:, None, 3] - boxes[:, None, 1] + 1) + box_area[None, :] - iw * ih
    overlaps = np.zeros((boxes.shape[0], query_boxes.shape[0]), dtype=np.float64)
    inside = (iw > 0) & (ih > 0)
    overlaps[inside] = (iw * ih)[inside] / ua[inside]
    return overlaps


def get_gt_boxes(gt_dir):
    gt_mat = loadmat(os.path.join(gt_dir, "wider_face_val.mat"))
    hard_mat = loadmat(os.path.join(gt_dir, "wider_hard_val.mat"))
    medium_mat = loadmat(os.path.join(gt_dir, "wider_medium_val.mat"))
    easy_mat = loadmat(os.path.join(gt_dir, "wider_easy_val.mat"))

    facebox_list = gt_mat["face_bbx_list"]
    event_list = gt_mat["event_list"]
    file_list = gt_mat["file_list"]

    hard_gt_list = hard_mat["gt_list"]
    medium_gt_list = medium_mat["gt_list"]
    easy_gt_list = easy_mat["gt_list"]

    return facebox_list, event_list, file_list, hard_gt_list, medium_gt_list, easy_gt_list


def read_pred_file(filepath):
    with open(filepath, "r") as f:
        lines = f.readlines()
        img_file = lines[0].rstrip("\n\r")
        lines = lines[2:]
    boxes = np.array(list(map(lambda x: [float(a) for a in x.rstrip("\r\n").split(" ")], lines))).astype("float")
    return img_file.split("/")[-1], boxes


def get_preds(pred_dir):
    events = os.listdir(pred_dir)
    boxes = dict()
    for event in events:
        event_dir = os.path.join(pred_dir, event)
        event_images = os.listdir(event_dir)
        current_event = dict()
        for imgtxt in event_images:
            imgname, _boxes = read_pred_file(os.path.join(event_dir, imgtxt))
            current_event[imgname.rstrip(".jpg")] = _boxes
        boxes[event] = current_event
    return boxes


def norm_score(pred):
    """pred {key: [[x1,y1,x2,y2,s]]}"""
    max_score = 0
    min_score = 1
    for _, k in pred.items():
        for _, v in k.items():
            if len(v) == 0:
                continue
            _min = np.min(v[:, -1])
            _max = np.max(v[:, -1])
            max_score = max(_max, max_score)
            min_score = min(_min, min_score)
    diff = max_score - min_score
    for _, k in pred.items():
        for _, v in k.items():
            if len(v) == 0:
                continue
            v[:, -1] = (v[:, -1] - min_score) / diff


def image_eval(pred, gt, ignore, iou_thresh):
    """single image evaluation; pred: Nx5, gt: Nx4, ignore"""
    _pred = pred.copy()
    _gt = gt.copy()
    pred_recall = np.zeros(_pred.shape[0])
    recall_list = np.zeros(_gt.shape[0])
    proposal_list = np.ones(_pred.shape[0])

    _pred[:, 2] = _pred[:, 2] + _pred[:, 0]
    _pred[:, 3] = _pred[:, 3] + _pred[:, 1]
    _gt[:, 2] = _gt[:, 2] + _gt[:, 0]
    _gt[:, 3] = _gt[:, 3] + _gt[:, 1]

    overlaps = bbox_overlaps(_pred[:, :4], _gt)

    for h in range(_pred.shape[0]):
        gt_overlap = overlaps[h]
        max_overlap, max_idx = gt_overlap.max(), gt_overlap.argmax()
        if max_overlap >= iou_thresh:
            if ignore[max_idx] == 0:
                recall_list[max_idx] = -1
                proposal_list[h] = -1
            elif recall_list[max_idx] == 0:
                recall_list[max_idx] = 1

        r_keep_index = np.where(recall_list == 1)[0]
        pred_recall[h] = len(r_keep_index)
    return pred_recall, proposal_list


def img_pr_info(thresh_num, pred_info, proposal_list, pred_recall):
    pr_info = np.zeros((thresh_num, 2)).astype("float")
    for t in range(thresh_num):
        thresh = 1 - (t + 1) / thresh_num
        r_index = np.where(pred_info[:, 4] >= thresh)[0]
        if len(r_index) == 0:
            pr_info[t, 0] = 0
            pr_info[t, 1] = 0
        else:
            r_index = r_index[-1]
            p_index = np.where(proposal_list[: r_index + 1] == 1)[0]
            pr_info[t, 0] = len(p_index)
            pr_info[t, 1] = pred_recall[r_index]
    return pr_info


def dataset_pr_info(thresh_num, pr_curve, count_face):
    _pr_curve = np.zeros((thresh_num, 2))
    for i in range(thresh_num):
        _pr_curve[i, 0] = pr_curve[i, 1] / pr_curve[i, 0]
        _pr_curve[i, 1] = pr_curve[i, 1] / count_face
    return _pr_curve


def voc_ap(rec, prec):
    # correct AP calculation
    # first append sentinel values at the end
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))

    # compute the precision envelope
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])

    # to calculate area under PR curve, look for points
    # where X axis (recall) changes value
    i = np.where(mrec[1:] != mrec[:-1])[0]

    # and sum (\Delta recall) * prec
    ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def reference_evaluation(pred, gt_boxes, iou_thresh=0.5, subset=None):
    """The port's ``evaluation`` on loaded input; ``pred`` is normalised in place (as the port does)."""
    norm_score(pred)
    facebox_list, event_list, file_list, hard_gt_list, medium_gt_list, easy_gt_list = gt_boxes
    event_num = len(event_list)
    thresh_num = 1000
    setting_gts = [easy_gt_list, medium_gt_list, hard_gt_list]
    aps = []
    for setting_id in range(3):
        # different setting
        gt_list = setting_gts[setting_id]
        count_face = 0
        pr_curve = np.zeros((thresh_num, 2)).astype("float")
        for i in range(event_num):
            event_name = str(event_list[i][0][0])
            img_list = file_list[i][0]
            pred_list = pred.get(event_name, {})
            sub_gt_list = gt_list[i][0]
            gt_bbx_list = facebox_list[i][0]

            for j in range(len(img_list)):
                img_name = str(img_list[j][0][0])
                if subset is not None and f"{event_name}/{img_name}" not in subset:
                    continue
                pred_info = pred_list.get(img_name, np.zeros((0, 5)))

                gt_boxes_j = gt_bbx_list[j][0].astype("float")
                keep_index = sub_gt_list[j][0]
                count_face += len(keep_index)

                if len(gt_boxes_j) == 0 or len(pred_info) == 0:
                    continue
                ignore = np.zeros(gt_boxes_j.shape[0])
                if len(keep_index) != 0:
                    ignore[keep_index - 1] = 1
                pred_recall, proposal_list = image_eval(pred_info, gt_boxes_j, ignore, iou_thresh)

                _img_pr_info = img_pr_info(thresh_num, pred_info, proposal_list, pred_recall)

                pr_curve += _img_pr_info
        pr_curve = dataset_pr_info(thresh_num, pr_curve, count_face)

        propose = pr_curve[:, 0]
        recall = pr_curve[:, 1]

        ap = voc_ap(recall, propose)
        aps.append(ap)
    return {"easy": float(aps[0]), "medium": float(aps[1]), "hard": float(aps[2])}


def local_val_images(root: Path) -> list[str]:
    """The "event/name" keys of the val images present under ``root/WIDER_val/images``."""
    images = root / "WIDER_val" / "images"
    return sorted(f"{p.parent.name}/{p.stem}" for p in images.glob("*/*.jpg"))


def synthetic_predictions(gt, images: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic predictions from the ground truth: jittered faces (some missed, some doubled),
    random scores (higher for better boxes) and random false positives; ``x y w h score``."""
    rng = np.random.default_rng(seed)
    index = gt.index()
    out = {}
    for key in images:
        faces = gt.boxes[index[key]]  # [N, 4] x y w h
        n = len(faces)
        found = rng.random(n) < 0.8
        boxes = faces[found].astype(np.float64)
        size = np.maximum(boxes[:, 2:4], 1.0)
        boxes[:, :2] += rng.normal(0.0, 0.12, (len(boxes), 2)) * size
        boxes[:, 2:4] = size * np.exp(rng.normal(0.0, 0.15, (len(boxes), 2)))
        quality = rng.random(len(boxes))
        scores = np.clip(0.35 + 0.6 * quality + rng.normal(0, 0.1, len(boxes)), 0.01, 0.999)
        dup = boxes[rng.random(len(boxes)) < 0.1] + rng.normal(0, 2.0, (1, 4))
        num_fp = rng.poisson(3.0)
        fp = np.column_stack([rng.uniform(0, 900, num_fp), rng.uniform(0, 700, num_fp),
                              rng.uniform(4, 120, (num_fp, 2))])
        all_boxes = np.concatenate([boxes, dup, fp])
        all_scores = np.concatenate([scores, rng.uniform(0.01, 0.9, len(dup)), rng.uniform(0.01, 0.8, num_fp)])
        out[key] = np.column_stack([all_boxes, np.round(all_scores, 3)])  # ties in score on purpose
    return out
