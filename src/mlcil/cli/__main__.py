"""``python -m mlcil.cli``: the ``mlcil`` command (the launcher runs it under torchrun)."""

from __future__ import annotations

import sys

from mlcil.cli import main

if __name__ == "__main__":
    sys.exit(main())
