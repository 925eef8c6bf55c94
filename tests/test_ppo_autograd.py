"""PPO's autograd loss path (ppo_loss_autograd) against the hand-written gradients of the fast
path and against the loss written independently with torch.distributions, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Normal

from ppo_cbp.ppo.agent import make_mlp
from ppo_cbp.ppo.numerics import hidden_taps, ppo_loss_and_grads, ppo_loss_autograd

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
LOG_2PI = math.log(2.0 * math.pi)


class CReLU(nn.Module):
    """Concatenated ReLU, ``[relu(x), relu(-x)]``: doubles the width."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)


def plain_mlp(obs_dim: int, out_dim: int) -> nn.Sequential:
    return make_mlp(obs_dim, (16, 8), out_dim, "lecun_uniform")


def layer_norm_mlp(obs_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(obs_dim, 16),
        nn.LayerNorm(16),
        nn.ReLU(),
        nn.Linear(16, 8),
        nn.LayerNorm(8),
        nn.ReLU(),
        nn.Linear(8, out_dim),
    )


def crelu_mlp(obs_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(obs_dim, 16), CReLU(), nn.Linear(32, 8), CReLU(), nn.Linear(16, out_dim)
    )


def problem(build, seed: int, device: str = "cpu", obs_dim=11, act_dim=3, batch=64, spread=1.0):
    """Actor, critic, log-std and a minibatch whose ratios fall on both sides of the clip range."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    actor, critic = build(obs_dim, act_dim), build(obs_dim, 1)
    with torch.no_grad():  # non-zero biases and norm gains so that their gradients are exercised
        for p in [*actor.parameters(), *critic.parameters()]:
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    actor, critic = (n.to(device=device, dtype=torch.float64) for n in (actor, critic))

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    log_std = nn.Parameter(0.3 * randn(act_dim))
    x, act = randn(batch, obs_dim), randn(batch, act_dim)
    with torch.no_grad():
        logp = Normal(actor(x), log_std.exp()).log_prob(act).sum(1)
    old_logp = logp + spread * randn(batch)
    return actor, critic, log_std, x, act, old_logp, randn(batch), randn(batch)


def reference(actor, critic, log_std, x, act, old_logp, neg_adv, ret, clip, vf, ent, extra=None):
    """The loss from torch.distributions and its gradient by torch.autograd.grad."""
    params = [*actor.parameters(), log_std, *critic.parameters()]
    with torch.enable_grad():
        dist = Normal(actor(x), log_std.exp())
        log_ratio = dist.log_prob(act).sum(1) - old_logp
        ratio, adv = log_ratio.exp(), -neg_adv
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
        v = (critic(x).squeeze(1) - ret).square().mean()
        loss = pg + vf * v - ent * dist.entropy().sum(1).mean()
        if extra is not None:
            loss = loss + extra()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return pg.detach(), v.detach(), log_ratio.detach(), grads


def forward_taps(net: nn.Sequential, x: Tensor, positions: list[int]) -> list[Tensor]:
    """Outputs of the modules at ``positions``, by running the Sequential's modules one by one."""
    out = []
    with torch.no_grad():
        for i, m in enumerate(net):
            x = m(x)
            if i in positions:
                out.append(x)
    return out


