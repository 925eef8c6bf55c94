"""What the supervised benchmarks share: methods, the stacked learner, outputs and checkpoints.

A run trains S seeds in lockstep (:mod:`ppo_cbp.nets.stacked_mlp`) and writes, under ``out``:

* ``config.json``: the resolved configuration (every default filled in);
* ``seed_<seed>/metrics.csv``: one row per task (or bin), every metric a column;
* ``seed_<seed>/tb/``: the same metrics as TensorBoard scalars, step = task (or bin) index;
* ``summary.json``: per seed the last row, each metric's mean over the rows and the units
  replaced so far; over seeds the mean and standard error of each metric's last value; the
  speed of this call, per seed and for all seeds (:meth:`RunOutputs.summary`);
* ``checkpoint.pt``: everything needed to continue exactly, and the subcommand that wrote it
  (written atomically at task boundaries and read with ``weights_only=True``, by
  :mod:`ppo_cbp.run_folder`, as are ``config.json``, ``summary.json``, the resume checks and
  the TensorBoard writers).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro
from torch import Tensor

from ppo_cbp import run_folder, tracking
from ppo_cbp.benchmarks.fused_injection import FusedInjection
from ppo_cbp.errors import UsageError
from ppo_cbp.formatting import count, duration, measured
from ppo_cbp.nets import kernels
from ppo_cbp.nets.stacked_mlp import StackedMLP, StackedTrainer
from ppo_cbp.plasticity import suite
from ppo_cbp.plasticity.cbp import UTILITIES, ContinualBackprop
from ppo_cbp.plasticity.hooks import Layer, Network
from ppo_cbp.plasticity.kron import Kron
from ppo_cbp.plasticity.normalize_project import NormalizeAndProject
from ppo_cbp.plasticity.redo import ReDo, WindowedReDo
from ppo_cbp.plasticity.trac import TRAC
from ppo_cbp.plasticity.upgd import UPGD
from ppo_cbp.seeding import TAG_CBP, TAG_REDO, derive_seed

METHODS = tuple(name for name, m in suite.METHODS.items() if m.flag != "--c-chain")
"""Every method name of ``--method`` (the suite's, less PPO's C-CHAIN); a combination joins
names with ``+``."""
FUSED_METHODS = tuple(name for name in METHODS if name in suite.FUSED)
"""The methods :class:`~ppo_cbp.nets.stacked_mlp.StackedTrainer` runs by hand (its fast path)."""
PLASTICITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "l2_init": dict(l2_init=1e-2),
    "snp_init": dict(shrink_perturb_init=0.5),
    "soft_snp": dict(soft_shrink_perturb=0.999999),
    "parseval": dict(parseval=1e-3),
    "weight_clipping": dict(weight_clipping=1.0),
    "head_reset": dict(head_reset=1),
    "adam_reset": {},
    "layer_norm": {},
    "nap": {},
    "crelu": {},
    "dff": {},
    "injection": dict(injection_layers=2),
    # sigma and beta: the UPGD repository README's stand-alone optimizer; the step size is ours
    "upgd": dict(lr=0.01, upgd_sigma=1e-3, upgd_beta_utility=0.999),
    # kron_torch's defaults; lr 3e-4, kron_torch's and Plasticine's (its continual DMC PPO)
    "kron": dict(lr=3e-4, kron_b1=0.9, kron_precond_lr=0.1, kron_max_size_triangular=8192),
    "trac": {},
}
"""The MLP benchmarks' defaults of the :mod:`ppo_cbp.plasticity` operators: their sources'."""
OPTIMIZERS = ("adam", "upgd", "kron")
"""Methods that are the optimizer (at most one); the others run on SGD or on it."""
CONTRADICTIONS = suite.CONTRADICTIONS


def parse_methods(spec: str, available: Sequence[str]) -> tuple[str, ...]:
    """The method names of ``spec`` (``"cbp"``, ``"cbp+l2_init+layer_norm"``), checked.

    :raises UsageError: an unknown or repeated name, ``bp`` with others (it is the baseline
        alone), or two names that contradict each other (:data:`CONTRADICTIONS`).
    """
    names = tuple(n.strip() for n in str(spec).split("+"))
    for n in names:
        if n not in METHODS or n not in available:
            raise UsageError(
                f"unknown method {n!r} in --method {spec}; expected one of "
                f"{', '.join(available)}, or several joined with +"
            )
    if len(set(names)) != len(names):
        raise UsageError(f"--method {spec} names a method twice")
    if "bp" in names and len(names) > 1:
        raise UsageError(f"--method {spec}: bp is plain backprop alone; leave it out")
    try:
        suite.check_combination(names)
    except UsageError as e:
        raise UsageError(f"--method {spec}: {e}") from None
    return names


@dataclass
class MethodConfig:
    """The learning method and its hyperparameters; ``None`` means the benchmark's default.

    Methods: ``bp`` (SGD), ``l2`` (SGD + coupled L2), ``snp`` (Shrink & Perturb: SGD + L2 +
    Gaussian noise after every step), ``cbp`` (SGD + continual backprop), ``redo`` (SGD +
    ReDo), ``adam`` (Adam), ``dropout`` (SGD + dropout on every hidden layer), ``online_norm``
    (SGD + online normalization after every hidden linear layer, before the activation;
    :mod:`ppo_cbp.nets.online_norm`; Permuted MNIST only); and the operators of
    :mod:`ppo_cbp.plasticity`: ``l2_init`` (L2 toward the initial parameters), ``snp_init``
    (shrink toward a fresh initialisation at task boundaries), ``soft_snp`` (the same after
    every update), ``parseval`` (Parseval
    regularisation), ``weight_clipping``, ``head_reset`` (reinitialise the last layers at task
    boundaries), ``adam_reset`` (Adam's moments and step count reset at task boundaries),
    ``layer_norm`` (LayerNorm before every hidden activation), ``nap`` (Normalize-and-Project),
    ``crelu`` (concatenated ReLU), ``dff`` (deep Fourier features, ``[sin z, cos z]``),
    ``injection`` (plasticity injection at task boundaries), ``upgd`` (utility-based perturbed
    gradient descent), ``kron`` (the PSGD Kron optimizer) and ``trac`` (TRAC around SGD, Adam
    or Kron). Several combine with ``+`` (``cbp+l2_init+layer_norm``); the optimizer is SGD
    unless one of them is ``adam``, ``upgd`` or ``kron``.
    """

    method: str = "bp"
    """Learning method, or several joined with + (e.g. cbp+l2_init+layer_norm)."""
    lr: float | None = None
    """Step size."""
    weight_decay: float | None = None
    """Coupled L2 coefficient."""
    noise_std: float | None = None
    """Shrink & Perturb's noise standard deviation."""
    replacement_rate: float | None = None
    """CBP's replacement rate rho: the fraction of the mature units replaced per update (one optimizer step on one minibatch; a minibatch is one example in the online benchmarks)."""
    maturity_threshold: int | None = None
    """CBP's maturity threshold m: a unit can be replaced once it has lived this many updates (optimizer steps, one per minibatch)."""
    decay_rate: float = 0.99
    """CBP's utility decay rate eta."""
    utility: Literal["contribution", "adaptable_contribution"] = "adaptable_contribution"
    """CBP's utility measure."""
    redo_threshold: float = 0.1
    """ReDo's tau; the dormant score is computed on the last redo_period examples."""
    redo_period: int = 100
    """ReDo recycles every redo_period updates (optimizer steps, one per minibatch)."""
    dropout: float | None = None
    """Dropout probability (dropout method)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    adam_eps: float = 1e-8
    """Adam's epsilon."""
    alpha_f: float | None = None
    """Online normalization's forward decay alpha_f (running mean and variance), in (0, 1); default 0.999, the authors' recommended value (the loss-of-plasticity paper does not state its own)."""
    alpha_b: float | None = None
    """Online normalization's backward decay alpha_b (the two gradient control processes), in (0, 1); default 0.99, the authors' recommended value."""
    l2_init: float | None = None
    """L2-Init's coefficient lambda of (lambda/2) ||theta - theta_0||^2."""
    shrink_perturb_init: Annotated[float | None, tyro.conf.arg(aliases=("--shrink",))] = None
    """snp_init's alpha in theta <- alpha theta + (1 - alpha) theta_fresh, at every task boundary (formerly --shrink)."""
    soft_shrink_perturb: Annotated[float | None, tyro.conf.arg(aliases=("--soft-shrink",))] = None
    """soft_snp's alpha in theta <- alpha theta + (1 - alpha) theta_fresh, after every update (formerly --soft-shrink)."""
    parseval: float | None = None
    """Parseval regularisation's coefficient lambda of lambda ||W W^T - s I||_F^2."""
    weight_clipping: Annotated[float | None, tyro.conf.arg(aliases=("--clip-kappa",))] = None
    """Weight clipping's kappa: weights stay within kappa times their layer's initial bound (formerly --clip-kappa)."""
    head_reset: Annotated[int | None, tyro.conf.arg(aliases=("--reset-layers",))] = None
    """head_reset: how many of the last weight layers are reinitialised at a task boundary (formerly --reset-layers)."""
    injection_layers: int | None = None
    """Plasticity injection: how many of the last weight layers form the injected head."""
    upgd_sigma: float | None = None
    """UPGD's perturbation noise standard deviation."""
    upgd_beta_utility: float | None = None
    """UPGD's utility trace decay."""
    kron_b1: float | None = None
    """Kron's momentum b1 in [0, 1); default 0.9, kron_torch's (Plasticine keeps it)."""
    kron_precond_lr: float | None = None
    """Kron's preconditioner step size; default 0.1, kron_torch's (Plasticine keeps it)."""
    kron_max_size_triangular: int | None = None
    """Kron: a dimension wider than this gets a diagonal factor instead of a triangular one (O(d) instead of O(d^3) per update); default 8192, kron_torch's (Plasticine keeps it)."""


# The method that uses a method flag; the flags of methods a benchmark lacks are hidden.
USED_BY = suite.SETTINGS
# What :func:`resolve_method` takes for a flag that neither the user nor ``defaults`` sets.
FALLBACK = {"weight_decay": 0.0}


def default_hint(defaults: dict[str, dict[str, Any]], name: str) -> str:
    """The ``--help`` note on the default of method flag ``name``: its value per method, as
    :func:`resolve_method` picks it from ``defaults``, e.g. ``(default per method: bp/l2 0.01,
    adam 0.001)``; methods that do not use the flag are left out."""
    groups: dict[Any, list[str]] = {}
    for method, d in defaults.items():
        if name in d:
            groups.setdefault(d[name], []).append(method)
        elif name in FALLBACK:
            groups.setdefault(FALLBACK[name], []).append(method)
        elif name == "lr" and "bp" in defaults:  # a method that is not the optimizer: SGD's
            groups.setdefault(defaults["bp"]["lr"], []).append(method)
    return "(default per method: {})".format(
        ", ".join(f"{'/'.join(ms)} {v:g}" for v, ms in groups.items())
    )


def method_flags(defaults: dict[str, dict[str, Any]]):
    """Class decorator: a subclass of a :class:`MethodConfig` whose ``--help`` tells the truth
    for a benchmark with method defaults ``defaults``. A flag left ``None`` states each
    method's default (:func:`default_hint`); a flag whose core method (:data:`USED_BY`) the
    benchmark lacks is hidden (it keeps its default). Fields and values are unchanged."""

    def wrap(cls: type[MethodConfig]) -> type[MethodConfig]:
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = []
        for f in dataclasses.fields(cls):
            user = USED_BY.get(f.name)
            if user is not None and user not in defaults:
                note: Any = tyro.conf.Suppress
            elif f.default is None:
                note = tyro.conf.arg(help_behavior_hint=default_hint(defaults, f.name))
            else:
                continue
            kept = dataclasses.field(default=f.default, default_factory=f.default_factory)
            fields.append((f.name, Annotated[hints[f.name], note], kept))
        new = dataclasses.make_dataclass(cls.__name__, fields, bases=(cls,))
        # the original's name and module: tyro finds the field docstrings in its source
        new.__module__, new.__qualname__, new.__doc__ = (
            cls.__module__,
            cls.__qualname__,
            cls.__doc__,
        )
        return new

    return wrap


@dataclass
class ResolvedMethod:
    method: str
    optimizer: str
    lr: float
    weight_decay: float = 0.0
    noise_std: float = 0.0
    dropout: float = 0.0
    replacement_rate: float = 0.0
    maturity_threshold: int = 0
    decay_rate: float = 0.99
    utility: str = "adaptable_contribution"
    redo_threshold: float = 0.1
    redo_period: int = 100
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    alpha_f: float = 0.999
    alpha_b: float = 0.99
    l2_init: float = 0.0
    shrink_perturb_init: float = 1.0
    soft_shrink_perturb: float = 1.0
    parseval: float = 0.0
    weight_clipping: float = 0.0
    head_reset: int = 1
    injection_layers: int = 2
    upgd_sigma: float = 0.0
    upgd_beta_utility: float = 0.999
    kron_b1: float = 0.9
    kron_precond_lr: float = 0.1
    kron_max_size_triangular: int = 8192
    methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.methods:
            self.methods = tuple(self.method.split("+"))

    def uses(self, name: str) -> bool:
        return name in self.methods

    def settings(self) -> dict[str, Any]:
        """The methods' settings by their :data:`~ppo_cbp.plasticity.suite.SETTINGS` names."""
        return {name: getattr(self, name) for name in suite.SETTINGS if hasattr(self, name)}


def resolve_method(cfg: MethodConfig, defaults: dict[str, dict[str, Any]]) -> ResolvedMethod:
    """Fill ``cfg``'s unset values from the defaults of its methods and check every value.

    A combination takes each method's defaults in the order given (``defaults[name]``), and
    the step size of its optimizer (``adam``, ``upgd`` or ``kron``), else of the first method that
    states one, else of ``bp``.
    """
    names = parse_methods(cfg.method, list(defaults))
    plain = type(cfg)()
    given = [
        f.name
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) is not None and getattr(cfg, f.name) != getattr(plain, f.name)
    ]
    suite.check_settings(names, given, spell=lambda m: f"--method {m}")
    d: dict[str, Any] = {}
    for name in names:
        d.update(defaults[name])
    optimizer = next((n for n in names if n in OPTIMIZERS), "sgd")
    stated = [n for n in names if "lr" in defaults[n]]
    base = optimizer if optimizer != "sgd" else (stated[0] if stated else "bp")
    d["lr"] = defaults[base]["lr"]

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(cfg, name)
        return d.get(name, fallback) if value is None else value

    def used(name: str, fallback: Any) -> Any:
        return pick(name, fallback) if USED_BY[name] in names else fallback

    r = ResolvedMethod(
        method="+".join(names),
        methods=names,
        optimizer=optimizer,
        lr=float(pick("lr", d["lr"])),
        weight_decay=float(pick("weight_decay", 0.0)),
        noise_std=float(used("noise_std", 0.0)),
        dropout=float(used("dropout", 0.0)),
        replacement_rate=float(pick("replacement_rate", 0.0)),
        maturity_threshold=int(pick("maturity_threshold", 100)),
        decay_rate=cfg.decay_rate,
        utility=cfg.utility,
        redo_threshold=cfg.redo_threshold,
        redo_period=cfg.redo_period,
        adam_betas=tuple(cfg.adam_betas),
        adam_eps=cfg.adam_eps,
        alpha_f=float(pick("alpha_f", 0.999)),
        alpha_b=float(pick("alpha_b", 0.99)),
        l2_init=float(used("l2_init", 0.0)),
        shrink_perturb_init=float(used("shrink_perturb_init", 1.0)),
        soft_shrink_perturb=float(used("soft_shrink_perturb", 1.0)),
        parseval=float(used("parseval", 0.0)),
        weight_clipping=float(used("weight_clipping", 0.0)),
        head_reset=int(used("head_reset", 1)),
        injection_layers=int(used("injection_layers", 2)),
        upgd_sigma=float(used("upgd_sigma", 0.0)),
        upgd_beta_utility=float(used("upgd_beta_utility", 0.999)),
        kron_b1=float(used("kron_b1", 0.9)),
        kron_precond_lr=float(used("kron_precond_lr", 0.1)),
        kron_max_size_triangular=int(used("kron_max_size_triangular", 8192)),
    )
    checks = [
        ("lr", r.lr > 0),
        ("weight_decay", r.weight_decay >= 0),
        ("noise_std", r.noise_std >= 0),
        ("dropout", 0 <= r.dropout < 1),
        ("replacement_rate", 0 <= r.replacement_rate <= 1),
        ("maturity_threshold", r.maturity_threshold >= 0),
        ("decay_rate", 0 <= r.decay_rate < 1),
        ("redo_threshold", r.redo_threshold >= 0),
        ("redo_period", r.redo_period >= 1),
        ("alpha_f", 0 < r.alpha_f < 1),
        ("alpha_b", 0 < r.alpha_b < 1),
        ("l2_init", r.l2_init >= 0),
        ("shrink_perturb_init", 0 <= r.shrink_perturb_init <= 1),
        ("soft_shrink_perturb", 0 <= r.soft_shrink_perturb <= 1),
        ("parseval", r.parseval >= 0),
        ("weight_clipping", r.weight_clipping > 0 or not r.uses("weight_clipping")),
        ("head_reset", r.head_reset >= 1),
        ("injection_layers", r.injection_layers >= 1),
        ("upgd_sigma", r.upgd_sigma >= 0),
        ("upgd_beta_utility", 0 <= r.upgd_beta_utility < 1),
        ("kron_b1", 0 <= r.kron_b1 < 1),
        ("kron_precond_lr", r.kron_precond_lr > 0),
        ("kron_max_size_triangular", r.kron_max_size_triangular >= 0),
    ]
    for name, ok in checks:
        if not ok or (isinstance(getattr(r, name), float) and math.isnan(getattr(r, name))):
            raise UsageError(f"{name} = {getattr(r, name)} is out of range for {r.method}")
    if r.utility not in UTILITIES:
        raise UsageError(f"unknown utility {r.utility!r}; expected one of {', '.join(UTILITIES)}")
    return r


