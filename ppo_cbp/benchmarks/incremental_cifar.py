"""Class-incremental CIFAR-100 (Dohare et al., 2024) with the paper's ResNet-18.

Protocol. Each seed draws its class order (a uniform permutation of the classes,
:func:`class_order`). Increment ``i`` (0-based) trains on all training images of the first
``(i + 1) * classes_per_increment`` classes of that order (5, 10, ..., 100: 20 increments of
200 epochs). Per class: 450 training, 50 validation (the first 50 training-file images of the
class) and 100 test images; pixels in [0, 1] normalised with the CIFAR-100 per-channel mean
(0.5071, 0.4865, 0.4409) and std (0.2673, 0.2564, 0.2762).

Output layer. The head keeps 100 outputs, output ``j`` standing for the ``j``-th class of the
seed's order; during increment ``i`` only the first ``k = (i + 1) * classes_per_increment``
logits enter the loss and the prediction (the others are masked out), which is the same as a
head that grows by 5 units per increment. When an increment starts, the rows of its new
classes are re-initialised like the rest of the head (Kaiming normal with linear gain, zero
bias, zero momentum): unseen rows get no gradient but would otherwise have been shrunk by the
weight decay.

Training. SGD (momentum 0.9, weight decay 5e-4 coupled, minibatch 90), the step size restarting
every increment at 0.1 and multiplied by 0.2 at 30%, 60% and 80% of the increment's epochs
(epochs 60, 120, 160 of 200: 0.1, 0.02, 0.004, 0.0008), :func:`learning_rate`. Training
minibatches are augmented on the device (:func:`ppo_cbp.augment.augment`: flip, 4-pixel
reflect padding and crop, rotation 0-15 degrees); validation and test images are not. After
every epoch the validation accuracy on the seen classes is measured (BatchNorm in eval mode);
the weights (parameters and BatchNorm statistics) of the best epoch (the first if tied) are
restored at the end of the increment and the next increment starts from them
(:class:`BestWeights`). The optimizer and CBP state are not restored.

Methods: ``base``; ``head_reset`` (the whole head re-initialised at each increment);
``retrained`` (a fresh network and optimizer at each increment: the reference the paper
plots against); ``snp`` (Shrink & Perturb, noise std 1e-5 with the weight decay); ``cbp``
(replacement rate 1e-5, maturity threshold 1000, contribution utility, on the ResNet's 17 unit
layers; see :func:`ppo_cbp.resnet.resnet_unit_layers`).

Metrics per increment and seed (one CSV row), after restoring the best weights:

* ``accuracy``: test accuracy of the restored weights over the test images of all seen
  classes;
* ``max_test_accuracy_over_epochs``: the largest test accuracy after any epoch of the increment
  (BatchNorm in eval mode), what the paper's released code reports per increment. It selects on
  the test set, so it is an optimistic figure; ``accuracy`` selects on validation only. (The
  released code also measures it on augmented test images; here they are not augmented.)
* ``best_validation_accuracy`` and ``best_epoch``; ``train_accuracy`` (augmented minibatches
  of the last epoch, before each update);
* on ``metric_examples`` (1000) training images of the seen classes (not augmented, BatchNorm
  in eval mode): ``dead_percentage``, 100 x the dead units over the 17 post-ReLU feature
  layers (stem, every block's inner ReLU and output, the last output taken after global
  pooling) divided by their total width (3,904), a unit (channel) being dead when it is
  non-zero on at most 1% of the (image, position) pairs; ``stable_rank`` and
  ``effective_rank`` of the ``[N, 512]`` penultimate (pooled) representation;
* ``weight_magnitude`` (mean |w| over conv and linear weights), ``units_replaced``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import tyro
from torch import Tensor, nn
from tqdm import tqdm

from ppo_cbp.augment import augment, normalize
from ppo_cbp.benchmarks.common import (
    MethodConfig,
    RunOutputs,
    check_seeds,
    config_dict,
    method_flags,
    resolve_device,
)
from ppo_cbp.benchmarks.continual_imagenet import (
    TAG_AUGMENT,
    TAG_HEAD,
    TAG_SHUFFLE,
    ModuleLearner,
    count_correct,
    resolve_module_method,
)
from ppo_cbp.datasets.cifar100 import CIFAR100_MEAN, CIFAR100_STD, load_cifar100, per_class_split
from ppo_cbp.datasets.mnist import task_rng
from ppo_cbp.errors import UsageError
from ppo_cbp.metrics import (
    average_weight_magnitude,
    conv_activations_as_samples,
    feature_rank_metrics,
    layer_weights,
    unit_activity,
)
from ppo_cbp.resnet import ResNet18
from ppo_cbp.stacked import TAG_INIT, derive_seed

CIFAR_METHODS = ("base", "head_reset", "retrained", "snp", "cbp")
_TAG_ORDER = 8
_TAG_METRIC = 13

DEFAULTS: dict[str, dict[str, Any]] = {
    "base": dict(lr=0.1, weight_decay=5e-4),
    "head_reset": dict(lr=0.1, weight_decay=5e-4),
    "retrained": dict(lr=0.1, weight_decay=5e-4),
    "snp": dict(lr=0.1, weight_decay=5e-4, noise_std=1e-5),
    "cbp": dict(lr=0.1, weight_decay=5e-4, replacement_rate=1e-5, maturity_threshold=1000),
}
_ALIASES = {"base": "bp", "head_reset": "bp", "retrained": "bp"}


@method_flags(DEFAULTS)
@dataclass
class CIFARMethodConfig(MethodConfig):
    """Method of class-incremental CIFAR-100."""

    method: Literal["base", "head_reset", "retrained", "snp", "cbp"] = "base"  # type: ignore[assignment]
    """Learning method."""
    utility: str = "contribution"
    """CBP's utility (the paper's CIFAR experiments use the contribution utility)."""


def learning_rate(
    epoch: int,
    epochs: int,
    lr: float = 0.1,
    milestones: tuple[float, ...] = (0.3, 0.6, 0.8),
    factor: float = 0.2,
) -> float:
    """Step size in epoch ``epoch`` (0-based) of an increment of ``epochs`` epochs.

    ``lr * factor ** #{j : epoch >= round(milestones[j] * epochs)}``; for 200 epochs: 0.1 in
    epochs 0-59, 0.02 in 60-119, 0.004 in 120-159, 0.0008 in 160-199.
    """
    passed = sum(epoch >= round(m * epochs) for m in milestones)
    return lr * factor**passed


def class_order(seed: int, classes: np.ndarray) -> np.ndarray:
    """The seed's order of ``classes``: a uniform permutation (``argsort`` of raw PCG64 outputs
    of ``SeedSequence([seed, 0, 8])``, stable across NumPy versions)."""
    keys = task_rng(seed, 0, _TAG_ORDER).bit_generator.random_raw(len(classes))
    return np.asarray(classes)[np.argsort(keys, kind="stable")]


def seen_classes(order: np.ndarray, increment: int, classes_per_increment: int) -> np.ndarray:
    """The classes trained on in ``increment`` (0-based): the first ``(i + 1) * c`` of the order."""
    return order[: (increment + 1) * classes_per_increment]


class BestWeights:
    """The module's state (parameters and buffers) at the epoch with the best validation score.

    :meth:`update` keeps a copy on the device when ``score`` (a device tensor) is strictly
    larger than every earlier one, without reading the score on the host; :meth:`restore`
    loads it back.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        device = next(iter(self.state.values())).device
        self.score = torch.full((), -1, dtype=torch.int64, device=device)
        self.epoch = torch.full((), -1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, score: Tensor, epoch: int) -> None:
        better = score > self.score
        for k, v in self.module.state_dict().items():
            self.state[k].copy_(torch.where(better, v, self.state[k]))
        self.score = torch.where(better, score, self.score)
        self.epoch = torch.where(better, torch.full_like(self.epoch, epoch), self.epoch)

    def restore(self) -> None:
        self.module.load_state_dict(self.state)


