"""Training's evaluation: per-class counts tallied on the device (equal to the feature path), the
end of a run (test once, val re-used, diagnostics from the last epoch), progress bars, `engine eval`
with key=value overrides."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port, model_config, tiny
from torch.utils.data import DataLoader, TensorDataset

import kernels
from common.errors import ConfigError
from engine import evaluate as E
from engine import metrics as M
from engine.cli import main
from engine.config import load_config
from engine.models import build_model

COUNTS = np.array([40, 25, 12, 6, 3, 2])  # training counts of 6 classes: many > 20, few < 5


def _model_and_loader(n=97, batch_size=16, seed=0):
    torch.manual_seed(seed)
    model = build_model(model_config("resnet8_cifar", method="eo_uc"), COUNTS).eval()
    x = torch.randn(n, 3, 16, 16)
    y = torch.arange(n) % len(COUNTS)
    return model, DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _feature_path_report(model, loader):
    """The feature-path reference: every feature collected, logits of the whole split, the numpy confusion matrix."""
    feats = E.collect_features(model, loader, torch.device("cpu"))
    with torch.no_grad():
        pred = model.head.logits(feats.features).argmax(dim=1).numpy()
    y = feats.labels.numpy()
    per_class = 100.0 * np.bincount(y, weights=(pred == y), minlength=6) / np.bincount(y, minlength=6)
    ref = {"top1": float(100.0 * (pred == y).mean()), "per_class": per_class.tolist()}
    ref.update(M.imbalance_metrics(M.confusion_matrix(y, pred, 6), COUNTS))
    return ref


def test_device_tally_equals_the_feature_path_exactly():
    model, loader = _model_and_loader()
    ref = _feature_path_report(model, loader)
    got = E.evaluate_loader(model, loader, torch.device("cpu"), COUNTS, 20, 5)
    assert sum(map(sum, got["confusion_matrix"])) == 97
    for key, value in ref.items():
        assert got[key] == value, key  # exact: the same counts give the same floats
    groups = E.shot_groups(COUNTS, 20, 5)
    assert got["many"] == np.mean(np.asarray(ref["per_class"])[groups["many"]])


def test_large_k_keeps_only_o_k_counts_with_the_same_metrics():
    rng = np.random.default_rng(0)
    k = 50
    y, p = torch.as_tensor(rng.integers(0, k, 3000)), torch.as_tensor(rng.integers(0, k, 3000))
    counts = rng.integers(1, 500, k)
    full, small = E.ClassTally(k), E.ClassTally(k, confusion=False)
    for part in torch.arange(3000).split(700):  # batch by batch
        full.update(p[part], y[part])
        small.update(p[part], y[part])
    a, b = full.report(counts, 100, 20), small.report(counts, 100, 20)
    assert b["confusion_matrix"] is None and a["confusion_matrix"] is not None
    assert {k_: v for k_, v in a.items() if k_ != "confusion_matrix"} == \
           {k_: v for k_, v in b.items() if k_ != "confusion_matrix"}
    assert E.ClassTally(E.CONFUSION_MAX_CLASSES + 1).confusion is None  # 8,142 classes: no 530 MB matrix
    assert E.ClassTally(1000).confusion is not None


def test_class_tally_does_not_read_the_host_per_batch(monkeypatch):
    """No `.item()` / bincount per batch: nothing that would sync a GPU."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append("item") or 0)
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: calls.append("bincount"))
    tally = E.ClassTally(6)
    tally.update(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2]))
    assert calls == [] and tally.counts.tolist() == [[1, 0, 1, 0, 0, 0], [1, 0, 2, 0, 0, 0], [1, 1, 1, 0, 0, 0]]