# Configuration fields that do not define an experiment (where it writes, which seeds, how
# long it runs): left out of its label.
NOT_IN_LABEL = frozenset(
    {"out", "seeds", "device", "progress", "resume", "data_dir", "download", "chunk", "label"}
    | {"track", "wandb_project_name", "wandb_entity"}
    | {"tasks", "examples", "bins", "method"}
)


def run_label(
    cfg: Any, method: ResolvedMethod, resolve: Callable[[MethodConfig], ResolvedMethod]
) -> suite.Label:
    """The label of a run's configuration (:class:`~ppo_cbp.plasticity.suite.Label`): the
    methods of ``--method`` and every setting that differs from the benchmark's default (the
    method's settings from those of the same ``--method`` alone).

    :param cfg: the benchmark's configuration (a dataclass with a ``method`` field).
    :param method: its resolved method.
    :param resolve: resolves a method configuration with the benchmark's defaults.
    """
    plain = resolve(type(cfg.method)(method=cfg.method.method))
    config: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.name in NOT_IN_LABEL:
            continue
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
        config[f.name] = getattr(cfg, f.name)
    skip = {"method", "methods"}
    config.update({k: v for k, v in asdict(method).items() if k not in skip})
    defaults.update({k: v for k, v in asdict(plain).items() if k not in skip})
    names = [n.strip() for n in str(cfg.method.method).split("+")]
    return suite.Label.of(names, config, defaults, NOT_IN_LABEL)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} requested but CUDA is not available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in ("float32", "float64"):
        raise UsageError(f"--dtype must be float32 or float64, got {dtype!r}")
    return getattr(torch, dtype)


