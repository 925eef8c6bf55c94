"""Continual ImageNet and class-incremental CIFAR-100: networks, schedules, head reset, early
stopping, CBP on the ResNet, short runs that learn, exact resume and bad inputs."""

import copy
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_learner import ModuleLearner
from stacked_runs import read_rows
from test_cbp import assert_resnet_replaced
from torch import nn

from ppo_cbp.benchmarks.continual_imagenet import (
    DEFAULTS as IMAGENET_DEFAULTS,
)
from ppo_cbp.benchmarks.continual_imagenet import (
    ContinualImageNetConfig,
    ImageNetMethodConfig,
    build_imagenet_learner,
    imagenet_convnet,
    run_continual_imagenet,
)
from ppo_cbp.benchmarks.conv_learner import StackedLearner, reset_head_, resolve_module_method
from ppo_cbp.benchmarks.incremental_cifar import ALIASES as CIFAR_ALIASES
from ppo_cbp.benchmarks.incremental_cifar import DEFAULTS as CIFAR_DEFAULTS
from ppo_cbp.benchmarks.incremental_cifar import (
    BestWeights,
    CIFARMethodConfig,
    IncrementalCIFARConfig,
    build_resnet,
    class_order,
    learning_rate,
    reinit_head_rows_,
    run_incremental_cifar,
    seen_classes,
)
from ppo_cbp.datasets.imagenet32 import class_pairs
from ppo_cbp.errors import UsageError
from ppo_cbp.plasticity.cbp import ContinualBackprop

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small conv steps on a shared 2-core machine: a second intra-op thread that has to wait
    for a busy core makes a step up to 100x slower, and buys nothing at these sizes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PALETTE = np.array([[220, 30, 30], [30, 30, 220], [30, 200, 30], [230, 230, 40]], dtype=float)


def colour_classes(num, rng):
    """Saturated, well separated colours (red, blue, green, yellow), one per class."""
    return PALETTE[rng.permutation(len(PALETTE))[:num]]


def write_imagenet(folder, classes=4, per_class=30, seed=0):
    """Per-class .npy layout, each class a constant colour plus pixel noise."""
    rng = np.random.default_rng(seed)
    (folder / "classes").mkdir(parents=True)
    colours = colour_classes(classes, rng)
    for k in range(classes):
        x = colours[k][None, :, None, None] + rng.normal(0, 20, (per_class, 3, 32, 32))
        np.save(folder / "classes" / f"{k}.npy", np.clip(x, 0, 255).astype(np.uint8))


def cifar_pattern(k):
    """Class k's sign pattern: top half +1 and bottom half -1 (k even) or the reverse (k odd),
    and for k >= 2 also reversed on the right half. Horizontal flips, 4-pixel crops and small
    rotations keep the top/bottom distinction of classes 0 and 1."""
    sign = np.where(np.arange(32)[:, None] < 16, 1.0, -1.0) * np.ones((1, 32))
    if k % 2:
        sign = -sign
    if k >= 2:
        sign[:, 16:] *= -1
    return sign


