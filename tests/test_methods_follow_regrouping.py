"""The plasticity methods act on the network as it is now: after a plasticity injection has
regrouped ``net.parameters`` and ``net.layers`` (the frozen head out, the trainable branch in its
place), every method acts on the branch and leaves the frozen head alone; their states resume
exactly across an injection, whichever is loaded first. Also the decisions on L2 Init and units
that CBP reinitialises, on an unstacked network and on a stack of two seeds."""

import copy
import math

import pytest
import torch
from torch import nn

from ppo_cbp.init import init_layer_
from ppo_cbp.nets.stacked_sequential import StackedSequential
from ppo_cbp.plasticity.c_chain import ChurnReduction
from ppo_cbp.plasticity.cbp import ContinualBackprop
from ppo_cbp.plasticity.hooks import Methods, Network
from ppo_cbp.plasticity.injection import InjectableNetwork, PlasticityInjection
from ppo_cbp.plasticity.l2_init import L2Init
from ppo_cbp.plasticity.normalize_project import NormalizeAndProject
from ppo_cbp.plasticity.parseval import ParsevalRegularization
from ppo_cbp.plasticity.resets import AdamStateReset, LayerReset
from ppo_cbp.plasticity.shrink_perturb import ShrinkPerturb
from ppo_cbp.plasticity.weight_clipping import WeightClipping

F64 = torch.float64
INIT = "kaiming_uniform"
SIZES = (3, 6, 5, 2)
STACKED = [pytest.param(False, id="unstacked"), pytest.param(True, id="stacked")]


def mlp(seed, sizes=SIZES):
    """``Linear, ReLU, ..., Linear``, every layer from ``INIT`` with the ReLU gain, biases 0."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers[:-1])
    for m in net:
        if isinstance(m, nn.Linear):
            init_layer_(m, INIT, "relu", generator=g, bias="zero")
    return net


class Setup:
    """An injectable float64 MLP (a stack of two seeds, or one network), its optimizer, its
    Network and the injection, with ``make(net)`` methods built before any injection."""

    def __init__(self, stacked, make=lambda net: [], optimizer="sgd", init_seed=0):
        self.stacked = stacked
        self.seeds = [11, 12] if stacked else [11]
        nets = [mlp(init_seed + i) for i in range(len(self.seeds))]
        base = StackedSequential(nets) if stacked else nets[0]
        self.module = InjectableNetwork(base, head_layers=2).to(F64)
        params = self.module.parameters()
        if optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=1e-2)
        else:
            self.opt = torch.optim.SGD(params, lr=0.1, momentum=0.5)
        self.net = self.module.as_network(self.opt, init=INIT, seeds=self.seeds)
        self.own = make(self.net)
        self.injection = PlasticityInjection(self.module, self.net, at_task_boundaries=True)
        # as in the trainers: the injection is the last method
        self.methods = Methods([*self.own, self.injection])

    def data(self, seed=0, batch=9):
        g = torch.Generator().manual_seed(seed)
        S = len(self.seeds)
        if self.stacked:
            x = torch.randn(batch, S, SIZES[0], generator=g, dtype=F64)
            y = torch.randn(S, batch, SIZES[-1], generator=g, dtype=F64)
        else:
            x = torch.randn(batch, SIZES[0], generator=g, dtype=F64)
            y = torch.randn(batch, SIZES[-1], generator=g, dtype=F64)
        return x, y

    def output(self, x):
        """``[S, B, out]`` (a leading seed dimension of 1 when unstacked)."""
        out = self.module(x)
        return out[0] if self.stacked else out.unsqueeze(0)

    def loss(self, x, y):
        out = self.output(x)
        return (out - (y if self.stacked else y.unsqueeze(0))).square().mean((1, 2)).sum()

    def step(self, x, y, extra=None):
        """One training step through every hook."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        self.methods.after_backward()
        self.opt.step()
        self.methods.after_step([])

    def branch(self):
        """The trainable branch's (weight, bias) per head layer."""
        return self.module.trainable[-1].layers()

    def frozen_head(self):
        return [t for wb in self.module.head() for t in wb if t is not None]

    def branch_tensors(self):
        return [t for wb in self.branch() for t in wb if t is not None]


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


# ----------------------------------------------------------------------------------------------
# Weight clipping


