"""Plasticity injection: the output across an injection, what trains and what is frozen (the
optimizer included), the gradients against a network differentiated by hand, the fresh head's
draws, stacked seeds against each seed alone, and an exact resume across injections."""

import copy

import pytest
import torch
from torch import nn

from ppo_cbp.init import init_layer_
from ppo_cbp.nets.stacked_sequential import StackedSequential
from ppo_cbp.plasticity.hooks import Network
from ppo_cbp.plasticity.injection import InjectableNetwork, PlasticityInjection
from ppo_cbp.seeding import TAG_INJECTION, derive_seed

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
F64 = torch.float64
INIT = "kaiming_uniform"


def mlp(seed, sizes=(3, 6, 5, 2), init=INIT, bias="zero"):
    """``Linear, ReLU, ..., Linear`` drawn from ``init`` (ReLU gain for every layer)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers[:-1])
    for m in net:
        if isinstance(m, nn.Linear):
            init_layer_(m, init, "relu", generator=g, bias=bias)
    return net


def convnet(seed):
    """A convolutional body (through a Flatten) under a two-layer head."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )
    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            init_layer_(m, INIT, "relu", generator=g, bias="torch_default")
    return net


def make_optimizer(kind, params):
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2, weight_decay=0.1)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)


def build(nets, seeds, device, optimizer="adam", head_layers=2, **kwargs):
    """The injectable network (stacked when several ``nets``), its optimizer and the method."""
    base = StackedSequential(nets) if len(nets) > 1 else copy.deepcopy(nets[0])
    module = InjectableNetwork(base, head_layers).to(device=device, dtype=F64)
    opt = make_optimizer(optimizer, module.parameters())
    method = PlasticityInjection(module, module.as_network(opt, init=INIT, seeds=seeds), **kwargs)
    return module, opt, method


def output(module, x):
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def train_step(module, opt, x, y, set_to_none=True):
    """One step on the sum over seeds of each seed's mean squared error."""
    opt.zero_grad(set_to_none=set_to_none)
    out = output(module, x)
    ((out - y).square().mean(dim=(-2, -1)).sum()).backward()
    opt.step()


def data(device, n_in=3, n_out=2, seeds=None, batch=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    if seeds is None:
        x, y = torch.randn(batch, n_in, generator=g), torch.randn(batch, n_out, generator=g)
    else:
        x = torch.randn(batch, seeds, n_in, generator=g)
        y = torch.randn(seeds, batch, n_out, generator=g)
    return x.to(device, F64), y.to(device, F64)


def in_optimizer(opt, p):
    return any(q is p for g in opt.param_groups for q in g["params"])


# ----------------------------------------------------------------------------------------
# The output across an injection


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stacked", [False, True])
def test_output_is_unchanged_at_each_injection(device, stacked):
    seeds = [11, 12] if stacked else [11]
    module, opt, method = build([mlp(s) for s in seeds], seeds, device)
    x, y = data(device, seeds=len(seeds) if stacked else None)
    for injection in range(1, 3):
        for _ in range(3):
            train_step(module, opt, x, y)
        with torch.no_grad():
            before = module(x)
        method.inject()
        assert method.injections == injection
        with torch.no_grad():
            after = module(x)
        if stacked:  # the hidden activations are the network's own, unchanged too
            assert torch.equal(before[0], after[0])
            assert all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True))
        else:
            assert torch.equal(before, after)
    # and the branch does change it once it trains
    train_step(module, opt, x, y)
    with torch.no_grad():
        assert not torch.equal(output(module, x), after[0] if stacked else after)