@torch.no_grad()
def reinit_head_rows_(
    learner: ModuleLearner, head: nn.Linear, rows: slice, generator: torch.Generator
) -> None:
    """Redraw ``head`` rows like its initialisation (Kaiming normal, linear gain), bias and
    momentum of those rows 0."""
    w = head.weight
    n = len(range(*rows.indices(w.shape[0])))
    fresh = torch.randn(n, w.shape[1], generator=generator, device=generator.device, dtype=w.dtype)
    w[rows] = fresh.to(w.device) / w.shape[1] ** 0.5
    head.bias[rows] = 0.0
    for p in (head.weight, head.bias):
        buf = learner.momentum_buffer(p)
        if buf is not None:
            buf[rows] = 0.0


def resnet_feature_taps(model: ResNet18) -> list[nn.Module]:
    """The 17 post-ReLU modules: the stem's ReLU, then per block its inner and output ReLU."""
    taps: list[nn.Module] = [model.stem[2]]
    for block in model.blocks:
        taps += [block.relu1, block.relu2]
    return taps


@torch.no_grad()
def resnet_metrics(model: ResNet18, x: Tensor, batch: int = 250) -> dict[str, Tensor]:
    """``dead_percentage``, ranks of the pooled features and weight magnitude on ``x`` (see the
    module docstring); the network is evaluated in eval mode in chunks of ``batch``."""
    taps = resnet_feature_taps(model)
    active = [torch.zeros(0)] * len(taps)
    counts = [0] * len(taps)
    store: list[Tensor | None] = [None] * len(taps)
    handles = [
        m.register_forward_hook(lambda mod, args, out, i=i: store.__setitem__(i, out))
        for i, m in enumerate(taps)
    ]
    was_training = model.training
    model.eval()
    features = []
    try:
        for i in range(0, x.shape[0], batch):
            f = model.features(x[i : i + batch])
            features.append(f)
            # the last block's output enters the head through the global pool
            layers = [*store[:-1], f]
            for j, h in enumerate(layers):
                samples = conv_activations_as_samples(h) if h.dim() == 4 else h
                n = samples.shape[0]
                a = unit_activity(samples) * n
                active[j] = a if counts[j] == 0 else active[j] + a
                counts[j] += n
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    dead = sum(((a / n) <= 0.01).sum() for a, n in zip(active, counts))
    width = sum(a.shape[0] for a in active)
    ranks = feature_rank_metrics(torch.cat(features))
    return {
        "dead_percentage": 100.0 * dead.double() / width,
        "stable_rank": ranks["stable_rank"],
        "effective_rank": ranks["effective_rank"],
        "weight_magnitude": average_weight_magnitude([w for _, w in layer_weights(model)]),
    }


