"""`Trainer`: what one training run is built from (config, devices, data, the model as the step calls
it, the class counts) around its `TrainState` (engine/state.py: what a checkpoint saves).

`build_trainer` is the one builder: the model (engine/models.py), SGD, the per-step learning-rate
schedule and the gradient scaler, wrapped for DDP and `torch.compile` as the run's speed settings say.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from engine.config import Config, effective_lr
from engine.data import Data
from engine.device import Speed
from engine.distributed import DistInfo
from engine.evaluate import ClassSums
from engine.models import Classifier, build_model, convert_sync_bn
from engine.state import TrainState


def build_optimizer(cfg: Config, model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.SGD(model.parameters(), lr=effective_lr(o), momentum=o.momentum,
                           weight_decay=o.weight_decay, nesterov=o.nesterov, **({"fused": True} if fused else {}))


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-step schedule: linear warmup, then cosine to 0 or step decay at epoch milestones."""
    o = cfg.optim
    warmup = o.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        epoch = step / steps_per_epoch
        return o.lr_decay ** sum(epoch >= m for m in o.milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Trainer:
    """One training run: passed to the step, the loss meter, evaluation, diagnostics and checkpoints."""

    cfg: Config
    out_dir: Path
    dist: DistInfo
    device: torch.device
    speed: Speed
    data: Data | None
    step_model: torch.nn.Module  # what the training step calls: the model, DDP-wrapped and/or compiled
    counts: torch.Tensor  # training class counts on the device
    steps_per_epoch: int
    state: TrainState  # the model, optimizer, schedule, scaler and loop position: what last.pt holds
    epoch_class_sums: ClassSums | None = None  # eval.diagnostics=epoch: filled by `collect_class_sums`

    @property
    def model(self) -> Classifier:
        """The plain model: evaluation, checkpoints, after-step updates."""
        return self.state.model

    def autocast(self):
        if self.speed.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.speed.amp_dtype)

    def progress(self, what: str) -> str | None:
        """A progress bar's description on rank 0 with run.progress, else None (no bar)."""
        return what if self.cfg.run.progress and self.dist.is_main else None


def build_trainer(cfg: Config, out_dir: Path, dist: DistInfo, device: torch.device, speed: Speed, data: Data | None,
                  steps_per_epoch: int, class_counts=None) -> Trainer:
    """Model (the one builder), optimizer, schedule and scaler of a run; `class_counts` defaults to the data's."""
    counts = data.class_counts if class_counts is None else class_counts
    model = build_model(cfg, counts).to(
        device, memory_format=torch.channels_last if speed.channels_last else torch.contiguous_format)
    if dist.enabled:
        model = convert_sync_bn(model, cfg.model.sync_bn)
        # DDP copies rank 0's initial weights to every rank; from here on each rank draws its
        # own augmentations (the same seed everywhere would give every rank the same crops).
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)
    optimizer = build_optimizer(cfg, model, speed.fused_sgd)
    step_model: torch.nn.Module = model
    if dist.enabled:
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if speed.compile:
        step_model = torch.compile(step_model)
    state = TrainState(cfg, [int(c) for c in counts], model, optimizer,
                       build_scheduler(cfg, optimizer, steps_per_epoch),
                       torch.amp.GradScaler(device.type, enabled=speed.grad_scaler))
    return Trainer(cfg, out_dir, dist, device, speed, data, step_model,
                   torch.as_tensor(counts, dtype=torch.float32, device=device), steps_per_epoch, state)
