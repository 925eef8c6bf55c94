"""Online normalization against a float64 reference of the paper's equations, written here
feature by feature and step by step, alone and inside the stacked trainer."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from stacked_runs import read_rows
from test_supervised import MNIST_DIR, needs_mnist, pm_config

from ppo_cbp.benchmarks import MethodConfig
from ppo_cbp.benchmarks.common import resolve_method
from ppo_cbp.benchmarks.permuted_mnist import DEFAULTS as PM_DEFAULTS
from ppo_cbp.benchmarks.permuted_mnist import run_permuted_mnist
from ppo_cbp.nets import online_norm
from ppo_cbp.nets.online_norm import OnlineNorm
from ppo_cbp.nets.stacked_mlp import StackedMLP, StackedTrainer

ROOT = Path(__file__).resolve().parents[1]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
F64 = torch.float64
EPS = 1e-5  # the reference implementation's epsilons (variance and layer scaling)


class RefNorm:
    """One network's online normalization of n features, in Python floats.

    Forward, per feature: y = (x - mu) / sqrt(var + eps); then mu <- af mu + (1 - af) x,
    var <- af var + af (1 - af) (x - mu_old)^2. Affine a = g y + b, layer scaling z = a / r with
    r = sqrt(mean(a^2) + eps). Backward, per feature: x~' = y' - (1 - ab) ey y; ey += x~' y;
    x' = x~' / s - (1 - ab) e1; e1 += x'. The layer-scaling and affine part of the backward is
    taken from autograd.
    """

    def __init__(self, n, af, ab):
        self.n, self.af, self.ab = n, af, ab
        self.mu, self.var = [0.0] * n, [1.0] * n
        self.ey, self.e1 = [0.0] * n, [0.0] * n
        self.g, self.b = [1.0] * n, [0.0] * n

    def forward(self, xs):
        """xs: [T, n] examples in time order; returns z [T, n] and keeps the cache."""
        self.cache = []
        out = []
        for x in xs:
            y, s = [], []
            for i in range(self.n):
                s.append(math.sqrt(self.var[i] + EPS))
                y.append((x[i] - self.mu[i]) / s[-1])
                d = x[i] - self.mu[i]
                self.mu[i] = self.af * self.mu[i] + (1 - self.af) * x[i]
                self.var[i] = self.af * self.var[i] + self.af * (1 - self.af) * d * d
            yt = torch.tensor(y, dtype=F64)
            g = torch.tensor(self.g, dtype=F64, requires_grad=True)
            b = torch.tensor(self.b, dtype=F64, requires_grad=True)
            yv = yt.clone().requires_grad_()
            a = g * yv + b
            z = a / torch.sqrt((a * a).mean() + EPS)
            self.cache.append((y, s, z, yv, g, b))
            out.append(z.detach().tolist())
        return out

    def backward(self, grads):
        """grads: dL/dz [T, n]; returns dL/dx [T, n], dL/dgain, dL/dbias (summed over T)."""
        gg, gb = [0.0] * self.n, [0.0] * self.n
        out = []
        for (y, s, z, yv, g, b), gz in zip(self.cache, grads):
            dy, dg, db = torch.autograd.grad(z, (yv, g, b), torch.tensor(gz, dtype=F64))
            dx = []
            for i in range(self.n):
                xt = dy[i].item() - (1 - self.ab) * self.ey[i] * y[i]
                self.ey[i] += xt * y[i]
                dx.append(xt / s[i] - (1 - self.ab) * self.e1[i])
                self.e1[i] += dx[-1]
                gg[i] += dg[i].item()
                gb[i] += db[i].item()
            out.append(dx)
        return out, gg, gb


def state_of(norm, s):
    return [getattr(norm, k)[s].tolist() for k in ("mean", "var", "err_y", "err_1", "gain", "bias")]


def ref_state(ref):
    return [ref.mu, ref.var, ref.ey, ref.e1, ref.g, ref.b]


@pytest.fixture(params=["kernels", "tensor_ops"])
def path(request, monkeypatch):
    """Batch 1 on the CPU runs numba loops; force the tensor operations of other devices too."""
    if request.param == "tensor_ops":
        monkeypatch.setattr(online_norm, "use_kernels", lambda *t: False)
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_backward_and_statistics_match_the_equations(device, batch, path):
    S, n, af, ab, lr = 2, 5, 0.9, 0.8, 0.3
    norm = OnlineNorm(S, n, alpha_f=af, alpha_b=ab, device=device, dtype=F64)
    refs = [RefNorm(n, af, ab) for _ in range(S)]
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        # inputs with a drifting mean and a scale far from 1, so the statistics move
        x = 3.0 * torch.randn(S, batch, n, generator=g, dtype=F64) + step
        dz = torch.randn(S, batch, n, generator=g, dtype=F64)
        z = norm(x.to(device))
        dx = norm.backward(dz.to(device))
        for s in range(S):
            ref_z = refs[s].forward(x[s].tolist())
            ref_dx, ref_gg, ref_gb = refs[s].backward(dz[s].tolist())
            np.testing.assert_allclose(z[s].cpu().numpy(), ref_z, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(dx[s].cpu().numpy(), ref_dx, rtol=1e-11, atol=1e-12)
            np.testing.assert_allclose(norm.grad_gain[s].cpu(), ref_gg, rtol=1e-11, atol=1e-12)
            np.testing.assert_allclose(norm.grad_bias[s].cpu(), ref_gb, rtol=1e-11, atol=1e-12)
            # gain and bias trained between steps, so later steps exercise non-trivial values
            refs[s].g = [p - lr * q for p, q in zip(refs[s].g, ref_gg)]
            refs[s].b = [p - lr * q for p, q in zip(refs[s].b, ref_gb)]
        norm.sgd_(1.0, -lr)
        for s in range(S):
            np.testing.assert_allclose(
                state_of(norm, s), ref_state(refs[s]), rtol=1e-11, atol=1e-12
            )
    # the running statistics have left their initial values and the control processes run
    assert norm.mean.abs().min() > 0.1 and (norm.var - 1).abs().min() > 1e-3
    assert norm.err_y.abs().min() > 0 and norm.err_1.abs().min() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_infer_uses_the_current_statistics_and_changes_nothing(device):
    norm = OnlineNorm(1, 4, alpha_f=0.5, alpha_b=0.5, device=device, dtype=F64)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        norm(torch.randn(1, 1, 4, generator=g, dtype=F64).to(device))
        norm.backward(torch.randn(1, 1, 4, generator=g, dtype=F64).to(device))
        norm.sgd_(1.0, -0.5)
    before = [t.clone() for t in norm.state_dict().values()]
    x = torch.randn(1, 7, 4, generator=g, dtype=F64).to(device)
    z = norm.infer(x)
    for a, b in zip(before, norm.state_dict().values()):
        assert torch.equal(a, b)
    y = (x[0] - norm.mean[0]) / torch.sqrt(norm.var[0] + EPS)
    a = norm.gain[0] * y + norm.bias[0]
    expected = a / torch.sqrt((a * a).mean(1, keepdim=True) + EPS)
    torch.testing.assert_close(z[0], expected, rtol=1e-13, atol=1e-13)


def test_decays_outside_the_open_unit_interval_are_refused():
    for af, ab in [(0.0, 0.5), (1.0, 0.5), (0.5, 0.0), (0.5, 1.0), (-0.1, 0.5), (0.5, 1.5)]:
        with pytest.raises(ValueError, match="alpha_"):
            OnlineNorm(1, 3, alpha_f=af, alpha_b=ab)
        with pytest.raises(ValueError, match="alpha_"):
            resolve_method(MethodConfig(method="online_norm", alpha_f=af, alpha_b=ab), PM_DEFAULTS)
    r = resolve_method(MethodConfig(method="online_norm"), PM_DEFAULTS)
    assert (r.alpha_f, r.alpha_b, r.lr, r.optimizer) == (0.999, 0.99, 0.003, "sgd")
    with pytest.raises(ValueError, match="online normalization"):
        StackedTrainer(StackedMLP([3, 4, 2], [0], norm_decays=(0.9, 0.9)), optimizer="adam")


def reference_network_steps(params, refs, xs, ys, lr, wd):
    """Train one seed's normalized ReLU MLP in numpy float64; returns the logits before each
    update. params: [(W, b)] per layer; refs: one RefNorm per hidden layer."""
    outs = []
    for x, y in zip(xs, ys):
        hs, zs = [x], []
        for layer, (w, b) in enumerate(params):
            z = hs[-1] @ w.T + b
            if layer < len(params) - 1:
                z = np.array(refs[layer].forward(z.tolist()))
                hs.append(np.maximum(z, 0.0))
            zs.append(z)
        out = zs[-1]
        outs.append(out.copy())
        p = np.exp(out - out.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1.0
        delta = p / len(y)
        for layer in range(len(params) - 1, -1, -1):
            w, b = params[layer]
            below = delta @ w
            params[layer] = (
                w - lr * (delta.T @ hs[layer] + wd * w),
                b - lr * (delta.sum(0) + wd * b),
            )
            if layer > 0:
                below = below * (hs[layer] > 0)
                dx, gg, gb = refs[layer - 1].backward(below.tolist())
                ref = refs[layer - 1]
                ref.g = [g - lr * (d + wd * g) for g, d in zip(ref.g, gg)]
                ref.b = [b - lr * (d + wd * b) for b, d in zip(ref.b, gb)]
                delta = np.array(dx)
    return outs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,wd", [(1, 0.0), (1, 0.01), (2, 0.0)])
def test_trainer_step_matches_a_reference_network(device, batch, wd, path):
    S, sizes, lr, af, ab, steps = 2, [6, 5, 4, 3], 0.2, 0.7, 0.6, 5
    net = StackedMLP(sizes, [3, 8], norm_decays=(af, ab), device=device, dtype=F64)
    params = [
        [
            (net.weight(i)[s].cpu().numpy().copy(), net.bias(i)[s].cpu().numpy().copy())
            for i in range(3)
        ]
        for s in range(S)
    ]
    refs = [[RefNorm(n, af, ab) for n in sizes[1:-1]] for _ in range(S)]
    trainer = StackedTrainer(net, lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(2)
    xs = torch.rand(steps, S, batch, sizes[0], generator=g, dtype=F64)
    ys = torch.randint(0, sizes[-1], (steps, S, batch), generator=g)
    outs = torch.empty(steps, S, batch, sizes[-1], dtype=F64)
    for t in range(steps):
        out = torch.empty(S, batch, sizes[-1], device=device, dtype=F64)
        trainer.step(net.with_ones(xs[t].to(device)), ys[t].to(device), out=out)
        outs[t] = out.cpu()
    for s in range(S):
        ref_outs = reference_network_steps(
            params[s], refs[s], xs[:, s].numpy(), ys[:, s].numpy(), lr, wd
        )
        np.testing.assert_allclose(outs[:, s].numpy(), np.array(ref_outs), rtol=1e-10, atol=1e-12)
        for i, (w, b) in enumerate(params[s]):
            np.testing.assert_allclose(net.weight(i)[s].cpu(), w, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(net.bias(i)[s].cpu(), b, rtol=1e-10, atol=1e-12)
        for norm, ref in zip(net.norms, refs[s]):
            np.testing.assert_allclose(state_of(norm, s), ref_state(ref), rtol=1e-10, atol=1e-12)
    # the metrics' forward goes through the normalization without moving its statistics
    before = [n.state_dict() for n in net.norms]
    _, hidden = net.forward(net.with_ones(xs[0].to(device)))
    assert all(torch.equal(a["mean"], n.mean) for a, n in zip(before, net.norms))
    assert hidden[0].shape == (S, batch, sizes[1])


def run_stack(seeds, steps=60):
    net = StackedMLP([6, 8, 8, 3], seeds, norm_decays=(0.95, 0.9), dtype=F64)
    trainer = StackedTrainer(net, lr=0.1)
    gens = [torch.Generator().manual_seed(100 + s) for s in seeds]
    for _ in range(steps):
        x = torch.stack([torch.rand(1, 6, generator=g, dtype=F64) for g in gens])
        y = torch.stack([torch.randint(0, 3, (1,), generator=g) for g in gens])
        trainer.step(net.with_ones(x), y)
    return net


def test_stacked_equals_alone(path):
    seeds = [4, 7, 11]
    stack = run_stack(seeds)
    for s, seed in enumerate(seeds):
        alone = run_stack([seed])
        for p_stack, p_alone in zip(stack.params, alone.params):
            torch.testing.assert_close(p_stack[s], p_alone[0], rtol=1e-12, atol=1e-12)
        for n_stack, n_alone in zip(stack.norms, alone.norms):
            for key, value in n_stack.state_dict().items():
                torch.testing.assert_close(
                    value[s], n_alone.state_dict()[key][0], rtol=1e-12, atol=1e-12
                )


@pytest.mark.slow
def test_command_line_decays(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts/supervised.py"), "permuted-mnist"]
    help_text = subprocess.run(cmd + ["--help"], capture_output=True, text=True, cwd=ROOT).stdout
    assert "online_norm" in help_text and "--alpha-f" in help_text and "--alpha-b" in help_text
    assert "0.999" in help_text and "0.99" in help_text
    for flags in (["--alpha-f", "1.0"], ["--alpha-b", "0"], ["--alpha-f", "-0.5"]):
        out = tmp_path / "bad"
        bad = subprocess.run(
            cmd + ["--method", "online_norm", *flags, "--out", str(out), "--device", "cpu"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert bad.returncode == 2
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: alpha_"), bad.stderr
        assert not out.exists()


@pytest.mark.slow
@needs_mnist
def test_permuted_mnist_command_line_run(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "scripts/supervised.py"), "permuted-mnist"]
    cmd += ["--method", "online_norm", "--alpha-f", "0.99", "--alpha-b", "0.9", "--seeds", "0", "2"]
    cmd += ["--tasks", "2", "--examples-per-task", "300", "--width", "16", "--metric-examples"]
    cmd += ["100", "--data-dir", str(MNIST_DIR), "--device", "cpu", "--no-progress"]
    subprocess.run(cmd + ["--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert '"alpha_f": 0.99' in state["config"] and '"alpha_b": 0.9' in state["config"]
    norms = state["learner"]["net"]["norms"]
    assert len(norms) == 3 and all(n["mean"].shape == (2, 16) for n in norms)
    assert all(n["mean"].abs().min() > 0 and n["err_1"].abs().min() > 0 for n in norms)
    assert len(read_rows(out, 2)) == 2


@pytest.mark.slow
@needs_mnist
def test_permuted_mnist_resume_equals_uninterrupted(tmp_path):
    def config(name):
        return pm_config(
            tmp_path, name, seeds=[0, 3], method=MethodConfig(method="online_norm"), tasks=3
        )

    full = config("full")
    run_permuted_mnist(full)
    part = config("part")
    run_permuted_mnist(part, stop_after=1)
    part.resume = True
    run_permuted_mnist(part)
    for seed in (0, 3):
        assert read_rows(part.out, seed) == read_rows(full.out, seed)
    a = torch.load(full.out / "checkpoint.pt", weights_only=True)["learner"]["net"]
    b = torch.load(part.out / "checkpoint.pt", weights_only=True)["learner"]["net"]
    for na, nb in zip(a["norms"], b["norms"], strict=True):
        for key in na:
            assert torch.equal(na[key], nb[key]), key
