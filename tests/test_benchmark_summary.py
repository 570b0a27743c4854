"""benchmarks/summarize.py renders the committed SAMPLE run (no GPU needed) and records a run JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "summarize.py"
SAMPLE = ROOT / "benchmarks" / "results" / "sample"


def _summarize(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the Markdown table under `## heading`, header and rule excluded."""
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[2:]]


def test_sample_is_labelled_as_sample():
    runs = [json.loads(p.read_text()) for p in sorted(SAMPLE.glob("*.json"))]
    assert len(runs) >= 1
    for run in runs:
        assert run["schema"] == "lt-engine/bench-run/1"
        assert run["sample"] is True and "not measured" in run["note"]


def test_summary_renders_sample(tmp_path):
    out = tmp_path / "SUMMARY.md"
    done = _summarize(str(SAMPLE), "--out", str(out))
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "SAMPLE DATA — NOT A MEASUREMENT" in text.splitlines()[2]
    assert "Previous run:** `run-20250101T000000Z-SAMPLE1.json`" in text

    targets = _table(text, "Targets")
    header = text.split("## Targets", 1)[1].splitlines()[2]
    assert header == "| target | case | newest | required | status | previous | source |"
    assert all(len(r) == 7 for r in targets)
    by_case = {(r[0], r[1]): r for r in targets}
    eager = by_case[("fused head fwd+bwd speed-up over eager PyTorch (bf16)", "K=1000")]
    # sample: eager 0.380 ms, fused 0.110/1.1 ms → 3.80×, previous run fused 0.110/0.9 → 3.11×
    assert eager[2] == "3.80×" and eager[3] == "≥ 3×" and eager[4] == "PASS" and eager[5] == "3.11×"
    r152 = by_case[("ResNeXt-152 32x4d train step (bf16, channels-last, compile, batch 256)", "resnext152")]
    assert r152[2].startswith("1,500 img/s") and r152[4] == "**FAIL**" and r152[5] == "not measured"
    mixed = by_case[("DALI mixed (GPU) decode images/s over the ResNeXt-50 train step's", "224 px")]
    assert mixed[2].startswith("1.70×") and mixed[4] == "**FAIL**"
    assert by_case[("fused head runs at K=131072 (bf16)", "K=131072 bf16")][4] == "PASS"
    statuses = {r[4] for r in targets}
    assert statuses <= {"PASS", "**FAIL**", "MISSING"}
    # every target of the dict appears, each with its source
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import summarize
    finally:
        sys.path.remove(str(SCRIPT.parent))
    whats = {t["what"] for t in summarize.TARGETS.values()}
    assert whats == {r[0] for r in targets}
    assert all(r[6].startswith("throughput-tracking issue") for r in targets)

    limits = {r[0]: r for r in _table(text, "Device limits (measured; the roofline denominators)")}
    assert limits["bf16 matmul"][1] == "600 TFLOP/s"
    assert limits["copy (read + write)"][1] == "3,000 GB/s" and limits["copy (read + write)"][3] == "+1.0%"

    benches = _table(text, "All benchmarks")
    names = [r[0] for r in benches]
    assert "`benchmarks/bench_engine.py::test_engine_train_images_per_s`" in names
    assert any(re.fullmatch(r"[+-]\d+\.\d%", r[4]) for r in benches)
    assert "1 skipped" in text


def test_summary_to_stdout_and_empty_dir(tmp_path):
    done = _summarize(str(SAMPLE))
    assert done.returncode == 0 and "## Targets" in done.stdout
    done = _summarize(str(tmp_path))
    assert done.returncode == 0 and "No benchmark runs" in done.stdout


@pytest.mark.slow  # --record imports torch, triton and DALI in a child
def test_record_writes_a_run_the_summary_reads(tmp_path):
    """--record with the probe JSON given: no GPU, no measurement; then the summary renders it."""
    probe = {"schema": "lt-engine/device-limits/1", "source": "native", "device": {"name": "cpu"},
             "copy": {"gb_s": 10.0}, "matmul": {k: {"m": 64, "n": 64, "k": 64, "tflop_s": 1.0}
                                               for k in ("bf16", "fp16", "tf32", "fp32")}}
    (tmp_path / "limits.json").write_text(json.dumps(probe))
    bench = {"benchmarks": [{"name": "test_x", "fullname": "benchmarks/bench_x.py::test_x",
                             "extra_info": {"images_per_s": 123.0}, "stats": {"median": 0.5}}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite><testcase classname="benchmarks.bench_x" name="test_x"/>'
        '<testcase classname="benchmarks.bench_x" name="test_y"><skipped message="no GPU"/></testcase>'
        "</testsuite></testsuites>")
    results = tmp_path / "results"
    done = _summarize(str(results), "--record", "--benchmark-json", str(tmp_path / "bench.json"),
                      "--junit", str(tmp_path / "junit.xml"), "--limits", str(tmp_path / "limits.json"),
                      "--command", "pytest benchmarks", "--pytest-rc", "0")
    assert done.returncode == 0, done.stderr
    run = json.loads(Path(done.stdout.strip()).read_text())
    assert run["sample"] is False and run["command"] == "pytest benchmarks"
    assert run["device_limits"]["copy_bytes_s"] == 10e9
    assert run["outcomes"]["benchmarks/bench_x.py::test_y"]["outcome"] == "skipped"
    assert {"torch", "triton", "dali", "driver", "device"} <= set(run["machine"])
    text = _summarize(str(results)).stdout
    assert "NOT A MEASUREMENT" not in text
    assert "| `benchmarks/bench_x.py::test_x` | 500.00 ms | 123 img/s | 123 img/s | – |" in text


def test_device_limits_reads_the_probe_json(tmp_path, monkeypatch):
    """benchmarks/device_limits.py: on a (pretended) CUDA device the probe's JSON is the denominator; the
    fp32 rate is TF32's only when TF32 is allowed; a file from another device is refused."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import device_limits as dl
    finally:
        sys.path.remove(str(SCRIPT.parent))
    probe = {"source": "native", "device": {"name": "GPU-X"}, "copy": {"gb_s": 3000.0},
             "matmul": {k: {"tflop_s": v} for k, v in {"bf16": 700, "fp16": 710, "tf32": 350, "fp32": 55}.items()}}
    path = tmp_path / "device_limits.json"
    path.write_text(json.dumps(probe))
    monkeypatch.setattr(dl, "_CACHE", None)  # restored after the test: the benchmarks' cached limits stay
    monkeypatch.setenv("LT_DEVICE_LIMITS", str(path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU-X")
    limits = dl.device_limits(refresh=True)
    assert limits["source"] == "native" and set(limits["figure_sources"].values()) == {"native"}
    assert dl.copy_rate(limits) == 3000e9
    assert dl.matmul_rate(limits, torch.bfloat16) == 700e12
    assert dl.matmul_rate(limits, torch.float32, allow_tf32=False) == 55e12
    assert dl.matmul_rate(limits, torch.float32, allow_tf32=True) == 350e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU-Y")
    with pytest.raises(dl.DeviceLimitsError, match="measured on 'GPU-X'"):
        dl.device_limits(refresh=True)
    path.write_text(json.dumps({"error": "no usable CUDA device", "status": "no_device"}))
    with pytest.raises(dl.DeviceLimitsError, match="not a limits measurement"):
        dl.device_limits(refresh=True)
