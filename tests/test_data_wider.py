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
from detlab.data import MissingAnnotationError, build_loader
from detlab.data.transforms import build_transforms
from detlab.data.wider import (
    BadImageError,
    annotation_file,
    boxes_outside_image,
    images_dir,
    read_image_rgb,
    truncation_reason,
)
from detlab.errors import UserError

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


# ------------------------------------------------------------------------------------ whole-file problems
def write_bytes(tmp_path: Path, data: bytes, name: str = "gt.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def file_error(tmp_path: Path, data: bytes, parse=parse_wider_annotations) -> AnnotationError:
    """The error of ``parse`` on ``data``, after checking it is a UserError naming the file."""
    path = write_bytes(tmp_path, data)
    with pytest.raises(AnnotationError) as info:
        parse(path)
    assert isinstance(info.value, UserError) and str(path) in str(info.value)
    return info.value


@pytest.mark.parametrize("parse", [parse_wider_annotations, parse_wider_filelist], ids=["annotations", "filelist"])
@pytest.mark.parametrize("data", [b"", b"\n", b"\n\n\n", b"  \t \n \r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\r\n \n"],
                         ids=["empty", "newline", "newlines", "whitespace", "bom-only", "bom-blank"])
def test_file_without_images_is_an_error(tmp_path, parse, data):
    error = file_error(tmp_path, data, parse)
    assert error.line == 0 and "no images in the" in str(error) and "expected" in str(error)
    assert ", line" not in str(error)  # a whole-file problem: no line number


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_utf8_byte_order_mark_is_dropped(tmp_path, newline):
    plain = parse_wider_annotations(write(tmp_path, GOOD, "plain.txt"))
    text = GOOD.replace("\n", newline)
    with_bom = parse_wider_annotations(write_bytes(tmp_path, b"\xef\xbb\xbf" + text.encode()))
    assert [r.path for r in with_bom] == [r.path for r in plain]
    for a, b in zip(with_bom, plain):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.attributes, b.attributes)
    listed = parse_wider_filelist(write_bytes(tmp_path, b"\xef\xbb\xbf" + b"0--P/a.jpg\r\n1--H/b.jpg\r\n", "l.txt"))
    assert listed == ["0--P/a.jpg", "1--H/b.jpg"]


@pytest.mark.parametrize("parse", [parse_wider_annotations, parse_wider_filelist], ids=["annotations", "filelist"])
@pytest.mark.parametrize("encoding, line", [("utf-16", 1), ("utf-16-le", 1), ("utf-16-be", 1), ("utf-32", 1),
                                            ("utf-32-be", 1)])
def test_utf16_and_utf32_files_are_errors(tmp_path, parse, encoding, line):
    text = GOOD if parse is parse_wider_annotations else "0--P/a.jpg\n1--H/b.jpg\n"
    error = file_error(tmp_path, text.encode(encoding), parse)
    assert error.line == line and "expected UTF-8 text" in str(error)
    if encoding in ("utf-16", "utf-32"):  # with a byte-order mark: named as such
        assert "byte-order mark" in str(error)
    else:
        assert "NUL byte" in str(error)


@pytest.mark.parametrize("where", [0, 1, 5, 9])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_bytes_that_are_not_utf8_name_their_line(tmp_path, where, newline):
    lines = GOOD.splitlines()
    raw = [line.encode() for line in lines]
    if where in (0, 5):  # an image path in Latin-1 ("cafe" with e-acute)
        raw[where] = raw[where].replace(b".jpg", b"_caf\xe9.jpg")
    else:  # a stray Windows-1252 byte at the end of a face line
        raw[where] += b" \x96"
    error = file_error(tmp_path, newline.encode().join(raw) + newline.encode())
    assert error.line == where + 1 and f", line {where + 1}:" in str(error)
    assert "is not valid UTF-8" in str(error) and "expected UTF-8 text" in str(error)
    assert ("0xE9" if where in (0, 5) else "0x96") in str(error)


@pytest.mark.parametrize("where", [0, 3, 13])
def test_nul_bytes_name_their_line(tmp_path, where):
    lines = GOOD.splitlines()
    lines[where] = lines[where][:2] + "\x00" + lines[where][2:]
    error = file_error(tmp_path, ("\n".join(lines) + "\n").encode())
    assert error.line == where + 1 and "NUL byte (column 3)" in str(error) and "expected UTF-8 text" in str(error)
    error = file_error(tmp_path, ("\n".join(lines[:where]) + "\n" * (where > 0) + "0--P/x.jpg\x00\x00\n").encode(),
                       parse_wider_filelist)
    assert error.line == where + 1


