"""Checkpoints: atomic writes (common/io.py), safe and verified loads.

A load never runs code (`torch.load(weights_only=True)`), checks every stored CRC (a torch
checkpoint is a zip archive; torch itself does not verify the CRCs) and refuses non-finite
parameters or buffers, so a damaged checkpoint is a clear error, never a silently wrong model.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from common.errors import CheckpointError
from common.io import atomic_write_bytes

FORMAT = 1


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write_bytes(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    _verify_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's message advises retrying with weights_only=False, which would run the file's code: never shown.
        raise CheckpointError(f"cannot load checkpoint {path} safely: {_load_reason(exc)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{path} is not an lt-engine checkpoint (format {FORMAT} with a 'model' entry)")
    if "config" not in state or not isinstance(state["config"], dict):
        raise CheckpointError(f"{path} has no saved 'config' entry; it was not written by `engine train`")
    bad = nonfinite_tensors(state["model"])
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values in {len(bad)} tensor(s), e.g. "
                              f"{', '.join(bad[:3])}; use an earlier checkpoint")
    return state


def _load_reason(exc: Exception) -> str:
    """torch's load error without its advice to retry with weights_only=False (which would run the file's code)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kept = [line for line in lines if "weights_only" not in line and "documentation of torch.load" not in line]
    if lines and lines[0].startswith("Weights only load failed"):
        return "it holds objects a weights-only load refuses (" + (kept[0] if kept else "unsupported type") + ")"
    return "; ".join(kept) or type(exc).__name__


def _verify_archive(path: Path) -> None:
    """Check every member's CRC (torch's reader does not): a flipped byte is an error, not wrong weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: damaged or not a torch checkpoint ({exc})") from None
    if broken is not None:
        raise CheckpointError(f"cannot load checkpoint {path}: damaged (CRC mismatch in {broken})")


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of floating-point tensors holding NaN or ±inf (parameters and buffers, e.g. BN running_var)."""
    return [name for name, t in tensors.items()
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def all_finite(tensors) -> bool:
    """Whether every floating-point tensor holds only finite values: one host sync for all of them
    (the check before a checkpoint is written; `nonfinite_tensors` names the culprits)."""
    flags = [torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def check_fits(model: torch.nn.Module, saved: dict, path: Path, what: str) -> None:
    """A clear error, instead of load_state_dict's size-mismatch traceback, when a checkpoint's tensors do not
    fit the model built from its config and the data found now (`what`: the command, for the message)."""
    own = model.state_dict()
    for name, tensor in saved.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{what}: {path} does not fit this run's model: {name} has shape "
                                  f"{tuple(tensor.shape)} there, {tuple(own[name].shape)} here (the training split "
                                  "now has a different number of classes, or the model changed)")
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    if missing or unexpected:
        raise CheckpointError(f"{what}: {path} does not fit this run's model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
