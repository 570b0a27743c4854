"""baselines.md (many/medium/few/all per split, each method's val choice, EO+UC − best baseline) and baselines.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.experiments.study_design import BASELINE_LABELS, CRT, EPOCH_FRACTION_KEYS
from engine.experiments.study_report import generated_lines, grid_text, wall_line
from engine.render import fmt_mean_std, markdown_table, save_png, subplots


def _header(summary: dict) -> list[str]:
    return [
        *generated_lines("Baselines: every method tuned on validation, and EO+UC against the best of them", summary,
                         "study_baselines", "baselines"),
        f"- Data: {summary['data']}; splits {', '.join(summary['splits'])}; seeds {summary['seeds']}; test "
        "accuracies in %, mean ± std over seeds (population std).",
        f"- Recipe: {summary['recipe']}; each method's grid below overrides its own keys.",
        wall_line(summary, "post hoc + outputs"),
        "- Trained methods: every point of the grid is trained for every seed; the point with the best val top-1 "
        "(mean over seeds; ties: the earlier point) is reported. Post-hoc rows calibrate the chosen checkpoint of "
        f"their base method, the parameter chosen per seed by val top-1 (RS γ ∈ {grid_text('rs')}, τ-norm τ ∈ "
        f"{grid_text('tau_norm')}, logit-adjustment τ ∈ {grid_text('logit_adjust')}, cRT / LWS epoch ∈ "
        f"1..{CRT['epochs']}); the chosen column gives its mean over seeds.",
    ]


def _grids(summary: dict) -> list[str]:
    rows = []
    for method, grid in summary["grids"].items():
        text = "; ".join(f"`{k}` ∈ {{{', '.join(f'{v:g}' for v in vals)}}}"
                         + (" × epochs" if k in EPOCH_FRACTION_KEYS else "") for k, vals in grid.items())
        rows.append([BASELINE_LABELS[method], text or "– (the preset's values)"])
    return ["## Hyper-parameter grids (engine/experiments/study_design.py BASELINE_GRIDS)", "",
            markdown_table(["method", "grid"], rows), ""]


def chosen_text(row: dict) -> str:
    if row["kind"] == "trained":
        return "–" if row["chosen_point"] == "preset" else row["chosen_point"]
    digits = 0 if row["parameter"] == "epoch" else 2
    return f"{row['parameter']} {row['chosen']['mean']:.{digits}f}"


def diff_text(d: dict | None) -> str:
    if d is None:
        return "n/a (no few-shot class)"
    if d["ci95"] is None:
        return f"{d['mean']:+.2f} (1 seed: no interval)"
    lo, hi = d["ci95"]
    return f"{d['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def verdict(diff: dict | None) -> str:
    """"ahead" / "behind" when the 95% interval of EO+UC − baseline excludes 0, else "level"; "n/a" without one."""
    if diff is None or diff["ci95"] is None:
        return "n/a"
    lo, hi = diff["ci95"]
    return "ahead" if lo > 0 else "behind" if hi < 0 else "level"


def comparison_cells(st: dict) -> list[str]:
    """EO+UC − the best baseline by val top-1 on all, and − the best by val few-shot on few: text and verdict."""
    cells = []
    for group, key in (("all", "ours_vs_best"), ("few", "ours_vs_best_few")):
        cmp = st.get(key)
        diff = None if cmp is None else cmp["top1" if group == "all" else "few"]
        name = "–" if cmp is None else BASELINE_LABELS[cmp["best_baseline"]]
        cells.append(f"{group}: EO+UC − {name} {diff_text(diff)} → {verdict(diff)}")
    return cells


def comparison_line(st: dict) -> str:
    cmp = st["ours_vs_best"]
    if cmp is None:
        return "EO+UC − best baseline: n/a (EO+UC or every baseline is missing from --methods)."
    n = (cmp["top1"] or {}).get("n", 0)
    return (f"EO+UC − best baseline ({BASELINE_LABELS[cmp['best_baseline']]}, best by mean val top-1), paired over "
            f"{n} seed(s), test accuracy, mean [95% t CI]: few {diff_text(cmp['few'])}, "
            f"all {diff_text(cmp['top1'])}.")


def _split_table(st: dict) -> list[str]:
    rows = [[row["label"], *(fmt_mean_std(row["test"][g]) for g in ("many", "medium", "few", "top1")),
             fmt_mean_std(row["val"]["top1"]), chosen_text(row)] for row in st["rows"].values()]
    return [f"### {st['profile']} profile, imbalance ratio {st['ratio']:g} (`{st['name']}`)", "",
            f"Training images per class: {st['class_counts']}.", "",
            markdown_table(["method", "many", "medium", "few", "all", "val all", "chosen on val"], rows), "",
            comparison_line(st), ""]


def markdown(summary: dict) -> str:
    lines = _header(summary) + ["", "## Many / medium / few / all per split", ""]
    for st in summary["settings"]:
        lines += _split_table(st)
    summary_rows = []
    for st in summary["settings"]:
        row = [st["name"]]
        for group, key in (("top1", "ours_vs_best"), ("few", "ours_vs_best_few")):
            cmp = st.get(key)
            diff = None if cmp is None else cmp[group]
            row += ["–" if cmp is None else BASELINE_LABELS[cmp["best_baseline"]], diff_text(diff), verdict(diff)]
        summary_rows.append(row)
    lines += ["## EO+UC − best baseline (paired over seeds, test, 95% t CI)", "",
              "Overall: against the baseline with the best mean val top-1; few-shot: against the baseline with the best "
              "mean val few-shot accuracy. ahead / behind: the interval excludes 0; level: it does not.", "",
              markdown_table(["split", "best baseline by val all", "EO+UC − it: all", "verdict",
                              "best baseline by val few", "EO+UC − it: few", "verdict"], summary_rows), ""]
    lines += ["![many/few/all per method](baselines.png)", ""]
    return "\n".join(lines + _grids(summary))


def plot_baselines(path: Path, settings: list[dict]) -> Path:
    """Test few-shot and overall accuracy (mean ± std over seeds) per method, one panel per split."""
    fig, axes = subplots(1, len(settings), figsize=(5.5 * len(settings), 0.32 * len(settings[0]["rows"]) + 1.5),
                         squeeze=False)
    for ax, st in zip(axes[0], settings):
        keys = list(st["rows"])
        y = np.arange(len(keys))
        for off, group, color in ((-0.2, "top1", "tab:blue"), (0.2, "few", "tab:orange")):
            stats = [st["rows"][k]["test"][group] for k in keys]
            ax.barh(y + off, [s["mean"] if s else 0 for s in stats], height=0.4, color=color,
                    xerr=[s["std"] if s else 0 for s in stats], label="all" if group == "top1" else group)
        ax.set_yticks(y, [BASELINE_LABELS[k] for k in keys], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="test top-1 (%)", title=st["name"])
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_png(fig, path)
    return path

