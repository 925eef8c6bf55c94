"""Runs record which code made them: the package version, the git commit with its dirty flag and
the library versions, in config.json and in every checkpoint; a resume with other code warns in
one line and goes on."""

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import gymnasium
import mujoco
import numpy as np
import pytest
import torch
from test_supervised_cli import KILLER  # stops a supervised run as kill -9 would

from ppo_cbp import provenance, run_folder

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = Path(provenance.__file__).resolve().parents[1]
SUPERVISED = ROOT / "scripts" / "supervised.py"
TRAIN = ROOT / "ppo_cbp" / "train.py"
OTHER = "0123456789abcdef0123456789abcdef01234567"


def git(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        capture_output=True,
        text=True,
    )


def head_of(folder: Path) -> str | None:
    try:
        proc = git(folder, "rev-parse", "HEAD")
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


needs_git_checkout = pytest.mark.skipif(
    head_of(PACKAGE_ROOT) is None, reason="the package is not in a git checkout"
)


# ------------------------------------------------------------------------------------------------
# the record


@needs_git_checkout
def test_record_names_the_checkouts_head_and_dirty_flag():
    r = provenance.record()
    assert r["git_commit"] == head_of(PACKAGE_ROOT)
    assert len(r["git_commit"]) == 40
    status = git(PACKAGE_ROOT, "status", "--porcelain", "--untracked-files=no").stdout
    assert r["git_dirty"] is bool(status.strip())


def test_record_holds_the_versions_of_the_package_python_and_libraries():
    from importlib.metadata import version

    r = provenance.record()
    assert set(r) == {"package_version", "git_commit", "git_dirty", "versions"}
    assert r["package_version"] == version("ppo_cbp")
    assert r["versions"] == {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "gymnasium": gymnasium.__version__,
        "mujoco": mujoco.__version__,
    }


def test_record_is_computed_once_and_each_call_returns_its_own_copy():
    a = provenance.record()
    a["versions"]["torch"] = "changed"
    a["git_commit"] = "changed"
    b = provenance.record()
    assert b["versions"]["torch"] == torch.__version__ and b["git_commit"] != "changed"
    assert provenance._record.cache_info().misses == 1


def test_a_missing_distribution_has_no_version():
    assert provenance.distribution_version("no-such-distribution-ppo-cbp") is None


