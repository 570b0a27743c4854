"""A trained run, loaded back: checkpoint → config → data (re-read and re-checked) → model.

`load_run(checkpoint)` returns a `LoadedRun`; `split_features(run, splits)` runs the backbone
once per split so that every post-hoc variant of the head (engine/posthoc.py) re-uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import load_checkpoint
from engine.config import Config, config_from_dict
from engine.data import Data, load_data, make_loaders, train_features_loader
from engine.device import resolve_device
from engine.distributed import DistInfo
from engine.errors import CheckpointError
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


def load_run(checkpoint: str | Path) -> LoadedRun:
    """Checkpoint → LoadedRun; the data are re-read and their class counts checked against training's."""
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    try:
        cfg = config_from_dict(state["config"])
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint}: its saved config is not valid here: {exc}") from None
    data = load_data(cfg)
    if data.class_counts.tolist() != state["class_counts"]:
        raise CheckpointError(
            f"{checkpoint}: training class counts {state['class_counts']} differ from the data found now "
            f"{data.class_counts.tolist()}; the split files changed since training"
        )
    device = resolve_device(cfg.run.device)
    model = build_model(cfg, data.class_counts).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return LoadedRun(checkpoint, state, cfg, data, model, device)


def split_features(run: LoadedRun, splits=EVAL_SPLITS) -> dict[str, Features]:
    """Backbone features of the named splits ("val", "test", and "train" without augmentation)."""
    loaders = {}
    if "val" in splits or "test" in splits:
        _, loaders["val"], loaders["test"] = make_loaders(run.cfg, run.data, DistInfo(), run.device.type)
    if "train" in splits:
        loaders["train"] = train_features_loader(run.cfg, run.data, DistInfo())
    return {s: collect_features(run.model, loaders[s], run.device) for s in splits}
