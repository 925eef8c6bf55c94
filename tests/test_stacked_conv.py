"""Stacked seeds of the Continual ImageNet ConvNet: the stacked network against each network
alone, the stacked learner against one ModuleLearner per seed, and a stacked run against one
run per seed (weights, metrics and CSV rows), all in float64."""

import copy

import numpy as np
import pytest
import torch
from reference_learner import ModuleLearner
from stacked_runs import TOL, assert_stacked_run_equals_runs_alone, checkpoint, read_rows
from torch import nn

from ppo_cbp.benchmarks.continual_imagenet import (
    DEFAULTS,
    ContinualImageNetConfig,
    ImageNetMethodConfig,
    StackedLearner,
    build_imagenet_learner,
    imagenet_convnet,
    linear_network,
    reset_head_,
    resolve_module_method,
    run_continual_imagenet,
)
from ppo_cbp.nets.stacked_sequential import StackedSequential
from ppo_cbp.nets.units import hidden_activations
from ppo_cbp.seeding import TAG_INIT, derive_seed

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
F64 = torch.float64

# every method with settings under which it acts within a few steps of tiny tasks
METHODS = {
    "bp": {},
    "l2": dict(weight_decay=1e-2),
    "snp": dict(weight_decay=1e-2, noise_std=1e-2),
    "cbp": dict(replacement_rate=0.02, maturity_threshold=2),
    "redo": dict(redo_threshold=0.5, redo_period=3),
    "linear": {},
}


def method_config(name):
    return ImageNetMethodConfig(method=name, **METHODS[name])


def resolved(name):
    return resolve_module_method(method_config(name), DEFAULTS, {"linear": "bp"})


def seed_net(method, seed):
    """Seed ``seed``'s network as the run builds it alone."""
    g = torch.Generator().manual_seed(derive_seed(seed, TAG_INIT))
    return linear_network(2, g) if method == "linear" else imagenet_convnet(2, g)


# ----------------------------------------------------------------------------------------
# The stacked network


