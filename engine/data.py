"""Stage 1 of a run: read the splits once, count the classes once, build the loaders.

Formats (`data.format`) all end in `SplitIndex`es read through pipelines/:
    digits_lt      the embedded default (written once under data.cache_dir)
    split_files    ImageNet-LT / Places-LT `relative/path label` files under data.root
    inat           iNaturalist 2018 COCO-style json files (labels from the training json's ids)
    image_folder   one sub-folder per class (splits are folders)
    cifar10_lt / cifar100_lt   from the CIFAR python pickles in data.root (test split also serves as val)

Everything downstream (samplers, losses, re-scaling, shot groups, reports) takes
the `class_counts` computed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.config import Config
from engine.distributed import DistInfo, broadcast_from_main
from pipelines.digits_lt import build_digits_lt, default_cache_dir
from pipelines.formats import build_cifar_lt, read_image_folder, read_inat
from pipelines.loader import build_imagenet_transform, build_transform, make_loader
from pipelines.samplers import ShardSampler, build_sampler
from pipelines.screen_cache import screen_once
from pipelines.splits import DataError, SplitIndex, class_counts, read_split


@dataclass
class Data:
    train: SplitIndex
    val: SplitIndex
    test: SplitIndex
    class_counts: np.ndarray  # training images per class, length num_classes
    num_classes: int
    notes: list[str] = field(default_factory=list)  # e.g. "val is the test split" for CIFAR-LT
    bad_images: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) dropped before training


def _resolve(root: Path, split: str) -> Path:
    path = Path(split)
    return path if path.is_absolute() else root / path


def _user_root(root: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"data.root {path} does not exist or is not a folder")
    if not any(path.iterdir()):
        raise DataError(f"data.root {path} is empty")
    return path


def load_data(cfg: Config, run_dir: Path | None = None, dist: DistInfo | None = None) -> Data:
    """Splits → indexes + class counts; every file and label is checked here, before training.

    `run_dir`: the run folder, where rank 0 remembers the image screening's verdicts (screened.json)
    so that a restart checks only changed files. `dist`: under torch.distributed only rank 0 screens
    the images; the other ranks receive its verdicts."""
    d = cfg.data
    cache = Path(d.cache_dir) if d.cache_dir else default_cache_dir()
    notes: list[str] = []
    if d.format == "digits_lt":
        s = build_digits_lt(cache, d.imbalance_ratio, d.imbalance_profile, cfg.seed, d.n_max,
                            d.val_per_class, d.test_per_class)
        train, val, test = (read_split(p, s.root, 10) for p in (s.train, s.val, s.test))
    elif d.format in ("cifar10_lt", "cifar100_lt"):
        s = build_cifar_lt(_user_root(d.root), cache, d.format.removesuffix("_lt"), d.imbalance_ratio,
                           d.imbalance_profile, cfg.seed)
        train = read_split(s.train, s.root, len(s.class_names))
        val = test = read_split(s.test, s.root, len(s.class_names))
        notes.append("CIFAR-LT has no validation split: val is the test split (as in the papers)")
    else:
        root = _user_root(d.root)
        files = [_resolve(root, s) for s in (d.train_split, d.val_split, d.test_split or d.val_split)]
        outside = d.allow_outside_root
        if d.format == "split_files":
            train = read_split(files[0], root, d.num_classes or None, outside)
            val, test = (read_split(f, root, train.num_classes, outside) for f in files[1:])
        elif d.format == "inat":
            train, ids = read_inat(files[0], root, allow_outside_root=outside)
            val, test = (read_inat(f, root, ids, outside)[0] for f in files[1:])
        else:  # image_folder
            train, names = read_image_folder(files[0])
            val, test = (read_image_folder(f, names)[0] for f in files[1:])
        if not d.test_split:
            notes.append("no data.test_split: the validation split is also the test split")
    # data.exclude_file, then every val/test image decodes and every train image opens (pipelines/check.py),
    # on rank 0, remembering verdicts in the run folder (pipelines/screen_cache.py)
    builtin = d.format in ("digits_lt", "cifar10_lt", "cifar100_lt")  # images this engine wrote itself
    dist = dist or DistInfo()
    share = broadcast_from_main if dist.enabled else None
    (train, val, test), bad = screen_once((train, val, test), d, builtin, cfg.run.progress, run_dir, dist.rank, share)
    counts = class_counts(train)  # raises on an empty class
    return Data(train, val, test, counts, train.num_classes, notes, bad)


def _use_dali(cfg: Config, device_type: str) -> bool:
    from pipelines.dali import dali_available

    choice = cfg.data.loader
    if choice == "dali" and not dali_available():
        raise DataError("data.loader=dali but NVIDIA DALI cannot be imported; install nvidia-dali-cuda130 "
                        "or use data.loader=torchvision")
    return choice == "dali" or (choice == "auto" and device_type == "cuda" and dali_available())


def make_loaders(cfg: Config, data: Data, dist: DistInfo, device_type: str = "cpu", layout: str = "NCHW"):
    """Train / val / test loaders for this rank: the train sampler is sharded by rank
    (equal length on every rank), the eval splits by interleaved shards without padding."""
    d = cfg.data
    per_rank = cfg.optim.batch_size // dist.world_size
    sampler = build_sampler(
        d.sampler, data.train.labels, data.num_classes, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
        num_samples=d.sampler_epoch_length or None, total_epochs=cfg.epochs, samples_per_class=d.samples_per_class,
    )
    shards = [ShardSampler(len(s), dist.rank, dist.world_size) for s in (data.val, data.test)]

    if _use_dali(cfg, device_type):
        from pipelines.dali import DaliLoader

        common = dict(image_size=d.image_size, resize_size=d.resize_size or None, mean=d.mean, std=d.std,
                      hflip=d.hflip, train_crop=d.augment, crop_padding=d.crop_padding, layout=layout,
                      device_id=dist.local_rank if device_type == "cuda" else None,
                      num_threads=d.num_workers or 2, seed=cfg.seed + dist.rank)
        train = DaliLoader(data.train, per_rank, True, sampler=sampler, on_bad_image=d.on_bad_image,
                           max_bad_images=d.max_bad_images, checkpointing=True, **common)  # same outputs, resumable
        val, test = (DaliLoader(s, cfg.eval.batch_size, False, sampler=sh, **common)
                     for s, sh in zip((data.val, data.test), shards))
        return train, val, test

    train_tf, eval_tf = _transforms(cfg)
    workers = dict(num_workers=d.num_workers, pin_memory=device_type == "cuda", layout=layout)
    train = make_loader(data.train, train_tf, per_rank, train=True, sampler=sampler, on_bad_image=d.on_bad_image,
                        max_bad_images=d.max_bad_images, **workers)
    val, test = (make_loader(s, eval_tf, cfg.eval.batch_size, train=False, sampler=sh, **workers)
                 for s, sh in zip((data.val, data.test), shards))
    return train, val, test


def _transforms(cfg: Config):
    d = cfg.data
    if d.augment == "random_resized_crop":
        return (build_imagenet_transform(True, d.image_size, d.mean, d.std, d.resize_size or None, d.hflip),
                build_imagenet_transform(False, d.image_size, d.mean, d.std, d.resize_size or None))
    common = dict(image_size=d.image_size, mean=d.mean, std=d.std)
    return (build_transform(True, crop_padding=d.crop_padding, hflip=d.hflip, **common),
            build_transform(False, **common))


def train_features_loader(cfg: Config, data: Data, dist: DistInfo):
    """This rank's shard of the training split without augmentation (class feature means)."""
    _, eval_tf = _transforms(cfg)
    return make_loader(data.train, eval_tf, cfg.eval.batch_size, train=False, num_workers=cfg.data.num_workers,
                       sampler=ShardSampler(len(data.train), dist.rank, dist.world_size),
                       on_bad_image=cfg.data.on_bad_image, max_bad_images=cfg.data.max_bad_images)
