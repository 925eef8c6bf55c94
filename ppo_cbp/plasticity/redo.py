"""ReDo: recycling dormant neurons (Sokar, Agarwal, Castro and Evci, ICML 2023).

Every ``period`` optimizer steps, on the activations ``h`` of the latest minibatch, each hidden
unit gets the tau-dormant score

    s_i = E|h_i| / ((1/H) * sum_j E|h_j| + 1e-9)

(expectations over the batch, and over spatial positions for a conv channel; ``H`` units in the
layer; the 1e-9 is the official code's guard for a layer that is entirely silent, whose units
all count as dormant). Units with ``s_i <= threshold`` are reinitialised as in continual
backprop: incoming weights redrawn from the layer's initial distribution, incoming bias and
outgoing weights set to 0, and the optimizer state of those entries zeroed. The paper's PPO
comparison (Extended Data Fig. 5b) uses threshold 0.1 and period 100.

The number of dormant units depends on the data, so units are selected with a mask on the
device rather than counted on the host: a step never synchronises with the GPU. The running
total :attr:`ReDo.replaced` is a device tensor; read it when logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ppo_cbp.metrics import DORMANT_SCORE_EPS
from ppo_cbp.nets.units import (
    StateTensors,
    UnitLayer,
    optimizer_state_tensors,
    replace_masked_units_,
)
from ppo_cbp.plasticity.cbp import make_generators, resolve_layers
from ppo_cbp.plasticity.hooks import PlasticityMethod


def dormant_mask(layer: UnitLayer, h: Tensor, threshold: float) -> Tensor:
    """Units of ``layer`` whose tau-dormant score on activations ``h`` is <= ``threshold``."""
    mean_abs = layer.mean_abs(h)
    score = mean_abs / (mean_abs.mean(dim=-1, keepdim=True) + DORMANT_SCORE_EPS)
    return score <= threshold


class ReDo(PlasticityMethod):
    """Recycle tau-dormant units every ``period`` steps.

    :param net: an ``nn.Sequential`` (hooked, as in
        :class:`~ppo_cbp.plasticity.cbp.ContinualBackprop`) or a list of
        :class:`~ppo_cbp.nets.units.UnitLayer` whose activations are passed to :meth:`step`.
    :param optimizer: optimizer (or parameter -> state tensors function) whose state is reset.
    :param threshold: tau; units scoring ``<= threshold`` are recycled. Must be >= 0.
    :param period: recycle on every ``period``-th call of :meth:`step`.
    :param init: the scheme the network was initialised with.
    :param nonlinearity: overrides the gain inferred from the activation modules.
    :param reset_optimizer_state: zero the optimizer state of recycled entries (the paper's PPO
        code did not; the original ReDo did).
    :param seed: seed(s) of the generator(s) that draw new weights.
    """

    def __init__(
        self,
        net: nn.Module | Sequence[UnitLayer],
        optimizer: torch.optim.Optimizer | StateTensors | None = None,
        *,
        threshold: float = 0.1,
        period: int = 100,
        init: str = "kaiming_uniform",
        nonlinearity: str | None = None,
        reset_optimizer_state: bool = True,
        seed: int | Sequence[int] = 0,
    ):
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if period < 1 or int(period) != period:
            raise ValueError(f"period must be a positive integer, got {period}")
        self.layers, self._recorder = resolve_layers(net, init, nonlinearity)
        self.threshold = threshold
        self.period = int(period)
        self._state_tensors = optimizer_state_tensors(optimizer, reset_optimizer_state)
        first = self.layers[0].weight
        self.num_seeds = self.layers[0].num_seeds
        self.generators = make_generators(seed, self.num_seeds, first.device)
        self.steps = 0
        self.replaced = torch.zeros(self.num_seeds, dtype=torch.int64, device=first.device)
        """Units recycled so far in each network (device tensor)."""

    @property
    def num_replaced(self) -> int:
        """Units recycled so far (first network); synchronises with the device."""
        return int(self.replaced[0])

    @torch.no_grad()
    def step(self, activations: Sequence[Tensor] | None = None) -> None:
        """Count one optimizer step; on every ``period``-th, recycle the dormant units."""
        self.steps += 1
        if self.steps % self.period:
            return
        if activations is None:
            if self._recorder is None:
                raise ValueError("pass the activations of every hidden layer to step()")
            activations = self._recorder.latest()
        for layer, h in zip(self.layers, activations):
            mask = dormant_mask(layer, h, self.threshold)
            replace_masked_units_(layer, mask, self.generators, self._state_tensors)
            self.replaced += mask.sum(dim=-1)

    def after_step(self, hidden: Sequence[Tensor]) -> None:
        """The hook protocol's name for :meth:`step` on the step's hidden activations."""
        self.step(hidden)

    def remove_hooks(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "replaced": self.replaced.clone(),
            "generators": [g.get_state() for g in self.generators],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.replaced.copy_(state["replaced"])
        for g, s in zip(self.generators, state["generators"]):
            g.set_state(s)


class WindowedReDo(PlasticityMethod):
    """ReDo scored on the activations of its last ``period`` steps (a ring buffer of each
    step's last example) instead of the period's last batch: in online learning (one example
    per step) a single example is no estimate of ``E|h|``. The MLP benchmarks run ReDo so.

    :param redo: the ReDo to run; its ``period`` is the window's length.
    """

    name = "redo"

    def __init__(self, redo: ReDo):
        self.redo = redo
        self.rings = [
            torch.zeros(
                layer.num_seeds,
                redo.period,
                layer.units,
                device=layer.weight.device,
                dtype=layer.weight.dtype,
            )
            for layer in redo.layers
        ]

    @property
    def num_replaced(self) -> int:
        return self.redo.num_replaced

    def after_step(self, hidden: Sequence[Tensor]) -> None:
        slot = self.redo.steps % self.redo.period
        for ring, h in zip(self.rings, hidden):
            ring[:, slot] = h[:, -1]
        self.redo.step(self.rings)

    def state_dict(self) -> dict[str, Any]:
        return {"redo": self.redo.state_dict(), "rings": [r.clone() for r in self.rings]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.redo.load_state_dict(state["redo"])
        for dst, src in zip(self.rings, state["rings"], strict=True):
            dst.copy_(src)
