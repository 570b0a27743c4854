"""The training loop in-process on CPU: host syncs per step, NaN / divergence guards that keep the last good
checkpoint, run.max_steps, --print-config, optim.lr_base_batch, keep_last / save_best, resume rules,
run-folder errors and bad training images."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import yaml
from helpers import tiny, write_jpeg

import engine.eval_schedule as eval_schedule
import engine.train as train_mod
from engine.checkpoint import nonfinite_tensors
from engine.cli import main
from engine.config import effective_lr, load_config


def _tiny(cache, *extra: str) -> list[str]:
    return [*tiny(cache), "run.device=cpu", "run.threads=1", *extra]


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- host syncs


def test_loss_is_read_to_the_host_once_per_log_every_steps(tmp_path, digits_cache, monkeypatch):
    """Every .item() / .tolist() the engine's own code (engine/, kernels/, pipelines/) makes while the loop
    trains is counted (evaluation excluded; torchvision's CPU-side transforms in the loader are not the step):
    118 images / batch 8 = 14 steps an epoch, log_every=5 → reads after steps 5, 10 and at the epoch's end."""
    counts = {"n": 0}
    active = [False]
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist

    def counting(real):
        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if active[0] and any(f"{os.sep}{d}{os.sep}" in caller for d in ("engine", "kernels", "pipelines")):
                counts["n"] += 1
            return real(self, *a, **k)
        return wrapper

    def scoped(real, on):
        def wrapper(*a, **k):
            before, active[0] = active[0], on
            try:
                return real(*a, **k)
            finally:
                active[0] = before
        return wrapper

    monkeypatch.setattr(torch.Tensor, "item", counting(real_item))
    monkeypatch.setattr(torch.Tensor, "tolist", counting(real_tolist))
    monkeypatch.setattr(train_mod, "train_epochs", scoped(train_mod.train_epochs, True))
    monkeypatch.setattr(eval_schedule, "evaluate", scoped(eval_schedule.evaluate, False))  # end-of-epoch val: not the step
    steps_seen = []
    real_step = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", lambda run, x, y: steps_seen.append(1) or real_step(run, x, y))

    epochs, log_every = 2, 5
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *_tiny(digits_cache, "optim.batch_size=8", f"run.log_every={log_every}")]) == 0
    steps = len(steps_seen) // epochs
    assert steps == 14
    bound = epochs * math.ceil(steps / log_every)
    assert 0 < counts["n"] <= bound, (counts["n"], bound)  # the step itself reads nothing


# --------------------------------------------------------------------------- NaN and divergence


