"""detlab.metrics: hand-computed cases for every rule, and a brute-force reference on random cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detlab.metrics import (
    DetectionEvaluator,
    ap_voc,
    match_predictions,
    size_adaptive_thresholds,
)


def T(rows, dim=4):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, dim)


def S(values):
    return torch.tensor(values, dtype=torch.float32).reshape(-1)


def run(preds, gts, ignores=None, **kwargs):
    """preds: list of (boxes, scores) per image; gts: list of boxes."""
    ev = DetectionEvaluator(**kwargs)
    ev.update([{"boxes": T(b), "scores": S(s)} for b, s in preds], [T(g) for g in gts],
              None if ignores is None else [torch.tensor(i, dtype=torch.bool) for i in ignores])
    return ev.compute()


# ----------------------------------------------------------------------------- ap_voc


def test_ap_voc_all_point_interpolation_hand_computed():
    # TP, FP, TP, FP over 3 faces: recall 1/3, 1/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2.
    ap = ap_voc([1 / 3, 1 / 3, 2 / 3, 2 / 3], [1.0, 0.5, 2 / 3, 0.5])
    assert ap == pytest.approx(1 / 3 * 1.0 + 1 / 3 * 2 / 3)  # 5/9: the envelope lifts 1/2 to 2/3


def test_ap_voc_envelope_uses_later_higher_precision():
    # Precision rising after a dip: the envelope at recall 0.5 is 0.8, not 0.4.
    assert ap_voc([0.5, 1.0], [0.4, 0.8]) == pytest.approx(0.5 * 0.8 + 0.5 * 0.8)
    assert ap_voc([], []) == 0.0
    with pytest.raises(ValueError):
        ap_voc([0.5], [0.5, 0.2])


# ----------------------------------------------------------------------------- matching rules


def test_perfect_predictions():
    gt = [[0, 0, 10, 10], [20, 20, 50, 50]]
    m = run([(gt, [0.9, 0.8])], [gt])
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    assert m["precision"] == m["recall"] == m["f1"] == m["ap50"] == 1.0
    assert m["miou"] == pytest.approx(1.0) and m["mean_tp_iou"] == pytest.approx(1.0)
    assert m["num_gt"] == 2 and m["num_pred"] == 2


def test_duplicate_prediction_on_matched_face_is_fp():
    m = run([([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8])], [[[0, 0, 10, 10]]])
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)
    assert m["precision"] == 0.5 and m["recall"] == 1.0 and m["f1"] == pytest.approx(2 / 3)
    assert m["ap50"] == 1.0  # full recall is reached at precision 1 before the duplicate


def test_greedy_goes_by_score_not_by_iou():
    # The higher-scored but worse box (IoU 0.6) takes the face; the exact lower-scored box is a FP.
    gt = [[0, 0, 10, 10]]
    worse = [0, 0, 10, 6]  # IoU 60 / 100 = 0.6
    m = run([([worse, [0, 0, 10, 10]], [0.9, 0.8])], [gt])
    assert (m["tp"], m["fp"]) == (1, 1)
    assert m["mean_tp_iou"] == pytest.approx(0.6)
    assert m["miou"] == pytest.approx(1.0)  # mIoU: best IoU with any kept prediction, matching aside


def test_prediction_takes_best_free_face_when_its_best_face_is_taken():
    a, b = [0, 0, 10, 10], [5, 0, 15, 10]
    p2 = [2, 0, 12, 10]  # IoU with a: 80/120 = 0.667, with b: 70/130 = 0.538
    result = match_predictions(T([a, p2]), S([0.9, 0.8]), T([a, b]), 0.5)
    assert result.status.tolist() == [1, 1]
    assert result.matched_gt.tolist() == [0, 1]
    assert result.matched_iou[1].item() == pytest.approx(70 / 130)
    assert result.gt_matched.tolist() == [True, True]


def test_iou_threshold_is_inclusive_and_miou_counts_missed_faces_as_zero():
    gt = [[0, 0, 10, 10], [100, 100, 120, 120]]
    m = run([([[0, 0, 10, 5]], [0.9])], [gt])  # IoU exactly 0.5 with the first face
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    assert m["miou"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["mean_tp_iou"] == pytest.approx(0.5)


def test_ignored_faces_are_neither_tp_fp_nor_fn():
    gt = [[0, 0, 10, 10], [100, 100, 120, 120]]
    # Face 0 ignored: two predictions on it count nowhere; face 1 missed is the only FN.
    m = run([([[0, 0, 10, 10], [0, 0, 10, 9]], [0.9, 0.8])], [gt], ignores=[[True, False]])
    assert (m["tp"], m["fp"], m["fn"], m["num_gt"]) == (0, 0, 1, 1)
    assert m["num_ignored"] == 2 and m["num_pred"] == 2
    assert m["miou"] == 0.0  # mean over the non-ignored face only
    assert m["ap50"] == 0.0


def test_free_face_is_preferred_to_an_ignored_one():
    ignored, free = [0, 0, 10, 10], [1, 0, 11, 10]
    pred = [0, 0, 10, 10]  # IoU 1.0 with the ignored face, 90/110 with the free one
    result = match_predictions(T([pred]), S([0.9]), T([ignored, free]), 0.5, gt_ignore=torch.tensor([True, False]))
    assert result.status.tolist() == [1] and result.matched_gt.tolist() == [1]


def test_image_without_faces_all_fp_bucketed_by_predicted_size():
    boxes = [[0, 0, 10, 10], [0, 0, 30, 20], [0, 0, 100, 50]]  # sizes 10, 30, 100
    m = run([(boxes, [0.9, 0.8, 0.7])], [[]])
    assert (m["tp"], m["fp"], m["fn"], m["num_gt"]) == (0, 3, 0, 0)
    assert (m["small/fp"], m["medium/fp"], m["large/fp"]) == (1, 1, 1)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["ap50"] == 0.0 and m["miou"] == 0.0


def test_no_predictions_at_all():
    m = run([([], []), ([], [])], [[[0, 0, 10, 10]], [[0, 0, 40, 40], [50, 50, 150, 150]]])
    assert (m["tp"], m["fp"], m["fn"], m["num_gt"]) == (0, 0, 3, 3)
    assert m["precision"] == m["recall"] == m["f1"] == m["ap50"] == m["miou"] == m["mean_tp_iou"] == 0.0
    assert (m["small/fn"], m["medium/fn"], m["large/fn"]) == (1, 1, 1)


def test_empty_evaluator():
    m = DetectionEvaluator().compute()
    assert m["tp"] == m["fp"] == m["fn"] == 0 and m["ap50"] == 0.0 and m["miou"] == 0.0


def test_all_predictions_wrong():
    m = run([([[50, 50, 60, 60], [0, 0, 3, 3]], [0.9, 0.6])], [[[0, 0, 10, 10]]])
    assert (m["tp"], m["fp"], m["fn"]) == (0, 2, 1)
    assert m["ap50"] == 0.0 and m["mean_tp_iou"] == 0.0
    assert m["miou"] == pytest.approx(9 / 100)  # the small box inside the face


def test_tied_scores_keep_input_order_in_matching():
    box = [0, 0, 10, 10]
    first = match_predictions(T([[0, 0, 10, 9], box]), S([0.5, 0.5]), T([box]), 0.5)
    assert first.status.tolist() == [1, 0]  # the earlier of two tied predictions wins, not the better one


def test_tied_scores_do_not_make_ap_depend_on_order():
    # One face; a TP and a FP with the same score: the curve has one point (recall 1, precision 1/2).
    gt = [[[0, 0, 10, 10]], []]
    tp_first = run([([[0, 0, 10, 10]], [0.7]), ([[0, 0, 5, 5]], [0.7])], gt)
    fp_first = run([([[0, 0, 5, 5]], [0.7]), ([[0, 0, 10, 10]], [0.7])], gt[::-1])
    assert tp_first["ap50"] == fp_first["ap50"] == pytest.approx(0.5)


def test_ap_hand_computed_over_several_images():
    # Scores 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP; 3 faces -> AP 5/9 (see test_ap_voc_all_point...).
    preds = [([[0, 0, 10, 10], [30, 30, 40, 40]], [0.9, 0.8]), ([[0, 0, 20, 20], [60, 60, 70, 70]], [0.7, 0.6])]
    gts = [[[0, 0, 10, 10], [100, 100, 130, 130]], [[0, 0, 20, 20]]]
    m = run(preds, gts, score_threshold=0.75)
    assert m["ap50"] == pytest.approx(5 / 9)
    # Counting uses only score >= 0.75: one TP, one FP, two FN; AP used all four.
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 2)
    assert m["num_pred"] == 2


def test_ap_score_floor_drops_low_predictions():
    preds = [([[0, 0, 10, 10], [0, 0, 20, 20]], [0.9, 0.005])]
    gts = [[[0, 0, 10, 10], [0, 0, 20, 20]]]
    assert run(preds, gts, ap_score_floor=0.01)["ap50"] == pytest.approx(0.5)
    assert run(preds, gts, ap_score_floor=0.001)["ap50"] == pytest.approx(1.0)


def test_size_buckets_edges_and_assignment():
    # Face sizes 10 (small), 16 (medium: the edge belongs to the upper bucket), 64 (large).
    gts = [[[0, 0, 10, 8], [100, 100, 116, 110], [200, 200, 264, 250]]]
    # TP on the small face with a medium-sized box (IoU 80/(80+...)): counted in the face's bucket.
    preds = [([[0, 0, 10, 8], [100, 100, 116, 110], [300, 300, 340, 320]], [0.9, 0.8, 0.7])]
    m = run(preds, gts, size_edges=(16, 64))
    assert (m["small/tp"], m["medium/tp"], m["large/tp"]) == (1, 1, 0)
    assert (m["small/fp"], m["medium/fp"], m["large/fp"]) == (0, 1, 0)  # the 40-px FP is medium
    assert (m["small/fn"], m["medium/fn"], m["large/fn"]) == (0, 0, 1)
    assert (m["small/num_gt"], m["medium/num_gt"], m["large/num_gt"]) == (1, 1, 1)
    assert m["medium/precision"] == 0.5 and m["large/recall"] == 0.0 and m["small/ap50"] == 1.0
    assert m["medium/ap50"] == pytest.approx(1.0)  # its TP outranks its FP
    # Other edges move the buckets.
    m2 = run(preds, gts, size_edges=(8, 12))
    assert (m2["small/num_gt"], m2["medium/num_gt"], m2["large/num_gt"]) == (0, 1, 2)


def test_tp_goes_to_the_face_bucket_even_if_the_box_is_larger():
    face = [0, 0, 14, 14]  # small
    box = [0, 0, 17, 17]  # 196 / 289 = 0.678, size 17 (medium)
    m = run([([box], [0.9])], [[face]])
    assert m["small/tp"] == 1 and m["medium/fp"] == 0 and m["medium/num_pred"] == 0


def test_size_adaptive_threshold_rule():
    gt = T([[0, 0, 4, 4], [0, 0, 8, 8], [0, 0, 12, 12], [0, 0, 16, 16], [0, 0, 40, 20]])
    thr = size_adaptive_thresholds(gt, 0.5, 16.0, 0.3)
    assert thr.tolist() == pytest.approx([0.3, 0.3, 0.375, 0.5, 0.5])


def test_size_adaptive_iou_switch():
    face = [[0, 0, 8, 8]]
    box = [[2, 2, 10, 10]]  # IoU 36 / 92 = 0.391
    off = run([(box, [0.9])], [face])
    on = run([(box, [0.9])], [face], size_adaptive_iou=True)
    assert (off["tp"], off["fp"], off["fn"]) == (0, 1, 1)
    assert (on["tp"], on["fp"], on["fn"]) == (1, 0, 0)
    assert on["ap50"] == 1.0 and off["ap50"] == 0.0
    # A large face keeps the plain threshold.
    big = run([([[0, 0, 40, 40]], [0.9])], [[[10, 0, 50, 40]]], size_adaptive_iou=True)  # IoU 30/50 * ... = 0.6
    assert big["tp"] == 1
    big_miss = run([([[0, 0, 40, 40]], [0.9])], [[[20, 0, 60, 40]]], size_adaptive_iou=True)  # IoU 1/3
    assert big_miss["tp"] == 0


def test_ap50_stays_at_iou_half_when_counting_threshold_differs():
    box = [[0, 0, 10, 6]]  # IoU 0.6 with the face
    m = run([(box, [0.9])], [[[0, 0, 10, 10]]], iou_threshold=0.7)
    assert m["tp"] == 0 and m["fp"] == 1
    assert m["ap50"] == 1.0


def test_update_accepts_cuda_or_cpu_and_reset_clears():
    ev = DetectionEvaluator()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ev.update([{"boxes": T([[0, 0, 10, 10]]).to(device), "scores": S([0.9]).to(device)}], [T([[0, 0, 10, 10]]).to(device)])
    assert ev.compute()["tp"] == 1
    ev.reset()
    assert ev.compute()["tp"] == 0


def test_bad_input_is_rejected():
    with pytest.raises(ValueError):
        DetectionEvaluator(size_edges=(64, 16))
    with pytest.raises(ValueError):
        DetectionEvaluator().update([{"boxes": T([]), "scores": S([])}], [])
    with pytest.raises(ValueError):
        match_predictions(T([[0, 0, 1, 1]]), S([0.5, 0.4]), T([]), 0.5)


# ----------------------------------------------------------------------------- brute-force reference


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _size(b):
    return max(b[2] - b[0], b[3] - b[1])


def _bucket(b, edges):
    s = _size(b)
    return 0 if s < edges[0] else (1 if s < edges[1] else 2)


def _ref_match(boxes, scores, gts, ignore, thr_of):
    """Literal greedy: predictions by (-score, index); the free face of highest IoU, else an ignored one."""
    order = sorted(range(len(boxes)), key=lambda k: (-scores[k], k))
    taken = [False] * len(gts)
    status, matched = {}, {}
    for k in order:
        ious = [_iou(boxes[k], g) for g in gts]
        free = [j for j in range(len(gts)) if not ignore[j] and not taken[j] and ious[j] >= thr_of(j)]
        if free:
            j = max(free, key=lambda j: (ious[j], -j))
            taken[j] = True
            status[k], matched[k] = 1, j
        elif any(ignore[j] and ious[j] >= thr_of(j) for j in range(len(gts))):
            status[k], matched[k] = -1, None
        else:
            status[k], matched[k] = 0, None
    return status, matched


def _ref_ap(entries, num_gt):
    """entries: (score, is_tp); the curve at each distinct score, AP = sum dr * max precision to the right."""
    if num_gt == 0 or not entries:
        return 0.0
    levels = sorted({s for s, _ in entries}, reverse=True)
    points = []
    for s in levels:
        tp = sum(1 for x, t in entries if x >= s and t)
        fp = sum(1 for x, t in entries if x >= s and not t)
        points.append((tp / num_gt, tp / (tp + fp)))
    ap, prev = 0.0, 0.0
    for i, (r, _) in enumerate(points):
        ap += (r - prev) * max(p for _, p in points[i:])
        prev = r
    return ap


def _reference(images, score_thr, iou_thr, floor, edges, adaptive=False, adaptive_floor=0.3):
    """images: list of (boxes, scores, gts, ignore) as python lists. Two separate matchings."""
    def thr_fn(gts, base):
        if not adaptive:
            return lambda j: base
        return lambda j: max(adaptive_floor, base * min(1.0, _size(gts[j]) / edges[0]))

    out = {f"{b}/{k}": 0 for b in ("small", "medium", "large") for k in ("tp", "fp", "fn", "num_gt")}
    best_sum = [0.0] * 3
    tp_iou = [0.0] * 3
    entries = []
    for boxes, scores, gts, ignore in images:
        # Counting: a matching of the thresholded predictions only.
        kept = [k for k in range(len(boxes)) if scores[k] >= score_thr]
        kb, ks = [boxes[k] for k in kept], [scores[k] for k in kept]
        status, matched = _ref_match(kb, ks, gts, ignore, thr_fn(gts, iou_thr))
        hit = set()
        for k in range(len(kb)):
            if status[k] == 1:
                j = matched[k]
                hit.add(j)
                out[f"{('small', 'medium', 'large')[_bucket(gts[j], edges)]}/tp"] += 1
                tp_iou[_bucket(gts[j], edges)] += _iou(kb[k], gts[j])
            elif status[k] == 0:
                out[f"{('small', 'medium', 'large')[_bucket(kb[k], edges)]}/fp"] += 1
        for j, g in enumerate(gts):
            if ignore[j]:
                continue
            b = _bucket(g, edges)
            name = ("small", "medium", "large")[b]
            out[f"{name}/num_gt"] += 1
            if j not in hit:
                out[f"{name}/fn"] += 1
            best_sum[b] += max([_iou(p, g) for p in kb], default=0.0)
        # AP: an independent matching of everything above the floor, at IoU 0.5.
        ap_kept = [k for k in range(len(boxes)) if scores[k] >= floor]
        ab, ascore = [boxes[k] for k in ap_kept], [scores[k] for k in ap_kept]
        status, _ = _ref_match(ab, ascore, gts, ignore, thr_fn(gts, 0.5))
        entries += [(ascore[k], status[k] == 1) for k in range(len(ab)) if status[k] != -1]
    tp = sum(out[f"{b}/tp"] for b in ("small", "medium", "large"))
    num_gt = sum(out[f"{b}/num_gt"] for b in ("small", "medium", "large"))
    out.update(
        tp=tp,
        fp=sum(out[f"{b}/fp"] for b in ("small", "medium", "large")),
        fn=sum(out[f"{b}/fn"] for b in ("small", "medium", "large")),
        num_gt=num_gt,
        miou=sum(best_sum) / num_gt if num_gt else 0.0,
        mean_tp_iou=sum(tp_iou) / tp if tp else 0.0,
        ap50=_ref_ap(entries, num_gt),
    )
    return out


def _random_images(rng, num_images):
    images = []
    for _ in range(num_images):
        num_gt = int(rng.integers(0, 6))
        gts = []
        for _ in range(num_gt):
            x, y = rng.integers(0, 60, 2)
            w, h = rng.integers(2, 40, 2)
            gts.append([float(x), float(y), float(x + w), float(y + h)])
        ignore = [bool(rng.random() < 0.15) for _ in gts]
        boxes = []
        for g in gts:  # near-duplicates of faces, then random boxes
            for _ in range(int(rng.integers(0, 3))):
                d = rng.integers(-4, 5, 4)
                b = [g[0] + d[0], g[1] + d[1], g[2] + d[2], g[3] + d[3]]
                if b[2] > b[0] and b[3] > b[1]:
                    boxes.append([float(v) for v in b])
        for _ in range(int(rng.integers(0, 4))):
            x, y = rng.integers(0, 60, 2)
            w, h = rng.integers(1, 40, 2)
            boxes.append([float(x), float(y), float(x + w), float(y + h)])
        if rng.random() < 0.1:
            boxes = []
        scores = [float(v) for v in np.round(rng.random(len(boxes)), 1)]  # coarse: many ties
        images.append((boxes, scores, gts, ignore))
    return images


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("options", [
    dict(score_threshold=0.5, iou_threshold=0.5),
    dict(score_threshold=0.3, iou_threshold=0.4, size_adaptive_iou=True),
    dict(score_threshold=0.7, iou_threshold=0.6),
])
def test_agrees_with_brute_force_reference(seed, options):
    rng = np.random.default_rng(seed)
    images = _random_images(rng, 40)
    edges = (12.0, 30.0)
    floor = 0.1
    ev = DetectionEvaluator(size_edges=edges, ap_score_floor=floor, **options)
    for start in range(0, len(images), 7):  # several update calls, several images each
        chunk = images[start:start + 7]
        ev.update([{"boxes": T(b), "scores": S(s)} for b, s, _, _ in chunk], [T(g) for _, _, g, _ in chunk],
                  [torch.tensor(i, dtype=torch.bool) for _, _, _, i in chunk])
    got = ev.compute()
    ref = _reference(images, options["score_threshold"], options["iou_threshold"], floor, edges,
                     adaptive=options.get("size_adaptive_iou", False))
    for key in ("tp", "fp", "fn", "num_gt") + tuple(f"{b}/{k}" for b in ("small", "medium", "large")
                                                    for k in ("tp", "fp", "fn", "num_gt")):
        assert got[key] == ref[key], key
    assert got["tp"] > 0 and got["fp"] > 0  # the cases exercise both
    for key in ("miou", "mean_tp_iou", "ap50"):
        assert math.isclose(got[key], ref[key], rel_tol=0, abs_tol=1e-6), (key, got[key], ref[key])


def test_one_matching_equals_two_independent_matchings():
    """The thresholded matching is the score-sorted prefix of the floor-set matching."""
    rng = np.random.default_rng(11)
    for boxes, scores, gts, ignore in _random_images(rng, 60):
        if not boxes:
            continue
        full = match_predictions(T(boxes), S(scores), T(gts), 0.5, torch.tensor(ignore, dtype=torch.bool))
        keep = [k for k in range(len(boxes)) if scores[k] >= 0.5]
        part = match_predictions(T([boxes[k] for k in keep]), S([scores[k] for k in keep]), T(gts), 0.5,
                                 torch.tensor(ignore, dtype=torch.bool))
        assert full.status[keep].tolist() == part.status.tolist()
        assert full.matched_gt[keep].tolist() == part.matched_gt.tolist()


def test_false_positive_breakdown_by_kind_and_bucket():
    """TIDE-style kinds at the score threshold: a duplicate, a localisation error, background."""
    ev = DetectionEvaluator(score_threshold=0.5, size_edges=(16, 64))
    gt = torch.tensor([[0.0, 0, 40, 40], [100, 100, 140, 140], [200, 200, 240, 240], [400, 400, 440, 440]])
    boxes = torch.tensor([
        [0.0, 0, 40, 40],  # TP on face 0
        [2.0, 2, 40, 40],  # IoU 0.90 with face 0, already found: duplicate
        [100.0, 100, 120, 120],  # IoU 0.25 with face 1, which nobody found: localisation
        [300.0, 300, 310, 310],  # IoU 0 with every face: background (small box)
        [395.0, 395, 420, 420],  # IoU 0.10 with face 3 (ignored): no kind but background
        [200.0, 200, 240, 240],  # below the score threshold: not counted
    ])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.55, 0.3])
    ev.update([{"boxes": boxes, "scores": scores}], [gt], [torch.tensor([False, False, False, True])])
    r = ev.compute()
    assert (r["tp"], r["fp"], r["fn"]) == (1.0, 4.0, 2.0)
    assert (r["fp_localisation"], r["fp_duplicate"], r["fp_background"]) == (1.0, 1.0, 2.0)
    assert (r["small/fp_background"], r["medium/fp_background"]) == (1.0, 1.0)
    assert (r["medium/fp_localisation"], r["medium/fp_duplicate"]) == (1.0, 1.0)


def test_false_positive_kinds_always_sum_to_fp():
    g = torch.Generator().manual_seed(3)
    ev = DetectionEvaluator(score_threshold=0.4)
    for _ in range(20):
        xy = torch.rand(6, 2, generator=g) * 200
        gt = torch.cat([xy, xy + 10 + torch.rand(6, 2, generator=g) * 60], dim=1)
        pxy = torch.rand(15, 2, generator=g) * 200
        pred = torch.cat([pxy, pxy + 5 + torch.rand(15, 2, generator=g) * 60], dim=1)
        ev.update([{"boxes": pred, "scores": torch.rand(15, generator=g)}], [gt])
    r = ev.compute()
    assert r["fp"] > 10
    for prefix in ("", "small/", "medium/", "large/"):
        kinds = sum(r[f"{prefix}fp_{k}"] for k in ("localisation", "duplicate", "background"))
        assert kinds == r[f"{prefix}fp"], prefix
