"""Batched image augmentation on the device (no torchvision), for class-incremental CIFAR-100.

All functions take a batch ``x`` of shape ``[N, C, H, W]`` on any device and draw their random
numbers from a ``torch.Generator`` on that device, so a run's augmentation is reproducible
from its seed and never leaves the device. Per image, independently:

* :func:`random_flip`: mirrored left-right (``x.flip(-1)``) with probability ``p`` (0.5);
* :func:`random_crop`: padded by ``padding`` (4) pixels on every side (``reflect`` as in the
  paper's code, or ``zeros``), then the ``H x W`` window at offset ``(dy, dx)``, each offset
  uniform on ``{0, ..., 2 * padding}``;
* :func:`random_rotation`: rotated by an angle uniform on ``[0, max_degrees]`` (15) degrees,
  counter-clockwise as displayed (row 0 at the top), about the image centre, by bilinear
  resampling (``affine_grid`` + ``grid_sample``, ``align_corners=False``) with zeros outside.

:func:`augment` applies flip, crop and rotation in that order (the paper's order, after the
per-channel :func:`normalize`, which the benchmark applies once when the data is put on the
device).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "augment",
    "augment_seeds",
    "normalize",
    "random_crop",
    "random_flip",
    "random_rotation",
    "rotate",
]


def _check(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """``(x - mean_c) / std_c`` per channel ``c`` (a new tensor)."""
    _check(x)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def random_flip(x: Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> Tensor:
    """Each image mirrored left-right where ``U(0, 1) < p`` (one uniform per image, in order)."""
    _check(x)
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_crop(
    x: Tensor, generator: torch.Generator | None = None, padding: int = 4, mode: str = "reflect"
) -> Tensor:
    """Pad by ``padding`` and crop back to ``H x W`` at a random offset per image.

    Offsets are drawn as ``dy`` for all images, then ``dx`` for all images, each
    ``randint(0, 2 * padding + 1)``. Output pixel ``(i, j)`` is padded pixel ``(dy + i, dx + j)``.
    """
    _check(x)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if mode not in ("reflect", "zeros"):
        raise ValueError(f"mode must be reflect or zeros, got {mode!r}")
    if padding == 0:
        return x.clone()
    dy = torch.randint(0, 2 * padding + 1, (x.shape[0],), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (x.shape[0],), generator=generator, device=x.device)
    return _crop(x, padding, mode, dy, dx)


def _crop(x: Tensor, padding: int, mode: str, dy: Tensor, dx: Tensor) -> Tensor:
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode="reflect" if mode == "reflect" else "constant")
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols]


def rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate image ``n`` by ``degrees[n]`` counter-clockwise (as displayed) about its centre.

    Output pixel at normalised coordinates ``(u, v)`` (``u`` right, ``v`` down, in [-1, 1]) takes
    the input at ``(cos a * u - sin a * v, sin a * u + cos a * v)``, bilinearly interpolated,
    zero outside. For ``a = 90`` and a square image this is exactly ``torch.rot90(x, 1, (-2, -1))``.
    """
    _check(x)
    a = degrees.to(x.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotation(
    x: Tensor, generator: torch.Generator | None = None, max_degrees: float = 15.0
) -> Tensor:
    """:func:`rotate` by angles uniform on ``[0, max_degrees]``, one per image."""
    _check(x)
    if max_degrees < 0:
        raise ValueError(f"max_degrees must be >= 0, got {max_degrees}")
    if max_degrees == 0:
        return x.clone()
    u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
    return rotate(x, u * max_degrees)


def augment(
    x: Tensor,
    generator: torch.Generator | None = None,
    *,
    flip: float = 0.5,
    padding: int = 4,
    pad_mode: str = "reflect",
    max_degrees: float = 15.0,
) -> Tensor:
    """Flip, pad-and-crop, then rotate (see the module docstring); ``x`` is not modified."""
    x = random_flip(x, generator, flip)
    x = random_crop(x, generator, padding, pad_mode)
    return random_rotation(x, generator, max_degrees)


def augment_seeds(
    x: Tensor,
    generators: Sequence[torch.Generator],
    *,
    flip: float = 0.5,
    padding: int = 4,
    pad_mode: str = "reflect",
    max_degrees: float = 15.0,
) -> Tensor:
    """:func:`augment` of every seed's images with the seed's own generator, in one pass.

    ``x``: ``[B, S, C, H, W]``, seed ``s``'s images in ``x[:, s]``. Generator ``s`` draws what
    ``augment(x[:, s], generators[s])`` draws, in the same order, so ``out[:, s]`` is that
    call's result; the images are then transformed together.
    """
    if x.dim() != 5 or x.shape[1] != len(generators):
        raise ValueError(
            f"expected images [B, {len(generators)}, C, H, W], got shape {tuple(x.shape)}"
        )
    if padding < 0 or max_degrees < 0 or pad_mode not in ("reflect", "zeros"):
        raise ValueError(f"bad augmentation settings {padding=}, {max_degrees=}, {pad_mode=}")
    B, S = x.shape[:2]
    dev = x.device
    draws: list[list[Tensor]] = [[], [], [], []]  # flip, dy, dx, angle; [B] per seed
    for g in generators:
        draws[0].append(torch.rand(B, generator=g, device=dev) < flip)
        if padding > 0:
            for d in draws[1:3]:
                d.append(torch.randint(0, 2 * padding + 1, (B,), generator=g, device=dev))
        if max_degrees > 0:
            draws[3].append(torch.rand(B, generator=g, device=dev, dtype=x.dtype))
    # image b of seed s is row b * S + s
    f, dy, dx, u = (torch.stack(d, 1).view(-1) if d else None for d in draws)
    h = x.reshape(B * S, *x.shape[2:])
    h = torch.where(f.view(-1, 1, 1, 1), h.flip(-1), h)
    if dy is not None:
        h = _crop(h, padding, pad_mode, dy, dx)
    if u is not None:
        h = rotate(h, u * max_degrees)
    return h.view(x.shape)
