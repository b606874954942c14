"""WIDER FACE in its official layout: annotation parser, file lists, image check, image dataset.

Layout (``root`` is the folder holding these)::

    WIDER_{train,val,test}/images/<event>/<name>.jpg
    wider_face_split/wider_face_{train,val}_bbx_gt.txt
    wider_face_split/wider_face_test_filelist.txt

Each image in a ``*_bbx_gt.txt`` file is its relative path line, a face-count line, then one line
per face ``x1 y1 w h blur expression illumination invalid occlusion pose``. An image with count 0
is followed by one placeholder line ``0 0 0 0 0 0 0 0 0 0``.
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

log = logging.getLogger(__name__)

def default_widerface_root() -> Path:
    """Where the real WIDER FACE folder is looked for by scripts and tests: ``$DETLAB_WIDERFACE``,
    else ``../shared/widerface`` beside the repository (it may not exist)."""
    env = os.environ.get("DETLAB_WIDERFACE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "widerface"


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


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file, the line and what was expected."""

    def __init__(self, path: os.PathLike | str, line: int, message: str) -> None:
        self.path = str(path)
        self.line = line
        super().__init__(f"{path}, line {line}: {message}")


class MissingImagesError(FileNotFoundError):
    """Images listed by the annotations are absent; ``missing`` holds all their paths."""

    def __init__(self, missing: list[Path], total: int) -> None:
        self.missing = missing
        shown = "\n  ".join(str(p) for p in missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        super().__init__(f"{len(missing)} of {total} annotated images are missing, first:\n  {shown}{more}")


class BadImageError(RuntimeError):
    """An image file that OpenCV cannot decode (corrupt, truncated header, not an image)."""


# ---------------------------------------------------------------------------------------- layout
def annotation_file(root: Path, split: str) -> Path:
    return Path(root) / "wider_face_split" / f"wider_face_{split}_bbx_gt.txt"


def filelist_file(root: Path, split: str = "test") -> Path:
    return Path(root) / "wider_face_split" / f"wider_face_{split}_filelist.txt"


def images_dir(root: Path, split: str) -> Path:
    return Path(root) / f"WIDER_{split}" / "images"


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
    Raises ``AnnotationError`` naming the line on malformed input.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
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
    """Read ``wider_face_test_filelist.txt``: one relative image path a line (no boxes)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"file list not found: {path}") from None
    out = []
    for lineno, text in enumerate(lines, start=1):
        name = text.strip()
        if not name:
            continue
        if len(name.split()) != 1 or _is_number_line(name):
            raise AnnotationError(path, lineno, f"expected one image path like '<event>/<name>.jpg', got {name!r}")
        out.append(name)
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


def read_image_rgb(path: Path) -> np.ndarray:
    """Decode with OpenCV (faster than PIL) into ``[H, W, 3]`` uint8 RGB."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        reason = "file not found" if not Path(path).exists() else "cannot be decoded (corrupt or not an image)"
        raise BadImageError(f"unreadable image {path}: {reason}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ---------------------------------------------------------------------------------------- dataset
Transform = Callable[[tv_tensors.Image, dict], tuple]


class WiderFaceDataset(Dataset):
    """Images and boxes of ``records``; each item is ``(image [3, H, W] float32, target dict)``.

    With ``on_bad_image="skip"`` an undecodable image yields ``None`` (``collate_detection`` drops
    it); ``num_skipped`` counts the distinct images skipped, across DataLoader workers too.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        images_dir: Path,
        transform: Transform,
        input_size: tuple[int, int],
        on_bad_image: str = "error",
        cache: Optional[DecodedImageCache] = None,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.records = list(records)
        self.images_dir = Path(images_dir)
        self.transform = transform
        self.input_size = tuple(input_size)  # (W, H)
        self.on_bad_image = on_bad_image
        self.cache = cache if cache is not None else DecodedImageCache("none", None, None, read_image_rgb)
        # Shared memory, so skips counted inside DataLoader workers are visible to the caller.
        self._skipped = torch.zeros(len(self.records), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_skipped(self) -> int:
        return int(self._skipped.sum())

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
        record_boxes = torch.from_numpy(record.boxes)
        if rgb.shape[:2] != (height, width):  # a downscaled cache entry: boxes follow the pixels
            factors = torch.tensor([rgb.shape[1] / width, rgb.shape[0] / height] * 2, dtype=torch.float32)
            record_boxes = record_boxes * factors
        # [H, W, 3] -> [3, H, W] view (channels-last memory, which the uint8 resize kernel prefers).
        image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1))
        boxes = tv_tensors.BoundingBoxes(record_boxes, format="XYXY", canvas_size=tuple(rgb.shape[:2]))
        labels = torch.ones(len(record.boxes), dtype=torch.int64)
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
