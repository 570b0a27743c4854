"""Evaluation: features once, then the head; top-1, many/medium/few, per-class accuracy,
and the imbalance metrics of engine/metrics.py (GM, precision/recall/F1, G-mean, IBA,
cumulative false positives, confusion matrix).

Features are collected once per split so that post-hoc changes to the head
(re-scaling sweeps) re-use them instead of running the backbone again; the logits always
come from the head's own `Head.logits`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from engine.metrics import confusion_matrix, imbalance_metrics
from engine.models import Classifier

GROUPS = ("many", "medium", "few", "top1")  # the shot groups of every report, and the whole test split


@dataclass
class Features:
    features: Tensor  # (N, d) float32, on CPU
    labels: Tensor  # (N,) int64


@torch.no_grad()
def collect_features(model: Classifier, loader: DataLoader, device: torch.device) -> Features:
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for x, y in loader:
        feats.append(model.forward_features(x.to(device, non_blocking=True)).float().cpu())
        labels.append(y)
    model.train(was_training)
    return Features(torch.cat(feats), torch.cat(labels))


def shot_groups(class_counts: np.ndarray, many_threshold: int, few_threshold: int) -> dict[str, np.ndarray]:
    """many: n > many_threshold; few: n < few_threshold; medium: the rest (ImageNet-LT: 100 / 20)."""
    counts = np.asarray(class_counts)
    many = counts > many_threshold
    few = counts < few_threshold
    return {"many": np.flatnonzero(many), "medium": np.flatnonzero(~many & ~few), "few": np.flatnonzero(few)}


def accuracy_report(
    logits: Tensor, labels: Tensor, class_counts: np.ndarray, many_threshold: int, few_threshold: int
) -> dict:
    """Accuracies in percent. A group's accuracy is the mean of its classes' accuracies (null if empty).

    Also every metric of `engine.metrics.imbalance_metrics` (GM in percent; precision,
    recall, F1, G-mean, IBA as fractions; false positives; the confusion matrix)."""
    num_classes = len(class_counts)
    pred = logits.argmax(dim=1).numpy()
    y = labels.numpy()
    correct = np.bincount(y, weights=(pred == y), minlength=num_classes)
    total = np.bincount(y, minlength=num_classes)
    per_class = np.where(total > 0, 100.0 * correct / np.maximum(total, 1), np.nan)
    report = {"top1": float(100.0 * (pred == y).mean())}
    for name, classes in shot_groups(class_counts, many_threshold, few_threshold).items():
        vals = per_class[classes]
        vals = vals[~np.isnan(vals)]
        report[name] = float(vals.mean()) if len(vals) else None
    report["per_class"] = [None if np.isnan(v) else float(v) for v in per_class]
    report.update(imbalance_metrics(confusion_matrix(y, pred, num_classes), class_counts))
    return report


def reporter(cfg, class_counts: np.ndarray):
    """`accuracy_report` with the run's class counts and shot thresholds: (logits, labels) → report."""
    def report(logits: Tensor, labels: Tensor) -> dict:
        return accuracy_report(logits, labels, class_counts, cfg.eval.many_threshold, cfg.eval.few_threshold)

    return report


def scalars(report: dict) -> dict:
    """The report without its per-class lists and matrices (epoch logs, summaries)."""
    return {k: v for k, v in report.items() if not isinstance(v, (list, dict))}


def format_table(rows: dict[str, dict]) -> str:
    """A many/medium/few/all table (+ GM, F1, G-mean, IBA when present), one row per named report."""
    def cell(v):
        return f"{v:6.2f}" if isinstance(v, (int, float)) else "     –"

    extra = [k for k in ("gm", "f1", "gmean", "iba") if any(k in r for r in rows.values())]
    scale = {"gm": 1.0, "f1": 100.0, "gmean": 100.0, "iba": 100.0}  # fractions printed as percent
    lines = [f"{'':<20} {'many':>6} {'medium':>6} {'few':>6} {'all':>6}" + "".join(f" {k:>6}" for k in extra)]
    for name, r in rows.items():
        vals = "".join(
            f" {cell(r[k] * scale[k] if isinstance(r.get(k), (int, float)) else None)}" for k in extra
        )
        lines.append(f"{name:<20} {cell(r['many'])} {cell(r['medium'])} {cell(r['few'])} {cell(r['top1'])}{vals}")
    return "\n".join(lines)
