"""L2 Init, Parseval regularisation, weight clipping, Shrink & Perturb toward a fresh init and
the resets (Adam state, last layers), against their definitions; every method on S stacked
seeds against S runs alone, and resumed from its state_dict."""

import io
import math

import pytest
import torch

from ppo_cbp.plasticity.hooks import Layer, Network, PlasticityMethod
from ppo_cbp.plasticity.l2_init import L2Init
from ppo_cbp.plasticity.parseval import ParsevalRegularization
from ppo_cbp.plasticity.resets import AdamStateReset, LayerReset
from ppo_cbp.plasticity.shrink_perturb import ShrinkPerturb
from ppo_cbp.plasticity.weight_clipping import WeightClipping
from ppo_cbp.ppo.numerics import AdamStep
from ppo_cbp.seeding import derive_seed

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
F64 = torch.float64
GAIN = {"relu": math.sqrt(2.0), "tanh": 5.0 / 3.0, "linear": 1.0}

# (fan_in, fan_out, scheme, nonlinearity) of the toy network's layers; the last is the head
SPECS = [
    (3, 5, "kaiming_uniform", "relu"),
    (5, 4, "lecun_normal", "tanh"),
    (4, 2, "xavier_uniform", "linear"),
]
SEEDS = [3, 8]
BATCH = 6


# --- by hand: the init distributions and their draws ----------------------------------------
def hand_distribution(scheme, nonlinearity, fan_in, fan_out):
    g = GAIN[nonlinearity]
    return {
        "kaiming_uniform": ("uniform", g * math.sqrt(3.0 / fan_in)),
        "kaiming_normal": ("normal", g / math.sqrt(fan_in)),
        "lecun_uniform": ("uniform", math.sqrt(3.0 / fan_in)),
        "lecun_normal": ("normal", 1.0 / math.sqrt(fan_in)),
        "xavier_uniform": ("uniform", g * math.sqrt(6.0 / (fan_in + fan_out))),
        "torch_default": ("uniform", 1.0 / math.sqrt(fan_in)),
    }[scheme]


def hand_draw(shape, scheme, nonlinearity, generator):
    """One draw of ``shape`` ([out, in, *kernel]) from the scheme, by its definition."""
    receptive = math.prod(shape[2:])
    kind, scale = hand_distribution(
        scheme, nonlinearity, shape[1] * receptive, shape[0] * receptive
    )
    dev = generator.device
    if kind == "uniform":
        return torch.rand(shape, generator=generator, device=dev, dtype=F64) * (2 * scale) - scale
    return torch.randn(shape, generator=generator, device=dev, dtype=F64) * scale


def hand_generator(seed, tag, device):
    return torch.Generator(device=device).manual_seed(derive_seed(seed, tag))


# --- a toy network: 3 -> 5 (relu) -> 4 (tanh) -> 2, plus a log-std outside the layers ---------
def build(seeds, stacked, device, init_seed=0, optimizer=torch.optim.Adam, **opt_kwargs):
    """The network of ``seeds`` (one stacked network, or ``seeds == [s]`` alone)."""
    weights = [[] for _ in SPECS]
    for s in seeds:
        g = torch.Generator().manual_seed(1000 * s + init_seed)
        for i, (fi, fo, scheme, nl) in enumerate(SPECS):
            weights[i].append(hand_draw((fo, fi), scheme, nl, g))
    layers, params = [], []
    for i, (_, _, scheme, nl) in enumerate(SPECS):
        w = torch.stack(weights[i]) if stacked else weights[i][0]
        w = w.to(device).requires_grad_()
        b = torch.zeros(w.shape[:-1], dtype=F64, device=device, requires_grad=True)
        layers.append(Layer(w, b, scheme, nl, head=i == len(SPECS) - 1, name=f"fc{i}"))
        params += [w, b]
    log_std = torch.zeros((len(seeds), 2) if stacked else (2,), dtype=F64, device=device)
    params.append(log_std.requires_grad_())
    opt = optimizer(params, lr=0.05, **opt_kwargs)
    return Network(layers, params, opt, seed_dims=int(stacked), seeds=list(seeds))


