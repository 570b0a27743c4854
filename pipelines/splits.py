"""Split files in the ImageNet-LT / Places-LT format: one `relative/path label` per line.

`parse_split` is the one parser of the format. Every data set, the embedded Digits-LT
included, is read through `read_split`, which checks the parsed lines and yields one index
of (path, label); `engine data check` (pipelines/check.py) reports on the same parsed lines.
`class_counts` computes the training counts once, and they are passed on to samplers,
losses, metrics and reports.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import EngineError
from common.io import atomic_write_text

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class SplitLine:
    """One line of a split file that parses: its number (from 1), the image path as written, the label."""

    lineno: int
    rel: str
    label: int


@dataclass(frozen=True)
class BadLine:
    """One line of a split file that does not parse: its number, its text and what is wrong with it."""

    lineno: int
    text: str
    error: str

    def message(self, split_file: Path) -> str:
        return f"{split_file}:{self.lineno}: {self.error} (line {self.text!r})"


def parse_split(split_file: str | Path) -> tuple[list[SplitLine], list[BadLine]]:
    """Every line of a split file, UTF-8 `relative/path label`: the ones that parse and the ones that do not.

    Blank lines are skipped. This is the one parser of the format: `read_split` stops at the first
    bad line, `engine data check` (pipelines/check.py) lists them all.
    """
    split_file = Path(split_file)
    try:
        data = split_file.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read split file {split_file}: {exc.strerror}") from None
    lines: list[SplitLine] = []
    bad: list[BadLine] = []
    for lineno, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad.append(BadLine(lineno, raw.decode("utf-8", "replace"),
                               f"byte {raw[exc.start]:#04x} at column {exc.start + 1} is not UTF-8; expected UTF-8 text"))
            continue
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            bad.append(BadLine(lineno, line, "expected 'relative/path label'"))
            continue
        try:
            lines.append(SplitLine(lineno, parts[0], int(parts[1])))
        except ValueError:
            bad.append(BadLine(lineno, line, f"label {parts[1]!r} is not an integer"))
    return lines, bad


def image_path(root: Path, rel: str) -> str:
    """The normalized path of an image under `root`: how one image is recognized across lines, splits and
    exclusion files."""
    return os.path.normpath(os.path.join(root, rel))


def repeated_images(lines: list[SplitLine], root: Path) -> dict[str, list[SplitLine]]:
    """Images (normalized paths) listed on more than one line, with those lines in file order."""
    by_path: dict[str, list[SplitLine]] = {}
    for line in lines:
        by_path.setdefault(image_path(root, line.rel), []).append(line)
    return {path: found for path, found in by_path.items() if len(found) > 1}


def _warn_repeated(split_file: Path, lines: list[SplitLine], root: Path) -> None:
    repeated = repeated_images(lines, root)
    if not repeated:
        return
    extra = sum(len(found) - 1 for found in repeated.values())
    conflicting = sum(len({line.label for line in found}) > 1 for found in repeated.values())
    path, found = next(iter(repeated.items()))
    logger.warning("%s: %d duplicate lines (%d images listed more than once, %d of them with different labels; "
                   "e.g. %s on lines %s); every line is used as written (`engine data check` lists them)",
                   split_file, extra, len(repeated), conflicting, path, [line.lineno for line in found])


def read_split(
    split_file: str | Path,
    root: str | Path,
    num_classes: int | None = None,
    allow_outside_root: bool = False,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> SplitIndex:
    """Parse a split file; check every line, every label and that every image exists.

    `num_classes=None` takes one more than the largest label. Image paths are relative to `root`; a path
    that leaves `root` (`../x`, an absolute path elsewhere) is refused, naming the file, line and path,
    unless `allow_outside_root` (data.allow_outside_root). Images in `exclude` (normalized paths, as
    `image_path` and pipelines.check.read_exclusions give them) are dropped first, so an excluded image
    may be missing. Duplicate lines are a warning (logged), not an error.
    """
    split_file, root = Path(split_file), Path(root)
    if not root.is_dir():
        raise DataError(f"image root {root} does not exist or is not a folder")
    parsed, bad = parse_split(split_file)
    if bad:
        raise DataError(bad[0].message(split_file))
    lines = [line for line in parsed if image_path(root, line.rel) not in exclude]
    if not lines:
        excluded = f" ({len(parsed)} excluded by data.exclude_file)" if parsed else ""
        raise DataError(f"split file {split_file} lists no images{excluded}")
    for line in lines:
        if line.label < 0 or (num_classes is not None and line.label >= num_classes):
            upper = f"{num_classes - 1}" if num_classes is not None else "∞"
            raise DataError(f"{split_file}:{line.lineno}: label {line.label} is outside [0, {upper}] "
                            f"(line '{line.rel} {line.label}')")
        if not allow_outside_root and (escaped := outside_root(root, line.rel)) is not None:
            raise DataError(
                f"{split_file}:{line.lineno}: image path {line.rel!r} resolves to {escaped}, outside the image root "
                f"{root}; expected a path under the root (set data.allow_outside_root=true to allow it)"
            )
    _warn_repeated(split_file, lines, root)
    paths = [root / line.rel for line in lines]
    missing = [(line.lineno, p) for line, p in zip(lines, paths) if not p.is_file()]
    if missing:
        shown = ", ".join(f"{p} (line {n})" for n, p in missing[:5])
        raise DataError(f"{split_file}: {len(missing)} of {len(paths)} images are missing, e.g. {shown}")
    labels = np.asarray([line.label for line in lines], dtype=np.int64)
    return SplitIndex(split_file, paths, labels, num_classes or int(labels.max()) + 1)


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
