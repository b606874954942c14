"""The embedded synthetic dataset: determinism, layout, cache and atomic generation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from detlab.config import SyntheticConfig
from detlab.data import ensure_synthetic_dataset, parse_wider_annotations
from detlab.data import synthetic as synthetic_module
from detlab.data.wider import annotation_file, check_images_exist, images_dir


def tiny(seed: int = 0, num_images: int = 6) -> SyntheticConfig:
    return SyntheticConfig(num_images=num_images, image_width=96, image_height=64, seed=seed, val_fraction=0.34)


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = file_hashes(ensure_synthetic_dataset(tmp_path / "a", tiny(seed=3)))
    b = file_hashes(ensure_synthetic_dataset(tmp_path / "b", tiny(seed=3)))
    assert len(a) == 6 + 2 and a == b


def test_other_seed_gives_other_files(tmp_path):
    a = file_hashes(ensure_synthetic_dataset(tmp_path / "a", tiny(seed=0)))
    b = file_hashes(ensure_synthetic_dataset(tmp_path / "b", tiny(seed=1)))
    images_a = {h for name, h in a.items() if name.endswith(".jpg")}
    images_b = {h for name, h in b.items() if name.endswith(".jpg")}
    assert images_a.isdisjoint(images_b)


def test_official_layout_read_by_the_same_parser(tmp_path):
    root = ensure_synthetic_dataset(tmp_path, tiny(num_images=12))
    assert root == tmp_path / "n12_96x64_seed0_val0.34_v2"  # keyed on the generation parameters
    train = parse_wider_annotations(annotation_file(root, "train"))
    val = parse_wider_annotations(annotation_file(root, "val"))
    assert (len(train), len(val)) == (8, 4)  # round(12 * 0.34) = 4 val images
    check_images_exist(train, images_dir(root, "train"))
    check_images_exist(val, images_dir(root, "val"))
    assert all("--" in r.path.split("/")[0] for r in train + val)  # <event>/<name>.jpg
    for record in train + val:
        boxes = record.boxes
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert record.attributes.shape == (record.num_faces, 6)
        assert (record.attributes >= 0).all() and (record.attributes <= 2).all()


def test_face_sizes_and_attributes_are_wider_like(tmp_path):
    """Drawn scenes (no files): most faces under 32 px, some large, every attribute varied."""
    sizes, attributes = [], []
    for i in range(40):
        _, _, faces = synthetic_module.draw_image(np.random.default_rng([0, i]), 320, 256)
        sizes += [max(f.box[2], f.box[3]) for f in faces]
        attributes += [f.attributes for f in faces]
    sizes = np.array(sizes)
    attributes = np.array(attributes)
    assert (sizes < 32).mean() > 0.6 and (sizes >= 64).sum() > 0
    for column in range(6):  # blur, expression, illumination, invalid, occlusion, pose
        assert len(np.unique(attributes[:, column])) >= 2


def test_faceless_images_written_with_placeholder(tmp_path):
    lines = synthetic_module._annotation_lines("4--Background/x.jpg", [])
    assert lines == ["4--Background/x.jpg", "0", "0 0 0 0 0 0 0 0 0 0"]


def test_cache_is_reused(tmp_path, monkeypatch):
    root = ensure_synthetic_dataset(tmp_path, tiny())

    def fail(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(synthetic_module, "generate_synthetic_dataset", fail)
    assert ensure_synthetic_dataset(tmp_path, tiny()) == root


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic_module.draw_image

    def draw_then_fail(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic_module, "draw_image", draw_then_fail)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(tmp_path, tiny())
    assert list(tmp_path.iterdir()) == []  # neither the dataset folder nor the temporary one