def write_cifar(folder, classes=(0, 1, 2, 3), train_per_class=16, test_per_class=4, seed=0):
    """cifar-100-python files whose images are +-1 standard deviation patterns about the
    CIFAR-100 channel means (so normalised inputs have mean ~0 and variance ~1), plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    mean = np.array([0.5071, 0.4865, 0.4409])[:, None, None] * 255
    std = np.array([0.2673, 0.2564, 0.2762])[:, None, None] * 255
    for name, per in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.asarray(classes), per)
        rng.shuffle(labels)
        z = np.stack([cifar_pattern(c)[None] + rng.normal(0, 0.3, (3, 32, 32)) for c in labels])
        x = mean + std * z
        d = {
            b"data": np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(len(labels), 3072),
            b"fine_labels": [int(c) for c in labels],
            b"coarse_labels": [0] * len(labels),
            b"filenames": [b"f"] * len(labels),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"c%d" % i for i in range(100)]}, f, protocol=2)


# ----------------------------------------------------------------------------------------
# Networks, methods and schedules


def test_convnet_architecture_and_unit_layers():
    net = imagenet_convnet(2, torch.Generator().manual_seed(0))
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 32, (5, 5)),
        (32, 64, (3, 3)),
        (64, 128, (3, 3)),
    ]
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 128), (128, 128), (128, 2)]
    assert net(torch.zeros(3, 3, 32, 32)).shape == (3, 2)
    cbp = ContinualBackprop(net, None, init="torch_default")
    assert [layer.units for layer in cbp.layers] == [32, 64, 128, 128, 128]
    assert cbp.layers[2].out_group == 4  # 128 channels x 2x2 positions feed the first Linear


def test_convnet_starts_with_pytorch_default_weights_and_biases():
    """Weights and biases of every layer from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's
    default: within the bound, spread over it (the pooled values' std is bound/sqrt(3) per
    layer), and the draws those of a generator with the same seed, weight then bias."""
    net = imagenet_convnet(2, torch.Generator().manual_seed(5))
    layers = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    fan_ins = [75, 288, 576, 512, 128, 128]
    g = torch.Generator().manual_seed(5)
    for layer, fan_in in zip(layers, fan_ins):
        bound = 1 / math.sqrt(fan_in)
        w, b = layer.weight.detach().double(), layer.bias.detach().double()
        for t in (w, b):
            assert t.abs().max() <= bound
        # U(-c, c) from the generator: 2c * u - c, in float64 from the same uniform draws
        expected_w = torch.rand(w.shape, generator=g).double() * 2 * bound - bound
        expected_b = torch.rand(b.shape, generator=g).double() * 2 * bound - bound
        torch.testing.assert_close(w, expected_w, rtol=0, atol=1e-7)
        torch.testing.assert_close(b, expected_b, rtol=0, atol=1e-7)
        both = torch.cat([w.flatten(), b])
        assert both.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.25)
        assert (b != 0).all() and (b.numel() < 32 or b.abs().max() > bound / 2)
    learner = build_imagenet_learner(
        resolve_module_method(
            ImageNetMethodConfig(method="linear"), IMAGENET_DEFAULTS, {"linear": "bp"}
        ),
        [0, 1],
        0.9,
        CPU,
    )
    bound = 1 / math.sqrt(3072)
    biases = [p for p in learner.net.parameters() if p.dim() == 2]  # [S, classes]
    assert len(biases) == 1
    bias = biases[0].detach()
    assert bias.abs().max() <= bound and (bias != 0).all()
    assert not torch.equal(bias[0], bias[1])  # each seed draws its own


def test_convnet_units_created_by_cbp_start_with_zero_bias():
    """Algorithm 1: a replaced unit's bias is 0; the others keep their default-drawn biases."""
    net = imagenet_convnet(2, torch.Generator().manual_seed(0))
    cbp = ContinualBackprop(
        net, None, replacement_rate=0.0, maturity_threshold=0, init="torch_default"
    )
    old = [layer.bias.clone() for layer in cbp.layers]
    net(torch.randn(4, 3, 32, 32))
    cbp.to_replace = [3.0] * len(cbp.layers)
    assert cbp.step() == 3 * len(cbp.layers)
    for layer, before, birth in zip(cbp.layers, old, cbp.birth):
        new = birth[0] == 1
        assert int(new.sum()) == 3
        assert (layer.bias[new] == 0).all()
        assert torch.equal(layer.bias[~new], before[~new]) and (before != 0).all()


def test_method_defaults():
    imagenet = {
        m: resolve_module_method(
            ImageNetMethodConfig(method=m), IMAGENET_DEFAULTS, {"linear": "bp"}
        )
        for m in ("bp", "cbp", "snp", "linear")
    }
    assert all(r.lr == 0.01 for r in imagenet.values())
    # the released l2.json: step size 0.03, weight decay 3e-6
    l2 = resolve_module_method(ImageNetMethodConfig(method="l2"), IMAGENET_DEFAULTS, {})
    assert (l2.lr, l2.weight_decay) == (0.03, 3e-6)
    assert imagenet["cbp"].replacement_rate == 3e-4 and imagenet["cbp"].maturity_threshold == 100
    assert imagenet["linear"].method == "linear" and imagenet["linear"].weight_decay == 0
    cifar = {
        m: resolve_module_method(CIFARMethodConfig(method=m), CIFAR_DEFAULTS, CIFAR_ALIASES)
        for m in ("base", "head_reset", "retrained", "snp", "cbp")
    }
    assert all(r.lr == 0.1 and r.weight_decay == 5e-4 for r in cifar.values())
    assert cifar["snp"].noise_std == 1e-5 and cifar["base"].noise_std == 0
    cbp = cifar["cbp"]
    assert (cbp.replacement_rate, cbp.maturity_threshold, cbp.utility) == (
        1e-5,
        1000,
        "contribution",
    )
    with pytest.raises(ValueError, match="unknown method 'adam'"):
        resolve_module_method(CIFARMethodConfig(method="adam"), CIFAR_DEFAULTS, CIFAR_ALIASES)


