"""Per-class diagnostics of a trained run (EO Fig. 1/3, WVN Fig. 2): offsets, bias and weight norms.

The class means of the training features come from the last training epoch (`collect_class_sums`, the
step's hook: no extra pass) or from a pass over the training split after training (eval.diagnostics).
The last epoch's sums so far travel in last.pt (`saved_class_sums` / `restore_class_sums`), so a run
resumed in its last epoch ends with the same diagnostics as an uninterrupted one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from engine.data import train_features_loader
from engine.evaluate import ClassSums, class_sums_pass

if TYPE_CHECKING:
    from engine.trainer import Trainer

logger = logging.getLogger(__name__)


def collect_class_sums(trainer: Trainer, epoch: int, features: torch.Tensor, labels: torch.Tensor) -> None:
    """Diagnostics hook: with eval.diagnostics=epoch, add one (micro-)batch's training features to the
    running per-class sums of the last epoch (on the device, no sync). A no-op otherwise.

    The sums start at the epoch's first step: a process resumed mid-epoch continues the sums last.pt
    carried (`restore_class_sums`) or, without them, sums nothing (the diagnostics then pass over the
    training split) rather than means of part of the epoch."""
    if trainer.cfg.eval.diagnostics != "epoch" or epoch != trainer.cfg.epochs - 1:
        return
    if trainer.epoch_class_sums is None:
        if trainer.state.position != 0:
            return
        trainer.epoch_class_sums = ClassSums(len(trainer.counts), features.shape[1], trainer.device)
    trainer.epoch_class_sums.add(features, labels)


def saved_class_sums(trainer: Trainer, gathered: list) -> dict | None:
    """`TrainState.class_sums` from every rank's (sums, counts) on the CPU (None where a rank has none)."""
    if any(g is None for g in gathered):
        return None
    return {"epoch": trainer.cfg.epochs - 1, "ranks": gathered}


def restore_class_sums(trainer: Trainer) -> None:
    """Continue the last epoch's sums last.pt carried (`TrainState.class_sums`) when they belong to this
    run's last epoch. The same number of ranks: each rank its own sums (the same all-reduce as an
    uninterrupted run); another number: rank 0 holds the total, the other ranks zeros."""
    saved, dist = trainer.state.class_sums, trainer.dist
    if trainer.cfg.eval.diagnostics != "epoch" or not saved or saved["epoch"] != trainer.cfg.epochs - 1:
        return
    ranks = saved["ranks"]
    if len(ranks) == dist.world_size:
        sums, counts = ranks[dist.rank]
    else:
        sums, counts = (sum(r[i] for r in ranks) for i in (0, 1))
        if dist.rank:
            sums, counts = torch.zeros_like(sums), torch.zeros_like(counts)
    restored = ClassSums(len(counts), sums.shape[1], trainer.device)
    restored.sums.copy_(sums)
    restored.counts.copy_(counts)
    trainer.epoch_class_sums = restored


DIAGNOSTIC_SOURCES = {
    "epoch": "last training epoch: features of augmented training images, taken during the steps (the model "
             "moved during the epoch)",
    "pass": "a pass over the training split after training: un-augmented images (eval transforms), final model",
}


@torch.no_grad()
def diagnostics(trainer: Trainer) -> dict:
    """Per-class offsets and norms (EO Fig. 1/3, WVN Fig. 2): estimated õ_k = ½c_k·w_k,
    empirical ½μ̃_k·w_k from the training features' class means, trained bias, ‖w_k‖.

    μ̃_k comes from the last epoch's features (eval.diagnostics=epoch, no extra pass) or from a
    full pass over the training split (pass). An epoch run without the whole last epoch's sums (resumed
    from a last.pt written without them) falls back to the pass, and says what it costs."""
    import kernels

    mode, sums = trainer.cfg.eval.diagnostics, trainer.epoch_class_sums
    if mode == "epoch" and sums is None:
        logger.warning("diagnostics: the sums of the whole last epoch are not available (resumed from a last.pt "
                       "without them); passing over the training split instead: %d images", len(trainer.data.train))
        mode = "pass"
    if mode == "pass":
        loader = train_features_loader(trainer.cfg, trainer.data, trainer.dist)
        sums = class_sums_pass(trainer.model, loader, trainer.device, trainer.data.num_classes, trainer.autocast,
                               trainer.progress("diagnostics: train pass"))
    means = sums.means().cpu()
    head = trainer.model.head
    w = head.weight.detach().float().cpu()
    return {
        "mode": mode,
        "source": DIAGNOSTIC_SOURCES[mode],
        "images": int(sums.counts.sum().item()),
        "estimated_offset": kernels.estimated_offset(w, head.centers.float().cpu()).tolist(),
        "empirical_offset": kernels.empirical_offset(w, means).tolist(),
        "bias": head.bias.detach().float().cpu().tolist() if head.bias is not None else None,
        "weight_norm": w.norm(dim=1).tolist(),
    }
