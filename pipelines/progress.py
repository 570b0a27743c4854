"""Progress display: a tqdm bar on a terminal, a plain line every LINE_INTERVAL_S seconds otherwise.

A batch job's output goes to a file or a pipe (`engine train > train.log 2>&1`, Slurm's
`--output`), where tqdm's carriage-return frames pile up into one enormous line. There
`progress_bar` returns a `LineProgress` instead: the same calls as a tqdm bar (iteration,
`update`, `set_postfix`, `close`, `with`), and every LINE_INTERVAL_S seconds one line

    epoch 1/90: 1200/5004 it (24%), 3.1 it/s, ETA 0:20:27, loss=1.234, img_s=397

(the unit, rate and ETA from the counts; the postfix as the caller last set it). A job that
ran for at least one interval ends with a last line at `close`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TextIO

LINE_INTERVAL_S = 30.0  # seconds between two progress lines when the output is not a terminal


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LineProgress:
    """A tqdm look-alike for files and pipes: one plain progress line every `interval` seconds on `file`."""

    def __init__(self, iterable: Iterable | None = None, desc: str = "", total: int | None = None, initial: int = 0,
                 unit: str = "it", disable: bool = False, file: TextIO | None = None,
                 interval: float | None = None) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.n = self.initial = initial
        self.disable, self.file = disable, file
        self.interval = LINE_INTERVAL_S if interval is None else interval
        self.postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._lines = 0

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self._last >= self.interval:
            self._last = now
            self._write(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        """A last line for a job long enough to have written one already."""
        if not self.disable and self._lines and self.n != self.initial:
            self._write(time.monotonic())
            self._lines = 0

    def line(self, now: float) -> str:
        """`desc: n/total unit (pct%), rate unit/s, ETA h:mm:ss, key=value...` (the parts that are known)."""
        done, elapsed = self.n - self.initial, max(now - self._start, 1e-9)
        rate = done / elapsed
        parts = [f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total
                 else f"{self.n} {self.unit}", f"{rate:.3g} {self.unit}/s"]
        if self.total and rate > 0:
            parts.append(f"ETA {_clock(max(self.total - self.n, 0) / rate)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _write(self, now: float) -> None:
        file = self.file or sys.stderr
        file.write(self.line(now) + "\n")
        file.flush()
        self._lines += 1


def progress_bar(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None, initial: int = 0,
                 unit: str = "it", disable: bool = False, leave: bool = False, file: TextIO | None = None):
    """A tqdm bar when `file` (default sys.stderr) is a terminal, else a `LineProgress` with the same calls."""
    stream = file or sys.stderr
    if _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, disable=disable, leave=leave,
                    file=stream)
    return LineProgress(iterable, desc, total, initial, unit, disable, stream)
