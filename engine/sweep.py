"""`engine sweep`: train a grid of configs over several seeds, choose on validation, report test.

    engine sweep --out DIR --seeds 0,1,2 --grid method=ce,eo,eo_uc --grid loss.lambda_center=0.01,0.1,1 [key=value ...]

Every grid point is trained once per seed (runs are kept under DIR/<point>/seed<S>;
finished runs are re-used, so an interrupted sweep continues). For each value of
`--select-by` (default: method) the point with the best mean validation top-1 is
chosen, and its test numbers are reported as mean ± std over seeds: test numbers
never take part in the choice.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np

from engine.checkpoint import atomic_write_text
from engine.config import ConfigError, load_config

GROUPS = ("many", "medium", "few", "top1")


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,...")
        grid[key] = values.split(",")
    return grid


def point_name(point: dict[str, str]) -> str:
    return "_".join(f"{k.split('.')[-1]}-{v}" for k, v in point.items()) or "base"


def run_sweep(out: Path, preset: str, grid: dict[str, list[str]], seeds: list[int], overrides: list[str],
              select_by: str = "method") -> dict:
    from engine.train import train

    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    # Resolve every config before training anything: a bad key fails the sweep up front.
    configs = {}
    for point in points:
        for seed in seeds:
            ov = [*overrides, *(f"{k}={v}" for k, v in point.items()), f"seed={seed}", "run.progress=false"]
            configs[(point_name(point), seed)] = load_config(preset, None, ov)
    results = []
    for point in points:
        name = point_name(point)
        per_seed = []
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            if not (run_dir / "metrics.json").is_file():
                shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over
                print(f"== {name} seed {seed}", flush=True)
                train(configs[(name, seed)], run_dir)
            per_seed.append(json.loads((run_dir / "metrics.json").read_text()))
        results.append({"point": point, "name": name, "runs": per_seed, **_aggregate(per_seed)})

    chosen = {}
    for r in results:
        key = r["point"].get(select_by, "all")
        if key not in chosen or r["val"]["top1"]["mean"] > chosen[key]["val"]["top1"]["mean"]:
            chosen[key] = r
    summary = {
        "preset": preset, "overrides": overrides, "grid": grid, "seeds": seeds, "select_by": select_by,
        "points": [{k: v for k, v in r.items() if k != "runs"} for r in results],
        "chosen": {k: {"point": r["point"], "val": r["val"], "test": r["test"]} for k, r in chosen.items()},
    }
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "sweep.md", markdown(summary))
    print(markdown(summary))
    return summary


def _aggregate(runs: list[dict]) -> dict:
    def stat(values):
        vals = [v for v in values if v is not None]
        return {"mean": float(np.mean(vals)), "std": float(np.std(vals))} if vals else None

    return {
        "test": {g: stat([r[g] for r in runs]) for g in GROUPS},
        "val": {g: stat([r["val"][g] for r in runs]) for g in GROUPS},
    }


def markdown(summary: dict) -> str:
    def cell(s):
        return f"{s['mean']:.1f} ± {s['std']:.1f}" if s else "–"

    lines = ["| point | val top-1 | test many | test medium | test few | test all |", "|---|---|---|---|---|---|"]
    chosen_names = {json.dumps(c["point"], sort_keys=True) for c in summary["chosen"].values()}
    for p in summary["points"]:
        mark = " **(chosen)**" if json.dumps(p["point"], sort_keys=True) in chosen_names else ""
        t = p["test"]
        lines.append(f"| {p['name']}{mark} | {cell(p['val']['top1'])} | {cell(t['many'])} | {cell(t['medium'])} "
                     f"| {cell(t['few'])} | {cell(t['top1'])} |")
    lines.append(f"\nseeds {summary['seeds']}; chosen per {summary['select_by']} by mean validation top-1; "
                 "test accuracies in %, mean ± std over seeds.")
    return "\n".join(lines)
