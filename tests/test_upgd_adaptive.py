"""AdaptiveUPGD against the authors' ``AdaptiveUPGD.step`` (``core/run/rl/adaupgd.py`` of
github.com/mohmdelsayed/upgd), transcribed in float64 with the noise drawn from a generator of
the optimizer's seed."""

import copy

import pytest
import torch

from ppo_cbp.plasticity.upgd import AdaptiveUPGD
from ppo_cbp.seeding import TAG_UPGD, derive_seed

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(4, 3), (4,), (2, 4), (2,)]
GROUPS = [[0, 1], [2, 3]]  # two parameter groups: the noise follows the groups' order
HP = dict(lr=0.05, weight_decay=0.01, beta_utility=0.9, sigma=0.3, betas=(0.8, 0.95), eps=1e-3)
PPO = dict(lr=3e-4, weight_decay=1e-3, beta_utility=0.999, sigma=1e-3, betas=(0.9, 0.999), eps=1e-5)
LRS = [1.0, 1.0, 0.75, 0.5, 0.25]  # the step size's factor at each step, as anneal_lr sets it


def _params(seed: int, device):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64).to(device).requires_grad_() for s in SHAPES]


def _grads(step: int, seed: int, device):
    g = torch.Generator().manual_seed(100 * seed + step)
    return [torch.randn(s, generator=g, dtype=F64).to(device) for s in SHAPES]


def _groups(params):
    return [{"params": [params[k] for k in ks]} for ks in GROUPS]


def _set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def _reference(params, grads_per_step, seed, lr, weight_decay, beta_utility, sigma, betas, eps):
    """``AdaptiveUPGD.step`` of ``adaupgd.py``, line by line, on plain tensors; its
    ``torch.randn_like(p.grad)`` becomes a draw from the seed's stream, parameter by parameter in
    the groups' order."""
    beta1, beta2 = betas
    order = [k for ks in GROUPS for k in ks]
    data = [p.detach().clone() for p in params]
    avg_utility = [torch.zeros_like(d) for d in data]
    first_moment = [torch.zeros_like(d) for d in data]
    sec_moment = [torch.zeros_like(d) for d in data]
    gen = torch.Generator(device=data[0].device).manual_seed(derive_seed(seed, TAG_UPGD))
    for step, (factor, grads) in enumerate(zip(LRS, grads_per_step), start=1):
        step_lr = factor * lr
        global_max_util = torch.tensor(-torch.inf, dtype=F64)
        for k in order:
            grad = grads[k]
            avg_utility[k].mul_(beta_utility).add_(-grad * data[k], alpha=1 - beta_utility)
            first_moment[k].mul_(beta1).add_(grad, alpha=1 - beta1)
            sec_moment[k].mul_(beta2).add_(grad**2, alpha=1 - beta2)
            current_util_max = avg_utility[k].max().cpu()
            if current_util_max > global_max_util:
                global_max_util = current_util_max
        global_max_util = global_max_util.to(data[0].device)
        for k in order:
            grad = grads[k]
            bias_correction_utility = 1 - beta_utility**step
            bias_correction_beta1 = 1 - beta1**step
            bias_correction_beta2 = 1 - beta2**step
            exp_avg = first_moment[k] / bias_correction_beta1
            exp_avg_sq = sec_moment[k] / bias_correction_beta2
            xi = torch.randn(grad.shape, generator=gen, dtype=grad.dtype, device=grad.device)
            noise = xi * sigma
            scaled_utility = torch.sigmoid_(
                (avg_utility[k] / bias_correction_utility) / global_max_util
            )
            data[k].mul_(1 - step_lr * weight_decay).add_(
                (exp_avg * (1 - scaled_utility)) / (exp_avg_sq.sqrt() + eps)
                + noise * (1 - scaled_utility),
                alpha=-2.0 * step_lr,
            )
    return data


def _run(opt, params, grads_per_step, lr):
    for factor, grads in zip(LRS, grads_per_step):
        _set_lr(opt, factor * lr)
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()


