"""`engine study` (engine/experiments/study.py): a tiny study end to end, claims derived from the JSON, runs re-used."""

import json
import math

import numpy as np
import pytest
from helpers import call_without_training, tiny

import engine.train as train_mod
from engine.cli import main
from engine.experiments import study

pytestmark = pytest.mark.slow  # every test here trains runs end to end


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, digits_cache):
    out = tmp_path_factory.mktemp("study") / "s"
    # The study sets the imbalance ratio and the epochs itself (--ratios / --epochs).
    overrides = [o for o in tiny(digits_cache) if not o.startswith(("data.imbalance_ratio=", "epochs="))]
    args = ["study", "--out", str(out), "--seeds", "0", "--ratios", "10", "--profiles", "exp", "--epochs", "1",
            *overrides]
    assert main(args) == 0
    return out, args


def _load(out):
    return json.loads((out / "study.json").read_text())


def test_writes_tables_json_and_png(tiny_study):
    out, _ = tiny_study
    summary = _load(out)
    assert (out / "rs_gamma_exp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "runs/" in (out / ".gitignore").read_text().split()
    (setting,) = summary["settings"]
    assert setting["name"] == "exp-if10" and setting["class_counts"] == [30, 23, 17, 13, 10, 8, 6, 5, 3, 3]
    assert set(setting["rows"]) == set(study.ROWS)
    for row in setting["rows"].values():
        assert [r["seed"] for r in row["runs"]] == [0]
        for group in study.GROUPS:  # tiny(): many > 20, few < 5: every group is populated
            assert row["test"][group]["mean"] == pytest.approx(row["runs"][0]["test"][group])
        assert row["test_error"]["mean"] == pytest.approx(100 - row["test"]["top1"]["mean"])
    # Post-hoc choices come from the validation split: the chosen γ has the best val top-1 of the sweep.
    curve = setting["rs_curves"]["ce"]
    chosen = setting["rows"]["ce_rs"]["runs"][0]["chosen"]["gamma"]
    best_val_err = min(curve["val_error_mean"])
    assert curve["val_error_mean"][curve["gamma"].index(chosen)] == pytest.approx(best_val_err)
    assert curve["gamma"].index(chosen) == curve["val_error_mean"].index(best_val_err)  # ties → smaller γ
    assert setting["rows"]["ce_rs"]["runs"][0]["test"]["top1"] == pytest.approx(
        100 - curve["test_error_mean"][curve["gamma"].index(chosen)])
    # γ = 0 is the plain ce model.
    assert curve["test_error_mean"][0] == pytest.approx(setting["rows"]["ce"]["test_error"]["mean"])

    md = (out / "study.md").read_text()
    assert summary["command"] in md and summary["command"].startswith("engine study --out ")
    assert "| method | many | medium | few | all |" in md  # EO Table 3 shape
    assert "| method | exp-if10 |" in md  # WVN Table 1 shape (settings as columns, test error)
    for key in study.ROWS:
        assert f"| {study.LABELS[key]} |" in md
    assert "rs_gamma_exp.png" in md


def test_claims_are_derived_from_the_json_numbers(tiny_study):
    out, _ = tiny_study
    summary = _load(out)
    claims = summary["claims"]
    md = (out / "study.md").read_text()
    section = md.split("## Claims check", 1)[1]
    for key in "abcd":
        verdict = claims["overall"][key]["verdict"]
        assert verdict in ("holds", "fails", "n/a")
        assert f"| ({key}) {claims['statements'][key]} | **{verdict}** |" in section

    (setting,) = summary["settings"]
    rows = setting["rows"]
    # (c) recomputed by hand from the mean test top-1 in the JSON.
    top1 = {m: rows[m]["test"]["top1"]["mean"] for m in ("eo_uc", "eo", "uc_only", "ce")}
    holds_c = top1["eo_uc"] > top1["eo"] > top1["uc_only"] > top1["ce"]
    assert claims["overall"]["c"]["verdict"] == ("holds" if holds_c else "fails")
    assert claims["per_setting"]["exp-if10"]["c"]["verdict"] == claims["overall"]["c"]["verdict"]
    # (a) recomputed from the recorded trained bias and the class counts.
    (run,) = setting["ce_bias"]
    r = float(np.corrcoef(run["bias"], [math.log(n) for n in run["class_counts"]])[0, 1])
    assert run["pearson_r"] == pytest.approx(r)
    assert claims["overall"]["a"]["verdict"] == ("holds" if r >= study.R_MIN else "fails")
    # (d) from the means as well (≥ order).
    d = [rows[m]["test"]["top1"]["mean"] for m in ("wvn_rs", "ce_rs", "ce")]
    assert claims["overall"]["d"]["verdict"] == ("holds" if d[0] >= d[1] >= d[2] else "fails")


def _setting(name, top1, few):
    stat = lambda v: None if v is None else {"mean": v, "std": 0.0, "n": 1}  # noqa: E731
    rows = {m: {"test": {"top1": stat(top1.get(m, 50.0)), "few": stat(few.get(m, 10.0) if few else None)}}
            for m in study.ROWS}
    return {"name": name, "rows": rows, "ce_bias": [{"pearson_r": 0.9}, {"pearson_r": None}]}


def test_check_claims_verdicts_follow_the_numbers():
    good = _setting("s1", {"eo_uc": 80, "eo": 70, "uc_only": 60, "ce": 50, "wvn_rs": 75, "ce_rs": 75},
                    {"ce": 0, "eo_uc": 40, "eo": 30})
    bad = _setting("s2", {"eo_uc": 60, "eo": 70, "uc_only": 60, "ce": 50, "wvn_rs": 40, "ce_rs": 45}, None)
    c = study.check_claims([good, bad])
    assert {k: v["verdict"] for k, v in c["per_setting"]["s1"].items()} == dict.fromkeys("abcd", "holds")
    assert {k: v["verdict"] for k, v in c["per_setting"]["s2"].items()} == \
        {"a": "holds", "b": "n/a", "c": "fails", "d": "fails"}
    assert c["overall"]["b"]["settings"] == ["s1"] and c["overall"]["b"]["verdict"] == "holds"
    assert c["overall"]["c"]["top1"]["eo_uc"] == pytest.approx(70.0)  # mean over settings
    assert c["overall"]["a"]["mean_r"] == pytest.approx(0.9)  # runs without a bias are left out
    assert c["settings_count"]["d"] == {"holds": 1, "fails": 1, "n/a": 0}


def test_second_call_reuses_finished_runs_and_resumes_unfinished(tiny_study, monkeypatch):
    out, args = tiny_study
    metrics = sorted((out / "runs").glob("*/*/seed*/metrics.json"))
    assert len(metrics) == len(study.TRAINED)
    before = {p: p.stat().st_mtime_ns for p in metrics}
    ckpt_before = {p: (p.parent / "last.pt").stat().st_mtime_ns for p in metrics}

    call_without_training(monkeypatch, args)
    runs = _load(out)["runs"]
    assert (runs["trained"], runs["reused"], runs["train_seconds"]) == (0, len(study.TRAINED), 0.0)
    assert runs["train_seconds_all_runs"] > 0  # the first call's training time, kept with each run
    assert {p: p.stat().st_mtime_ns for p in metrics} == before
    assert {p: (p.parent / "last.pt").stat().st_mtime_ns for p in metrics} == ckpt_before

    # An interrupted run (no metrics.json yet) is resumed from its checkpoint, not started over.
    victim = out / "runs" / "exp-if10" / "eo_uc" / "seed0"
    (victim / "metrics.json").unlink()
    calls = []
    real_train = train_mod.train
    monkeypatch.setattr(train_mod, "train", lambda cfg, d, resume=False: calls.append(resume) or real_train(cfg, d, resume))
    assert main(args) == 0
    assert calls == [True]
    assert _load(out)["runs"]["trained"] == 1 and (victim / "metrics.json").is_file()


def test_a_finished_run_with_another_config_is_not_reused(tiny_study, capsys):
    out, args = tiny_study
    assert main([*args, "optim.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "trained with another config: optim.lr: " in err and "→ 0.01" in err, err
