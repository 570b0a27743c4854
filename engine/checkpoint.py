"""Checkpoints: atomic writes (engine/io.py), safe loads (weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import CheckpointError
from engine.io import atomic_write_bytes

FORMAT = 1


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write_bytes(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{path} is not an lt-engine checkpoint (format {FORMAT} with a 'model' entry)")
    return state