def test_dirty_flag_flips_when_a_tracked_file_changes(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert provenance.git_state(repo) == (None, None)  # not a checkout
    assert git(repo, "init", "-q").returncode == 0
    assert provenance.git_state(repo) == (None, None)  # no commit yet
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    assert git(repo, "commit", "-q", "-m", "first").returncode == 0
    sha = head_of(repo)
    assert provenance.git_state(repo) == (sha, False)
    (repo / "untracked.py").write_text("y = 2\n")
    assert provenance.git_state(repo) == (sha, False)  # untracked files do not count
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.git_state(repo) == (sha, True)
    git(repo, "commit", "-q", "-am", "second")
    assert provenance.git_state(repo) == (head_of(repo), False) and head_of(repo) != sha
    # a folder inside the checkout is not its top: the package is not that repository's
    (repo / "sub").mkdir()
    assert provenance.git_state(repo / "sub") == (None, None)


# ------------------------------------------------------------------------------------------------
# differences and the warning

CURRENT = {
    "package_version": "0.2.0",
    "git_commit": "3fe6b1176dde88e9e7a422d41830342bfdd20dab",
    "git_dirty": False,
    "versions": {
        "python": "3.11.7",
        "torch": "2.4.0",
        "numpy": "2.0.0",
        "gymnasium": "1.2.0",
        "mujoco": "3.3.7",
    },
}


def changed(**kw):
    versions = dict(CURRENT["versions"], **kw.pop("versions", {}))
    return dict(CURRENT, versions=versions, **kw)


def test_identical_code_has_no_differences_and_no_warning():
    assert provenance.differences(changed(), CURRENT) == []
    assert provenance.resume_warning(changed(), CURRENT) is None


def test_another_commit_is_named_with_both_short_shas():
    saved = changed(git_commit=OTHER)
    assert provenance.differences(saved, CURRENT) == ["commit 0123456789ab -> 3fe6b1176dde"]
    line = provenance.resume_warning(saved, CURRENT)
    assert line.startswith("warning: ") and "\n" not in line
    assert "commit 0123456789ab -> 3fe6b1176dde" in line


def test_versions_and_the_dirty_flag_are_named_in_the_same_line():
    saved = changed(
        package_version="0.1.0",
        git_dirty=True,
        versions={"torch": "2.3.0", "numpy": "1.26.4", "mujoco": None},
    )
    assert provenance.differences(saved, CURRENT) == [
        "package version 0.1.0 -> 0.2.0",
        "checkout with uncommitted changes -> clean",
        "torch 2.3.0 -> 2.4.0",
        "numpy 1.26.4 -> 2.0.0",
        "mujoco not installed -> 3.3.7",
    ]
    line = provenance.resume_warning(saved, CURRENT)
    assert line.startswith("warning: ") and "\n" not in line
    for part in provenance.differences(saved, CURRENT):
        assert part in line


def test_a_checkpoint_without_provenance_is_said_once():
    assert provenance.differences(None, CURRENT) == [provenance.NO_RECORD]
    line = provenance.resume_warning(None, CURRENT)
    assert line.startswith("warning: ") and "\n" not in line
    assert line.count("records no code version") == 1 and "3fe6b1176dde" in line


def test_warn_other_code_prints_one_line_only_when_the_code_differs(capsys):
    run_folder.warn_other_code(None)  # a new run
    run_folder.warn_other_code({"provenance": provenance.record()})
    assert capsys.readouterr() == ("", "")
    run_folder.warn_other_code({"provenance": dict(provenance.record(), git_commit=OTHER)})
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("warning: ")
    assert "0123456789ab" in err


# ------------------------------------------------------------------------------------------------
# config.json and checkpoints


def test_checkpoints_record_the_code_without_changing_the_callers_state(tmp_path):
    state = {"step": 3, "weights": torch.zeros(2)}
    path = tmp_path / run_folder.CHECKPOINT_NAME
    run_folder.save_checkpoint(state, path)
    assert "provenance" not in state
    loaded = run_folder.load_checkpoint(path, "tests", "foreign", "start over")
    assert loaded["provenance"] == provenance.record() and loaded["step"] == 3


def test_config_records_the_code_now_and_a_resumed_run_keeps_what_it_started_with(tmp_path):
    config = {"seed": 1, "out": tmp_path}
    path = tmp_path / "config.json"
    run_folder.write_config(path, config)
    assert config == {"seed": 1, "out": tmp_path}  # not modified
    first = json.loads(path.read_text())
    assert first == {"seed": 1, "out": str(tmp_path), "provenance": provenance.record()}
    # without a checkpoint the folder holds no run to continue: a new start
    run_folder.write_config(path, config)
    assert "started_with" not in json.loads(path.read_text())
    # a resume: the checkpoint is there, the config was written by other code
    run_folder.save_checkpoint({}, tmp_path / run_folder.CHECKPOINT_NAME)
    old = dict(provenance.record(), git_commit=OTHER)
    path.write_text(json.dumps(dict(first, provenance=old)))
    run_folder.write_config(path, config)
    resumed = json.loads(path.read_text())
    assert resumed["provenance"] == provenance.record() and resumed["started_with"] == old
    run_folder.write_config(path, config)  # resumed again: still the first code
    assert json.loads(path.read_text())["started_with"] == old
    # a run that began before provenance was recorded
    path.write_text(json.dumps({"seed": 1}))
    run_folder.write_config(path, config)
    assert json.loads(path.read_text())["started_with"] is None


def test_provenance_does_not_split_groups_of_seeds_in_the_figures():
    from ppo_cbp.reporting.figures import group_key

    a = {"lr": 0.1, "provenance": CURRENT}
    b = {"lr": 0.1, "provenance": changed(git_commit=OTHER), "started_with": CURRENT}
    assert group_key(a) == group_key(b) == {"lr": 0.1}


# ------------------------------------------------------------------------------------------------
# real runs


def run(cmd: list, kill_after_rows: int | None = None) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    if kill_after_rows is not None:
        env["KILL_AFTER_ROWS"] = str(kill_after_rows)
        cmd = ["-c", KILLER, *cmd]
    return subprocess.run(
        [sys.executable, *map(str, cmd)], capture_output=True, text=True, cwd=ROOT, env=env
    )


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def set_commit(folder: Path, sha: str) -> None:
    """Make the run's checkpoint and config.json say that they were written by commit ``sha``."""
    ckpt = folder / run_folder.CHECKPOINT_NAME
    state = load(ckpt)
    state["provenance"]["git_commit"] = sha
    torch.save(state, ckpt)
    config = json.loads((folder / "config.json").read_text())
    config["provenance"]["git_commit"] = sha
    if "started_with" in config:  # resumed before
        config["started_with"]["git_commit"] = sha
    (folder / "config.json").write_text(json.dumps(config))


def warnings(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("warning:")]


def assert_records_this_code(folder: Path, started_with: str | None = None) -> None:
    """The run's config.json and checkpoint name the code running now; config.json also the
    commit the run ``started_with`` when it was resumed."""
    now = provenance.record()
    config = json.loads((folder / "config.json").read_text())
    assert config["provenance"] == now
    if started_with is None:
        assert "started_with" not in config
    else:
        assert config["started_with"]["git_commit"] == started_with
    assert load(folder / run_folder.CHECKPOINT_NAME)["provenance"] == now


def assert_warns_once_of(proc: subprocess.CompletedProcess, sha: str) -> None:
    """``proc`` went on to the end and printed one warning line that names ``sha`` and the
    commit running now."""
    assert proc.returncode == 0, proc.stderr
    [line] = warnings(proc)
    assert provenance.short_sha(sha) in line
    assert provenance.short_sha(provenance.record()["git_commit"]) in line


@needs_git_checkout
@pytest.mark.slow
def test_a_supervised_run_records_its_code_and_a_resume_with_another_warns(tmp_path):
    out = tmp_path / "run"
    cmd = [SUPERVISED, "slowly-changing-regression", "--seeds", "0", "--examples", "4000"]
    cmd += ["--bin-size", "1000", "--checkpoint-every", "1", "--out", out, "--no-progress"]
    cmd += ["--device", "cpu"]
    # killed after its second bin: the checkpoint holds the first
    proc = run(cmd, kill_after_rows=2)
    assert proc.returncode == -signal.SIGKILL and warnings(proc) == []
    assert len(load(out / run_folder.CHECKPOINT_NAME)["rows"][0]) == 1
    assert_records_this_code(out)
    # resumed with the same code: no warning (killed again, after its third bin)
    proc = run([*cmd, "--resume"], kill_after_rows=3)
    assert proc.returncode == -signal.SIGKILL and warnings(proc) == [], proc.stderr
    assert_records_this_code(out, started_with=provenance.record()["git_commit"])
    # resumed after its files were made to name another commit: one warning, and on to the end
    set_commit(out, OTHER)
    proc = run([*cmd, "--resume"])
    assert_warns_once_of(proc, OTHER)
    assert len(load(out / run_folder.CHECKPOINT_NAME)["rows"][0]) == 4
    assert_records_this_code(out, started_with=OTHER)


@needs_git_checkout
@pytest.mark.slow
def test_a_ppo_run_records_its_code_and_a_resume_with_another_warns(tmp_path):
    folder = tmp_path / "r"
    cmd = [TRAIN, "--env", "Hopper-v4", "--num-steps", "512", "--num-minibatches", "4"]
    cmd += ["--update-epochs", "1", "--no-progress", "--device", "cpu"]
    proc = run([*cmd, "--steps", "1024", "--runs-dir", tmp_path, "--run-name", "r"])
    assert proc.returncode == 0, proc.stderr
    assert warnings(proc) == []
    assert_records_this_code(folder)
    # extended with the same code: no warning
    proc = run([*cmd, "--resume", folder, "--steps", "1536"])
    assert proc.returncode == 0, proc.stderr
    assert warnings(proc) == []
    # extended after its files were made to name another commit: one warning, and on
    set_commit(folder, OTHER)
    proc = run([*cmd, "--resume", folder, "--steps", "2048"])
    assert_warns_once_of(proc, OTHER)
    assert load(folder / run_folder.CHECKPOINT_NAME)["global_step"] == 2048
    assert_records_this_code(folder, started_with=OTHER)