def small_net(seed):
    """Padding, stride, average pooling, a conv without bias and a Tanh: the general paths."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 5, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 3 * 3, 6),
        nn.ReLU(),
        nn.Linear(6, 3, bias=False),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build", ["convnet", "linear", "small"])
def test_stacked_network_equals_each_network_alone(build, device):
    make = {
        "convnet": lambda s: imagenet_convnet(2, torch.Generator().manual_seed(s)),
        "linear": lambda s: linear_network(2, torch.Generator().manual_seed(s)),
        "small": lambda s: small_net(s),
    }[build]
    size = 14 if build == "small" else 32
    nets = [make(s).to(device, F64) for s in range(3)]
    stacked = StackedSequential(nets)
    x = torch.randn(5, 3, 3, size, size, dtype=F64, device=device)
    out, hidden = stacked(x)
    layers = stacked.unit_layers("torch_default")
    assert len(hidden) == len(layers) == {"convnet": 5, "linear": 0, "small": 3}[build]
    for s, net in enumerate(nets):
        torch.testing.assert_close(out[s], net(x[:, s]), rtol=1e-12, atol=1e-12)
        params = list(net.parameters())
        assert [tuple(p.shape) for p in params] == [tuple(p.shape[1:]) for p in stacked.params]
        for p, q in zip(params, stacked.params):
            assert torch.equal(q[s], p)
        if hidden:
            for h, ref in zip(hidden, hidden_activations(net, x[:, s])):
                torch.testing.assert_close(h[s], ref, rtol=1e-12, atol=1e-12)
    # the unit layers are the stacked parameters themselves (CBP writes into the network)
    for layer, (a, b) in zip(layers, zip(stacked.weights(), stacked.weights()[1:])):
        assert layer.weight is a and layer.out_weight is b and layer.seed_dims == 1
        assert layer.units == a.shape[1]
    if build == "convnet":
        assert layers[2].out_group == 4 and [u.units for u in layers] == [32, 64, 128, 128, 128]


def test_stacked_network_rejects_what_it_cannot_stack():
    with pytest.raises(ValueError, match="same architecture"):
        StackedSequential([small_net(0), imagenet_convnet(2)])
    with pytest.raises(ValueError, match="unsupported module BatchNorm2d"):
        StackedSequential([nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))])
    with pytest.raises(ValueError, match="unsupported module Dropout"):
        StackedSequential([nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2))])
    with pytest.raises(ValueError, match="unsupported convolution"):
        StackedSequential(
            [nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))]
        )
    with pytest.raises(ValueError, match="end in a Linear"):
        StackedSequential([nn.Sequential(nn.Linear(3, 4), nn.ReLU())])


# ----------------------------------------------------------------------------------------
# The stacked learner against one ModuleLearner per seed


def reset_alone_(learner: ModuleLearner) -> None:
    head = learner.net[-1]
    with torch.no_grad():
        for p in (head.weight, head.bias):
            p.zero_()
            buf = learner.momentum_buffer(p)
            if buf is not None:
                buf.zero_()


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
def test_stacked_learner_equals_module_learner_per_seed(method, device):
    """Seeds 3, 5, 8 stacked follow the trajectories of three ModuleLearners (plain
    nn.Sequential, torch SGD, hooked CBP/ReDo, perturb_) fed the same minibatches, through
    replacements, noise and a head reset."""
    device = torch.device(device)
    seeds = [3, 5, 8]
    r = resolved(method)
    stacked = build_imagenet_learner(r, seeds, 0.9, device, F64)
    alone = [
        ModuleLearner(
            seed_net(method, s).to(F64),
            r,
            seed=s,
            momentum=0.9,
            init="torch_default",
            device=device,
        )
        for s in seeds
    ]
    g = torch.Generator().manual_seed(0)
    B = 6
    for step in range(9):
        if step == 5:
            reset_head_(stacked)
            for learner in alone:
                reset_alone_(learner)
        x = torch.randn(B, 3, 3, 32, 32, generator=g, dtype=F64).to(device)
        y = torch.randint(0, 2, (3, B), generator=g).to(device)
        correct = stacked.step(x, y)
        for s, learner in enumerate(alone):
            assert correct[s].item() == learner.step(x[:, s], y[s]).item()
    for s, learner in enumerate(alone):
        for p, q in zip(learner.net.parameters(), stacked.net.parameters(), strict=True):
            torch.testing.assert_close(q[s], p, **TOL)
            torch.testing.assert_close(
                stacked.momentum_buffer(q)[s], learner.momentum_buffer(p), **TOL
            )
        if method == "cbp":
            for u, v in zip(stacked.cbp.utility, learner.cbp.utility):
                torch.testing.assert_close(u[s], v[0], **TOL)
            for u, v in zip(stacked.cbp.birth, learner.cbp.birth):
                assert torch.equal(u[s], v[0])
        if method == "redo":
            assert stacked.redo.replaced[s].item() == learner.redo.replaced[0].item()
        assert stacked.units_replaced()[s] == learner.units_replaced()
    if method in ("cbp", "redo"):
        assert min(stacked.units_replaced()) > 0  # the operator did replace units
    if method == "cbp":
        # replaced units were drawn from each seed's own generator: different per seed
        picked = [torch.nonzero(b[s] > 0).flatten() for b in stacked.cbp.birth for s in range(3)]
        assert len({tuple(p.tolist()) for p in picked}) > 1


# ----------------------------------------------------------------------------------------
# A stacked run against one run per seed


def write_imagenet(folder, classes=4, per_class=30, seed=0):
    """Per-class .npy layout (uint8 ``[n, 3, 32, 32]``), each class a colour plus noise."""
    rng = np.random.default_rng(seed)
    (folder / "classes").mkdir(parents=True)
    for k in range(classes):
        colour = rng.uniform(40, 215, 3)
        x = colour[None, :, None, None] + rng.normal(0, 25, (per_class, 3, 32, 32))
        np.save(folder / "classes" / f"{k}.npy", np.clip(x, 0, 255).astype(np.uint8))


def run_cfg(tmp_path, name, method, seeds, **kw):
    base = dict(
        seeds=seeds,
        method=method_config(method),
        tasks=3,
        epochs=2,
        batch_size=8,
        images_per_class=12,
        test_images_per_class=6,
        metric_examples=16,
        data_dir=tmp_path / "inet",
        out=tmp_path / name,
        device="cpu",
        dtype="float64",
        progress=False,
    )
    base.update(kw)
    return ContinualImageNetConfig(**base)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_stacked_run_equals_runs_alone(tmp_path, method):
    write_imagenet(tmp_path / "inet", classes=5)
    stacked_rows = assert_stacked_run_equals_runs_alone(
        run_continual_imagenet,
        lambda name, seeds: run_cfg(tmp_path, name, method, seeds),
        seeds=[0, 1, 2],
        rows_per_seed=3,
    )
    if method in ("cbp", "redo"):
        assert all(rows[-1]["units_replaced"] > 0 for rows in stacked_rows.values())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["snp", "cbp"])
def test_stacked_resume_is_exact(tmp_path, method):
    write_imagenet(tmp_path / "inet", classes=5)
    seeds = [4, 7]
    run_continual_imagenet(run_cfg(tmp_path, "full", method, seeds))
    part = run_cfg(tmp_path, "part", method, seeds)
    run_continual_imagenet(part, stop_after=1)
    assert [len(read_rows(part.out, s)) for s in seeds] == [1, 1]
    resumed = copy.deepcopy(part)
    resumed.resume = True
    run_continual_imagenet(resumed, stop_after=1)
    run_continual_imagenet(resumed)
    for s in seeds:
        assert read_rows(part.out, s) == read_rows(tmp_path / "full", s)
    full, done = checkpoint(tmp_path / "full")["learner"], checkpoint(part.out)["learner"]
    for name, p in full["net"].items():
        assert torch.equal(done["net"][name], p)


def test_stacked_learner_checks_its_networks():
    r = resolved("bp")
    with pytest.raises(ValueError, match="2 seeds need 2 networks, got 1"):
        StackedLearner(
            [seed_net("bp", 0)], r, seeds=[0, 1], momentum=0.9, init="torch_default", device="cpu"
        )
