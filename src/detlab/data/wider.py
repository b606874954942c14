"""WIDER FACE in its official layout: annotation parser, file lists, image check, image dataset.

Layout (``root`` is the folder holding these)::

    WIDER_{train,val,test}/images/<event>/<name>.jpg
    wider_face_split/wider_face_{train,val}_bbx_gt.txt
    wider_face_split/wider_face_test_filelist.txt

Each image in a ``*_bbx_gt.txt`` file is its relative path line, a face-count line, then one line
per face ``x1 y1 w h blur expression illumination invalid occlusion pose``. An image with count 0
is followed by one placeholder line ``0 0 0 0 0 0 0 0 0 0``.

Annotation files and file lists are read as UTF-8 text. A UTF-8 byte-order mark at the start is
tolerated and dropped (Windows editors write one; it is invisible and carries no meaning here). A
UTF-16/UTF-32 file, a NUL byte or bytes that are not UTF-8 raise ``AnnotationError`` naming the
line, and so does a file without any image (empty, or only blank lines): that would otherwise
surface later as PyTorch's ``num_samples=0``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from detlab.data.cache import DecodedImageCache
from detlab.errors import UserError

log = logging.getLogger(__name__)

WIDERFACE_URL = "http://shuoyang1213.me/WIDERFACE/"
WIDERFACE_LAYOUT = ("WIDER_{train,val,test}/images/<event>/<name>.jpg, "
                    "wider_face_split/wider_face_{train,val}_bbx_gt.txt, wider_face_split/wider_face_test_filelist.txt")


ATTRIBUTE_NAMES = ("blur", "expression", "illumination", "invalid", "occlusion", "pose")
FACE_FIELDS = ("x1", "y1", "w", "h") + ATTRIBUTE_NAMES
INVALID = ATTRIBUTE_NAMES.index("invalid")


@dataclass
class ImageRecord:
    """One annotated image. ``boxes`` are original-pixel ``xyxy``; ``attributes`` follow ATTRIBUTE_NAMES."""

    path: str  # relative to the images folder, e.g. "0--Parade/0_Parade_marchingband_1_20.jpg"
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # [N, 4] float32
    attributes: np.ndarray = field(default_factory=lambda: np.zeros((0, 6), np.int64))  # [N, 6] int64

    @property
    def num_faces(self) -> int:
        return int(self.boxes.shape[0])


class AnnotationError(UserError, ValueError):
    """A malformed annotation file; the message names the file, the line and what was expected.

    ``line`` is 1-based; 0 when the problem concerns the whole file (unreadable, no images), and
    then the message names only the file.
    """

    def __init__(self, path: os.PathLike | str, line: int, message: str) -> None:
        self.path = str(path)
        self.line = line
        super().__init__(f"{path}, line {line}: {message}" if line > 0 else f"{path}: {message}")


class MissingAnnotationError(UserError, FileNotFoundError):
    """An annotation file or file list that does not exist. A ``FileNotFoundError`` too, so callers
    that catch that keep working; a ``UserError``, so the entry points print it as one line."""

    def __init__(self, path: os.PathLike | str, what: str = "annotation file", hint: str = "") -> None:
        self.path = str(path)
        super().__init__(f"{what} not found: {path}{hint}")


class EmptyDatasetError(UserError, ValueError):
    """A split left without images (by the filters, ``max_*_images`` or the split ratios)."""


class MissingImagesError(UserError, FileNotFoundError):
    """Images listed by the annotations are absent; ``missing`` holds all their paths."""

    def __init__(self, missing: list[Path], total: int) -> None:
        self.missing = missing
        shown = "\n  ".join(str(p) for p in missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        super().__init__(f"{len(missing)} of {total} annotated images are missing, first:\n  {shown}{more}")


class BadImageError(UserError, RuntimeError):
    """An image file that cannot be used: missing, unreadable, not an image, or truncated (a JPEG
    without its end-of-image marker, a PNG without its IEND chunk)."""


# ---------------------------------------------------------------------------------------- layout
def missing_layout_message(root: Path, missing: str) -> str:
    """One line for a WIDER FACE folder without (part of) its layout: what is missing under ``root``,
    what belongs there and which settings say where it is."""
    return (f"dataset.root={root}: {missing}; WIDER FACE ({WIDERFACE_URL}) in its official layout belongs there: "
            f"{WIDERFACE_LAYOUT}; set paths.data_dir or DETLAB_DATA (the folder holding widerface/), or dataset.root")


def annotation_file(root: Path, split: str) -> Path:
    return Path(root) / "wider_face_split" / f"wider_face_{split}_bbx_gt.txt"


def filelist_file(root: Path, split: str = "test") -> Path:
    return Path(root) / "wider_face_split" / f"wider_face_{split}_filelist.txt"


def images_dir(root: Path, split: str) -> Path:
    return Path(root) / f"WIDER_{split}" / "images"


# ---------------------------------------------------------------------------------------- text
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = {b"\xff\xfe": "FF FE (UTF-16 little-endian)", b"\xfe\xff": "FE FF (UTF-16 big-endian)"}
_RESAVE = "expected UTF-8 text (re-save the file as UTF-8)"


def _line_and_column(text: str) -> tuple[int, int]:
    """1-based line and column of the position just after ``text`` (the text before a bad byte),
    counting lines as ``str.splitlines`` does, so they agree with the parser's line numbers."""
    last = (text + "x").splitlines()
    return len(last), len(last[-1])


