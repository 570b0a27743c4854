"""`engine study`: the two papers' comparison on one long-tailed data set, end to end.

    engine study [--out docs/study] [--seeds 0,1,2] [--ratios 10,50,100] [--profiles exp,step]
                 [--epochs N] [--arch A] [--image-size S] [--format digits_lt|cifar10_lt|cifar100_lt --root DIR]
                 [--jobs N] [key=value ...]

For every setting (imbalance profile × imbalance ratio) and seed it trains the methods the
papers compare — `ce` (Baseline), `ce_bias`, `eo` (EO "Ours w/o UC"), `uc_only` (EO "UC only"),
`eo_uc` (EO "Ours"), `wvn` — and then, post hoc on the trained checkpoints (engine/calibration.py,
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

The claims are computed from the numbers in study.json (`check_claims`), never written by hand:
(a) the trained bias of `ce_bias` tracks the log prior (Pearson r with log n_k ≥ R_MIN, mean over runs);
(b) EO+UC lifts few-shot accuracy over CE the most among the trained methods;
(c) ablation order EO+UC > EO > UC-only > CE (test top-1);
(d) WVN+RS ≥ Baseline+RS ≥ CE (test top-1).
Each per setting (means over seeds) and overall (means over settings).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from engine.calibration import PARAM_NAME
from engine.checkpoint import CheckpointError, atomic_write_text
from engine.config import Config, ConfigError, config_from_dict, load_config, to_dict

TRAINED = ("ce", "ce_bias", "eo", "uc_only", "eo_uc", "wvn")
# row key → (checkpoint method it is computed on, engine.calibration method)
POSTHOC = {
    "ce_rs": ("ce", "rs"),
    "wvn_rs": ("wvn", "rs"),
    "tau_norm": ("ce", "tau_norm"),
    "logit_adjust": ("ce", "logit_adjust"),
    "crt": ("ce", "crt"),
}
ROWS = TRAINED + tuple(POSTHOC)
LABELS = {
    "ce": "Baseline (CE)",
    "ce_bias": "CE + trained bias",
    "uc_only": "UC only",
    "eo": "EO (Ours w/o UC)",
    "eo_uc": "EO+UC (Ours)",
    "wvn": "WVN",
    "ce_rs": "Baseline+RS",
    "wvn_rs": "WVN+RS",
    "tau_norm": "τ-norm (on CE)",
    "logit_adjust": "Logit adjustment (on CE)",
    "crt": "cRT (on CE)",
}
TABLE_ORDER = ("ce", "ce_bias", "uc_only", "eo", "eo_uc", "wvn", "ce_rs", "wvn_rs", "tau_norm", "logit_adjust", "crt")
GROUPS = ("many", "medium", "few", "top1")
# Post-hoc search spaces (START, STOP, STEP inclusive) and cRT settings (engine calibrate's defaults).
SWEEP_GRIDS = {"rs": (0.0, 1.0, 0.05), "tau_norm": (0.0, 2.0, 0.1), "logit_adjust": (0.0, 2.0, 0.1)}
CRT = {"epochs": 10, "lr": 0.1, "batch_size": 128}
R_MIN = 0.5  # claim (a): "tracks" = mean Pearson r(bias, log n_k) ≥ R_MIN

# The study's training recipe (chosen to fit 2 CPU cores in ≤ 30 min; see README / docs/study).
DEFAULT_ARCH = "resnet8_cifar"
DEFAULT_IMAGE_SIZE = {"digits_lt": 16, "cifar10_lt": 32, "cifar100_lt": 32}
DEFAULT_EPOCHS = 30
DEFAULT_BATCH = {"digits_lt": 32, "cifar10_lt": 128, "cifar100_lt": 128}
PRESETS = {"digits_lt": "digits-lt", "cifar10_lt": "cifar10-lt-resnet32", "cifar100_lt": "cifar100-lt-resnet32"}
GRID_KEYS = ("method", "seed", "data.imbalance_ratio", "data.imbalance_profile", "data.format", "data.root")
# Config keys that do not change a run's numbers: a finished run is re-used across them.
NEUTRAL_KEYS = (("run", "progress"), ("run", "threads"), ("run", "tensorboard"), ("run", "checkpoint_every"))


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
            print(f"engine study: note: {text!r} is set per run by the study (--seeds/--ratios/--profiles/--format/"
                  "--root) and is overridden", flush=True)
    base = study_overrides(fmt, root, epochs, arch, image_size)
    configs = {}
    for profile in profiles:
        for ratio in ratios:
            for method in TRAINED:
                for seed in seeds:
                    per_run = ["eval.diagnostics=true"] if method == "ce_bias" else []  # the trained bias, claim (a)
                    grid = [f"method={method}", f"seed={seed}", f"data.imbalance_ratio={ratio:g}",
                            f"data.imbalance_profile={profile}", f"data.format={fmt}"]
                    cfg = load_config(PRESETS[fmt], None, [*base, *per_run, *overrides, *grid])
                    configs[(setting_name(profile, ratio), method, seed)] = cfg
    return configs


def _comparable(cfg_dict: dict) -> dict:
    d = json.loads(json.dumps(cfg_dict))
    for section, key in NEUTRAL_KEYS:
        d.get(section, {}).pop(key, None)
    return d


def _saved_config(run_dir: Path) -> dict | None:
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None


# --------------------------------------------------------------------------- training


def run_dir_of(out: Path, key: tuple[str, str, int]) -> Path:
    setting, method, seed = key
    return out / "runs" / setting / method / f"seed{seed}"


def is_finished(run_dir: Path, cfg: Config) -> bool:
    """metrics.json present and trained with this config (up to NEUTRAL_KEYS); a different config stops."""
    if not (run_dir / "metrics.json").is_file():
        return False
    saved = _saved_config(run_dir)
    if saved is None or _comparable(saved) != _comparable(to_dict(cfg)):
        raise ConfigError(f"{run_dir} holds a finished run trained with a different config; choose another --out "
                          "or delete that folder")
    return True


def train_one(cfg_dict: dict, run_dir: str) -> tuple[str, float, float]:
    """Train (or resume) one run in this process; returns (run_dir, seconds, test top-1). Output is silenced."""
    import torch

    from engine.train import train

    cfg = config_from_dict(cfg_dict)
    path = Path(run_dir)
    saved = _saved_config(path)
    resume = (path / "last.pt").is_file() and saved == to_dict(cfg)
    if not resume:
        shutil.rmtree(path, ignore_errors=True)  # an unfinished run with another config starts over
    (path / "study_posthoc.json").unlink(missing_ok=True)  # post-hoc results of an older checkpoint
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            metrics = train(cfg, path, resume=resume)
        except CheckpointError:
            if not resume:
                raise
            shutil.rmtree(path, ignore_errors=True)  # an unreadable last.pt: start over
            metrics = train(cfg, path)
    seconds = time.perf_counter() - t0
    atomic_write_text(path / "study_time.json", json.dumps({"train_seconds": seconds, "resumed": resume}))
    return run_dir, seconds, metrics["top1"]


def train_all(configs: dict, out: Path, jobs: int = 1) -> dict:
    """Train every run not finished yet (in this process, or `jobs` worker processes)."""
    pending = [k for k in configs if not is_finished(run_dir_of(out, k), configs[k])]
    stats = {"trained": len(pending), "reused": len(configs) - len(pending), "train_seconds": 0.0}
    print(f"engine study: {len(configs)} runs, {stats['reused']} finished already, {len(pending)} to train"
          + (f" ({jobs} processes)" if jobs > 1 and pending else ""), flush=True)
    if not pending:
        return stats
    t0 = time.perf_counter()

    def done(i: int, key, seconds: float, top1: float) -> None:
        stats["train_seconds"] += seconds
        elapsed = time.perf_counter() - t0
        eta = elapsed / i * (len(pending) - i)
        print(f"[{i}/{len(pending)}] {key[0]} {key[1]} seed {key[2]}: test top-1 {top1:.1f} ({seconds:.1f} s; "
              f"elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)", flush=True)

    if jobs <= 1:
        for i, key in enumerate(pending, 1):
            _, seconds, top1 = train_one(to_dict(configs[key]), str(run_dir_of(out, key)))
            done(i, key, seconds, top1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(train_one, to_dict(configs[k]), str(run_dir_of(out, k))): k for k in pending}
            for i, fut in enumerate(as_completed(futures), 1):
                _, seconds, top1 = fut.result()
                done(i, futures[fut], seconds, top1)
    return stats


# --------------------------------------------------------------------------- post hoc


def sweep_values(method: str) -> list[float]:
    from engine.calibration import inclusive_range

    return inclusive_range(*SWEEP_GRIDS[method])


def _slim(report: dict) -> dict:
    return {g: report.get(g) for g in GROUPS}


def posthoc(run_dir: Path, methods: list[str], seed: int) -> dict:
    """engine.calibration's sweeps / cRT on one checkpoint, features collected once; cached in the run folder."""
    params = {"methods": methods, "grids": {m: sweep_values(m) for m in methods if m in SWEEP_GRIDS},
              "crt": CRT if "crt" in methods else None, "seed": seed}
    cache = run_dir / "study_posthoc.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("params") == params:
            return cached

    from engine.calibration import SWEEPS, retrain_classifier, sweep, sweep_logits_fn
    from engine.evaluate import reporter, scalars
    from engine.posthoc import load_run, split_features

    _, cfg, data, model, device = load_run(run_dir / "last.pt")
    counts = data.class_counts
    feats = split_features(cfg, data, model, device, ("val", "test", "train") if "crt" in methods else ("val", "test"))
    report = reporter(cfg, counts)

    results = {}
    for method in methods:
        name = PARAM_NAME[method]
        if method in SWEEPS:
            rows, chosen = sweep(params["grids"][method], sweep_logits_fn(method, model, counts), feats, report, name)
        else:
            rows, chosen, _ = retrain_classifier(method, model, feats, counts, report, CRT["epochs"], CRT["lr"],
                                                 CRT["batch_size"], seed)
        results[method] = {
            "parameter": name, "chosen": chosen[name], "chosen_by": "val top1",
            "val": scalars(chosen["val"]), "test": scalars(chosen["test"]),
            "rows": [{name: r[name], "val": _slim(r["val"]), "test": _slim(r["test"])} for r in rows],
        }
    out = {"params": params, "checkpoint_method": cfg.method, "results": results}
    atomic_write_text(cache, json.dumps(out, indent=1))
    return out


