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
minibatches are augmented on the device (:func:`ppo_cbp.datasets.augment.augment`: flip, 4-pixel
reflect padding and crop, rotation 0-15 degrees); validation and test images are not. After
every epoch the validation accuracy on the seen classes is measured (BatchNorm in eval mode);
the weights (parameters and BatchNorm statistics) of the best epoch (the first if tied) are
restored at the end of the increment and the next increment starts from them
(:class:`BestWeights`). The optimizer and CBP state are not restored.

Methods: ``base``; ``head_reset`` (the whole head re-initialised at each increment);
``retrained`` (a fresh network and optimizer at each increment: the reference the paper
plots against); ``snp`` (Shrink & Perturb, noise std 1e-5 with the weight decay); ``cbp``
(replacement rate 1e-5, maturity threshold 1000, contribution utility, on the ResNet's 17 unit
layers; see :func:`ppo_cbp.nets.resnet.resnet_unit_layers`).

Metrics per increment and seed (one CSV row), after restoring the best weights:

* ``accuracy``: test accuracy of the restored weights over the test images of all seen
  classes;
* ``max_test_accuracy_over_epochs``: the largest test accuracy after any epoch of the increment
  (BatchNorm in eval mode), what the paper's released code reports per increment. It selects on
  the test set, so it is an optimistic figure; ``accuracy`` selects on validation only. (The
  released code also measures it on augmented test images; here they are not augmented.)
* ``best_validation_accuracy`` and ``best_epoch``; ``train_accuracy`` (augmented minibatches
  of the last epoch, before each update);
* on ``metric_examples`` (1000) training images of the seen classes (not augmented), one batch
  with BatchNorm in training mode as in the released analysis (batch statistics; the running
  statistics are restored afterwards): ``dead_percentage``, 100 x the dead units over the 17 post-ReLU feature
  layers (stem, every block's inner ReLU and output, the last output taken after global
  pooling) divided by their total width (3,904), a unit (channel) being dead when it is
  non-zero on at most 1% of the (image, position) pairs; ``stable_rank`` and
  ``effective_rank`` of the ``[N, 512]`` penultimate (pooled) representation;
* ``weight_magnitude`` (mean |w| over conv and linear weights), ``units_replaced``.

All seeds of a run train together as one stacked network
(:class:`~ppo_cbp.nets.stacked_resnet.StackedResNet18` in a
:class:`~ppo_cbp.benchmarks.conv_learner.StackedLearner`): each seed keeps its own class
order, data order, head rows, augmentation draws (:func:`~ppo_cbp.datasets.augment.augment_seeds`),
best-validation epoch and CBP/Shrink & Perturb randomness, and follows the trajectory it follows
alone. One seed is the case S = 1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import tyro
from torch import Tensor, nn
from tqdm import tqdm

from ppo_cbp.benchmarks.common import (
    MethodConfig,
    RunOutputs,
    check_seeds,
    config_dict,
    method_flags,
    resolve_device,
    resolve_dtype,
    run_label,
)
from ppo_cbp.benchmarks.conv_learner import StackedLearner, resolve_module_method
from ppo_cbp.datasets.augment import augment_seeds, normalize
from ppo_cbp.datasets.cifar100 import CIFAR100_MEAN, CIFAR100_STD, load_cifar100, per_class_split
from ppo_cbp.errors import UsageError
from ppo_cbp.metrics import (
    average_weight_magnitude,
    conv_activations_as_samples,
    feature_rank_metrics,
    layer_weights,
    unit_activity,
)
from ppo_cbp.nets.resnet import ResNet18
from ppo_cbp.nets.stacked_resnet import StackedResNet18
from ppo_cbp.seeding import (
    STREAM_CLASS_ORDER,
    TAG_AUGMENT,
    TAG_HEAD,
    TAG_METRIC_EXAMPLES,
    TAG_SHUFFLE,
    derive_seed,
    increment_init_tag,
    task_rng,
)

DEFAULTS: dict[str, dict[str, Any]] = {
    "base": dict(lr=0.1, weight_decay=5e-4),
    "head_reset": dict(lr=0.1, weight_decay=5e-4),
    "retrained": dict(lr=0.1, weight_decay=5e-4),
    "snp": dict(lr=0.1, weight_decay=5e-4, noise_std=1e-5),
    "cbp": dict(lr=0.1, weight_decay=5e-4, replacement_rate=1e-5, maturity_threshold=1000),
}
ALIASES = {"base": "bp", "head_reset": "bp", "retrained": "bp"}
"""The methods that are plain backpropagation under another name (they differ in what happens
to the head, or the whole network, at a new increment)."""


