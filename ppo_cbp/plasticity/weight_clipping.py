"""Weight clipping (Elsayed, Lan, Lyle and Mahmood, 2024, "Weight Clipping for Deep Continual
and Reinforcement Learning", RLC): keep every weight within a multiple of its init range."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ppo_cbp.init import distribution, fans
from ppo_cbp.plasticity.hooks import Layer, Network, PlasticityMethod

__all__ = ["WeightClipping", "init_bound"]


def init_bound(layer: Layer, seed_dims: int) -> float:
    """``b_l``: the bound ``b`` of the layer's U(-b, b) init, or the std of a normal init."""
    _, scale = distribution(layer.init, layer.nonlinearity, *fans(layer.weight.shape, seed_dims))
    return scale


class WeightClipping(PlasticityMethod):
    """After every optimizer step, clamp each weight and bias of layer ``l`` to
    ``[-kappa * b_l, kappa * b_l]``.

    ``b_l`` (:func:`init_bound`) is the bound of the uniform distribution layer ``l``'s weights
    were drawn from (its scheme, gain and fans in :mod:`ppo_cbp.init`). For the normal schemes
    it is the standard deviation: the authors clip every layer at the bound of PyTorch's default
    uniform init, 1/sqrt(n_in), even where the network was initialised otherwise (their PPO
    agent is orthogonal), and 1/sqrt(n_in) is the std of ``lecun_normal``; the std keeps the
    range tied to the scheme actually used. The bias is clipped with its layer's bound, as in
    the source (their bias bound is 1/sqrt(n_in) of its layer's weight). Every layer, the head
    included, is clipped (the source's ``clip_last_layer=True``); parameters outside
    ``net.layers`` (norm gains, a policy's log-std) are not. The bound is the same for every
    seed, so clamping a stack is clamping each seed.

    Default ``kappa = 1.0``: the reference implementation's (``README.md`` and
    ``core/optim/weight_clipping.py`` of github.com/mohmdelsayed/weight-clipping); their
    supervised sweeps cover kappa in {1, ..., 5} and their PPO script defaults to 3.0
    (``rl_experiments/ppo_continuous_action_clipped.py``).

    :param net: the network.
    :param kappa: the clipping multiple, > 0.
    """

    name = "weight_clipping"

    def __init__(self, net: Network, kappa: float = 1.0):
        if not (math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"kappa must be a finite number > 0, got {kappa}")
        self.kappa = float(kappa)
        self.layers = list(net.layers)
        self.bounds = [self.kappa * init_bound(layer, net.seed_dims) for layer in self.layers]
        """``kappa * b_l`` per layer."""

    @torch.no_grad()
    def after_step(self, hidden: Sequence[Tensor]) -> None:
        for layer, c in zip(self.layers, self.bounds):
            layer.weight.clamp_(-c, c)
            if layer.bias is not None:
                layer.bias.clamp_(-c, c)