def test_learning_rate_schedule():
    expected = {
        0: 0.1,
        59: 0.1,
        60: 0.02,
        119: 0.02,
        120: 0.004,
        159: 0.004,
        160: 0.0008,
        199: 0.0008,
    }
    for epoch, lr in expected.items():
        assert learning_rate(epoch, 200) == pytest.approx(lr, rel=1e-12)
    # scaled down: milestones at round(0.3 * 10) = 3, 6, 8
    assert [learning_rate(e, 10) for e in range(10)] == pytest.approx(
        [0.1] * 3 + [0.02] * 3 + [0.004] * 2 + [0.0008] * 2
    )


def test_class_order_and_increments():
    classes = np.arange(100)
    order = class_order(3, classes)
    assert sorted(order.tolist()) == list(range(100))
    assert not np.array_equal(order, class_order(4, classes))
    np.testing.assert_array_equal(order, class_order(3, classes))
    seen = [seen_classes(order, i, 5) for i in range(20)]
    assert [len(s) for s in seen] == list(range(5, 101, 5))
    for a, b in zip(seen, seen[1:]):
        np.testing.assert_array_equal(b[: len(a)], a)  # each increment keeps the old classes
    subset = class_order(0, np.array([7, 11, 42]))
    assert sorted(subset.tolist()) == [7, 11, 42]


# ----------------------------------------------------------------------------------------
# Head reset, head growth and early stopping


def test_head_reset_zeroes_head_and_its_momentum_only():
    method = resolve_module_method(ImageNetMethodConfig(method="bp"), IMAGENET_DEFAULTS, {})
    learner = build_imagenet_learner(method, seeds=[0, 1], momentum=0.9, device=CPU)
    x, y = torch.randn(8, 2, 3, 32, 32), torch.tensor([[0, 1] * 4, [1, 0] * 4])
    learner.step(x, y)
    before = copy.deepcopy(learner.net.state_dict())
    reset_head_(learner)
    head = learner.net.head()
    assert all((p == 0).all() for p in head)
    assert all((learner.momentum_buffer(p) == 0).all() for p in head)
    head_ids = {id(p) for p in head}
    for name, p in learner.net.named_parameters():
        if id(p) not in head_ids:
            assert torch.equal(p, before[name]), name
            assert learner.momentum_buffer(p).abs().sum() > 0, name
    logits, _ = learner.net(x)
    assert (logits == 0).all()


def test_new_head_rows_are_redrawn_like_the_init():
    """Every seed's new rows are redrawn from its own generator, the others keep their weights
    and momentum."""
    method = resolve_module_method(CIFARMethodConfig(method="base"), CIFAR_DEFAULTS, CIFAR_ALIASES)

    def learner(out):
        heads = [nn.Sequential(nn.Linear(512, out)) for _ in range(2)]
        return StackedLearner(
            heads, method, seeds=[0, 1], momentum=0.9, init="kaiming_normal", device=CPU
        )

    stacked = learner(100)
    stacked.step(torch.randn(4, 2, 512), torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]]), num_logits=5)
    w, b = stacked.net.head()
    old = w.detach().clone()
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(7)]
    reinit_head_rows_(stacked, slice(5, 10), gens)
    assert torch.equal(w[:, :5], old[:, :5]) and torch.equal(w[:, 10:], old[:, 10:])
    for s, seed in enumerate([0, 7]):
        want = torch.randn(5, 512, generator=torch.Generator().manual_seed(seed)) / 512**0.5
        assert torch.equal(w[s, 5:10], want)
    assert (b[:, 5:10] == 0).all()
    assert (stacked.momentum_buffer(w)[:, 5:10] == 0).all()
    assert stacked.momentum_buffer(w)[:, :5].abs().sum() > 0
    big = learner(2000)
    reinit_head_rows_(big, slice(0, None), gens)
    # Kaiming normal with linear gain: std 1/sqrt(512)
    big_w = big.net.head()[0][0]
    assert big_w.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.01)
    assert big_w.mean().abs().item() < 3e-4


