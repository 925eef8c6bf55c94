"""Sweeps (ppo_cbp/sweep.py, scripts/sweep.py): parsing, tables by hand, and real local Ray
sweeps of tiny Slowly-Changing Regression runs (complete, killed and re-run, failing trial)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ppo_cbp import sweep as sw

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "sweep.py"
SCR = sw.Program("supervised", "scripts/supervised.py", "slowly-changing-regression")
PPO = sw.Program("ppo", "ppo_cbp/train.py")
# 2 bins of 1,000 examples: about a second of training per trial.
TINY = ["--examples", "2000", "--bin-size", "1000", "--chunk", "1000", "--device", "cpu"]


# ------------------------------------------------------------------------------ parsing


def test_parse_seeds_ranges_lists_and_errors():
    assert sw.parse_seeds(["0-2", "5,7", "9"]) == [0, 1, 2, 5, 7, 9]
    for bad in (["3-1"], ["a"], ["1", "1"], ["0-2", "2"], [""], ["-1"]):
        with pytest.raises(ValueError):
            sw.parse_seeds(bad)


def test_parse_program_and_grid():
    assert sw.parse_program(["ppo_cbp/train.py", "--env", "Hopper-v4"]) == (
        PPO,
        ["--env", "Hopper-v4"],
    )
    prog, fixed = sw.parse_program(["supervised.py", "slowly-changing-regression", "--hidden", "7"])
    assert prog == SCR and fixed == ["--hidden", "7"]
    with pytest.raises(ValueError, match="subcommand"):
        sw.parse_program(["scripts/supervised.py", "--seeds", "0"])
    with pytest.raises(ValueError, match="unknown program"):
        sw.parse_program(["other.py"])
    assert sw.parse_grid(["method=bp,cbp", "--replacement_rate=1e-4,1e-5"]) == {
        "method": ["bp", "cbp"],
        "replacement-rate": ["1e-4", "1e-5"],
    }
    for bad in (["method"], ["method=bp,"], ["lr=1,1"], ["lr=1", "lr=2"]):
        with pytest.raises(ValueError):
            sw.parse_grid(bad)


@pytest.mark.slow
def test_known_subcommands_are_those_of_supervised_py():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "supervised.py"), "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    listed = r.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert sorted(listed) == sorted(sw.SUPERVISED_SUBCOMMANDS)


def test_check_flags_rejects_flags_the_sweep_sets():
    with pytest.raises(ValueError, match="--seed "):
        sw.check_flags(PPO, ["--seed", "3"], {})
    with pytest.raises(ValueError, match="--out "):
        sw.check_flags(SCR, ["--out", "x"], {})
    with pytest.raises(ValueError, match="both fixed and in the grid"):
        sw.check_flags(SCR, ["--lr", "0.1"], {"lr": ["0.2"]})
    with pytest.raises(ValueError, match="unknown PPO method 'foo'"):
        sw.check_flags(PPO, [], {"method": ["cbp", "foo"]})
    sw.check_flags(PPO, ["--steps", "10"], {"method": ["bp", "cbp+l2"]})


def test_flags_trials_and_commands(tmp_path):
    assert sw.config_flags(PPO, {"method": "cbp+l2", "normalize-obs": "true"}) == [
        "--cbp",
        "--l2",
        "--normalize-obs",
    ]
    assert sw.config_flags(PPO, {"method": "bp", "norm-adv": "false", "lr": "3e-4"}) == [
        "--no-norm-adv",
        "--lr",
        "3e-4",
    ]
    assert sw.config_flags(SCR, {"method": "cbp"}) == ["--method", "cbp"]

    grid = {"method": ["bp", "cbp"], "lr": ["0.1", "0.2", "0.3"]}
    trials = sw.make_trials(SCR, grid, [0, 1, 2, 3, 4], tmp_path, seeds_per_trial=2)
    assert len(trials) == 2 * 3 * 3  # 6 configurations, seeds in chunks {0,1}, {2,3}, {4}
    assert [t.seeds for t in trials[:3]] == [[0, 1], [2, 3], [4]]
    assert trials[0].id == "method=bp__lr=0.1__s0-1" and trials[-1].id == "method=cbp__lr=0.3__s4"
    assert len({t.id for t in trials}) == len(trials)
    with pytest.raises(ValueError, match="supervised"):
        sw.make_trials(PPO, grid, [0, 1], tmp_path, seeds_per_trial=2)

    t = trials[0]
    cmd = sw.trial_command(SCR, ["--hidden", "7"], t, resume=True)
    assert cmd[0] == str(ROOT / "scripts" / "supervised.py")
    assert cmd[1:] == [
        "slowly-changing-regression", "--hidden", "7", "--method", "bp", "--lr", "0.1",
        "--seeds", "0", "1", "--out", str(t.run_dir.resolve()), "--no-progress", "--resume",
    ]  # fmt: skip
    (p,) = sw.make_trials(PPO, {"method": ["cbp"]}, [4], tmp_path)
    cmd = sw.trial_command(PPO, [], p, resume=False)
    assert cmd[1:] == [
        "--cbp", "--seed", "4", "--runs-dir", str(tmp_path.resolve()), "--run-name",
        "method=cbp__s4", "--no-progress",
    ]  # fmt: skip
    assert "--resume" not in cmd
    assert sw.trial_command(PPO, [], p, resume=True)[-2:] == ["--resume", str(p.run_dir.resolve())]


def test_manifest_of_another_sweep_is_refused(tmp_path):
    trials = sw.make_trials(SCR, {"lr": ["0.1"]}, [0], tmp_path)
    sw.write_json_atomic(tmp_path / sw.MANIFEST, sw.init_manifest(tmp_path, SCR, [], trials))
    with pytest.raises(ValueError, match="another sweep"):
        sw.init_manifest(tmp_path, SCR, ["--hidden", "7"], trials)
    with pytest.raises(ValueError, match="another sweep"):
        sw.init_manifest(tmp_path, PPO, [], trials)


# ------------------------------------------------------------------------------ tables


def test_mean_se_and_grouping_by_hand():
    mean, se = sw.mean_se([1.0, 2.0, 4.0])
    # mean 7/3; deviations -4/3, -1/3, 5/3 -> s^2 = (16 + 1 + 25) / 9 / 2 = 7/3; se = sqrt(7/9)
    assert mean == pytest.approx(7 / 3, rel=1e-15)
    assert se == pytest.approx(math.sqrt(7 / 9), rel=1e-15)
    assert math.isnan(sw.mean_se([5.0])[1])

    rows = [
        {"state": "done", "m": "a", "x": 1.0},
        {"state": "done", "m": "b", "x": 10.0},
        {"state": "done", "m": "a", "x": 3.0},
        {"state": "failed", "m": "a"},
        {"state": "done", "m": "b", "x": 20.0},
        {"state": "done", "m": "b", "x": 60.0},
    ]
    table = sw.group_rows(rows, ["m"], ["x"])
    assert [r["m"] for r in table] == ["a", "b"] and [r["n"] for r in table] == [2, 3]
    assert table[0]["x_mean"] == 2.0 and table[0]["x_se"] == pytest.approx(1.0)  # s = sqrt(2)
    assert table[1]["x_mean"] == 30.0
    assert table[1]["x_se"] == pytest.approx(math.sqrt((400 + 100 + 900) / 2 / 3))


def test_ppo_metrics_from_tensorboard_events(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path))
    for step in range(10, 1001, 10):  # returns 1..100 at steps 10..1000
        w.add_scalar("charts/episodic_return", step / 10, step)
    w.add_scalar("charts/SPS", 5.0, 1000)
    w.close()
    m = sw.ppo_metrics(tmp_path)
    # last 10% of 1000 steps: episodes ending after step 900, i.e. returns 91..100
    assert m["final_episodic_return"] == pytest.approx(95.5)
    assert m["mean_episodic_return"] == pytest.approx(50.5)
    assert m["episodes"] == 100 and m["last_step"] == 1000


def test_sweep_final_is_the_tables_final(tmp_path):
    """One definition of "final": with friction changes every 300 steps over 1,000 steps the
    sweep's final_episodic_return is the table's final, the mean over the bins of the last
    complete friction segment (steps 600-900: returns 61..90 in bins of 10 steps)."""
    from test_plot import ppo_run

    from ppo_cbp.reporting.figures import plot_runs

    run = tmp_path / "runs" / "cbp_1"
    points = [(step, step / 10) for step in range(10, 1001, 10)]
    ppo_run(run, 1, {"charts/episodic_return": points}, cbp=True, friction_every=300, steps=1000)
    m = sw.ppo_metrics(run)
    assert m["final_episodic_return"] == pytest.approx(sum(range(61, 91)) / 30)
    plot_runs([run], tmp_path / "fig", name="f")
    table = (tmp_path / "fig" / "f_table.csv").read_text().splitlines()
    header = table[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in table[1:]]
    final = [r for r in rows if r["metric"] == "final" and r["score"] == "episodic_return"]
    assert float(final[0]["mean"]) == pytest.approx(m["final_episodic_return"])


@pytest.mark.slow
def test_trial_that_finished_before_the_sweep_recorded_it_counts_as_done(tmp_path):
    """The sweep died between a PPO trial's end and recording it: the next attempt resumes the
    finished run, the trainer refuses with its one 'already finished' line, and the trial is
    done with the run's own metrics; any other refusal stays a failure."""
    (t,) = sw.make_trials(PPO, {"method": ["bp"]}, [0], tmp_path)
    fixed = ["--env", "Hopper-v4", "--steps", "256", "--num-steps", "128", "--friction-every", "0"]
    fresh = sw.trial_command(PPO, fixed, t, resume=False)
    first = sw.run_trial("ppo", fresh, str(t.run_dir), t.seeds, 1, False, 1, 0)
    assert first["returncode"] == 0, first["log_tail"]

    again = sw.trial_command(PPO, fixed, t, resume=True)
    second = sw.run_trial("ppo", again, str(t.run_dir), t.seeds, 2, True, 1, 0)
    log = (t.run_dir / sw.TRIAL_LOG).read_text()
    assert "=== attempt 2" in log and "exited with code 2" in log
    assert "run already finished at step 256" in log
    assert second["returncode"] == 0
    assert second["metrics"] == first["metrics"] == {"0": sw.ppo_metrics(t.run_dir)}

    other = sw.trial_command(PPO, [*fixed[:-4], "--env", "Ant-v4", *fixed[-4:]], t, resume=True)
    third = sw.run_trial("ppo", other, str(t.run_dir), t.seeds, 3, True, 1, 0)
    assert third["returncode"] == 2 and third["metrics"] is None


