"""Continual backprop against Algorithm 1 and equation (1), computed independently."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from ppo_cbp.init import init_layer_
from ppo_cbp.nets.resnet import ResNet18
from ppo_cbp.nets.units import UnitLayer
from ppo_cbp.plasticity.cbp import ContinualBackprop

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def mlp(sizes, device="cpu", dtype=torch.float64, seed=0, scheme="kaiming_uniform"):
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        mods.append(init_layer_(nn.Linear(a, b), scheme))
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).to(device=device, dtype=dtype)


def sgd_step(net, opt, x, y):
    loss = (net(x) - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decay_rate", [0.99, 0.5])
def test_contribution_utility_matches_equation_1(device, decay_rate):
    net = mlp([3, 4, 5, 2], device)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    cbp = ContinualBackprop(net, opt, replacement_rate=0.0, decay_rate=decay_rate)
    g = torch.Generator().manual_seed(1)
    expected = [np.zeros(4), np.zeros(5)]
    for _ in range(6):
        x = torch.randn(7, 3, generator=g, dtype=torch.float64).to(device)
        y = torch.randn(7, 2, generator=g, dtype=torch.float64).to(device)
        W1, b1, W2, b2 = (p.detach().cpu().numpy().copy() for p in net[:3].parameters())
        sgd_step(net, opt, x, y)
        cbp.step()
        # equation (1) in float64 with the activations of the forward pass and the weights after the step
        h1 = np.maximum(x.cpu().numpy() @ W1.T + b1, 0)
        h2 = np.maximum(h1 @ W2.T + b2, 0)
        W2_new, W3_new = net[2].weight.detach().cpu().numpy(), net[4].weight.detach().cpu().numpy()
        for layer, (h, w_out) in enumerate([(h1, W2_new), (h2, W3_new)]):
            inst = np.abs(h).mean(0) * np.abs(w_out).sum(0)
            expected[layer] = decay_rate * expected[layer] + (1 - decay_rate) * inst
    for layer in range(2):
        np.testing.assert_allclose(cbp.utility[layer][0].cpu().numpy(), expected[layer], rtol=1e-12)


def test_adaptable_contribution_matches_definition():
    eta = 0.9
    net = mlp([3, 4, 2])
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    cbp = ContinualBackprop(
        net, opt, replacement_rate=0.0, decay_rate=eta, utility="adaptable_contribution"
    )
    g = torch.Generator().manual_seed(2)
    u, f = np.zeros(4), np.zeros(4)
    for t in range(1, 6):
        x, y = (
            torch.randn(8, 3, generator=g, dtype=torch.float64),
            torch.randn(8, 2, generator=g, dtype=torch.float64),
        )
        W1, b1 = net[0].weight.detach().numpy().copy(), net[0].bias.detach().numpy().copy()
        sgd_step(net, opt, x, y)
        cbp.step()
        h = np.maximum(x.numpy() @ W1.T + b1, 0)
        f = eta * f + (1 - eta) * h.mean(0)
        hhat = f / (1 - eta**t)
        w_in, w_out = net[0].weight.detach().numpy(), net[2].weight.detach().numpy()
        inst = np.abs(h - hhat).mean(0) * np.abs(w_out).sum(0) / np.abs(w_in).mean(1)
        u = eta * u + (1 - eta) * inst
    np.testing.assert_allclose(cbp.utility[0][0].numpy(), u, rtol=1e-12)


def simulate_count(units, rate, maturity, steps):
    """Algorithm 1's replacement count with explicit per-unit ages (any eligible unit)."""
    ages, count, total = np.zeros(units, dtype=int), 0.0, 0
    for _ in range(steps):
        ages += 1
        eligible = np.flatnonzero(ages > maturity)
        count += rate * len(eligible)
        while count >= 1 - 1e-9 and len(eligible):
            ages[eligible[0]] = 0
            eligible = eligible[1:]
            count -= 1
            total += 1
    return total


@pytest.mark.parametrize("rate,maturity", [(1 / 32, 0), (0.03, 5), (0.2, 3)])
def test_number_of_replacements_follows_accumulated_count(rate, maturity):
    net = mlp([2, 8, 1])
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    cbp = ContinualBackprop(net, opt, replacement_rate=rate, maturity_threshold=maturity)
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)
    young_replaced = 0
    for _ in range(200):
        sgd_step(net, opt, x, y)
        ages_before = (cbp.steps + 1) - cbp.birth[0][0]
        before = net[0].weight.detach().clone()
        cbp.step()
        changed = (net[0].weight.detach() != before).any(1)
        young_replaced += int((changed & (ages_before <= maturity)).sum())
    assert young_replaced == 0
    assert cbp.num_replaced == simulate_count(8, rate, maturity, 200)
    if maturity == 0:
        assert cbp.num_replaced == math.floor(rate * 8 * 200)


