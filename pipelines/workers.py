"""Loader worker processes leave the stop signals to the main process.

Cluster schedulers stop a job by signalling its whole process group (Slurm's scancel and
preemption, Kubernetes, `kill -TERM -PGID`), so a DataLoader worker receives the same
SIGTERM / SIGUSR1 as the training process, and Ctrl-C sends SIGINT to every process of the
terminal's foreground group. A worker that dies of it makes the main process fail
("DataLoader worker ... is killed by signal") before its handler (engine/preemption.py)
reaches the step boundary and writes its checkpoint. `ignore_stop_signals` runs first in
each worker, so the signal is acted on by the main process alone.

A worker still exits with its main process:
- the loader shuts its workers down (the DataLoader's shutdown sentinel) when an epoch's iteration
  fails or is abandoned (pipelines/loader.py `ImageLoader.__iter__`), and at the end of the run;
- at interpreter exit, `end_workers` SIGKILLs any worker still alive: multiprocessing's own exit
  hook ends daemonic children with SIGTERM and then waits for them, which a worker that ignores
  SIGTERM would never answer (a failed run would hang instead of exiting);
- a worker whose parent has died (SIGKILL, no sentinel) notices within seconds (torch's worker
  watchdog compares `os.getppid()` with the parent's pid) and exits.
"""

from __future__ import annotations

import atexit
import os
import signal
import weakref

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_WORKERS: weakref.WeakSet = weakref.WeakSet()  # this process's live loader workers (multiprocessing.Process)


def track_workers(processes) -> None:
    """Remember loader worker processes so that `end_workers` can end them at exit."""
    _WORKERS.update(processes)


@atexit.register  # registered after multiprocessing's exit hook (imported before this module), so it runs first
def end_workers() -> None:
    """SIGKILL every tracked worker still alive (they ignore SIGTERM; they only read images)."""
    for process in list(_WORKERS):
        if process.pid is not None and process.is_alive():
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.join(timeout=5)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Ignore SIGTERM, SIGINT and SIGUSR1 in this process (a loader worker). Usable as a
    DataLoader `worker_init_fn` (it takes the worker id) or a pool `initializer`."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
