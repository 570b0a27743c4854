"""The one exception family of lt-engine: every error a user can cause derives from `EngineError`.

The command line maps an `EngineError` to one clear line on stderr and its `exit_code`
(2: bad input — config, data, checkpoint, calibration request; 1: training could not go on).
This module imports nothing, so every layer (pipelines/, kernels/, engine/, benchmarks/) can use it.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class: a problem the user can fix; the message says what was received and what was expected."""

    exit_code = 2


class ConfigError(EngineError, ValueError):
    """A config key, type or value that cannot be used; the message says which and why."""


class CheckpointError(EngineError, ValueError):
    """A checkpoint (or metrics file) that cannot be read or is not one of ours."""


class CalibrationError(EngineError, ValueError):
    """A calibration request that cannot be served (unknown method, bad parameter)."""


class StorageError(EngineError, OSError):
    """A file that cannot be written (disk full, read-only folder, no permission); names the path and errno."""

    exit_code = 1


class TrainingError(EngineError, RuntimeError):
    """Training cannot go on (non-finite loss, a run folder that is in the way)."""

    exit_code = 1
