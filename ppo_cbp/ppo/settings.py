"""The PPO trainer's settings: checks and presets of its ``Args``, and those of a resumed run.

:func:`resolve_args` checks every value and conflict before any work starts (one
:class:`~ppo_cbp.errors.UsageError` naming the flag) and fills in the presets (``--cbp``,
``--l2``, ``--standard-adam``, ``--paper-exact``, ...), so that no ``None`` is left. A resumed
run takes its settings from its checkpoint (:func:`read_checkpoint`), with the command line's
where it gives them (:func:`given_fields`), and refuses those that would change the training
(:func:`merge_resume`); :func:`run_settings` does all of it for a run and names its folder.
``Args`` is the dataclass of ``ppo_cbp/train.py``; these functions take it (or its class) as an
argument and read it as a :class:`~ppo_cbp.ppo.protocols.Settings`, so that they do not import
that file (which imports them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

from ppo_cbp import run_folder, tracking
from ppo_cbp.envs.dynamics import QUANTITIES, SCALES
from ppo_cbp.errors import UsageError
from ppo_cbp.plasticity import suite
from ppo_cbp.ppo import agent
from ppo_cbp.ppo.environments import scale_ranges
from ppo_cbp.ppo.protocols import Settings, SettingsT

__all__ = [
    "args_dict",
    "find_checkpoint",
    "given_fields",
    "merge_resume",
    "configuration_label",
    "run_slug",
    "read_checkpoint",
    "resolve_args",
    "run_settings",
]

TESTED_ENVS = tuple(
    f"{name}-v{v}"
    for name in ("Ant", "Hopper", "Walker2d", "HalfCheetah", "Humanoid")
    for v in (4, 5)
)
TABLE_SEEDS, TABLE_SEGMENTS = 100, 50
"""The released friction table's rows (seeds 0-99) and columns (segments)."""
CHECKPOINT_NAME = run_folder.CHECKPOINT_NAME
CHECKPOINT_FORMAT = 1

