"""Preemption and interruption, with real processes: SIGTERM → checkpoint → exit 75 → `--resume auto`;
SIGKILL with loader workers → `--resume` is bitwise; a folder left before the first checkpoint; the run lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import torch

from engine.cli import main
from engine.preemption import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]


def _common(cache) -> list[str]:
    """helpers.tiny with batch 8 (14 steps an epoch) and 2 torchvision loader workers (position-seeded)."""
    return [*helpers.tiny(cache), "run.device=cpu", "run.threads=1", "optim.batch_size=8", "data.num_workers=2",
            "data.loader=torchvision", "run.log_every=1"]


_env, _engine = helpers.engine_env, helpers.engine_argv


def _start(out: Path, *args: str, own_group: bool = False) -> subprocess.Popen:
    """`engine train --out out *args`; `own_group`: in a new session (its pid is the process group's id)."""
    return subprocess.Popen(_engine("train", "--out", str(out), *args), cwd=out.parent, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=own_group)


def _session_pids(sid: int) -> list[int]:
    """Processes still alive in session `sid` (ps; zombies excluded)."""
    ps = subprocess.run(["ps", "-e", "-o", "pid=,sid=,stat="], capture_output=True, text=True, check=True)
    rows = [line.split() for line in ps.stdout.splitlines()]
    return [int(r[0]) for r in rows if len(r) == 3 and int(r[1]) == sid and not r[2].startswith("Z")]


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.02)


def _log_says(path: Path, text: str):
    return lambda: path.exists() and text in path.read_text()


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _mid_epoch_checkpoint(path: Path):
    def ready():
        try:
            state = _ckpt(path)
        except Exception:  # not written yet, or being replaced while we read
            return False
        return state["epoch"] == 0 and state["position"] > 0
    return ready


