"""Shrink and Perturb (Ash and Adams, 2020), as used in the paper.

*Shrink* is coupled L2 weight decay in the optimizer (``weight_decay=lambda``, so SGD moves each
weight by ``-lr * (grad + lambda * w)``). *Perturb* adds independent Gaussian noise of standard
deviation ``noise_std`` to every parameter after each optimizer step:

    w <- w + noise_std * N(0, 1)

:func:`perturb_` is the second half; pair it with the optimizer's ``weight_decay``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


@torch.no_grad()
def perturb_(
    params: Iterable[Tensor], noise_std: float, generator: torch.Generator | None = None
) -> None:
    """Add ``N(0, noise_std^2)`` noise to each tensor in ``params``, in place."""
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    params = list(params)
    if noise_std == 0 or not params:
        return
    noise = [
        torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in params
    ]
    torch._foreach_add_(params, noise, alpha=noise_std)