# ----------------------------------------------------------------------------------------
# What trains and what is frozen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_only_the_branch_and_the_body_train(device, optimizer, set_to_none):
    module, opt, method = build([mlp(3)], [3], device, optimizer)
    x, y = data(device)
    for _ in range(4):  # momentum and moments of the head to come
        train_step(module, opt, x, y, set_to_none)
    head = [t for wb in module.head() for t in wb]
    method.inject()
    frozen = [p.detach().clone() for p in module.frozen_parameters()]
    branch = [p.detach().clone() for p in module.trainable[0].parameters()]
    copy0 = [p.detach().clone() for p in module.frozen[0].parameters()]
    body = [p.detach().clone() for p in module.net[0].parameters()]
    for _ in range(3):
        train_step(module, opt, x, y, set_to_none)
    # theta and theta'_0 never move, even under weight decay and momentum with zero gradients
    assert all(torch.equal(a, b) for a, b in zip(frozen, module.frozen_parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(copy0, module.frozen[0].parameters()))
    assert all(not p.requires_grad and p.grad is None for p in module.frozen_parameters())
    assert all(not in_optimizer(opt, p) and p not in opt.state for p in head)
    # theta' and the body do
    assert all(not torch.equal(a, b) for a, b in zip(branch, module.trainable[0].parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(body, module.net[0].parameters()))
    # the Network the other methods see: trained parameters and the head's layers
    trained = [*module.net[0].parameters(), *module.trainable[0].parameters()]
    assert {id(p) for p in method.net.parameters} == {id(p) for p in trained}
    layers = method.net.layers
    assert [layer.weight for layer in layers[1:]] == list(module.trainable[0].weights)
    assert layers[-1].head and not layers[1].head and layers[1].init == INIT


@pytest.mark.parametrize("device", DEVICES)
def test_new_parameters_start_adam_at_step_zero(device):
    module, opt, method = build([mlp(4)], [4], device, "adam")
    x, y = data(device)
    steps = 5
    for _ in range(steps):
        train_step(module, opt, x, y)
    method.inject()
    branch = list(module.trainable[0].parameters())
    assert all(p not in opt.state for p in branch)
    start = [p.detach().clone() for p in branch]
    train_step(module, opt, x, y)
    group = next(g for g in opt.param_groups if any(p is branch[0] for p in g["params"]))
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    for p, p0 in zip(branch, start, strict=True):
        state = opt.state[p]
        assert float(state["step"]) == 1
        g = p.grad + wd * p0  # coupled L2, as Adam's weight_decay adds it
        torch.testing.assert_close(state["exp_avg"], (1 - b1) * g, rtol=1e-14, atol=0)
        torch.testing.assert_close(state["exp_avg_sq"], (1 - b2) * g * g, rtol=1e-14, atol=0)
        # the first step with bias correction: lr * g / (|g| + eps)
        torch.testing.assert_close(p, p0 - lr * g / (g.abs() + eps), rtol=1e-12, atol=1e-15)
    # the body's state carries on
    assert float(opt.state[module.net[0].weight]["step"]) == steps + 1


# ----------------------------------------------------------------------------------------
# Gradients against the network differentiated by hand


def head_forward(phi, w1, b1, w2, b2):
    z = phi @ w1.T + b1
    return z, z.clamp_min(0) @ w2.T + b2


def head_backward(phi, g, w1, b1, w2, b2):
    """Gradients of ``sum(g * head(phi))`` wrt (w1, b1, w2, b2) and phi."""
    z, _ = head_forward(phi, w1, b1, w2, b2)
    a = z.clamp_min(0)
    dz = (g @ w2) * (z > 0)
    return (dz.T @ phi, dz.sum(0), g.T @ a, g.sum(0)), dz @ w1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("injections", [1, 2])
def test_gradients_equal_those_by_hand(device, injections):
    module, opt, method = build([mlp(5, bias="torch_default")], [5], device, "sgd")
    x, y = data(device)
    for _ in range(injections):
        for _ in range(2):
            train_step(module, opt, x, y)
        method.inject()
    train_step(module, opt, x, y)  # the branches now differ from their copies
    opt.zero_grad(set_to_none=True)
    out = module(x)
    (0.5 * (out - y).square().sum()).backward()

    d = lambda t: t.detach().clone()  # noqa: E731
    w0, b0 = d(module.net[0].weight), d(module.net[0].bias)
    heads = [[d(t) for wb in module.head() for t in wb]]
    signs = [1.0]
    for trainable, frozen in zip(module.trainable, module.frozen, strict=True):
        heads += [[d(p) for p in _layers(trainable)], [d(p) for p in _layers(frozen)]]
        signs += [1.0, -1.0]
    z0 = x @ w0.T + b0
    phi = z0.clamp_min(0)
    expected = sum(s * head_forward(phi, *h)[1] for s, h in zip(signs, heads, strict=True))
    torch.testing.assert_close(out.detach(), expected, rtol=1e-12, atol=1e-12)
    g = expected - y
    dphi = torch.zeros_like(phi)
    for s, h in zip(signs, heads, strict=True):
        dphi += s * head_backward(phi, g, *h)[1]
    # the latest theta' gets the gradient of the whole output through its own head
    (dw1, db1, dw2, db2), _ = head_backward(phi, g, *heads[-2])
    latest = _layers(module.trainable[-1])
    for p, want in zip(latest, (dw1, db1, dw2, db2), strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-12)
    # the body gets it through all the heads: theta, theta' and -theta'_0
    dz0 = dphi * (z0 > 0)
    torch.testing.assert_close(module.net[0].weight.grad, dz0.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.net[0].bias.grad, dz0.sum(0), rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in module.frozen_parameters())


def _layers(branch):
    """A branch's (w1, b1, w2, b2)."""
    return [t for wb in branch.layers() for t in wb]


# ----------------------------------------------------------------------------------------
# The fresh head is drawn as the network was built


@pytest.mark.parametrize("init", ["kaiming_uniform", "xavier_uniform", "lecun_normal"])
@pytest.mark.parametrize("bias", ["zero", "torch_default"])
def test_fresh_head_is_drawn_from_the_layers_schemes(init, bias):
    net = mlp(6, init=init, bias=bias)
    module = InjectableNetwork(net)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    method = PlasticityInjection(
        module, module.as_network(opt, init=init, seeds=[6]), bias=bias, tag=TAG_INJECTION + 1
    )
    method.inject()
    # what init_layer_ draws for fresh layers of the head's shapes, from the method's stream
    g = torch.Generator().manual_seed(derive_seed(6, TAG_INJECTION + 1))
    for (w, b), layer in zip(module.trainable[0].layers(), (net[2], net[4]), strict=True):
        fresh = init_layer_(copy.deepcopy(layer), init, "relu", generator=g, bias=bias)
        assert torch.equal(w, fresh.weight) and torch.equal(b, fresh.bias)
        assert not torch.equal(w, layer.weight)
    for a, b in zip(module.trainable[0].parameters(), module.frozen[0].parameters()):
        assert torch.equal(a, b) and a is not b


# ----------------------------------------------------------------------------------------
# Stacked seeds against each seed alone


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["mlp", "whole_mlp", "conv"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stacked_seeds_equal_each_seed_alone(device, kind, optimizer):
    """Two injections at task boundaries; ``whole_mlp``: the head is every layer (no body)."""
    seeds = [21, 22, 23]
    nets = [convnet(s) if kind == "conv" else mlp(s) for s in seeds]
    kwargs = dict(head_layers=3 if kind == "whole_mlp" else 2, at_task_boundaries=True)
    stacked, opt, method = build(nets, seeds, device, optimizer, **kwargs)
    alone = [build([net], [s], device, optimizer, **kwargs) for net, s in zip(nets, seeds)]
    shape = (1, 5, 5) if kind == "conv" else (3,)
    n_out = 3 if kind == "conv" else 2
    g = torch.Generator().manual_seed(1)
    for step in range(7):
        x = torch.randn(4, len(seeds), *shape, generator=g).to(device, F64)
        y = torch.randn(len(seeds), 4, n_out, generator=g).to(device, F64)
        if step in (2, 5):
            method.at_task_boundary()
            for _, _, m in alone:
                m.at_task_boundary()
        train_step(stacked, opt, x, y)
        for s, (module, o, _) in enumerate(alone):
            train_step(module, o, x[:, s], y[s].unsqueeze(0))
    assert stacked.injections == 2
    x = torch.randn(4, len(seeds), *shape, generator=g).to(device, F64)
    with torch.no_grad():
        out, _ = stacked(x)
        for s, (module, _, _) in enumerate(alone):
            torch.testing.assert_close(out[s], module(x[:, s]), rtol=1e-12, atol=1e-12)
            for i in range(2):
                for a, b in zip(
                    stacked.trainable[i].parameters(), module.trainable[i].parameters()
                ):
                    torch.testing.assert_close(a[s], b, rtol=1e-12, atol=1e-12)


def test_split_stacked_forward_equals_the_whole():
    nets = [convnet(s) for s in (1, 2)]
    net = StackedSequential(nets).to(F64)
    x = torch.randn(3, 2, 1, 5, 5, dtype=F64)
    out, hidden = net(x)
    for k in (3, 4, 5):  # after the Flatten
        features, first = net(x, stop=k)
        rest_out, rest = net(features, start=k)
        assert torch.equal(rest_out, out)
        assert all(torch.equal(a, b) for a, b in zip(first + rest, hidden, strict=True))
    with pytest.raises(ValueError, match="before the Flatten"):
        net(x, stop=2)
    with pytest.raises(ValueError, match="no modules"):
        net(x, start=4, stop=3)


# ----------------------------------------------------------------------------------------
# Checkpoints


def continue_run(module, opt, method, device, stacked, steps=4):
    """Steps with a task boundary (an injection) after the first; the outputs of each."""
    outs = []
    for step in range(steps):
        x, y = data(device, seeds=2 if stacked else None, seed=100 + step)
        if step == 1:
            method.at_task_boundary()
        train_step(module, opt, x, y)
        with torch.no_grad():
            outs.append(output(module, x).clone())
    return outs


def snapshot(module, opt, method):
    return copy.deepcopy((module.state_dict(), opt.state_dict(), method.state_dict()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("order", ["module_first", "method_first"])
def test_resume_across_injections_is_exact(device, stacked, order):
    seeds = [31, 32] if stacked else [31]
    nets = [mlp(s) for s in seeds]
    module, opt, method = build(nets, seeds, device, "adam", at_task_boundaries=True)
    x, y = data(device, seeds=len(seeds) if stacked else None)
    for _ in range(2):
        train_step(module, opt, x, y)
    method.inject()
    train_step(module, opt, x, y)
    saved = snapshot(module, opt, method)
    expected = continue_run(module, opt, method, device, stacked)
    final = snapshot(module, opt, method)

    # a run built afresh, not injected yet
    module2, opt2, method2 = build(nets, seeds, device, "adam", at_task_boundaries=True)
    net_state, opt_state, method_state = saved
    if order == "module_first":  # the module rebuilds its branches, the optimizer follows
        module2.load_state_dict(net_state)
        opt2.load_state_dict(opt_state)
        method2.load_state_dict(method_state)
    else:
        method2.load_state_dict(method_state)
        module2.load_state_dict(net_state)
        opt2.load_state_dict(opt_state)
    assert method2.injections == 1
    got = continue_run(module2, opt2, method2, device, stacked)
    assert method2.injections == 2
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    resumed = snapshot(module2, opt2, method2)
    for a, b in zip(final[0].values(), resumed[0].values(), strict=True):
        assert a == b if isinstance(a, dict) else torch.equal(a, b)
    assert [len(g["params"]) for g in final[1]["param_groups"]] == [
        len(g["params"]) for g in resumed[1]["param_groups"]
    ]
    for key, state in final[1]["state"].items():
        for name, t in state.items():
            assert torch.equal(t, resumed[1]["state"][key][name])
    assert {id(p) for p in method2.net.parameters} == {
        id(p) for p in module2.parameters() if p.requires_grad
    }


@pytest.mark.parametrize("device", DEVICES)
def test_resume_before_an_injection_draws_the_same_head(device):
    module, opt, method = build([mlp(8)], [8], device, "sgd", at_task_boundaries=True)
    saved = snapshot(module, opt, method)
    expected = continue_run(module, opt, method, device, False)
    module2, opt2, method2 = build([mlp(8)], [8], device, "sgd", at_task_boundaries=True)
    module2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    method2.load_state_dict(saved[2])
    got = continue_run(module2, opt2, method2, device, False)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


# ----------------------------------------------------------------------------------------
# When to inject


def test_injects_at_task_boundaries_only_when_asked():
    module, _, method = build([mlp(9)], [9], "cpu")
    method.at_task_boundary()
    assert method.injections == 0  # the paper's protocol: inject() once, when chosen
    method.inject()
    assert method.injections == 1
    module, _, method = build([mlp(9)], [9], "cpu", at_task_boundaries=True)
    for n in range(1, 4):
        method.at_task_boundary()
        assert method.injections == n == module.injections
    _, _, method = build([mlp(9)], [9], "cpu", at_task_boundaries=True, max_injections=1)
    for _ in range(3):
        method.at_task_boundary()
    assert method.injections == 1


def test_networks_sharing_an_optimizer_keep_one_group_order():
    """Two networks (PPO's actor and critic) on one optimizer, injected in either order."""

    def run(first):
        nets = {"a": InjectableNetwork(mlp(1)), "b": InjectableNetwork(mlp(2))}
        opt = torch.optim.Adam([p for n in nets.values() for p in n.parameters()])
        methods = {
            k: PlasticityInjection(n, n.as_network(opt, init=INIT, seeds=[0]), tag=50 + i)
            for i, (k, n) in enumerate(nets.items())
        }
        for k in (first, "b" if first == "a" else "a"):
            methods[k].inject()
        return [g["plasticity_injection"] for g in opt.param_groups[1:]], len(opt.param_groups)

    assert run("a") == run("b") == ([50, 51], 3)


# ----------------------------------------------------------------------------------------
# Bad arguments


def test_bad_arguments_raise_value_error():
    net = mlp(0)
    for head_layers in (0, 4, True, 1.5):
        with pytest.raises(ValueError, match="head_layers"):
            InjectableNetwork(net, head_layers)
    with pytest.raises(ValueError, match="may hold only Linear"):
        InjectableNetwork(convnet(0), head_layers=3)
    with pytest.raises(ValueError, match="nn.Sequential or a StackedSequential"):
        InjectableNetwork(nn.Linear(2, 2))

    module = InjectableNetwork(net)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    good = module.as_network(opt, init=INIT, seeds=[0])
    with pytest.raises(ValueError, match="InjectableNetwork"):
        PlasticityInjection(net, good)
    for kwargs, match in [
        (dict(tag=49), "tag"),
        (dict(tag=60), "tag"),
        (dict(bias="normal"), "bias"),
        (dict(max_injections=0), "max_injections"),
    ]:
        with pytest.raises(ValueError, match=match):
            PlasticityInjection(module, good, **kwargs)
    seeded = Network(good.layers, good.parameters, opt, seed_dims=1, seeds=[0])
    with pytest.raises(ValueError, match="seed_dims"):
        PlasticityInjection(module, seeded)
    with pytest.raises(ValueError, match="net.layers"):
        PlasticityInjection(module, Network(good.layers[:1], good.parameters, opt))
    body_only = torch.optim.SGD(module.net[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not train the network's head"):
        PlasticityInjection(module, module.as_network(body_only, init=INIT, seeds=[0]))
    unknown = module.as_network(opt, init=INIT, seeds=[0])
    unknown.layers[-1].init = "orthogonal"
    with pytest.raises(ValueError, match="unknown init scheme"):
        PlasticityInjection(module, unknown)
    with pytest.raises(ValueError, match="seeds"):
        module.as_network(opt, init=INIT, seeds=[0, 1])

    method = PlasticityInjection(module, good)
    method.inject()
    with pytest.raises(ValueError, match="only 0"):
        method.load_state_dict(
            {"injections": 0, "generators": [g.get_state() for g in method.generators]}
        )
    with pytest.raises(ValueError, match="generators"):
        method.load_state_dict({"injections": 1, "generators": []})
    with pytest.raises(ValueError, match="head's shapes"):
        module.inject_([torch.zeros(2, 2)] * 2, [None, None])