@pytest.mark.parametrize("stacked", STACKED)
def test_weight_clipping_clamps_the_branch_and_leaves_the_frozen_head(stacked):
    kappa = 1.0
    s = Setup(stacked, lambda net: [WeightClipping(net, kappa)])
    x, y = s.data()
    s.step(x, y)
    s.injection.inject()
    with torch.no_grad():
        for t in [*s.branch_tensors(), *s.frozen_head()]:
            t.fill_(10.0)
    frozen = snapshot(s.frozen_head())
    frozen_copy = snapshot(s.module.frozen[-1].parameters())
    s.own[0].after_step([])
    for w, b in s.branch():
        fan_in = w.shape[-1]
        bound = kappa * math.sqrt(2.0) * math.sqrt(3.0 / fan_in)  # kaiming uniform, ReLU gain
        assert torch.equal(w, torch.full_like(w, bound))
        assert torch.equal(b, torch.full_like(b, bound))
    for t, t0 in zip(s.frozen_head(), frozen):
        assert torch.equal(t, t0)  # still 10
    for t, t0 in zip(s.module.frozen[-1].parameters(), frozen_copy):
        assert torch.equal(t, t0)


# ----------------------------------------------------------------------------------------------
# L2 Init


@pytest.mark.parametrize("stacked", STACKED)
def test_l2_init_pulls_the_branch_toward_its_value_at_injection(stacked):
    lam = 0.3
    s = Setup(stacked, lambda net: [L2Init(net, lam)])
    theta_0 = {id(p): p.detach().clone() for p in s.net.parameters}
    x, y = s.data()
    s.step(x, y)
    s.methods.at_task_boundary()  # injects
    assert s.injection.injections == 1
    at_injection = {id(p): p.detach().clone() for p in s.branch_tensors()}
    for seed in (1, 2):
        s.step(*s.data(seed))  # the branch moves away from its value at injection
    s.opt.zero_grad(set_to_none=True)
    s.loss(x, y).backward()
    loss_grads = {id(p): p.grad.clone() for p in s.net.parameters}
    s.own[0].after_backward()
    branch_ids = {id(p) for p in s.branch_tensors()}
    assert branch_ids <= {id(p) for p in s.net.parameters}
    for p in s.net.parameters:
        anchor = at_injection[id(p)] if id(p) in branch_ids else theta_0[id(p)]
        want = loss_grads[id(p)] + lam * (p.detach() - anchor)
        torch.testing.assert_close(p.grad, want, rtol=1e-13, atol=1e-15)
    for p in s.branch_tensors():
        assert not torch.equal(p, at_injection[id(p)])
    for p in s.frozen_head():
        assert p.grad is None
    penalty = (
        0.5
        * lam
        * sum(
            (p.detach() - (at_injection[id(p)] if id(p) in branch_ids else theta_0[id(p)]))
            .square()
            .reshape(len(s.seeds), -1)
            .sum(1)
            for p in s.net.parameters
        )
    )
    torch.testing.assert_close(s.own[0].penalty(), penalty, rtol=1e-13, atol=0)


@pytest.mark.parametrize("stacked", STACKED)
@pytest.mark.parametrize("order", ["methods_first", "module_first"])
def test_l2_init_resumes_exactly_across_an_injection(stacked, order):
    def make(net):
        return [L2Init(net, 0.2)]

    full = Setup(stacked, make)
    for seed in range(2):
        full.step(*full.data(seed))
    full.methods.at_task_boundary()
    at_injection = snapshot(full.branch_tensors())
    full.step(*full.data(2))
    saved = copy.deepcopy(
        {
            "module": full.module.state_dict(),
            "opt": full.opt.state_dict(),
            "methods": full.methods.state_dict(),
        }
    )
    for seed in range(3, 6):
        full.step(*full.data(seed))

    # a fresh rebuild (other initial weights: theta_0 must come from the state)
    resumed = Setup(stacked, make, init_seed=7)
    if order == "methods_first":  # L2 Init's load, then the injection's rebuilds and regroups
        resumed.methods.load_state_dict(saved["methods"])
        resumed.module.load_state_dict(saved["module"])
        resumed.opt.load_state_dict(saved["opt"])
    else:  # the trainers' order
        resumed.module.load_state_dict(saved["module"])
        resumed.opt.load_state_dict(saved["opt"])
        resumed.methods.load_state_dict(saved["methods"])
    # the state as saved, before any call binds it
    for a, b in zip(
        resumed.own[0].state_dict()["initial"], saved["methods"]["methods"][0]["initial"]
    ):
        assert torch.equal(a, b)
    for seed in range(3, 6):
        resumed.step(*resumed.data(seed))
    for p, q in zip(full.module.state_dict().values(), resumed.module.state_dict().values()):
        if torch.is_tensor(p):
            assert torch.equal(p, q)
    # theta_0 of the branch is its value at injection (the last entries of the state)
    initial = resumed.own[0].state_dict()["initial"]
    for a, b in zip(initial[-len(at_injection) :], at_injection):
        assert torch.equal(a, b)
    for a, b in zip(initial, full.own[0].state_dict()["initial"]):
        assert torch.equal(a, b)