def check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must be distinct non-negative integers, got {seeds}")
    return seeds


GRADIENT_METHODS = frozenset({"l2_init", "parseval", "upgd", "kron", "trac", "adam_reset"})
"""Methods for which the fused trainer hands the gradient to a ``torch.optim`` optimizer (they
add to the gradient, are the optimizer, or reset its state) instead of updating in its pass."""


def make_optimizer(
    params: list[Tensor], method: ResolvedMethod, seeds: Sequence[int]
) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer of ``method`` over stacked ``params`` (one seed per slice):
    Adam, UPGD or SGD, with the coupled weight decay."""
    m = method
    if m.optimizer == "adam":
        # not torch's fused kernel: its rounding depends on the tensor's size, so a seed's
        # slice of a stack would not follow that seed alone bit for bit
        return torch.optim.Adam(
            params, lr=m.lr, betas=m.adam_betas, eps=m.adam_eps, weight_decay=m.weight_decay
        )
    if m.optimizer == "upgd":
        return UPGD(
            params,
            lr=m.lr,
            weight_decay=m.weight_decay,
            beta_utility=m.upgd_beta_utility,
            sigma=m.upgd_sigma,
            seed_dims=1,
            seeds=list(seeds),
        )
    if m.optimizer == "kron":
        return Kron(
            params,
            lr=m.lr,
            b1=m.kron_b1,
            weight_decay=m.weight_decay,
            precond_lr=m.kron_precond_lr,
            max_size_triangular=m.kron_max_size_triangular,
            seed_dims=1,
            seeds=list(seeds),
        )
    return torch.optim.SGD(params, lr=m.lr, weight_decay=m.weight_decay)


class Learner:
    """Stacked networks, their fused trainer and the method suite's hooks.

    :meth:`step` trains on one example (or batch) per seed: the trainer's forward and backward
    pass by hand (:class:`~ppo_cbp.nets.stacked_mlp.StackedTrainer`), then the methods in
    :data:`~ppo_cbp.plasticity.suite.ORDER`. SGD updates in the trainer's own pass (L2-Init
    folded in: weight decay ``wd + lambda``, then ``+ lr lambda theta_0``); with another
    optimizer (Adam, UPGD, Kron) or a method of :data:`GRADIENT_METHODS` the trainer writes the
    gradient of every parameter instead and the step is ``after_backward`` hooks, then the
    ``torch.optim`` optimizer (:func:`make_optimizer`, inside TRAC if selected; plain SGD and
    Adam by the trainer's kernels on CPU, :meth:`StackedTrainer.update_`), then Shrink &
    Perturb's noise. The per-step hooks then run in the suite's order around the
    unit resets: soft Shrink & Perturb, CBP or ReDo, weight clipping. CBP takes the trainer's
    weight magnitudes when nothing changed the weights after its pass. ReDo scores units on
    the activations of the last ``redo_period`` examples (a ring buffer), since a single
    example is no estimate of E|h|.

    The architectural methods are the network's: ``layer_norm`` and ``nap`` put a LayerNorm
    before every hidden activation, ``crelu`` and ``dff`` make it paired (two outputs per
    unit), computed by the trainer (:class:`~ppo_cbp.nets.stacked_mlp.StackedMLP`'s
    ``layer_norm`` and ``paired``). The optimizer and the methods see the parameters in the
    autograd learner's order (per layer ``P``, or the weight and bias views for UPGD, then the
    LayerNorm's ``[S, 2, units]`` gain and offset, or their views), NaP the LayerNorms' gains
    and offsets; CBP and ReDo reset a replaced unit's gain and offset and both consumer columns
    of a paired unit, and score it by the mean magnitude of its two outputs. On CPU NaP's
    projection is one kernel pass per tensor (:class:`_FusedProjection`).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        seeds: Sequence[int],
        method: ResolvedMethod,
        *,
        loss: str,
        activation: str = "relu",
        init: str = "kaiming_uniform",
        device: torch.device,
        dtype: torch.dtype,
    ):
        if any(map(method.uses, ("cbp", "redo", "dropout", "online_norm"))) and len(sizes) < 3:
            raise UsageError(f"method {method.method} needs at least one hidden layer")
        self.seeds = list(seeds)
        self.method = method
        names = set(method.methods)
        # L2-Init alone with SGD is folded into the trainer's pass: theta <- theta - lr (g + wd
        # theta + lambda (theta - theta_0)) is the pass with weight decay wd + lambda, then
        # + lr lambda theta_0 (one more pass, not a gradient written and read back)
        self.folded_l2_init = names & GRADIENT_METHODS == {"l2_init"} and method.optimizer == "sgd"
        self.gradients = (
            bool(names & GRADIENT_METHODS) or method.optimizer != "sgd"
        ) and not self.folded_l2_init
        if method.uses("online_norm") and self.gradients:
            raise UsageError(
                f"--method {method.method}: online_norm is trained with plain SGD in the fused "
                f"trainer; it does not combine with {', '.join(sorted(names & GRADIENT_METHODS))}"
            )
        architectural = [n for n in ("layer_norm", "nap", "crelu", "dff") if method.uses(n)]
        if method.uses("online_norm") and architectural:
            raise UsageError(
                f"--method {method.method}: online_norm does not combine with "
                f"{', '.join(architectural)}"
            )
        paired = next((n for n in ("crelu", "dff") if method.uses(n)), None)
        if paired is not None and activation != "relu":
            raise UsageError(f"--method {method.method}: {paired} replaces ReLU, not {activation}")
        norm = (method.alpha_f, method.alpha_b) if method.uses("online_norm") else None
        self.net = StackedMLP(
            sizes,
            seeds,
            activation=activation,
            init=init,
            norm_decays=norm,
            layer_norm=method.uses("layer_norm") or method.uses("nap"),
            paired=paired,
            device=device,
            dtype=dtype,
        )
        self.trainer = StackedTrainer(
            self.net,
            loss=loss,
            optimizer="sgd",
            lr=method.lr,
            weight_decay=method.weight_decay + (method.l2_init if self.folded_l2_init else 0.0),
            betas=method.adam_betas,
            eps=method.adam_eps,
            noise_std=method.noise_std,
            dropout=method.dropout,
            gradients=self.gradients,
        )
        net = self.net
        n = len(net.params)
        # The optimizer steps each layer's P = [W | b] whole (one contiguous tensor per layer)
        # and each LayerNorm's [gain; offset] after it; UPGD and Kron the weight, bias, gain and
        # offset views in the autograd learner's order (UPGD draws its noise per tensor, in
        # order; Kron's preconditioners are shaped by them); the methods find either's state
        # from a view (nets.units).
        norms = net.norm_params
        params = (
            net.parameters()
            if method.optimizer in ("upgd", "kron")
            else [t for i, p in enumerate(net.params) for t in (p, *norms[i : i + 1])]
        )
        self.opt: torch.optim.Optimizer | None = None
        state_owner: Any = self.trainer.state_tensors
        if self.gradients:
            for i, g in enumerate(self.trainer.grads):
                net.params[i].grad = g
                net.weight(i).grad, net.bias(i).grad = g[..., :-1], g[..., -1]
            for (gain, offset), t, g in zip(net.layer_norms(), norms, self.trainer.norm_grads):
                t.grad, gain.grad, offset.grad = g, g[:, 0], g[:, 1]
            self.opt, state_owner = suite.with_trac(
                names, make_optimizer(params, method, seeds), seed_dims=1
            )
        nonlinearity = "linear" if activation == "linear" else activation
        layers = [
            Layer(
                weight=net.weight(i),
                bias=net.bias(i),
                init=init,
                nonlinearity=nonlinearity if i < n - 1 else "linear",
                head=i == n - 1,
                name=f"layer{i}",
            )
            for i in range(n)
        ]
        network = Network(
            layers,
            params,
            state_owner if self.gradients else None,
            seed_dims=1,
            seeds=self.seeds,
        )
        if method.uses("head_reset") and method.head_reset > n:
            raise UsageError(
                f"--head-reset {method.head_reset}: the network has only {n} weight layers"
            )
        if method.uses("adam_reset") and method.optimizer != "adam":
            raise UsageError(f"--method {method.method}: adam_reset needs adam")
        self.injection: FusedInjection | None = None
        if method.uses("injection"):
            if method.injection_layers > n:
                raise UsageError(
                    f"--injection-layers {method.injection_layers}: the network has only {n} "
                    "weight layers"
                )
            self.injection = FusedInjection(net, method.injection_layers, init, self.opt)
        # CBP, ReDo, the noise and injection are the trainer's and this class's; the rest the
        # suite's
        own = ("cbp", "redo", "snp", "injection")
        hooked = [n for n in method.methods if n in suite.ORDER and n not in own]
        self.methods = suite.build(
            hooked,
            method.settings(),
            [suite.Target("", network, norms=net.layer_norms())],
            init=init,
        )
        # the per-step transforms, on either side of the unit resets in the suite's order
        resets = suite.ORDER.index("cbp")
        per_step = [
            (suite.ORDER.index(n), m)
            for n, _, m in self.methods.entries
            if suite.METHODS[n].kind == "per-step"
        ]
        if kernels.available(*net.params):  # NaP's projection: one kernel pass per tensor
            per_step = [
                (i, _FusedProjection(m, net) if isinstance(m, NormalizeAndProject) else m)
                for i, m in per_step
            ]
        self._l2_init = self.methods.of("l2_init")[0] if self.folded_l2_init else None
        self._before = [m for i, m in per_step if i < resets]
        self._after = [m for i, m in per_step if i > resets]
        self.cbp: ContinualBackprop | None = None
        self.redo: WindowedReDo | None = None
        units = net.unit_layers() if self.gradients else self.trainer.unit_layers()
        if method.uses("cbp"):
            self.cbp = ContinualBackprop(
                units,
                state_owner,
                replacement_rate=method.replacement_rate,
                maturity_threshold=method.maturity_threshold,
                decay_rate=method.decay_rate,
                utility=method.utility,
                seed=[derive_seed(s, TAG_CBP) for s in seeds],
            )
        elif method.uses("redo"):
            self.redo = WindowedReDo(
                ReDo(
                    units,
                    state_owner,
                    threshold=method.redo_threshold,
                    period=method.redo_period,
                    seed=[derive_seed(s, TAG_REDO) for s in seeds],
                )
            )

    def step(self, x_aug: Tensor, target: Tensor, out: Tensor | None = None) -> None:
        pull = None
        if self._l2_init is not None:  # the layers' pull in the fused update pass, if any
            l2 = self._l2_init
            pull = (l2.params, l2.initial, self.method.lr * l2.coefficient)
            self.trainer.fold_pull(*pull)
        hidden = self.trainer.step(x_aug, target, out=out)
        if pull is not None:
            self.trainer.pull_(*pull)
        if self.opt is not None:
            with torch.no_grad():
                self.methods.after_backward()
            if isinstance(self.opt, TRAC):  # the base steps as it would alone (its kernels)
                self.opt.step(base_step=self._step_trac_base)
                self.trainer.magnitudes = None  # of the weights before TRAC's scaling
            else:
                self.trainer.update_(self.opt)
            self.trainer.perturb_()
        for m in self._before:
            m.after_step(hidden)
        if self.cbp is not None:
            # the trainer's magnitudes are of its updated weights: stale once a hook moved them
            self.cbp.step(hidden, None if self._before else self.trainer.magnitudes)
        elif self.redo is not None:
            self.redo.after_step(hidden)
        for m in self._after:
            m.after_step(hidden)

    def _step_trac_base(self) -> None:
        self.trainer.update_(self.opt.base)

    def new_segment(self) -> None:
        """Called at the start of every task or bin (:meth:`StackedTrainer.new_segment`)."""
        self.trainer.new_segment()

    def task_boundary(self) -> None:
        with torch.no_grad():
            if self.injection is not None:  # first in the suite's order
                self.injection.at_task_boundary()
            self.methods.at_task_boundary()

    def units_replaced(self) -> Tensor:
        """Units replaced so far per seed (``[S]``, int64, host)."""
        if self.cbp is not None:
            return torch.full((len(self.seeds),), self.cbp.num_replaced, dtype=torch.int64)
        if self.redo is not None:
            return self.redo.redo.replaced.cpu()
        return torch.zeros(len(self.seeds), dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        redo = None if self.redo is None else self.redo.state_dict()
        return {
            "net": self.net.state_dict(),
            "trainer": self.trainer.state_dict(),
            "cbp": None if self.cbp is None else self.cbp.state_dict(),
            "redo": None if redo is None else redo["redo"],
            "ring": [] if redo is None else redo["rings"],
            "optimizer": None if self.opt is None else copy.deepcopy(self.opt.state_dict()),
            "methods": self.methods.state_dict(),
            "injection": None if self.injection is None else self.injection.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        trainer = dict(state["trainer"])
        if self.opt is not None and state.get("optimizer") is None:
            # a checkpoint of the trainer's own Adam, before Adam went to torch.optim
            state = {**state, "optimizer": self._adam_state(trainer)}
            trainer.update(exp_avg=[], exp_avg_sq=[])
        self.trainer.load_state_dict(trainer)
        if self.cbp is not None:
            self.cbp.load_state_dict(state["cbp"])
        if self.redo is not None:
            self.redo.load_state_dict({"redo": state["redo"], "rings": state["ring"]})
        if self.opt is not None:
            self.opt.load_state_dict(state["optimizer"])
        if "methods" in state:  # checkpoints of the fused methods alone had none
            self.methods.load_state_dict(state["methods"])
        if self.injection is not None:
            self.injection.load_state_dict(state["injection"])

    def _adam_state(self, trainer: dict[str, Any]) -> dict[str, Any]:
        """The ``torch.optim.Adam`` state equal to that of the trainer's own Adam (moments of
        each ``P = [W | b]``, one step count)."""
        step = torch.tensor(float(trainer["steps"]))
        moments = zip(trainer["exp_avg"], trainer["exp_avg_sq"], strict=True)
        state = {
            i: {"step": step.clone(), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
            for i, (m, v) in enumerate(moments)
        }
        return {"state": state, "param_groups": self.opt.state_dict()["param_groups"]}


class _FusedProjection:
    """Normalize-and-Project's projection (:meth:`NormalizeAndProject.project_`) of the fused
    trainer's tensors on CPU: each layer's weight (the first columns of ``P = [W | b]``) and
    each LayerNorm's ``[S, 2, units]`` gain and offset, one kernel pass each
    (:func:`~ppo_cbp.nets.kernels.project_norm_`), to the norms ``nap`` holds (its state and
    checkpoint stay the method's); the same arithmetic as the tensor operations, without
    their per-operation cost at batch 1."""

    def __init__(self, nap: NormalizeAndProject, net: StackedMLP):
        if not nap.project_head or len(nap.norm_groups) != len(net.norm_params):
            raise ValueError("the fused projection covers every layer and every LayerNorm")
        self.nap, self.net = nap, net
        self._arrays = kernels.ArrayViews()

    def after_step(self, hidden: Sequence[Tensor]) -> None:
        nap, arrays = self.nap, self._arrays
        for p, target in zip(self.net.params, nap.initial_weight_norms, strict=True):
            kernels.project_norm_(arrays(p), arrays(target), p.shape[2] - 1)
        for t, target in zip(self.net.norm_params, nap.initial_norm_norms, strict=True):
            kernels.project_norm_(arrays(t), arrays(target), t.shape[2])


# --------------------------------------------------------------------------------------------
# Outputs and checkpoints


def config_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=str))


# Row columns that index or label a row rather than measure the network: not averaged over rows.
# ``units_replaced`` is cumulative (its last value is the run's total).
ROW_LABELS = ("task", "bin", "examples", "increment", "classes", "class_a", "class_b")
CUMULATIVE = ("units_replaced",)


def mean_and_standard_error(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean of ``values`` and its standard error ``s / sqrt(n)``, ``s`` the sample standard
    deviation (``ddof = 1``); the standard error is ``None`` for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _with_added_settings(saved: dict[str, Any], now: Any, cls: type) -> dict[str, Any]:
    """``saved`` (a method's settings in a checkpoint) with the settings added to ``cls`` since
    it was written, where they hold their default now: the run was made without them, which
    is what their defaults compute (a method's settings added with the method)."""
    if not isinstance(now, dict):
        return saved
    defaults = {
        f.name: json.loads(json.dumps(f.default))
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING
    }
    added = {k: v for k, v in now.items() if k not in saved and k in defaults and v == defaults[k]}
    return {**saved, **added}


EXTENDABLE: dict[str, tuple[str, ...]] = {
    "permuted-mnist": ("tasks", "resolved_tasks"),
    "slowly-changing-regression": ("examples", "bins"),
}
"""The settings that a resumed run may raise to extend it (a finished run too), and the
resolved values they change: each task or bin only depends on its own index, so a longer run
has the same first rows. Continual ImageNet's and Incremental CIFAR's schedules (the classes
of each task, the increments and their epochs) are drawn for the whole run: not extendable."""


class RunOutputs:
    """Per-seed CSV and TensorBoard writers plus the run's checkpoint and summary files.

    Nothing is written before :meth:`start`: a run that fails while it checks its inputs
    leaves ``out`` as it was.
    """

    CHECKPOINT = "checkpoint.pt"

    def __init__(
        self,
        benchmark: str,
        out: Path,
        seeds: Sequence[int],
        config: dict[str, Any],
        resume: bool,
    ):
        """``benchmark``: the subcommand of ``scripts/supervised.py`` that runs it, kept in the
        checkpoint so that a resume with another one (or with ``train.py``) can name it."""
        self.benchmark = benchmark
        self.out = Path(out)
        self.seeds = list(seeds)
        self.config = config
        self.resume = resume
        tracking.require(bool(config.get("track")), False)
        run_folder.check_writable(self.out, "--out")
        run_folder.check_not_foreign(self.out, "--out", "choose another --out")
        if resume and not self.checkpoint_path.exists():  # as train.py --resume refuses
            raise UsageError(
                f"--out {self.out} holds no run to resume ({self.checkpoint_path} does not "
                "exist): drop --resume to start a new run there"
            )
        # Without a checkpoint a folder holds nothing that --resume would keep: a run that
        # stopped before its first checkpoint starts over.
        if self.checkpoint_path.exists() and not resume:
            raise UsageError(
                f"--out {self.out} already holds a run ({self.checkpoint_path}); pass --resume "
                "to continue it or choose another --out"
            )
        self.rows: list[list[dict[str, float]]] = [[] for _ in self.seeds]
        self._writers: list[Any] | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out / self.CHECKPOINT

    def load_checkpoint(self, total: int, unit: str) -> dict[str, Any] | None:
        """The saved state, after checking that it belongs to the same configuration and has
        rows left to do (``total``: the run's number of ``unit``s, one row each).

        :raises UsageError: if the checkpoint is unreadable, was written with another
            configuration or already holds all ``total`` rows; nothing is written then.
        """
        path = self.checkpoint_path
        if not path.exists():
            return None
        start_over = f"start over in another --out (or delete {self.out})"
        foreign = f"pass the --out folder of a {self.benchmark} run, or {start_over}"
        state = run_folder.load_checkpoint(path, "these benchmarks", foreign, start_over)
        if isinstance(state, dict) and "format" in state and "args" in state:
            raise UsageError(
                f"{path} is a checkpoint of ppo_cbp/train.py, not of these benchmarks: continue "
                f"it with python ppo_cbp/train.py --resume {self.out}, or {start_over}"
            )
        try:
            saved = json.loads(state["config"])
            rows = state["rows"]
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(
                f"checkpoint {path} is unreadable: not a checkpoint of these benchmarks "
                f"({type(e).__name__}: {e}); {start_over}"
            ) from None
        other = state.get("benchmark", self.benchmark)  # absent from older checkpoints
        if other != self.benchmark:
            raise UsageError(
                f"--out {self.out} holds a {other} run, not a {self.benchmark} one: continue it "
                f"with python scripts/supervised.py {other} --out {self.out} --resume and the "
                f"flags it was started with, or {start_over}"
            )
        method = saved.get("resolved_method")
        if isinstance(method, dict) and method.get("extra") == {}:
            del method["extra"]  # an unused field, always empty, that runs before 0.1.0 recorded
        for key, cls in (("method", MethodConfig), ("resolved_method", ResolvedMethod)):
            if isinstance(saved.get(key), dict):
                saved[key] = suite.current_names(saved[key])  # settings renamed since
                saved[key] = _with_added_settings(saved[key], self.config.get(key), cls)
        ignored = {"resume", "progress", "out", "device", "label"}
        ignored |= {"track", "wandb_project_name", "wandb_entity"}  # how it is watched
        ignored |= set(EXTENDABLE.get(self.benchmark, ()))  # a longer run has the same first rows
        run_folder.check_settings(
            path,
            [
                (k, saved.get(k), v)
                for k, v in self.config.items()
                if k not in ignored and saved.get(k) != v
            ],
        )
        run_folder.refuse_finished(
            self.out,
            unit,
            len(rows[0]),
            total,
            f"nothing to do (its results are in {self.out / 'summary.json'}); "
            + (
                f"extend it with a larger --{EXTENDABLE[self.benchmark][0]}, or choose another "
                if self.benchmark in EXTENDABLE
                else "choose another "
            )
            + "--out for a new run",
        )
        run_folder.warn_other_code(state)
        self.rows = rows
        return state

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        state = dict(
            state, benchmark=self.benchmark, config=json.dumps(self.config), rows=self.rows
        )
        run_folder.save_checkpoint(state, self.checkpoint_path)

    def start(self, what: str = "") -> None:
        """Write the config, rewrite each CSV from the rows kept so far, open TensorBoard, and
        say where the run writes (``what``: e.g. ``"permuted_mnist cbp"``).

        The rows kept so far are those of the last checkpoint, so rows that a killed run wrote
        after it are dropped from the CSVs, and TensorBoard's ``purge_step`` drops their
        scalars from the event files written before.
        """
        done = len(self.rows[0])
        self.out.mkdir(parents=True, exist_ok=True)
        run_folder.write_config(self.out / "config.json", self.config)
        self._writers = []
        for s, seed in enumerate(self.seeds):
            folder = self.out / f"seed_{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            rows = self.rows[s]
            with open(folder / "metrics.csv", "w", newline="") as f:
                if rows:
                    w = csv.DictWriter(f, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(rows)
            self._writers.append(run_folder.open_writer(folder / "tb", len(rows)))
        if self.config.get("track"):  # one W&B run for all seeds: seed_<seed>/<tag>
            run = tracking.start_wandb(
                self.out,
                self.config,
                self.config["wandb_project_name"],
                self.config["wandb_entity"],
            )
            self._writers = [
                tracking.FanOutWriter(w, run, f"seed_{seed}/", finish=s == len(self.seeds) - 1)
                for s, (seed, w) in enumerate(zip(self.seeds, self._writers))
            ]
        resumed = f", resuming after row {done}" if done else ""
        print(
            f"{what + ': ' if what else ''}writing to {self.out}/ (config.json, summary.json, "
            f"seed_<seed>/metrics.csv, TensorBoard in seed_<seed>/tb){resumed}",
            flush=True,
        )

    def append(self, rows: Sequence[dict[str, float]]) -> None:
        """One row per seed (same keys for every seed and every row)."""
        for s, (seed, row) in enumerate(zip(self.seeds, rows)):
            step = len(self.rows[s])
            path = self.out / f"seed_{seed}" / "metrics.csv"
            new = step == 0
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
            self.rows[s].append(dict(row))
            for key, value in row.items():
                self._writers[s].add_scalar(key, value, step)
            self._writers[s].flush()

    def summary(
        self, extra: dict[str, Any], metric: str, work: float, unit: str, seconds: float
    ) -> dict[str, Any]:
        """Write and return ``summary.json``: ``extra``, then

        * ``metric``: the benchmark's main metric (a CSV column);
        * ``seconds_this_call``; ``<unit>_per_second_all_seeds``: ``work`` (``unit``s of
          all seeds done in this call) / seconds; ``<unit>_per_second_per_seed``: that / S;
        * ``final_over_seeds``: per metric of the last row (labels excluded), the mean over
          seeds of each seed's last value and its standard error, and ``seeds`` (how many);
        * ``seeds``: per seed ``rows`` (CSV rows so far), ``last`` (the last row as written),
          ``mean_over_rows`` (each metric's mean over the rows; labels and the cumulative
          ``units_replaced`` excluded) and ``units_replaced`` (the total so far).
        """
        per_seed = {}
        for seed, rows in zip(self.seeds, self.rows):
            if not rows:
                continue
            keys = [k for k in rows[0] if k not in ROW_LABELS + CUMULATIVE]
            per_seed[str(seed)] = {
                "rows": len(rows),
                "last": dict(rows[-1]),
                "mean_over_rows": {k: sum(r[k] for r in rows) / len(rows) for k in keys},
                "units_replaced": rows[-1].get("units_replaced", 0),
            }
        final = {}
        if per_seed:
            lasts = [s["last"] for s in per_seed.values()]
            for k in lasts[0]:
                if k not in ROW_LABELS:
                    mean, se = mean_and_standard_error([float(r[k]) for r in lasts])
                    final[k] = {"mean": mean, "standard_error": se}
        rate = work / max(seconds, 1e-9)
        summary = dict(
            extra,
            metric=metric,
            seconds_this_call=seconds,
            **{
                f"{unit}_per_second_all_seeds": rate,
                f"{unit}_per_second_per_seed": rate / len(self.seeds),
            },
            final_over_seeds=dict(final, seeds=len(per_seed)),
            seeds=per_seed,
        )
        run_folder.write_json(self.out / "summary.json", summary)
        return summary

    def close(self) -> None:
        for w in self._writers or []:
            w.close()


def closing_summary(summary: dict[str, Any], out: Path) -> str:
    """The lines printed at the end of a run: progress, time and speed, the main metric's last
    value per seed with its mean +- standard error over seeds, units replaced, where the files
    are."""
    metric = summary["metric"]
    done = [k for k in summary if k.endswith("_completed")]
    progress = ""
    if done:
        name = done[0].removesuffix("_completed")
        progress = f"{count(summary[done[0]])}/{count(summary[name])} {name}, "
    rate = next(k for k in summary if k.endswith("_per_second_per_seed"))
    unit = rate.removesuffix("_per_second_per_seed").replace("_", " ")
    seeds = summary["seeds"]
    lines = [
        f"{summary['benchmark']} {summary['method']}: {progress}"
        f"{duration(summary['seconds_this_call'])} in this call, "
        f"{count(summary[rate])} {unit}/s per seed ({len(seeds)} seed(s))"
    ]
    if seeds:
        values = ", ".join(f"seed {s} {measured(v['last'][metric])}" for s, v in seeds.items())
        lines.append(f"final {metric}: {values}")
        f = summary["final_over_seeds"][metric]
        se = f["standard_error"]
        se = "" if se is None else f" +- {measured(se, 2)} (standard error over seeds)"
        lines.append(f"final {metric}, mean over {len(seeds)} seed(s): {measured(f['mean'])}{se}")
        counts = {f"seed {s}": int(v["units_replaced"]) for s, v in seeds.items()}
        if any(counts.values()):
            lines.append(run_folder.units_replaced_line(counts, "none"))
    lines.append(f"per-seed CSVs: {out}/seed_<seed>/metrics.csv; summary: {out}/summary.json")
    lines += run_folder.where_lines(out)
    return "\n".join(lines)
