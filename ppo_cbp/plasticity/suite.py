"""One method suite for every trainer: method names and settings in, one ordered list of
:class:`~ppo_cbp.plasticity.hooks.PlasticityMethod` out.

PPO (``ppo_cbp/train.py``, closed-form and autograd paths), the MLP benchmarks' autograd learner
and the convolutional benchmarks' learner all build their methods here (:func:`build`), check
their combinations here (:func:`check_combination`, :func:`check_settings`) and read each
method's settings under one name (:data:`SETTINGS`). The fused MLP trainer computes a subset by
hand (:data:`FUSED`); it is tested equal to this composition on that subset.

The order (:data:`ORDER`) in which the hooks of a step run, whatever the trainer:

1. after the backward pass, the regularisers add their gradients: L2-Init, Parseval;
2. the optimizer step (Adam, SGD, UPGD, Kron, each possibly inside TRAC: the trainer's);
3. after the step: Shrink & Perturb's noise, soft Shrink & Perturb, Normalize-and-Project's
   projection, the unit resets (CBP or ReDo), weight clipping, and last C-CHAIN's copy of the
   parameters (``theta_{t-1}`` of the next step: after every change);
4. at a task boundary: Shrink & Perturb toward a fresh init, head reset, Adam-state reset,
   plasticity injection, then C-CHAIN's restart (its copy then holds the injected branch).

Why this order: noise and projections act on the optimizer's result; the unit resets see the
weights every other per-step transform left; clipping comes after them so that every weight, a
freshly reinitialised one included, is inside its bound after every step (the source clips
after each update). Within one position, the networks act in the order given (PPO: policy,
then value); they touch disjoint tensors.

Each method reads its network's current layers and parameters when it acts, so that a
regrouping (an injection, a reset) reaches every method.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ppo_cbp.errors import UsageError
from ppo_cbp.nets.units import UnitLayer
from ppo_cbp.plasticity.c_chain import ChurnReduction
from ppo_cbp.plasticity.cbp import ContinualBackprop
from ppo_cbp.plasticity.hooks import Network, PlasticityMethod
from ppo_cbp.plasticity.injection import InjectableNetwork, PlasticityInjection
from ppo_cbp.plasticity.l2_init import L2Init
from ppo_cbp.plasticity.noise import PerturbNoise
from ppo_cbp.plasticity.normalize_project import NormalizeAndProject
from ppo_cbp.plasticity.parseval import ParsevalRegularization
from ppo_cbp.plasticity.redo import ReDo, WindowedReDo
from ppo_cbp.plasticity.resets import AdamStateReset, LayerReset
from ppo_cbp.plasticity.shrink_perturb import ShrinkPerturb
from ppo_cbp.plasticity.trac import TRAC
from ppo_cbp.plasticity.weight_clipping import WeightClipping
from ppo_cbp.seeding import TAG_INJECTION

__all__ = [
    "CONTRADICTIONS",
    "FUSED",
    "METHODS",
    "ORDER",
    "SETTINGS",
    "Method",
    "Suite",
    "Target",
    "build",
    "check_combination",
    "check_settings",
    "with_trac",
]


@dataclass(frozen=True)
class Method:
    """One method of the suite.

    :param name: its name, as ``scripts/supervised.py --method`` takes it.
    :param flag: the ``ppo_cbp/train.py`` flag that switches it on (None: not on PPO).
    :param kind: ``"optimizer"``, ``"regulariser"`` (after backward), ``"per-step"`` (after
        the optimizer step), ``"unit reset"``, ``"task boundary"``, ``"architecture"`` (an
        option of the network builders) or ``"baseline"``.
    :param settings: the names of its settings (:data:`SETTINGS`).
    :param source: where its definition and defaults come from.
    :param title: its name in figures, tables and summaries.
    """

    name: str
    flag: str | None
    kind: str
    settings: tuple[str, ...] = ()
    source: str = ""
    title: str = ""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("bp", None, "baseline", (), "SGD (Dohare et al. 2024)", title="Backprop"),
        Method(
            "l2",
            "--l2",
            "regulariser",
            (),
            "coupled L2 in the optimizer (Dohare et al.)",
            title="L2",
        ),
        Method(
            "snp",
            "--shrink-perturb",
            "per-step",
            ("noise_std",),
            "Ash & Adams 2020",
            title="Shrink & Perturb",
        ),
        Method(
            "cbp",
            "--cbp",
            "unit reset",
            ("replacement_rate", "maturity_threshold", "decay_rate", "utility"),
            "Dohare et al. 2024, Algorithm 1",
            title="CBP",
        ),
        Method(
            "redo",
            "--redo",
            "unit reset",
            ("redo_threshold", "redo_period"),
            "Sokar 2023",
            title="ReDo",
        ),
        Method(
            "adam", None, "optimizer", ("adam_betas", "adam_eps"), "Kingma & Ba 2015", title="Adam"
        ),
        Method(
            "dropout", None, "architecture", ("dropout",), "Srivastava et al. 2014", title="Dropout"
        ),
        Method(
            "online_norm",
            None,
            "architecture",
            ("alpha_f", "alpha_b"),
            "Chiley 2019",
            title="Online norm",
        ),
        Method(
            "l2_init",
            "--l2-init",
            "regulariser",
            ("l2_init",),
            "Kumar et al. 2023",
            title="L2-Init",
        ),
        Method(
            "snp_init",
            "--shrink-perturb-init",
            "task boundary",
            ("shrink_perturb_init",),
            "Ash & Adams 2020",
            title="S&P to init",
        ),
        Method(
            "soft_snp",
            "--soft-shrink-perturb",
            "per-step",
            ("soft_shrink_perturb",),
            "Juliani & Ash 2024",
            title="Soft S&P",
        ),
        Method(
            "parseval",
            "--parseval",
            "regulariser",
            ("parseval",),
            "Chung et al. 2024",
            title="Parseval",
        ),
        Method(
            "weight_clipping",
            "--weight-clipping",
            "per-step",
            ("weight_clipping",),
            "Elsayed et al. 2024",
            title="Weight clipping",
        ),
        Method(
            "head_reset",
            "--head-reset",
            "task boundary",
            ("head_reset",),
            "Nikishin 2022",
            title="Head reset",
        ),
        Method(
            "adam_reset",
            "--adam-reset",
            "task boundary",
            (),
            "Asadi et al. 2023",
            title="Adam reset",
        ),
        Method(
            "layer_norm", "--layer-norm", "architecture", (), "Lyle et al. 2024", title="LayerNorm"
        ),
        Method("nap", "--nap", "per-step", (), "Lyle et al. 2024", title="NaP"),
        Method("crelu", "--crelu", "architecture", (), "Abbas et al. 2023", title="CReLU"),
        Method(
            "dff",
            "--dff",
            "architecture",
            (),
            "Lewandowski et al. 2024; Plasticine DFF4Linear (RLE-Foundation/Plasticine@aa00b4b)",
            title="DFF",
        ),
        Method(
            "injection",
            "--injection",
            "task boundary",
            ("injection_layers",),
            "Nikishin 2023",
            title="Injection",
        ),
        Method(
            "upgd",
            "--upgd",
            "optimizer",
            ("upgd_sigma", "upgd_beta_utility"),
            "Elsayed & Mahmood 2024",
            title="UPGD",
        ),
        Method(
            "kron",
            "--kron",
            "optimizer",
            ("kron_b1", "kron_precond_lr", "kron_max_size_triangular"),
            "Li 2018 (PSGD Kron, kron_torch)",
            title="Kron",
        ),
        Method("trac", "--trac", "optimizer", (), "Muppidi et al. 2024", title="TRAC"),
        Method("c_chain", "--c-chain", "per-step", (), "Tang et al. 2025", title="C-CHAIN"),
    )
}
"""Every method of the suite, by name."""

SETTINGS: dict[str, str] = {s: m.name for m in METHODS.values() for s in m.settings}
"""Each method setting's one name (the flag ``--<name with dashes>`` on both entry points) ->
the method that uses it."""

RENAMED = {
    "shrink": "shrink_perturb_init",
    "soft_shrink": "soft_shrink_perturb",
    "clip_kappa": "weight_clipping",
    "reset_layers": "head_reset",
}
"""Settings' former names on ``scripts/supervised.py`` -> their names now (still accepted as
flags, and read in ``config.json`` files and checkpoints written before)."""


def current_names(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with each former setting name (:data:`RENAMED`) replaced by its name now:
    for ``config.json`` files and checkpoints written before the renaming."""
    return {RENAMED.get(k, k): v for k, v in settings.items()}


