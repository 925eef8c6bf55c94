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


def rows(out: Path) -> str:
    return (out / "seed_0" / "metrics.csv").read_text()


def test_resume_takes_the_flags_not_given_from_the_run_and_extends_it(tmp_path, capsys):
    """Only --out, --resume and the longer --examples are given again; the method, its settings
    and the network come from the run, and the extended run equals one run at that length."""
    settings = ["--method", "cbp", "--replacement-rate", "0.05", "--maturity-threshold", "5"]
    settings += ["--hidden", "7", "--bin-size", "20", "--dtype", "float64", "--device", "cpu"]
    full, part = tmp_path / "full", tmp_path / "part"
    scr = "slowly-changing-regression"
    script.main([scr, *settings, "--examples", "80", "--out", str(full), "--no-progress"])
    script.main([scr, *settings, "--examples", "40", "--out", str(part), "--no-progress"])
    capsys.readouterr()
    # finished: the refusal says how to extend it
    with pytest.raises(SystemExit) as info:
        script.main([scr, "--out", str(part), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "extend it with a larger --examples" in err, err
    script.main([scr, "--out", str(part), "--resume", "--examples", "80", "--no-progress"])
    assert rows(part) == rows(full)
    # a given flag still has to match the run
    with pytest.raises(SystemExit) as info:
        script.main([scr, "--out", str(part), "--resume", "--examples", "120", "--hidden", "5"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "hidden (checkpoint 7, now 5)" in err, err


def test_a_run_from_before_a_method_setting_was_added_resumes(tmp_path, capsys):
    """A checkpoint whose method settings lack ones added since (here Kron's, written before
    Kron existed) resumes when the added settings hold their defaults, and the extended run
    equals one run at that length; a setting given away from its default is still refused."""
    import json

    import torch

    settings = ["--method", "adam", "--hidden", "6", "--bin-size", "20", "--dtype", "float64"]
    settings += ["--device", "cpu", "--no-progress"]
    full, part = tmp_path / "full", tmp_path / "part"
    scr = "slowly-changing-regression"
    script.main([scr, *settings, "--examples", "80", "--out", str(full)])
    script.main([scr, *settings, "--examples", "40", "--out", str(part)])
    state = torch.load(part / "checkpoint.pt", weights_only=False)
    config = json.loads(state["config"])
    for key in ("method", "resolved_method"):
        for name in ("kron_b1", "kron_precond_lr", "kron_max_size_triangular"):
            del config[key][name]
    state["config"] = json.dumps(config)
    torch.save(state, part / "checkpoint.pt")
    capsys.readouterr()
    script.main([scr, "--out", str(part), "--resume", "--examples", "80", "--no-progress"])
    assert rows(part) == rows(full)
    with pytest.raises(SystemExit) as info:
        script.main([scr, "--out", str(part), "--resume", "--examples", "100", "--lr", "0.5"])
    assert info.value.code == 2 and "lr (checkpoint" in capsys.readouterr().err
