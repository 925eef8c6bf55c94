"""ppo_cbp: PPO with continual backprop and other plasticity methods, and the supervised
benchmarks of loss of plasticity. The commands: ``ppo_cbp/train.py`` (``ppo-cbp-train``) and
:mod:`ppo_cbp.commands` (``ppo-cbp-supervised``, ``ppo-cbp-plot``, ``ppo-cbp-sweep``).

Trained networks load from Python without importing the trainer, gymnasium or the
benchmarks until they are asked for (the names below are resolved lazily):

* :func:`load_policy` / :func:`load_value`: a ``train.py`` run's policy and value function
  (:mod:`ppo_cbp.ppo.load`);
* :func:`load_learner`: one seed's network of a ``scripts/supervised.py`` run
  (:mod:`ppo_cbp.benchmarks.load`).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["__version__", "load_learner", "load_policy", "load_value"]

_LAZY = {
    "load_policy": "ppo_cbp.ppo.load",
    "load_value": "ppo_cbp.ppo.load",
    "load_learner": "ppo_cbp.benchmarks.load",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ppo_cbp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def _version() -> str:
    """The installed distribution's version, else (a checkout on ``sys.path``) pyproject's."""
    from importlib import metadata

    try:
        return metadata.version("ppo_cbp")
    except metadata.PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
        except OSError:
            found = None
        return found[1] if found else "0+unknown"


__version__ = _version()
