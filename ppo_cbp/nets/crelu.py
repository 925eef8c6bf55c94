"""Concatenated ReLU (Abbas, Zhao, Modayil, White and Machado, "Loss of Plasticity in Continual
Deep Reinforcement Learning", CoLLAs 2023).

An architectural method: the hidden activation ReLU is replaced by CReLU, which keeps both signs
of every pre-activation, so a unit always passes a gradient through one of its two outputs and
cannot die. :func:`crelu_mlp` builds the network; the operators that act on units (continual
backprop, ReDo) and the metrics find its units through :func:`ppo_cbp.nets.units.sequential_unit_layers`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ppo_cbp.init import init_linear_

__all__ = ["CReLU", "crelu_mlp"]


class CReLU(nn.Module):
    """``CReLU(z) = [relu(z_1), relu(-z_1), relu(z_2), relu(-z_2), ...]`` on the last dimension.

    The paper's definition is the concatenation ``[relu(z), relu(-z)]``, doubling the width; here
    the two halves are interleaved per unit (a ``[..., n, 2]`` view flattened), so that unit
    ``i``'s outputs are features ``2i`` and ``2i + 1``. The consumer layer, with ``2n`` inputs, then
    computes the same function as with the concatenation up to a fixed permutation of its input
    columns (column ``2i + o`` here is column ``o * n + i`` there), and its columns for unit ``i``
    are contiguous: the layout :class:`~ppo_cbp.nets.units.UnitLayer` describes with ``out_group=2``.

    As a unit of the reinitialising operators and the metrics, a CReLU unit is one unit with two
    outputs: its activation is their mean, ``h_i = (relu(z_i) + relu(-z_i)) / 2 = |z_i| / 2``
    (:meth:`unit_activation`), and its outgoing weights are both of its consumer columns, just as a
    conv channel flattened into ``H*W`` consumer columns has the mean over its positions as its
    activation and all of those columns as its outgoing weights. Continual backprop's contribution
    utility of a CReLU unit is therefore ``E|h_i| * sum_k (|w[k, 2i]| + |w[k, 2i + 1]|)``, ReDo's
    score ``E|h_i| / mean_j E|h_j|``, and a unit is dead only when ``z_i = 0``. The feature
    metrics (feature norm, ranks) are not of these per-unit activations but of the ``2n``
    outputs themselves, the features the consumer reads
    (:func:`~ppo_cbp.nets.units.hidden_features`).

    The input's last dimension holds the units (``[..., n]`` -> ``[..., 2n]``): it follows a Linear
    layer (or a LayerNorm after one).
    """

    outputs_per_unit = 2

    def forward(self, z: Tensor) -> Tensor:
        return torch.stack((torch.relu(z), torch.relu(-z)), dim=-1).flatten(-2)

    @staticmethod
    def unit_activation(output: Tensor) -> Tensor:
        """The activation of each unit, ``[..., n]``: the mean of its two outputs ``[..., 2n]``."""
        return output.unflatten(-1, (-1, 2)).mean(dim=-1)


def crelu_mlp(
    in_dim: int,
    hidden: Sequence[int],
    out_dim: int,
    init: str = "kaiming_uniform",
    *,
    layer_norm: bool = False,
) -> nn.Sequential:
    """``Linear, [LayerNorm,] CReLU, ..., Linear``: hidden layers of the given widths (units).

    The layer after a hidden layer of ``n`` units takes ``2n`` inputs, as in the paper, whose
    networks keep their widths and grow the next layer. Every Linear is drawn from ``init`` with
    the ReLU gain and a zero bias, as :func:`ppo_cbp.ppo.agent.make_mlp` draws them: each of the
    consumer's ``2n`` inputs ``relu(+-z)`` has second moment ``Var(z) / 2``, as a ReLU output has,
    so the ReLU gain with fan-in ``2n`` keeps the pre-activation variance that it keeps in a ReLU
    network. ``layer_norm`` puts a LayerNorm (gain 1, offset 0) between each hidden Linear and its
    CReLU.
    """
    return paired_mlp(CReLU, in_dim, hidden, out_dim, init, layer_norm=layer_norm)


def paired_mlp(
    activation: type[nn.Module],
    in_dim: int,
    hidden: Sequence[int],
    out_dim: int,
    init: str = "kaiming_uniform",
    *,
    layer_norm: bool = False,
) -> nn.Sequential:
    """``Linear, [LayerNorm,] activation, ..., Linear`` for an activation with
    ``activation.outputs_per_unit`` outputs per unit (CReLU's and DFF's 2): each hidden
    Linear's consumer takes that many times its width; every Linear is drawn from ``init``
    with the ReLU gain and a zero bias (:func:`crelu_mlp`, :func:`ppo_cbp.nets.dff.dff_mlp`
    say why for each)."""
    if in_dim < 1 or out_dim < 1 or any(w < 1 for w in hidden):
        raise ValueError(
            f"widths must be positive, got in_dim={in_dim}, hidden={list(hidden)}, out_dim={out_dim}"
        )
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Linear(in_dim, width))
        if layer_norm:
            layers.append(nn.LayerNorm(width))
        layers.append(activation())
        in_dim = activation.outputs_per_unit * width
    layers.append(nn.Linear(in_dim, out_dim))
    for m in layers:
        if isinstance(m, nn.Linear):
            init_linear_(m, init, "relu")
    return nn.Sequential(*layers)
