"""``scripts/supervised.py --resume`` needs a run to resume, as ``train.py --resume`` does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location(
    "supervised_script", ROOT / "scripts" / "supervised.py"
)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

SMALL = ["--examples", "40", "--bin-size", "20", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("existing", [False, True])
def test_resume_without_a_run_is_refused(tmp_path, capsys, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    with pytest.raises(SystemExit) as info:
        script.main(["slowly-changing-regression", *SMALL, "--out", str(out), "--resume"])
    stdout, err = capsys.readouterr()
    lines = err.splitlines()
    assert info.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: --out") and "holds no run to resume" in lines[0]
    assert "drop --resume" in lines[0] and stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])
    assert not existing or list(out.iterdir()) == []
