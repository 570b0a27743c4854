"""`engine study --suite baselines`: every trained and post-hoc method, each tuned on val, against EO+UC.

    engine study --suite baselines [--out docs/baselines] [--seeds 0,1,2] [--splits exp-if50,exp-if100,step-if10]
                 [--methods ce,focal,...,ce_rs,...] [--epochs N] [--arch A] [--image-size S] [--jobs N] [key=value ...]

For every split (imbalance profile + ratio) it trains each method of study_design.BASELINE_TRAINED at
every point of its hyper-parameter grid (study_design.BASELINE_GRIDS: focal γ, CB β, LDAM margin and
DRW epoch, logit-adjustment τ, the EO family's λ1 / λ2) and seed, on the `engine study` recipe. Per
split, each method reports the grid point with the best val top-1 (mean over seeds; ties: the earlier
point). The post-hoc rows (study_design.BASELINE_POSTHOC: RS on ce and on wvn, τ-norm, cRT, LWS,
post-hoc logit adjustment) calibrate the chosen checkpoint of their base method, their parameter
chosen per seed on val (engine/posthoc.py). Test numbers are mean ± std over seeds.

EO+UC is compared with the best baseline (highest mean val top-1 among the rows outside the EO family):
the per-seed paired difference EO+UC − best baseline on test, few-shot and overall, with a t-based
95% confidence interval over seeds.

Runs live under OUT/runs/<split>/<method>/<grid point>/seed<S> and go through the study runner
(engine/experiments/runner.py): a finished run is re-used, a killed one resumed from its last.pt.
Writes OUT/baselines.md, OUT/baselines.json and OUT/baselines.png.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path

from engine.config import Config, ConfigError, load_config
from engine.evaluate import GROUPS
from engine.experiments import study_design as design
from engine.experiments.study import (
    by_group,
    cached_calibrations,
    machine_text,
    recipe_text,
    setting_name,
    study_overrides,
    train_study,
    write_summary,
)
from engine.experiments.study_baselines_report import comparison_cells, markdown, plot_baselines
from engine.experiments.study_report import wrote_line
from engine.posthoc import PARAM_NAME
from engine.render import mean_std

logger = logging.getLogger(__name__)

# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (larger df: the Cornish–Fisher expansion).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_975(df: int) -> float:
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_difference(ours: list[float | None], other: list[float | None]) -> dict | None:
    """Mean of the per-seed differences ours − other, its sample std and t-based 95% CI (None: no pair;
    one pair: no interval)."""
    diffs = [a - b for a, b in zip(ours, other) if a is not None and b is not None]
    if not diffs:
        return None
    n, mean = len(diffs), sum(diffs) / len(diffs)
    if n == 1:
        return {"mean": mean, "std": None, "n": 1, "ci95": None, "diffs": diffs}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "std": sd, "n": n, "ci95": [mean - half, mean + half], "diffs": diffs}


# --------------------------------------------------------------------------- what to train


def parse_splits(text: str) -> list[tuple[str, float]]:
    """"exp-if50,step-if10" → [("exp", 50.0), ("step", 10.0)]."""
    splits = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        profile, sep, ratio = item.partition("-if")
        try:
            splits.append((profile, float(ratio)))
        except ValueError:
            sep = ""
        if not sep or profile not in ("exp", "step"):
            raise ConfigError(f"--splits: {item!r} is not PROFILE-ifRATIO (e.g. exp-if50, step-if10)")
    if not splits:
        raise ConfigError(f"--splits needs at least one PROFILE-ifRATIO, got {text!r}")
    return splits


def resolve_rows(methods: list[str] | None) -> tuple[list[str], list[str]]:
    """(rows, trained methods) for --methods (None: all); a post-hoc row brings its base method along."""
    rows = list(design.BASELINE_ROWS) if methods is None else list(dict.fromkeys(methods))
    unknown = [m for m in rows if m not in design.BASELINE_ROWS]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; expected some of {', '.join(design.BASELINE_ROWS)}")
    bases = [design.BASELINE_POSTHOC[r][0] for r in rows if r in design.BASELINE_POSTHOC]
    rows = [r for r in design.BASELINE_ROWS if r in rows or r in bases]  # the table's order
    return rows, [r for r in rows if r in design.BASELINE_TRAINED]


def grid_points(method: str, epochs: int) -> list[dict[str, float]]:
    """Every combination of the method's grid, values as the config gets them (epoch fractions → epochs)."""
    grid = design.BASELINE_GRIDS[method]
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    points = [{k: int(v * epochs) if k in design.EPOCH_FRACTION_KEYS else v for k, v in p.items()} for p in points]
    return list({point_name(p): p for p in points}.values())  # short runs can map two fractions to one epoch


