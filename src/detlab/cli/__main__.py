"""``python -m detlab.cli <command> [arguments ...]``: the ``detlab`` command without its console script."""

import sys

from detlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
