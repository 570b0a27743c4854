"""Imbalance-aware metrics, all computed from one confusion matrix (numpy only).

`cm[i, j]` = number of test samples of true class i predicted as class j (K×K).
Notation per class k, one-vs-rest: TP_k = cm[k, k], FN_k = Σ_j cm[k, j] − TP_k,
FP_k = Σ_i cm[i, k] − TP_k, TN_k = N − TP_k − FN_k − FP_k,
TPR_k = TP_k / (TP_k + FN_k) (recall = class accuracy), TNR_k = TN_k / (TN_k + FP_k).

Definitions (fractions in [0, 1] unless the name says percent):

* class accuracy acc_k = TPR_k; classes with no test sample are undefined (NaN) and are
  left out of every macro average.
* GM of class accuracies (estimated-offset paper, Fig. 4): (Π_k acc_k)^(1/K) with every
  zero accuracy replaced by ε = 0.001 (the paper's ε, on accuracies as fractions).
* macro precision / recall / F1 (adjusting-decision-boundary paper, Table 2): mean over
  classes of P_k = TP_k / (TP_k + FP_k), R_k = TPR_k, F1_k = 2 P_k R_k / (P_k + R_k).
  A class that is never predicted has P_k = 0 (scikit-learn's zero_division=0), and
  F1_k = 0 when P_k + R_k = 0.
* G-mean (Table 2, imbalanced-learn's per-class `geometric_mean_score` as used by
  `classification_report_imbalanced`): G_k = √(TPR_k · TNR_k), macro-averaged.
* IBA (Table 2, García et al. 2009; imbalanced-learn's `make_index_balanced_accuracy`
  with α = 0.1, squared=True on that G-mean): per class one-vs-rest
  IBA_k = (1 + α · Dom_k) · G_k², Dom_k = TPR_k − TNR_k, then macro-averaged.
  (imbalanced-learn's report weights the classes by support; on a balanced test split,
  as in the papers, that equals the macro average.)
* cumulative false positives: FP_k with the classes ordered by training count, most
  frequent first, then the running sum (estimated-offset paper, Fig. 5; a linear curve
  means the errors are not biased towards the head or the tail).
"""

from __future__ import annotations

import numpy as np

GM_EPSILON = 0.001  # estimated-offset paper: zero class accuracies replaced by ε in the GM
IBA_ALPHA = 0.1  # weighting factor of the dominance in IBA (imbalanced-learn's default)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """cm[i, j]: samples of true class i predicted as j, int64 (K, K)."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(predictions, dtype=np.int64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions must have the same length, got {y.shape[0]} and {p.shape[0]}")
    for name, arr in (("labels", y), ("predictions", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes - 1}], got values in [{arr.min()}, {arr.max()}]")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _check_cm(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"a confusion matrix must be square (K, K) with K ≥ 1, got shape {cm.shape}")
    if (cm < 0).any():
        raise ValueError("a confusion matrix holds counts; got negative entries")
    return cm.astype(np.float64)


def one_vs_rest_counts(cm: np.ndarray) -> dict[str, np.ndarray]:
    """TP, FN, FP, TN per class (float64, shape (K,))."""
    cm = _check_cm(cm)
    return counts_from_tally(np.diag(cm), cm.sum(axis=1), cm.sum(axis=0))


