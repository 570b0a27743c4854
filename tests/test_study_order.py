"""`engine study --suite order` (engine/experiments/study_order.py): two tiny axes end to end — the runs each
level needs (ce keeps its base run along λ1), the order per level, the mechanism measures recomputed from a
checkpoint — and the pieces on their own."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny

from engine.checkpoint import load_checkpoint
from engine.cli import main
from engine.experiments import study_design, study_order

TINY_BASE = {**study_design.ORDER_BASE, "data.imbalance_ratio": 10.0, "data.n_max": 30}
TINY_AXES = {"imbalance": ("data.imbalance_ratio", (5.0, 10.0)), "λ1": ("loss.lambda_center", (0.01, 0.1))}


@pytest.fixture(scope="module")
def tiny_order(tmp_path_factory, digits_cache):
    out = tmp_path_factory.mktemp("order") / "o"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(study_design, "ORDER_BASE", TINY_BASE)
        m.setattr(study_design, "ORDER_AXES", TINY_AXES)
        overrides = [o for o in tiny(digits_cache) if not o.startswith(("data.imbalance_ratio=", "data.n_max=",
                                                                          "epochs="))]
        assert main(["study", "--suite", "order", "--out", str(out), "--seeds", "0", "--epochs", "2",
                     *overrides]) == 0
        yield out


@pytest.mark.slow  # trains 11 tiny runs (about half a minute)
def test_every_level_trains_each_method_once_and_ce_keeps_its_base_run_along_lambda1(tiny_order):
    out = tiny_order
    folders = sorted(str(p.parent.relative_to(out / "runs")) for p in (out / "runs").glob("*/*/seed0/metrics.json"))
    methods = study_design.ORDER_METHODS
    assert folders == sorted([*(f"base/{m}/seed0" for m in methods),
                              *(f"imbalance_ratio=5/{m}/seed0" for m in methods),
                              *(f"lambda_center=0.1/{m}/seed0" for m in methods if m != "ce")])
    summary = json.loads((out / "order.json").read_text())
    assert summary["runs"]["trained"] == 11 and summary["command"].startswith("engine study --suite order --out ")
    imbalance, lam = summary["axes"]
    assert [lv["text"] for lv in imbalance["levels"]] == ["5", "10"] and imbalance["levels"][1]["base"]
    assert lam["levels"][1]["cells"]["ce"] == lam["levels"][0]["cells"]["ce"]  # λ1 does not reach ce
    assert lam["levels"][0]["cells"]["eo"] == imbalance["levels"][1]["cells"]["eo"]  # the one base run
    for ax in summary["axes"]:
        for lv in ax["levels"]:
            top1 = {m: lv["cells"][m]["test"]["top1"]["mean"] for m in methods}
            assert [top1[m] for m in lv["order"]] == sorted(top1.values(), reverse=True)
            assert lv["paper_order"] == (lv["order"] == list(study_design.PAPER_ORDER))
            assert lv["eo_minus_uc_only"] == pytest.approx(top1["eo"] - top1["uc_only"])
    md = (out / "order.md").read_text()
    assert "## imbalance" in md and "## λ1" in md and "of 3 points" in md  # the base point counted once
    for png in ("order_accuracy.png", "order_mechanism.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # uses the tiny study's checkpoints
def test_mechanism_measures_are_the_checkpoints_offsets_against_log_n(tiny_order):
    run = tiny_order / "runs" / "base" / "eo_uc" / "seed0"
    state = load_checkpoint(run / "last.pt")
    w, c = state["model"]["head.weight"].double(), state["model"]["head.centers"].double()
    offset = 0.5 * (w * c).sum(1)
    log_n = np.log(state["class_counts"])
    got = study_order.mechanism(run)
    np.testing.assert_allclose(got["estimated_offset"], offset.numpy(), rtol=1e-5, atol=1e-6)
    assert got["estimated_offset_r"] == pytest.approx(np.corrcoef(offset.numpy(), log_n)[0, 1], abs=1e-5)
    p = torch.softmax(-offset, 0)
    assert got["offset_entropy"] == pytest.approx(float(-(p * p.log()).sum() / math.log(len(log_n))), abs=1e-5)
    np.testing.assert_allclose(got["weight_norm"], w.norm(dim=1).numpy(), rtol=1e-5)
    assert "estimated_offset" not in study_order.mechanism(tiny_order / "runs" / "base" / "ce" / "seed0")


def test_slope_and_points():
    x = np.log(np.array([100.0, 40.0, 10.0, 2.0]))
    assert study_order._slope(3.0 * x + 1.0, x) == pytest.approx(3.0)
    assert study_order.point_name("model.cifar_widths", [16, 32, 256]) == "cifar_widths=16-32-256"
    assert study_order.point_name("model.arch", study_design.ORDER_BASE["model.arch"]) == "base"
    assert study_order.run_point("ce", "loss.lambda_center", 1.0) == "base"
    assert study_order.run_point("uc_only", "loss.lambda_center", 1.0) == "lambda_center=1"
    names = study_order.points()
    assert list(names).count("base") == 1 and len(names) == 1 + sum(len(v) - 1 for _, v in study_design.ORDER_AXES.values())


@pytest.mark.parametrize("args, expected", [
    (["--arch", "resnet20_cifar"], "--arch: not an option of --suite order"),
    (["--splits", "exp-if10"], "--splits: not an option of --suite order"),
    (["--format", "cifar10_lt", "--root", "/x"], "--suite order runs on digits_lt"),
])
def test_order_suite_refuses_what_it_sets_itself(args, expected, tmp_path, capsys):
    assert main(["study", "--suite", "order", "--out", str(tmp_path / "o"), *args]) == 2
    assert expected in capsys.readouterr().err