def assert_same(a: Tensor, b: Tensor, rtol=1e-10, atol=1e-13) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def params_of(actor, critic, log_std):
    return [*actor.parameters(), log_std, *critic.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ent", [0.0, 0.01])
@pytest.mark.parametrize("clip,vf", [(0.2, 1.0), (0.1, 0.5)])
def test_plain_mlp_equals_the_hand_written_gradient(device, seed, ent, clip, vf):
    actor, critic, log_std, *batch = problem(plain_mlp, seed, device)
    params = params_of(actor, critic, log_std)
    linears = lambda net: [m for m in net if isinstance(m, nn.Linear)]  # noqa: E731
    fast = ppo_loss_and_grads(linears(actor), linears(critic), log_std, *batch, clip, vf, ent)
    fast_grads = [p.grad.clone() for p in params]
    log_ratio = fast[2]
    # both branches of the clipped objective with both advantage signs
    inside = (log_ratio.exp() - 1).abs() <= clip
    neg_adv = batch[3]
    assert inside.any() and (~inside & (neg_adv > 0)).any() and (~inside & (neg_adv < 0)).any()
    for p in params:  # stale values are replaced, not added to
        p.grad.fill_(7.0)
    grad_tensors = [p.grad for p in params]
    auto = ppo_loss_autograd(actor, critic, log_std, *batch, clip, vf, ent)
    for a, b in zip(auto[:3], fast[:3]):
        assert_same(a, b)
    for hidden_auto, hidden_fast in zip(auto[3:], fast[3:]):
        assert len(hidden_auto) == len(hidden_fast) == 2
        for a, b in zip(hidden_auto, hidden_fast):
            assert_same(a, b, rtol=1e-12, atol=1e-14)
            assert not a.requires_grad
    for p, g, t in zip(params, fast_grads, grad_tensors):
        assert_same(p.grad, g)
        assert p.grad is t  # the optimizer's view of .grad is kept
    assert not auto[0].requires_grad and not auto[2].requires_grad


def test_all_ratios_clipped_gives_the_fast_paths_zero_policy_gradient():
    actor, critic, log_std, x, act, _, neg_adv, ret = problem(plain_mlp, 3)
    with torch.no_grad():
        logp = Normal(actor(x), log_std.exp()).log_prob(act).sum(1)
    # A < 0 with r = e^-2 < 1 - eps and A > 0 with r = e^2 > 1 + eps: the clipped term wins
    old_logp = torch.where(neg_adv > 0, logp + 2.0, logp - 2.0)
    ppo_loss_autograd(actor, critic, log_std, x, act, old_logp, neg_adv, ret, 0.2, 1.0, 0.5)
    assert all(torch.count_nonzero(p.grad) == 0 for p in actor.parameters())
    assert_same(log_std.grad, torch.full_like(log_std, -0.5))
    assert all(torch.count_nonzero(p.grad) > 0 for p in critic.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build", [layer_norm_mlp, crelu_mlp])
@pytest.mark.parametrize("ent", [0.0, 0.05])
def test_other_modules_equal_the_distributions_reference(device, build, ent):
    actor, critic, log_std, *batch = problem(build, 4, device)
    pg_r, v_r, log_ratio_r, grads_r = reference(actor, critic, log_std, *batch, 0.2, 0.5, ent)
    pg, v, log_ratio, actor_hidden, critic_hidden = ppo_loss_autograd(
        actor, critic, log_std, *batch, 0.2, 0.5, ent
    )
    assert_same(pg, pg_r)
    assert_same(v, v_r)
    assert_same(log_ratio, log_ratio_r)
    for p, g in zip(params_of(actor, critic, log_std), grads_r):
        assert_same(p.grad, g)
    x = batch[0]
    if build is layer_norm_mlp:
        # the hidden layers CBP and ReDo act on: the ReLUs after each LayerNorm
        assert_same(actor_hidden[0], forward_taps(actor, x, [2, 5])[0], 1e-12, 1e-14)
        assert_same(actor_hidden[1], forward_taps(actor, x, [2, 5])[1], 1e-12, 1e-14)
        assert_same(critic_hidden[1], forward_taps(critic, x, [2, 5])[1], 1e-12, 1e-14)
    else:
        # CReLU doubles the width: no unit layers for CBP/ReDo, so no default taps ...
        assert actor_hidden == [] and critic_hidden == [] and hidden_taps(actor) == []
        # ... but explicit ones are recorded
        _, _, _, actor_hidden, critic_hidden = ppo_loss_autograd(
            actor, critic, log_std, *batch, 0.2, 0.5, ent, actor_taps=[actor[1], actor[3]]
        )
        assert critic_hidden == []
        for a, b in zip(actor_hidden, forward_taps(actor, x, [1, 3])):
            assert_same(a, b, 1e-12, 1e-14)


@pytest.mark.parametrize("as_callable", [True, False])
def test_extra_loss_adds_its_gradient(as_callable):
    actor, critic, log_std, *batch = problem(layer_norm_mlp, 5)
    states = torch.randn(32, 11, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    head = actor[-1]

    def extra():  # 0.3 |W_head|^2 + the squared mean of the actor's output on other states
        return 0.3 * head.weight.square().sum() + actor(states).mean().square()

    ppo_loss_autograd(actor, critic, log_std, *batch, 0.2, 0.5, 0.01)
    plain = [p.grad.clone() for p in params_of(actor, critic, log_std)]
    with torch.enable_grad():
        extra_grads = torch.autograd.grad(
            actor(states).mean().square(), list(actor.parameters()), allow_unused=True
        )
    term = extra if as_callable else extra()
    with torch.no_grad():  # as the trainer's update loop runs
        ppo_loss_autograd(actor, critic, log_std, *batch, 0.2, 0.5, 0.01, extra_loss=term)
    n_actor = len(list(actor.parameters()))
    for i, p in enumerate(params_of(actor, critic, log_std)):
        expected = plain[i]
        if i < n_actor:
            expected = expected + (extra_grads[i] if extra_grads[i] is not None else 0)
        if p is head.weight:
            expected = expected + 0.6 * head.weight.detach()  # d(0.3 |W|^2)/dW, by hand
        assert_same(p.grad, expected)
    # the extra term's reference written out in full agrees too
    _, _, _, grads_r = reference(actor, critic, log_std, *batch, 0.2, 0.5, 0.01, extra=extra)
    for p, g in zip(params_of(actor, critic, log_std), grads_r):
        assert_same(p.grad, g)


def test_unreached_parameters_get_zero_gradients():
    actor, critic, log_std, *batch = problem(plain_mlp, 6)
    actor.register_parameter("unused", nn.Parameter(torch.ones(3, dtype=torch.float64)))
    ppo_loss_autograd(actor, critic, log_std, *batch, 0.2, 0.5)
    assert torch.equal(actor.unused.grad, torch.zeros(3, dtype=torch.float64))
    actor.unused.grad.fill_(5.0)
    ppo_loss_autograd(actor, critic, log_std, *batch, 0.2, 0.5)
    assert torch.equal(actor.unused.grad, torch.zeros(3, dtype=torch.float64))


def test_bad_shapes_raise_value_error():
    actor, critic, log_std, x, act, old_logp, neg_adv, ret = problem(plain_mlp, 7)
    with pytest.raises(ValueError, match="minibatch tensors disagree"):
        ppo_loss_autograd(actor, critic, log_std, x[:-1], act, old_logp, neg_adv, ret, 0.2, 0.5)
    with pytest.raises(ValueError, match="minibatch tensors disagree"):
        ppo_loss_autograd(actor, critic, log_std, x, act, old_logp, neg_adv[:-1], ret, 0.2, 0.5)
    with pytest.raises(ValueError, match="log_std has shape"):
        ppo_loss_autograd(actor, critic, log_std[:2], x, act, old_logp, neg_adv, ret, 0.2, 0.5)
    with pytest.raises(ValueError, match="actor output"):
        ppo_loss_autograd(
            critic, critic, log_std, x, act, old_logp, neg_adv, ret, 0.2, 0.5, actor_taps=[]
        )
