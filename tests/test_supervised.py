"""The supervised benchmark loops: learning on real MNIST, metric timing, resume, stacking, errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from stacked_runs import read_rows

from ppo_cbp.benchmarks import MethodConfig, PermutedMNISTConfig, SCRConfig
from ppo_cbp.benchmarks.permuted_mnist import run_permuted_mnist
from ppo_cbp.benchmarks.scr import run_scr
from ppo_cbp.datasets.mnist import load_mnist, permuted_mnist_task

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("PPO_CBP_MNIST_DIR", ROOT.parent / "shared/data/mnist"))
needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists(), reason="real MNIST not available"
)


def pm_config(tmp_path, name, **kw):
    base = dict(
        seeds=[0],
        tasks=2,
        examples_per_task=300,
        width=16,
        metric_examples=100,
        data_dir=MNIST_DIR,
        out=tmp_path / name,
        device="cpu",
        progress=False,
        chunk=128,
    )
    base.update(kw)
    return PermutedMNISTConfig(**base)


@needs_mnist
def test_short_real_mnist_run_learns(tmp_path):
    cfg = pm_config(tmp_path, "learn", tasks=1, examples_per_task=2000, width=64, seeds=[0, 1])
    cfg.method = MethodConfig(method="bp", lr=0.01)
    summary = run_permuted_mnist(cfg)
    for seed in (0, 1):
        (row,) = read_rows(cfg.out, seed)
        # chance is 0.1; online accuracy over the first 2000 examples of a fresh network
        assert row["accuracy"] > 0.6
    assert (cfg.out / "summary.json").exists() and (cfg.out / "config.json").exists()
    assert summary["tasks_completed"] == 1
    assert any((cfg.out / "seed_0" / "tb").iterdir())


@needs_mnist
def test_task_start_metrics_are_measured_before_training_on_the_task(tmp_path):
    cfg = pm_config(tmp_path, "timing", metric_examples=50)
    run_permuted_mnist(cfg, stop_after=1)
    state = torch.load(cfg.out / "checkpoint.pt", weights_only=True)
    params = [p[0].double().numpy() for p in state["learner"]["net"]["params"]]
    # task 1's first 50 examples through the network saved at the end of task 0, in numpy
    images, _ = load_mnist(MNIST_DIR, dtype=torch.float64)
    perm, order = permuted_mnist_task(0, 1, images.shape[0])
    h = images[order[:50]][:, perm].numpy()
    expected = {}
    for i, p in enumerate(params[:-1], start=1):
        h = np.maximum(h @ p[:, :-1].T + p[:, -1], 0.0)
        sv = np.linalg.svd(h, compute_uv=False)
        q = sv / sv.sum()
        q = q[q > 0]
        expected[f"dead_units_{i}"] = float((np.abs(h).sum(0) == 0).sum())
        expected[f"effective_rank_{i}"] = float(np.exp(-(q * np.log(q)).sum()))
        expected[f"stable_rank_{i}"] = float((np.cumsum(sv) / sv.sum() < 0.99).sum() + 1)
    weights = [p[:, :-1] for p in params]
    expected["weight_magnitude"] = sum(np.abs(w).sum() for w in weights) / sum(
        w.size for w in weights
    )
    cfg.resume = True
    run_permuted_mnist(cfg)
    row = read_rows(cfg.out, 0)[1]
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize("method", ["cbp", "dropout"])
def test_permuted_mnist_resume_equals_uninterrupted(tmp_path, method):
    kw = dict(tasks=3, seeds=[0, 3])
    full = pm_config(tmp_path, "full", **kw)
    cbp = dict(replacement_rate=1e-2, maturity_threshold=20) if method == "cbp" else {}
    full.method = MethodConfig(method=method, **cbp)
    run_permuted_mnist(full)
    part = pm_config(tmp_path, "part", **kw)
    part.method = full.method
    run_permuted_mnist(part, stop_after=1)
    part.resume = True
    run_permuted_mnist(part, stop_after=1)
    run_permuted_mnist(part)
    for seed in (0, 3):
        assert read_rows(part.out, seed) == read_rows(full.out, seed)
    a = torch.load(full.out / "checkpoint.pt", weights_only=True)["learner"]["net"]["params"]
    b = torch.load(part.out / "checkpoint.pt", weights_only=True)["learner"]["net"]["params"]
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


def scr_config(tmp_path, name, **kw):
    base = dict(
        seeds=[0],
        examples=600,
        bin_size=200,
        chunk=128,
        out=tmp_path / name,
        device="cpu",
        progress=False,
        dtype="float64",
    )
    base.update(kw)
    return SCRConfig(**base)


@pytest.mark.parametrize("method", ["snp", "redo", "adam"])
def test_scr_resume_equals_uninterrupted(tmp_path, method):
    settings = {
        "snp": dict(noise_std=1e-3),
        "redo": dict(redo_period=7, redo_threshold=0.5),
        "adam": {},
    }
    m = MethodConfig(method=method, **settings[method])
    full = scr_config(tmp_path, "full", method=m, seeds=[1, 2])
    run_scr(full)
    part = scr_config(tmp_path, "part", method=m, seeds=[1, 2])
    run_scr(part, stop_after=1)
    part.resume = True
    run_scr(part)
    for seed in (1, 2):
        assert read_rows(part.out, seed) == read_rows(full.out, seed)


@pytest.mark.parametrize(
    "activation,method", [("tanh", "cbp"), ("swish", "cbp"), ("tanh", "l2"), ("linear", "l2")]
)
def test_scr_stacked_seeds_equal_seeds_alone(tmp_path, activation, method):
    cbp = dict(replacement_rate=0.01, maturity_threshold=10) if method == "cbp" else {}
    m = MethodConfig(method=method, **cbp)
    stacked = scr_config(tmp_path, "stack", seeds=[5, 6, 7], method=m, activation=activation)
    run_scr(stacked)
    rows = read_rows(stacked.out, 6)
    if method == "cbp":
        assert rows[-1]["units_replaced"] > 0
    alone = scr_config(tmp_path, "alone", seeds=[6], method=m, activation=activation)
    run_scr(alone)
    for r_stack, r_alone in zip(rows, read_rows(alone.out, 6), strict=True):
        assert r_stack == pytest.approx(r_alone, rel=1e-12, abs=1e-14)


def test_scr_squared_error_is_the_online_error_before_each_update(tmp_path):
    """Bin error recomputed by hand: train a separate float64 copy step by step."""
    from ppo_cbp.datasets.scr import SlowlyChangingRegression

    cfg = scr_config(tmp_path, "err", examples=100, bin_size=50, method=MethodConfig(lr=0.05))
    run_scr(cfg)
    rows = read_rows(cfg.out, 0)
    from ppo_cbp.nets.stacked_mlp import StackedMLP

    net = StackedMLP([20, 5, 1], [0], dtype=torch.float64)
    w1, b1 = net.weight(0)[0].clone(), net.bias(0)[0].clone()
    w2, b2 = net.weight(1)[0].clone(), net.bias(1)[0].clone()
    x, y = SlowlyChangingRegression(0, dtype=torch.float64).generate(0, 100)
    errors = []
    for t in range(100):
        xt = x[t, :20]
        z = w1 @ xt + b1
        h = torch.relu(z)
        pred = w2 @ h + b2
        err = pred - y[t]
        errors.append(float(err.square()))
        g_out = 2 * err
        g_h = (w2.T @ g_out) * (z > 0)
        w2 -= 0.05 * torch.outer(g_out, h)
        b2 -= 0.05 * g_out
        w1 -= 0.05 * torch.outer(g_h, xt)
        b1 -= 0.05 * g_h
    assert rows[0]["squared_error"] == pytest.approx(np.mean(errors[:50]), rel=1e-10)
    assert rows[1]["squared_error"] == pytest.approx(np.mean(errors[50:]), rel=1e-10)


def test_clear_errors_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="method"):
        run_scr(scr_config(tmp_path, "a", method=MethodConfig(method="sgdx")))
    with pytest.raises(ValueError, match="replacement_rate"):
        run_scr(
            scr_config(tmp_path, "b", method=MethodConfig(method="cbp", replacement_rate=-1e-4))
        )
    with pytest.raises(ValueError, match="lr"):
        run_scr(scr_config(tmp_path, "c", method=MethodConfig(lr=-0.1)))
    with pytest.raises(ValueError, match="hidden"):
        run_scr(scr_config(tmp_path, "d", activation="linear", method=MethodConfig(method="cbp")))
    missing = tmp_path / "no_mnist"
    with pytest.raises(FileNotFoundError, match=str(missing / "train-images-idx3-ubyte.gz")):
        run_permuted_mnist(pm_config(tmp_path, "e", data_dir=missing))
    cfg = scr_config(tmp_path, "f")
    run_scr(cfg)
    with pytest.raises(ValueError, match="--resume"):
        run_scr(cfg)
    cfg.resume, cfg.seeds = True, [0, 1]
    with pytest.raises(ValueError, match="different configuration"):
        run_scr(cfg)


@pytest.mark.slow
def test_command_line(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "scripts/supervised.py"), "slowly-changing-regression"]
    args = ["--examples", "400", "--bin-size", "200", "--seeds", "0", "1", "--method", "cbp"]
    args += ["--out", str(out), "--device", "cpu", "--no-progress", "--replacement-rate", "0.01"]
    subprocess.run(cmd + args, check=True, capture_output=True, cwd=ROOT)
    assert len(read_rows(out, 1)) == 2
    bad = subprocess.run(cmd + ["--method", "magic"], capture_output=True, cwd=ROOT)
    assert bad.returncode != 0
