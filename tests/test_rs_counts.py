"""RS counts: `rescale.counts = observed | profile`.

`profile` is the official AdjustBnd4Imbalance code's convention (cifar.py, --evaluate): it
re-scales by n_i = img_max·(1/IF)^(i/(C−1)) un-rounded, class i = label i, so the factor
(n_1/n_i)^γ is IF^(γ·i/(C−1)). The numbers below are worked out on paper from that formula.
"""

import json

import numpy as np
import pytest
import torch

from engine import posthoc as C
from engine.checkpoint import load_checkpoint
from engine.cli import main
from engine.config import Config, ConfigError, load_config
from engine.heads import rescale_factors
from pipelines.long_tail import long_tailed_counts, long_tailed_profile, profile_counts


def test_profile_is_the_unrounded_formula():
    # C = 3, n_max = 100, IF = 10: 100·10^(−i/2) = 100, 100/√10, 10.
    assert long_tailed_profile(3, 100, 10) == pytest.approx([100.0, 31.622776601683793, 10.0], rel=1e-15)
    assert long_tailed_counts(3, 100, 10) == [100, 31, 10]  # the split keeps int() of it
    # step, C = 4, IF = 8: 100, 100, 100/8, 100/8.
    assert long_tailed_profile(4, 100, 8, "step") == [100, 100, 12.5, 12.5]
    assert long_tailed_counts(4, 100, 8, "step") == [100, 100, 12, 12]
    assert profile_counts([100, 31, 10], 10) == pytest.approx([100.0, 31.622776601683793, 10.0], rel=1e-15)
    with pytest.raises(ValueError, match=r"training counts \[100, 30, 10\] are not the exp profile .* gives \[100, 31, 10\]"):
        profile_counts([100, 30, 10], 10)


def _cfg(fmt="digits_lt", ratio=10.0):
    cfg = Config()
    cfg.data.format, cfg.data.imbalance_ratio = fmt, ratio
    return cfg


@pytest.mark.parametrize("gamma,observed,profile", [
    # (n_1/n_i)^γ with n = (100, 31, 10) observed, (100, 100/√10, 10) profile
    (1.0, [1.0, 100 / 31, 10.0], [1.0, 3.1622776601683795, 10.0]),
    (0.5, [1.0, 1.796053020267749, 3.1622776601683795], [1.0, 1.7782794100389228, 3.1622776601683795]),
])
def test_rs_counts_observed_and_profile(gamma, observed, profile):
    counts = np.array([100, 31, 10])
    cfg = _cfg()
    assert cfg.rescale.counts == "observed"  # the default: the formula's own definition
    assert rescale_factors(C.rs_counts(cfg, counts), gamma).tolist() == pytest.approx(observed, rel=1e-14)
    assert rescale_factors(C.rs_counts(cfg, counts, "profile"), gamma).tolist() == pytest.approx(profile, rel=1e-14)
    cfg.rescale.counts = "profile"  # the config key selects it too
    w = torch.ones(3, 2, dtype=torch.float64)
    assert C.rs_weight(w, C.rs_counts(cfg, counts), gamma)[:, 0].tolist() == pytest.approx(profile, rel=1e-14)


def test_rs_counts_profile_needs_profile_data():
    with pytest.raises(C.CalibrationError, match="data.format in digits_lt, cifar10_lt, cifar100_lt.*split_files"):
        C.rs_counts(_cfg("split_files"), np.array([100, 31, 10]), "profile")
    with pytest.raises(C.CalibrationError, match="not the exp profile with imbalance ratio 50"):
        C.rs_counts(_cfg(ratio=50.0), np.array([100, 31, 10]), "profile")
    with pytest.raises(C.CalibrationError, match="RS counts must be one of observed, profile, got 'rounded'"):
        C.rs_counts(_cfg(), np.array([100, 31, 10]), "rounded")