def test_l2_init_loads_a_state_without_version_against_the_built_parameters():
    """Older states hold theta_0 of the parameters L2 Init was built with (the frozen head's,
    after an injection): they bind to those, and the branch enters at its value then."""
    s = Setup(False, lambda net: [L2Init(net, 0.2)])
    built = list(s.net.parameters)
    old_state = {"initial": [p.detach().clone() + 1.0 for p in built]}
    s.injection.inject()
    s.own[0].load_state_dict(old_state)
    params, initial = s.own[0].params, s.own[0].initial
    assert [id(p) for p in params] == [id(p) for p in s.net.parameters]
    body = [p for p in built if all(p is not q for q in s.frozen_head())]
    for p, p0 in zip(params, initial):
        if any(p is q for q in body):
            assert torch.equal(p0, p.detach() + 1.0)
        else:  # a branch tensor
            assert torch.equal(p0, p.detach())


def test_l2_init_mismatched_state_fails_at_the_next_call():
    s = Setup(False, lambda net: [L2Init(net, 0.2)])
    state = s.own[0].state_dict()
    state["initial"] = state["initial"][1:]
    s.own[0].load_state_dict(state)
    with pytest.raises(ValueError, match="initial parameters"):
        s.own[0].after_backward()


@pytest.mark.parametrize("stacked", STACKED)
def test_l2_init_keeps_theta_0_when_a_unit_is_reinitialised(stacked):
    """A unit overwritten in place (as CBP and ReDo replace one): theta_0 is unchanged and the
    new weights are pulled toward the old unit's theta_0."""
    lam = 0.5
    s = Setup(stacked, lambda net: [L2Init(net, lam)])
    theta_0 = snapshot(s.net.parameters)
    w = s.net.layers[0].weight
    with torch.no_grad():
        row = w[..., 2, :]
        row.copy_(torch.randn(row.shape, generator=torch.Generator().manual_seed(3), dtype=F64))
        s.net.layers[1].weight[..., :, 2].zero_()  # CBP's outgoing weights: 0
    for p in s.net.parameters:
        p.grad = None
    s.own[0].after_backward()
    for a, b in zip(s.own[0].initial, theta_0):
        assert torch.equal(a, b)
    torch.testing.assert_close(w.grad, lam * (w.detach() - theta_0[0]), rtol=1e-14, atol=0)
    w1 = s.net.layers[1].weight
    torch.testing.assert_close(w1.grad[..., :, 2], -lam * theta_0[2][..., :, 2], rtol=1e-14, atol=0)


def test_l2_init_keeps_theta_0_when_cbp_replaces_units():
    torch.manual_seed(0)
    net = mlp(3, (3, 8, 2)).to(F64)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    l2 = L2Init(Network([], list(net.parameters()), opt), 0.1)
    theta_0 = snapshot(net.parameters())
    cbp = ContinualBackprop(net, opt, replacement_rate=1.0, maturity_threshold=0)
    x = torch.randn(16, 3, dtype=F64)
    y = torch.randn(16, 2, dtype=F64)
    before = net[0].weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        (net(x) - y).square().mean().backward()
        l2.after_backward()
        opt.step()
        cbp.step()
    assert cbp.num_replaced > 0
    assert not torch.equal(net[0].weight, before)
    for a, b in zip(l2.initial, theta_0):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Parseval


@pytest.mark.parametrize("stacked", STACKED)
def test_parseval_regularises_the_branchs_hidden_layer(stacked):
    lam = 0.05
    s = Setup(stacked, lambda net: [ParsevalRegularization(net, lam)])
    x, y = s.data()
    s.step(x, y)
    s.injection.inject()
    (w_branch, _), _ = s.branch()
    frozen_hidden = s.module.head()[0][0]
    body = s.net.layers[0].weight
    assert frozen_hidden is not w_branch
    s.opt.zero_grad(set_to_none=True)
    s.own[0].after_backward()
    for w in (body, w_branch):
        seeded = w.detach() if stacked else w.detach().unsqueeze(0)
        eye = torch.eye(seeded.shape[1], dtype=F64)
        # kaiming uniform with the ReLU gain: s = gain^2 = 2
        want = 4 * lam * (seeded @ seeded.transpose(1, 2) - 2.0 * eye) @ seeded
        torch.testing.assert_close(w.grad, want.reshape(w.shape), rtol=1e-13, atol=1e-15)
    assert frozen_hidden.grad is None
    assert s.branch()[1][0].grad is None  # the branch's output layer is the head: not regularised
    assert [layer.weight for layer in s.own[0].layers] == [body, w_branch]