def test_first_bad_byte_is_reported_whichever_kind(tmp_path):
    # An invalid byte on line 2 before a NUL byte on line 4, and the reverse.
    error = file_error(tmp_path, b"a/x.jpg\n1\xff\n1 1 2 2 0 0 0 0 0 0\nb/\x00.jpg\n")
    assert error.line == 2 and "0xFF" in str(error)
    error = file_error(tmp_path, b"a/x.jpg\n1\x00\n1 1 2 2 0 0 0 0 0 0\nb/\xff.jpg\n")
    assert error.line == 2 and "NUL byte" in str(error)


@pytest.mark.parametrize("parse, what", [(parse_wider_annotations, "annotation file"),
                                         (parse_wider_filelist, "file list")], ids=["annotations", "filelist"])
def test_missing_file_is_a_user_error_and_a_file_not_found_error(tmp_path, parse, what):
    path = tmp_path / "nowhere" / "gt.txt"
    with pytest.raises(MissingAnnotationError) as info:
        parse(path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, UserError)
    assert str(info.value) == f"{what} not found: {path}"
    try:  # callers catching FileNotFoundError keep working
        parse(path)
    except FileNotFoundError as error:
        assert error is not None


@pytest.mark.parametrize("parse", [parse_wider_annotations, parse_wider_filelist], ids=["annotations", "filelist"])
def test_folder_or_unreadable_file_is_named(tmp_path, parse, monkeypatch):
    folder = tmp_path / "gt.txt"
    folder.mkdir()
    with pytest.raises(AnnotationError, match=r"gt\.txt: is a folder; expected the (annotation file|file list)"):
        parse(folder)
    path = write(tmp_path, GOOD, "locked.txt")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # as root, chmod 000 would not stop the read
    with pytest.raises(AnnotationError, match=r"locked\.txt: cannot read the .*Permission denied"):
        parse(path)


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


@pytest.mark.slow
def test_skip_counter_is_shared_with_loader_workers(tmp_path):
    from detlab.data import build_loader

    dataset = bad_image_dataset(tmp_path, "skip")
    loader = build_loader(dataset, batch_size=2, shuffle=False, num_workers=1, seed=0)
    batches = list(loader)
    assert batches[0][0].shape[0] == 1
    assert dataset.num_skipped == 1  # counted in the worker process, read in this one


# ------------------------------------------------------------------------------------ boxes outside the image
# make_layout's images are 32 x 24 (W x H).
OUTSIDE_GT = """\
0--P/a.jpg
7
2 2 8 8 0 0 0 0 0 0
28 20 10 10 0 0 0 0 0 0
40 5 5 5 0 0 0 0 0 0
5 30 4 4 0 0 0 0 0 0
-10 2 5 5 0 0 0 0 0 0
32 2 4 4 0 0 0 0 0 0
3 -9 4 9 0 0 0 0 0 0
0--P/b.jpg
2
100 100 10 10 0 0 0 0 0 0
1 1 4 4 0 0 0 0 0 0
0--P/c.jpg
1
-50 -50 20 20 0 0 0 0 0 0
"""


def outside_dataset(tmp_path: Path) -> WiderFaceDataset:
    records = parse_wider_annotations(write(tmp_path, OUTSIDE_GT))
    folder = make_layout(tmp_path, [r.path for r in records])
    return WiderFaceDataset(records, folder, build_transforms(None, (32, 24), train=False), (32, 24))


def test_boxes_outside_image_mask():
    boxes = np.array([[0, 0, 1, 1], [31, 23, 40, 40], [32, 0, 40, 5], [0, 24, 5, 30], [-5, -5, 0, 0],
                      [-5, -5, 0.5, 0.5], [10, -3, 12, 0], [10, -3, 12, 1e-3]], dtype=np.float32)
    assert boxes_outside_image(boxes, 24, 32).tolist() == [False, False, True, True, True, False, True, False]
    assert boxes_outside_image(np.zeros((0, 4), np.float32), 24, 32).shape == (0,)


