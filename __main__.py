"""``python -m smoothce`` and the ``smoothce`` console script; see smoothce.compiler.cli."""

import sys

from smoothce.compiler.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