# ------------------------------------------------------------------------------ real Ray


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _metrics_csv(run_dir: Path, seed: int) -> list[dict[str, str]]:
    return _read_csv(run_dir / f"seed_{seed}" / "metrics.csv")


@pytest.mark.slow
def test_sweep_completes_and_writes_tables(tmp_path, ray_address, capsys):
    logged = []
    out = sw.run_sweep(
        SCR, TINY, {"lr": ["0.01", "0.05"]}, [0, 1], "scr", runs_dir=tmp_path, progress=True,
        log=logged.append,
    )  # fmt: skip
    # a progress bar is for terminals: stderr is not one here
    assert "\r" not in capsys.readouterr().err and "trial/s" not in "".join(logged)
    sweep_dir = tmp_path / "scr"
    assert sorted(out.done) == ["lr=0.01__s0", "lr=0.01__s1", "lr=0.05__s0", "lr=0.05__s1"]
    assert out.failed == [] and out.skipped == []
    manifest = json.loads((sweep_dir / sw.MANIFEST).read_text())
    assert {t["state"] for t in manifest["trials"].values()} == {"done"}
    assert {t["attempts"] for t in manifest["trials"].values()} == {1}

    rows = _read_csv(sweep_dir / sw.RESULTS_CSV)
    assert [(r["lr"], r["seed"]) for r in rows] == [("0.01", "0"), ("0.01", "1"), ("0.05", "0"), ("0.05", "1")]  # fmt: skip
    for r in rows:  # each row against the trial's own per-bin CSV
        bins = _metrics_csv(Path(r["run_dir"]), int(r["seed"]))
        assert len(bins) == 2
        errors = [float(b["squared_error"]) for b in bins]
        assert float(r["final_squared_error"]) == pytest.approx(errors[-1], rel=1e-12)
        assert float(r["mean_squared_error"]) == pytest.approx(sum(errors) / 2, rel=1e-12)
        assert f"--lr {r['lr']} " in (Path(r["run_dir"]) / sw.TRIAL_LOG).read_text()
    summary = _read_csv(sweep_dir / sw.SUMMARY_CSV)
    assert [(s["lr"], s["n"]) for s in summary] == [("0.01", "2"), ("0.05", "2")]
    for s in summary:
        vals = [float(r["final_squared_error"]) for r in rows if r["lr"] == s["lr"]]
        assert vals[0] != vals[1]
        assert float(s["final_squared_error_mean"]) == pytest.approx(statistics.mean(vals))
        se = statistics.stdev(vals) / math.sqrt(2)  # = |a - b| / 2 for two seeds
        assert float(s["final_squared_error_se"]) == pytest.approx(se)
        assert se == pytest.approx(abs(vals[0] - vals[1]) / 2)
    # the two step sizes give different runs
    assert summary[0]["final_squared_error_mean"] != summary[1]["final_squared_error_mean"]
    # the table printed at the end: mean to 4 significant digits, standard error to 2
    ran = r"\n4 trials run, 0 done before, 0 failed \((\d+\.\ds|\d+m\d\ds)\)"
    assert re.fullmatch(ran, logged[-4]), logged[-4]
    assert logged[-3] == "mean +- standard error over seeds:"
    table = logged[-2].splitlines()
    finals = [k.removesuffix("_mean") for k in summary[0] if re.fullmatch(r"final_.*_mean", k)]
    assert "final_squared_error" in finals
    assert table[0].split() == ["label", "lr", "n", *finals]
    # the configuration's label as the run recorded it (SCR's default step size is 0.01)
    labels = ["Backprop (bin_size=1000)", "Backprop (bin_size=1000, lr=0.05)"]
    assert [s["label"] for s in summary] == labels

    def shown(v: float, digits: int) -> str:  # whole with separators from 10^(digits-1) on
        return f"{v:,.0f}" if abs(v) >= 10 ** (digits - 1) else f"{v:.{digits}g}"

    for line, s in zip(table[2:], summary):
        cells = [*s["label"].split(), s["lr"], "2"]
        for m in finals:
            cells += [shown(float(s[m + "_mean"]), 4), "+-", shown(float(s[m + "_se"]), 2)]
        assert line.split() == cells


