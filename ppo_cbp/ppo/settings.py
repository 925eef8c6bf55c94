"""The PPO trainer's settings: checks and presets of its ``Args``, and those of a resumed run.

:func:`resolve_args` checks every value and conflict before any work starts (one
:class:`~ppo_cbp.errors.UsageError` naming the flag) and fills in the presets (``--cbp``,
``--l2``, ``--standard-adam``, ``--paper-exact``, ...), so that no ``None`` is left. A resumed
run takes its settings from its checkpoint (:func:`read_checkpoint`), with the command line's
where it gives them (:func:`given_fields`), and refuses those that would change the training
(:func:`merge_resume`); :func:`run_settings` does all of it for a run and names its folder.
``Args`` is the dataclass of ``ppo_cbp/train.py``; these functions take
it (or its class) as an argument, so that running that file as a script works.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import torch

from ppo_cbp import run_folder
from ppo_cbp.errors import UsageError

if TYPE_CHECKING:
    from ppo_cbp.train import Args

__all__ = [
    "args_dict",
    "find_checkpoint",
    "given_fields",
    "merge_resume",
    "method_tag",
    "read_checkpoint",
    "resolve_args",
    "run_settings",
]

TESTED_ENVS = tuple(f"{name}-v{v}" for name in ("Ant", "Hopper", "Walker2d") for v in (4, 5))
CHECKPOINT_NAME = run_folder.CHECKPOINT_NAME
CHECKPOINT_FORMAT = 1

# Fields that may differ from the checkpoint when resuming: they do not change the training.
# (steps only without --anneal-lr, whose schedule depends on it.)
_RESUME_FREE = {"steps", "checkpoint_every", "metrics_every", "device", "threads", "progress"}
_RESUME_IGNORED = {"resume", "run_name", "runs_dir"}
_CBP_FIELDS = ("replacement_rate", "maturity_threshold", "decay_rate", "utility")
_REDO_FIELDS = ("redo_threshold", "redo_period")


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


def resolve_args(args: Args) -> Args:
    """Validate ``args`` and return a copy with the presets applied (no ``None`` left).

    :raises UsageError: naming the bad value or the conflicting flags.
    """
    a = args
    defaults = type(a)()
    check_env_id(a.env)
    if a.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {a.seed}")
    positive = ("steps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "threads")
    for name in positive:
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            raise UsageError(f"{_flag(name)} must be positive, got {getattr(a, name)}")
    for name in ("checkpoint_every", "metrics_every", "friction_every", "maturity_threshold"):
        if getattr(a, name) < 0:
            raise UsageError(f"{_flag(name)} must be >= 0, got {getattr(a, name)}")
    if a.redo_period <= 0:
        raise UsageError(f"--redo-period must be positive, got {a.redo_period}")
    rates = ["replacement_rate", "decay_rate", "gamma", "gae_lambda", "clip_coef"]
    rates += [n for n in ("adam_beta1", "adam_beta2") if getattr(a, n) is not None]
    for name in rates:
        value = getattr(a, name)
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"{_flag(name)} must be in [0, 1], got {value}")
    for name in ("adam_beta1", "adam_beta2", "decay_rate"):
        if getattr(a, name) is not None and getattr(a, name) >= 1.0:
            raise UsageError(f"{_flag(name)} must be < 1, got {getattr(a, name)}")
    if not a.learning_rate > 0 or not math.isfinite(a.learning_rate):
        raise UsageError(f"--learning-rate must be positive, got {a.learning_rate}")
    nonneg = ["adam_eps", "ent_coef", "vf_coef", "redo_threshold"]
    nonneg += [
        n for n in ("weight_decay", "noise_std", "max_grad_norm") if getattr(a, n) is not None
    ]
    for name in nonneg:
        if not getattr(a, name) >= 0.0:
            raise UsageError(f"{_flag(name)} must be >= 0, got {getattr(a, name)}")
    if not 0.0 < a.friction_low <= a.friction_high:
        raise UsageError(
            f"need 0 < --friction-low <= --friction-high, got {a.friction_low}, {a.friction_high}"
        )
    if not a.hidden_sizes or min(a.hidden_sizes) <= 0:
        raise UsageError(f"--hidden-sizes must be positive widths, got {a.hidden_sizes}")
    batch = a.num_steps * a.num_envs
    if batch % a.num_minibatches:
        raise UsageError(
            f"--num-minibatches {a.num_minibatches} does not divide the batch of "
            f"num_steps * num_envs = {batch}"
        )

    # conflicts
    if a.cbp and a.redo:
        raise UsageError("--cbp and --redo conflict: choose one unit-reset method")
    for name in ("l2_init", "parseval", "weight_clipping"):
        if not getattr(a, name) >= 0.0 or not math.isfinite(getattr(a, name)):
            raise UsageError(f"{_flag(name)} must be >= 0, got {getattr(a, name)}")
    for name in ("soft_shrink_perturb", "shrink_perturb_init"):
        if not 0.0 <= getattr(a, name) <= 1.0:
            raise UsageError(f"{_flag(name)} must be in [0, 1], got {getattr(a, name)}")
    layers = len(a.hidden_sizes) + 1 if a.hidden_sizes else 1
    if not 0 <= a.head_reset <= layers:
        raise UsageError(
            f"--head-reset must be in [0, {layers}] (the Linear layers), got {a.head_reset}"
        )
    if a.upgd and (a.standard_adam or a.adam_beta1 is not None or a.adam_beta2 is not None):
        raise UsageError("--upgd replaces Adam: drop --standard-adam/--adam-beta1/--adam-beta2")
    if a.upgd and a.adam_reset:
        raise UsageError("--upgd and --adam-reset conflict: there is no Adam state to reset")
    if not a.upgd_sigma >= 0 or not 0 <= a.upgd_beta_utility < 1:
        raise UsageError(
            f"need --upgd-sigma >= 0 and --upgd-beta-utility in [0, 1), got {a.upgd_sigma}, "
            f"{a.upgd_beta_utility}"
        )
    if a.trac and a.injection:
        raise UsageError(
            "--trac and --injection conflict: TRAC's reference point has no entry for an "
            "injected branch"
        )
    if a.layer_norm and a.nap:
        raise UsageError(
            "--layer-norm and --nap conflict: --nap already puts a LayerNorm after every hidden layer"
        )
    if a.injection and (a.layer_norm or a.nap or a.crelu):
        raise UsageError(
            "--injection injects a head of Linear layers and ReLUs: it does not take "
            "--layer-norm, --nap or --crelu"
        )
    if a.injection and a.head_reset:
        raise UsageError(
            "--injection and --head-reset conflict: both renew the heads at a friction change"
        )
    if a.friction_every == 0 and (
        a.injection or a.adam_reset or a.head_reset or a.shrink_perturb_init < 1
    ):
        raise UsageError(
            "--friction-every 0 has no friction changes: the task-boundary methods "
            "(--injection, --adam-reset, --head-reset, --shrink-perturb-init) would never act"
        )
    if a.injection and (a.cbp or a.redo):
        raise UsageError(
            f"--injection and --{'cbp' if a.cbp else 'redo'} conflict: the injected head's "
            "frozen units are not theirs to replace"
        )
    if a.standard_adam and (a.adam_beta1 is not None or a.adam_beta2 is not None):
        raise UsageError("--standard-adam sets the betas to 0.9/0.999: drop --adam-beta1/2")
    if a.l2 and a.weight_decay is not None:
        raise UsageError("--l2 sets weight decay 1e-3: drop --weight-decay or --l2")
    if a.noise_std is not None and not a.shrink_perturb:
        raise UsageError("--noise-std only applies with --shrink-perturb")
    for method, fields in (("cbp", _CBP_FIELDS), ("redo", _REDO_FIELDS)):
        if not getattr(a, method):
            for name in fields:
                if getattr(a, name) != getattr(defaults, name):
                    raise UsageError(f"{_flag(name)} only applies with {_flag(method)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA GPU is available")

    if a.weight_decay is not None:
        weight_decay = a.weight_decay
    elif a.l2:
        weight_decay = 1e-3
    elif a.cbp or a.redo or a.shrink_perturb:
        weight_decay = 1e-4
    else:
        weight_decay = 0.0
    betas = (0.9, 0.999) if a.standard_adam else (0.99, 0.99)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = a.threads or min(a.num_envs, cores or 1)
    return dataclasses.replace(
        a,
        bootstrap_truncation=a.bootstrap_truncation and not a.paper_exact,
        reset_optimizer_state=a.reset_optimizer_state and not a.paper_exact,
        adam_beta1=betas[0] if a.adam_beta1 is None else a.adam_beta1,
        adam_beta2=betas[1] if a.adam_beta2 is None else a.adam_beta2,
        weight_decay=weight_decay,
        noise_std=(1e-5 if a.noise_std is None else a.noise_std) if a.shrink_perturb else 0.0,
        threads=threads,
    )


def method_tag(a: Args) -> str:
    tags = [t for t, on in (("cbp", a.cbp), ("redo", a.redo), ("l2", a.l2)) if on]
    tags += ["snp"] if a.shrink_perturb else []
    tags += ["stdadam"] if a.standard_adam else []
    tags += ["exact"] if a.paper_exact else []
    return "+".join(tags) or "ppo"


def args_dict(a: Args) -> dict[str, Any]:
    d = dataclasses.asdict(a)
    d["hidden_sizes"] = list(a.hidden_sizes)
    return d


def args_from_dict(cls: type[Args], d: dict[str, Any]) -> Args:
    d = dict(d)
    d["hidden_sizes"] = tuple(d["hidden_sizes"])
    return cls(**d)


def given_fields(cls: type[Args], argv: Sequence[str]) -> set[str]:
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


def merge_resume(args: Args, saved: Args, given: set[str] | None = None) -> Args:
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


def read_checkpoint(cls: type[Args], path: Path) -> tuple[dict[str, Any], Args]:
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
    args: Args, given: set[str] | None = None
) -> tuple[Args, Args, dict[str, Any] | None, Path]:
    """A run's settings and folder, every check done before anything is created or written.

    :return: ``(raw, resolved, checkpoint, run_dir)``: the settings as given (a resumed run's
        merged with its checkpoint's, :func:`merge_resume`), the same after
        :func:`resolve_args`, the checkpoint to resume from (``None`` for a new run) and the
        run's folder (a new run's: ``runs_dir/run_name``, by default
        ``<env>__<method>__s<seed>__<YYYYmmdd-HHMMSS>``).
    :raises UsageError: for bad settings, a resumed run that already reached ``--steps``, a
        new run whose folder already holds one, or a folder that cannot be written.
    """
    raw, ckpt = args, None
    if raw.resume is not None:
        ckpt_path = find_checkpoint(raw.resume)
        ckpt, saved = read_checkpoint(type(args), ckpt_path)
        raw = merge_resume(raw, saved, given)
        run_dir = ckpt_path.parent
    if raw.paper_exact and given:
        # --paper-exact would silently turn these off: say so instead
        clash = [f for f in PAPER_EXACT_OFF if f in given and getattr(raw, f)]
        if clash:
            names = " and ".join("--" + f.replace("_", "-") for f in clash)
            raise UsageError(f"--paper-exact turns off {names}: drop one of them")
    a = resolve_args(raw)
    if ckpt is not None:
        advice = (
            "it anneals the learning rate over --steps, so it cannot be extended"
            if a.anneal_lr
            else "pass a larger --steps to extend it"
        )
        run_folder.refuse_finished(run_dir, "step", int(ckpt["global_step"]), a.steps, advice)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_name = a.run_name or f"{a.env}__{method_tag(a)}__s{a.seed}__{stamp}"
        run_dir = Path(a.runs_dir) / run_name
        if (run_dir / CHECKPOINT_NAME).exists():
            raise UsageError(
                f"{run_dir} already holds a run: resume it with --resume {run_dir} or pick another --run-name"
            )
    run_folder.check_writable(run_dir, "the run folder")
    return raw, a, ckpt, run_dir
