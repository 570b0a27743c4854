"""Post-hoc calibration (engine/posthoc.py): formulas, choice on val, frozen backbone, CLI."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny

from engine import posthoc as C
from engine.cli import main
from engine.evaluate import accuracy_report
from engine.runs import load_run, split_features

COUNTS = np.array([50, 20, 5, 2])


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_cache):
    out = tmp_path_factory.mktemp("calib") / "ce_bias"
    assert main(["train", "--out", str(out), *tiny(digits_cache), "method=ce_bias", "eval.diagnostics=false"]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(run):
    return load_run(run / "last.pt")


def test_formulas_against_direct_float64():
    g = torch.Generator().manual_seed(0)
    w, z = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    for k in range(4):
        norm = math.sqrt(sum(v * v for v in w[k].tolist()))
        assert C.tau_norm_weight(w, 0.7)[k].tolist() == pytest.approx([v / norm**0.7 for v in w[k].tolist()])
        assert C.rs_weight(w, COUNTS, 0.3)[k].tolist() == pytest.approx([v * (50 / COUNTS[k]) ** 0.3 for v in w[k].tolist()])
    assert C.tau_norm_weight(w, 1.0).norm(dim=1).tolist() == pytest.approx([1.0] * 4)
    adj = C.logit_adjust(z, COUNTS, 1.5)
    for i in range(5):
        assert adj[i].tolist() == pytest.approx([z[i, k].item() - 1.5 * math.log(COUNTS[k] / 77) for k in range(4)])


def test_tau_norm_drops_the_classifier_bias():
    """Kang et al.'s τ-normalized classifier is w̃·f with w̃_k = w_k/‖w_k‖^τ and no bias term."""
    from engine.heads import Head

    torch.manual_seed(0)
    head = Head(3, 4, "ce_bias")
    with torch.no_grad():
        head.bias.copy_(torch.tensor([5.0, -1.0, 2.0, 0.5]))
    f, w = torch.randn(6, 3), head.weight.detach()
    for tau in (0.0, 0.6, 1.0):
        got = C.calibrated_logits("tau_norm", head, f, tau, COUNTS)
        torch.testing.assert_close(got, f @ (w / w.norm(dim=1, keepdim=True) ** tau).t())
    # RS keeps it: the bias is part of the trained classifier there.
    torch.testing.assert_close(C.calibrated_logits("rs", head, f, 0.0, COUNTS), f @ w.t() + head.bias.detach())


def test_class_aware_batches_balance_the_classes():
    labels = torch.as_tensor(np.repeat(np.arange(4), COUNTS))
    idx = torch.cat(C.class_aware_batches(labels, 4, 16, seed=0, epoch=0))
    assert len(idx) == len(labels)
    per_class = np.bincount(labels[idx].numpy(), minlength=4)
    assert per_class.max() - per_class.min() <= 1  # p_k = 1/K, not ∝ n_k
    assert not torch.equal(idx, torch.cat(C.class_aware_batches(labels, 4, 16, seed=0, epoch=1)))


@pytest.mark.parametrize("method,values", [("tau_norm", [0.0, 0.5, 1.0]), ("logit_adjust", [0.0, 1.0]),
                                           ("rs", [0.0, 0.5])])
@pytest.mark.slow
def test_sweeps_match_the_direct_formula_and_choose_on_val(loaded, method, values):
    data, model = loaded.data, loaded.model
    res = C.calibrate(loaded, method, values)
    feats = split_features(loaded)
    w, b = model.head.weight.detach().double(), model.head.bias.detach().double()
    prior = np.log(data.class_counts / data.class_counts.sum())
    for row, v in zip(res["rows"], values):
        for split in ("val", "test"):
            f = feats[split].features.double()
            if method == "tau_norm":  # Kang et al.'s τ-normalized classifier has no bias
                z = f @ (w / w.norm(dim=1, keepdim=True) ** v).t()
            elif method == "rs":
                z = f @ (w * torch.as_tensor((data.class_counts.max() / data.class_counts) ** v)[:, None]).t() + b
            else:
                z = f @ w.t() + b - v * torch.as_tensor(prior)
            direct = accuracy_report(z, feats[split].labels, data.class_counts, 20, 5)
            assert row[split]["top1"] == pytest.approx(direct["top1"]), (method, v, split)
    best = max(res["rows"], key=lambda r: (r["val"]["top1"], -r[C.PARAM_NAME[method]]))
    assert res["chosen"] == best[C.PARAM_NAME[method]] and res["test"]["top1"] == best["test"]["top1"]
    if method != "tau_norm":  # τ-norm drops the bias even at τ = 0
        assert res["rows"][0]["test"]["top1"] == pytest.approx(res["before"]["test"]["top1"])  # 0 = unchanged


@pytest.mark.slow
@pytest.mark.parametrize("method", ["crt", "lws"])
def test_retraining_keeps_the_backbone_and_bn_statistics_bitwise(loaded, method):
    model = loaded.model
    model.train()  # even a model left in train mode: the second stage must not touch BN statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = C.calibrate(loaded, method, epochs=4, lr=0.05, batch_size=32)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any("running_mean" in k for k in before)  # there are BN statistics to protect
    assert [r["epoch"] for r in res["rows"]] == [1, 2, 3, 4]
    assert all(math.isfinite(r["train_loss"]) for r in res["rows"])
    best = max(res["rows"], key=lambda r: (r["val"]["top1"], -r["epoch"]))
    assert res["chosen"] == best["epoch"] and res["val"]["top1"] == best["val"]["top1"]
    if method == "crt":
        assert np.asarray(res["learned"]["weight"]).shape == (10, model.head.weight.shape[1])
        assert res["rows"][-1]["train_loss"] < res["rows"][0]["train_loss"]  # it learns
    else:
        scales = np.asarray(res["learned"]["scales"])
        assert scales.shape == (10,) and not np.allclose(scales, 1.0)  # the scales moved


@pytest.mark.slow
def test_calibrate_cli_writes_json_and_png(run, capsys):
    assert main(["calibrate", "--checkpoint", str(run / "last.pt"), "--method", "logit_adjust", "--sweep", "0:1:0.5"]) == 0
    res = json.loads((run / "calibrate_logit_adjust.json").read_text())
    assert [r["tau"] for r in res["rows"]] == [0.0, 0.5, 1.0] and "confusion_matrix" in res["test"]
    assert (run / "calibrate_logit_adjust.png").stat().st_size > 0
    assert "chosen tau" in capsys.readouterr().out
    assert main(["calibrate", "--checkpoint", str(run / "last.pt"), "--method", "crt", "--sweep", "0:1:0.5"]) == 2
    assert "--sweep goes with --method" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(run / "last.pt"), "--method", "lws", "--epochs", "0"]) == 2
    assert "--epochs must be an integer > 0, got 0" in capsys.readouterr().err  # checked before loading
