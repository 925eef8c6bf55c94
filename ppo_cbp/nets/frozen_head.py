"""A frozen MLP that reads the input of one of a :class:`~ppo_cbp.nets.stacked_mlp.StackedMLP`'s
layers and adds its output to the network's.

Plasticity injection (:mod:`ppo_cbp.plasticity.injection`) leaves a network whose output is its
trainable part plus a signed sum of frozen heads that all read the same features ``phi``. A sum
of one-layer heads is one matrix; a sum of two-layer heads ``sum_k c_k W2_k f(W1_k phi + b1_k)
+ b2_k`` is one wider two-layer MLP, its hidden units those of every head side by side and its
output weights signed. The trainer (:class:`~ppo_cbp.nets.stacked_mlp.StackedTrainer`) then
runs that MLP at each step with two or three batched matrix products, however many heads were
frozen, and adds its gradient with respect to ``phi`` to the backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ppo_cbp.nets.stacked_mlp import _activate, _activation_backward_

__all__ = ["FrozenHead"]


class FrozenHead:
    """``F(phi) = A [phi, 1]`` (one layer) or ``F(phi) = A2 [f(A1 [phi, 1]), 1]`` (two), with
    stacked ``A``s (``[S, out, in + 1]``, the bias last, as the network's ``P``), read from the
    input ``phi`` of the network's layer ``cut`` (0: its input) and added to its output.

    :param cut: the layer whose input ``F`` reads.
    :param layers: one or two ``[S, out, in + 1]`` tensors (not copied; not trained).
    :param activation: ``f`` between two layers, one of the network's activations; its
        features are :attr:`features` after :meth:`forward`.
    :param features_of: how many of the first layer's units :attr:`features` reports (the
        first head's, when several were joined; None: all).
    """

    def __init__(
        self,
        cut: int,
        layers: Sequence[Tensor],
        activation: str = "relu",
        features_of: int | None = None,
    ):
        if len(layers) not in (1, 2):
            raise ValueError(f"a frozen head has one or two layers, got {len(layers)}")
        self.cut = cut
        self.layers = list(layers)
        self.activation = activation
        self.features_of = features_of
        self._z: Tensor | None = None
        self._h: Tensor | None = None

    @property
    def features(self) -> Tensor | None:
        """The hidden features of the last :meth:`forward` (two layers), ``[S, B, units]``."""
        if self._h is None:
            return None
        return self._h[..., : self.features_of or -1]

    def forward(self, phi_aug: Tensor) -> Tensor:
        """``F(phi)``, ``[S, B, out]``, from ``phi_aug`` ``[S, B, in + 1]`` (last column 1)."""
        first = self.layers[0]
        z = torch.bmm(phi_aug, first.transpose(1, 2))
        if len(self.layers) == 1:
            return z
        h = z.new_empty(*z.shape[:-1], z.shape[-1] + 1)
        h[..., -1] = 1.0
        _activate(self.activation, z, h[..., :-1])
        self._z, self._h = z, h
        return torch.bmm(h, self.layers[1].transpose(1, 2))

    def backward(self, delta: Tensor) -> Tensor:
        """``dL/dphi`` ``[S, B, in]`` of the last :meth:`forward`, from ``delta = dL/dF``."""
        delta = delta.to(self.layers[0].dtype)  # an output buffer may be kept in float64
        if len(self.layers) == 2:
            second = self.layers[1]
            grad = torch.bmm(delta, second[..., :-1])
            delta = _activation_backward_(self.activation, grad, self._z, self._h[..., :-1])
        return torch.bmm(delta, self.layers[0][..., :-1])