@dataclass
class IncrementalCIFARConfig:
    """Class-incremental CIFAR-100; the defaults are the paper's."""

    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds (one network each), trained increment by increment in one process."""
    method: Annotated[CIFARMethodConfig, tyro.conf.arg(name="")] = field(
        default_factory=CIFARMethodConfig
    )
    """Method and its hyperparameters (flags --method, --lr, --replacement-rate, ...)."""
    classes_per_increment: int = 5
    """Classes added per increment (and trained on in the first)."""
    increments: Annotated[
        int | None,
        tyro.conf.arg(help_behavior_hint="(default: all classes, 100 / classes_per_increment)"),
    ] = None
    """Number of increments."""
    epochs: int = 200
    """Epochs per increment."""
    images_per_class: int = 450
    """Training images per class."""
    validation_per_class: int = 50
    """Validation images per class (the first of each class in the training file)."""
    test_per_class: int = 100
    """Test images per class."""
    batch_size: int = 90
    """Training minibatch size."""
    eval_batch_size: int = 500
    """Chunk size of validation, test and metric passes (does not change results)."""
    momentum: float = 0.9
    """SGD momentum."""
    lr_milestones: tuple[float, ...] = (0.3, 0.6, 0.8)
    """Fractions of an increment's epochs at which the step size is multiplied by lr_factor."""
    lr_factor: float = 0.2
    """Step-size decay factor at each milestone."""
    metric_examples: int = 1000
    """Training images of the seen classes on which dead units and ranks are measured."""
    data_dir: Path = Path("data/cifar100")
    """Folder with cifar-100-python/{train,test,meta} (or the three files)."""
    download: bool = False
    """Download and MD5-check the canonical archive into --data-dir if missing."""
    out: Path = Path("runs/incremental_cifar")
    """Output folder."""
    device: str = "auto"
    """auto, cpu or cuda."""
    resume: bool = False
    """Continue the run saved in --out."""
    progress: bool = True
    """Show a progress bar."""


