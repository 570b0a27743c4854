"""`engine study`: the two papers' comparison on one long-tailed data set, end to end.

    engine study [--out docs/study] [--seeds 0,1,2] [--ratios 10,50,100] [--profiles exp,step]
                 [--epochs N] [--arch A] [--image-size S] [--format digits_lt|cifar10_lt|cifar100_lt --root DIR]
                 [--jobs N] [key=value ...]

For every setting (imbalance profile × imbalance ratio) and seed it trains the methods the
papers compare — `ce` (Baseline), `ce_bias`, `eo` (EO "Ours w/o UC"), `uc_only` (EO "UC only"),
`eo_uc` (EO "Ours"), `wvn` — and then, post hoc on the trained checkpoints (engine/posthoc.py,
in-process, backbone features collected once per checkpoint):

* Baseline+RS (RS on the ce checkpoint) and WVN+RS (RS on the wvn checkpoint), γ swept;
* τ-norm, logit adjustment (τ swept) and cRT (classifier re-trained, epoch chosen), all on ce.

Every post-hoc hyper-parameter is chosen on the validation split (best val top-1, ties to the
smaller value) and reported on the test split. Runs live under OUT/runs/<setting>/<method>/seed<S>
(OUT/.gitignore keeps them out of git); a finished run (metrics.json present, same config) is
re-used, an unfinished one is resumed from its last.pt, so an interrupted study continues.
Post-hoc results are cached next to their checkpoint (study_posthoc.json).

Recipe (fits 2 CPU cores): resnet8_cifar at 16 px, 30 epochs, batch 32, one torch thread per run
(several threads on a shared 2-core machine spin against each other and run ~50× slower), the
preset's λ1 / λ2 / α and optimizer otherwise. Digits-LT starts from the `digits-lt` preset (its λ1 was
chosen on the validation split); CIFAR-LT (`--format cifar10_lt|cifar100_lt --root DIR`) from the
`cifar*-lt-resnet32` preset (λ1 = λ2 = 1 as in the EO paper) with RS moved post hoc and a cosine
schedule over the study's epochs; CIFAR-LT has no validation split, so its choices use the test split.

Writes OUT/study.md (EO Table 3-shaped many/medium/few/all tables per setting, a WVN Table 1-shaped
error table, the claims check), OUT/study.json (every number), OUT/rs_gamma_<profile>.png
(val/test error vs γ for Baseline+RS and WVN+RS, mean over seeds, one panel per ratio).

The claims are computed from the numbers in study.json (engine/experiments/claims.py), never written by hand:
(a) the trained bias of `ce_bias` tracks the log prior (Pearson r with log n_k ≥ R_MIN, mean over runs);
(b) EO+UC lifts few-shot accuracy over CE the most among the trained methods;
(c) ablation order EO+UC > EO > UC-only > CE (test top-1);
(d) WVN+RS ≥ Baseline+RS ≥ CE (test top-1).
Each per setting (means over seeds) and overall (means over settings).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from common.io import atomic_write_text, write_json
from engine.config import Config, ConfigError, load_config, to_dict
from engine.evaluate import GROUPS
from engine.experiments.claims import CLAIMS, check_claims, claim_numbers, pearson
from engine.experiments.runner import saved_config, train_all, train_seconds
from engine.experiments.study_design import (
    CRT,
    DEFAULT_ARCH,
    DEFAULT_BATCH,
    DEFAULT_EPOCHS,
    DEFAULT_IMAGE_SIZE,
    GRID_KEYS,
    LABELS,
    POSTHOC,
    PRESETS,
    R_MIN,
    ROWS,
    TRAINED,
)
from engine.experiments.study_report import markdown, plot_rs_curves
from engine.posthoc import PARAM_NAME, RETRAIN, SWEEPS, default_values
from engine.render import mean_std

logger = logging.getLogger(__name__)

__all__ = ["CLAIMS", "GROUPS", "LABELS", "R_MIN", "ROWS", "TRAINED", "build_configs", "check_claims", "run_study"]


# --------------------------------------------------------------------------- configs


def setting_name(profile: str, ratio: float) -> str:
    return f"{profile}-if{ratio:g}"


def study_overrides(fmt: str, root: str, epochs: int, arch: str, image_size: int) -> list[str]:
    """The recipe applied on top of the preset (before the user's key=value overrides)."""
    ov = [f"model.arch={arch}", f"data.image_size={image_size}", f"data.crop_padding={max(1, image_size // 8)}",
          f"epochs={epochs}", f"optim.batch_size={DEFAULT_BATCH[fmt]}",
          f"eval.every={epochs}",  # validation only after the last epoch (train() evaluates it anyway)
          "eval.diagnostics=false", "run.progress=false", "run.threads=1"]
    if fmt != "digits_lt":
        # The CIFAR presets are the WVN paper's 180-epoch Algorithm 1 recipe: RS is post hoc here,
        # and the schedule follows the study's epochs.
        ov += [f"data.root={root}", "rescale.in_loop=false", "rescale.gamma=0", "optim.schedule=cosine",
               "optim.milestones=[]", "optim.warmup_epochs=1"]
    return ov


def build_configs(fmt: str, root: str, seeds: list[int], ratios: list[float], profiles: list[str], epochs: int,
                  arch: str, image_size: int, overrides: list[str]) -> dict[tuple[str, str, int], Config]:
    """(setting, method, seed) → resolved Config; every config is checked before anything trains."""
    if fmt not in PRESETS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(PRESETS)}")
    if fmt != "digits_lt" and not root:
        raise ConfigError(f"--format {fmt} needs --root DIR (the folder with the CIFAR python pickles)")
    if not seeds or not ratios or not profiles:
        raise ConfigError("--seeds, --ratios and --profiles each need at least one value")
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key in GRID_KEYS:
            logger.warning("engine study: note: %r is set per run by the study (--seeds/--ratios/--profiles/"
                           "--format/--root) and is overridden", text)
    base = study_overrides(fmt, root, epochs, arch, image_size)
    configs = {}
    for profile in profiles:
        for ratio in ratios:
            for method in TRAINED:
                for seed in seeds:
                    per_run = ["eval.diagnostics=pass"] if method == "ce_bias" else []  # claim (a): bias + offset
                    grid = [f"method={method}", f"seed={seed}", f"data.imbalance_ratio={ratio:g}",
                            f"data.imbalance_profile={profile}", f"data.format={fmt}"]
                    cfg = load_config(PRESETS[fmt], None, [*base, *per_run, *overrides, *grid])
                    configs[(setting_name(profile, ratio), method, seed)] = cfg
    return configs


