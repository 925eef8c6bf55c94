"""C-CHAIN's churn reduction (ppo_cbp.plasticity.c_chain) against its definition and the authors'
coefficient rule, and the feature norm, gradient norm and policy churn metrics against hand
computations, in float64."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from ppo_cbp.metrics import feature_norm, gradient_norm, policy_churn, policy_kl
from ppo_cbp.nets.stacked_sequential import StackedSequential
from ppo_cbp.plasticity.c_chain import ChurnReduction
from ppo_cbp.ppo.numerics import ppo_loss_autograd
from ppo_cbp.seeding import TAG_CHURN_REFERENCE, derive_seed

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
F64 = torch.float64


def mlp(seed: int, sizes=(5, 8, 3), device="cpu") -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods).to(device=device, dtype=F64)


def randn(g: torch.Generator, *shape: int, device="cpu") -> Tensor:
    return torch.randn(*shape, generator=g, dtype=F64).to(device)


def task_loss(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (net(x) - y).square().mean()


def authors_coefficients(policy_losses, churns, target, initial, adapt_from, window, eps=1e-8):
    """The coefficient after each update, as the authors' PPO code computes it (lists, numpy)."""
    p_list, reg_list, coef, out = [], [], initial, []
    for iteration, (p, r) in enumerate(zip(policy_losses, churns), start=1):
        p_list.append(p)
        reg_list.append(r)
        if iteration >= adapt_from:
            running_p = np.mean(np.abs(p_list[-window:]))
            running_reg = np.mean(reg_list[-window:])
            coef = target * running_p / (running_reg + eps)
        out.append(coef)
    return out


