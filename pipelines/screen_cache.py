"""Screen the images once per change, not once per start: verdicts remembered in the run folder.

`screen_splits` (pipelines/check.py) opens every train image and decodes every val/test image
before step 1. `ScreenCache` remembers each verdict (good, or bad with its reason) keyed by the
file's absolute path, size and mtime_ns and the check level (open or decode) in `RUN/screened.json`,
so a restart checks again only the files that are new, resized or touched, and the files it could
not stat (missing ones). Each file is stat'ed before it is checked: a file changed while it is
checked gets a new stat next time, so its verdict is not reused.

The file is plain JSON (never pickle), per level columns of equal length under a common folder:
    {"format": FORMAT, "root": "/data",
     "open": {"paths": ["train/a.jpg", ...], "size": [...], "mtime_ns": [...], "bad": {"<row>": "reason"}},
     "decode": {...}}
A file that does not parse or has the wrong shape is ignored with a warning (every image is
checked again); the file is written atomically.

`screen_once` is the entry point `load_data` calls: rank 0 screens with the cache; under
torch.distributed its verdicts reach the other ranks through `share`, and those ranks replay
them (`KnownVerdicts`) without opening or stat'ing any image.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from common.io import atomic_write_bytes
from pipelines.check import find_bad_images, screen_splits
from pipelines.splits import DataError, SplitIndex

logger = logging.getLogger(__name__)

CACHE_NAME = "screened.json"
FORMAT = "lt-engine screened images v1"
LEVELS = ("open", "decode")  # header read (train), full decode (val/test)

Verdicts = dict[str, tuple[int, int, "str | None"]]  # absolute path → (size, mtime_ns, reason or None)


def _key(path: str | Path) -> str:
    """The cache key of an image: its absolute path (a relative one joined to the working folder)."""
    text = os.fspath(path)
    return text if os.path.isabs(text) else os.path.abspath(text)


def _stat_all(keys: list[str]) -> list[tuple[int, int] | None]:
    out: list[tuple[int, int] | None] = []
    for key in keys:
        try:
            st = os.stat(key)
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:  # missing (or no permission): checked, never remembered
            out.append(None)
    return out


def _stats(keys: list[str], jobs: int | None) -> list[tuple[int, int] | None]:
    """(size, mtime_ns) of every file, None where it cannot be stat'ed; in `jobs` threads, one slice each
    (a network file system answers many stats at once)."""
    n = max(1, jobs or min(8, os.cpu_count() or 1))
    step = max(1, -(-len(keys) // n))
    with ThreadPoolExecutor(max_workers=n) as pool:
        return [st for part in pool.map(_stat_all, [keys[i:i + step] for i in range(0, len(keys), step)])
                for st in part]


def _level(decode: bool) -> int:
    return 1 if decode else 0


class ScreenCache:
    """Verdicts of earlier starts (`old`) and of this one (`new`), one dict per level (open, decode);
    `find_bad` is `find_bad_images` that checks only the files whose (size, mtime_ns) at this level
    are not remembered."""

    def __init__(self, path: Path | None, old: tuple[Verdicts, Verdicts] | None = None):
        self.path = path
        self.old = old or ({}, {})
        self.new: tuple[Verdicts, Verdicts] = ({}, {})
        # (path as the split gives it, level) → reason: this start's bad verdicts, missing files included;
        # the split's own path text, the same on every rank (an absolute path may differ between nodes' folders)
        self.bad: dict[tuple[str, int], str] = {}
        self.checked = self.remembered = 0

    @classmethod
    def load(cls, path: str | Path) -> ScreenCache:
        """The cache at `path`; empty when there is none, and empty with a warning when it cannot be used."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            logger.warning("ignoring the screening cache %s (%s); every image is checked again", path,
                           exc.strerror or exc)
            return cls(path)
        try:
            return cls(path, _parse(json.loads(raw)))
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            logger.warning("ignoring the screening cache %s: %s; every image is checked again", path, exc)
            return cls(path)

    def find_bad(self, paths: list[Path], decode: bool = True, jobs: int | None = None, desc: str = "checking images",
                 progress: bool = True) -> list[tuple[int, str]]:
        """(position in `paths`, reason) of every bad image, as `find_bad_images` returns them."""
        level = _level(decode)
        old, new = self.old[level], self.new[level]
        keys = [_key(p) for p in paths]
        stats = _stats(keys, jobs)
        reasons: list[str | None] = []
        todo: list[int] = []
        for i, (key, stat) in enumerate(zip(keys, stats)):
            verdict = old.get(key)
            if verdict is not None and verdict[:2] == stat:
                reasons.append(verdict[2])
            else:
                reasons.append(None)
                todo.append(i)
        for j, reason in find_bad_images([paths[i] for i in todo], decode, jobs, desc, progress) if todo else ():
            reasons[todo[j]] = reason
        self.checked += len(todo)
        self.remembered += len(paths) - len(todo)
        for path, key, st, reason in zip(paths, keys, stats, reasons):
            if st is not None:
                new[key] = (*st, reason)
            if reason is not None:
                self.bad[os.fspath(path), level] = reason
        return [(i, r) for i, r in enumerate(reasons) if r is not None]

    def save(self, complete: bool) -> None:
        """Write this start's verdicts (plus, when the screening stopped early (`complete` false), the
        earlier ones it did not reach) atomically; nothing is written when nothing changed.
        A cache that cannot be written is a warning: the run does not depend on it."""
        if self.path is None:
            return
        rows = self.new if complete else tuple({**o, **n} for o, n in zip(self.old, self.new))
        if rows == self.old:
            return
        try:
            atomic_write_bytes(self.path, lambda f: f.write(json.dumps(_columns(rows)).encode()))
        except OSError as exc:  # StorageError is an OSError
            logger.warning("cannot write the screening cache: %s; the next start checks every image again", exc)


