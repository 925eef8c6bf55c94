"""ppo_cbp: continual backprop, ReDo and plasticity metrics for PPO and continual supervised
learning. The commands: ``ppo_cbp/train.py`` (``ppo-cbp-train``) and
:mod:`ppo_cbp.commands` (``ppo-cbp-supervised``, ``ppo-cbp-plot``, ``ppo-cbp-sweep``)."""


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
