"""A run's folder: created exclusively, named inside its parent, never someone else's folder,
and a resumed run's configuration conflicts named setting by setting."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ppo_cbp import run_folder
from ppo_cbp.errors import UsageError
from ppo_cbp.ppo import settings
from ppo_cbp.train import Args

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


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------------
# defect: two runs started in the same second shared one folder


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261207-101500")
    args = Args(runs_dir=str(tmp_path), steps=2048, progress=False)
    dirs = [settings.run_settings(args, set())[3] for _ in range(3)]
    names = [d.name for d in dirs]
    base = names[0]
    assert base.endswith("__s1__20261207-101500")
    assert names == [base, f"{base}-2", f"{base}-3"]
    assert all(d.is_dir() and not any(d.iterdir()) for d in dirs)


def test_claim_is_exclusive_for_default_names_only(tmp_path):
    first = run_folder.claim(tmp_path, "x", unique=True)
    assert run_folder.claim(tmp_path, "x", unique=True) == tmp_path / "x-2"
    assert run_folder.claim(tmp_path, "x", unique=False) == first  # a --run-name: reused
    run_folder.discard_if_empty(first)
    assert not first.exists()


# ------------------------------------------------------------------------------------------------
# defect: --run-name with a path, --resume with another --run-name, a folder that is not a run's


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "."])
def test_run_name_is_one_folder_name(tmp_path, name):
    line = one_error_line(["--run-name", name, "--runs-dir", "runs"], tmp_path)
    assert "--run-name" in line and "path separators" in line
    assert files(tmp_path) == []


def test_resume_refuses_another_run_name(tmp_path):
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    (run / run_folder.CHECKPOINT_NAME).write_bytes(b"not read: refused before")
    before = files(tmp_path)
    line = one_error_line(["--resume", str(run), "--run-name", "other"], tmp_path)
    assert "drop --run-name other" in line and str(run) in line
    assert files(tmp_path) == before
    # its own name is no conflict (the Python callers pass it along)
    with pytest.raises(UsageError, match="not a PyTorch checkpoint"):
        settings.run_settings(Args(resume=str(run), run_name="mine"), None)


def test_a_folder_that_is_not_a_run_folder_is_refused(tmp_path):
    folder = tmp_path / "runs" / "thesis"
    folder.mkdir(parents=True)
    (folder / "chapter1.tex").write_text("precious")
    (folder / "figures").mkdir()
    line = one_error_line(["--runs-dir", "runs", "--run-name", "thesis"], tmp_path)
    assert "not a run folder" in line and "chapter1.tex, figures" in line
    assert files(folder) == ["chapter1.tex", "figures"]


def test_a_partial_run_of_ours_is_started_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "events.out.tfevents.1.host").write_bytes(b"")
    args = Args(runs_dir=str(tmp_path), run_name="run", progress=False)
    assert settings.run_settings(args, {"run_name", "runs_dir"})[3] == folder
    # a sweep's trial folder: its log of attempts is written before the run starts
    trial = tmp_path / "trial"
    trial.mkdir()
    (trial / "trial.log").write_text("=== attempt 1\n")
    args = Args(runs_dir=str(tmp_path), run_name="trial", progress=False)
    assert settings.run_settings(args, {"run_name", "runs_dir"})[3] == trial


def test_supervised_refuses_a_folder_that_is_not_a_run_folder(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("x")
    argv = ["slowly-changing-regression", "--examples", "40", "--bin-size", "20", "--out", "notes"]
    line = one_error_line([*argv, "--device", "cpu"], tmp_path, SUPERVISED)
    assert "--out" in line and "not a run folder" in line and "todo.txt" in line
    assert files(out) == ["todo.txt"]


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
