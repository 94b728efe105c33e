"""The seed's backbone in PyTorch: the Caffe-style Keras ResNet v1 (docs/METHOD.md §2.1).

Keras ``applications.resnet`` ResNet50/101/152 (the seed's ``applications/resnet_common.py``),
layer for layer:

    stem:   conv1_conv 7x7/2, 64, bias (ZeroPadding 3 -> padding=3) -> conv1_bn -> ReLU
            -> pool1 3x3/2 (ZeroPadding 1; the input is post-ReLU, so 0 padding = -inf padding)
    conv2..conv5 (``layer1..layer4``): 3 / 4,4,8 / 6,23,36 / 3 bottleneck blocks of width
            64 / 128 / 256 / 512; stride 1 / 2 / 2 / 2 (``ReidNet`` sets conv5's to its
            ``last_stride``, 1 in the seed, through ``CaffeBottleneck.set_stride``)
    block:  1x1 conv (the stride is HERE) -> BN -> ReLU -> 3x3 conv ('same') -> BN -> ReLU
            -> 1x1 conv to 4x width -> BN; first block of a stage: 1x1 conv with stride -> BN
            shortcut; add, ReLU

Every conv has a bias (Keras' default), every BN has epsilon 1.001e-5. Module attribute names
mirror torchvision's ResNet (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1..4``, blocks with
``conv1..3``, ``bn1..3``, ``downsample``), so ``ReidNet`` assembles both styles alike.
``stage_layer_names`` names each conv/BN by its Keras layer (``conv4_block6_2_conv``), which is how
the .h5 loaders (``alr_fast.keras_weights``) find their weights.
"""
from __future__ import annotations

from torch import nn

KERAS_BN_EPS = 1.001e-5
BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
WIDTHS = (64, 128, 256, 512)


class CaffeBottleneck(nn.Module):
    """Keras ``block1``: stride on the first 1x1 conv, biases on every conv; in -> 4*width channels."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, shortcut: bool) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride, bias=True)
        self.bn1 = nn.BatchNorm2d(width, eps=KERAS_BN_EPS)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(width, eps=KERAS_BN_EPS)
        self.conv3 = nn.Conv2d(width, out, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(out, eps=KERAS_BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=True), nn.BatchNorm2d(out, eps=KERAS_BN_EPS))
            if shortcut
            else None
        )

    def set_stride(self, stride: int) -> None:
        """The block's stride lives on its first 1x1 conv and on the shortcut conv."""
        self.conv1.stride = (stride, stride)
        if self.downsample is not None:
            self.downsample[0].stride = (stride, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class KerasResNet(nn.Module):
    """Caffe-style ResNet50/101/152 without its top; ``forward`` gives the conv5 map [B, 2048, H/32, W/32]
    (H/16 once conv5's first block has ``set_stride(1)``)."""

    def __init__(self, name: str = "resnet50") -> None:
        super().__init__()
        if name not in BLOCKS:
            raise ValueError(f"the keras backbone style has {', '.join(BLOCKS)}; got '{name}'")
        self.name = name
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(64, eps=KERAS_BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        stages = []
        for i, (blocks, width) in enumerate(zip(BLOCKS[name], WIDTHS)):
            stride = 1 if i == 0 else 2
            layer = [CaffeBottleneck(channels, width, stride, shortcut=True)]
            channels = width * CaffeBottleneck.expansion
            layer += [CaffeBottleneck(channels, width, 1, shortcut=False) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = channels

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def stage_layer_names(stage: int, layer: nn.Sequential, path: str) -> dict[str, tuple[str, nn.Module]]:
    """``conv{stage}_block{b}_{0..3}_{conv,bn}`` -> (module path, module) for one stage of blocks."""
    out: dict[str, tuple[str, nn.Module]] = {}
    for b, block in enumerate(layer, start=1):
        base = f"conv{stage}_block{b}"
        if block.downsample is not None:
            out[f"{base}_0_conv"] = (f"{path}.{b - 1}.downsample.0", block.downsample[0])
            out[f"{base}_0_bn"] = (f"{path}.{b - 1}.downsample.1", block.downsample[1])
        for j in (1, 2, 3):
            out[f"{base}_{j}_conv"] = (f"{path}.{b - 1}.conv{j}", getattr(block, f"conv{j}"))
            out[f"{base}_{j}_bn"] = (f"{path}.{b - 1}.bn{j}", getattr(block, f"bn{j}"))
    return out