def read_text_lines(path: os.PathLike | str, what: str = "annotation file") -> list[str]:
    """The lines of a UTF-8 text file, or a ``UserError`` naming the file (and line) that says why not.

    A UTF-8 byte-order mark is dropped (see the module docstring). A missing file raises
    ``MissingAnnotationError`` (a ``FileNotFoundError``); a folder or unreadable file, a UTF-16 file,
    a NUL byte or bytes that are not UTF-8 raise ``AnnotationError``: ``read_text`` would raise a bare
    ``UnicodeDecodeError`` that names neither the file nor the line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingAnnotationError(path, what) from None
    except IsADirectoryError:
        raise AnnotationError(path, 0, f"is a folder; expected the {what} (a text file)") from None
    except OSError as error:
        raise AnnotationError(path, 0, f"cannot read the {what} ({error.strerror or error}); "
                                       f"expected a readable text file") from None
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    for bom, name in UTF16_BOMS.items():  # FF FE also starts a UTF-32 LE file
        if data.startswith(bom):
            raise AnnotationError(path, 1, f"starts with the byte-order mark {name}: the {what} is UTF-16 "
                                           f"or UTF-32 text; {_RESAVE}")
    nul = data.find(b"\x00")
    try:
        # A NUL byte never sits inside a valid UTF-8 sequence: decoding up to it finds any earlier bad byte.
        text = data[: nul if nul >= 0 else len(data)].decode("utf-8")
    except UnicodeDecodeError as error:
        line, column = _line_and_column(data[: error.start].decode("utf-8"))
        raise AnnotationError(path, line, f"byte 0x{data[error.start]:02X} (column {column}) is not valid "
                                          f"UTF-8 (a Latin-1 / Windows-1252 file?); {_RESAVE}") from None
    if nul >= 0:
        line, column = _line_and_column(text)
        guess = "UTF-16 or UTF-32 text without a byte-order mark" if nul < 4 else "binary data"
        raise AnnotationError(path, line, f"NUL byte (column {column}): {guess}?; {_RESAVE}")
    return text.splitlines()


# ---------------------------------------------------------------------------------------- parser
def _parse_face_line(text: str, path: Path, lineno: int, image: str, count_line: int, index: int,
                     count: int) -> list[int]:
    tokens = text.split()
    try:
        values = [int(t) for t in tokens]
    except ValueError:
        values = None
    if values is not None and len(values) == len(FACE_FIELDS):
        return values
    where = f"face {index + 1} of {count} for image {image!r}"
    if len(tokens) == 1 and values is None:
        # The "face line" is the next image's path: the count promised more faces than follow.
        raise AnnotationError(path, lineno, f"expected {where}, found an image path {tokens[0]!r}: the face "
                                            f"count {count} on line {count_line} is larger than the {index} "
                                            f"face line(s) that follow")
    if len(tokens) != len(FACE_FIELDS):
        kind = "too few" if len(tokens) < len(FACE_FIELDS) else "too many"
        raise AnnotationError(path, lineno, f"{kind} fields for {where}: expected {len(FACE_FIELDS)} integers "
                                            f"'{' '.join(FACE_FIELDS)}', got {len(tokens)}: {text.strip()!r}")
    for name, token in zip(FACE_FIELDS, tokens):
        try:
            int(token)
        except ValueError:
            raise AnnotationError(path, lineno, f"non-integer field {name}={token!r} for {where}: "
                                                f"expected an integer") from None
    raise AssertionError("unreachable")


def _is_number_line(text: str) -> bool:
    tokens = text.split()
    return bool(tokens) and all(t.lstrip("-").isdigit() for t in tokens)


def _filter_faces(faces: np.ndarray, drop_invalid: bool, min_face_size: float) -> np.ndarray:
    """faces: [N, 10] raw ints. Keep positive-size boxes, then the optional filters."""
    w, h = faces[:, 2], faces[:, 3]
    keep = (w > 0) & (h > 0)
    if drop_invalid:
        keep &= faces[:, 4 + INVALID] == 0
    if min_face_size > 0:
        keep &= np.maximum(w, h) >= min_face_size
    return faces[keep]


def _to_record(image: str, faces: np.ndarray) -> ImageRecord:
    x, y, w, h = (faces[:, i].astype(np.float32) for i in range(4))
    boxes = np.stack([x, y, x + w, y + h], axis=1) if len(faces) else np.zeros((0, 4), np.float32)
    return ImageRecord(path=image, boxes=boxes.astype(np.float32), attributes=faces[:, 4:].astype(np.int64))


def parse_wider_annotations(
    path: os.PathLike | str,
    *,
    drop_invalid: bool = False,
    min_face_size: float = 0.0,
    keep_empty: bool = True,
) -> list[ImageRecord]:
    """Read a ``wider_face_*_bbx_gt.txt`` file into records (original-pixel ``xyxy`` boxes).

    Boxes with ``w <= 0`` or ``h <= 0`` are always dropped (the official files hold such lines, the
    count-0 placeholders among them). ``drop_invalid`` also drops faces flagged ``invalid``;
    ``min_face_size`` drops faces whose larger side is below it (pixels). An image left without faces
    is kept as a negative image when ``keep_empty`` (it never gets a dummy box), else left out.
    Raises ``AnnotationError`` naming the line on malformed input, on text that is not UTF-8 and on
    a file without images; ``MissingAnnotationError`` (a ``FileNotFoundError``) when it is absent.
    """
    path = Path(path)
    lines = read_text_lines(path, "annotation file")
    if not any(line.strip() for line in lines):
        raise AnnotationError(path, 0, "no images in the annotation file (it is empty or holds only blank "
                                       "lines); expected per image a path line '<event>/<name>.jpg', a "
                                       "face-count line, then one 'x1 y1 w h blur expression illumination "
                                       "invalid occlusion pose' line per face")
    records: list[ImageRecord] = []
    n = len(lines)
    i = 0
    while True:
        while i < n and not lines[i].strip():  # blank lines between images / at the end
            i += 1
        if i >= n:
            break
        path_lineno = i + 1
        image = lines[i].strip()
        if len(image.split()) != 1 or _is_number_line(image):
            hint = ""
            if _is_number_line(image) and records:
                hint = (f" (a face line? the face count of the previous image {records[-1].path!r} may be "
                        f"smaller than the face lines that follow it)")
            raise AnnotationError(path, path_lineno, f"expected an image path like "
                                                     f"'<event>/<name>.jpg', got {image!r}{hint}")
        i += 1
        if i >= n:
            raise AnnotationError(path, path_lineno, f"truncated file: it ends after the image path {image!r}; "
                                                     f"expected a face-count line")
        count_lineno = i + 1
        count_text = lines[i].strip()
        try:
            count = int(count_text)
        except ValueError:
            count = -1
        if count < 0:
            raise AnnotationError(path, count_lineno, f"bad face count {count_text!r} for image {image!r} "
                                                      f"(line {path_lineno}): expected a non-negative integer")
        i += 1
        rows = []
        if count == 0:
            # The official files follow a count of 0 with one all-zero placeholder line: consume it.
            if i < n and _is_number_line(lines[i]):
                if len(lines[i].split()) != len(FACE_FIELDS):
                    raise AnnotationError(path, i + 1, f"expected the placeholder line '0 0 0 0 0 0 0 0 0 0' "
                                                       f"after face count 0 of image {image!r}, got "
                                                       f"{lines[i].strip()!r}")
                i += 1
        for k in range(count):
            if i >= n:
                raise AnnotationError(path, n, f"truncated file: image {image!r} (line {path_lineno}) declares "
                                               f"{count} faces on line {count_lineno}, but the file ends after "
                                               f"{k} face line(s)")
            rows.append(_parse_face_line(lines[i], path, i + 1, image, count_lineno, k, count))
            i += 1
        faces = np.asarray(rows, dtype=np.int64).reshape(-1, len(FACE_FIELDS))
        faces = _filter_faces(faces, drop_invalid, min_face_size)
        if len(faces) == 0 and not keep_empty:
            continue
        records.append(_to_record(image, faces))
    return records


def parse_wider_filelist(path: os.PathLike | str) -> list[str]:
    """Read ``wider_face_test_filelist.txt``: one relative image path a line (no boxes).

    Errors as ``parse_wider_annotations``: ``AnnotationError`` (file and line) for a bad line, text
    that is not UTF-8 or a list without images; ``MissingAnnotationError`` when it is absent.
    """
    path = Path(path)
    lines = read_text_lines(path, "file list")
    out = []
    for lineno, text in enumerate(lines, start=1):
        name = text.strip()
        if not name:
            continue
        if len(name.split()) != 1 or _is_number_line(name):
            raise AnnotationError(path, lineno, f"expected one image path like '<event>/<name>.jpg', got {name!r}")
        out.append(name)
    if not out:
        raise AnnotationError(path, 0, "no images in the file list (it is empty or holds only blank lines); "
                                       "expected one image path like '<event>/<name>.jpg' a line")
    return out


# ---------------------------------------------------------------------------------------- images
def find_missing_images(records: Sequence[ImageRecord], images_dir: Path) -> list[Path]:
    """Paths of records whose image file is absent (one directory walk, not one stat per image)."""
    images_dir = Path(images_dir)
    present: set[str] = set()
    if images_dir.is_dir():
        for folder, _, files in os.walk(images_dir):
            rel = os.path.relpath(folder, images_dir)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            present.update(prefix + f for f in files)
    return [images_dir / r.path for r in records if r.path not in present]


def check_images_exist(records: Sequence[ImageRecord], images_dir: Path) -> None:
    """Raise ``MissingImagesError`` (how many, the first few paths) if any listed image is absent."""
    missing = find_missing_images(records, images_dir)
    if missing:
        raise MissingImagesError(missing, len(records))


JPEG_SOI = b"\xff\xd8\xff"  # start-of-image marker, then the first segment's marker
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"\x00\x00\x00\x00IEND"  # the IEND chunk: length 0, type; its 4-byte CRC follows


def _jpeg_scan_start(data: bytes) -> int:
    """Offset of the first start-of-scan marker (FF DA), found by walking the marker segments after
    SOI by their lengths (a few segments: microseconds). ``len(data)`` when the file ends before one
    (a truncated header); -1 when the walk meets bytes that are no marker (left to the decoder)."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return -1
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
        elif marker == 0xDA:
            return i
        elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length field
            i += 2
        elif marker == 0xD9:  # end of image before any scan
            return -1
        else:
            length = (data[i + 2] << 8) | data[i + 3]
            if length < 2:
                return -1
            i += 2 + length
    return n


