"""The plasticity metrics of CReLU networks against their definitions, in float64: the feature
norm and the ranks are of the features the next layer reads, ``F = [relu(z), relu(-z)]``
(``2 * units`` columns per hidden layer), on PPO's ``plasticity_metrics`` and on the supervised
benchmarks' metrics (the autograd learner with ``--method crelu``); dead and dormant units stay
per unit (a CReLU unit is dead only where ``z = 0``). The non-CReLU paths keep their values.

Every expected value is computed here from the weights: the pre-activations layer by layer,
the consumer's columns read in CReLU's interleaved layout (unit ``i``'s ``relu(z_i)`` at column
``2i``, ``relu(-z_i)`` at ``2i + 1``), then numpy's singular values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ppo_cbp.benchmarks.autograd_learner import AutogradLearner, make_learner
from ppo_cbp.benchmarks.common import Learner, MethodConfig, resolve_method
from ppo_cbp.benchmarks.permuted_mnist import DEFAULTS, task_start_metrics
from ppo_cbp.benchmarks.scr import hidden_unit_metrics
from ppo_cbp.metrics import plasticity_metrics
from ppo_cbp.nets.crelu import crelu_mlp
from ppo_cbp.nets.stacked_sequential import StackedSequential

F64 = torch.float64
REL = 1e-9


# ----------------------------------------------------------------------------------------
# The definitions, by hand
# ----------------------------------------------------------------------------------------


def crelu_features(z: Tensor) -> Tensor:
    """``F = concat(relu(z), relu(-z))`` (a permutation of the network's columns: the metrics
    below do not depend on the order of the columns)."""
    return torch.cat([z.clamp_min(0), (-z).clamp_min(0)], dim=-1)


def next_pre_activation(z: Tensor, weight: Tensor, bias: Tensor, crelu: bool) -> Tensor:
    """The consumer's pre-activation from the previous layer's ``z`` ``[N, n]``: with CReLU its
    columns ``2i`` read ``relu(z_i)`` and ``2i + 1`` read ``relu(-z_i)``."""
    if not crelu:
        return z.clamp_min(0) @ weight.T + bias
    return z.clamp_min(0) @ weight[:, 0::2].T + (-z).clamp_min(0) @ weight[:, 1::2].T + bias


def pre_activations(x: Tensor, layers: list[tuple[Tensor, Tensor]], crelu: bool) -> list[Tensor]:
    """Each hidden layer's ``z`` ``[N, units]`` (``layers``: the Linear layers, head included)."""
    w, b = layers[0]
    zs = [x @ w.T + b]
    for w, b in layers[1:-1]:
        zs.append(next_pre_activation(zs[-1], w, b, crelu))
    return zs


def singular_values(f: Tensor) -> np.ndarray:
    return np.linalg.svd(f.cpu().numpy().astype(np.float64), compute_uv=False)


def effective_rank(f: Tensor) -> float:
    """Roy & Vetterli: ``exp(-sum_k p_k log p_k)``, ``p = sigma / ||sigma||_1`` (0 log 0 = 0)."""
    sv = singular_values(f)
    p = sv / sv.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def share_rank(values: np.ndarray, threshold: float = 0.99) -> int:
    """The fewest of the largest values holding ``threshold`` of their sum."""
    values = np.sort(values)[::-1]
    return int(np.argmax(np.cumsum(values) / values.sum() >= threshold) + 1)


def feature_norm(f: Tensor) -> float:
    """``(1/N) sum_n ||F[n, :]||_2``, as :func:`ppo_cbp.metrics.feature_norm` defines it."""
    return float(np.linalg.norm(f.cpu().numpy(), axis=1).mean())


# ----------------------------------------------------------------------------------------
# PPO: plasticity_metrics on crelu_mlp
# ----------------------------------------------------------------------------------------


def silence_units_(net: nn.Sequential) -> nn.Sequential:
    """First hidden layer: unit 0 has z = 0 (dead: both outputs zero), unit 1 has z = -2 (its
    relu(z) column is zero on every input, but relu(-z) carries it: not dead)."""
    with torch.no_grad():
        net[0].weight[:2] = 0
        net[0].bias[0] = 0
        net[0].bias[1] = -2.0
        for m in net:  # biases away from 0 elsewhere, so that they show
            if isinstance(m, nn.Linear) and m is not net[0]:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, dtype=F64))
    return net