def point_name(point: dict[str, float]) -> str:
    """The run folder name of a grid point: "focal_gamma=0.5,…"; "preset" for a method without a grid."""
    return ",".join(f"{k.split('.')[-1]}={v:g}" for k, v in point.items()) or "preset"


def build_configs(fmt: str, root: str, seeds: list[int], splits: list[tuple[str, float]], methods: list[str],
                  epochs: int, arch: str, image_size: int, overrides: list[str]) -> dict[tuple, Config]:
    """(split, method, point name, seed) → resolved Config; every config is checked before anything trains."""
    if fmt not in design.PRESETS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(design.PRESETS)}")
    if not seeds:
        raise ConfigError("--seeds needs at least one value")
    set_here = set(design.GRID_KEYS) | {k for g in design.BASELINE_GRIDS.values() for k in g}
    for text in overrides:
        if text.split("=", 1)[0].strip() in set_here:
            logger.warning("engine study: note: %r is set per run by the baselines suite and is overridden", text)
    base = study_overrides(fmt, root, epochs, arch, image_size)
    configs = {}
    for profile, ratio in splits:
        for method in methods:
            for point in grid_points(method, epochs):
                for seed in seeds:
                    grid = [f"{k}={v:g}" for k, v in point.items()] + [
                        f"method={method}", f"seed={seed}", f"data.imbalance_ratio={ratio:g}",
                        f"data.imbalance_profile={profile}", f"data.format={fmt}"]
                    cfg = load_config(design.PRESETS[fmt], None, [*base, *overrides, *grid])
                    configs[(setting_name(profile, ratio), method, point_name(point), seed)] = cfg
    return configs


def run_dir_of(out: Path, key: tuple) -> Path:
    setting, method, point, seed = key
    return out / "runs" / setting / method / point / f"seed{seed}"


# --------------------------------------------------------------------------- aggregation


def _stats(runs: list[dict]) -> dict:
    return {"test": {g: mean_std([r["test"][g] for r in runs]) for g in GROUPS},
            "val": {g: mean_std([r["val"][g] for r in runs]) for g in GROUPS}}


def _trained_row(out: Path, setting: str, method: str, seeds: list[int], epochs: int) -> dict:
    """The method's grid on one split and the point chosen by mean val top-1 over seeds."""
    grid = []
    for point in grid_points(method, epochs):
        name = point_name(point)
        runs = []
        for s in seeds:
            m = json.loads((run_dir_of(out, (setting, method, name, s)) / "metrics.json").read_text())
            runs.append({"seed": s, "test": by_group(m), "val": by_group(m["val"])})
        grid.append({"point": name, "values": point, "runs": runs, **_stats(runs)})
    best = max(grid, key=lambda g: g["val"]["top1"]["mean"])  # max keeps the earliest of equals
    return {"label": design.BASELINE_LABELS[method], "kind": "trained", "chosen": best["values"],
            "chosen_point": best["point"], "runs": best["runs"], "test": best["test"], "val": best["val"],
            "grid": [{"point": g["point"], "val_top1": g["val"]["top1"], "test_top1": g["test"]["top1"]}
                     for g in grid]}


def _posthoc_rows(out: Path, setting: str, rows: dict, wanted: list[str], seeds: list[int]) -> None:
    """The post-hoc rows of one split, on the chosen checkpoint of their base method (one feature pass each)."""
    by_base: dict[str, list[str]] = {}
    for key in wanted:
        base, calib = design.BASELINE_POSTHOC[key]
        by_base.setdefault(base, []).append(calib)
    for base, calibs in by_base.items():
        point = rows[base]["chosen_point"]
        post = {s: cached_calibrations(run_dir_of(out, (setting, base, point, s)), calibs, s)["results"]
                for s in seeds}
        for key in wanted:
            if design.BASELINE_POSTHOC[key][0] != base:
                continue
            calib = design.BASELINE_POSTHOC[key][1]
            runs = [{"seed": s, "test": by_group(post[s][calib]["test"]), "val": by_group(post[s][calib]["val"]),
                     "chosen": post[s][calib]["chosen"]} for s in seeds]
            rows[key] = {"label": design.BASELINE_LABELS[key], "kind": f"post hoc on {base} ({point})",
                         "parameter": PARAM_NAME[calib], "chosen": mean_std([r["chosen"] for r in runs]),
                         "runs": runs, **_stats(runs)}


