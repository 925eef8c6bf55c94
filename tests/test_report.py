"""The method x metric table of scripts/plot.py (ppo_cbp.reporting.tables) on run folders written here,
against per-seed metrics computed by hand and CIs from scipy.stats.bootstrap called directly."""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from ppo_cbp.reporting import tables as report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_plot import plot_script, pm_rows, ppo_run, supervised_run

RESAMPLES = 2000


def read_table(path: Path) -> dict[tuple[str, str, str], dict]:
    with open(path) as f:
        return {(r["table"], r["group"], r["metric"]): r for r in csv.DictReader(f)}


def bca(x: np.ndarray, seed: int = 0) -> tuple[float, float]:
    ci = sps.bootstrap(
        (x,), np.mean, n_resamples=RESAMPLES, rng=np.random.default_rng(seed)
    ).confidence_interval
    return ci.low, ci.high


def percentile_iqm(strata: list[np.ndarray], seed: int = 0) -> tuple[float, float]:
    def pooled(*s, axis=-1):
        return sps.trim_mean(np.concatenate(s, axis=-1), 0.25, axis=-1)

    ci = sps.bootstrap(
        strata, pooled, n_resamples=RESAMPLES, method="percentile", rng=np.random.default_rng(seed)
    ).confidence_interval
    return ci.low, ci.high


def check(row: dict, per_seed: np.ndarray, seed: int = 0) -> None:
    """The row's mean, IQM and CIs against the per-seed values computed by the test."""
    assert int(row["n"]) == len(per_seed)
    assert float(row["mean"]) == pytest.approx(per_seed.mean(), rel=1e-9)
    s = np.sort(per_seed)
    k = len(s) // 4
    assert float(row["iqm"]) == pytest.approx(s[k : len(s) - k].mean(), rel=1e-9)
    lo, hi = bca(per_seed, seed)
    assert (float(row["mean_low"]), float(row["mean_high"])) == pytest.approx((lo, hi), rel=1e-9)
    lo, hi = percentile_iqm([per_seed], seed)
    assert (float(row["iqm_low"]), float(row["iqm_high"])) == pytest.approx((lo, hi), rel=1e-9)


def test_final_points_and_friction_segments_by_hand():
    assert [report.final_points(n) for n in (1, 9, 10, 20, 800)] == [1, 1, 1, 2, 80]
    x = np.array([100.0, 200, 300, 400, 500])
    segs = report.friction_segments(x, 200)
    # (0, 200] -> points 0, 1; (200, 400] -> 2, 3; (400, 600] is not complete at 500
    assert [s.tolist() for s in segs] == [[0, 1], [2, 3]]
    # bins of 150 steps, changes at 200 and 400: the bin (150, 300] counts in segment 2,
    # (300, 450] and (450, 600] in segment 3
    segs = report.friction_segments(np.array([150.0, 300, 450, 600]), 200)
    assert [s.tolist() for s in segs] == [[0], [1], [2, 3]]
    assert report.friction_segments(x, 0) == []


def test_supervised_table_final_tenth_and_auc_by_hand(tmp_path):
    rng = np.random.default_rng(1)
    acc = {s: rng.uniform(0.3, 0.9, size=20) for s in range(5)}
    supervised_run(tmp_path / "runs" / "bp", "bp", {s: pm_rows(list(a)) for s, a in acc.items()})
    out = tmp_path / "f"
    argv = [str(tmp_path / "runs"), "--out", str(out), "--resamples", str(RESAMPLES)]
    assert plot_script.main(argv) == 0
    got = read_table(out / "table.csv")
    a = np.stack([acc[s] for s in range(5)])
    check(got[("permuted_mnist", "Backprop", "final")], a[:, -2:].mean(1))  # last 20 // 10
    check(got[("permuted_mnist", "Backprop", "auc")], a.mean(1))
    assert {m for (_, _, m) in got} == {"final", "auc"}  # no friction segments
    md = (out / "table.md").read_text()
    row = got[("permuted_mnist", "Backprop", "final")]
    cell = report._cell_text(float(row["mean"]), float(row["mean_low"]), float(row["mean_high"]))
    assert f"| Backprop | 5 | {cell} |" in md
    assert "95% bootstrap CI (BCa, 2,000 resamples, seed 0)" in md


