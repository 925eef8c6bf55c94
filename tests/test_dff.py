"""Deep Fourier features (``dff``) against their definition, in float64.

The definition (Plasticine's ``DFF4Linear``, RLE-Foundation/Plasticine@aa00b4bb): every hidden
activation is the concatenation ``[sin(z), cos(z)]``, and the next Linear layer takes twice the
width. Every expected value here is computed from the weights in numpy with that concatenated
layout, the consumer's columns read through the permutation that maps the network's interleaved
layout (unit ``i``'s sine at column ``2i``, cosine at ``2i + 1``) onto it; then the units as
continual backprop and the metrics see them (``h = (|sin z| + |cos z|) / 2``), stacked seeds
against each seed alone, the supervised runs (resumed exactly, loaded with ``load_learner``),
the refused combinations, and PPO's networks.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from stacked_runs import read_rows
from test_supervised import scr_config
from torch import nn

from ppo_cbp import load_learner
from ppo_cbp.benchmarks.autograd_learner import AutogradLearner, build_mlp
from ppo_cbp.benchmarks.common import Learner, MethodConfig, parse_methods, resolve_method
from ppo_cbp.benchmarks.scr import DEFAULTS as SCR_DEFAULTS
from ppo_cbp.benchmarks.scr import hidden_unit_metrics, run_scr
from ppo_cbp.errors import UsageError
from ppo_cbp.metrics import plasticity_metrics, unit_activations
from ppo_cbp.nets.crelu import crelu_mlp
from ppo_cbp.nets.dff import DFF, dff_mlp
from ppo_cbp.nets.units import hidden_activations, hidden_features, sequential_unit_layers
from ppo_cbp.plasticity import suite
from ppo_cbp.plasticity.cbp import ContinualBackprop
from ppo_cbp.ppo.load import settings_of

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------
# The definition, by hand (numpy, float64, the source's concatenated layout)
# ----------------------------------------------------------------------------------------


def concat_columns(w: np.ndarray) -> np.ndarray:
    """A consumer's weight ``[out, 2n]`` in the interleaved layout, rearranged to read the
    concatenation ``[sin(z_1..n), cos(z_1..n)]``: column ``o * n + i`` is column ``2i + o``."""
    return np.concatenate([w[:, 0::2], w[:, 1::2]], axis=1)


def layer_norm(z: np.ndarray, gain: np.ndarray, offset: np.ndarray) -> np.ndarray:
    mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-5) * gain + offset


def params_of(net: nn.Sequential) -> list[tuple[str, dict[str, np.ndarray]]]:
    out = []
    for m in net:
        if isinstance(m, (nn.Linear, nn.LayerNorm)):
            kind = "linear" if isinstance(m, nn.Linear) else "norm"
            p = {"w": m.weight.detach().double().numpy(), "b": m.bias.detach().double().numpy()}
            out.append((kind, p))
    return out


def forward_by_hand(net: nn.Sequential, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The network's output and each hidden layer's (normalised) pre-activation ``z``:
    ``z -> [sin z, cos z] -> W_cat [sin z, cos z] + b``."""
    layers = params_of(net)
    linears = [p for k, p in layers if k == "linear"]
    norms = [p for k, p in layers if k == "norm"]
    zs = []
    h = x
    for i, p in enumerate(linears):
        w = p["w"] if i == 0 else concat_columns(p["w"])
        z = h @ w.T + p["b"]
        if i == len(linears) - 1:
            return z, zs
        if norms:
            z = layer_norm(z, norms[i]["w"], norms[i]["b"])
        zs.append(z)
        h = np.concatenate([np.sin(z), np.cos(z)], axis=-1)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------
# The module and its MLP
# ----------------------------------------------------------------------------------------


def test_dff_is_the_concatenation_of_sin_and_cos_up_to_a_column_permutation():
    z = np.random.default_rng(0).normal(0, 3, (7, 5))
    out = DFF()(torch.from_numpy(z)).numpy()
    assert out.shape == (7, 10)
    np.testing.assert_allclose(out[:, 0::2], np.sin(z), rtol=0, atol=1e-15)
    np.testing.assert_allclose(out[:, 1::2], np.cos(z), rtol=0, atol=1e-15)
    cat = np.concatenate([np.sin(z), np.cos(z)], axis=1)  # the source's layout
    perm = [o * 5 + i for i in range(5) for o in range(2)]  # our column 2i + o is its o*n + i
    np.testing.assert_allclose(out, cat[:, perm], rtol=0, atol=1e-15)
    # cos(-z) of the source is cos(z) exactly
    t = torch.from_numpy(z)
    assert torch.equal(torch.cos(-t), torch.cos(t))


