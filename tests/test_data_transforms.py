"""Transforms on known boxes: exact coordinates for resize, flip and crop; box/image consistency."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from detlab.config import AugmentConfig
from detlab.data import collate_detection, denormalize
from detlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomFaceCrop, build_transforms


def sample(boxes, height=100, width=200):
    image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
    bb = tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY",
                                  canvas_size=(height, width))
    return image, {"boxes": bb, "labels": torch.ones(len(bb), dtype=torch.int64)}


def test_eval_resize_exact():
    image, target = build_transforms(None, (320, 256), train=False)(*sample([[10, 20, 30, 40]]))
    assert image.shape == (3, 256, 320) and image.dtype == torch.float32
    # sx = 320 / 200 = 1.6, sy = 256 / 100 = 2.56
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[16.0, 51.2, 48.0, 102.4]]))


def test_eval_transform_is_deterministic_and_normalises():
    pixels = torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8)
    transform = build_transforms(AugmentConfig(), (60, 50), train=False)  # augment ignored for eval
    bb = tv_tensors.BoundingBoxes(torch.tensor([[1.0, 2.0, 30.0, 40.0]]), format="XYXY", canvas_size=(50, 60))
    out1, t1 = transform(tv_tensors.Image(pixels), {"boxes": bb, "labels": torch.ones(1, dtype=torch.int64)})
    out2, t2 = transform(tv_tensors.Image(pixels), {"boxes": bb, "labels": torch.ones(1, dtype=torch.int64)})
    assert torch.equal(out1, out2) and torch.equal(t1["boxes"], t2["boxes"])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out1, (pixels.float() / 255 - mean) / std)  # same size: no resampling
    torch.testing.assert_close(denormalize(out1), pixels.float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(denormalize(out1[None])[0], pixels.float(), atol=1e-3, rtol=0)


def test_horizontal_flip_exact():
    only_flip = AugmentConfig(random_crop=False, zoom_out=False, hflip=True, photometric=False)
    transform = build_transforms(only_flip, (200, 100), train=True)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        image = tv_tensors.Image(torch.zeros(3, 100, 200, dtype=torch.uint8))
        image[:, :, :10] = 255  # a marker on the left edge tells whether the flip happened
        bb = tv_tensors.BoundingBoxes(torch.tensor([[10.0, 20.0, 30.0, 40.0]]), format="XYXY",
                                      canvas_size=(100, 200))
        out, target = transform(image, {"boxes": bb, "labels": torch.ones(1, dtype=torch.int64)})
        flipped = bool(out[0, 0, -1] > out[0, 0, 0])
        seen.add(flipped)
        expected = [[170.0, 20.0, 190.0, 40.0]] if flipped else [[10.0, 20.0, 30.0, 40.0]]
        torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.tensor(expected))
    assert seen == {True, False}


def test_face_crop_clips_and_drops_boxes_whose_centre_left():
    crop = RandomFaceCrop()
    # crop x in [20, 90), y in [10, 60)
    params = dict(top=10, left=20, height=50, width=70)
    boxes = [[30, 20, 50, 40],  # inside
             [70, 30, 100, 50],  # centre (85, 40) inside, right part clipped
             [0, 0, 30, 20],  # centre (15, 10) outside: dropped
             [80, 50, 100, 80]]  # centre (90, 65) outside: dropped
    image, target = sample(boxes)
    cx = torch.tensor([40.0, 85.0, 15.0, 90.0])
    cy = torch.tensor([30.0, 40.0, 10.0, 65.0])
    params["is_within_crop_area"] = (20 < cx) & (cx < 90) & (10 < cy) & (cy < 60)
    out_image = crop.transform(image, params)
    out_boxes = crop.transform(target["boxes"], params)
    assert out_image.shape == (3, 50, 70)
    out_image, out = v2.SanitizeBoundingBoxes()(out_image, {"boxes": out_boxes, "labels": target["labels"]})
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[10.0, 10.0, 30.0, 30.0], [50.0, 20.0, 70.0, 40.0]]))
    assert out["labels"].tolist() == [1, 1]


def test_face_crop_sampler_keeps_a_face_centre_inside():
    crop = RandomFaceCrop(p_keep=0.0)
    image, target = sample([[150, 70, 160, 80], [5, 5, 9, 9]])
    torch.manual_seed(0)
    crops = 0
    for _ in range(50):
        params = crop.make_params([image, target["boxes"]])
        if not params:
            continue
        crops += 1
        assert params["is_within_crop_area"].any()
        assert 0 <= params["left"] and params["left"] + params["width"] <= 200
        assert 0 <= params["top"] and params["top"] + params["height"] <= 100
    assert crops >= 45


def test_face_crop_crops_images_without_faces():
    crop = RandomFaceCrop(p_keep=0.0)
    image, target = sample([])
    torch.manual_seed(0)
    params = crop.make_params([image, target["boxes"]])
    assert params and params["width"] * params["height"] < 200 * 100


@pytest.mark.parametrize("zoom_out", [False, True])
def test_train_pipeline_keeps_boxes_on_their_pixels(zoom_out):
    """White squares at the box positions must stay under the transformed boxes, whatever is drawn."""
    augment = AugmentConfig(random_crop=True, zoom_out=zoom_out, hflip=True, photometric=False)
    transform = build_transforms(augment, (96, 64), train=True)
    squares = [[20, 20, 60, 60], [120, 30, 160, 70], [80, 100, 120, 140]]
    for seed in range(30):
        torch.manual_seed(seed)
        image = tv_tensors.Image(torch.zeros(3, 160, 240, dtype=torch.uint8))
        for x1, y1, x2, y2 in squares:
            image[:, y1:y2, x1:x2] = 255
        bb = tv_tensors.BoundingBoxes(torch.tensor(squares, dtype=torch.float32), format="XYXY",
                                      canvas_size=(160, 240))
        out, target = transform(image, {"boxes": bb, "labels": torch.ones(3, dtype=torch.int64)})
        assert out.shape == (3, 64, 96)
        pixels = denormalize(out)[0]
        boxes = target["boxes"].as_subclass(torch.Tensor)
        assert len(boxes) == len(target["labels"]) and len(boxes) >= 1
        for x1, y1, x2, y2 in boxes.tolist():
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 64
            cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
            assert pixels[cy, cx] > 200  # the box's centre is on its white square


def test_collate_keeps_variable_box_counts():
    a = (torch.zeros(3, 4, 5), {"boxes": torch.zeros(2, 4), "image_id": 0})
    b = (torch.ones(3, 4, 5), {"boxes": torch.zeros(0, 4), "image_id": 1})
    images, targets = collate_detection([a, None, b])
    assert images.shape == (2, 3, 4, 5) and [t["boxes"].shape[0] for t in targets] == [2, 0]
    images, targets = collate_detection([None])
    assert images.shape[0] == 0 and targets == []


def test_photometric_distort_matches_torchvision():
    from detlab.data.transforms import PhotometricDistort

    torch.manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, 24, 32), dtype=torch.uint8))
    params = dict(brightness_factor=1.1, contrast_factor=0.8, saturation_factor=1.3, hue_factor=None,
                  contrast_before=False, channel_permutation=torch.tensor([2, 0, 1]))
    ours, reference = PhotometricDistort(), v2.RandomPhotometricDistort()
    assert torch.equal(ours.transform(image, params), reference.transform(image, params))
    for contrast_before in (True, False):
        params.update(hue_factor=0.04, contrast_before=contrast_before)
        diff = (ours.transform(image, params).int() - reference.transform(image, params).int()).abs()
        # only the hue step differs: OpenCV's 8-bit HSV instead of a float round trip
        assert diff.float().mean() < 1.5 and diff.max() <= 16
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), format="XYXY", canvas_size=(24, 32))
    assert torch.equal(ours.transform(boxes, params), boxes)  # boxes pass through