ORDER = (
    "l2_init",
    "parseval",
    "snp",
    "soft_snp",
    "nap",
    "cbp",
    "redo",
    "weight_clipping",
    "snp_init",
    "head_reset",
    "adam_reset",
    "injection",
    "c_chain",
)
"""The methods with hooks, in the order their hooks run (the module docstring says why)."""

FUSED = frozenset(
    {
        *("bp", "l2", "snp", "cbp", "redo", "adam", "dropout", "online_norm"),
        *("l2_init", "parseval", "soft_snp", "weight_clipping", "snp_init", "head_reset"),
        *("adam_reset", "upgd", "kron", "trac", "layer_norm", "nap", "crelu", "dff"),
    }
)
"""The methods the MLP benchmarks' fused trainer runs (:class:`ppo_cbp.benchmarks.common.Learner`:
the forward and backward pass by hand, :mod:`ppo_cbp.nets.stacked_mlp`, LayerNorm, CReLU and DFF
included, and these methods' hooks); plasticity injection runs there too, with L2, S&P and
Adam (``ppo_cbp.benchmarks.fused_injection``; the benchmarks' ``uses_fused_trainer``), else on
the autograd learner."""

CONTRADICTIONS: list[tuple[frozenset[str], str]] = [
    (frozenset(p), why)
    for p, why in (
        ({"cbp", "redo"}, "both choose which units to reinitialise"),
        ({"adam", "upgd"}, "both are the optimizer"),
        ({"trac", "upgd"}, "TRAC scales a base optimizer's updates; UPGD perturbs its own"),
        ({"adam_reset", "upgd"}, "UPGD keeps no Adam state to reset"),
        ({"adam", "kron"}, "both are the optimizer"),
        ({"upgd", "kron"}, "both are the optimizer"),
        ({"adam_reset", "kron"}, "Kron keeps no Adam state to reset"),
        ({"layer_norm", "nap"}, "nap already puts a LayerNorm after every hidden layer"),
        ({"online_norm", "layer_norm"}, "two normalisations of the same pre-activations"),
        ({"online_norm", "nap"}, "two normalisations of the same pre-activations"),
        ({"cbp", "injection"}, "the injected head's frozen units are not CBP's to replace"),
        ({"redo", "injection"}, "the injected head's frozen units are not ReDo's to replace"),
        ({"head_reset", "injection"}, "both renew the head at task boundaries"),
        ({"trac", "injection"}, "TRAC's reference point has no entry for an injected branch"),
        ({"crelu", "dff"}, "both replace the hidden activation"),
        (
            {"redo", "dff"},
            "a DFF unit is never dormant: |sin z| + |cos z| >= 1, so its ReDo score is at least "
            "1/sqrt(2)",
        ),
        (
            {"nap", "dff"},
            "NaP's joint projection of a LayerNorm's gain and offset assumes a positively "
            "homogeneous activation; under sin and cos it changes the features' frequency and "
            "so the network's function",
        ),
    )
]
"""Pairs of methods that cannot combine, and why (both entry points refuse them)."""


