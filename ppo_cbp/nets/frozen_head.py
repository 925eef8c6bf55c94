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

from ppo_cbp.nets.activations import activate, activation_backward_

__all__ = ["FrozenHead"]

ROWS_UNITS = 1 << 18
"""At most this many rows x hidden units per seed at once in a forward for the metrics."""


class FrozenHead:
    """``F(phi) = A [phi, 1]`` (one layer) or ``F(phi) = A2 [f(A1 [phi, 1]), 1]`` (two), with
    stacked ``A``s (``[S, out, in + 1]``, the bias last, as the network's ``P``), read from the
    input ``phi`` of the network's layer ``cut`` (0: its input) and added to its output.

    :param cut: the layer whose input ``F`` reads.
    :param layers: one or two ``[S, out, in + 1]`` tensors (not copied; not trained).
    :param activation: ``f`` between two layers, one of the network's activations.
    :param features_of: how many of the first layer's units :meth:`forward` reports as the
        hidden features (the first head's, when several were joined; None: all).
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

    def forward(
        self, phi_aug: Tensor, *, for_backward: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``F(phi)`` ``[S, B, out]`` from ``phi_aug`` ``[S, B, in + 1]`` (last column 1), and
        the hidden features of two layers (the first ``features_of`` units, ``[S, B, units]``;
        None for one layer). ``for_backward``: keep what :meth:`backward` needs (the trainer's
        step; a forward for the metrics keeps nothing)."""
        first = self.layers[0]
        if len(self.layers) == 1:
            return torch.bmm(phi_aug, first.transpose(1, 2)), None
        # the hidden layer grows by two heads per injection: a large batch goes through in
        # slices of at most ROWS_UNITS rows x units per seed, so that its peak memory does not
        rows = phi_aug.shape[1] if for_backward else max(1, ROWS_UNITS // first.shape[1])
        outs, features = [], []
        for start in range(0, phi_aug.shape[1], rows):
            z = torch.bmm(phi_aug[:, start : start + rows], first.transpose(1, 2))
            h = z.new_empty(*z.shape[:-1], z.shape[-1] + 1)
            h[..., -1] = 1.0
            activate(self.activation, z, h[..., :-1])
            if for_backward:
                self._z, self._h = z, h
            outs.append(torch.bmm(h, self.layers[1].transpose(1, 2)))
            feature = h[..., : self.features_of or -1]
            # (a slice's copy, so that the slice's whole hidden layer can go)
            features.append(feature if rows >= phi_aug.shape[1] else feature.clone())
        if len(outs) == 1:
            return outs[0], features[0]
        return torch.cat(outs, dim=1), torch.cat(features, dim=1)

    def backward(self, delta: Tensor) -> Tensor:
        """``dL/dphi`` ``[S, B, in]`` of the last :meth:`forward`, from ``delta = dL/dF``."""
        delta = delta.to(self.layers[0].dtype)  # an output buffer may be kept in float64
        if len(self.layers) == 2:
            second = self.layers[1]
            grad = torch.bmm(delta, second[..., :-1])
            delta = activation_backward_(self.activation, grad, self._z, self._h[..., :-1])
        return torch.bmm(delta, self.layers[0][..., :-1])
