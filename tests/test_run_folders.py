"""A run's folder: created exclusively, named inside its parent, never someone else's folder,
and a resumed run's configuration conflicts named setting by setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ppo_cbp import run_folder
from ppo_cbp.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "ppo_cbp" / "train.py"
SUPERVISED = ROOT / "scripts" / "supervised.py"


def one_error_line(argv: list[str], cwd: Path, script: Path = TRAIN) -> str:
    """Run ``script argv``; assert exit code 2, one ``error:`` line and no stdout; the line."""
    proc = subprocess.run(
        [sys.executable, str(script), *argv], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert proc.stdout == ""
    return lines[0]


# ------------------------------------------------------------------------------------------------
# defect: the settings-mismatch error held two whole settings dicts, twice


def test_conflicts_name_only_the_settings_that_differ():
    method = {"name": "cbp", "replacement_rate": 1e-4, "decay_rate": 0.99, "maturity": 100}
    changed = {**method, "replacement_rate": 1e-3}
    resolved = {"cbp": dict(method), "l2": 0.0}
    conflicts = [
        ("method", method, changed),
        ("resolved_method", resolved, {**resolved, "cbp": changed, "extra": 1}),
        ("lr", 0.01, 0.5),
    ]
    with pytest.raises(UsageError) as info:
        run_folder.check_settings(Path("out/checkpoint.pt"), conflicts)
    message = str(info.value)
    assert message == (
        "out/checkpoint.pt was written with a different configuration: "
        "method.replacement_rate (checkpoint 0.0001, now 0.001); "
        "resolved_method.cbp.replacement_rate (checkpoint 0.0001, now 0.001); "
        "resolved_method.extra (checkpoint None, now 1); lr (checkpoint 0.01, now 0.5)"
    )
    run_folder.check_settings(Path("x"), [("method", method, dict(method))])  # equal: no error


def test_supervised_resume_with_another_method_setting_is_short(tmp_path):
    common = ["slowly-changing-regression", "--examples", "40", "--bin-size", "20", "--out", "r"]
    common += ["--device", "cpu", "--no-progress", "--method", "cbp"]
    subprocess.run([sys.executable, str(SUPERVISED), *common], cwd=tmp_path, check=True)
    before = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    line = one_error_line([*common, "--replacement-rate", "0.5", "--resume"], tmp_path, SUPERVISED)
    assert "replacement_rate (checkpoint" in line and "now 0.5" in line
    assert len(line) < 400, line
    assert {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()} == before