def check_combination(names: Collection[str], spell: Callable[[str], str] = str) -> None:
    """Refuse unknown methods and contradicting pairs (:data:`CONTRADICTIONS`).

    :param names: the selected methods.
    :param spell: how the entry point writes a method's name in a message (e.g. its flag).
    :raises UsageError: naming both methods and why they contradict each other.
    """
    for n in names:
        if n not in METHODS:
            raise UsageError(f"unknown method {n!r}; expected one of {', '.join(METHODS)}")
    for pair, why in CONTRADICTIONS:
        if pair <= set(names):
            a, b = sorted(pair)
            raise UsageError(f"{spell(a)} and {spell(b)} contradict each other ({why})")


def check_settings(
    names: Collection[str], given: Iterable[str], spell: Callable[[str], str] = str
) -> None:
    """Refuse a setting given for a method that is not selected (it would be ignored).

    :param names: the selected methods.
    :param given: the settings given on the command line (names of :data:`SETTINGS`; other
        names are ignored).
    :param spell: how the entry point writes a method's name in a message.
    :raises UsageError: naming the setting and the method it belongs to.
    """
    for s in given:
        method = SETTINGS.get(s)
        if method is not None and method not in names:
            flag = "--" + s.replace("_", "-")
            raise UsageError(f"{flag} only applies with {spell(method)}, which is not selected")


