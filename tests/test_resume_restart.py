"""A run resumed in its last epoch ends like an uninterrupted one: the last epoch's per-class feature sums
(eval.diagnostics=epoch) travel in last.pt, so the diagnostics need no pass over the training split; a
last.pt without them falls back to the pass and says what it costs. The resume says where it continues."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers import tiny

import engine.diagnostics as diagnostics_mod
from engine.cli import main

# 118 training images / batch 16 = 7 steps an epoch, 2 epochs: max_steps=10 stops at step 3 of the last epoch.
STEPS, MID_LAST_EPOCH = 7, 10


def _args(cache, *extra: str) -> list[str]:
    return [*tiny(cache), "run.device=cpu", "run.threads=1", "optim.batch_size=16", "eval.diagnostics=epoch", *extra]


@pytest.fixture
def passes(monkeypatch):
    """Counts the passes over the training split the diagnostics make."""
    calls = []
    real = diagnostics_mod.class_sums_pass

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(diagnostics_mod, "class_sums_pass", counting)
    return calls


def _diagnostics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())["diagnostics"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_cache):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(["train", "--out", str(out), *_args(digits_cache)]) == 0
    return out


def _stopped_mid_last_epoch(tmp_path, cache):
    out = tmp_path / "resumed"
    assert main(["train", "--out", str(out), *_args(cache, f"run.max_steps={MID_LAST_EPOCH}")]) == 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["position"]) == (1, MID_LAST_EPOCH - STEPS)
    return out


def test_resume_mid_last_epoch_gives_the_uninterrupted_diagnostics_without_a_pass(
        tmp_path, digits_cache, uninterrupted, passes):
    """Single process, same summation order (saved float32 sums, then the remaining steps): equal exactly."""
    out = _stopped_mid_last_epoch(tmp_path, digits_cache)
    passes.clear()
    assert main(["train", "--out", str(out), "--resume", *_args(digits_cache)]) == 0
    assert passes == []
    resumed, expected = _diagnostics(out), _diagnostics(uninterrupted)
    assert resumed["mode"] == "epoch" and resumed["images"] == STEPS * 16
    assert resumed == expected


def test_resume_of_a_finished_run_keeps_the_epoch_diagnostics(tmp_path, digits_cache, uninterrupted, passes):
    """last.pt of the finished run carries the whole last epoch's sums: a resume after the end passes nothing."""
    out = tmp_path / "finished"
    assert main(["train", "--out", str(out), *_args(digits_cache)]) == 0
    passes.clear()
    assert main(["train", "--out", str(out), "--resume", *_args(digits_cache)]) == 0
    assert passes == []
    assert _diagnostics(out) == _diagnostics(uninterrupted)


def test_last_pt_without_the_sums_falls_back_to_a_pass_and_logs_its_cost(tmp_path, digits_cache, passes, caplog):
    """A last.pt written without the sums: the diagnostics pass over the whole training split once (never the
    means of the steps since the resume), with a warning naming the images to pass."""
    out = _stopped_mid_last_epoch(tmp_path, digits_cache)
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    state.pop("epoch_class_sums", None)
    torch.save(state, out / "last.pt")
    passes.clear()
    with caplog.at_level(logging.WARNING, logger="engine.diagnostics"):
        assert main(["train", "--out", str(out), "--resume", *_args(digits_cache)]) == 0
    assert len(passes) == 1
    diag = _diagnostics(out)
    assert diag["mode"] == "pass" and diag["images"] == 118
    assert "passing over the training split instead: 118 images" in caplog.text


def test_never_resumed_last_pt_keeps_every_key_and_adds_the_sums(uninterrupted):
    state = torch.load(uninterrupted / "last.pt", map_location="cpu", weights_only=True)
    sums = state["epoch_class_sums"]
    assert sums["epoch"] == 1 and len(sums["ranks"]) == 1
    assert float(sums["ranks"][0][1].sum()) == STEPS * 16
    assert {"config", "epoch", "position", "model", "optimizer", "scheduler", "scaler", "rng", "cuda_rng", "loader",
            "class_counts", "history", "bad_images", "epoch_loss_sum", "epoch_seen"} <= set(state)


def test_resume_says_where_it_continues(tmp_path, digits_cache, capsys):
    out = _stopped_mid_last_epoch(tmp_path, digits_cache)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", *_args(digits_cache)]) == 0
    line = f"resumed from {out / 'last.pt'} at epoch 2, step 3 (10 of 14 steps done)"
    assert line in capsys.readouterr().err
    assert line in (out / "train.log").read_text()