# --------------------------------------------------------------------------- aggregation


def _stat(values: list) -> dict | None:
    vals = [v for v in values if v is not None]
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)} if vals else None


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson r; None when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def collect_setting(out: Path, setting: str, seeds: list[int]) -> dict:
    """Every number of one setting: per-seed rows, means ± std, RS γ curves, ce_bias bias vs log prior."""
    rows: dict[str, dict] = {}
    runs = {m: {s: json.loads((run_dir_of(out, (setting, m, s)) / "metrics.json").read_text()) for s in seeds}
            for m in TRAINED}
    first = runs["ce"][seeds[0]]
    cfg0 = _saved_config(run_dir_of(out, (setting, "ce", seeds[0]))) or {}
    counts = first["class_counts"]
    for m in TRAINED:
        per_seed = [{"seed": s, "test": _slim(r), "val": _slim(r["val"])} for s, r in runs[m].items()]
        rows[m] = {"label": LABELS[m], "kind": "trained", "runs": per_seed}
    post = {}
    for s in seeds:
        post[("ce", s)] = posthoc(run_dir_of(out, (setting, "ce", s)), ["rs", "tau_norm", "logit_adjust", "crt"], s)
        post[("wvn", s)] = posthoc(run_dir_of(out, (setting, "wvn", s)), ["rs"], s)
    for key, (base, method) in POSTHOC.items():
        per_seed = []
        for s in seeds:
            r = post[(base, s)]["results"][method]
            per_seed.append({"seed": s, "test": _slim(r["test"]), "val": _slim(r["val"]),
                             "chosen": {r["parameter"]: r["chosen"]}})
        rows[key] = {"label": LABELS[key], "kind": f"post hoc on {base}", "parameter": PARAM_NAME[method],
                     "runs": per_seed}
    for row in rows.values():
        row["test"] = {g: _stat([r["test"][g] for r in row["runs"]]) for g in GROUPS}
        row["val"] = {g: _stat([r["val"][g] for r in row["runs"]]) for g in GROUPS}
        row["test_error"] = _stat([100.0 - r["test"]["top1"] for r in row["runs"]])
        if "parameter" in row:
            row["chosen"] = _stat([r["chosen"][row["parameter"]] for r in row["runs"]])

    curves = {}
    for base in ("ce", "wvn"):
        per = [post[(base, s)]["results"]["rs"]["rows"] for s in seeds]
        gammas = [r["gamma"] for r in per[0]]
        val_err = [[100.0 - r["val"]["top1"] for r in rows_s] for rows_s in per]
        test_err = [[100.0 - r["test"]["top1"] for r in rows_s] for rows_s in per]
        curves[base] = {"gamma": gammas, "val_error_per_seed": val_err, "test_error_per_seed": test_err,
                        "val_error_mean": np.mean(val_err, axis=0).tolist(),
                        "test_error_mean": np.mean(test_err, axis=0).tolist(),
                        "test_error_std": np.std(test_err, axis=0).tolist()}

    log_n = [math.log(n) for n in counts]
    bias_runs = []
    for s, r in runs["ce_bias"].items():
        diag = r.get("diagnostics") or {}
        bias, emp = diag.get("bias"), diag.get("empirical_offset")
        log_n_s = [math.log(n) for n in r["class_counts"]]
        bias_runs.append({"seed": s, "bias": bias, "class_counts": r["class_counts"],
                          "pearson_r": pearson(bias, log_n_s) if bias else None,
                          # EO Fig. 1c: the empirical offset ½μ̃_k·w_k of the same model (supplementary)
                          "empirical_offset": emp, "empirical_offset_r": pearson(emp, log_n_s) if emp else None})
    for c in curves.values():  # WVN Fig. 10: how much the test error moves over the γ range
        c["test_error_spread"] = float(max(c["test_error_mean"]) - min(c["test_error_mean"]))
        c["test_error_at_0"] = c["test_error_mean"][0]
        c["test_error_min"] = float(min(c["test_error_mean"]))
    profile, _, ratio = setting.partition("-if")
    ev = cfg0.get("eval", {})
    return {
        "name": setting, "profile": profile, "ratio": float(ratio),
        "class_counts": counts, "log_prior": log_n,
        "shot_thresholds": {"many_more_than": ev.get("many_threshold"), "few_fewer_than": ev.get("few_threshold")},
        "shot_classes": {"many": sum(n > ev.get("many_threshold", 0) for n in counts),
                         "few": sum(n < ev.get("few_threshold", 0) for n in counts)},
        "rows": rows, "rs_curves": curves, "ce_bias": bias_runs,
    }


