"""The native device-limits probe (CMakeLists.txt, benchmarks/native/) configures and builds; runs on a GPU."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    shutil.which("nvcc") is None or shutil.which("cmake") is None,
    reason="building the native probe needs nvcc (CUDA toolkit) and cmake on PATH",
)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("native-build")
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build)], ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return build / "device_limits"


def test_probe_builds(probe):
    assert probe.is_file() and probe.stat().st_mode & 0o111


def test_probe_rejects_bad_arguments(probe):
    done = subprocess.run([str(probe), "--iters"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert json.loads(done.stdout)["status"] == "bad_arguments"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the no-device path cannot be seen")
def test_probe_without_device_fails_clearly(probe):
    done = subprocess.run([str(probe)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert json.loads(done.stdout)["status"] == "no_device"
    assert "no usable CUDA device" in done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="running the probe needs a CUDA device; none here")
def test_probe_measures(probe):
    done = subprocess.run([str(probe), "--iters", "3", "--warmup", "1", "--gemm-size", "4096", "--copy-mib", "256"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["device"]["name"] == torch.cuda.get_device_name(out["device"]["index"])
    assert out["copy"]["gb_s"] > 0 and out["copy"]["memcpy_d2d"]["gb_s"] > 0 and out["copy"]["kernel"]["gb_s"] > 0
    for key in ("bf16", "fp16", "tf32", "fp32"):
        assert out["matmul"][key]["tflop_s"] > 0 and out["matmul"][key]["m"] == 4096
    assert out["matmul"]["bf16"]["tflop_s"] > out["matmul"]["fp32"]["tflop_s"]  # tensor cores
