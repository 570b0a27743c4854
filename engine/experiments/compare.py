"""`engine compare`: one table (compare.md, printed) and one plot (compare.png) of many/medium/few/all across runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.errors import CheckpointError
from common.io import atomic_write_text, write_json
from engine.render import fmt, markdown_table, save_png, subplots

COMPARE_KEYS = ("many", "medium", "few", "top1", "gm", "f1", "gmean", "iba")
SCALE = {"f1": 100, "gmean": 100, "iba": 100}  # fractions shown ×100


def read_metrics(d: Path) -> dict:
    """A run folder's (or a file's) metrics.json, checked to be an lt-engine one."""
    path = d / "metrics.json" if d.is_dir() else d
    if not path.is_file():
        raise CheckpointError(f"{d}: no metrics.json (expected a finished run folder or a metrics.json file)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    missing = [k for k in ("top1", "many", "medium", "few", "method") if k not in m]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; expected an lt-engine metrics.json")
    return {"run": str(path.parent), "method": m["method"], "seed": m.get("seed"), **{k: m.get(k) for k in COMPARE_KEYS}}


def compare_runs(run_dirs: list[Path], out_dir: Path) -> dict:
    """Writes compare.md / compare.json / compare.png; returns {"runs", "table"} (the command prints the table)."""
    if not run_dirs:
        raise CheckpointError("engine compare needs at least one run folder")
    rows = [read_metrics(Path(d)) for d in run_dirs]
    names = [Path(r["run"]).name for r in rows]
    if len(set(names)) < len(names):
        names = [r["run"] for r in rows]
    table = markdown_table(["run", "method", *("all" if k == "top1" else k for k in COMPARE_KEYS)],
                           [[name, r["method"], *(fmt(r[k], SCALE.get(k, 1)) for k in COMPARE_KEYS)]
                            for name, r in zip(names, rows)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "compare.md", "# Runs compared (test split; F1/G-mean/IBA ×100)\n\n" + table + "\n")
    write_json(out_dir / "compare.json", {"runs": rows})
    _plot(out_dir / "compare.png", rows, names)
    return {"runs": rows, "table": table, "written": [out_dir / "compare.md", out_dir / "compare.png"]}


def _plot(path: Path, rows: list[dict], names: list[str]) -> None:
    groups = ("many", "medium", "few", "top1")
    fig, ax = subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(rows)) / 3), 3.8))
    width = 0.8 / len(rows)
    for i, (name, r) in enumerate(zip(names, rows)):
        vals = [np.nan if r[g] is None else r[g] for g in groups]
        ax.bar(np.arange(len(groups)) + i * width - 0.4 + width / 2, vals, width, label=f"{name} ({r['method']})")
    ax.set_xticks(range(len(groups)), ["many", "medium", "few", "all"])
    ax.set(ylabel="test accuracy (%)", ylim=(0, 105), title="many / medium / few / all across runs")
    ax.legend(fontsize=7, loc="upper right")
    save_png(fig, path)
