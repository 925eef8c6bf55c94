"""L2 Init: L2 regularisation toward the initial parameters (Kumar, Marklund and Van Roy, 2023,
"Maintaining Plasticity in Continual Learning via Regenerative Regularization")."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ppo_cbp.plasticity.hooks import Network, PlasticityMethod

__all__ = ["L2Init"]


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

    :param net: the network; its parameters' current values become ``theta_0``.
    :param coefficient: ``lambda`` >= 0.
    """

    name = "l2_init"

    def __init__(self, net: Network, coefficient: float = 1e-2):
        if not math.isfinite(coefficient) or coefficient < 0:
            raise ValueError(f"coefficient must be a finite number >= 0, got {coefficient}")
        self.coefficient = float(coefficient)
        self.seed_dims = net.seed_dims
        self.params = list(net.parameters)
        self.initial = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def after_backward(self) -> None:
        if self.coefficient == 0:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # two passes over every parameter at once, no temporaries: grad += lambda theta - lambda theta_0
        grads = [p.grad for p in self.params]
        torch._foreach_add_(grads, self.params, alpha=self.coefficient)
        torch._foreach_add_(grads, self.initial, alpha=-self.coefficient)

    @torch.no_grad()
    def penalty(self) -> Tensor:
        """``(lambda / 2) * ||theta - theta_0||^2`` per seed: shape ``[S]``."""
        num_seeds = self.params[0].shape[0] if self.seed_dims else 1
        total = self.params[0].new_zeros(num_seeds)
        for p, p0 in zip(self.params, self.initial):
            total += (p - p0).square().reshape(num_seeds, -1).sum(1)
        return total.mul_(0.5 * self.coefficient)

    def state_dict(self) -> dict[str, Any]:
        return {"initial": [t.clone() for t in self.initial]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        initial = state["initial"]
        if len(initial) != len(self.initial) or any(
            a.shape != b.shape for a, b in zip(initial, self.initial)
        ):
            raise ValueError("the saved initial parameters do not match this network's")
        for dst, src in zip(self.initial, initial):
            dst.copy_(src)
