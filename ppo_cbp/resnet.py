"""The paper's ResNet-18 for 32x32 images (class-incremental CIFAR-100), and its CBP units.

Architecture: a 3x3 stem convolution with stride 1 and no max-pool, BatchNorm, basic residual
blocks [2, 2, 2, 2] with 64/128/256/512 channels, global average pooling and a linear head.
Every convolution has a bias, as in the paper's code. Initialisation: convolutions
Kaiming-normal (fan-in, ReLU gain), the head Kaiming-normal with linear gain, biases 0,
BatchNorm weights 1 and biases 0.

Each activation is a distinct module, so hooks can record it without touching ``forward``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ppo_cbp.init import init_layer_
from ppo_cbp.units import UnitLayer, norm_resets


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride), nn.BatchNorm2d(channels)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU()
        )
        blocks, channels = [], 64
        for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(channels, width, stride), BasicBlock(width, width, 1)]
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_layer_(m, "kaiming_normal", "relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        init_layer_(self.fc, "kaiming_normal", "linear")

    def features(self, x: Tensor) -> Tensor:
        """The pooled 512-dimensional representation."""
        return self.pool(self.blocks(self.stem(x))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))

    def unit_layers(self) -> tuple[list[UnitLayer], list[nn.Module]]:
        """See :func:`resnet_unit_layers`."""
        return resnet_unit_layers(self)


def resnet_unit_layers(
    model: ResNet18, seed_dims: int = 0
) -> tuple[list[UnitLayer], list[nn.Module]]:
    """The 17 CBP unit layers of the ResNet-18 and the module whose output is each ``h``.

    ``seed_dims=1`` for a :class:`~ppo_cbp.stacked_resnet.StackedResNet18`, whose parameters
    and BatchNorm statistics (same names) carry a leading seed dimension.

    * Inside a block, channel ``i`` of ``conv1`` is an ordinary unit: its outgoing weights are
      input channel ``i`` of ``conv2``, zeroed on replacement, with ``bn1`` reset to (1, 0).
      Right after a replacement the block computes exactly what it did with the old unit
      pruned.
    * Each block's ``conv2`` writes into the residual stream, which reaches many later layers
      through identity shortcuts, so no single consumer weight carries it. Its BatchNorm's
      affine pair is the unit's outgoing path: it is reset to (0, 0), which silences the new
      unit exactly as zero outgoing weights do (the old unit pruned). The unit still learns:
      the shortcut is added before ``relu2``, so the BatchNorm scale gets a gradient. ``h`` is
      the BatchNorm output, the branch's contribution to the stream.
    * The stem is followed directly by a ReLU, so a (0, 0) reset would leave its channel at
      ReLU(0) = 0 with zero gradient forever (PyTorch's ReLU'(0) = 0): a dead unit that CBP
      would pick again at every later stem replacement. Its BatchNorm is reset to (1, 0)
      instead, as in the paper's code, and its one weighted consumer, ``blocks[0].conv1``,
      gets zero weights from it (the outgoing weights that enter its utility; ``h`` is the ReLU
      output). The stem's output also enters the residual stream through ``blocks[0]``'s
      identity shortcut, a fixed path with no weight to zero: a unit that is alive there
      cannot also be absent. So right after a stem replacement the network computes what it
      did with the old unit's weighted path pruned and, in the residual stream, the old unit's
      channel replaced by the new unit's output: ``ReLU(BN(conv_new(x)))`` with BatchNorm
      (1, 0) and running statistics (0, 1), i.e. the standardised response of freshly drawn
      filters in training mode.

    The downsample shortcuts are never replaced.
    """
    conv, bn, relu = model.stem
    layers = [
        UnitLayer(
            conv.weight,
            conv.bias,
            out_weight=model.blocks[0].conv1.weight,
            out_bias=model.blocks[0].conv1.bias,
            norm=norm_resets(bn),
            init="kaiming_normal",
            seed_dims=seed_dims,
            name="stem",
        )
    ]
    taps: list[nn.Module] = [relu]
    for b, block in enumerate(model.blocks):
        layers.append(
            UnitLayer(
                block.conv1.weight,
                block.conv1.bias,
                out_weight=block.conv2.weight,
                out_bias=block.conv2.bias,
                norm=norm_resets(block.bn1),
                init="kaiming_normal",
                seed_dims=seed_dims,
                name=f"block{b}.conv1",
            )
        )
        taps.append(block.relu1)
        layers.append(
            UnitLayer(
                block.conv2.weight,
                block.conv2.bias,
                norm=norm_resets(block.bn2, 0.0),
                init="kaiming_normal",
                seed_dims=seed_dims,
                name=f"block{b}.conv2",
            )
        )
        taps.append(block.bn2)
    return layers, taps
