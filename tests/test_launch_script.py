"""docs/launch/slurm-train.sh with stub srun / scontrol / python: the command it launches, and that the requeue
follows the run's status (`engine status`), never srun's exit code or the script's own trap.

The stub python answers `-m engine.cli status` with the code the stub training step left in a file (as the
real one reads status.json); one test runs the real `engine status` on a status.json. The real training
path (torchrun, 2 gloo ranks, real signals) is tests/test_cluster.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docs" / "launch" / "slurm-train.sh"


def _stubs(tmp_path: Path, srun_body: str, real_python: bool = False) -> dict:
    """PATH with stub srun (records its arguments, runs `srun_body`) and scontrol (records, answers `show
    hostnames`); ENGINE_PYTHON a stub that records `status RUN_DIR` and exits with the code in status_code."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\necho "scontrol $*" >> {log}\n'
        'if [ "$1" = show ]; then printf "gpu-node-1\\ngpu-node-2\\n"; fi\n')
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\necho "srun $*" >> {log}\n{srun_body}\n')
    (bin_dir / "python").write_text(
        f'#!/usr/bin/env bash\necho "python $*" >> {log}\n'
        f'[ "$3" = status ] && exit "$(cat {tmp_path}/status_code 2>/dev/null || echo 2)"\nexit 0\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    python = sys.executable if real_python else str(bin_dir / "python")
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUN_DIR": str(tmp_path / "run"),
            "ENGINE_PYTHON": python, "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu-node-[1-2]", "SLURM_NNODES": "2"}


def _calls(tmp_path: Path) -> str:
    return (tmp_path / "calls.log").read_text()


def _run(tmp_path: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_launches_multi_node_torchrun_with_resume_auto_then_reads_the_status(tmp_path):
    env = _stubs(tmp_path, f"echo 0 > {tmp_path}/status_code; exit 0")
    done = _run(tmp_path, env, "--preset", "imagenet-lt-resnext50", "data.root=/data")
    assert done.returncode == 0, done.stderr
    calls = _calls(tmp_path)
    assert "--rdzv-endpoint gpu-node-1:29500 --rdzv-id 4242" in calls and "--nnodes 2 --nproc-per-node 8" in calls
    assert f"-m engine.cli train --out {tmp_path / 'run'} --resume auto --preset imagenet-lt-resnext50 data.root=/data" in calls
    assert calls.index("srun ") < calls.index(f"python -m engine.cli status {tmp_path / 'run'}")
    assert "requeue" not in calls


@pytest.mark.parametrize("srun_code", [1, 75])
def test_preempted_status_requeues_whatever_srun_returned(tmp_path, srun_code):
    """torchrun turns its ranks' 75 into 1: the status, not srun's code, asks for the requeue."""
    env = _stubs(tmp_path, f"echo 75 > {tmp_path}/status_code; exit {srun_code}")
    done = _run(tmp_path, env)
    assert done.returncode == 75, done.stderr
    assert "scontrol requeue 4242" in _calls(tmp_path) and "requeueing job 4242" in done.stdout


@pytest.mark.parametrize("status_code", [1, 2, 3])
def test_any_other_status_exits_1_without_requeue(tmp_path, status_code):
    """failed / running but dead (1), not a run folder (2), still running (3): exit 1 whatever srun said."""
    env = _stubs(tmp_path, f"echo {status_code} > {tmp_path}/status_code; exit 75")
    done = _run(tmp_path, env)
    assert done.returncode == 1, done.stderr
    assert "requeue" not in _calls(tmp_path) and f"engine status exited {status_code}" in done.stdout


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_the_batch_shell_is_forwarded_and_waited_for(tmp_path, sig):
    """Only the batch shell is signalled (--signal=B:USR1): the trap forwards SIGTERM to the step, waits for
    it to write its status, then requeues from that status (the step exits 1, as torchrun does)."""
    env = _stubs(tmp_path, f"trap 'sleep 0.3; echo step-stopped >> {tmp_path}/calls.log; "
                           f"echo 75 > {tmp_path}/status_code; exit 1' TERM\n"
                           "while true; do sleep 0.05; done")
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not ((tmp_path / "calls.log").exists() and "srun" in _calls(tmp_path)):
        assert time.time() < deadline, "srun was never started"
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    calls = _calls(tmp_path)
    assert calls.index("step-stopped") < calls.index("engine.cli status") < calls.index("scontrol requeue 4242")


@pytest.mark.slow  # a real `engine status` child process (imports torch)
def test_the_real_engine_status_drives_the_requeue(tmp_path):
    """ENGINE_PYTHON is the real python: `engine status` reads the status.json the step left."""
    status = {"state": "preempted", "time": "2026-01-01T00:00:00Z", "pid": 1, "host": "gpu-node-1", "epoch": 1,
              "step": 3, "steps": 7}
    env = _stubs(tmp_path, f"mkdir -p {tmp_path}/run && echo '{json.dumps(status)}' > {tmp_path}/run/status.json; "
                           "exit 1", real_python=True)
    done = _run(tmp_path, env)
    assert done.returncode == 75, done.stdout + done.stderr
    assert "preempted (2026-01-01T00:00:00Z, pid 1 on gpu-node-1) at epoch 1, step 3 of 7" in done.stdout
    assert "scontrol requeue 4242" in _calls(tmp_path)
