"""Anchors: counts per model config and hand-checked coordinates."""

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

from detlab.config import ModelConfig
from detlab.model import default_box_anchors, feature_map_sizes, generate_anchors

SLIM_STRIDES = [8, 16, 32, 64]
SLIM_SIZES = [[10, 16, 24], [32, 48], [64, 96], [128, 192, 256]]


def test_slim_anchor_count_320x256():
    anchors = generate_anchors((320, 256), SLIM_STRIDES, SLIM_SIZES)
    # 40x32x3 + 20x16x2 + 10x8x2 + 5x4x3 = 3840 + 640 + 160 + 60
    assert anchors.shape == (4700, 4)
    assert feature_map_sizes((320, 256), SLIM_STRIDES) == [(32, 40), (16, 20), (8, 10), (4, 5)]


def test_slim_anchor_count_320x240_matches_ultra_light():
    # The Ultra-Light detector's 320x240 configuration has 4,420 priors (ceil(240 / 16) = 15 rows).
    assert feature_map_sizes((320, 240), SLIM_STRIDES) == [(30, 40), (15, 20), (8, 10), (4, 5)]
    assert generate_anchors((320, 240), SLIM_STRIDES, SLIM_SIZES).shape == (4420, 4)


def test_slim_anchor_coordinates_by_hand():
    a = generate_anchors((320, 256), SLIM_STRIDES, SLIM_SIZES)
    # Cell (0, 0) of stride 8: centre (4, 4); sizes 10, 16, 24.
    assert a[0].tolist() == [-1.0, -1.0, 9.0, 9.0]
    assert a[1].tolist() == [-4.0, -4.0, 12.0, 12.0]
    assert a[2].tolist() == [-8.0, -8.0, 16.0, 16.0]
    # Cell (0, 1): centre (12, 4).
    assert a[3].tolist() == [7.0, -1.0, 17.0, 9.0]
    # Cell (1, 0) starts after the 40 cells of row 0: centre (4, 12).
    assert a[40 * 3].tolist() == [-1.0, 7.0, 9.0, 17.0]
    # Stride 16 starts at 3840; cell (0, 0): centre (8, 8), sizes 32 and 48.
    assert a[3840].tolist() == [-8.0, -8.0, 24.0, 24.0]
    assert a[3841].tolist() == [-16.0, -16.0, 32.0, 32.0]
    # Stride 64, last cell (3, 4): centre (288, 224), last size 256 (not clipped).
    assert a[-1].tolist() == [160.0, 96.0, 416.0, 352.0]


def test_slim_anchors_are_square_and_sized():
    a = generate_anchors((320, 256), SLIM_STRIDES, SLIM_SIZES)
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    assert torch.equal(w, h)
    assert sorted(set(w.tolist())) == [10, 16, 24, 32, 48, 64, 96, 128, 192, 256]


def test_generate_anchors_rejects_mismatched_levels():
    with pytest.raises(ValueError, match="min_sizes"):
        generate_anchors((320, 256), [8, 16], [[10]])


def _feature_maps(sizes):
    return [torch.zeros(1, 1, h, w) for h, w in sizes]


def test_ssdlite_default_boxes_320x256_by_hand():
    gen = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    # MobileNetV3 SSDlite feature maps at 320x256: strides 16, 32, then 4 stride-2 extras.
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2), (1, 1)]
    a = default_box_anchors(gen, (320, 256), _feature_maps(sizes))
    assert a.shape == (6 * (320 + 80 + 20 + 6 + 2 + 1), 4) == (2574, 4)
    # Cell (0, 0): centre (0.5 / 20 * 320, 0.5 / 16 * 256) = (8, 8); scale 0.2 of W and of H.
    torch.testing.assert_close(a[0], torch.tensor([8 - 32.0, 8 - 25.6, 8 + 32.0, 8 + 25.6]))
    s_prime = math.sqrt(0.2 * 0.35)
    torch.testing.assert_close(
        a[1], torch.tensor([8 - s_prime * 160, 8 - s_prime * 128, 8 + s_prime * 160, 8 + s_prime * 128])
    )
    r2 = math.sqrt(2.0)  # aspect ratio 2: w = 0.2 * sqrt(2) * W, h = 0.2 / sqrt(2) * H
    torch.testing.assert_close(
        a[2], torch.tensor([8 - 0.1 * r2 * 320, 8 - 0.1 / r2 * 256, 8 + 0.1 * r2 * 320, 8 + 0.1 / r2 * 256])
    )


def test_ssd300_default_boxes_by_hand():
    gen = DefaultBoxGenerator(
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        steps=[8, 16, 32, 64, 100, 300],
    )
    sizes = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    a = default_box_anchors(gen, (300, 300), _feature_maps(sizes))
    assert a.shape == (8732, 4)
    # Cell (0, 0) of step 8: centre (4, 4); scale 0.07 * 300 = 21 pixels.
    torch.testing.assert_close(a[0], torch.tensor([-6.5, -6.5, 14.5, 14.5]))
    # The last box: the 1x1 map, centre (150, 150); aspect-ratio-2 pair, w/h clamped to 1 (clip=True).
    assert a[-1].tolist() == pytest.approx([150 - 0.5 * 0.87 / math.sqrt(2) * 300, 0.0, 150 + 0.5 * 0.87 / math.sqrt(2) * 300, 300.0], abs=1e-3)


def test_model_config_defaults_are_the_slim_anchors():
    cfg = ModelConfig()
    assert (cfg.input_width, cfg.input_height) == (320, 256)
    a = generate_anchors((cfg.input_width, cfg.input_height), cfg.feature_strides, cfg.min_sizes)
    assert a.shape[0] == 4700