@pytest.mark.parametrize("device", DEVICES)
def test_lowest_utility_mature_unit_is_replaced(device):
    net = mlp([3, 6, 2], device)
    with torch.no_grad():
        net[0].weight.abs_()  # positive inputs and weights: no unit is dead
        net[2].weight[:, 4] *= 1e-3
        net[2].weight[:, 1] *= 1e-5  # the smallest utility, but kept immature below
    cbp = ContinualBackprop(
        net, None, replacement_rate=1 / 6, maturity_threshold=10, decay_rate=0.0
    )
    x = torch.rand(16, 3, dtype=torch.float64, device=device) + 0.5
    h = torch.relu(x @ net[0].weight.T + net[0].bias).detach().cpu().numpy()
    utility = np.abs(h).mean(0) * np.abs(net[2].weight.detach().cpu().numpy()).sum(0)
    assert utility.argmin() == 1
    mature = [i for i in range(6) if i != 1]
    expected = mature[int(utility[mature].argmin())]
    cbp.birth[0][0, 1] = 5  # age 6 at step 11: immature
    for _ in range(10):
        net(x)
        assert cbp.step() == 0
    net(x)
    assert cbp.step() == 1
    births = [0, 5, 0, 0, 0, 0]
    births[expected] = 11
    assert cbp.birth[0][0].tolist() == births


@pytest.mark.parametrize("device", DEVICES)
def test_replacement_state_and_function_preserved(device):
    net = mlp([5, 16, 16, 3], device, scheme="lecun_uniform")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.99, 0.99))
    cbp = ContinualBackprop(
        net, opt, replacement_rate=0.05, maturity_threshold=3, init="lecun_uniform"
    )
    g = torch.Generator().manual_seed(3)
    x_fixed = torch.randn(32, 5, generator=g, dtype=torch.float64).to(device)
    checked = 0
    for _ in range(40):
        x = torch.randn(8, 5, generator=g, dtype=torch.float64).to(device)
        sgd_step(net, opt, x, torch.zeros(8, 3, dtype=torch.float64, device=device))
        births = [b.clone() for b in cbp.birth]
        pruned = copy.deepcopy(net)
        cbp.step()
        for layer, (lin, nxt) in enumerate([(0, 2), (2, 4)]):
            new = (cbp.birth[layer][0] == cbp.steps) & (births[layer][0] != cbp.steps)
            idx = torch.nonzero(new).flatten()
            if len(idx) == 0:
                continue
            checked += 1
            W, b, W_out = net[lin].weight, net[lin].bias, net[nxt].weight
            bound = math.sqrt(3 / W.shape[1])
            assert (W[idx].abs() <= bound).all() and not torch.equal(
                W[idx], pruned[lin].weight[idx]
            )
            # rows of the consumer that are themselves new units got fresh incoming weights
            consumer_rows = torch.ones(W_out.shape[0], dtype=torch.bool, device=device)
            if layer == 0:
                consumer_rows &= cbp.birth[1][0] != cbp.steps
            assert (b[idx] == 0).all() and (W_out[consumer_rows][:, idx] == 0).all()
            for p, sel in [
                (W, (idx, slice(None))),
                (b, (idx,)),
                (W_out, (consumer_rows.nonzero()[:, None], idx)),
            ]:
                st = opt.state[p]
                assert (st["exp_avg"][sel] == 0).all() and (st["exp_avg_sq"][sel] == 0).all()
            keep = torch.ones(W.shape[0], dtype=torch.bool, device=device)
            keep[idx] = False
            assert torch.equal(W[keep], pruned[lin].weight[keep])
            assert (cbp.utility[layer][0, idx] == 0).all()
            with torch.no_grad():
                pruned[nxt].weight[:, idx] = 0
        with torch.no_grad():
            torch.testing.assert_close(net(x_fixed), pruned(x_fixed), rtol=0, atol=0)
    assert checked >= 3


def test_optimizer_state_reset_can_be_turned_off():
    net = mlp([3, 4, 2])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    cbp = ContinualBackprop(
        net, opt, replacement_rate=1.0, maturity_threshold=0, reset_optimizer_state=False
    )
    sgd_step(
        net, opt, torch.randn(4, 3, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64)
    )
    momentum = opt.state[net[0].weight]["momentum_buffer"].clone()
    cbp.step()
    assert cbp.num_replaced == 4 and torch.equal(
        opt.state[net[0].weight]["momentum_buffer"], momentum
    )


def test_fold_bias_preserves_expected_output():
    net = mlp([3, 6, 2])
    cbp = ContinualBackprop(
        net, None, replacement_rate=1 / 6, maturity_threshold=0, decay_rate=0.0, fold_bias=True
    )
    x = torch.rand(50, 3, dtype=torch.float64)
    before = net(x).detach()
    cbp.step()
    # the consumer's bias absorbed the removed unit's mean output: the batch-mean output is unchanged
    torch.testing.assert_close(net(x).detach().mean(0), before.mean(0))