def compare_with_best(rows: dict, seeds: list[int], by: str = "top1") -> dict | None:
    """EO+UC − the best baseline (highest mean val accuracy of group `by` outside the EO family), paired over
    seeds, on test; None without EO+UC, without a baseline, or when no baseline has a val `by` accuracy."""
    baselines = [k for k in rows if k not in design.EO_FAMILY and rows[k]["val"][by] is not None]
    if design.OURS not in rows or not baselines:
        return None
    best = max(baselines, key=lambda k: rows[k]["val"][by]["mean"])  # max keeps the earliest of equals

    def per_seed(key: str, group: str) -> list[float | None]:
        by_seed = {r["seed"]: r["test"][group] for r in rows[key]["runs"]}
        return [by_seed.get(s) for s in seeds]

    return {"ours": design.OURS, "best_baseline": best, "chosen_by": f"mean val {by}",
            **{g: paired_difference(per_seed(design.OURS, g), per_seed(best, g)) for g in ("few", "top1")}}


def collect_split(out: Path, setting: str, rows_wanted: list[str], trained: list[str], seeds: list[int],
                  epochs: int) -> dict:
    rows = {m: _trained_row(out, setting, m, seeds, epochs) for m in trained}
    _posthoc_rows(out, setting, rows, [r for r in rows_wanted if r in design.BASELINE_POSTHOC], seeds)
    rows = {k: rows[k] for k in rows_wanted}
    first = run_dir_of(out, (setting, trained[0], rows[trained[0]]["chosen_point"], seeds[0]))
    counts = json.loads((first / "metrics.json").read_text())["class_counts"]
    profile, _, ratio = setting.partition("-if")
    return {"name": setting, "profile": profile, "ratio": float(ratio), "class_counts": counts, "rows": rows,
            "ours_vs_best": compare_with_best(rows, seeds), "ours_vs_best_few": compare_with_best(rows, seeds, "few")}


# --------------------------------------------------------------------------- the command


def run_baselines(out: str | Path = "docs/baselines", seeds: list[int] = (0, 1, 2),
                  splits: list[tuple[str, float]] = (("exp", 50.0), ("exp", 100.0), ("step", 10.0)),
                  methods: list[str] | None = None, epochs: int = design.DEFAULT_EPOCHS,
                  arch: str = design.DEFAULT_ARCH, image_size: int | None = None, overrides: list[str] = (),
                  fmt: str = "digits_lt", root: str = "", jobs: int = 1, command: str = "") -> dict:
    """Train what is missing, calibrate post hoc, choose on val, compare, write baselines.md/.json/.png."""
    t0 = time.perf_counter()
    out, seeds, splits = Path(out), list(seeds), [(p, float(r)) for p, r in splits]
    image_size = design.DEFAULT_IMAGE_SIZE.get(fmt, 32) if image_size is None else image_size
    rows_wanted, trained = resolve_rows(methods)
    configs = build_configs(fmt, root, seeds, splits, trained, epochs, arch, image_size, list(overrides))
    stats = train_study(out, {k: (cfg, run_dir_of(out, k)) for k, cfg in configs.items()}, jobs,
                        "engine study baselines")

    t1 = time.perf_counter()
    cfg0 = next(iter(configs.values()))
    names = [setting_name(p, r) for p, r in splits]
    settings = [collect_split(out, name, rows_wanted, trained, seeds, epochs) for name in names]
    summary = {"command": command or "engine study --suite baselines", **recipe_text(cfg0, fmt, root), "format": fmt,
               "seeds": seeds, "splits": names, "rows": rows_wanted, "overrides": list(overrides),
               "grids": {m: design.BASELINE_GRIDS[m] for m in trained},
               "epoch_fraction_keys": list(design.EPOCH_FRACTION_KEYS), "runs": stats, "machine": machine_text(),
               "settings": settings}
    plot_baselines(out / "baselines.png", settings)
    summary["posthoc_seconds"] = time.perf_counter() - t1
    return write_summary(out, "baselines", summary, markdown, t0)


def summary_lines(summary: dict, out: Path) -> list[str]:
    """What `engine study --suite baselines` prints: the files written and EO+UC − best baseline per split."""
    lines = [wrote_line(summary, [out / "baselines.md", out / "baselines.json", out / "baselines.png"])]
    for st in summary["settings"]:
        lines.append(f"  {st['name']}: " + "; ".join(comparison_cells(st)))
    return lines
