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

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine.config import Config
from engine.distributed import DistInfo, broadcast_from_main
from pipelines.check import read_exclusions
from pipelines.digits_lt import build_digits_lt, default_cache_dir
from pipelines.formats import build_cifar_lt, read_image_folder, read_inat
from pipelines.loader import make_loader
from pipelines.samplers import ShardSampler, build_sampler
from pipelines.screen_cache import screen_once
from pipelines.spec import LoaderSpec
from pipelines.splits import DataError, SplitIndex, class_counts, image_path, parse_split, read_split


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


def _read_split_files(files: list[Path], root: Path, num_classes: int, outside: bool,
                      exclude: frozenset[str] | set[str]) -> tuple[SplitIndex, SplitIndex, SplitIndex]:
    """The train, val and test split files. data.num_classes=0 takes the classes from the training
    split (one more than its largest label); val and test must lie in them, and a training label above
    every val/test label is refused too: it would be a class that is never evaluated (a typo like `10`
    in a 10-class set), so it is an error naming its line, before any image is checked."""
    train = read_split(files[0], root, num_classes or None, outside, exclude)
    val, test = (read_split(f, root, train.num_classes, outside, exclude) for f in files[1:])
    top = int(max(val.labels.max(), test.labels.max()))
    if not num_classes and top + 1 < train.num_classes:
        line = next(x for x in parse_split(files[0])[0] if x.label > top and image_path(root, x.rel) not in exclude)
        names = ", ".join(dict.fromkeys(str(f) for f in files[1:]))
        raise DataError(f"{files[0]}:{line.lineno}: label {line.label} is above every label of {names} (0..{top}); "
                        f"expected a label in [0, {top}]: data.num_classes=0 infers the classes, and this one would "
                        "never be evaluated (fix the line or set data.num_classes)")
    return train, val, test


def load_data(cfg: Config, run_dir: Path | None = None, dist: DistInfo | None = None) -> Data:
    """Splits → indexes + class counts; every file and label is checked here, before training.
    The images of data.exclude_file are dropped as the splits are read, before any check.

    `run_dir`: the run folder, where rank 0 remembers the image screening's verdicts (screened.json)
    so that a restart checks only changed files. `dist`: under torch.distributed only rank 0 screens
    the images; the other ranks receive its verdicts."""
    d = cfg.data
    cache = Path(d.cache_dir) if d.cache_dir else default_cache_dir()
    notes: list[str] = []
    exclude = read_exclusions(d.exclude_file, d.root) if d.exclude_file else frozenset()
    if d.format == "digits_lt":
        s = build_digits_lt(cache, d.imbalance_ratio, d.imbalance_profile, cfg.seed, d.n_max,
                            d.val_per_class, d.test_per_class)
        train, val, test = (read_split(p, s.root, 10, exclude=exclude) for p in (s.train, s.val, s.test))
    elif d.format in ("cifar10_lt", "cifar100_lt"):
        s = build_cifar_lt(_user_root(d.root), cache, d.format.removesuffix("_lt"), d.imbalance_ratio,
                           d.imbalance_profile, cfg.seed)
        train = read_split(s.train, s.root, len(s.class_names), exclude=exclude)
        val = test = read_split(s.test, s.root, len(s.class_names), exclude=exclude)
        notes.append("CIFAR-LT has no validation split: val is the test split (as in the papers)")
    else:
        root = _user_root(d.root)
        files = [_resolve(root, s) for s in (d.train_split, d.val_split, d.test_split or d.val_split)]
        outside = d.allow_outside_root
        if d.format == "split_files":
            train, val, test = _read_split_files(files, root, d.num_classes, outside, exclude)
        elif d.format == "inat":
            train, ids = read_inat(files[0], root, allow_outside_root=outside, exclude=exclude)
            val, test = (read_inat(f, root, ids, outside, exclude)[0] for f in files[1:])
        else:  # image_folder
            train, names = read_image_folder(files[0], exclude=exclude)
            val, test = (read_image_folder(f, names, exclude=exclude)[0] for f in files[1:])
        if not d.test_split:
            notes.append("no data.test_split: the validation split is also the test split")
    # every val/test image decodes and every train image opens (pipelines/check.py), on rank 0,
    # remembering verdicts in the run folder (pipelines/screen_cache.py)
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


def loader_spec(cfg: Config, dist: DistInfo, device_type: str = "cpu", layout: str = "NCHW") -> LoaderSpec:
    """This rank's LoaderSpec (pipelines/spec.py) of the run: the training batch size per rank,
    data.* geometry, augmentation and bad-image policy, workers, the rank's seed, the device."""
    d = cfg.data
    return LoaderSpec(
        batch_size=cfg.optim.batch_size // dist.world_size, image_size=d.image_size, augment=d.augment,
        resize_size=d.resize_size or None, hflip=d.hflip, crop_padding=d.crop_padding, mean=tuple(d.mean),
        std=tuple(d.std), layout=layout, workers=d.num_workers, seed=cfg.seed + dist.rank,
        device_id=dist.local_rank if device_type == "cuda" else None, on_bad_image=d.on_bad_image,
        max_bad_images=d.max_bad_images,
    )


def make_loaders(cfg: Config, data: Data, dist: DistInfo, device_type: str = "cpu", layout: str = "NCHW"):
    """Train / val / test loaders for this rank, from one LoaderSpec: the train sampler is sharded by
    rank (equal length on every rank), the eval splits by interleaved shards without padding."""
    d = cfg.data
    spec = loader_spec(cfg, dist, device_type, layout)
    eval_spec = replace(spec, batch_size=cfg.eval.batch_size, on_bad_image="fail")  # val/test decoded in load_data
    sampler = build_sampler(
        d.sampler, data.train.labels, data.num_classes, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
        num_samples=d.sampler_epoch_length or None, total_epochs=cfg.epochs, samples_per_class=d.samples_per_class,
    )
    shards = [ShardSampler(len(s), dist.rank, dist.world_size) for s in (data.val, data.test)]
    if _use_dali(cfg, device_type):
        from pipelines.dali import DaliLoader

        train = DaliLoader(data.train, spec, True, sampler=sampler, checkpointing=True)  # same outputs, resumable
        val, test = (DaliLoader(s, eval_spec, False, sampler=sh) for s, sh in zip((data.val, data.test), shards))
        return train, val, test
    train = make_loader(data.train, spec, True, sampler=sampler)
    val, test = (make_loader(s, eval_spec, False, sampler=sh) for s, sh in zip((data.val, data.test), shards))
    return train, val, test


def train_features_loader(cfg: Config, data: Data, dist: DistInfo):
    """This rank's shard of the training split without augmentation (class feature means)."""
    spec = replace(loader_spec(cfg, dist), batch_size=cfg.eval.batch_size)
    return make_loader(data.train, spec, False, sampler=ShardSampler(len(data.train), dist.rank, dist.world_size))
