"""Stage 1 of a run: resolve the split files, read them once, count the classes once.

Everything downstream (loaders, head re-scaling, shot groups, reports) takes
the `class_counts` computed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from engine.config import Config
from pipelines.digits_lt import build_digits_lt
from pipelines.loader import build_transform, make_loader
from pipelines.splits import DataError, SplitIndex, class_counts, read_split


@dataclass
class Data:
    train: SplitIndex
    val: SplitIndex
    test: SplitIndex
    class_counts: np.ndarray  # training images per class, length num_classes
    num_classes: int


def _resolve(root: Path, split: str) -> Path:
    path = Path(split)
    return path if path.is_absolute() else root / path


def load_data(cfg: Config) -> Data:
    """Split files → indexes + class counts; every file and label is checked here, before training."""
    d = cfg.data
    if d.dataset == "digits_lt":
        splits = build_digits_lt(
            d.root or None, d.imbalance_ratio, d.imbalance_profile, cfg.seed, d.n_max, d.val_per_class, d.test_per_class
        )
        root, files = splits.root, (splits.train, splits.val, splits.test)
        num_classes = 10
    else:
        root = Path(d.root)
        if not root.is_dir():
            raise DataError(f"data.root {root} does not exist or is not a folder")
        if not any(root.iterdir()):
            raise DataError(f"data.root {root} is empty")
        files = tuple(_resolve(root, s) for s in (d.train_split, d.val_split, d.test_split))
        num_classes = d.num_classes or None
    train = read_split(files[0], root, num_classes)
    num_classes = train.num_classes
    val = read_split(files[1], root, num_classes)
    test = read_split(files[2], root, num_classes)
    counts = class_counts(train)  # raises on an empty class
    return Data(train, val, test, counts, num_classes)


def make_loaders(cfg: Config, data: Data, pin_memory: bool = False) -> tuple[DataLoader, DataLoader, DataLoader]:
    d = cfg.data
    common = dict(image_size=d.image_size, mean=d.mean, std=d.std)
    train_tf = build_transform(True, crop_padding=d.crop_padding, hflip=d.hflip, **common)
    eval_tf = build_transform(False, **common)
    workers = dict(num_workers=d.num_workers, pin_memory=pin_memory)
    train = make_loader(data.train, train_tf, cfg.optim.batch_size, train=True, seed=cfg.seed, **workers)
    val = make_loader(data.val, eval_tf, cfg.eval.batch_size, train=False, **workers)
    test = make_loader(data.test, eval_tf, cfg.eval.batch_size, train=False, **workers)
    return train, val, test


def train_features_loader(cfg: Config, data: Data) -> DataLoader:
    """The training split without augmentation (class feature means for the empirical offset)."""
    d = cfg.data
    tf = build_transform(False, d.image_size, d.mean, d.std)
    return make_loader(data.train, tf, cfg.eval.batch_size, train=False, num_workers=d.num_workers)
