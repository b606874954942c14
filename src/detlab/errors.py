"""The errors a user can cause and fix (bad config, annotation, image, checkpoint, run folder), and how
the entry points report them: one line on stderr and exit code 2, not a traceback.

Every such error class derives from ``UserError``. ``report_user_errors()`` wraps an entry point's
body; set ``DETLAB_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) to get the traceback instead.
Anything else (a bug) still ends in a traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from typing import Iterator

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Base of the errors whose message tells the user what to fix (file, line, key, expected value)."""


class ConfigError(UserError, ValueError):
    """A config value is out of range; the message names the key."""


def debug_requested() -> bool:
    """``DETLAB_DEBUG=1`` or ``HYDRA_FULL_ERROR=1``: show tracebacks of user errors too."""
    return any(os.environ.get(name, "") not in ("", "0") for name in ("DETLAB_DEBUG", "HYDRA_FULL_ERROR"))


def one_line(error: BaseException) -> str:
    """``error: <message>`` with the message's lines joined, so it stays one line."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return f"error: {text or type(error).__name__}"


# File-system errors about a path the user gave (a run folder without write permission, a full disk):
# also one line, with the path.
_PATH_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError)


def _is_path_error(error: BaseException) -> bool:
    if isinstance(error, _PATH_ERRORS) and getattr(error, "filename", None):
        return True
    return isinstance(error, OSError) and error.errno == errno.ENOSPC


@contextmanager
def report_user_errors() -> Iterator[None]:
    """A ``UserError`` (or an OS error about a named path, or a full disk) raised inside ends the
    process: its message as one line on stderr, exit 2."""
    try:
        yield
    except (UserError, OSError) as error:
        if debug_requested() or not (isinstance(error, UserError) or _is_path_error(error)):
            raise
        print(one_line(error), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
