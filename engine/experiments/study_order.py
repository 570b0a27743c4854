"""`engine study --suite order`: why the EO ablation order flips at small scale, with evidence.

    engine study --suite order [--out docs/order] [--seeds 0,1,2] [--epochs N] [--image-size S] [--jobs N]
                 [key=value ...]

The EO paper's ablation (Table 3) ranks EO+UC > EO (w/o UC) > UC only > CE. `engine study` finds UC only
ahead of EO on Digits-LT. This suite moves one factor at a time away from the study recipe's point
(study_design.ORDER_BASE: Digits-LT exp IF 50, ResNet-8 of widths 16/32/64, n_max 100, λ1 0.01) along
study_design.ORDER_AXES — depth and width of the CIFAR ResNet, feature dimension (the last stage's width),
data size (n_max), imbalance ratio, λ1 — and trains ce, eo, uc_only and eo_uc at every level and seed.
A level equal to the recipe's is the one shared base run; λ1 levels train only the methods with a center
loss (ce has none and keeps its base run).

For every checkpoint it measures what separates the methods (`mechanism`, from the model's own features:
training split without augmentation, and the balanced test split):

* the estimated offset õ_k = ½c_k·w_k and the empirical offset ½μ̃_k·w_k (μ̃_k: class mean of the
  training features): Pearson r and least-squares slope against log n_k — a slope of 1 is the log-prior
  correction of logit adjustment — and the normalized entropy H(softmax(−õ)) / log K (UC pushes it to 1);
* ‖w_k‖, ‖c_k‖ and the mean per-class test feature norm: Pearson r against log n_k.

Runs live under OUT/runs/<point>/<method>/seed<S> and go through the study runner (re-used when finished,
resumed when killed). Writes OUT/order.md, OUT/order.json, OUT/order_accuracy.png, OUT/order_mechanism.png.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from common.errors import ConfigError
from common.io import write_json
from engine.config import Config, load_config
from engine.experiments import study_design as design
from engine.experiments.claims import pearson
from engine.experiments.study import machine_text, recipe_text, study_overrides, train_study, write_summary
from engine.experiments.study_order_report import markdown, plot_accuracy, plot_mechanism
from engine.experiments.study_report import wrote_line
from engine.methods import METHODS
from engine.render import mean_std

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- what to train


def level_text(value) -> str:
    """A level as the reports and run folders write it: [16, 32, 64] → "16-32-64", 50.0 → "50"."""
    if isinstance(value, list):
        return "-".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def point_name(key: str, value) -> str:
    """The run folder of one axis level: "base" at the recipe's value, else "<key's last part>=<value>"."""
    return "base" if value == design.ORDER_BASE[key] else f"{key.split('.')[-1]}={level_text(value)}"


def trains_at(method: str, key: str) -> bool:
    """Whether `method` depends on `key` (ce has no center loss: its λ1 levels are its base run)."""
    return key != "loss.lambda_center" or METHODS[method].center


def points() -> dict[str, dict[str, object]]:
    """point name → its overrides of ORDER_BASE (the base point: none)."""
    out: dict[str, dict[str, object]] = {"base": {}}
    for key, levels in design.ORDER_AXES.values():
        for value in levels:
            out.setdefault(point_name(key, value), {} if value == design.ORDER_BASE[key] else {key: value})
    return out


def run_point(method: str, key: str, value) -> str:
    return point_name(key, value) if trains_at(method, key) else "base"