def _columns(rows: tuple[Verdicts, Verdicts]) -> dict[str, Any]:
    """The JSON form of `rows`: paths under their common folder, one list per field and level."""
    keys = [k for verdicts in rows for k in verdicts]
    root = os.path.commonpath([os.path.dirname(k) for k in keys]) if keys else ""
    cut = len(root.rstrip(os.sep)) + 1

    def level(verdicts: Verdicts) -> dict[str, Any]:
        values = list(verdicts.values())
        return {"paths": [k[cut:] for k in verdicts], "size": [v[0] for v in values],
                "mtime_ns": [v[1] for v in values],
                "bad": {str(i): v[2] for i, v in enumerate(values) if v[2] is not None}}

    return {"format": FORMAT, "root": root, **{name: level(v) for name, v in zip(LEVELS, rows)}}


def _parse(doc: Any) -> tuple[Verdicts, Verdicts]:
    """`_columns`'s inverse; ValueError / TypeError naming the first thing that is not as written."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"expected a JSON object with format {FORMAT!r}")
    if not isinstance(doc["root"], str):
        raise TypeError(f"root {doc['root']!r}: expected a string")
    prefix = doc["root"].rstrip(os.sep) + os.sep
    return tuple(_parse_level(doc[name], name, prefix) for name in LEVELS)


def _parse_level(block: Any, name: str, prefix: str) -> Verdicts:
    paths, sizes, mtimes, bad = (block[k] for k in ("paths", "size", "mtime_ns", "bad"))
    columns = (paths, sizes, mtimes)
    if not all(isinstance(c, list) for c in columns) or not isinstance(bad, dict):
        raise TypeError(f"{name}: expected paths/size/mtime_ns lists and bad an object")
    if len({len(c) for c in columns}) != 1:
        raise ValueError(f"{name}: columns of different lengths {[len(c) for c in columns]}")
    if not (all(type(p) is str for p in paths) and all(type(x) is int and x >= 0 for x in sizes)
            and all(type(x) is int for x in mtimes)):
        raise TypeError(f"{name}: expected string paths and integer sizes and mtimes")
    reasons: list[str | None] = [None] * len(paths)
    for row, reason in bad.items():
        if not (row.isdigit() and int(row) < len(paths) and isinstance(reason, str)):
            raise ValueError(f"{name}: bad entry {row!r}: expected a row number below {len(paths)} and a reason")
        reasons[int(row)] = reason
    return dict(zip([prefix + p for p in paths], zip(sizes, mtimes, reasons)))


class KnownVerdicts:
    """`find_bad` answered from verdicts screened elsewhere (rank 0's `ScreenCache.bad`: (path as the split
    gives it, level) → reason); no image is opened or stat'ed."""

    def __init__(self, bad: dict[tuple[str, int], str]):
        self.bad = bad

    def find_bad(self, paths: list[Path], decode: bool = True, jobs: int | None = None, desc: str = "",
                 progress: bool = False) -> list[tuple[int, str]]:
        level = _level(decode)
        found = ((i, self.bad.get((os.fspath(p), level))) for i, p in enumerate(paths))
        return [(i, r) for i, r in found if r is not None]


def screen_once(
    splits: tuple[SplitIndex, ...],
    data_cfg,
    builtin: bool,
    progress: bool,
    run_dir: str | Path | None = None,
    rank: int = 0,
    share: Callable[[Any], Any] | None = None,
) -> tuple[tuple[SplitIndex, ...], list[tuple[str, str]]]:
    """`screen_splits` once for all ranks, remembering verdicts in `run_dir/screened.json` (no cache without
    `run_dir`). `share(obj)` is called on every rank and returns rank 0's `obj` (None: one process).

    Rank 0 screens and shares (its error message or None, its bad verdicts); the other ranks raise the
    same error or apply the same verdicts. Only rank 0 reads or writes the cache.
    """
    if rank != 0:
        if share is None:
            raise ValueError(f"screen_once: rank {rank} needs `share` to receive rank 0's verdicts")
        error, bad = share(None)
        if error is not None:
            raise DataError(error)
        return screen_splits(splits, data_cfg, builtin, False, cache=KnownVerdicts(dict(bad)))
    start = time.perf_counter()
    cache = ScreenCache.load(Path(run_dir) / CACHE_NAME) if run_dir is not None else ScreenCache(None)
    result, error = None, None
    try:
        result = screen_splits(splits, data_cfg, builtin, progress, cache=cache)
    except Exception as exc:  # DataError mostly; any failure must reach the waiting ranks
        error = exc
    if share is not None:
        share((None if error is None else str(error), list(cache.bad.items())))
    cache.save(complete=error is None)
    if cache.checked or cache.remembered:
        logger.info("screened %d images in %.1f s: %d checked, %d remembered%s", cache.checked + cache.remembered,
                    time.perf_counter() - start, cache.checked, cache.remembered,
                    f" ({cache.path})" if cache.path else "")
    if error is not None:
        raise error
    return result