def test_conv_flatten_batchnorm_units():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(5 * 2 * 2, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3),
    ).double()  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    cbp = ContinualBackprop(
        net, opt, replacement_rate=0.0, maturity_threshold=0, init="torch_default"
    )
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    sgd_step(net, opt, x, torch.zeros(6, 3, dtype=torch.float64))
    with torch.no_grad():
        net[1].running_mean += 1.0
        net[1].weight += 0.5
        net[9].weight += 0.5
    old = copy.deepcopy(net)
    old_momentum = {n: opt.state[p]["momentum_buffer"].clone() for n, p in net.named_parameters()}
    cbp.replacement_rate = 1.0
    cbp.to_replace = [-3.0, -4.0, -5.0]  # exactly one unit per layer this step
    net.eval()  # record activations without moving the running statistics
    net(x)
    assert cbp.step() == 3
    params = dict(net.named_parameters())
    picked = [int(torch.nonzero(cbp.birth[i][0] == 1)) for i in range(3)]
    c0, c1, u = picked
    # first conv channel c0: filter, bias, BatchNorm entry, and the next conv's input channel c0
    rows = [r for r in range(5) if r != c1]  # the new channel c1 of the next conv has fresh filters
    assert (net[4].weight[rows, c0] == 0).all()
    assert net[0].bias[c0] == 0 and net[1].weight[c0] == 1 and net[1].bias[c0] == 0
    assert net[1].running_mean[c0] == 0 and net[1].running_var[c0] == 1
    assert (net[0].weight[c0].abs() <= 1 / math.sqrt(2 * 9)).all()
    # second conv channel c1 feeds columns 4*c1 .. 4*c1+3 of the Linear after the flatten
    cols = list(range(4 * c1, 4 * c1 + 4))
    rows = [r for r in range(6) if r != u]
    other_cols = [c for c in range(20) if c not in cols]
    assert (net[8].weight[rows][:, cols] == 0).all()
    assert torch.equal(net[8].weight[rows][:, other_cols], old[8].weight[rows][:, other_cols])
    assert (opt.state[params["8.weight"]]["momentum_buffer"][:, cols] == 0).all()
    # the Linear unit u with its LayerNorm entry
    assert (net[11].weight[:, u] == 0).all() and net[9].weight[u] == 1 and net[9].bias[u] == 0
    # everything else is untouched
    keep = [i for i in range(4) if i != c0]
    assert torch.equal(net[0].weight[keep], old[0].weight[keep])
    assert torch.equal(net[1].running_mean[keep], old[1].running_mean[keep])
    m = opt.state[params["0.weight"]]["momentum_buffer"]
    assert (m[c0] == 0).all() and torch.equal(m[keep], old_momentum["0.weight"][keep])


@pytest.mark.parametrize("device", DEVICES)
def test_released_count_rule_draws_one_unit_with_probability_rho_times_eligible(device):
    """accumulate=False (the paper's PPO code): each step and layer, with E eligible units,
    one unit is replaced with probability rho * E when rho * E < 1 (a host draw from
    numpy's default_rng(seed), in layer order), floor(rho * E) units otherwise; nothing carries
    over between steps."""
    net = mlp([3, 10, 10, 1], device, seed=4)
    cbp = ContinualBackprop(
        net, None, replacement_rate=0.02, maturity_threshold=0, accumulate=False, seed=11
    )
    net(torch.randn(5, 3, dtype=torch.float64, device=device))
    rng = np.random.default_rng(11)
    counts = []
    for _ in range(500):
        expected = sum(int(rng.random() < 0.02 * 10) for _ in range(2))  # E = 10 per layer
        counts.append(cbp.step())
        assert counts[-1] == expected
    assert 100 < sum(counts) < 300  # 2 layers x 500 steps x 0.2 = 200 in expectation
    assert max(counts) <= 2

    # rho * E >= 1: floor(0.25 * 10) = 2 per layer every step, where Algorithm 1's
    # accumulated count gives 2, 3, 2, 3
    h = [torch.rand(5, 10, dtype=torch.float64, device=device)] * 2
    totals = {}
    for accumulate in (False, True):
        op = ContinualBackprop(
            mlp([3, 10, 10, 1], device, seed=4),
            None,
            replacement_rate=0.25,
            maturity_threshold=0,
            accumulate=accumulate,
        )
        totals[accumulate] = [op.step(h) for _ in range(4)]
    assert totals == {False: [4, 4, 4, 4], True: [4, 6, 4, 6]}
    shapes = [(2, 6, 4), (2, 6), (2, 5, 6), (2, 5), (2, 2, 5)]
    two = stacked_layers([torch.zeros(s, dtype=torch.float64) for s in shapes], 1)
    with pytest.raises(ValueError, match="one network only"):
        ContinualBackprop(two, None, accumulate=False, seed=[0, 1])


def test_released_count_rule_resumes_exactly():
    def run(cbp, n):
        return [cbp.step() for _ in range(n)]

    x = torch.randn(5, 3, dtype=torch.float64)
    a_net = mlp([3, 10, 10, 1], seed=4)
    a = ContinualBackprop(
        a_net, None, replacement_rate=0.03, maturity_threshold=2, accumulate=False
    )
    a_net(x)
    run(a, 50)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # as the trainers checkpoint it
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    rest = run(a, 200)
    b_net = mlp([3, 10, 10, 1], seed=4)
    b = ContinualBackprop(
        b_net, None, replacement_rate=0.03, maturity_threshold=2, accumulate=False
    )
    b_net(x)
    b.load_state_dict(saved)
    assert run(b, 200) == rest and sum(rest) > 0


def resnet_released_mapping(blocks=8):
    """(convolution, its BatchNorm, the weighted consumer) of the 17 unit layers, by name, as
    the released res_gnt.py pairs them: weight layers in order, downsamples skipped."""
    convs = ["stem.0"] + [f"blocks.{b}.conv{j}" for b in range(blocks) for j in (1, 2)]
    norms = ["stem.1"] + [f"blocks.{b}.bn{j}" for b in range(blocks) for j in (1, 2)]
    return list(zip(convs, norms, convs[1:] + ["fc"]))


