"""A trained PPO policy and value function from a run folder, for use in Python.

:func:`load_policy` reads a ``train.py`` run's ``checkpoint.pt`` (the folder or the file) and
returns a :class:`Policy`: the policy-mean network built as the trainer builds it
(:func:`ppo_cbp.ppo.agent.make_networks` from the checkpoint's resolved settings: plain MLP,
LayerNorm for ``--layer-norm``/``--nap``, CReLU, DFF, injected heads, whose branches the state dict
rebuilds), its log-std and the run's observation normalisation (its statistics read, not
updated: :meth:`ppo_cbp.ppo.run.RunState.normalize_obs`, the trainer's own). ``policy(obs)``
is the mean action, or an action drawn as the trainer draws them (``mean + exp(log_std) *
eps``, ``eps`` standard normal) with ``deterministic=False``. :func:`load_value` (or
``policy.value``) is the value function the same way.

The settings are rebuilt without importing ``ppo_cbp/train.py`` (the command-line layer): the
networks read only fields by name, so a namespace of the checkpoint's ``"resolved"`` settings
(:func:`settings_of`) stands in for its ``Args``.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ppo_cbp import run_folder
from ppo_cbp.errors import UsageError
from ppo_cbp.ppo.agent import make_networks
from ppo_cbp.ppo.normalize import RunningMeanStd
from ppo_cbp.ppo.run import RunState
from ppo_cbp.ppo.settings import CHECKPOINT_FORMAT, CHECKPOINT_NAME

__all__ = ["Policy", "ValueFunction", "load_policy", "load_value", "read_run", "settings_of"]

_TUPLES = ("hidden_sizes", "dynamics", "dynamics_range")


def settings_of(saved: dict[str, Any]) -> types.SimpleNamespace:
    """A checkpoint's settings dict (``"resolved"`` or ``"args"``) as a namespace that the
    trainer's helpers read like its ``Args`` (lists back to tuples, as ``args_from_dict``)."""
    d = dict(saved)
    for name in _TUPLES:
        if name in d:
            d[name] = tuple(d[name])
    d.setdefault("friction_table", "drawn")
    d.setdefault("dff", False)  # settings saved before --dff existed
    return types.SimpleNamespace(**d)


def _checkpoint_path(run: str | Path) -> Path:
    p = Path(run)
    if not p.exists():
        raise UsageError(f"run folder {run} does not exist")
    path = p if p.is_file() else p / CHECKPOINT_NAME
    if not path.is_file():
        raise UsageError(f"{p} holds no {CHECKPOINT_NAME}: pass a train.py run folder")
    return path


def read_run(run: str | Path) -> tuple[Path, dict[str, Any], types.SimpleNamespace]:
    """``(checkpoint path, checkpoint, resolved settings)`` of a ``train.py`` run.

    :raises UsageError: one line: no such folder or file, no checkpoint in it, a checkpoint
        that cannot be read, or one of ``scripts/supervised.py`` (use ``load_learner``)."""
    path = _checkpoint_path(run)
    instead = "pass the checkpoint.pt of a train.py run folder"
    state = run_folder.load_checkpoint(path, "train.py", instead, "it cannot be loaded")
    if isinstance(state, dict) and "rows" in state and "config" in state:
        raise UsageError(
            f"{path.parent} is a run folder of scripts/supervised.py, not of train.py: load its "
            f"networks with ppo_cbp.load_learner({str(path.parent)!r}, seed)"
        )
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a checkpoint of train.py; {instead}")
    try:
        args = settings_of(state.get("resolved") or state["args"])
    except (KeyError, TypeError) as e:
        raise UsageError(f"{path} holds no settings this version can read ({e})") from None
    return path, state, args


def _device(device: str | torch.device | None) -> torch.device:
    d = torch.device(device if device is not None else "cpu")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device} is not available (no CUDA): pass device='cpu'")
    return d


class _Loaded:
    """What :class:`Policy` and :class:`ValueFunction` share: the run's observation
    normalisation and the conversion of numpy or torch, single or batched observations."""

    def __init__(self, obs_rms: RunningMeanStd | None, device: torch.device, obs_dim: int):
        self.obs_rms, self.device, self.obs_dim = obs_rms, device, obs_dim
        zero = torch.zeros(2, dtype=torch.float64)
        self._state = RunState(1, obs_rms=obs_rms, ret_rms=None, max_change=zero)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """Observations ``[..., obs_dim]`` as the network sees them: the trainer's
        normalisation (statistics not updated) in float64, then float32."""
        x = np.asarray(obs, np.float64)
        return np.asarray(self._state.normalize_obs(x, False), np.float32)

    def _input(self, obs: Any) -> tuple[torch.Tensor, bool, bool]:
        """``(network input [n, obs_dim], was numpy, was a single observation)``."""
        is_numpy = not isinstance(obs, torch.Tensor)
        x = np.asarray(obs) if is_numpy else obs.detach().cpu().numpy()
        if x.ndim not in (1, 2) or x.shape[-1] != self.obs_dim:
            raise ValueError(
                f"expected observations [{self.obs_dim}] or [n, {self.obs_dim}], got {x.shape}"
            )
        single = x.ndim == 1
        t = torch.from_numpy(self.normalize(x.reshape(-1, self.obs_dim))).to(self.device)
        return t, is_numpy, single

    @staticmethod
    def _output(y: torch.Tensor, is_numpy: bool, single: bool) -> Any:
        y = y[0] if single else y
        return y.cpu().numpy() if is_numpy else y


