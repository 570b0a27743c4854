"""Config keys declared once (engine/config.py `key(...)`): the checks, the resume / eval / sweep re-use
rules, `--print-config` and README's key table all come from those declarations; loading a config
stays free of torch and Triton."""

import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import (
    ConfigError,
    changeable_keys,
    eval_changes,
    key_table,
    load_config,
    resume_changes,
    reuse_differences,
    to_dict,
    with_current_keys,
)

REPO = Path(__file__).resolve().parents[1]


def test_readme_key_table_is_the_declarations():
    assert key_table() in (REPO / "README.md").read_text(), "README's config key table differs: paste key_table()"


def test_loading_a_config_imports_neither_torch_nor_triton_nor_the_models():
    code = ("import sys, engine.config as c; c.load_config(overrides=['model.arch=resnet50', 'data.sampler=sqrt']); "
            "print(sorted(m for m in ('torch', 'triton', 'engine.models', 'pipelines.samplers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_arch_and_sampler_names_are_the_builders():
    from engine.archs import ARCH_NAMES
    from engine.models import ARCHS
    from pipelines.samplers import SAMPLERS  # the module that builds the samplers re-exports the names

    assert tuple(ARCHS) == ARCH_NAMES
    assert SAMPLERS == ("instance", "class_aware", "sqrt", "progressive")


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1"])
def test_momentum_outside_zero_one_is_refused_in_one_line(value):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[f"optim.momentum={value}"])
    assert str(info.value) == (f"config key 'optim.momentum' = {float(value)!r} is invalid: "
                               "expected a number in [0, 1)")
    assert load_config(overrides=["optim.momentum=0"]).optim.momentum == 0


def test_verify_images_may_change_on_resume_the_arch_may_not():
    saved = to_dict(load_config())
    ok, refused = resume_changes(saved, load_config(overrides=["data.verify_images=off", "model.arch=resnet8_cifar"]))
    assert ok == ["data.verify_images"] and refused == ["model.arch"]
    assert "data.verify_images" in changeable_keys("resume")


def test_eval_may_change_the_device_a_resume_may_not():
    saved = to_dict(load_config())
    cfg = load_config(overrides=["run.device=cpu", "eval.batch_size=7", "optim.lr=0.3"])
    assert resume_changes(saved, cfg) == (["eval.batch_size"], ["optim.lr", "run.device"])
    assert eval_changes(saved, cfg) == (["eval.batch_size", "run.device"], ["optim.lr"])
    assert "run.device" in changeable_keys("eval") and "run.device" not in changeable_keys("resume")


def test_sweep_reuse_ignores_only_the_keys_declared_so():
    saved = to_dict(load_config())
    assert reuse_differences(saved, load_config(overrides=["run.threads=3", "run.progress=false"])) == {}
    lr = saved["optim"]["lr"]
    assert reuse_differences(saved, load_config(overrides=["run.threads=3", "optim.lr=0.3"])) == {"optim.lr": (lr, 0.3)}


def test_a_saved_config_written_before_a_key_existed_compares_with_that_key_at_its_default():
    saved = to_dict(load_config())
    del saved["loss"]["wvn_placement"]  # a run trained before the key was declared had the default's behaviour
    assert reuse_differences(saved, load_config()) == {}
    assert eval_changes(with_current_keys(saved), load_config(overrides=["eval.batch_size=7"])) == (
        ["eval.batch_size"], [])
    changed = load_config(overrides=["loss.wvn_placement=before_step"])
    assert reuse_differences(saved, changed) == {"loss.wvn_placement": ("after_step", "before_step")}


def test_print_config_notes_the_scaled_lr(capsys):
    from engine.cli import main

    assert main(["train", "--print-config", "optim.lr=0.1", "optim.batch_size=64", "optim.lr_base_batch=256"]) == 0
    out = capsys.readouterr().out
    assert "  lr: 0.1  # effective 0.025 = 0.1 × batch 64 / lr_base_batch 256\n" in out
    assert main(["train", "--print-config", "optim.lr=0.1"]) == 0
    assert "  lr: 0.1\n" in capsys.readouterr().out  # no scaling: nothing noted


def test_a_key_range_must_be_one_the_checks_read():
    from engine.config_rules import in_range, key

    with pytest.raises(ValueError, match="not of the form"):
        key(0.5, range="0 to 1")
    assert in_range(0.0, "[0, 1)") and not in_range(1.0, "[0, 1)") and in_range(1.0, "(0, 1]")
    assert not in_range(0, "> 0") and in_range(0, ">= 0") and not in_range(2**63, "[0, 2^63)")