def run_dir_of(out: Path, key: tuple[str, str, int]) -> Path:
    setting, method, seed = key
    return out / "runs" / setting / method / f"seed{seed}"


# --------------------------------------------------------------------------- post hoc


def by_group(report: dict) -> dict:
    """A report's accuracies of the shot groups (many, medium, few) and overall (top1)."""
    return {g: report.get(g) for g in GROUPS}


def cached_calibrations(run_dir: Path, methods: list[str], seed: int) -> dict:
    """engine.posthoc's sweeps / cRT / LWS on one checkpoint, features collected once; cached in the run folder."""
    retrain = any(m in RETRAIN for m in methods)  # cRT / LWS: trained on the training split's features
    params = {"methods": methods, "grids": {m: default_values(m) for m in methods if m in SWEEPS},
              "crt": CRT if retrain else None, "seed": seed}
    cache = run_dir / "study_posthoc.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("params") == params:
            return cached

    from engine.posthoc import calibrate
    from engine.runs import load_run, split_features

    loaded = load_run(run_dir / "last.pt")
    feats = split_features(loaded, ("val", "test", "train") if retrain else ("val", "test"))
    results = {}
    for method in methods:
        res = calibrate(loaded, method, params["grids"].get(method), CRT["epochs"], CRT["lr"], CRT["batch_size"], seed,
                        feats=feats)
        name = res["parameter"]
        results[method] = {
            "parameter": name, "chosen": res["chosen"], "chosen_by": "val top1",
            "val": {k: v for k, v in res["val"].items() if not isinstance(v, (list, dict))},
            "test": {k: v for k, v in res["test"].items() if not isinstance(v, (list, dict))},
            "rows": [{name: r[name], "val": by_group(r["val"]), "test": by_group(r["test"])} for r in res["rows"]],
        }
    out = {"params": params, "checkpoint_method": loaded.cfg.method, "results": results}
    write_json(cache, out, indent=1)
    return out


