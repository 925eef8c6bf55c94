"""Supervised continual-learning benchmarks: the command is :mod:`ppo_cbp.commands.supervised` (``ppo-cbp-supervised`` once the package is installed);
this file keeps ``python scripts/supervised.py`` working from a checkout."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppo_cbp.commands.supervised import (  # noqa: E402, F401  (--help shows its docstring)
    __doc__,
    main,
    parse,
)

if __name__ == "__main__":
    main()
