"""WIDER FACE parser, file list, image checks and the dataset's bad-image handling."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detlab.data import (
    AnnotationError,
    MissingImagesError,
    WiderFaceDataset,
    check_images_exist,
    collate_detection,
    parse_wider_annotations,
    parse_wider_filelist,
)
from detlab.data.transforms import build_transforms
from detlab.data.wider import BadImageError, annotation_file, images_dir

GOOD = """\
0--Parade/a.jpg
3
10 20 30 40 1 0 0 0 2 0
5 6 7 8 0 1 1 1 0 1
50 60 20 2 2 0 0 0 0 1
1--Handshaking/empty.jpg
0
0 0 0 0 0 0 0 0 0 0
2--Demo/only_placeholder.jpg
1
0 0 0 0 0 0 0 0 0 0
2--Demo/neg_width.jpg
2
100 100 -2 23 2 0 0 0 2 0
1 2 3 4 0 0 0 0 0 0
"""


def write(tmp_path: Path, text: str, name: str = "gt.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------ valid files
def test_parse_boxes_attributes_and_placeholders(tmp_path):
    records = parse_wider_annotations(write(tmp_path, GOOD))
    assert [r.path for r in records] == ["0--Parade/a.jpg", "1--Handshaking/empty.jpg",
                                         "2--Demo/only_placeholder.jpg", "2--Demo/neg_width.jpg"]
    a = records[0]
    # x y w h -> x1 y1 x2 y2
    np.testing.assert_array_equal(a.boxes, [[10, 20, 40, 60], [5, 6, 12, 14], [50, 60, 70, 62]])
    assert a.boxes.dtype == np.float32 and a.attributes.dtype == np.int64
    np.testing.assert_array_equal(a.attributes, [[1, 0, 0, 0, 2, 0], [0, 1, 1, 1, 0, 1], [2, 0, 0, 0, 0, 1]])
    # count 0 + placeholder line consumed; a lone zero box dropped: negatives, no dummy box
    for negative in records[1:3]:
        assert negative.boxes.shape == (0, 4) and negative.attributes.shape == (0, 6)
    # the w = -2 face is dropped, the other kept
    np.testing.assert_array_equal(records[3].boxes, [[1, 2, 4, 6]])


def test_count_zero_without_placeholder_line_is_accepted(tmp_path):
    records = parse_wider_annotations(write(tmp_path, "a/x.jpg\n0\nb/y.jpg\n1\n1 1 2 2 0 0 0 0 0 0\n"))
    assert [r.num_faces for r in records] == [0, 1]


def test_drop_invalid(tmp_path):
    a = parse_wider_annotations(write(tmp_path, GOOD), drop_invalid=True)[0]
    np.testing.assert_array_equal(a.boxes, [[10, 20, 40, 60], [50, 60, 70, 62]])
    assert a.attributes[:, 3].tolist() == [0, 0]


def test_min_face_size_uses_the_larger_side(tmp_path):
    # faces (w, h): (30, 40) (7, 8) (20, 2): larger sides 40, 8, 20
    a = parse_wider_annotations(write(tmp_path, GOOD), min_face_size=20)[0]
    np.testing.assert_array_equal(a.boxes, [[10, 20, 40, 60], [50, 60, 70, 62]])


def test_keep_empty_false_skips_faceless_images(tmp_path):
    records = parse_wider_annotations(write(tmp_path, GOOD), keep_empty=False)
    assert [r.path for r in records] == ["0--Parade/a.jpg", "2--Demo/neg_width.jpg"]
    # an image whose only face is filtered out becomes face-less and is skipped as well
    records = parse_wider_annotations(write(tmp_path, GOOD), keep_empty=False, min_face_size=10)
    assert [r.path for r in records] == ["0--Parade/a.jpg"]


def test_trailing_blank_lines_and_spaces(tmp_path):
    records = parse_wider_annotations(write(tmp_path, "a/x.jpg\n1\n1 1 2 2 0 0 0 0 0 0 \n\n\n"))
    assert len(records) == 1 and records[0].num_faces == 1


def test_filelist(tmp_path):
    path = write(tmp_path, "0--Parade/a.jpg\n1--Handshaking/b.jpg\n\n", "list.txt")
    assert parse_wider_filelist(path) == ["0--Parade/a.jpg", "1--Handshaking/b.jpg"]
    with pytest.raises(AnnotationError, match=r"line 2: expected one image path"):
        parse_wider_filelist(write(tmp_path, "0--Parade/a.jpg\n0--Parade/b.jpg 3\n", "bad.txt"))


# ------------------------------------------------------------------------------------ malformed files
def parse_error(tmp_path: Path, text: str) -> AnnotationError:
    with pytest.raises(AnnotationError) as info:
        parse_wider_annotations(write(tmp_path, text))
    assert str(tmp_path / "gt.txt") in str(info.value)
    return info.value


def test_error_bad_count(tmp_path):
    error = parse_error(tmp_path, "a/x.jpg\n1\n1 1 2 2 0 0 0 0 0 0\nb/y.jpg\nthree\n")
    assert error.line == 5 and "line 5: bad face count 'three'" in str(error)
    assert "non-negative integer" in str(error)


def test_error_negative_count(tmp_path):
    error = parse_error(tmp_path, "a/x.jpg\n-1\n")
    assert error.line == 2 and "bad face count '-1'" in str(error)


def test_error_non_integer_field(tmp_path):
    error = parse_error(tmp_path, "a/x.jpg\n2\n1 1 2 2 0 0 0 0 0 0\n1 1 2.5 2 0 0 0 0 0 0\n")
    assert error.line == 4 and "line 4: non-integer field w='2.5'" in str(error)


def test_error_too_few_fields(tmp_path):
    error = parse_error(tmp_path, "a/x.jpg\n1\n1 1 2 2 0 0\n")
    assert error.line == 3 and "line 3: too few fields" in str(error) and "got 6" in str(error)


def test_error_too_many_fields(tmp_path):
    error = parse_error(tmp_path, "a/x.jpg\n1\n1 1 2 2 0 0 0 0 0 0 7\n")
    assert error.line == 3 and "too many fields" in str(error)


def test_error_truncated_after_path(tmp_path):
    error = parse_error(tmp_path, "a/x.jpg\n1\n1 1 2 2 0 0 0 0 0 0\nb/y.jpg\n")
    assert error.line == 4 and "truncated file" in str(error) and "face-count line" in str(error)


def test_error_truncated_inside_faces(tmp_path):
    error = parse_error(tmp_path, "a/x.jpg\n3\n1 1 2 2 0 0 0 0 0 0\n")
    assert error.line == 3 and "truncated file" in str(error) and "declares 3 faces on line 2" in str(error)


def test_error_count_larger_than_following_lines(tmp_path):
    error = parse_error(tmp_path, "a/x.jpg\n3\n1 1 2 2 0 0 0 0 0 0\nb/y.jpg\n1\n1 1 2 2 0 0 0 0 0 0\n")
    assert error.line == 4 and "larger than the 1 face line(s) that follow" in str(error)
    assert "line 2" in str(error)  # the count's own line


def test_error_count_smaller_than_following_lines(tmp_path):
    error = parse_error(tmp_path, "a/x.jpg\n1\n1 1 2 2 0 0 0 0 0 0\n3 3 4 4 0 0 0 0 0 0\nb/y.jpg\n0\n")
    assert error.line == 4 and "expected an image path" in str(error) and "smaller" in str(error)


def test_error_bad_placeholder(tmp_path):
    error = parse_error(tmp_path, "a/x.jpg\n0\n0 0 0\n")
    assert error.line == 3 and "placeholder" in str(error)


# ------------------------------------------------------------------------------------ images
def make_layout(tmp_path: Path, names: list[str]) -> Path:
    folder = tmp_path / "WIDER_val" / "images"
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / name), np.full((24, 32, 3), 128, np.uint8))
    return folder


def test_missing_images_reported_together(tmp_path):
    records = parse_wider_annotations(write(tmp_path, GOOD))
    folder = make_layout(tmp_path, ["0--Parade/a.jpg"])
    with pytest.raises(MissingImagesError) as info:
        check_images_exist(records, folder)
    assert len(info.value.missing) == 3
    message = str(info.value)
    assert message.startswith("3 of 4 annotated images are missing")
    assert "1--Handshaking/empty.jpg" in message and "2--Demo/neg_width.jpg" in message
    make_layout(tmp_path, [r.path for r in records])
    check_images_exist(records, folder)  # all present: no error


def bad_image_dataset(tmp_path: Path, on_bad_image: str) -> WiderFaceDataset:
    records = parse_wider_annotations(write(tmp_path, "0--P/good.jpg\n1\n2 2 8 8 0 0 0 0 0 0\n"
                                                      "0--P/bad.jpg\n1\n2 2 8 8 0 0 0 0 0 0\n"))
    folder = make_layout(tmp_path, ["0--P/good.jpg"])
    (folder / "0--P" / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return WiderFaceDataset(records, folder, build_transforms(None, (32, 24), train=False), (32, 24), on_bad_image)


def test_corrupt_image_is_an_error_by_default(tmp_path):
    dataset = bad_image_dataset(tmp_path, "error")
    assert dataset[0][0].shape == (3, 24, 32)
    with pytest.raises(BadImageError, match=r"bad\.jpg.*cannot be decoded"):
        dataset[1]


def test_corrupt_image_skipped_and_counted(tmp_path, caplog):
    dataset = bad_image_dataset(tmp_path, "skip")
    with caplog.at_level(logging.WARNING, logger="detlab.data.wider"):
        batch = [dataset[0], dataset[1], dataset[1]]
    assert batch[1] is None and dataset.num_skipped == 1
    assert sum("bad.jpg" in r.getMessage() for r in caplog.records) == 1  # logged the first time only
    images, targets = collate_detection(batch)
    assert images.shape == (1, 3, 24, 32) and len(targets) == 1 and targets[0]["image_id"] == 0


def test_skip_counter_is_shared_with_loader_workers(tmp_path):
    from detlab.data import build_loader

    dataset = bad_image_dataset(tmp_path, "skip")
    loader = build_loader(dataset, batch_size=2, shuffle=False, num_workers=1, seed=0)
    batches = list(loader)
    assert batches[0][0].shape[0] == 1
    assert dataset.num_skipped == 1  # counted in the worker process, read in this one


# ------------------------------------------------------------------------------------ real data
def test_real_widerface_val_counts(widerface_root):
    """Expected numbers counted independently of the parser, with a plain awk pass over the raw file:

    awk 'state==0 {imgs++; state=1; next}
         state==1 {n=$1; left=n; state=(n>0)?2:3; next}
         state==3 {state=0; next}
         state==2 {total++; if ($3>0 && $4>0) valid++; if ($3>0 && $4>0 && $8==0) vni++;
                   if (--left==0) state=0}
         END {print imgs, total, valid, vni}' wider_face_split/wider_face_val_bbx_gt.txt
    -> 1606 images, 17686 face lines, 17683 with w > 0 and h > 0, 17361 of those not flagged invalid.
    Two images (0_Parade_Parade_0_275, 37_Soccer_soccer_ball_37_281) hold only a zero placeholder box.
    """
    path = annotation_file(widerface_root, "val")
    records = parse_wider_annotations(path)
    assert len(records) == 1606
    assert sum(r.num_faces for r in records) == 17683
    assert sum(r.num_faces == 0 for r in records) == 2
    assert sum(r.num_faces for r in parse_wider_annotations(path, drop_invalid=True)) == 17361
    assert len(parse_wider_annotations(path, keep_empty=False)) == 1604
    assert all((r.boxes[:, 2:] > r.boxes[:, :2]).all() for r in records)
    check_images_exist(records, images_dir(widerface_root, "val"))


def test_real_widerface_item(widerface_root):
    records = parse_wider_annotations(annotation_file(widerface_root, "val"))[:1]
    dataset = WiderFaceDataset(records, images_dir(widerface_root, "val"),
                               build_transforms(None, (320, 256), train=False), (320, 256))
    image, target = dataset[0]
    height, width = target["orig_size"].tolist()
    assert image.shape == (3, 256, 320) and image.dtype == torch.float32
    sx, sy = target["scale"].tolist()
    assert sx == pytest.approx(width / 320) and sy == pytest.approx(height / 256)
    # validation boxes map back to the original pixels by the per-axis scale
    back = target["boxes"] * torch.tensor([sx, sy, sx, sy])
    expected = torch.from_numpy(records[0].boxes).clamp(min=0)
    expected[:, 0::2] = expected[:, 0::2].clamp(max=width)
    expected[:, 1::2] = expected[:, 1::2].clamp(max=height)
    torch.testing.assert_close(back, expected, atol=1e-3, rtol=1e-5)
