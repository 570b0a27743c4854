"""Backbones and the classifier that joins a backbone to its head.

`features = model.forward_features(x)`; the head owns the classifier weight,
bias and class centers (engine/heads.py). Every backbone comes from
torchvision's builders or building blocks (no hand-written ResNet):

- ImageNet-size: ResNet-10 (BasicBlock [1,1,1,1], the OLTR / ImageNet-LT baseline),
  ResNet-50/152, ResNeXt-50 32x4d, ResNeXt-101 32x4d / 32x8d, ResNeXt-152 32x4d
  (= `ResNet(Bottleneck, [3, 8, 36, 3], groups=32, width_per_group=4)`), with torchvision's
  `fc` replaced by the identity so the backbone returns the pooled feature vector.
- CIFAR ResNets (He et al. 2016, §4.2: 3 stages of n BasicBlocks, 16/32/64 channels,
  6n+2 layers) assembled from torchvision's `BasicBlock`; the shortcut that changes
  shape is a 1×1 convolution + BN (option B).

`model.pretrained` loads a local torchvision/timm-style state_dict file (no downloads).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from common.errors import CheckpointError
from engine.heads import METHODS, Head
from engine.methods import LossConfig


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs (He et al. 2016, §4.2); `forward` returns the pooled feature vector,
    of dimension widths[-1] (64 with the paper's widths)."""

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


def _imagenet_backbone(net: tv.ResNet) -> tv.ResNet:
    """A torchvision ResNet whose forward returns the pooled features (fc → identity)."""
    net.num_features = net.fc.in_features
    net.fc = nn.Identity()
    return net


# The builder of each name in engine/archs.py (the config checks model.arch against those names, torch-free).
# Each builder takes `cfg.model` (only the CIFAR ResNets read a key of it: cifar_widths).
ARCHS: dict[str, Callable[[Any], nn.Module]] = {
    "resnet8_cifar": lambda m: CifarResNet(1, tuple(m.cifar_widths)),  # tiny: tests and quick studies
    "resnet20_cifar": lambda m: CifarResNet(3, tuple(m.cifar_widths)),
    "resnet32_cifar": lambda m: CifarResNet(5, tuple(m.cifar_widths)),  # the papers' CIFAR backbone
    "resnet10": lambda m: _imagenet_backbone(tv.ResNet(BasicBlock, [1, 1, 1, 1])),
    "resnet50": lambda m: _imagenet_backbone(tv.resnet50()),
    "resnet152": lambda m: _imagenet_backbone(tv.resnet152()),
    "resnext50_32x4d": lambda m: _imagenet_backbone(tv.resnext50_32x4d()),
    "resnext101_32x4d": lambda m: _imagenet_backbone(
        tv.ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)),
    "resnext101_32x8d": lambda m: _imagenet_backbone(tv.resnext101_32x8d()),
    "resnext152_32x4d": lambda m: _imagenet_backbone(
        tv.ResNet(Bottleneck, [3, 8, 36, 3], groups=32, width_per_group=4)),
}


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local torchvision/timm-style state_dict into a backbone (never runs code: weights_only).

    Accepts a bare state_dict or one nested under 'state_dict' / 'model'; strips 'module.'
    (DDP) and 'backbone.' prefixes; drops the source's classifier ('fc.*', 'head.*',
    'classifier.*'). Every backbone tensor must be present with the right shape.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"model.pretrained: {path} does not exist") from None
    except Exception as exc:
        raise CheckpointError(f"model.pretrained: cannot load {path}: {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"model.pretrained: {path} holds a {type(state).__name__}, expected a state_dict")
    cleaned = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            k = k.removeprefix(prefix)
        if not k.startswith(("fc.", "head.", "classifier.")):
            cleaned[k] = v
    own = backbone.state_dict()
    missing = sorted(set(own) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(own))
    wrong = [k for k in own if k in cleaned and cleaned[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{name}: {keys[:4]}{' …' if len(keys) > 4 else ''} ({len(keys)})"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys
        )
        raise CheckpointError(f"model.pretrained: {path} does not fit this backbone: {detail}")
    backbone.load_state_dict(cleaned)


class Classifier(nn.Module):
    """backbone → features → head. timm-style `forward_features` / `forward_head`."""

    def __init__(self, backbone: nn.Module, head: Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor, labels: Tensor | None = None):
        """Logits; with `labels`, the training pair (loss, features) — one call for DDP / compile."""
        features = self.forward_features(x)
        if labels is None:
            return self.forward_head(features)
        return self.head.loss(features, labels), features


def head_loss_config(cfg: Any) -> LossConfig:
    """`cfg.loss` as the head reads it: `loss.drw_epoch = 0` means Cao et al.'s schedule,
    re-weighting from epoch ⌊0.8·epochs⌋ (160 of 200), 0-based, i.e. the last fifth of training."""
    lo = cfg.loss
    return dataclasses.replace(lo, drw_epoch=lo.drw_epoch if lo.drw_epoch > 0 else int(0.8 * cfg.epochs))


def build_model(cfg: Any, class_counts: np.ndarray | list[int]) -> Classifier:
    """The one model builder (training, post hoc, benchmarks): `cfg.model` backbone (+ `pretrained`
    weights) and `Head(…, METHODS[cfg.method], cfg.loss, class_counts)`; num_classes = len(class_counts).
    `cfg` is an engine.config.Config, typed loosely so that the models do not import the config."""
    arch = cfg.model.arch
    if arch not in ARCHS:
        raise ValueError(f"unknown model.arch {arch!r}; expected one of {', '.join(ARCHS)}")
    backbone = ARCHS[arch](cfg.model)
    if cfg.model.pretrained:
        load_backbone_weights(backbone, cfg.model.pretrained)
    counts = np.asarray(class_counts)
    head = Head(backbone.num_features, len(counts), METHODS[cfg.method], head_loss_config(cfg), counts)
    return Classifier(backbone, head)


def convert_sync_bn(model: nn.Module, kind: str) -> nn.Module:
    """`model.sync_bn` under DDP: every BatchNorm computes its batch statistics over all ranks.

    "on": torch.nn.SyncBatchNorm (NCCL or gloo); "apex": apex.parallel.SyncBatchNorm (NVIDIA apex, when
    importable: a ConfigError otherwise); "off": unchanged. Call before wrapping the model in DDP."""
    if kind == "off":
        return model
    if kind == "apex":
        try:
            from apex.parallel import convert_syncbn_model
        except ImportError:
            from common.errors import ConfigError

            raise ConfigError("model.sync_bn=apex needs NVIDIA apex (github.com/NVIDIA/apex); it cannot be "
                              "imported here: use model.sync_bn=on (torch.nn.SyncBatchNorm)") from None
        return convert_syncbn_model(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