def _rank_tally(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, loader = _model_and_loader()
        shard = torch.arange(rank, 97, 2)  # interleaved shards, as ShardSampler
        x, y = loader.dataset.tensors
        shard_loader = DataLoader(TensorDataset(x[shard], y[shard]), batch_size=16)
        report = E.evaluate_loader(model, shard_loader, torch.device("cpu"), COUNTS, 20, 5)
        queue.put((rank, report))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch
def test_two_gloo_ranks_reduce_to_the_single_process_report():
    model, loader = _model_and_loader()
    single = E.evaluate_loader(model, loader, torch.device("cpu"), COUNTS, 20, 5)
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_tally, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert results[0] == results[1] == single


def test_collect_class_sums_hook_sums_the_last_epoch_only():
    from engine.diagnostics import collect_class_sums

    cfg = load_config(overrides=["epochs=3"])
    run = SimpleNamespace(cfg=cfg, counts=torch.ones(4), device=torch.device("cpu"),
                          epoch_class_sums=None, state=SimpleNamespace(position=0))  # the epoch's first step
    f, y = torch.randn(10, 5), torch.tensor([0, 1, 1, 3, 3, 3, 0, 1, 3, 3])
    collect_class_sums(run, 1, f, y)  # not the last epoch
    assert run.epoch_class_sums is None
    collect_class_sums(run, 2, f[:6], y[:6])
    collect_class_sums(run, 2, f[6:], y[6:])
    sums, n = kernels.class_feature_sums(f, y, 4)
    torch.testing.assert_close(run.epoch_class_sums.sums, sums)
    assert run.epoch_class_sums.counts.tolist() == n.tolist() == [2, 3, 0, 5]
    torch.testing.assert_close(run.epoch_class_sums.means()[2], torch.zeros(5))  # a class without samples
    run = SimpleNamespace(cfg=load_config(overrides=["epochs=3", "eval.diagnostics=pass"]), epoch_class_sums=None)
    collect_class_sums(run, 2, f, y)
    assert run.epoch_class_sums is None


def test_diagnostics_config_values():
    assert load_config().eval.diagnostics == "epoch"
    assert load_config(overrides=["eval.diagnostics=false"]).eval.diagnostics == "off"
    with pytest.raises(ConfigError, match=r"eval.diagnostics.*true was `pass`"):
        load_config(overrides=["eval.diagnostics=true"])
    with pytest.raises(ConfigError, match=r"'eval.diagnostics' = 'sometimes'.*epoch.*pass.*off"):
        load_config(overrides=["eval.diagnostics=sometimes"])


@pytest.fixture(scope="module")
def end_of_run(tmp_path_factory, digits_cache):
    """A 2-epoch run with eval.every=1, recording every evaluation and training-split pass."""
    import engine.diagnostics as D
    import engine.eval_schedule as E

    calls, real_eval, real_loader = [], E.evaluate, D.train_features_loader

    def evaluate(run, loader, split="val"):
        calls.append(split)
        return real_eval(run, loader, split)

    def train_features_loader(*args):
        calls.append("train pass")
        return real_loader(*args)

    mp_ = pytest.MonkeyPatch()
    mp_.setattr(E, "evaluate", evaluate)
    mp_.setattr(D, "train_features_loader", train_features_loader)
    out = tmp_path_factory.mktemp("eval") / "run"
    try:
        assert main(["train", "--out", str(out), *tiny(digits_cache), "method=eo_uc", "run.progress=true"]) == 0
    finally:
        mp_.undo()
    return out, calls


@pytest.mark.slow
def test_end_of_run_evaluates_test_once_and_reuses_the_last_val(end_of_run):
    out, calls = end_of_run
    assert calls == ["val", "val", "test"]  # epoch 1, epoch 2 (last), test once; no second val, no train pass
    metrics = json.loads((out / "metrics.json").read_text())
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["val"] == {k[4:]: v for k, v in last.items() if k.startswith("val_")}
    diag = metrics["diagnostics"]
    assert diag["mode"] == "epoch" and "augmented" in diag["source"] and "moved" in diag["source"]
    assert diag["images"] == 96  # 3 steps × 32 images of the last epoch
    assert len(diag["empirical_offset"]) == 10 and all(np.isfinite(diag["empirical_offset"]))


@pytest.mark.slow
def test_progress_bars_on_every_evaluation_pass(tmp_path, digits_cache, capsys, monkeypatch):
    # Captured stderr is not a terminal: progress comes as plain lines (pipelines/progress.py), one per update here.
    monkeypatch.setattr("pipelines.progress.LINE_INTERVAL_S", 0.0)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *tiny(digits_cache), "epochs=1", "run.progress=true",
                 "eval.diagnostics=pass"]) == 0
    err = capsys.readouterr().err
    assert "eval val" in err and "eval test" in err and "diagnostics: train pass" in err
    diag = json.loads((out / "metrics.json").read_text())["diagnostics"]
    assert diag["mode"] == "pass" and diag["images"] == sum(json.loads((out / "metrics.json").read_text())
                                                            ["class_counts"])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--split", "val", "run.progress=true"]) == 0
    assert "eval val" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "quiet"), *tiny(digits_cache), "epochs=1",
                 "eval.diagnostics=pass"]) == 0  # tiny() sets run.progress=false
    assert "eval" not in capsys.readouterr().err


@pytest.mark.slow
def test_engine_eval_takes_overrides_that_keep_the_model(end_of_run, tmp_path, capsys):
    out, _ = end_of_run
    metrics = json.loads((out / "metrics.json").read_text())
    cache = load_config(None, out / "config.yaml").data.cache_dir
    moved = tmp_path / "moved-cache"
    os.symlink(cache, moved)  # the data moved: the checkpoint's own data.cache_dir would still work, this must too
    assert main(["eval", "--checkpoint", str(out / "last.pt"), f"data.cache_dir={moved}", "eval.batch_size=7",
                 "data.num_workers=0"]) == 0
    ev = json.loads((out / "eval_test.json").read_text())
    assert ev["per_class"] == metrics["per_class"] and ev["top1"] == metrics["top1"]
    assert ev["overrides"][1] == "eval.batch_size=7"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "optim.lr=0.5", "model.arch=resnet32_cifar"]) == 2
    err = capsys.readouterr().err
    assert "model.arch, optim.lr" in err and "data.root" in err
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "data.nonsense=1"]) == 2
    assert "unknown config key 'data.nonsense'" in capsys.readouterr().err
