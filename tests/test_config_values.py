"""Config numbers as people write them, and every range torch/numpy would reject caught up front."""

import pytest

from engine.config import ConfigError, load_config


@pytest.mark.parametrize("text,key,expected", [
    ("optim.lr=1e6", "lr", 1e6), ("optim.weight_decay=5e-4", "weight_decay", 5e-4),
    ("optim.lr=1.0e6", "lr", 1e6), ("optim.lr=+2E-3", "lr", 2e-3), ("optim.weight_decay=0", "weight_decay", 0.0),
])
def test_scientific_notation_overrides(text, key, expected):
    assert getattr(load_config(overrides=[text]).optim, key) == expected


def test_scientific_notation_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-1\n  weight_decay: 5e-4\nloss:\n  label_smoothing: 1.0e-1\nepochs: 3e1\n")
    cfg = load_config(config_file=path)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.loss.label_smoothing) == (0.1, 5e-4, 0.1)
    assert cfg.epochs == 30 and isinstance(cfg.epochs, int)  # an integral float is accepted where an int is expected


def test_negative_exponent_float_keeps_sign():
    assert load_config(overrides=["loss.lambda_center=3e-5"]).loss.lambda_center == 3e-5
    with pytest.raises(ConfigError, match=r"'loss.lambda_center' = -3e-05 is invalid: expected a number ≥ 0"):
        load_config(overrides=["loss.lambda_center=-3e-5"])


def test_strings_that_look_like_numbers_stay_strings():
    assert load_config(overrides=["run.device=cpu"]).run.device == "cpu"
    with pytest.raises(ConfigError, match="expects a number, got '1e'"):
        load_config(overrides=["optim.lr=1e"])


@pytest.mark.parametrize("override,key,expected", [
    ("eval.batch_size=0", "eval.batch_size", "an integer ≥ 1"),
    ("run.threads=-1", "run.threads", "an integer ≥ 0"),
    ("seed=-1", "seed", "an integer in [0, 2^63)"),
    ("optim.momentum=-1", "optim.momentum", "a number in [0, 1)"),
    ("optim.momentum=1", "optim.momentum", "a number in [0, 1)"),
    ("optim.weight_decay=-1", "optim.weight_decay", "a number ≥ 0"),
    ("data.imbalance_ratio=200", "data.imbalance_ratio", "a ratio ≤ 100"),
    ("eval.many_threshold=-5", "eval.many_threshold", "an integer ≥ 0"),
    ("optim.lr=.inf", "optim.lr", "a finite number"),
    ("rescale.gamma=.nan", "rescale.gamma", "a finite number"),
    ("optim.lr_decay=0", "optim.lr_decay", "a number in (0, 1]"),
])
def test_out_of_range_values_name_key_value_and_expectation(override, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert f"'{key}'" in message and expected in message and "\n" not in message


def test_resume_changes_split_allowed_from_refused():
    from engine.config import resume_changes, to_dict

    saved = to_dict(load_config())
    ok, refused = resume_changes(saved, load_config(overrides=["run.progress=false", "data.num_workers=2",
                                                               "eval.every=5", "epochs=40"]))
    assert ok == ["data.num_workers", "epochs", "eval.every", "run.progress"] and refused == []
    ok, refused = resume_changes(saved, load_config(overrides=["optim.lr=0.07", "run.progress=false", "epochs=10"]))
    assert ok == ["run.progress"] and refused == ["epochs", "optim.lr"]  # fewer epochs would change the schedule


def test_tf32_switch_is_on_for_cuda_and_refused_on_cpu():
    import torch

    from engine.device import resolve_speed

    cfg = load_config()
    assert resolve_speed(cfg, torch.device("cuda", 0)).tf32 is True  # auto: on for CUDA (timm, DLE)
    assert resolve_speed(cfg, torch.device("cpu")).tf32 is False
    assert resolve_speed(load_config(overrides=["run.tf32=off"]), torch.device("cuda", 0)).tf32 is False
    with pytest.raises(ConfigError, match="run.tf32=on needs CUDA"):
        resolve_speed(load_config(overrides=["run.tf32=on"]), torch.device("cpu"))
