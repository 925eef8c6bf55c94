"""Stacked seeds of the ResNet-18: the stacked network against each network alone (training
and eval mode BatchNorm), and the stacked learner against one ModuleLearner per seed through
SGD, Shrink & Perturb and CBP replacements, all in float64."""

import pytest
import torch
from reference_learner import ModuleLearner
from stacked_runs import TOL, assert_stacked_run_equals_runs_alone, checkpoint, read_rows
from test_conv_benchmarks import write_cifar

from ppo_cbp.benchmarks.continual_imagenet import (
    StackedLearner,
    resolve_module_method,
)
from ppo_cbp.benchmarks.incremental_cifar import (
    ALIASES,
    DEFAULTS,
    CIFARMethodConfig,
    IncrementalCIFARConfig,
    build_resnet,
    resnet_feature_taps,
    resnet_metrics,
    run_incremental_cifar,
)
from ppo_cbp.metrics import feature_rank_metrics
from ppo_cbp.nets.resnet import ResNet18
from ppo_cbp.nets.stacked_resnet import StackedResNet18
from ppo_cbp.nets.units import ActivationRecorder

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
F64 = torch.float64


def nets(seeds, device):
    return [build_resnet(s).to(device=device, dtype=F64) for s in seeds]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_stacked_resnet_equals_each_network_alone(device):
    """Outputs, the 17 unit activations, the post-ReLU features and the BatchNorm running
    statistics after two training-mode passes, then eval-mode outputs (running statistics)."""
    device = torch.device(device)
    seeds = [0, 1, 2]
    alone = nets(seeds, device)
    stacked = StackedResNet18(alone).to(device)
    assert [n for n, _ in stacked.named_parameters()] == [n for n, _ in alone[0].named_parameters()]
    g = torch.Generator().manual_seed(0)
    S, B = len(seeds), 4
    for mode in ("train", "train", "eval"):
        stacked.train(mode == "train")
        x = torch.randn(B, S, 3, 8, 8, generator=g, dtype=F64).to(device)
        logits, hidden = stacked(x)
        features, relus = stacked.features(x)
        assert logits.shape == (S, B, 100) and len(hidden) == 17 and len(relus) == 17
        for s, net in enumerate(alone):
            net.train(mode == "train")
            _, taps = net.unit_layers()
            units = ActivationRecorder(taps)
            post = ActivationRecorder(resnet_feature_taps(net))
            want = net(x[:, s])
            torch.testing.assert_close(logits[s], want, **TOL)
            for h, w in zip(hidden, units.latest(), strict=True):
                torch.testing.assert_close(h[s], w, **TOL)
            if mode == "eval":  # features re-run the batch: no second update of the statistics
                torch.testing.assert_close(features[s], net.features(x[:, s]), **TOL)
                for h, w in zip(relus, post.latest(), strict=True):
                    torch.testing.assert_close(h[s], w, **TOL)
            units.remove()
            post.remove()
        if mode == "train":
            for s, net in enumerate(alone):  # the features pass updated the stacked statistics
                net(x[:, s])
    for s, net in enumerate(alone):
        for name, t in net.state_dict().items():
            if not name.endswith("num_batches_tracked"):
                torch.testing.assert_close(stacked.state_dict()[name][s], t, **TOL)


def released_dead_percentage(net, x, mode):
    """100 x dead units / 3,904 of one ResNet-18 on the batch ``x``, in numpy: a conv channel
    is dead when non-zero on at most 1% of the (image, position) pairs, a pooled feature when
    non-zero on at most 1% of the images; and the pooled features."""
    net.train(mode == "train")
    maps = []
    modules = resnet_feature_taps(net)[:-1]
    hooks = [
        m.register_forward_hook(lambda m, i, o: maps.append(o.numpy().copy())) for m in modules
    ]
    with torch.no_grad():
        features = net.features(x)
    for h in hooks:
        h.remove()
    fractions = [(h != 0).mean(axis=(0, 2, 3)) for h in maps] + [(features.numpy() != 0).mean(0)]
    dead = sum(int((f <= 0.01).sum()) for f in fractions)
    assert sum(len(f) for f in fractions) == 3904
    return 100.0 * dead / 3904, features


@pytest.mark.slow
def test_resnet_metrics_use_the_batch_statistics_as_released():
    """Dead units and ranks on one batch with BatchNorm in training mode (the released analysis
    never calls eval()); running statistics that differ from the batch's do not enter, and
    are unchanged afterwards."""
    seeds = [0, 1]
    alone = nets(seeds, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for net in alone:
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0.0, 2.0, generator=g)
                    m.running_var.uniform_(0.2, 3.0, generator=g)
            net.blocks[1].bn1.bias[:9] = -50.0  # nine inner channels dead for any batch
    stacked = StackedResNet18(alone)
    stacked.eval()
    before = [t.clone() for t in stacked.buffers()]
    x = torch.randn(40, 2, 3, 8, 8, generator=g, dtype=F64)
    metrics = resnet_metrics(stacked, x)
    assert all(torch.equal(a, b) for a, b in zip(before, stacked.buffers()))
    assert not stacked.training
    for s, net in enumerate(alone):
        want, features = released_dead_percentage(net, x[:, s], "train")
        assert metrics["dead_percentage"][s].item() == pytest.approx(want, abs=1e-12)
        assert want >= 100 * 9 / 3904
        eval_mode, _ = released_dead_percentage(net, x[:, s], "eval")
        assert eval_mode != want  # the two definitions differ here
        ranks = feature_rank_metrics(features)
        torch.testing.assert_close(metrics["effective_rank"][s], ranks["effective_rank"], **TOL)
        assert metrics["stable_rank"][s] == ranks["stable_rank"]


