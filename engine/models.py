"""Backbones and the classifier that joins a backbone to its head.

`features = model.forward_features(x)`; the head owns the classifier weight,
bias and class centers (engine/heads.py). CIFAR ResNets (He et al. 2016, §4.2:
3 stages of n BasicBlocks, 16/32/64 channels, 6n+2 layers) are assembled from
torchvision's own `BasicBlock`; the shortcut that changes shape is a 1×1
convolution + BN (option B).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, conv1x1

from engine.heads import OffsetHead


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs; `forward` returns the pooled 64-d feature vector."""

    def __init__(self, blocks_per_stage: int, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(blocks_per_stage):
                s = stride if j == 0 else 1
                down = None
                if s != 1 or in_ch != width:
                    down = nn.Sequential(conv1x1(in_ch, width, s), nn.BatchNorm2d(width))
                layers.append(BasicBlock(in_ch, width, stride=s, downsample=down))
                in_ch = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


ARCHS: dict[str, Callable[[], nn.Module]] = {
    "resnet8_cifar": lambda: CifarResNet(1),  # tiny: tests and quick studies
    "resnet20_cifar": lambda: CifarResNet(3),
    "resnet32_cifar": lambda: CifarResNet(5),  # the papers' CIFAR backbone
}


class Classifier(nn.Module):
    """backbone → features → head. timm-style `forward_features` / `forward_head`."""

    def __init__(self, backbone: nn.Module, head: OffsetHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def build_model(arch: str, num_classes: int, method: str, **head_kwargs) -> Classifier:
    if arch not in ARCHS:
        raise ValueError(f"unknown model.arch {arch!r}; expected one of {', '.join(ARCHS)}")
    backbone = ARCHS[arch]()
    head = OffsetHead(backbone.num_features, num_classes, method, **head_kwargs)
    return Classifier(backbone, head)
