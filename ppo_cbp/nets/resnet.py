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
from ppo_cbp.nets.units import UnitLayer, norm_resets


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
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
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
        return self.pool(self.blocks(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))

    def unit_layers(self) -> tuple[list[UnitLayer], list[nn.Module]]:
        """See :func:`resnet_unit_layers`."""
        return resnet_unit_layers(self)


def resnet_unit_layers(
    model: ResNet18, seed_dims: int = 0
) -> tuple[list[UnitLayer], list[nn.Module]]:
    """The 17 CBP unit layers of the ResNet-18 and the module whose output is each ``h``.

    ``seed_dims=1`` for a :class:`~ppo_cbp.nets.stacked_resnet.StackedResNet18`, whose parameters
    and BatchNorm statistics (same names) carry a leading seed dimension.

    The mapping is the paper's released one (``res_gnt.py``): the weight layers in order,
    downsample shortcuts skipped, each hidden layer's consumer the next weight layer.

    * The stem and each block's ``conv1``: channel ``i`` is measured after its BatchNorm and
      ReLU (``h``); its outgoing weights are input channel ``i`` of the next convolution
      (``blocks[0].conv1`` for the stem, the block's ``conv2`` for a ``conv1``).
    * Each block's ``conv2``: channel ``i`` is measured on the block's output, after the
      residual add and ReLU (for the last block, after global pooling: the head's input),
      and its outgoing weights are input channel ``i`` of the next block's ``conv1`` (column
      ``i`` of the head for the last block).

    A replaced unit gets fresh incoming filters, a zero bias, BatchNorm (1, 0) with running
    statistics (0, 1) and zero outgoing weights. Measuring a block's ``conv2`` on the block
    output makes a residual-stream channel that is zero for every input a zero-utility unit,
    which CBP replaces; with BatchNorm (1, 0) its new branch is the standardised response of
    fresh filters (in training mode), so the channel is alive and learns whatever its
    shortcut carries. The identity and downsample shortcuts are fixed paths with no weight to
    zero: right after a replacement the next layers see the new unit's output through them,
    and only its weighted consumer starts from zero.

    The downsample shortcuts are never replaced.
    """
    conv, bn, relu = model.stem
    consumers = [(block.conv1.weight, block.conv1.bias) for block in model.blocks]
    consumers.append((model.fc.weight, model.fc.bias))
    layers = [
        UnitLayer(
            conv.weight,
            conv.bias,
            out_weight=consumers[0][0],
            out_bias=consumers[0][1],
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
                out_weight=consumers[b + 1][0],
                out_bias=consumers[b + 1][1],
                norm=norm_resets(block.bn2),
                init="kaiming_normal",
                seed_dims=seed_dims,
                name=f"block{b}.conv2",
            )
        )
        taps.append(block.relu2)
    taps[-1] = model.pool  # the head reads the pooled output
    return layers, taps
