"""Running a Hydra app from a subcommand: the configs found through ``detlab.paths.config_dir()`` (the
checkout's ``configs/``, or the copy inside an installed wheel), the subcommand's arguments handed to
Hydra as its command line, and the exit status returned instead of raised."""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from detlab.errors import EXIT_USER_ERROR, one_line


def exit_status(stop: SystemExit) -> int:
    """The status ``sys.exit(code)`` would end the process with (a message is printed, status 1)."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr, flush=True)
    return 1


def run_hydra_app(task: Callable[[Any], Any], config_name: str, argv: Sequence[str] | None) -> int:
    """Run ``task`` as ``@hydra.main(config_path=<configs>, config_name=config_name)`` would with
    ``argv`` on its command line (default: this process's arguments): overrides, ``-m``, ``--help``,
    ``--cfg job``, ... . Hydra's job name is the task's module name (``train`` for
    ``detlab.cli.train``), as it was the script's name, so log files and run folders keep their names.
    Returns the exit status (Hydra and the tasks end with ``sys.exit``)."""
    import hydra

    from detlab.paths import MissingConfigsError, config_dir

    try:
        config_path = str(config_dir())
    except MissingConfigsError as error:
        print(one_line(error), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    app = hydra.main(config_path=config_path, config_name=config_name, version_base="1.3")(task)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "detlab", *(saved[1:] if argv is None else argv)]
    try:
        app()
    except SystemExit as stop:
        return exit_status(stop)
    finally:
        sys.argv = saved
    return 0
