"""UPGD against its equations, written out independently in float64."""

import copy

import pytest
import torch

from ppo_cbp.plasticity.upgd import UPGD
from ppo_cbp.seeding import TAG_UPGD, derive_seed

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(4, 3), (4,), (2, 4)]
HP = dict(lr=0.05, weight_decay=0.01, beta_utility=0.9, sigma=0.3)


def _params(seed: int, device):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64).to(device).requires_grad_() for s in SHAPES]


def _grads(step: int, seed: int, device):
    g = torch.Generator().manual_seed(100 * seed + step)
    return [torch.randn(s, generator=g, dtype=F64).to(device) for s in SHAPES]


def _reference(params, grads_per_step, seed, lr, weight_decay, beta_utility, sigma):
    """The update of the module docstring, step by step, with the seed's noise drawn
    parameter by parameter from its stream."""
    theta = [p.detach().clone() for p in params]
    u = [torch.zeros_like(t) for t in theta]
    g_noise = torch.Generator(device=theta[0].device).manual_seed(derive_seed(seed, TAG_UPGD))
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (th, gr) in enumerate(zip(theta, grads)):
            u[i] = beta_utility * u[i] + (1 - beta_utility) * (-gr * th)
        top = max(x.max() for x in u)
        noise = [torch.empty_like(th).normal_(generator=g_noise) for th in theta]
        for i, (th, gr) in enumerate(zip(theta, grads)):
            s = torch.sigmoid(u[i] / (1 - beta_utility**t) / top)
            theta[i] = (1 - lr * weight_decay) * th - lr * (gr + sigma * noise[i]) * (1 - s)
    return theta


@pytest.mark.parametrize("device", DEVICES)
def test_upgd_follows_its_equations(device):
    params = _params(0, device)
    opt = UPGD(params, **HP, seeds=[7])
    steps = [_grads(t, 0, device) for t in range(4)]
    expected = _reference(params, steps, 7, **HP)
    for grads in steps:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_stacked_seeds_equal_separate_runs(device):
    """The maximum utility and the noise are per seed."""
    seeds = [3, 9]
    alone = [_params(i, device) for i in range(2)]
    stacked = [torch.stack([a[k].detach() for a in alone]).requires_grad_() for k in range(3)]
    opts = [UPGD(a, **HP, seeds=[s]) for a, s in zip(alone, seeds)]
    opt = UPGD(stacked, **HP, seed_dims=1, seeds=seeds)
    for t in range(4):
        grads = [_grads(t, i, device) for i in range(2)]
        for i, a in enumerate(alone):
            for p, gr in zip(a, grads[i]):
                p.grad = gr.clone()
            opts[i].step()
        for k, p in enumerate(stacked):
            p.grad = torch.stack([grads[0][k], grads[1][k]])
        opt.step()
    for i, a in enumerate(alone):
        for k, p in enumerate(a):
            torch.testing.assert_close(stacked[k][i].detach(), p.detach(), rtol=1e-12, atol=1e-12)


def test_resume_is_exact():
    params, other = _params(0, "cpu"), _params(1, "cpu")
    opt = UPGD(params, **HP, seeds=[4])
    steps = [_grads(t, 0, "cpu") for t in range(6)]
    for grads in steps[:3]:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
    with torch.no_grad():
        for q, p in zip(other, params):
            q.copy_(p)
    resumed = UPGD(other, **HP, seeds=[99])  # another seed: the state must bring the generator
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint file holds it
    for grads in steps[3:]:
        for o, ps in ((opt, params), (resumed, other)):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            o.step()
    for p, q in zip(params, other):
        assert torch.equal(p, q)


def test_high_utility_weights_are_protected():
    """A weight whose utility is the maximum gets s = sigmoid(1) of protection; with beta 0 and
    sigma 0 its step is lr * g * (1 - sigmoid(1))."""
    w = torch.tensor([2.0, 1.0], dtype=F64, requires_grad=True)
    opt = UPGD([w], lr=0.1, sigma=0.0)
    w.grad = torch.tensor([-1.0, 0.5], dtype=F64)  # utilities -g w = 2, -0.5; max 2
    opt.step()
    s = torch.sigmoid(torch.tensor([1.0, -0.25], dtype=F64))
    expected = torch.tensor([2.0, 1.0], dtype=F64) - 0.1 * torch.tensor([-1.0, 0.5]) * (1 - s)
    torch.testing.assert_close(w.detach(), expected)