@pytest.mark.parametrize("layer_norm_", [False, True])
def test_dff_mlp_forward_equals_the_definition_by_hand(layer_norm_):
    torch.manual_seed(3)
    net = dff_mlp(3, [4, 5], 2, layer_norm=layer_norm_).double()
    with torch.no_grad():  # gains and offsets away from 1 and 0, biases away from 0
        for p in net.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, dtype=F64))
    x = np.random.default_rng(1).normal(0, 2, (9, 3))
    expected, zs = forward_by_hand(net, x)
    with torch.no_grad():
        np.testing.assert_allclose(net(torch.from_numpy(x)).numpy(), expected, rtol=1e-12)
    # the hidden features the consumer reads, and each unit's activation as CBP sees it
    for (f, g), h, z in zip(
        hidden_features(net, torch.from_numpy(x)), hidden_activations(net, torch.from_numpy(x)), zs
    ):
        assert g == 2
        np.testing.assert_allclose(f.numpy()[:, 0::2], np.sin(z), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(f.numpy()[:, 1::2], np.cos(z), rtol=1e-12, atol=1e-13)
        by_hand = (np.abs(np.sin(z)) + np.abs(np.cos(z))) / 2
        np.testing.assert_allclose(h.numpy(), by_hand, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(unit_activations(f, 2), h, rtol=0, atol=0)
        assert (h.numpy() >= 0.5 - 1e-15).all() and (h.numpy() <= 2**-0.5 + 1e-15).all()


def test_dff_mlp_widths_and_initialisation_are_crelu_mlp_s():
    """The next layer takes 2n inputs; every Linear is drawn as crelu_mlp draws it (Kaiming
    uniform, ReLU gain: bound sqrt(6 / fan_in)), biases 0, and the DFF units are found with
    two consumer columns each and ReLU's gain for their redraws."""
    torch.manual_seed(5)
    net = dff_mlp(3, [4, 5], 2)
    torch.manual_seed(5)
    ref = crelu_mlp(3, [4, 5], 2)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(4, 3), (5, 8), (2, 10)]
    for m, r in zip(linears, [m for m in ref if isinstance(m, nn.Linear)]):
        assert torch.equal(m.weight, r.weight) and torch.equal(m.bias, r.bias)
        assert (m.weight.abs() <= math.sqrt(6 / m.in_features)).all() and (m.bias == 0).all()
    units, taps = sequential_unit_layers(net, "kaiming_uniform")
    assert [(u.out_group, u.averaged_outputs, u.nonlinearity) for u in units] == [
        (2, 2, "relu"),
        (2, 2, "relu"),
    ]
    assert all(isinstance(t, DFF) for t in taps)
    with pytest.raises(ValueError, match="widths must be positive"):
        dff_mlp(3, [0], 2)
    with pytest.raises(ValueError, match="must take 8 inputs"):
        sequential_unit_layers(
            nn.Sequential(nn.Linear(3, 4), DFF(), nn.Linear(4, 2)), "kaiming_uniform"
        )


def test_gradient_equals_the_hand_derived_backward_and_finite_differences():
    """L = 1/2 sum (y - t)^2; through a DFF, dL/dz = dL/dsin * cos(z) - dL/dcos * sin(z)."""
    torch.manual_seed(2)
    net = dff_mlp(3, [4, 5], 2).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.bias.normal_(0, 0.5)
    x = np.random.default_rng(4).normal(0, 1.5, (6, 3))
    t = np.random.default_rng(5).normal(0, 1, (6, 2))
    net.zero_grad()
    y = net(torch.from_numpy(x))
    (0.5 * (y - torch.from_numpy(t)).square().sum()).backward()

    ws = [p["w"] for k, p in params_of(net) if k == "linear"]
    bs = [p["b"] for k, p in params_of(net) if k == "linear"]
    cat = [ws[0]] + [concat_columns(w) for w in ws[1:]]
    hs, zs = [x], []
    for w, b in zip(cat[:-1], bs[:-1]):
        zs.append(hs[-1] @ w.T + b)
        hs.append(np.concatenate([np.sin(zs[-1]), np.cos(zs[-1])], axis=1))
    delta = hs[-1] @ cat[-1].T + bs[-1] - t  # dL/dy
    grads_w, grads_b = [None] * 3, [None] * 3
    for i in (2, 1, 0):
        grads_w[i], grads_b[i] = delta.T @ hs[i], delta.sum(0)
        if i:
            dh = delta @ cat[i]  # dL/d[sin z, cos z]
            n = zs[i - 1].shape[1]
            z = zs[i - 1]
            delta = dh[:, :n] * np.cos(z) - dh[:, n:] * np.sin(z)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    for i, m in enumerate(linears):
        gw = grads_w[i]
        if i:  # back to the interleaved columns: column 2j + o is column o * n + j
            n = gw.shape[1] // 2
            gw = np.stack([gw[:, :n], gw[:, n:]], axis=-1).reshape(gw.shape[0], -1)
        np.testing.assert_allclose(m.weight.grad.numpy(), gw, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(m.bias.grad.numpy(), grads_b[i], rtol=1e-10, atol=1e-12)

    # and central finite differences of the module's forward (torch's gradcheck)
    names = [n for n, _ in net.named_parameters()]

    def loss(*params):
        out = torch.func.functional_call(net, dict(zip(names, params)), (torch.from_numpy(x),))
        return 0.5 * (out - torch.from_numpy(t)).square().sum()

    params = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Units: continual backprop and the metrics
# ----------------------------------------------------------------------------------------


def test_a_dff_unit_is_never_dead_where_a_crelu_unit_is():
    """A unit with z = 0 on every input: CReLU's outputs are both 0 (dead), DFF's are
    (sin 0, cos 0) = (0, 1), activation 1/2."""
    nets = []
    for build in (dff_mlp, crelu_mlp):
        torch.manual_seed(0)
        net = build(3, [4], 2).double()
        with torch.no_grad():
            net[0].weight[0] = 0
            net[0].bias[0] = 0
        nets.append(net)
    x = torch.randn(50, 3, dtype=F64)
    (h,) = hidden_activations(nets[0], x)
    assert torch.equal(h[:, 0], torch.full((50,), 0.5, dtype=F64))
    assert float(plasticity_metrics(nets[0], x)["dead_units"]) == 0.0
    assert float(plasticity_metrics(nets[1], x)["dead_units"]) == 0.25


@pytest.mark.parametrize("kernel", [True, False])
def test_cbp_contribution_utility_of_dff_units_by_hand(kernel):
    """u = (1 - eta) * mean_b (|sin z_bi| + |cos z_bi|) / 2 * sum_k (|W2[k, 2i]| + |W2[k, 2i + 1]|)."""
    torch.manual_seed(0)
    net = dff_mlp(3, [4], 2).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    cbp = ContinualBackprop(net, opt, replacement_rate=0.0, decay_rate=0.9)
    if not kernel:
        cbp._kernel_state = None
    x = torch.randn(7, 3, dtype=F64)
    z = (x @ net[0].weight.detach().T + net[0].bias.detach()).numpy()
    net(x).square().sum().backward()
    opt.step()
    cbp.step()
    W2 = net[2].weight.detach().numpy()
    outgoing = np.abs(W2).sum(0).reshape(4, 2).sum(1)
    h = (np.abs(np.sin(z)) + np.abs(np.cos(z))) / 2
    np.testing.assert_allclose(cbp.utility[0][0].numpy(), 0.1 * h.mean(0) * outgoing, rtol=1e-12)


def test_cbp_replaces_the_dff_unit_of_least_utility_with_both_of_its_columns():
    torch.manual_seed(1)
    net = dff_mlp(3, [4], 2).double()
    with torch.no_grad():
        net[2].weight[:, 4:6] *= 1e-3  # unit 2 contributes little through sin and cos
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    cbp = ContinualBackprop(net, opt, replacement_rate=0.25, maturity_threshold=1, decay_rate=0.0)
    x = torch.randn(16, 3, dtype=F64)
    for step in range(2):
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()
        before = [p.detach().clone() for p in net.parameters()]
        assert cbp.step() == step
    W1, W2 = net[0].weight, net[2].weight
    assert not torch.equal(W1[2], before[0][2]) and net[0].bias[2] == 0
    assert torch.equal(W1[[0, 1, 3]], before[0][[0, 1, 3]])
    assert (W2[:, [4, 5]] == 0).all()
    other = [0, 1, 2, 3, 6, 7]
    assert torch.equal(W2[:, other], before[2][:, other])
    with pytest.raises(ValueError, match="cannot be folded"):
        fold = ContinualBackprop(
            net, None, replacement_rate=0.5, maturity_threshold=0, decay_rate=0.0, fold_bias=True
        )
        net(x)
        fold.step()


# ----------------------------------------------------------------------------------------
# Stacked seeds
# ----------------------------------------------------------------------------------------


def _stream(steps: int, S: int, n_in: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.ones(S, 4, n_in + 1, dtype=F64)
        x[..., :-1] = torch.randn(S, 4, n_in, generator=g, dtype=F64)
        yield x, torch.randn(S, 4, 1, generator=g, dtype=F64)


@pytest.mark.parametrize("spec", ["dff", "cbp+dff+layer_norm"])
def test_stacked_seeds_equal_each_seed_built_and_trained_alone(spec):
    """Bit for bit: each seed's slice of the stacked learner is its network of build_mlp,
    and after 30 steps (CBP replacing units) the weights of the seed trained alone."""
    overrides = dict(replacement_rate=0.05, maturity_threshold=3) if "cbp" in spec else {}
    method = resolve_method(MethodConfig(method=spec, **overrides), SCR_DEFAULTS)
    sizes, seeds = [5, 6, 6, 1], [3, 8]
    kw = dict(loss="squared_error", device=torch.device("cpu"), dtype=F64)
    stacked = AutogradLearner(sizes, seeds, method, **kw)
    for s, seed in enumerate(seeds):
        alone = build_mlp(
            sizes, seed, activation="relu", init="kaiming_uniform",
            layer_norm="layer_norm" in spec, dff=True, device=torch.device("cpu"), dtype=F64,
        )  # fmt: skip
        assert sum(isinstance(m, DFF) for m in alone) == 2
        for p, q in zip(alone.parameters(), stacked.module.parameters(), strict=True):
            assert torch.equal(q[s], p)
    alone = [AutogradLearner(sizes, [s], method, **kw) for s in seeds]
    steps = list(_stream(30, 2, 5))
    for x, y in steps:
        stacked.step(x, y)
    for i, learner in enumerate(alone):
        for x, y in steps:
            learner.step(x[i : i + 1], y[i : i + 1])
        for a, b in zip(stacked.net.weights(), learner.net.weights(), strict=True):
            assert torch.equal(a[i : i + 1], b)
        assert stacked.units_replaced()[i] == learner.units_replaced()[0]
    if "cbp" in spec:
        assert stacked.units_replaced().min() > 0


# ----------------------------------------------------------------------------------------
# Supervised runs (Slowly-Changing Regression)
# ----------------------------------------------------------------------------------------

SCR_SPECS = {
    "dff": {},
    "dff+l2_init": {},
    "dff+layer_norm": {},
    "cbp+dff": dict(replacement_rate=0.01, maturity_threshold=10),
}


@pytest.mark.parametrize("spec", list(SCR_SPECS))
def test_scr_dff_runs_resume_exactly_and_load(tmp_path, spec):
    m = MethodConfig(method=spec, **SCR_SPECS[spec])
    full = scr_config(tmp_path, "full", method=m, seeds=[1, 2])
    run_scr(full)
    part = scr_config(tmp_path, "part", method=m, seeds=[1, 2])
    run_scr(part, stop_after=1)
    part.resume = True
    run_scr(part)
    for seed in (1, 2):
        rows = read_rows(full.out, seed)
        assert read_rows(part.out, seed) == rows
        assert all(r["dead_units"] == 0 for r in rows)  # a DFF unit cannot die
        if "cbp" in spec:
            assert rows[-1]["units_replaced"] > 0
    # load_learner: each seed's network computes its slice of the stacked one
    state = torch.load(full.out / "checkpoint.pt", weights_only=True)["learner"]
    method = resolve_method(m, SCR_DEFAULTS)
    learner = Learner(  # the fused trainer runs DFF
        [full.n_inputs, full.hidden, 1], [1, 2], method, loss="squared_error",
        device=torch.device("cpu"), dtype=F64,
    )  # fmt: skip
    learner.net.load_state_dict(state["net"])
    x = torch.randn(2, 5, full.n_inputs, dtype=F64, generator=torch.Generator().manual_seed(1))
    expected, _ = learner.net.forward(learner.net.with_ones(x))
    for s, seed in enumerate([1, 2]):
        net = load_learner(full.out, seed)
        assert sum(isinstance(mod, DFF) for mod in net.modules()) == 1
        with torch.no_grad():
            torch.testing.assert_close(net(x[s]), expected[s], rtol=1e-12, atol=1e-12)


def test_scr_metrics_of_a_dff_learner_are_of_its_features():
    """The effective rank of the features [sin z, cos z] the output layer reads; no dead unit,
    even one whose z is 0 on every input."""
    from test_crelu_metrics import effective_rank, stacked_linears, x_aug_of

    method = resolve_method(MethodConfig(method="dff"), SCR_DEFAULTS)
    learner = AutogradLearner(
        [5, 8, 1], [0, 1], method, loss="mse", device=torch.device("cpu"), dtype=F64
    )
    stacked = learner.module
    linears = stacked_linears(stacked)
    with torch.no_grad():
        linears[0][0][0, 0] = 0  # seed 0, unit 0: z = 0
        linears[0][1][0, 0] = 0
    x_aug = x_aug_of(2, 120, 5, seed=4)
    rows = hidden_unit_metrics(learner, x_aug, count_dead=True)
    for s, row in enumerate(rows):
        w, b = linears[0][0][s].numpy(), linears[0][1][s].numpy()
        z = x_aug[s, :, :-1].numpy() @ w.T + b
        f = torch.from_numpy(np.concatenate([np.sin(z), np.cos(z)], axis=1))
        assert row["effective_rank"] == pytest.approx(effective_rank(f), rel=1e-9)
        assert row["dead_units"] == 0


# ----------------------------------------------------------------------------------------
# The suite: combinations refused, and why
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, why",
    [
        ("crelu+dff", "both replace the hidden activation"),
        ("redo+dff", "never dormant"),
        ("nap+dff", "homogeneous"),
    ],
)
def test_contradicting_combinations_are_refused(spec, why):
    with pytest.raises(UsageError, match=why):
        parse_methods(spec, list(suite.METHODS))


def test_redo_could_never_act_on_a_dff_network():
    """The reason ReDo is refused: h_i = (|sin z| + |cos z|) / 2 lies in [1/2, 1/sqrt(2)], so
    its score E h_i / mean_j E h_j is at least 1/sqrt(2) whatever the weights."""
    z = torch.linspace(-10, 10, 200_001, dtype=F64).unsqueeze(-1)
    h = DFF.unit_activation(DFF()(z))
    assert h.min().item() == pytest.approx(0.5, abs=1e-12)
    assert h.max().item() == pytest.approx(2**-0.5, abs=1e-9)


def load_script():
    spec = importlib.util.spec_from_file_location(
        "supervised_dff", ROOT / "scripts" / "supervised.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--method", "crelu+dff"], "--method crelu+dff: crelu and dff contradict"),
        (["--method", "dff", "--activation", "tanh"], "dff replaces ReLU, not tanh"),
        (["--method", "dff+injection", "--injection-layers", "2"], "without dff"),
    ],
)
def test_bad_supervised_combinations_are_one_error_line(tmp_path, capsys, args, needle):
    script = load_script()
    out = tmp_path / "run"
    small = ["--examples", "40", "--bin-size", "20", "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit) as info:
        script.main(["slowly-changing-regression", *small, *args, "--out", str(out)])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert not out.exists()


# ----------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------


def test_ppo_networks_of_dff_and_settings_saved_before_it():
    from ppo_cbp.ppo.agent import make_networks, method_names
    from ppo_cbp.ppo.settings import resolve_args
    from ppo_cbp.train import Args

    args = resolve_args(Args(env="Hopper-v4", device="cpu", dff=True, hidden_sizes=(16, 8)))
    assert "dff" in method_names(args)
    torch.manual_seed(0)
    actor, critic = make_networks(args, 11, 3, torch.device("cpu"))
    torch.manual_seed(0)
    ref = dff_mlp(11, [16, 8], 3, args.init)
    for net, out in ((actor, 3), (critic, 1)):
        assert [type(m) for m in net] == [nn.Linear, DFF, nn.Linear, DFF, nn.Linear]
        assert net[-1].weight.shape == (out, 16)
    for p, q in zip(actor.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    # a checkpoint's settings written before --dff existed load as without it
    old = settings_of(dict(hidden_sizes=[16, 8], crelu=False))
    assert old.dff is False
