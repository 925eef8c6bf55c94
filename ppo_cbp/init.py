"""Weight initialisers shared by the networks and the reinitialising operators.

Continual backprop and ReDo redraw a replaced unit's incoming weights from the *same*
distribution the network was built with. Both the network builders and the operators
therefore go through :func:`sample_` with a named scheme, so the two can never drift apart.

Schemes, for a weight of fan-in ``n_in`` and fan-out ``n_out`` (fan = channels x kernel size):

==================  ============================================================
``kaiming_uniform``  U(-b, b), b = gain * sqrt(3 / n_in)   (ReLU: sqrt(6 / n_in))
``kaiming_normal``   N(0, s^2), s = gain / sqrt(n_in)
``lecun_uniform``    U(-b, b), b = sqrt(3 / n_in)
``lecun_normal``     N(0, s^2), s = 1 / sqrt(n_in)
``xavier_uniform``   U(-b, b), b = gain * sqrt(6 / (n_in + n_out))
``torch_default``    U(-b, b), b = 1 / sqrt(n_in)  (PyTorch's Linear/Conv default)
==================  ============================================================

``gain`` is :func:`torch.nn.init.calculate_gain` of the layer's nonlinearity; ELU, SiLU/swish
and GELU use the ReLU gain, as in the paper's code. A network's biases start at zero unless its
builder asks :func:`init_layer_` for PyTorch's default bias, U(-1/sqrt(n_in), 1/sqrt(n_in));
the units that continual backprop and ReDo create always start with a zero bias.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor, nn

Scheme = Literal[
    "lecun_uniform",
    "kaiming_uniform",
    "kaiming_normal",
    "lecun_normal",
    "xavier_uniform",
    "torch_default",
]
"""The weight-initialisation schemes by name (the command lines' ``--init`` choices)."""
SCHEMES: tuple[str, ...] = get_args(Scheme)

_RELU_LIKE = {"relu", "elu", "swish", "silu", "gelu"}


def gain(nonlinearity: str) -> float:
    """Gain of ``nonlinearity`` for the Kaiming and Xavier schemes."""
    if nonlinearity in _RELU_LIKE:
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        return nn.init.calculate_gain("leaky_relu", 0.01)
    return nn.init.calculate_gain(nonlinearity)


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


def fans(shape: torch.Size | tuple[int, ...], seed_dims: int = 0) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of ``shape`` = [*seed, out, in, *kernel]."""
    out_features, in_features, *kernel = shape[seed_dims:]
    receptive = math.prod(kernel)
    return in_features * receptive, out_features * receptive


def distribution(scheme: str, nonlinearity: str, fan_in: int, fan_out: int) -> tuple[str, float]:
    """("uniform", bound) or ("normal", std) of ``scheme`` for the given fans."""
    check_scheme(scheme)
    if scheme == "kaiming_uniform":
        return "uniform", gain(nonlinearity) * math.sqrt(3.0 / fan_in)
    if scheme == "kaiming_normal":
        return "normal", gain(nonlinearity) / math.sqrt(fan_in)
    if scheme == "lecun_uniform":
        return "uniform", math.sqrt(3.0 / fan_in)
    if scheme == "lecun_normal":
        return "normal", 1.0 / math.sqrt(fan_in)
    if scheme == "xavier_uniform":
        return "uniform", gain(nonlinearity) * math.sqrt(6.0 / (fan_in + fan_out))
    return "uniform", 1.0 / math.sqrt(fan_in)


def sample(
    shape: tuple[int, ...],
    kind: str,
    scale: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    out: Tensor | None = None,
) -> Tensor:
    """A fresh tensor from U(-scale, scale) (``kind="uniform"``) or N(0, scale^2); written into
    ``out`` (contiguous, of ``shape``) when given, the same numbers."""
    if kind == "uniform":
        out = torch.rand(shape, generator=generator, device=device, dtype=dtype, out=out)
        return out.mul_(2.0 * scale).sub_(scale)
    out = torch.randn(shape, generator=generator, device=device, dtype=dtype, out=out)
    return out.mul_(scale)


@torch.no_grad()
def sample_(
    weight: Tensor,
    scheme: str,
    nonlinearity: str = "relu",
    *,
    seed_dims: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fill ``weight`` ([*seed, out, in, *kernel]) in place from ``scheme``."""
    kind, scale = distribution(scheme, nonlinearity, *fans(weight.shape, seed_dims))
    weight.copy_(
        sample(
            tuple(weight.shape),
            kind,
            scale,
            generator=generator,
            device=weight.device,
            dtype=weight.dtype,
        )
    )
    return weight


def init_layer_(
    layer: nn.Module,
    scheme: str = "kaiming_uniform",
    nonlinearity: str = "relu",
    generator: torch.Generator | None = None,
    bias: Literal["zero", "torch_default"] = "zero",
) -> nn.Module:
    """Initialise a Linear or Conv layer: weight from ``scheme``, then the bias.

    ``bias="zero"``: 0. ``bias="torch_default"``: U(-1/sqrt(n_in), 1/sqrt(n_in)), PyTorch's
    default for Linear and Conv biases, drawn from ``generator`` after the weight.
    """
    sample_(layer.weight, scheme, nonlinearity, generator=generator)
    if getattr(layer, "bias", None) is not None:
        if bias == "torch_default":
            bound = 1.0 / math.sqrt(fans(layer.weight.shape)[0])
            with torch.no_grad():
                layer.bias.copy_(
                    sample(
                        tuple(layer.bias.shape),
                        "uniform",
                        bound,
                        generator=generator,
                        device=layer.bias.device,
                        dtype=layer.bias.dtype,
                    )
                )
        elif bias == "zero":
            nn.init.zeros_(layer.bias)
        else:
            raise ValueError(f"unknown bias init {bias!r}; expected 'zero' or 'torch_default'")
    return layer


init_linear_ = init_layer_