def data(seeds, stacked, device, steps=8):
    """Per step, each seed's own inputs and targets."""
    xs, ys = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(77 + s)
        xs.append(torch.randn(steps, BATCH, 3, generator=g, dtype=F64))
        ys.append(torch.randn(steps, BATCH, 2, generator=g, dtype=F64))
    x, y = torch.stack(xs, 1), torch.stack(ys, 1)  # [steps, S, B, .]
    if not stacked:
        x, y = x[:, 0], y[:, 0]
    return x.to(device), y.to(device)


def forward(net, x):
    h = x if net.seed_dims else x.unsqueeze(0)
    hidden = []
    for layer, act in zip(net.layers, (torch.relu, torch.tanh, None)):
        w, b = net.seeded(layer.weight), net.seeded(layer.bias)
        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        if act is not None:
            h = act(h)
            hidden.append(h if net.seed_dims else h[0])
    return (h if net.seed_dims else h[0]), hidden


def train(net, method, xy, steps, boundaries=()):
    x, y = xy
    log_std = net.parameters[-1]
    for t in steps:
        for p in net.parameters:
            p.grad = None
        out, hidden = forward(net, x[t])
        loss = (out - y[t]).square().sum() + 0.5 * (log_std - 0.3).square().sum()
        loss.backward()
        method.after_backward()
        net.optimizer.step()
        method.after_step(hidden)
        if t in boundaries:
            method.at_task_boundary()