def _validate(cfg: IncrementalCIFARConfig) -> None:
    for name in (
        "classes_per_increment",
        "epochs",
        "images_per_class",
        "validation_per_class",
        "test_per_class",
        "batch_size",
        "eval_batch_size",
        "metric_examples",
    ):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.increments is not None and cfg.increments < 1:
        raise UsageError(f"--increments must be >= 1, got {cfg.increments}")
    if not 0 <= cfg.momentum < 1:
        raise UsageError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if not all(0 < m < 1 for m in cfg.lr_milestones) or not 0 < cfg.lr_factor <= 1:
        raise UsageError(
            "--lr-milestones must lie in (0, 1) and --lr-factor in (0, 1], got "
            f"{cfg.lr_milestones}, {cfg.lr_factor}"
        )


def build_resnet(seed: int, increment: int = 0) -> ResNet18:
    """The seed's ResNet-18, initialised from a generator of (seed, increment) on the CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, TAG_INIT + 1000 * increment))
        return ResNet18(num_classes=100)


class _Seed:
    """One seed's network, optimizer, operator and generators."""

    def __init__(self, seed: int, cfg: IncrementalCIFARConfig, method, device, increment: int):
        self.seed = seed
        self.cfg, self.method, self.device = cfg, method, device
        self.learner = self._learner(increment)
        self.shuffle = torch.Generator(device=device).manual_seed(derive_seed(seed, TAG_SHUFFLE))
        self.augment = torch.Generator(device=device).manual_seed(derive_seed(seed, TAG_AUGMENT))
        self.head = torch.Generator(device=device).manual_seed(derive_seed(seed, TAG_HEAD))
        self.metric = torch.Generator(device=device).manual_seed(derive_seed(seed, _TAG_METRIC))

    def _learner(self, increment: int) -> ModuleLearner:
        return ModuleLearner(
            build_resnet(self.seed, increment),
            self.method,
            seed=self.seed,
            momentum=self.cfg.momentum,
            init="kaiming_normal",
            device=self.device,
        )

    def start_increment(self, increment: int, k: int) -> None:
        m = self.method.method
        if increment == 0:
            return
        if m == "retrained":
            if self.learner.cbp is not None:
                self.learner.cbp.remove_hooks()
            self.learner = self._learner(increment)
        elif m == "head_reset":
            reinit_head_rows_(self.learner, self.learner.net.fc, slice(0, None), self.head)
        else:
            new = slice(k - self.cfg.classes_per_increment, k)
            reinit_head_rows_(self.learner, self.learner.net.fc, new, self.head)

    def state_dict(self) -> dict[str, Any]:
        return {
            "learner": self.learner.state_dict(),
            "generators": [
                g.get_state() for g in (self.shuffle, self.augment, self.head, self.metric)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        for g, s in zip((self.shuffle, self.augment, self.head, self.metric), state["generators"]):
            g.set_state(s)


def run_incremental_cifar(
    cfg: IncrementalCIFARConfig, stop_after: int | None = None
) -> dict[str, Any]:
    """Run (or resume) class-incremental CIFAR-100; returns the summary (``summary.json``).

    ``stop_after``: return after this many increments of this call (for interrupting in tests).
    """
    seeds = check_seeds(cfg.seeds)
    method = resolve_module_method(cfg.method, DEFAULTS, _ALIASES)
    _validate(cfg)
    device = resolve_device(cfg.device)
    config = config_dict(cfg)
    outputs = RunOutputs(cfg.out, seeds, config, cfg.resume)
    data = load_cifar100(cfg.data_dir, download=cfg.download)
    classes = np.unique(data.train_labels)
    increments = (
        cfg.increments if cfg.increments is not None else len(classes) // cfg.classes_per_increment
    )
    if increments * cfg.classes_per_increment > len(classes) or increments < 1:
        raise UsageError(
            f"{increments} increments of {cfg.classes_per_increment} classes need "
            f"{increments * cfg.classes_per_increment} classes; the data has {len(classes)}"
        )
    used = np.unique(
        np.concatenate(
            [class_order(s, classes)[: increments * cfg.classes_per_increment] for s in seeds]
        )
    )
    val_idx, train_idx = per_class_split(
        data.train_labels, used, (cfg.validation_per_class, cfg.images_per_class), "CIFAR-100 train"
    )
    (test_idx,) = per_class_split(data.test_labels, used, (cfg.test_per_class,), "CIFAR-100 test")

    def on_device(images: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(images).to(device).float().div_(255.0)
        return normalize(x, CIFAR100_MEAN, CIFAR100_STD), torch.from_numpy(labels).to(device)

    x_train, y_train = on_device(data.train_images[train_idx], data.train_labels[train_idx])
    x_val, y_val = on_device(data.train_images[val_idx], data.train_labels[val_idx])
    x_test, y_test = on_device(data.test_images[test_idx], data.test_labels[test_idx])
    del data

    config.update(resolved_method=config_dict(method), resolved_increments=increments)
    start = 0
    state = outputs.load_checkpoint(increments, "increment") if cfg.resume else None
    if state is not None:
        start = int(state["increment"])
    runs = [_Seed(seed, cfg, method, device, max(start - 1, 0)) for seed in seeds]
    if state is not None:
        for run, s in zip(runs, state["seeds"]):
            run.load_state_dict(s)
    S = len(seeds)
    outputs.start(f"incremental_cifar {method.method}, {S} seed(s)")
    # rank[s][c]: position of class c in seed s's order (its output unit); 100 = unused
    ranks = []
    for seed in seeds:
        r = torch.full((100,), 100, dtype=torch.int64)
        r[torch.from_numpy(class_order(seed, classes))] = torch.arange(len(classes))
        ranks.append(r.to(device))

    bar = tqdm(
        total=increments * cfg.epochs * S,
        initial=start * cfg.epochs * S,
        disable=not cfg.progress,
        unit="epoch",
        desc=f"incremental-cifar {method.method}, epochs of {S} seed(s)",
    )
    t0 = time.perf_counter()
    done, trained_images = 0, 0
    cpi, ev = cfg.classes_per_increment, cfg.eval_batch_size
    for inc in range(start, increments):
        k = (inc + 1) * cpi
        rows = []
        for s, run in enumerate(runs):
            rank = ranks[s]
            train_sel = torch.nonzero(rank[y_train] < k).flatten()
            val_sel = torch.nonzero(rank[y_val] < k).flatten()
            test_sel = torch.nonzero(rank[y_test] < k).flatten()
            xv, yv = x_val[val_sel], rank[y_val[val_sel]]
            xt, yt = x_test[test_sel], rank[y_test[test_sel]]
            max_test = torch.zeros((), dtype=torch.int64, device=device)
            run.start_increment(inc, k)
            learner = run.learner
            net = learner.net
            best = BestWeights(net)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            n = train_sel.shape[0]
            for epoch in range(cfg.epochs):
                learner.set_lr(
                    learning_rate(epoch, cfg.epochs, method.lr, cfg.lr_milestones, cfg.lr_factor)
                )
                net.train()
                perm = train_sel[torch.randperm(n, generator=run.shuffle, device=device)]
                last = epoch == cfg.epochs - 1
                for i in range(0, n, cfg.batch_size):
                    idx = perm[i : i + cfg.batch_size]
                    xb = augment(x_train[idx], run.augment)
                    c = learner.step(xb, rank[y_train[idx]], num_logits=k)
                    if last:
                        correct += c
                best.update(count_correct(net, xv, yv, ev, num_logits=k), epoch)
                max_test = torch.maximum(max_test, count_correct(net, xt, yt, ev, num_logits=k))
                bar.update(1)
            trained_images += n * cfg.epochs
            best.restore()
            test_correct = count_correct(net, xt, yt, ev, num_logits=k)
            m = min(cfg.metric_examples, n)
            pick = train_sel[torch.randperm(n, generator=run.metric, device=device)[:m]]
            metrics = resnet_metrics(net, x_train[pick], ev)
            rows.append(
                {
                    "increment": inc,
                    "classes": k,
                    "accuracy": test_correct.item() / test_sel.shape[0],
                    "max_test_accuracy_over_epochs": max_test.item() / test_sel.shape[0],
                    "best_validation_accuracy": best.score.item() / val_sel.shape[0],
                    "best_epoch": best.epoch.item(),
                    "train_accuracy": correct.item() / n,
                    **{key: v.item() for key, v in metrics.items()},
                    "units_replaced": learner.units_replaced(),
                }
            )
        outputs.append(rows)
        done += 1
        outputs.save_checkpoint({"increment": inc + 1, "seeds": [run.state_dict() for run in runs]})
        if done == stop_after:
            break
    bar.close()
    outputs.close()
    return outputs.summary(
        {
            "benchmark": "incremental_cifar",
            "method": method.method,
            "increments_completed": len(outputs.rows[0]),
            "increments": increments,
        },
        metric="accuracy",
        work=trained_images,
        unit="training_images",
        seconds=time.perf_counter() - t0,
    )
