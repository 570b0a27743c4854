"""The config tree: presets, files, dotted overrides, unknown keys and wrong types rejected."""

import pytest

from engine.config import (
    Config,
    ConfigError,
    available_presets,
    config_from_dict,
    load_config,
    parse_override,
    to_dict,
    to_yaml,
)


def test_default_is_the_digits_preset():
    cfg = load_config()
    assert cfg.method == "eo_uc" and cfg.data.format == "digits_lt"
    assert "digits-lt" in available_presets()


def test_overrides_are_typed():
    cfg = load_config(overrides=["method=ce", "seed=3", "epochs=5", "data.imbalance_ratio=10",
                                 "data.imbalance_profile=step", "optim.milestones=[2, 4]", "data.hflip=true"])
    assert (cfg.method, cfg.seed, cfg.epochs) == ("ce", 3, 5)
    assert cfg.data.imbalance_ratio == 10.0 and isinstance(cfg.data.imbalance_ratio, float)
    assert cfg.data.imbalance_profile == "step" and cfg.optim.milestones == [2, 4] and cfg.data.hflip is True


def test_bare_on_off_reach_string_keys():
    cfg = load_config(overrides=["run.compile=on", "run.channels_last=off", "optim.fused=auto"])
    assert (cfg.run.compile, cfg.run.channels_last, cfg.optim.fused) == ("on", "off", "auto")


def test_parse_override():
    assert parse_override("optim.lr=0.05") == {"optim": {"lr": 0.05}}
    with pytest.raises(ConfigError, match="not of the form dotted.key=value"):
        parse_override("optim.lr")


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.lrr=0.1", r"unknown config key 'optim.lrr' \(expected one of: batch_size, lr,"),
        ("colour=red", r"unknown config key 'colour'"),
        ("epochs=abc", r"config key 'epochs' expects an integer, got 'abc'"),
        ("epochs=2.5", r"config key 'epochs' expects an integer, got 2.5"),
        ("data.hflip=maybe", r"config key 'data.hflip' expects true/false"),
        ("optim.lr=fast", r"config key 'optim.lr' expects a number"),
        ("optim.milestones=3", r"config key 'optim.milestones' expects a list"),
        ("data=3", r"config section 'data' expects a mapping"),
        ("method=focus", r"config key 'method' = 'focus' is invalid: expected one of ce, ce_bias, eo"),
        ("data.imbalance_profile=linear", r"expected one of exp, step"),
        ("rescale.in_loop=true", r"rescale.in_loop.*expected method=wvn"),
        ("optim.warmup_epochs=30", r"0 ≤ warmup < epochs"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


def test_unknown_preset_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope' \\(available: .*digits-lt"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(config_file=bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(config_file=bad)
    bad.write_text("optim:\n  momentom: 0.9\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.momentom'"):
        load_config(config_file=bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(config_file=tmp_path / "missing.yaml")


def test_yaml_tags_are_not_executed(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("method: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config_file=evil)


def test_round_trip(tmp_path):
    cfg = load_config(overrides=["method=wvn", "rescale.in_loop=true", "rescale.gamma=0.3"])
    assert config_from_dict(to_dict(cfg)) == cfg
    f = tmp_path / "c.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(None, f) == cfg
    assert Config() != cfg
