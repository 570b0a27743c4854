"""Training-loss metering: `LossMeter` keeps the loss on the device and reads it at the loop's sync
points; `epoch_record` turns an epoch's totals into its metrics.jsonl line (loss, lr, throughput, ETA)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from common.errors import TrainingError
from engine.distributed import all_gather_objects, all_reduce_sum_
from engine.run_folder import kept_checkpoint

if TYPE_CHECKING:
    from engine.trainer import Trainer


class LossMeter:
    """The training loss, kept on the device so the step never waits for it.

    `add` folds a step's loss into float64 sums (an epoch sum and a window since the last read)
    and records the first step whose loss is not finite, all on the device. `read` brings them to
    the host: one all-reduce of five numbers under DDP (which also agrees on a stop request),
    then one `.tolist()`. The loop reads every `run.log_every` steps, before every checkpoint and
    at the end of every epoch; each read checks for a non-finite and a diverging loss.
    """

    def __init__(self, trainer: Trainer, loss_sum: float = 0.0, seen: int = 0) -> None:
        self.trainer = trainer
        f64 = dict(dtype=torch.float64, device=trainer.device)
        self.sum = torch.tensor(loss_sum, **f64)  # Σ step loss × rows over this epoch, this rank
        self.seen = seen  # rows this epoch, this rank (known on the host: no sync)
        self.window = torch.zeros((), **f64)  # Σ step loss × rows since the last read
        self.window_rows = 0
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=trainer.device)  # step of the 1st non-finite loss
        self.bad_value = torch.zeros((), **f64)
        self.dirty = False  # steps added since the last read
        self.read_sum = loss_sum  # the epoch sum (mean over ranks) at the last read
        self.max_loss = trainer.cfg.run.max_loss or 1e4 * math.log(max(len(trainer.counts), 2))

    def add(self, loss: torch.Tensor, rows: int, step: int) -> None:
        part = loss * rows
        self.sum += part
        self.window += part
        self.seen, self.window_rows, self.dirty = self.seen + rows, self.window_rows + rows, True
        first = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(first, step, self.first_bad)
        self.bad_value = torch.where(first, loss, self.bad_value)

    def new_epoch(self) -> None:
        self.sum.zero_()
        self.seen, self.read_sum = 0, 0.0

    def read(self, epoch: int, stop: bool = False) -> tuple[float, float, bool]:
        """(epoch mean loss, window mean loss, stop agreed) over all ranks; raises TrainingError on a
        non-finite or diverging loss (the last checkpoint, written before, is kept)."""
        trainer, world = self.trainer, self.trainer.dist.world_size
        stop_flag = torch.tensor(float(stop), dtype=torch.float64, device=trainer.device)
        packed = torch.stack([self.sum, self.window, (self.first_bad >= 0).double(), stop_flag])
        all_reduce_sum_(packed)
        # Sync point (one per read): the only place the loop waits for the device.
        epoch_sum, window_sum, bad_ranks, stops = packed.tolist()
        self.read_sum = epoch_sum / world  # exact for one process
        epoch_mean = self.read_sum / max(self.seen, 1)
        window_mean = window_sum / world / max(self.window_rows, 1)
        self.window.zero_()
        self.window_rows, self.dirty = 0, False
        if bad_ranks:
            firsts = [(s, v) for s, v in all_gather_objects(torch.stack(
                [self.first_bad.double(), self.bad_value]).tolist()) if s >= 0]
            step, value = min(firsts)
            raise TrainingError(f"loss is {value} at epoch {int(step) // trainer.steps_per_epoch + 1}, step {int(step)} "
                                f"{self._context()}")
        if window_mean > self.max_loss:
            raise TrainingError(f"the loss is diverging: {window_mean:.4g} over the last steps of epoch {epoch + 1} "
                                f"exceeds run.max_loss={self.max_loss:.4g} {self._context()}; lower optim.lr "
                                "or raise run.max_loss")
        return epoch_mean, window_mean, stops > 0

    def _context(self) -> str:
        """A failure message's tail: the method, the lr, and the checkpoint left to resume from."""
        trainer = self.trainer
        return (f"(method {trainer.cfg.method}, lr {trainer.state.scheduler.get_last_lr()[0]:.4g}); "
                f"{kept_checkpoint(trainer.out_dir)}")


def epoch_record(trainer: Trainer, epoch: int, loss_mean: float, seen: int, elapsed: float,
                 clock: tuple[float, int]) -> dict:
    """One metrics.jsonl line: mean training loss, lr, throughput and ETA after `epoch` (0-based)."""
    cfg, steps = trainer.cfg, trainer.steps_per_epoch
    done = (epoch + 1) * steps
    return {
        "epoch": epoch + 1,
        "step": done,
        "train_loss": loss_mean,
        "lr": trainer.state.scheduler.get_last_lr()[0],
        "images_per_s": seen * trainer.dist.world_size / elapsed,
        "eta_s": (cfg.epochs - epoch - 1) * steps * (time.perf_counter() - clock[0]) / max(1, done - clock[1]),
    }
