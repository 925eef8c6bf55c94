"""scripts/supervised.py as a user meets it: one-line input errors that leave nothing behind,
help texts that tell the truth, the closing summary and summary.json, and a resume after
kill -9 that logs every row once."""

import gzip
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from stacked_runs import read_rows
from terminal import run_on_terminal

from ppo_cbp.benchmarks import continual_imagenet, incremental_cifar, permuted_mnist, registry, scr
from ppo_cbp.benchmarks.common import MethodConfig, RunOutputs, resolve_method
from ppo_cbp.benchmarks.conv_learner import resolve_module_method
from ppo_cbp.datasets.mnist import default_data_dir
from ppo_cbp.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "supervised.py"


def load_script():
    spec = importlib.util.spec_from_file_location("supervised_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = load_script()


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file under ``folder`` with its bytes (None if the folder does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def run_main(args, capsys):
    """``main(args)``; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        script.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def assert_one_error(code, err, *needles):
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


SCR_SMALL = ["--examples", "40", "--bin-size", "20", "--device", "cpu", "--no-progress"]


# ----------------------------------------------------------------------------------------
# Input errors


def test_bad_values_give_one_error_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    cases = [
        (["permuted-mnist", "--tasks", "-1"], "--tasks", "-1"),
        (["permuted-mnist", "--examples-per-task", "0"], "--examples-per-task", "0"),
        (["permuted-mnist", "--seeds", "1", "1"], "--seeds", "[1, 1]"),
        (["slowly-changing-regression", "--examples", "0"], "--examples", "0"),
        (["slowly-changing-regression", "--examples", "30", "--bin-size", "20"], "30", "20"),
        (["slowly-changing-regression", "--method", "cbp", "--replacement-rate", "-1"], "-1"),
        # the learner is built after --out is checked: still nothing written
        (["slowly-changing-regression", "--activation", "linear", "--method", "cbp"], "cbp"),
        (["continual-imagenet", "--tasks", "-1"], "--tasks", "-1"),
        (["incremental-cifar", "--increments", "-1"], "--increments", "-1"),
        (["incremental-cifar", "--epochs", "0"], "--epochs", "0"),
    ]
    for args, *needles in cases:
        code, _, err = run_main([*args, "--out", out, "--device", "cpu"], capsys)
        assert_one_error(code, err, *needles)
        assert not out.exists(), args


def test_values_that_do_not_parse_give_one_error_line(tmp_path, capsys):
    out = tmp_path / "run"
    cases = [
        (["permuted-mnist", "--tasks", "abc"], "--tasks", "abc"),
        (["slowly-changing-regression", "--method", "sgd"], "--method", "sgd"),
        (["slowly-changing-regression", "--no-such-flag", "1"], "--no-such-flag"),
        (["no-such-benchmark"], "no-such-benchmark"),
    ]
    for args, *needles in cases:
        code, _, err = run_main([*args, "--out", out], capsys)
        assert_one_error(code, err, *needles)
        assert not out.exists(), args


@pytest.mark.parametrize(
    "args, start",
    [
        (["no-such-benchmark"], "unknown benchmark 'no-such-benchmark'; "),
        (["--seeds", "0"], "no benchmark given; "),
        ([], "no benchmark given; "),
    ],
)
def test_a_benchmark_that_is_not_there_lists_those_that_are(tmp_path, capsys, args, start):
    out = tmp_path / "run"
    code, stdout, err = run_main([*args, "--out", out] if args else [], capsys)
    names = [name for name, (config, run) in registry.BENCHMARKS.items()]
    assert names == ["permuted-mnist", "slowly-changing-regression", "continual-imagenet"] + [
        "incremental-cifar"
    ]
    assert_one_error(code, err)
    assert err == f"error: {start}choose one of: {', '.join(names)}\n" and stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_data_files(tmp_path, capsys):
    out = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_main(["permuted-mnist", "--data-dir", empty, "--out", out], capsys)
    assert_one_error(code, err, empty / "train-images-idx3-ubyte.gz", "--download")
    assert not out.exists()

    # a truncated .gz: the MD5 check names the file and both checksums
    bad = tmp_path / "bad"
    bad.mkdir()
    blob = gzip.compress(np.arange(4096, dtype=np.uint8).tobytes())
    (bad / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    code, _, err = run_main(["permuted-mnist", "--data-dir", bad, "--out", out], capsys)
    assert_one_error(code, err, bad / "train-images-idx3-ubyte.gz", "md5", "f68b3c2dcb")
    assert not out.exists()

    # ImageNet 32x32 with only some of the ten training batches
    inet = tmp_path / "inet"
    inet.mkdir()
    for i in (1, 2, 5):
        data = np.zeros((2, 3072), np.uint8)
        np.savez(inet / f"train_data_batch_{i}.npz", data=data, labels=np.array([1, 2]))
    code, _, err = run_main(["continual-imagenet", "--data-dir", inet, "--out", out], capsys)
    missing = [f"train_data_batch_{i}.npz" for i in (3, 4, 6, 7, 8, 9, 10)]
    assert_one_error(code, err, str(inet), "7 of the 10", *missing)
    assert "train_data_batch_1.npz" not in err and not out.exists()

    cifar = tmp_path / "cifar"
    cifar.mkdir()
    code, _, err = run_main(["incremental-cifar", "--data-dir", cifar, "--out", out], capsys)
    assert_one_error(code, err, cifar / "train", "--download")
    assert not out.exists()


@pytest.mark.parametrize(
    "subcommand",
    ["permuted-mnist", "slowly-changing-regression", "continual-imagenet", "incremental-cifar"],
)
def test_out_holding_a_run_needs_resume(tmp_path, capsys, subcommand):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"a run's checkpoint")
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    code, _, err = run_main([subcommand, "--out", out, "--device", "cpu"], capsys)
    assert_one_error(code, err, out / "checkpoint.pt", "--resume")
    assert snapshot(out) == before
    # with --resume a checkpoint that cannot be read is named, and nothing changes either
    if subcommand == "slowly-changing-regression":
        code, _, err = run_main([subcommand, "--out", out, "--resume", *SCR_SMALL], capsys)
        assert_one_error(code, err, out / "checkpoint.pt", "not a PyTorch checkpoint")
        assert "pass the --out folder of a slowly-changing-regression run" in err
        assert snapshot(out) == before


def test_a_train_checkpoint_in_out_is_named_with_the_command_that_resumes_it(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"format": 1, "args": {"env": "Hopper-v4"}}, out / "checkpoint.pt")
    before = snapshot(out)
    code, _, err = run_main(["slowly-changing-regression", "--out", out, "--resume"], capsys)
    assert_one_error(
        code, err, "is a checkpoint of ppo_cbp/train.py", f"python ppo_cbp/train.py --resume {out}"
    )
    assert snapshot(out) == before


def test_resuming_with_another_benchmark_names_the_one_in_out(tmp_path, capsys):
    out = tmp_path / "run"
    script.main(["slowly-changing-regression", *SCR_SMALL, "--out", str(out)])
    capsys.readouterr()
    before = snapshot(out)
    outputs = RunOutputs("permuted-mnist", out, [0], {}, resume=True)
    with pytest.raises(UsageError) as info:
        outputs.load_checkpoint(10, "task")
    message = str(info.value)
    assert "\n" not in message
    assert (
        f"--out {out} holds a slowly-changing-regression run, not a permuted-mnist one" in message
    )
    command = re.search(r"python scripts/supervised.py (.+?) and the flags", message)[1]
    assert type(registry.parse(command.split())) is scr.SCRConfig
    assert snapshot(out) == before


def test_resume_with_other_settings_keeps_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    script.main(["slowly-changing-regression", *SCR_SMALL, "--out", str(out)])
    before = snapshot(out)
    args = ["slowly-changing-regression", *SCR_SMALL, "--out", out, "--resume", "--lr", "0.5"]
    code, _, err = run_main(args, capsys)
    assert_one_error(code, err, "different configuration", "0.5")
    assert snapshot(out) == before


def test_resume_of_a_finished_run_is_refused_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    script.main(["slowly-changing-regression", *SCR_SMALL, "--out", str(out)])
    capsys.readouterr()
    before = snapshot(out)
    events = sorted(p.name for p in out.rglob("events.out.tfevents.*"))
    assert len(events) == 1  # one seed, one writer
    # 40 examples in bins of 20: the run ends after bin index 1, i.e. 2 rows
    code, _, err = run_main(
        ["slowly-changing-regression", *SCR_SMALL, "--out", out, "--resume"], capsys
    )
    assert_one_error(code, err, out, "run already finished at bin 2", "another --out")
    assert snapshot(out) == before  # no new events file, config.json and CSVs untouched


def test_unwritable_out_is_one_line_before_any_work(tmp_path, capsys):
    """Fix: ``--out /proc/x`` passed the os.access check as root and met a traceback at the
    first write. The folder is created to check it, then removed again if the run stops."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    for sub in SUBCOMMANDS:
        for out, needle in (
            (Path("/proc/x"), "--out /proc/x cannot be written: /proc is not writable"),
            (blocker / "sub", f"--out {blocker / 'sub'} cannot be created: {blocker} is not a"),
        ):
            code, stdout, err = run_main([sub, "--out", out, "--device", "cpu"], capsys)
            assert_one_error(code, err, needle)
            assert stdout == ""
    # writable, and the run refused after the check: the folders it made are gone
    args = ["slowly-changing-regression", "--activation", "linear", "--method", "cbp"]
    code, _, err = run_main([*args, "--out", tmp_path / "a" / "b", "--device", "cpu"], capsys)
    assert_one_error(code, err, "cbp")
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and blocker.read_text() == ""
    assert not Path("/proc/x").exists()


@pytest.mark.slow
def test_error_in_a_real_process_has_no_traceback(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "slowly-changing-regression", "--examples", "0"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: --examples must be >= 1, got 0"]
    assert proc.stdout == "" and not out.exists()


SCR_TINY = ["slowly-changing-regression", "--examples", "40", "--bin-size", "20", "--device", "cpu"]


@pytest.mark.slow
def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), *SCR_TINY, "--out", str(out)]  # --progress by default
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "\r" not in proc.stdout and "ex/s" not in proc.stdout
    assert proc.stdout.startswith("slowly_changing_regression relu bp, 1 seed(s): writing to ")


@pytest.mark.slow
def test_progress_bar_on_a_terminal(tmp_path):
    cmd = [sys.executable, str(SCRIPT), *SCR_TINY, "--out", str(tmp_path / "run")]
    code, bar, _ = run_on_terminal(cmd, ROOT, 120)
    assert code == 0
    assert "\r" in bar and "100%" in bar and "40.0/40.0" in bar and "ex/s" in bar, repr(bar)


def test_programming_errors_keep_their_traceback(tmp_path, monkeypatch):
    def broken(cfg):
        raise KeyError("a bug")

    monkeypatch.setitem(registry.RUNS, scr.SCRConfig, broken)
    with pytest.raises(KeyError, match="a bug"):
        script.main(["slowly-changing-regression", "--out", str(tmp_path / "run")])


# ----------------------------------------------------------------------------------------
# Help texts and documented commands


def help_text(args, capsys, monkeypatch) -> str:
    """``--help`` output with the box drawing removed and whitespace collapsed."""
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as info:
        script.main([*args, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


SUBCOMMANDS = {
    "permuted-mnist": (permuted_mnist.DEFAULTS, lambda m, d: resolve_method(m, d)),
    "slowly-changing-regression": (scr.DEFAULTS, lambda m, d: resolve_method(m, d)),
    "continual-imagenet": (
        continual_imagenet.DEFAULTS,
        lambda m, d: resolve_module_method(m, d, {"linear": "bp"}),
    ),
    "incremental-cifar": (
        incremental_cifar.DEFAULTS,
        lambda m, d: resolve_module_method(m, d, incremental_cifar.ALIASES),
    ),
}


@pytest.mark.parametrize("subcommand", list(SUBCOMMANDS))
def test_help_states_the_defaults_that_apply(subcommand, capsys, monkeypatch):
    text = help_text([subcommand], capsys, monkeypatch)
    assert "(default: None)" not in text
    defaults, resolve = SUBCOMMANDS[subcommand]
    flags = ["lr", "weight_decay", "noise_std", "replacement_rate", "maturity_threshold"]
    if "dropout" in defaults:
        flags.append("dropout")
    for name in flags:
        flag = "--" + name.replace("_", "-")
        match = re.search(
            re.escape(flag) + r" \S+ (?:(?! --).)*?\(default per method: ([^)]*)\)", text
        )
        assert match, flag
        listed = {}
        for group in match.group(1).split(", "):
            methods, value = group.rsplit(" ", 1)
            for m in methods.split("/"):
                listed[m] = float(value)
        # every method listed resolves to the stated value when the flag is not given
        for m, value in listed.items():
            resolved = resolve(MethodConfig(method=m), defaults)
            assert getattr(resolved, name) == pytest.approx(value), (flag, m)
        # every method that uses the flag is listed
        users = {"noise_std": {"snp"}, "replacement_rate": {"cbp"}, "maturity_threshold": {"cbp"}}
        users["dropout"] = {"dropout"}
        expected = set(defaults) & users.get(name, set(defaults))
        assert set(listed) == expected, flag


def test_help_hides_flags_of_methods_a_benchmark_lacks(capsys, monkeypatch):
    cifar = help_text(["incremental-cifar"], capsys, monkeypatch)
    for flag in ("--redo-threshold", "--redo-period", "--dropout", "--adam-betas", "--adam-eps"):
        assert flag not in cifar
    assert "--replacement-rate" in cifar and "--noise-std" in cifar
    inet = help_text(["continual-imagenet"], capsys, monkeypatch)
    for flag in ("--dropout", "--adam-betas", "--adam-eps"):
        assert flag not in inet
    assert "--redo-threshold" in inet
    mnist = help_text(["permuted-mnist"], capsys, monkeypatch)
    for flag in ("--redo-threshold", "--dropout", "--adam-betas"):
        assert flag in mnist


def test_help_names_the_mnist_cache_folder(capsys, monkeypatch):
    text = help_text(["permuted-mnist"], capsys, monkeypatch)
    match = re.search(r"--data-dir .*?\(default: \$PPO_CBP_MNIST_DIR if set, else (\S+)\)", text)
    assert match
    monkeypatch.delenv("PPO_CBP_MNIST_DIR", raising=False)
    assert Path(match.group(1)).expanduser() == default_data_dir()
    monkeypatch.setenv("PPO_CBP_MNIST_DIR", "/somewhere/mnist")
    assert default_data_dir() == Path("/somewhere/mnist")


def test_default_out_folders_are_not_those_of_the_readme_sweeps():
    """Fix: slowly-changing-regression wrote to runs/scr by default, the folder of the README's
    ``sweep.py ... --name scr``, whose trials plot.py then skipped as inside a run folder."""
    readme = (ROOT / "README.md").read_text()
    sweeps = {Path("runs") / n for n in re.findall(r"scripts/sweep\.py .* --name (\S+)", readme)}
    assert Path("runs/scr") in sweeps
    defaults = {registry.parse([sub]).out for sub in SUBCOMMANDS}
    assert Path("runs/slowly_changing_regression") in defaults and len(defaults) == 4
    assert not defaults & sweeps


def documented_commands(text: str) -> list[list[str]]:
    """The arguments of every ``python scripts/supervised.py ...`` line (comments dropped)."""
    commands = []
    for line in text.splitlines():
        line = line.strip().strip("`")
        if line.startswith("python scripts/supervised.py "):
            words = shlex.split(line, comments=True)
            commands.append(words[2:])
    return commands


def test_every_documented_command_parses(capsys, monkeypatch):
    readme = documented_commands((ROOT / "README.md").read_text())
    assert len(readme) >= 2
    helps = []
    for args in ([], *[[s] for s in SUBCOMMANDS]):
        monkeypatch.setenv("COLUMNS", "400")
        with pytest.raises(SystemExit):
            script.main([*args, "--help"])
        helps += documented_commands(capsys.readouterr().out)
    assert len(helps) >= 4
    for args in readme + helps:
        if "--help" in args:
            continue
        cfg = registry.parse(args)
        assert type(cfg) in registry.RUNS, args
        if "--method" in args:
            assert cfg.method.method == args[args.index("--method") + 1]


# ----------------------------------------------------------------------------------------
# summary.json and the closing summary


def test_summary_fields_mean_what_they_say(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["slowly-changing-regression", "--examples", "90", "--bin-size", "30"]
    args += ["--seeds", "3", "5", "--method", "cbp", "--replacement-rate", "0.05"]
    args += ["--maturity-threshold", "5", "--device", "cpu", "--no-progress", "--out", out]
    script.main([str(a) for a in args])
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "squared_error" and summary["bins_completed"] == 3
    finals = []
    for seed in (3, 5):
        rows = read_rows(out, seed)
        s = summary["seeds"][str(seed)]
        assert s["rows"] == 3 and s["last"] == pytest.approx(rows[-1])
        assert set(s["mean_over_rows"]) == {
            "squared_error",
            "weight_magnitude",
            "dead_units",
            "effective_rank",
        }
        for k, v in s["mean_over_rows"].items():
            assert v == pytest.approx(np.mean([r[k] for r in rows]), rel=1e-12)
        assert s["units_replaced"] == rows[-1]["units_replaced"] > 0
        finals.append(rows[-1]["squared_error"])
        assert f"seed {seed} {rows[-1]['squared_error']:.4g}" in printed
    over = summary["final_over_seeds"]
    assert over["seeds"] == 2 and "bin" not in over and "examples" not in over
    se = np.std(finals, ddof=1) / math.sqrt(2)
    assert over["squared_error"]["mean"] == pytest.approx(np.mean(finals), rel=1e-12)
    assert over["squared_error"]["standard_error"] == pytest.approx(se, rel=1e-12)
    seconds = summary["seconds_this_call"]
    all_seeds = summary["examples_per_second_all_seeds"]
    assert all_seeds * seconds == pytest.approx(2 * 90)
    assert summary["examples_per_second_per_seed"] == pytest.approx(all_seeds / 2)
    assert f"{np.mean(finals):.4g} +- {se:.2g}" in printed
    assert ": 3/3 bins, " in printed.splitlines()[-7]
    assert f"writing to {out}/" in printed
    assert f"{out}/seed_<seed>/metrics.csv" in printed and f"tensorboard --logdir {out}" in printed


# ----------------------------------------------------------------------------------------
# Resume after kill -9


KILLER = """
import os, runpy, signal, sys
from ppo_cbp.benchmarks import common

append = common.RunOutputs.append


def append_then_die(self, rows):
    append(self, rows)
    if len(self.rows[0]) == int(os.environ["KILL_AFTER_ROWS"]):
        os.kill(os.getpid(), signal.SIGKILL)


common.RunOutputs.append = append_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def scalars(tb: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: (step, value) per tag over all event files of ``tb``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def raw_steps(tb: Path, tag: str) -> list[int]:
    """Steps of ``tag`` as written in the event files, stale ones included."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(tb.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if any(v.tag == tag for v in event.summary.value):
                steps.append(event.step)
    return steps


def kill_after_rows(flags: list[str], out, env: dict) -> None:
    """Run supervised.py with ``flags`` into ``out``, stopped as kill -9 would after row
    ``env["KILL_AFTER_ROWS"]``."""
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, str(SCRIPT), *flags, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_a_run_that_recorded_the_empty_extra_field_resumes(tmp_path):
    """Runs started before ResolvedMethod lost its unused ``extra`` field recorded it (always
    ``{}``) in the checkpoint's configuration; they resume, and nothing else of the
    configuration is let through."""
    common = ["slowly-changing-regression", "--examples", "60", "--bin-size", "20"]
    common += ["--seeds", "0", "--method", "cbp", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, KILL_AFTER_ROWS="2", PYTHONPATH=str(ROOT))
    part = tmp_path / "part"
    kill_after_rows(common, part, env)
    path = part / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    config = json.loads(state["config"])

    def resume_with(resolved_method):
        torch.save(
            {**state, "config": json.dumps({**config, "resolved_method": resolved_method})}, path
        )
        resume = [sys.executable, str(SCRIPT), *common, "--out", str(part), "--resume"]
        return subprocess.run(resume, cwd=ROOT, env=env, capture_output=True, text=True)

    refused = resume_with({**config["resolved_method"], "extra": {"x": 1}})
    assert refused.returncode == 2 and "resolved_method" in refused.stderr
    resumed = resume_with({**config["resolved_method"], "extra": {}})
    assert resumed.returncode == 0, resumed.stderr
    assert len(read_rows(part, 0)) == 3


@pytest.mark.slow
def test_resume_after_kill_9_logs_every_row_once(tmp_path):
    common = ["slowly-changing-regression", "--examples", "200", "--bin-size", "20"]
    common += ["--seeds", "0", "1", "--method", "cbp", "--replacement-rate", "0.05"]
    common += ["--maturity-threshold", "5", "--dtype", "float64", "--device", "cpu"]
    common += ["--checkpoint-every", "2", "--no-progress"]
    env = dict(os.environ, KILL_AFTER_ROWS="3", PYTHONPATH=str(ROOT))
    clean, part = tmp_path / "clean", tmp_path / "part"
    subprocess.run(
        [sys.executable, str(SCRIPT), *common, "--out", str(clean)], check=True, cwd=ROOT, env=env
    )
    kill_after_rows(common, part, env)
    # killed after row 3, one row past the checkpoint of rows 1-2
    assert len(read_rows(part, 0)) == 3
    assert len(torch.load(part / "checkpoint.pt", weights_only=True)["rows"][0]) == 2
    resume = [sys.executable, str(SCRIPT), *common, "--out", str(part), "--resume"]
    subprocess.run(resume, check=True, cwd=ROOT, env=env, capture_output=True)
    for seed in (0, 1):
        assert read_rows(part, seed) == read_rows(clean, seed)
        got, want = scalars(part / f"seed_{seed}" / "tb"), scalars(clean / f"seed_{seed}" / "tb")
        assert (
            set(got)
            == set(want)
            == {
                "bin",
                "examples",
                "squared_error",
                "weight_magnitude",
                "dead_units",
                "effective_rank",
                "units_replaced",
            }
        )
        for tag in want:
            steps = [s for s, _ in got[tag]]
            assert steps == list(range(10)), tag  # unique, strictly increasing, all of them
            assert got[tag] == want[tag], tag
        # the killed run's third row is in its event file: TensorBoard drops it (purge_step)
        assert raw_steps(part / f"seed_{seed}" / "tb", "squared_error").count(2) == 2
