"""TRAC against its equations (written out independently, scipy's erfi), in float64."""

import copy
import math

import numpy as np
import pytest
import torch
from scipy import special

from ppo_cbp.plasticity.trac import BETAS, TRAC, erfi

F64 = torch.float64
SHAPES = [(3, 2), (3,)]


def test_erfi_matches_scipy():
    x = np.array([-6.0, -1.3, -0.2, 0.0, 0.3, 1 / math.sqrt(2), 2.0, 4.5, 9.0, 25.0])
    got = erfi(torch.tensor(x, dtype=F64)).numpy()
    np.testing.assert_allclose(got, special.erfi(x), rtol=1e-12)


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64).requires_grad_() for s in SHAPES]


def _grad(params, target):
    """Gradients of sum ||p - target||^2 / 2: every step points toward ``target``."""
    for p in params:
        p.grad = (p.detach() - target).clone()


def _reference(theta0, steps, lr, target, s_prior=1e-8, eps=1e-8):
    """The docstring's recursion with an SGD base (u = -lr g), in numpy."""
    betas = np.array(BETAS)
    ref = [t.copy() for t in theta0]
    theta = [t.copy() for t in theta0]
    s, v, sigma = np.zeros(6), np.zeros(6), np.full(6, 1e-8)
    for _ in range(steps):
        grads = [t - target for t in theta]
        total = s.sum() + eps
        deltas = [(t - r) / total for t, r in zip(theta, ref)]
        h = sum(float((d * g).sum()) for d, g in zip(deltas, grads))
        deltas = [d - lr * g for d, g in zip(deltas, grads)]
        v = betas**2 * v + h**2
        sigma = betas * sigma - h
        s = (
            s_prior
            / special.erfi(1 / math.sqrt(2))
            * special.erfi(sigma / (math.sqrt(2) * np.sqrt(v) + eps))
        )
        theta = [r + d * max(s.sum(), 0.0) for r, d in zip(ref, deltas)]
    return theta, s


def test_trac_follows_its_equations_and_its_scale_grows():
    params = _params(0)
    theta0 = [p.detach().numpy().copy() for p in params]
    opt = TRAC(torch.optim.SGD(params, lr=0.1))
    scales = []
    for _ in range(30):
        _grad(params, 5.0)
        opt.step()
        scales.append(float(opt.scale[0]))
    expected, s = _reference(theta0, 30, 0.1, 5.0)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(opt.s[0].numpy(), s, rtol=1e-9, atol=1e-300)
    # the scale starts near 0 (the first iterates stay at theta_ref) and grows while every
    # gradient agrees with the direction travelled
    assert scales[0] < 1e-6 and scales[-1] > 100 * max(scales[0], 1e-12)


def test_stacked_seeds_equal_separate_runs():
    alone = [_params(i) for i in range(2)]
    stacked = [torch.stack([a[k].detach() for a in alone]).requires_grad_() for k in range(2)]
    opts = [TRAC(torch.optim.Adam(a, lr=0.05)) for a in alone]
    opt = TRAC(torch.optim.Adam(stacked, lr=0.05), seed_dims=1)
    targets = [2.0, -3.0]
    for _ in range(15):
        for a, o, t in zip(alone, opts, targets):
            _grad(a, t)
            o.step()
        for p in stacked:
            p.grad = torch.stack([alone_grad(p[i], targets[i]) for i in range(2)])
        opt.step()
    for i, a in enumerate(alone):
        for k, p in enumerate(a):
            torch.testing.assert_close(stacked[k][i].detach(), p.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.s[i], opts[i].s[0], rtol=1e-10, atol=1e-300)


def alone_grad(p, target):
    return (p.detach() - target).clone()


def test_resume_is_exact():
    params, other = _params(0), _params(1)
    opt = TRAC(torch.optim.Adam(params, lr=0.05))
    for _ in range(5):
        _grad(params, 1.0)
        opt.step()
    with torch.no_grad():
        for q, p in zip(other, params):
            q.copy_(p)
    resumed = TRAC(torch.optim.Adam(other, lr=0.05))
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(5):
        for o, ps in ((opt, params), (resumed, other)):
            _grad(ps, 1.0)
            o.step()
    for p, q in zip(params, other):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "kwargs", [dict(betas=()), dict(betas=(0.9, 1.0)), dict(s_prior=0.0), dict(eps=-1.0)]
)
def test_bad_arguments(kwargs):
    base = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError):
        TRAC(base, **kwargs)
