"""The run report (report.md + PNGs) from short CPU runs of the baseline methods, and `engine compare`."""

import json
import time

import numpy as np
import pytest
import torch
from helpers import tiny
from PIL import Image

from engine import report
from engine.cli import main
from engine.evaluate import ClassTally

PLOTS = ("curves.png", "per_class.png", "cumulative_fp.png", "confusion.png")
DIAGNOSTIC_PLOTS = ("prior.png", "offsets.png", "weight_norms.png")


@pytest.fixture(scope="module")
def ldam_run(  # trains end to end: only the slow tests use it
tmp_path_factory, digits_cache):
    out = tmp_path_factory.mktemp("report") / "ldam"
    assert main(["train", "--out", str(out), *tiny(digits_cache), "method=ldam_drw", "loss.drw_epoch=1",
                 "eval.diagnostics=pass"]) == 0
    return out


@pytest.mark.slow
def test_report_renders_every_plot(ldam_run):
    pngs = sorted(p.name for p in ldam_run.glob("*.png"))
    assert pngs == sorted(PLOTS + DIAGNOSTIC_PLOTS)
    for name in pngs:
        data = (ldam_run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    md = (ldam_run / "report.md").read_text()
    assert "# Run report: `ldam_drw`" in md and all(f"![{n}]({n})" in md for n in pngs)
    assert md.count("\n| ") >= 2 + 10  # summary rows (test, val) + one row per class
    metrics = json.loads((ldam_run / "metrics.json").read_text())
    for key in ("gm", "precision", "recall", "f1", "gmean", "iba", "confusion_matrix", "cumulative_false_positives"):
        assert metrics[key] is not None, key
    assert metrics["recall"] * 100 == pytest.approx(metrics["top1"])  # balanced test split
    assert sum(map(sum, metrics["confusion_matrix"])) == 80
    log = [json.loads(x) for x in (ldam_run / "metrics.jsonl").read_text().splitlines()]
    assert "val_confusion_matrix" not in log[0] and "val_iba" in log[0]  # epoch log keeps scalars only


@pytest.mark.slow
def test_compare_table_and_plot(ldam_run, tmp_path, digits_cache, capsys):
    other = tmp_path / "bs"
    assert main(["train", "--out", str(other), *tiny(digits_cache), "method=balanced_softmax", "epochs=1",
                 "eval.diagnostics=false"]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["compare", str(ldam_run), str(other), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "compare.md").read_text()
    for run_name, method in (("ldam", "ldam_drw"), ("bs", "balanced_softmax")):
        assert f"| {run_name} | {method} |" in md and f"| {run_name} | {method} |" in printed
    rows = json.loads((out / "compare.json").read_text())["runs"]
    assert rows[0]["top1"] == json.loads((ldam_run / "metrics.json").read_text())["top1"]
    assert (out / "compare.png").stat().st_size > 2000
    assert main(["compare", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def synthetic_metrics(k: int, seed: int = 0) -> dict:
    """A report of K classes (long-tailed training counts) as a run writes it, from random predictions."""
    rng = np.random.default_rng(seed)
    counts = np.maximum(1, (1280 * 0.5 ** (8 * np.arange(k) / k)).astype(int))
    y = np.repeat(np.arange(k), 3)
    p = np.where(rng.random(len(y)) < 0.6, y, rng.integers(0, k, len(y)))
    tally = ClassTally(k)
    tally.update(torch.as_tensor(p), torch.as_tensor(y))
    m = tally.report(counts, 100, 20)
    w = rng.normal(size=k)
    return {**m, "method": "eo_uc", "seed": 0, "epochs": 1, "class_counts": counts.tolist(), "val": {},
            "diagnostics": {"mode": "epoch", "source": "last training epoch", "images": int(counts.sum()),
                            "estimated_offset": w.tolist(), "empirical_offset": (w + 0.1).tolist(), "bias": None,
                            "weight_norm": (1 + rng.random(k)).tolist()}}


@pytest.mark.parametrize("k", [10, 1000, 8142])
def test_per_class_plots_stay_readable_at_many_classes(k, tmp_path):
    metrics = synthetic_metrics(k)
    assert (metrics["confusion_matrix"] is None) == (k > 2048)  # 8,142 classes: no K×K matrix was kept
    start = time.perf_counter()
    written = report.write_plots(tmp_path, [{"epoch": 1, "train_loss": 1.0, "val_top1": 5.0}], metrics)
    elapsed = time.perf_counter() - start
    names = {p.name for p in written}
    assert {"per_class.png", "cumulative_fp.png", "offsets.png", "weight_norms.png", "prior.png"} <= names
    assert ("confusion.png" in names) == (k <= 2048)
    for path in written:
        width, height = Image.open(path).size
        assert width <= 2400 and height <= 1200, (path.name, width, height)  # bars at 1000 classes would need 34,184 px
    assert elapsed < 120, elapsed  # seconds, on a 2-core CI machine
    md = (tmp_path / "report.md").read_text()
    assert ("## Per frequency bin" in md) == (k > 50)
    assert ("## Per class (most frequent first)" in md) == (k <= 1000)
    assert "eval.diagnostics=epoch" in md


def test_binned_views_sort_classes_by_training_frequency():
    counts = np.array([3, 50, 7, 50, 1, 20])
    order = np.argsort(-counts, kind="stable")
    groups = report.frequency_bins(order, bins=4)
    assert [g.tolist() for g in groups] == [[1, 3], [5, 2], [0], [4]]
    assert report._bin_label(groups[1], counts) == "n 7–20" and report._bin_label(groups[0], counts) == "n 50"
    assert len(report.frequency_bins(np.arange(8142))) == report.FREQUENCY_BINS
