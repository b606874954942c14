"""Decoded-image cache: same samples as decoding every time, downscaling keeps boxes and original frame."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detlab.data import WiderFaceDataset, parse_wider_annotations
from detlab.data.cache import DecodedImageCache, downscale_to_max_side
from detlab.data.transforms import build_transforms
from detlab.data.wider import read_image_rgb
from detlab.config import AugmentConfig


def _layout(tmp_path: Path) -> tuple[list, Path]:
    folder = tmp_path / "images"
    (folder / "0--P").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "0--P" / "a.png"), rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    ann = tmp_path / "gt.txt"
    ann.write_text("0--P/a.png\n2\n40 60 80 100 0 0 0 0 0 0\n200 20 40 40 0 0 0 0 0 0\n")
    return parse_wider_annotations(ann), folder


class CountingDecoder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path: Path) -> np.ndarray:
        self.calls += 1
        return read_image_rgb(path)


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_cache_decodes_once_and_gives_the_same_samples(tmp_path, mode):
    records, folder = _layout(tmp_path)
    plain = WiderFaceDataset(records, folder, build_transforms(None, (64, 48), train=False), (64, 48))
    decoder = CountingDecoder()
    cache = DecodedImageCache(mode, None, tmp_path / "cache", decoder)
    cached = WiderFaceDataset(records, folder, build_transforms(None, (64, 48), train=False), (64, 48), cache=cache)
    for _ in range(3):
        image, target = cached[0]
    assert decoder.calls == 1
    expected_image, expected_target = plain[0]
    torch.testing.assert_close(image, expected_image, rtol=0, atol=0)
    torch.testing.assert_close(target["boxes"], expected_target["boxes"])
    if mode == "disk":  # a new cache object (next run) reads the entry instead of decoding
        again = DecodedImageCache(mode, None, tmp_path / "cache", decoder)
        rgb, original = again.get(folder / records[0].path)
        assert decoder.calls == 1 and original == (300, 400) and rgb.shape == (300, 400, 3)


def test_downscaled_entry_scales_boxes_and_keeps_the_original_frame(tmp_path):
    records, folder = _layout(tmp_path)
    cache = DecodedImageCache("ram", 200, None, read_image_rgb)
    dataset = WiderFaceDataset(records, folder, build_transforms(None, (80, 60), train=False), (80, 60), cache=cache)
    rgb, original = cache.get(folder / records[0].path)
    assert rgb.shape == (150, 200, 3) and original == (300, 400)
    _, target = dataset[0]
    assert target["orig_size"].tolist() == [300, 400]
    sx, sy = target["scale"].tolist()
    assert (sx, sy) == (pytest.approx(5.0), pytest.approx(5.0))  # original / input, not cached / input
    back = target["boxes"] * torch.tensor([sx, sy, sx, sy])
    torch.testing.assert_close(back, torch.from_numpy(records[0].boxes), atol=1e-3, rtol=0)


def test_augmentation_never_modifies_the_cached_pixels(tmp_path):
    records, folder = _layout(tmp_path)
    cache = DecodedImageCache("ram", None, None, read_image_rgb)
    dataset = WiderFaceDataset(records, folder, build_transforms(AugmentConfig(), (64, 48), train=True), (64, 48),
                               cache=cache)
    before = cache.get(folder / records[0].path)[0].copy()
    torch.manual_seed(0)
    for _ in range(20):
        dataset[0]
    np.testing.assert_array_equal(cache.get(folder / records[0].path)[0], before)


def test_downscale_never_enlarges():
    small = np.zeros((10, 20, 3), np.uint8)
    assert downscale_to_max_side(small, 100) is small
    assert downscale_to_max_side(np.zeros((100, 300, 3), np.uint8), 150).shape == (50, 150, 3)


def test_bad_cache_settings_are_named():
    with pytest.raises(ValueError, match="dataset.cache='memory'"):
        DecodedImageCache("memory", None, None, read_image_rgb)
    with pytest.raises(ValueError, match="cache_dir"):
        DecodedImageCache("disk", None, None, read_image_rgb)
