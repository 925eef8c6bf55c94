"""Plasticity injection at task boundaries on the fused trainer.

What :class:`~ppo_cbp.plasticity.injection.PlasticityInjection` computes on the autograd learner
(Nikishin et al. 2023; after ``K`` injections the output is ``h_theta(phi) + sum_k (h_k(phi) -
h_k0(phi))``, only the latest branch ``h_K`` and the body training), laid out for
:class:`~ppo_cbp.nets.stacked_mlp.StackedTrainer`: the trainer's last ``head_layers`` layers
hold the trainable head (``theta``, then each new branch), and every frozen head, signed, joins
one :class:`~ppo_cbp.nets.frozen_head.FrozenHead` whose output the trainer adds to its own. Its
cost per step is then a few matrix products of ``2K + 1`` heads' width, not ``2K + 1`` networks
run one by one. The sums are taken in another order than the autograd learner's, so the output
at an injection equals the one before it to the rounding (the autograd learner's exactly).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ppo_cbp.nets.frozen_head import FrozenHead
from ppo_cbp.nets.stacked_mlp import StackedMLP
from ppo_cbp.plasticity.injection import draw_head
from ppo_cbp.plasticity.resets import reset_adam_state_, set_generator_states
from ppo_cbp.seeding import TAG_INJECTION, derive_seed

__all__ = ["FusedInjection"]


class FusedInjection:
    """Plasticity injection into a fused :class:`StackedMLP` at every task boundary.

    At an injection the trainable head's ``P`` (each layer's ``[W | b]``) is frozen with sign +1,
    a fresh head ``theta'`` is drawn per seed from its generator (stream
    :data:`~ppo_cbp.seeding.TAG_INJECTION`, layer by layer, weight from the layer's scheme with
    the activation's gain below the output and linear at the output, bias 0: what
    ``PlasticityInjection`` draws), frozen with sign -1 as ``theta'_0`` and copied into the
    trainer's head, and the optimizer's state of the head is reset (so Adam starts ``theta'`` at
    step 0, as a new parameter group would).

    :param net: the network (its :attr:`~StackedMLP.frozen_head` is set here).
    :param head_layers: 1 or 2: the head is the last ``head_layers`` layers.
    :param init: the weight scheme of the network's layers.
    :param optimizer: the ``torch.optim`` optimizer over the trainer's ``P``s (whose head state
        is reset at an injection), or None (SGD in the trainer's pass, no state).
    """

    def __init__(
        self,
        net: StackedMLP,
        head_layers: int,
        init: str,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        if head_layers not in (1, 2) or head_layers > len(net.params):
            raise ValueError(f"head_layers must be 1 or 2 and fit the network, got {head_layers}")
        self.net = net
        self.head_layers = head_layers
        self.init = init
        self.optimizer = optimizer
        self.cut = len(net.params) - head_layers
        self.generators = [
            torch.Generator(device=net.device).manual_seed(derive_seed(s, TAG_INJECTION))
            for s in net.seeds
        ]
        self.frozen: list[tuple[float, list[Tensor]]] = []
        """Every frozen head in the order frozen: ``(sign, each layer's P)``."""

    @property
    def injections(self) -> int:
        return len(self.frozen) // 2

    @property
    def head(self) -> list[Tensor]:
        """The trainable head: the trainer's last ``head_layers`` ``P``s."""
        return self.net.params[self.cut :]

    @torch.no_grad()
    def inject(self) -> None:
        """Freeze the trainable head and train a fresh ``theta'`` in its place."""
        fresh = self._draw()
        self.frozen.append((1.0, [p.clone() for p in self.head]))
        self.frozen.append((-1.0, [f.clone() for f in fresh]))
        for p, f in zip(self.head, fresh, strict=True):
            p.copy_(f)
        if isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            reset_adam_state_(self.optimizer, self.head)
        self._join()

    def at_task_boundary(self) -> None:
        self.inject()

    def _draw(self) -> list[Tensor]:
        """A fresh head, ``P`` per layer (:func:`~ppo_cbp.plasticity.injection.draw_head`, as
        the autograd learner's injection draws it)."""
        last = len(self.net.params) - 1
        head = [
            (p[..., :-1], p[..., -1], self.init, "linear" if i == last else self.net.activation)
            for i, p in enumerate(self.head, start=self.cut)
        ]
        weights, biases = draw_head(head, self.generators, seed_dims=1)
        return [torch.cat([w, b.unsqueeze(-1)], dim=-1) for w, b in zip(weights, biases)]

    def _join(self) -> None:
        """The frozen heads as one :class:`FrozenHead` (hidden units side by side, output weights
        signed, output biases summed; one signed sum of matrices for one-layer heads)."""
        if not self.frozen:
            self.net.frozen_head = None
            return
        if self.head_layers == 1:
            total = sum(sign * layers[0] for sign, layers in self.frozen)
            self.net.frozen_head = FrozenHead(self.cut, [total])
            return
        first = torch.cat([layers[0] for _, layers in self.frozen], dim=1)
        second = torch.cat([sign * layers[1][..., :-1] for sign, layers in self.frozen], dim=2)
        bias = sum(sign * layers[1][..., -1:] for sign, layers in self.frozen)
        units = self.frozen[0][1][0].shape[1]
        self.net.frozen_head = FrozenHead(
            self.cut,
            [first, torch.cat([second, bias], dim=2)],
            activation=self.net.activation,
            features_of=units,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "frozen": [(sign, [t.clone() for t in layers]) for sign, layers in self.frozen],
            "generators": [g.get_state() for g in self.generators],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = [
            (float(sign), [t.clone() for t in layers]) for sign, layers in state["frozen"]
        ]
        set_generator_states(self.generators, state["generators"])
        self._join()
