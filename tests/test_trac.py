"""TRAC against its equations (written out independently, scipy's erfi), in float64."""

import copy
import math

import numpy as np
import pytest
import torch
from scipy import special

from ppo_cbp.plasticity import trac
from ppo_cbp.plasticity.trac import BETAS, TRAC, erfi, erfi_series

F64 = torch.float64
SHAPES = [(3, 2), (3,)]


@pytest.mark.parametrize("function", [erfi, erfi_series], ids=["converged", "900-terms"])
def test_erfi_matches_scipy(function):
    x = np.array([-6.0, -1.3, -0.2, 0.0, 1e-300, 1e-9, 0.3, 1 / math.sqrt(2), 2.0, 4.5, 9.0, 25.0])
    dense = np.random.default_rng(0).uniform(-trac.ERFI_MAX, trac.ERFI_MAX, 2000)
    for values in (x, dense, dense.reshape(40, 50)):
        got = function(torch.tensor(values, dtype=F64)).numpy()
        np.testing.assert_allclose(got, special.erfi(values), rtol=1e-12, atol=1e-300)
    # beyond +-ERFI_MAX both clamp (float64 overflows at 26.6)
    over = function(torch.tensor([-40.0, 30.0], dtype=F64)).numpy()
    np.testing.assert_allclose(over, special.erfi([-26.0, 26.0]), rtol=1e-12)


@pytest.fixture(params=["kernels", "tensors"])
def path(request, monkeypatch):
    """TRAC's CPU kernels, or the tensor operations that other devices run."""
    if request.param == "tensors":
        monkeypatch.setattr(trac.kernels, "available", lambda *tensors: False)
    return request.param


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


def test_trac_follows_its_equations_and_its_scale_grows(path):
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


def test_stacked_seeds_equal_separate_runs(path):
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


def test_float32_kernels_equal_tensor_operations(monkeypatch):
    """In float32 the kernels take TRAC's products and updates in float32 as the tensor path
    does (only the sum's order differs)."""
    runs = []
    for by_kernel in (True, False):
        if not by_kernel:
            monkeypatch.setattr(trac.kernels, "available", lambda *tensors: False)
        params = [p.detach().float().requires_grad_() for p in _params(3)]
        stacked = [torch.stack([p.detach(), 2 * p.detach()]).requires_grad_() for p in params]
        opt = TRAC(torch.optim.SGD(stacked, lr=0.1), seed_dims=1)
        for _ in range(4):
            _grad(stacked, 5.0)
            opt.step()
        runs.append((stacked, opt.s.clone()))
    (kernel, s_kernel), (tensor, s_tensor) = runs
    for a, b in zip(kernel, tensor):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_kernel, s_tensor, rtol=1e-5, atol=0.0)


BASES = [
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1)),
    (None, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    (None, lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1, nesterov=True, momentum=0.5)),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1)),
    (None, lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True)),
]


@pytest.mark.parametrize("folds, base", BASES, ids=[f"b{i}" for i in range(len(BASES))])
def test_kernels_equal_tensor_operations_around_the_base(monkeypatch, folds, base):
    """Plain SGD (coupled weight decay) and plain Adam are folded into TRAC's last kernel pass
    (Adam from its second step, when its state exists); other bases are stepped between the
    passes: all equal the tensor path stepping torch's optimizer."""
    runs = []
    for by_kernel in (True, False):
        if not by_kernel:
            monkeypatch.setattr(trac.kernels, "available", lambda *tensors: False)
        stacked = [torch.stack([p.detach(), -p.detach()]).requires_grad_() for p in _params(4)]
        opt = TRAC(base(stacked), seed_dims=1)
        for _ in range(25):
            _grad(stacked, 5.0)
            opt.step()
        runs.append((opt._steps[2], stacked, opt.s.clone(), opt.base.state_dict()))
    (folded, kernel, s_kernel, base_kernel), (_, tensor, s_tensor, base_tensor) = runs
    assert folded == folds
    assert s_kernel.sum(1).min() > 1e-6  # the scale has grown: the updates matter
    for a, b in zip(kernel, tensor):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_kernel, s_tensor, rtol=1e-10, atol=1e-300)
    for i, st in base_kernel["state"].items():  # Adam's moments and step count too
        for key, value in st.items():
            torch.testing.assert_close(value, base_tensor["state"][i][key], rtol=1e-12, atol=0)


def alone_grad(p, target):
    return (p.detach() - target).clone()


def test_resume_is_exact(path):
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