# --------------------------------------------------------------------------------------------------
# C-CHAIN: the churn term
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_churn_term_and_its_gradient_match_the_definition(device):
    net = mlp(0, device=device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    chain = ChurnReduction(net, initial_coefficient=3.0)
    history = [copy.deepcopy(net)]  # the authors' list of past networks
    g = torch.Generator().manual_seed(1)
    for step in range(1, 7):
        states = randn(g, 16, 5, device=device)
        x, y = randn(g, 16, 5, device=device), randn(g, 16, 3, device=device)
        term = chain.loss(states)
        if len(history) <= 2:  # the first two steps have no churn term
            assert step <= 2 and not chain.active
            assert term.item() == 0.0 and not term.requires_grad
            assert torch.equal(chain.churn, torch.zeros(1, dtype=F64, device=device))
        else:
            previous = history[-2]  # the network before the previous step
            with torch.no_grad():
                old = previous(states)
            expected_churn = ((net(states) - old) ** 2).mean()
            expected = 3.0 * expected_churn
            torch.testing.assert_close(term, expected, rtol=1e-12, atol=0)
            torch.testing.assert_close(chain.churn[0], expected_churn.detach(), rtol=1e-12, atol=0)
            assert expected_churn > 0
            grads = torch.autograd.grad(term, list(net.parameters()))
            expected_grads = torch.autograd.grad(expected, list(net.parameters()))
            for a, b in zip(grads, expected_grads):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
            term = chain.loss(states)
        opt.zero_grad()
        (task_loss(net, x, y) + term).backward()
        opt.step()
        chain.after_step()
        history.append(copy.deepcopy(net))


def test_gradient_pulls_outputs_towards_the_previous_network():
    net = nn.Linear(4, 2).to(F64)
    g = torch.Generator().manual_seed(2)
    chain = ChurnReduction(net, skip_steps=1, initial_coefficient=1.0)
    with torch.no_grad():
        old_weight, old_bias = net.weight.clone(), net.bias.clone()
        net.weight.add_(0.5 * randn(g, 2, 4))
        net.bias.add_(0.5 * randn(g, 2))
    chain.after_step()  # theta_{t-1}: the weights before the change
    states = randn(g, 32, 4)
    old = states @ old_weight.T + old_bias
    term = chain.loss(states)
    term.backward()
    # d/db_j of (1/(N D)) sum_n sum_k (out_nk - old_nk)^2 is 2/(N D) sum_n (out_nj - old_nj)
    with torch.no_grad():
        diff = net(states) - old
    torch.testing.assert_close(net.bias.grad, 2 * diff.sum(0) / diff.numel(), rtol=1e-12, atol=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    churns = []
    for _ in range(300):  # descending the churn term alone brings the outputs back
        opt.zero_grad()
        chain.loss(states).backward()
        opt.step()
        churns.append(chain.churn.item())
    assert all(b < a for a, b in zip(churns[:50], churns[1:50]))  # until rounding dominates
    with torch.no_grad():
        torch.testing.assert_close(net(states), old, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# C-CHAIN: the coefficient rule, task boundaries, resume, stacked seeds
# --------------------------------------------------------------------------------------------------


def run_updates(net, chain, opt, g, updates, minibatches=2, boundary_at=None, log=None):
    """PPO-shaped updates: each minibatch a task loss plus the churn term; the task loss of the
    last minibatch stands in for the policy loss."""
    for u in range(updates):
        if boundary_at is not None and u == boundary_at:
            chain.at_task_boundary()
        states = randn(g, 64, 5)
        perm = chain.reference_permutation(64)
        for k in range(minibatches):
            ref = states[perm[k * 8 : (k + 1) * 8]]
            x, y = randn(g, 8, 5), randn(g, 8, 3)
            loss = task_loss(net, x, y)
            term = chain.loss(ref)
            if log is not None:
                log["terms"].append((term.item(), chain.coefficient.item(), chain.churn.item()))
            opt.zero_grad()
            (loss + term).backward()
            opt.step()
            chain.after_step()
        policy_loss = loss.detach() - 0.7  # of either sign
        chain.end_update(policy_loss)
        if log is not None:
            log["policy"].append(policy_loss.item())
            log["churn"].append(chain.churn.item())
            log["coef"].append(chain.coefficient.item())


@pytest.mark.parametrize(
    "kwargs,updates",
    [
        ({}, 112),  # the authors' defaults: beta 0.05, lambda 100 until update 50, window 100
        ({"target_relative_loss": 0.5, "adapt_from_update": 3, "window": 4}, 11),
    ],
)
def test_coefficient_follows_the_authors_rule(kwargs, updates):
    net = mlp(3)
    chain = ChurnReduction(net, **kwargs)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    log = {"terms": [], "policy": [], "churn": [], "coef": []}
    run_updates(net, chain, opt, torch.Generator().manual_seed(4), updates, log=log)
    target = kwargs.get("target_relative_loss", 0.05)
    adapt_from, window = kwargs.get("adapt_from_update", 50), kwargs.get("window", 100)
    expected = authors_coefficients(log["policy"], log["churn"], target, 100.0, adapt_from, window)
    np.testing.assert_allclose(log["coef"], expected, rtol=1e-12)
    assert log["coef"][adapt_from - 2] == 100.0 and log["coef"][adapt_from - 1] != 100.0
    # each minibatch's term is the coefficient in force times its churn
    for term, coef, churn in log["terms"]:
        assert term == pytest.approx(coef * churn, rel=1e-12, abs=0)
    assert sum(t[2] > 0 for t in log["terms"]) == len(log["terms"]) - 2


def test_task_boundary_restarts_history_and_coefficient():
    net = mlp(5)
    kwargs = {"target_relative_loss": 0.5, "adapt_from_update": 2, "window": 3}
    chain = ChurnReduction(net, **kwargs)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    log = {"terms": [], "policy": [], "churn": [], "coef": []}
    run_updates(net, chain, opt, torch.Generator().manual_seed(6), 7, boundary_at=4, log=log)
    # the first two steps of each task have no term; the second task starts again at lambda 100
    zero_steps = [i for i, t in enumerate(log["terms"]) if t[2] == 0.0]
    assert zero_steps == [0, 1, 8, 9]
    assert log["terms"][8][1] == 100.0
    expected = authors_coefficients(log["policy"][:4], log["churn"][:4], 0.5, 100.0, 2, 3)
    expected += authors_coefficients(log["policy"][4:], log["churn"][4:], 0.5, 100.0, 2, 3)
    np.testing.assert_allclose(log["coef"], expected, rtol=1e-12)
    # without the reset, the boundary changes nothing
    net2, net3 = mlp(5), mlp(5)
    chains = [ChurnReduction(n, reset_at_task_boundary=False, **kwargs) for n in (net2, net3)]
    for n, c, b in zip((net2, net3), chains, (4, None)):
        opt = torch.optim.SGD(n.parameters(), lr=0.05)
        run_updates(n, c, opt, torch.Generator().manual_seed(6), 7, boundary_at=b)
    assert all(torch.equal(a, b) for a, b in zip(net2.parameters(), net3.parameters()))
    assert torch.equal(chains[0].coefficient, chains[1].coefficient)


def test_state_dict_gives_an_exact_resume():
    kwargs = {"target_relative_loss": 0.3, "adapt_from_update": 2, "window": 3}

    def build():
        net = mlp(7)
        return net, torch.optim.Adam(net.parameters(), lr=1e-2), ChurnReduction(net, **kwargs)

    net, opt, chain = build()
    run_updates(net, chain, opt, torch.Generator().manual_seed(8), 3, minibatches=3)
    buffer = io.BytesIO()
    torch.save(
        {"net": net.state_dict(), "opt": opt.state_dict(), "chain": chain.state_dict()}, buffer
    )
    g = torch.Generator().manual_seed(9)
    run_updates(net, chain, opt, g, 3, minibatches=3)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    net2, opt2, chain2 = build()
    with torch.no_grad():
        for p in net2.parameters():
            p.add_(1.0)  # the reload, not the same start, makes them equal
    net2.load_state_dict(saved["net"])
    opt2.load_state_dict(saved["opt"])
    chain2.load_state_dict(saved["chain"])
    run_updates(net2, chain2, opt2, torch.Generator().manual_seed(9), 3, minibatches=3)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(chain.coefficient, chain2.coefficient)
    assert torch.equal(chain.churn, chain2.churn)
    assert torch.equal(chain.reference_permutation(64), chain2.reference_permutation(64))
    assert (chain.steps, chain.updates) == (chain2.steps, chain2.updates) == (18, 6)


def test_stacked_seeds_equal_separate_runs():
    seeds = [11, 12]
    nets = [mlp(s) for s in seeds]
    stacked = StackedSequential(nets).to(F64)
    kwargs = {"target_relative_loss": 0.2, "adapt_from_update": 2, "window": 2}
    alone = [ChurnReduction(n, seeds=[s], **kwargs) for n, s in zip(nets, seeds)]
    chain = ChurnReduction(stacked, output=lambda r: r[0], seed_dims=1, seeds=seeds, **kwargs)
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9) for n in nets]
    opt = torch.optim.SGD(stacked.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(13)
    for _ in range(5):
        states = randn(g, 32, 5)
        perms = chain.reference_permutation(32)
        for s, c in enumerate(alone):  # each seed's reference batches come from its own stream
            assert torch.equal(perms[s], c.reference_permutation(32))
        for k in range(2):
            x, y = randn(g, 8, 2, 5), randn(g, 2, 8, 3)
            idx = perms[:, k * 8 : (k + 1) * 8]
            ref = torch.stack([states[idx[s]] for s in range(2)], dim=1)  # [B, S, obs]
            losses = (stacked(x)[0] - y).square().mean(dim=(1, 2))
            opt.zero_grad()
            (losses.sum() + chain.loss(ref)).backward()
            opt.step()
            chain.after_step()
            for s, (n, c, o) in enumerate(zip(nets, alone, opts)):
                loss_s = task_loss(n, x[:, s], y[s])
                o.zero_grad()
                (loss_s + c.loss(ref[:, s])).backward()
                o.step()
                c.after_step()
        chain.end_update(losses.detach())
        for c, loss_s in zip(alone, losses.detach()):
            c.end_update(loss_s)
    for s, (n, c) in enumerate(zip(nets, alone)):
        for p_alone, p_stacked in zip(n.parameters(), stacked.parameters()):
            torch.testing.assert_close(p_stacked[s], p_alone, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(chain.coefficient[s], c.coefficient[0], rtol=1e-10, atol=0)
        torch.testing.assert_close(chain.churn[s], c.churn[0], rtol=1e-10, atol=0)
    assert chain.coefficient[0] != chain.coefficient[1]


def test_reference_stream_and_ppo_loss_autograd_extra_term():
    actor, critic = mlp(14, (5, 8, 2)), mlp(15, (5, 8, 1))
    chain = ChurnReduction(actor, skip_steps=1, seeds=[21])
    expected_perm = torch.randperm(
        10, generator=torch.Generator().manual_seed(derive_seed(21, TAG_CHURN_REFERENCE))
    )
    assert torch.equal(chain.reference_permutation(10), expected_perm)
    before = copy.deepcopy(actor)
    with torch.no_grad():
        actor[2].bias.add_(0.25)  # every output moves by 0.25
    chain.after_step()
    g = torch.Generator().manual_seed(16)
    log_std = nn.Parameter(torch.zeros(2, dtype=F64))
    batch = (randn(g, 8, 5), randn(g, 8, 2), randn(g, 8), randn(g, 8), randn(g, 8))
    ref = randn(g, 16, 5)
    ppo_loss_autograd(actor, critic, log_std, *batch, 0.2, 0.5)
    plain = [p.grad.clone() for p in actor.parameters()]
    with torch.enable_grad():
        extra = torch.autograd.grad(
            100.0 * (actor(ref) - before(ref).detach()).square().mean(), list(actor.parameters())
        )
    with torch.no_grad():  # as in the trainer's update loop
        ppo_loss_autograd(
            actor, critic, log_std, *batch, 0.2, 0.5, extra_loss=lambda: chain.loss(ref)
        )
    torch.testing.assert_close(chain.churn, torch.full((1,), 0.0625, dtype=F64), rtol=1e-12, atol=0)
    for p, g0, e in zip(actor.parameters(), plain, extra):
        torch.testing.assert_close(p.grad, g0 + e, rtol=1e-12, atol=1e-12)
    # the head bias's churn gradient by hand: 100 * 2 * 0.25 / (2 outputs)
    torch.testing.assert_close(extra[-1], torch.full((2,), 25.0, dtype=F64), rtol=1e-12, atol=0)


def test_bad_arguments_raise_value_error():
    net = mlp(17)
    for kwargs, match in [
        ({"target_relative_loss": -1.0}, "target_relative_loss"),
        ({"initial_coefficient": float("nan")}, "initial_coefficient"),
        ({"window": 0}, "window"),
        ({"adapt_from_update": 1.5}, "adapt_from_update"),
        ({"skip_steps": 0}, "skip_steps"),
        ({"seed_dims": 2}, "seed_dims"),
        ({"seeds": [1, 2]}, "seeds"),
    ]:
        with pytest.raises(ValueError, match=match):
            ChurnReduction(net, **kwargs)
    with pytest.raises(ValueError, match="no parameters"):
        ChurnReduction(nn.ReLU())
    chain = ChurnReduction(net)
    with pytest.raises(ValueError, match="policy_loss"):
        chain.end_update(torch.zeros(3))
    other = ChurnReduction(mlp(17, (5, 4, 3)))
    with pytest.raises(ValueError, match="snapshot"):
        other.load_state_dict(chain.state_dict())
    stacked = ChurnReduction(net, seed_dims=1, seeds=[1, 2], skip_steps=1)
    stacked.after_step()
    with pytest.raises(ValueError, match="seeds first"):
        stacked.loss(torch.zeros(4, 5, dtype=F64))


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_feature_norm_by_hand(device):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 20, 7))
    expected = np.sqrt((h**2).sum(-1)).mean(-1)
    t = torch.tensor(h, device=device)
    torch.testing.assert_close(feature_norm(t).cpu(), torch.tensor(expected), rtol=1e-12, atol=0)
    torch.testing.assert_close(feature_norm(t[1]).cpu(), torch.tensor(expected[1]))
    # float32 features, float64 result
    got = feature_norm(t.float())
    assert got.dtype == F64
    np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-6)
    # a 3-4-5 row has norm 5
    assert feature_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]])).item() == 3.0
    with pytest.raises(ValueError, match="activations"):
        feature_norm(torch.ones(5))


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_norm_by_hand_and_per_seed(device):
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4)), rng.standard_normal(2)]
    params = [torch.zeros(g.shape, dtype=F64, device=device, requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g, device=device)
    no_grad = torch.zeros((2, 5), dtype=F64, device=device, requires_grad=True)
    everything = np.sqrt(sum((g**2).sum() for g in grads))
    got = gradient_norm([*params, no_grad])
    assert got.shape == () and got.dtype == F64
    assert got.item() == pytest.approx(everything, rel=1e-12)
    clip_total = nn.utils.clip_grad_norm_(params, max_norm=1e9)  # torch's own total norm
    assert got.item() == pytest.approx(clip_total.item(), rel=1e-12)
    per_seed = np.sqrt([sum((g[s] ** 2).sum() for g in grads) for s in range(2)])
    np.testing.assert_allclose(gradient_norm(params, seed_dims=1).cpu(), per_seed, rtol=1e-12)
    assert gradient_norm(params[0]).item() == pytest.approx(np.sqrt((grads[0] ** 2).sum()))
    assert gradient_norm([no_grad]).item() == 0.0
    with pytest.raises(ValueError, match="no parameters"):
        gradient_norm([])
    with pytest.raises(ValueError, match="leading seed shape"):
        gradient_norm([params[0], torch.zeros(3, 1)], seed_dims=1)
    with pytest.raises(ValueError, match="seed_dims"):
        gradient_norm(params, seed_dims=-1)


@pytest.mark.parametrize("device", DEVICES)
def test_policy_churn_by_hand(device):
    rng = np.random.default_rng(2)
    before, after = rng.standard_normal((2, 3, 10, 4))
    expected = ((after - before) ** 2).mean(axis=(-2, -1))
    b, a = torch.tensor(before, device=device), torch.tensor(after, device=device)
    np.testing.assert_allclose(policy_churn(b, a).cpu(), expected, rtol=1e-12)
    assert policy_churn(b[0], a[0]).item() == pytest.approx(expected[0], rel=1e-12)
    assert policy_churn(b, b).abs().max().item() == 0.0
    # a shift of 0.5 in one of two action dimensions: (0.25 + 0) / 2
    m = torch.zeros(6, 2)
    assert policy_churn(m, m + torch.tensor([0.5, 0.0])).item() == 0.125
    with pytest.raises(ValueError, match="differ"):
        policy_churn(b, a[:, :5])
    with pytest.raises(ValueError, match="action_dim"):
        policy_churn(torch.zeros(4), torch.zeros(4))


@pytest.mark.parametrize("device", DEVICES)
def test_policy_kl_equals_torch_distributions(device):
    g = torch.Generator().manual_seed(3)
    mb, ma = randn(g, 3, 10, 4, device=device), randn(g, 3, 10, 4, device=device)
    for shape in [(4,), (3, 4), (3, 10, 4)]:
        lb, la = 0.3 * randn(g, *shape, device=device), 0.3 * randn(g, *shape, device=device)
        view = (lambda t: t.unsqueeze(-2)) if len(shape) == 2 else (lambda t: t)
        expected = (
            kl_divergence(Normal(mb, view(lb).exp()), Normal(ma, view(la).exp())).sum(-1).mean(-1)
        )
        torch.testing.assert_close(policy_kl(mb, lb, ma, la), expected, rtol=1e-12, atol=1e-15)
    zero = policy_kl(mb, lb, mb, lb)
    torch.testing.assert_close(zero, torch.zeros_like(zero), rtol=0, atol=1e-15)
    # equal stds: KL is half the squared mean change over the variance, summed over actions
    std = torch.tensor([0.5, 2.0], dtype=F64)
    m = torch.zeros(5, 2, dtype=F64)
    shift = torch.tensor([1.0, 1.0], dtype=F64)
    assert policy_kl(m, std.log(), m + shift, std.log()).item() == pytest.approx(
        0.5 * (1 / 0.25 + 1 / 4.0), rel=1e-12
    )
    with pytest.raises(ValueError, match="does not fit"):
        policy_kl(mb, torch.zeros(5), ma, torch.zeros(4))
