"""Deep Fourier features (Lewandowski, Schuurmans and Machado, "Plastic Learning with Deep
Fourier Features", ICLR 2025, arXiv 2410.20634).

An architectural method: the hidden activation ReLU is replaced by the concatenation of a sine
and a cosine of every pre-activation, doubling each hidden layer's output width. The pair keeps
a dynamic balance between linearity (near ``z = 0`` the sine is linear, and wherever one of the
two is flat the other is steepest) and nonlinearity, so a unit always passes a gradient and
cannot die. :func:`dff_mlp` builds the network; the operators that act on units (continual
backprop) and the metrics find its units through
:func:`ppo_cbp.nets.units.sequential_unit_layers`, as they find CReLU's.

Definition as implemented in Plasticine (github.com/RLE-Foundation/Plasticine, commit
aa00b4bb18f7fe298a47e1ce36c32ba55ce064e8, ``plasticine/utils.py``, class ``DFF4Linear``, and
its use in ``plasticine/ppo_continual_dmc_base.py``): ``DFF(z) = concat(sin(z), cos(-z))`` on
the last dimension, ``cos(-z) = cos(z)``; no scaling and no frequency parameter; the Linear
layer after a DFF takes twice the width (``hidden * 2`` inputs); the output layer is a plain
Linear. Plasticine draws a DFF network's layers exactly as its CReLU network's (same code path,
same initialisers), which this module mirrors with :func:`~ppo_cbp.nets.crelu.crelu_mlp`'s
initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ppo_cbp.nets.crelu import paired_mlp

__all__ = ["DFF", "dff_mlp"]


class DFF(nn.Module):
    """``DFF(z) = [sin(z_1), cos(z_1), sin(z_2), cos(z_2), ...]`` on the last dimension.

    The source's definition is the concatenation ``[sin(z), cos(z)]``, doubling the width; here
    the two halves are interleaved per unit (a ``[..., n, 2]`` view flattened), the layout of
    :class:`~ppo_cbp.nets.crelu.CReLU`: unit ``i``'s outputs are features ``2i`` (sine) and
    ``2i + 1`` (cosine). The consumer layer, with ``2n`` inputs, computes the same function as
    with the concatenation up to a fixed permutation of its input columns (column ``2i + o``
    here is column ``o * n + i`` there), and its columns for unit ``i`` are contiguous (the
    :class:`~ppo_cbp.nets.units.UnitLayer` layout ``out_group=2``).

    As a unit of the reinitialising operators and the metrics, a DFF unit is one unit with two
    outputs, like a CReLU unit, and its activation is the mean magnitude of its two outputs,
    ``h_i = (|sin z_i| + |cos z_i|) / 2`` (:meth:`unit_activation`). For CReLU, whose outputs
    are non-negative, the same rule gives its mean output ``|z_i| / 2``. A DFF unit's outputs
    lie on the unit circle (``sin^2 + cos^2 = 1``), so ``h_i`` is in ``[1/2, 1/sqrt(2)]``: it
    is never 0 (a DFF unit is never dead) and its ReDo score ``E|h_i| / mean_j E|h_j|`` is at
    least ``1/sqrt(2)`` (never dormant, which is why the suite refuses ``redo`` with ``dff``).
    Continual backprop's contribution utility ``E|h_i| * sum_k (|w[k, 2i]| + |w[k, 2i + 1]|)``
    then ranks units by their outgoing weights (within a factor ``sqrt(2)``), the part of a
    unit's contribution that can vanish. The feature metrics (feature norm, ranks) are of the
    ``2n`` outputs themselves, what the consumer reads.

    The input's last dimension holds the units (``[..., n]`` -> ``[..., 2n]``): it follows a
    Linear layer (or a LayerNorm after one).
    """

    outputs_per_unit = 2

    def forward(self, z: Tensor) -> Tensor:
        return torch.stack((torch.sin(z), torch.cos(z)), dim=-1).flatten(-2)

    @staticmethod
    def unit_activation(output: Tensor) -> Tensor:
        """The activation of each unit, ``[..., n]``: the mean magnitude of its two outputs
        ``[..., 2n]``, ``(|sin z| + |cos z|) / 2``."""
        return output.unflatten(-1, (-1, 2)).abs().mean(dim=-1)


def dff_mlp(
    in_dim: int,
    hidden: Sequence[int],
    out_dim: int,
    init: str = "kaiming_uniform",
    *,
    layer_norm: bool = False,
) -> nn.Sequential:
    """``Linear, [LayerNorm,] DFF, ..., Linear``: hidden layers of the given widths (units).

    The layer after a hidden layer of ``n`` units takes ``2n`` inputs, as in the source. Every
    Linear is drawn from ``init`` with the ReLU gain and a zero bias, as
    :func:`~ppo_cbp.nets.crelu.crelu_mlp` draws a CReLU network (Plasticine draws both the
    same way). With the Kaiming schemes this gain gives the pre-activations after the first
    layer unit second moment: a unit's two outputs carry ``sin^2 z + cos^2 z = 1`` in all, so a
    consumer row of ``2n`` zero-mean weights of variance ``gain^2 / fan_in = 2 / (2n)`` gives
    ``E[z'^2] = n * (1/n) = 1`` over the draw, whatever the input. ``layer_norm`` puts a LayerNorm (gain 1, offset 0) between each hidden Linear
    and its DFF.
    """
    return paired_mlp(DFF, in_dim, hidden, out_dim, init, layer_norm=layer_norm)
