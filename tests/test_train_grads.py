"""The PPO trainer's hand-written minibatch loss and gradients against autograd, in float64."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from ppo_cbp.ppo.agent import make_mlp
from ppo_cbp.ppo.numerics import AdamStep, GaussianActing, ppo_loss_and_grads
from ppo_cbp.ppo.numerics import act_forward as _act_forward
from ppo_cbp.ppo.numerics import act_forward_np as _act_forward_np
from ppo_cbp.ppo.numerics import linear_layers as _linear_layers
from ppo_cbp.ppo.numerics import numpy_layers as _numpy_layers

LOG_2PI = math.log(2.0 * math.pi)


def reference(actor, critic, log_std, x, act, old_logp, neg_adv, ret, clip, vf, ent):
    """The loss as the trainer used to write it, differentiated by autograd."""
    params = [*actor.parameters(), log_std, *critic.parameters()]
    for p in params:
        p.grad = None
    mean = actor(x)
    d = act.shape[1]
    z = (act - mean) * torch.exp(-log_std)
    logp = -0.5 * z.square().sum(1) - log_std.sum() - 0.5 * d * LOG_2PI
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    pg = torch.max(neg_adv * ratio, neg_adv * ratio.clamp(1 - clip, 1 + clip)).mean()
    v = (critic(x).view(-1) - ret).square().mean()
    loss = pg + vf * v - ent * (log_std.sum() + 0.5 * d * (1.0 + LOG_2PI))
    loss.backward()
    grads = [p.grad.clone() for p in params]
    hidden = [x]
    for m in actor[:-1]:
        hidden.append(m(hidden[-1]))
    return pg.detach(), v.detach(), log_ratio.detach(), grads, hidden[2::2]


def setup(seed, obs_dim=11, act_dim=3, hidden=(16, 8), batch=64, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    actor = make_mlp(obs_dim, hidden, act_dim, "lecun_uniform").double()
    critic = make_mlp(obs_dim, hidden, 1, "lecun_uniform").double()
    with torch.no_grad():  # non-zero biases so their gradients are exercised
        for m in [*actor, *critic]:
            if isinstance(m, nn.Linear):
                m.bias.normal_(0.0, 0.1, generator=g)
    log_std = nn.Parameter(torch.randn(act_dim, generator=g, dtype=torch.float64) * 0.3)
    x = torch.randn(batch, obs_dim, generator=g, dtype=torch.float64)
    act = torch.randn(batch, act_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        z = (act - actor(x)) * torch.exp(-log_std)
        logp = -0.5 * z.square().sum(1) - log_std.sum() - 0.5 * act_dim * LOG_2PI
    # old log-probabilities near the current ones: ratios on both sides of the clip range
    old_logp = logp + spread * torch.randn(batch, generator=g, dtype=torch.float64)
    neg_adv = torch.randn(batch, generator=g, dtype=torch.float64)
    ret = torch.randn(batch, generator=g, dtype=torch.float64)
    return actor, critic, log_std, x, act, old_logp, neg_adv, ret


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ent", [0.0, 0.01])
@pytest.mark.parametrize("clip,vf", [(0.2, 1.0), (0.1, 0.5)])
def test_loss_and_grads_equal_autograd(seed, ent, clip, vf):
    actor, critic, log_std, x, act, old_logp, neg_adv, ret = setup(seed)
    params = [*actor.parameters(), log_std, *critic.parameters()]
    pg_r, v_r, lr_r, grads_r, hidden_r = reference(
        actor, critic, log_std, x, act, old_logp, neg_adv, ret, clip, vf, ent
    )
    # both branches of the clipped objective, and both advantage signs, are present
    ratio = lr_r.exp()
    inside = (ratio >= 1 - clip) & (ratio <= 1 + clip)
    assert inside.any() and (~inside & (neg_adv > 0)).any() and (~inside & (neg_adv < 0)).any()
    for p in params:  # stale values must be overwritten, not accumulated into
        p.grad = torch.full_like(p, 7.0)
    linears = lambda net: [m for m in net if isinstance(m, nn.Linear)]  # noqa: E731
    pg, v, log_ratio, actor_hidden, critic_hidden = ppo_loss_and_grads(
        linears(actor), linears(critic), log_std, x, act, old_logp, neg_adv, ret, clip, vf, ent
    )
    torch.testing.assert_close(pg, pg_r, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v, v_r, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(log_ratio, lr_r, rtol=1e-12, atol=1e-12)
    for p, g_r in zip(params, grads_r):
        torch.testing.assert_close(p.grad, g_r, rtol=1e-10, atol=1e-13)
    assert len(actor_hidden) == len(critic_hidden) == 2
    for h, h_r in zip(actor_hidden, hidden_r):
        torch.testing.assert_close(h, h_r.detach(), rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(critic_hidden[0], critic[1](critic[0](x)))


def test_all_ratios_clipped_gives_no_policy_gradient_except_log_std_from_entropy():
    actor, critic, log_std, x, act, old_logp, neg_adv, ret = setup(3)
    # every ratio far outside the range on the side where the clipped term wins
    with torch.no_grad():
        z = (act - actor(x)) * torch.exp(-log_std)
        logp = -0.5 * z.square().sum(1) - log_std.sum() - 0.5 * act.shape[1] * LOG_2PI
    # A < 0 (neg_adv > 0) with r = e^-2 < 1 - eps, A > 0 with r = e^2 > 1 + eps: clipped wins
    old_logp = torch.where(neg_adv > 0, logp + 2.0, logp - 2.0)
    linears = lambda net: [m for m in net if isinstance(m, nn.Linear)]  # noqa: E731
    ppo_loss_and_grads(
        linears(actor), linears(critic), log_std, x, act, old_logp, neg_adv, ret, 0.2, 1.0, 0.5
    )
    for p in actor.parameters():
        assert torch.count_nonzero(p.grad) == 0
    torch.testing.assert_close(log_std.grad, torch.full_like(log_std, -0.5))
    assert all(torch.count_nonzero(p.grad) > 0 for p in critic.parameters())


def test_float32_grads_close_to_autograd_at_trainer_sizes():
    actor, critic, log_std, x, act, old_logp, neg_adv, ret = setup(
        4, obs_dim=27, act_dim=8, hidden=(256, 256), batch=128, spread=0.3
    )
    for m in (actor, critic):
        m.float()
    log_std = nn.Parameter(log_std.detach().float())
    x, act, old_logp, neg_adv, ret = (t.float() for t in (x, act, old_logp, neg_adv, ret))
    params = [*actor.parameters(), log_std, *critic.parameters()]
    _, _, _, grads_r, _ = reference(
        actor, critic, log_std, x, act, old_logp, neg_adv, ret, 0.2, 1.0, 0.0
    )
    linears = lambda net: [m for m in net if isinstance(m, nn.Linear)]  # noqa: E731
    for p in params:
        p.grad = None  # allocated by the function
    ppo_loss_and_grads(
        linears(actor), linears(critic), log_std, x, act, old_logp, neg_adv, ret, 0.2, 1.0
    )
    for p, g_r in zip(params, grads_r):
        torch.testing.assert_close(p.grad, g_r, rtol=1e-4, atol=1e-6)


def test_act_forward_with_buffers_equals_the_module():
    torch.manual_seed(0)
    net = make_mlp(5, (7, 6), 2, "lecun_uniform")
    x = torch.randn(3, 5)
    out = [torch.empty(3, 7), torch.empty(3, 6), torch.empty(3, 2)]
    with torch.inference_mode():
        y = _act_forward(_linear_layers(net), x, out)
        assert y.data_ptr() == out[-1].data_ptr()
        torch.testing.assert_close(y, net(x))
        torch.testing.assert_close(_act_forward(_linear_layers(net), x), net(x))


def _actor_with_biases() -> nn.Sequential:
    """A 5-7-6-2 actor with non-zero biases, so that the bias terms are checked too."""
    torch.manual_seed(0)
    net = make_mlp(5, (7, 6), 2, "lecun_uniform")
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.bias.normal_()
    return net


@pytest.mark.parametrize("batch", [1, 3])
def test_numpy_act_forward_equals_the_module(batch):
    net = _actor_with_biases()
    x = torch.randn(batch, 5)
    inputs = [np.ones((batch, w + 1), np.float32) for w in (5, 7, 6)]
    inputs[0][:, :-1] = x.numpy()
    out = np.empty((batch, 2), np.float32)
    _act_forward_np(_numpy_layers(net), inputs, out)
    with torch.no_grad():
        np.testing.assert_allclose(out, net(x).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(inputs[2][:, :-1], net[:4](x).numpy(), rtol=1e-5, atol=1e-6)
    assert (inputs[1][:, -1] == 1).all() and (inputs[2][:, -1] == 1).all()


@pytest.mark.parametrize("use_numpy", [True, False])
def test_gaussian_acting_is_the_mean_plus_scaled_noise(use_numpy):
    """Both acting paths give a_t = actor(s_t) + exp(log_std) * eps_t, recomputed in float64."""
    net = _actor_with_biases()
    log_std = torch.tensor([0.3, -0.7])
    noise = torch.randn(4, 3, 2)
    obs = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
    acting = GaussianActing(net, log_std, num_envs=3, use_numpy=use_numpy)
    out = np.empty((4, 3, 2), np.float32)
    with torch.inference_mode():
        acting.start(noise)
        for t in range(4):
            acting.act(t, obs[t], out[t])
    net64 = copy.deepcopy(net).double()
    with torch.no_grad():
        expected = net64(torch.from_numpy(obs).double()) + log_std.double().exp() * noise.double()
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-6)


def _adam_pair(fused=True, **kw):
    torch.manual_seed(0)
    nets = [make_mlp(4, (6,), 2, "lecun_uniform") for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [
        torch.optim.Adam(n.parameters(), lr=1e-2, betas=(0.99, 0.99), fused=fused, **kw)
        for n in nets
    ]
    return nets, opts


def _grads(nets, seed):
    g = torch.Generator().manual_seed(seed)
    for p0, p1 in zip(*(n.parameters() for n in nets)):
        p0.grad = torch.randn(p0.shape, generator=g)
        p1.grad = p0.grad.clone()


def test_adam_step_is_bitwise_optimizer_step():
    nets, (ref, opt) = _adam_pair(weight_decay=1e-3)
    step = AdamStep(opt)
    assert step.direct
    for i in range(5):
        _grads(nets, i)
        ref.step()
        step()
        if i == 2:  # an in-place reset of some state entries (as CBP does) and a new lr
            for o in (ref, opt):
                st = o.state[next(iter(o.state))]
                st["exp_avg"][0].zero_()
                st["exp_avg_sq"][0].zero_()
                o.param_groups[0]["lr"] = 3e-3
        for p0, p1 in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.equal(p0, p1)
    for s0, s1 in zip(ref.state.values(), opt.state.values()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s0[k], s1[k])
    # after load_state_dict the state tensors are new: the step must follow them
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # (not sharing tensors with ref)
    for i in range(5, 8):
        _grads(nets, i)
        ref.step()
        step()
    for p0, p1 in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p0, p1)
    for s0, s1 in zip(ref.state.values(), opt.state.values()):
        assert s1["step"].item() == 8
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s0[k], s1[k])


@pytest.mark.parametrize("kw", [dict(fused=False), dict(amsgrad=True), dict(maximize=True)])
def test_adam_step_falls_back_to_optimizer_step(kw):
    fused = kw.pop("fused", True)
    nets, (ref, opt) = _adam_pair(fused=fused, **kw)
    step = AdamStep(opt)
    assert not step.direct
    for i in range(3):
        _grads(nets, i)
        ref.step()
        step()
    for p0, p1 in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p0, p1)
