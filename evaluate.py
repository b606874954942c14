"""Evaluate a checkpoint, the same as ``detlab evaluate`` (``detlab.cli.evaluate`` says what it prints).

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
