"""The embedded default dataset: procedurally drawn faces, written in the official WIDER FACE layout.

``ensure_synthetic_dataset(root, cfg)`` generates it on first use into ``root/<key>/`` (the key
names every generation parameter) and re-uses it afterwards; the result is read by the same parser
and dataset as the real data. Generation is deterministic: image ``i`` is drawn from
``numpy.random.default_rng([seed, i])`` with OpenCV and written as JPEG at a fixed quality, so the
same seed gives byte-identical files.

What is drawn, to resemble WIDER FACE: cluttered backgrounds (gradients, low-frequency colour
noise, shapes, stripe/checker textures, sensor noise), face-like distractors (hard negatives:
skin-toned ellipses and blobs without facial features, balls, hands), and faces (skin-toned head
ellipse, hair, eyes, brows, nose, mouth, a body below) whose sizes follow a WIDER-like distribution
(most under 32 px, some large), with pose (yaw, roll), expression, illumination, occlusion and blur
varied and written into the attribute fields.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from detlab.config import SyntheticConfig
from detlab.data.wider import annotation_file, images_dir

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when the drawing changes: it is part of the cache key
JPEG_QUALITY = 90

# name, share of images, face-count range, face-width range (px at a 256-px short side).
# Version 2 starts face widths at 10 px (the smallest anchor of ssd_slim at 320x256; a face is about
# 1.25x taller than wide): version 1 drew widths from 5 px, and 39% of its val faces were under 16 px,
# where a model trained for the default run's 500 steps found none (small-face AP 0.04, recall 0 at
# epoch 7, against 0.38 recall on medium faces; see docs/training.md, "The default run: a healthy reference").
EVENTS = (
    ("0--Crowd", 0.30, (8, 20), (10.0, 28.0)),
    ("1--Group", 0.30, (3, 8), (14.0, 56.0)),
    ("2--Portrait", 0.15, (1, 2), (48.0, 150.0)),
    ("3--Street", 0.20, (0, 5), (10.0, 44.0)),
    ("4--Background", 0.05, (0, 0), (8.0, 8.0)),
)
SKIN_RGB = np.array([(255, 224, 189), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36),
                     (94, 58, 36)], dtype=np.float64)
HAIR_RGB = np.array([(20, 16, 14), (60, 40, 25), (110, 75, 40), (200, 170, 110), (150, 150, 150),
                     (120, 40, 20)], dtype=np.float64)


@dataclass
class Face:
    box: tuple[int, int, int, int]  # x1, y1, w, h (annotation)
    attributes: tuple[int, int, int, int, int, int]  # blur, expression, illumination, invalid, occlusion, pose


def synthetic_key(cfg: SyntheticConfig) -> str:
    return (f"n{cfg.num_images}_{cfg.image_width}x{cfg.image_height}_seed{cfg.seed}"
            f"_val{cfg.val_fraction:g}_v{GENERATOR_VERSION}")


# ---------------------------------------------------------------------------------------- drawing
def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _skin(rng: np.random.Generator) -> tuple[int, int, int]:
    base = SKIN_RGB[rng.integers(len(SKIN_RGB))] + rng.normal(0, 10, 3)
    return tuple(int(c) for c in np.clip(base, 0, 255))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c1 + (c2 - c1) * t[..., None]  # [H, W, 3]
    coarse = rng.normal(0, rng.uniform(10, 40), (max(height // 32, 2), max(width // 32, 2), 3))
    img += cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(2, 5))):  # textured patches
        x1, y1 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x2, y2 = int(rng.integers(x1 + 8, width + 1)), int(rng.integers(y1 + 8, height + 1))
        period = rng.uniform(3, 16)
        py, px = np.mgrid[y1:y2, x1:x2].astype(np.float32)
        if rng.random() < 0.5:
            pattern = (np.sin((px * math.cos(angle) + py * math.sin(angle)) * 2 * math.pi / period) > 0)
        else:
            pattern = ((px // period + py // period) % 2) > 0
        patch = img[y1:y2, x1:x2]
        patch[pattern] = (0.5 * patch[pattern] + 0.5 * np.array(_colour(rng))).astype(np.uint8)
    for _ in range(int(rng.integers(5, 25))):  # shapes
        colour, kind = _colour(rng), int(rng.integers(4))
        p = rng.integers(0, (width, height), size=(3, 2))
        thick = -1 if rng.random() < 0.6 else int(rng.integers(1, 4))
        if kind == 0:
            cv2.rectangle(img, tuple(map(int, p[0])), tuple(map(int, p[1])), colour, thick)
        elif kind == 1:
            cv2.circle(img, tuple(map(int, p[0])), int(rng.integers(3, max(4, width // 6))), colour, thick)
        elif kind == 2:
            cv2.line(img, tuple(map(int, p[0])), tuple(map(int, p[1])), colour, int(rng.integers(1, 5)),
                     cv2.LINE_AA)
        else:
            cv2.fillPoly(img, [p.astype(np.int32)], colour, cv2.LINE_AA)
    return img


def _distractor(rng: np.random.Generator, img: np.ndarray, size: float) -> None:
    """A face-like hard negative: no eyes/mouth pattern."""
    height, width = img.shape[:2]
    cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
    a = max(int(size / 2), 2)
    b = max(int(a * rng.uniform(0.8, 1.5)), 2)
    kind = int(rng.integers(4))
    if kind == 0:  # bare skin-toned ellipse (a head seen from behind without hair, an arm, a knee)
        cv2.ellipse(img, (cx, cy), (a, b), float(rng.uniform(0, 180)), 0, 360, _skin(rng), -1, cv2.LINE_AA)
    elif kind == 1:  # ball with highlight
        cv2.circle(img, (cx, cy), a, _colour(rng), -1, cv2.LINE_AA)
        cv2.circle(img, (cx - a // 3, cy - a // 3), max(a // 4, 1), (245, 245, 245), -1, cv2.LINE_AA)
    elif kind == 2:  # hand: skin blob with finger strokes
        skin = _skin(rng)
        cv2.ellipse(img, (cx, cy), (a, int(a * 0.8)), 0, 0, 360, skin, -1, cv2.LINE_AA)
        for k in range(4):
            x = cx - a + int((k + 0.5) * a / 2)
            cv2.line(img, (x, cy), (x, cy - int(a * 1.4)), skin, max(a // 4, 1), cv2.LINE_AA)
    else:  # head from behind: hair ellipse over a skin ellipse, no features
        cv2.ellipse(img, (cx, cy), (a, b), 0, 0, 360, _skin(rng), -1, cv2.LINE_AA)
        hair = tuple(int(c) for c in HAIR_RGB[rng.integers(len(HAIR_RGB))])
        cv2.ellipse(img, (cx, cy - b // 4), (a, int(b * 0.85)), 0, 0, 360, hair, -1, cv2.LINE_AA)


def _pt(cx: float, cy: float, a: float, b: float, cos: float, sin: float, u: float, v: float) -> tuple[int, int]:
    """Face-local (u, v) in [-1, 1] (v down) to image pixels, rolled by the face angle. Shift 4 (1/16 px)."""
    x, y = u * a, v * b
    return int(round((cx + x * cos - y * sin) * 16)), int(round((cy + x * sin + y * cos) * 16))


def _draw_face(rng: np.random.Generator, img: np.ndarray, cx: float, cy: float, a: float, b: float,
               roll: float, yaw: float, expression: int) -> None:
    """Hair, head, eyes, brows, nose, mouth; (cx, cy) centre, (a, b) half-axes, roll in degrees."""
    cos, sin = math.cos(math.radians(roll)), math.sin(math.radians(roll))
    skin = _skin(rng)
    dark = tuple(int(c * 0.55) for c in skin)
    aa, sh = cv2.LINE_AA, 4

    def ell(u, v, ax, ay, colour, thick=-1, start=0, end=360):
        centre = _pt(cx, cy, a, b, cos, sin, u, v)
        axes = (max(int(ax * a * 16), 8), max(int(ay * b * 16), 8))
        cv2.ellipse(img, centre, axes, roll, start, end, colour, thick, aa, sh)

    style = int(rng.integers(4))
    hair = tuple(int(c) for c in HAIR_RGB[rng.integers(len(HAIR_RGB))])
    if style > 0:  # hair behind the head
        ell(0, -0.2, 1.12, 0.95, hair)
    ell(0, 0, 1.0, 1.0, skin)  # head
    if style in (1, 2):  # fringe over the forehead
        ell(0, -0.35, 1.0, 0.65, hair, start=180, end=360)
    shift = yaw * 0.45  # features slide sideways when the head turns
    line = max(int(a * 0.12), 1)
    for side in (-1, 1):
        u = shift + side * 0.4 * (1 - 0.3 * abs(yaw))
        visible = 1.0 - max(0.0, side * yaw)  # the eye turning away shrinks (and vanishes at profile)
        if visible < 0.25:
            continue
        ell(u, -0.12, 0.2 * visible, 0.11, (245, 245, 245))
        ell(u, -0.12, 0.1 * visible, 0.1, (25, 20, 20))
        brow_y = -0.42 if expression else -0.32
        p1 = _pt(cx, cy, a, b, cos, sin, u - 0.2 * visible, brow_y)
        p2 = _pt(cx, cy, a, b, cos, sin, u + 0.2 * visible, brow_y - 0.05)
        cv2.line(img, p1, p2, dark, line, aa, sh)
    cv2.line(img, _pt(cx, cy, a, b, cos, sin, shift * 1.2, -0.02),
             _pt(cx, cy, a, b, cos, sin, shift * 1.3 + 0.08, 0.25), dark, line, aa, sh)  # nose
    if expression:  # open mouth
        ell(shift, 0.52, 0.28, 0.2, (90, 20, 30))
    else:  # closed smile
        ell(shift, 0.38, 0.3, 0.16, (150, 50, 60), thick=max(line, 1), start=20, end=160)


def _place(rng: np.random.Generator, boxes: list[np.ndarray], w: float, h: float, width: int,
           height: int) -> tuple[float, float] | None:
    """A face centre whose box is inside the image and clear of the other faces (30 tries)."""
    for _ in range(30):
        cx, cy = rng.uniform(w / 2 + 1, width - w / 2 - 1), rng.uniform(h / 2 + 1, height - h / 2 - 1)
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        if all(box[2] + 2 < o[0] or o[2] + 2 < box[0] or box[3] + 2 < o[1] or o[3] + 2 < box[1] for o in boxes):
            boxes.append(box)
            return cx, cy
    return None


def _face_attributes(rng: np.random.Generator) -> dict[str, float | int]:
    yaw = float(np.clip(rng.normal(0, 0.4), -0.9, 0.9))
    roll = float(np.clip(rng.normal(0, 12), -40, 40))
    return dict(
        yaw=yaw, roll=roll,
        pose=int(abs(yaw) > 0.6 or abs(roll) > 25),
        expression=int(rng.random() < 0.15),
        blur=int(rng.choice(3, p=[0.55, 0.3, 0.15])),
        illumination=int(rng.random() < 0.1),
        occlusion=int(rng.choice(3, p=[0.7, 0.2, 0.1])),
    )


def _occlude(rng: np.random.Generator, img: np.ndarray, box: np.ndarray, level: int) -> None:
    """Cover a side of the face box: 15-35 % (partial) or 40-65 % (heavy), like a hand, hat or scarf."""
    x1, y1, x2, y2 = box
    share = rng.uniform(0.15, 0.35) if level == 1 else rng.uniform(0.4, 0.65)
    side = int(rng.integers(4))
    w, h = x2 - x1, y2 - y1
    if side == 0:
        rect = (x1 - 2, y2 - share * h, x2 + 2, y2 + 2)  # scarf / mask
    elif side == 1:
        rect = (x1 - 2, y1 - 2, x2 + 2, y1 + share * h)  # hat
    elif side == 2:
        rect = (x1 - 2, y1 - 2, x1 + share * w, y2 + 2)  # object on the left
    else:
        rect = (x2 - share * w, y1 - 2, x2 + 2, y2 + 2)
    p1, p2 = (int(rect[0]), int(rect[1])), (int(math.ceil(rect[2])), int(math.ceil(rect[3])))
    cv2.rectangle(img, p1, p2, _colour(rng), -1)


def _roi(box: np.ndarray, margin: float, width: int, height: int) -> tuple[slice, slice]:
    x1, y1, x2, y2 = box
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    xs = slice(max(int(x1 - mx), 0), min(int(math.ceil(x2 + mx)), width))
    ys = slice(max(int(y1 - my), 0), min(int(math.ceil(y2 + my)), height))
    return ys, xs


def draw_image(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, str, list[Face]]:
    """One scene: ``(RGB uint8 [H, W, 3], event name, faces)``."""
    shares = np.array([e[1] for e in EVENTS])
    event, _, (n_lo, n_hi), (s_lo, s_hi) = EVENTS[int(rng.choice(len(EVENTS), p=shares / shares.sum()))]
    scale = min(width, height) / 256.0
    img = _background(rng, height, width)
    n_distractors = int(rng.integers(1, 5)) + (4 if event in ("3--Street", "4--Background") else 0)
    for _ in range(n_distractors):
        _distractor(rng, img, math.exp(rng.uniform(math.log(6), math.log(60))) * scale)

    placed: list[np.ndarray] = []
    faces: list[tuple[np.ndarray, dict]] = []
    for _ in range(int(rng.integers(n_lo, n_hi + 1))):
        a_w = math.exp(rng.uniform(math.log(s_lo), math.log(s_hi))) * scale
        a_w = min(a_w, 0.6 * min(width, height))
        a_h = a_w * rng.uniform(1.15, 1.35)
        attrs = _face_attributes(rng)
        # Axis-aligned box of the rolled ellipse (the annotation) and the space it needs.
        c, s = math.cos(math.radians(attrs["roll"])), math.sin(math.radians(attrs["roll"]))
        bw = 2 * math.sqrt((a_w / 2 * c) ** 2 + (a_h / 2 * s) ** 2)
        bh = 2 * math.sqrt((a_w / 2 * s) ** 2 + (a_h / 2 * c) ** 2)
        centre = _place(rng, placed, bw, bh, width, height)
        if centre is None:
            continue
        faces.append((np.array([centre[0] - bw / 2, centre[1] - bh / 2, centre[0] + bw / 2, centre[1] + bh / 2]),
                      dict(attrs, a=a_w / 2, b=a_h / 2, cx=centre[0], cy=centre[1])))

    for box, f in faces:  # bodies first, so no body covers another face
        bw = box[2] - box[0]
        if bw >= 12:  # shoulders: the upper half of a disc starting just above the chin
            cv2.ellipse(img, (int(f["cx"]), int(box[3] + 1.1 * bw)), (int(1.3 * bw), int(1.3 * bw)), 0, 180, 360,
                        _colour(rng), -1, cv2.LINE_AA)
    out: list[Face] = []
    for box, f in faces:
        _draw_face(rng, img, f["cx"], f["cy"], f["a"], f["b"], f["roll"], f["yaw"], f["expression"])
        if f["occlusion"]:
            _occlude(rng, img, box, f["occlusion"])
        if f["illumination"]:  # extreme light: a soft dark or burnt-out spot over the face
            ys, xs = _roi(box, 0.5, width, height)
            gain = rng.uniform(0.2, 0.4) if rng.random() < 0.5 else rng.uniform(1.7, 2.3)
            gy, gx = np.mgrid[ys, xs].astype(np.float32)
            spot = np.exp(-(((gx - f["cx"]) / (box[2] - box[0])) ** 2 + ((gy - f["cy"]) / (box[3] - box[1])) ** 2))
            patch = img[ys, xs].astype(np.float32) * (1 + (gain - 1) * spot[..., None])
            img[ys, xs] = np.clip(patch, 0, 255).astype(np.uint8)
        if f["blur"]:
            side = box[2] - box[0]
            sigma = max(0.6, 0.05 * side) if f["blur"] == 1 else max(1.2, 0.12 * side)
            ys, xs = _roi(box, 0.4, width, height)
            img[ys, xs] = cv2.GaussianBlur(img[ys, xs], (0, 0), sigma)
        x1, y1 = int(math.floor(box[0])), int(math.floor(box[1]))
        x2, y2 = min(int(math.ceil(box[2])), width), min(int(math.ceil(box[3])), height)
        invalid = int((f["occlusion"] == 2 and f["blur"] == 2) or rng.random() < 0.01)
        out.append(Face((x1, y1, max(x2 - x1, 1), max(y2 - y1, 1)),
                        (f["blur"], f["expression"], f["illumination"], invalid, f["occlusion"], f["pose"])))

    noise = rng.normal(0, rng.uniform(1, 6), img.shape).astype(np.float32)
    img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return img, event, out


# ---------------------------------------------------------------------------------------- writing
def _annotation_lines(name: str, faces: list[Face]) -> list[str]:
    lines = [name, str(len(faces))]
    if not faces:
        lines.append("0 0 0 0 0 0 0 0 0 0")  # the official placeholder after a count of 0
    lines += [" ".join(str(v) for v in (*f.box, *f.attributes)) + " " for f in faces]
    return lines


def generate_synthetic_dataset(out_dir: Path, cfg: SyntheticConfig) -> None:
    """Write ``cfg.num_images`` images and both annotation files into ``out_dir`` (official layout)."""
    out_dir = Path(out_dir)
    n_val = min(max(int(round(cfg.num_images * cfg.val_fraction)), 1), cfg.num_images - 1)
    n_train = cfg.num_images - n_val
    annotations: dict[str, list[str]] = {"train": [], "val": []}
    made: set[Path] = set()
    for i in range(cfg.num_images):
        split = "train" if i < n_train else "val"
        rng = np.random.default_rng([cfg.seed, i])
        rgb, event, faces = draw_image(rng, cfg.image_width, cfg.image_height)
        event_id, event_name = event.split("--")
        name = f"{event}/{event_id}_{event_name}_synthetic_{i}.jpg"
        target = images_dir(out_dir, split) / name
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {target}")
        target.write_bytes(data.tobytes())
        annotations[split] += _annotation_lines(name, faces)
    for split, lines in annotations.items():
        path = annotation_file(out_dir, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _complete(folder: Path) -> bool:
    return annotation_file(folder, "train").is_file() and annotation_file(folder, "val").is_file()


def ensure_synthetic_dataset(root: os.PathLike | str, cfg: SyntheticConfig) -> Path:
    """The dataset folder ``root/<key>`` (official layout), generated first if absent.

    Generated into a temporary folder beside it and moved into place with ``os.replace``, so an
    interrupted generation leaves no half dataset, and of two processes generating at once one wins.
    """
    root = Path(root)
    target = root / synthetic_key(cfg)
    if _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        start = time.perf_counter()
        generate_synthetic_dataset(tmp, cfg)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _complete(target):  # a half folder put there by hand, or another failure
                raise
            log.info("synthetic dataset %s was generated concurrently; using that copy", target)
        else:
            log.info("generated synthetic dataset %s (%d images) in %.1f s", target, cfg.num_images,
                     time.perf_counter() - start)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