@pytest.mark.slow
def test_killed_sweep_reruns_only_missing_trials(tmp_path, ray_address):
    # One trial at a time (2 CPUs each on the 2-CPU cluster), 10 bins each so that the kill
    # lands while a later trial runs.
    fixed = ["--examples", "10000", *TINY[2:]]
    cmd = [
        sys.executable, str(SCRIPT), "scripts/supervised.py", "slowly-changing-regression",
        *fixed, "--grid", "lr=0.01,0.05", "--seeds", "0-1", "--name", "k",
        "--runs-dir", str(tmp_path), "--address", ray_address, "--cpus-per-trial", "2",
        "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    manifest_path = tmp_path / "k" / sw.MANIFEST
    done: list[str] = []
    while not done:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
        if manifest_path.exists():
            trials = json.loads(manifest_path.read_text())["trials"]
            done = [i for i, t in trials.items() if t["state"] == "done"]
    # Kill once a later trial has checkpointed, so that the re-run must resume it.
    partial = None
    while partial is None:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
        partial = next((i for i in trials if (tmp_path / "k" / i / "checkpoint.pt").exists()
                        and i not in done), None)  # fmt: skip
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    trials = json.loads(manifest_path.read_text())["trials"]
    missing = [i for i, t in trials.items() if t["state"] != "done"]
    assert missing and len(trials) == 4
    logs = {i: tmp_path / "k" / i / sw.TRIAL_LOG for i in done}
    before = {i: (p.stat().st_mtime_ns, p.read_text()) for i, p in logs.items()}

    out = sw.run_sweep(
        SCR, fixed, {"lr": ["0.01", "0.05"]}, [0, 1], "k", runs_dir=tmp_path,
        progress=False, log=lambda *a: None,
    )  # fmt: skip
    assert sorted(out.skipped) == sorted(done)
    assert sorted(out.done) == sorted(missing)
    assert {i: (p.stat().st_mtime_ns, p.read_text()) for i, p in logs.items()} == before
    trials = json.loads(manifest_path.read_text())["trials"]
    assert all(trials[i]["attempts"] == 1 for i in done)
    assert trials[partial]["attempts"] == 2
    assert "=== attempt 2 " in (log := (tmp_path / "k" / partial / sw.TRIAL_LOG).read_text())
    assert "(resume)" in log.split("=== attempt 2 ")[1].splitlines()[0]
    assert all(t["state"] == "done" for t in trials.values())
    rows = _read_csv(tmp_path / "k" / sw.RESULTS_CSV)
    assert len(rows) == 4
    for r in rows:  # every run complete: 10 bins, once each
        assert [int(b["bin"]) for b in _metrics_csv(Path(r["run_dir"]), int(r["seed"]))] == list(range(10))  # fmt: skip


@pytest.mark.slow
def test_sigterm_stops_the_programs_and_leaves_trials_pending(tmp_path, ray_address):
    cmd = [
        sys.executable, str(SCRIPT), "scripts/supervised.py", "slowly-changing-regression",
        "--examples", "10000000", *TINY[2:], "--grid", "lr=0.01", "--seeds", "0", "--name", "t",
        "--runs-dir", str(tmp_path), "--address", ray_address, "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "t" / "lr=0.01__s0"
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate()
    assert proc.returncode == 130, output
    trial = json.loads((tmp_path / "t" / sw.MANIFEST).read_text())["trials"]["lr=0.01__s0"]
    assert trial["state"] == "pending" and trial["attempts"] == 1
    last = (run_dir / sw.TRIAL_LOG).read_text().splitlines()[-1]
    assert last.startswith("=== attempt 1 stopped by the sweep") and last.endswith(
        f"code {-signal.SIGTERM}"
    )
    pid = int(last.split("(pid ")[1].split(")")[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.slow
def test_refused_trial_is_not_retried_and_reported(tmp_path, ray_address):
    """Fix: a trial whose program refused its input (exit code 2: lr = -1 parses but is out of
    range) was retried, to be refused again."""
    messages: list[str] = []
    out = sw.run_sweep(
        SCR, TINY, {"lr": ["0.01", "-1"]}, [0, 1], "f", runs_dir=tmp_path, seeds_per_trial=2,
        max_retries=1, progress=False, log=messages.append,
    )  # fmt: skip
    assert out.done == ["lr=0.01__s0-1"] and out.failed == ["lr=-1__s0-1"]
    trials = json.loads((tmp_path / "f" / sw.MANIFEST).read_text())["trials"]
    bad = trials["lr=-1__s0-1"]
    assert bad["state"] == "failed" and bad["attempts"] == 1 and bad["returncode"] == 2
    assert "lr = -1.0 is out of range" in bad["log_tail"]
    log = (tmp_path / "f" / "lr=-1__s0-1" / sw.TRIAL_LOG).read_text()
    assert "=== attempt 1 " in log and "=== attempt 2 " not in log
    assert any(
        m.startswith("FAILED lr=-1__s0-1 after 1 attempt (exit code 2: the program refused its "
                     "input, not retried)") for m in messages
    )  # fmt: skip
    assert any("failed: lr=-1__s0-1" in m for m in messages)
    rows = _read_csv(tmp_path / "f" / sw.RESULTS_CSV)
    assert [(r["lr"], r["seed"], r["state"]) for r in rows] == [
        ("0.01", "0", "done"), ("0.01", "1", "done"), ("-1", "0", "failed"), ("-1", "1", "failed"),
    ]  # fmt: skip
    assert rows[2]["final_squared_error"] == "" and rows[0]["final_squared_error"] != ""
    summary = _read_csv(tmp_path / "f" / sw.SUMMARY_CSV)
    assert [(s["lr"], s["n"]) for s in summary] == [("0.01", "2")]


@pytest.mark.slow
def test_failing_trial_is_retried_then_reported(tmp_path, ray_address):
    """A step size that makes PPO's loss non-finite: exit code 1, retried (from the checkpoint
    the trainer left), then failed."""
    messages: list[str] = []
    fixed = ["--env", "Hopper-v4", "--steps", "256", "--num-steps", "128", "--friction-every", "0"]
    out = sw.run_sweep(
        PPO, fixed, {"learning-rate": ["1e30"]}, [0], "nan", runs_dir=tmp_path, max_retries=1,
        progress=False, log=messages.append,
    )  # fmt: skip
    assert out.failed == ["learning-rate=1e30__s0"] and out.done == []
    trial = json.loads((tmp_path / "nan" / sw.MANIFEST).read_text())["trials"][out.failed[0]]
    assert trial["state"] == "failed" and trial["attempts"] == 2 and trial["returncode"] == 1
    assert "error: non-finite loss in update 1" in trial["log_tail"]
    log = (tmp_path / "nan" / out.failed[0] / sw.TRIAL_LOG).read_text()
    assert "=== attempt 1 " in log and "=== attempt 2 " in log
    assert f"{out.failed[0]}: exit code 1; retry 1 of 1" in messages
    assert any(
        m.startswith(f"FAILED {out.failed[0]} after 2 attempts (exit code 1)") for m in messages
    )


@pytest.mark.slow
def test_without_ray_the_script_says_how_to_install(tmp_path):
    fake = tmp_path / "fake" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "ppo_cbp/train.py", "--grid", "method=bp", "--seeds", "0",
         "--name", "x", "--runs-dir", str(tmp_path / "runs")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert (
        r.stderr.startswith("error: Ray is not installed")
        and "pip install -e '.[sweep]'" in r.stderr
    )
    assert not (tmp_path / "runs").exists()


def test_bad_arguments_exit_2_before_any_work(tmp_path):
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "ppo_cbp/train.py", "--seed", "3", "--seeds", "0",
         "--name", "x", "--runs-dir", str(tmp_path / "runs")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "--seed is set by the sweep" in r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "words, names",
    [
        (["foo.py", "--seeds", "0", "--name", "x"], "unknown program 'foo.py'"),
        (["scripts/supervised.py", "mnist", "--seeds", "0", "--name", "x"], "got mnist"),
        (["ppo_cbp/train.py", "--seeds", "0", "--name", "x", "--grid", "lr"], "bad grid item 'lr'"),
        (["ppo_cbp/train.py", "--seeds", "0", "--name", "x", "--grid", "lr=1,"], "'lr=1,'"),
        (["ppo_cbp/train.py", "--seeds", "0-x", "--name", "x"], "bad seed '0-x'"),
        (["ppo_cbp/train.py", "--name", "x"], "required: --seeds"),
        (["ppo_cbp/train.py", "--seeds", "0", "--name", "x", "--max-retries", "two"], "'two'"),
        (["ppo_cbp/train.py", "--seeds", "0", "--name", "a/b"], "bad sweep name 'a/b'"),
        (["ppo_cbp/train.py", "--seeds", "0", "--name", "x", "--num-cpus", "0"], "got 0"),
        (["ppo_cbp/train.py", "--seeds", "0", "--name", "x", "--grid", "method=sgd"], "'sgd'"),
        (["ppo_cbp/train.py", "--seeds", "0", "--name", "x", "--address", "nohost"], "'nohost'"),
        # Fix: grid points the program's parser refuses started Ray and were retried
        (
            ["ppo_cbp/train.py", "--seeds", "0", "--name", "x", "--grid", "no-such-param=1,2"],
            "grid point no-such-param=1: Unrecognized options: --no-such-param",
        ),
        (
            ["ppo_cbp/train.py", "--seeds", "0", "--name", "x", "--grid", "learning-rate=1e-4,abc"],
            "grid point learning-rate=abc: --learning-rate: expected a number (or None), got 'abc'",
        ),
        (
            [
                "scripts/supervised.py",
                "slowly-changing-regression",
                "--grid",
                "lr=0.1",
                "hidden=5,many",
                "--seeds",
                "0",
                "--name",
                "x",
            ],
            "grid point lr=0.1 hidden=many: --hidden",
        ),
        (
            [
                "scripts/supervised.py",
                "slowly-changing-regression",
                "--nope",
                "1",
                "--grid",
                "lr=0.1",
                "--seeds",
                "0",
                "--name",
                "x",
            ],
            "fixed flags: Unrecognized options: --nope",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, no_ray, words, names):
    sweep_script = _sweep_script()
    assert sweep_script.main([*words, "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and names in err, err
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def no_ray(monkeypatch):
    """Ray as if not started (an earlier test's local instance would take the sweep, address
    or not); starting it fails the test: bad input must be refused before."""
    ray = pytest.importorskip("ray")

    def init(**kwargs):
        raise AssertionError(f"ray.init({kwargs}) called for bad input")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    return ray


def _sweep_script():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import sweep as sweep_script
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return sweep_script


@pytest.mark.parametrize("where", ["/proc/x", "FILE/sub"])
def test_unwritable_runs_dir_is_one_line_before_ray(tmp_path, capsys, no_ray, where):
    """Fix: os.access let root through to a traceback when the sweep folder was made."""
    (tmp_path / "file").write_text("")
    runs_dir = Path(where.replace("FILE", str(tmp_path / "file")))
    argv = ["scripts/supervised.py", "slowly-changing-regression", "--grid", "lr=0.1,0.2"]
    argv += ["--seeds", "0", "--name", "x", "--runs-dir", str(runs_dir)]
    assert _sweep_script().main(argv) == 2
    err = capsys.readouterr().err
    reason = (
        f"cannot be created: {tmp_path / 'file'} is not a folder"
        if "FILE" in where
        else "cannot be written: /proc is not writable"
    )
    assert err.startswith(f"error: the sweep folder {runs_dir / 'x'} {reason}"), err
    assert err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and not Path("/proc/x").exists()


def test_unreachable_address_fails_fast_in_one_line(tmp_path, capsys, no_ray):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["ppo_cbp/train.py", "--seeds", "0", "--name", "x", "--runs-dir", str(tmp_path / "r")]
    assert _sweep_script().main([*argv, "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"nothing answers at --address 127.0.0.1:{port}" in err
    assert not (tmp_path / "r").exists()


def _auth_failure(address: str) -> ConnectionError:
    """What ray.init raises in Ray 2.60 when the head wants a token: a ConnectionError whose
    cause quotes the AuthenticationError's traceback as text."""
    cause = RuntimeError(
        "Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
        '  File "python/ray/includes/common.pxi", line 119, in ray._raylet.check_status\n'
        "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token "
        "is missing or incorrect. Note: RAY_AUTH_MODE is currently 'disabled' (not 'token')."
    )
    try:
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}") from cause
    except ConnectionError as e:
        return e


@pytest.mark.parametrize("auth_mode", [None, "token"])
def test_cluster_asking_for_a_token_is_one_line_naming_what_to_set(
    tmp_path, capsys, monkeypatch, auth_mode
):
    import socket

    ray = pytest.importorskip("ray")  # is_initialized and init patched below
    if auth_mode is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", auth_mode)
    with socket.socket() as head:  # the head's port answers; the handshake is refused
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        calls = []

        def init(**kwargs):
            calls.append(kwargs)
            raise _auth_failure(address)

        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", init)
        argv = ["scripts/supervised.py", "slowly-changing-regression", "--grid", "lr=0.1"]
        argv += ["--seeds", "0", "--name", "x", "--runs-dir", str(tmp_path / "r")]
        assert _sweep_script().main([*argv, "--address", address]) == 2
    assert calls and calls[0]["address"] == address
    err = capsys.readouterr().err
    assert err.startswith(f"error: the Ray cluster at {address} ") and err.count("\n") == 1
    if auth_mode is None:
        assert "RAY_AUTH_MODE=token" in err and "~/.ray/auth_token" in err
    else:  # the mode is set: the token itself is wrong or missing
        assert "refused this machine's token" in err and "~/.ray/auth_token" in err
    assert not (tmp_path / "r").exists()
    # a real AuthenticationError raised directly is recognised too; other errors are not
    assert sw.needs_token(ray.exceptions.AuthenticationError("RPC error"))
    assert not sw.needs_token(ConnectionError("Failed to connect to Ray cluster at x:1"))


def test_an_installed_copy_runs_the_programs_as_modules(tmp_path, monkeypatch):
    """ppo-cbp-sweep from an installed package has no scripts/ beside it: the trials run the
    programs' modules (python -m ppo_cbp.train, python -m ppo_cbp.commands.supervised)."""
    trial = sw.Trial("t", {}, [0], tmp_path / "t")
    checkout = sw.trial_command(sw.Program("ppo", "ppo_cbp/train.py"), [], trial, False)
    assert checkout[0] == str(sw.REPO_ROOT / "ppo_cbp" / "train.py")
    monkeypatch.setattr(sw, "REPO_ROOT", tmp_path)
    ppo = sw.trial_command(sw.Program("ppo", "ppo_cbp/train.py"), [], trial, False)
    assert ppo[:2] == ["-m", "ppo_cbp.train"]
    sup = sw.Program("supervised", "scripts/supervised.py", "slowly-changing-regression")
    words = sw.trial_command(sup, [], trial, False)
    assert words[:3] == ["-m", "ppo_cbp.commands.supervised", "slowly-changing-regression"]
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "ppo_cbp.commands.supervised", "--help"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0 and "slowly-changing-regression" in out.stdout