FACTORIES = {
    "l2_init": lambda net: L2Init(net, 0.5),
    "parseval": lambda net: ParsevalRegularization(net, 0.05),
    "weight_clipping": lambda net: WeightClipping(net, 1.1),
    "shrink_perturb_boundary": lambda net: ShrinkPerturb(net, 0.6),
    "shrink_perturb_step": lambda net: ShrinkPerturb(net, 0.9, every="step"),
    "adam_state_reset": AdamStateReset,
    "layer_reset": lambda net: LayerReset(net, 2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", FACTORIES)
def test_stacked_seeds_follow_their_runs_alone(name, device):
    steps, boundaries = range(7), {1, 4}
    net = build(SEEDS, True, device)
    train(net, FACTORIES[name](net), data(SEEDS, True, device), steps, boundaries)
    for i, s in enumerate(SEEDS):
        alone = build([s], False, device)
        train(alone, FACTORIES[name](alone), data([s], False, device), steps, boundaries)
        plain = build([s], False, device)
        train(plain, PlasticityMethod(), data([s], False, device), steps, boundaries)
        for p, q in zip(net.parameters, alone.parameters):
            torch.testing.assert_close(p[i], q, rtol=1e-10, atol=1e-12)
        assert any(not torch.allclose(q, r) for q, r in zip(alone.parameters, plain.parameters))
    assert not torch.allclose(net.parameters[0][0], net.parameters[0][1])


@pytest.mark.parametrize("name", FACTORIES)
def test_resuming_from_state_dict_continues_exactly(name):
    xy, boundaries = data(SEEDS, True, "cpu"), {1, 5}
    net = build(SEEDS, True, "cpu")
    method = FACTORIES[name](net)
    train(net, method, xy, range(4), boundaries)
    buffer = io.BytesIO()
    torch.save(
        {
            "params": [p.detach().clone() for p in net.parameters],
            "optimizer": net.optimizer.state_dict(),
            "method": method.state_dict(),
        },
        buffer,
    )
    train(net, method, xy, range(4, 8), boundaries)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = build(
        SEEDS, True, "cpu", init_seed=1
    )  # other initial weights: theta_0 must be loaded
    method2 = FACTORIES[name](resumed)
    with torch.no_grad():
        for p, q in zip(resumed.parameters, saved["params"]):
            p.copy_(q)
    resumed.optimizer.load_state_dict(saved["optimizer"])
    method2.load_state_dict(saved["method"])
    train(resumed, method2, xy, range(4, 8), boundaries)
    for p, q in zip(net.parameters, resumed.parameters):
        assert torch.equal(p, q)


# --- L2 Init ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stacked", [False, True])
def test_l2_init_adds_the_gradient_of_half_lambda_squared_distance(device, stacked):
    lam = 0.3
    net = build(SEEDS if stacked else SEEDS[:1], stacked, device)
    theta_0 = [p.detach().clone() for p in net.parameters]
    method = L2Init(net, lam)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # training moved the parameters; the copy must not follow
        for p in net.parameters:
            p.add_(torch.randn(p.shape, generator=g, dtype=F64).to(device))
    grads = [torch.randn(p.shape, generator=g, dtype=F64).to(device) for p in net.parameters]
    for p, gr in zip(net.parameters, grads):
        p.grad = gr.clone()
    net.parameters[-1].grad = None  # a parameter without a gradient gets the penalty's alone
    method.after_backward()

    penalty = 0.5 * lam * sum((p - p0).square().sum() for p, p0 in zip(net.parameters, theta_0))
    expected = torch.autograd.grad(penalty, net.parameters)
    for i, (p, gr, e) in enumerate(zip(net.parameters, grads, expected)):
        want = e if i == len(grads) - 1 else gr + e
        torch.testing.assert_close(p.grad, want, rtol=1e-13, atol=1e-13)
    if stacked:
        distances = [(p - p0).square().flatten(1).sum(1) for p, p0 in zip(net.parameters, theta_0)]
        want = 0.5 * lam * sum(distances)
    else:
        want = penalty.reshape(1)
    torch.testing.assert_close(method.penalty(), want.detach(), rtol=1e-13, atol=0)


def test_l2_init_with_zero_coefficient_leaves_gradients():
    net = build(SEEDS[:1], False, "cpu")
    method = L2Init(net, 0.0)
    with torch.no_grad():
        net.parameters[0].add_(1.0)
    net.parameters[0].grad = torch.ones_like(net.parameters[0])
    method.after_backward()
    assert torch.equal(net.parameters[0].grad, torch.ones_like(net.parameters[0]))


@pytest.mark.parametrize("coefficient", [-1e-3, math.nan, math.inf])
def test_l2_init_rejects_bad_coefficient(coefficient):
    with pytest.raises(ValueError, match="coefficient"):
        L2Init(build([0], False, "cpu"), coefficient)


def test_l2_init_rejects_mismatched_state():
    method = L2Init(build([0], False, "cpu"))
    state = method.state_dict()
    state["initial"] = state["initial"][:-1]
    method.load_state_dict(state)  # bound at the next call, after any regrouping of the list
    with pytest.raises(ValueError, match="initial parameters"):
        method.after_backward()
    del state["version"]  # an older state: bound at once to the parameters built with
    with pytest.raises(ValueError, match="initial parameters"):
        method.load_state_dict(state)


# --- Parseval ---------------------------------------------------------------------------------
def parseval_net(device, stacked):
    """A linear layer (kaiming_uniform, relu), a conv layer (lecun_uniform) and a head."""
    g = torch.Generator().manual_seed(11)
    lead = (len(SEEDS),) if stacked else ()
    shapes = [(*lead, 5, 3), (*lead, 4, 2, 3, 3), (*lead, 2, 4)]
    schemes = [("kaiming_uniform", "relu"), ("lecun_uniform", "relu"), ("torch_default", "linear")]
    layers = []
    for i, (shape, (scheme, nl)) in enumerate(zip(shapes, schemes)):
        w = torch.randn(shape, generator=g, dtype=F64).to(device).requires_grad_()
        layers.append(Layer(w, None, scheme, nl, head=i == 2, name=f"l{i}"))
    params = [layer.weight for layer in layers]
    return Network(layers, params, None, seed_dims=int(stacked), seeds=SEEDS if stacked else [0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stacked", [False, True])
def test_parseval_gradient_is_autograd_of_the_penalty_per_seed(device, stacked):
    lam = 0.07
    net = parseval_net(device, stacked)
    method = ParsevalRegularization(net, lam)
    assert method.scales == pytest.approx([2.0, 1.0])  # kaiming relu: gain^2; lecun: 1
    g = torch.Generator().manual_seed(12)
    grads = [torch.randn(p.shape, generator=g, dtype=F64).to(device) for p in net.parameters]
    for p, gr in zip(net.parameters, grads):
        p.grad = gr.clone()
    method.after_backward()

    seeds = range(len(SEEDS)) if stacked else [None]
    for s in seeds:
        mats = [net.parameters[i] if s is None else net.parameters[i][s] for i in range(2)]
        penalty = 0
        for w, target in zip(mats, (2.0, 1.0)):
            w = w.reshape(w.shape[0], -1)
            penalty = (
                penalty
                + lam
                * (w @ w.T - target * torch.eye(w.shape[0], dtype=F64, device=device))
                .square()
                .sum()
            )
        expected = torch.autograd.grad(penalty, [net.parameters[0], net.parameters[1]])
        for i in range(2):
            got = net.parameters[i].grad if s is None else net.parameters[i].grad[s]
            want = grads[i] + expected[i] if s is None else grads[i][s] + expected[i][s]
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        got_penalty = method.penalty()[0 if s is None else s]
        torch.testing.assert_close(got_penalty, penalty.detach(), rtol=1e-13, atol=0)
    assert torch.equal(net.parameters[2].grad, grads[2])  # the head has no penalty


@pytest.mark.parametrize(
    "scheme, nonlinearity, want",
    [
        ("kaiming_uniform", "relu", 2.0),
        ("kaiming_normal", "tanh", (5 / 3) ** 2),
        ("lecun_uniform", "tanh", 1.0),
        ("lecun_normal", "relu", 1.0),
        ("xavier_uniform", "relu", 2 * 2.0 * 600 / (600 + 300)),  # 2 g^2 n_in / (n_in + n_out)
        ("torch_default", "relu", 1 / 3),
    ],
)
def test_parseval_default_scale_is_the_initial_squared_row_norm(scheme, nonlinearity, want):
    w = torch.empty(300, 600, dtype=F64)
    hand = hand_draw(tuple(w.shape), scheme, nonlinearity, torch.Generator().manual_seed(2))
    head = Layer(torch.zeros(1, 300, dtype=F64), None, head=True)
    net = Network([Layer(w, None, scheme, nonlinearity), head], [w], None)
    (scale,) = ParsevalRegularization(net).scales
    assert scale == pytest.approx(want, rel=1e-12)
    # and the rows of a matrix drawn from the scheme have that squared norm on average
    assert hand.square().sum(1).mean().item() == pytest.approx(want, rel=0.02)


def test_parseval_leaves_scaled_orthogonal_rows_alone():
    q, _ = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=F64))
    w = (math.sqrt(2.0) * q.T).requires_grad_()  # 4 orthogonal rows of squared norm 2
    head = Layer(torch.zeros(1, 4, dtype=F64), None, head=True)
    net = Network([Layer(w, None, "kaiming_uniform", "relu"), head], [w], None)
    method = ParsevalRegularization(net, 0.5)
    w.grad = torch.zeros_like(w)
    method.after_backward()
    assert w.grad.abs().max() < 1e-14
    assert method.penalty().item() < 1e-28


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(coefficient=-1.0),
        dict(coefficient=math.nan),
        dict(scale=0.0),
        dict(scale=-2.0),
        dict(scale=math.inf),
    ],
)
def test_parseval_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ParsevalRegularization(build([0], False, "cpu"), **kwargs)


