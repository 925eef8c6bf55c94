"""L2 Init: L2 regularisation toward the initial parameters (Kumar, Marklund and Van Roy, 2023,
"Maintaining Plasticity in Continual Learning via Regenerative Regularization").

Also :class:`FollowedTensors`, the per-tensor record that L2 Init and Normalize-and-Project keep
of a list the network regroups in place (an injection's branch replacing the frozen head).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ppo_cbp.plasticity.hooks import Network, PlasticityMethod

__all__ = ["FollowedTensors", "L2Init"]

STATE_VERSION = 2
"""Version 2 states hold the values of the tensors the method followed when it was saved; states
without a version (version 1) those of the tensors it was built with."""


class FollowedTensors:
    """One value per tensor of a list that the network may regroup in place, such as
    ``net.parameters`` (a plasticity injection removes the frozen head's parameters and appends
    the trainable branch's, :meth:`PlasticityInjection._sync
    <ppo_cbp.plasticity.injection.PlasticityInjection._sync>`).

    :meth:`sync` reads the list anew: a tensor already followed keeps its value, a tensor new to
    the list takes ``first_value(tensor)`` (its value when first seen), and a tensor that left
    the list is dropped. Tensors are matched by identity, so the check is one ``is`` per tensor.

    Checkpoints: :meth:`state` is the values in the order of the list at the time of the save;
    :meth:`load` keeps them and binds them to the list at the next :meth:`sync` (so a method
    loaded before the injection that regroups the list, as in the trainers where injection is
    the last method, binds to the regrouped list), with an error there if the number or the
    shapes disagree. ``legacy=True`` binds them at once to the tensors the object was built
    with, which is what the states of version 1 hold.

    :param current: returns the list now (``lambda: net.parameters``).
    :param first_value: the value of a tensor first seen (a copy, a norm).
    :param what: names the values in error messages.
    """

    def __init__(
        self,
        current: Callable[[], Sequence[Tensor]],
        first_value: Callable[[Tensor], Tensor],
        what: str,
    ):
        self._current = current
        self._first_value = first_value
        self.what = what
        self.tensors: list[Tensor] = list(current())
        self.values: list[Tensor] = [first_value(t) for t in self.tensors]
        self._built = list(self.tensors)
        self._pending: list[Tensor] | None = None

    def sync(self) -> tuple[list[Tensor], list[Tensor]]:
        """The current tensors and their values, in the list's order."""
        current = self._current()
        if self._pending is not None:
            self._bind(list(current), self._pending)
            self._pending = None
        elif len(current) != len(self.tensors) or not all(map(operator.is_, current, self.tensors)):
            known = {id(t): v for t, v in zip(self.tensors, self.values)}
            self.values = [
                known[id(t)] if id(t) in known else self._first_value(t) for t in current
            ]
            self.tensors = list(current)
        return self.tensors, self.values

    @torch.no_grad()
    def _bind(self, tensors: list[Tensor], saved: Sequence[Tensor]) -> None:
        values = [self._first_value(t) for t in tensors]
        if len(saved) != len(values) or any(a.shape != b.shape for a, b in zip(saved, values)):
            raise ValueError(
                f"the saved {self.what} do not match this network's: the state holds "
                f"{len(saved)} of shapes {[tuple(a.shape) for a in saved]}, the network "
                f"{len(values)} of shapes {[tuple(b.shape) for b in values]}"
            )
        for dst, src in zip(values, saved):
            dst.copy_(src)
        self.tensors, self.values = tensors, values

    def state(self) -> list[Tensor]:
        """Copies of the values, in the order of the current list."""
        if self._pending is not None:
            return [t.clone() for t in self._pending]
        return [v.clone() for v in self.sync()[1]]

    def load(self, saved: Sequence[Tensor], legacy: bool = False) -> None:
        """Take saved values (see the class docstring)."""
        if legacy:
            self._pending = None
            self._bind(list(self._built), saved)
        else:
            self._pending = [t.detach().clone() for t in saved]


class L2Init(PlasticityMethod):
    """Add ``(lambda / 2) * ||theta - theta_0||^2`` to the loss.

    ``theta`` is every tensor of ``net.parameters`` (weights, biases and any other trained
    parameter), ``theta_0`` a copy of them taken when this object is built (the initial
    parameters, if built before the first step) and ``||.||`` the Euclidean norm over all of
    them. :meth:`after_backward` adds the penalty's gradient to each ``.grad``:

        grad <- grad + lambda * (theta - theta_0)

    (a parameter without a gradient gets ``lambda * (theta - theta_0)``). The gradient is
    elementwise, so slice ``s`` of a stacked parameter follows seed ``s`` alone; the penalty of
    a stack is the sum of the seeds' penalties (:meth:`penalty` gives them per seed).

    The paper writes the penalty as ``lambda * ||theta - theta_0||_2^2``; the authors' code
    (github.com/skumar9876/L2_Init, ``agents/agents.py``, ``L2InitAgent``) adds
    ``l2_weight * 0.5 * sum((theta - theta_0)^2)``, which is the form here, so ``coefficient``
    is their ``l2_weight``. Their sum covers every trained parameter except LayerNorm's (which
    they never combine with L2 Init); leave such parameters out of ``net.parameters`` to match.
    Default ``coefficient = 1e-2``: the paper sweeps {1e-2, 1e-3, 1e-4, 1e-5} and finds one value,
    1e-2, best across problems (Appendix A.2.5).

    Regrouped parameters: ``theta`` is ``net.parameters`` as it is at each call
    (:class:`FollowedTensors`). A parameter that joins the list after the build (the trainable
    branch of a plasticity injection) takes as its ``theta_0`` its value when L2 Init first sees
    it, at the next :meth:`after_backward`: at an injection the branch has just been drawn and
    has not trained, so that value is its initialisation. A parameter that leaves the list (the
    head an injection freezes) is no longer regularised and gets no gradient.

    Units that CBP or ReDo reinitialise: ``theta_0`` stays fixed. The source defines ``theta_0``
    as the parameters at initialisation and never changes it (``agents/agents.py``), and so does
    this method: the reinitialised unit's new incoming weights are pulled toward the *old*
    unit's ``theta_0``, and the outgoing weights that CBP set to 0 back toward ``theta_0``'s
    values. Both the new weights and ``theta_0`` are draws from the same initial distribution,
    so the term remains what the paper intends, a regeneration toward a sample of the initial
    distribution, while the unit's new draw is only the point it restarts from.

    Checkpoints: :meth:`state_dict` holds ``theta_0`` in the order of ``net.parameters`` at the
    save; :meth:`load_state_dict` binds it to the list at the next call, so it may run before an
    injection's own load regroups the list. States without a ``version`` (older checkpoints)
    hold ``theta_0`` of the parameters this object was built with, and are bound to those.

    :param net: the network; its parameters' current values become ``theta_0``.
    :param coefficient: ``lambda`` >= 0.
    """

    name = "l2_init"

    def __init__(self, net: Network, coefficient: float = 1e-2):
        if not math.isfinite(coefficient) or coefficient < 0:
            raise ValueError(f"coefficient must be a finite number >= 0, got {coefficient}")
        self.coefficient = float(coefficient)
        self.seed_dims = net.seed_dims
        self.net = net
        self._theta_0 = FollowedTensors(
            lambda: net.parameters, lambda p: p.detach().clone(), "initial parameters"
        )

    @property
    def params(self) -> list[Tensor]:
        """The regularised parameters: ``net.parameters`` now."""
        return list(self._theta_0.sync()[0])

    @property
    def initial(self) -> list[Tensor]:
        """``theta_0`` of each of :attr:`params`."""
        return list(self._theta_0.sync()[1])

    @torch.no_grad()
    def after_backward(self) -> None:
        params, initial = self._theta_0.sync()
        if self.coefficient == 0:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # two passes over every parameter at once, no temporaries: grad += lambda theta - lambda theta_0
        grads = [p.grad for p in params]
        torch._foreach_add_(grads, params, alpha=self.coefficient)
        torch._foreach_add_(grads, initial, alpha=-self.coefficient)

    @torch.no_grad()
    def penalty(self) -> Tensor:
        """``(lambda / 2) * ||theta - theta_0||^2`` per seed: shape ``[S]``."""
        params, initial = self._theta_0.sync()
        num_seeds = params[0].shape[0] if self.seed_dims else 1
        total = params[0].new_zeros(num_seeds)
        for p, p0 in zip(params, initial):
            total += (p - p0).square().reshape(num_seeds, -1).sum(1)
        return total.mul_(0.5 * self.coefficient)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "initial": self._theta_0.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._theta_0.load(state["initial"], legacy=state.get("version", 1) < STATE_VERSION)