def resolved(method, **kw):
    return resolve_module_method(CIFARMethodConfig(method=method, **kw), DEFAULTS, ALIASES)


METHODS = {
    "base": {},
    "snp": dict(noise_std=1e-2),
    "cbp": dict(replacement_rate=0.05, maturity_threshold=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
def test_stacked_resnet_learner_equals_module_learner_per_seed(method, device):
    """Seeds 3 and 5 stacked follow the trajectories of two ModuleLearners (ResNet18, torch
    SGD, hooked CBP, perturb_) fed the same minibatches, with masked logits."""
    device = torch.device(device)
    seeds = [3, 5]
    r = resolved(method, **METHODS[method])
    stacked = StackedLearner(
        nets(seeds, device),
        r,
        seeds=seeds,
        momentum=0.9,
        init="kaiming_normal",
        device=device,
        dtype=F64,
    )
    alone = [
        ModuleLearner(n, r, seed=s, momentum=0.9, init="kaiming_normal", device=device)
        for s, n in zip(seeds, nets(seeds, device))
    ]
    g = torch.Generator().manual_seed(1)
    B = 4
    for _ in range(4):
        x = torch.randn(B, 2, 3, 16, 16, generator=g, dtype=F64).to(device)
        y = torch.randint(0, 5, (2, B), generator=g).to(device)
        correct = stacked.step(x, y, num_logits=5)
        for s, learner in enumerate(alone):
            assert correct[s].item() == learner.step(x[:, s], y[s], num_logits=5).item()
    for s, learner in enumerate(alone):
        state = stacked.net.state_dict()
        for name, t in learner.net.state_dict().items():
            if not name.endswith("num_batches_tracked"):
                torch.testing.assert_close(state[name][s], t, **TOL)
        for p, q in zip(learner.net.parameters(), stacked.net.parameters(), strict=True):
            torch.testing.assert_close(
                stacked.momentum_buffer(q)[s], learner.momentum_buffer(p), **TOL
            )
        if method == "cbp":
            for u, v in zip(stacked.cbp.utility, learner.cbp.utility, strict=True):
                torch.testing.assert_close(u[s], v[0], **TOL)
            for u, v in zip(stacked.cbp.birth, learner.cbp.birth, strict=True):
                assert torch.equal(u[s], v[0])
        assert stacked.units_replaced()[s] == learner.units_replaced()
    if method == "cbp":
        assert min(stacked.units_replaced()) > 0


def test_stacked_resnet_checks_its_networks():
    with pytest.raises(ValueError, match="same architecture"):
        StackedResNet18([ResNet18(10), ResNet18(100)])
    with pytest.raises(ValueError, match="no networks"):
        StackedResNet18([])


# ----------------------------------------------------------------------------------------
# A stacked run against one run per seed

RUN_METHODS = {
    "base": {},
    "head_reset": {},
    "retrained": {},
    "snp": dict(noise_std=1e-3),
    "cbp": dict(replacement_rate=0.01, maturity_threshold=1),
}


def run_cfg(tmp_path, name, method, seeds, **kw):
    base = dict(
        seeds=seeds,
        method=CIFARMethodConfig(method=method, **RUN_METHODS[method]),
        classes_per_increment=2,
        increments=2,
        epochs=2,
        images_per_class=3,
        validation_per_class=2,
        test_per_class=3,
        batch_size=4,
        metric_examples=5,
        data_dir=tmp_path / "cifar",
        out=tmp_path / name,
        device="cpu",
        dtype="float64",
        progress=False,
    )
    base.update(kw)
    return IncrementalCIFARConfig(**base)


# The run loop's own per-seed work (the retrained rebuild, the best-validation restore, CBP's
# per-seed draws); base and snp differ from these only inside the learner, which
# test_stacked_resnet_learner_equals_module_learner_per_seed covers step by step, and
# head_reset only in the head rows it redraws, whose per-seed draws
# tests/test_conv_benchmarks.py checks against each seed's generator.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["retrained", "cbp"])
def test_stacked_run_equals_runs_alone(tmp_path, method):
    """Seeds 0 and 1 trained as one stacked network write the CSV rows and end with the
    weights, BatchNorm statistics and momentum of each seed's run alone."""
    write_cifar(tmp_path / "cifar" / "cifar-100-python", classes=(0, 1, 2, 3))
    stacked_rows = assert_stacked_run_equals_runs_alone(
        run_incremental_cifar,
        lambda name, seeds: run_cfg(tmp_path, name, method, seeds),
        seeds=[0, 1],
        rows_per_seed=2,
    )
    if method == "cbp":
        assert all(rows[-1]["units_replaced"] > 0 for rows in stacked_rows.values())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cbp"])
def test_stacked_resume_is_exact(tmp_path, method):
    write_cifar(tmp_path / "cifar" / "cifar-100-python", classes=(0, 1, 2, 3))
    seeds = [4, 7]
    run_incremental_cifar(run_cfg(tmp_path, "full", method, seeds, epochs=1))
    part = run_cfg(tmp_path, "part", method, seeds, epochs=1)
    run_incremental_cifar(part, stop_after=1)
    assert [len(read_rows(part.out, s)) for s in seeds] == [1, 1]
    part.resume = True
    run_incremental_cifar(part)
    for s in seeds:
        assert read_rows(part.out, s) == read_rows(tmp_path / "full", s)
    full, done = checkpoint(tmp_path / "full")["learner"], checkpoint(part.out)["learner"]
    for name, p in full["net"].items():
        assert torch.equal(done["net"][name], p)