# --------------------------------------------------------------------------- claims


def _mean(row: dict, group: str = "top1") -> float | None:
    s = row["test"][group]
    return None if s is None else s["mean"]


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("holds" if ok else "fails")


def _claim_a(runs: list[dict]) -> dict:
    vals = [r["pearson_r"] for r in runs if r.get("pearson_r") is not None]
    emp = [r["empirical_offset_r"] for r in runs if r.get("empirical_offset_r") is not None]
    out = {"empirical_offset_mean_r": float(np.mean(emp)) if emp else None}  # supplementary, not the verdict
    if not vals:
        return {"verdict": "n/a", "mean_r": None, "runs": 0, **out}
    mean_r = float(np.mean(vals))
    return {"verdict": _verdict(mean_r >= R_MIN), "mean_r": mean_r, "runs": len(vals), **out}


def _claim_b(few: dict[str, float | None]) -> dict:
    if any(v is None for v in few.values()):
        return {"verdict": "n/a", "reason": "no few-shot class in this setting", "lift_over_ce": None}
    lift = {m: few[m] - few["ce"] for m in TRAINED if m != "ce"}
    best_other = max(v for m, v in lift.items() if m != "eo_uc")
    return {"verdict": _verdict(lift["eo_uc"] > 0 and lift["eo_uc"] >= best_other), "lift_over_ce": lift}


