"""Parseval regularisation (Chung, Cherif, Precup and Meger, 2024, "Parseval Regularization for
Continual Reinforcement Learning", NeurIPS): keep each hidden layer's rows orthogonal."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ppo_cbp.init import distribution, fans
from ppo_cbp.plasticity.hooks import Layer, Network, PlasticityMethod

__all__ = ["ParsevalRegularization", "initial_row_norm_sq"]


def initial_row_norm_sq(layer: Layer, seed_dims: int) -> float:
    """``n_in * Var(w)`` of the layer's init: the expected squared norm of a row at init."""
    fan_in, fan_out = fans(layer.weight.shape, seed_dims)
    kind, scale = distribution(layer.init, layer.nonlinearity, fan_in, fan_out)
    variance = scale**2 / 3.0 if kind == "uniform" else scale**2
    return fan_in * variance


class ParsevalRegularization(PlasticityMethod):
    """Add ``lambda * sum_l ||W_l W_l^T - s_l I||_F^2`` to the loss, over the hidden layers.

    ``W_l`` is the ``[out, in]`` weight of each layer of ``net.layers`` except the head (a
    Conv2d weight as the ``[out, in * kh * kw]`` matrix of its filters); the authors regularise
    the hidden layers only (their layers named ``linear_orthog``; the output layer
    ``linear_output`` is left out). :meth:`after_backward` adds the exact gradient

        grad_W <- grad_W + 4 * lambda * (W W^T - s I) W

    per seed (stacked ``[S, out, in]`` weights: one matrix per seed); biases get no penalty.

    ``s_l``: the authors use ``s = g^2`` with ``g`` the gain of their orthogonal initialisation
    (``scale = init_gain ** 2``, 2 for their default gain sqrt(2); ``agent.py`` of
    github.com/wechu/parseval_reg), i.e. the squared norm the rows had at initialisation. With
    ``scale=None``, ``s_l`` is that quantity for this layer's own init scheme,
    ``n_in * Var(w)`` (:func:`initial_row_norm_sq`): ``gain(nonlinearity)^2`` for the Kaiming
    schemes, 1 for LeCun, 1/3 for PyTorch's default. A number sets every ``s_l`` (2.0 is the
    authors' default). A layer with more rows than inputs cannot reach ``s I`` (rank), as in the
    source.

    Default ``coefficient = 1e-3``: the authors' value for MetaWorld and the gridworld (1e-4 for
    Lunar Lander and Quadruped; ``main.py``). Their code also multiplies it by
    ``(64 / width)^2`` to carry a value tuned at width 64 to other widths; that factor is not
    applied here (it is 1 at their width, 64).

    The authors' diagonal layers are left out. With ``add_diag_layer`` (``--add_diag_layer``,
    which ``main.py`` sets for Parseval on MetaWorld) their networks put a learnable diagonal
    layer after each regularised layer, between it and its activation: ``DiagLinear`` of
    ``parseval_reg/utils.py`` (github.com/wechu/parseval_reg), ``y = x * c + b`` with a
    per-unit scale ``c`` (initialised to 1) and offset ``b`` (initialised to 0), which gives
    back each unit the freedom of scale that orthogonal rows take away (``agent.py``,
    ``build_network``). They are not added here because this project's networks come from
    builders that every method shares, and a diagonal layer would change the architecture the
    other methods are compared on (and the checkpoints' modules); the regulariser itself, the
    penalty and its gradient, is exact.

    The layers are ``net.layers`` as they are at each call, the head left out: after a
    plasticity injection of a two-layer head, the injected branch's first layer (now in the
    place of the head's hidden layer) is regularised and the frozen one is not. ``s_l`` is
    cached per scheme, nonlinearity and weight shape, so it follows a replaced layer.

    :param net: the network; every layer but the head is regularised.
    :param coefficient: ``lambda`` >= 0.
    :param scale: ``s`` > 0 for every layer, or None for each layer's initial squared row norm.
    """

    name = "parseval"

    def __init__(self, net: Network, coefficient: float = 1e-3, scale: float | None = None):
        if not math.isfinite(coefficient) or coefficient < 0:
            raise ValueError(f"coefficient must be a finite number >= 0, got {coefficient}")
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0 (or None), got {scale}")
        self.net = net
        if not self.layers:
            raise ValueError(
                "Parseval regularisation needs a hidden layer; the net has only a head"
            )
        self.coefficient = float(coefficient)
        self.scale = None if scale is None else float(scale)
        self._scales: dict[tuple[str, str, tuple[int, ...]], float] = {}
        for layer in self.layers:  # an unknown scheme fails here, not at the first step
            self._scale(layer)

    @property
    def layers(self) -> list[Layer]:
        """The regularised layers: those of ``net.layers`` now, but the head."""
        return [layer for layer in self.net.layers if not layer.head]

    @property
    def scales(self) -> list[float]:
        """``s_l`` per layer of :attr:`layers`."""
        return [self._scale(layer) for layer in self.layers]

    def _scale(self, layer: Layer) -> float:
        """``s_l`` of ``layer`` (cached: it depends on the scheme, gain and shape only)."""
        if self.scale is not None:
            return self.scale
        key = (layer.init, layer.nonlinearity, tuple(layer.weight.shape))
        s = self._scales.get(key)
        if s is None:
            s = self._scales[key] = initial_row_norm_sq(layer, self.net.seed_dims)
        return s

    def _matrices(self, layer: Layer) -> Tensor:
        """The weight as ``[S, out, fan_in]``."""
        w = self.net.seeded(layer.weight)
        return w.reshape(w.shape[0], w.shape[1], -1)

    def _residuals(self, w: Tensor, s: float) -> Tensor:
        """``W W^T - s I`` per seed."""
        gram = torch.bmm(w, w.transpose(1, 2))
        gram.diagonal(dim1=1, dim2=2).sub_(s)
        return gram

    @torch.no_grad()
    def after_backward(self) -> None:
        if self.coefficient == 0:
            return
        for layer in self.layers:
            s = self._scale(layer)
            w = self._matrices(layer)
            grad = torch.bmm(self._residuals(w, s), w).mul_(4.0 * self.coefficient)
            grad = grad.reshape(layer.weight.shape)
            if layer.weight.grad is None:
                layer.weight.grad = grad
            else:
                layer.weight.grad.add_(grad)

    @torch.no_grad()
    def penalty(self) -> Tensor:
        """``lambda * sum_l ||W_l W_l^T - s_l I||_F^2`` per seed: shape ``[S]``."""
        per_layer = [
            self._residuals(self._matrices(layer), self._scale(layer)).square().sum((1, 2))
            for layer in self.layers
        ]
        return torch.stack(per_layer).sum(0).mul_(self.coefficient)
