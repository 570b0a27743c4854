"""A run's durable status: `<run>/status.json`, written by rank 0, read by `engine status` and job scripts.

Launchers lose a rank's exit code (torchrun reports 1 whether its ranks exited 75 after a preemption
checkpoint or crashed), so the run folder says how the run ended. States:

    running    training started (pid, host: the rank-0 process)
    preempted  stopped by SIGTERM/SIGUSR1 after writing last.pt: epoch, step, steps (of that epoch)
    failed     stopped by an error: reason (one line)
    finished   trained and evaluated

Every write is atomic (common.io) and carries the time (UTC), pid and host. A `running` status whose
process is gone (no one holds the run folder's lock, engine/runlock.py) is a run that died without a
word (SIGKILL, out of memory, node lost).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from common.errors import ConfigError, EngineError
from common.io import write_json
from engine.preemption import PREEMPTED_EXIT_CODE
from engine.runlock import LOCK_NAME

STATUS_NAME = "status.json"
STATES = ("running", "preempted", "failed", "finished")
RUNNING_EXIT_CODE = 3  # `engine status` on a live run: not ended yet
RUN_FILES = (STATUS_NAME, "config.yaml", "last.pt", "train.log")  # any of these: a run folder of ours


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception as one line of at most `limit` characters (the `reason` of a failed status)."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, EngineError):  # the engine's own errors are already one clear sentence
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_status(folder: str | Path, state: str, **detail) -> dict:
    """Atomically replace `<folder>/status.json` with `state`, the time, pid, host and `detail`."""
    if state not in STATES:
        raise ValueError(f"run status {state!r}; expected one of {', '.join(STATES)}")
    status = {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid(),
              "host": socket.gethostname(), **detail}
    write_json(Path(folder) / STATUS_NAME, status)
    return status


def read_status(folder: str | Path) -> dict | None:
    """The run's status, or None when the folder has none; ValueError when status.json is not one of ours."""
    path = Path(folder) / STATUS_NAME
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read: {exc}") from None
    if not isinstance(status, dict) or status.get("state") not in STATES:
        raise ValueError(f"{path} holds no run state (expected state: {', '.join(STATES)})")
    return status


def lock_held(folder: str | Path) -> bool:
    """True when a live process holds the run folder's lock (a shared flock probe: the lock file is not changed)."""
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor drops the probe's own shared lock
    return False


def _where(status: dict) -> str:
    if status["state"] == "preempted":
        return (f" at epoch {status.get('epoch', '?')}, step {status.get('step', '?')} of {status.get('steps', '?')}; "
                "last.pt written, continue with --resume auto")
    if status["state"] == "finished" and status.get("top1") is not None:
        return f", test top-1 {status['top1']:.2f}"
    if status["state"] == "failed":
        return f": {status.get('reason', 'no reason recorded')}"
    return ""


def describe(folder: str | Path) -> tuple[int, str, dict | None]:
    """`engine status`: (exit code, one line, the status or None).

    Exit codes: 0 finished, 75 preempted (requeue, then `engine train --resume auto`), 1 failed, running
    but dead, missing or unreadable status; 3 running (a live process holds the folder); a path that is
    not a run folder raises ConfigError (exit 2)."""
    folder = Path(folder)
    if not folder.is_dir() or not any((folder / name).exists() for name in RUN_FILES):
        raise ConfigError(f"{folder} is not a run folder (expected a folder holding {STATUS_NAME} or "
                          f"config.yaml, as `engine train --out` writes)")
    try:
        status = read_status(folder)
    except ValueError as exc:
        return 1, f"unknown: {exc}", None
    alive = lock_held(folder)
    if status is None:
        if alive:
            return RUNNING_EXIT_CODE, f"running: {folder} is held by a live process that has not started training", None
        return 1, f"missing status: {folder} has no {STATUS_NAME} (a run that never started training, or one " \
                  "written before run status existed)", None
    stamp = f"({status.get('time', '?')}, pid {status.get('pid', '?')} on {status.get('host', '?')})"
    if alive:
        last = "" if status["state"] == "running" else f"; last recorded state {status['state']}"
        return RUNNING_EXIT_CODE, f"running {stamp}{last}", status
    if status["state"] == "running":
        return 1, f"running but dead: the status says running {stamp} but no process holds the run folder; " \
                  "it stopped without a word (killed, out of memory, node lost)", status
    code = {"finished": 0, "preempted": PREEMPTED_EXIT_CODE, "failed": 1}[status["state"]]
    return code, f"{status['state']} {stamp}{_where(status)}", status
