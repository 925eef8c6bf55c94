"""FrozenHead (the injected network's frozen heads joined in one MLP) against its definition
in float64: its output, features and the gradient with respect to its input."""

from __future__ import annotations

import pytest
import torch

from ppo_cbp.nets import frozen_head
from ppo_cbp.nets.frozen_head import FrozenHead

F64 = torch.float64


def _layers(S=2, n_in=4, units=6, n_out=3, layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(S, units if layers == 2 else n_out, n_in + 1, generator=g, dtype=F64)
    if layers == 1:
        return [first]
    return [first, torch.randn(S, n_out, units + 1, generator=g, dtype=F64)]


def _aug(x):
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_output_features_and_input_gradient_by_their_definition(layers, activation):
    ws = _layers(layers=layers)
    head = FrozenHead(1, ws, activation=activation, features_of=2)
    phi = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    f = {"relu": torch.relu, "tanh": torch.tanh}[activation]
    # by hand, seed by seed, row by row
    want = torch.zeros(2, 5, 3, dtype=F64)
    for s in range(2):
        for b in range(5):
            x = torch.cat([phi[s, b], torch.ones(1, dtype=F64)])
            if layers == 1:
                want[s, b] = ws[0][s] @ x
            else:
                hidden = f(ws[0][s] @ x)
                want[s, b] = ws[1][s] @ torch.cat([hidden, torch.ones(1, dtype=F64)])
    out, features = head.forward(_aug(phi.detach()), for_backward=True)
    torch.testing.assert_close(out, want.detach(), rtol=1e-13, atol=1e-13)
    if layers == 2:
        first_units = f(torch.einsum("sui,sbi->sbu", ws[0], _aug(phi.detach())))[..., :2]
        torch.testing.assert_close(features, first_units, rtol=1e-13, atol=1e-13)
    else:
        assert features is None
    delta = torch.randn(2, 5, 3, dtype=F64)
    (expected,) = torch.autograd.grad(want, phi, delta)
    torch.testing.assert_close(head.backward(delta), expected, rtol=1e-12, atol=1e-12)


def test_a_large_batch_goes_through_in_slices_with_the_same_result(monkeypatch):
    ws = _layers(units=7)
    phi = _aug(torch.randn(2, 23, 4, dtype=F64))
    whole_out, whole_features = FrozenHead(0, ws, features_of=3).forward(phi)
    monkeypatch.setattr(frozen_head, "ROWS_UNITS", 7 * 4)  # 4 rows a slice: 6 slices
    out, features = FrozenHead(0, ws, features_of=3).forward(phi)
    # (to the rounding: BLAS may block a matrix product of other rows differently)
    torch.testing.assert_close(out, whole_out, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(features, whole_features, rtol=1e-14, atol=1e-14)
    assert features.shape == (2, 23, 3)