def truncation_reason(data: bytes) -> Optional[str]:
    """Why ``data`` (a whole image file) is cut short, or None. Only JPEG and PNG are checked.

    OpenCV decodes a JPEG whose data stops early without an error: it fills the rest with grey and
    returns the image. So a JPEG must hold an end-of-image marker (FF D9) after its first scan
    starts; anything after that marker (padding, an appended second picture) is tolerated, and an
    FF D9 of an embedded EXIF thumbnail does not count, being before the scan. Entropy-coded data
    cannot hold FF D9 (an FF data byte is stuffed with 00), so a cut scan never passes. A PNG must
    hold its IEND chunk (libpng mostly refuses a cut PNG itself; this also catches a cut right
    before IEND). Other formats are left to OpenCV.
    """
    if data.startswith(JPEG_SOI):
        scan = _jpeg_scan_start(data)
        if data.rfind(JPEG_EOI, max(scan, 0)) < 0:
            where = "before the image data starts" if scan == len(data) else "inside the image data"
            return (f"truncated JPEG: the file ({len(data)} bytes) ends {where}, without the end-of-image "
                    f"marker FF D9 (an interrupted download or copy); expected a complete JPEG file")
    elif data.startswith(PNG_SIGNATURE):
        end = data.rfind(PNG_IEND)
        if end < 0 or end + len(PNG_IEND) + 4 > len(data):
            return (f"truncated PNG: the file ({len(data)} bytes) has no complete IEND chunk (an interrupted "
                    f"download or copy); expected a complete PNG file")
    return None


