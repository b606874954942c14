"""Evaluate a checkpoint: ``python evaluate.py checkpoint=PATH [dataset=...] [split=val] [protocol=wider] [eval.KEY=...]``,
the same as ``detlab evaluate checkpoint=PATH ...``.

Prints a human table and, as its last line, one JSON object (miou, mean_tp_iou, tp, fp, fn, precision,
recall, f1, ap50, the per-size-bucket values ``small/...``, and ``wider: {easy, medium, hard}`` with
``protocol=wider``); the same JSON is written to ``<output_dir>/metrics.json``. ``save_predictions=DIR``
writes the official WIDER FACE submission layout.

Settings are the checkpoint's own (its per-epoch validation gives the same numbers); ``eval.*`` keys
on the command line (the training config's ``eval`` group) override them. The work is done by
``detlab.evaluation``; the command is ``detlab.cli.evaluate.main``.

Examples:
    python evaluate.py checkpoint=outputs/2026-11-23/20-00-00/checkpoints/best.pt
    python evaluate.py checkpoint=PATH dataset=widerface split=val protocol=wider save_predictions=preds
    python evaluate.py checkpoint=PATH eval.input_size=original eval.score_floor=0.02 eval.nms_iou=0.3
    detlab evaluate checkpoint=PATH protocol=wider    # the installed command, same arguments
"""

import sys

from detlab.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