def counts_from_tally(correct: np.ndarray, support: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """TP, FN, FP, TN per class (float64) from three O(K) tallies: TP_k (correct), the samples of true
    class k (support, a row sum of the confusion matrix) and the samples predicted as k (a column sum).
    Every metric here needs only these, so an evaluation need not hold the K×K matrix."""
    tp = np.asarray(correct, dtype=np.float64)
    fn = np.asarray(support, dtype=np.float64) - tp
    fp = np.asarray(predicted, dtype=np.float64) - tp
    tn = np.asarray(support, dtype=np.float64).sum() - tp - fn - fp
    return {"tp": tp, "fn": fn, "fp": fp, "tn": tn}


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    out = np.full(num.shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _counts(cm_or_counts) -> dict[str, np.ndarray]:
    """The per-class counts of a confusion matrix, or the counts dict itself (`counts_from_tally`)."""
    return cm_or_counts if isinstance(cm_or_counts, dict) else one_vs_rest_counts(cm_or_counts)


def class_accuracy(cm) -> np.ndarray:
    """TPR_k (= recall = class accuracy) as a fraction; NaN for a class with no test sample."""
    c = _counts(cm)
    return _ratio(c["tp"], c["tp"] + c["fn"], np.nan)


def specificity(cm) -> np.ndarray:
    """TNR_k = TN_k / (TN_k + FP_k); NaN when every sample is of class k."""
    c = _counts(cm)
    return _ratio(c["tn"], c["tn"] + c["fp"], np.nan)


def precision(cm) -> np.ndarray:
    """P_k = TP_k / (TP_k + FP_k); 0 for a class that is never predicted."""
    c = _counts(cm)
    return _ratio(c["tp"], c["tp"] + c["fp"], 0.0)


def f1(cm) -> np.ndarray:
    """F1_k = 2 P_k R_k / (P_k + R_k); 0 when P_k + R_k = 0, NaN when R_k is undefined."""
    p, r = precision(cm), class_accuracy(cm)
    out = _ratio(2 * p * np.nan_to_num(r), p + np.nan_to_num(r), 0.0)
    return np.where(np.isnan(r), np.nan, out)


def gm_class_accuracy(cm, epsilon: float = GM_EPSILON) -> float:
    """(Π_k acc_k)^(1/K) over the classes with test samples, zeros replaced by ε (a fraction)."""
    acc = class_accuracy(cm)
    acc = acc[~np.isnan(acc)]
    if not len(acc):
        raise ValueError("no class has a test sample: the geometric mean is undefined")
    acc = np.where(acc == 0, epsilon, acc)
    return float(np.exp(np.log(acc).mean()))


def gmean_per_class(cm) -> np.ndarray:
    """G_k = √(TPR_k · TNR_k), one-vs-rest."""
    return np.sqrt(class_accuracy(cm) * specificity(cm))


def iba_per_class(cm, alpha: float = IBA_ALPHA) -> np.ndarray:
    """IBA_k = (1 + α·(TPR_k − TNR_k)) · TPR_k · TNR_k, one-vs-rest."""
    tpr, tnr = class_accuracy(cm), specificity(cm)
    return (1.0 + alpha * (tpr - tnr)) * tpr * tnr


def _macro(values: np.ndarray, support: np.ndarray) -> float | None:
    """Mean over the classes that have test samples (support > 0)."""
    v = values[(support > 0) & ~np.isnan(values)]
    return float(v.mean()) if len(v) else None


def false_positives(cm) -> np.ndarray:
    """FP_k: samples of other classes predicted as k (int64)."""
    return _counts(cm)["fp"].astype(np.int64)


def frequency_order(class_counts: np.ndarray) -> np.ndarray:
    """Class ids by training count, most frequent first (ties: smaller id first)."""
    return np.argsort(-np.asarray(class_counts), kind="stable")


def cumulative_false_positives(cm, class_counts: np.ndarray) -> np.ndarray:
    """Running sum of FP_k over the classes ordered by training count, most frequent first."""
    fp = false_positives(cm)
    counts = np.asarray(class_counts)
    if counts.shape != fp.shape:
        raise ValueError(f"class_counts must have one entry per class ({len(fp)}), got shape {counts.shape}")
    return np.cumsum(fp[frequency_order(counts)])


def imbalance_metrics(cm: np.ndarray, class_counts: np.ndarray) -> dict:
    """Every metric above as JSON-ready values (accuracies in percent, the Table-2 metrics as fractions)."""
    cm = np.asarray(cm)
    return tally_metrics(one_vs_rest_counts(cm), class_counts, cm)


def tally_metrics(counts: dict[str, np.ndarray], class_counts: np.ndarray, cm: np.ndarray | None = None) -> dict:
    """`imbalance_metrics` from the per-class counts (`counts_from_tally`); "confusion_matrix" is `cm`
    as a list, or None when the evaluation did not keep the K×K matrix (large K)."""
    support = counts["tp"] + counts["fn"]
    return {
        "gm": 100.0 * gm_class_accuracy(counts),
        "precision": _macro(precision(counts), support),
        "recall": _macro(class_accuracy(counts), support),
        "f1": _macro(f1(counts), support),
        "gmean": _macro(gmean_per_class(counts), support),
        "iba": _macro(iba_per_class(counts), support),
        "false_positives": false_positives(counts).tolist(),
        "cumulative_false_positives": cumulative_false_positives(counts, class_counts).tolist(),
        "frequency_order": frequency_order(class_counts).tolist(),
        "confusion_matrix": None if cm is None else np.asarray(cm).astype(np.int64).tolist(),
    }
