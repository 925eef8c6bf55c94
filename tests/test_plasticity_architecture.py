"""The architecture methods against their definitions, in float64: CReLU (its layout, its units
as continual backprop, ReDo and the metrics see them), LayerNorm in stacked networks and its
resets, and Normalize-and-Project's projection."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from ppo_cbp.metrics import plasticity_metrics
from ppo_cbp.nets.crelu import CReLU, crelu_mlp
from ppo_cbp.nets.stacked_sequential import StackedSequential
from ppo_cbp.nets.units import hidden_activations, sequential_unit_layers
from ppo_cbp.plasticity.cbp import ContinualBackprop
from ppo_cbp.plasticity.hooks import Layer, Network
from ppo_cbp.plasticity.normalize_project import (
    NormalizeAndProject,
    layer_norm_mlp,
    layer_norms,
)
from ppo_cbp.plasticity.redo import ReDo

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


def randomise_norms_(net: nn.Module, seed: int) -> nn.Module:
    """LayerNorm gains and offsets away from 1 and 0, so that their resets show."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
            if isinstance(m, nn.LayerNorm) and m.bias is not None:
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
    return net


def build(arch: str, seed: int, device) -> nn.Sequential:
    torch.manual_seed(seed)
    net = {
        "crelu": lambda: crelu_mlp(3, [4, 5], 2),
        "ln_crelu": lambda: crelu_mlp(3, [4, 5], 2, layer_norm=True),
        "ln_relu": lambda: layer_norm_mlp(3, [4, 5], 2),
        # a gain without an offset, then no affine parameters at all
        "ln_variants": lambda: nn.Sequential(
            nn.Linear(3, 4),
            nn.LayerNorm(4, bias=False),
            nn.ReLU(),
            nn.Linear(4, 5),
            nn.LayerNorm(5, elementwise_affine=False),
            CReLU(),
            nn.Linear(10, 2),
        ),
    }[arch]()
    return randomise_norms_(net, seed).to(device, F64)


def network_of(net: nn.Module, optimizer, seeds=(0,)) -> Network:
    """The method protocol's view of an MLP, or of a stack of them."""
    if isinstance(net, StackedSequential):
        units = net.unit_layers("kaiming_uniform")
        pairs = [(u.weight, u.bias) for u in units] + [net.head()]
        seed_dims = 1
    else:
        pairs = [(m.weight, m.bias) for m in net if isinstance(m, nn.Linear)]
        seed_dims = 0
    layers = [Layer(w, b, head=i == len(pairs) - 1) for i, (w, b) in enumerate(pairs)]
    return Network(layers, list(net.parameters()), optimizer, seed_dims, list(seeds))


# ----------------------------------------------------------------------------------------
# CReLU


def test_crelu_interleaves_the_two_signs_of_each_unit():
    z = torch.randn(2, 3, 4, dtype=F64)
    out = CReLU()(z)
    assert out.shape == (2, 3, 8)
    for i in range(4):
        assert torch.equal(out[..., 2 * i], z[..., i].clamp(min=0))
        assert torch.equal(out[..., 2 * i + 1], (-z[..., i]).clamp(min=0))
    torch.testing.assert_close(CReLU.unit_activation(out), z.abs() / 2, **TOL)


def test_crelu_is_the_concatenation_up_to_a_permutation_of_the_consumer_columns():
    torch.manual_seed(0)
    z = torch.randn(6, 4, dtype=F64)
    consumer = torch.randn(3, 8, dtype=F64)
    # the paper's layout [relu(z), relu(-z)] reads column 2i + o here at o * n + i
    permuted = torch.empty_like(consumer)
    for i in range(4):
        for o in range(2):
            permuted[:, o * 4 + i] = consumer[:, 2 * i + o]
    concatenated = torch.cat([z.clamp(min=0), (-z).clamp(min=0)], dim=1)
    torch.testing.assert_close(CReLU()(z) @ consumer.T, concatenated @ permuted.T, **TOL)