@dataclass
class Target:
    """One network the methods act on, as its trainer sees it.

    :param name: the network's name (``"policy"``, ``"value"``; ``""`` for a benchmark's one).
    :param network: its weight layers, trained parameters and optimizer.
    :param module: the module itself (an :class:`InjectableNetwork` for ``injection``; the
        module whose output C-CHAIN regularises).
    :param units: CBP's and ReDo's hidden layers (a module they find them in, or the layers).
    :param unit_seeds: the seed(s) of CBP's or ReDo's generators, one per stacked network.
    :param norms: the LayerNorms' ``(gain, offset)`` per hidden layer, for Normalize-and-Project.
    :param injection_tag: the random stream of this network's injections (networks sharing an
        optimizer need different ones).
    :param churn: C-CHAIN regularises this network's output.
    :param churn_output: maps the module's output to the regularised tensor.
    """

    name: str
    network: Network
    module: nn.Module | None = None
    units: nn.Module | Sequence[UnitLayer] | None = None
    unit_seeds: int | Sequence[int] = 0
    norms: Sequence[Any] | None = None
    injection_tag: int = TAG_INJECTION
    churn: bool = False
    churn_output: Callable[[Any], Tensor] | None = None


@dataclass
class Suite:
    """The methods of one run, in :data:`ORDER`, each bound to the network (target) it acts on.

    :meth:`after_step` takes one list of hidden activations per target, in the targets' order.
    """

    entries: list[tuple[str, int, PlasticityMethod]]
    targets: list[Target]
    noise: PerturbNoise | None = None
    resetters: dict[str, ContinualBackprop | ReDo] = field(default_factory=dict)
    """CBP or ReDo of each target, by target name."""
    churn: ChurnReduction | None = None
    """C-CHAIN's term (its loss enters the trainer's loss)."""

    @property
    def names(self) -> tuple[str, ...]:
        """The methods with hooks, in order, without repeats."""
        return tuple(dict.fromkeys(n for n, _, _ in self.entries))

    def of(self, name: str) -> list[PlasticityMethod]:
        """The instances of method ``name``, one per target it acts on."""
        return [m for n, _, m in self.entries if n == name]

    def after_backward(self) -> None:
        for _, _, m in self.entries:
            m.after_backward()

    def after_step(self, *hidden: Sequence[Tensor]) -> None:
        for _, k, m in self.entries:
            m.after_step(hidden[k] if k < len(hidden) else ())

    def at_task_boundary(self) -> None:
        for _, _, m in self.entries:
            m.at_task_boundary()

    def units_replaced(self) -> dict[str, int]:
        """Units CBP or ReDo replaced so far, per target (first seed; a host read)."""
        return {name: int(r.num_replaced) for name, r in self.resetters.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "methods": [
                {"name": n, "target": self.targets[k].name, "state": m.state_dict()}
                for n, k, m in self.entries
            ]
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s states, each by its method and target name (so a
        checkpoint written in another order loads)."""
        self.load_entries(
            [(e["name"], e["target"], e["state"]) for e in state["methods"]], strict=True
        )

    def load_entries(
        self, entries: Iterable[tuple[str, str, Mapping[str, Any]]], strict: bool = True
    ) -> None:
        """Load ``(method, target name, state)`` triples (a trainer's older checkpoint layout).

        The methods load in :data:`ORDER`, whatever the order given: plasticity injection
        regroups the lists that the other methods read when it loads.

        :param strict: every method of the suite must get a state and every state a method.
        """
        by_key = {}
        for name, target, s in entries:
            by_key[(name, target)] = s
        mine = {(n, self.targets[k].name): m for n, k, m in self.entries}
        if strict and set(by_key) != set(mine):
            missing = sorted(set(mine) - set(by_key))
            extra = sorted(set(by_key) - set(mine))
            raise ValueError(f"method states do not match: missing {missing}, unexpected {extra}")
        for key, m in mine.items():
            if key in by_key:
                m.load_state_dict(dict(by_key[key]))


def with_trac(
    names: Collection[str], optimizer: torch.optim.Optimizer, seed_dims: int = 0
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """``(the optimizer to step, the one that holds the per-parameter state)``: TRAC around
    ``optimizer`` when ``trac`` is selected (the resets zero its base's state), else
    ``optimizer`` twice."""
    if "trac" in names:
        return TRAC(optimizer, seed_dims=seed_dims), optimizer
    return optimizer, optimizer


def build(
    names: Collection[str],
    settings: Mapping[str, Any],
    targets: Sequence[Target],
    *,
    init: str,
    noise_generators: Sequence[torch.Generator] | None = None,
    redo_window: bool = False,
    reset_optimizer_state: bool = True,
    accumulate: bool = True,
) -> Suite:
    """The :class:`Suite` of the methods ``names`` on ``targets``, in :data:`ORDER`.

    Architectural methods (``layer_norm``, ``crelu``, ``dff``, ``dropout``, ``online_norm``, the
    injectable wrapper) are the network builders' options and optimizers the trainer's; here
    they add nothing.

    :param names: the selected methods (checked with :func:`check_combination` first).
    :param settings: every setting the selected methods use, by its name in :data:`SETTINGS`.
    :param targets: the networks, in the order their hidden activations reach
        :meth:`Suite.after_step`.
    :param init: the scheme the networks were initialised with (CBP's and ReDo's redraws).
    :param noise_generators: Shrink & Perturb's generators (one per stacked seed), for ``snp``.
    :param redo_window: ReDo scores units on the activations of its last ``redo_period``
        steps (for online learning, where one example is no estimate of ``E|h|``) instead of
        each period's last batch.
    :param reset_optimizer_state: CBP and ReDo zero the optimizer state of the entries they
        reset.
    :param accumulate: CBP's count of units to replace accumulates (Algorithm 1), or is drawn
        each step (the paper's PPO code).
    :raises ValueError: for a method that needs what a target lacks (hidden layers, a module).
    """
    names = set(names)
    check_combination(names)
    entries: list[tuple[str, int, PlasticityMethod]] = []
    suite = Suite(entries, list(targets))

    def each(name: str, make: Callable[[Target], PlasticityMethod | None]) -> None:
        if name not in names:
            return
        for k, t in enumerate(targets):
            m = make(t)
            if m is not None:
                entries.append((name, k, m))

    def resetter(t: Target, kind: str) -> ContinualBackprop | ReDo:
        if t.units is None or (not isinstance(t.units, nn.Module) and not list(t.units)):
            raise ValueError(f"{kind} needs at least one hidden layer")
        shared = dict(init=init, reset_optimizer_state=reset_optimizer_state, seed=t.unit_seeds)
        opt = t.network.optimizer
        if kind == "cbp":
            r: ContinualBackprop | ReDo = ContinualBackprop(
                t.units,
                opt,
                replacement_rate=settings["replacement_rate"],
                maturity_threshold=settings["maturity_threshold"],
                decay_rate=settings["decay_rate"],
                utility=settings["utility"],
                accumulate=accumulate,
                **shared,
            )
        else:
            r = ReDo(
                t.units,
                opt,
                threshold=settings["redo_threshold"],
                period=settings["redo_period"],
                **shared,
            )
        r.remove_hooks()  # the trainers pass each step's activations: no hooks on the hot path
        suite.resetters[t.name] = r
        return r

    each("l2_init", lambda t: L2Init(t.network, settings["l2_init"]))
    each("parseval", lambda t: ParsevalRegularization(t.network, settings["parseval"]))
    if "snp" in names:
        if not noise_generators:
            raise ValueError("snp needs the noise generators")
        suite.noise = PerturbNoise(
            [t.network for t in targets], settings["noise_std"], noise_generators
        )
        entries.append(("snp", 0, suite.noise))
    each(
        "soft_snp",
        lambda t: ShrinkPerturb(t.network, settings["soft_shrink_perturb"], every="step"),
    )
    each("nap", lambda t: NormalizeAndProject(t.network, list(t.norms or [])))
    each("cbp", lambda t: resetter(t, "cbp"))

    def redo(t: Target) -> PlasticityMethod:
        r = resetter(t, "redo")
        return WindowedReDo(r) if redo_window else r

    each("redo", redo)
    each("weight_clipping", lambda t: WeightClipping(t.network, settings["weight_clipping"]))
    each(
        "snp_init",
        lambda t: ShrinkPerturb(t.network, settings["shrink_perturb_init"], every="task_boundary"),
    )
    each("head_reset", lambda t: LayerReset(t.network, settings["head_reset"]))
    each("adam_reset", lambda t: AdamStateReset(t.network))

    def injection(t: Target) -> PlasticityMethod:
        if not isinstance(t.module, InjectableNetwork):
            raise ValueError("injection needs the network built as an InjectableNetwork")
        return PlasticityInjection(
            t.module, t.network, at_task_boundaries=True, tag=t.injection_tag
        )

    each("injection", injection)

    def churn(t: Target) -> PlasticityMethod | None:
        if not t.churn:
            return None
        if t.module is None:
            raise ValueError("c_chain needs the module whose output it regularises")
        seed_dims = t.network.seed_dims
        suite.churn = ChurnReduction(
            t.module, output=t.churn_output, seed_dims=seed_dims, seeds=t.network.seeds
        )
        return suite.churn

    each("c_chain", churn)
    return suite


BASELINES = {"tuned_adam": "Tuned Adam", "standard_adam": "Standard Adam"}
"""PPO's optimizer baselines, named as the paper names them: what a label says when no method
is selected (tuned Adam) or when the standard betas are."""


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "/".join(_value(x) for x in v)
    return str(v)


@dataclass(frozen=True)
class Label:
    """A configuration's one name: its methods (in :data:`METHODS`' order, or a baseline of
    :data:`BASELINES`) and the settings whose values differ from what those methods take by
    default. It depends on the configuration alone, never on which other runs are shown.

    :param methods: the methods' names.
    :param settings: ``(name, value)`` pairs, sorted by name.
    """

    methods: tuple[str, ...]
    settings: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(
        cls,
        methods: Iterable[str],
        config: Mapping[str, Any],
        defaults: Mapping[str, Any] | None,
        ignore: Collection[str] = (),
    ) -> Label:
        """The label of ``config`` (a flat dict of settings) with methods ``methods``.

        :param defaults: the settings of the same methods with everything else at its default;
            ``None`` when unknown (a run written before labels were recorded): every setting of
            the selected methods, the step size and the weight decay are named then.
        :param ignore: keys that do not define the configuration (seeds, paths, budgets).
        """
        names = set(methods)
        order = [*BASELINES, *METHODS]
        methods = tuple(sorted(names, key=lambda n: order.index(n) if n in order else len(order)))
        if defaults is None:  # the methods' settings, and the optimizer's
            optimizer = {"lr", "learning_rate", "weight_decay"}
            keys = [k for k in config if SETTINGS.get(k) in names or k in optimizer]
        else:
            keys = [k for k in config if k not in ignore and config[k] != defaults.get(k)]
        return cls(methods, tuple(sorted((k, config[k]) for k in keys if k not in ignore)))

    @property
    def text(self) -> str:
        """For figures and tables: ``CBP + L2-Init (replacement_rate=0.001)``."""
        titles = [
            BASELINES.get(n) or METHODS[n].title if n in METHODS or n in BASELINES else n
            for n in self.methods
        ]
        text = " + ".join(titles)
        if self.settings:
            text += " (" + ", ".join(f"{k}={_value(v)}" for k, v in self.settings) + ")"
        return text

    @property
    def slug(self) -> str:
        """For folder names: ``cbp+l2_init__replacement_rate=0.001`` (letters, digits and
        ``+_=.,-`` only)."""
        slug = "+".join(self.methods)
        if self.settings:
            slug += "__" + ",".join(f"{k}={_value(v)}" for k, v in self.settings)
        return "".join(c if c.isalnum() or c in "+_=.,-" else "-" for c in slug)
