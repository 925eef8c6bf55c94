"""Online Permuted MNIST (Dohare et al., 2024), many seeds in lockstep.

Task ``k`` of seed ``s`` shows the 60,000 MNIST training images (pixels in [0, 1]) under a fresh
pixel permutation, each once in a random order (:func:`~ppo_cbp.datasets.mnist.permuted_mnist_task`),
one SGD step per example, with no signal at task changes. With ``change_every`` the task changes
every ``change_every`` examples, drawn with replacement
(:func:`~ppo_cbp.datasets.mnist.example_indices`).

Metrics per task and seed (one CSV row):

* ``accuracy``: online accuracy, the fraction of the task's examples whose prediction, made
  *before* the update on that example, is the label (argmax of the logits);
* at the start of the task, on its first ``metric_examples`` (2000) examples before any
  training on them (no dropout): ``dead_units_l`` (units of hidden layer ``l`` whose activation
  is 0 on all of them), ``dead_fraction`` (dead units / all hidden units),
  ``effective_rank_l``, ``stable_rank_l`` and ``approximate_rank_l`` of the ``[2000, units]``
  representation (:mod:`ppo_cbp.metrics`), ``feature_norm`` of the last hidden layer's, and
  ``weight_magnitude`` (sum |w| over all weight matrices / number of weights, biases excluded);
  with ``crelu`` the representation is the ``[2000, 2 * units]`` features
  ``[relu(z), relu(-z)]`` the next layer reads, and a unit is dead when both are 0, i.e. z = 0
  (:func:`~ppo_cbp.metrics.dead_unit_mask`); with ``dff`` the features are ``[sin(z), cos(z)]``
  and no unit is ever dead;
* ``units_replaced``: total units replaced by CBP/ReDo since the start of the run (at the
  end of the task).

With ``online_norm`` the hidden activations of these metrics are the activations after the
normalization with the statistics of the task's start, which measuring does not update.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro
from tqdm import tqdm

from ppo_cbp.benchmarks.autograd_learner import AutogradLearner, make_learner
from ppo_cbp.benchmarks.common import (
    PLASTICITY_DEFAULTS,
    Learner,
    MethodConfig,
    RunOutputs,
    check_seeds,
    config_dict,
    method_flags,
    resolve_device,
    resolve_dtype,
    resolve_method,
    run_label,
)
from ppo_cbp.datasets.mnist import example_indices, load_mnist, permuted_mnist_task
from ppo_cbp.errors import UsageError
from ppo_cbp.metrics import (
    average_weight_magnitude,
    dead_unit_mask,
    feature_norm,
    feature_rank_metrics,
    unit_activations,
)

# Method defaults of the paper's released Permuted MNIST configurations (step size 0.003).
DEFAULTS: dict[str, dict[str, Any]] = {
    "bp": dict(lr=0.003),
    "l2": dict(lr=0.003, weight_decay=1e-4),
    "snp": dict(lr=0.003, weight_decay=1e-4, noise_std=1e-5),
    "cbp": dict(lr=0.003, replacement_rate=1e-6, maturity_threshold=100),
    "redo": dict(lr=0.003),
    "adam": dict(lr=1e-4),
    "dropout": dict(lr=0.003, dropout=0.1),
    # the paper does not state its decays: the Online Normalization authors' recommended values
    "online_norm": dict(lr=0.003, alpha_f=0.999, alpha_b=0.99),
    **PLASTICITY_DEFAULTS,
}


@method_flags(DEFAULTS)
@dataclass
class PermutedMNISTMethodConfig(MethodConfig):
    """Method of Online Permuted MNIST."""


@dataclass
class PermutedMNISTConfig:
    """Online Permuted MNIST; the defaults are the paper's."""

    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds trained together in one process (stacked)."""
    method: Annotated[PermutedMNISTMethodConfig, tyro.conf.arg(name="")] = field(
        default_factory=PermutedMNISTMethodConfig
    )
    """Method and its hyperparameters (flags --method, --lr, --replacement-rate, ...)."""
    tasks: Annotated[
        int | None,
        tyro.conf.arg(help_behavior_hint="(default: 800; with --change-every, 48M / change_every)"),
    ] = None
    """Number of tasks."""
    examples_per_task: int = 60_000
    """Examples per task (a prefix of the task's shuffled pass when below 60,000)."""
    change_every: Annotated[
        int | None, tyro.conf.arg(help_behavior_hint="(default: off, a task is one pass)")
    ] = None
    """Variant: a new task every this many examples, sampled with replacement."""
    width: int = 2000
    """Units per hidden layer."""
    depth: int = 3
    """Number of hidden layers."""
    hidden_sizes: Annotated[
        list[int] | None, tyro.conf.arg(help_behavior_hint="(default: --depth x --width)")
    ] = None
    """Explicit hidden widths (overrides --width and --depth)."""
    metric_examples: int = 2000
    """Examples at each task start on which dead units and ranks are measured."""
    data_dir: Annotated[
        Path | None,
        tyro.conf.arg(
            help_behavior_hint="(default: $PPO_CBP_MNIST_DIR if set, else ~/.cache/ppo_cbp/mnist)"
        ),
    ] = None
    """Folder with the four MNIST .gz files."""
    download: bool = False
    """Download MNIST into --data-dir if missing (MD5-verified)."""
    out: Path = Path("runs/permuted_mnist")
    """Output folder."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the networks run: auto = cuda if available, else cpu."""
    dtype: Literal["float32", "float64"] = "float32"
    """Floating dtype of the networks."""
    resume: bool = False
    """Continue the run saved in --out."""
    checkpoint_every: int = 1
    """Checkpoint every this many tasks (and at the end)."""
    chunk: int = 1000
    """Examples gathered per data chunk (memory vs. overhead; does not change results)."""
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


def hidden_sizes(cfg: PermutedMNISTConfig) -> list[int]:
    if cfg.hidden_sizes is not None:
        return [int(n) for n in cfg.hidden_sizes]
    return [cfg.width] * cfg.depth


def _validate(cfg: PermutedMNISTConfig) -> tuple[int, int]:
    change = cfg.change_every
    if change is not None and change < 1:
        raise UsageError(f"--change-every must be >= 1, got {change}")
    n = change if change is not None else cfg.examples_per_task
    if n < 1:
        raise UsageError(f"--examples-per-task must be >= 1, got {cfg.examples_per_task}")
    tasks = cfg.tasks
    if tasks is None:
        tasks = 800 if change is None else max(1, 48_000_000 // change)
    if tasks < 1:
        raise UsageError(f"--tasks must be >= 1, got {tasks}")
    sizes = hidden_sizes(cfg)
    if not sizes or min(sizes) < 1:
        raise UsageError(
            f"hidden sizes (--width, --depth, --hidden-sizes) must be positive, got {sizes}"
        )
    for name in ("metric_examples", "checkpoint_every", "chunk"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    return tasks, n


@torch.no_grad()
def task_start_metrics(
    learner: Learner | AutogradLearner, x_aug: torch.Tensor
) -> list[dict[str, float]]:
    """The correlates of loss of plasticity on ``x_aug`` (``[S, N, 785]``), one dict per seed.

    The ranks and the feature norm are of each hidden layer's features, what the next layer
    reads (``learner.net.forward``'s: on a CReLU network ``[relu(z), relu(-z)]``, 2 per unit);
    the dead units are of units, each unit's activation the mean magnitude of its features
    (:func:`~ppo_cbp.metrics.unit_activations`; ``|z| / 2`` for CReLU, 0 only where z = 0;
    ``(|sin z| + |cos z|) / 2`` for DFF, never 0).
    """
    _, features = learner.net.forward(x_aug)
    S = x_aug.shape[0]
    rows: list[dict[str, float]] = [{} for _ in range(S)]
    dead_total = torch.zeros(S, dtype=torch.int64, device=x_aug.device)
    units_total = 0
    cols: dict[str, torch.Tensor] = {}
    groups = learner.net.outputs_per_unit
    for i, (f, g) in enumerate(zip(features, groups, strict=True), start=1):
        h = unit_activations(f, g)
        dead = dead_unit_mask(h).sum(-1)
        dead_total += dead
        units_total += h.shape[-1]
        cols[f"dead_units_{i}"] = dead
        ranks = feature_rank_metrics(f)
        cols[f"effective_rank_{i}"] = ranks["effective_rank"]
        cols[f"stable_rank_{i}"] = ranks["stable_rank"]
        cols[f"approximate_rank_{i}"] = ranks["approximate_rank"]
    cols["dead_fraction"] = dead_total.double() / units_total
    cols["feature_norm"] = feature_norm(features[-1])
    cols["weight_magnitude"] = average_weight_magnitude(learner.net.weights(), seed_dims=1)
    host = {k: v.cpu().tolist() for k, v in cols.items()}
    for s in range(S):
        for k, values in host.items():
            rows[s][k] = values[s]
    return rows


def _task_streams(
    seeds: list[int], task: int, n: int, n_data: int, change_every: int | None, device
) -> tuple[torch.Tensor, torch.Tensor]:
    perms, orders = [], []
    for seed in seeds:
        perm, order = permuted_mnist_task(seed, task, n_data, device=device)
        if change_every is not None:
            order = example_indices(seed, task, n, n_data, with_replacement=True, device=device)
        perms.append(perm)
        orders.append(order[:n])
    return torch.stack(perms), torch.stack(orders)


def _gather(images, labels, perm, idx, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Permuted inputs with the ones column ``[S, C, 785]`` and labels ``[S, C]``."""
    S, C = idx.shape
    x = torch.gather(images[idx], 2, perm[:, None, :].expand(S, C, perm.shape[1]))
    x_aug = torch.ones(S, C, perm.shape[1] + 1, device=x.device, dtype=dtype)
    x_aug[..., :-1] = x
    return x_aug, labels[idx]


def run_permuted_mnist(cfg: PermutedMNISTConfig, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) Online Permuted MNIST; returns the summary written to ``summary.json``.

    ``stop_after``: return after this many tasks of this call (for interrupting in tests).
    """
    seeds = check_seeds(cfg.seeds)
    method = resolve_method(cfg.method, DEFAULTS)
    tasks, n = _validate(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype)
    config = config_dict(cfg)
    config["label"] = run_label(cfg, method, lambda m: resolve_method(m, DEFAULTS)).text
    config.update(resolved_method=config_dict(method), resolved_tasks=tasks, task_examples=n)
    outputs = RunOutputs("permuted-mnist", cfg.out, seeds, config, cfg.resume)
    images, labels = load_mnist(cfg.data_dir, "train", download=cfg.download, device=device)
    images = images.to(dtype)
    n_data = images.shape[0]
    sizes = [images.shape[1], *hidden_sizes(cfg), 10]
    start_task = 0
    state = outputs.load_checkpoint(tasks, "task") if cfg.resume else None
    learner = make_learner(
        sizes,
        seeds,
        method,
        loss="cross_entropy",
        device=device,
        dtype=dtype,
        state=None if state is None else state["learner"],
    )
    if state is not None:
        start_task = int(state["task"])
    S = len(seeds)
    outputs.start(f"permuted_mnist {method.method}, {S} seed(s)")
    bar = tqdm(
        total=tasks * n * S,
        initial=start_task * n * S,
        disable=None if cfg.progress else True,  # None: only on a terminal
        unit="ex",
        unit_scale=True,
        desc=f"permuted-mnist {method.method}, examples of {S} seed(s)",
    )
    t0 = time.perf_counter()
    done = 0
    for task in range(start_task, tasks):
        perm, order = _task_streams(seeds, task, n, n_data, cfg.change_every, device)
        m = min(cfg.metric_examples, n)
        x_metric, _ = _gather(images, labels, perm, order[:, :m], dtype)
        rows = task_start_metrics(learner, x_metric)
        del x_metric
        if task > 0:
            learner.task_boundary()
        learner.new_segment()
        correct = torch.zeros(S, dtype=torch.int64, device=device)
        for c0 in range(0, n, cfg.chunk):
            x_aug, y = _gather(images, labels, perm, order[:, c0 : c0 + cfg.chunk], dtype)
            C = y.shape[1]
            logits = torch.empty(S, C, 10, device=device, dtype=dtype)
            for j in range(C):
                learner.step(x_aug[:, j : j + 1], y[:, j : j + 1], out=logits[:, j : j + 1])
            correct += (logits.argmax(-1) == y).sum(1)
            bar.update(C * S)
        accuracy = (correct.double() / n).cpu().tolist()
        replaced = learner.units_replaced().tolist()
        outputs.append(
            [
                {"task": task, "accuracy": accuracy[s], **rows[s], "units_replaced": replaced[s]}
                for s in range(S)
            ]
        )
        done += 1
        last = task == tasks - 1
        if (task + 1) % cfg.checkpoint_every == 0 or last or done == stop_after:
            outputs.save_checkpoint({"learner": learner.state_dict(), "task": task + 1})
        if done == stop_after:
            break
    bar.close()
    outputs.close()
    return outputs.summary(
        {
            "benchmark": "permuted_mnist",
            "method": method.method,
            "tasks_completed": len(outputs.rows[0]),
            "tasks": tasks,
        },
        metric="accuracy",
        work=done * n * S,
        unit="examples",
        seconds=time.perf_counter() - t0,
    )
