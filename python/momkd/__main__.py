"""``python -m momkd``: the command line, also the entry point for ``torchrun``::

torchrun --standalone --nproc_per_node 2 -m momkd train --config run.yaml --out RUN
"""

from __future__ import annotations

import sys

from momkd.cli import main

if __name__ == "__main__":
    sys.exit(main())