@method_flags(DEFAULTS)
@dataclass
class CIFARMethodConfig(MethodConfig):
    """Method of class-incremental CIFAR-100."""

    method: Literal["base", "head_reset", "retrained", "snp", "cbp"] = "base"  # type: ignore[assignment]
    """Learning method."""
    utility: Literal["contribution", "adaptable_contribution"] = "contribution"
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
    keys = task_rng(seed, 0, STREAM_CLASS_ORDER).bit_generator.random_raw(len(classes))
    return np.asarray(classes)[np.argsort(keys, kind="stable")]


def seen_classes(order: np.ndarray, increment: int, classes_per_increment: int) -> np.ndarray:
    """The classes trained on in ``increment`` (0-based): the first ``(i + 1) * c`` of the order."""
    return order[: (increment + 1) * classes_per_increment]


class BestWeights:
    """Per seed, the module's state (parameters and buffers) at the epoch with its best
    validation score.

    ``score`` is a device tensor, ``[S]`` for a stacked module whose every state entry has a
    leading seed dimension (a scalar for one network). :meth:`update` keeps, for every seed
    whose score is strictly larger than its every earlier one, a copy of its slice of the
    state, without reading the scores on the host; :meth:`restore` loads the kept state back.
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
            b = better.view(better.shape + (1,) * (v.dim() - better.dim()))
            self.state[k].copy_(torch.where(b, v, self.state[k]))
        self.score = torch.where(better, score, self.score)
        self.epoch = torch.where(better, torch.full_like(self.epoch, epoch), self.epoch)

    def restore(self) -> None:
        self.module.load_state_dict(self.state)


@torch.no_grad()
def reinit_head_rows_(
    learner: StackedLearner, rows: slice, generators: Sequence[torch.Generator]
) -> None:
    """Redraw ``rows`` of every seed's head like its initialisation (Kaiming normal, linear
    gain; seed ``s``'s rows from ``generators[s]``), bias and momentum of those rows 0."""
    w, b = learner.net.head()
    n = len(range(*rows.indices(w.shape[1])))
    for s, g in enumerate(generators):
        fresh = torch.randn(n, w.shape[2], generator=g, device=g.device, dtype=w.dtype)
        w[s, rows] = fresh.to(w.device) / w.shape[2] ** 0.5
    for p in (w, b):
        if p is b:
            p[:, rows] = 0.0
        buf = learner.momentum_buffer(p)
        if buf is not None:
            buf[:, rows] = 0.0


def resnet_feature_taps(model: ResNet18) -> list[nn.Module]:
    """The 17 post-ReLU modules: the stem's ReLU, then per block its inner and output ReLU."""
    taps: list[nn.Module] = [model.stem[2]]
    for block in model.blocks:
        taps += [block.relu1, block.relu2]
    return taps


@torch.no_grad()
def count_correct(
    net: StackedResNet18, x: Tensor, sel: Tensor, y: Tensor, batch: int, num_logits: int
) -> Tensor:
    """Correct predictions per seed (``[S]``, on the device) of ``net`` in eval mode on the
    images ``x[sel[s]]`` with labels ``y[s]`` (``sel``, ``y``: ``[S, N]``), in chunks."""
    was_training = net.training
    net.eval()
    correct = torch.zeros(sel.shape[0], dtype=torch.int64, device=x.device)
    for i in range(0, sel.shape[1], batch):
        logits, _ = net(x[sel[:, i : i + batch].T])
        correct += (logits[..., :num_logits].argmax(-1) == y[:, i : i + batch]).sum(1)
    net.train(was_training)
    return correct


@torch.no_grad()
def resnet_metrics(net: StackedResNet18, x: Tensor) -> dict[str, Tensor]:
    """``dead_percentage``, ranks of the pooled features and weight magnitude per seed (see the
    module docstring) on ``x`` (``[N, S, 3, H, W]``), ``[S]`` tensors.

    As in the paper's released analysis, ``x`` is one batch and BatchNorm normalises with that
    batch's statistics (training mode); the running statistics are left as they were.
    """
    was_training = net.training
    saved = [(t, t.clone()) for t in net.buffers()]
    net.train()
    try:
        # a (image, position) fraction per conv layer as soon as it is computed: 1000 images
        # of every layer's output at once would cost gigabytes
        features, activity = net.features(
            x, reduce=lambda h: unit_activity(conv_activations_as_samples(h))
        )
    finally:
        for t, value in saved:
            t.copy_(value)
        net.train(was_training)
    # the last block's output enters the head through the global pool
    activity[-1] = unit_activity(features)
    dead = sum((a <= 0.01).sum(-1) for a in activity)
    width = sum(a.shape[-1] for a in activity)
    ranks = feature_rank_metrics(features)
    return {
        "dead_percentage": 100.0 * dead.double() / width,
        "stable_rank": ranks["stable_rank"],
        "effective_rank": ranks["effective_rank"],
        "weight_magnitude": average_weight_magnitude(
            [w for _, w in layer_weights(net, seed_dims=1)], seed_dims=1
        ),
    }


