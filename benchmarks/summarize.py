"""Benchmark runs → one Markdown summary: the newest run against the targets and against the run before.

    python benchmarks/summarize.py RESULTS_DIR [--out FILE]          # SUMMARY.md (stdout without --out)
    python benchmarks/summarize.py RESULTS_DIR --record \\
        --benchmark-json BENCH.json [--junit JUNIT.xml] [--limits LIMITS.json] [--command CMD] [--pytest-rc N]
                                                                    # write one run JSON into RESULTS_DIR

A run JSON (`run-<UTC date>-<short commit>.json`, schema `lt-engine/bench-run/1`) holds the device,
driver, torch / triton / DALI versions, the git commit, the command, the device limits (native probe
JSON, or the torch-measured fallback), the pytest-benchmark results and the pytest outcome of every
benchmark. Every `*.json` in RESULTS_DIR with that schema is a run; the newest (by `created`) is
compared with the targets below and with the previous run (on the same device when there is one).
A run marked `"sample": true` is example data, not a measurement: the summary says so at the top.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

SCHEMA = "lt-engine/bench-run/1"
ISSUE = "throughput-tracking issue"

# One dict of targets: `min` / `max` is the bound, `required` how the summary prints it, `source` where the
# number comes from.
TARGETS: dict[str, dict] = {
    "fused_vs_eager": {
        "what": "fused head fwd+bwd speed-up over eager PyTorch (bf16)", "K": [1000, 8142], "min": 3.0,
        "required": "≥ 3×", "source": f"{ISSUE}: fused head ≥ 3× eager at K=1000 and 8142, bf16",
    },
    "fused_vs_compile": {
        "what": "fused head fwd+bwd speed-up over the torch.compile'd reference (bf16)", "K": [1000, 8142],
        "min": 1.5, "required": "≥ 1.5×", "source": f"{ISSUE}: fused head ≥ 1.5× torch.compile at K=1000 and 8142",
    },
    "fused_roofline": {
        "what": "fused head time over its roofline floor (bf16)", "K": [1000, 8142], "max": 2.0,
        "required": "≤ 2× floor", "source": f"{ISSUE}: ≤ 2× the roofline floor (measured matmul / copy limits)",
    },
    "fused_peak_memory": {
        "what": "fused head peak extra memory over eager's (bf16)", "K": [1000, 8142], "max": 0.25,
        "required": "≤ 25%", "source": f"{ISSUE}: peak extra memory ≤ 25% of eager's",
    },
    "fused_large_k": {
        "what": "fused head runs at K=131072 (bf16)", "K": [131072], "runs": True,
        "required": "runs", "source": f"{ISSUE}: K=131072 runs (no out-of-memory, no error)",
    },
    "train_step_resnext50": {
        "what": "ResNeXt-50 32x4d train step (bf16, channels-last, compile, batch 256)", "arch": "resnext50",
        "min": 4500.0, "required": "≥ 4,500 img/s", "source": f"{ISSUE}: ResNeXt-50 ≥ 4,500 img/s",
    },
    "train_step_resnext152": {
        "what": "ResNeXt-152 32x4d train step (bf16, channels-last, compile, batch 256)", "arch": "resnext152",
        "min": 1600.0, "required": "≥ 1,600 img/s", "source": f"{ISSUE}: ResNeXt-152 ≥ 1,600 img/s",
    },
    "dali_mixed_vs_train_step": {
        "what": "DALI mixed (GPU) decode images/s over the ResNeXt-50 train step's", "min": 2.0,
        "required": "≥ 2×", "source": f"{ISSUE}: DALI mixed decode ≥ 2× the train step's images/s",
    },
    "dali_cpu_vs_torchvision": {
        "what": "DALI CPU pipeline images/s over the torchvision DataLoader's (same workers)", "min": 1.5,
        "required": "≥ 1.5×", "source": f"{ISSUE}: DALI CPU ≥ 1.5× torchvision DataLoader",
    },
    "class_aware_overhead": {
        "what": "class-aware sampling overhead vs plain order (same DALI pipeline)", "max": 0.02, "strict": True,
        "required": "< 2%", "source": f"{ISSUE}: class-aware sampling overhead < 2%",
    },
}


# --------------------------------------------------------------------------- loading


def load_runs(results_dir: Path) -> list[dict]:
    """Every run JSON in `results_dir` (not recursive), oldest first."""
    runs = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            data["_file"] = path.name
            runs.append(data)
    return sorted(runs, key=lambda r: (r.get("created", ""), r["_file"]))


def previous_run(runs: list[dict]) -> dict | None:
    """The run before the newest: on the same device when there is one, else the one just before."""
    if len(runs) < 2:
        return None
    newest = runs[-1]
    same = [r for r in runs[:-1] if _device(r) == _device(newest)]
    return (same or runs[:-1])[-1]


def _device(run: dict) -> str:
    return run.get("machine", {}).get("device", "?")


def benchmarks(run: dict | None) -> list[dict]:
    if not run:
        return []
    return (run.get("pytest_benchmark") or {}).get("benchmarks", [])


def _median(b: dict) -> float | None:
    t = b.get("extra_info", {}).get("time_s")
    if isinstance(t, (int, float)):
        return float(t)
    stats = b.get("stats") or {}
    return stats.get("median")


# --------------------------------------------------------------------------- finding benchmarks


def _fused(run, K: int, impl: str, dtype: str = "bfloat16") -> dict | None:
    for b in benchmarks(run):
        e = b.get("extra_info", {})
        if e.get("impl") == impl and e.get("dtype") == dtype and (e.get("shape") or {}).get("K") == K:
            return b
    return None


def _train_step(run, arch: str) -> dict | None:
    """The train-step benchmark of `arch`: extra_info arch containing `arch` and images_per_s, from a
    `bench_train_step` file; the batch-256 one when several."""
    found = [b for b in benchmarks(run)
             if "train_step" in b.get("fullname", "") and arch in str(b.get("extra_info", {}).get("arch", ""))
             and isinstance(b.get("extra_info", {}).get("images_per_s"), (int, float))]
    found.sort(key=lambda b: b["extra_info"].get("batch") != 256)
    return found[0] if found else None


def _by_name(run, name: str) -> dict | None:
    for b in benchmarks(run):
        if b.get("name") == name:
            return b
    return None


def _rate(b: dict | None) -> float | None:
    v = (b or {}).get("extra_info", {}).get("images_per_s")
    return float(v) if isinstance(v, (int, float)) else None


# --------------------------------------------------------------------------- targets


def _ratio(num, den):
    return num / den if num is not None and den not in (None, 0) else None


def evaluate(run: dict | None) -> list[dict]:
    """One row per target case: {"key", "case", "value", "unit", "ok" (True/False/None = not measured), "note"}."""
    rows = []

    def row(key, case, value, unit, note=""):
        t = TARGETS[key]
        ok = None
        if value is not None:
            if "min" in t:
                ok = value >= t["min"]
            else:
                ok = value < t["max"] if t.get("strict") else value <= t["max"]
        rows.append(dict(key=key, case=case, value=value, unit=unit, ok=ok, note=note))

    for K in TARGETS["fused_vs_eager"]["K"]:
        fused, eager, comp = (_fused(run, K, i) for i in ("fused", "eager", "compiled"))
        tf, te, tc = (_median(b) if b else None for b in (fused, eager, comp))
        row("fused_vs_eager", f"K={K}", _ratio(te, tf), "×")
        row("fused_vs_compile", f"K={K}", _ratio(tc, tf), "×")
        floor = (fused or {}).get("extra_info", {}).get("roofline_floor_s")
        row("fused_roofline", f"K={K}", _ratio(tf, floor if isinstance(floor, (int, float)) else None), "× floor",
            f"limits: {(fused or {}).get('extra_info', {}).get('limits_source', '?')}" if fused else "")
        pf, pe = ((b or {}).get("extra_info", {}).get("peak_mem_bytes") for b in (fused, eager))
        numeric = all(isinstance(p, (int, float)) for p in (pf, pe))
        row("fused_peak_memory", f"K={K}", _ratio(pf, pe) if numeric else None, "of eager",
            f"{_mib(pf)} vs {_mib(pe)}" if numeric else "")
    for K in TARGETS["fused_large_k"]["K"]:
        b = _fused(run, K, "fused")
        outcome = _outcome(run, b, f"-K{K}-bf16-fused]")
        ran = b is not None and outcome in ("passed", None) and _median(b) is not None
        rows.append(dict(key="fused_large_k", case=f"K={K} bf16", value=_median(b) if ran else None, unit="s",
                         ok=True if ran else (False if b is not None or outcome in ("failed", "error") else None),
                         note=f"pytest: {outcome}" if outcome else ""))
    for key in ("train_step_resnext50", "train_step_resnext152"):
        b = _train_step(run, TARGETS[key]["arch"])
        note = ""
        if b:
            e = b["extra_info"]
            note = ", ".join(f"{k} {e[k]}" for k in ("batch", "amp", "channels_last", "compile") if k in e)
        row(key, TARGETS[key]["arch"], _rate(b), "img/s", note)
    step = _rate(_train_step(run, "resnext50"))
    mixed = _rate(_by_name(run, "test_dali_mixed_gpu_224"))
    row("dali_mixed_vs_train_step", "224 px", _ratio(mixed, step), "×",
        f"{_num(mixed)} vs {_num(step)} img/s" if mixed and step else "")
    for mode in ("train", "eval"):
        d, t = _rate(_by_name(run, f"test_dali_cpu[{mode}]")), _rate(_by_name(run, f"test_torchvision[{mode}]"))
        row("dali_cpu_vs_torchvision", mode, _ratio(d, t), "×", f"{_num(d)} vs {_num(t)} img/s" if d and t else "")
    plain = _rate(_by_name(run, "test_dali_cpu_sampler_order[instance]"))
    aware = _rate(_by_name(run, "test_dali_cpu_sampler_order[class_aware]"))
    over = plain / aware - 1 if plain and aware else None
    row("class_aware_overhead", "DALI CPU train", over, "overhead",
        f"{_num(aware)} vs {_num(plain)} img/s" if over is not None else "")
    return rows


def _outcome(run, b: dict | None, id_suffix: str = "") -> str | None:
    """pytest's outcome of benchmark `b`, or (no result: it failed or skipped before timing) of the test
    whose id ends in `id_suffix`."""
    outcomes = (run or {}).get("outcomes") or {}
    if b is not None:
        return outcomes.get(b.get("fullname", ""), {}).get("outcome")
    hits = [v.get("outcome") for k, v in outcomes.items() if id_suffix and k.endswith(id_suffix)]
    return hits[0] if hits else None


# --------------------------------------------------------------------------- formatting


def _num(v, digits: int = 0) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _g(v) -> str:
    """A figure with sensible digits: 6,136,487 / 42.50 / 0.0225."""
    if v is None:
        return "–"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"


def _mib(v) -> str:
    return f"{v / 2**20:,.1f} MiB" if isinstance(v, (int, float)) else "–"


def _fmt(value, unit: str) -> str:
    if value is None:
        return "not measured"
    if unit == "×":
        return f"{value:.2f}×"
    if unit == "× floor":
        return f"{value:.2f}× floor"
    if unit in ("of eager", "overhead"):
        return f"{100 * value:.1f}%"
    if unit == "img/s":
        return f"{value:,.0f} img/s"
    if unit == "s":
        return f"ran ({value * 1e3:.2f} ms)"
    return f"{value:.4g} {unit}"


def _required(key: str) -> str:
    return TARGETS[key]["required"]


def _status(ok) -> str:
    return {True: "PASS", False: "**FAIL**", None: "MISSING"}[ok]


def _delta(new, old) -> str:
    if new is None or old is None or old == 0:
        return "–"
    return f"{100 * (new / old - 1):+.1f}%"


def _main_figure(b: dict) -> tuple[str, float | None, bool]:
    """(label, value, higher_is_better) of a benchmark: images/s, else TFLOP/s, else the median time."""
    e = b.get("extra_info", {})
    for key, label in (("images_per_s", "img/s"), ("indices_per_s", "indices/s")):
        if isinstance(e.get(key), (int, float)):
            return label, float(e[key]), True
    t = _median(b)
    if isinstance(e.get("flops"), (int, float)) and t:
        return "TFLOP/s", e["flops"] / t / 1e12, True
    return "ms", t * 1e3 if t else None, False


def _figures(b: dict) -> str:
    e = b.get("extra_info", {})
    t = _median(b)
    parts = []
    if isinstance(e.get("flops"), (int, float)) and t:
        parts.append(f"{e['flops'] / t / 1e12:.2f} TFLOP/s")
    if isinstance(e.get("bytes"), (int, float)) and t:
        parts.append(f"{e['bytes'] / t / 1e9:.1f} GB/s")
    if isinstance(e.get("roofline_frac"), (int, float)):
        parts.append(f"{100 * e['roofline_frac']:.1f}% of roofline")
    for key, label in (("images_per_s", "img/s"), ("indices_per_s", "indices/s")):
        if isinstance(e.get(key), (int, float)):
            parts.append(f"{e[key]:,.0f} {label}")
    if isinstance(e.get("peak_mem_bytes"), (int, float)):
        parts.append(f"peak {_mib(e['peak_mem_bytes'])}")
    return ", ".join(parts) or "–"


def _limits_rows(run: dict | None) -> dict[str, tuple[float | None, str]]:
    lim = (run or {}).get("device_limits") or {}
    raw = lim.get("raw") or {}
    out = {}
    copy = raw.get("copy", {})
    out["copy (read + write)"] = (lim.get("copy_bytes_s", 0) / 1e9 or None, "GB/s",
                                  "native: best of cudaMemcpy D2D / copy kernel" if "gb_s" in copy
                                  else lim.get("torch_methods", {}).get("copy", lim.get("source", "")))
    for key in ("bf16", "fp16", "tf32", "fp32"):
        entry = raw.get("matmul", {}).get(key, {})
        v = (lim.get("matmul_flops_s") or {}).get(key)
        how = (f"native: cuBLASLt {entry['m']}×{entry['n']}×{entry['k']}" if "tflop_s" in entry
               else lim.get("torch_methods", {}).get(key, lim.get("source", "")))
        out[f"{key} matmul"] = (v / 1e12 if v else None, "TFLOP/s", how)
    return out


def render(runs: list[dict]) -> str:
    if not runs:
        return "# Benchmark summary\n\nNo benchmark runs (no `*.json` with schema `%s`) found.\n" % SCHEMA
    new = runs[-1]
    old = previous_run(runs)
    lines = ["# Benchmark summary", ""]
    if new.get("sample"):
        lines += ["> **SAMPLE DATA — NOT A MEASUREMENT.** This summary was rendered from the committed example "
                  "in `benchmarks/results/sample/` to show the format; its numbers are illustrative and were not "
                  "measured on any device. Run `benchmarks/gpu_suite.sh` on a GPU machine for real figures.", ""]

    def describe(run):
        m, g = run.get("machine", {}), run.get("git", {})
        commit = g.get("short") or "unknown commit"
        dirty = " (dirty)" if g.get("dirty") else ""
        return (f"`{run['_file']}` — {run.get('created', '?')}, commit {commit}{dirty}; {m.get('device', '?')}, "
                f"driver {m.get('driver') or '?'}, CUDA {m.get('cuda') or '?'}, torch {m.get('torch') or '?'}, "
                f"triton {m.get('triton') or '?'}, DALI {m.get('dali') or 'not installed'}")

    lines.append(f"- **Newest run:** {describe(new)}")
    lines.append(f"- **Command:** `{new.get('command', '?')}`")
    lines.append(f"- **Previous run:** {describe(old) if old else 'none'}")
    if old and _device(old) != _device(new):
        lines.append(f"- Note: the previous run is on another device ({_device(old)}): deltas compare machines.")
    rc = new.get("pytest_rc")
    if rc not in (None, 0):
        lines.append(f"- pytest exit status {rc}: see the outcomes below.")
    lines.append("")

    lines += ["## Device limits (measured; the roofline denominators)", "",
              "| figure | newest | previous | Δ | method |", "|---|---:|---:|---:|---|"]
    new_l, old_l = _limits_rows(new), _limits_rows(old)
    for name, (v, unit, how) in new_l.items():
        ov = old_l.get(name, (None,))[0] if old else None
        lines.append(f"| {name} | {_g(v)} {unit} | {_g(ov) + ' ' + unit if ov else '–'} | "
                     f"{_delta(v, ov)} | {how} |")
    lines.append("")

    lines += ["## Targets", "", "| target | case | newest | required | status | previous | source |",
              "|---|---|---:|---|---|---:|---|"]
    old_rows = {(r["key"], r["case"]): r for r in evaluate(old)} if old else {}
    for r in evaluate(new):
        o = old_rows.get((r["key"], r["case"]))
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {TARGETS[r['key']]['what']} | {r['case']} | {_fmt(r['value'], r['unit'])}{note} | "
                     f"{_required(r['key'])} | {_status(r['ok'])} | {_fmt(o['value'], o['unit']) if o else '–'} | "
                     f"{TARGETS[r['key']]['source']} |")
    lines.append("")

    lines += ["## All benchmarks", "", "| benchmark | median | figures | main figure | Δ vs previous |",
              "|---|---:|---|---:|---:|"]
    old_by = {b.get("fullname"): b for b in benchmarks(old)}
    for b in benchmarks(new):
        label, v, _ = _main_figure(b)
        ob = old_by.get(b.get("fullname"))
        ov = _main_figure(ob)[1] if ob else None
        t = _median(b)
        lines.append(f"| `{b.get('fullname', b.get('name'))}` | {_num(t * 1e3 if t else None, 2)} ms | {_figures(b)} | "
                     f"{_g(v)} {label} | {_delta(v, ov)} |")
    lines.append("")

    outcomes = new.get("outcomes") or {}
    bad = {k: v for k, v in outcomes.items() if v.get("outcome") != "passed"}
    if outcomes:
        counts: dict[str, int] = {}
        for v in outcomes.values():
            counts[v.get("outcome", "?")] = counts.get(v.get("outcome", "?"), 0) + 1
        lines += ["## pytest outcomes", "", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), ""]
        if bad:
            lines += ["| test | outcome | message |", "|---|---|---|"]
            for k, v in sorted(bad.items()):
                msg = (v.get("message") or "").replace("|", "\\|").replace("\n", " ")[:200]
                lines.append(f"| `{k}` | {v.get('outcome')} | {msg} |")
            lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- recording a run


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20,
                              cwd=Path(__file__).resolve().parent.parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name, mod in (("torch", "torch"), ("triton", "triton"), ("torchvision", "torchvision"),
                      ("dali", "nvidia.dali"), ("pytest_benchmark", "pytest_benchmark")):
        try:
            out[name] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:  # noqa: BLE001 - not installed / broken install: recorded as absent
            out[name] = None
    return out


def _driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def read_junit(path: Path) -> dict:
    """junit XML → {nodeid-like "file::name": {"outcome", "message"}}."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        parts = classname.split(".")
        fullname = "/".join(parts) + ".py::" + name if parts[0] else name
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = el.get("message") or (el.text or "")
                break
        out[fullname] = {"outcome": outcome, "message": message.strip()[:500]}
    return out


