"""The fused CPU kernels against their definitions, computed in float64 with NumPy."""

import numpy as np
import pytest
import torch

from ppo_cbp.nets import kernels


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("S,K,J", [(3, 9, 5), (1, 4, 7), (2, 2, 3)])
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("pull", [False, True])
def test_sgd_backward_update_matches_definition(dtype, rtol, S, K, J, first, pull):
    """With a target (L2-Init's pull in the update pass): ``P <- beta P + alpha delta x^T +
    c target``, the magnitudes of the pulled weights."""
    g = torch.Generator().manual_seed(S * 100 + K * 10 + J)
    P = torch.randn(S, K, J + 1, generator=g, dtype=dtype)
    target = torch.randn(S, K, J + 1, generator=g, dtype=dtype)
    c = 0.003 if pull else 0.0
    delta = torch.randn(S, K, generator=g, dtype=dtype)
    delta[0, 1] = 0.0  # a unit with no gradient (inactive ReLU) keeps its row
    x = torch.rand(S, J + 1, generator=g, dtype=dtype)
    x[:, -1] = 1.0
    beta, alpha = 1.0 - 0.1 * 0.01, -0.1
    W0 = P.double().numpy().copy()  # before the in-place update
    below, out_abs, in_abs = (torch.full((S, n), np.nan, dtype=dtype) for n in (J, J, K))
    kernels.sgd_backward_update_(
        *map(kernels.as_array, (P, delta, x)),
        beta,
        alpha,
        None if first else kernels.as_array(below),
        None if first else kernels.as_array(out_abs),
        kernels.as_array(in_abs),
        kernels.as_array(target) if pull else None,
        c,
    )
    d, xs = delta.double().numpy(), x.double().numpy()
    expected_P = beta * W0 + alpha * d[:, :, None] * xs[:, None, :] + c * target.double().numpy()
    np.testing.assert_allclose(P.double().numpy(), expected_P, rtol=rtol, atol=rtol)
    W = expected_P[..., :-1]
    np.testing.assert_allclose(in_abs.double().numpy(), np.abs(W).sum(2), rtol=rtol)
    if first:
        assert torch.isnan(below).all() and torch.isnan(out_abs).all()
    else:
        expected_below = np.einsum("sk,skj->sj", d, W0[..., :-1])
        np.testing.assert_allclose(below.double().numpy(), expected_below, rtol=rtol, atol=rtol)
        np.testing.assert_allclose(out_abs.double().numpy(), np.abs(W).sum(1), rtol=rtol)


def test_sgd_backward_update_is_in_the_weights_precision():
    # the same float32 arithmetic as baddbmm_ up to fused multiply-adds: the two differ by one
    # rounding of the product, at most 1 ulp of the terms' magnitude (not of a result that
    # cancels)
    g = torch.Generator().manual_seed(0)
    P = torch.randn(2, 33, 17, generator=g)
    delta, x = torch.randn(2, 33, generator=g), torch.randn(2, 17, generator=g)
    product = 0.01 * delta.unsqueeze(2) * x.unsqueeze(1)
    terms = P.abs() + product.abs()
    expected = P.clone().baddbmm_(delta.unsqueeze(2), x.unsqueeze(1), alpha=-0.01)
    spare = torch.empty(2, 16), torch.empty(2, 16), torch.empty(2, 33)
    kernels.sgd_backward_update_(
        *map(kernels.as_array, (P, delta, x)), 1.0, -0.01, *map(kernels.as_array, spare)
    )
    ulp = torch.finfo(torch.float32).eps * terms.clamp_min(1e-30)
    assert ((P - expected).abs() <= ulp).all()


