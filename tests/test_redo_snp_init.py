"""ReDo, Shrink and Perturb, and the initialisers, against their definitions."""

import math

import pytest
import torch
from torch import nn

from ppo_cbp.init import SCHEMES, init_layer_, sample_
from ppo_cbp.plasticity.redo import ReDo
from ppo_cbp.plasticity.shrink_perturb import perturb_

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def net(device):
    torch.manual_seed(0)
    layers = [init_layer_(nn.Linear(3, 4)), nn.ReLU(), init_layer_(nn.Linear(4, 2))]
    return nn.Sequential(*layers).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_redo_resets_exactly_units_at_or_below_threshold(device):
    model = net(device)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 3, device=device)).sum().backward()
    opt.step()
    # E|h| = (0, 0.5, 1, 2.5): layer mean 1, scores (0, 0.5, 1, 2.5); tau = 0.5 takes units 0 and 1
    h = torch.tensor([[0.0, 0.5, 1.0, 2.5], [0.0, -0.5, 1.0, 2.5]], device=device)
    redo = ReDo(model, opt, threshold=0.5, period=3)
    old = [p.detach().clone() for p in model.parameters()]
    old_state = opt.state[model[2].weight]["exp_avg"].clone()
    for _ in range(2):
        redo.step([h])
    assert all(torch.equal(a, b) for a, b in zip(old, model.parameters()))
    redo.step([h])
    W, b, W_out = model[0].weight, model[0].bias, model[2].weight
    changed = (W != old[0]).any(1).tolist()
    assert changed == [True, True, False, False]
    assert (b[:2] == 0).all() and torch.equal(b[2:], old[1][2:])
    assert (W_out[:, :2] == 0).all() and torch.equal(W_out[:, 2:], old[2][:, 2:])
    assert (W[:2].abs() <= math.sqrt(6 / 3)).all()
    state = opt.state[model[2].weight]["exp_avg"]
    assert (state[:, :2] == 0).all() and torch.equal(state[:, 2:], old_state[:, 2:])
    assert redo.num_replaced == 2


def test_redo_uses_hooked_activations_and_conv_scores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        model[0].bias[:] = torch.tensor([-100.0, 0.0, 0.0])  # channel 0 is dead on these inputs
        model[0].weight.abs_()
    redo = ReDo(model, None, threshold=0.1, period=1, init="torch_default")
    model(torch.rand(2, 1, 6, 6))
    redo.step()
    assert (model[3].weight.view(2, 3, 16)[:, 0] == 0).all()
    assert (model[3].weight.view(2, 3, 16)[:, 1:] != 0).all()
    assert model[0].bias.tolist() == [0.0, 0.0, 0.0]


def test_redo_bad_arguments():
    with pytest.raises(ValueError):
        ReDo(net("cpu"), threshold=-1)
    with pytest.raises(ValueError):
        ReDo(net("cpu"), period=0)


@pytest.mark.parametrize("device", DEVICES)
def test_shrink_and_perturb_moves_weights_by_expected_amounts(device):
    lr, weight_decay, noise_std = 0.1, 0.01, 0.05
    w = torch.nn.Parameter(torch.randn(400, 500, device=device))
    opt = torch.optim.SGD([w], lr=lr, weight_decay=weight_decay)
    before = w.detach().clone()
    (w * 0).sum().backward()
    opt.step()
    torch.testing.assert_close(w.detach(), before * (1 - lr * weight_decay))
    shrunk = w.detach().clone()
    perturb_([w], noise_std, torch.Generator(device=device).manual_seed(0))
    noise = (w.detach() - shrunk).double()
    n = noise.numel()
    assert abs(noise.mean().item()) < 4 * noise_std / math.sqrt(n)
    assert abs(noise.std().item() / noise_std - 1) < 4 / math.sqrt(2 * n)
    with pytest.raises(ValueError):
        perturb_([w], -1.0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_init_schemes_match_their_distributions(scheme):
    fan_in, fan_out = 200, 300
    w = torch.empty(fan_out, fan_in, dtype=torch.float64)
    sample_(w, scheme, "relu", generator=torch.Generator().manual_seed(0))
    expected = {
        "kaiming_uniform": ("uniform", math.sqrt(2) * math.sqrt(3 / fan_in)),
        "kaiming_normal": ("normal", math.sqrt(2) / math.sqrt(fan_in)),
        "lecun_uniform": ("uniform", math.sqrt(3 / fan_in)),
        "lecun_normal": ("normal", 1 / math.sqrt(fan_in)),
        "xavier_uniform": ("uniform", math.sqrt(2) * math.sqrt(6 / (fan_in + fan_out))),
        "torch_default": ("uniform", 1 / math.sqrt(fan_in)),
    }[scheme]
    kind, scale = expected
    std = scale / math.sqrt(3) if kind == "uniform" else scale
    assert abs(w.std().item() / std - 1) < 0.02
    if kind == "uniform":
        assert w.abs().max() <= scale and w.abs().max() > 0.99 * scale


def test_torch_default_matches_pytorch_bound():
    layer = nn.Linear(37, 5)
    bound = 1 / math.sqrt(37)  # PyTorch's kaiming_uniform_(a=sqrt(5)) bound
    assert layer.weight.abs().max() <= bound
    with pytest.raises(ValueError):
        init_layer_(layer, "orthogonal")
