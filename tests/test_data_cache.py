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
from detlab.data import cache as cache_module
from detlab.data.wider import BadImageError, read_image_rgb
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


def _truncated(tmp_path: Path) -> tuple[list, Path]:
    """_layout's record, its image a JPEG cut to 60 % (OpenCV alone would half-decode it)."""
    records, folder = _layout(tmp_path)
    ok, data = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    path = folder / "0--P" / "a.png"
    path.write_bytes(data.tobytes()[: len(data) * 6 // 10])
    assert cv2.imread(str(path)) is not None
    return records, folder


@pytest.mark.parametrize("mode", ["none", "ram", "disk"])
def test_truncated_image_is_never_cached(tmp_path, mode):
    records, folder = _truncated(tmp_path)
    decoder = CountingDecoder()
    cache = DecodedImageCache(mode, 200, tmp_path / "cache", decoder)
    for _ in range(2):  # raised again on every visit: no half-decoded entry was kept
        with pytest.raises(BadImageError, match=r"a\.png: truncated JPEG"):
            cache.get(folder / records[0].path)
    assert decoder.calls == 2
    assert not list((tmp_path / "cache").rglob("*.npz"))
    skipping = WiderFaceDataset(records, folder, build_transforms(None, (64, 48), train=False), (64, 48),
                                on_bad_image="skip", cache=cache)
    assert skipping[0] is None and skipping.num_skipped == 1


def test_disk_entry_name_includes_the_entry_version(tmp_path, monkeypatch):
    # Entries written before truncated images were rejected may hold a half-grey image: a new version
    # gives every image a new entry name, so such entries are never read again.
    records, folder = _layout(tmp_path)
    cache = DecodedImageCache("disk", None, tmp_path / "cache", read_image_rgb)
    current = cache._entry(folder / records[0].path)
    monkeypatch.setattr(cache_module, "ENTRY_VERSION", cache_module.ENTRY_VERSION - 1)
    assert cache._entry(folder / records[0].path) != current


def test_boxes_outside_are_dropped_in_the_file_frame_with_a_downscaled_entry(tmp_path):
    records, folder = _layout(tmp_path)
    ann = tmp_path / "outside.txt"
    # image 400 x 300; the cache keeps 200 x 150: a box from x=399 is inside the file, from x=400 outside
    ann.write_text("0--P/a.png\n3\n399 10 20 20 0 0 0 0 0 0\n400 10 20 20 0 0 0 0 0 0\n"
                   "10 -40 20 40 0 0 0 0 0 0\n")
    records = parse_wider_annotations(ann)
    cache = DecodedImageCache("ram", 200, None, read_image_rgb)
    dataset = WiderFaceDataset(records, folder, build_transforms(None, (400, 300), train=False), (400, 300),
                               cache=cache)
    _, target = dataset[0]
    assert dataset.num_boxes_outside == 2
    torch.testing.assert_close(target["boxes"], torch.tensor([[399.0, 10, 400, 30]]), atol=1e-3, rtol=0)


def test_ram_budget_keeps_what_fits_decodes_the_rest_and_says_so_once(tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a", "b", "c"):  # 30 x 40 x 3 = 3,600 bytes each once decoded
        cv2.imwrite(str(folder / f"{name}.png"), np.full((30, 40, 3), 7, np.uint8))
    decoder = CountingDecoder()
    cache = DecodedImageCache("ram", None, None, decoder, max_bytes=2 * 3600)  # room for two
    with caplog.at_level("WARNING", logger="detlab.data.cache"):
        for _ in range(3):
            for name in ("a", "b", "c"):
                rgb, original = cache.get(folder / f"{name}.png")
                assert rgb.shape == (30, 40, 3) and original == (30, 40)
    # a and b decoded once and kept; c, past the budget, decoded on each of its 3 reads
    assert decoder.calls == 2 + 3 and cache.bytes_kept == 7200 and cache.full
    warnings = [r for r in caplog.records if "budget" in r.getMessage()]
    assert len(warnings) == 1 and "after 2 images" in warnings[0].getMessage()


def test_default_ram_budget_is_a_quarter_of_memory_shared_by_the_workers(monkeypatch):
    monkeypatch.setattr(cache_module, "machine_memory_bytes", lambda: 16 * 2**30)
    assert cache_module.default_ram_budget() == 4 * 2**30
    assert cache_module.default_ram_budget(4) == 2**30
    monkeypatch.setattr(cache_module, "machine_memory_bytes", lambda: 0)
    assert cache_module.default_ram_budget() is None  # unknown memory: no bound
