"""Figures and tables of runs: the command is :mod:`ppo_cbp.commands.plot` (``ppo-cbp-plot`` once the package is installed);
this file keeps ``python scripts/plot.py`` working from a checkout."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppo_cbp.commands.plot import __doc__, main  # noqa: E402, F401  (--help shows the command's docstring)

if __name__ == "__main__":
    sys.exit(main())
