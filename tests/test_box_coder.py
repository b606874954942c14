"""SSD box coding with variances (0.1, 0.2): hand-computed values and round trips."""

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

from detlab.model import BoxCoder


def test_encode_by_hand():
    coder = BoxCoder((0.1, 0.2))
    anchor = torch.tensor([0.0, 0.0, 10.0, 10.0])  # centre (5, 5), 10 x 10
    box = torch.tensor([1.0, 2.0, 11.0, 22.0])  # centre (6, 12), 10 x 20
    # dx = (6 - 5) / (0.1 * 10) = 1; dy = (12 - 5) / (0.1 * 10) = 7; dw = log(1) / 0.2 = 0; dh = log(2) / 0.2
    expected = torch.tensor([1.0, 7.0, 0.0, math.log(2.0) / 0.2])
    torch.testing.assert_close(coder.encode(box, anchor), expected)
    torch.testing.assert_close(coder.decode(expected, anchor), box)


def test_matches_torchvision_coder_with_weights_10_10_5_5():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    boxes = torch.cat((xy, xy + 1 + torch.rand(50, 2, generator=g) * 50), dim=1)
    xy = torch.rand(50, 2, generator=g) * 100
    anchors = torch.cat((xy, xy + 1 + torch.rand(50, 2, generator=g) * 50), dim=1)
    ours = BoxCoder((0.1, 0.2)).encode(boxes, anchors)
    theirs = TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).encode_single(boxes, anchors)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_round_trip_broadcast_batch_against_anchors():
    g = torch.Generator().manual_seed(1)
    anchors_xy = torch.rand(30, 2, generator=g) * 200
    anchors = torch.cat((anchors_xy, anchors_xy + 4 + torch.rand(30, 2, generator=g) * 60), dim=1)  # [A, 4]
    boxes_xy = torch.rand(3, 30, 2, generator=g) * 200
    boxes = torch.cat((boxes_xy, boxes_xy + 2 + torch.rand(3, 30, 2, generator=g) * 80), dim=-1)  # [B, A, 4]
    coder = BoxCoder()
    deltas = coder.encode(boxes, anchors)
    assert deltas.shape == (3, 30, 4)
    torch.testing.assert_close(coder.decode(deltas, anchors), boxes, rtol=1e-5, atol=1e-4)


def test_zero_deltas_decode_to_the_anchors():
    anchors = torch.tensor([[-1.0, -1.0, 9.0, 9.0], [100.0, 50.0, 356.0, 306.0]])
    torch.testing.assert_close(BoxCoder().decode(torch.zeros(2, 4), anchors), anchors)


def test_decode_clamps_the_log_size():
    coder = BoxCoder((0.1, 0.2))
    anchor = torch.tensor([0.0, 0.0, 10.0, 10.0])
    boxes = coder.decode(torch.tensor([0.0, 0.0, 1e4, 1e4]), anchor)
    assert torch.isfinite(boxes).all()
    # exp(log(1000 / 16)) = 62.5 times the anchor: 625 pixels wide, centred on (5, 5).
    torch.testing.assert_close(boxes, torch.tensor([5 - 312.5, 5 - 312.5, 5 + 312.5, 5 + 312.5]))


def test_rejects_bad_variances():
    with pytest.raises(ValueError, match="variances"):
        BoxCoder((0.1, 0.0))