def resnet_after_replacement(old, model, picked):
    """The state ``old`` (a state_dict) should have after replacing the units ``picked`` (one
    index tensor per unit layer): zero outgoing weights in the consumer, then fresh incoming
    filters (taken from ``model``), zero bias, BatchNorm (1, 0) with statistics (0, 1)."""
    want = {k: v.clone() for k, v in old.items()}
    mapping = resnet_released_mapping()
    for (_, _, consumer), p in zip(mapping, picked):
        want[f"{consumer}.weight"][:, p] = 0
    for (conv, bn, _), p in zip(mapping, picked):
        want[f"{conv}.weight"][p] = model[f"{conv}.weight"][p]
        want[f"{conv}.bias"][p] = 0
        for name, value in [("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)]:
            want[f"{bn}.{name}"][p] = value
    return want


def assert_resnet_replaced(old, model, picked):
    want = resnet_after_replacement(old, model, picked)
    for name, value in model.items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(value, want[name]), name
    for (conv, _, _), p in zip(resnet_released_mapping(), picked):
        assert not torch.equal(model[f"{conv}.weight"][p], old[f"{conv}.weight"][p]), conv


def test_resnet_replaces_units_as_released():
    """Two units in each of the 17 layers: fresh filters, zero bias, BatchNorm (1, 0) and
    statistics (0, 1), zero weights into the next weight layer (the next block's conv1, the
    head after the last block); nothing else changes (downsample shortcuts included)."""
    torch.manual_seed(0)
    model = ResNet18(num_classes=10).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    cbp = ContinualBackprop(model, None, replacement_rate=1.0, maturity_threshold=0)
    assert len(cbp.layers) == 17
    model(x)
    cbp.to_replace = [-float(layer.units) + 2 for layer in cbp.layers]  # two units per layer
    old = copy.deepcopy(model.state_dict())
    assert cbp.step() == 34
    picked = [torch.nonzero(b[0] == 1).flatten() for b in cbp.birth]
    assert [len(p) for p in picked] == [2] * 17
    assert_resnet_replaced(old, model.state_dict(), picked)


def test_resnet_block_units_are_measured_on_the_block_output():
    """A block's conv2 units are the block's output channels after the residual add and ReLU
    (pooled for the last block, the head's input) weighted by the next weight layer: the
    contribution utility (eta = 0) of each, computed from the recorded block outputs."""
    torch.manual_seed(4)
    model = ResNet18(num_classes=10).double()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    cbp = ContinualBackprop(model, None, replacement_rate=0.0, decay_rate=0.0)
    outputs = []
    hooks = [blk.register_forward_hook(lambda m, i, o: outputs.append(o)) for blk in model.blocks]
    model(x)
    for h in hooks:
        h.remove()
    cbp.to_replace = [0.0] * 17
    cbp.to_replace[2::2] = [1.0] * 8  # utilities of every block's conv2 layer are computed
    cbp.steps = cbp.maturity_threshold  # every unit eligible at this step
    cbp.step()
    consumers = [blk.conv1.weight for blk in model.blocks[1:]] + [model.fc.weight]
    for b, (out, w) in enumerate(zip(outputs, consumers)):
        layer = 2 + 2 * b
        selected = cbp.birth[layer][0] == cbp.steps
        expected = out.abs().mean((0, 2, 3)) * w.abs().sum(
            dim=[d for d in range(w.dim()) if d != 1]
        )
        assert selected.sum() == 1
        # the replaced unit's utility is zeroed; the others keep the step's value
        torch.testing.assert_close(
            cbp.utility[layer][0][~selected], expected.detach()[~selected], rtol=1e-12, atol=0
        )
        assert expected[selected] == expected.min()


def test_resnet_dead_residual_channel_is_replaced_and_comes_alive():
    """A block output channel that is zero for every input (its branch pushed far below zero)
    has utility 0: CBP replaces it, and after the replacement it is non-zero and learns."""
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(5)
    model = ResNet18(num_classes=10)
    block, c = model.blocks[5], 17
    with torch.no_grad():
        block.bn2.weight[c] = 0.0
        block.bn2.bias[c] = -1e3  # relu(branch + shortcut) = 0 for every input
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cbp = ContinualBackprop(model, opt, replacement_rate=0.0, maturity_threshold=0)
    out = []
    hook = block.register_forward_hook(lambda m, i, o: out.append(o))
    model(torch.randn(8, 3, 16, 16, generator=g))
    assert (out[-1][:, c] == 0).all() and (out[-1][:, :c] > 0).any(dim=(0, 2, 3)).all()
    cbp.to_replace = [0.0] * 17
    cbp.to_replace[2 + 2 * 5] = 1.0
    assert cbp.step() == 1
    assert cbp.birth[2 + 2 * 5][0, c] == cbp.steps  # the dead channel, not a live one
    _resnet_sgd(model, opt, g, 2)
    assert (out[-1][:, c] > 0).any()
    assert block.conv2.weight.grad[c].abs().sum() > 0 and block.bn2.weight.grad[c] != 0
    hook.remove()


def test_resnet_stem_consumer_sees_the_old_unit_pruned():
    """Right after a stem replacement, blocks[0]'s residual branch computes exactly what the
    old network's did with the old stem unit silenced (its output set to 0), while the stream
    itself carries the new unit's output in that channel and the old outputs elsewhere."""
    torch.manual_seed(1)
    model = ResNet18(num_classes=10).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    cbp = ContinualBackprop(model, None, replacement_rate=0.0, maturity_threshold=0)
    model(x)
    old = copy.deepcopy(model)
    cbp.to_replace = [1.0] + [0.0] * 16  # one stem unit
    assert cbp.step() == 1
    (s,) = torch.nonzero(cbp.birth[0][0] == 1).flatten().tolist()
    silenced = copy.deepcopy(old)
    with torch.no_grad():
        silenced.stem[1].weight[s] = 0  # BatchNorm (0, 0): the old unit's output is 0
        silenced.stem[1].bias[s] = 0
    for mode in ("train", "eval"):
        for net in (model, old, silenced):
            net.train(mode == "train")
        with torch.no_grad():
            stream, stream_old = model.stem(x), old.stem(x)
            keep = [c for c in range(64) if c != s]
            torch.testing.assert_close(stream[:, keep], stream_old[:, keep], rtol=0, atol=0)
            assert (stream[:, s] > 0).any()  # the new unit is alive
            branch = model.blocks[0].conv1(stream)
            reference = silenced.blocks[0].conv1(silenced.stem(x))
            torch.testing.assert_close(branch, reference, rtol=1e-12, atol=1e-12)


def _resnet_sgd(model, opt, generator, steps, size=16):
    device = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(8, 3, size, size, generator=generator).to(device)
        y = torch.randint(0, 10, (8,), generator=generator).to(device)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _unit_gradients(layer, i):
    """|gradient| of the unit's incoming weights and of its BatchNorm scale and shift."""
    norm = [t for t, _ in layer.norm if t.requires_grad]
    return [layer.weight.grad[i].abs().sum()] + [t.grad[i].abs() for t in norm]


@pytest.mark.parametrize("device", DEVICES)
def test_resnet_stem_replacement_starts_alive_and_learns(device):
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(0)
    model = ResNet18(num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cbp = ContinualBackprop(model, opt, replacement_rate=0.0, maturity_threshold=0)
    _resnet_sgd(model, opt, g, 1)
    cbp.to_replace = [1.0] + [0.0] * 16
    assert cbp.step() == 1
    (s,) = torch.nonzero(cbp.birth[0][0] == 1).flatten().tolist()
    stem = cbp.layers[0]
    before = [t[s].clone() for t in (stem.weight, model.stem[1].weight, model.stem[1].bias)]
    for _ in range(3):
        _resnet_sgd(model, opt, g, 1)
        # from the first step on the new unit gets a gradient (through the identity shortcut)
        assert all(v > 0 for v in _unit_gradients(stem, s))
    after = [t[s] for t in (stem.weight, model.stem[1].weight, model.stem[1].bias)]
    assert all(not torch.equal(a, b) for a, b in zip(after, before))
    assert (model.blocks[0].conv1.weight[:, s] != 0).any()  # its consumer learned to read it
    h = cbp._recorder.latest()[0]
    assert (h[:, s] > 0).any()


@pytest.mark.parametrize("device", DEVICES)
def test_resnet_every_unit_layer_replaced_units_learn_and_stay_while_immature(device):
    """All 17 unit layers: a replaced unit's output and the gradients of its incoming weights
    and BatchNorm affine pair are non-zero after a few SGD steps; and with one replacement per
    layer at every step, no unit is chosen again while its age is <= the maturity threshold.
    (The conv bias before a BatchNorm gets no gradient in training mode, for any channel: the
    BatchNorm subtracts the batch mean.)"""
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(1)
    model = ResNet18(num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    m = 3
    cbp = ContinualBackprop(model, opt, replacement_rate=0.0, maturity_threshold=m)
    assert [layer.name for layer in cbp.layers][:3] == ["stem", "block0.conv1", "block0.conv2"]
    _resnet_sgd(model, opt, g, m + 1)
    for _ in range(m + 1):
        cbp.step()  # ages reach m + 1: every unit is eligible
    cbp.to_replace = [1.0] * 17
    assert cbp.step() == 17
    born = cbp.steps
    new = [int(torch.nonzero(b[0] == born).flatten()) for b in cbp.birth]
    _resnet_sgd(model, opt, g, 3)
    h = cbp._recorder.latest()
    for i, (layer, unit) in enumerate(zip(cbp.layers, new)):
        assert (h[i][:, unit] != 0).any(), layer.name
        assert all(v > 0 for v in _unit_gradients(layer, unit)), layer.name

    # one replacement per layer per step: the units born in the last m steps are never picked
    for _ in range(2 * m + 2):
        previous = [b.clone() for b in cbp.birth]
        cbp.to_replace = [1.0] * 17
        assert cbp.step() == 17
        for i, b in enumerate(cbp.birth):
            (picked,) = torch.nonzero(b[0] == cbp.steps).flatten().tolist()
            age = cbp.steps - int(previous[i][0, picked])
            assert age > m, (cbp.layers[i].name, age)
        _resnet_sgd(model, opt, g, 1)


def stacked_layers(params, seed_dims):
    W1, b1, W2, b2, W3 = params
    return [
        UnitLayer(W1, b1, out_weight=W2, seed_dims=seed_dims, name="h1"),
        UnitLayer(W2, b2, out_weight=W3, seed_dims=seed_dims, name="h2"),
    ]


def forward(params, x):
    W1, b1, W2, b2, W3 = params
    h1 = torch.relu(x @ W1.transpose(-1, -2) + b1.unsqueeze(-2))
    h2 = torch.relu(h1 @ W2.transpose(-1, -2) + b2.unsqueeze(-2))
    return h2 @ W3.transpose(-1, -2), [h1, h2]


@pytest.mark.parametrize("utility", ["contribution", "adaptable_contribution"])
def test_stacked_seeds_equal_single_networks(utility):
    S, seeds = 3, [11, 12, 13]
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (6,), (5, 6), (5,), (2, 5)]
    stacked = [
        torch.randn(S, *s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes
    ]
    singles = [[p[s].detach().clone().requires_grad_() for p in stacked] for s in range(S)]
    kw = dict(replacement_rate=0.05, maturity_threshold=4, decay_rate=0.9, utility=utility)

    cbp_stacked = ContinualBackprop(stacked_layers(stacked, 1), None, seed=seeds, **kw)
    cbp_single = [
        ContinualBackprop(stacked_layers(singles[s], 0), None, seed=seeds[s], **kw)
        for s in range(S)
    ]
    for _ in range(60):
        x = torch.randn(S, 8, 4, generator=g, dtype=torch.float64)
        y = torch.randn(S, 8, 2, generator=g, dtype=torch.float64)
        for params, cbp, xs, ys in [(stacked, cbp_stacked, x, y)] + [
            (singles[s], cbp_single[s], x[s], y[s]) for s in range(S)
        ]:
            out, hs = forward(params, xs)
            loss = (out - ys).pow(2).sum()
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, gr in zip(params, grads):
                    p -= 0.01 * gr
            cbp.step([h.detach() for h in hs])
    assert cbp_stacked.num_replaced > 5
    for s in range(S):
        assert cbp_single[s].num_replaced == cbp_stacked.num_replaced
        for p_stacked, p_single in zip(stacked, singles[s]):
            # bmm and mm sum in different orders: float64 rounding, nothing more
            torch.testing.assert_close(p_stacked[s], p_single, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(replacement_rate=-0.1),
        dict(replacement_rate=1.5),
        dict(maturity_threshold=-1),
        dict(decay_rate=1.0),
        dict(utility="magic"),
        dict(init="orthogonal"),
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ContinualBackprop(mlp([2, 3, 1]), None, **kwargs)


def test_state_dict_round_trip_continues_identically():
    def run(split):
        net = mlp([3, 8, 2], seed=4)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        cbp = ContinualBackprop(net, opt, replacement_rate=0.05, maturity_threshold=2, seed=7)
        g = torch.Generator().manual_seed(9)
        for t in range(40):
            if t == split:
                state = copy.deepcopy((net.state_dict(), opt.state_dict(), cbp.state_dict()))
                net = mlp([3, 8, 2], seed=99)
                opt = torch.optim.Adam(net.parameters(), lr=1e-2)
                cbp = ContinualBackprop(
                    net, opt, replacement_rate=0.05, maturity_threshold=2, seed=0
                )
                net.load_state_dict(state[0])
                opt.load_state_dict(state[1])
                cbp.load_state_dict(state[2])
            sgd_step(
                net,
                opt,
                torch.randn(4, 3, generator=g, dtype=torch.float64),
                torch.zeros(4, 2, dtype=torch.float64),
            )
            cbp.step()
        return net, cbp

    a, ca = run(split=-1)
    b, cb = run(split=23)
    assert ca.num_replaced == cb.num_replaced > 0
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def given_magnitudes(params):
    """(sum_k |w_out[k, i]|, sum_j |w_in[i, j]|) per hidden layer, computed independently."""
    W1, _, W2, _, W3 = (p.detach() for p in params)
    return [
        (W2.abs().sum(-2), W1.abs().sum(-1)),
        (W3.abs().sum(-2), W2.abs().sum(-1)),
    ]


@pytest.mark.parametrize("utility", ["contribution", "adaptable_contribution"])
@pytest.mark.parametrize("seed_dims", [0, 1])
@pytest.mark.parametrize("kernel,given", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("fold_bias", [False, True])
@pytest.mark.parametrize("decay_rate", [0.9, 0.0])
def test_cpu_kernels_and_given_magnitudes_equal_tensor_ops(
    utility, seed_dims, kernel, given, fold_bias, decay_rate
):
    # against the tensor-op path that reads the weights (the path on GPUs): the fused CPU
    # kernel and/or the trainer's magnitudes (here computed independently) give the same
    # utilities and the same replacements
    g = torch.Generator().manual_seed(3)
    shapes = [(6, 4), (6,), (5, 6), (5,), (2, 5)]
    lead = (2,) if seed_dims else ()
    params = [torch.randn(*lead, *s, generator=g, dtype=torch.float64) for s in shapes]
    runs = []
    for use_kernel, use_given in ((False, False), (kernel, given)):
        ps = [p.clone() for p in params]
        cbp = ContinualBackprop(
            stacked_layers(ps, seed_dims),
            None,
            replacement_rate=0.05,
            maturity_threshold=4,
            decay_rate=decay_rate,
            utility=utility,
            fold_bias=fold_bias,
            seed=[5, 6] if seed_dims else 5,
        )
        assert cbp._kernel_state is not None  # CPU, Linear layers
        if not use_kernel:
            cbp._kernel_state = None
        runs.append((ps, cbp, use_given))
    data = torch.Generator().manual_seed(4)
    for _ in range(40):
        x = torch.randn(*lead, 3, 4, generator=data, dtype=torch.float64)
        for ps, cbp, use_given in runs:
            with torch.no_grad():
                for p in ps:
                    p.mul_(0.99)  # stands in for an optimizer step
                _, hs = forward(ps, x)
            cbp.step(hs, given_magnitudes(ps) if use_given else None)
    (p_ref, cbp_ref, _), (p_other, cbp_other, _) = runs
    assert cbp_ref.num_replaced > 5 and cbp_other.num_replaced == cbp_ref.num_replaced
    for a, b in zip(cbp_ref.utility, cbp_other.utility):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    for a, b in zip(p_ref, p_other):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_magnitudes_of_the_wrong_shape_are_refused():
    params = [torch.randn(*s, dtype=torch.float64) for s in [(6, 4), (6,), (5, 6), (5,), (2, 5)]]
    cbp = ContinualBackprop(stacked_layers(params, 0), None)
    _, hs = forward(params, torch.randn(3, 4, dtype=torch.float64))
    good = given_magnitudes(params)
    with pytest.raises(ValueError, match="magnitudes"):
        cbp.step(hs, good[:1])
    with pytest.raises(ValueError, match="h2"):
        cbp.step(hs, [good[0], (good[1][0][:3], good[1][1])])


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv", "conv_flatten"])
def test_unit_magnitudes_match_definition(kind, contiguous):
    # out_magnitude: sum of |outgoing weights| per unit (all consumer units, taps, positions);
    # the consumer's in_magnitude reuses that pass: mean |incoming weight| per consumer unit
    g = torch.Generator().manual_seed(7)
    shapes = {
        "linear": ((5, 3), (4, 5), 1),
        "conv": ((5, 3, 3, 3), (4, 5, 3, 3), 1),
        "conv_flatten": ((5, 3, 3, 3), (4, 5 * 6), 6),
    }
    w_shape, out_shape, group = shapes[kind]
    weight = torch.randn(w_shape, generator=g, dtype=torch.float64)
    out_weight = torch.randn(out_shape, generator=g, dtype=torch.float64)
    if not contiguous:  # a strided view takes the tensor-op path
        out_weight = torch.randn(*out_shape[:-1], 2 * out_shape[-1], dtype=torch.float64)[..., ::2]
        out_weight.copy_(torch.randn(out_shape, generator=g, dtype=torch.float64))
    layer = UnitLayer(weight, out_weight=out_weight, out_group=group)
    consumer = UnitLayer(out_weight)
    a = out_weight.abs().numpy()
    if kind == "linear":
        expected = a.sum(0)
    elif kind == "conv":
        expected = a.sum(axis=(0, 2, 3))
    else:
        expected = a.sum(0).reshape(5, 6).sum(1)
    np.testing.assert_allclose(layer.out_magnitude()[0].numpy(), expected, rtol=1e-12)
    expected_in = a.reshape(a.shape[0], -1).mean(1)
    np.testing.assert_allclose(consumer.in_magnitude(layer)[0].numpy(), expected_in, rtol=1e-12)
    np.testing.assert_allclose(consumer.in_magnitude()[0].numpy(), expected_in, rtol=1e-12)


class ReferenceCBP:
    """Algorithm 1 layer by layer in float64, written out plainly: the per-layer definition that
    the whole-network update must reproduce (same generators, so the same fresh weights)."""

    def __init__(self, layers, rate, maturity, eta, utility, seed):
        self.layers, self.rate, self.m, self.eta, self.kind = layers, rate, maturity, eta, utility
        S = layers[0].num_seeds
        self.u = [torch.zeros(S, layer.units, dtype=torch.float64) for layer in layers]
        self.f = [torch.zeros(S, layer.units, dtype=torch.float64) for layer in layers]
        self.birth = [torch.zeros(S, layer.units, dtype=torch.int64) for layer in layers]
        self.count = [0.0] * len(layers)
        self.steps = 0
        seeds = [seed] if isinstance(seed, int) else seed
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]

    def step(self, hs):
        from ppo_cbp.nets.units import replace_units_

        self.steps += 1
        eta = self.eta
        for i, (layer, h) in enumerate(zip(self.layers, hs)):
            h = layer.seeded(h)
            dims = (1,) if h.dim() == 3 else (1, 3, 4)
            age = (self.steps - self.birth[i]).double()
            corr = 1 - eta**age
            if self.kind == "adaptable_contribution":
                self.f[i] = eta * self.f[i] + (1 - eta) * h.mean(dims)
                shape = (h.shape[0], 1, -1) if h.dim() == 3 else (h.shape[0], 1, -1, 1, 1)
                act = (h - (self.f[i] / corr).view(shape)).abs().mean(dims)
                w_in = layer.seeded(layer.weight)
                act = act / w_in.abs().reshape(*w_in.shape[:2], -1).mean(-1)
            else:
                act = h.abs().mean(dims)
            if layer.out_weight is not None:
                w = layer.seeded(layer.out_weight).abs()
                if w.dim() == 3:
                    out = w.sum(1).view(w.shape[0], layer.units, -1).sum(-1)
                else:
                    out = w.sum((1, 3, 4))
                act = act * out
            self.u[i] = eta * self.u[i] + (1 - eta) * act
            eligible = int((age[0] > self.m).sum())
            self.count[i] += self.rate * eligible
            k = min(int(self.count[i] + 1e-9), eligible)
            if k == 0:
                continue
            self.count[i] -= k
            score = (self.u[i] / corr).masked_fill(age <= self.m, float("inf"))
            index = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
            replace_units_(layer, index, self.gens)
            for t in (self.u[i], self.f[i]):
                t.scatter_(1, index, 0.0)
            self.birth[i].scatter_(1, index, self.steps)


def conv_params(g, lead):
    shapes = [(4, 2, 3, 3), (4,), (5, 4, 3, 3), (5,), (6, 5 * 4), (6,), (3, 6)]
    return [torch.randn(*lead, *s, generator=g, dtype=torch.float64) for s in shapes]


def conv_layers(params, seed_dims):
    K1, c1, K2, c2, W3, b3, W4 = params
    return [
        UnitLayer(K1, c1, out_weight=K2, seed_dims=seed_dims, name="conv1"),
        UnitLayer(K2, c2, out_weight=W3, out_group=4, seed_dims=seed_dims, name="conv2"),
        UnitLayer(W3, b3, out_weight=W4, seed_dims=seed_dims, name="fc"),
    ]


def conv_forward(params, x, seed_dims):
    """x: [*seed, B, 2, 6, 6]; conv 3x3 -> relu -> conv 3x3 (padding 1 -> 4x4 -> pool 2x2) ..."""
    import torch.nn.functional as F

    K1, c1, K2, c2, W3, b3, W4 = params
    if seed_dims:
        alone = [conv_forward([p[s] for p in params], x[s], 0) for s in range(x.shape[0])]
        return [torch.stack(z) for z in zip(*alone)]
    h1 = torch.relu(F.conv2d(x, K1, c1))  # 4x4
    h2 = F.max_pool2d(torch.tanh(F.conv2d(h1, K2, c2, padding=1)), 2)  # 2x2
    h3 = torch.relu(h2.flatten(1) @ W3.T + b3)
    return h1, h2, h3


@pytest.mark.parametrize("utility", ["contribution", "adaptable_contribution"])
@pytest.mark.parametrize("seed_dims", [0, 1])
@pytest.mark.parametrize("eta", [0.9, 0.0])
def test_whole_network_update_equals_per_layer_reference(utility, seed_dims, eta):
    # conv, conv -> flatten -> Linear and Linear layers; replacements in every layer over 120
    # steps; the one-op-per-quantity update runs on the steps that replace nothing (with
    # eta = 0 nothing runs there: only the replacing steps' utilities are compared)
    g = torch.Generator().manual_seed(11)
    lead = (3,) if seed_dims else ()
    params = conv_params(g, lead)
    seeds = [4, 5, 6] if seed_dims else 4
    kw = dict(replacement_rate=0.02, maturity_threshold=5, decay_rate=eta, utility=utility)
    ours_p = [p.clone() for p in params]
    ref_p = [p.clone() for p in params]
    cbp = ContinualBackprop(conv_layers(ours_p, seed_dims), None, seed=seeds, **kw)
    ref = ReferenceCBP(conv_layers(ref_p, seed_dims), 0.02, 5, eta, utility, seeds)
    assert cbp._kernel_state is None  # conv layers: the tensor-op path
    data = torch.Generator().manual_seed(12)
    fused_steps = 0
    for _ in range(120):
        x = torch.randn(*lead, 7, 2, 6, 6, generator=data, dtype=torch.float64)
        for ps in (ours_p, ref_p):
            with torch.no_grad():
                for p in ps:
                    p.mul_(0.995)  # stands in for an optimizer step
        before = cbp.num_replaced
        cbp.step(conv_forward(ours_p, x, seed_dims))
        ref.step(conv_forward(ref_p, x, seed_dims))
        fused_steps += cbp.num_replaced == before
        for i in range(3):
            assert torch.equal(cbp.birth[i], ref.birth[i])
            if eta == 0 and not (ref.birth[i] == ref.steps).any():
                continue
            # to 1e-12 of the layer's largest value: |h - hhat| cancels where h is close to hhat
            scale = float(ref.u[i].abs().max())
            torch.testing.assert_close(cbp.utility[i], ref.u[i], rtol=1e-12, atol=1e-12 * scale)
            if utility == "adaptable_contribution":
                scale = float(ref.f[i].abs().max())
                torch.testing.assert_close(
                    cbp.mean_activation[i], ref.f[i], rtol=1e-12, atol=1e-12 * scale
                )
        for a, b in zip(ours_p, ref_p):
            assert torch.equal(a, b)  # the same units replaced with the same fresh weights
    assert cbp.num_replaced >= 10 and fused_steps >= 60
    assert cbp.to_replace == pytest.approx(ref.count, abs=1e-12)


@pytest.mark.parametrize("utility", ["contribution", "adaptable_contribution"])
def test_whole_network_update_state_dict_round_trip_is_exact(utility):
    def run(split):
        g = torch.Generator().manual_seed(3)
        params = conv_params(g, ())
        kw = dict(replacement_rate=0.02, maturity_threshold=5, decay_rate=0.9, utility=utility)
        cbp = ContinualBackprop(conv_layers(params, 0), None, seed=1, **kw)
        data = torch.Generator().manual_seed(4)
        for t in range(80):
            if t == split:
                state = copy.deepcopy(cbp.state_dict())
                cbp = ContinualBackprop(conv_layers(params, 0), None, seed=99, **kw)
                cbp.load_state_dict(state)
            with torch.no_grad():
                for p in params:
                    p.mul_(0.995)
            x = torch.randn(7, 2, 6, 6, generator=data, dtype=torch.float64)
            cbp.step(conv_forward(params, x, 0))
        return params, cbp

    (pa, ca), (pb, cb) = run(-1), run(37)
    assert ca.num_replaced == cb.num_replaced > 0
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    for a, b in zip(ca.utility + ca.birth, cb.utility + cb.birth):
        assert torch.equal(a, b)
