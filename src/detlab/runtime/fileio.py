"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from detlab.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: run directories are not locked
    fcntl = None  # type: ignore[assignment]


_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: os.PathLike | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``.<name>.<random>.tmp<suffix>``) for a writer that wants a
    file name (``suffix``: an extension the writer needs, e.g. ``.mp4``); on success it replaces ``path``.

    On any error (or KeyboardInterrupt) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; the finished file gets open()'s usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_binary_writer(path: os.PathLike | str, fsync: bool = True) -> Iterator[BinaryIO]:
    """Yield a handle on a temporary file beside ``path``; on success it replaces ``path`` (os.replace).

    On any error (or KeyboardInterrupt) the temporary file is removed and ``path`` is left as it was.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        yield handle
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + ``os.replace``)."""
    with atomic_binary_writer(path) as handle:
        handle.write(data)


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_jpeg(path: os.PathLike | str, rgb: Any, quality: int = 90) -> None:
    """An RGB uint8 ``[H, W, 3]`` array as a JPEG file, atomically."""
    import cv2

    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"{path}: the image could not be encoded as JPEG")
    atomic_write_bytes(path, encoded.tobytes())


def write_json(path: os.PathLike | str, obj: Any) -> None:
    """Indented JSON, atomically; tensors, numpy values and paths become plain JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(value: Any) -> Any:
    """``json.dumps`` ``default``: tensors, numpy values and paths as plain JSON."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_csv(path: os.PathLike | str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rewrite the whole CSV (header + rows) atomically; missing values stay empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    atomic_write_text(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


class LockedError(UserError):
    """Another process holds the lock (a run directory being trained into)."""


@contextmanager
def exclusive_lock(path: os.PathLike | str, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``path`` (created, holding our pid) while inside.

    A second process fails at once with ``LockedError`` naming ``what`` and the holder's pid; the
    kernel drops the lock when the holder exits, even on kill -9, so a stale lock file is harmless.
    Where ``fcntl`` is missing (Windows) no lock is taken.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise LockedError(f"{what} is in use by another process (pid {holder}; lock {path}): wait for it "
                              f"to finish, or use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def remove_stale_temporaries(folder: os.PathLike | str) -> list[Path]:
    """Delete the temporary files ``atomic_path`` leaves when its process is killed mid-write
    (``.<name>.<random>.tmp``) in ``folder``; only call it while holding the folder's lock."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
    return removed
