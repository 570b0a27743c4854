"""The run report (report.md + PNGs) from short CPU runs of the baseline methods, and `engine compare`."""

import json

import pytest
from helpers import tiny

from engine.cli import main

pytestmark = pytest.mark.slow  # every test here trains runs end to end

PLOTS = ("curves.png", "per_class.png", "cumulative_fp.png", "confusion.png")
DIAGNOSTIC_PLOTS = ("prior.png", "offsets.png", "weight_norms.png")


@pytest.fixture(scope="module")
def ldam_run(tmp_path_factory, digits_cache):
    out = tmp_path_factory.mktemp("report") / "ldam"
    assert main(["train", "--out", str(out), *tiny(digits_cache), "method=ldam_drw", "loss.drw_epoch=1",
                 "eval.diagnostics=pass"]) == 0
    return out


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
