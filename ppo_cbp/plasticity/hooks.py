"""The hook protocol every plasticity method follows, on PPO and on the supervised benchmarks.

A training step, in either trainer, is

    loss -> gradients in every parameter's ``.grad``      (by hand or by autograd)
         -> method.after_backward()                        (regularisers add their gradient)
         -> optimizer.step()
         -> method.after_step(hidden)                      (CBP, ReDo, S&P, clipping, projection)

and a task boundary (a friction change in PPO, a new task or class increment in the supervised
benchmarks) calls ``method.at_task_boundary()``. What a method needs from the network is a
:class:`Network`: its weight layers in order, every trained parameter and the optimizer.
Methods that change the architecture (LayerNorm, CReLU, plasticity injection) act at build
time instead, through the options of the network builders; the rest never see the module.

Every tensor may carry a leading seed dimension (``seed_dims=1``: S networks stacked as one,
each slice ``[s]`` the tensor of seed ``s`` alone); a method treats each slice as that seed's
network (per-seed norms, per-seed maxima, per-seed random draws from ``generators[s]``), so a
stack of S seeds follows exactly the S runs alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ppo_cbp.seeding import derive_seed

__all__ = ["Layer", "Network", "PlasticityMethod", "Methods", "generators_for"]


@dataclass
class Layer:
    """One weight layer: ``weight`` ``[*seed, out, in]`` (Linear) or ``[*seed, out, in, kh, kw]``
    (Conv2d), its ``bias`` ``[*seed, out]`` (or None), the scheme of :mod:`ppo_cbp.init` it was
    drawn from and the gain's nonlinearity. ``head`` marks the output layer."""

    weight: Tensor
    bias: Tensor | None
    init: str = "kaiming_uniform"
    nonlinearity: str = "relu"
    head: bool = False
    name: str = ""


@dataclass
class Network:
    """What the methods see of one network.

    :param layers: its weight layers, input side first, the head last.
    :param parameters: every parameter the optimizer trains (weights, biases, norm gains, ...).
    :param optimizer: the ``torch.optim.Optimizer`` over them (its ``state[p]`` is reset with the
        parameters it belongs to).
    :param seed_dims: 1 if every tensor has a leading seed dimension, else 0.
    :param seeds: one run seed per stacked network (one entry when ``seed_dims == 0``).
    """

    layers: list[Layer]
    parameters: list[Tensor]
    optimizer: torch.optim.Optimizer | None
    seed_dims: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])

    @property
    def num_seeds(self) -> int:
        return len(self.seeds)

    def seeded(self, t: Tensor) -> Tensor:
        """``t`` with exactly one leading seed dimension (a view)."""
        return t if self.seed_dims else t.unsqueeze(0)


def generators_for(net: Network, tag: int) -> list[torch.Generator]:
    """One generator per seed for random stream ``tag`` (:func:`~ppo_cbp.seeding.derive_seed`),
    on the network's device."""
    device = net.parameters[0].device
    return [torch.Generator(device=device).manual_seed(derive_seed(s, tag)) for s in net.seeds]


class PlasticityMethod:
    """Base class: every hook does nothing. A method overrides the hooks it needs.

    ``after_backward`` runs with this step's gradients in ``.grad`` (before any gradient
    clipping and the optimizer step); ``after_step(hidden)`` after the optimizer step, with the
    step's hidden activations (``[*seed, B, units]`` per hidden layer, after the nonlinearity);
    ``at_task_boundary`` when the data distribution has just changed. ``state_dict`` holds
    everything a resumed run needs to continue exactly (tensors, generator states).
    """

    name: str = ""

    def after_backward(self) -> None:
        pass

    def after_step(self, hidden: Sequence[Tensor]) -> None:
        pass

    def at_task_boundary(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Methods(PlasticityMethod):
    """Several methods run as one, each hook in the order the methods were given."""

    def __init__(self, methods: Sequence[PlasticityMethod]):
        self.methods = list(methods)

    def after_backward(self) -> None:
        for m in self.methods:
            m.after_backward()

    def after_step(self, hidden: Sequence[Tensor]) -> None:
        for m in self.methods:
            m.after_step(hidden)

    def at_task_boundary(self) -> None:
        for m in self.methods:
            m.at_task_boundary()

    def state_dict(self) -> dict[str, Any]:
        return {"methods": [m.state_dict() for m in self.methods]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m, s in zip(self.methods, state["methods"], strict=True):
            m.load_state_dict(s)
