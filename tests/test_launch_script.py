"""docs/launch/slurm-train.sh with stub srun/scontrol: the command it launches, requeue on preemption, plain exits."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "launch" / "slurm-train.sh"


def _stubs(tmp_path: Path, srun_body: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "scontrol").write_text(
        f'#!/usr/bin/env bash\necho "scontrol $*" >> {log}\n'
        'if [ "$1" = show ]; then printf "gpu-node-1\\ngpu-node-2\\n"; fi\n')
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\necho "srun $*" >> {log}\n{srun_body}\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUN_DIR": str(tmp_path / "run"),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[1-2]", "SLURM_NNODES": "2"}


def _calls(tmp_path: Path) -> str:
    return (tmp_path / "calls.log").read_text()


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_launches_multi_node_torchrun_with_resume_auto(tmp_path):
    env = _stubs(tmp_path, "exit 0")
    done = subprocess.run(["bash", str(SCRIPT), "--preset", "imagenet-lt-resnext50", "data.root=/data"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = _calls(tmp_path)
    assert "--rdzv-endpoint gpu-node-1:29500 --rdzv-id 4242" in calls and "--nnodes 2 --nproc-per-node 8" in calls
    assert f"-m engine.cli train --out {tmp_path / 'run'} --resume auto --preset imagenet-lt-resnext50 data.root=/data" in calls
    assert "requeue" not in calls


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_is_forwarded_and_the_job_requeued(tmp_path, sig):
    # The stub training job checkpoints on SIGTERM and exits 75, as `engine train` does.
    env = _stubs(tmp_path, f"trap 'echo got-term >> {tmp_path}/calls.log; exit 75' TERM\n"
                           "while true; do sleep 0.05; done")
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not ((tmp_path / "calls.log").exists() and "srun" in _calls(tmp_path)):
        assert time.time() < deadline, "srun was never started"
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    calls = _calls(tmp_path)
    assert "got-term" in calls and "scontrol requeue 4242" in calls
    assert "requeueing job 4242" in out


def test_exit_75_from_the_job_requeues_and_a_failure_does_not(tmp_path):
    env = _stubs(tmp_path, "exit 75")
    assert subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, timeout=60).returncode == 0
    assert "scontrol requeue 4242" in _calls(tmp_path)
    (tmp_path / "calls.log").unlink()
    (tmp_path / "bin" / "srun").write_text(f'#!/usr/bin/env bash\necho "srun $*" >> {tmp_path}/calls.log\nexit 3\n')
    assert subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, timeout=60).returncode == 3
    assert "requeue" not in _calls(tmp_path)
