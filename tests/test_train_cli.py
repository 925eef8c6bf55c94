"""The trainer's command line as a user meets it: one-line errors that leave the run folder as it
was, the start line and closing summary, the progress bar, and resuming after a hard kill."""

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from terminal import run_on_terminal
from test_train import small as train_small

from ppo_cbp.benchmarks import scr
from ppo_cbp.errors import UsageError
from ppo_cbp.ppo.agent import method_state
from ppo_cbp.ppo.settings import given_fields
from ppo_cbp.train import Args, main

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "ppo_cbp" / "train.py"
# Wall-clock scalars cannot repeat between runs.
TIMING = ("charts/SPS", "perf/")


def small(tmp_path: Path, **kw) -> Args:
    """test_train's few-update run, on Hopper-v4."""
    return train_small(tmp_path, **{"env": "Hopper-v4", **kw})


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) and its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def train_cli(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(TRAIN), *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_one_error_line(proc: subprocess.Popen, *needles: str) -> str:
    out, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert out == ""
    return lines[0]


def raw_scalar_steps(run_dir: Path) -> dict[str, list[int]]:
    """Each scalar tag's steps as written in the event files, oldest file first, nothing purged."""
    steps: dict[str, list[int]] = defaultdict(list)
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                steps[value.tag].append(event.step)
    return dict(steps)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: each tag's (step, value) points, after purges."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


# ------------------------------------------------------------------------------------------------
# one-line errors that change nothing
# ------------------------------------------------------------------------------------------------


def test_given_fields_reads_flags_as_tyro_writes_them():
    argv = ["--env", "Ant-v4", "--steps=5", "--no-progress", "--run_name", "x", "--cbp"]
    argv += ["--hidden-sizes", "64", "64", "--resume", "runs/r", "--not-a-field", "1"]
    expected = {"env", "steps", "progress", "run_name", "cbp", "hidden_sizes", "resume"}
    assert given_fields(Args, argv) == expected


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--steps", "abc"], ["--steps", "abc"]),
        (["--learning-rate", "abc"], ["--learning-rate: expected a number (or None), got 'abc'"]),
        (["--no-such-flag"], ["--no-such-flag"]),
        (["--env", "Foo-v1"], ["Foo-v1"]),
    ],
)
@pytest.mark.slow
def test_values_that_do_not_parse_are_one_line(tmp_path, argv, needles):
    assert_one_error_line(
        train_cli([*argv, "--runs-dir", str(tmp_path / "runs")], tmp_path), *needles
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["empty", "truncated", "truncated_with_older"])
def test_unreadable_checkpoint_is_one_line_and_changes_nothing(tmp_path, damage):
    run = main(small(tmp_path, steps=256)).run_dir
    ckpt = run / "checkpoint.pt"
    data = ckpt.read_bytes()
    if damage == "truncated_with_older":
        shutil.copy(ckpt, run / "older.pt")
    ckpt.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    before = folder_bytes(run)

    line = assert_one_error_line(
        train_cli(["--resume", str(run)], tmp_path), str(ckpt), "unreadable"
    )
    if damage == "empty":
        assert "the file is empty" in line
    if damage == "truncated_with_older":
        assert f"--resume {run / 'older.pt'}" in line
    else:
        assert "start the run over without --resume" in line and str(run) in line
    assert folder_bytes(run) == before