# ----------------------------------------------------------------------------------------------
# C-CHAIN


@pytest.mark.parametrize("stacked", STACKED)
@pytest.mark.parametrize("loss_before_step", [True, False], ids=["loss", "no_loss"])
def test_c_chain_churn_after_an_injection_is_the_output_change(stacked, loss_before_step):
    s = Setup(stacked)
    chain = ChurnReduction(
        s.module,
        output=(lambda r: r[0]) if stacked else None,
        skip_steps=1,
        initial_coefficient=0.5,
        seed_dims=int(stacked),
        seeds=s.seeds,
    )
    ref, _ = s.data(seed=9, batch=13)

    def churn_step(seed):
        x, y = s.data(seed)
        with torch.no_grad():
            before = s.output(ref)
        s.step(x, y, extra=(lambda: chain.loss(ref)) if loss_before_step else None)
        chain.after_step()
        with torch.no_grad():
            after = s.output(ref)
        chain.loss(ref)
        return (after - before).square().flatten(1).mean(1)

    churn_step(0)
    churn_step(1)
    s.methods.at_task_boundary()  # injects
    assert s.injection.injections == 1
    for seed in (2, 3):
        want = churn_step(seed)
        assert bool((want > 0).all())
        torch.testing.assert_close(chain.churn, want, rtol=1e-12, atol=0)
    names = chain.state_dict()["names"]
    assert any(n.startswith("trainable.0.") for n in names)
    assert any(n.startswith("frozen.0.") for n in names)


@pytest.mark.parametrize("stacked", STACKED)
@pytest.mark.parametrize("order", ["chain_first", "module_first"])
def test_c_chain_resumes_exactly_across_an_injection(stacked, order):
    def build(init_seed=0):
        s = Setup(stacked, init_seed=init_seed)
        chain = ChurnReduction(
            s.module,
            output=(lambda r: r[0]) if stacked else None,
            skip_steps=1,
            seed_dims=int(stacked),
            seeds=s.seeds,
        )
        return s, chain

    ref, _ = build()[0].data(seed=9, batch=13)

    def step(s, chain, seed):
        s.step(*s.data(seed), extra=lambda: chain.loss(ref))
        chain.after_step()

    full, chain = build()
    step(full, chain, 0)
    full.methods.at_task_boundary()
    step(full, chain, 1)
    saved = copy.deepcopy(
        {
            "module": full.module.state_dict(),
            "opt": full.opt.state_dict(),
            "methods": full.methods.state_dict(),
            "chain": chain.state_dict(),
        }
    )
    for seed in (2, 3):
        step(full, chain, seed)

    resumed, chain2 = build(init_seed=5)
    if order == "chain_first":
        chain2.load_state_dict(saved["chain"])
        assert chain2.state_dict()["names"] == saved["chain"]["names"]
    resumed.module.load_state_dict(saved["module"])
    resumed.opt.load_state_dict(saved["opt"])
    resumed.methods.load_state_dict(saved["methods"])
    if order == "module_first":
        chain2.load_state_dict(saved["chain"])
    for seed in (2, 3):
        step(resumed, chain2, seed)
    a, b = chain.state_dict(), chain2.state_dict()
    assert a["names"] == b["names"]
    for key in ("latest", "previous"):
        for p, q in zip(a[key], b[key]):
            assert torch.equal(p, q)
    assert torch.equal(chain.churn, chain2.churn)
    for p, q in zip(full.module.parameters(), resumed.module.parameters()):
        assert torch.equal(p, q)


def test_c_chain_loads_a_state_without_names():
    s = Setup(False)
    chain = ChurnReduction(s.module, skip_steps=1)
    old = chain.state_dict()
    del old["names"]
    old["latest"] = [t + 1.0 for t in old["latest"]]
    s.injection.inject()
    chain.load_state_dict(old)
    state = chain.state_dict()
    named = dict(s.module.named_parameters())
    for n, t in zip(state["names"], state["latest"]):
        if n.startswith("trainable.") or n.startswith("frozen."):
            assert torch.equal(t, named[n].detach())  # entered at its value at injection
        else:
            assert torch.equal(t, named[n].detach() + 1.0)