def build_configs(seeds: list[int], epochs: int, image_size: int, overrides: list[str]) -> dict[tuple, Config]:
    """(point, method, seed) → Config for every run the axes need; every config checked before training."""
    if not seeds:
        raise ConfigError("--seeds needs at least one value")
    for text in overrides:
        if text.split("=", 1)[0].strip() in (*design.ORDER_BASE, "method", "seed", "data.format"):
            logger.warning("engine study: note: %r is set per run by the order suite (study_design.ORDER_BASE) "
                           "and is overridden", text)
    base = study_overrides("digits_lt", "", epochs, design.ORDER_BASE["model.arch"], image_size)
    needed = {(run_point(m, key, v), m) for key, levels in design.ORDER_AXES.values() for v in levels
              for m in design.ORDER_METHODS}
    configs = {}
    for name, changes in points().items():
        for method in design.ORDER_METHODS:
            if (name, method) not in needed:
                continue
            point = {**design.ORDER_BASE, **changes}
            per_run = [f"{k}=[{','.join(map(str, v))}]" if isinstance(v, list) else f"{k}={v}" for k, v in point.items()]
            for seed in seeds:
                cfg = load_config(design.PRESETS["digits_lt"], None,
                                  [*base, *overrides, *per_run, f"method={method}", f"seed={seed}",
                                   "eval.diagnostics=off", "data.format=digits_lt"])
                configs[(name, method, seed)] = cfg
    return configs


def run_dir_of(out: Path, key: tuple) -> Path:
    name, method, seed = key
    return out / "runs" / name / method / f"seed{seed}"


# --------------------------------------------------------------------------- what the models do


def _slope(y: np.ndarray, x: np.ndarray) -> float:
    """Least-squares slope of y on x."""
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def mechanism(run_dir: Path) -> dict:
    """Offsets and norms of one checkpoint against log n_k (see the module docstring); cached in the run folder."""
    cache = run_dir / "study_mechanism.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    import torch

    import kernels
    from engine.evaluate import ClassSums
    from engine.runs import load_run, split_features

    loaded = load_run(run_dir / "last.pt")
    feats = split_features(loaded, ("train", "test"))
    head, k = loaded.model.head, loaded.data.num_classes
    log_n = np.log(np.asarray(loaded.data.class_counts, dtype=float))
    sums = ClassSums(k, feats["train"].features.shape[1], "cpu")
    sums.add(feats["train"].features, feats["train"].labels)
    w = head.weight.detach().float().cpu()
    empirical = kernels.empirical_offset(w, sums.means()).numpy().astype(float)
    test = feats["test"]
    norms = test.features.norm(dim=1)
    feature_norm = torch.zeros(k).index_add_(0, test.labels, norms) / torch.bincount(test.labels, minlength=k)
    out = {"empirical_offset": empirical.tolist(), "weight_norm": w.norm(dim=1).tolist(),
           "feature_norm": feature_norm.tolist(), "log_n": log_n.tolist(),
           "empirical_offset_r": pearson(empirical, log_n), "empirical_offset_slope": _slope(empirical, log_n),
           "weight_norm_r": pearson(w.norm(dim=1).numpy(), log_n),
           "feature_norm_r": pearson(feature_norm.numpy(), log_n)}
    if METHODS[loaded.cfg.method].center:  # the centers the method trains (ce keeps them at zero)
        c = head.centers.float().cpu()
        est = kernels.estimated_offset(w, c).numpy().astype(float)
        p = torch.softmax(-torch.as_tensor(est), 0)
        out.update({"estimated_offset": est.tolist(), "estimated_offset_r": pearson(est, log_n),
                    "estimated_offset_slope": _slope(est, log_n), "center_norm": c.norm(dim=1).tolist(),
                    "center_norm_r": pearson(c.norm(dim=1).numpy(), log_n),
                    "offset_entropy": float(-(p * p.log()).sum() / math.log(k))})
    write_json(cache, out, indent=None)
    return out


MEASURES = ("estimated_offset_r", "estimated_offset_slope", "empirical_offset_r", "empirical_offset_slope",
            "offset_entropy", "weight_norm_r", "center_norm_r", "feature_norm_r")


# --------------------------------------------------------------------------- aggregation


