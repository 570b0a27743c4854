"""Loader worker processes leave the stop signals to the main process.

Cluster schedulers stop a job by signalling its whole process group (Slurm's scancel and
preemption, Kubernetes, `kill -TERM -PGID`), so a DataLoader worker receives the same
SIGTERM / SIGUSR1 as the training process, and Ctrl-C sends SIGINT to every process of the
terminal's foreground group. A worker that dies of it makes the main process fail
("DataLoader worker ... is killed by signal") before its handler (engine/preemption.py)
reaches the step boundary and writes its checkpoint. `ignore_stop_signals` runs first in
each worker, so the signal is acted on by the main process alone.

A worker still exits with its main process: the DataLoader sends each worker its shutdown
sentinel when the iterator is closed or collected, and a worker whose parent has died
(SIGKILL, no sentinel) notices within seconds (torch's worker watchdog compares
`os.getppid()` with the parent's pid) and exits. SIGKILL still ends a worker at once.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Ignore SIGTERM, SIGINT and SIGUSR1 in this process (a loader worker). Usable as a
    DataLoader `worker_init_fn` (it takes the worker id) or a pool `initializer`."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
