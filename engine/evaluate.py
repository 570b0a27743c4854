"""Evaluation: top-1, many/medium/few, per-class accuracy, and the imbalance metrics of
engine/metrics.py (GM, precision/recall/F1, G-mean, IBA, cumulative false positives, confusion matrix).

Two ways in, one report (`ClassTally.report`), the same numbers:

* `evaluate_loader`: training's evaluation. Each rank runs its shard through backbone and head and
  tallies per-class counts on the device (correct, support and predicted per class: O(K); plus the
  K×K confusion matrix while K ≤ CONFUSION_MAX_CLASSES); the tallies are summed over ranks with one
  all-reduce. No per-sample feature leaves the device.
* `collect_features` + `accuracy_report`: post-hoc work (engine/posthoc.py, engine/runs.py) that
  re-uses one split's features for many variants of the head; the logits always come from the head's
  own `Head.logits`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

import kernels
from engine.distributed import all_reduce_sum_
from engine.metrics import counts_from_tally, tally_metrics
from engine.models import Classifier
from pipelines.long_tail import shot_groups
from pipelines.progress import progress_bar

GROUPS = ("many", "medium", "few", "top1")  # the shot groups of every report, and the whole test split
# Above this many classes the K×K confusion matrix is not kept (K=2048: 32 MiB of int64 on the device and
# 4M numbers in metrics.json; iNaturalist's 8,142 classes would be 530 MB): the metrics need only O(K) counts.
CONFUSION_MAX_CLASSES = 2048


@dataclass
class Features:
    features: Tensor  # (N, d) float32, on CPU
    labels: Tensor  # (N,) int64


def _batches(loader, desc: str | None):
    """The loader, with a progress bar when `desc` is given (rank 0 with run.progress)."""
    if desc is None:
        return loader
    return progress_bar(loader, desc=desc, total=len(loader) if hasattr(loader, "__len__") else None, leave=False,
                        unit="batch")


@torch.no_grad()
def collect_features(model: Classifier, loader: DataLoader, device: torch.device, desc: str | None = None) -> Features:
    """Backbone features of every sample of `loader`, on the CPU (post-hoc work; `desc`: progress bar)."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for x, y in _batches(loader, desc):
        feats.append(model.forward_features(x.to(device, non_blocking=True)).float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return Features(torch.cat(feats), torch.cat(labels))


class ClassTally:
    """Per-class counts of an evaluation, accumulated on the device without a host sync:
    correct (TP_k), support (samples of true class k) and predicted (samples predicted as k), each (K,)
    int64, plus the confusion matrix (K², int64) when K ≤ `CONFUSION_MAX_CLASSES` (or `confusion`)."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", confusion: bool | None = None):
        self.num_classes = num_classes
        self.counts = torch.zeros(3, num_classes, dtype=torch.int64, device=device)  # correct, support, predicted
        keep = num_classes <= CONFUSION_MAX_CLASSES if confusion is None else confusion
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device) if keep else None

    def update(self, predictions: Tensor, labels: Tensor) -> None:
        # index_add_ with a fixed output size: bincount would read max(labels) to the host (a sync).
        y, p = labels.to(self.counts.device).long(), predictions.long()
        ones = torch.ones_like(y)
        self.counts[0].index_add_(0, y, (p == y).long())
        self.counts[1].index_add_(0, y, ones)
        self.counts[2].index_add_(0, p, ones)
        if self.confusion is not None:
            self.confusion.index_add_(0, y * self.num_classes + p, ones)

    def all_reduce(self) -> None:
        """Sum over ranks (one all-reduce per tensor; a no-op on a single process)."""
        all_reduce_sum_(self.counts, *([self.confusion] if self.confusion is not None else []))

    def report(self, class_counts: np.ndarray, many_threshold: int, few_threshold: int) -> dict:
        """Accuracies in percent. A group's accuracy is the mean of its classes' accuracies (null if empty).

        Also every metric of `engine.metrics.tally_metrics` (GM in percent; precision, recall, F1, G-mean,
        IBA as fractions; false positives; the confusion matrix, None above CONFUSION_MAX_CLASSES)."""
        correct, support, predicted = self.counts.cpu().numpy()
        per_class = np.where(support > 0, 100.0 * correct / np.maximum(support, 1), np.nan)
        report = {"top1": float(100.0 * (correct.sum() / max(support.sum(), 1)))}
        for name, classes in shot_groups(class_counts, many_threshold, few_threshold).items():
            vals = per_class[classes]
            vals = vals[~np.isnan(vals)]
            report[name] = float(vals.mean()) if len(vals) else None
        report["per_class"] = [None if np.isnan(v) else float(v) for v in per_class]
        cm = None if self.confusion is None else self.confusion.cpu().numpy().reshape(self.num_classes, -1)
        report.update(tally_metrics(counts_from_tally(correct, support, predicted), class_counts, cm))
        return report


@torch.no_grad()
def evaluate_loader(model: Classifier, loader, device: torch.device, class_counts: np.ndarray, many_threshold: int,
                    few_threshold: int, autocast=contextlib.nullcontext, desc: str | None = None) -> dict:
    """This rank's shard through backbone and head, per-class counts tallied on the device and summed
    over ranks: the split's report on every rank. `autocast()`: the run's autocast context for the
    backbone (the head's logits are computed in float32, as `Head.logits` on collected features)."""
    was_training = model.training
    model.eval()
    tally = ClassTally(len(class_counts), device)
    for x, y in _batches(loader, desc):
        with autocast():
            feats = model.forward_features(x.to(device, non_blocking=True))
        tally.update(model.head.logits(feats.float()).argmax(dim=1), y.to(device, non_blocking=True))
    model.train(was_training)
    tally.all_reduce()  # sync point: every rank's counts, summed
    return tally.report(class_counts, many_threshold, few_threshold)


class ClassSums:
    """Running per-class feature sums (K, d) and counts (K,) in float32 on the device: the class means
    μ̃_k of the empirical-offset diagnostic, from training steps (`add` per step) or from a pass."""

    def __init__(self, num_classes: int, dim: int, device: torch.device | str):
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float32, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.float32, device=device)

    def add(self, features: Tensor, labels: Tensor) -> None:
        kernels.class_feature_sums(features, labels.to(self.sums.device), len(self.counts),
                                   out=(self.sums, self.counts))

    def means(self) -> Tensor:
        """Σ over ranks (sync point), then the class means (0 for a class with no sample)."""
        all_reduce_sum_(self.sums, self.counts)
        return self.sums / self.counts.clamp_min(1)[:, None]


@torch.no_grad()
def class_sums_pass(model: Classifier, loader, device: torch.device, num_classes: int,
                    autocast=contextlib.nullcontext, desc: str | None = None) -> ClassSums:
    """Per-class feature sums of this rank's shard of `loader` with the model in eval mode."""
    was_training = model.training
    model.eval()
    sums = ClassSums(num_classes, model.head.weight.shape[1], device)
    for x, y in _batches(loader, desc):
        with autocast():
            sums.add(model.forward_features(x.to(device, non_blocking=True)), y)
    model.train(was_training)
    return sums


def accuracy_report(
    logits: Tensor, labels: Tensor, class_counts: np.ndarray, many_threshold: int, few_threshold: int
) -> dict:
    """The report (`ClassTally.report`) of a split's logits (N, K) and labels (N,)."""
    tally = ClassTally(len(class_counts), logits.device)
    tally.update(logits.argmax(dim=1), labels)
    return tally.report(class_counts, many_threshold, few_threshold)


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
