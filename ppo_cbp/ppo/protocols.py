"""What the trainer's helpers (:mod:`ppo_cbp.ppo.settings`, :mod:`ppo_cbp.ppo.run`) need of its
settings and of its agent, so that they do not import ``ppo_cbp/train.py``, which imports them.

* :class:`Settings`: the fields they read by name, on a dataclass (``Args`` of the trainer);
  the checks in :func:`~ppo_cbp.ppo.settings.resolve_args` read the others through
  :func:`dataclasses.fields` and ``getattr``;
* :class:`TrainedAgent`: the networks, optimizer and plasticity methods as one state for the
  checkpoints, and the units CBP/ReDo replaced for the summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Protocol, TypeVar

__all__ = ["Settings", "SettingsT", "TrainedAgent"]


class Settings(Protocol):
    """The trainer's settings (a dataclass) as its helpers read them."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    # experiment
    env: str
    steps: int
    seed: int
    num_envs: int
    device: Literal["auto", "cpu", "cuda"]
    threads: int | None
    run_name: str | None
    runs_dir: str
    resume: str | None
    checkpoint_every: int
    progress: bool
    # PPO
    num_steps: int
    num_minibatches: int
    learning_rate: float | None
    anneal_lr: bool
    bootstrap_truncation: bool
    normalize_obs: bool
    normalize_reward: bool
    # networks and optimizer
    hidden_sizes: tuple[int, ...]
    adam_beta1: float | None
    adam_beta2: float | None
    weight_decay: float | None
    # methods
    cbp: bool
    redo: bool
    redo_period: int
    reset_optimizer_state: bool
    l2: bool
    shrink_perturb: bool
    noise_std: float | None
    shrink_perturb_init: float
    head_reset: int
    adam_reset: bool
    layer_norm: bool
    nap: bool
    crelu: bool
    dff: bool
    upgd: bool
    upgd_sigma: float
    upgd_beta_utility: float
    kron: bool
    trac: bool
    injection: bool
    standard_adam: bool
    paper_exact: bool
    # friction
    friction_every: int
    friction_low: float
    friction_high: float
    friction_start_default: bool
    friction_table: str | None
    dynamics: tuple[str, ...]
    dynamics_range: tuple[str, ...]
    dynamics_drift: bool
    obs_permute: bool
    obs_offset: float
    reward_flip: bool
    eval_every: int
    eval_episodes: int
    eval_previous: int


SettingsT = TypeVar("SettingsT", bound=Settings)
"""The settings' own class, kept through the helpers that return settings."""


class TrainedAgent(Protocol):
    """The agent as the checkpoints and the closing summary see it."""

    def state_dict(self) -> dict[str, Any]:
        """Its networks, optimizer and plasticity methods' states, by name (not copied)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...

    @property
    def units_replaced(self) -> dict[str, int]:
        """Units CBP/ReDo replaced so far, per network; empty without either."""
        ...
