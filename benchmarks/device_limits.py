"""This device's measured limits: the roofline denominators every GPU benchmark divides by.

    from device_limits import device_limits, matmul_rate, copy_rate
    limits = device_limits()            # cached for the process
    matmul_rate(limits, torch.bfloat16) # FLOP/s of a large dense bf16 matmul (fp32 accumulate)
    copy_rate(limits)                   # bytes/s of a large device-to-device copy, read + write counted

Where the figures come from, first match wins:
  1. the JSON file named by $LT_DEVICE_LIMITS (an error if it is set but unreadable);
  2. benchmarks/results/device_limits.json (written by benchmarks/gpu_suite.sh from the native probe);
  3. running the built native probe (build/native/device_limits, or $LT_DEVICE_PROBE);
  4. measuring with torch on the current device: `"source": "torch"`.
1–3 are used only on a CUDA device whose name matches the probe's (2 is not even read on CPU; 1 naming
another device is an error); on CPU and for any figure the probe could not measure, torch measures it here.
`figure_sources` says which figure came from where.

Conventions (the same in the probe and here): copy bandwidth counts read + write bytes (copying S bytes
moves 2·S); matmul rate = 2·M·N·K / time; each figure is timed by benchmarks/timing.py (triton.testing.do_bench on CUDA).
Matmul keys: bf16, fp16 (fp32 accumulate), tf32 (fp32 inputs on tensor cores), fp32 (IEEE fp32).

    python benchmarks/device_limits.py          # print the resolved limits as JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from timing import best_time  # benchmarks/timing.py (benchmarks/ is on sys.path, as for every bench file)

from common.errors import EngineError

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "benchmarks" / "results" / "device_limits.json"
PROBE = ROOT / "build" / "native" / "device_limits"
MATMUL_KEYS = ("bf16", "fp16", "tf32", "fp32")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32}

_CACHE: dict | None = None
_TIMER = "triton.testing.do_bench, min" if torch.cuda.is_available() else "best wall-clock call"


class DeviceLimitsError(EngineError, RuntimeError):
    """A limits file that was asked for ($LT_DEVICE_LIMITS) cannot be used."""


def device_limits(refresh: bool = False) -> dict:
    """The resolved limits (see the module docstring), measured or read once per process."""
    global _CACHE
    if _CACHE is None or refresh:
        _CACHE = _resolve()
    return _CACHE


def matmul_rate(limits: dict, dtype: torch.dtype, allow_tf32: bool | None = None) -> float:
    """FLOP/s for a matmul on `dtype` inputs; fp32 is the TF32 rate only when TF32 is allowed
    (default: torch.backends.cuda.matmul.allow_tf32, as torch.mm and the fused head decide)."""
    if dtype == torch.float32:
        tf32 = torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32
        return limits["matmul_flops_s"]["tf32" if tf32 else "fp32"]
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if key is None:
        raise KeyError(f"no matmul limit for {dtype}")
    return limits["matmul_flops_s"][key]


def copy_rate(limits: dict) -> float:
    """Bytes/s of a large device-to-device copy, read + write counted."""
    return limits["copy_bytes_s"]


# --------------------------------------------------------------------------- resolution


def _resolve() -> dict:
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    raw, origin = None, None
    explicit = os.environ.get("LT_DEVICE_LIMITS")
    if explicit:
        raw = _read_json(Path(explicit), required=True)
        origin = explicit
    elif cuda and RESULTS_JSON.is_file():  # GPU figures: never a CPU's denominators
        raw, origin = _read_json(RESULTS_JSON, required=False), str(RESULTS_JSON)
    if raw is not None and not _matches(raw, name):
        msg = f"{origin} was measured on {raw.get('device', {}).get('name')!r}, this device is {name!r}: not used"
        if explicit:
            raise DeviceLimitsError(msg)
        warnings.warn(msg, stacklevel=3)
        raw = None
    if raw is None and cuda:
        raw, origin = _run_probe()
    native = _from_probe(raw) if raw is not None else {}
    missing = [k for k in (*MATMUL_KEYS, "copy") if k not in native]
    measured = _torch_measure(missing) if missing else {}
    figures = {**measured, **native}
    sources = {k: ("native" if k in native else "torch") for k in (*MATMUL_KEYS, "copy")}
    kinds = set(sources.values())
    return {
        "source": kinds.pop() if len(kinds) == 1 else "native+torch",
        "origin": origin if native else "torch (measured in this process)",
        "device": name,
        "matmul_flops_s": {k: figures[k] for k in MATMUL_KEYS},
        "copy_bytes_s": figures["copy"],
        "figure_sources": sources,
        "conventions": "copy: (read + write bytes) / best time; matmul: 2·M·N·K / best time, fp32 accumulate",
        "torch_methods": measured.get("_methods", {}),
        "raw": raw,
    }


def _read_json(path: Path, required: bool) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        if required:
            raise DeviceLimitsError(f"LT_DEVICE_LIMITS={path}: cannot read the limits JSON ({exc})") from None
        warnings.warn(f"{path}: cannot read the limits JSON ({exc}); measuring instead", stacklevel=4)
        return None
    if not isinstance(data, dict) or "error" in data:
        why = data.get("error") if isinstance(data, dict) else "not a JSON object"
        if required:
            raise DeviceLimitsError(f"LT_DEVICE_LIMITS={path}: not a limits measurement ({why})")
        warnings.warn(f"{path}: not a limits measurement ({why}); measuring instead", stacklevel=4)
        return None
    return data


def _matches(raw: dict, name: str) -> bool:
    return raw.get("device", {}).get("name") == name and not raw.get("sample", False)


def _run_probe() -> tuple[dict | None, str | None]:
    probe = Path(os.environ.get("LT_DEVICE_PROBE", PROBE))
    if not probe.is_file():
        return None, None
    try:
        done = subprocess.run([str(probe)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        warnings.warn(f"native probe {probe} did not run ({exc}); measuring with torch", stacklevel=4)
        return None, None
    try:
        data = json.loads(done.stdout)
    except ValueError:
        data = None
    if done.returncode not in (0, 3) or not isinstance(data, dict) or "error" in data:
        warnings.warn(f"native probe {probe} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}; "
                      "measuring with torch", stacklevel=4)
        return None, None
    return data, f"{probe} (run in this process)"


def _from_probe(raw: dict) -> dict:
    """Probe JSON → {key: rate} in FLOP/s and bytes/s, for the figures it measured."""
    out = {}
    for key in MATMUL_KEYS:
        entry = raw.get("matmul", {}).get(key, {})
        if "tflop_s" in entry:
            out[key] = float(entry["tflop_s"]) * 1e12
    copy = raw.get("copy", {})
    if "gb_s" in copy:
        out["copy"] = float(copy["gb_s"]) * 1e9
    return out


# --------------------------------------------------------------------------- torch fallback


def _torch_measure(keys: list[str]) -> dict:
    """The figures in `keys` measured with torch on this process's device (CPU when no CUDA)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    warmup, iters = (3, 10) if cuda else (1, 3)
    n = 8192 if cuda else 512
    out: dict = {"_methods": {}}
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for key in keys:
            if key == "copy":
                continue
            if key == "tf32" and not cuda:  # no TF32 on CPU: fp32 inputs run as fp32
                continue
            g = torch.Generator(device=device).manual_seed(0)
            a = (torch.rand(n, n, device=device, generator=g) * 2 - 1).to(_TORCH_DTYPES[key])
            b = (torch.rand(n, n, device=device, generator=g) * 2 - 1).to(_TORCH_DTYPES[key])
            torch.backends.cuda.matmul.allow_tf32 = key == "tf32"
            out[key] = 2 * n**3 / best_time(lambda a=a, b=b: torch.mm(a, b), warmup, iters)
            out["_methods"][key] = f"torch.mm {n}x{n}x{n} {key} on {device.type}, timing.best_time ({_TIMER})"
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    if "tf32" in keys and not cuda:
        out["tf32"] = out["fp32"] if "fp32" in out else _torch_measure(["fp32"])["fp32"]
        out["_methods"]["tf32"] = "CPU has no TF32: the fp32 figure"
    if "copy" in keys:
        nbytes = 2**30 if cuda else 8 * 2**20
        if cuda:
            nbytes = min(nbytes, int(torch.cuda.mem_get_info()[0] * 0.4) // 2**20 * 2**20)
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        out["copy"] = 2 * nbytes / best_time(lambda: dst.copy_(src), warmup, iters)
        out["_methods"]["copy"] = f"Tensor.copy_ of {nbytes >> 20} MiB on {device.type}, read + write counted"
        del src, dst
    return out


def main() -> int:
    limits = device_limits()
    print(json.dumps({k: v for k, v in limits.items() if k != "raw"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
