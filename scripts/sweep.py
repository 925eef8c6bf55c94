"""Sweeps over seeds and hyperparameters: the command is :mod:`ppo_cbp.commands.sweep` (``ppo-cbp-sweep`` once the package is installed);
this file keeps ``python scripts/sweep.py`` working from a checkout."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppo_cbp.commands.sweep import __doc__, main  # noqa: E402, F401  (--help shows the command's docstring)

if __name__ == "__main__":
    sys.exit(main())