def test_parseval_needs_a_hidden_layer():
    w = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="hidden layer"):
        ParsevalRegularization(Network([Layer(w, None, head=True)], [w], None))


# --- weight clipping --------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stacked", [False, True])
def test_weight_clipping_clamps_weights_and_biases_to_kappa_times_init_bound(device, stacked):
    kappa = 1.5
    lead = (2,) if stacked else ()
    specs = [  # shape, scheme, nonlinearity, b_l by hand
        ((*lead, 3, 4), "kaiming_uniform", "relu", math.sqrt(2.0) * math.sqrt(3 / 4)),
        ((*lead, 2, 5, 2, 2), "lecun_normal", "relu", 1 / math.sqrt(20)),  # conv: n_in = 5 * 2 * 2
        ((*lead, 1, 3), "torch_default", "linear", 1 / math.sqrt(3)),
    ]
    layers, params, bounds = [], [], []
    for i, (shape, scheme, nl, b) in enumerate(specs):
        w = torch.linspace(-3 * b, 3 * b, math.prod(shape), dtype=F64, device=device).reshape(shape)
        bias = torch.linspace(
            -2 * b, 2 * b, math.prod(shape[: len(lead) + 1]), dtype=F64, device=device
        )
        bias = bias.reshape(shape[: len(lead) + 1])
        layers.append(Layer(w, bias, scheme, nl, head=i == 2))
        params += [w, bias]
        bounds.append(kappa * b)
    other = torch.full((2,), 100.0, dtype=F64, device=device)
    expected = [
        t.clamp(-c, c) for layer, c in zip(layers, bounds) for t in (layer.weight, layer.bias)
    ]
    net = Network(
        layers, params + [other], None, seed_dims=int(stacked), seeds=[0, 1] if stacked else [0]
    )
    method = WeightClipping(net, kappa)
    assert method.bounds == pytest.approx(bounds, rel=1e-14)
    method.after_step([])
    for i, (p, e) in enumerate(zip(params, expected)):
        assert torch.equal(p, e)
        assert p.abs().max().item() == pytest.approx(bounds[i // 2], rel=1e-14)
    assert (other == 100.0).all()


def test_weight_clipping_default_kappa_is_the_reference_implementations():
    assert WeightClipping(build([0], False, "cpu")).kappa == 1.0


@pytest.mark.parametrize("kappa", [0.0, -1.0, math.nan])
def test_weight_clipping_rejects_bad_kappa(kappa):
    with pytest.raises(ValueError, match="kappa"):
        WeightClipping(build([0], False, "cpu"), kappa)


# --- Shrink & Perturb toward a fresh init ------------------------------------------------------
def two_layer_net(device, stacked):
    g = torch.Generator().manual_seed(21)
    seeds = SEEDS if stacked else SEEDS[:1]
    lead = (len(seeds),) if stacked else ()
    w0 = torch.randn(*lead, 4, 3, generator=g, dtype=F64).to(device)
    w1 = torch.randn(*lead, 2, 4, generator=g, dtype=F64).to(device)
    b0 = torch.randn(*lead, 4, generator=g, dtype=F64).to(device)
    layers = [
        Layer(w0, b0, "lecun_uniform", "tanh"),
        Layer(w1, None, "kaiming_normal", "relu", head=True),
    ]
    extra = torch.ones(3, dtype=F64, device=device)
    return Network(layers, [w0, b0, w1, extra], None, seed_dims=int(stacked), seeds=seeds)


def hand_shrink(net, alpha, generators):
    """The net's weights and bias after one shrink toward fresh draws from ``generators``."""
    w0, b0, w1 = (net.seeded(t) for t in net.parameters[:3])
    fresh = [[], []]
    for g in generators:  # each seed: its layers in order
        fresh[0].append(hand_draw((4, 3), "lecun_uniform", "tanh", g))
        fresh[1].append(hand_draw((2, 4), "kaiming_normal", "relu", g))
    out = [
        alpha * w0 + (1 - alpha) * torch.stack(fresh[0]),
        alpha * b0,
        alpha * w1 + (1 - alpha) * torch.stack(fresh[1]),
    ]
    return [t if net.seed_dims else t[0] for t in out]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("every", ["task_boundary", "step"])
def test_shrink_perturb_moves_toward_a_new_fresh_draw_each_time(device, stacked, every):
    alpha = 0.3
    net = two_layer_net(device, stacked)
    method = ShrinkPerturb(net, alpha, every=every)
    generators = [hand_generator(s, 20, device) for s in net.seeds]
    for _ in range(2):  # the second application draws the next numbers, not the first again
        want = hand_shrink(net, alpha, generators)
        before = [p.clone() for p in net.parameters]
        if every == "task_boundary":
            method.after_step([])  # the other hook does nothing
            assert all(torch.equal(p, q) for p, q in zip(net.parameters, before))
            method.at_task_boundary()
        else:
            method.at_task_boundary()
            assert all(torch.equal(p, q) for p, q in zip(net.parameters, before))
            method.after_step([])
        for p, w in zip(net.parameters[:3], want):
            torch.testing.assert_close(p, w, rtol=1e-13, atol=1e-14)
        assert (net.parameters[3] == 1).all()


def test_shrink_perturb_extremes():
    net = two_layer_net("cpu", False)
    before = [p.clone() for p in net.parameters]
    ShrinkPerturb(net, 1.0).at_task_boundary()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters, before))
    ShrinkPerturb(net, 0.0).at_task_boundary()  # a full re-initialisation, bias 0
    want = hand_shrink(net, 0.0, [hand_generator(SEEDS[0], 20, "cpu")])
    for p, w in zip(net.parameters[:3], want):
        torch.testing.assert_close(p, w, rtol=1e-13, atol=1e-14)
    assert (net.parameters[1] == 0).all()