def test_best_weights_restores_the_best_epoch():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    best = BestWeights(net)
    snapshots = []
    for epoch, score in enumerate([3, 5, 5, 4]):
        with torch.no_grad():
            net[0].weight.fill_(float(epoch))
        net(torch.randn(6, 3))  # moves the BatchNorm running statistics
        snapshots.append(copy.deepcopy(net.state_dict()))
        best.update(torch.tensor(score), epoch)
    assert best.epoch.item() == 1 and best.score.item() == 5  # ties keep the earlier epoch
    best.restore()
    for name, value in net.state_dict().items():
        assert torch.equal(value, snapshots[1][name]), name


def test_cbp_on_the_resnet_replaces_as_released():
    """CBP inside the CIFAR learner replaces one unit per layer as the released code does
    (tests/test_cbp.py's reference) and resets the momentum of the replaced entries."""
    method = resolve_module_method(
        CIFARMethodConfig(method="cbp", replacement_rate=1.0, maturity_threshold=0),
        CIFAR_DEFAULTS,
        CIFAR_ALIASES,
    )
    model = build_resnet(0).double()
    learner = ModuleLearner(model, method, seed=0, momentum=0.9, init="kaiming_normal", device=CPU)
    cbp, learner.cbp = learner.cbp, None
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    learner.step(x, torch.tensor([0, 1]), num_logits=5)  # SGD step; the hooks record x
    old = copy.deepcopy(model.state_dict())
    old_momentum = learner.momentum_buffer(model.blocks[0].conv1.weight).clone()
    cbp.to_replace = [1.0 - layer.units for layer in cbp.layers]  # one unit per layer
    assert cbp.step() == 17
    picked = [torch.nonzero(b[0] == 1).flatten() for b in cbp.birth]
    assert [len(p) for p in picked] == [1] * 17
    c = picked[1][0]
    assert_resnet_replaced(old, model.state_dict(), picked)
    mom = learner.momentum_buffer(model.blocks[0].conv1.weight)
    assert (mom[c] == 0).all() and (old_momentum[c] != 0).any() and mom.abs().sum() > 0
    assert (mom[:, picked[0]] == 0).all()  # the stem unit's outgoing weights
    # a block output unit's outgoing weights: the next block's conv1, the head for the last
    assert (learner.momentum_buffer(model.blocks[1].conv1.weight)[:, picked[2]] == 0).all()
    head = learner.momentum_buffer(model.fc.weight)
    assert (head[:, picked[16]] == 0).all() and head.abs().sum() > 0


# ----------------------------------------------------------------------------------------
# Short runs


def imagenet_cfg(tmp_path, name, **kw):
    base = dict(
        seeds=[0],
        tasks=3,
        epochs=3,
        batch_size=10,
        images_per_class=20,
        test_images_per_class=10,
        metric_examples=40,
        data_dir=tmp_path / "inet",
        out=tmp_path / name,
        device="cpu",
        progress=False,
    )
    base.update(kw)
    return ContinualImageNetConfig(**base)


def test_continual_imagenet_learns_and_writes_outputs(tmp_path):
    write_imagenet(tmp_path / "inet")
    cfg = imagenet_cfg(tmp_path, "learn", seeds=[0, 1], tasks=2, epochs=10, batch_size=5)
    summary = run_continual_imagenet(cfg)
    for seed in (0, 1):
        rows = read_rows(cfg.out, seed)
        assert len(rows) == 2
        pairs = class_pairs(seed, 2, 4)
        assert [(r["class_a"], r["class_b"]) for r in rows] == [tuple(map(float, p)) for p in pairs]
        for r in rows:
            assert r["accuracy"] >= 0.9  # chance is 0.5
            assert 0 <= r["dead_fraction"] <= 1 and r["effective_rank"] >= 1
            assert r["weight_magnitude"] > 0
    assert summary["tasks_completed"] == 2 and (cfg.out / "summary.json").exists()
    lin = imagenet_cfg(tmp_path, "linear", tasks=2, epochs=10, batch_size=5)
    lin.method = ImageNetMethodConfig(method="linear")
    run_continual_imagenet(lin)
    assert all(r["accuracy"] >= 0.9 for r in read_rows(lin.out, 0))


