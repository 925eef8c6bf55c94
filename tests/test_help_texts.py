"""What the user reads: the autograd learner announced, the closing summary's standard error,
the README's flags that take a value and why tests are skipped."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location(
    "supervised_script", ROOT / "scripts" / "supervised.py"
)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

SMALL = ["--examples", "40", "--bin-size", "20", "--device", "cpu", "--no-progress"]


def run(tmp_path, capsys, method: str, seeds=("0",)) -> list[str]:
    out = tmp_path / method
    argv = ["slowly-changing-regression", *SMALL, "--method", method, "--out", str(out)]
    script.main([*argv, "--seeds", *seeds])
    return capsys.readouterr().out.splitlines()


def test_the_autograd_learner_is_announced_once(tmp_path, capsys):
    lines = run(tmp_path, capsys, "injection+weight_clipping")
    notes = [line for line in lines if "autograd learner" in line]
    start = "note: injection+weight_clipping runs on the autograd learner"
    assert len(notes) == 1 and notes[0].startswith(start)
    assert "slower" in notes[0] and "only with adam, l2, snp)" in notes[0]
    for fused in ("cbp", "injection"):
        assert not [line for line in run(tmp_path, capsys, fused) if "autograd learner" in line]


def test_closing_summary_says_what_the_plus_minus_is(tmp_path, capsys):
    lines = run(tmp_path, capsys, "bp", seeds=("0", "1"))
    (mean,) = [line for line in lines if "mean over 2 seed(s)" in line]
    assert re.search(r" \+- \S+ \(standard error over seeds\)$", mean), mean


def test_readme_says_which_flags_take_a_value_and_why_tests_skip():
    readme = (ROOT / "README.md").read_text()
    for flag in ("--l2-init 1e-2", "--parseval 1e-3", "--weight-clipping 3", "--head-reset 1"):
        assert f"`{flag}`" in readme, flag
    assert "a flag shown with a value takes one" in readme
    assert "CUDA variants" in readme and "without a GPU" in readme
