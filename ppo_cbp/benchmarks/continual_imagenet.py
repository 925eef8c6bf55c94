"""Continual ImageNet (Dohare et al., 2024): a long sequence of binary tasks on ImageNet 32x32.

Task ``t`` of seed ``s`` is binary classification between the two classes of
:func:`~ppo_cbp.datasets.imagenet32.class_pairs` ``(s)[t]`` (labels 0 and 1), with 600 training
and 100 test images per class (pixels in [0, 1], normalised per channel with the mean and
standard deviation of all training images). At each new task the output layer's weights and
bias are set to zero (and their SGD momentum), then the network trains for 250 epochs over
the task's 1,200 training images in minibatches of 100, reshuffled every epoch (a per-seed
device generator), with SGD (momentum 0.9; step size 0.01, or 0.03 for L2 as in the released
``l2.json``) on the cross-entropy.

Network (Extended Data Table 3): conv 5x5 32, ReLU, max-pool 2; conv 3x3 64, ReLU, max-pool 2;
conv 3x3 128, ReLU, max-pool 2; fully connected 128, ReLU; 128, ReLU; 2 outputs; PyTorch's
default initialisation, for weights and biases alike U(-1/sqrt(fan_in), 1/sqrt(fan_in))
(``torch_default``). Units that CBP or ReDo create start with a zero bias (Algorithm 1). The
``linear`` method is the paper's linear-network baseline: only the output layer on the raw
3,072 pixels, so with the head reset it learns every task from scratch.

Metrics per task and seed (one CSV row):

* ``accuracy``: accuracy on the task's 200 test images after the last epoch;
* ``train_accuracy``: accuracy on the minibatches of the last epoch (before each update);
* at the task's start, before the head reset, on ``metric_examples`` of its training images
  (evenly spaced over both classes; all 1,200 by default): ``dead_units_l`` (units of hidden
  layer ``l``, a conv channel counting as one unit over all (image, position) pairs, whose
  activation is 0 on all of them), ``dead_fraction``
  (over all 480 hidden units), ``effective_rank`` and ``stable_rank`` of the last hidden
  layer's ``[N, 128]`` representation, ``weight_magnitude`` (sum |w| / number of weights over
  the weight matrices and kernels, biases excluded);
* ``units_replaced``: units replaced by CBP/ReDo since the start of the run.

All seeds of a run train together as one stacked network
(:class:`~ppo_cbp.benchmarks.conv_learner.StackedLearner`, S ConvNets as grouped convolutions
and batched matmuls): each seed keeps its own class pairs, data order,
initial weights and CBP/ReDo/Shrink & Perturb randomness, and follows the trajectory it follows
alone. Everything of a task lives on the device; per step there are no host synchronisations
(correct counts are accumulated as tensors and read at the task's end).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro
from torch import Tensor, nn
from tqdm import tqdm

from ppo_cbp.benchmarks.common import (
    PLASTICITY_DEFAULTS,
    MethodConfig,
    ResolvedMethod,
    RunOutputs,
    check_seeds,
    config_dict,
    method_flags,
    resolve_device,
    resolve_dtype,
    run_label,
)
from ppo_cbp.benchmarks.conv_learner import (
    PLASTICITY_METHODS,
    StackedLearner,
    count_correct_per_seed,
    reset_head_,
    resolve_module_method,
)
from ppo_cbp.datasets.augment import normalize
from ppo_cbp.datasets.imagenet32 import channel_stats, class_pairs, load_imagenet32
from ppo_cbp.errors import UsageError
from ppo_cbp.init import init_layer_
from ppo_cbp.metrics import (
    average_weight_magnitude,
    conv_activations_as_samples,
    dead_unit_mask,
    feature_rank_metrics,
)
from ppo_cbp.nets.stacked_sequential import StackedSequential
from ppo_cbp.seeding import TAG_INIT, TAG_SHUFFLE, derive_seed

# The paper's methods (bp, l2, snp, cbp, redo, linear) with its released configurations (SGD
# momentum 0.9; step size 0.01, for L2 0.03); the plasticity methods combine with them
# (cbp+l2_init).
DEFAULTS: dict[str, dict[str, Any]] = {
    "bp": dict(lr=0.01),
    "l2": dict(lr=0.03, weight_decay=3e-6),
    "snp": dict(lr=0.01, weight_decay=1e-5, noise_std=1e-5),
    "cbp": dict(lr=0.01, replacement_rate=3e-4, maturity_threshold=100),
    "redo": dict(lr=0.01),
    "linear": dict(lr=0.01),
    **{name: PLASTICITY_DEFAULTS[name] for name in PLASTICITY_METHODS},
}


@method_flags(DEFAULTS)
@dataclass
class ImageNetMethodConfig(MethodConfig):
    """Method of Continual ImageNet: bp, l2, snp, cbp, redo, or the linear-network baseline,
    alone or with l2_init, parseval, weight_clipping, snp_init, soft_snp, upgd, kron or trac joined
    by + (e.g. cbp+l2_init)."""

    method: str = "bp"
    """Learning method, or several joined with + (linear: the linear-network baseline trained with SGD)."""


# --------------------------------------------------------------------------------------------
# Networks


def imagenet_convnet(
    num_classes: int = 2, generator: torch.Generator | None = None
) -> nn.Sequential:
    """The ConvNet of Extended Data Table 3 (for 3x32x32 inputs), PyTorch's default init
    (``torch_default`` weights and biases)."""
    net = nn.Sequential(
        nn.Conv2d(3, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * 2 * 2, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )
    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            init_layer_(m, "torch_default", generator=generator, bias="torch_default")
    return net


def linear_network(num_classes: int = 2, generator: torch.Generator | None = None) -> nn.Sequential:
    """The linear-network baseline: one Linear layer on the flattened 3x32x32 pixels."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
    init_layer_(net[1], "torch_default", generator=generator, bias="torch_default")
    return net