def _sigkill_mid_epoch(out: Path, args: list[str], ready=None, what: str = "a mid-epoch checkpoint") -> None:
    """Start a run, SIGKILL it as soon as `ready()` (default: a mid-epoch last.pt, run.checkpoint_every=1)."""
    proc = _start(out, *args)
    try:
        _wait_for(proc, ready or _mid_epoch_checkpoint(out / "last.pt"), what)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _assert_same_run(a: Path, b: Path) -> None:
    log_a, log_b = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b))
    assert [r["epoch"] for r in log_b] == [1, 2]  # no line lost or doubled
    for key in ("train_loss", "lr", "val_top1"):
        assert [r[key] for r in log_b] == [r[key] for r in log_a], key  # exact floats
    sa, sb = _ckpt(a / "last.pt")["model"], _ckpt(b / "last.pt")["model"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_cache):
    """The uninterrupted run (2 epochs, 2 loader workers)."""
    out = tmp_path_factory.mktemp("ref") / "ref"
    proc = subprocess.run(_engine("train", "--out", str(out), *_common(digits_cache)), cwd=out.parent, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resume_auto_continues(tmp_path, digits_cache, reference):
    out = tmp_path / "term"
    proc = _start(out, *_common(digits_cache))
    try:
        _wait_for(proc, _log_says(out / "train.log", "epoch 1 step 3 "), "step 3")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert "stopped by SIGTERM" in err and "--resume auto" in err, err
    state = _ckpt(out / "last.pt")
    assert state["epoch"] == 0 and 3 <= state["position"] < 14, (state["epoch"], state["position"])  # mid-epoch
    assert not (out / "metrics.json").exists()

    resumed = subprocess.run(_engine("train", "--out", str(out), "--resume", "auto", *_common(digits_cache)),
                             cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(reference, out)  # bit for bit, loader workers included


@pytest.mark.slow
def test_sigterm_to_the_process_group_reaches_the_main_process_not_the_loader_workers(
    tmp_path, digits_cache, reference
):
    """What Slurm, scancel and Kubernetes do: SIGTERM to every process of the job, loader workers included.
    The workers leave it to the main process, which checkpoints at the step boundary and exits 75."""
    out = tmp_path / "group"
    proc = _start(out, *_common(digits_cache), own_group=True)
    try:
        _wait_for(proc, _log_says(out / "train.log", "epoch 1 step 3 "), "step 3")
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert "stopped by SIGTERM" in err, err
    state = _ckpt(out / "last.pt")
    assert state["epoch"] == 0 and 3 <= state["position"] < 14, (state["epoch"], state["position"])

    resumed = subprocess.run(_engine("train", "--out", str(out), "--resume", "auto", *_common(digits_cache)),
                             cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(reference, out)


@pytest.mark.slow
def test_loader_workers_exit_when_the_main_process_is_sigkilled(tmp_path, digits_cache):
    """SIGKILL of the main process alone (no shutdown sentinel): its loader workers exit too, none is orphaned."""
    out = tmp_path / "orphans"
    proc = _start(out, *_common(digits_cache), "epochs=50", own_group=True)
    try:
        _wait_for(proc, _log_says(out / "train.log", "epoch 1 step 3 "), "step 3")
        assert len(_session_pids(proc.pid)) >= 3  # the main process and its 2 loader workers
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _session_pids(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert left == [], f"loader workers {left} outlived their main process"


@pytest.mark.slow
def test_sigkill_with_loader_workers_then_resume_is_bitwise(tmp_path, digits_cache, reference):
    out = tmp_path / "kill"
    args = [*_common(digits_cache), "run.checkpoint_every=1"]
    _sigkill_mid_epoch(out, args)
    assert _ckpt(out / "last.pt")["loader"][0]["position"] == 8 * _ckpt(out / "last.pt")["position"]
    resumed = subprocess.run(_engine("train", "--out", str(out), "--resume", *args), cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(reference, out)


@pytest.mark.slow
def test_folder_killed_before_its_first_checkpoint_restarts_with_resume_auto(tmp_path, digits_cache, capsys):
    out = tmp_path / "early"
    args = [*helpers.tiny(digits_cache), "run.device=cpu", "run.threads=1", "epochs=1"]
    _sigkill_mid_epoch(out, args, lambda: (out / "config.yaml").exists(), "config.yaml")
    assert not (out / "last.pt").exists() and (out / "config.yaml").exists()

    assert main(["train", "--out", str(out), "--resume", *args]) == 1
    assert "last.pt does not exist" in capsys.readouterr().err
    assert main(["train", "--out", str(out), *args]) == 1
    assert "already holds files" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "auto", *args]) == 0
    assert _ckpt(out / "last.pt")["epoch"] == 1 and (out / "metrics.json").exists()


@pytest.mark.slow
def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path, digits_cache):
    """Two processes: a training run holds the folder; `engine train --resume auto` on it fails in seconds."""
    out = tmp_path / "busy"
    holder = _start(out, *helpers.tiny(digits_cache), "run.device=cpu", "run.threads=1", "epochs=50")
    try:
        _wait_for(holder, lambda: (out / ".lock").exists() and (out / ".lock").read_text().strip() != "",
                  "the run lock")
        t0 = time.monotonic()
        second = subprocess.run(_engine("train", "--out", str(out), "--resume", "auto",
                                        *helpers.tiny(digits_cache), "run.device=cpu", "epochs=50"),
                                cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stderr.close()
    assert second.returncode == 1, second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("engine train: error:")]
    assert len(errors) == 1 and f"pid {holder.pid}" in errors[0], second.stderr
    assert elapsed < 60  # before any data is read


@pytest.mark.slow
def test_dali_loader_sigkill_then_resume_is_bitwise(tmp_path, digits_cache):
    """data.loader=dali (CPU pipeline): last.pt carries each rank's DALI checkpoint (random-operator state)
    and the sample position; the resumed run matches the uninterrupted one bit for bit."""
    from pipelines.dali import _DALI_IMPORT_ERROR, dali_available

    if not dali_available():
        pytest.skip(f"NVIDIA DALI is not importable here ({_DALI_IMPORT_ERROR}): the DALI resume is untested")
    args = [*helpers.tiny(digits_cache), "run.device=cpu", "run.threads=1", "optim.batch_size=8",
            "data.loader=dali", "data.num_workers=1", "run.checkpoint_every=1"]
    ref, out = tmp_path / "ref", tmp_path / "kill"
    done = subprocess.run(_engine("train", "--out", str(ref), *args), cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _sigkill_mid_epoch(out, args)
    loader_state = _ckpt(out / "last.pt")["loader"][0]
    assert "dali" in loader_state  # DALI's own checkpoint, loadable with weights_only=True
    resumed = subprocess.run(_engine("train", "--out", str(out), "--resume", *args), cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(ref, out)


def test_loader_workers_ignore_the_stop_signals(tmp_path):
    """SIGTERM, SIGINT and SIGUSR1 sent to the torchvision loader's workers mid-epoch: the epoch runs on."""
    import numpy as np

    from pipelines.loader import make_loader
    from pipelines.spec import LoaderSpec
    from pipelines.splits import SplitIndex
    from pipelines.workers import STOP_SIGNALS

    paths = [tmp_path / f"{i}.jpg" for i in range(12)]
    for i, path in enumerate(paths):
        helpers.write_jpeg(path, (20, 24), seed=i)
    index = SplitIndex(tmp_path / "split.txt", paths, np.arange(12) % 2, 2)
    loader = make_loader(index, LoaderSpec(2, image_size=16, augment="pad_crop", workers=2), True)
    batches = iter(loader)
    next(batches)
    workers = [w.pid for w in loader.loader._iterator._workers]
    for pid in workers:
        for sig in STOP_SIGNALS:
            os.kill(pid, sig)
    time.sleep(0.5)  # a worker that acts on a signal is dead by now
    assert len(list(batches)) == len(loader) - 1
    assert all(w.is_alive() for w in loader.loader._iterator._workers)


def test_run_lock_dies_with_its_holder_not_with_its_forked_children(tmp_path):
    """A holder SIGKILLed while a forked child (a DataLoader worker) lives on: the lock is free at once."""
    from engine.runlock import RunFolderBusy, RunLock

    script = (f"import os, time\nfrom engine.runlock import RunLock\nRunLock({str(tmp_path)!r}).acquire()\n"
              "if os.fork() == 0:\n    time.sleep(30)\n    os._exit(0)\n"
              "print('locked', flush=True)\ntime.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
        holder.kill()
        holder.wait(timeout=30)
        RunLock(tmp_path).acquire().release()  # the child still sleeps, but holds no lock
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.stdout.close()


@pytest.mark.parametrize("failure", ["diverging loss", "bad image"])
def test_a_failed_run_with_loader_workers_exits(tmp_path, digits_cache, failure):
    """Workers ignore SIGTERM, which multiprocessing's exit hook uses to end them: a run that fails mid-epoch
    (in the main process, or in a worker that meets a bad image) must still exit
    (1, or 2 for the data error), leaving no process behind."""
    args = _common(digits_cache)
    if failure == "diverging loss":
        args.append("run.max_loss=1e-6")
    else:  # a copy of the cache with one training PNG cut short: found by a worker mid-epoch
        from engine.config import load_config
        from engine.data import load_data

        cache = tmp_path / "cache"
        args = [a.replace(str(digits_cache), str(cache)) for a in args] + ["data.on_bad_image=fail"]
        load_data(load_config(overrides=args))  # writes the cache
        for victim in sorted(cache.rglob("*.png"))[::4]:
            victim.write_bytes(victim.read_bytes()[:60])
    proc = subprocess.Popen(_engine("train", "--out", str(tmp_path / "run"), *args), env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"a run that failed ({failure}) with loader workers did not exit")
    assert proc.returncode == (1 if failure == "diverging loss" else 2), err  # a bad image is a data error (2)
    assert ("diverging" if failure == "diverging loss" else "image file is truncated") in err, err
    assert not _session_pids(proc.pid), "loader workers outlived their run"
