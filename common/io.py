"""Atomic file writes (temp file next to the target + fsync + rename): a reader never sees half a file.

Files get the mode the user's umask gives (mkstemp alone would make them 0600, unreadable to colleagues),
and a write that fails for a reason outside the program (disk full, read-only folder, no permission) is a
`StorageError` naming the path and the errno (ENOSPC, EROFS, EACCES), with no temp file left behind.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from common.errors import ConfigError, StorageError


def storage_error(path: Path, exc: OSError) -> StorageError:
    cause = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    return StorageError(f"cannot write {path}: {exc.strerror or exc}{f' ({cause})' if cause else ''}")


def check_folder(path: str | Path, flag: str = "--out", expected: str = "a folder (existing or to be created)") -> Path:
    """An output folder named on the command line: it may exist (as a folder) or not yet; a file is refused."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is an existing file; expected {expected}")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, write: Callable[[Any], Any]) -> None:
    """Call `write(fileobj)` on a temp file next to `path`, then rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise storage_error(path, exc) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise storage_error(path, exc) from None
        if isinstance(exc.__context__, OSError) and exc.__context__.errno:  # torch.save wraps the OSError
            raise storage_error(path, exc.__context__) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent))