def test_shrink_perturb_defaults_are_the_sources():
    net = two_layer_net("cpu", False)
    assert ShrinkPerturb(net).shrink == 0.5 and ShrinkPerturb(net).every == "task_boundary"
    assert ShrinkPerturb(net, every="step").shrink == 0.999999


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shrink=-0.1), "shrink"),
        (dict(shrink=1.1), "shrink"),
        (dict(shrink=math.nan), "shrink"),
        (dict(every="epoch"), "every"),
    ],
)
def test_shrink_perturb_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShrinkPerturb(two_layer_net("cpu", False), **kwargs)


# --- Adam state reset -------------------------------------------------------------------------
ADAMS = {
    "for_loop": (torch.optim.Adam, dict(foreach=False)),
    "foreach": (torch.optim.Adam, dict(foreach=True)),
    "fused": (torch.optim.Adam, dict(fused=True)),
    "amsgrad": (torch.optim.Adam, dict(amsgrad=True, weight_decay=0.1)),
    "adamw": (torch.optim.AdamW, dict(weight_decay=0.1)),
}


def random_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=F64).to(p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ADAMS)
def test_adam_state_reset_makes_the_next_step_a_new_adams_first(kind, device):
    cls, kwargs = ADAMS[kind]
    kwargs = dict(lr=0.1, betas=(0.8, 0.9), **kwargs)
    g = torch.Generator().manual_seed(0)
    params = [
        torch.randn(3, 4, generator=g, dtype=F64).to(device).requires_grad_() for _ in range(3)
    ]
    opt = cls(params, **kwargs)
    for t in range(3):
        random_grads(params, t)
        opt.step()
    kept = {k: v.clone() for k, v in opt.state[params[2]].items()}
    AdamStateReset(Network([], params[:2], opt)).at_task_boundary()  # params[2] is not in the net
    for p in params[:2]:
        assert all((v == 0).all() for v in opt.state[p].values())
    assert all(torch.equal(v, kept[k]) for k, v in opt.state[params[2]].items())

    fresh = [p.detach().clone().requires_grad_() for p in params[:2]]
    new = cls(fresh, **kwargs)
    random_grads(params, 9)
    random_grads(fresh, 9)
    opt.step()
    new.step()
    for p, q in zip(params, fresh):
        assert torch.equal(p, q)
    for p, q in zip(params, fresh):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], new.state[q][key])