def record(results_dir: Path, bench_json: Path, junit: Path | None, limits: Path | None, command: str,
           pytest_rc: int | None) -> Path:
    """Write run-<UTC time>-<short commit>.json into results_dir; returns its path."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import device_limits as dl

    now = dt.datetime.now(dt.timezone.utc)
    commit = os.environ.get("LT_GIT_COMMIT") or _git("rev-parse", "HEAD")
    dirty = os.environ.get("LT_GIT_DIRTY")
    status = _git("status", "--porcelain", "--untracked-files=no") if dirty is None else None
    git = {"commit": commit, "short": commit[:7] if commit else None,
           "dirty": (dirty == "1") if dirty is not None else (bool(status) if status is not None else None)}
    if limits is not None and limits.is_file():
        raw = json.loads(limits.read_text())
        figures = dl._from_probe(raw)
        lim = {"source": "native", "origin": str(limits), "device": raw.get("device", {}).get("name"),
               "matmul_flops_s": {k: figures.get(k) for k in dl.MATMUL_KEYS}, "copy_bytes_s": figures.get("copy"),
               "raw": raw}
    else:
        lim = dl.device_limits()
    cuda = torch.cuda.is_available()
    versions = _versions()
    run = {
        "schema": SCHEMA,
        "sample": False,
        "created": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git": git,
        "command": command,
        "machine": {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
            "driver": _driver(),
            "cuda": torch.version.cuda,
            "host": platform.node(),
            **versions,
        },
        "device_limits": lim,
        "pytest_rc": pytest_rc,
        "outcomes": read_junit(junit) if junit and junit.is_file() else {},
        "pytest_benchmark": json.loads(bench_json.read_text()) if bench_json.is_file() else None,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"run-{now.strftime('%Y%m%dT%H%M%SZ')}-{git['short'] or 'nocommit'}.json"
    path.write_text(json.dumps(run, indent=1, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results_dir", type=Path)
    p.add_argument("--out", type=Path, help="write the Markdown summary here (default: stdout)")
    p.add_argument("--record", action="store_true", help="write a run JSON into RESULTS_DIR instead")
    p.add_argument("--benchmark-json", type=Path)
    p.add_argument("--junit", type=Path)
    p.add_argument("--limits", type=Path, help="the native probe's JSON (default: benchmarks/device_limits.py)")
    p.add_argument("--command", default=" ".join(sys.argv))
    p.add_argument("--pytest-rc", type=int)
    args = p.parse_args(argv)
    if args.record:
        if args.benchmark_json is None:
            p.error("--record needs --benchmark-json")
        print(record(args.results_dir, args.benchmark_json, args.junit, args.limits, args.command, args.pytest_rc))
        return 0
    if not args.results_dir.is_dir():
        p.error(f"{args.results_dir} is not a folder")
    text = render(load_runs(args.results_dir))
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