@pytest.mark.slow
def test_nonfinite_bn_buffer_never_replaces_the_last_good_checkpoint(tmp_path, digits_cache, monkeypatch, capsys):
    """A finite loss but an inf BatchNorm running_var: the checkpoint is refused.
    (A NaN loss mid-run, caught on the device and read at the epoch's end, is tests/test_cli.py's
    test_nan_loss_names_the_step_and_keeps_the_last_checkpoint: epoch 1's verified-finite last.pt stays.)"""
    real_step, calls = train_mod.train_step, []

    def step_then_break_bn(run, x, y):
        loss = real_step(run, x, y)
        calls.append(1)
        if len(calls) == 9:  # epoch 2
            bn = next(m for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        return loss

    monkeypatch.setattr(train_mod, "train_step", step_then_break_bn)
    out = tmp_path / "bn"
    code = main(["train", "--out", str(out), *_tiny(digits_cache, "optim.batch_size=16", "method=ce")])
    err = capsys.readouterr().err
    assert code == 1 and "running_var" in err and "refusing to overwrite" in err, err
    state = _ckpt(out / "last.pt")
    assert state["epoch"] == 1 and not nonfinite_tensors(state["model"])


def test_diverging_loss_stops_the_run(tmp_path, digits_cache, capsys):
    out = tmp_path / "div"
    code = main(["train", "--out", str(out), *_tiny(digits_cache, "method=ce", "run.max_loss=1e-3", "epochs=1")])
    err = capsys.readouterr().err
    assert code == 1 and "diverging" in err and "run.max_loss=0.001" in err, err
    assert (out / "train.log").exists() and not (out / "last.pt").exists()  # training started: the folder stays


# --------------------------------------------------------------------------- launch options


@pytest.mark.slow
def test_max_steps_checkpoints_and_finishes(tmp_path, digits_cache):
    out = tmp_path / "smoke"
    assert main(["train", "--out", str(out), *_tiny(digits_cache, "optim.batch_size=16", "run.max_steps=3")]) == 0
    state = _ckpt(out / "last.pt")
    assert (state["epoch"], state["position"]) == (0, 3)
    assert (out / "metrics.json").exists()  # the normal end of the run: test evaluation and report
    # A smoke run extends into the full run: max_steps may change on resume.
    assert main(["train", "--out", str(out), "--resume", *_tiny(digits_cache, "optim.batch_size=16")]) == 0
    assert [r["epoch"] for r in map(yaml.safe_load, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def test_print_config_prints_the_resolved_yaml(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--print-config", "--preset", "imagenet-lt-resnext50", "optim.lr=5e-2", "seed=3",
                 "data.root=/data/imagenet"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 0.05 and cfg["seed"] == 3 and cfg["optim"]["lr_base_batch"] == 256
    assert not (tmp_path / "runs").exists()


def test_lr_base_batch_scales_linearly():
    cfg = load_config(None, None, ["optim.lr=0.1", "optim.batch_size=1024", "optim.lr_base_batch=256"])
    assert effective_lr(cfg.optim) == pytest.approx(0.4)
    assert effective_lr(load_config(None, None, ["optim.lr=0.1"]).optim) == 0.1  # 0 = off
    # The ImageNet-scale presets keep the effective lr they had before the base batch: 0.2 at batch 512.
    for preset in ("imagenet-lt-resnet10", "imagenet-lt-resnext50", "imagenet-lt-resnext152", "places-lt-resnet152",
                   "inat18-resnet50"):
        o = load_config(preset, None, ["data.root=/data"]).optim
        assert o.lr_base_batch == 256 and effective_lr(o) == pytest.approx(0.2), preset


@pytest.mark.slow
def test_keep_last_and_save_best(tmp_path, digits_cache):
    out = tmp_path / "keep"
    args = _tiny(digits_cache, "epochs=3", "run.keep_last=2", "run.save_best=true", "optim.lr_base_batch=16")
    assert main(["train", "--out", str(out), *args]) == 0
    assert sorted(p.name for p in out.glob("epoch-*.pt")) == ["epoch-002.pt", "epoch-003.pt"]
    assert _ckpt(out / "epoch-002.pt")["epoch"] == 2 and _ckpt(out / "epoch-003.pt")["epoch"] == 3
    history = _ckpt(out / "last.pt")["history"]
    best = max(range(3), key=lambda i: (history[i]["val_top1"], -i))  # the first epoch with the best val top-1
    assert _ckpt(out / "best.pt")["epoch"] == best + 1
    # optim.lr_base_batch: the preset's lr 0.05 × batch 32 / 16 = 0.1 at the start of the schedule
    assert _ckpt(out / "last.pt")["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(0.1)


# --------------------------------------------------------------------------- resume rules and the run folder


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, digits_cache):
    out = tmp_path_factory.mktemp("runs") / "one"
    assert main(["train", "--out", str(out), *_tiny(digits_cache, "epochs=1", "method=ce")]) == 0
    return out


@pytest.mark.slow
def test_resume_accepts_harmless_changes_and_names_refused_keys(one_epoch, digits_cache, capsys):
    base = _tiny(digits_cache, "method=ce")
    assert main(["train", "--out", str(one_epoch), "--resume", *base, "epochs=1", "optim.lr=0.01"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("engine train: error:")]
    assert len(errors) == 1 and "(optim.lr: 0.05 → 0.01)" in errors[0], errors
    # run.progress and a longer schedule are accepted; the run continues to epoch 2
    assert main(["train", "--out", str(one_epoch), "--resume", *base, "epochs=2", "run.progress=true"]) == 0
    assert _ckpt(one_epoch / "last.pt")["epoch"] == 2


def test_out_pointing_at_a_file_is_one_clear_line(tmp_path, digits_cache, capsys):
    target = tmp_path / "file.txt"
    target.write_text("not a run folder")
    assert main(["train", "--out", str(target), *_tiny(digits_cache)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("engine train: error:")]
    assert len(errors) == 1 and f"--out {target} is an existing file" in errors[0], errors


def test_default_run_folders_are_unique(tmp_path):
    cfg = load_config(None, None, ["seed=7", "method=ce"])
    names = {train_mod.default_run_dir(cfg) for _ in range(50)}
    assert len(names) > 40 and all(n.startswith("runs/ce-") and "-s7-" in n for n in names)


def _split_files(root, classes: int, per_class: int = 4):
    for c in range(classes):
        for i in range(per_class):
            write_jpeg(root / f"c{c}" / f"{i}.jpg", (12, 10), seed=10 * c + i)
    rows = "".join(f"c{c}/{i}.jpg {c}\n" for c in range(classes) for i in range(per_class))
    for name in ("train", "val", "test"):
        (root / f"{name}.txt").write_text(rows)
    return ["data.format=split_files", f"data.root={root}", "data.train_split=train.txt", "data.val_split=val.txt",
            "data.test_split=test.txt", "model.arch=resnet8_cifar", "epochs=1", "optim.warmup_epochs=0", "data.image_size=16",
            "run.progress=false", "optim.batch_size=4", "method=ce", "run.device=cpu", "run.threads=1"]


@pytest.mark.slow
def test_resume_after_the_class_count_changed_names_the_tensor(tmp_path, capsys):
    args = _split_files(tmp_path / "data", 3)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *args]) == 0
    _split_files(tmp_path / "data", 4)
    assert main(["train", "--out", str(out), "--resume", *args, "epochs=2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("engine train: error:")]
    assert len(errors) == 1 and "head.weight has shape (3, 64) there, (4, 64) here" in errors[0], errors


@pytest.mark.slow
def test_corrupt_training_jpeg_is_skipped_and_listed(tmp_path):
    args = _split_files(tmp_path / "data", 3)
    bad = tmp_path / "data" / "c1" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG: its header opens, it does not decode
    out = tmp_path / "run"
    for name in ("val", "test"):  # the bad image is a training image only
        split = tmp_path / "data" / f"{name}.txt"
        split.write_text(split.read_text().replace("c1/2.jpg 1\n", ""))
    # verify_images=off: the loader meets it mid-epoch (else the check before training drops it)
    assert main(["train", "--out", str(out), *args, "data.on_bad_image=skip", "data.max_bad_images=0.5",
                 "data.verify_images=off"]) == 0
    listed = (out / "bad_images.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == ["c1/2.jpg"], listed
    record = yaml.safe_load((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["bad_images"] == 1
