"""The run's report: PNG plots next to metrics.json, readable at a glance."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from engine.checkpoint import atomic_write_bytes  # noqa: E402


def save_png(fig, path: Path) -> None:
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def write_plots(out_dir: Path, history: list[dict], metrics: dict) -> list[Path]:
    """curves.png (loss, val top-1), per_class.png (test accuracy by class frequency),
    offsets.png (estimated vs empirical offset, bias, weight norms by class frequency)."""
    out_dir = Path(out_dir)
    written = []
    counts = np.asarray(metrics["class_counts"])
    order = np.argsort(-counts, kind="stable")  # most frequent first, as in the papers' figures

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
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
    save_png(fig, out_dir / "curves.png")
    written.append(out_dir / "curves.png")

    per_class = np.array([np.nan if v is None else v for v in metrics["per_class"]], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(counts)), 3.6))
    x = np.arange(len(counts))
    ax.bar(x, per_class[order], color="tab:blue")
    ax.set(xlabel="class (sorted by training count)", ylabel="test accuracy (%)",
           title=f"{metrics['method']}: per-class test accuracy (top-1 {metrics['top1']:.2f}%)", ylim=(0, 100))
    ax2 = ax.twinx()
    ax2.plot(x, counts[order], color="tab:orange", marker="o")
    ax2.set_ylabel("training images", color="tab:orange")
    if len(counts) <= 40:
        ax.set_xticks(x, [str(c) for c in order])
    save_png(fig, out_dir / "per_class.png")
    written.append(out_dir / "per_class.png")

    diag = metrics.get("diagnostics")
    if diag:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
        ax1.plot(x, np.asarray(diag["estimated_offset"])[order], marker="o", label="estimated ½c·w")
        ax1.plot(x, np.asarray(diag["empirical_offset"])[order], marker="s", label="empirical ½μ̃·w")
        if diag.get("bias") is not None:
            ax1.plot(x, np.asarray(diag["bias"])[order], marker="^", label="trained bias")
        ax1.set(xlabel="class (sorted by training count)", ylabel="offset", title="offsets per class")
        ax1.legend(fontsize=8)
        norms = np.asarray(diag["weight_norm"])[order]
        ax2.plot(x, norms / norms.max(), marker="o")
        ax2.set(xlabel="class (sorted by training count)", ylabel="‖w_k‖ / max", title="relative weight norms")
        save_png(fig, out_dir / "offsets.png")
        written.append(out_dir / "offsets.png")
    return written
