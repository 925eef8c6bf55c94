"""``ppo_cbp.load_learner``: one seed's network of a supervised run computes exactly what that
seed's slice of the stacked network computes."""

from __future__ import annotations

import pytest
import torch
from test_supervised import scr_config

from ppo_cbp import load_learner
from ppo_cbp.benchmarks.common import MethodConfig
from ppo_cbp.benchmarks.scr import run_scr
from ppo_cbp.errors import UsageError
from ppo_cbp.nets.stacked_mlp import StackedMLP


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_a_seed_of_a_fused_scr_run_equals_its_slice(tmp_path, activation):
    cfg = scr_config(tmp_path, "scr", method=MethodConfig(method="bp"), seeds=[3, 5, 8])
    cfg.activation = activation
    run_scr(cfg)
    state = torch.load(cfg.out / "checkpoint.pt", weights_only=True)["learner"]["net"]
    stacked = StackedMLP(
        [cfg.n_inputs, cfg.hidden, 1], [3, 5, 8], activation=activation, dtype=torch.float64
    )
    stacked.load_state_dict(state)
    x = torch.randn(
        3, 7, cfg.n_inputs, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    expected, _ = stacked.forward(stacked.with_ones(x))
    for s, seed in enumerate([3, 5, 8]):
        net = load_learner(cfg.out, seed)
        assert isinstance(net, torch.nn.Module)
        with torch.no_grad():
            torch.testing.assert_close(net(x[s]), expected[s], rtol=1e-12, atol=1e-12)


def test_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_learner(tmp_path / "nowhere", 0)
    with pytest.raises(UsageError, match="holds no checkpoint"):
        load_learner(tmp_path, 0)
    cfg = scr_config(tmp_path, "scr", method=MethodConfig(method="bp"), seeds=[1])
    run_scr(cfg)
    with pytest.raises(UsageError, match="not one of the run's seeds"):
        load_learner(cfg.out, 2)
    inj = scr_config(tmp_path, "inj", method=MethodConfig(method="injection"), seeds=[1])
    run_scr(inj)
    with pytest.raises(UsageError, match="not covered yet"):
        load_learner(inj.out, 1)


@pytest.mark.parametrize("spec", ["cbp+layer_norm", "crelu+l2_init", "nap", "dff+layer_norm"])
def test_a_seed_of_a_fused_architectural_scr_run_equals_its_slice(tmp_path, spec):
    """LayerNorm, NaP, CReLU and DFF run on the fused trainer: the loaded network of each seed
    (``build_mlp``'s, the LayerNorm's gain and offset from the trainer's ``[S, 2, units]``)
    computes what the fused learner's stacked network computes for that seed."""
    from ppo_cbp.benchmarks.common import Learner, resolve_method
    from ppo_cbp.benchmarks.scr import DEFAULTS

    cfg = scr_config(tmp_path, "scr", method=MethodConfig(method=spec), seeds=[2, 7])
    run_scr(cfg)
    state = torch.load(cfg.out / "checkpoint.pt", weights_only=True)["learner"]
    assert "module" not in state
    method = resolve_method(MethodConfig(method=spec), DEFAULTS)
    learner = Learner(
        [cfg.n_inputs, cfg.hidden, 1], [2, 7], method, loss="squared_error",
        device=torch.device("cpu"), dtype=torch.float64,
    )  # fmt: skip
    learner.net.load_state_dict(state["net"])
    x = torch.randn(
        2, 5, cfg.n_inputs, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    expected, _ = learner.net.forward(learner.net.with_ones(x))
    for s, seed in enumerate([2, 7]):
        net = load_learner(cfg.out, seed)
        with torch.no_grad():
            torch.testing.assert_close(net(x[s]), expected[s], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", ["cbp+layer_norm", "crelu+l2_init"])
def test_a_seed_of_an_autograd_scr_run_equals_its_slice(tmp_path, monkeypatch, spec):
    """A run of these methods written by the autograd learner (before the fused trainer
    computed them): the loaded network of each seed computes what the learner's stacked
    network computes for that seed."""
    from ppo_cbp.benchmarks import autograd_learner
    from ppo_cbp.benchmarks.autograd_learner import AutogradLearner
    from ppo_cbp.benchmarks.common import resolve_method
    from ppo_cbp.benchmarks.scr import DEFAULTS

    monkeypatch.setattr(autograd_learner, "uses_fused_trainer", lambda method: False)
    cfg = scr_config(tmp_path, "scr", method=MethodConfig(method=spec), seeds=[2, 7])
    run_scr(cfg)
    state = torch.load(cfg.out / "checkpoint.pt", weights_only=True)["learner"]
    method = resolve_method(MethodConfig(method=spec), DEFAULTS)
    learner = AutogradLearner(
        [cfg.n_inputs, cfg.hidden, 1], [2, 7], method, loss="squared_error",
        device=torch.device("cpu"), dtype=torch.float64,
    )  # fmt: skip
    learner.module.load_state_dict(state["module"])
    x = torch.randn(
        2, 5, cfg.n_inputs, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected, _ = learner.module(x.transpose(0, 1))
    for s, seed in enumerate([2, 7]):
        net = load_learner(cfg.out, seed)
        with torch.no_grad():
            torch.testing.assert_close(net(x[s]), expected[s], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", ["imagenet", "cifar"])
def test_a_seed_of_a_conv_run_equals_its_slice(tmp_path, benchmark):
    """Continual ImageNet's ConvNet and CIFAR-100's ResNet-18: each seed's loaded network (in
    eval mode, BatchNorm's running statistics) computes the stacked network's slice."""
    from test_conv_benchmarks import cifar_cfg, imagenet_cfg, write_cifar, write_imagenet

    from ppo_cbp.benchmarks.continual_imagenet import (
        ImageNetMethodConfig,
        imagenet_convnet,
        run_continual_imagenet,
    )
    from ppo_cbp.benchmarks.conv_learner import stack_networks
    from ppo_cbp.benchmarks.incremental_cifar import (
        CIFARMethodConfig,
        build_resnet,
        run_incremental_cifar,
    )

    seeds = [0, 4]
    if benchmark == "imagenet":
        write_imagenet(tmp_path / "inet")
        cfg = imagenet_cfg(tmp_path, "run", seeds=seeds, tasks=1, epochs=1, dtype="float64")
        cfg.method = ImageNetMethodConfig(method="cbp")
        run_continual_imagenet(cfg)
        nets = [imagenet_convnet(2).double() for _ in seeds]
    else:
        write_cifar(tmp_path / "cifar" / "cifar-100-python", classes=(0, 1))
        cfg = cifar_cfg(tmp_path, "run", seeds=seeds, dtype="float64")
        cfg.method = CIFARMethodConfig(method="base")
        run_incremental_cifar(cfg)
        nets = [build_resnet(s).double() for s in seeds]
    stacked = stack_networks(nets).double()
    state = torch.load(cfg.out / "checkpoint.pt", weights_only=True)["learner"]["net"]
    stacked.load_state_dict(state)
    stacked.eval()
    x = torch.randn(
        3, 2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        expected, _ = stacked(x)
        for s, seed in enumerate(seeds):
            torch.testing.assert_close(
                load_learner(cfg.out, seed)(x[:, s]), expected[s], rtol=1e-10, atol=1e-10
            )