@torch.no_grad()
def convnet_metrics(net: StackedSequential, x: Tensor) -> dict[str, Tensor]:
    """Dead units per hidden layer, dead fraction, ranks of the last hidden layer, |w| (see
    the module docstring) on ``x`` (``[N, S, ...]``); ``[S]`` tensors on the device."""
    out: dict[str, Tensor] = {}
    _, hidden = net(x)
    if hidden:
        dead_total, units = 0, 0
        for i, h in enumerate(hidden, start=1):
            samples = conv_activations_as_samples(h) if h.dim() == 5 else h
            dead = dead_unit_mask(samples).sum(-1)
            out[f"dead_units_{i}"] = dead
            dead_total = dead_total + dead
            units += samples.shape[-1]
        out["dead_fraction"] = dead_total.double() / units
        ranks = feature_rank_metrics(hidden[-1])
        out["effective_rank"] = ranks["effective_rank"]
        out["stable_rank"] = ranks["stable_rank"]
    out["weight_magnitude"] = average_weight_magnitude(net.weights(), seed_dims=1)
    return out


# --------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class ContinualImageNetConfig:
    """Continual ImageNet; the defaults are the paper's."""

    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds (one network each), trained together as one stacked network."""
    method: Annotated[ImageNetMethodConfig, tyro.conf.arg(name="")] = field(
        default_factory=ImageNetMethodConfig
    )
    """Method and its hyperparameters (flags --method, --lr, --replacement-rate, ...)."""
    tasks: int = 5000
    """Number of binary tasks."""
    epochs: int = 250
    """Epochs per task."""
    batch_size: int = 100
    """Minibatch size."""
    images_per_class: int = 600
    """Training images per class (the first ones of each class)."""
    test_images_per_class: int = 100
    """Test images per class."""
    momentum: float = 0.9
    """SGD momentum."""
    metric_examples: int = 1200
    """Training images of the new task on which the task-start metrics are measured."""
    data_dir: Path = Path("data/imagenet32")
    """Folder with train_data_batch_1..10.npz (+ val_data.npz), or classes/<id>.npy."""
    layout: Literal["auto", "official", "per-class"] = "auto"
    """Data layout (auto: official if train_data_batch_1.npz exists)."""
    test_source: Literal["train", "val"] = "train"
    """Official layout: test images from the training batches (images 600..699 of each class, as the paper's per-class files) or from val_data.npz."""
    out: Path = Path("runs/continual_imagenet")
    """Output folder."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the networks run: auto = cuda if available, else cpu."""
    dtype: Literal["float32", "float64"] = "float32"
    """Floating dtype of the networks and images."""
    resume: bool = False
    """Continue the run saved in --out."""
    checkpoint_every: int = 1
    """Checkpoint every this many tasks (and at the end)."""
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


def _validate(cfg: ContinualImageNetConfig) -> None:
    for name in (
        "tasks",
        "epochs",
        "batch_size",
        "images_per_class",
        "test_images_per_class",
        "metric_examples",
        "checkpoint_every",
    ):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.momentum < 1:
        raise UsageError(f"--momentum must be in [0, 1), got {cfg.momentum}")


def build_imagenet_learner(
    method: ResolvedMethod,
    seeds: list[int],
    momentum: float,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> StackedLearner:
    """The seeds' networks, each initialised from its own generator as if alone, stacked, with
    their optimizer and operator."""
    nets = []
    for seed in seeds:
        g = torch.Generator().manual_seed(derive_seed(seed, TAG_INIT))
        nets.append(
            linear_network(2, g) if "linear" in method.method.split("+") else imagenet_convnet(2, g)
        )
    return StackedLearner(
        nets,
        method,
        seeds=seeds,
        momentum=momentum,
        init="torch_default",
        device=device,
        dtype=dtype,
    )


def run_continual_imagenet(
    cfg: ContinualImageNetConfig, stop_after: int | None = None
) -> dict[str, Any]:
    """Run (or resume) Continual ImageNet; returns the summary written to ``summary.json``.

    All seeds train together as one stacked network
    (:class:`~ppo_cbp.benchmarks.conv_learner.StackedLearner`), each on its own class pairs and
    data order. ``stop_after``: return after this many tasks of this call (for
    interrupting in tests).
    """
    seeds = check_seeds(cfg.seeds)
    method = resolve_module_method(cfg.method, DEFAULTS, {"linear": "bp"})
    _validate(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype)
    config = config_dict(cfg)
    config["label"] = run_label(
        cfg, method, lambda m: resolve_module_method(m, DEFAULTS, {"linear": "bp"})
    ).text
    outputs = RunOutputs("continual-imagenet", cfg.out, seeds, config, cfg.resume)
    data = load_imagenet32(
        cfg.data_dir, cfg.images_per_class, cfg.test_images_per_class, cfg.layout, cfg.test_source
    )
    mean, std = channel_stats(data.train, data.scale)
    config.update(
        resolved_method=config_dict(method),
        num_classes=data.num_classes,
        channel_mean=mean.tolist(),
        channel_std=std.tolist(),
    )
    pairs = [class_pairs(seed, cfg.tasks, data.num_classes) for seed in seeds]
    learner = build_imagenet_learner(method, seeds, cfg.momentum, device, dtype)
    shuffles = [
        torch.Generator(device=device).manual_seed(derive_seed(seed, TAG_SHUFFLE)) for seed in seeds
    ]

    start_task = 0
    state = outputs.load_checkpoint(cfg.tasks, "task") if cfg.resume else None
    if state is not None:
        learner.load_state_dict(state["learner"])
        for shuffle, s in zip(shuffles, state["shuffles"], strict=True):
            shuffle.set_state(s)
        start_task = int(state["task"])
    S = len(seeds)
    outputs.start(f"continual_imagenet {method.method}, {S} seed(s)")

    # float32 statistics, also for float64 networks: the same inputs whatever the dtype
    mean32, std32 = mean.float().tolist(), std.float().tolist()

    def on_device(images: Tensor) -> Tensor:
        x = images.reshape(-1, 3, 32, 32).to(device, non_blocking=True).to(dtype).mul_(data.scale)
        return normalize(x, mean32, std32)

    def both_classes(split: Tensor, task: int) -> Tensor:
        """The task's images of every seed, ``[N, S, 3, 32, 32]``, seed ``s``'s in ``[:, s]``."""
        return torch.stack([on_device(split[list(map(int, p[task]))]) for p in pairs], dim=1)

    n_train, n_test = cfg.images_per_class, cfg.test_images_per_class
    y_train = torch.arange(2, device=device).repeat_interleave(n_train)
    y_test = torch.arange(2, device=device).repeat_interleave(n_test)
    seed_index = torch.arange(S, device=device)
    steps_per_epoch = -(-2 * n_train // cfg.batch_size)
    bar = tqdm(
        total=cfg.tasks * S,
        initial=start_task * S,
        disable=None if cfg.progress else True,  # None: only on a terminal
        unit="task",
        desc=f"continual-imagenet {method.method}, tasks of {S} seed(s)",
    )
    t0 = time.perf_counter()
    done = 0
    for task in range(start_task, cfg.tasks):
        x_train = both_classes(data.train, task)
        x_test = both_classes(data.test, task)
        n = x_train.shape[0]
        m = min(cfg.metric_examples, n)
        pick = torch.linspace(0, n - 1, m, device=device).long()
        metrics = convnet_metrics(learner.net, x_train[pick])
        if task > 0:
            learner.task_boundary()
        reset_head_(learner)
        correct = torch.zeros(S, dtype=torch.int64, device=device)
        x_rows = x_train.view(n * S, 3, 32, 32)  # row j * S + s: image j of seed s
        for epoch in range(cfg.epochs):
            perm = torch.stack([torch.randperm(n, generator=g, device=device) for g in shuffles])
            # one index_select a step gathers every seed's minibatch, seed s's in [:, s]
            rows = (perm.T * S + seed_index).contiguous()
            last = epoch == cfg.epochs - 1
            for i in range(0, n, cfg.batch_size):
                x = x_rows.index_select(0, rows[i : i + cfg.batch_size].view(-1))
                c = learner.step(x.view(-1, S, 3, 32, 32), y_train[perm[:, i : i + cfg.batch_size]])
                if last:
                    correct += c
        test_correct = count_correct_per_seed(learner.net, x_test, y_test, 1000).tolist()
        train_correct = correct.tolist()
        host = {k: v.tolist() for k, v in metrics.items()}
        replaced = learner.units_replaced()
        rows = []
        for s in range(S):
            a, b = (int(c) for c in pairs[s][task])
            rows.append(
                {
                    "task": task,
                    "class_a": a,
                    "class_b": b,
                    "accuracy": test_correct[s] / x_test.shape[0],
                    "train_accuracy": train_correct[s] / n,
                    **{k: v[s] for k, v in host.items()},
                    "units_replaced": replaced[s],
                }
            )
        bar.update(S)
        outputs.append(rows)
        done += 1
        last_task = task == cfg.tasks - 1
        if (task + 1) % cfg.checkpoint_every == 0 or last_task or done == stop_after:
            outputs.save_checkpoint(
                {
                    "task": task + 1,
                    "learner": learner.state_dict(),
                    "shuffles": [g.get_state() for g in shuffles],
                }
            )
        if done == stop_after:
            break
    bar.close()
    outputs.close()
    return outputs.summary(
        {
            "benchmark": "continual_imagenet",
            "method": method.method,
            "tasks_completed": len(outputs.rows[0]),
            "tasks": cfg.tasks,
            "steps_per_task": cfg.epochs * steps_per_epoch,
        },
        metric="accuracy",
        work=done * S * cfg.epochs * 2 * n_train,
        unit="training_images",
        seconds=time.perf_counter() - t0,
    )