# --------------------------------------------------------------------------- aggregation


def _summarize_rows(rows: dict[str, dict]) -> None:
    for row in rows.values():
        row["test"] = {g: mean_std([r["test"][g] for r in row["runs"]]) for g in GROUPS}
        row["val"] = {g: mean_std([r["val"][g] for r in row["runs"]]) for g in GROUPS}
        row["test_error"] = mean_std([100.0 - r["test"]["top1"] for r in row["runs"]])
        if "parameter" in row:
            row["chosen"] = mean_std([r["chosen"][row["parameter"]] for r in row["runs"]])


def _rs_curves(post: dict, seeds: list[int]) -> dict:
    """Val/test error vs γ of post-hoc RS on the ce and the wvn checkpoints, per seed and mean (WVN Fig. 10)."""
    curves = {}
    for base in ("ce", "wvn"):
        per = [post[(base, s)]["results"]["rs"]["rows"] for s in seeds]
        val_err = [[100.0 - r["val"]["top1"] for r in rows_s] for rows_s in per]
        test_err = [[100.0 - r["test"]["top1"] for r in rows_s] for rows_s in per]
        mean = np.mean(test_err, axis=0)
        curves[base] = {"gamma": [r["gamma"] for r in per[0]], "val_error_per_seed": val_err,
                        "test_error_per_seed": test_err, "val_error_mean": np.mean(val_err, axis=0).tolist(),
                        "test_error_mean": mean.tolist(), "test_error_std": np.std(test_err, axis=0).tolist(),
                        # how much the test error moves over the γ range
                        "test_error_spread": float(mean.max() - mean.min()), "test_error_at_0": float(mean[0]),
                        "test_error_min": float(mean.min())}
    return curves


def _bias_runs(runs: dict[int, dict]) -> list[dict]:
    """Claim (a): per ce_bias run, Pearson r of the trained bias (and of the empirical offset) with log n_k."""
    out = []
    for s, r in runs.items():
        diag = r.get("diagnostics") or {}
        bias, emp = diag.get("bias"), diag.get("empirical_offset")
        log_n = [math.log(n) for n in r["class_counts"]]
        out.append({"seed": s, "bias": bias, "class_counts": r["class_counts"],
                    "pearson_r": pearson(bias, log_n) if bias else None,
                    # EO Fig. 1c: the empirical offset ½μ̃_k·w_k of the same model (supplementary)
                    "empirical_offset": emp, "empirical_offset_r": pearson(emp, log_n) if emp else None})
    return out