def read_image_rgb(path: Path) -> np.ndarray:
    """Decode with OpenCV (faster than PIL) into ``[H, W, 3]`` uint8 RGB; ``BadImageError`` naming the
    file when it is missing, unreadable, not an image, or a truncated JPEG/PNG (``truncation_reason``).

    The file is read once into memory, checked, and decoded from there with ``cv2.imdecode`` (which,
    like ``cv2.imread``, applies the EXIF orientation). Measured on 200 WIDER val JPEGs (2 CPU
    threads, warm page cache, passes interleaved): ``cv2.imread`` 3.72 ms/image, this 3.68 ms/image;
    reading the bytes plus the check alone 0.03 ms/image.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadImageError(f"unreadable image {path}: file not found") from None
    except OSError as error:
        raise BadImageError(f"unreadable image {path}: cannot be read ({error.strerror or error})") from None
    if not data:
        raise BadImageError(f"unreadable image {path}: empty file (0 bytes); expected a JPEG or PNG image")
    reason = truncation_reason(data)
    if reason is not None:
        raise BadImageError(f"unreadable image {path}: {reason}")
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise BadImageError(f"unreadable image {path}: cannot be decoded (corrupt or not an image)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def boxes_outside_image(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[N]`` bool: the ``xyxy`` boxes that do not overlap the image ``[0, width] x [0, height]``
    (a box touching an edge from outside has no overlap). Such a box would be clipped to zero size
    by the transforms: no anchor can ever match it."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    return (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (boxes[:, 0] >= width) | (boxes[:, 1] >= height)


# ------------------------------------------------------------------------------------ box checks
# What box_problems names, in its order of precedence (a box has at most one of them).
BOX_PROBLEMS = ("not_finite", "normalised", "flipped", "zero_size", "outside_image", "past_edge")
EXIF_ORIENTATION = 0x0112
PAST_EDGE_PIXELS = 1.0  # a box may reach this far past its image's edge (rounding) before it counts


def image_size(path: os.PathLike | str) -> Optional[tuple[int, int]]:
    """``(width, height)`` of an image file as ``read_image_rgb`` decodes it (EXIF rotations by 90
    degrees swap the two), from its header alone (Pillow reads no pixels); None when the header cannot
    be read (the decoder then reports the file when the image is loaded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    return int(width), int(height)


def box_problems(boxes: np.ndarray, image_sizes: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """What is wrong with each ``xyxy`` pixel box, vectorised: ``{problem: [N] bool}`` for the problems
    of ``BOX_PROBLEMS``; a box has at most one (the first that applies):

    - ``not_finite``: a coordinate is NaN or infinite;
    - ``normalised``: every coordinate in ``[0, 1]`` with a positive size: a fraction of the image,
      not pixels;
    - ``flipped``: ``x2 < x1`` or ``y2 < y1``;
    - ``zero_size``: ``x2 == x1`` or ``y2 == y1``;
    - with ``image_sizes`` (``[N, 2]`` width, height of each box's image): ``outside_image``, no overlap
      with the image (``boxes_outside_image``), and ``past_edge``, reaching more than
      ``PAST_EDGE_PIXELS`` past an edge.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = b.T
    w, h = x2 - x1, y2 - y1
    with np.errstate(invalid="ignore"):
        not_finite = ~np.isfinite(b).all(axis=1)
        ok = ~not_finite
        normalised = ok & (b >= 0).all(axis=1) & (b <= 1).all(axis=1) & (w > 0) & (h > 0)
        ok &= ~normalised
        flipped = ok & ((w < 0) | (h < 0))
        ok &= ~flipped
        zero_size = ok & ((w == 0) | (h == 0))
        ok &= ~zero_size
        out = {"not_finite": not_finite, "normalised": normalised, "flipped": flipped, "zero_size": zero_size}
        if image_sizes is not None:
            sizes = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 2)
            width, height = sizes[:, 0], sizes[:, 1]
            outside = ok & ((x2 <= 0) | (y2 <= 0) | (x1 >= width) | (y1 >= height))
            edge = PAST_EDGE_PIXELS
            past = ok & ~outside & ((x1 < -edge) | (y1 < -edge) | (x2 > width + edge) | (y2 > height + edge))
            out.update(outside_image=outside, past_edge=past)
    return out


XYWH, XYXY_READ_AS_XYWH = "xywh", "xyxy_read_as_xywh"
# The share of the boxes whose shape a format guess needs (see box_format_guess).
FORMAT_GUESS_SHARE = 0.9


def box_format_guess(boxes: np.ndarray, problems: dict[str, np.ndarray],
                     image_sizes: Optional[np.ndarray] = None) -> Optional[str]:
    """Whether the ``xyxy`` boxes look like another format, from their shapes as a whole:

    - ``XYWH``: ``x y w h`` where ``x1 y1 x2 y2`` is expected. Faces are smaller than their distance to
      the image's top-left corner, so most such boxes are flipped in *both* axes (``w < x`` and
      ``h < y``); a flip in one axis is a swapped coordinate instead. With the image sizes, read as
      ``x y w h`` nearly all of the flipped boxes must fit their image (boxes whose corners were
      swapped do not).
    - ``XYXY_READ_AS_XYWH``: an annotation file in ``x1 y1 x2 y2`` read as WIDER's ``x1 y1 w h``: every
      box is then at least as wide as its ``x1`` and as tall as its ``y1`` (in WIDER FACE's val
      annotations 0.8% are).

    None when neither holds (or there are too few boxes to say).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    flipped = problems["flipped"]
    both = flipped & (b[:, 2] < b[:, 0]) & (b[:, 3] < b[:, 1])
    usable = ~(problems["not_finite"] | problems["normalised"])
    if flipped.sum() >= 5 and both.sum() >= 0.5 * flipped.sum() and flipped.sum() >= 0.3 * max(usable.sum(), 1):
        if image_sizes is None:
            return XYWH
        sizes = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 2)[flipped]
        fb = b[flipped]
        fits = (fb[:, 0] + fb[:, 2] <= sizes[:, 0] + PAST_EDGE_PIXELS) & (fb[:, 1] + fb[:, 3] <= sizes[:, 1] + PAST_EDGE_PIXELS)
        if fits.mean() >= FORMAT_GUESS_SHARE:
            return XYWH
    valid = usable & ~flipped & ~problems["zero_size"]
    if valid.sum() >= 20:
        v = b[valid]
        wide = (v[:, 2] - v[:, 0] >= v[:, 0]) & (v[:, 3] - v[:, 1] >= v[:, 1])
        if wide.mean() >= FORMAT_GUESS_SHARE:
            return XYXY_READ_AS_XYWH
    return None