def test_continual_imagenet_resume_is_exact(tmp_path):
    write_imagenet(tmp_path / "inet")
    method = ImageNetMethodConfig(method="cbp", replacement_rate=0.01, maturity_threshold=3)
    full = imagenet_cfg(tmp_path, "full", epochs=2)
    full.method = method
    run_continual_imagenet(full)
    part = imagenet_cfg(tmp_path, "part", epochs=2)
    part.method = copy.deepcopy(method)
    run_continual_imagenet(part, stop_after=1)
    assert len(read_rows(part.out, 0)) == 1
    with pytest.raises(ValueError, match="--resume"):
        run_continual_imagenet(part)
    part.resume = True
    run_continual_imagenet(part)
    rows, expected = read_rows(part.out, 0), read_rows(full.out, 0)
    assert rows == expected and rows[-1]["units_replaced"] > 0


@pytest.mark.parametrize(
    "spec",
    ["cbp+l2_init+weight_clipping", "snp_init+soft_snp+parseval", "upgd", "kron", "linear+trac"],
)
@pytest.mark.slow
def test_continual_imagenet_with_plasticity_methods_resumes_exactly(tmp_path, spec):
    """Combined methods on the ConvNet: an interrupted run resumes into the rows of the run
    that never stopped, and two stacked seeds give the rows of each seed alone."""
    write_imagenet(tmp_path / "inet")
    cbp = dict(replacement_rate=0.01, maturity_threshold=3) if "cbp" in spec else {}
    if spec == "kron":  # triangular factors up to 64 wide: the default's 6144-wide one is slow
        cbp = dict(kron_max_size_triangular=64)
    method = ImageNetMethodConfig(method=spec, **cbp)
    kw = dict(epochs=2, dtype="float64")
    full = imagenet_cfg(tmp_path, "full", seeds=[0, 1], **kw)
    full.method = method
    assert run_continual_imagenet(full)["method"] == spec
    part = imagenet_cfg(tmp_path, "part", seeds=[0, 1], **kw)
    part.method = copy.deepcopy(method)
    run_continual_imagenet(part, stop_after=1)
    part.resume = True
    run_continual_imagenet(part)
    alone = imagenet_cfg(tmp_path, "alone", seeds=[1], **kw)
    alone.method = copy.deepcopy(method)
    run_continual_imagenet(alone)
    for seed in (0, 1):
        assert read_rows(part.out, seed) == read_rows(full.out, seed)
    for r_stack, r_alone in zip(read_rows(full.out, 1), read_rows(alone.out, 1), strict=True):
        assert r_stack == pytest.approx(r_alone, rel=1e-9, abs=1e-12)


def test_continual_imagenet_refuses_an_unknown_method_in_a_combination():
    with pytest.raises(UsageError, match="unknown method 'crelu'"):
        resolve_module_method(ImageNetMethodConfig(method="cbp+crelu"), IMAGENET_DEFAULTS, {})


@pytest.mark.parametrize("utility", ["adaptable_contribution", "contribution"])
def test_continual_imagenet_cbp_with_instantaneous_utility(tmp_path, utility):
    """decay_rate = 0 (the instantaneous utility) on the conv path, whose steps that replace
    nothing compute nothing: the run replaces units and ends normally."""
    write_imagenet(tmp_path / "inet")
    cfg = imagenet_cfg(tmp_path, "eta0", tasks=2, epochs=2)
    cfg.method = ImageNetMethodConfig(
        method="cbp", replacement_rate=0.01, maturity_threshold=3, decay_rate=0.0, utility=utility
    )
    run_continual_imagenet(cfg)
    rows = read_rows(cfg.out, 0)
    assert len(rows) == 2 and rows[-1]["units_replaced"] > 0


def cifar_cfg(tmp_path, name, **kw):
    base = dict(
        seeds=[0],
        classes_per_increment=2,
        increments=1,
        epochs=1,
        images_per_class=4,
        validation_per_class=2,
        test_per_class=4,
        batch_size=4,
        metric_examples=8,
        data_dir=tmp_path / "cifar",
        out=tmp_path / name,
        device="cpu",
        progress=False,
    )
    base.update(kw)
    return IncrementalCIFARConfig(**base)