def collect_setting(out: Path, setting: str, seeds: list[int]) -> dict:
    """Every number of one setting: per-seed rows, means ± std, RS γ curves, ce_bias bias vs log prior."""
    runs = {m: {s: json.loads((run_dir_of(out, (setting, m, s)) / "metrics.json").read_text()) for s in seeds}
            for m in TRAINED}
    rows: dict[str, dict] = {m: {"label": LABELS[m], "kind": "trained",
                                 "runs": [{"seed": s, "test": by_group(r), "val": by_group(r["val"])}
                                          for s, r in runs[m].items()]} for m in TRAINED}
    post = {}
    for s in seeds:
        post[("ce", s)] = cached_calibrations(run_dir_of(out, (setting, "ce", s)), ["rs", "tau_norm", "logit_adjust", "crt"], s)
        post[("wvn", s)] = cached_calibrations(run_dir_of(out, (setting, "wvn", s)), ["rs"], s)
    for key, (base, method) in POSTHOC.items():
        per_seed = [{"seed": s, "test": by_group(r["test"]), "val": by_group(r["val"]), "chosen": {r["parameter"]: r["chosen"]}}
                    for s in seeds for r in [post[(base, s)]["results"][method]]]
        rows[key] = {"label": LABELS[key], "kind": f"post hoc on {base}", "parameter": PARAM_NAME[method],
                     "runs": per_seed}
    _summarize_rows(rows)
    counts = runs["ce"][seeds[0]]["class_counts"]
    ev = (saved_config(run_dir_of(out, (setting, "ce", seeds[0]))) or {}).get("eval", {})
    profile, _, ratio = setting.partition("-if")
    return {
        "name": setting, "profile": profile, "ratio": float(ratio),
        "class_counts": counts, "log_prior": [math.log(n) for n in counts],
        "shot_thresholds": {"many_more_than": ev.get("many_threshold"), "few_fewer_than": ev.get("few_threshold")},
        "shot_classes": {"many": sum(n > ev.get("many_threshold", 0) for n in counts),
                         "few": sum(n < ev.get("few_threshold", 0) for n in counts)},
        "rows": rows, "rs_curves": _rs_curves(post, seeds), "ce_bias": _bias_runs(runs["ce_bias"]),
    }


# --------------------------------------------------------------------------- the command


def _notes(settings: list[dict], fmt: str, profiles: list[str]) -> list[str]:
    notes = []
    for st in settings:
        if min(st["class_counts"]) <= 1:
            notes.append(f"{st['name']}: the rarest class has {min(st['class_counts'])} training image(s).")
        if st["shot_classes"]["few"] == 0:
            notes.append(f"{st['name']}: no class has fewer than {st['shot_thresholds']['few_fewer_than']} training "
                         "images, so 'few' is empty there and claim (b) is n/a.")
    if fmt != "digits_lt":
        notes.append("CIFAR-LT has no validation split: the post-hoc choices are made on the test split "
                     "(val = test, as in the papers).")
    if any(p == "step" for p in profiles):
        notes.append("step profile: the first half of the classes keep n_max images, the rest int(n_max / IF).")
    return notes


def recipe_text(cfg0: Config, fmt: str, root: str) -> dict:
    d, o, lo = cfg0.data, cfg0.optim, cfg0.loss
    return {
        "data": (f"{fmt} (n_max {d.n_max}, val {d.val_per_class}/class, test {d.test_per_class}/class, balanced)"
                 if fmt == "digits_lt" else f"{fmt} from {root}"),
        "recipe": (f"{cfg0.model.arch} at {d.image_size} px (pad-crop {d.crop_padding}), {cfg0.epochs} "
                   f"epochs, batch {o.batch_size}, SGD lr {o.lr:g} {o.schedule} (warmup {o.warmup_epochs}), "
                   f"wd {o.weight_decay:g}, λ1 = {lo.lambda_center:g}, λ2 = {lo.lambda_uniform:g}, "
                   f"α = {lo.center_alpha:g} (eo, uc_only, eo_uc), {cfg0.run.threads or 'default'} torch thread(s) "
                   "per run"),
    }