def test_boxes_wholly_outside_are_dropped_counted_and_warned_once(tmp_path, caplog):
    dataset = outside_dataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="detlab.data.wider"):
        _, a = dataset[0]
        _, a_again = dataset[0]
        _, b = dataset[1]
        _, c = dataset[2]
    # partly outside: clipped as before; wholly outside (right, below, left, on the right edge, above): dropped
    torch.testing.assert_close(a["boxes"], torch.tensor([[2.0, 2, 10, 10], [28, 20, 32, 24]]))
    assert a["labels"].tolist() == [1, 1] and torch.equal(a_again["boxes"], a["boxes"])
    torch.testing.assert_close(b["boxes"], torch.tensor([[1.0, 1, 5, 5]]))
    assert c["boxes"].shape == (0, 4) and c["labels"].shape == (0,)
    assert dataset.num_boxes_outside == 5 + 1 + 1 and dataset.num_images_with_boxes_outside == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3  # once per image, not again on the second visit
    assert "a.jpg: dropped 5 of 7 box(es) lying wholly outside the 32x24 image" in messages[0]
    assert "7 box(es) in 3 image(s) dropped so far" in messages[2]
    assert dataset.records[0].num_faces == 7  # the records themselves are untouched


@pytest.mark.slow
def test_boxes_outside_counted_across_loader_workers(tmp_path):
    dataset = outside_dataset(tmp_path)
    batches = list(build_loader(dataset, batch_size=3, shuffle=False, num_workers=1, seed=0))
    assert [len(t["boxes"]) for t in batches[0][1]] == [2, 1, 0]
    assert dataset.num_boxes_outside == 7  # counted in the worker process, read in this one


def test_boxes_inside_are_unaffected(tmp_path, caplog):
    records = parse_wider_annotations(write(tmp_path, "0--P/a.jpg\n2\n0 0 32 24 0 0 0 0 0 0\n30 22 2 2 0 0 0 0 0 0\n"))
    dataset = WiderFaceDataset(records, make_layout(tmp_path, ["0--P/a.jpg"]),
                               build_transforms(None, (32, 24), train=False), (32, 24))
    with caplog.at_level(logging.WARNING, logger="detlab.data.wider"):
        _, target = dataset[0]
    torch.testing.assert_close(target["boxes"], torch.from_numpy(records[0].boxes))
    assert dataset.num_boxes_outside == 0 and not caplog.records


