"""The study's four claims, computed from the numbers in study.json (pure functions, never written by hand).

(a) the trained bias of `ce_bias` tracks the log prior (Pearson r with log n_k ≥ R_MIN, mean over runs);
(b) EO+UC lifts few-shot accuracy over CE the most among the trained methods;
(c) ablation order EO+UC > EO > UC-only > CE (test top-1);
(d) WVN+RS ≥ Baseline+RS ≥ CE (test top-1).
Each per setting (means over seeds) and overall (means over settings).
"""

from __future__ import annotations

import numpy as np

from engine.experiments.study_design import LABELS, R_MIN, TRAINED


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson r; None when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _mean(row: dict, group: str = "top1") -> float | None:
    s = row["test"][group]
    return None if s is None else s["mean"]


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("holds" if ok else "fails")


def _claim_a(rows: list[dict]) -> dict:
    vals = [row["pearson_r"] for row in rows if row.get("pearson_r") is not None]
    emp = [row["empirical_offset_r"] for row in rows if row.get("empirical_offset_r") is not None]
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


def claim_numbers(key: str, c: dict) -> str:
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
