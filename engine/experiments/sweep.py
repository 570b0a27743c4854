"""`engine sweep`: train a grid of configs over several seeds, choose on validation, report test.

    engine sweep --out DIR --seeds 0,1,2 --grid method=ce,eo,eo_uc --grid loss.lambda_center=0.01,0.1,1 [key=value ...]

Every grid point is trained once per seed (runs are kept under DIR/<point>/seed<S>; finished
runs are re-used and unfinished ones resumed by engine/experiments/runner.py, so an interrupted
sweep continues). For each value of `--select-by` (default: method) the point with the best
mean validation top-1 is chosen, and its test numbers are reported as mean ± std over seeds:
test numbers never take part in the choice.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from common.io import atomic_write_text, write_json
from engine.config import ConfigError, load_config
from engine.evaluate import GROUPS
from engine.experiments.runner import train_all
from engine.render import fmt_mean_std, markdown_table, mean_std


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not all(values.split(",")):
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,... (no empty value)")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; put all its values in one --grid {key}=v1,v2,...")
        grid[key] = values.split(",")
    return grid


def point_name(point: dict[str, str]) -> str:
    return "_".join(f"{k.split('.')[-1]}-{v}" for k, v in point.items()) or "base"


def aggregate(per_seed: list[dict]) -> dict:
    """Test and val many/medium/few/all as mean ± std over the seeds (their metrics.json dicts)."""
    return {
        "test": {g: mean_std([r[g] for r in per_seed]) for g in GROUPS},
        "val": {g: mean_std([r["val"][g] for r in per_seed]) for g in GROUPS},
    }


def choose(results: list[dict], select_by: str) -> dict[str, dict]:
    """Per value of the `select_by` grid key, the point with the best mean val top-1 (first wins ties)."""
    chosen: dict[str, dict] = {}
    for r in results:
        key = r["point"].get(select_by, "all")
        if key not in chosen or r["val"]["top1"]["mean"] > chosen[key]["val"]["top1"]["mean"]:
            chosen[key] = r
    return chosen


def run_sweep(out: Path, preset: str, grid: dict[str, list[str]], seeds: list[int], overrides: list[str],
              select_by: str = "method", jobs: int = 1) -> dict:
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    # Resolve every config before training anything: a bad key fails the sweep up front.
    specs = {}
    for point in points:
        for seed in seeds:
            ov = [*overrides, *(f"{k}={v}" for k, v in point.items()), f"seed={seed}", "run.progress=false"]
            specs[(point_name(point), seed)] = (load_config(preset, None, ov), out / point_name(point) / f"seed{seed}")
    train_all(specs, jobs, "engine sweep")
    results = []
    for point in points:
        per_seed = [json.loads((specs[(point_name(point), s)][1] / "metrics.json").read_text()) for s in seeds]
        results.append({"point": point, "name": point_name(point), **aggregate(per_seed)})
    chosen = choose(results, select_by)
    summary = {
        "preset": preset, "overrides": overrides, "grid": grid, "seeds": seeds, "select_by": select_by,
        "points": results,
        "chosen": {k: {"point": r["point"], "val": r["val"], "test": r["test"]} for k, r in chosen.items()},
    }
    write_json(out / "sweep.json", summary)
    atomic_write_text(out / "sweep.md", markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    chosen_names = {json.dumps(c["point"], sort_keys=True) for c in summary["chosen"].values()}
    rows = []
    for p in summary["points"]:
        mark = " **(chosen)**" if json.dumps(p["point"], sort_keys=True) in chosen_names else ""
        rows.append([p["name"] + mark, fmt_mean_std(p["val"]["top1"])]
                    + [fmt_mean_std(p["test"][g]) for g in GROUPS])
    table = markdown_table(["point", "val top-1", "test many", "test medium", "test few", "test all"], rows)
    return table + (f"\n\nseeds {summary['seeds']}; chosen per {summary['select_by']} by mean validation top-1; "
                    "test accuracies in %, mean ± std over seeds.")
