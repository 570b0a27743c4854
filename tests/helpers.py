"""Shared test helpers (importable from test modules: pytest puts tests/ on sys.path)."""

from pathlib import Path

import numpy as np
from PIL import Image

from engine.config import Config


def write_jpeg(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0, quality: int = 90) -> bytes:
    """A random-pixel JPEG of `size` (w, h) in PIL `mode` at `path` (folders created); returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format="JPEG", quality=quality)
    return path.read_bytes()


def model_config(arch: str, method: str = "eo_uc", pretrained: str = "") -> Config:
    """A default Config with the given backbone and method: the input of `engine.models.build_model`."""
    cfg = Config()
    cfg.model.arch, cfg.model.pretrained, cfg.method = arch, pretrained, method
    return cfg


def tiny(cache) -> list[str]:
    """Overrides for a run of a few seconds: ResNet-8, 16 px, 2 epochs, a small Digits-LT in `cache`."""
    return [
        f"data.cache_dir={cache}", "model.arch=resnet8_cifar", "epochs=2", "data.n_max=30", "data.imbalance_ratio=10",
        "data.val_per_class=5", "data.test_per_class=8", "data.image_size=16", "optim.batch_size=32",
        "optim.warmup_epochs=0", "eval.many_threshold=20", "eval.few_threshold=5", "run.progress=false",
    ]
