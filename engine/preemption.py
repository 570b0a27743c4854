"""Preemption: SIGTERM / SIGUSR1 ask the run to stop at the next step boundary.

Schedulers announce preemption with a signal (Slurm: SIGTERM, or `--signal=USR1@90` some seconds before
the kill; Kubernetes and most clouds: SIGTERM, then SIGKILL after a grace period). The handler only sets a
flag; the training loop finishes the step it is in, writes an atomic checkpoint, and the process exits
with `PREEMPTED_EXIT_CODE`, which a job script turns into a requeue (docs/launch.md). `--resume auto`
then continues from that checkpoint.

Under DDP every rank receives the signal from the launcher, but not at the same step (or only some
ranks receive it): the flag travels in the all-reduce the loop already makes every `run.log_every`
steps to read the loss (engine.meter.LossMeter.read: five float64 numbers, no extra collective), so all
ranks stop at the same step boundary, at most `run.log_every` steps after the signal. A single process
checks the flag after every step (a host bool: free).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure; try again later"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

logger = logging.getLogger(__name__)


class StopRequest:
    """Set by a signal handler, read by the training loop at step boundaries."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""


class Preempted(Exception):
    """The run stopped on a signal after writing its checkpoint; the CLI exits with PREEMPTED_EXIT_CODE."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, message: str, where: dict | None = None) -> None:
        super().__init__(message)
        self.where = where or {}  # {"epoch", "step", "steps"}: where the run stopped, for its status file


def preempted(stop: StopRequest, epoch: int, position: int, steps_per_epoch: int, checkpoint: Path) -> Preempted:
    """The `Preempted` to raise once `checkpoint` is written at step `position` of 0-based epoch `epoch`
    (position 0: the end of the epoch before it); the message is logged as a warning too."""
    where = f"epoch {epoch + 1}, step {position} of {steps_per_epoch}" if position else f"the end of epoch {epoch}"
    message = (f"stopped by {stop.name or 'a signal on another rank'} at {where}; checkpoint {checkpoint} "
               f"written; continue with --resume auto (exit code {Preempted.exit_code})")
    logger.warning("%s", message)
    return Preempted(message, {"epoch": epoch + 1 if position else epoch, "step": position or steps_per_epoch,
                               "steps": steps_per_epoch})


@contextlib.contextmanager
def stop_on_signals(signals=SIGNALS) -> Iterator[StopRequest]:
    """Install flag-setting handlers for `signals` (main thread only) and restore the old ones afterwards."""
    request = StopRequest()
    previous = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, request._handle)
    except ValueError:  # not the main thread (e.g. a test runner's worker thread): no handlers, never set
        pass
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
