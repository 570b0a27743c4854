"""Backbones from torchvision's builders: shapes, feature sizes, local weight loading."""

import pytest
import torch
from helpers import model_config
from torchvision.models import resnet as tv

from engine.checkpoint import CheckpointError
from engine.config import ConfigError, ModelConfig, load_config
from engine.models import ARCHS, build_model, load_backbone_weights

FEATURES = {
    "resnet8_cifar": 64, "resnet20_cifar": 64, "resnet32_cifar": 64, "resnet10": 512, "resnet50": 2048,
    "resnet152": 2048, "resnext50_32x4d": 2048, "resnext101_32x4d": 2048, "resnext101_32x8d": 2048,
    "resnext152_32x4d": 2048,
}


def test_every_arch_is_listed():
    assert set(ARCHS) == set(FEATURES)


@pytest.mark.parametrize("arch", list(FEATURES))
def test_forward_shapes(arch):
    torch.manual_seed(0)
    model = build_model(model_config(arch), [10] * 7).eval()
    size = 32 if arch.endswith("cifar") else 64
    with torch.no_grad():
        f = model.forward_features(torch.randn(2, 3, size, size))
        logits = model.forward_head(f)
    assert f.shape == (2, FEATURES[arch]) and logits.shape == (2, 7)


def test_cifar_widths_set_the_stages_and_the_feature_dimension():
    torch.manual_seed(0)
    cfg = model_config("resnet20_cifar")
    cfg.model.cifar_widths = [8, 16, 128]
    model = build_model(cfg, [10] * 3).eval()
    assert [stage[0].conv1.out_channels for stage in model.backbone.stages] == [8, 16, 128]
    assert len(model.backbone.stages[0]) == 3  # the depth stays the arch's
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert model.head.weight.shape == (3, 128)


@pytest.mark.parametrize("overrides, expected", [
    (["model.cifar_widths=[16, 32]"], "three channel counts"),
    (["model.cifar_widths=[16, 0, 64]"], "three channel counts"),
    (["model.arch=resnet10", "model.cifar_widths=[8, 16, 32]"], "resnet10 is not a CIFAR ResNet"),
])
def test_cifar_widths_errors_name_the_value(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=overrides)


def test_resnext152_is_the_papers_architecture():
    ref = tv.ResNet(tv.Bottleneck, [3, 8, 36, 3], groups=32, width_per_group=4)
    ours = ARCHS["resnext152_32x4d"](ModelConfig())
    assert [len(getattr(ours, f"layer{i}")) for i in range(1, 5)] == [3, 8, 36, 3]
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in ours.parameters()) == n_ref
    assert ours.layer1[0].conv2.groups == 32 and ours.layer1[0].conv2.out_channels == 128  # 32 groups × 4


def test_resnet10_is_basicblock_1111():
    net = ARCHS["resnet10"](ModelConfig())
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert isinstance(net.layer1[0], tv.BasicBlock)


def test_load_torchvision_style_weights(tmp_path):
    torch.manual_seed(1)
    src = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=1000)
    path = tmp_path / "r10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    model = build_model(model_config("resnet10", "ce", str(path)), [10] * 5)
    torch.testing.assert_close(model.backbone.conv1.weight, src.conv1.weight)
    torch.testing.assert_close(model.backbone.layer4[0].bn2.running_var, src.layer4[0].bn2.running_var)


def test_load_weights_errors(tmp_path):
    backbone = ARCHS["resnet10"](ModelConfig())
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone_weights(backbone, tmp_path / "none.pth")
    wrong = tmp_path / "r50.pth"
    torch.save(tv.resnet50().state_dict(), wrong)
    with pytest.raises(CheckpointError, match="does not fit this backbone: unexpected: .* wrong shape"):
        load_backbone_weights(backbone, wrong)
    evil = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, evil)
    with pytest.raises(CheckpointError, match="cannot load"):
        load_backbone_weights(backbone, evil)
