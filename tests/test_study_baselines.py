"""`engine study --suite baselines` (engine/experiments/study_baselines.py): a tiny grid end to end, val choices,
EO+UC − best baseline, runs re-used; the paired t interval and the best-baseline choice on their own."""

import json
import math

import pytest
from helpers import call_without_training, tiny

import engine.train as train_mod
from engine.cli import main
from engine.experiments import study_baselines, study_baselines_report, study_design
from engine.experiments.study_baselines_report import chosen_text

ROWS = ["ce", "logit_adjusted", "eo_uc", "ce_rs", "lws"]
TINY_GRIDS = {"logit_adjusted": {"loss.logit_adjust_tau": (0.5, 1.0)},
              "eo_uc": {"loss.lambda_center": (0.1, 1.0), "loss.lambda_uniform": (1.0,)}}


@pytest.fixture(scope="module")
def tiny_grids():
    """Two points for each gridded method of ROWS (the declared grids train 3 and 6)."""
    with pytest.MonkeyPatch.context() as m:
        for method, grid in TINY_GRIDS.items():
            m.setitem(study_design.BASELINE_GRIDS, method, grid)
        yield


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory, digits_cache, tiny_grids):
    out = tmp_path_factory.mktemp("baselines") / "b"
    overrides = [o for o in tiny(digits_cache) if not o.startswith(("data.imbalance_ratio=", "epochs="))]
    args = ["study", "--suite", "baselines", "--out", str(out), "--seeds", "0", "--splits", "exp-if10",
            "--methods", ",".join(ROWS), "--epochs", "1", *overrides]
    assert main(args) == 0
    return out, args


def _load(out):
    return json.loads((out / "baselines.json").read_text())


