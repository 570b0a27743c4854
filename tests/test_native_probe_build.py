"""The native device-limits probe (CMakeLists.txt, benchmarks/native/) configures and builds; runs on a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None,
                       reason="building the native probe needs nvcc (CUDA toolkit) and cmake on PATH"),
    pytest.mark.slow,  # a CMake + nvcc build: seconds even on a warm machine
]


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    """`cmake -S . -B BUILD && cmake --build BUILD` as the README gives it, for sm_90; cuBLASLt from the toolkit or
    from the nvidia wheels of this interpreter's environment (VIRTUAL_ENV, which CMakeLists.txt searches)."""
    build = tmp_path_factory.mktemp("native-build")
    env = dict(os.environ, VIRTUAL_ENV=sys.prefix)
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=90"],
                ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return build / "device_limits"


def test_probe_builds_for_hopper_and_links_cublaslt(probe):
    assert probe.is_file() and probe.stat().st_mode & 0o111
    needed = subprocess.run(["readelf", "-d", str(probe)], capture_output=True, text=True, check=True).stdout
    assert "libcublasLt.so" in needed, needed
    if shutil.which("cuobjdump"):
        elves = subprocess.run(["cuobjdump", "--list-elf", str(probe)], capture_output=True, text=True).stdout
        assert "sm_90" in elves, f"no sm_90 device code in the probe:\n{elves}"


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