@dataclass
class IncrementalCIFARConfig:
    """Class-incremental CIFAR-100; the defaults are the paper's."""

    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds (one network each), trained together as one stacked network."""
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
    """Chunk size of validation and test passes (does not change results)."""
    momentum: float = 0.9
    """SGD momentum."""
    lr_milestones: tuple[float, ...] = (0.3, 0.6, 0.8)
    """Fractions of an increment's epochs at which the step size is multiplied by lr_factor."""
    lr_factor: float = 0.2
    """Step-size decay factor at each milestone."""
    metric_examples: int = 1000
    """Training images of the seen classes on which dead units and ranks are measured: one batch, BatchNorm using its statistics as the released analysis (which never calls eval()) does; the running statistics are left unchanged."""
    data_dir: Path = Path("data/cifar100")
    """Folder with cifar-100-python/{train,test,meta} (or the three files)."""
    download: bool = False
    """Download and MD5-check the canonical archive into --data-dir if missing."""
    out: Path = Path("runs/incremental_cifar")
    """Output folder."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the networks run: auto = cuda if available, else cpu."""
    dtype: Literal["float32", "float64"] = "float32"
    """Floating dtype of the networks and images."""
    resume: bool = False
    """Continue the run saved in --out."""
    progress: bool = True
    """Show a progress bar on a terminal; none when stderr is not a terminal."""
    track: bool = False
    """Also log the config and each seed's scalars to one W&B run (pip install -e '.[wandb]')."""
    wandb_project_name: str = "ppo_cbp"
    """W&B project of --track."""
    wandb_entity: Annotated[
        str | None, tyro.conf.arg(help_behavior_hint="(default: your W&B default entity)")
    ] = None
    """W&B entity (team) of --track."""


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
        torch.manual_seed(derive_seed(seed, increment_init_tag(increment)))
        return ResNet18(num_classes=100)