def test_ppo_table_friction_segments_by_hand(tmp_path):
    # bins of 100 steps; friction every 200 steps. Seed s returns r at step 50 + 100 b (bin b)
    returns = {1: [1.0, 3.0, 5.0, 7.0, 9.0, 11.0], 2: [2.0, 2.0, 4.0, 4.0, 6.0, 6.0]}
    returns[3] = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    for seed, r in returns.items():
        points = [(50 + 100 * b, v) for b, v in enumerate(r)]
        if seed == 3:
            points = points[:-1] + [(599, 8.0), (600, 10.0)]  # two episodes in bin 6
        ppo_run(
            tmp_path / "runs" / f"cbp_{seed}", seed,
            {"charts/episodic_return": points, "env/friction": [(100, 1.0), (300, 0.5), (600, 0.5)]},
            cbp=True, steps=600, friction_every=200,
        )  # fmt: skip
    # one unfinished seed of another method: 5 bins, so only segments 1 and 2 are complete
    for seed in (1, 2):
        ppo_run(
            tmp_path / "runs" / f"l2_{seed}", seed,
            {"charts/episodic_return": [(50 + 100 * b, seed * b) for b in range(5)],
             "env/friction": [(500 if seed == 1 else 600, 1.0)]},
            l2=True, friction_every=200,
        )  # fmt: skip
    out = tmp_path / "f"
    argv = [str(tmp_path / "runs"), "--out", str(out), "--bin", "100"]
    assert plot_script.main(argv + ["--resamples", str(RESAMPLES)]) == 0
    got = read_table(out / "table.csv")
    r = np.array([returns[1], returns[2], returns[3][:-1] + [9.0]])
    t = "ppo_Hopper-v4"
    check(got[(t, "CBP", "segment_1")], r[:, 0:2].mean(1))
    check(got[(t, "CBP", "segment_2")], r[:, 2:4].mean(1))
    check(got[(t, "CBP", "segment_3")], r[:, 4:6].mean(1))
    check(got[(t, "CBP", "final")], r[:, 4:6].mean(1))  # the last friction segment
    check(got[(t, "CBP", "auc")], r.mean(1))
    l2 = np.array([[b * s for b in range(5)] for s in (1, 2)], dtype=float)
    assert (t, "L2", "segment_3") not in got
    check(got[(t, "L2", "final")], l2[:, 2:4].mean(1))
    check(got[(t, "L2", "auc")], l2.mean(1))
    md = (out / "table.md").read_text()
    assert "| Method | n | final | AUC | seg 1 | seg 2 | seg 3 |" in md
    assert "IQM [95% CI]:" in md


def test_pooled_envs_are_strata_and_labels_are_one_per_method(tmp_path):
    rng = np.random.default_rng(2)
    final = {}
    for env, n in (("Hopper-v4", 4), ("Walker2d-v4", 6)):
        for seed in range(n):
            v = float(np.float32(rng.normal(100 if env == "Hopper-v4" else 300, 10)))
            final[env, seed] = v
            ppo_run(
                tmp_path / "runs" / f"{env}_{seed}", seed,
                {"charts/episodic_return": [(50, 0.0), (200, v)]},  # TensorBoard keeps float32
                env=env, cbp=True, steps=200, friction_every=0,
            )  # fmt: skip
    out = tmp_path / "f"
    argv = [str(tmp_path / "runs"), "--out", str(out), "--bin", "100"]
    assert plot_script.main(argv + ["--resamples", str(RESAMPLES), "--bootstrap-seed", "3"]) == 0
    got = read_table(out / "table.csv")
    hopper = np.array([final["Hopper-v4", s] for s in range(4)])
    walker = np.array([final["Walker2d-v4", s] for s in range(6)])
    check(got[("ppo_Hopper-v4", "CBP", "final")], hopper, seed=3)  # last 2 // 10 -> 1 bin
    row = got[("pooled:ppo_Hopper-v4+ppo_Walker2d-v4", "CBP", "final")]
    pooled = np.concatenate([hopper, walker])
    assert int(row["n"]) == 10 and float(row["mean"]) == pytest.approx(pooled.mean())
    s = np.sort(pooled)
    assert float(row["iqm"]) == pytest.approx(s[2:8].mean())  # floor(10 / 4) cut each side
    lo, hi = percentile_iqm([hopper, walker], seed=3)
    assert (float(row["iqm_low"]), float(row["iqm_high"])) == pytest.approx((lo, hi), rel=1e-9)
    # unstratified, a resample could draw ten Hopper seeds; stratified it keeps 4 and 6
    assert float(row["iqm_low"]) > np.sort(hopper)[1]
    md = (out / "table.md").read_text()
    assert "## Pooled over ppo_Hopper-v4, ppo_Walker2d-v4" in md and "| CBP | 4+6 |" in md


@pytest.mark.slow
def test_table_is_deterministic_given_the_seed(tmp_path):
    rng = np.random.default_rng(4)
    rows = {s: pm_rows(list(rng.uniform(size=10))) for s in range(4)}
    supervised_run(tmp_path / "runs" / "bp", "bp", rows)
    texts = []
    for out, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        argv = [str(tmp_path / "runs"), "--out", str(tmp_path / out), "--bootstrap-seed", seed]
        assert plot_script.main(argv + ["--resamples", "500", "--name", "pm"]) == 0
        texts.append((tmp_path / out / "pm_table.csv").read_text())
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_ppo_evaluation_returns_get_panels_and_tables(tmp_path):
    """Runs with --eval-every log eval/return and eval/return_previous: the figure draws them
    and the table scores them as it scores the training return (final: the last tenth of the
    bins, without friction changes)."""
    from test_plot import ppo_run

    from ppo_cbp.reporting.figures import plot_runs

    for seed in (1, 2):
        points = [(100 * b, float(seed * b)) for b in range(1, 11)]
        ppo_run(
            tmp_path / "runs" / f"a_{seed}", seed,
            {"charts/episodic_return": points, "eval/return": points,
             "eval/return_previous": [(s, v / 2) for s, v in points]},
            friction_every=0,
        )  # fmt: skip
    plot_runs([tmp_path / "runs"], tmp_path / "fig", name="f", bin_size=100)
    rows = list(csv.DictReader(open(tmp_path / "fig" / "f_table.csv")))
    final = {r["score"]: float(r["mean"]) for r in rows if r["metric"] == "final"}
    # last tenth of 10 bins: bin 10, seed s returns 10 s: mean over seeds 15; halved 7.5
    assert final["eval_return"] == pytest.approx(15.0)
    assert final["eval_return_previous"] == pytest.approx(7.5)
    assert final["episodic_return"] == pytest.approx(15.0)