@pytest.mark.parametrize("hp", [HP, PPO], ids=["small", "ppo_defaults"])
@pytest.mark.parametrize("device", DEVICES)
def test_adaptive_upgd_follows_the_authors_step(device, hp):
    params = _params(0, device)
    opt = AdaptiveUPGD(_groups(params), **(hp if hp is HP else {}), seeds=[7])
    steps = [_grads(t, 0, device) for t in range(len(LRS))]
    expected = _reference(params, steps, 7, **hp)
    _run(opt, params, steps, hp["lr"])
    for p, e, start in zip(params, expected, _params(0, device)):
        assert torch.equal(p, e)
        assert not torch.equal(p, start)


@pytest.mark.parametrize("device", DEVICES)
def test_stacked_seeds_equal_separate_runs(device):
    """The maximum utility and the noise are per seed."""
    seeds = [3, 9]
    alone = [_params(i, device) for i in range(2)]
    stacked = [torch.stack([a[k].detach() for a in alone]).requires_grad_() for k in range(4)]
    opts = [AdaptiveUPGD(_groups(a), **HP, seeds=[s]) for a, s in zip(alone, seeds)]
    opt = AdaptiveUPGD(_groups(stacked), **HP, seed_dims=1, seeds=seeds)
    steps = [[_grads(t, i, device) for i in range(2)] for t in range(len(LRS))]
    for i, a in enumerate(alone):
        _run(opts[i], a, [grads[i] for grads in steps], HP["lr"])
    _run(opt, stacked, [[torch.stack(pair) for pair in zip(*grads)] for grads in steps], HP["lr"])
    for i, a in enumerate(alone):
        for k, p in enumerate(a):
            assert torch.equal(stacked[k][i], p)


def test_resume_is_exact():
    params, other = _params(0, "cpu"), _params(1, "cpu")
    opt = AdaptiveUPGD(_groups(params), **HP, seeds=[4])
    steps = [_grads(t, 0, "cpu") for t in range(6)]
    for grads in steps[:3]:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
    with torch.no_grad():
        for q, p in zip(other, params):
            q.copy_(p)
    # another seed: the state must bring the generator and the moments
    resumed = AdaptiveUPGD(_groups(other), **HP, seeds=[99])
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint file holds it
    for grads in steps[3:]:
        for o, ps in ((opt, params), (resumed, other)):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            o.step()
    for p, q in zip(params, other):
        assert torch.equal(p, q)


def test_a_missing_gradient_raises_and_changes_nothing():
    """The authors' step reads ``p.grad.data`` of every parameter (an AttributeError on None);
    here the step refuses before it touches a weight, a trace or the generator."""
    params = _params(0, "cpu")
    opt = AdaptiveUPGD(params, **HP, seeds=[5])
    for p, gr in zip(params, _grads(0, 0, "cpu")):
        p.grad = gr
    opt.step()
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    params[2].grad = None
    with pytest.raises(ValueError, match="gradient for every parameter"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    after = opt.state_dict()
    assert torch.equal(after["generators"][0], state["generators"][0])
    for k, s in state["state"].items():
        assert after["state"][k]["step"] == s["step"]
        for name in ("avg_utility", "first_moment", "sec_moment"):
            assert torch.equal(after["state"][k][name], s[name])


def test_defaults_are_the_ppo_scripts():
    opt = AdaptiveUPGD([torch.zeros(2, requires_grad=True)])
    d = opt.defaults
    assert (d["lr"], d["weight_decay"], d["beta_utility"], d["sigma"]) == (3e-4, 1e-3, 0.999, 1e-3)
    assert (d["betas"], d["eps"]) == ((0.9, 0.999), 1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0),
        dict(weight_decay=-1),
        dict(beta_utility=1.0),
        dict(sigma=-0.1),
        dict(betas=(0.9, 1.0)),
        dict(betas=(-0.1, 0.9)),
        dict(eps=0.0),
        dict(seed_dims=2),
        dict(seeds=[1, 2]),
    ],
)
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        AdaptiveUPGD([torch.zeros(2, requires_grad=True)], **kwargs)
