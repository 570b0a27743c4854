"""Scale features on CPU: DDP (2 gloo ranks) = 1 process × 2 micro-batches, SIGKILL + resume is
bitwise, the batch / rank / micro-batch check, torch.compile + channels-last + bf16 autocast,
and every preset's model.

Everything runs the real CLI (`python -m engine.cli`, `python -m torch.distributed.run`) on a tiny
Digits-LT run (ResNet-8, 16 px) so the whole file stays around two minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from helpers import engine_argv, engine_env, free_port, model_config, run_ok

from engine.cli import main
from engine.config import available_presets, load_config
from engine.models import build_model

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = {"config.yaml", "metrics.jsonl", "last.pt", "metrics.json", "curves.png", "per_class.png", "offsets.png"}


def tiny(cache) -> list[str]:
    """helpers.tiny (ResNet-8, 16 px, small Digits-LT: 118 training images) on CPU with eo_uc."""
    return [*helpers.tiny(cache), "run.device=cpu", "method=eo_uc"]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ckpt(run: Path) -> dict:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_with_two_micro_batches(tmp_path, digits_cache):
    """torchrun 2 ranks × batch 8 (grad_accum=1) vs 1 process × 2 micro-batches of 8 (grad_accum=2),
    global batch 16: under interleaved rank shards rank r's local batch j is micro-batch batch_j[r::2]
    of the 1-process run, so BatchNorm sees the same batches, DDP's averaged gradient is the mean of
    the two micro-batch gradients and the centers move by the all-reduced class sums (eo_uc).

    Augmentation is off (no crop padding, no flip): its random draws come from each process's own
    global RNG, so rank r's crops cannot match the 1-process run's. Both sides use 1 thread (torchrun
    sets OMP_NUM_THREADS=1) so only the gradient/class-sum all-reduce order differs.
    """
    common = [*tiny(digits_cache), "optim.batch_size=16", "data.crop_padding=0", "data.hflip=false", "run.threads=1"]
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    run_ok(engine_argv("train", "--out", str(one), *common, "optim.grad_accum=2"), tmp_path / "one")

    env_port = str(free_port())
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "engine.cli", "train", "--out", str(two), *common, "optim.grad_accum=1"]
    cwd = tmp_path / "two"
    cwd.mkdir()
    proc = subprocess.run(args, cwd=cwd, env=engine_env(MASTER_PORT=env_port), capture_output=True, text=True,
                          timeout=150)
    assert proc.returncode == 0, f"torchrun exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    # Only rank 0 writes: one run folder with exactly the run files, no stray files next to it,
    # one metrics.jsonl line per epoch (not one per rank), the test table printed once.
    names = {p.name for p in two.iterdir()}
    assert RUN_FILES <= names and names == {p.name for p in one.iterdir()}
    assert [p.name for p in cwd.iterdir()] == ["run"]
    assert proc.stdout.count("test (eo_uc)") == 1, proc.stdout

    log1, log2 = _log(one), _log(two)
    assert [r["epoch"] for r in log2] == [1, 2] and [r["step"] for r in log2] == [r["step"] for r in log1]
    steps = log1[-1]["step"]
    assert steps == 2 * 7  # 118 images: 7 global batches of 16 per epoch on both sides
    # Train losses agree to float32 rounding (observed |Δ| ≤ 6e-6 on losses of order 1).
    assert [r["train_loss"] for r in log2] == pytest.approx([r["train_loss"] for r in log1], rel=1e-4, abs=1e-5)

    s1, s2 = _ckpt(one), _ckpt(two)
    assert s1["epoch"] == s2["epoch"] == 2
    m1, m2 = s1["model"], s2["model"]
    assert m1.keys() == m2.keys()
    compared = 0
    for key in m1:
        if "running_" in key:
            # BatchNorm running statistics are not part of the invariant: without SyncBatchNorm each
            # rank's EMA sees only its own micro-batch and DDP broadcasts rank 0's buffers, while the
            # 1-process run updates the EMA once per micro-batch (twice per step).
            continue
        if key.endswith("num_batches_tracked"):
            assert int(m2[key]) == steps and int(m1[key]) == 2 * steps, key
            continue
        # After 14 SGD steps: parameters |Δ| ≤ 7e-5 observed, centers (a running mean of features of
        # norm ~1) |Δ| ≤ 5e-4: the all-reduce summation order, amplified by training.
        atol = 2e-3 if key == "head.centers" else 2e-4
        torch.testing.assert_close(m2[key], m1[key], rtol=1e-3, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
        compared += 1
    assert compared >= 20  # every conv / BN affine / head tensor of ResNet-8 + the centers


# --------------------------------------------------------------------------- SIGKILL + resume


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise(tmp_path, digits_cache):
    """A run killed with SIGKILL inside epoch 1 and continued with --resume from its mid-epoch
    last.pt logs the same train losses and ends with the same weights, bit for bit, as a run that
    was never interrupted (augmentation on: random crops draw from the restored global RNG)."""
    common = [*tiny(digits_cache), "optim.batch_size=8", "run.checkpoint_every=1", "run.threads=1"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    run_ok(engine_argv("train", "--out", str(ref), *common), tmp_path)

    proc = subprocess.Popen(engine_argv("train", "--out", str(out), *common), cwd=tmp_path, env=engine_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before a mid-epoch checkpoint was seen:\n"
                            f"{proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no mid-epoch checkpoint within 120 s")
            try:
                seen = _ckpt(out)
            except Exception:  # not written yet, or being replaced while we read
                seen = None
            if seen is not None and seen["epoch"] == 0 and seen["position"] > 0:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    state = _ckpt(out)
    assert state["epoch"] == 0 and 0 < state["position"] < 14, (state["epoch"], state["position"])  # 14 steps/epoch
    assert state["epoch_seen"] == 8 * state["position"]
    run_ok(engine_argv("train", "--resume", "--out", str(out), *common), tmp_path)

    ref_log, out_log = _log(ref), _log(out)
    assert [r["epoch"] for r in out_log] == [1, 2]  # no line lost or doubled
    for key in ("train_loss", "lr", "val_top1"):
        assert [r[key] for r in out_log] == [r[key] for r in ref_log], key  # exact floats
    a, b = _ckpt(ref), _ckpt(out)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert json.loads((out / "metrics.json").read_text())["per_class"] == \
        json.loads((ref / "metrics.json").read_text())["per_class"]


# --------------------------------------------------------------------------- batch split check


@pytest.mark.slow
def test_batch_size_must_split_into_ranks_and_micro_batches(tmp_path, digits_cache, capsys):
    # One process: the config check (batch_size a multiple of grad_accum).
    out = tmp_path / "one"
    assert main(["train", "--out", str(out), *tiny(digits_cache), "optim.batch_size=30", "optim.grad_accum=4"]) == 2
    err = capsys.readouterr().err
    assert "optim.batch_size" in err and "30" in err and "optim.grad_accum" in err, err
    assert not out.exists()
    # Two ranks: 18 splits into 2 micro-batches but not into 2 ranks × 2; every rank stops with the
    # reason before anything is written.
    out = tmp_path / "two"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "engine.cli", "train", "--out", str(out), *tiny(digits_cache), "optim.batch_size=18",
            "optim.grad_accum=2"]
    proc = subprocess.run(args, cwd=tmp_path, env=engine_env(MASTER_PORT=str(free_port())), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("optim.batch_size=18 must divide into 2 ranks × 2 micro-batches") == 2, proc.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- compile + channels-last + bf16


@pytest.mark.slow  # a torch.compile (Dynamo + Inductor) build
def test_compiled_channels_last_bf16_step_matches_eager_fp32():
    """One forward + loss + backward of ResNet-8 + EO+UC head: eager fp32 vs torch.compile of the
    channels-last model under CPU bf16 autocast (what run.compile/channels_last/amp=bf16 do).

    Tolerances (bf16 keeps 8 mantissa bits, relative rounding 2^-8 ≈ 0.4%): loss within 2%;
    classifier-weight gradient within 5% (relative Frobenius error, observed 1.3%); backbone
    gradients within 35% and cosine similarity ≥ 0.95 (observed 10-19% and ≥ 0.98: an untrained
    net whose BatchNorm backward subtracts nearly equal bf16 terms; eager bf16 without compile or
    channels-last shows the same error). A wrong layout or a broken graph gives errors of order 100%.
    """
    torch.manual_seed(0)
    model = build_model(model_config("resnet8_cifar"), [10] * 10)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    with torch.no_grad():  # centers near the features (as after Wen's updates): the offset terms matter
        feats = model.forward_features(x)
        model.head.centers.copy_(feats.mean(0) + 0.1 * torch.randn(10, feats.shape[1]))

    def step(fn, inputs):
        model.zero_grad(set_to_none=True)
        loss, _ = fn(inputs, y)
        loss.backward()
        return loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}

    loss_ref, grads_ref = step(model, x)
    model.to(memory_format=torch.channels_last)
    compiled = torch.compile(model)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = step(compiled, x_cl)

    assert model.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(loss) and abs(loss.item() - loss_ref.item()) <= 2e-2 * abs(loss_ref.item())
    for name in ("head.weight", "backbone.stem.0.weight", "backbone.stages.1.0.conv2.weight",
                 "backbone.stages.2.0.conv2.weight", "backbone.stages.2.0.bn2.weight"):
        g, r = grads[name].flatten(), grads_ref[name].flatten()
        rel = ((g - r).norm() / r.norm()).item()
        cos = torch.nn.functional.cosine_similarity(g, r, dim=0).item()
        limit = 0.05 if name == "head.weight" else 0.35
        assert rel <= limit and cos >= 0.95, f"{name}: relative error {rel:.3f} (≤ {limit}), cosine {cos:.4f}"


@pytest.mark.slow
def test_engine_train_with_compile_channels_last_bf16(tmp_path, digits_cache):
    # 'on' is quoted: a bare on/off is YAML 1.1's true/false, which the string-typed keys reject.
    out = tmp_path / "run"
    args = [*tiny(digits_cache), "epochs=1", "run.compile='on'", "run.channels_last='on'", "run.amp=bf16"]
    assert main(["train", "--out", str(out), *args]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["per_class"]) == 10 and 0 <= metrics["top1"] <= 100
    (record,) = _log(out)
    assert record["epoch"] == 1 and math.isfinite(record["train_loss"])
    saved = load_config(None, out / "config.yaml")
    assert (saved.run.compile, saved.run.channels_last, saved.run.amp) == ("on", "on", "bf16")
    # The checkpoint holds the plain model's keys (not the compiled wrapper's "_orig_mod." ones).
    assert all(not k.startswith("_orig_mod") for k in _ckpt(out)["model"])


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", available_presets())
def test_preset_loads_and_its_model_runs(preset, tmp_path):
    cfg = load_config(preset, None, [f"data.root={tmp_path}"])
    counts = np.arange(10, 0, -1) * 10  # a long-tailed profile for methods that need class counts
    model = build_model(cfg, counts).eval()
    size = 32 if cfg.model.arch.endswith("_cifar") else 64
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- preemption under DDP


def _worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (children of `parent` with RANK in their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent:
            ranks = [int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")]
            if ranks:
                found[ranks[0]] = int(entry.name)
    return found


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_and_resumes_on_one_process(tmp_path, digits_cache):
    """SIGTERM reaches rank 1 only: the ranks agree on it at the next loss read (log_every=1), rank 0 writes
    last.pt, both exit 75. The run then continues on ONE process from the same global step (a warning: not
    bitwise) to the end."""
    common = [*tiny(digits_cache), "optim.batch_size=16", "run.threads=1", "run.log_every=1"]
    out = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "engine.cli", "train", "--out", str(out), *common]
    proc = subprocess.Popen(args, cwd=tmp_path, env=engine_env(MASTER_PORT=str(free_port())),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 150
        while not ((out / "train.log").exists() and "epoch 1 step 2 " in (out / "train.log").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "torchrun ended or hung before step 2"
            time.sleep(0.05)
        os.kill(_worker_pids(proc.pid)[1], signal.SIGTERM)
        output, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "exitcode  : 75" in output or "exit code 75" in output or "exitcode: 75" in output, output
    state = _ckpt(out)
    assert state["epoch"] == 0 and state["position"] >= 2 and len(state["rng"]) == 2
    assert "stopped by a signal on another rank" in (out / "train.log").read_text()

    resumed = run_ok(engine_argv("train", "--out", str(out), "--resume", "auto", *common), tmp_path)
    assert "resuming a checkpoint of 2 ranks on 1" in resumed.stderr
    log = _log(out)
    assert [r["epoch"] for r in log] == [1, 2] and log[-1]["step"] == 14
