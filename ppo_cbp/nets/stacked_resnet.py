"""S copies of the paper's ResNet-18 trained in lockstep as one stacked network.

:class:`StackedResNet18` holds S :class:`~ppo_cbp.nets.resnet.ResNet18` as one network whose every
parameter and BatchNorm statistic carries a leading seed dimension; slice ``[s]`` is exactly
the tensor of seed ``s``'s network alone, under the same name (``stem.0.weight``,
``blocks.3.bn2.running_mean``, ``fc.bias``, ...) and in the same ``parameters()`` order.
Activations use the seed-major channel layout ``[B, S * C, H, W]`` of
:mod:`ppo_cbp.nets.stacked_sequential` (channel ``s * C + c`` is channel ``c`` of seed ``s``):

* a convolution is one grouped convolution (``groups=S``): group ``s`` reads only seed
  ``s``'s channels;
* a BatchNorm is one BatchNorm over the ``S * C`` channels: its batch statistics, running
  statistics and affine pair are per channel, hence per seed, so in training mode every seed
  is normalised with its own minibatch's statistics exactly as alone;
* the residual adds, ReLUs and the global average pool act per channel and run as they are;
* the head is a batched matmul ``z = b + h W^T`` on ``[S, B, 512]``.

The loss of the stacked network is the sum of the seeds' losses, so every seed's slice gets
its own gradient and any elementwise optimizer updates it as it updates the network alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppo_cbp.nets.resnet import BasicBlock, ResNet18, resnet_unit_layers
from ppo_cbp.nets.units import UnitLayer

__all__ = ["StackedResNet18"]


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack([t.detach() for t in tensors])


class _Conv(nn.Module):
    """S Conv2d of the same shape as one grouped convolution on seed-major channels."""

    def __init__(self, convs: Sequence[nn.Conv2d]):
        super().__init__()
        c = convs[0]
        if c.groups != 1 or c.dilation != (1, 1) or c.padding_mode != "zeros":
            raise ValueError(f"unsupported convolution {c}")
        self.weight = nn.Parameter(_stack([m.weight for m in convs]))
        self.bias = None if c.bias is None else nn.Parameter(_stack([m.bias for m in convs]))
        self.stride, self.padding = c.stride, c.padding

    def forward(self, h: Tensor) -> Tensor:
        w = self.weight
        bias = None if self.bias is None else self.bias.view(-1)
        return F.conv2d(
            h, w.view(-1, *w.shape[2:]), bias, self.stride, self.padding, groups=w.shape[0]
        )


class _BatchNorm(nn.Module):
    """S BatchNorm2d as one BatchNorm over the seed-major ``S * C`` channels.

    The affine pair and running statistics are ``[S, C]``; ``num_batches_tracked`` is not
    kept (the networks' BatchNorms use a fixed momentum, so it never enters the output).
    """

    def __init__(self, norms: Sequence[nn.BatchNorm2d]):
        super().__init__()
        n = norms[0]
        if n.momentum is None or not (n.affine and n.track_running_stats):
            raise ValueError(f"unsupported BatchNorm {n}")
        self.weight = nn.Parameter(_stack([m.weight for m in norms]))
        self.bias = nn.Parameter(_stack([m.bias for m in norms]))
        self.register_buffer("running_mean", _stack([m.running_mean for m in norms]))
        self.register_buffer("running_var", _stack([m.running_var for m in norms]))
        self.momentum, self.eps = n.momentum, n.eps

    def forward(self, h: Tensor) -> Tensor:
        # views of the [S, C] statistics: batch_norm updates them in place
        return F.batch_norm(
            h,
            self.running_mean.view(-1),
            self.running_var.view(-1),
            self.weight.view(-1),
            self.bias.view(-1),
            self.training,
            self.momentum,
            self.eps,
        )


class _Linear(nn.Module):
    """S Linear layers as one batched matmul on ``[S, B, in]``."""

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(_stack([m.weight for m in linears]))
        self.bias = nn.Parameter(_stack([m.bias for m in linears]))

    def forward(self, h: Tensor) -> Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), h, self.weight.transpose(1, 2))


class _Block(nn.Module):
    """S :class:`~ppo_cbp.nets.resnet.BasicBlock` (same attribute names)."""

    def __init__(self, blocks: Sequence[BasicBlock]):
        super().__init__()
        self.conv1 = _Conv([b.conv1 for b in blocks])
        self.bn1 = _BatchNorm([b.bn1 for b in blocks])
        self.conv2 = _Conv([b.conv2 for b in blocks])
        self.bn2 = _BatchNorm([b.bn2 for b in blocks])
        self.downsample = None
        if blocks[0].downsample is not None:
            self.downsample = nn.Sequential(
                _Conv([b.downsample[0] for b in blocks]),
                _BatchNorm([b.downsample[1] for b in blocks]),
            )
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The inner ReLU's output and the block's output."""
        inner = self.relu1(self.bn1(self.conv1(x)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return inner, self.relu2(self.bn2(self.conv2(inner)) + shortcut)


class StackedResNet18(nn.Module):
    """S ResNet-18 as one network (see the module docstring).

    :param nets: the S networks; their parameters and BatchNorm statistics are copied (stacked),
        the networks themselves are not kept.
    """

    def __init__(self, nets: Sequence[ResNet18]):
        super().__init__()
        if not nets:
            raise ValueError("no networks to stack")
        shapes = [[tuple(t.shape) for t in net.state_dict().values()] for net in nets]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("the stacked networks must have the same architecture")
        self.num_seeds = len(nets)
        self.stem = nn.Sequential(
            _Conv([n.stem[0] for n in nets]), _BatchNorm([n.stem[1] for n in nets]), nn.ReLU()
        )
        self.blocks = nn.Sequential(
            *(_Block([n.blocks[i] for n in nets]) for i in range(len(nets[0].blocks)))
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = _Linear([n.fc for n in nets])

    def _trunk(
        self, x: Tensor, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Pooled features ``[S, B, 512]`` of ``x`` (``[B, S, C, H, W]``) and the 17 post-ReLU
        outputs ``[S, B, C, H, W]`` (detached views, or ``reduce`` of each): the stem's, then
        every block's inner ReLU and output, the last block's output as it is (before
        pooling)."""
        S, B = self.num_seeds, x.shape[0]

        def keep(t: Tensor) -> Tensor:
            t = self._seed_first(t)
            return t if reduce is None else reduce(t)

        h = self.stem(x.reshape(B, S * x.shape[2], *x.shape[3:]))
        taps = [keep(h)]
        for block in self.blocks:
            inner, h = block(h)
            taps += [keep(inner), keep(h)]
        return self.pool(h).view(B, S, -1).transpose(0, 1), taps

    def _seed_first(self, h: Tensor) -> Tensor:
        d = h.detach()
        return d.view(d.shape[0], self.num_seeds, -1, *d.shape[2:]).transpose(0, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Outputs ``[S, B, classes]`` and the activations ``h`` of the 17 unit layers of
        :meth:`unit_layers`, detached: the post-ReLU outputs of :meth:`features`, the last
        block's taken after pooling (``[S, B, 512]``, the head's input).

        ``x``: ``[B, S, C, H, W]``, seed ``s``'s images in ``x[:, s]``.
        """
        features, relus = self._trunk(x)
        return self.fc(features), relus[:-1] + [features.detach()]

    def features(
        self, x: Tensor, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """The pooled features ``[S, B, 512]`` and the 17 post-ReLU outputs (the stem's, then
        every block's inner and output ReLU), ``[S, B, C, H, W]`` views, detached.

        With ``reduce``, each output is replaced by ``reduce(output)`` as soon as the next
        layers no longer need it, so a large batch does not keep all 17 outputs at once.
        """
        return self._trunk(x, reduce)

    def head(self) -> tuple[Tensor, Tensor]:
        """The output layer's weight ``[S, classes, 512]`` and bias ``[S, classes]``."""
        return self.fc.weight, self.fc.bias

    def unit_layers(self, init: str = "kaiming_normal") -> list[UnitLayer]:
        """The 17 unit layers of :func:`~ppo_cbp.nets.resnet.resnet_unit_layers`, as seeded
        :class:`~ppo_cbp.nets.units.UnitLayer` views of the stacked parameters and statistics."""
        if init != "kaiming_normal":
            raise ValueError(f"the ResNet-18 is initialised kaiming_normal, not {init}")
        layers, _ = resnet_unit_layers(self, seed_dims=1)  # type: ignore[arg-type]
        return layers
