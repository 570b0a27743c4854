"""A trained run, loaded back: checkpoint → config → data (re-read and re-checked) → model.

`load_run(checkpoint)` returns a `LoadedRun`; `split_features(loaded, splits)` runs the backbone
once per split so that every post-hoc variant of the head (engine/posthoc.py) re-uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from common.errors import CheckpointError, ConfigError
from engine.checkpoint import check_fits, load_checkpoint
from engine.config import Config, changeable_keys, config_from_dict, eval_changes, with_current_keys
from engine.data import Data, load_data, make_loaders, train_features_loader
from engine.device import resolve_device
from engine.distributed import DistInfo
from engine.evaluate import Features, collect_features, reporter
from engine.models import Classifier, build_model

EVAL_SPLITS = ("val", "test")


@dataclass
class LoadedRun:
    checkpoint: Path
    state: dict  # the checkpoint as saved (epoch, history, optimizer, …)
    cfg: Config
    data: Data
    model: Classifier  # in eval mode, on `device`
    device: torch.device

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent

    def report(self, logits: torch.Tensor, labels: torch.Tensor) -> dict:
        """`accuracy_report` with this run's class counts and shot thresholds."""
        return reporter(self.cfg, self.data.class_counts)(logits, labels)


def load_run(checkpoint: str | Path, overrides: Sequence[str] = ()) -> LoadedRun:
    """Checkpoint → LoadedRun; the data are re-read and their class counts checked against training's.

    `overrides` (dotted key=value, as `engine train` takes them) apply on top of the saved config: keys
    that do not change the model or what it was trained on (a moved data.root, data.num_workers,
    eval.batch_size, run.device, …: the keys declared with eval=True or resume=True in engine/config.py);
    others are refused."""
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    saved = _with_current_keys(state["config"])
    try:
        cfg = config_from_dict(saved)
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint}: its saved config is not valid here: {exc}") from None
    if overrides:
        cfg = _with_overrides(saved, overrides, checkpoint)
    if not isinstance(state.get("class_counts"), list):
        raise CheckpointError(f"{checkpoint} has no saved 'class_counts' entry; it was not written by `engine train`")
    data = load_data(cfg)
    if data.class_counts.tolist() != state["class_counts"]:
        raise CheckpointError(
            f"{checkpoint}: training class counts {state['class_counts']} differ from the data found now "
            f"{data.class_counts.tolist()}; the split files changed since training"
        )
    device = resolve_device(cfg.run.device)
    model = build_model(cfg, data.class_counts).to(device)
    check_fits(model, state["model"], checkpoint, "load")
    model.load_state_dict(state["model"])
    model.eval()
    return LoadedRun(checkpoint, state, cfg, data, model, device)


def _with_overrides(saved: dict, overrides: Sequence[str], checkpoint: Path) -> Config:
    """The checkpoint's config with `overrides` applied; refuses a key that would change the model."""
    cfg = config_from_dict(saved, overrides)  # unknown keys and bad values: ConfigError naming the key
    _, refused = eval_changes(with_current_keys(saved), cfg)
    if refused:
        raise ConfigError(
            f"{checkpoint}: override(s) of {', '.join(refused)} would change the trained model or its data; "
            f"a checkpoint is evaluated with its own config, changing only: "
            f"{', '.join(changeable_keys('eval'))}")
    return cfg


def _with_current_keys(saved: dict) -> dict:
    """A checkpoint's config in the current keys: checkpoints of earlier releases hold eval.diagnostics as a
    boolean, read here as "pass" (true: the training pass) or "off"."""
    diag = saved.get("eval", {}).get("diagnostics")
    if isinstance(diag, bool):
        saved = {**saved, "eval": {**saved["eval"], "diagnostics": "pass" if diag else "off"}}
    return saved


def split_features(loaded: LoadedRun, splits=EVAL_SPLITS) -> dict[str, Features]:
    """Backbone features of the named splits ("val", "test", and "train" without augmentation), on one
    process (post-hoc work re-uses them); a progress bar per split with run.progress."""
    loaders = {}
    if "val" in splits or "test" in splits:
        _, loaders["val"], loaders["test"] = make_loaders(loaded.cfg, loaded.data, DistInfo(), loaded.device.type)
    if "train" in splits:
        loaders["train"] = train_features_loader(loaded.cfg, loaded.data, DistInfo())
    progress = loaded.cfg.run.progress
    return {s: collect_features(loaded.model, loaders[s], loaded.device, f"features {s}" if progress else None)
            for s in splits}
