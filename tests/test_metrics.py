"""engine/metrics.py against values computed by hand on small confusion matrices."""

import math

import numpy as np
import pytest
import torch

from engine import metrics as M
from engine.evaluate import accuracy_report

# rows: true class, columns: predicted. Class 2 is never predicted (zero column).
CM = np.array([[3, 1, 0],
               [2, 2, 0],
               [1, 1, 0]])
# N = 10. TP 3 2 0 | FN 1 2 2 | FP 3 2 0 | TN 3 4 8
TPR = [3 / 4, 2 / 4, 0.0]
TNR = [3 / 6, 4 / 6, 8 / 8]


def test_one_vs_rest_counts_and_rates():
    c = M.one_vs_rest_counts(CM)
    assert c["tp"].tolist() == [3, 2, 0] and c["fn"].tolist() == [1, 2, 2]
    assert c["fp"].tolist() == [3, 2, 0] and c["tn"].tolist() == [3, 4, 8]
    assert M.class_accuracy(CM).tolist() == pytest.approx(TPR)
    assert M.specificity(CM).tolist() == pytest.approx(TNR)


def test_precision_recall_f1_with_a_never_predicted_class():
    assert M.precision(CM).tolist() == pytest.approx([3 / 6, 2 / 4, 0.0])  # 0/0 → 0
    assert M.f1(CM).tolist() == pytest.approx([2 * 0.5 * 0.75 / 1.25, 0.5, 0.0])
    out = M.imbalance_metrics(CM, np.array([5, 50, 20]))
    assert out["precision"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert out["recall"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert out["f1"] == pytest.approx((0.6 + 0.5 + 0.0) / 3)


def test_gm_replaces_zero_accuracy_by_epsilon():
    assert M.gm_class_accuracy(CM) == pytest.approx((0.75 * 0.5 * 0.001) ** (1 / 3))
    assert M.imbalance_metrics(CM, np.array([5, 50, 20]))["gm"] == pytest.approx(100 * (0.75 * 0.5 * 0.001) ** (1 / 3))
    assert M.gm_class_accuracy(np.diag([4, 5])) == pytest.approx(1.0)


def test_gmean_and_iba_one_vs_rest_macro():
    g = [math.sqrt(t * s) for t, s in zip(TPR, TNR)]
    iba = [(1 + 0.1 * (t - s)) * t * s for t, s in zip(TPR, TNR)]
    assert M.gmean_per_class(CM).tolist() == pytest.approx(g)
    assert M.iba_per_class(CM).tolist() == pytest.approx([0.384375, (1 - 0.1 / 6) / 3, 0.0])
    out = M.imbalance_metrics(CM, np.array([5, 50, 20]))
    assert out["gmean"] == pytest.approx(sum(g) / 3) and out["iba"] == pytest.approx(sum(iba) / 3)
    # α scales the dominance: α = 0 gives G-mean².
    assert M.iba_per_class(CM, alpha=0.0).tolist() == pytest.approx([v * v for v in g])


def test_cumulative_false_positives_in_frequency_order():
    counts = np.array([5, 50, 20])  # order: class 1, 2, 0
    assert M.false_positives(CM).tolist() == [3, 2, 0]
    assert M.frequency_order(counts).tolist() == [1, 2, 0]
    assert M.cumulative_false_positives(CM, counts).tolist() == [2, 2, 5]
    with pytest.raises(ValueError, match=r"one entry per class \(3\), got shape \(2,\)"):
        M.cumulative_false_positives(CM, np.array([1, 2]))


def test_confusion_matrix_and_classes_without_test_samples():
    cm = M.confusion_matrix(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    acc = M.class_accuracy(cm)
    assert acc[:2].tolist() == pytest.approx([0.5, 2 / 3]) and math.isnan(acc[2])
    out = M.imbalance_metrics(cm, np.array([3, 2, 1]))
    assert out["recall"] == pytest.approx((0.5 + 2 / 3) / 2)  # the empty class is left out
    assert out["precision"] == pytest.approx((0.5 + 2 / 3) / 2)  # … from precision too (sklearn would count its 0)
    assert out["gm"] == pytest.approx(100 * math.sqrt(0.5 * 2 / 3))
    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 2\], got values in \[0, 3\]"):
        M.confusion_matrix(np.array([0, 1]), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match=r"square \(K, K\)"):
        M.one_vs_rest_counts(np.zeros((2, 3)))


def test_agrees_with_scikit_learn_on_random_predictions():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 6, 300), rng.integers(0, 5, 300)  # class 5 never predicted
    cm = M.confusion_matrix(y, p, 6)
    assert cm.tolist() == sk.confusion_matrix(y, p, labels=range(6)).tolist()
    prec, rec, f1, _ = sk.precision_recall_fscore_support(y, p, labels=range(6), zero_division=0)
    out = M.imbalance_metrics(cm, np.arange(6, 0, -1))
    assert out["precision"] == pytest.approx(prec.mean()) and out["recall"] == pytest.approx(rec.mean())
    assert out["f1"] == pytest.approx(f1.mean())


def test_accuracy_report_keeps_its_keys_and_adds_the_metrics():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 0, 0, 1, 1, 0, 1])  # exactly CM
    logits = torch.nn.functional.one_hot(pred, 3).float()
    r = accuracy_report(logits, labels, np.array([50, 20, 5]), many_threshold=30, few_threshold=10)
    assert r["top1"] == pytest.approx(50.0) and r["per_class"] == pytest.approx([75.0, 50.0, 0.0])
    assert r["many"] == pytest.approx(75.0) and r["medium"] == pytest.approx(50.0) and r["few"] == pytest.approx(0.0)
    assert r["confusion_matrix"] == CM.tolist()
    assert r["iba"] == pytest.approx(M.iba_per_class(CM).mean())
    assert r["cumulative_false_positives"] == [3, 5, 5]
