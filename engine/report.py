"""The run's report: `report.md` + PNG plots next to metrics.json (which holds every number).

Plots (the papers' figures, made live; classes sorted by training count, most frequent first):

| file             | what                                                          | paper          |
|------------------|---------------------------------------------------------------|----------------|
| curves.png       | training loss, val accuracy (all/many/medium/few) per epoch   | –              |
| per_class.png    | class-wise test accuracy with the GM and the mean             | EO Fig. 4      |
| cumulative_fp.png| cumulative false positives, with the linear (unbiased) line   | EO Fig. 5      |
| confusion.png    | row-normalized confusion matrix                               | –              |
| prior.png        | trained bias / offsets vs log prior (with Pearson r)          | EO Fig. 1      |
| offsets.png      | empirical ½μ̃_k·w_k vs estimated ½c_k·w_k offsets per class    | EO Fig. 3      |
| weight_norms.png | ‖w_k‖ / max_k ‖w_k‖ vs training count                         | WVN Fig. 2/3   |

The last three need `metrics["diagnostics"]` (eval.diagnostics=epoch or pass). Past 50 classes
(TICKS_MAX_CLASSES) the per-class figures keep a fixed size: lines over the sorted classes instead of
bars, no per-class tick labels, accuracy and confusion per frequency bin (FREQUENCY_BINS equal groups). `engine compare` lives in
engine/experiments/compare.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.io import atomic_write_text
from engine.render import fmt, markdown_table, save_png, subplots

TICKS_MAX_CLASSES = 50  # per-class views (bars, tick labels, table rows) up to this many classes; binned beyond
TABLE_MAX_CLASSES = 1000  # report.md lists every class up to this many (metrics.json always has them)
FREQUENCY_BINS = 20  # binned views: the classes in frequency order, cut into this many equal-sized groups
WIDE = (12, 3.8)  # the size (inches, at 110 dpi: ≤ 1320 px wide) of every per-class figure past TICKS_MAX_CLASSES


def _by_frequency_ticks(ax, order: np.ndarray, counts: np.ndarray) -> None:
    x = np.arange(len(order))
    if len(order) <= TICKS_MAX_CLASSES:
        ax.set_xticks(x, [f"{c}\n({counts[c]})" for c in order], fontsize=7)
    ax.set_xlabel("class (training count), most frequent first")


def _per_class_size(num_classes: int) -> tuple[float, float]:
    """Bars of 0.4 in per class up to TICKS_MAX_CLASSES (≤ 20 in), the fixed WIDE size beyond."""
    return (max(6, 0.4 * num_classes), 3.8) if num_classes <= TICKS_MAX_CLASSES else WIDE


def frequency_bins(order: np.ndarray, bins: int = FREQUENCY_BINS) -> list[np.ndarray]:
    """The classes in frequency order (most frequent first) cut into ≤ `bins` groups of equal size (±1)."""
    return [b for b in np.array_split(np.asarray(order), min(bins, len(order))) if len(b)]


def _bin_label(group: np.ndarray, counts: np.ndarray) -> str:
    return f"n {counts[group[-1]]}–{counts[group[0]]}" if counts[group[0]] != counts[group[-1]] else f"n {counts[group[0]]}"


def write_plots(out_dir: Path, history: list[dict], metrics: dict) -> list[Path]:
    """Every PNG of the table above plus report.md; returns the PNG paths written."""
    out_dir = Path(out_dir)
    counts = np.asarray(metrics["class_counts"])
    order = np.argsort(-counts, kind="stable")  # most frequent first, as in the papers' figures
    figures = {"curves.png": _curves(history), "per_class.png": _per_class(metrics, counts, order),
               "cumulative_fp.png": _cumulative_fp(metrics, counts),
               "confusion.png": _confusion(metrics, counts, order)}
    written: list[Path] = []
    for name, fig in figures.items():
        if fig is not None:
            save_png(fig, out_dir / name)
            written.append(out_dir / name)
    diag = metrics.get("diagnostics")
    if diag:
        written += _diagnostic_plots(out_dir, metrics, diag, counts, order)
    write_markdown(out_dir, metrics, [p.name for p in written])
    return written


def _curves(history: list[dict]):
    """Training loss and val accuracy (all / many / medium / few) per epoch."""
    fig, (ax1, ax2) = subplots(1, 2, figsize=(10, 3.6))
    epochs = [r["epoch"] for r in history]
    ax1.plot(epochs, [r["train_loss"] for r in history], marker=".")
    ax1.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ev = [r for r in history if "val_top1" in r]
    for key, label in (("val_top1", "all"), ("val_many", "many"), ("val_medium", "medium"), ("val_few", "few")):
        pts = [(r["epoch"], r[key]) for r in ev if r.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), marker=".", label=label)
    ax2.set(xlabel="epoch", ylabel="val accuracy (%)", title="validation accuracy")
    ax2.legend(fontsize=8)
    return fig


def _per_class(metrics: dict, counts: np.ndarray, order: np.ndarray):
    """EO Fig. 4: class-wise test accuracy, sorted by frequency, with the GM. Past TICKS_MAX_CLASSES:
    the accuracy of every class as a line over the sorted classes, and the mean per frequency bin."""
    x = np.arange(len(counts))
    per_class = np.array([np.nan if v is None else v for v in metrics["per_class"]], dtype=float)
    title = f"{metrics['method']}: class-wise test accuracy (top-1 {metrics['top1']:.2f}%)"
    if len(counts) <= TICKS_MAX_CLASSES:
        fig, ax = subplots(figsize=_per_class_size(len(counts)))
        ax.bar(x, per_class[order], color="tab:blue", label="class accuracy")
        axes = [ax]
    else:
        fig, (ax, ax2) = subplots(1, 2, figsize=WIDE, gridspec_kw={"width_ratios": [3, 2]})
        ax.plot(x, per_class[order], color="tab:blue", lw=0.5, alpha=0.5, label="class accuracy")
        axes = [ax, ax2]
        groups = frequency_bins(order)
        means = [np.nanmean(per_class[g]) if np.any(~np.isnan(per_class[g])) else np.nan for g in groups]
        edges = np.cumsum([0] + [len(g) for g in groups])
        ax.stairs(means, edges, color="tab:orange", lw=1.5, label=f"mean per bin ({len(groups)} bins)")
        ax2.bar(np.arange(len(groups)), means, color="tab:orange")
        ax2.set_xticks(np.arange(len(groups)), [_bin_label(g, counts) for g in groups], rotation=90, fontsize=6)
        ax2.set(ylabel="mean test accuracy (%)", ylim=(0, 105),
                title=f"per frequency bin ({len(groups[0])} classes each)")
    for a in axes:
        if metrics.get("gm") is not None:
            a.axhline(metrics["gm"], color="tab:red", ls="--", lw=1.2, label=f"GM {metrics['gm']:.2f}%")
        a.axhline(np.nanmean(per_class), color="gray", ls=":", lw=1.2, label=f"mean {np.nanmean(per_class):.2f}%")
    ax.set(ylabel="test accuracy (%)", ylim=(0, 105), title=title)
    _by_frequency_ticks(ax, order, counts)
    ax.legend(fontsize=8, loc="upper right")
    return fig


def _cumulative_fp(metrics: dict, counts: np.ndarray):
    """EO Fig. 5: cumulative false positives in frequency order (None without them)."""
    x = np.arange(len(counts))
    if metrics.get("cumulative_false_positives") is not None:
        cum = np.asarray(metrics["cumulative_false_positives"], dtype=float)
        fig, ax = subplots(figsize=(6, 3.8))
        ax.plot(x + 1, cum, marker="o" if len(x) <= TICKS_MAX_CLASSES else None, label=metrics["method"])
        ax.plot([0, len(cum)], [0, cum[-1]], color="gray", ls="--", lw=1, label="linear (unbiased)")
        ax.set(xlabel="classes, most frequent first", ylabel="cumulative false positives",
               title="cumulative false positives (concave: biased to the head)")
        ax.legend(fontsize=8)
        return fig
    return None


def _confusion(metrics: dict, counts: np.ndarray, order: np.ndarray):
    """Row-normalized confusion matrix in frequency order; past TICKS_MAX_CLASSES, between frequency bins
    (None when the evaluation kept no matrix: more than engine.evaluate.CONFUSION_MAX_CLASSES classes)."""
    if metrics.get("confusion_matrix") is None:
        return None
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)[np.ix_(order, order)]
    k = len(order)
    labels = [str(c) for c in order]
    what = "class"
    if k > TICKS_MAX_CLASSES:  # sum the blocks between frequency bins (positions in the sorted order)
        groups = frequency_bins(np.arange(k))
        starts = [g[0] for g in groups]
        cm = np.add.reduceat(np.add.reduceat(cm, starts, axis=0), starts, axis=1)
        labels = [_bin_label(order[g], counts) for g in groups]
        k, what = len(groups), "frequency bin"
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = subplots(figsize=(min(12, 2 + 0.45 * k), min(11, 1.6 + 0.45 * k)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label=f"fraction of the true {what}")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    if k <= TICKS_MAX_CLASSES:
        ax.set_xticks(range(k), labels, fontsize=7, rotation=90 if what != "class" else 0)
        ax.set_yticks(range(k), labels, fontsize=7)
    ax.set(xlabel=f"predicted {what}", ylabel=f"true {what}",
           title=f"confusion matrix (test, most frequent first{', binned' if what != 'class' else ''})")
    return fig


def _diagnostic_plots(out_dir: Path, metrics: dict, diag: dict, counts: np.ndarray, order: np.ndarray) -> list[Path]:
    written = []
    x = np.arange(len(counts))
    log_prior = np.log(counts / counts.sum())

    # EO Fig. 1: trained offsets / bias against the log prior.
    fig, ax = subplots(figsize=(6, 3.8))
    series = [("−½μ̃_k·w_k (empirical offset)", -np.asarray(diag["empirical_offset"]), "s")]
    if np.any(np.asarray(diag["estimated_offset"])):
        series.append(("−½c_k·w_k (estimated offset)", -np.asarray(diag["estimated_offset"]), "o"))
    if diag.get("bias") is not None:
        series.append(("trained bias b", np.asarray(diag["bias"]), "^"))
    for label, vals, marker in series:
        r = np.corrcoef(log_prior, vals)[0, 1] if np.std(vals) > 0 and np.std(log_prior) > 0 else float("nan")
        ax.scatter(log_prior, vals, marker=marker, s=None if len(counts) <= TICKS_MAX_CLASSES else 4,
                   label=f"{label} (r = {r:.2f})")
    ax.set(xlabel="log prior  log(n_k / N)", ylabel="additive term of logit k",
           title="offsets / bias vs log prior (EO Fig. 1)")
    ax.legend(fontsize=7)
    save_png(fig, out_dir / "prior.png")
    written.append(out_dir / "prior.png")

    # EO Fig. 3: empirical vs estimated offsets per class.
    few = len(counts) <= TICKS_MAX_CLASSES
    fig, ax = subplots(figsize=_per_class_size(len(counts)))
    style = {"lw": 1.0 if few else 0.6}
    ax.plot(x, np.asarray(diag["estimated_offset"])[order], marker="o" if few else None, label="estimated ½c_k·w_k",
            **style)
    ax.plot(x, np.asarray(diag["empirical_offset"])[order], marker="s" if few else None,
            label=f"empirical ½μ̃_k·w_k ({diag.get('mode', 'pass')})", **style)
    if diag.get("bias") is not None:
        ax.plot(x, np.asarray(diag["bias"])[order], marker="^" if few else None, label="trained bias", **style)
    ax.set(ylabel="offset", title="empirical vs estimated offset per class (EO Fig. 3)")
    _by_frequency_ticks(ax, order, counts)
    ax.legend(fontsize=8)
    save_png(fig, out_dir / "offsets.png")
    written.append(out_dir / "offsets.png")

    # WVN Fig. 2/3: relative weight-vector norms vs class frequency.
    norms = np.asarray(diag["weight_norm"])
    fig, ax = subplots(figsize=_per_class_size(len(counts)))
    if few:
        ax.bar(x, (norms / norms.max())[order], color="tab:green")
    else:
        ax.plot(x, (norms / norms.max())[order], color="tab:green", lw=0.8)
    ax.set(ylabel="‖w_k‖ / max ‖w‖", ylim=(0, 1.05), title=f"{metrics['method']}: relative weight-vector norms")
    _by_frequency_ticks(ax, order, counts)
    save_png(fig, out_dir / "weight_norms.png")
    written.append(out_dir / "weight_norms.png")
    return written


def write_markdown(out_dir: Path, metrics: dict, images: list[str]) -> Path:
    """report.md: summary (test and val), per-class table, the plots. Every number is also in metrics.json."""
    counts = metrics["class_counts"]
    order = np.argsort(-np.asarray(counts), kind="stable")
    keys = [("top1", 1), ("many", 1), ("medium", 1), ("few", 1), ("gm", 1), ("precision", 100), ("recall", 100),
            ("f1", 100), ("gmean", 100), ("iba", 100)]
    summary = [[split] + [fmt(r.get(k), s) for k, s in keys]
               for split, r in (("test", metrics), ("val", metrics.get("val") or {}))]
    diag = metrics.get("diagnostics") or {}
    fp = metrics.get("false_positives")
    extra = [(c, k) for c, k in (("‖w‖", "weight_norm"), ("bias", "bias"), ("est. offset", "estimated_offset"),
                                 ("emp. offset", "empirical_offset")) if diag.get(k) is not None]
    counts_arr = np.asarray(counts)
    acc = np.array([np.nan if v is None else v for v in metrics["per_class"]], dtype=float)
    body = []
    if diag.get("source"):
        body += [f"Diagnostics (empirical offset, eval.diagnostics={diag.get('mode')}): class means from the "
                 f"{diag['source']}; {diag.get('images')} images.", ""]
    if len(counts) > TICKS_MAX_CLASSES:
        rows = [[str(i + 1), f"{len(g)}", _bin_label(g, counts_arr)[2:],
                 fmt(float(np.nanmean(acc[g])) if np.any(~np.isnan(acc[g])) else None),
                 str(int(np.asarray(fp)[g].sum())) if fp is not None else "–"] for i, g in enumerate(frequency_bins(order))]
        body += ["## Per frequency bin (most frequent first)", "",
                 markdown_table(["bin", "classes", "train n", "mean test acc %", "false pos."], rows), ""]
    if len(counts) <= TABLE_MAX_CLASSES:
        per_class = [[str(c), str(counts[c]), fmt(metrics["per_class"][c]), str(fp[c]) if fp is not None else "–"]
                     + [f"{diag[k][c]:.4f}" for _, k in extra] for c in order]
        body += ["## Per class (most frequent first)", "",
                 markdown_table(["class", "train n", "test acc %", "false pos."] + [c for c, _ in extra], per_class),
                 ""]
    else:
        body += [f"The per-class numbers of the {len(counts)} classes are in metrics.json (per_class, "
                 "false_positives, diagnostics).", ""]
    lines = [f"# Run report: `{metrics['method']}` (seed {metrics.get('seed')}, {metrics.get('epochs')} epochs)", "",
             "Accuracies and GM in %, precision/recall/F1/G-mean/IBA ×100 (macro, one-vs-rest; see engine/metrics.py).",
             "", markdown_table(["split"] + [k for k, _ in keys], summary), ""] + body + \
            ["## Plots", ""] + [f"![{name}]({name})" for name in images]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
