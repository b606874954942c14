"""Ending a run when a signal asks for it: a SLURM preemption or time limit, ``kill``, Ctrl-C.

The Lightning / torchvision way: a signal handler only notes the signal (``InterruptSignals``); the
training loop looks at the note after each step (a Python attribute, no host sync), writes its
checkpoint and record, and raises ``Interrupted``; the entry point (``exit_on_interrupt``) prints one
line on stderr and exits with ``128 + signal number``: 130 for SIGINT, 143 for SIGTERM, the shell's
convention for a process ended by that signal.

Signals caught while the loop runs:

- ``SIGINT`` (Ctrl-C): always. A second Ctrl-C raises ``KeyboardInterrupt`` at once (no checkpoint).
- ``SIGTERM`` (``kill``, ``scancel``, SLURM's preemption, torchrun passing its own on): always, except
  in a submitit job, where submitit keeps it: submitit ignores SIGTERM on purpose, because SLURM
  sends it first on a preemption and then submitit's own signal, on which it requeues.
- submitit's preemption / time-limit signal (``SIGUSR2``, or ``SUBMITIT_PREEMPT_SIGNAL``) in a
  submitit job (``SUBMITIT_EXECUTOR`` set) that installed a handler for it: once the run is
  recorded, ``exit_on_interrupt`` hands the signal on to that handler, which requeues the job
  (``scontrol requeue``; the local executor restarts it) and exits.

The handler that was installed before ours for the signal that arrived is kept on the
``Interrupted`` (``previous_handler``): the exit hands it the signal when it is a Python function
(submitit's), then exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, Iterator, Optional

Handler = Callable[[int, Optional[FrameType]], Any]

SUBMITIT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's own variable (its default: USR2)


def exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def submitit_signal() -> Optional[int]:
    """The signal submitit requeues on, inside a submitit job; None elsewhere."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + os.environ.get(SUBMITIT_SIGNAL_ENV, "USR2").upper().removeprefix("SIG"), None)


class Interrupted(KeyboardInterrupt):
    """A run ended by a signal after writing its checkpoint and record. A ``KeyboardInterrupt``, so
    ``except Exception`` (a sweep's "a failing run is a result") lets it through, as it does Ctrl-C."""

    def __init__(self, signum: int, message: str, previous_handler: Any = None) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.message = message
        self.previous_handler = previous_handler

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)

    def hand_on(self) -> None:
        """Give the signal to the handler that was installed before ours, when it is a Python function
        (submitit's: requeue the job and exit); Python's own Ctrl-C handler and SIG_DFL/SIG_IGN are not."""
        handler = self.previous_handler
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.signum, None)


class InterruptSignals:
    """While inside ``with``: SIGINT and SIGTERM (in a submitit job: SIGINT and submitit's requeue signal)
    only note that they came (``requested``, ``signum``); the previous handlers come back on exit.

    Installed only in the main thread (Python delivers signals there); elsewhere it notes nothing.
    ``extra`` signals are caught as well (tests, a cluster's own warning signal).
    """

    def __init__(self, extra: tuple[int, ...] = ()) -> None:
        requeue = submitit_signal()
        if requeue is None:
            wanted = [signal.SIGINT, signal.SIGTERM, *extra]
        else:  # a submitit job: SIGTERM stays submitit's; its requeue signal is taken when it handles one
            wanted = [signal.SIGINT, *extra] + ([requeue] if callable(signal.getsignal(requeue)) else [])
        self.signals = tuple(dict.fromkeys(int(s) for s in wanted))
        self.signum: Optional[int] = None
        self.previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _note(self, signum: int, frame: Optional[FrameType]) -> None:
        # Nothing here but assignments: a handler runs between two bytecodes of the loop, where I/O
        # or locks (logging) could deadlock.
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.signum is None:
            self.signum = signum

    def interrupted(self, message: str) -> Interrupted:
        assert self.signum is not None
        return Interrupted(self.signum, message, self.previous.get(self.signum))

    def __enter__(self) -> "InterruptSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self.previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def exit_on_interrupt() -> Iterator[None]:
    """An entry point's body: an ``Interrupted`` run ends the process with its message as one line on
    stderr and exit code ``128 + signal`` (after handing the signal on, see ``Interrupted.hand_on``)."""
    try:
        yield
    except Interrupted as stop:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            print(stop.message, file=sys.stderr, flush=True)
        stop.hand_on()  # submitit's requeue exits here
        raise SystemExit(stop.exit_code) from None