def _cell(out: Path, name: str, method: str, seeds: list[int]) -> dict:
    """One method at one level: accuracies and mechanism measures, per seed and mean ± std."""
    runs = []
    for s in seeds:
        d = run_dir_of(out, (name, method, s))
        m = json.loads((d / "metrics.json").read_text())
        runs.append({"seed": s, "test": {g: m.get(g) for g in ("many", "medium", "few", "top1")},
                     "mechanism": {k: v for k, v in mechanism(d).items() if k in MEASURES}})
    return {"point": name, "runs": runs,
            "test": {g: mean_std([r["test"][g] for r in runs]) for g in ("many", "medium", "few", "top1")},
            "mechanism": {k: mean_std([r["mechanism"].get(k) for r in runs]) for k in MEASURES}}


def order_of(cells: dict[str, dict], group: str = "top1") -> list[str]:
    """The methods ranked by mean test accuracy of `group`, best first."""
    return sorted(cells, key=lambda m: -(cells[m]["test"][group] or {"mean": -1})["mean"])


def collect_axis(out: Path, axis: str, seeds: list[int]) -> dict:
    key, values = design.ORDER_AXES[axis]
    levels = []
    for value in values:
        cells = {m: _cell(out, run_point(m, key, value), m, seeds) for m in design.ORDER_METHODS}
        counts = json.loads((run_dir_of(out, (run_point("eo_uc", key, value), "eo_uc", seeds[0]))
                             / "metrics.json").read_text())["class_counts"]
        order = order_of(cells)
        eo, uc = cells["eo"]["test"]["top1"]["mean"], cells["uc_only"]["test"]["top1"]["mean"]
        levels.append({"value": value, "text": level_text(value), "base": value == design.ORDER_BASE[key],
                       "class_counts": counts, "cells": cells, "order": order,
                       "order_few": order_of(cells, "few"), "paper_order": tuple(order) == design.PAPER_ORDER,
                       "eo_minus_uc_only": eo - uc})
    return {"axis": axis, "key": key, "levels": levels}


# --------------------------------------------------------------------------- the command


def run_order(out: str | Path = "docs/order", seeds: list[int] = (0, 1, 2), epochs: int = design.DEFAULT_EPOCHS,
              image_size: int | None = None, overrides: list[str] = (), jobs: int = 1, command: str = "") -> dict:
    """Train what is missing, measure every checkpoint, write order.md/.json and the two plots."""
    t0 = time.perf_counter()
    out, seeds = Path(out), list(seeds)
    image_size = design.DEFAULT_IMAGE_SIZE["digits_lt"] if image_size is None else image_size
    configs = build_configs(seeds, epochs, image_size, list(overrides))
    stats = train_study(out, {k: (cfg, run_dir_of(out, k)) for k, cfg in configs.items()}, jobs, "engine study order")

    t1 = time.perf_counter()
    cfg0 = configs[("base", "ce", seeds[0])]
    axes = [collect_axis(out, axis, seeds) for axis in design.ORDER_AXES]
    summary = {"command": command or "engine study --suite order", **recipe_text(cfg0, "digits_lt", ""),
               "seeds": seeds, "base": design.ORDER_BASE, "overrides": list(overrides), "runs": stats,
               "machine": machine_text(), "axes": axes}
    plot_accuracy(out / "order_accuracy.png", axes)
    plot_mechanism(out / "order_mechanism.png", axes)
    summary["posthoc_seconds"] = time.perf_counter() - t1
    return write_summary(out, "order", summary, markdown, t0)


def summary_lines(summary: dict, out: Path) -> list[str]:
    """What `engine study --suite order` prints: the files written and where the paper's order holds."""
    lines = [wrote_line(summary, [out / f for f in ("order.md", "order.json", "order_accuracy.png",
                                                    "order_mechanism.png")])]
    for ax in summary["axes"]:
        held = [lv["text"] for lv in ax["levels"] if lv["paper_order"]]
        lines.append(f"  {ax['axis']}: the paper's order holds at {', '.join(held) or 'no level'}")
    return lines