class ValueFunction(_Loaded):
    """``value(obs)``: the critic's estimate of each observation's value (``[n]``, or a scalar
    array for one observation), numpy in numpy out, torch in torch out (on :attr:`device`)."""

    def __init__(self, critic: nn.Module, obs_rms: RunningMeanStd | None, obs_dim: int):
        super().__init__(obs_rms, next(critic.parameters()).device, obs_dim)
        self.critic = critic

    def __call__(self, obs: Any) -> Any:
        x, is_numpy, single = self._input(obs)
        with torch.no_grad():
            return self._output(self.critic(x)[:, 0], is_numpy, single)


class Policy(_Loaded):
    """``policy(obs)``: the trained policy's action for ``obs`` (``[obs_dim]`` or
    ``[n, obs_dim]``, numpy or torch; the result is of the same kind and shape, torch on
    :attr:`device`).

    :attr:`actor` is the policy-mean network, :attr:`log_std` the log standard deviation,
    :attr:`value` the :class:`ValueFunction`, :attr:`settings` the run's resolved settings and
    :attr:`checkpoint` the checkpoint as loaded (on the CPU)."""

    def __init__(
        self,
        actor: nn.Module,
        log_std: torch.Tensor,
        value: ValueFunction,
        obs_rms: RunningMeanStd | None,
        obs_dim: int,
        settings: types.SimpleNamespace,
        checkpoint: dict[str, Any],
    ):
        super().__init__(obs_rms, log_std.device, obs_dim)
        self.actor, self.log_std, self.value = actor, log_std, value
        self.settings, self.checkpoint = settings, checkpoint

    def __call__(
        self,
        obs: Any,
        *,
        deterministic: bool = True,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> Any:
        """The mean action, or with ``deterministic=False`` ``mean + exp(log_std) * eps`` with
        ``eps`` drawn by ``torch.randn`` from ``generator`` (on :attr:`device`) or from a new
        one seeded with ``seed``."""
        x, is_numpy, single = self._input(obs)
        with torch.no_grad():
            mean = self.actor(x)
            if not deterministic:
                if generator is None:
                    generator = torch.Generator(self.device)
                    if seed is not None:
                        generator.manual_seed(seed)
                    else:
                        generator.seed()
                eps = torch.randn(mean.shape, generator=generator, device=self.device)
                mean = torch.addcmul(mean, self.log_std.exp(), eps)
        return self._output(mean, is_numpy, single)


def load_policy(run: str | Path, device: str | torch.device | None = "cpu") -> Policy:
    """The trained policy of ``run`` (a ``train.py`` run folder or its ``checkpoint.pt``) on
    ``device`` (``"cpu"``, ``"cuda"``, ...), with its value function as ``.value``.

    :raises UsageError: one line for a missing folder or checkpoint, an unreadable checkpoint, a
        supervised run's folder, or a device that is not available."""
    dev = _device(device)
    _, ckpt, args = read_run(run)
    obs_dim, act_dim = int(ckpt["next_obs"].shape[-1]), int(ckpt["log_std"].shape[0])
    actor, critic = make_networks(args, obs_dim, act_dim, dev)
    actor.load_state_dict(ckpt["actor"])
    critic.load_state_dict(ckpt["critic"])
    actor.eval()
    critic.eval()
    obs_rms = None
    if ckpt.get("obs_rms") is not None:
        obs_rms = RunningMeanStd((obs_dim,))
        obs_rms.load_state_dict(ckpt["obs_rms"])
    log_std = ckpt["log_std"].detach().to(dev).clone()
    value = ValueFunction(critic, obs_rms, obs_dim)
    return Policy(actor, log_std, value, obs_rms, obs_dim, args, ckpt)


def load_value(run: str | Path, device: str | torch.device | None = "cpu") -> ValueFunction:
    """The trained value function of ``run`` (see :func:`load_policy`)."""
    return load_policy(run, device).value
