"""Logging, set up once (as timm's `setup_default_logging`): one console handler on the root
logger, a rank filter so that only rank 0 speaks under torchrun, and a `train.log` per run folder.

Library modules only do `logger = logging.getLogger(__name__)`; `print` is kept for a command's
actual output (tables, JSON). Console lines go through `tqdm.write`, so they never tear a progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def launch_rank() -> int:
    """This process's rank as torchrun set it (RANK); a plain process is rank 0."""
    return int(os.environ.get("RANK", "0"))


class RankZeroFilter(logging.Filter):
    """Pass records on rank 0 only (RANK from torchrun's environment; a plain process is rank 0)."""

    def __init__(self, rank: int | None = None) -> None:
        super().__init__()
        self.rank = launch_rank() if rank is None else rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0


class _TqdmHandler(logging.Handler):
    """Writes to the current sys.stderr (looked up per record) through tqdm.write."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(level: int = logging.INFO, rank: int | None = None) -> None:
    """Console logging for a command (idempotent): `message` lines on stderr, rank 0 only."""
    root = logging.getLogger()
    if any(getattr(h, "_lt_engine", False) for h in root.handlers):
        return
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RankZeroFilter(rank))
    handler.setLevel(level)
    handler._lt_engine = True
    root.addHandler(handler)
    root.setLevel(min(root.level, level))


@contextlib.contextmanager
def log_to_file(path: str | Path, rank: int | None = None) -> Iterator[None]:
    """Also write every `engine.*` record (DEBUG and up, timestamped) to `path` while the block runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RankZeroFilter(rank))
    handler.setLevel(logging.DEBUG)
    logger = logging.getLogger("engine")
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        handler.close()