def _claim_chain(values: dict[str, float], order: tuple[str, ...], strict: bool) -> dict:
    pairs = list(zip(order, order[1:]))
    ok = all(values[a] > values[b] if strict else values[a] >= values[b] for a, b in pairs)
    return {"verdict": _verdict(ok), "top1": {m: values[m] for m in order}}


CLAIMS = {
    "a": f"trained bias tracks log prior in ce_bias (mean Pearson r(bias, log n_k) ≥ {R_MIN})",
    "b": "EO+UC lifts few-shot accuracy over CE the most among the trained methods",
    "c": "ablation order EO+UC > EO > UC-only > CE (test top-1)",
    "d": "WVN+RS ≥ Baseline+RS ≥ CE (test top-1)",
}
ORDER_C = ("eo_uc", "eo", "uc_only", "ce")
ORDER_D = ("wvn_rs", "ce_rs", "ce")


def check_claims(settings: list[dict]) -> dict:
    """The four claims from the numbers in the study JSON: per setting (means over seeds) and overall
    ((a): mean r over all runs; (b)–(d): means over the settings of the per-setting means)."""
    per_setting = {}
    for st in settings:
        rows = st["rows"]
        per_setting[st["name"]] = {
            "a": _claim_a(st["ce_bias"]),
            "b": _claim_b({m: _mean(rows[m], "few") for m in TRAINED}),
            "c": _claim_chain({m: _mean(rows[m]) for m in ORDER_C}, ORDER_C, strict=True),
            "d": _claim_chain({m: _mean(rows[m]) for m in ORDER_D}, ORDER_D, strict=False),
        }

    def over_settings(method: str, group: str = "top1", only: list[dict] | None = None) -> float:
        return float(np.mean([_mean(st["rows"][method], group) for st in (only or settings)]))

    with_few = [st for st in settings if all(_mean(st["rows"][m], "few") is not None for m in TRAINED)]
    overall = {
        "a": _claim_a([r for st in settings for r in st["ce_bias"]]),
        "b": _claim_b({m: over_settings(m, "few", with_few) for m in TRAINED}) if with_few
        else {"verdict": "n/a", "reason": "no setting has a few-shot class", "lift_over_ce": None},
        "c": _claim_chain({m: over_settings(m) for m in ORDER_C}, ORDER_C, strict=True),
        "d": _claim_chain({m: over_settings(m) for m in ORDER_D}, ORDER_D, strict=False),
    }
    if with_few:
        overall["b"]["settings"] = [st["name"] for st in with_few]
    counts = {c: {"holds": sum(v[c]["verdict"] == "holds" for v in per_setting.values()),
                  "fails": sum(v[c]["verdict"] == "fails" for v in per_setting.values()),
                  "n/a": sum(v[c]["verdict"] == "n/a" for v in per_setting.values())} for c in CLAIMS}
    return {"statements": CLAIMS, "r_min": R_MIN, "per_setting": per_setting, "overall": overall,
            "settings_count": counts}