# Fields that may differ from the checkpoint when resuming: they do not change the training.
# (steps only without --anneal-lr, whose schedule depends on it.)
_RESUME_FREE = {"steps", "checkpoint_every", "metrics_every", "device", "threads", "progress"} | {
    "track",
    "wandb_project_name",
    "wandb_entity",
    "capture_video",
    "video_every",
}
_RESUME_IGNORED = {"resume", "run_name", "runs_dir"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_env_id(env_id: str) -> None:
    try:
        spec = gym.spec(env_id)
    except gym.error.Error:
        spec = None
    entry = str(getattr(spec, "entry_point", ""))
    if spec is None or "envs.mujoco" not in entry or (spec.version or 0) < 4:
        raise UsageError(
            f"unknown env id {env_id!r}: expected one of {', '.join(TESTED_ENVS)} "
            "(or another gymnasium MuJoCo env of version >= 4)"
        )


def presets(args: Any) -> dict[str, Any]:
    """The optimizer settings a run takes when its flags leave them out, given its method
    flags (``args``: ``Args``, or any object or namespace with those flags):

    * ``weight_decay``: 1e-3 with ``--l2`` (the paper's L2) or ``--upgd`` (the UPGD authors' PPO
      script), 1e-4 with ``--cbp``, ``--redo`` or ``--shrink-perturb`` (the paper's), else 0;
    * ``adam_beta1``, ``adam_beta2``: the paper's tuned 0.99, 0.99; 0.9, 0.999 with
      ``--standard-adam`` or ``--upgd`` (AdaptiveUPGD's defaults);
    * ``learning_rate``: 1e-4 (the paper's), 3e-4 with ``--upgd`` or ``--kron`` (Plasticine's
      PPO, kron_torch's default); ``adam_eps``: 1e-8, 1e-5 with
      ``--upgd`` (the UPGD authors' PPO script).
    """

    def on(name: str) -> bool:
        return bool(getattr(args, name, False))

    if on("l2") or on("upgd"):
        weight_decay = 1e-3
    elif on("cbp") or on("redo") or on("shrink_perturb"):
        weight_decay = 1e-4
    else:
        weight_decay = 0.0
    standard = on("standard_adam") or on("upgd")
    return dict(
        weight_decay=weight_decay,
        adam_beta1=0.9 if standard else 0.99,
        adam_beta2=0.999 if standard else 0.99,
        learning_rate=3e-4 if on("upgd") or on("kron") else 1e-4,
        adam_eps=1e-5 if on("upgd") else 1e-8,
    )


def resolve_args(args: SettingsT) -> SettingsT:
    """Validate ``args`` and return a copy with the presets applied (no ``None`` left).

    :raises UsageError: naming the bad value or the conflicting flags.
    """
    defaults = type(args)()
    check_env_id(args.env)
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    positive = ("steps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "threads")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"{_flag(name)} must be positive, got {getattr(args, name)}")
    for name in ("checkpoint_every", "metrics_every", "friction_every", "maturity_threshold"):
        if getattr(args, name) < 0:
            raise UsageError(f"{_flag(name)} must be >= 0, got {getattr(args, name)}")
    if args.redo_period <= 0:
        raise UsageError(f"--redo-period must be positive, got {args.redo_period}")
    rates = ["replacement_rate", "decay_rate", "gamma", "gae_lambda", "clip_coef"]
    rates += [n for n in ("adam_beta1", "adam_beta2") if getattr(args, n) is not None]
    for name in rates:
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"{_flag(name)} must be in [0, 1], got {value}")
    for name in ("adam_beta1", "adam_beta2", "decay_rate"):
        if getattr(args, name) is not None and getattr(args, name) >= 1.0:
            raise UsageError(f"{_flag(name)} must be < 1, got {getattr(args, name)}")
    if args.learning_rate is not None and not (
        args.learning_rate > 0 and math.isfinite(args.learning_rate)
    ):
        raise UsageError(f"--learning-rate must be positive, got {args.learning_rate}")
    nonneg = ["ent_coef", "vf_coef", "redo_threshold"]
    nonneg += [
        n
        for n in ("adam_eps", "weight_decay", "noise_std", "max_grad_norm")
        if getattr(args, n) is not None
    ]
    for name in nonneg:
        if not getattr(args, name) >= 0.0:
            raise UsageError(f"{_flag(name)} must be >= 0, got {getattr(args, name)}")
    if not 0.0 < args.friction_low <= args.friction_high:
        raise UsageError(
            f"need 0 < --friction-low <= --friction-high, got {args.friction_low}, {args.friction_high}"
        )
    friction_table = check_env_changes(args)
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        raise UsageError(f"--hidden-sizes must be positive widths, got {args.hidden_sizes}")
    batch = args.num_steps * args.num_envs
    if batch % args.num_minibatches:
        raise UsageError(
            f"--num-minibatches {args.num_minibatches} does not divide the batch of "
            f"num_steps * num_envs = {batch}"
        )

    # conflicts
    names = agent.method_names(args)
    suite.check_combination(names, agent.spell)
    given = [
        f.name
        for f in dataclasses.fields(args)
        if getattr(args, f.name) != getattr(defaults, f.name)
    ]
    suite.check_settings(names, given, agent.spell)
    for name in ("l2_init", "parseval", "weight_clipping"):
        if not getattr(args, name) >= 0.0 or not math.isfinite(getattr(args, name)):
            raise UsageError(f"{_flag(name)} must be >= 0, got {getattr(args, name)}")
    for name in ("soft_shrink_perturb", "shrink_perturb_init"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"{_flag(name)} must be in [0, 1], got {getattr(args, name)}")
    layers = len(args.hidden_sizes) + 1 if args.hidden_sizes else 1
    if not 0 <= args.head_reset <= layers:
        raise UsageError(
            f"--head-reset must be in [0, {layers}] (the Linear layers), got {args.head_reset}"
        )
    if args.upgd and args.standard_adam:
        raise UsageError(
            "--upgd has its own betas (0.9, 0.999, the authors'): drop --standard-adam"
        )
    if args.kron and args.standard_adam:
        raise UsageError("--kron is not Adam: drop --standard-adam")
    if not args.upgd_sigma >= 0 or not 0 <= args.upgd_beta_utility < 1:
        raise UsageError(
            f"need --upgd-sigma >= 0 and --upgd-beta-utility in [0, 1), got {args.upgd_sigma}, "
            f"{args.upgd_beta_utility}"
        )
    if not 1 <= args.injection_layers <= layers:
        raise UsageError(
            f"--injection-layers must be in [1, {layers}] (the Linear layers), got "
            f"{args.injection_layers}"
        )
    if (
        args.injection
        and args.injection_layers > 1
        and (args.layer_norm or args.nap or args.crelu or args.dff)
    ):
        raise UsageError(
            "--injection with --injection-layers > 1 injects a head of Linear layers and ReLUs: "
            "it does not take --layer-norm, --nap, --crelu or --dff (use --injection-layers 1)"
        )
    if args.friction_every == 0 and (
        args.injection or args.adam_reset or args.head_reset or args.shrink_perturb_init < 1
    ):
        raise UsageError(
            "--friction-every 0 has no friction changes: the task-boundary methods "
            "(--injection, --adam-reset, --head-reset, --shrink-perturb-init) would never act"
        )
    if args.standard_adam and (args.adam_beta1 is not None or args.adam_beta2 is not None):
        raise UsageError("--standard-adam sets the betas to 0.9/0.999: drop --adam-beta1/2")
    if args.l2 and args.weight_decay is not None:
        raise UsageError("--l2 sets weight decay 1e-3: drop --weight-decay or --l2")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA GPU is available")

    preset = presets(args)
    weight_decay = preset["weight_decay"] if args.weight_decay is None else args.weight_decay
    betas = (preset["adam_beta1"], preset["adam_beta2"])
    learning_rate, adam_eps = preset["learning_rate"], preset["adam_eps"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or min(args.num_envs, cores or 1)
    return dataclasses.replace(
        args,
        bootstrap_truncation=args.bootstrap_truncation and not args.paper_exact,
        reset_optimizer_state=args.reset_optimizer_state and not args.paper_exact,
        adam_beta1=betas[0] if args.adam_beta1 is None else args.adam_beta1,
        adam_beta2=betas[1] if args.adam_beta2 is None else args.adam_beta2,
        weight_decay=weight_decay,
        learning_rate=learning_rate if args.learning_rate is None else args.learning_rate,
        adam_eps=adam_eps if args.adam_eps is None else args.adam_eps,
        noise_std=(1e-5 if args.noise_std is None else args.noise_std)
        if args.shrink_perturb
        else 0.0,
        threads=threads,
        friction_table=friction_table,
    )


# Fields that do not define a configuration (where and how long it runs, its seed), left out
# of its label.
NOT_IN_LABEL = frozenset(
    {"env", "steps", "seed", "device", "threads", "run_name", "runs_dir", "resume"}
    | {"checkpoint_every", "metrics_every", "progress", "provenance", "label"}
    # evaluation does not change the training (tested): runs with and without it pool
    | {"eval_every", "eval_episodes", "eval_previous"}
    # nor do tracking and videos (tested)
    | {"track", "wandb_project_name", "wandb_entity", "capture_video", "video_every"}
)


def configuration_label(args: Settings) -> suite.Label:
    """The label of a run's configuration (:class:`~ppo_cbp.plasticity.suite.Label`): its
    methods, or the Adam baseline, and the settings that differ from those of the same methods
    with every other flag at its default (a value-switched method at its source's value, e.g.
    ``--l2-init 0.01``).

    :param args: the resolved settings.
    """
    names = agent.method_names(args)
    # --paper-exact's presets (bootstrap, optimizer-state reset) belong to it, not to the label
    baseline = dict(
        env=args.env, steps=args.steps, device="cpu", standard_adam=args.standard_adam,
        paper_exact=args.paper_exact,
    )  # fmt: skip
    for name in names:
        field, value = agent.switch_default(name)
        baseline[field] = value
    try:
        defaults = args_dict(resolve_args(type(args)(**baseline)))
    except UsageError:  # the default schedule does not fit (the paper's friction table): its own
        schedule = {k: getattr(args, k) for k in ("friction_every", "friction_table")}
        defaults = args_dict(resolve_args(type(args)(**baseline, **schedule)))
        plain = type(args)()
        defaults.update({k: getattr(plain, k) for k in schedule})
    methods = list(names) or ["tuned_adam"]
    if args.standard_adam:
        methods = [n for n in methods if n != "tuned_adam"] + ["standard_adam"]
    switches = {agent.switch_default(n)[0] for n in suite.METHODS if suite.METHODS[n].flag}
    bools = {f for f in switches if isinstance(getattr(args, f), bool)} | {"standard_adam"}
    label = suite.Label.of(methods, args_dict(args), defaults, NOT_IN_LABEL | bools)
    if args.paper_exact:
        label = dataclasses.replace(
            label, settings=tuple(sorted((*label.settings, ("paper_exact", True))))
        )
    return label


def run_slug(label: suite.Label) -> str:
    """A label's slug for a folder name, at most 100 characters (a longer one is cut and
    ends in a hash of the whole, so that two configurations never share a folder name)."""
    slug = label.slug
    if len(slug) <= 100:
        return slug
    return slug[:90] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:9]


def check_env_changes(args: Settings) -> str:
    """Check the env-change and evaluation settings; return the friction table in use:
    ``--friction-table``, or by default ``paper`` with ``--paper-exact`` on a friction-changing
    Ant (the released slippery-Ant runs) and ``drawn`` otherwise.

    :raises UsageError: naming the bad value."""
    changing = args.friction_every > 0
    dynamics = [q for q in args.dynamics if q != "none"]
    unknown = [q for q in dynamics if q not in QUANTITIES]
    if unknown or len(set(dynamics)) < len(dynamics) or not args.dynamics:
        raise UsageError(
            f"--dynamics takes distinct names among {', '.join(QUANTITIES)} (or none), got "
            f"{' '.join(args.dynamics) or 'nothing'}"
        )
    try:
        ranges = scale_ranges(args.dynamics_range)
    except ValueError as e:
        raise UsageError(f"--dynamics-range: {e}") from None
    for entry in args.dynamics_range:
        name = entry.partition("=")[0].strip()
        low, high = ranges.get(name, (1.0, 1.0))
        if name not in SCALES or name not in dynamics:
            raise UsageError(
                f"--dynamics-range {entry}: {name!r} is not a multiplier that --dynamics changes "
                f"({', '.join(q for q in dynamics if q in SCALES) or 'none'})"
            )
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise UsageError(f"--dynamics-range {entry}: need 0 < LOW <= HIGH")
    if not (math.isfinite(args.obs_offset) and args.obs_offset >= 0):
        raise UsageError(f"--obs-offset must be >= 0, got {args.obs_offset}")
    changes = [
        name
        for name, on in (
            ("--dynamics", tuple(args.dynamics) != ("friction",)),
            ("--dynamics-range", bool(args.dynamics_range)),
            ("--dynamics-drift", args.dynamics_drift),
            ("--obs-permute", args.obs_permute),
            ("--obs-offset", args.obs_offset > 0),
            ("--reward-flip", args.reward_flip),
            ("--friction-table paper", args.friction_table == "paper"),
        )
        if on
    ]
    if changes and not changing:
        raise UsageError(
            f"--friction-every 0 has no segments: {', '.join(changes)} would never act"
        )
    if args.eval_every < 0 or args.eval_previous < 0 or args.eval_episodes < 1:
        raise UsageError(
            "need --eval-every >= 0, --eval-episodes >= 1 and --eval-previous >= 0, got "
            f"{args.eval_every}, {args.eval_episodes}, {args.eval_previous}"
        )
    if args.eval_previous and not (args.eval_every and changing):
        raise UsageError("--eval-previous needs --eval-every > 0 and --friction-every > 0")
    table = args.friction_table
    if table is None:
        ant = args.env.startswith("Ant-")
        table = (
            "paper" if args.paper_exact and ant and changing and "friction" in dynamics else "drawn"
        )
    if table not in ("drawn", "paper"):
        raise UsageError(f"--friction-table must be drawn or paper, got {table}")
    if table == "paper":
        if "friction" not in dynamics:
            raise UsageError("--friction-table paper needs friction among --dynamics")
        if not 0 <= args.seed < TABLE_SEEDS:
            raise UsageError(
                f"--friction-table paper has rows for seeds 0-{TABLE_SEEDS - 1}, got --seed {args.seed}"
            )
        batch = args.num_steps * args.num_envs
        total = -(-args.steps // batch) * batch  # a run stops at an update boundary
        needed = total // args.friction_every + 1  # segments
        needed += int(args.dynamics_drift) - int(args.friction_start_default)
        if needed > TABLE_SEGMENTS:
            raise UsageError(
                f"--friction-table paper has {TABLE_SEGMENTS} frictions per seed: a run of "
                f"{total} steps changing every {args.friction_every} needs {needed}"
                f"{' (with the drift target)' if args.dynamics_drift else ''}; lower --steps (the "
                "released slippery-Ant runs: 20_000_000) or raise --friction-every, or pass "
                "--friction-table drawn"
            )
    return table


def method_tag(args: Settings) -> str:
    tags = [t for t, on in (("cbp", args.cbp), ("redo", args.redo), ("l2", args.l2)) if on]
    tags += ["snp"] if args.shrink_perturb else []
    tags += ["stdadam"] if args.standard_adam else []
    tags += ["exact"] if args.paper_exact else []
    return "+".join(tags) or "ppo"


def args_dict(args: Settings) -> dict[str, Any]:
    d = dataclasses.asdict(args)
    d["hidden_sizes"] = list(args.hidden_sizes)
    for name in ("dynamics", "dynamics_range"):
        d[name] = list(d[name])
    return d


def args_from_dict(cls: type[SettingsT], d: dict[str, Any]) -> SettingsT:
    d = dict(d)
    d["hidden_sizes"] = tuple(d["hidden_sizes"])
    # A run saved before --friction-table existed keeps its drawn sequence (--paper-exact on
    # Ant would now choose the table).
    d.setdefault("friction_table", "drawn")
    for name in ("dynamics", "dynamics_range"):
        if name in d:
            d[name] = tuple(d[name])
    return cls(**d)


def given_fields(cls: type[Settings], argv: Sequence[str]) -> set[str]:
    """The ``Args`` fields named on a command line: ``--name``, ``--name=value`` or ``--no-name``.

    A flag given with its default value counts as given (``--env Ant-v4`` on a resumed Hopper
    run is a conflict, not a no-op); values are never mistaken for flags, as no value of these
    fields starts with ``--``."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = set()
    for word in argv:
        if not word.startswith("--"):
            continue
        name = word[2:].split("=", 1)[0].replace("-", "_")
        if name not in names and name.startswith("no_") and name[3:] in names:
            name = name[3:]
        if name in names:
            given.add(name)
    return given


def merge_resume(args: SettingsT, saved: SettingsT, given: set[str] | None = None) -> SettingsT:
    """Settings for a resumed run: the checkpoint's, with the command line's where it is given.

    ``given`` names the fields set on the command line (:func:`given_fields`); None (a call from
    Python) counts a field as given when it differs from its default."""
    defaults = type(args)()
    merged: dict[str, Any] = {}
    conflicts = []
    for f in dataclasses.fields(args):
        name, now, then = f.name, getattr(args, f.name), getattr(saved, f.name)
        explicit = now != getattr(defaults, name) if given is None else name in given
        if name in _RESUME_IGNORED:
            merged[name] = now
        elif not explicit or now == then:
            merged[name] = then
        elif name in _RESUME_FREE and not (name == "steps" and saved.anneal_lr):
            merged[name] = now
        else:
            conflicts.append((name, then, now))
    run_folder.check_settings(Path(args.resume), conflicts)
    return type(args)(**merged)


def find_checkpoint(resume: str) -> Path:
    p = Path(resume)
    if not p.exists():
        raise UsageError(f"resume path {resume} does not exist")
    path = p if p.is_file() else p / CHECKPOINT_NAME
    if not path.is_file():
        runs = sorted(str(c.parent) for c in p.glob(f"*/{CHECKPOINT_NAME}"))
        hint = f" (runs in {p}: {', '.join(runs[:3])}{', ...' * (len(runs) > 3)})" if runs else ""
        raise UsageError(f"no checkpoint to resume from: {path} does not exist{hint}")
    return path


def read_checkpoint(cls: type[SettingsT], path: Path) -> tuple[dict[str, Any], SettingsT]:
    """The checkpoint at ``path`` and the settings it was written with.

    :raises UsageError: if the file cannot be read (empty, truncated, corrupt, no permission)
        or was not written by this trainer (a supervised benchmark's checkpoint is named as
        such, with the command that resumes it); the message says what to do instead."""
    instead = "pass the checkpoint.pt of a train.py run folder, or start a new run without --resume"
    state = run_folder.load_checkpoint(
        path,
        "this trainer",
        instead,
        "no older checkpoint is kept: start the run over without --resume "
        f"(remove {path.parent} first to reuse its name)",
        older="resume from an older checkpoint with --resume {path}",
    )
    if isinstance(state, dict) and "rows" in state and "config" in state:
        benchmark = state.get("benchmark")  # absent from checkpoints written before it was kept
        command = f"python scripts/supervised.py {benchmark or '<benchmark>'} --out {path.parent}"
        raise UsageError(
            f"{path.parent} is a run folder of scripts/supervised.py"
            f"{f' ({benchmark})' if benchmark else ''}, not of train.py: continue it with "
            f"{command} --resume and the flags it was started with"
        )
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = (
            f"format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}"
            if isinstance(state, dict)
            else f"it holds a {type(state).__name__}"
        )
        raise UsageError(f"{path} is not a checkpoint of this trainer ({found}); {instead}")
    try:
        saved = args_from_dict(cls, state["args"])
    except (KeyError, TypeError) as e:
        raise UsageError(
            f"{path} holds settings this version of the trainer does not know ({e})"
        ) from None
    return state, saved


PAPER_EXACT_OFF = ("bootstrap_truncation", "reset_optimizer_state")
"""The flags whose released-code value (off) ``--paper-exact`` sets."""


def run_settings(
    args: SettingsT, given: set[str] | None = None
) -> tuple[SettingsT, SettingsT, dict[str, Any] | None, Path]:
    """A run's settings and folder, every check done before anything is created or written.

    :return: ``(given_args, args, checkpoint, run_dir)``: the settings as given (a resumed run's
        merged with its checkpoint's, :func:`merge_resume`), the same after
        :func:`resolve_args`, the checkpoint to resume from (``None`` for a new run) and the
        run's folder (a new run's: ``runs_dir/run_name``, by default
        ``<env>__<method>__s<seed>__<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``, ... when a run
        started in the same second took it). A new run's folder is created here, exclusively
        (:func:`run_folder.claim`), once every check has passed.
    :raises UsageError: for bad settings, a resumed run that already reached ``--steps`` or
        given another ``--run-name``, a ``--run-name`` that is not one folder name, a new run
        whose folder already holds one or is a non-empty folder that is not a run folder, or a
        folder that cannot be written.
    """
    given_args, ckpt = args, None
    named = args.run_name is not None and (given is None or "run_name" in given)
    if given_args.resume is not None:
        ckpt_path = find_checkpoint(given_args.resume)
        if named and args.run_name != ckpt_path.parent.name:
            raise UsageError(
                f"--resume continues the run in {ckpt_path.parent}: drop --run-name "
                f"{args.run_name} (a resumed run keeps its folder)"
            )
        ckpt, saved = read_checkpoint(type(args), ckpt_path)
        given_args = merge_resume(given_args, saved, given)
        run_dir = ckpt_path.parent
    if given_args.paper_exact and given:
        # --paper-exact would silently turn these off: say so instead
        clash = [f for f in PAPER_EXACT_OFF if f in given and getattr(given_args, f)]
        if clash:
            names = " and ".join("--" + f.replace("_", "-") for f in clash)
            raise UsageError(f"--paper-exact turns off {names}: drop one of them")
    args = resolve_args(given_args)
    if ckpt is not None:
        advice = (
            "it anneals the learning rate over --steps, so it cannot be extended"
            if args.anneal_lr
            else "pass a larger --steps to extend it"
        )
        run_folder.refuse_finished(run_dir, "step", int(ckpt["global_step"]), args.steps, advice)
    else:
        if args.run_name is not None:
            run_folder.check_name(args.run_name, "--run-name")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        slug = run_slug(configuration_label(args))
        run_name = args.run_name or f"{args.env}__{slug}__s{args.seed}__{stamp}"
        run_dir = Path(args.runs_dir) / run_name
        if (run_dir / CHECKPOINT_NAME).exists():
            raise UsageError(
                f"{run_dir} already holds a run: resume it with --resume {run_dir} or pick another --run-name"
            )
        run_folder.check_not_foreign(
            run_dir, "the run folder", "pick another --run-name or --runs-dir"
        )
    tracking.require(getattr(args, "track", False), getattr(args, "capture_video", False))
    if getattr(args, "capture_video", False):
        from ppo_cbp.ppo.video import check_rendering

        if args.video_every < 0:
            raise UsageError(f"--video-every must be >= 0 (0: only step 0), not {args.video_every}")

        check_rendering(args.env)
    run_folder.check_writable(run_dir, "the run folder")
    if ckpt is None:  # the last step: claimed exclusively, a default name made unique
        run_dir = run_folder.claim(Path(args.runs_dir), run_name, unique=args.run_name is None)
    run_folder.warn_other_code(ckpt)
    return given_args, args, ckpt, run_dir
