"""C-CHAIN: continual churn approximated reduction (Tang, Obando-Ceron, Castro, Courville and
Berseth, "Mitigating Plasticity Loss in Continual Reinforcement Learning by Reducing Churn",
ICML 2025; code: github.com/bluecontra/C-CHAIN).

*Churn* is the change of a network's outputs, on states outside the minibatch, caused by one
minibatch update. C-CHAIN adds to every minibatch loss the churn of the previous update on a
reference batch of rollout states, so that the update also pulls the outputs there back towards
the network before that update; the coefficient is set so that the term keeps a fixed size
relative to the policy loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ppo_cbp.plasticity.hooks import PlasticityMethod
from ppo_cbp.plasticity.injection import InjectableNetwork
from ppo_cbp.seeding import TAG_CHURN_REFERENCE, derive_seed

__all__ = ["ChurnReduction"]

CHURN_EPS = 1e-8
"""Added to the mean churn in the coefficient rule, as the authors' code does."""


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class ChurnReduction(PlasticityMethod):
    """C-CHAIN's churn reduction term for one network (Tang et al., ICML 2025).

    With ``f_theta(s)`` the regularised output (the policy mean for the actor; the value for the
    critic), ``theta_t`` the parameters at minibatch step ``t`` and ``theta_{t-1}`` those before
    the previous optimizer step, the term added to step ``t``'s loss is

        lambda * L_churn(theta_t),
        L_churn(theta_t) = 1 / (|B_ref| D) * sum_{s in B_ref} || f_theta_t(s) - f_theta_{t-1}(s) ||^2

    (the mean over reference states and output dimensions), with ``f_theta_{t-1}`` a constant
    (no gradient) and ``lambda`` a constant of the step. It is 0 on the first ``skip_steps``
    optimizer steps after the start and after each task boundary. ``B_ref`` is a minibatch-sized
    set of rollout states drawn independently of the PPO minibatch: each epoch, an independent
    permutation of the rollout (:meth:`reference_permutation`) cut into minibatch-sized slices.

    The coefficient (the authors' "target relative loss" rule): updates ``1 ..
    adapt_from_update`` of a task use ``lambda = initial_coefficient``; at the end of every
    update ``k >= adapt_from_update`` (for the updates after it)

        lambda = target_relative_loss * mean_j |L_pg,j| / (mean_j L_churn,j + 1e-8) * scale,

    the means over the last ``window`` updates ``j <= k`` of the task, ``L_pg,j`` and
    ``L_churn,j`` the clipped policy loss and ``L_churn`` of update ``j``'s last minibatch, and
    ``scale`` the learning rate's annealing fraction (the authors' ``frac``; 1 without
    annealing). The trainer calls :meth:`end_update` once after each update's minibatches.

    Defaults are those of the authors' PPO on continual DeepMind Control
    (``crl_dmc/crl_run_ppo_c_chain_dmc.py``): the actor mean regularised, ``target_relative_loss
    = 0.05``, ``initial_coefficient = 100``, ``adapt_from_update = 50``, ``window = 100``,
    ``theta_{t-1}`` their ``his_agent_list[-2]``, skipped while ``len(his_agent_list) <= 2``
    (``skip_steps = 2``), and the history, coefficient and running means reset at each task.
    (Their discrete-action Gym Control variant uses a cross-entropy churn, target 1e4, lambda
    at least 1, starting at 1, window 50, from update 10.)

    Per seed: with ``seed_dims=1`` the outputs are ``[S, ...]``; ``L_churn``, ``lambda`` and the
    running means are per seed, the returned term is the sum over seeds of ``lambda_s *
    L_churn,s`` (a stacked network's loss is the sum of the seeds' losses) and
    :meth:`reference_permutation` draws each seed's permutation from its own generator.

    theta_{t-1} is kept as a copy of the module's parameters and buffers, refreshed in
    :meth:`after_step` (one ``_foreach_copy_`` per step); the previous network's outputs are
    a ``torch.func.functional_call`` of the module on that copy. Put this method after any
    method that changes the weights after the step (CBP, ReDo, S&P), so that the copy is the
    network the next step starts from.

    Injections: the copy covers every parameter and buffer the module has at each call. When
    the module's tensors change (a plasticity injection adds a branch ``theta'`` and its
    frozen copy ``theta'_0`` to an :class:`~ppo_cbp.plasticity.injection.InjectableNetwork`,
    detected by its number of injections, so no per-step walk over the module) the names and
    copies are rebuilt: the tensors already there keep their copies, and each new one enters
    theta_{t-1} (and the latest copy) at its value at the injection. For a branch that value
    is read from its frozen copy ``theta'_0``, which equals ``theta'`` at the injection
    whenever this method first sees it; any other new tensor enters at its current value. At
    the injection the branch and its copy cancel, so the output is unchanged, and the churn of
    the first step after it is exactly the output change the trained parameters (the body and
    the branch) made. Call :meth:`refresh` after any other change to the module's tensors.

    :param module: the network whose outputs are regularised (the actor, for the policy mean).
    :param output: maps ``module(states)`` to the regularised tensor (default: the output itself;
        e.g. ``lambda r: r[0]`` for a :class:`~ppo_cbp.nets.stacked_sequential.StackedSequential`).
    :param target_relative_loss: ``beta`` of the rule, >= 0.
    :param initial_coefficient: ``lambda`` before the rule applies, >= 0.
    :param adapt_from_update: the first update (counted from 1 in each task) after which the rule
        sets ``lambda``.
    :param window: number of past updates in the running means.
    :param skip_steps: optimizer steps after a (re)start without the term, >= 1 (theta_{t-1}
        exists only after one step).
    :param reset_at_task_boundary: restart the history, ``lambda`` and the running means in
        :meth:`at_task_boundary`, as the authors do between tasks.
    :param seed_dims: 1 if the module's outputs carry a leading seed dimension, else 0.
    :param seeds: the run seed of each stacked network (one when ``seed_dims == 0``), for the
        reference batches' generators (stream :data:`ppo_cbp.seeding.TAG_CHURN_REFERENCE`).

    Checkpoints: :meth:`state_dict` names the tensors of its copies; :meth:`load_state_dict`
    binds them to the module's tensors of those names, at once if the module has them, else at
    the next call (after the module's own load has rebuilt its branches). States without names
    (older checkpoints) hold the copies of the tensors the method was built with.
    """

    name = "c_chain"

    def __init__(
        self,
        module: nn.Module,
        *,
        output: Callable[[Any], Tensor] | None = None,
        target_relative_loss: float = 0.05,
        initial_coefficient: float = 100.0,
        adapt_from_update: int = 50,
        window: int = 100,
        skip_steps: int = 2,
        reset_at_task_boundary: bool = True,
        seed_dims: int = 0,
        seeds: Sequence[int] = (0,),
    ):
        if not target_relative_loss >= 0:
            raise ValueError(f"target_relative_loss must be >= 0, got {target_relative_loss}")
        if not initial_coefficient >= 0:
            raise ValueError(f"initial_coefficient must be >= 0, got {initial_coefficient}")
        if seed_dims not in (0, 1):
            raise ValueError(f"seed_dims must be 0 or 1, got {seed_dims!r}")
        seeds = [int(s) for s in seeds]
        if not seeds or (seed_dims == 0 and len(seeds) != 1):
            raise ValueError(
                f"seeds must hold one seed per stacked network (one when seed_dims=0), got {seeds}"
            )
        named = [*module.named_parameters(), *module.named_buffers()]
        if not any(isinstance(t, nn.Parameter) for _, t in named):
            raise ValueError(f"{type(module).__name__} has no parameters to regularise")
        self.module = module
        self.output = output
        self.target_relative_loss = float(target_relative_loss)
        self.initial_coefficient = float(initial_coefficient)
        self.adapt_from_update = _positive_int("adapt_from_update", adapt_from_update)
        self.window = _positive_int("window", window)
        self.skip_steps = _positive_int("skip_steps", skip_steps)
        self.reset_at_task_boundary = bool(reset_at_task_boundary)
        self.seed_dims = seed_dims
        self.seeds = seeds
        self._names = [n for n, _ in named]
        self._live = [t.detach() for _, t in named]
        self._latest = [t.clone() for t in self._live]
        self._previous = [t.clone() for t in self._live]
        self._built = (list(self._names), list(self._live))
        # the InjectableNetworks in the module and their number of injections: a change means
        # new tensors
        self._injectables = [
            (f"{n}." if n else "", m)
            for n, m in module.named_modules()
            if isinstance(m, InjectableNetwork)
        ]
        self._signature = self._current_signature()
        self._pending: dict[str, Any] | None = None
        device = self._live[0].device
        S = len(seeds)
        stats = dict(dtype=torch.float64, device=device)
        self.coefficient = torch.full((S,), self.initial_coefficient, **stats)
        """``lambda`` per seed (device tensor)."""
        self.churn = torch.zeros(S, **stats)
        """``L_churn`` per seed of the latest :meth:`loss` (0 while the term is skipped)."""
        self._abs_loss = torch.zeros(S, self.window, **stats)
        self._churn_history = torch.zeros(S, self.window, **stats)
        self.steps = 0
        """Optimizer steps since the start or the last task boundary."""
        self.updates = 0
        """Updates (:meth:`end_update` calls) since the start or the last task boundary."""
        self.generators = [
            torch.Generator(device=device).manual_seed(derive_seed(s, TAG_CHURN_REFERENCE))
            for s in seeds
        ]

    @property
    def num_seeds(self) -> int:
        return len(self.seeds)

    def _current_signature(self) -> tuple[int, ...]:
        return tuple(m.injections for _, m in self._injectables)

    def _sync(self) -> None:
        """Rebuild the names and copies if the module's tensors changed, or bind a loaded state."""
        if self._pending is None and self._current_signature() == self._signature:
            return
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Read the module's parameters and buffers anew (see the class docstring)."""
        named = [*self.module.named_parameters(), *self.module.named_buffers()]
        live = {n: t.detach() for n, t in named}
        if self._pending is not None:
            saved, self._pending = self._pending, None
            if saved["names"] != [n for n, _ in named]:
                raise ValueError(
                    "the state's snapshot does not match the module's tensors: it names "
                    f"{saved['names']}, the module has {[n for n, _ in named]}"
                )
            self._bind(saved["names"], [live[n] for n in saved["names"]], saved)
        known = {
            n: (latest, previous)
            for n, latest, previous in zip(self._names, self._latest, self._previous)
        }
        names, latest, previous = [], [], []
        for n, _ in named:
            if n in known:
                a, b = known[n]
            else:
                start = self._value_at_injection(n, live)
                a, b = start.clone(), start.clone()
            names.append(n)
            latest.append(a)
            previous.append(b)
        self._names, self._live = names, [live[n] for n in names]
        self._latest, self._previous = latest, previous
        self._signature = self._current_signature()

    def _value_at_injection(self, name: str, live: dict[str, Tensor]) -> Tensor:
        """A new tensor's value at its injection: a branch's frozen copy, else its value now."""
        for prefix, _ in self._injectables:
            branch = prefix + "trainable."
            if name.startswith(branch):
                twin = live.get(prefix + "frozen." + name[len(branch) :])
                if twin is not None and twin.shape == live[name].shape:
                    return twin
        return live[name]

    @torch.no_grad()
    def _bind(self, names: list[str], tensors: list[Tensor], state: dict[str, Any]) -> None:
        """Take the state's copies for these tensors (the state lists them in this order)."""
        for key in ("latest", "previous"):
            if [tuple(t.shape) for t in state[key]] != [tuple(t.shape) for t in tensors]:
                raise ValueError(f"state's {key!r} snapshot does not match the module's tensors")
        self._names, self._live = list(names), list(tensors)
        self._latest = [torch.empty_like(t).copy_(s) for t, s in zip(tensors, state["latest"])]
        self._previous = [torch.empty_like(t).copy_(s) for t, s in zip(tensors, state["previous"])]

    @property
    def active(self) -> bool:
        """Whether :meth:`loss` gives the churn term this step (else 0)."""
        return self.steps >= self.skip_steps

    def reference_permutation(self, n: int) -> Tensor:
        """A random permutation of ``n`` rollout indices (``[S, n]`` with ``seed_dims=1``, one
        row per seed from its own generator): slice ``k`` of minibatch size is minibatch ``k``'s
        reference batch. Draw one per epoch, as the authors do."""
        device = self._live[0].device
        perms = [torch.randperm(n, generator=g, device=device) for g in self.generators]
        return torch.stack(perms) if self.seed_dims else perms[0]

    def _outputs(self, result: Any) -> Tensor:
        out = result if self.output is None else self.output(result)
        if self.seed_dims and out.shape[0] != self.num_seeds:
            raise ValueError(
                f"outputs of shape {tuple(out.shape)}: expected {self.num_seeds} seeds first"
            )
        return out if self.seed_dims else out.unsqueeze(0)

    def loss(self, states: Tensor) -> Tensor:
        """``sum_s lambda_s * L_churn,s`` on the reference ``states`` (0-dim, with the graph of
        ``module(states)``); a constant 0 on the steps the term is skipped."""
        self._sync()
        if not self.active:
            self.churn.zero_()
            return torch.zeros((), dtype=self._live[0].dtype, device=self.churn.device)
        current = self._outputs(self.module(states))
        with torch.no_grad():
            previous = self._outputs(
                functional_call(self.module, dict(zip(self._names, self._previous)), (states,))
            )
        churn = (current - previous).square().flatten(1).mean(1)
        self.churn.copy_(churn.detach())
        return (self.coefficient.to(churn.dtype) * churn).sum()

    @torch.no_grad()
    def after_step(self, hidden: Sequence[Tensor] = ()) -> None:
        """The parameters before this step become theta_{t-1}; copy the current ones."""
        self._sync()
        self._previous, self._latest = self._latest, self._previous
        torch._foreach_copy_(self._latest, self._live)
        self.steps += 1

    @torch.no_grad()
    def end_update(self, policy_loss: Tensor | float, scale: float = 1.0) -> None:
        """Record the update's last minibatch (its clipped policy loss ``policy_loss``, 0-dim or
        ``[S]``, and its ``L_churn``) and, from update ``adapt_from_update`` on, set ``lambda``
        by the rule. ``scale``: the learning rate's annealing fraction."""
        loss = torch.as_tensor(policy_loss, dtype=torch.float64, device=self.churn.device)
        if loss.numel() not in (1, self.num_seeds) or loss.dim() > 1:
            raise ValueError(
                f"policy_loss of shape {tuple(loss.shape)}: expected a scalar or [{self.num_seeds}]"
            )
        i = self.updates % self.window
        self._abs_loss[:, i] = loss.abs()
        self._churn_history[:, i] = self.churn
        self.updates += 1
        if self.updates >= self.adapt_from_update:
            n = min(self.updates, self.window)
            mean_loss = self._abs_loss.sum(1) / n
            mean_churn = self._churn_history.sum(1) / n
            self.coefficient.copy_(
                self.target_relative_loss * mean_loss / (mean_churn + CHURN_EPS) * scale
            )

    @torch.no_grad()
    def at_task_boundary(self) -> None:
        if not self.reset_at_task_boundary:
            return
        self._sync()
        torch._foreach_copy_(self._latest, self._live)
        self.steps = self.updates = 0
        self.coefficient.fill_(self.initial_coefficient)
        self.churn.zero_()
        self._abs_loss.zero_()
        self._churn_history.zero_()

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            names = self._pending["names"]
            latest, previous = self._pending["latest"], self._pending["previous"]
        else:
            self._sync()
            names, latest, previous = self._names, self._latest, self._previous
        return {
            "steps": self.steps,
            "updates": self.updates,
            "coefficient": self.coefficient.clone(),
            "churn": self.churn.clone(),
            "abs_loss": self._abs_loss.clone(),
            "churn_history": self._churn_history.clone(),
            "names": list(names),
            "latest": [t.clone() for t in latest],
            "previous": [t.clone() for t in previous],
            "generators": [g.get_state() for g in self.generators],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["generators"]) != self.num_seeds:
            raise ValueError(
                f"state has {len(state['generators'])} generators, expected {self.num_seeds}"
            )
        if tuple(state["abs_loss"].shape) != tuple(self._abs_loss.shape):
            raise ValueError(
                f"state's running means have shape {tuple(state['abs_loss'].shape)}, expected "
                f"{tuple(self._abs_loss.shape)} (seeds x window)"
            )
        if "names" not in state:  # older states: the tensors this method was built with
            self._pending = None
            self._bind(*self._built, state)
            self.refresh()
        else:
            self._pending = {
                "names": list(state["names"]),
                "latest": [t.detach().clone() for t in state["latest"]],
                "previous": [t.detach().clone() for t in state["previous"]],
            }
            if len({len(self._pending[k]) for k in ("names", "latest", "previous")}) != 1:
                raise ValueError("state's snapshot names and tensors differ in number")
            names = [n for n, _ in self.module.named_parameters()]
            names += [n for n, _ in self.module.named_buffers()]
            if names == self._pending["names"]:
                self.refresh()  # else at the next call, once the module has these tensors
        self.steps = int(state["steps"])
        self.updates = int(state["updates"])
        self.coefficient.copy_(state["coefficient"])
        self.churn.copy_(state["churn"])
        self._abs_loss.copy_(state["abs_loss"])
        self._churn_history.copy_(state["churn_history"])
        for g, s in zip(self.generators, state["generators"]):
            g.set_state(s)
