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

    The layers are ``net.layers`` as they are at each step, so a layer that replaced another
    (a plasticity injection's trainable branch in the head's place) is clipped and the frozen
    head is not; ``b_l`` is cached per scheme, nonlinearity and weight shape, so it follows a
    replaced layer.

    Order: in every trainer this method runs after the optimizer step's other weight changes,
    after CBP's and ReDo's unit resets and after the noise of Shrink & Perturb, so that every
    weight, a freshly reinitialised one included, is inside its bound after every step, as in
    the source, which clips after each update. It is the last per-step transform of the
    weights; only C-CHAIN's snapshot of the parameters (which records them and changes nothing)
    comes after it.

    :param net: the network.
    :param kappa: the clipping multiple, > 0.
    """

    name = "weight_clipping"

    def __init__(self, net: Network, kappa: float = 1.0):
        if not (math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"kappa must be a finite number > 0, got {kappa}")
        self.kappa = float(kappa)
        self.net = net
        self._bounds: dict[tuple[str, str, tuple[int, ...]], float] = {}
        for layer in net.layers:  # an unknown scheme fails here, not at the first step
            self._bound(layer)

    def _bound(self, layer: Layer) -> float:
        """``kappa * b_l`` of ``layer`` (cached: it depends on the scheme, gain and shape only)."""
        key = (layer.init, layer.nonlinearity, tuple(layer.weight.shape))
        bound = self._bounds.get(key)
        if bound is None:
            bound = self._bounds[key] = self.kappa * init_bound(layer, self.net.seed_dims)
        return bound

    @property
    def layers(self) -> list[Layer]:
        """The clipped layers: ``net.layers`` now."""
        return list(self.net.layers)

    @property
    def bounds(self) -> list[float]:
        """``kappa * b_l`` per layer of :attr:`layers`."""
        return [self._bound(layer) for layer in self.net.layers]

    @torch.no_grad()
    def after_step(self, hidden: Sequence[Tensor]) -> None:
        for layer in self.net.layers:
            c = self._bound(layer)
            layer.weight.clamp_(-c, c)
            if layer.bias is not None:
                layer.bias.clamp_(-c, c)