def reference_utility(u, f, birth, steps, h, out_abs, in_abs, fan_in, eta, adaptable):
    """The utility update of ppo_cbp.plasticity.cbp's docstring, in float64."""
    u, f = u.copy(), f.copy()
    if adaptable:
        f = f + (1 - eta) * (h.mean(1) - f)
        hhat = f / (1 - eta ** (steps - birth))
        y = np.abs(h - hhat[:, None, :]).mean(1) / (in_abs / fan_in)
    else:
        y = np.abs(h).mean(1)
    if out_abs is not None:
        y = y * out_abs
    return eta * u + (1 - eta) * y, f


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("adaptable", [False, True])
@pytest.mark.parametrize("has_out", [True, False])
@pytest.mark.parametrize("B", [1, 3])
def test_utility_update_matches_definition(dtype, rtol, adaptable, has_out, B):
    g = np.random.default_rng(B + 2 * adaptable + 4 * has_out)
    S, U, eta, fan_in = 2, 7, 0.99, 5
    steps = 5000
    # young units (the power matters) and old ones (1 - eta^age rounds to 1)
    birth = np.array([[4999, 4990, 4000, 3000, 0, 4500, 1], [4998, 0, 2, 4800, 4999, 100, 3500]])
    arrays = {
        "u": g.random((S, U)),
        "f": g.random((S, U)),
        "h": np.maximum(g.normal(size=(S, B, U)), 0),
        "out_abs": g.random((S, U)) + 0.5,
        "in_abs": g.random((S, U)) + 0.5,
    }
    t = {k: torch.tensor(v, dtype=dtype) for k, v in arrays.items()}
    exact = {k: t[k].double().numpy().copy() for k in t}  # the values the kernel sees
    birth_t = torch.tensor(birth, dtype=torch.int64)
    update = kernels.UtilityUpdate(
        kernels.as_array(t["u"]),
        kernels.as_array(t["f"]) if adaptable else None,
        kernels.as_array(birth_t),
        fan_in,
        eta,
    )
    update(
        steps,
        kernels.as_array(t["h"]),
        kernels.as_array(t["out_abs"]) if has_out else None,
        kernels.as_array(t["in_abs"]),
    )
    u, f = reference_utility(
        exact["u"],
        exact["f"],
        birth,
        steps,
        exact["h"],
        exact["out_abs"] if has_out else None,
        exact["in_abs"],
        fan_in,
        eta,
        adaptable,
    )
    np.testing.assert_allclose(t["u"].double().numpy(), u, rtol=rtol)
    if adaptable:
        np.testing.assert_allclose(t["f"].double().numpy(), f, rtol=rtol)
    else:
        np.testing.assert_array_equal(t["f"].double().numpy(), exact["f"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_correction_age_is_where_the_correction_rounds_to_one(dtype):
    eta = 0.99
    age = int(kernels.full_correction_age(eta, torch.empty(0, dtype=dtype).numpy().dtype))
    one = torch.tensor(1.0, dtype=dtype)
    power = torch.tensor(eta, dtype=torch.float64) ** age
    assert one - power.to(dtype) == one
    assert kernels.full_correction_age(0.0, np.float32) == float("inf")


def test_array_views_follow_the_tensor_objects():
    views = kernels.ArrayViews(capacity=2)
    a, b, c = torch.zeros(3), torch.ones(2), torch.full((4,), 2.0)
    va = views(a)
    assert views(a) is va  # remembered
    va[1] = 5.0
    assert a[1] == 5.0  # a view, not a copy
    views(b)
    vc = views(c)  # over capacity: forgets and starts again
    assert np.array_equal(vc, c.numpy()) and views(c) is vc
    d = torch.zeros(3, requires_grad=True)
    assert views(d).shape == (3,)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matvec_matches_definition(dtype, rtol):
    g = torch.Generator().manual_seed(1)
    P = torch.randn(3, 9, 40, generator=g, dtype=dtype)
    x = torch.randn(3, 40, generator=g, dtype=dtype)
    out = torch.full((3, 9), np.nan, dtype=dtype)
    kernels.matvec_(*map(kernels.as_array, (P, x, out)))
    expected = np.einsum("skj,sj->sk", P.double().numpy(), x.double().numpy())
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_abs_sums_match_definition(dtype, rtol):
    w = torch.randn(2, 7, 13, generator=torch.Generator().manual_seed(2), dtype=dtype)
    col, row = torch.full((2, 13), np.nan, dtype=dtype), torch.full((2, 7), np.nan, dtype=dtype)
    kernels.abs_sums_(*map(kernels.as_array, (w, col, row)))
    a = np.abs(w.double().numpy())
    np.testing.assert_allclose(col.double().numpy(), a.sum(1), rtol=rtol)
    np.testing.assert_allclose(row.double().numpy(), a.sum(2), rtol=rtol)
