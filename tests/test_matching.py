"""Anchor/face matching: hand-made cases and the batched path against a per-image reference."""

import pytest
import torch
from torchvision.ops import box_iou

from detlab.model import BoxCoder, assign_targets, generate_anchors

CODER = BoxCoder((0.1, 0.2))


def test_threshold():
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [100, 100, 110, 110]])
    face = torch.tensor([[0.0, 0, 10, 10]])
    # IoU with anchor 0: 1; with anchor 1: 50 / 150 = 1/3.
    labels, targets = assign_targets(anchors, [face], CODER, iou_threshold=0.45)
    assert labels.tolist() == [[1, 0, 0, 0]]
    assert labels.dtype == torch.int64
    torch.testing.assert_close(targets[0, 0], torch.zeros(4))  # identical box: zero deltas
    labels, _ = assign_targets(anchors, [face], CODER, iou_threshold=0.3)
    assert labels.tolist() == [[1, 1, 0, 0]]


def test_best_anchor_is_forced_below_threshold():
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [100, 100, 110, 110]])
    face = torch.tensor([[20.0, 20, 26, 26]])  # IoU with anchor 2: 36 / 100 = 0.36 < 0.45
    labels, targets = assign_targets(anchors, [face], CODER, iou_threshold=0.45)
    assert labels.tolist() == [[0, 0, 1, 0]]
    # Centre (23, 23) vs (25, 25), 6 vs 10: dx = dy = -2 / 1 = -2, dw = dh = log(0.6) / 0.2.
    expected = torch.tensor([-2.0, -2.0, 5 * torch.log(torch.tensor(0.6)), 5 * torch.log(torch.tensor(0.6))])
    torch.testing.assert_close(targets[0, 2], expected)
    assert (targets[0, [0, 1, 3]] == 0).all()


def test_forced_anchor_keeps_the_face_that_chose_it():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20]])
    big = torch.tensor([0.0, 0, 16, 16])  # IoU: anchor 0 100/256 = 0.39, anchor 1 256/400 = 0.64 -> picks 1
    small = torch.tensor([0.0, 0, 4, 4])  # IoU: anchor 0 16/100 = 0.16, anchor 1 0.04 -> picks 0
    labels, targets = assign_targets(anchors, [torch.stack((big, small))], CODER)
    assert labels.tolist() == [[1, 1]]
    # Anchor 0 overlaps the big face more (0.39 > 0.16) but was chosen by the small one.
    torch.testing.assert_close(targets[0, 0], CODER.encode(small, anchors[0]))
    torch.testing.assert_close(targets[0, 1], CODER.encode(big, anchors[1]))


def test_two_faces_choosing_one_anchor_highest_iou_wins():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20]])
    face_a = torch.tensor([0.0, 0, 12, 12])  # IoU: anchor 0 100/144 = 0.69, anchor 1 0.36 -> picks 0
    face_b = torch.tensor([0.0, 0, 4, 4])  # IoU: anchor 0 0.16 -> picks 0 as well
    for faces in (torch.stack((face_a, face_b)), torch.stack((face_b, face_a))):
        labels, targets = assign_targets(anchors, [faces], CODER)
        assert labels.tolist() == [[1, 0]]  # anchor 1: 0.36 < 0.45 and forced by no one
        torch.testing.assert_close(targets[0, 0], CODER.encode(face_a, anchors[0]))


def test_empty_images_are_all_background():
    anchors = generate_anchors((64, 64), [8, 16, 32, 64], [[10, 16, 24], [32, 48], [64, 96], [128]])
    empty = torch.zeros((0, 4))
    labels, targets = assign_targets(anchors, [empty, empty], CODER)
    assert labels.shape == (2, anchors.shape[0]) and targets.shape == (2, anchors.shape[0], 4)
    assert labels.sum() == 0 and (targets == 0).all()
    labels, _ = assign_targets(anchors, [torch.tensor([[8.0, 8, 24, 24]]), empty], CODER)
    assert labels[0].sum() >= 1 and labels[1].sum() == 0


