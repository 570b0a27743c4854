"""One writer per run folder: an advisory lock file held for the whole run.

`fcntl.flock` on `<run>/.lock` is released by the kernel when the process dies (SIGKILL included), so a
crashed run never leaves a stale lock; a second `engine train --resume` on the same folder fails at once
and names the holder's pid instead of interleaving its writes with the first one's.

A flock belongs to the open file, which a fork shares: DataLoader workers forked while the lock is held
would keep it after their parent is SIGKILLed, until they notice and exit, and a `--resume` started at
once would find the folder busy. Forked children therefore close their copy of the descriptor at once
(`os.register_at_fork`); that does not release the parent's lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder."""


_HELD: set[RunLock] = set()  # locks held by this process (held until released, referenced or not)


def _drop_in_child() -> None:
    """After a fork, in the child: close the inherited lock descriptors (never flock(LOCK_UN): that would
    release the parent's lock)."""
    for lock in list(_HELD):
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
            lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class RunLock:
    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(f"run folder {self.path.parent} is in use by another process (pid {holder}); "
                                "wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        _HELD.add(self)
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        _HELD.discard(self)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
