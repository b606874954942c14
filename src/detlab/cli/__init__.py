"""The ``detlab`` command: ``detlab <subcommand> [arguments ...]``, one module per subcommand.

    detlab train loss.box_weight=0.05                  # Hydra overrides, -m, --help, --cfg job as before
    detlab evaluate checkpoint=PATH protocol=wider
    detlab predict checkpoint=PATH source=photo.jpg out=preds
    detlab export checkpoint=PATH
    detlab report multirun/2024-05-01/12-00-00
    detlab diagnose ...

Each subcommand is ``detlab.cli.<name>.main(argv) -> int`` (``argv``: the arguments after the
subcommand), imported only when it is run; the top-level scripts (``train.py``, ``evaluate.py``,
``predict.py``, ``scripts/export.py``, ``scripts/sweep_report.py``) call the same functions. This
package is the top layer: it imports the engine, and nothing in ``detlab`` imports it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from detlab.errors import EXIT_USER_ERROR

# name -> (module, one line of help). The modules are imported on use: ``detlab --help`` imports no torch.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("detlab.cli.train", "train a detector: Hydra overrides (loss.box_weight=0.05), -m for a sweep, resume=RUN"),
    "evaluate": ("detlab.cli.evaluate", "score a checkpoint: checkpoint=PATH [split=val] [protocol=wider]"),
    "predict": ("detlab.cli.predict", "run a checkpoint on images, a folder or a video: checkpoint=PATH source=PATH"),
    "export": ("detlab.cli.export", "export a checkpoint to ONNX or TorchScript: checkpoint=PATH [format=onnx]"),
    "report": ("detlab.cli.report", "write a sweep's report (report.md, .csv, .png): SWEEP_DIR [--out DIR]"),
    "diagnose": ("detlab.cli.diagnose", "diagnose a run: its failure patterns, with evidence and remedies"),
}


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: detlab <command> [arguments ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "'detlab <command> --help' shows a command's options (for the Hydra commands: the config "
                  "groups and keys)."]
    return "\n".join(lines)


def subcommand(name: str) -> Callable[[list[str] | None], int] | None:
    """``detlab.cli.<name>.main``, or None when this installation has no such module."""
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:  # the subcommand is there, something it imports is not
            raise
        return None
    return module.main


def main(argv: list[str] | None = None) -> int:
    """``detlab <command> [arguments ...]`` (``argv``: default this process's arguments); returns the
    exit status: the subcommand's, or 2 for a missing or unknown subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return EXIT_USER_ERROR
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help", "help"):
        print(usage())
        return 0
    if name == "--version":
        from detlab import __version__

        print(f"detlab {__version__}")
        return 0
    if name not in SUBCOMMANDS:
        print(f"error: unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)} (detlab --help)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    command = subcommand(name)
    if command is None:
        print(f"error: 'detlab {name}' is not available in this installation (no module {SUBCOMMANDS[name][0]})",
              file=sys.stderr)
        return EXIT_USER_ERROR
    return command(rest)