def test_not_a_checkpoint_of_this_trainer(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": 7, "weights": torch.zeros(3)}, run / "checkpoint.pt")
    with pytest.raises(UsageError, match="not a checkpoint of this trainer"):
        main(Args(resume=str(run)))
    torch.save([1, 2], run / "checkpoint.pt")
    with pytest.raises(UsageError, match="not a checkpoint of this trainer"):
        main(Args(resume=str(run)))
    torch.save({"format": 1, "args": Path("x")}, run / "checkpoint.pt")  # not weights-only
    with pytest.raises(UsageError, match="not a checkpoint of this trainer"):
        main(Args(resume=str(run)))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]
    # the parent of run folders: the message names the runs it holds
    with pytest.raises(UsageError, match=f"runs in {tmp_path}: {run}"):
        main(Args(resume=str(tmp_path)))


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    before = folder_bytes(run)
    line = assert_one_error_line(
        train_cli(["--resume", str(run)], tmp_path), str(run / "checkpoint.pt")
    )
    assert "is not a PyTorch checkpoint (unreadable: " in line
    assert line.endswith(
        "; pass the checkpoint.pt of a train.py run folder, or start a new run without --resume"
    )
    assert folder_bytes(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_supervised_run_folder_is_named_with_the_command_that_resumes_it(tmp_path):
    out = tmp_path / "scr"
    scr.run_scr(
        scr.SCRConfig(examples=40, bin_size=20, seeds=[0], out=out, device="cpu", progress=False)
    )
    before = folder_bytes(out)
    line = assert_one_error_line(
        train_cli(["--resume", str(out)], tmp_path),
        f"{out} is a run folder of scripts/supervised.py (slowly-changing-regression)",
        "and the flags it was started with",
    )
    command = re.search(r"continue it with python scripts/supervised.py (.+?) and ", line)[1]
    spec = importlib.util.spec_from_file_location("supervised", ROOT / "scripts" / "supervised.py")
    supervised = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(supervised)
    cfg = supervised.parse(command.split())  # the command it gives resumes that run
    assert type(cfg) is scr.SCRConfig and cfg.out == out and cfg.resume
    assert folder_bytes(out) == before


@pytest.mark.slow
def test_resuming_a_finished_run_checks_settings_and_writes_nothing(tmp_path):
    run = main(small(tmp_path, steps=512)).run_dir
    before = folder_bytes(run)
    procs = [
        # the same settings: finished
        (["--resume", str(run)], ("run already finished at step 512", "pass a larger --steps")),
        (["--resume", str(run), "--steps", "512"], ("run already finished at step 512",)),
        # Ant-v4 is the default env: naming it on the command line must still be a conflict
        (
            ["--resume", str(run), "--env", "Ant-v4"],
            ("env (checkpoint 'Hopper-v4', now 'Ant-v4')",),
        ),
        (["--resume", str(run), "--seed", "2"], ("seed (checkpoint 1, now 2)",)),
    ]
    started = [(train_cli(argv, tmp_path), needles) for argv, needles in procs]
    for proc, needles in started:
        line = assert_one_error_line(proc, *needles)
        assert str(run) in line
    assert folder_bytes(run) == before  # no events file, config.json byte-identical


def test_finished_run_with_annealed_learning_rate_cannot_be_extended(tmp_path):
    run = main(small(tmp_path, steps=256, anneal_lr=True)).run_dir
    with pytest.raises(UsageError, match="finished at step 256; it anneals the learning rate"):
        main(Args(resume=str(run)))


def test_default_valued_flag_conflicts_with_an_unfinished_run(tmp_path):
    run = main(small(tmp_path, steps=256)).run_dir
    before = folder_bytes(run)
    # From Python, a default value cannot be told from an absent one; from the command line the
    # flag is known to be given.
    with pytest.raises(UsageError, match=r"env \(checkpoint 'Hopper-v4', now 'Ant-v4'\)"):
        main(Args(resume=str(run), env="Ant-v4", steps=512), given={"env", "resume", "steps"})
    assert folder_bytes(run) == before
    assert main(Args(resume=str(run), steps=512), given={"resume", "steps"}).global_step == 512


@pytest.mark.slow
def test_unwritable_run_folder_fails_before_anything_is_created(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    procs = [train_cli(["--runs-dir", str(blocker / "runs"), "--env", "Hopper-v4"], tmp_path)]
    # Fix: os.access tells root that /proc is writable; the folder is checked by creating it
    procs.append(train_cli(["--runs-dir", "/proc/x", "--env", "Hopper-v4"], tmp_path))
    if os.geteuid() != 0:  # root may write anywhere else
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        procs.append(train_cli(["--runs-dir", str(locked), "--env", "Hopper-v4"], tmp_path))
    assert_one_error_line(procs[0], f"the run folder {blocker / 'runs'}/", f"{blocker} is not a")
    assert_one_error_line(procs[1], "the run folder /proc/x/", "/proc is not writable")
    assert not Path("/proc/x").exists()
    if len(procs) > 2:
        assert_one_error_line(procs[2], f"{locked} is not writable")
        assert list(locked.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"] + ["locked"] * (
        len(procs) > 2
    )


# ------------------------------------------------------------------------------------------------
# start line, closing summary, progress bar
# ------------------------------------------------------------------------------------------------

SUMMARY_RE = re.compile(
    r"finished at step (?P<step>[\d,]+) of (?P<total>[\d,]+): (?P<steps>[\d,]+) steps in "
    r"(?P<time>\S+) \((?P<rate>[\d,]+) steps/s\)\n"
    r"episodic return: (?P<ret>\S+) \(mean of the last (?P<n>[\d,]+) episodes?\)\n"
    r"units replaced: (?P<units>[\d,]+) \(policy (?P<pol>[\d,]+), value (?P<val>[\d,]+)\)\n"
    r"run folder: (?P<dir>.+)\n"
    r"curves: tensorboard --logdir (?P<logdir>.+)\n$"
)


@pytest.mark.slow
@pytest.mark.parametrize("progress", ["--no-progress", "--progress"])
def test_start_line_and_closing_summary(tmp_path, progress):
    argv = ["--env", "Hopper-v4", "--steps", "1024", "--num-steps", "256"]
    argv += ["--num-minibatches", "4", "--update-epochs", "2", "--metrics-every", "2"]
    argv += ["--cbp", "--maturity-threshold", "4", "--replacement-rate", "0.05"]
    argv += ["--device", "cpu", "--runs-dir", "runs", progress]
    proc = train_cli(argv, tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # the bar is for terminals: with stderr in a pipe nothing is printed there
    assert err == ""
    first, rest = out.split("\n", 1)
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1
    run = Path("runs") / run_dirs[0].name
    # default name: <env>__<label's slug>__s<seed>__<YYYYmmdd-HHMMSS>: the methods, then the
    # settings that differ from those of --cbp alone
    settings = "maturity_threshold=4,num_minibatches=4,num_steps=256,replacement_rate=0.05"
    name = rf"Hopper-v4__cbp__{settings},update_epochs=2__s1__\d{{8}}-\d{{6}}"
    assert re.fullmatch(name, run.name), run.name
    assert first == f"writing to {run} (TensorBoard events, config.json, checkpoint.pt)"

    m = SUMMARY_RE.fullmatch(rest)
    assert m, rest
    assert m["step"] == m["total"] == m["steps"] == "1,024"
    assert m["dir"] == m["logdir"] == str(run)
    # the return: the mean of the last (up to 100) episodes logged, read back from the events
    returns = [v for _, v in scalars(tmp_path / run)["charts/episodic_return"]][-100:]
    assert int(m["n"]) == len(returns) > 0
    mean = sum(returns) / len(returns)
    # four significant digits; whole, with thousands separators, from 1,000 on
    assert m["ret"] == (f"{mean:,.0f}" if abs(mean) >= 1000 else f"{mean:.4g}")
    # units replaced: the checkpoint's counts, and the last logged cumulative scalars
    state = torch.load(tmp_path / run / "checkpoint.pt", map_location="cpu", weights_only=True)
    counts = {k: method_state(state, "cbp", k)["num_replaced"] for k in ("policy", "value")}
    assert int(m["pol"].replace(",", "")) == counts["policy"] > 0
    assert int(m["val"].replace(",", "")) == counts["value"] > 0
    assert int(m["units"].replace(",", "")) == counts["policy"] + counts["value"]
    logged = scalars(tmp_path / run)
    for net in ("policy", "value"):
        step, value = logged[f"plasticity/{net}/units_replaced"][-1]
        assert step == 1024 and value == counts[net]


@pytest.mark.slow
def test_progress_bar_on_a_terminal_shows_percentage_and_eta_once(tmp_path):
    argv = ["--env", "Hopper-v4", "--steps", "1024", "--num-steps", "256"]
    argv += ["--num-minibatches", "4", "--update-epochs", "1", "--device", "cpu"]
    argv += ["--runs-dir", "runs", "--friction-every", "300"]
    code, bar, out = run_on_terminal([sys.executable, str(TRAIN), *argv], tmp_path, 120)
    assert code == 0
    assert out.startswith("writing to runs/") and "finished at step 1,024 of 1,024" in out
    # redrawn in place with carriage returns; one line feed when it closes
    assert bar.count("\n") == 1 and bar.rstrip().count("\r") >= 2, repr(bar)
    frames = [f for f in bar.replace("\n", "").split("\r") if f.strip()]
    # a percentage, the total, and elapsed<remaining (the ETA) in every frame
    for frame in frames:
        assert re.search(r"\d+%\|.*\| [\d.k]+/1\.02k \[\d\d:\d\d<(\d\d:\d\d|\?)", frame), frame
    assert "100%" in frames[-1]
    # the postfix is that of the frame's own update: the friction of the latest rollout
    assert all("return" in f and "friction" in f for f in frames[1:]), frames


# ------------------------------------------------------------------------------------------------
# a hard kill between two checkpoints, then resume
# ------------------------------------------------------------------------------------------------

KILL_FLAGS = [
    "--env",
    "Hopper-v4",
    "--num-steps",
    "128",
    "--num-minibatches",
    "2",
    "--update-epochs",
    "1",
    "--hidden-sizes",
    "32",
    "32",
    "--metrics-every",
    "1",
    "--cbp",
    "--maturity-threshold",
    "10",
    "--replacement-rate",
    "0.01",
    "--checkpoint-every",
    "1024",
    "--friction-every",
    "700",
    "--device",
    "cpu",
]
KILL_KW = dict(
    env="Hopper-v4",
    num_steps=128,
    num_minibatches=2,
    update_epochs=1,
    hidden_sizes=(32, 32),
    metrics_every=1,
    cbp=True,
    maturity_threshold=10,
    replacement_rate=0.01,
    checkpoint_every=1024,
    friction_every=700,
    device="cpu",
    progress=False,
)


def _checkpoint_step(run: Path) -> int | None:
    try:
        state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return None  # not written yet
    return int(state["global_step"])


def _kill_between_checkpoints(tmp_path: Path, name: str) -> tuple[Path, int, int]:
    """Start a long run, SIGKILL it once its event files hold points past its last checkpoint
    (at least the second checkpoint). Returns the run folder, the checkpoint's step and the last
    step logged."""
    run = tmp_path / name
    argv = [*KILL_FLAGS, "--steps", "1000000", "--runs-dir", str(tmp_path), "--run-name", name]
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN), *argv, "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        while proc.poll() is None:
            saved = _checkpoint_step(run)
            if saved is not None and saved >= 2048:
                logged = max(raw_scalar_steps(run).get("charts/SPS", [0]))
                # two updates past the checkpoint, and no newer checkpoint in the meantime
                if logged >= saved + 256 and _checkpoint_step(run) == saved:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    return run, _checkpoint_step(run), max(raw_scalar_steps(run)["charts/SPS"])


@pytest.mark.slow
def test_resume_after_kill_9_logs_each_step_once(tmp_path):
    for attempt in range(3):
        run, saved, logged = _kill_between_checkpoints(tmp_path, f"killed{attempt}")
        if logged > saved:  # the stale points exist (a checkpoint may land just before the kill)
            break
    assert logged > saved, (saved, logged)
    target = logged + 4 * 128
    main(Args(resume=str(run), steps=target, progress=False))
    clean = main(Args(runs_dir=str(tmp_path), run_name="clean", steps=target, **KILL_KW)).run_dir

    # the files hold the killed process's points past its checkpoint and the resumed ones again
    raw = raw_scalar_steps(run)
    assert len(raw["charts/SPS"]) > len(set(raw["charts/SPS"]))
    shown, expected = scalars(run), scalars(clean)
    assert sorted(shown) == sorted(expected)
    for tag, points in shown.items():
        steps = [s for s, _ in points]
        assert all(a < b for a, b in zip(steps, steps[1:])), (tag, steps)
        assert steps == [s for s, _ in expected[tag]], tag
        if not tag.startswith(TIMING):  # the same run on the CPU: the same values
            assert points == expected[tag], tag


@pytest.mark.slow
def test_paper_exact_refuses_the_flags_it_would_turn_off(tmp_path):
    runs = tmp_path / "runs"
    for flag in ("--bootstrap-truncation", "--reset-optimizer-state"):
        proc = train_cli(["--paper-exact", flag, "--runs-dir", str(runs)], tmp_path)
        assert_one_error_line(proc, "--paper-exact", flag)
        assert not runs.exists()
    # the values it sets anyway, and the defaults, are no clash
    from ppo_cbp.ppo.settings import run_settings

    # (20M steps: the released slippery-Ant length, which the paper's friction table covers)
    argv = ["--paper-exact", "--no-bootstrap-truncation", "--runs-dir", str(runs)]
    argv += ["--steps", "20_000_000"]
    given = Args(paper_exact=True, bootstrap_truncation=False, runs_dir=str(runs), steps=20_000_000)
    _, a, _, _ = run_settings(given, given_fields(Args, argv))
    assert a.paper_exact and not a.bootstrap_truncation and not a.reset_optimizer_state