def test_adam_state_reset_before_any_step_leaves_the_state_empty():
    w = torch.ones(2, 2, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([w])
    AdamStateReset(Network([], [w], opt)).at_task_boundary()
    assert len(opt.state) == 0


def test_adam_state_reset_works_with_the_ppo_trainers_direct_adam_step():
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(4, 3, generator=g).requires_grad_() for _ in range(2)]
    opt = torch.optim.Adam(params, lr=0.1, fused=True)
    step = AdamStep(opt)
    for t in range(3):
        random_grads(params, t)
        step()
    AdamStateReset(Network([], params, opt)).at_task_boundary()
    fresh = [p.detach().clone().requires_grad_() for p in params]
    new = torch.optim.Adam(fresh, lr=0.1, fused=True)
    for ps in (params, fresh):
        random_grads(ps, 9)
    step()
    new.step()
    for p, q in zip(params, fresh):
        assert torch.equal(p, q)


@pytest.mark.parametrize("optimizer", [None, "sgd"])
def test_adam_state_reset_needs_adam(optimizer):
    w = torch.ones(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9) if optimizer else None
    with pytest.raises(ValueError, match="Adam"):
        AdamStateReset(Network([], [w], opt))


# --- layer reset ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("count", [1, 2])
def test_layer_reset_redraws_the_last_layers_and_their_adam_state(device, stacked, count):
    seeds = SEEDS if stacked else SEEDS[:1]
    net, reference = build(seeds, stacked, device), build(seeds, stacked, device)
    xy = data(seeds, stacked, device)
    for n in (net, reference):
        train(n, PlasticityMethod(), xy, range(3))
    LayerReset(net, count).at_task_boundary()

    generators = [hand_generator(s, 21, device) for s in seeds]
    fresh = {i: [] for i in range(3 - count, 3)}
    for g in generators:
        for i in fresh:
            fi, fo, scheme, nl = SPECS[i]
            fresh[i].append(hand_draw((fo, fi), scheme, nl, g))
    for i, layer in enumerate(net.layers):
        if i in fresh:
            want = torch.stack(fresh[i]) if stacked else fresh[i][0]
            torch.testing.assert_close(layer.weight, want, rtol=1e-13, atol=1e-14)
            assert (layer.bias == 0).all()
            for t in (layer.weight, layer.bias):
                assert all((v == 0).all() for v in net.optimizer.state[t].values())
        else:
            assert torch.equal(layer.weight, reference.layers[i].weight)

    # the next step: a new Adam's first on the reset layers, the old Adam's on the others
    reset = [t for i in fresh for t in (net.layers[i].weight, net.layers[i].bias)]
    copies = [t.detach().clone().requires_grad_() for t in reset]
    new = torch.optim.Adam(copies, lr=0.05)
    random_grads(net.parameters, 4)
    random_grads(reference.parameters, 4)
    for t, c in zip(reset, copies):
        c.grad = t.grad.clone()
    net.optimizer.step()
    reference.optimizer.step()
    new.step()
    for t, c in zip(reset, copies):
        assert torch.equal(t, c)
    kept = [i for i in range(3) if i not in fresh]
    for i in kept:
        assert torch.equal(net.layers[i].weight, reference.layers[i].weight)
    assert torch.equal(net.parameters[-1], reference.parameters[-1])  # the log-std too