@pytest.mark.parametrize("widths", [[16], [16, 12]])
def test_ppo_metrics_of_a_crelu_network_are_of_its_features(widths):
    torch.manual_seed(0)
    net = silence_units_(crelu_mlp(5, widths, 3).double())
    x = torch.randn(300, 5, dtype=F64)
    linears = [(m.weight.detach(), m.bias.detach()) for m in net if isinstance(m, nn.Linear)]
    zs = pre_activations(x, linears, crelu=True)
    f = crelu_features(zs[-1])
    assert f.shape == (300, 2 * widths[-1])

    m = plasticity_metrics(net, x)

    assert float(m["feature_norm"]) == pytest.approx(feature_norm(f), rel=REL)
    # the features' norm is the pre-activation's: the units' |z| / 2 would give half of it
    assert float(m["feature_norm"]) == pytest.approx(feature_norm(zs[-1]), rel=REL)
    assert float(m["effective_rank"]) == pytest.approx(effective_rank(f), rel=REL)
    assert int(m["stable_rank"]) == share_rank(singular_values(f))
    # units: a unit is active on a state where z != 0 (either output non-zero)
    units = sum(z.shape[1] for z in zs)
    dead = sum(int(((z != 0).double().mean(0) <= 0.01).sum()) for z in zs)
    assert dead == 1  # unit 0 only: unit 1's relu(-z) is always on
    assert round(float(m["dead_units"]) * units) == dead  # (a float32 fraction)
    dormant = 0
    for z in zs:
        mean = (z.abs() / 2).mean(0)  # the unit's activation, as ReDo sees it
        dormant += int((mean / (mean.mean() + 1e-9) <= 0.1).sum())
    assert round(float(m["dormant_ratio"]) * units) == dormant


def test_ppo_metrics_of_a_layernorm_crelu_network_are_of_its_features():
    torch.manual_seed(1)
    net = crelu_mlp(4, [10, 7], 2, layer_norm=True).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, dtype=F64))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, dtype=F64))
    x = torch.randn(200, 4, dtype=F64)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    norms = [m for m in net if isinstance(m, nn.LayerNorm)]

    def normalised(a: Tensor, ln: nn.LayerNorm) -> Tensor:
        mu, var = a.mean(-1, keepdim=True), a.var(-1, unbiased=False, keepdim=True)
        return (a - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    with torch.no_grad():
        z = normalised(x @ linears[0].weight.T + linears[0].bias, norms[0])
        w, b = linears[1].weight, linears[1].bias
        z = normalised(next_pre_activation(z, w, b, crelu=True), norms[1])
    f = crelu_features(z)
    m = plasticity_metrics(net, x)
    assert float(m["feature_norm"]) == pytest.approx(feature_norm(f), rel=REL)
    assert float(m["effective_rank"]) == pytest.approx(effective_rank(f), rel=REL)
    assert int(m["stable_rank"]) == share_rank(singular_values(f))


def test_ppo_metrics_of_a_relu_network_are_unchanged():
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)
    ).double()
    with torch.no_grad():
        net[0].bias[:3] = -50.0  # three dead units
    x = torch.randn(300, 5, dtype=F64)
    linears = [(m.weight.detach(), m.bias.detach()) for m in net if isinstance(m, nn.Linear)]
    zs = pre_activations(x, linears, crelu=False)
    hs = [z.clamp_min(0) for z in zs]
    m = plasticity_metrics(net, x)
    assert float(m["feature_norm"]) == pytest.approx(feature_norm(hs[-1]), rel=REL)
    assert float(m["effective_rank"]) == pytest.approx(effective_rank(hs[-1]), rel=REL)
    assert int(m["stable_rank"]) == share_rank(singular_values(hs[-1]))
    dead = sum(int(((h != 0).double().mean(0) <= 0.01).sum()) for h in hs)
    assert dead >= 3
    assert round(float(m["dead_units"]) * 28) == dead


# ----------------------------------------------------------------------------------------
# Supervised benchmarks: the autograd learner with --method crelu
# ----------------------------------------------------------------------------------------


def _method(spec: str, **overrides):
    return resolve_method(MethodConfig(method=spec, **overrides), DEFAULTS)


def stacked_of(learner: AutogradLearner) -> StackedSequential:
    module = learner.module
    return module if isinstance(module, StackedSequential) else module.net


def stacked_linears(stacked: StackedSequential) -> list[tuple[Tensor, Tensor]]:
    layers = (stacked.layer(i) for i in range(len(stacked)))
    return [(w.detach(), b.detach()) for _, _, w, b in layers if w is not None]


def x_aug_of(S: int, N: int, n_in: int, seed: int = 3) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.ones(S, N, n_in + 1, dtype=F64)
    x[..., :-1] = torch.randn(S, N, n_in, generator=g, dtype=F64)
    return x


def expected_rows(x_aug: Tensor, linears, crelu: bool) -> list[dict[str, float]]:
    """Permuted MNIST's task-start metrics per seed, by hand."""
    rows = []
    for s in range(x_aug.shape[0]):
        seed_layers = [(w[s], b[s]) for w, b in linears]
        zs = pre_activations(x_aug[s, :, :-1], seed_layers, crelu)
        feats = [crelu_features(z) if crelu else z.clamp_min(0) for z in zs]
        row: dict[str, float] = {}
        dead_total = 0
        for i, (z, f) in enumerate(zip(zs, feats), start=1):
            # a ReLU unit is dead where relu(z) = 0, a CReLU unit where z = 0 (both outputs)
            dead = int(((z if crelu else z.clamp_min(0)) == 0).all(0).sum())
            dead_total += dead
            sv = singular_values(f)
            row[f"dead_units_{i}"] = dead
            row[f"effective_rank_{i}"] = effective_rank(f)
            row[f"stable_rank_{i}"] = share_rank(sv)
            row[f"approximate_rank_{i}"] = share_rank(sv**2)
        row["dead_fraction"] = dead_total / sum(z.shape[1] for z in zs)
        row["feature_norm"] = feature_norm(feats[-1])
        rows.append(row)
    return rows


