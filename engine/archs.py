"""The backbone names, torch-free: the config checks `model.arch` against them, engine/models.py
builds each one (`ARCHS` there has exactly these keys)."""

# name: what it is (the README and `model.arch` errors show the names; the builders live in engine/models.py)
ARCH_INFO = {
    "resnet8_cifar": "CIFAR ResNet-8, 32×32 inputs (tiny: tests and quick studies)",
    "resnet20_cifar": "CIFAR ResNet-20",
    "resnet32_cifar": "CIFAR ResNet-32 (the papers' CIFAR backbone)",
    "resnet10": "torchvision-style ResNet-10",
    "resnet50": "torchvision ResNet-50",
    "resnet152": "torchvision ResNet-152",
    "resnext50_32x4d": "torchvision ResNeXt-50 32×4d",
    "resnext101_32x4d": "ResNeXt-101 32×4d",
    "resnext101_32x8d": "torchvision ResNeXt-101 32×8d",
    "resnext152_32x4d": "ResNeXt-152 32×4d",
}
ARCH_NAMES = tuple(ARCH_INFO)
