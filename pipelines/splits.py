"""Split files in the ImageNet-LT / Places-LT format: one `relative/path label` per line.

Every data set, the embedded Digits-LT included, is read through `read_split`,
which yields one index of (path, label); `class_counts` computes the training
counts once, and they are passed on to samplers, losses, metrics and reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import EngineError
from common.io import atomic_write_text


class DataError(EngineError, ValueError):
    """Bad input data: the message names the file (and line) and what was expected."""


@dataclass(frozen=True)
class SplitIndex:
    split_file: Path
    paths: list[Path]  # absolute image paths
    labels: np.ndarray  # int64, in [0, num_classes)
    num_classes: int

    def __len__(self) -> int:
        return len(self.paths)


def outside_root(root: Path, rel: str) -> Path | None:
    """The image path of a split line, normalized, when it leaves `root`; None when it stays inside.

    The check is lexical (`..` and absolute paths resolved against the root's real path, as
    os.path.normpath does): the split file is the untrusted input, the root folder is the
    user's own, so symbolic links the user placed inside the root are followed without question.
    """
    base = os.path.realpath(root)
    full = os.path.normpath(os.path.join(base, rel))
    return None if full == base or full.startswith(base.rstrip(os.sep) + os.sep) else Path(full)


def read_split(
    split_file: str | Path, root: str | Path, num_classes: int | None = None, allow_outside_root: bool = False
) -> SplitIndex:
    """Parse a split file; check every line, every label and that every image exists.

    `num_classes=None` takes one more than the largest label. Image paths are
    relative to `root`; a path that leaves `root` (`../x`, an absolute path elsewhere) is
    refused, naming the file, line and path, unless `allow_outside_root` (data.allow_outside_root).
    """
    split_file, root = Path(split_file), Path(root)
    if not root.is_dir():
        raise DataError(f"image root {root} does not exist or is not a folder")
    try:
        text = split_file.read_text()
    except OSError as exc:
        raise DataError(f"cannot read split file {split_file}: {exc.strerror}") from None
    paths: list[Path] = []
    labels: list[int] = []
    linenos: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{split_file}:{lineno}: expected 'relative/path label', got {line!r}")
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{split_file}:{lineno}: label {label_text!r} is not an integer (line {line!r})") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            upper = f"{num_classes - 1}" if num_classes is not None else "∞"
            raise DataError(f"{split_file}:{lineno}: label {label} is outside [0, {upper}] (line {line!r})")
        if not allow_outside_root and (escaped := outside_root(root, rel)) is not None:
            raise DataError(
                f"{split_file}:{lineno}: image path {rel!r} resolves to {escaped}, outside the image root {root}; "
                "expected a path under the root (set data.allow_outside_root=true to allow it)"
            )
        paths.append(root / rel)
        labels.append(label)
        linenos.append(lineno)
    if not paths:
        raise DataError(f"split file {split_file} lists no images")
    missing = [(n, p) for n, p in zip(linenos, paths) if not p.is_file()]
    if missing:
        shown = ", ".join(f"{p} (line {n})" for n, p in missing[:5])
        raise DataError(f"{split_file}: {len(missing)} of {len(paths)} images are missing, e.g. {shown}")
    inferred = max(labels) + 1
    return SplitIndex(split_file, paths, np.asarray(labels, dtype=np.int64), num_classes or inferred)


class SameClassOrder:
    """Replacement candidates for a bad image: the other images of its class, in index order
    starting after it (cyclically). A deterministic choice shared by both loaders."""

    def __init__(self, index: SplitIndex) -> None:
        self.labels = index.labels
        self.members: list[list[int]] = [[] for _ in range(index.num_classes)]
        for j, label in enumerate(index.labels.tolist()):
            self.members[label].append(j)

    def __call__(self, i: int) -> list[int]:
        members = self.members[int(self.labels[i])]
        k = members.index(i)
        return members[k + 1 :] + members[:k]


def class_counts(index: SplitIndex, require_all: bool = True) -> np.ndarray:
    """Images per class (int64, length num_classes); an empty class is an error by default."""
    counts = np.bincount(index.labels, minlength=index.num_classes)
    empty = np.flatnonzero(counts == 0)
    if require_all and len(empty):
        raise DataError(
            f"{index.split_file}: {len(empty)} of {index.num_classes} classes have no images "
            f"(classes {empty[:10].tolist()}{' …' if len(empty) > 10 else ''}); every class needs at least one"
        )
    return counts


def write_split(path: Path, rows: list[tuple[str, int]]) -> None:
    """Write a split file atomically (common.io: temp file + fsync + rename)."""
    atomic_write_text(path, "".join(f"{rel} {label}\n" for rel, label in rows))