def test_degenerate_faces_are_ignored():
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    faces = torch.tensor([[5.0, 5, 5, 9], [20, 20, 30, 30]])  # zero width, then a perfect match
    labels, targets = assign_targets(anchors, [faces], CODER)
    assert labels.tolist() == [[0, 1]]
    assert torch.isfinite(targets).all()


def _reference(anchors, faces, threshold):
    """Straightforward per-image matcher (loops), the rules written out one by one."""
    labels = torch.zeros(anchors.shape[0], dtype=torch.int64)
    matched = torch.zeros(anchors.shape[0], dtype=torch.int64)
    if faces.shape[0] == 0:
        return labels, torch.zeros(anchors.shape[0], 4)
    iou = box_iou(faces, anchors)  # [N, A]
    best_iou, best_face = iou.max(dim=0)
    for a in range(anchors.shape[0]):
        if best_iou[a] >= threshold:
            labels[a], matched[a] = 1, best_face[a]
    # Forced: faces in increasing (IoU with their anchor, index) order, so the winner writes last.
    choice_iou, choice = iou.max(dim=1)
    for n in sorted(range(faces.shape[0]), key=lambda n: (choice_iou[n].item(), n)):
        if choice_iou[n] > 0:
            labels[choice[n]], matched[choice[n]] = 1, n
    targets = torch.zeros(anchors.shape[0], 4)
    for a in range(anchors.shape[0]):
        if labels[a]:
            targets[a] = CODER.encode(faces[matched[a]], anchors[a])
    return labels, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_with_different_face_counts_equals_per_image(seed):
    g = torch.Generator().manual_seed(seed)
    anchors = generate_anchors((96, 64), [8, 16, 32, 64], [[10, 16, 24], [32, 48], [64, 96], [128]])
    faces = []
    for n in (0, 3, 7, 1):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([80.0, 50.0])
        faces.append(torch.cat((xy, xy + 4 + torch.rand(n, 2, generator=g) * 40), dim=1))
    labels, targets = assign_targets(anchors, faces, CODER, iou_threshold=0.45)
    assert labels.shape == (4, anchors.shape[0])
    for b, f in enumerate(faces):
        ref_labels, ref_targets = _reference(anchors, f, 0.45)
        assert torch.equal(labels[b], ref_labels)
        torch.testing.assert_close(targets[b], ref_targets, rtol=1e-5, atol=1e-5)
        single_labels, single_targets = assign_targets(anchors, [f], CODER, iou_threshold=0.45)
        assert torch.equal(single_labels[0], labels[b])
        torch.testing.assert_close(single_targets[0], targets[b])
    # Every face owns at least one positive anchor.
    assert all(labels[b].sum() >= min(1, f.shape[0]) for b, f in enumerate(faces))


def test_ignore_band_labels_near_misses_and_keeps_forced_anchors():
    # Face [0, 0, 10, 10]: IoU 1 with anchor 0, 1/3 with anchor 1, 0 with anchors 2 and 3.
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [100, 100, 110, 110]])
    face = torch.tensor([[0.0, 0, 10, 10]])
    labels, _ = assign_targets(anchors, [face], CODER, iou_threshold=0.45, ignore_iou=0.3)
    assert labels.tolist() == [[1, -1, 0, 0]]
    labels, _ = assign_targets(anchors, [face], CODER, iou_threshold=0.45, ignore_iou=0.34)  # 1/3 < 0.34
    assert labels.tolist() == [[1, 0, 0, 0]]
    # A forced match below the ignore band stays positive: IoU 0.36 with anchor 2.
    small = torch.tensor([[20.0, 20, 26, 26]])
    labels, _ = assign_targets(anchors, [small], CODER, iou_threshold=0.45, ignore_iou=0.3)
    assert labels.tolist() == [[0, 0, 1, 0]]