def face_line(path: os.PathLike | str, image: str, box: Sequence[float]) -> Optional[int]:
    """The 1-based line of ``image``'s face whose ``xyxy`` box is ``box`` in the annotation file
    ``path`` (the image's path line when no face line matches); None when the file does not list the
    image. Reads the file once: for the evidence of a finding, not per box."""
    try:
        lines = read_text_lines(path)
    except UserError:
        return None
    target = np.asarray(box, dtype=np.float64)
    for i, text in enumerate(lines):
        if text.strip() != image:
            continue
        try:
            count = int(lines[i + 1].strip())
        except (IndexError, ValueError):
            return i + 1
        for k in range(count):
            fields = lines[i + 2 + k].split()[:4] if i + 2 + k < len(lines) else []
            try:
                x, y, w, h = (float(v) for v in fields)
            except ValueError:
                continue
            if np.allclose([x, y, x + w, y + h], target, atol=0.5):
                return i + 3 + k
        return i + 1
    return None


# ---------------------------------------------------------------------------------------- dataset
Transform = Callable[[tv_tensors.Image, dict], tuple]


class WiderFaceDataset(Dataset):
    """Images and boxes of ``records``; each item is ``(image [3, H, W] float32, target dict)``.

    With ``on_bad_image="skip"`` an undecodable or truncated image yields ``None``
    (``collate_detection`` drops it); ``num_skipped`` counts the distinct images skipped, across
    DataLoader workers too.

    Boxes lying wholly outside their image (``boxes_outside_image``; only the decoded file tells its
    size) are dropped before the transform, with a warning naming the image the first time;
    ``num_boxes_outside`` / ``num_images_with_boxes_outside`` count them (across workers too). Boxes
    partly outside are clipped by the transforms.

    ``annotations``: the annotation file the records were parsed from, when there is one (the
    pre-flight checks name its lines).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        images_dir: Path,
        transform: Transform,
        input_size: tuple[int, int],
        on_bad_image: str = "error",
        cache: Optional[DecodedImageCache] = None,
        annotations: Optional[Path] = None,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.records = list(records)
        self.images_dir = Path(images_dir)
        self.transform = transform
        self.input_size = tuple(input_size)  # (W, H)
        self.on_bad_image = on_bad_image
        self.cache = cache if cache is not None else DecodedImageCache("none", None, None, read_image_rgb)
        self.annotations = None if annotations is None else Path(annotations)  # the file the records came from
        # Shared memory, so skips counted inside DataLoader workers are visible to the caller.
        self._skipped = torch.zeros(len(self.records), dtype=torch.bool).share_memory_()
        # Per image, the number of its boxes found wholly outside it (-1: not decoded yet), shared likewise.
        self._outside = torch.full((len(self.records),), -1, dtype=torch.int32).share_memory_()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_skipped(self) -> int:
        return int(self._skipped.sum())

    def image_sizes(self, indices: Sequence[int]) -> np.ndarray:
        """``[len(indices), 2]`` float: the width and height of those records' image files, from their
        headers (``image_size``); NaN where a header cannot be read."""
        sizes = [image_size(self.images_dir / self.records[int(i)].path) for i in indices]
        return np.asarray([s if s is not None else (np.nan, np.nan) for s in sizes], dtype=np.float64).reshape(-1, 2)

    @property
    def num_boxes_outside(self) -> int:
        """Boxes dropped so far for lying wholly outside their image (images decoded so far)."""
        return int(self._outside.clamp(min=0).sum())

    @property
    def num_images_with_boxes_outside(self) -> int:
        return int((self._outside > 0).sum())

    def _drop_boxes_outside(self, index: int, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
        """``boxes`` without those wholly outside the ``height x width`` image; counted, warned once per image."""
        outside = boxes_outside_image(boxes, height, width)
        count = int(outside.sum())
        if int(self._outside[index]) < 0:
            self._outside[index] = count
            if count:
                log.warning("%s: dropped %d of %d box(es) lying wholly outside the %dx%d image, e.g. xyxy %s "
                            "(%d box(es) in %d image(s) dropped so far); expected boxes inside the image: "
                            "check the annotations", self.images_dir / self.records[index].path, count,
                            len(boxes), width, height, boxes[outside][0].tolist(), self.num_boxes_outside,
                            self.num_images_with_boxes_outside)
        return boxes[~outside] if count else boxes

    def __getitem__(self, index: int) -> Optional[tuple[torch.Tensor, dict]]:
        record = self.records[index]
        try:
            rgb, (height, width) = self.cache.get(self.images_dir / record.path)
        except BadImageError as error:
            if self.on_bad_image == "error":
                raise BadImageError(f"{error} (dataset.on_bad_image=skip skips such images)") from None
            if not bool(self._skipped[index]):
                self._skipped[index] = True
                log.warning("skipping %s (%d image(s) skipped so far)", error, self.num_skipped)
            return None
        kept = self._drop_boxes_outside(index, record.boxes, height, width)  # in the file's own pixels
        record_boxes = torch.from_numpy(kept)
        if rgb.shape[:2] != (height, width):  # a downscaled cache entry: boxes follow the pixels
            factors = torch.tensor([rgb.shape[1] / width, rgb.shape[0] / height] * 2, dtype=torch.float32)
            record_boxes = record_boxes * factors
        # [H, W, 3] -> [3, H, W] view (channels-last memory, which the uint8 resize kernel prefers).
        image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1))
        boxes = tv_tensors.BoundingBoxes(record_boxes, format="XYXY", canvas_size=tuple(rgb.shape[:2]))
        labels = torch.ones(len(kept), dtype=torch.int64)
        image, target = self.transform(image, {"boxes": boxes, "labels": labels})
        in_w, in_h = self.input_size
        # orig_size and scale refer to the file's own pixels, whatever size the cache holds.
        return image.as_subclass(torch.Tensor), {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4),  # [N, 4] input xyxy
            "labels": target["labels"],  # [N] int64
            "image_id": index,
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "scale": torch.tensor([width / in_w, height / in_h], dtype=torch.float32),
        }
