"""When a training run evaluates, and on what.

val after every `eval.every` epochs and always after the last one; at the end of the run the test
split once, the last epoch's val re-used (not evaluated twice), and the per-class diagnostics. Every
rank evaluates its shard of a split on the device; the counts are summed over ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.diagnostics import diagnostics
from engine.evaluate import evaluate_loader, scalars

if TYPE_CHECKING:
    from engine.trainer import Trainer


def evaluate(trainer: Trainer, loader, split: str = "val") -> dict:
    """The split's report: every rank tallies its shard on the device, the counts are summed over ranks."""
    cfg = trainer.cfg
    return evaluate_loader(trainer.model, loader, trainer.device, trainer.data.class_counts, cfg.eval.many_threshold,
                           cfg.eval.few_threshold, trainer.autocast, trainer.progress(f"eval {split}"))


def validate_epoch(trainer: Trainer, epoch: int, val_loader) -> dict:
    """The val_* fields of epoch `epoch`'s (0-based) record: evaluated every eval.every epochs and after the
    last one, else none."""
    if (epoch + 1) % trainer.cfg.eval.every == 0 or epoch + 1 == trainer.cfg.epochs:
        return {f"val_{k}": v for k, v in scalars(evaluate(trainer, val_loader)).items()}
    return {}


def final_metrics(trainer: Trainer, history: list[dict], test_loader, val_loader) -> dict:
    """The run's metrics.json: the test split once; val re-used from the last epoch's record when that
    epoch was validated (the loop always validates the last epoch); diagnostics."""
    cfg, data = trainer.cfg, trainer.data
    test = evaluate(trainer, test_loader, "test")
    last = history[-1] if history else {}
    if last.get("epoch") == cfg.epochs and "val_top1" in last:
        val = {k[len("val_"):]: v for k, v in last.items() if k.startswith("val_")}
    else:
        val = scalars(evaluate(trainer, val_loader, "val"))
    diag = diagnostics(trainer) if cfg.eval.diagnostics != "off" else None
    return {
        **test,
        "val": val,
        "method": cfg.method,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "class_counts": data.class_counts.tolist(),
        "notes": data.notes,
        "diagnostics": diag,
    }