def test_crelu_mlp_widths_init_and_units():
    torch.manual_seed(0)
    net = crelu_mlp(3, [4, 5], 2)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 4), (8, 5), (10, 2)]
    assert [type(m) for m in net] == [nn.Linear, CReLU, nn.Linear, CReLU, nn.Linear]
    for m in linears:  # kaiming uniform with the ReLU gain on the real fan-in, zero bias
        assert (m.weight.abs() <= math.sqrt(2) * math.sqrt(3 / m.in_features)).all()
        assert (m.bias == 0).all()
    layers, taps = sequential_unit_layers(net, "kaiming_uniform")
    assert [(u.units, u.out_group, u.averaged_outputs) for u in layers] == [(4, 2, 2), (5, 2, 2)]
    assert [u.nonlinearity for u in layers] == ["relu", "relu"] and taps == [net[1], net[3]]
    assert layers[0].out_weight is linears[1].weight and layers[1].fan_in == 8
    with_norm = crelu_mlp(3, [4], 2, layer_norm=True)
    assert [type(m) for m in with_norm] == [nn.Linear, nn.LayerNorm, CReLU, nn.Linear]
    (unit,), _ = sequential_unit_layers(with_norm, "kaiming_uniform")
    assert [(t is with_norm[1].weight, v) for t, v in unit.norm[:1]] == [(True, 1.0)]
    with pytest.raises(ValueError, match="widths must be positive"):
        crelu_mlp(3, [0], 2)


def test_crelu_units_need_a_linear_consumer_of_twice_the_width():
    with pytest.raises(ValueError, match="must take 8 inputs"):
        sequential_unit_layers(
            nn.Sequential(nn.Linear(3, 4), CReLU(), nn.Linear(4, 2)), "lecun_normal"
        )
    with pytest.raises(ValueError, match="between two Linear layers"):
        sequential_unit_layers(
            nn.Sequential(nn.Conv2d(1, 2, 3), CReLU(), nn.Flatten(), nn.Linear(4, 2)),
            "lecun_normal",
        )
    with pytest.raises(ValueError, match="consumer must read"):
        sequential_unit_layers(
            nn.Sequential(nn.Linear(3, 4), CReLU(), nn.LayerNorm(8), nn.Linear(8, 2)),
            "lecun_normal",
        )


