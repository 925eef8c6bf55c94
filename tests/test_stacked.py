"""The fused stacked-seed MLP trainer against autograd + torch.optim, in float64."""

import pytest
import torch
import torch.nn.functional as F

from ppo_cbp.init import distribution
from ppo_cbp.nets.activations import LEAKY_RELU_SLOPE
from ppo_cbp.nets.stacked_mlp import ACTIVATIONS, StackedMLP, StackedTrainer
from ppo_cbp.plasticity.cbp import ContinualBackprop
from ppo_cbp.plasticity.redo import ReDo
from ppo_cbp.seeding import TAG_DROPOUT, TAG_NOISE, derive_seed

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
F64 = torch.float64

ACT_FN = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
    "leaky_relu": lambda z: F.leaky_relu(z, LEAKY_RELU_SLOPE),
    "swish": F.silu,
    "linear": lambda z: z,
}


def reference_params(net, s):
    """Seed s's weights and biases as separate autograd leaves."""
    out = []
    for i in range(len(net.params)):
        out.append(net.weight(i)[s].detach().clone().requires_grad_())
        out.append(net.bias(i)[s].detach().clone().requires_grad_())
    return out


def reference_forward(params, x, act, masks=None):
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        z = h @ params[2 * i].T + params[2 * i + 1]
        if i < n_layers - 1:
            h = ACT_FN[act](z)
            if masks is not None:
                h = h * masks[i]
        else:
            h = z
    return h


def data(S, B, n_in, n_out, loss, g, steps):
    xs = torch.rand(steps, S, B, n_in, generator=g, dtype=F64)
    if loss == "cross_entropy":
        ys = torch.randint(0, n_out, (steps, S, B), generator=g)
    else:
        ys = torch.randn(steps, S, B, n_out, generator=g, dtype=F64)
    return xs, ys


def ref_loss(out, y, loss):
    if loss == "cross_entropy":
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