@pytest.mark.slow
def test_incremental_cifar_learns(tmp_path):
    # BatchNorm's running statistics (used in eval mode for validation and test) need a few
    # dozen steps to follow the weights: 24 full-batch steps on 2 x 4 images
    write_cifar(tmp_path / "cifar" / "cifar-100-python", classes=(0, 1), train_per_class=8)
    cfg = cifar_cfg(
        tmp_path, "learn", images_per_class=4, validation_per_class=4, epochs=24, batch_size=8
    )
    cfg.method = CIFARMethodConfig(method="base", lr=0.01)
    run_incremental_cifar(cfg)
    (row,) = read_rows(cfg.out, 0)
    assert row["classes"] == 2
    assert row["accuracy"] >= 0.85  # chance is 0.5, 8 test images
    assert row["best_validation_accuracy"] >= 0.85 and row["best_epoch"] > 0
    # the restored weights are those of one of the epochs the maximum runs over
    assert row["accuracy"] <= row["max_test_accuracy_over_epochs"] <= 1
    assert 0 <= row["dead_percentage"] <= 100 and 1 <= row["stable_rank"] <= 8


@pytest.mark.slow
def test_incremental_cifar_reports_the_max_test_accuracy_over_epochs(tmp_path, monkeypatch):
    """``max_test_accuracy_over_epochs`` is the largest of the test accuracies measured after
    the epochs: the evaluation is wrapped so that after each epoch it returns scripted counts
    of correct test images, peaking in the middle, while ``accuracy`` stays the real accuracy
    of the restored weights."""
    from ppo_cbp.benchmarks import incremental_cifar

    write_cifar(tmp_path / "cifar" / "cifar-100-python", classes=(0, 1), train_per_class=8)
    cfg = cifar_cfg(
        tmp_path,
        "max",
        images_per_class=4,
        validation_per_class=4,
        test_per_class=3,  # 6 test images, told apart from the 8 validation images by number
        epochs=4,
        batch_size=8,
    )
    scripted = [1, 5, 2, 3]  # correct test images after each epoch
    calls, real = [], []
    evaluate = incremental_cifar.count_correct

    def scripted_test(net, x, sel, y, batch, num_logits):
        correct = evaluate(net, x, sel, y, batch, num_logits)
        if sel.shape[1] != 6:
            return correct
        calls.append(sel.shape[1])
        if len(calls) <= len(scripted):
            return torch.tensor([scripted[len(calls) - 1]])
        real.append(correct.item() / 6)
        return correct

    monkeypatch.setattr(incremental_cifar, "count_correct", scripted_test)
    run_incremental_cifar(cfg)
    (row,) = read_rows(cfg.out, 0)
    assert len(calls) == cfg.epochs + 1 and len(real) == 1
    assert row["max_test_accuracy_over_epochs"] == 5 / 6
    assert row["accuracy"] == real[0]


@pytest.mark.slow
def test_incremental_cifar_resume_is_exact(tmp_path):
    write_cifar(tmp_path / "cifar" / "cifar-100-python")
    method = CIFARMethodConfig(method="cbp", replacement_rate=0.01, maturity_threshold=1)
    full = cifar_cfg(tmp_path, "full", increments=2, images_per_class=2, batch_size=2)
    full.method = method
    run_incremental_cifar(full)
    part = cifar_cfg(tmp_path, "part", increments=2, images_per_class=2, batch_size=2)
    part.method = copy.deepcopy(method)
    run_incremental_cifar(part, stop_after=1)
    part.resume = True
    run_incremental_cifar(part)
    rows, expected = read_rows(part.out, 0), read_rows(full.out, 0)
    assert [r["classes"] for r in rows] == [2, 4]
    assert rows == expected and rows[-1]["units_replaced"] > 0


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_data_batch_1"):
        run_continual_imagenet(imagenet_cfg(tmp_path, "x", data_dir=tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="missing CIFAR-100 file .*none/train"):
        run_incremental_cifar(cifar_cfg(tmp_path, "y", data_dir=tmp_path / "none"))
    write_cifar(tmp_path / "cifar" / "cifar-100-python")
    with pytest.raises(
        ValueError, match="3 increments of 2 classes need 6 classes; the data has 4"
    ):
        run_incremental_cifar(cifar_cfg(tmp_path, "z", increments=3))
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        run_incremental_cifar(cifar_cfg(tmp_path, "z", epochs=0))
    with pytest.raises(ValueError, match="class .* has 16 images, need 20"):
        run_incremental_cifar(cifar_cfg(tmp_path, "z", images_per_class=18))
    write_imagenet(tmp_path / "inet")
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        run_continual_imagenet(imagenet_cfg(tmp_path, "w", batch_size=0))
    assert not Path(tmp_path / "w").exists()