def train_study(out: Path, runs: dict, jobs: int, name: str) -> dict:
    """A study's training: make OUT (its .gitignore keeps runs/ out of git), train every run not finished yet
    (engine/experiments/runner.py), then give this process the runs' torch threads for the post-hoc work.
    Returns the runner's stats with the number of runs and their training time summed (None: unknown)."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {jobs}")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / ".gitignore").exists():
        atomic_write_text(out / ".gitignore", "# run folders (checkpoints) of engine study stay out of git\nruns/\n")
    stats = train_all(runs, jobs, name)
    import torch

    threads = next(iter(runs.values()))[0].run.threads
    if threads:
        torch.set_num_threads(threads)
    times = [train_seconds(run_dir) for _, run_dir in runs.values()]
    return {**stats, "runs": len(runs), "train_seconds_all_runs": None if None in times else float(sum(times))}


def write_summary(out: Path, name: str, summary: dict, markdown, t0: float) -> dict:
    """OUT/<name>.json and OUT/<name>.md (markdown(summary)), with the wall time since t0 and the invocations
    an earlier summary in OUT recorded."""
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["earlier_invocations"] = earlier_invocations(out / f"{name}.json")
    write_json(out / f"{name}.json", summary, indent=1)
    atomic_write_text(out / f"{name}.md", markdown(summary))
    return summary


def run_study(out: str | Path = "docs/study", seeds: list[int] = (0, 1, 2), ratios: list[float] = (10, 50, 100),
              profiles: list[str] = ("exp", "step"), epochs: int = DEFAULT_EPOCHS, arch: str = DEFAULT_ARCH,
              image_size: int | None = None, overrides: list[str] = (), fmt: str = "digits_lt", root: str = "",
              jobs: int = 1, command: str = "") -> dict:
    """Train what is missing, post hoc on every checkpoint, aggregate, check the claims, write study.md/.json/.png."""
    t0 = time.perf_counter()
    out = Path(out)
    seeds, ratios, profiles, overrides = list(seeds), [float(r) for r in ratios], list(profiles), list(overrides)
    image_size = DEFAULT_IMAGE_SIZE.get(fmt, 32) if image_size is None else image_size
    configs = build_configs(fmt, root, seeds, ratios, profiles, epochs, arch, image_size, overrides)
    stats = train_study(out, {k: (cfg, run_dir_of(out, k)) for k, cfg in configs.items()}, jobs, "engine study")

    t1 = time.perf_counter()
    cfg0 = next(iter(configs.values()))
    settings = [collect_setting(out, setting_name(p, r), seeds) for p in profiles for r in ratios]
    summary = {
        "command": command or "engine study", **recipe_text(cfg0, fmt, root),
        "format": fmt, "seeds": seeds, "ratios": ratios, "profiles": profiles, "overrides": overrides,
        "config_ce_first": to_dict(configs[(settings[0]["name"], "ce", seeds[0])]),
        "sweep_grids": {m: default_values(m) for m in SWEEPS}, "crt": CRT,
        "runs": stats, "machine": machine_text(), "notes": _notes(settings, fmt, profiles),
        "settings": settings,
    }
    summary["claims"] = check_claims(settings)
    for p in profiles:
        plot_rs_curves(out, settings, p)
    summary["posthoc_seconds"] = time.perf_counter() - t1
    return write_summary(out, "study", summary, markdown, t0)


def summary_lines(summary: dict, out: Path) -> list[str]:
    """What `engine study` prints: the files written and each claim's overall verdict."""
    lines = [f"engine study: wrote {out / 'study.md'}, {out / 'study.json'}, "
             + ", ".join(str(out / f"rs_gamma_{p}.png") for p in summary["profiles"])
             + f" in {summary['wall_seconds'] / 60:.1f} min"]
    lines += [f"  claim ({key}) {CLAIMS[key]}: {c['verdict']} — {claim_numbers(key, c)}"
              for key, c in summary["claims"]["overall"].items()]
    return lines


def earlier_invocations(summary_json: Path) -> list[dict]:
    """The invocations recorded in the summary an earlier call wrote to this folder (its own earlier ones,
    then itself): {wall_seconds, trained, reused, machine} each, oldest first; [] without a readable one."""
    try:
        prev = json.loads(summary_json.read_text())
        own = {"wall_seconds": float(prev["wall_seconds"]), "trained": prev["runs"]["trained"],
               "reused": prev["runs"]["reused"], "machine": prev.get("machine", "")}
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [*prev.get("earlier_invocations", []), own]


def machine_text() -> str:
    import os
    import platform

    import torch

    return f"{len(os.sched_getaffinity(0))} CPU cores ({platform.machine()}), torch {torch.__version__}"