@pytest.mark.parametrize("device", DEVICES)
def test_init_per_seed_and_kaiming_bounds(device):
    sizes = [7, 6, 5, 3]
    stack = StackedMLP(sizes, [3, 9, 4], device=device, dtype=F64)
    alone = StackedMLP(sizes, [9], device=device, dtype=F64)
    for p_stack, p_alone in zip(stack.params, alone.params):
        torch.testing.assert_close(p_stack[1], p_alone[0], rtol=0, atol=0)
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        _, bound = distribution("kaiming_uniform", "relu" if i < 2 else "linear", n_in, n_out)
        w = stack.weight(i)
        assert w.abs().max() <= bound and w.abs().max() > 0.7 * bound
        assert torch.all(stack.bias(i) == 0)
    assert not torch.equal(stack.params[0][0], stack.params[0][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize(
    "loss,optimizer,wd,batch",
    [
        ("cross_entropy", "sgd", 0.0, 1),
        ("cross_entropy", "sgd", 0.01, 3),
        ("squared_error", "sgd", 0.001, 1),
        ("squared_error", "adam", 0.01, 2),
        ("cross_entropy", "adam", 0.0, 1),
    ],
)
def test_step_matches_autograd_and_torch_optim(device, act, loss, optimizer, wd, batch):
    S, sizes, lr = 2, [5, 4, 3, 3], 0.05 if optimizer == "sgd" else 0.01
    net = StackedMLP(sizes, [1, 2], activation=act, device=device, dtype=F64)
    refs = [reference_params(net, s) for s in range(S)]
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opts = [opt_cls(p, lr=lr, weight_decay=wd) for p in refs]
    trainer = StackedTrainer(net, loss=loss, optimizer=optimizer, lr=lr, weight_decay=wd)
    xs, ys = data(S, batch, sizes[0], sizes[-1], loss, torch.Generator().manual_seed(0), 6)
    xs, ys = xs.to(device), ys.to(device)
    for x, y in zip(xs, ys):
        out = torch.empty(S, batch, sizes[-1], dtype=F64, device=device)
        hidden = trainer.step(net.with_ones(x), y, out=out)
        for s in range(S):
            ref_out = reference_forward(refs[s], x[s], act)
            torch.testing.assert_close(out[s], ref_out.detach(), rtol=1e-12, atol=1e-12)
            ref_h = ACT_FN[act](x[s] @ refs[s][0].T + refs[s][1]).detach()
            opts[s].zero_grad()
            ref_loss(ref_out, y[s], loss).backward()
            opts[s].step()
            torch.testing.assert_close(hidden[0][s], ref_h, rtol=1e-12, atol=1e-12)
    for s in range(S):
        for i in range(len(net.params)):
            torch.testing.assert_close(
                net.weight(i)[s], refs[s][2 * i].detach(), rtol=1e-10, atol=1e-12
            )
            torch.testing.assert_close(
                net.bias(i)[s], refs[s][2 * i + 1].detach(), rtol=1e-10, atol=1e-12
            )


def test_dropout_and_perturb_match_reference_with_the_seed_generators():
    sizes, p, lr, noise_std, wd, chunk = [6, 5, 4, 3], 0.3, 0.05, 0.01, 0.001, 4
    seed = 5
    net = StackedMLP(sizes, [seed], dtype=F64)
    ref = reference_params(net, 0)
    opt = torch.optim.SGD(ref, lr=lr, weight_decay=wd)
    trainer = StackedTrainer(
        net, lr=lr, weight_decay=wd, noise_std=noise_std, dropout=p, dropout_chunk=chunk
    )
    g_drop = torch.Generator().manual_seed(derive_seed(seed, TAG_DROPOUT))
    g_noise = torch.Generator().manual_seed(derive_seed(seed, TAG_NOISE))
    total = sum(w.numel() for w in ref)
    xs, ys = data(1, 1, sizes[0], sizes[-1], "cross_entropy", torch.Generator().manual_seed(1), 10)
    for t, (x, y) in enumerate(zip(xs, ys)):
        if t % chunk == 0:
            u = torch.rand(chunk, 9, generator=g_drop, dtype=F64)
        keep = (u[t % chunk] >= p).to(F64) / (1 - p)
        masks = [keep[:5], keep[5:]]
        trainer.step(net.with_ones(x), y)
        opt.zero_grad()
        F.cross_entropy(reference_forward(ref, x[0], "relu", masks), y[0]).backward()
        opt.step()
        noise = torch.randn(total, generator=g_noise, dtype=F64)
        # the noise vector covers each layer's [out, in + 1] block (weights, then bias column)
        offset = 0
        with torch.no_grad():
            for i in range(3):
                w, b = ref[2 * i], ref[2 * i + 1]
                n = w.numel() + b.numel()
                block = noise[offset : offset + n].view(w.shape[0], w.shape[1] + 1)
                w += noise_std * block[:, :-1]
                b += noise_std * block[:, -1]
                offset += n
    for i in range(3):
        torch.testing.assert_close(net.weight(i)[0], ref[2 * i].detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(net.bias(i)[0], ref[2 * i + 1].detach(), rtol=1e-10, atol=1e-12)


def run_stack(seeds, method, steps=80):
    """Train a stack with ``method`` on seed-dependent data; returns (net, operator)."""
    sizes = [6, 8, 8, 3]
    net = StackedMLP(sizes, seeds, dtype=F64)
    kw = dict(lr=0.1)
    if method == "adam+cbp":
        kw = dict(optimizer="adam", lr=0.01)
    if method == "snp":
        kw.update(weight_decay=0.01, noise_std=0.01)
    if method == "dropout":
        kw.update(dropout=0.2, dropout_chunk=16)
    trainer = StackedTrainer(net, **kw)
    op = None
    if method in ("cbp", "adam+cbp"):
        op = ContinualBackprop(
            trainer.unit_layers(),
            trainer.state_tensors,
            replacement_rate=0.02,
            maturity_threshold=5,
            utility="adaptable_contribution",
            seed=seeds,
        )
    elif method == "redo":
        op = ReDo(trainer.unit_layers(), trainer.state_tensors, threshold=0.5, period=7, seed=seeds)
    gens = [torch.Generator().manual_seed(100 + s) for s in seeds]
    for _ in range(steps):
        x = torch.stack([torch.rand(1, 6, generator=g, dtype=F64) for g in gens])
        y = torch.stack([torch.randint(0, 3, (1,), generator=g) for g in gens])
        hidden = trainer.step(net.with_ones(x), y)
        if op is not None:
            op.step(hidden)
    return net, op


@pytest.mark.parametrize("method", ["bp", "snp", "dropout", "cbp", "adam+cbp", "redo"])
def test_batched_equals_single(method):
    seeds = [4, 7, 11]
    stack, op = run_stack(seeds, method)
    if method in ("cbp", "adam+cbp"):
        assert op.num_replaced > 3
    if method == "redo":
        assert int(op.replaced.sum()) > 0
    for s, seed in enumerate(seeds):
        alone, _ = run_stack([seed], method)
        for p_stack, p_alone in zip(stack.params, alone.params):
            torch.testing.assert_close(p_stack[s], p_alone[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss="hinge"),
        dict(optimizer="rmsprop"),
        dict(lr=-0.1),
        dict(weight_decay=-1.0),
        dict(noise_std=-1e-5),
        dict(dropout=1.0),
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        StackedTrainer(StackedMLP([2, 3, 2], [0]), **kwargs)
    with pytest.raises(ValueError):
        StackedMLP([2, 3, 2], [0], activation="gelu2")


@pytest.mark.parametrize("device", DEVICES)
def test_magnitudes_are_those_of_the_updated_weights(device):
    sizes = [5, 7, 6, 3]
    net = StackedMLP(sizes, [1, 2], device=device, dtype=F64)
    trainer = StackedTrainer(net, lr=0.1, weight_decay=0.01)
    xs, ys = data(2, 1, sizes[0], sizes[-1], "cross_entropy", torch.Generator().manual_seed(3), 3)
    for x, y in zip(xs.to(device), ys.to(device)):
        trainer.step(net.with_ones(x), y)
        if device != "cpu":  # the fused kernel is CPU-only; elsewhere CBP reads the weights
            assert trainer.magnitudes is None
            return
        for i, (out_abs, in_abs) in enumerate(trainer.magnitudes):
            torch.testing.assert_close(out_abs, net.weight(i + 1).abs().sum(1), rtol=1e-12, atol=0)
            torch.testing.assert_close(in_abs, net.weight(i).abs().sum(2), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "kwargs,batch",
    [(dict(optimizer="adam"), 1), (dict(noise_std=0.01), 1), ({}, 2)],
)
def test_no_magnitudes_where_the_step_is_not_fused(kwargs, batch):
    # Adam, perturbation after the update and minibatches: CBP reads the weights itself
    net = StackedMLP([4, 5, 2], [0], dtype=F64)
    trainer = StackedTrainer(net, lr=0.01, **kwargs)
    xs, ys = data(1, batch, 4, 2, "cross_entropy", torch.Generator().manual_seed(0), 1)
    trainer.step(net.with_ones(xs[0]), ys[0])
    assert trainer.magnitudes is None
