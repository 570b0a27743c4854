"""`TrainState`: everything last.pt saves and `--resume` restores.

The state is the model, optimizer, schedule and gradient scaler, the loop's position (epoch, optimizer
steps done in it), the epoch's loss totals, the log history, the bad images met, each rank's RNG
and loader state, and the last epoch's per-class feature sums so far (eval.diagnostics=epoch).
`state_dict()` is the checkpoint dict (engine/checkpoint.py writes it atomically); `load_state_dict()`
takes one back. When and how it is written and restored is the checkpoint policy
(engine/checkpoint_policy.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from engine.config import Config, to_dict

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What a checkpoint holds. `config` and `class_counts` are saved for whoever reads last.pt (`engine
    eval`, a resume's config check); `load_state_dict` leaves them, the resumed run has its own."""

    config: Config
    class_counts: list[int]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    epoch: int = 0  # 0-based epoch to continue (== epochs when training is complete)
    position: int = 0  # optimizer steps already done in that epoch
    history: list[dict] = field(default_factory=list)  # the metrics.jsonl records so far
    loss_sum: float = 0.0  # Σ step loss × rows this epoch (mean over ranks), at the last loss read
    seen: int = 0  # rows this epoch, this rank
    bad_images: list = field(default_factory=list)  # [path, reason] met by the training loader (all ranks)
    ranks: list[tuple] = field(default_factory=list)  # per rank: (CPU RNG, CUDA RNGs, loader state or None)
    # eval.diagnostics=epoch: the last epoch's per-class feature sums so far, {"epoch": 0-based epoch they
    # belong to, "ranks": [(sums (K, d), counts (K,)) on the CPU, per rank]}; None outside the last epoch.
    class_sums: dict | None = None

    def state_dict(self) -> dict:
        return {
            "config": to_dict(self.config),
            "epoch": self.epoch,
            "position": self.position,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": [r[0] for r in self.ranks],  # per rank
            "cuda_rng": [r[1] for r in self.ranks],
            "loader": [r[2] for r in self.ranks],  # per rank: train_loader.state_dict() (DALI: its pipeline checkpoint)
            "class_counts": self.class_counts,
            "history": self.history,
            "bad_images": self.bad_images,
            "epoch_loss_sum": self.loss_sum,
            "epoch_seen": self.seen,
            "epoch_class_sums": self.class_sums,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.bad_images = [list(b) for b in state.get("bad_images", [])]
        self.epoch, self.position = state["epoch"], state["position"]
        self.history = state["history"]
        self.loss_sum, self.seen = state["epoch_loss_sum"], state["epoch_seen"]
        loaders = state.get("loader") or [None] * len(state["rng"])
        self.ranks = list(zip(state["rng"], state["cuda_rng"], loaders))
        self.class_sums = state.get("epoch_class_sums")  # absent from a last.pt written without it


# --------------------------------------------------------------------------- writing
