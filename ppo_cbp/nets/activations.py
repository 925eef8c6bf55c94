"""The hidden activations of the stacked MLPs, and their derivatives, as in-place tensor
operations (shared by :mod:`ppo_cbp.nets.stacked_mlp` and :mod:`ppo_cbp.nets.frozen_head`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "LEAKY_RELU_SLOPE", "activate", "activation_backward_"]

ACTIVATIONS = ("relu", "tanh", "sigmoid", "elu", "leaky_relu", "swish", "linear")

LEAKY_RELU_SLOPE = 0.01
"""Negative slope of ``leaky_relu`` (PyTorch's default, as in the paper's code)."""


def activate(name: str, z: Tensor, out: Tensor) -> None:
    """``out <- f(z)`` (``out`` may be a strided view)."""
    if name == "relu":
        torch.clamp_min(z, 0.0, out=out)
    elif name == "tanh":
        torch.tanh(z, out=out)
    elif name == "sigmoid":
        torch.sigmoid(z, out=out)
    elif name == "linear":
        out.copy_(z)
    elif name == "elu":
        out.copy_(F.elu(z))
    elif name == "leaky_relu":
        out.copy_(F.leaky_relu(z, LEAKY_RELU_SLOPE))
    else:  # swish
        out.copy_(F.silu(z))


def activation_backward_(name: str, grad: Tensor, z: Tensor, h: Tensor) -> Tensor:
    """``grad * f'(z)`` (``h = f(z)``), in place on ``grad`` where possible."""
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, h, 0.0)
    if name == "tanh":
        return grad.mul_(1.0 - h * h)
    if name == "sigmoid":
        return grad.mul_(h * (1.0 - h))
    if name == "linear":
        return grad
    if name == "elu":  # alpha = 1: f' = 1 for z > 0, else exp(z) = h + 1
        return torch.where(z > 0, grad, grad * (h + 1.0))
    if name == "leaky_relu":
        return torch.where(z > 0, grad, grad * LEAKY_RELU_SLOPE)
    s = torch.sigmoid(z)  # swish: f = z s(z), f' = s (1 + z (1 - s))
    return grad.mul_(s * (1.0 + z * (1.0 - s)))