# ----------------------------------------------------------------------------------------------
# The other methods


@pytest.mark.parametrize("stacked", STACKED)
def test_shrink_perturb_shrinks_the_branch_not_the_frozen_head(stacked):
    s = Setup(stacked, lambda net: [ShrinkPerturb(net, 0.0, every="task_boundary")])
    s.step(*s.data())
    s.injection.inject()
    frozen = snapshot(s.frozen_head())
    branch = snapshot(s.branch_tensors())
    s.own[0].at_task_boundary()  # shrink 0: a full re-draw of the branch
    for t, t0 in zip(s.frozen_head(), frozen):
        assert torch.equal(t, t0)
    (w, b), (w2, b2) = s.branch()
    assert not torch.equal(w, branch[0]) and not torch.equal(w2, branch[2])
    assert (b == 0).all() and (b2 == 0).all()


@pytest.mark.parametrize("stacked", STACKED)
def test_normalize_and_project_holds_the_branch_at_its_norm_at_injection(stacked):
    s = Setup(stacked, lambda net: [NormalizeAndProject(net)])
    for seed in range(3):
        s.step(*s.data(seed))
    s.injection.inject()
    frozen = snapshot(s.frozen_head())
    norms = [s.net.seeded(w.detach()).flatten(1).norm(dim=1) for w, _ in s.branch()]
    for seed in range(3, 6):
        s.step(*s.data(seed))
    for t, t0 in zip(s.frozen_head(), frozen):
        assert torch.equal(t, t0)
    for (w, _), n in zip(s.branch(), norms):
        torch.testing.assert_close(
            s.net.seeded(w.detach()).flatten(1).norm(dim=1), n, rtol=1e-13, atol=0
        )
    assert s.own[0].weights[-2:] == [w for w, _ in s.branch()]


@pytest.mark.parametrize("stacked", STACKED)
@pytest.mark.parametrize("order", ["methods_first", "module_first"])
def test_normalize_and_project_resumes_exactly_across_an_injection(stacked, order):
    def make(net):
        return [NormalizeAndProject(net)]

    full = Setup(stacked, make)
    full.step(*full.data(0))
    full.methods.at_task_boundary()
    full.step(*full.data(1))
    saved = copy.deepcopy(
        {
            "module": full.module.state_dict(),
            "opt": full.opt.state_dict(),
            "methods": full.methods.state_dict(),
        }
    )
    for seed in (2, 3):
        full.step(*full.data(seed))
    resumed = Setup(stacked, make, init_seed=4)
    if order == "methods_first":
        resumed.methods.load_state_dict(saved["methods"])
    resumed.module.load_state_dict(saved["module"])
    resumed.opt.load_state_dict(saved["opt"])
    if order == "module_first":
        resumed.methods.load_state_dict(saved["methods"])
    for seed in (2, 3):
        resumed.step(*resumed.data(seed))
    for p, q in zip(full.module.parameters(), resumed.module.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("stacked", STACKED)
def test_layer_reset_resets_the_branch_not_the_frozen_head(stacked):
    s = Setup(stacked, lambda net: [LayerReset(net, 2)], optimizer="adam")
    s.step(*s.data())
    s.injection.inject()
    s.step(*s.data(1))
    frozen = snapshot(s.frozen_head())
    branch = snapshot(s.branch_tensors())
    s.own[0].at_task_boundary()
    for t, t0 in zip(s.frozen_head(), frozen):
        assert torch.equal(t, t0)
    (w, b), (w2, b2) = s.branch()
    assert not torch.equal(w, branch[0]) and not torch.equal(w2, branch[2])
    assert (b == 0).all() and (b2 == 0).all()
    for t in s.branch_tensors():
        assert float(s.opt.state[t]["step"]) == 0
        assert (s.opt.state[t]["exp_avg"] == 0).all()


@pytest.mark.parametrize("stacked", STACKED)
def test_adam_state_reset_resets_the_branch(stacked):
    s = Setup(stacked, lambda net: [AdamStateReset(net)], optimizer="adam")
    s.step(*s.data())
    s.injection.inject()
    s.step(*s.data(1))
    assert all(float(s.opt.state[t]["step"]) == 1 for t in s.branch_tensors())
    s.own[0].at_task_boundary()
    for t in s.net.parameters:
        assert float(s.opt.state[t]["step"]) == 0
        assert (s.opt.state[t]["exp_avg"] == 0).all()
        assert (s.opt.state[t]["exp_avg_sq"] == 0).all()
