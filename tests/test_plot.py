"""scripts/plot.py and ppo_cbp.reporting.figures on small synthetic run folders of both kinds."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tyro

from ppo_cbp.ppo.settings import presets
from ppo_cbp.reporting import figures as plotting
from ppo_cbp.reporting.figures import bin_by_step, group_runs, load_runs, mean_and_se, plot_runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import plot as plot_script  # noqa: E402

PM_KEYS = ("task", "accuracy", "dead_units_1", "dead_units_2", "dead_fraction")
PM_KEYS += ("effective_rank_1", "effective_rank_2", "weight_magnitude")


def supervised_run(folder: Path, method: str, rows_per_seed: dict[int, list[dict]], **cfg):
    """A run folder laid out as ppo_cbp.benchmarks.common.RunOutputs writes it."""
    folder.mkdir(parents=True)
    config = {
        "seeds": list(rows_per_seed),
        "method": {"method": method, "lr": None},
        "examples_per_task": 60000,
        "width": 100,
        "out": str(folder),
        "device": "cpu",
        "progress": False,
        "resolved_method": {"method": method, "lr": 0.003, "weight_decay": 0.0},
        "resolved_tasks": 10,
    }
    config.update(cfg)
    (folder / "config.json").write_text(json.dumps(config))
    for seed, rows in rows_per_seed.items():
        d = folder / f"seed_{seed}"
        d.mkdir()
        with open(d / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def pm_rows(acc: list[float], wm: float = 1.0) -> list[dict]:
    return [
        {
            "task": t,
            "accuracy": a,
            "dead_units_1": 1,
            "dead_units_2": 2,
            "dead_fraction": 0.25 * a,
            "effective_rank_1": 10.0 + t,
            "effective_rank_2": 5.0 * a,
            "weight_magnitude": wm + t,
        }
        for t, a in enumerate(acc)
    ]


def read_plotted(csv_path: Path) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            out.setdefault((r["panel"], r["group"]), []).append(r)
    return out


def num(s: str) -> float:
    return math.nan if s == "" else float(s)


def test_mean_and_se_by_hand():
    v = np.array([[0.5, 1.0, np.nan], [0.7, 3.0, 2.0], [0.9, np.nan, np.nan]])
    mean, se, n = mean_and_se(v)
    # column 0: mean 0.7, sample std 0.2; column 1: mean 2, std sqrt(2); column 2: one value
    assert mean[0] == pytest.approx(0.7) and se[0] == pytest.approx(0.2 / math.sqrt(3))
    assert mean[1] == pytest.approx(2.0) and se[1] == pytest.approx(math.sqrt(2) / math.sqrt(2))
    assert mean[2] == 2.0 and math.isnan(se[2])
    assert n.tolist() == [3, 2, 1]


def test_bin_by_step_by_hand():
    steps = np.array([50, 100, 101, 150, 250, 301])
    values = np.array([1.0, 3.0, 10.0, 20.0, 7.0, 99.0])
    # bins (0,100], (100,200], (200,300]; step 301 is beyond 3 bins
    np.testing.assert_array_equal(bin_by_step(steps, values, 100, 3), [2.0, 15.0, 7.0])
    np.testing.assert_array_equal(bin_by_step(steps, values, 100, 3, "max"), [3.0, 20.0, 7.0])
    empty = bin_by_step(np.array([350]), np.array([1.0]), 100, 4)
    assert np.isnan(empty[:3]).all() and empty[3] == 1.0


def test_supervised_grouping_means_and_files(tmp_path, capsys):
    runs = tmp_path / "runs"
    # bp: three seeds in one folder
    supervised_run(
        runs / "bp",
        "bp",
        {0: pm_rows([0.5, 0.6]), 1: pm_rows([0.7, 0.8]), 2: pm_rows([0.9, 0.7])},
    )
    # cbp: the same configuration split over two folders (different --out) -> one group;
    # seed 2 is shorter (an unfinished run)
    supervised_run(
        runs / "cbp_a", "cbp", {0: pm_rows([0.2, 0.4, 0.9]), 1: pm_rows([0.4, 0.2, 0.9])}
    )
    supervised_run(runs / "cbp_b", "cbp", {2: pm_rows([0.9, 0.3])}, seeds=[2])
    out = tmp_path / "fig"
    assert plot_script.main([str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for ext in ("png", "pdf", "csv", "json"):
        assert (out / f"permuted_mnist.{ext}").stat().st_size > 0
    assert "Backprop (n=3)" in printed and "CBP (n=3)" in printed
    assert "common prefix of 2" in printed

    got = read_plotted(out / "permuted_mnist.csv")
    bp = got[("accuracy", "Backprop")]
    assert [num(r["x"]) for r in bp] == [1.0, 2.0]
    # task 1: (0.5, 0.7, 0.9) -> mean 0.7, SE 0.2 / sqrt 3
    assert num(bp[0]["mean"]) == pytest.approx(0.7)
    assert num(bp[0]["se"]) == pytest.approx(0.2 / math.sqrt(3))
    # task 2: (0.6, 0.8, 0.7) -> mean 0.7, std 0.1
    assert num(bp[1]["mean"]) == pytest.approx(0.7)
    assert num(bp[1]["se"]) == pytest.approx(0.1 / math.sqrt(3))
    cbp = got[("accuracy", "CBP")]
    assert len(cbp) == 2  # common prefix of lengths 3, 3, 2
    assert num(cbp[0]["mean"]) == pytest.approx(0.5)  # (0.2, 0.4, 0.9)
    assert num(cbp[0]["se"]) == pytest.approx(math.sqrt(0.13) / math.sqrt(3))
    # dead units in percent (dead_fraction * 100) and effective rank summed over layers
    dead = got[("dead_units_pct", "Backprop")]
    assert num(dead[0]["mean"]) == pytest.approx(100 * 0.25 * 0.7)
    rank = got[("effective_rank", "Backprop")]
    assert num(rank[1]["mean"]) == pytest.approx(11.0 + 5.0 * 0.7)
    assert num(rank[1]["se"]) == pytest.approx(5.0 * 0.1 / math.sqrt(3))

    meta = json.loads((out / "permuted_mnist.json").read_text())
    groups = {g["label"]: g for g in meta["groups"]}
    assert groups["CBP"]["seeds"] == [0, 1, 2] and len(groups["CBP"]["runs"]) == 2
    assert any("common prefix" in m for m in meta["notes"])
    assert "common prefix" in meta["title"]
    assert meta["panels"]["accuracy"]["CBP"]["last"]["mean"] == pytest.approx(0.3)


def test_same_method_different_config_gets_distinct_labels(tmp_path):
    runs = tmp_path / "runs"
    for wd in (1e-3, 1e-4):
        supervised_run(
            runs / f"l2_{wd}",
            "l2",
            {0: pm_rows([0.5])},
            resolved_method={"method": "l2", "lr": 0.003, "weight_decay": wd},
        )
    groups = group_runs(load_runs([runs]))
    assert sorted(g.label for g in groups) == [
        "L2",  # the benchmark's L2 default, 1e-4
        "L2 (weight_decay=0.001)",
    ]


def test_missing_metric_skips_panel_and_one_seed_has_no_band(tmp_path, capsys):
    run = tmp_path / "scr_bp"
    rows = [
        {"bin": b, "examples": (b + 1) * 40000, "squared_error": e}
        for b, e in enumerate([2.0, 1.0])
    ]
    supervised_run(
        run,
        "bp",
        {3: rows},
        bin_size=40000,
        examples=80000,
        resolved_method={"method": "bp", "lr": 0.01, "weight_decay": 0.0},  # SCR's defaults
    )
    results = plot_runs([run], tmp_path / "fig", name="scr_small")
    assert [r.name for r in results] == ["scr_small", "scr_small_all", "scr_small_table"]
    assert {f.name for f in results[2].files} == {
        "scr_small_table.md",
        "scr_small_table.csv",
        "scr_small_table_metrics.md",
    }
    # one seed: final (the last bin, 1) and AUC (1.5 over both bins) without an interval
    assert "| Backprop | 1 | 1 | 1.5 |" in (tmp_path / "fig" / "scr_small_table.md").read_text()
    assert (tmp_path / "fig" / "scr_small.png").exists()
    assert (tmp_path / "fig" / "scr_small.pdf").exists()
    got = read_plotted(tmp_path / "fig" / "scr_small.csv")
    assert set(got) == {("squared_error", "Backprop")}  # no weight_magnitude column
    assert [num(r["x"]) for r in got[("squared_error", "Backprop")]] == [40000, 80000]
    assert all(math.isnan(num(r["se"])) for r in got[("squared_error", "Backprop")])
    assert "weight_magnitude; panel skipped" in capsys.readouterr().out


def ppo_run(folder: Path, seed: int, scalars: dict[str, list[tuple[int, float]]], **cfg):
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True)
    config = {
        "env": "Hopper-v4",
        "steps": 300,
        "seed": seed,
        "run_name": folder.name,
        "runs_dir": str(folder.parent),
        "cbp": False,
        "l2": False,
        "redo": False,
        "shrink_perturb": False,
        "standard_adam": False,
        "friction_every": 100,
    }
    config.update(cfg)
    # the optimizer settings the trainer's presets give these method flags, unless given
    config = {**presets(SimpleNamespace(**config)), **config}
    (folder / "config.json").write_text(json.dumps(config))
    w = SummaryWriter(str(folder))
    for tag, points in scalars.items():
        for step, value in points:
            w.add_scalar(tag, value, step)
    w.close()


def test_ppo_tensorboard_runs_binned_by_step(tmp_path, capsys):
    runs = tmp_path / "runs"
    p = "plasticity/policy/"
    common = {
        "env/friction": [(100, 1.0), (200, 0.5), (300, 0.5)],
        p + "max_weight_change": [(100, 1.0), (150, 4.0), (200, 2.0), (300, 3.0)],
        p + "dead_units": [(100, 0.1), (200, 0.2), (300, 0.3)],
    }
    ppo_run(
        runs / "a_s1",
        1,
        {"charts/episodic_return": [(50, 10.0), (100, 20.0), (150, 30.0)], **common},
    )
    ppo_run(
        runs / "a_s2",
        2,
        {"charts/episodic_return": [(60, 40.0), (170, 50.0), (290, 60.0)], **common},
    )
    # standard Adam: one seed, without plasticity scalars
    ppo_run(
        runs / "std_s1",
        1,
        {
            "charts/episodic_return": [(100, 5.0), (200, 6.0), (300, 7.0)],
            "env/friction": [(300, 1.0)],
        },
        standard_adam=True,
        adam_beta1=0.9,
        adam_beta2=0.999,
    )
    out = tmp_path / "fig"
    assert plot_script.main([str(runs), "--out", str(out), "--bin", "100"]) == 0
    printed = capsys.readouterr().out
    for ext in ("png", "pdf", "csv", "json"):
        assert (out / f"ppo_Hopper-v4.{ext}").exists()
    assert "Tuned Adam (n=2)" in printed and "Standard Adam (n=1)" in printed
    got = read_plotted(out / "ppo_Hopper-v4.csv")
    tuned = got[("episodic_return", "Tuned Adam")]
    assert [num(r["x"]) for r in tuned] == [100, 200, 300]
    # seed 1 bins: (10+20)/2, 30, none; seed 2 bins: 40, 50, 60
    assert num(tuned[0]["mean"]) == pytest.approx((15 + 40) / 2)
    assert num(tuned[0]["se"]) == pytest.approx(np.std([15, 40], ddof=1) / math.sqrt(2))
    assert num(tuned[1]["mean"]) == pytest.approx(40.0)
    assert num(tuned[2]["mean"]) == 60.0 and int(tuned[2]["n"]) == 1
    change = got[("max_weight_change", "Tuned Adam")]
    assert [num(r["mean"]) for r in change] == [1.0, 4.0, 3.0]  # max per bin
    dead = got[("dead_units_pct", "Tuned Adam")]
    assert [num(r["mean"]) for r in dead] == pytest.approx([10.0, 20.0, 30.0])
    assert ("dead_units_pct", "Standard Adam") not in got
    assert not any(panel == "stable_rank" for panel, _ in got)  # nobody logs it: skipped
    std = got[("episodic_return", "Standard Adam")]
    assert [num(r["mean"]) for r in std] == [5.0, 6.0, 7.0]
    groups = group_runs(load_runs([runs]))
    tuned = next(g for g in groups if g.method == "tuned_adam")
    assert plotting.friction_changes(tuned.runs).tolist() == [200]


def test_empty_or_wrong_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert plot_script.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run folders under") and err.count("\n") == 1
    assert plot_script.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bin size"):
        plot_runs([tmp_path / "empty"], tmp_path / "o", bin_size=0)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_script_runs_from_the_shell(tmp_path):
    supervised_run(tmp_path / "r", "adam", {0: pm_rows([0.5, 0.6])})
    ok = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/plot.py"),
            str(tmp_path / "r"),
            "--out",
            str(tmp_path / "f"),
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "f" / "permuted_mnist.pdf").exists()
    bad = subprocess.run(
        [sys.executable, str(ROOT / "scripts/plot.py"), str(tmp_path / "f")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "error: no run folders under" in bad.stderr


# --------------------------------------------------------------------------------------------
# Bands, legends and ticks


def test_bands_are_the_bootstrap_ci_and_say_so(tmp_path, monkeypatch):
    from scipy import stats as sps

    acc = {0: [0.5, 0.6, 0.2], 1: [0.7, 0.8, 0.2], 2: [0.9, 0.7, 0.2], 3: [0.4, 0.65, 0.2]}
    supervised_run(tmp_path / "runs" / "bp", "bp", {s: pm_rows(a) for s, a in acc.items()})
    figures = _close_recorder(monkeypatch)
    argv = [str(tmp_path / "runs"), "--out", str(tmp_path / "f"), "--resamples", "2000"]
    assert plot_script.main(argv + ["--bootstrap-seed", "4"]) == 0
    rows = read_plotted(tmp_path / "f" / "permuted_mnist.csv")[("accuracy", "Backprop")]
    for t in range(2):
        ref = sps.bootstrap(
            (np.array([a[t] for a in acc.values()]),), np.mean, n_resamples=2000,
            rng=np.random.default_rng(4),
        ).confidence_interval  # fmt: skip
        assert num(rows[t]["ci_low"]) == pytest.approx(ref.low, rel=1e-9)
        assert num(rows[t]["ci_high"]) == pytest.approx(ref.high, rel=1e-9)
    assert num(rows[2]["ci_low"]) == num(rows[2]["ci_high"]) == 0.2  # equal scores
    fig = figures[0]  # then the figure of every metric
    title = fig.legends[0].get_title().get_text().replace("\n", " ")
    assert title == "shaded: 95% bootstrap CI of the mean over seeds (BCa, 2,000 resamples)"
    ax = fig.axes[0]
    (band,) = ax.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.max() == pytest.approx(max(num(r["ci_high"]) for r in rows))
    assert ys.min() == pytest.approx(min(num(r["ci_low"]) for r in rows))

    assert plot_script.main(argv + ["--band", "se"]) == 0
    fig = figures[-1]
    title = fig.legends[0].get_title().get_text().replace("\n", " ")
    assert title == "shaded: ±1 standard error of the mean over seeds"
    ys = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert ys.max() == pytest.approx(max(num(r["mean"]) + num(r["se"]) for r in rows))


def _axes_inches(fig) -> list[tuple[float, float]]:
    w, h = fig.get_size_inches()
    return [(ax.get_position().width * w, ax.get_position().height * h) for ax in fig.axes]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["supervised", "ppo"])
def test_a_150_character_label_leaves_the_axes_their_size(tmp_path, monkeypatch, kind):
    sizes = {}
    for name, value in (("short", "a"), ("long", "x" * 150)):
        runs = tmp_path / name
        for other in ("b", value):
            if kind == "supervised":
                rows = {s: pm_rows([0.5 + 0.1 * s, 0.6]) for s in (0, 1)}
                supervised_run(runs / other[:9], "cbp", rows, paper_exact=other, label=other)
            else:
                for seed in (1, 2):
                    ppo_run(
                        runs / f"{other[:9]}_{seed}", seed,
                        {"charts/episodic_return": [(100, seed), (200, 2.0 * seed)],
                         "plasticity/policy/dead_units": [(100, 0.1), (200, 0.2)]},
                        cbp=True, paper_exact=other, label=other,
                    )  # fmt: skip
        figures = _close_recorder(monkeypatch)
        assert (
            plot_script.main([str(runs), "--out", str(tmp_path / f"f_{name}"), "--bin", "100"]) == 0
        )
        fig = figures[0]  # then the figure of every metric
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert any(len(t) > 150 for t in labels) == (name == "long")
        sizes[name] = _axes_inches(fig)
    for (w0, h0), (w1, h1) in zip(sizes["short"], sizes["long"]):
        assert w1 == pytest.approx(w0, rel=0.03) and h1 == pytest.approx(h0, rel=0.03)


def test_one_task_run_has_integer_ticks(tmp_path, monkeypatch):
    supervised_run(tmp_path / "runs" / "bp", "bp", {0: pm_rows([0.5]), 1: pm_rows([0.7])})
    figures = _close_recorder(monkeypatch)
    assert plot_script.main([str(tmp_path / "runs"), "--out", str(tmp_path / "f")]) == 0
    fig = figures[0]  # then the figure of every metric
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks == [1.0]
        shown = [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
        assert shown == ["1"]
    # the one point's band is an error bar from the CI's ends
    rows = read_plotted(tmp_path / "f" / "permuted_mnist.csv")[("accuracy", "Backprop")]
    (bar,) = [c for c in fig.axes[0].collections if len(c.get_segments())]
    ((_, y0), (_, y1)) = bar.get_segments()[0]
    assert (y0, y1) == pytest.approx((num(rows[0]["ci_low"]), num(rows[0]["ci_high"])))


# --------------------------------------------------------------------------------------------
# scripts/reproduce.py: command construction, skip/resume decisions, the paper budget

import reproduce  # noqa: E402


def test_reproduce_small_commands_scale_every_length(tmp_path):
    exps = reproduce.small_experiments(
        tmp_path, 0.5, tmp_path / "mnist", ("scr", "permuted_mnist", "ppo")
    )
    by = {e.name: e for e in exps}
    assert [e.method for e in exps if e.benchmark == "scr"] == ["bp", "l2", "snp", "cbp"]
    assert [e.method for e in exps if e.benchmark == "permuted_mnist"] == [
        "bp",
        "l2",
        "snp",
        "cbp",
        "adam",
    ]
    n_ppo = len(reproduce.PPO_METHODS) * len(reproduce.PPO_SEEDS)
    assert sum(e.benchmark == "ppo" for e in exps) == n_ppo
    scr = by["scr_cbp"].command
    bins = round(reproduce.SCR_EXAMPLES // reproduce.SCR_BIN * 0.5)
    assert scr[scr.index("--examples") + 1] == str(bins * reproduce.SCR_BIN)
    assert scr[scr.index("--method") + 1] == "cbp" and scr[scr.index("--activation") + 1] == "relu"
    assert scr[scr.index("--seeds") + 1 : scr.index("--seeds") + 1 + len(reproduce.SCR_SEEDS)] == [
        str(s) for s in reproduce.SCR_SEEDS
    ]
    pm = by["pm_adam"].command
    assert pm[pm.index("--tasks") + 1] == str(round(reproduce.PM_TASKS * 0.5))
    assert pm[pm.index("--width") + 1] == str(reproduce.PM_WIDTH)
    assert pm[pm.index("--data-dir") + 1] == str(tmp_path / "mnist")
    ppo = {e.method: e.command for e in exps if e.benchmark == "ppo" and e.seeds == [0]}
    assert (
        "--standard-adam" in ppo["standard_adam"] and "--cbp" in ppo["cbp"] and "--l2" in ppo["l2"]
    )
    assert not {"--standard-adam", "--cbp", "--l2"} & set(ppo["tuned_adam"])
    c = ppo["cbp"]
    assert c[c.index("--steps") + 1] == str(round(reproduce.PPO_STEPS * 0.5))
    assert c[c.index("--friction-every") + 1] == str(round(reproduce.PPO_FRICTION_EVERY * 0.5))
    assert c[c.index("--env") + 1] == reproduce.PPO_ENV


def test_reproduce_compare_budget_every_method_both_benchmarks(tmp_path):
    """The comparison: every method the MLP benchmarks take (each suite method but PPO's
    C-CHAIN, alone or with the method it needs) and the README's combinations, on SCR at the
    paper's length with 8 seeds and on Permuted MNIST with 5 seeds, 10 tasks of 60,000; only
    the runs of COMPARE_SKIP left out."""
    from ppo_cbp.benchmarks.common import METHODS

    exps = reproduce.compare_experiments(
        tmp_path, 1.0, tmp_path / "mnist", ("scr", "permuted_mnist")
    )
    methods = {m for e in exps for m in e.method.split("+")}
    assert methods == set(METHODS)
    assert {"cbp+l2_init+layer_norm", "adam+redo+adam_reset"} <= {e.method for e in exps}
    for bench in ("scr", "permuted_mnist"):
        ran = [e.method for e in exps if e.benchmark == bench]
        skipped = [m for (b, m) in reproduce.COMPARE_SKIP if b == bench]
        assert sorted(ran + skipped) == sorted(reproduce.COMPARE_METHODS)
    by = {e.name: e.command for e in exps}
    scr = by["scr_cbp"]
    assert scr[scr.index("--examples") + 1] == "3000000"
    assert scr[scr.index("--seeds") + 1 : scr.index("--out")] == [str(s) for s in range(8)]
    pm = by["pm_adam+trac"]
    assert pm[pm.index("--examples-per-task") + 1] == "60000"
    assert pm[pm.index("--tasks") + 1] == "10" and pm[pm.index("--width") + 1] == "100"
    assert pm[pm.index("--seeds") + 1 : pm.index("--data-dir")] == [str(s) for s in range(5)]
    assert all(e.run_dir.parent == tmp_path for e in exps)


def test_reproduce_skips_finished_resumes_partial_refuses_conflict(tmp_path, capsys):
    exps = reproduce.scr_experiments(tmp_path, 1.0)
    bins = reproduce.SCR_EXAMPLES // reproduce.SCR_BIN
    seeds = list(reproduce.SCR_SEEDS)
    for e, state in zip(exps, ("finished", "partial", "conflict", "new")):
        if state == "new":
            continue
        e.run_dir.mkdir()
        cfg = {
            "bins": bins if state != "conflict" else 3,
            "bin_size": reproduce.SCR_BIN,
            "seeds": seeds,
        }
        (e.run_dir / "config.json").write_text(json.dumps(cfg))
        if state == "finished":
            (e.run_dir / "summary.json").write_text(json.dumps({"bins_completed": bins}))
        else:
            (e.run_dir / "checkpoint.pt").write_bytes(b"")
    assert [reproduce.run_state(e)[0] for e in exps] == ["finished", "partial", "conflict", "new"]
    records = reproduce.run_all(exps, jobs=1, dry_run=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[skip] scr_bp")
    assert out[1].startswith("[run] OMP_NUM_THREADS=1 python scripts/supervised.py") and out[
        1
    ].endswith("--resume")
    assert out[2].startswith("[fail] scr_snp")
    assert out[3].startswith("[run]") and not out[3].endswith("--resume")
    assert [r["status"] for r in records] == ["skipped", "dry-run", "conflict", "dry-run"]


@pytest.mark.slow
def test_reproduce_paper_budget_prints_without_running(tmp_path, capsys):
    """The printed commands parse with the trainers' own parsers and carry the paper's
    protocols: Ant with friction changes every 2M steps, Hopper and Walker2d stationary for 100M
    steps (Extended Data Fig. 5a), each group under a line that names it."""
    import shlex

    import supervised

    from ppo_cbp.benchmarks.permuted_mnist import PermutedMNISTConfig
    from ppo_cbp.benchmarks.scr import SCRConfig
    from ppo_cbp.ppo.settings import resolve_args
    from ppo_cbp.train import Args

    runs = tmp_path / "runs"
    assert reproduce.main(["--budget", "paper", "--runs-dir", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# Full-scale commands (not run")
    groups: dict[str, list[list[str]]] = {}
    for line in lines[1:]:
        if line.startswith("# "):
            title = line[2:]
            groups[title] = []
            continue
        argv = shlex.split(line)
        while "=" in argv[0]:  # environment variables in front of the command
            argv.pop(0)
        assert argv[0] == "python"
        groups[title].append(argv[1:])
    titles = list(groups)
    assert len(titles) == 5
    scr, pm, ant, hopper, walker = (groups[t] for t in titles)
    assert "Slowly-Changing Regression" in titles[0] and "Permuted MNIST" in titles[1]
    assert "Ant" in titles[2] and "every 2M steps" in titles[2]
    for t in titles[3:]:
        assert "without friction changes" in t and "Extended Data Fig. 5a" in t
    assert "Hopper" in titles[3] and "Walker2d" in titles[4]

    for argv in scr + pm:
        assert argv[0] == "scripts/supervised.py"
        cfg = supervised.parse(argv[1:])
        assert cfg.seeds == list(range(30))
        if argv in scr:
            assert isinstance(cfg, SCRConfig) and cfg.examples == 3_000_000
        else:
            assert isinstance(cfg, PermutedMNISTConfig)
            assert (cfg.tasks, cfg.width, cfg.examples_per_task) == (800, 2000, 60_000)
    assert len(scr) == 4 and len(pm) == 5

    def ppo(argvs):
        out = []
        for argv in argvs:
            assert argv[0] == "ppo_cbp/train.py"
            out.append(resolve_args(tyro.cli(Args, args=argv[1:])))
        return out

    n = len(reproduce.PPO_METHODS)
    assert len(ant) == n * 100 and len(hopper) == len(walker) == n * 30
    for a in ppo(ant):
        assert (a.env, a.steps, a.friction_every) == ("Ant-v4", 20_000_000, 2_000_000)
        assert a.friction_at_episode_boundary and 0 <= a.seed < 100
    for env, argvs in (("Hopper-v4", hopper), ("Walker2d-v4", walker)):
        parsed = ppo(argvs)
        assert all((a.env, a.steps, a.friction_every) == (env, 100_000_000, 0) for a in parsed)
        assert sorted({a.seed for a in parsed}) == list(range(30))
        methods = {(a.cbp, a.l2, a.standard_adam) for a in parsed}
        assert methods == {
            (False, False, True),
            (False, False, False),
            (False, True, False),
            (True, False, False),
        }
    names = [a.run_name for a in ppo(ant + hopper + walker)]
    assert len(set(names)) == len(names)  # one folder per run
    assert not runs.exists()
    assert reproduce.main(["--launch"]) == 2


# --------------------------------------------------------------------------------------------
# Defaults a user meets first: bins from the data, curves across empty bins, figures beside
# the runs, repeated seeds, one-line errors


def test_readable_bin_by_hand():
    # nearest of 1, 2, 5 x 10^k to span / 100 on a log scale
    assert plotting.readable_bin(200_000) == 2_000
    assert plotting.readable_bin(200_704) == 2_000
    assert plotting.readable_bin(1_000_000) == 10_000
    # 30,000 wanted: 20,000 is a factor 1.5 away, 50,000 a factor 1.67
    assert plotting.readable_bin(3_000_000) == 20_000
    # 70 wanted: 50 is a factor 1.4 away, 100 a factor 1.43
    assert plotting.readable_bin(7_000) == 50
    assert plotting.readable_bin(50) == 1


def _close_recorder(monkeypatch) -> list:
    """Figures as plot_runs hands them to plt.close (after saving them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close

    def close(fig=None):
        figures.append(fig)
        real_close(fig)

    monkeypatch.setattr(plt, "close", close)
    return figures


def test_ppo_bins_from_the_data_and_lines_across_empty_bins(tmp_path, monkeypatch, capsys):
    # The README's run length: 200,000 steps; episodes end every 1,000 steps, the plasticity
    # metrics come every 10 updates of 2,048 steps, so most 2,000-step bins hold none.
    p = "plasticity/policy/"
    metric_steps = list(range(20_480, 200_001, 20_480))  # 9 points
    ppo_run(
        tmp_path / "runs" / "Hopper-v4__cbp__s1__1",
        1,
        {
            "charts/episodic_return": [(s, s / 1000.0) for s in range(1000, 200_001, 1000)],
            p + "dead_units": [(s, 0.01 * i) for i, s in enumerate(metric_steps)],
        },
        steps=200_000,
        cbp=True,
    )
    figures = _close_recorder(monkeypatch)
    assert plot_script.main([str(tmp_path / "runs")]) == 0
    assert "bins of 2,000 steps" in capsys.readouterr().out
    out = tmp_path / "runs" / "figures"  # beside the runs, not in the repository
    got = read_plotted(out / "ppo_Hopper-v4.csv")
    ret = got[("episodic_return", "CBP")]
    assert [num(r["x"]) for r in ret] == [2000.0 * (b + 1) for b in range(100)]
    # bin b holds the episodes ending at 2000b + 1000 and 2000b + 2000: mean 2b + 1.5
    assert [num(r["mean"]) for r in ret] == pytest.approx([2 * b + 1.5 for b in range(100)])
    dead = got[("dead_units_pct", "CBP")]
    assert len(dead) == 100 and sum(r["mean"] != "" for r in dead) == 9

    fig = figures[0]  # then the figure of every metric
    ax_dead = next(ax for ax in fig.axes if ax.get_ylabel().startswith("Dead units"))
    (line,) = ax_dead.get_lines()
    x, y = line.get_xdata(), line.get_ydata()
    # one line through the 9 bins that hold a value (each at its bin's right edge), no gaps
    want_x = [2000.0 * ((s - 1) // 2000 + 1) for s in metric_steps]
    assert list(x) == want_x
    assert list(y) == pytest.approx([100 * 0.01 * i for i in range(9)])
    assert line.get_marker() == "o"  # few points: each is marked


def test_drawn_points_skip_empty_bins_and_keep_band_gaps():
    s = plotting.Series(
        "CBP", "cbp", x=np.array([1.0, 2.0, 3.0, 4.0]),
        mean=np.array([1.0, np.nan, 3.0, 5.0]), se=np.array([0.5, np.nan, np.nan, 1.0]),
        n=np.array([2, 0, 1, 2]), n_seeds=2,
        ci_low=np.array([0.2, np.nan, np.nan, 4.5]), ci_high=np.array([1.9, np.nan, np.nan, 5.2]),
        values=np.full((2, 4), np.nan),
    )  # fmt: skip
    x, mean, lo, hi = plotting.drawn_points(s, "se")
    assert x.tolist() == [1.0, 3.0, 4.0] and mean.tolist() == [1.0, 3.0, 5.0]
    assert lo[0] == 0.5 and hi[0] == 1.5 and lo[2] == 4.0 and hi[2] == 6.0
    assert np.isnan(lo[1]) and np.isnan(hi[1])  # one seed there: no band
    x, mean, lo, hi = plotting.drawn_points(s)  # the bootstrap CI by default
    assert x.tolist() == [1.0, 3.0, 4.0]
    assert lo.tolist()[::2] == [0.2, 4.5] and hi.tolist()[::2] == [1.9, 5.2]
    assert np.isnan(lo[1]) and np.isnan(hi[1])


@pytest.mark.slow
def test_figures_default_to_the_runs_common_parent(tmp_path, capsys):
    sweep = tmp_path / "runs" / "scr"
    supervised_run(sweep / "lr=0.01__s0", "bp", {0: pm_rows([0.5, 0.6])})
    supervised_run(sweep / "lr=0.01__s1", "bp", {1: pm_rows([0.7, 0.8])})
    assert plot_script.main([str(sweep)]) == 0
    assert (sweep / "figures" / "permuted_mnist.png").exists()
    # from a folder above: the same deepest common folder; figures/ is no run folder
    assert plot_script.main([str(tmp_path)]) == 0
    assert f"wrote {sweep / 'figures' / 'permuted_mnist.png'}" in capsys.readouterr().out
    assert not (tmp_path / "figures").exists()
    # one run folder: figures beside it
    supervised_run(tmp_path / "runs" / "pm", "adam", {0: pm_rows([0.5])})
    assert plot_script.main([str(tmp_path / "runs" / "pm")]) == 0
    assert (tmp_path / "runs" / "figures" / "permuted_mnist.png").exists()
    assert plotting.default_out_dir([sweep / "a", tmp_path / "runs" / "b"]) == (
        tmp_path / "runs" / "figures"
    )


@pytest.mark.slow
def test_run_folders_inside_a_run_folder_are_named_in_a_warning(tmp_path, capsys):
    """Fix: a sweep written into a benchmark run's folder had its trials skipped without a word."""
    run = tmp_path / "runs" / "scr"
    supervised_run(run, "bp", {0: pm_rows([0.5, 0.6])})
    trials = [run / f"lr=0.01__s{s}" for s in (0, 1)]
    for s, trial in enumerate(trials):
        supervised_run(trial, "cbp", {s: pm_rows([0.7, 0.8])})
    warning = (
        f"warning: {run} is a run folder, so the run folders inside it are not plotted: "
        f"{trials[0]} and 1 more; give their paths to plot them"
    )
    for given in (run, tmp_path / "runs"):
        assert plot_script.main([str(given), "--out", str(tmp_path / "f")]) == 0
        out, err = capsys.readouterr()
        assert err.splitlines() == [warning]
        assert "permuted_mnist: Backprop (n=1)\n" in out
    assert plot_script.main([*map(str, trials), "--out", str(tmp_path / "f")]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "permuted_mnist: CBP (n=2)\n" in out


def test_repeated_seed_is_named_and_folders_or_a_glob_pick_one(tmp_path, capsys):
    runs = tmp_path / "runs"
    for stamp in ("100", "200"):
        ppo_run(
            runs / f"Hopper-v4__cbp__s1__{stamp}", 1,
            {"charts/episodic_return": [(100, 1.0), (200, 2.0)]}, cbp=True,
        )  # fmt: skip
    ppo_run(runs / "Hopper-v4__cbp__s2__300", 2, {"charts/episodic_return": [(100, 3.0)]}, cbp=True)
    assert plot_script.main([str(runs), "--bin", "100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: run folders repeat a seed")
    assert "seed 1 in" in err and "__s1__100" in err and "__s1__200" in err
    assert "__s2__" not in err and "quoted glob" in err
    assert not (runs / "figures").exists()  # nothing written
    # a glob (as a quoted pattern reaches the script) picks the later run and seed 2
    assert plot_script.main([str(runs / "Hopper-v4__cbp__s[12]__[23]00"), "--bin", "100"]) == 0
    meta = json.loads((runs / "figures" / "ppo_Hopper-v4.json").read_text())
    (group,) = meta["groups"]
    assert group["seeds"] == [1, 2] and all("__100" not in r for r in group["runs"])
    # or the folders themselves
    assert plot_script.main([str(runs / "Hopper-v4__cbp__s1__100"), "--bin", "100"]) == 0


@pytest.mark.parametrize(
    "argv, names",
    [
        (["RUNS", "--bin", "0"], "--bin must be >= 1, got 0"),
        (["RUNS", "--bin", "-5"], "got -5"),
        (["RUNS", "--task-bin", "0"], "--task-bin must be >= 1, got 0"),
        (["RUNS", "--bin", "abc"], "'abc'"),
        (["RUNS", "--network", "critic"], "'critic'"),
        (["RUNS/nope"], "nope does not exist"),
        (["RUNS/zz*"], "no path matches"),
        ([], "no run folders given"),
        (["RUNS", "--out", "RUNS/r/config.json"], "is a file"),
        # Fix: os.access let root through to a traceback at the first write
        (["RUNS", "--out", "/proc/x"], "--out /proc/x cannot be written: /proc is not writable"),
        (["RUNS", "--out", "RUNS/r/config.json/f"], "RUNS/r/config.json is not a folder"),
        (["RUNS", "--resamples", "0"], "--resamples must be >= 1, got 0"),
        (["RUNS", "--band", "sd"], "'sd'"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, argv, names):
    runs = tmp_path / "runs"
    supervised_run(runs / "r", "bp", {0: pm_rows([0.5])})
    before = sorted(p for p in tmp_path.rglob("*"))
    argv = [a.replace("RUNS", str(runs)) for a in argv]
    assert plot_script.main(argv) == 2
    err = capsys.readouterr().err
    names = names.replace("RUNS", str(runs))
    assert err.startswith("error: ") and err.count("\n") == 1 and names in err, err
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not Path("/proc/x").exists()


def test_unreadable_run_files_are_named(tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    supervised_run(run, "bp", {0: pm_rows([0.5, 0.6])})
    csv_path = run / "seed_0" / "metrics.csv"
    csv_path.write_text("task,accuracy\n0,0.5\n1,\n2,0.7\n")
    assert plot_script.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{csv_path} is unreadable (row 2: " in err
    # a last row cut short, as a running benchmark may leave it: dropped with a note
    csv_path.write_text("task,accuracy\n0,0.5\n1,0.6\n2")
    assert plot_script.main([str(run), "--out", str(tmp_path / "f")]) == 0
    assert "last row incomplete" in capsys.readouterr().out
    got = read_plotted(tmp_path / "f" / "permuted_mnist.csv")
    assert [num(r["mean"]) for r in got[("accuracy", "Backprop")]] == [0.5, 0.6]
    (run / "config.json").write_text('{"seeds": [0')
    assert plot_script.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run / 'config.json'} is unreadable" in err
    assert not (tmp_path / "runs" / "figures").exists()


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--budget", "huge"], "'huge'"),
        (["--scale", "0"], "--scale must be a positive number, got 0.0"),
        (["--scale", "abc"], "'abc'"),
        (["--budget", "paper", "--scale", "0.5"], "--scale 0.5 applies to --budget small"),
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--launch"], "--launch only applies to --budget paper"),
        (["--only", "mnist"], "'mnist'"),
        (["--data-dir", "NOPE"], "NOPE/train-images-idx3-ubyte.gz does not exist"),
        (["--runs-dir", "FILE"], "--runs-dir FILE is a file"),
        (["--figures", "FILE"], "--figures FILE is a file"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_reproduce_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, argv, names):
    (tmp_path / "file").write_text("")
    subs = {"NOPE": str(tmp_path / "nope"), "FILE": str(tmp_path / "file")}
    argv = [subs.get(a, a) for a in argv] + (
        ["--dry-run"] if "--runs-dir" in argv or "--figures" in argv else []
    )
    argv += [] if "--runs-dir" in argv else ["--runs-dir", str(tmp_path / "runs")]
    assert reproduce.main(argv) == 2
    err = capsys.readouterr().err
    for k, v in subs.items():
        names = names.replace(k, v)
    assert err.startswith("error: ") and err.count("\n") == 1 and names in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_reproduce_writes_under_runs_and_leaves_docs_figures_alone(tmp_path, monkeypatch, capsys):
    """Fix: the small budget's figures and report went to the tracked docs/figures by default."""
    docs = ROOT / "docs" / "figures"
    tracked = {p: p.read_bytes() for p in docs.rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reproduce, "run_all", lambda exps, jobs, dry_run: [])  # nothing to run
    assert reproduce.main(["--budget", "small", "--only", "scr"]) == 0
    report = tmp_path / "runs" / "repro" / "figures" / "reproduce_small.json"
    assert capsys.readouterr().out == f"wrote {report}\n"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [report]
    # another --runs-dir: its own figures/
    assert reproduce.main(["--only", "scr", "--runs-dir", "elsewhere"]) == 0
    assert (tmp_path / "elsewhere" / "figures" / "reproduce_small.json").is_file()
    assert {p: p.read_bytes() for p in docs.rglob("*") if p.is_file()} == tracked


def test_reproduce_unreadable_checkpoint_fails_that_run_only(tmp_path, capsys):
    exps = reproduce.ppo_experiments(tmp_path, 0.01)
    bad, good = exps[0], exps[1]
    bad.run_dir.mkdir()
    (bad.run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    state, reason = reproduce.run_state(bad)
    assert state == "conflict" and str(bad.run_dir / "checkpoint.pt") in reason
    (bad.run_dir / "checkpoint.pt").write_bytes(b"")
    assert reproduce.run_state(bad)[0] == "conflict"
    records = reproduce.run_all([bad, good], jobs=1, dry_run=True)
    assert [r["status"] for r in records] == ["conflict", "dry-run"]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"[fail] {bad.name}: ") and "is unreadable" in out[0]


def test_update_zero_falls_in_the_first_bin():
    """PPO logs the networks as built at step 0: in the first bin, with the steps up to one bin."""
    binned = bin_by_step(np.array([0, 50, 100, 150]), np.array([1.0, 3.0, 5.0, 7.0]), 100, 2)
    assert binned.tolist() == [3.0, 7.0]


def test_a_panel_without_data_in_range_says_so(tmp_path, monkeypatch):
    """A plasticity scalar logged only past the last whole bin (step 350 of a run whose bins
    of 100 steps end at 300) has no point in the plotted range: its panel says so instead of
    drawing empty axes."""
    ppo_run(
        tmp_path / "runs" / "a_1",
        1,
        {
            "charts/episodic_return": [(100, 1.0), (200, 2.0), (300, 3.0)],
            "plasticity/policy/dead_units": [(350, 0.1)],
        },
    )
    figures = _close_recorder(monkeypatch)
    out = str(tmp_path / "f")
    assert plot_script.main([str(tmp_path / "runs"), "--out", out, "--bin", "100"]) == 0
    fig = figures[0]  # then the figure of every metric
    texts = {ax.get_ylabel(): [t.get_text() for t in ax.texts] for ax in fig.axes}
    dead = next(label for label in texts if label.startswith("Dead units"))
    assert texts[dead] == [f"no {dead.lower()} logged\nin the plotted range"]
    assert not fig.axes[0].texts and fig.axes[0].lines  # the return is drawn


@pytest.mark.parametrize(
    "kind, columns",
    [
        ("imagenet", {"test_accuracy": [0.5, 0.6], "dead_fraction": [0.1, 0.2],
                      "effective_rank": [30.0, 20.0], "stable_rank": [9.0, 8.0],
                      "weight_magnitude": [0.1, 0.2]}),
        ("cifar", {"increment": [0, 1], "test_accuracy": [0.5, 0.4],
                   "dead_percentage": [3.0, 5.0], "effective_rank": [40.0, 35.0]}),
    ],
)  # fmt: skip
def test_every_benchmarks_metrics_are_drawn(tmp_path, kind, columns):
    """One vocabulary: Continual ImageNet's and CIFAR's dead units and effective rank (written
    as ``dead_fraction``/``dead_percentage`` and one ``effective_rank``) are drawn in the
    benchmark's panels, and the companion figure has one panel per column the run wrote."""
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    benchmark = {"imagenet": "continual-imagenet", "cifar": "incremental-cifar"}[kind]
    supervised_run(tmp_path / "runs" / "r", "bp", {0: rows}, benchmark=benchmark)
    results = plot_runs([tmp_path / "runs"], tmp_path / "fig", name="f")
    assert [r.name for r in results] == ["f", "f_all", "f_table"]
    every = results[1]
    assert every.name == "f_all"
    plotted = read_plotted(tmp_path / "fig" / "f.csv")
    dead = [v for (panel, _), v in plotted.items() if panel == "dead_units_pct"]
    rank = [v for (panel, _), v in plotted.items() if panel == "effective_rank"]
    expected_dead = columns.get("dead_percentage") or [100 * x for x in columns["dead_fraction"]]
    assert [num(row["mean"]) for row in dead[0]] == pytest.approx(expected_dead)
    assert [num(row["mean"]) for row in rank[0]] == pytest.approx(columns["effective_rank"])
    drawn = {panel for panel, _ in read_plotted(tmp_path / "fig" / "f_all.csv")}
    assert drawn == {c for c in columns if c != "increment"}


def test_method_by_metric_table_by_hand(tmp_path):
    """The wide table: per configuration and metric, the mean over seeds of each seed's final
    value (the last tenth of the rows: the last of 10) and of its AUC (the mean of the rows),
    written independently here; the IQM only with 8 seeds or more, else a line saying so."""
    values = {0: [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.2, 0.1], 1: [0.5] * 10}
    for method, scale in (("bp", 1.0), ("cbp", 2.0)):
        supervised_run(
            tmp_path / f"pm_{method}",
            method,
            {s: pm_rows([scale * a for a in acc], wm=s) for s, acc in values.items()},
        )
    plot_runs([tmp_path / "pm_bp", tmp_path / "pm_cbp"], tmp_path / "fig")
    text = (tmp_path / "fig" / "table_metrics.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| Backprop |")]
    final, auc = ([c.strip() for c in r.split("|")[1:-1]] for r in rows)
    header = next(line for line in text.splitlines() if line.startswith("| Method |"))
    columns = [c.strip() for c in header.split("|")[1:-1]]
    accuracy = columns.index("accuracy" if "accuracy" in columns else columns[2])
    # final accuracy: seeds' last rows 0.1 and 0.5 -> 0.3; AUC: means 0.47 and 0.5 -> 0.485
    assert final[accuracy].startswith("0.3 [")
    assert auc[accuracy].startswith("0.485 [")
    weight = next(i for i, c in enumerate(columns) if "eight" in c)
    # weight magnitude wm + t: final 9 + seed (mean 9.5), AUC 4.5 + seed (mean 5)
    assert final[weight].startswith("9.5 [") and auc[weight].startswith("5 [")
    assert "No IQM: 2 seeds" in text and "IQM of the final" not in text