@pytest.mark.parametrize(
    "kwargs", [dict(lr=0), dict(weight_decay=-1), dict(beta_utility=1.0), dict(sigma=-0.1)]
)
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        UPGD([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_cpu_kernels_equal_the_tensor_path(monkeypatch, dtype, tol):
    """On CPU the step is two kernel passes per parameter; they equal the tensor operations
    (the path on other devices), stacked, on the strided weight and bias views of ``[W | b]``
    that the fused trainer hands over, over steps with zero gradients (max u = 0) first."""
    from ppo_cbp.nets import kernels

    g = torch.Generator().manual_seed(5)
    whole = [torch.randn(3, 5, 21, generator=g, dtype=dtype), torch.randn(3, 1, 6, dtype=dtype)]
    copies = [w.clone() for w in whole]

    def views(ps):
        return [v for p in ps for v in (p[..., :-1], p[..., -1])]

    hp = dict(lr=0.05, weight_decay=0.01, beta_utility=0.9, sigma=0.3, seed_dims=1)
    by_kernel = UPGD(views(whole), **hp, seeds=[1, 2, 3])
    by_tensors = UPGD(views(copies), **hp, seeds=[1, 2, 3])
    calls = []
    apply = kernels.upgd_apply_
    monkeypatch.setattr(kernels, "upgd_apply_", lambda *a, **k: calls.append(1) or apply(*a, **k))
    for t in range(12):
        grads = [
            torch.zeros_like(w) if t < 2 else torch.randn(w.shape, generator=g, dtype=dtype)
            for w in whole
        ]
        for opt in (by_kernel, by_tensors):
            for v, gv in zip(opt.param_groups[0]["params"], views(grads)):
                v.grad = gv.clone()
            if opt is by_tensors:
                with monkeypatch.context() as m:
                    m.setattr(kernels, "available", lambda *a: False)
                    opt.step()
            else:
                opt.step()
        for a, b in zip(whole, copies):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert len(calls) == 12 * 4
    for p, q in zip(by_kernel.param_groups[0]["params"], by_tensors.param_groups[0]["params"]):
        u, v = by_kernel.state[p]["avg_utility"], by_tensors.state[q]["avg_utility"]
        torch.testing.assert_close(u, v, rtol=tol, atol=tol)


def test_large_parameters_take_torch_sigmoid(monkeypatch):
    """Above ``KERNEL_EXP_MAX`` elements per seed, ``s = sigmoid(u factor)`` is torch's (its
    vectorised sigmoid is faster than the kernel's scalar exp) and the update a kernel pass:
    equal to the tensor path in float64."""
    from ppo_cbp.nets import kernels
    from ppo_cbp.plasticity import upgd

    calls = []
    given = kernels.upgd_apply_given_
    monkeypatch.setattr(
        kernels, "upgd_apply_given_", lambda *a, **k: calls.append(1) or given(*a, **k)
    )
    g = torch.Generator().manual_seed(0)
    big = torch.randn(2, upgd.KERNEL_EXP_MAX + 1, generator=g, dtype=F64)
    ps = [big.clone().requires_grad_(), big.clone().requires_grad_()]
    opts = [UPGD([p], **HP, seed_dims=1, seeds=[1, 2]) for p in ps]
    for _ in range(3):
        grad = torch.randn(big.shape, generator=g, dtype=F64)
        for i, (p, opt) in enumerate(zip(ps, opts)):
            p.grad = grad.clone()
            if i == 0:
                with monkeypatch.context() as m:
                    m.setattr(kernels, "available", lambda *a: False)
                    opt.step()
            else:
                opt.step()
    assert len(calls) == 3
    torch.testing.assert_close(ps[0], ps[1], rtol=1e-12, atol=1e-12)