def tensor_ops(cbp: ContinualBackprop, kernel: bool) -> ContinualBackprop:
    """``cbp`` on the tensor-op path (a GPU's) unless ``kernel`` (the CPU kernel, where it runs)."""
    if not kernel:
        cbp._kernel_state = None
    return cbp


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", [True, False])
def test_cbp_contribution_utility_of_crelu_units_by_hand(kernel, device):
    """u = (1 - eta) * mean_b |z_bi| / 2 * sum_k (|W2[k, 2i]| + |W2[k, 2i + 1]|), with the
    activations of the forward pass and the consumer's weights after the optimizer step."""
    torch.manual_seed(0)
    net = crelu_mlp(3, [4], 2).to(device, F64)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    cbp = tensor_ops(ContinualBackprop(net, opt, replacement_rate=0.0, decay_rate=0.9), kernel)
    x = torch.randn(7, 3, dtype=F64, device=device)
    z = x @ net[0].weight.detach().T + net[0].bias.detach()
    net(x).square().sum().backward()
    opt.step()
    cbp.step()
    W2 = net[2].weight.detach()
    outgoing = W2.abs().sum(0).view(4, 2).sum(1)
    expected = 0.1 * (z.abs() / 2).mean(0) * outgoing
    torch.testing.assert_close(cbp.utility[0][0], expected, **TOL)
    # a stack of two such networks, whose forward hands its activations over (the weights now)
    stacked = StackedSequential([net, net])
    cbp2 = ContinualBackprop(stacked.unit_layers("kaiming_uniform"), decay_rate=0.9, seed=[0, 1])
    tensor_ops(cbp2, kernel)
    _, hidden = stacked(torch.stack([x, x], dim=1))
    cbp2.step(hidden)
    z = x @ net[0].weight.detach().T + net[0].bias.detach()
    for s in range(2):
        torch.testing.assert_close(
            cbp2.utility[0][s], 0.1 * (z.abs() / 2).mean(0) * outgoing, **TOL
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", [True, False])
def test_cbp_replaces_the_crelu_unit_of_least_utility_with_both_of_its_columns(kernel, device):
    torch.manual_seed(1)
    net = crelu_mlp(3, [4], 2).to(device, F64)
    with torch.no_grad():
        net[2].weight[:, 2:4] *= 1e-3  # unit 1 contributes little through both of its outputs
        net[2].weight[:, 4] *= 1e-3  # unit 2 only through relu(-z)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    # one unit of the four is replaced at the first step after maturity (0.25 * 4 = 1)
    cbp = ContinualBackprop(net, opt, replacement_rate=0.25, maturity_threshold=1, decay_rate=0.0)
    tensor_ops(cbp, kernel)
    x = torch.randn(16, 3, dtype=F64, device=device)
    for step in range(2):
        opt.zero_grad()
        z = x @ net[0].weight.detach().T + net[0].bias.detach()
        net(x).square().sum().backward()
        opt.step()
        before = [p.detach().clone() for p in net.parameters()]
        state = {k: v.clone() for k, v in opt.state[net[2].weight].items() if v.dim() == 2}
        assert cbp.step() == step
    W2 = before[2]
    utility = (z.abs() / 2).mean(0) * W2.abs().sum(0).view(4, 2).sum(1)
    unit = int(utility.argmin())
    assert unit == 1
    W1, b1, W2_now = net[0].weight, net[0].bias, net[2].weight
    keep = [i for i in range(4) if i != unit]
    assert not torch.equal(W1[unit], before[0][unit]) and (W1[unit].abs() <= math.sqrt(2)).all()
    assert torch.equal(W1[keep], before[0][keep]) and b1[unit] == 0
    columns = [2 * unit, 2 * unit + 1]
    assert (W2_now[:, columns] == 0).all()
    other = [c for c in range(8) if c not in columns]
    assert torch.equal(W2_now[:, other], W2[:, other]) and torch.equal(net[2].bias, before[3])
    for k, v in state.items():
        new = opt.state[net[2].weight][k]
        assert (new[:, columns] == 0).all() and torch.equal(new[:, other], v[:, other])


def test_a_crelu_unit_cannot_fold_its_mean_output_into_the_consumer_bias():
    torch.manual_seed(0)
    net = crelu_mlp(3, [4], 2).double()
    cbp = ContinualBackprop(
        net, None, replacement_rate=0.5, maturity_threshold=0, decay_rate=0.0, fold_bias=True
    )
    net(torch.randn(5, 3, dtype=F64))
    with pytest.raises(ValueError, match="cannot be folded"):
        cbp.step()


@pytest.mark.parametrize("device", DEVICES)
def test_redo_scores_and_metrics_see_a_crelu_unit_through_both_outputs(device):
    """Score s_i = E m_i / mean_j E m_j with m = (relu(z) + relu(-z)) / 2: a unit whose
    pre-activation is always negative is alive through relu(-z); one with z = 0 is dormant."""
    torch.manual_seed(0)
    net = crelu_mlp(3, [4], 2).to(device, F64)
    with torch.no_grad():
        net[0].weight[:2] = 0
        net[0].bias[0] = 0  # unit 0: z = 0
        net[0].bias[1] = -3.0  # unit 1: z = -3, relu(z) = 0 on every input
    x = torch.randn(32, 3, dtype=F64, device=device)
    z = x @ net[0].weight.T + net[0].bias
    (h,) = hidden_activations(net, x)
    torch.testing.assert_close(h, z.abs() / 2, **TOL)
    mean = (z.abs() / 2).mean(0)
    expected = mean / (mean.mean() + 1e-9) <= 0.1
    assert expected.tolist()[:2] == [True, False]
    metrics = plasticity_metrics(net, x)
    active = (z != 0).double().mean(0)  # a unit is active where either output is non-zero
    assert float(metrics["dead_units"]) == float((active <= 0.01).double().mean())
    assert float(metrics["dead_units"]) == 0.25  # unit 0 only; unit 1 is never dead
    before = [p.detach().clone() for p in net.parameters()]
    redo = ReDo(net, None, threshold=0.1, period=1)
    net(x)
    redo.step()
    replaced = expected.nonzero().flatten().tolist()
    kept = (~expected).nonzero().flatten().tolist()
    W1, W2 = net[0].weight, net[2].weight
    assert (W1[replaced] != 0).any(1).all() and torch.equal(W1[kept], before[0][kept])
    columns = [2 * i + o for i in replaced for o in range(2)]
    other = [c for c in range(8) if c not in columns]
    assert (W2[:, columns] == 0).all() and torch.equal(W2[:, other], before[2][:, other])
    assert redo.num_replaced == len(replaced)


# ----------------------------------------------------------------------------------------
# LayerNorm


@pytest.mark.parametrize("device", DEVICES)
def test_cbp_on_a_layernorm_network_resets_the_replaced_units_gain_and_offset(device):
    torch.manual_seed(2)
    net = randomise_norms_(layer_norm_mlp(3, [4], 2), 0).to(device, F64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    cbp = ContinualBackprop(net, opt, replacement_rate=0.25, maturity_threshold=1, decay_rate=0.0)
    x = torch.randn(16, 3, dtype=F64, device=device)
    ln = net[1]
    for step in range(2):
        opt.zero_grad()
        with torch.no_grad():
            h = net[2](net[1](net[0](x)))  # the forward's activations, weights before the step
        net(x).square().sum().backward()
        opt.step()
        before = [p.detach().clone() for p in net.parameters()]
        assert cbp.step() == step
    utility = h.abs().mean(0) * before[4].abs().sum(0)  # E|h_i| * sum_k |W2[k, i]|
    unit = int(utility.argmin())
    keep = [i for i in range(4) if i != unit]
    gain, offset = before[2], before[3]
    assert ln.weight[unit] == 1 and ln.bias[unit] == 0
    assert torch.equal(ln.weight[keep], gain[keep]) and torch.equal(ln.bias[keep], offset[keep])
    assert net[0].bias[unit] == 0 and (net[3].weight[:, unit] == 0).all()
    for p in (ln.weight, ln.bias):
        for v in opt.state[p].values():
            if v.shape == p.shape:
                assert v[unit] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["ln_relu", "crelu", "ln_crelu", "ln_variants"])
def test_stacked_layernorm_and_crelu_networks_equal_each_network_alone(arch, device):
    nets = [build(arch, s, device) for s in range(3)]
    alone = [copy.deepcopy(n) for n in nets]
    stacked = StackedSequential(nets)
    x = torch.randn(6, 3, 3, dtype=F64, device=device)
    y = torch.randn(6, 3, 2, dtype=F64, device=device)
    units = stacked.unit_layers("kaiming_uniform")
    norms = stacked.layer_norms()
    assert len(norms) == (0 if arch == "crelu" else 2)
    for u, pair in zip(units, norms):
        present = [(t, v) for t, v in zip(pair, (1.0, 0.0)) if t is not None]
        assert [(t is ref, v) for (t, v), (ref, _) in zip(u.norm, present)] == [
            (True, v) for _, v in present
        ]
        assert len(u.norm) == len(present)
    if arch == "ln_variants":
        assert norms[0][1] is None and norms[1] == (None, None)
    opt = torch.optim.SGD(stacked.parameters(), lr=0.05, momentum=0.9)
    opts = [torch.optim.SGD(n.parameters(), lr=0.05, momentum=0.9) for n in alone]
    for _ in range(3):
        out, hidden = stacked(x)
        for s, net in enumerate(alone):
            torch.testing.assert_close(out[s], net(x[:, s]), **TOL)
            for h, ref in zip(hidden, hidden_activations(net, x[:, s])):
                torch.testing.assert_close(h[s], ref, **TOL)
        opt.zero_grad()
        (out - y.transpose(0, 1)).square().mean(dim=(1, 2)).sum().backward()
        opt.step()
        for s, (net, o) in enumerate(zip(alone, opts)):
            o.zero_grad()
            (net(x[:, s]) - y[:, s]).square().mean().backward()
            o.step()
    for s, net in enumerate(alone):
        for p, q in zip(net.parameters(), stacked.params):
            torch.testing.assert_close(q[s], p, **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", [True, False])
def test_cbp_on_stacked_layernorm_crelu_networks_equals_each_network_alone(kernel, device):
    nets = [build("ln_crelu", s, device) for s in range(2)]
    alone = [copy.deepcopy(n) for n in nets]
    stacked = StackedSequential(nets)
    kw = dict(replacement_rate=0.2, maturity_threshold=2, decay_rate=0.5)
    opt = torch.optim.Adam(stacked.parameters(), lr=1e-2)
    cbp = ContinualBackprop(stacked.unit_layers("kaiming_uniform"), opt, seed=[10, 11], **kw)
    tensor_ops(cbp, kernel)
    opts = [torch.optim.Adam(n.parameters(), lr=1e-2) for n in alone]
    cbps = [ContinualBackprop(n, o, seed=10 + s, **kw) for s, (n, o) in enumerate(zip(alone, opts))]
    x = torch.randn(8, 2, 3, dtype=F64, device=device)
    for _ in range(6):
        opt.zero_grad()
        out, hidden = stacked(x)
        out.square().mean(dim=(1, 2)).sum().backward()
        opt.step()
        cbp.step(hidden)
        for s, (net, o, c) in enumerate(zip(alone, opts, cbps)):
            o.zero_grad()
            net(x[:, s]).square().mean().backward()
            o.step()
            c.step()
    assert cbp.num_replaced == cbps[0].num_replaced > 0
    for s, net in enumerate(alone):
        for p, q in zip(net.parameters(), stacked.params):
            torch.testing.assert_close(q[s], p, **TOL)


def test_stacked_network_places_layernorm_and_crelu_after_a_linear_only():
    with pytest.raises(ValueError, match="must follow a Linear"):
        StackedSequential(
            [nn.Sequential(nn.Conv2d(1, 2, 3), nn.LayerNorm(2), nn.Flatten(), nn.Linear(2, 2))]
        )
    with pytest.raises(ValueError, match="must follow a Linear"):
        StackedSequential([nn.Sequential(CReLU(), nn.Linear(6, 2))])
    with pytest.raises(ValueError, match="only a LayerNorm over the features"):
        StackedSequential([nn.Sequential(nn.Linear(3, 4), nn.LayerNorm((2, 2)), nn.Linear(4, 2))])


# ----------------------------------------------------------------------------------------
# Normalize-and-Project


def joint_norm(*tensors):
    return math.sqrt(sum(float(t.detach().square().sum()) for t in tensors))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("project_head", [True, False])
def test_projection_restores_each_layers_initial_norm(project_head, device):
    net = build("ln_relu", 0, device)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    norms = [m for m in net if isinstance(m, nn.LayerNorm)]
    initial = [float(m.weight.detach().norm()) for m in linears]
    initial_ln = [joint_norm(m.weight, m.bias) for m in norms]
    opt = torch.optim.Adam(net.parameters(), lr=0.2)
    nap = NormalizeAndProject(network_of(net, opt), layer_norms(net), project_head=project_head)
    x = torch.randn(8, 3, dtype=F64, device=device)
    for _ in range(3):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        stepped = [p.detach().clone() for p in net.parameters()]
        nap.after_step([])
        for i, m in enumerate(linears):
            w = stepped[4 * i]
            if m is linears[-1] and not project_head:
                assert torch.equal(m.weight, w)
                continue
            torch.testing.assert_close(m.weight, w * (initial[i] / float(w.norm())), **TOL)
            assert math.isclose(float(m.weight.detach().norm()), initial[i], rel_tol=1e-12)
        for j, m in enumerate(norms):
            gain, offset = stepped[4 * j + 2], stepped[4 * j + 3]
            scale = initial_ln[j] / joint_norm(gain, offset)
            torch.testing.assert_close(m.weight, gain * scale, **TOL)
            torch.testing.assert_close(m.bias, offset * scale, **TOL)
        for m, b in zip(linears, [stepped[1], stepped[5], stepped[9]]):
            assert torch.equal(m.bias, b)  # biases are not projected
    # gain 1 and offset 0 over n features: sqrt(n)
    fresh = layer_norm_mlp(3, [4], 2)
    assert [joint_norm(m.weight, m.bias) for m in fresh if isinstance(m, nn.LayerNorm)] == [2.0]


@pytest.mark.parametrize("device", DEVICES)
def test_projection_of_stacked_networks_equals_each_network_alone(device):
    nets = [build("ln_crelu", s, device) for s in range(3)]
    alone = [copy.deepcopy(n) for n in nets]
    stacked = StackedSequential(nets)
    opt = torch.optim.SGD(stacked.parameters(), lr=0.5, momentum=0.9)
    nap = NormalizeAndProject(network_of(stacked, opt, range(3)), layer_norms(stacked))
    opts = [torch.optim.SGD(n.parameters(), lr=0.5, momentum=0.9) for n in alone]
    naps = [NormalizeAndProject(network_of(n, o), layer_norms(n)) for n, o in zip(alone, opts)]
    x = torch.randn(8, 3, 3, dtype=F64, device=device)
    for _ in range(4):
        opt.zero_grad()
        out, hidden = stacked(x)
        out.square().mean(dim=(1, 2)).sum().backward()
        opt.step()
        nap.after_step(hidden)
        for s, (net, o, p) in enumerate(zip(alone, opts, naps)):
            o.zero_grad()
            net(x[:, s]).square().mean().backward()
            o.step()
            p.after_step([])
    for s, net in enumerate(alone):
        for p, q in zip(net.parameters(), stacked.params):
            torch.testing.assert_close(q[s], p, **TOL)
    for n, ref in zip(nap.initial_weight_norms, zip(*(p.initial_weight_norms for p in naps))):
        torch.testing.assert_close(n, torch.cat(ref), **TOL)


def test_projection_resumes_exactly_from_its_state():
    def run(net, nap, opt, steps, x):
        for _ in range(steps):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
            nap.after_step([])

    x = torch.randn(8, 3, dtype=F64)
    net = build("ln_relu", 0, "cpu")
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    nap = NormalizeAndProject(network_of(net, opt), layer_norms(net))
    run(net, nap, opt, 3, x)
    buffer = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "nap": nap.state_dict()}, buffer)
    run(net, nap, opt, 3, x)
    # the resumed run builds its method on a fresh network of other initial norms, then loads
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    other = build("ln_relu", 1, "cpu")
    other_opt = torch.optim.Adam(other.parameters(), lr=0.1)
    resumed = NormalizeAndProject(network_of(other, other_opt), layer_norms(other))
    other.load_state_dict(saved["net"])
    other_opt.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["nap"])
    run(other, resumed, other_opt, 3, x)
    for p, q in zip(net.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_projection_leaves_an_all_zero_weight_at_zero_and_refuses_bad_arguments():
    net = build("ln_relu", 0, "cpu")
    nap = NormalizeAndProject(network_of(net, None), layer_norms(net))
    with torch.no_grad():
        net[3].weight.zero_()
    nap.project_()
    assert (net[3].weight == 0).all()
    with torch.no_grad():
        net[0].weight.zero_()
    with pytest.raises(ValueError, match="norm 0 at initialisation"):
        NormalizeAndProject(network_of(net, None))
    with pytest.raises(ValueError, match=r"\[\*seed, n\]"):
        NormalizeAndProject(
            network_of(build("ln_relu", 0, "cpu"), None), [(torch.ones(2, 4), None)]
        )
    with pytest.raises(ValueError, match="initial_weight_norms"):
        nap.load_state_dict({"initial_weight_norms": [], "initial_norm_norms": []})
    with pytest.raises(ValueError, match="widths must be positive"):
        layer_norm_mlp(0, [4], 2)
