"""``python -m mlcil``: the ``mlcil`` command, for when the console script is not on the PATH."""

from __future__ import annotations

import sys

from mlcil.cli import main

if __name__ == "__main__":
    sys.exit(main())