def assert_rows(rows, expected):
    assert len(rows) == len(expected)
    for row, exp in zip(rows, expected):
        for key, value in exp.items():
            if isinstance(value, int):
                assert row[key] == value, key
            else:
                assert row[key] == pytest.approx(value, rel=REL), key


def silence_stacked_unit_(stacked: StackedSequential) -> None:
    """Seed 0, first hidden layer: unit 0 has z = 0 (dead), unit 1 z = -1 (alive through
    relu(-z)); every bias away from 0."""
    linears = stacked_linears(stacked)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, b in linears:
            b.copy_(0.1 * torch.randn(b.shape, generator=g, dtype=F64))
        w0, b0 = stacked.layer(0)[2:]
        w0[0, :2] = 0
        b0[0, 0] = 0
        b0[0, 1] = -1.0


@pytest.mark.parametrize("spec", ["crelu", "crelu+injection"])
def test_supervised_metrics_of_a_crelu_learner_are_of_its_features(spec):
    overrides = {"injection_layers": 1} if "injection" in spec else {}
    sizes, seeds = [6, 9, 7, 3], [0, 4]
    kw = dict(loss="cross_entropy", device=torch.device("cpu"), dtype=F64)
    learner = AutogradLearner(sizes, seeds, _method(spec, **overrides), **kw)
    stacked = stacked_of(learner)
    silence_stacked_unit_(stacked)
    x_aug = x_aug_of(2, 150, 6)
    # the training step still hands CBP and ReDo each unit's activation |z| / 2
    hidden = learner.step(x_aug[:, :5], torch.zeros(2, 5, dtype=torch.int64))
    assert [tuple(h.shape) for h in hidden] == [(2, 5, 9), (2, 5, 7)]
    if "injection" in spec:
        learner.task_boundary()  # an injected head; the hidden layers are the network's own
        assert learner.module.injections == 1
    linears = stacked_linears(stacked)
    expected = expected_rows(x_aug, linears, crelu=True)
    assert expected[0]["dead_units_1"] == 1  # unit 0 of seed 0; unit 1 is alive

    assert_rows(task_start_metrics(learner, x_aug), expected)

    _, features = learner.net.forward(x_aug)
    assert [tuple(f.shape) for f in features] == [(2, 150, 18), (2, 150, 14)]
    assert learner.net.outputs_per_unit == [2, 2]
    # the units' activations, as the step hands them to CBP and ReDo, are still |z| / 2
    _, units = stacked(x_aug[..., :-1].transpose(0, 1))
    for s in range(2):
        zs = pre_activations(x_aug[s, :, :-1], [(w[s], b[s]) for w, b in linears], crelu=True)
        for h, z in zip(units, zs):
            torch.testing.assert_close(h[s], z.abs() / 2, rtol=1e-12, atol=1e-12)


def test_scr_metrics_of_a_crelu_learner_are_of_its_features():
    sizes, seeds = [5, 8, 1], [0, 1]
    kw = dict(loss="mse", device=torch.device("cpu"), dtype=F64)
    learner = AutogradLearner(sizes, seeds, _method("crelu"), **kw)
    stacked = stacked_of(learner)
    silence_stacked_unit_(stacked)
    x_aug = x_aug_of(2, 120, 5, seed=4)
    linears = stacked_linears(stacked)
    rows = hidden_unit_metrics(learner, x_aug, count_dead=True)
    for s, row in enumerate(rows):
        (z,) = pre_activations(x_aug[s, :, :-1], [(w[s], b[s]) for w, b in linears], crelu=True)
        assert row["effective_rank"] == pytest.approx(effective_rank(crelu_features(z)), rel=REL)
        assert row["dead_units"] == int((z == 0).all(0).sum())
    assert rows[0]["dead_units"] == 1


@pytest.mark.parametrize("fused", [True, False])
def test_supervised_metrics_of_a_relu_learner_are_unchanged(fused):
    sizes, seeds = [6, 9, 7, 3], [0, 4]
    kw = dict(loss="cross_entropy", device=torch.device("cpu"), dtype=F64)
    method = _method("bp")
    learner = (
        make_learner(sizes, seeds, method, **kw)
        if fused
        else AutogradLearner(sizes, seeds, method, **kw)
    )
    x_aug = x_aug_of(2, 150, 6, seed=5)
    if fused:
        assert isinstance(learner, Learner)
        # [S, out, in + 1]: the bias is the last column
        linears = [(p[..., :-1], p[..., -1]) for p in learner.net.params]
    else:
        stacked = stacked_of(learner)
        with torch.no_grad():
            stacked.layer(0)[3][:, :2] = -50.0  # two dead units per seed
        linears = stacked_linears(stacked)
    expected = expected_rows(x_aug, linears, crelu=False)
    assert_rows(task_start_metrics(learner, x_aug), expected)
