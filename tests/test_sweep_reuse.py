"""`engine sweep` in a folder that already holds runs (engine/experiments/runner.py):

a finished run is re-used only when its saved config equals the requested one, a run of another config
stops the sweep naming the keys that differ (finished or not, nothing deleted), and a killed run is
resumed from its last checkpoint instead of being started over.
"""

import json

import pytest
from helpers import tiny

import engine.train as train_mod
from engine.checkpoint import load_checkpoint
from engine.cli import main


def _sweep_args(out, cache, *extra):
    return ["sweep", "--out", str(out), "--seeds", "0", "--grid", "method=ce", *tiny(cache),
            "eval.diagnostics=false", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, digits_cache):
    out = tmp_path_factory.mktemp("sweep") / "sw"
    assert main(_sweep_args(out, digits_cache)) == 0
    return out


def _files(run_dir):
    return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}


def test_same_config_is_reused_without_training(finished, digits_cache, monkeypatch):
    run_dir = finished / "method-ce" / "seed0"
    before = _files(run_dir)
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert main(_sweep_args(finished, digits_cache, "run.threads=1")) == 0  # run.threads does not change numbers
    assert _files(run_dir) == before


def test_new_overrides_into_an_existing_sweep_are_refused_naming_the_keys(finished, digits_cache, capsys,
                                                                          monkeypatch):
    run_dir = finished / "method-ce" / "seed0"
    before = _files(run_dir)
    summary = (finished / "sweep.json").read_text()
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("trained despite the config change"))
    assert main(_sweep_args(finished, digits_cache, "optim.lr=0.02", "loss.label_smoothing=0")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engine sweep: error: ") and "\n" not in err, err
    assert str(run_dir) in err and "finished run trained with another config" in err
    assert "optim.lr: 0.05 → 0.02" in err and "loss.label_smoothing" not in err  # only the keys that differ
    assert _files(run_dir) == before and (finished / "sweep.json").read_text() == summary


class _Killed(BaseException):
    """Stands for SIGKILL: raised right after a checkpoint is written, nothing else runs."""


def _kill_after_epoch(monkeypatch, epoch: int):
    real = train_mod.checkpoint

    def checkpoint_then_die(trainer, *a, **k):
        real(trainer, *a, **k)
        if trainer.state.epoch == epoch:
            raise _Killed

    monkeypatch.setattr(train_mod, "checkpoint", checkpoint_then_die)


def test_a_killed_run_is_resumed_not_restarted(tmp_path, digits_cache, monkeypatch, capsys):
    out = tmp_path / "sw"
    run_dir = out / "method-ce" / "seed0"
    with monkeypatch.context() as m:
        _kill_after_epoch(m, 1)
        with pytest.raises(_Killed):
            main(_sweep_args(out, digits_cache))
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1 and not (run_dir / "metrics.json").exists()
    first_epoch = (run_dir / "metrics.jsonl").read_text()

    # Another config into the killed sweep: refused, the resumable run is kept.
    assert main(_sweep_args(out, digits_cache, "optim.momentum=0.5")) == 2
    err = capsys.readouterr().err
    assert "resumable run trained with another config" in err and "optim.momentum: 0.9 → 0.5" in err, err
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1

    # The same config: resumed from epoch 1's checkpoint, not started over.
    calls = []
    real_train = train_mod.train
    monkeypatch.setattr(train_mod, "train", lambda cfg, d, resume=False: calls.append(resume) or real_train(cfg, d,
                                                                                                             resume))
    assert main(_sweep_args(out, digits_cache)) == 0
    assert calls == [True]
    log = (run_dir / "metrics.jsonl").read_text()
    assert log.startswith(first_epoch)  # epoch 1's line kept, epoch 2 appended
    assert [json.loads(line)["epoch"] for line in log.splitlines()] == [1, 2]
    assert json.loads((run_dir / "run_time.json").read_text())["resumed"] is True
    assert (run_dir / "metrics.json").is_file() and (out / "sweep.json").is_file()