# --------------------------------------------------------------------------- outputs


def _cell(s: dict | None, digits: int = 1) -> str:
    return "–" if s is None else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _claim_numbers(key: str, c: dict) -> str:
    if c["verdict"] == "n/a" and key != "a":
        return c.get("reason", "")
    if key == "a":
        if c["mean_r"] is None:
            return "no trained bias recorded"
        emp = c.get("empirical_offset_mean_r")
        return f"mean r = {c['mean_r']:.3f} over {c['runs']} runs" + (
            "" if emp is None else f" (empirical offset ½μ̃·w: r = {emp:.3f})")
    if key == "b":
        return ", ".join(f"{LABELS[m]} {v:+.1f}" for m, v in c["lift_over_ce"].items())
    return " vs ".join(f"{LABELS[m]} {v:.2f}" for m, v in c["top1"].items())


def markdown(summary: dict) -> str:
    settings = summary["settings"]
    names = [st["name"] for st in settings]
    lines = [
        "# Ablation study: estimated offset (EO+UC) and weight-vector normalization + re-scaling (WVN+RS)",
        "",
        "Generated by `engine study` (engine/study.py); every number below is computed by that run and is "
        "also in `study.json`.",
        "",
        "```",
        summary["command"],
        "```",
        "",
        f"- Data: {summary['data']}; seeds {summary['seeds']}; test accuracies in %, mean ± std over seeds "
        "(population std, as `engine sweep`).",
        f"- Recipe: {summary['recipe']}.",
        f"- Wall time of this invocation: {summary['wall_seconds'] / 60:.1f} min on {summary['machine']}: "
        f"{summary['runs']['trained']} runs trained, {summary['runs']['reused']} re-used; post hoc + outputs "
        f"{summary['posthoc_seconds'] / 60:.1f} min. Training time summed over all runs: "
        + (f"{summary['runs']['train_seconds_all_runs'] / 60:.1f} min" if summary["runs"].get("train_seconds_all_runs")
           is not None else "unknown (runs from an older version)") + " (≈ the wall time with one process).",
        "- Post-hoc rows are computed on the trained checkpoints (Baseline+RS, τ-norm, logit adjustment and cRT on "
        "the `ce` run, WVN+RS on the `wvn` run); each hyper-parameter (RS γ ∈ "
        f"{_grid_text('rs')}, τ-norm τ ∈ {_grid_text('tau_norm')}, logit-adjustment τ ∈ {_grid_text('logit_adjust')}, "
        f"cRT epoch ∈ 1..{CRT['epochs']}) is chosen per seed by validation top-1 and reported on test.",
    ]
    if summary.get("notes"):
        lines += [f"- Note: {n}" for n in summary["notes"]]
    lines += ["", "## Many / medium / few / all per setting (shaped like EO Table 3)", ""]
    for st in settings:
        th = st["shot_thresholds"]
        lines += [f"### {st['profile']} profile, imbalance ratio {st['ratio']:g}", "",
                  f"Training images per class: {st['class_counts']}; many: > {th['many_more_than']}, "
                  f"few: < {th['few_fewer_than']} images ({st['shot_classes']['many']} many-shot, "
                  f"{st['shot_classes']['few']} few-shot classes; '–' = no class in that group).", "",
                  "| method | many | medium | few | all | chosen (mean) |", "|---|---|---|---|---|---|"]
        for key in TABLE_ORDER:
            row = st["rows"][key]
            t = row["test"]
            chosen = (f"{row['parameter']} {row['chosen']['mean']:.{1 if row['parameter'] == 'epoch' else 2}f}"
                      if "chosen" in row else "")
            lines.append(f"| {row['label']} | {_cell(t['many'])} | {_cell(t['medium'])} | {_cell(t['few'])} "
                         f"| {_cell(t['top1'])} | {chosen} |")
        lines.append("")
    lines += ["## Test error (%) over settings (shaped like WVN Table 1)", "",
              "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in TABLE_ORDER:
        lines.append(f"| {LABELS[key]} | " + " | ".join(_cell(st["rows"][key]["test_error"]) for st in settings) + " |")
    lines += ["", "## RS γ sensitivity (WVN Fig. 10)", ""]
    for profile in summary["profiles"]:
        lines.append(f"![RS γ sensitivity, {profile} profile](rs_gamma_{profile}.png)")
    lines += ["", "Validation and test error vs γ of post-hoc RS on the `ce` checkpoint (Baseline+RS) and on the `wvn` "
              "checkpoint (WVN+RS), mean over seeds; γ = 0 is the model without RS. Spread = max − min of the mean "
              "test error over the γ grid (smaller = less sensitive to γ):", "",
              "| setting | Baseline+RS: error at γ=0 / min / spread | WVN+RS: error at γ=0 / min / spread |",
              "|---|---|---|"]
    for st in settings:
        cells = [f"{c['test_error_at_0']:.1f} / {c['test_error_min']:.1f} / {c['test_error_spread']:.1f}"
                 for c in (st["rs_curves"]["ce"], st["rs_curves"]["wvn"])]
        lines.append(f"| {st['name']} | {cells[0]} | {cells[1]} |")
    lines.append("")
    claims = summary["claims"]
    lines += ["## Claims check (computed from study.json)", "",
              "| claim | overall | numbers (overall) | settings: holds / fails / n/a |", "|---|---|---|---|"]
    for key, text in claims["statements"].items():
        c = claims["overall"][key]
        n = claims["settings_count"][key]
        lines.append(f"| ({key}) {text} | **{c['verdict']}** | {_claim_numbers(key, c)} | "
                     f"{n['holds']} / {n['fails']} / {n['n/a']} |")
    lines += ["", "Per setting:", "", "| setting | " + " | ".join(f"({k})" for k in claims["statements"]) + " |",
              "|---|" + "---|" * len(claims["statements"])]
    for name in names:
        cells = []
        for key in claims["statements"]:
            c = claims["per_setting"][name][key]
            cells.append(f"{c['verdict']}: {_claim_numbers(key, c)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "(a) per run: Pearson r between the trained bias b_k of `ce_bias` and log n_k; (b) lift = few-shot "
              "accuracy minus CE's, holds when EO+UC's lift is positive and ≥ every other's; (c) strict order of mean test top-1; (d) ≥ order of mean test top-1. Overall: (a) "
              "mean r over all runs, (b)–(d) means over settings of the per-setting means ((b) over the settings that "
              "have few-shot classes).", ""]
    return "\n".join(lines)


def _grid_text(method: str) -> str:
    start, stop, step = SWEEP_GRIDS[method]
    return f"{{{start:g}, {start + step:g}, …, {stop:g}}}"


def plot_rs_curves(out: Path, settings: list[dict], profile: str) -> Path:
    from engine.report import plt, save_png

    panel = [st for st in settings if st["profile"] == profile]
    fig, axes = plt.subplots(1, len(panel), figsize=(4.2 * len(panel), 3.6), squeeze=False)
    for ax, st in zip(axes[0], panel):
        for base, label, color in (("ce", "Baseline+RS", "tab:blue"), ("wvn", "WVN+RS", "tab:red")):
            c = st["rs_curves"][base]
            g = np.array(c["gamma"])
            test, std = np.array(c["test_error_mean"]), np.array(c["test_error_std"])
            ax.plot(g, test, color=color, marker="o", ms=3, label=f"{label} test")
            ax.fill_between(g, test - std, test + std, color=color, alpha=0.12, lw=0)
            ax.plot(g, c["val_error_mean"], color=color, ls="--", lw=1, label=f"{label} val")
        ax.set(xlabel="γ", ylabel="top-1 error (%)", title=f"{profile}, IF {st['ratio']:g}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Post-hoc RS γ sensitivity (mean over seeds; band: test ± std)", fontsize=10, y=1.04)
    path = out / f"rs_gamma_{profile}.png"
    save_png(fig, path)
    return path


# --------------------------------------------------------------------------- the command


def run_study(out: str | Path = "docs/study", seeds: list[int] = (0, 1, 2), ratios: list[float] = (10, 50, 100),
              profiles: list[str] = ("exp", "step"), epochs: int = DEFAULT_EPOCHS, arch: str = DEFAULT_ARCH,
              image_size: int | None = None, overrides: list[str] = (), fmt: str = "digits_lt", root: str = "",
              jobs: int = 1, command: str = "") -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    seeds, ratios, profiles, overrides = list(seeds), [float(r) for r in ratios], list(profiles), list(overrides)
    image_size = image_size or DEFAULT_IMAGE_SIZE.get(fmt, 32)
    if jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {jobs}")
    configs = build_configs(fmt, root, seeds, ratios, profiles, epochs, arch, image_size, overrides)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / ".gitignore").exists():
        atomic_write_text(out / ".gitignore", "# run folders (checkpoints) of engine study stay out of git\nruns/\n")
    stats = train_all(configs, out, jobs)

    t1 = time.perf_counter()
    import torch

    threads = next(iter(configs.values())).run.threads
    if threads:
        torch.set_num_threads(threads)
    settings = [collect_setting(out, setting_name(p, r), seeds) for p in profiles for r in ratios]
    stats["train_seconds_all_runs"] = _all_train_seconds(out, configs)
    cfg0 = next(iter(configs.values()))
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
    lo = cfg0.loss
    summary = {
        "command": command or "engine study",
        "data": (f"{fmt} (n_max {cfg0.data.n_max}, val {cfg0.data.val_per_class}/class, test "
                 f"{cfg0.data.test_per_class}/class, balanced)" if fmt == "digits_lt" else f"{fmt} from {root}"),
        "recipe": (f"{cfg0.model.arch} at {cfg0.data.image_size} px (pad-crop {cfg0.data.crop_padding}), {cfg0.epochs} "
                   f"epochs, batch {cfg0.optim.batch_size}, SGD lr {cfg0.optim.lr:g} {cfg0.optim.schedule} "
                   f"(warmup {cfg0.optim.warmup_epochs}), wd {cfg0.optim.weight_decay:g}, "
                   f"λ1 = {lo.lambda_center:g}, λ2 = {lo.lambda_uniform:g}, α = {lo.center_alpha:g} (eo, uc_only, eo_uc), "
                   f"{cfg0.run.threads or 'default'} torch thread(s) per run"),
        "format": fmt, "seeds": seeds, "ratios": ratios, "profiles": profiles, "overrides": overrides,
        "config_ce_first": to_dict(configs[(settings[0]["name"], "ce", seeds[0])]),
        "sweep_grids": {m: sweep_values(m) for m in SWEEP_GRIDS}, "crt": CRT,
        "runs": stats, "machine": _machine(), "notes": notes,
        "settings": settings,
    }
    summary["claims"] = check_claims(settings)
    for p in profiles:
        plot_rs_curves(out, settings, p)
    summary["posthoc_seconds"] = time.perf_counter() - t1
    summary["wall_seconds"] = time.perf_counter() - t0
    atomic_write_text(out / "study.json", json.dumps(summary, indent=1))
    text = markdown(summary)
    atomic_write_text(out / "study.md", text)
    print(f"engine study: wrote {out / 'study.md'}, {out / 'study.json'}, "
          + ", ".join(str(out / f"rs_gamma_{p}.png") for p in profiles)
          + f" in {summary['wall_seconds'] / 60:.1f} min", flush=True)
    for key, c in summary["claims"]["overall"].items():
        print(f"  claim ({key}) {CLAIMS[key]}: {c['verdict']} — {_claim_numbers(key, c)}", flush=True)
    return summary


def _all_train_seconds(out: Path, configs: dict) -> float | None:
    """Training time summed over every run of the study, including runs trained by earlier invocations."""
    total = 0.0
    for key in configs:
        try:
            total += json.loads((run_dir_of(out, key) / "study_time.json").read_text())["train_seconds"]
        except (OSError, ValueError, KeyError):
            return None
    return total


def _machine() -> str:
    import os
    import platform

    import torch

    return f"{len(os.sched_getaffinity(0))} CPU cores ({platform.machine()}), torch {torch.__version__}"