def run_incremental_cifar(
    cfg: IncrementalCIFARConfig, stop_after: int | None = None
) -> dict[str, Any]:
    """Run (or resume) class-incremental CIFAR-100; returns the summary (``summary.json``).

    ``stop_after``: return after this many increments of this call (for interrupting in tests).
    """
    seeds = check_seeds(cfg.seeds)
    method = resolve_module_method(cfg.method, DEFAULTS, ALIASES)
    _validate(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype)
    config = config_dict(cfg)
    config["label"] = run_label(
        cfg, method, lambda m: resolve_module_method(m, DEFAULTS, ALIASES)
    ).text
    outputs = RunOutputs("incremental-cifar", cfg.out, seeds, config, cfg.resume)
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
        x = torch.from_numpy(images).to(device).to(dtype).div_(255.0)
        return normalize(x, CIFAR100_MEAN, CIFAR100_STD), torch.from_numpy(labels).to(device)

    x_train, y_train = on_device(data.train_images[train_idx], data.train_labels[train_idx])
    x_val, y_val = on_device(data.train_images[val_idx], data.train_labels[val_idx])
    x_test, y_test = on_device(data.test_images[test_idx], data.test_labels[test_idx])
    del data

    config.update(resolved_method=config_dict(method), resolved_increments=increments)

    def build_learner(increment: int) -> StackedLearner:
        return StackedLearner(
            [build_resnet(seed, increment) for seed in seeds],
            method,
            seeds=seeds,
            momentum=cfg.momentum,
            init="kaiming_normal",
            device=device,
            dtype=dtype,
        )

    def generators(tag: int) -> list[torch.Generator]:
        return [torch.Generator(device=device).manual_seed(derive_seed(s, tag)) for s in seeds]

    shuffles, augments = generators(TAG_SHUFFLE), generators(TAG_AUGMENT)
    heads, metric_picks = generators(TAG_HEAD), generators(TAG_METRIC_EXAMPLES)
    every_generator = [shuffles, augments, heads, metric_picks]
    start = 0
    state = outputs.load_checkpoint(increments, "increment") if cfg.resume else None
    if state is not None:
        start = int(state["increment"])
    learner = build_learner(max(start - 1, 0))
    if state is not None:
        learner.load_state_dict(state["learner"])
        for gens, states in zip(every_generator, state["generators"], strict=True):
            for g, st in zip(gens, states, strict=True):
                g.set_state(st)
    S = len(seeds)
    outputs.start(f"incremental_cifar {method.method}, {S} seed(s)")
    # ranks[s, c]: position of class c in seed s's order (its output unit); 100 = unused
    ranks = torch.full((S, 100), 100, dtype=torch.int64)
    for s, seed in enumerate(seeds):
        ranks[s, torch.from_numpy(class_order(seed, classes))] = torch.arange(len(classes))
    ranks = ranks.to(device)

    def seen(y: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Per seed, the indices of the images of its first ``k`` classes and their labels
        (the classes' positions in its order), ``[S, N]`` each (N is the same for all)."""
        sel = torch.stack([torch.nonzero(ranks[s, y] < k).flatten() for s in range(S)])
        return sel, ranks.gather(1, y[sel])

    bar = tqdm(
        total=increments * cfg.epochs * S,
        initial=start * cfg.epochs * S,
        disable=None if cfg.progress else True,  # None: only on a terminal
        unit="epoch",
        desc=f"incremental-cifar {method.method}, epochs of {S} seed(s)",
    )
    t0 = time.perf_counter()
    done, trained_images = 0, 0
    cpi, ev = cfg.classes_per_increment, cfg.eval_batch_size
    for inc in range(start, increments):
        k = (inc + 1) * cpi
        if inc > 0:
            if method.method == "retrained":
                learner = build_learner(inc)
            elif method.method == "head_reset":
                reinit_head_rows_(learner, slice(0, None), heads)
            else:
                reinit_head_rows_(learner, slice(k - cpi, k), heads)
        train_sel, _ = seen(y_train, k)
        val_sel, yv = seen(y_val, k)
        test_sel, yt = seen(y_test, k)
        net = learner.net
        best = BestWeights(net)
        max_test = torch.zeros(S, dtype=torch.int64, device=device)
        correct = torch.zeros(S, dtype=torch.int64, device=device)
        n = train_sel.shape[1]
        for epoch in range(cfg.epochs):
            learner.set_lr(
                learning_rate(epoch, cfg.epochs, method.lr, cfg.lr_milestones, cfg.lr_factor)
            )
            net.train()
            perm = torch.stack(
                [
                    train_sel[s, torch.randperm(n, generator=g, device=device)]
                    for s, g in enumerate(shuffles)
                ]
            )
            last = epoch == cfg.epochs - 1
            for i in range(0, n, cfg.batch_size):
                idx = perm[:, i : i + cfg.batch_size]
                xb = augment_seeds(x_train[idx.T], augments)
                c = learner.step(xb, ranks.gather(1, y_train[idx]), num_logits=k)
                if last:
                    correct += c
            best.update(count_correct(net, x_val, val_sel, yv, ev, k), epoch)
            max_test = torch.maximum(max_test, count_correct(net, x_test, test_sel, yt, ev, k))
            bar.update(S)
        trained_images += S * n * cfg.epochs
        best.restore()
        test_correct = count_correct(net, x_test, test_sel, yt, ev, k)
        m = min(cfg.metric_examples, n)
        pick = torch.stack(
            [
                train_sel[s, torch.randperm(n, generator=g, device=device)[:m]]
                for s, g in enumerate(metric_picks)
            ]
        )
        metrics = resnet_metrics(net, x_train[pick.T])
        host = {key: v.tolist() for key, v in metrics.items()}
        n_val, n_test = val_sel.shape[1], test_sel.shape[1]
        test_c, max_c, best_c = test_correct.tolist(), max_test.tolist(), best.score.tolist()
        best_epoch, train_c = best.epoch.tolist(), correct.tolist()
        replaced = learner.units_replaced()
        rows = [
            {
                "increment": inc,
                "classes": k,
                "accuracy": test_c[s] / n_test,
                "max_test_accuracy_over_epochs": max_c[s] / n_test,
                "best_validation_accuracy": best_c[s] / n_val,
                "best_epoch": best_epoch[s],
                "train_accuracy": train_c[s] / n,
                **{key: v[s] for key, v in host.items()},
                "units_replaced": replaced[s],
            }
            for s in range(S)
        ]
        outputs.append(rows)
        done += 1
        outputs.save_checkpoint(
            {
                "increment": inc + 1,
                "learner": learner.state_dict(),
                "generators": [[g.get_state() for g in gens] for gens in every_generator],
            }
        )
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