def test_layer_reset_without_an_optimizer_resets_the_weights():
    net = build([0], False, "cpu")
    net.optimizer = None
    LayerReset(net).at_task_boundary()
    fi, fo, scheme, nl = SPECS[-1]
    want = hand_draw((fo, fi), scheme, nl, hand_generator(0, 21, "cpu"))
    torch.testing.assert_close(net.layers[-1].weight, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("layers", [0, 4, 1.5, True])
def test_layer_reset_rejects_bad_layer_counts(layers):
    with pytest.raises(ValueError, match="layers"):
        LayerReset(build([0], False, "cpu"), layers)


def test_layer_reset_restarts_sgd_momentum():
    """With SGD and momentum, a reset layer's next step is a fresh SGD's first: -lr * grad."""
    net = build([0], False, "cpu", optimizer=torch.optim.SGD, momentum=0.9)
    head = net.layers[-1]
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        for p in net.parameters:
            p.grad = torch.randn(p.shape, generator=g, dtype=F64)
        net.optimizer.step()
    reset = LayerReset(net)
    reset.at_task_boundary()
    before = head.weight.detach().clone()
    for p in net.parameters:
        p.grad = torch.randn(p.shape, generator=g, dtype=F64)
    net.optimizer.step()
    torch.testing.assert_close(head.weight.detach(), before - 0.05 * head.weight.grad)


def test_layer_reset_needs_an_optimizer_whose_state_it_knows():
    net = build([0], False, "cpu", optimizer=torch.optim.RMSprop)
    with pytest.raises(ValueError, match="Adam"):
        LayerReset(net)