@pytest.mark.slow  # trains 5 tiny runs (a few seconds)
def test_table_has_every_row_with_its_val_choice_and_the_paired_difference(tiny_suite):
    out, _ = tiny_suite
    summary = _load(out)
    assert (out / "baselines.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["command"].startswith("engine study --suite baselines --out ")
    (st,) = summary["settings"]
    assert st["name"] == "exp-if10" and list(st["rows"]) == ROWS
    md = (out / "baselines.md").read_text()
    assert "| method | many | medium | few | all | val all | chosen on val |" in md
    for key, row in st["rows"].items():
        assert [r["seed"] for r in row["runs"]] == [0]
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {study_design.BASELINE_LABELS[key]} |"))
        text = chosen_text(row)
        assert line.endswith(f"| {text} |"), line
        if key in TINY_GRIDS:
            assert text == row["chosen_point"] and "=" in text
        elif key in study_design.BASELINE_POSTHOC:
            assert text.startswith(f"{row['parameter']} ") and row["runs"][0]["chosen"] == row["chosen"]["mean"]
        else:
            assert text == "–"  # ce: no grid, the preset's values
    # A gridded method reports the point with the best val top-1 (ties: the earlier point), every point trained.
    for method, grid in TINY_GRIDS.items():
        points = st["rows"][method]["grid"]
        assert len(points) == math.prod(len(v) for v in grid.values())
        best = max(points, key=lambda p: p["val_top1"]["mean"])
        assert st["rows"][method]["chosen_point"] == best["point"]
        assert st["rows"][method]["test"]["top1"] == best["test_top1"]
    # Post-hoc rows calibrate the ce checkpoint; their parameter is chosen on val per seed.
    assert st["rows"]["lws"]["parameter"] == "epoch" and st["rows"]["ce_rs"]["parameter"] == "gamma"
    # EO+UC − the baseline with the best val top-1, on test, paired over seeds.
    cmp = st["ours_vs_best"]
    baselines = [k for k in ROWS if k != "eo_uc"]
    best = max(baselines, key=lambda k: st["rows"][k]["val"]["top1"]["mean"])
    assert cmp["best_baseline"] == best
    expected = st["rows"]["eo_uc"]["runs"][0]["test"]["top1"] - st["rows"][best]["runs"][0]["test"]["top1"]
    assert cmp["top1"]["mean"] == pytest.approx(expected) and cmp["top1"]["ci95"] is None  # one seed
    assert f"EO+UC − best baseline ({study_design.BASELINE_LABELS[best]}, best by mean val top-1)" in md
    assert f"all {expected:+.2f} (1 seed: no interval)" in md
    assert "Wall time of this invocation: " in md and "(5 runs: 5 trained, 0 re-used;" in md


@pytest.mark.slow  # trains 5 tiny runs (a few seconds)
def test_second_call_reuses_finished_runs_and_resumes_a_killed_one(tiny_suite, tiny_grids, monkeypatch):
    out, args = tiny_suite
    metrics = sorted((out / "runs").glob("*/*/*/seed*/metrics.json"))
    assert len(metrics) == 1 + 2 + 2  # ce, logit_adjusted × 2, eo_uc × 2 (post-hoc rows train nothing)
    before = {p: p.stat().st_mtime_ns for p in metrics}

    call_without_training(monkeypatch, args)
    runs = _load(out)["runs"]
    assert (runs["trained"], runs["reused"], runs["train_seconds"]) == (0, len(metrics), 0.0)
    assert runs["train_seconds_all_runs"] > 0
    earlier = _load(out)["earlier_invocations"]  # the call that trained them stays in the report
    assert [(e["trained"], e["reused"]) for e in earlier] == [(5, 0)]
    assert f"earlier invocations into this folder: {earlier[0]['wall_seconds'] / 60:.1f} min (5 trained, 0 re-used)" in (
        out / "baselines.md").read_text()
    assert {p: p.stat().st_mtime_ns for p in metrics} == before

    victim = metrics[-1]
    victim.unlink()
    calls = []
    real_train = train_mod.train
    monkeypatch.setattr(train_mod, "train", lambda cfg, d, resume=False: calls.append(resume) or real_train(cfg, d, resume))
    assert main(args) == 0
    assert calls == [True] and victim.is_file() and _load(out)["runs"]["trained"] == 1


def test_paired_difference_has_a_t_interval():
    d = study_baselines.paired_difference([3.0, 5.0, 7.0, None], [2.0, 3.0, 4.0, 1.0])  # diffs 1, 2, 3
    assert (d["mean"], d["std"], d["n"]) == (2.0, 1.0, 3)
    half = 4.303 / math.sqrt(3)  # t_{0.975, 2}
    assert d["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert study_baselines.paired_difference([1.0], [0.5])["ci95"] is None
    assert study_baselines.paired_difference([None], [0.5]) is None
    assert study_baselines.t_975(30) == 2.042 and study_baselines.t_975(60) == pytest.approx(2.000, abs=1e-3)


def test_best_baseline_is_chosen_on_val_not_test():
    def row(val, test, seeds=(0, 1)):
        return {"val": {"top1": {"mean": val}}, "runs": [{"seed": s, "test": {"top1": test + s, "few": None}}
                                                          for s in seeds]}
    rows = {"ce": row(60, 90), "focal": row(70, 50), "eo": row(99, 99), "eo_uc": row(65, 55)}
    cmp = study_baselines.compare_with_best(rows, [0, 1])
    assert cmp["best_baseline"] == "focal"  # best val; ce has the better test, eo is EO+UC's own family
    assert cmp["top1"]["diffs"] == [5.0, 5.0] and cmp["few"] is None
    assert study_baselines.compare_with_best({k: rows[k] for k in ("ce", "focal")}, [0, 1]) is None


def test_few_shot_comparison_takes_the_baseline_best_on_val_few_and_the_verdict_reads_the_interval():
    def row(val_all, val_few, few):
        return {"val": {"top1": {"mean": val_all}, "few": None if val_few is None else {"mean": val_few}},
                "runs": [{"seed": s, "test": {"top1": 50.0, "few": few + s}} for s in (0, 1, 2)]}
    rows = {"ce": row(80, 10, 10), "cb_ce": row(70, 40, 30), "wvn": row(75, None, 0), "eo_uc": row(75, 30, 35)}
    cmp = study_baselines.compare_with_best(rows, [0, 1, 2], "few")
    assert cmp["best_baseline"] == "cb_ce" and cmp["chosen_by"] == "mean val few"
    assert cmp["few"]["diffs"] == [5.0, 5.0, 5.0]
    assert study_baselines.compare_with_best(rows, [0, 1, 2])["best_baseline"] == "ce"
    verdict = study_baselines_report.verdict
    assert [verdict({"ci95": ci}) for ci in ([0.5, 2.0], [-2.0, -0.1], [-1.0, 1.0], None)] == [
        "ahead", "behind", "level", "n/a"]
    assert verdict(None) == "n/a"


def test_splits_methods_and_grids():
    assert study_baselines.parse_splits("exp-if50, step-if10") == [("exp", 50.0), ("step", 10.0)]
    for bad in ("exp50", "tri-if10", "exp-ifx", ""):
        with pytest.raises(study_baselines.ConfigError):
            study_baselines.parse_splits(bad)
    rows, trained = study_baselines.resolve_rows(["wvn_rs", "eo_uc"])
    assert rows == ["wvn", "eo_uc", "wvn_rs"] and trained == ["wvn", "eo_uc"]  # the base comes along
    assert [study_baselines.point_name(p) for p in study_baselines.grid_points("ldam_drw", 30)] == [
        "ldam_max_margin=0.3,drw_epoch=18", "ldam_max_margin=0.3,drw_epoch=24",
        "ldam_max_margin=0.5,drw_epoch=18", "ldam_max_margin=0.5,drw_epoch=24"]
    assert study_baselines.grid_points("ce", 30) == [{}]
    assert len(study_baselines.grid_points("ldam_drw", 1)) == 2  # ⌊0.6⌋ = ⌊0.8⌋ = 0: one point per margin


@pytest.mark.parametrize("args, expected", [
    (["--suite", "baselines", "--ratios", "10"], "--ratios: not an option of --suite baselines"),
    (["--methods", "ce"], "--methods: not an option of --suite ablation"),
    (["--suite", "baselines", "--methods", "ce,nope"], "--methods: unknown nope"),
])
def test_flags_of_the_other_suite_are_refused(args, expected, tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path / "o"), *args]) == 2
    assert expected in capsys.readouterr().err