# ------------------------------------------------------------------------------------ truncated images
def noise_image(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(ext: str, image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    assert ok
    return buffer.tobytes()


def jpeg_with_comment(payload: bytes, image: np.ndarray) -> bytes:
    """A JPEG with a COM segment (FF FE) holding ``payload`` right after SOI, as an EXIF thumbnail sits."""
    jpeg = encode(".jpg", image)
    segment = b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + segment + jpeg[2:]


def expect_bad(path: Path, pattern: str) -> BadImageError:
    with pytest.raises(BadImageError, match=pattern) as info:
        read_image_rgb(path)
    assert str(path) in str(info.value) and isinstance(info.value, UserError)
    return info.value


@pytest.mark.parametrize("keep", [20, 0.3, 0.6, 0.9, -2, -1])
def test_truncated_jpeg_is_a_bad_image(tmp_path, keep):
    data = encode(".jpg", noise_image())
    cut = data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep]
    path = write_bytes(tmp_path, cut, "cut.jpg")
    # what the check is for: OpenCV alone returns a half-grey image without any error
    if keep not in (20,):
        assert cv2.imread(str(path)) is not None
    where = "before the image data starts" if keep == 20 else "inside the image data"
    expect_bad(path, rf"cut\.jpg: truncated JPEG: the file \({len(cut)} bytes\) ends {where}, without the "
                     rf"end-of-image marker FF D9")


def test_truncated_jpeg_with_an_embedded_thumbnail_is_a_bad_image(tmp_path):
    thumbnail = encode(".jpg", noise_image(8, 8, seed=1))  # holds its own FF D9, before the main scan
    data = jpeg_with_comment(thumbnail, noise_image())
    assert data.count(b"\xff\xd9") == 2
    path = write_bytes(tmp_path, data, "whole.jpg")
    np.testing.assert_array_equal(read_image_rgb(path), cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
    expect_bad(write_bytes(tmp_path, data[: len(data) * 3 // 4], "cut.jpg"), "truncated JPEG")


@pytest.mark.parametrize("trailer", [b"\x00" * 7, b"\x00" * 4096, b"\xff\xff", b"\r\n", b"appended data"])
def test_jpeg_with_trailing_bytes_after_its_end_is_good(tmp_path, trailer):
    image = noise_image()
    data = encode(".jpg", image)
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert truncation_reason(data + trailer) is None
    np.testing.assert_array_equal(read_image_rgb(write_bytes(tmp_path, data + trailer, "pad.jpg")), expected)


def test_jpeg_padded_with_zeros_to_its_size_is_truncated(tmp_path):
    # An interrupted download into a preallocated file: the right size, the tail all zeros.
    data = encode(".jpg", noise_image())
    padded = data[: len(data) // 2] + b"\x00" * (len(data) - len(data) // 2)
    expect_bad(write_bytes(tmp_path, padded, "prealloc.jpg"), "truncated JPEG")


@pytest.mark.parametrize("keep", [0.5, 0.9, -12, -1])
def test_truncated_png_is_a_bad_image(tmp_path, keep):
    data = encode(".png", noise_image())
    cut = data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep]
    expect_bad(write_bytes(tmp_path, cut, "cut.png"), r"cut\.png: truncated PNG: .*no complete IEND chunk")


def test_png_with_trailing_bytes_is_good(tmp_path):
    image = noise_image()
    data = encode(".png", image)
    np.testing.assert_array_equal(read_image_rgb(write_bytes(tmp_path, data + b"\x00" * 9, "pad.png")),
                                  cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp"])
def test_complete_images_decode_as_opencv_does(tmp_path, ext):
    path = tmp_path / f"a{ext}"
    cv2.imwrite(str(path), noise_image(37, 53))
    expected = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(read_image_rgb(path), expected)


def test_other_formats_keep_opencv_behaviour(tmp_path):
    # A BMP is not checked: whatever OpenCV makes of a cut one is what read_image_rgb gives.
    data = encode(".bmp", noise_image())
    path = write_bytes(tmp_path, data[: len(data) // 2], "cut.bmp")
    decoded = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if decoded is None:
        expect_bad(path, "cannot be decoded")
    else:
        np.testing.assert_array_equal(read_image_rgb(path), cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB))


def test_empty_missing_and_folder_images_are_bad_images(tmp_path):
    expect_bad(write_bytes(tmp_path, b"", "empty.jpg"), r"empty\.jpg: empty file \(0 bytes\)")
    expect_bad(tmp_path / "absent.jpg", r"absent\.jpg: file not found")
    (tmp_path / "folder.jpg").mkdir()
    expect_bad(tmp_path / "folder.jpg", r"folder\.jpg: cannot be read")


def truncated_dataset(tmp_path: Path, on_bad_image: str, count: int = 3, good: int = 0) -> WiderFaceDataset:
    """``count`` JPEGs cut at different points (``t<i>.jpg``), then ``good`` whole ones (``g<i>.jpg``)."""
    names = [f"0--P/t{i}.jpg" for i in range(count)] + [f"0--P/g{i}.jpg" for i in range(good)]
    records = parse_wider_annotations(write(tmp_path, "".join(f"{n}\n1\n2 2 8 8 0 0 0 0 0 0\n" for n in names)))
    folder = make_layout(tmp_path, names[count:])
    for i, name in enumerate(names[:count]):
        data = encode(".jpg", noise_image(24, 32, seed=i))
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data[: len(data) * (i + 1) // (count + 1)])
    return WiderFaceDataset(records, folder, build_transforms(None, (32, 24), train=False), (32, 24), on_bad_image)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_over_truncated_images_skips_and_counts(tmp_path, num_workers):
    dataset = truncated_dataset(tmp_path, "skip")
    batches = list(build_loader(dataset, batch_size=2, shuffle=False, num_workers=num_workers, seed=0))
    assert len(batches) == 2
    for images, targets in batches:  # empty batches, of the input size: the caller skips them
        assert images.shape == (0, 3, 24, 32) and images.dtype == torch.float32 and targets == []
    assert dataset.num_skipped == 3


def test_loader_over_truncated_images_raises_by_default(tmp_path):
    dataset = truncated_dataset(tmp_path, "error")
    with pytest.raises(BadImageError, match=r"t0\.jpg: truncated JPEG.*on_bad_image=skip"):
        next(iter(build_loader(dataset, batch_size=2, shuffle=False, num_workers=0, seed=0)))


def test_mixed_batch_keeps_the_good_images(tmp_path):
    dataset = truncated_dataset(tmp_path, "skip", count=2, good=1)
    images, targets = next(iter(build_loader(dataset, batch_size=3, shuffle=False, num_workers=0, seed=0)))
    assert images.shape == (1, 3, 24, 32) and [t["image_id"] for t in targets] == [2]
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[2.0, 2, 10, 10]]))
    assert dataset.num_skipped == 2


def test_collate_empty_batch_shape():
    assert collate_detection([None, None], input_size=(80, 48))[0].shape == (0, 3, 48, 80)
    assert collate_detection([None])[0].shape == (0, 3, 0, 0)  # input size unknown


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
