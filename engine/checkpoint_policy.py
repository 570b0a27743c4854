"""The checkpoint policy around `TrainState` (engine/state.py).

`checkpoint` writes last.pt only after a loss read and a check that every parameter and buffer is
finite, so last.pt is always the last good state; `keep_epoch_checkpoints` links epoch-XXX.pt and
best.pt to it; `restore` (--resume) refuses a config that changes what training computes, then loads
the state and puts each rank's RNG and sampler where the interrupted run left them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.errors import CheckpointError, TrainingError
from engine.checkpoint import all_finite, check_fits, nonfinite_tensors, save_checkpoint
from engine.config import Config, config_diff, format_diff, resume_changes, to_dict, with_current_keys
from engine.diagnostics import restore_class_sums, saved_class_sums
from engine.distributed import all_gather_objects
from engine.run_folder import kept_checkpoint

if TYPE_CHECKING:
    from engine.meter import LossMeter
    from engine.trainer import Trainer

logger = logging.getLogger(__name__)


def checkpoint(trainer: Trainer, meter: LossMeter, train_loader=None) -> None:
    """last.pt (atomic; rank 0): resume restarts at optimizer step `state.position` of epoch `state.epoch`.

    Written only when the loss read so far is finite (the meter's read raises otherwise) and every
    parameter and buffer (BN running statistics included) is finite: the last good checkpoint is
    never replaced by a broken one. Every rank's RNG and loader state is gathered into it, so each
    rank continues its own augmentations."""
    state = trainer.state
    if meter.dirty:
        meter.read(state.epoch)  # raises on a non-finite loss since the last read
    weights = state.model.state_dict()
    broken = None
    if trainer.dist.is_main and not all_finite(weights.values()):
        broken = (f"non-finite values in {', '.join(nonfinite_tensors(weights)[:5])} at epoch {state.epoch + 1}, "
                  f"step {state.position}; refusing to overwrite the last good checkpoint "
                  f"({kept_checkpoint(trainer.out_dir)})")
    loader_state = None
    if train_loader is not None and hasattr(train_loader, "state_dict"):
        with contextlib.suppress(RuntimeError):  # a DALI loader before its first batch has no state yet
            loader_state = train_loader.state_dict()
    sums = trainer.epoch_class_sums
    class_sums = (sums.sums.cpu(), sums.counts.cpu()) if sums is not None else None
    # Sync point: every rank's RNG, loader state and diagnostic class sums, and rank 0's verdict on the weights.
    gathered = all_gather_objects((torch.get_rng_state(),
                                   torch.cuda.get_rng_state_all() if trainer.device.type == "cuda" else [],
                                   loader_state, broken, class_sums))
    broken = gathered[0][3]
    if broken:
        raise TrainingError(broken)
    if not trainer.dist.is_main:
        return
    state.ranks = [g[:3] for g in gathered]
    state.class_sums = saved_class_sums(trainer, [g[4] for g in gathered])
    state.loss_sum, state.seen = meter.read_sum, meter.seen
    save_checkpoint(trainer.out_dir / "last.pt", state.state_dict())


def keep_epoch_checkpoints(out_dir: Path, cfg: Config, history: list[dict]) -> None:
    """run.keep_last: epoch-XXX.pt for the last N epochs; run.save_best: best.pt by val top-1. Both are hard
    links to the last.pt just written (atomic, no copy; last.pt's next replacement leaves them intact)."""
    r, last = cfg.run, out_dir / "last.pt"
    epoch = history[-1]["epoch"]
    if r.keep_last:
        _link(last, out_dir / f"epoch-{epoch:03d}.pt")
        for old in sorted(out_dir.glob("epoch-*.pt"))[:-r.keep_last]:
            old.unlink(missing_ok=True)
    if r.save_best and "val_top1" in history[-1]:
        earlier = [h["val_top1"] for h in history[:-1] if "val_top1" in h]
        if not earlier or history[-1]["val_top1"] > max(earlier) or not (out_dir / "best.pt").exists():
            _link(last, out_dir / "best.pt")
            logger.info("best.pt: epoch %d, val top-1 %.2f", epoch, history[-1]["val_top1"])


def _link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------- resuming


def check_resume_config(saved_config: dict, cfg: Config, path: Path) -> None:
    """Refuse a resume whose config changes keys a resume may not change; warn about the accepted changes."""
    saved = with_current_keys(saved_config)
    accepted, refused = resume_changes(saved, cfg)
    if refused:
        diff = config_diff(saved, to_dict(cfg))
        diffs = format_diff({k: diff[k] for k in refused})
        raise CheckpointError(f"--resume: the config differs from the one {path} was trained with in keys a resume "
                              f"may not change ({diffs}); resume with the original settings (--config "
                              f"{path.parent / 'config.yaml'}) or start a new run")
    if accepted:
        logger.warning("resuming with changed settings: %s", ", ".join(accepted))


def restore(trainer: Trainer, saved: dict, train_loader) -> tuple | None:
    """Load last.pt's dict into the trainer's state and put this rank's RNG and sampler where the
    interrupted run left them, and the last epoch's diagnostic class sums so far with them. Returns the
    RNG state to re-apply once the epoch's loader iterator exists (a mid-epoch resume of the same number
    of ranks), else None."""
    path, state, dist = trainer.out_dir / "last.pt", trainer.state, trainer.dist
    check_resume_config(saved["config"], trainer.cfg, path)
    check_fits(trainer.model, saved["model"], path, "--resume")
    state.load_state_dict(saved)
    restore_class_sums(trainer)
    _log_resume(trainer, path)
    per_rank = trainer.cfg.optim.batch_size // dist.world_size
    loader_state = {"epoch": state.epoch, "position": state.position * per_rank}  # the same global sample position
    resume_rng = None
    if len(state.ranks) == dist.world_size:
        rng, cuda_rng, saved_loader = state.ranks[dist.rank]
        set_rng(trainer, rng, cuda_rng)
        if state.position:
            # Mid-epoch: the interrupted run had created this epoch's loader iterator (which draws its
            # base seed from the global RNG) before the checkpoint; re-apply the saved RNG state after
            # the new iterator is created so the augmentations continue bit for bit.
            resume_rng = (rng, cuda_rng)
        loader_state = {**(saved_loader or {}), **loader_state}
    else:
        logger.warning("resuming a checkpoint of %d ranks on %d: training continues at the same global sample "
                       "(epoch %d, step %d) but not bit for bit (each rank's augmentation and RNG streams differ)",
                       len(state.ranks), dist.world_size, state.epoch + 1, state.position)
    if set(loader_state) - {"epoch", "position"}:
        train_loader.load_state_dict(loader_state)  # e.g. DALI: its random operators' state too
    else:
        train_loader.sampler.set_epoch(loader_state["epoch"])
        train_loader.sampler.set_position(loader_state["position"])
    return resume_rng


def _log_resume(trainer: Trainer, path: Path) -> None:
    """The resume's line: the epoch (1-based) and optimizer step in it that training continues from."""
    state, steps, epochs = trainer.state, trainer.steps_per_epoch, trainer.cfg.epochs
    epoch, step = (state.epoch + 1, state.position) if state.epoch < epochs else (epochs, steps)
    logger.info("resumed from %s at epoch %d, step %d (%d of %d steps done)", path, epoch, step,
                state.epoch * steps + state.position, epochs * steps)


def set_rng(trainer: Trainer, rng: torch.Tensor, cuda_rng: list) -> None:
    torch.set_rng_state(rng)
    if cuda_rng and trainer.device.type == "cuda":
        torch.cuda.set_rng_state_all(cuda_rng)


def epoch_batches(trainer: Trainer, loader, resume_rng: tuple | None) -> Iterator:
    """The epoch's batches. Resumed mid-epoch (`resume_rng` set), the saved RNG state is re-applied once
    the epoch's iterator exists, and the iterator's base-seed draw is taken by a throw-away generator:
    a DataLoader draws that seed from the global RNG lazily, at the first batch (ImageLoader iterates it
    inside a generator), and the interrupted run made that draw before its checkpoint's RNG state was
    taken (with num_workers=0 the base seed is unused; with workers augmentation is position-seeded)."""
    batches = iter(loader)
    if resume_rng is None:
        yield from batches
        return
    set_rng(trainer, *resume_rng)
    dl = getattr(loader, "loader", None)
    absorbing = dl if isinstance(dl, torch.utils.data.DataLoader) and dl.generator is None else None
    if absorbing is not None:
        absorbing.generator = torch.Generator()
    for batch in batches:
        if absorbing is not None:  # the epoch's iterator exists now: later ones draw as before
            absorbing.generator, absorbing = None, None
        yield batch
