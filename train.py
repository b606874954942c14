"""Train an SSD detector: ``python train.py [group=option ...] [key=value ...]`` (Hydra), the same as
``detlab train [group=option ...] [key=value ...]``.

Examples:
    python train.py                                   # default: ssd_slim on the embedded synthetic set
    python train.py loss.box_weight=0.05              # one of the paper's loss-weight pairs
    python train.py -m +experiment=box_weight_sweep   # the nine-run sweep
    python train.py -m +experiment=weight_search      # Optuna searches box weight and negative ratio
    python train.py resume=outputs/2026-11-23/20-00-00  # continue an interrupted or killed run
    torchrun --nproc_per_node=2 train.py              # DistributedDataParallel over 2 processes
    detlab train loss.box_weight=0.05                 # the installed command, same arguments

The command is ``detlab.cli.train.main``.
"""

import sys

from detlab.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
