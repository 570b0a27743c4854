"""order.md (per axis: accuracy of ce / eo / uc_only / eo_uc, the order, the mechanism measures) and its plots."""

from __future__ import annotations

from pathlib import Path

from engine.experiments.study_design import LABELS, ORDER_METHODS, PAPER_ORDER
from engine.experiments.study_report import generated_lines, wall_line
from engine.render import fmt_mean_std, markdown_table, save_png, subplots

SHORT = {"ce": "CE", "eo": "EO", "uc_only": "UC", "eo_uc": "EO+UC"}
MEASURE_TEXT = {
    "estimated_offset_r": "r(õ, log n)", "estimated_offset_slope": "slope(õ, log n)",
    "empirical_offset_r": "r(½μ̃·w, log n)", "empirical_offset_slope": "slope(½μ̃·w, log n)",
    "offset_entropy": "H(softmax(−õ))/log K", "weight_norm_r": "r(‖w‖, log n)", "center_norm_r": "r(‖c‖, log n)",
    "feature_norm_r": "r(‖f‖, log n)",
}


def _order_text(order: list[str]) -> str:
    return " > ".join(SHORT[m] for m in order)


def _header(summary: dict) -> list[str]:
    base = ", ".join(f"`{k}` = {v}" for k, v in summary["base"].items())
    return [
        *generated_lines("The EO ablation order across scale: where EO+UC > EO > UC only > CE holds, where it flips, "
                         "and why", summary, "study_order", "order"),
        f"- Data: {summary['data']}; seeds {summary['seeds']}; test accuracies in %, mean ± std over seeds "
        "(population std).",
        f"- Recipe: {summary['recipe']}.",
        f"- The base point: {base}. Each axis moves one key; the other keys stay at the base point.",
        wall_line(summary, "measures + outputs"),
        f"- The paper's order (EO Table 3): {_order_text(list(PAPER_ORDER))}.", "",
        "![accuracy per axis](order_accuracy.png)", "", "![mechanism per axis](order_mechanism.png)", "",
    ]


def _holds_lines(axes: list[dict]) -> list[str]:
    lines = ["## Where the paper's order holds", ""]
    points = {}  # the base point once, then every other level
    for ax in axes:
        for lv in ax["levels"]:
            points.setdefault("the base point" if lv["base"] else f"{ax['axis']} = {lv['text']}", lv)
    held = [name for name, lv in points.items() if lv["paper_order"]]
    eo_ahead = [f"{name} ({lv['eo_minus_uc_only']:+.1f})" for name, lv in points.items() if lv["eo_minus_uc_only"] > 0]
    lines.append(f"- The full order holds (mean test top-1) at {len(held)} of {len(points)} points"
                 + (f": {', '.join(held)}." if held else "."))
    lines.append(f"- EO (w/o UC) is ahead of UC only (mean test top-1, difference in points) at {len(eo_ahead)} of "
                 f"{len(points)} points" + (f": {', '.join(eo_ahead)}." if eo_ahead else "."))
    return lines + [""]


def _axis_lines(ax: dict) -> list[str]:
    rows = []
    for lv in ax["levels"]:
        cells = lv["cells"]
        rows.append([lv["text"] + (" (base)" if lv["base"] else ""), f"{min(lv['class_counts'])}–"
                     f"{max(lv['class_counts'])}",
                     *(f"{fmt_mean_std(cells[m]['test']['top1'])} / {fmt_mean_std(cells[m]['test']['few'])}"
                       for m in ORDER_METHODS),
                     _order_text(lv["order"]), "yes" if lv["paper_order"] else "no"])
    header = [f"`{ax['key']}`", "n_k", *(f"{LABELS[m]}: all / few" for m in ORDER_METHODS), "order (all)",
              "paper's order"]
    mech = []
    for lv in ax["levels"]:
        for m in ORDER_METHODS:
            mm = lv["cells"][m]["mechanism"]
            mech.append([lv["text"], SHORT[m], *(fmt_mean_std(mm[k], 2) for k in MEASURE_TEXT)])
    return [f"## {ax['axis']}", "", markdown_table(header, rows), "",
            markdown_table(["level", "method", *MEASURE_TEXT.values()], mech), ""]


def markdown(summary: dict) -> str:
    lines = _header(summary) + _holds_lines(summary["axes"])
    lines += [
        "Measures (per checkpoint, mean ± std over seeds): õ_k = ½c_k·w_k with the trained centers (methods "
        "with a center loss); ½μ̃_k·w_k with μ̃_k the class mean of the training features (no augmentation); r = "
        "Pearson correlation over the classes with log n_k; slope = least-squares slope against log n_k (1 = the "
        "log-prior shift of logit adjustment); H(softmax(−õ))/log K = 1 for a uniform offset (UC's target); "
        "‖f‖ = mean test feature norm of the class.", "",
    ]
    for ax in summary["axes"]:
        lines += _axis_lines(ax)
    return "\n".join(lines) + "\n"


def _plot_rows(path: Path, axes: list[dict], rows: list[tuple[str, str, object]]) -> Path:
    """One column per axis, one row per (title, y label, cell → mean ± std stat): each method's line over the levels."""
    fig, grid = subplots(len(rows), len(axes), figsize=(3.3 * len(axes), 3 * len(rows)), squeeze=False)
    for col, ax in enumerate(axes):
        x = list(range(len(ax["levels"])))
        for row, (title, ylabel, stat_of) in enumerate(rows):
            panel = grid[row][col]
            for m in ORDER_METHODS:
                stats = [stat_of(lv["cells"][m]) for lv in ax["levels"]]
                panel.errorbar(x, [s["mean"] if s else float("nan") for s in stats],
                               yerr=[s["std"] if s else 0 for s in stats], marker="o", ms=3, capsize=2, label=SHORT[m])
            panel.set_xticks(x, [lv["text"] for lv in ax["levels"]], fontsize=6, rotation=20)
            panel.set_title(f"{ax['axis']}: {title}", fontsize=8)
            panel.grid(alpha=0.3)
            if col == 0:
                panel.set_ylabel(ylabel)
    grid[0][0].legend(fontsize=7)
    save_png(fig, path)
    return path


def plot_accuracy(path: Path, axes: list[dict]) -> Path:
    """Test top-1 (top row) and few-shot accuracy (bottom row) of each method per level, one column per axis."""
    return _plot_rows(path, axes, [("all", "test top-1 (%)", lambda c: c["test"]["top1"]),
                                   ("few", "test few-shot (%)", lambda c: c["test"]["few"])])


def plot_mechanism(path: Path, axes: list[dict]) -> Path:
    """Per axis: the slope of the empirical offset on log n (top) and r(‖w‖, log n) (bottom), each method."""
    return _plot_rows(path, axes, [(MEASURE_TEXT[k], MEASURE_TEXT[k], lambda c, k=k: c["mechanism"][k])
                                   for k in ("empirical_offset_slope", "weight_norm_r")])
