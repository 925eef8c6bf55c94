"""The installed commands, the package's version, and the checkout's scripts that run them."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ppo_cbp

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def test_entry_points_name_functions_that_exist():
    table = PYPROJECT.split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', table, re.M))
    assert set(scripts) == {"ppo-cbp-train", "ppo-cbp-supervised", "ppo-cbp-plot", "ppo-cbp-sweep"}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
        # an installed package has no scripts/ folder: the command lives in the package
        assert module.startswith("ppo_cbp.") and "scripts" not in module


def test_version():
    assert ppo_cbp.__version__ == re.search(r'^version = "(.+)"', PYPROJECT, re.M)[1]


@pytest.mark.parametrize("name", ["supervised", "plot", "sweep"])
def test_checkout_scripts_still_run(name):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


def test_data_is_ignored():
    assert "data/" in (ROOT / ".gitignore").read_text().split()
