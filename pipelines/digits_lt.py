"""Digits-LT: the embedded default data set, real images made long-tailed.

scikit-learn ships the UCI handwritten digits (1,797 real 8×8 grayscale
images, 10 classes, ~180 per class). We write them once to a cache folder as
PNG files, hold out balanced validation and test sets per class, and keep
n_i training images of class i following the CIFAR-LT profile
(pipelines/long_tail.py). The result is three split files in the ImageNet-LT
format, read back through the same `read_split` a user's ImageNet-LT goes
through.

Layout under the cache folder:
    digits/images/<label>/<index>.png
    digits/splits/seed<S>_val.txt, seed<S>_test.txt
    digits/splits/seed<S>_train_<profile>_if<IF>_nmax<N>.txt
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.long_tail import long_tailed_counts
from pipelines.splits import DataError, write_split

NUM_CLASSES = 10


def default_cache_dir() -> Path:
    return Path(os.environ.get("LT_ENGINE_CACHE", Path.home() / ".cache" / "lt-engine"))


@dataclass(frozen=True)
class DigitsLTSplits:
    root: Path  # image root: split paths are relative to it
    train: Path
    val: Path
    test: Path


def _write_images(image_dir: Path) -> None:
    """Write all 1,797 digits as 8-bit PNGs, once; atomic via a temp folder + rename."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if image_dir.is_dir():
        return
    image_dir.parent.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    tmp = Path(tempfile.mkdtemp(prefix=".images-", dir=image_dir.parent))
    try:
        for i, (img, label) in enumerate(zip(digits.images, digits.target)):
            pixels = np.round(img * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 → 0..255
            (tmp / str(label)).mkdir(exist_ok=True)
            Image.fromarray(pixels, mode="L").save(tmp / str(label) / f"{i:04d}.png")
        try:
            tmp.rename(image_dir)
        except OSError:  # another process finished first
            if not image_dir.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_digits_lt(
    cache_dir: str | Path | None = None,
    imbalance_ratio: float = 50.0,
    profile: str = "exp",
    seed: int = 0,
    n_max: int = 100,
    val_per_class: int = 20,
    test_per_class: int = 50,
) -> DigitsLTSplits:
    """Write (or reuse) Digits-LT's images and split files; return where they are."""
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    root = base / "digits"
    image_dir = root / "images"
    try:
        _write_images(image_dir)
        (root / "splits").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot write Digits-LT to cache folder {root}: {exc}") from None

    counts = long_tailed_counts(NUM_CLASSES, n_max, imbalance_ratio, profile)
    rng = np.random.default_rng(seed)
    train_rows, val_rows, test_rows = [], [], []
    for label in range(NUM_CLASSES):
        files = sorted((image_dir / str(label)).glob("*.png"))
        need = val_per_class + test_per_class + counts[label]
        if len(files) < need:
            raise DataError(
                f"class {label} of Digits-LT has {len(files)} images; val {val_per_class} + test "
                f"{test_per_class} + train {counts[label]} = {need} requested (lower data.n_max or the held-out sizes)"
            )
        order = rng.permutation(len(files))
        rel = [f"images/{label}/{files[i].name}" for i in order]
        val_rows += [(r, label) for r in rel[:val_per_class]]
        test_rows += [(r, label) for r in rel[val_per_class : val_per_class + test_per_class]]
        pool = rel[val_per_class + test_per_class :]
        train_rows += [(r, label) for r in pool[: counts[label]]]

    tag = f"seed{seed}"
    held = f"v{val_per_class}t{test_per_class}"
    splits = DigitsLTSplits(
        root=root,
        train=root / "splits" / f"{tag}_{held}_train_{profile}_if{imbalance_ratio:g}_nmax{n_max}.txt",
        val=root / "splits" / f"{tag}_{held}_val.txt",
        test=root / "splits" / f"{tag}_{held}_test.txt",
    )
    for path, rows in ((splits.train, train_rows), (splits.val, val_rows), (splits.test, test_rows)):
        write_split(path, rows)
    return splits
