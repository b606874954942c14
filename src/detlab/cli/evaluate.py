"""``detlab evaluate checkpoint=PATH [dataset=...] [split=val] [protocol=wider] [eval.KEY=...]``: score a
checkpoint (a Hydra app on ``configs/evaluate.yaml``; ``python evaluate.py ...`` runs the same).

Prints a human table and, as its last line, one JSON object (miou, mean_tp_iou, tp, fp, fn, precision,
recall, f1, ap50, the per-size-bucket values ``small/...``, and ``wider: {easy, medium, hard}`` with
``protocol=wider``); the same JSON is written to ``<output_dir>/metrics.json``. ``save_predictions=DIR``
writes the official WIDER FACE submission layout.

Settings are the checkpoint's own (its per-epoch validation gives the same numbers); ``eval.*`` keys
on the command line (the training config's ``eval`` group) override them. The work is done by
``detlab.evaluation``; this module only wires Hydra to it and prints.

Examples:
    detlab evaluate checkpoint=outputs/2026-11-23/20-00-00/checkpoints/best.pt
    detlab evaluate checkpoint=PATH dataset=widerface split=val protocol=wider save_predictions=preds
    detlab evaluate checkpoint=PATH eval.input_size=original eval.score_floor=0.02 eval.nms_iou=0.3
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detlab.cli._hydra import run_hydra_app
from detlab.config import register_configs
from detlab.errors import report_user_errors
from detlab.evaluation import eval_keys_of, evaluate_checkpoint, format_table, to_evaluate_config

register_configs()


def task(raw: DictConfig) -> None:
    """The Hydra task: evaluate, write ``metrics.json``, print the table and the JSON line."""
    from detlab.runtime.fileio import json_default, write_json

    # A user error (bad argument, checkpoint, dataset) is one line on stderr and exit code 2;
    # DETLAB_DEBUG=1 or HYDRA_FULL_ERROR=1 shows the traceback.
    with report_user_errors():
        run = to_evaluate_config(raw)
        output_dir = Path(run.output_dir or HydraConfig.get().runtime.output_dir)
        result = evaluate_checkpoint(run, eval_keys_of(HydraConfig.get().overrides.task))
    write_json(output_dir / "metrics.json", result)
    print(format_table(result))
    print(json.dumps(result, default=json_default), flush=True)


def main(argv: list[str] | None = None) -> int:
    """``detlab evaluate [overrides ...]`` (``argv``: the arguments after ``evaluate``; default: this
    process's). Returns the exit status (2 for a user error)."""
    return run_hydra_app(task, "evaluate", argv)