def test_config_key_rescale_counts():
    assert load_config(overrides=["rescale.counts=profile"]).rescale.counts == "profile"
    with pytest.raises(ConfigError, match="rescale.counts' = 'rounded' is invalid: expected one of observed, profile"):
        load_config(overrides=["rescale.counts=rounded"])
    with pytest.raises(ConfigError, match="data.format in digits_lt, cifar10_lt, cifar100_lt"):
        load_config(overrides=["rescale.counts=profile", "data.format=split_files", "data.root=/x",
                               "data.train_split=a.txt", "data.val_split=b.txt"])
    with pytest.raises(ConfigError, match="rescale.in_loop=false"):
        load_config(overrides=["rescale.counts=profile", "method=wvn", "rescale.in_loop=true", "rescale.gamma=0.3"])


def test_engine_rescale_and_calibrate_with_profile_counts(trained, tmp_path, capsys):
    ckpt = str(trained / "last.pt")
    saved = tmp_path / "rs.pt"
    assert main(["rescale", "--checkpoint", ckpt, "--gamma", "0.5", "--counts", "profile", "--save", str(saved)]) == 0
    state = load_checkpoint(saved)
    assert state["class_counts"] == [30, 23, 17, 13, 10, 8, 6, 5, 3, 3] and state["rescaled_counts"] == "profile"
    # Tiny Digits-LT: C = 10, IF = 10 → factor 10^(0.5·i/9) = 10^(i/18); e.g. class 3: 10^(1/6) = 1.46780
    # (the observed count 13 would give (30/13)^0.5 = 1.51911).
    factors = [1.0, 1.1364636663857248, 1.2915496650148839, 1.4677992676220695, 1.6681005372000588,
               1.8957356524063758, 2.154434690031884, 2.4484367468222272, 2.7825594022071245, 3.1622776601683795]
    w0 = load_checkpoint(trained / "last.pt")["model"]["head.weight"]
    torch.testing.assert_close(state["model"]["head.weight"], w0 * torch.tensor(factors)[:, None])
    assert json.loads((trained / "calibrate_rs.json").read_text())["counts"] == "profile"
    capsys.readouterr()
    assert main(["rescale", "--checkpoint", str(saved), "--gamma", "0.5"]) == 2  # already re-scaled: refused
    assert "already holds a classifier re-scaled with γ = 0.5" in capsys.readouterr().err

    assert main(["rescale", "--checkpoint", ckpt, "--sweep", "0:1:0.5", "--counts", "profile"]) == 0
    assert json.loads((trained / "calibrate_rs.json").read_text())["counts"] == "profile"
    assert main(["calibrate", "--checkpoint", ckpt, "--method", "rs", "--sweep", "0:1:0.5", "--counts", "profile"]) == 0
    assert json.loads((trained / "calibrate_rs.json").read_text())["counts"] == "profile"

    capsys.readouterr()
    assert main(["calibrate", "--checkpoint", ckpt, "--method", "tau_norm", "--counts", "profile"]) == 2
    assert "--counts goes with --method rs, got --method tau_norm" in capsys.readouterr().err


@pytest.mark.parametrize("preset,ratio", [("cifar10-lt-resnet32", 100.0), ("cifar100-lt-resnet32", 100.0)])
def test_cifar_presets_rescale_post_hoc_as_the_authors_numbers(preset, ratio):
    """The authors' CIFAR WVN+RS numbers train WVN and re-scale once afterwards (γ chosen then), with the
    profile counts; Algorithm 1's in-loop RS stays one override away."""
    cfg = load_config(preset, overrides=["data.root=/data/cifar"])
    assert cfg.method == "wvn" and not cfg.rescale.in_loop and cfg.rescale.counts == "profile"
    assert cfg.data.imbalance_ratio == ratio
    in_loop = load_config(preset, overrides=["data.root=/data/cifar", "rescale.in_loop=true", "rescale.gamma=0.3",
                                             "rescale.counts=observed"])
    assert in_loop.rescale.in_loop and in_loop.rescale.gamma == 0.3
    with pytest.raises(ConfigError, match="rescale.in_loop=false"):  # profile counts are post-hoc only
        load_config(preset, overrides=["data.root=/data/cifar", "rescale.in_loop=true"])
