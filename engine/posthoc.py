"""Post-hoc work on a trained checkpoint: evaluation and weight re-scaling (RS).

RS (adjusting-decision-boundary paper, Eq. 7): w_i ← (n_1/n_i)^γ · w_i, applied
once after training ("Baseline+RS" on a plain model, "WVN+RS" on a WVN model).
A sweep picks γ on the validation split and reports the test split at that γ.
Backbone features are computed once per split and re-used for every γ.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from engine.config import config_from_dict
from engine.data import load_data, make_loaders, train_features_loader
from engine.distributed import DistInfo
from engine.evaluate import collect_features, format_table, head_logits, reporter, scalars
from engine.losses import head_loss_kwargs
from engine.models import build_model
from engine.train import resolve_device


def load_run(checkpoint: str | Path):
    """Checkpoint → (state, config, data, model on its device); the data are re-read and re-checked."""
    state = load_checkpoint(checkpoint)
    try:
        cfg = config_from_dict(state["config"])
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint}: its saved config is not valid here: {exc}") from None
    data = load_data(cfg)
    if data.class_counts.tolist() != state["class_counts"]:
        raise CheckpointError(
            f"{checkpoint}: training class counts {state['class_counts']} differ from the data found now "
            f"{data.class_counts.tolist()}; the split files changed since training"
        )
    device = resolve_device(cfg.run.device)
    model = build_model(cfg.model.arch, data.num_classes, cfg.method, **head_loss_kwargs(cfg, data.class_counts))
    model = model.to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return state, cfg, data, model, device


def split_features(cfg, data, model, device, splits=("val", "test")) -> dict:
    """Backbone features of the named splits ("val", "test", and "train" without augmentation),
    collected once so that every post-hoc variant of the head re-uses them."""
    loaders = {}
    if "val" in splits or "test" in splits:
        _, loaders["val"], loaders["test"] = make_loaders(cfg, data, DistInfo(), device.type)
    if "train" in splits:
        loaders["train"] = train_features_loader(cfg, data, DistInfo())
    return {s: collect_features(model, loaders[s], device) for s in splits}


def _report(cfg, data, model, feats, weight=None) -> dict:
    return reporter(cfg, data.class_counts)(head_logits(model, feats, weight), feats.labels)


def evaluate_checkpoint(checkpoint: str | Path, split: str = "test") -> dict:
    state, cfg, data, model, device = load_run(checkpoint)
    feats = split_features(cfg, data, model, device, (split,))[split]
    result = {**_report(cfg, data, model, feats), "split": split, "checkpoint": str(checkpoint), "epoch": state["epoch"]}
    out = Path(checkpoint).parent / f"eval_{split}.json"
    atomic_write_text(out, json.dumps(result, indent=2))
    print(format_table({f"{split} ({cfg.method})": result}))
    print(f"written: {out}")
    return result


def rescale_checkpoint(checkpoint: str | Path, gamma: float, save: str | Path | None = None,
                       rs_count: str | None = None) -> dict:
    """RS at one γ; `rs_count` = observed | profile (default the run's rescale.counts), see calibration.rs_counts."""
    from engine.calibration import rs_counts, rs_weight

    state, cfg, data, model, device = load_run(checkpoint)
    feats = split_features(cfg, data, model, device)
    rs_count = rs_count or cfg.rescale.counts
    weight = rs_weight(model.head.weight.detach().float().cpu(), rs_counts(cfg, data.class_counts, rs_count), gamma)
    result = {
        "gamma": gamma,
        "counts": rs_count,
        "val": _report(cfg, data, model, feats["val"], weight),
        "test": _report(cfg, data, model, feats["test"], weight),
    }
    out = Path(checkpoint).parent / f"rescale_gamma{gamma:g}.json"
    atomic_write_text(out, json.dumps(result, indent=2))
    print(format_table({f"val  γ={gamma:g}": result["val"], f"test γ={gamma:g}": result["test"]}))
    if save:
        with torch.no_grad():
            model.head.weight.copy_(weight.to(model.head.weight))
        save_checkpoint(Path(save), {**state, "model": model.state_dict(), "rescaled_gamma": gamma,
                                     "rescaled_counts": rs_count})
        print(f"re-scaled checkpoint: {save}")
    print(f"written: {out}")
    return result


def sweep_checkpoint(checkpoint: str | Path, gammas: list[float], rs_count: str | None = None) -> dict:
    """RS γ sweep (WVN Fig. 10): val and test accuracy per γ; γ chosen by val top-1 (ties: smaller γ).

    The sweep itself is `engine.calibration.sweep` with the `rs` formula (also `engine calibrate --method rs`)."""
    from engine.calibration import rs_counts, sweep, sweep_logits_fn

    _, cfg, data, model, device = load_run(checkpoint)
    feats = split_features(cfg, data, model, device)
    rs_count = rs_count or cfg.rescale.counts
    logits_fn = sweep_logits_fn("rs", model, rs_counts(cfg, data.class_counts, rs_count))
    full, best = sweep(gammas, logits_fn, feats, reporter(cfg, data.class_counts), "gamma")
    rows = [{"gamma": r["gamma"], "val": scalars(r["val"]), "test": scalars(r["test"])} for r in full]
    result = {"method": cfg.method, "counts": rs_count, "chosen_gamma": best["gamma"], "chosen_by": "val top1",
              "rows": rows, "test_at_chosen": best["test"]}
    run_dir = Path(checkpoint).parent
    atomic_write_text(run_dir / "rescale_sweep.json", json.dumps(result, indent=2))
    _plot_sweep(run_dir / "rescale_sweep.png", rows, best["gamma"], cfg.method)
    print(format_table({f"γ={r['gamma']:g} val": r["val"] for r in rows}))
    print(f"chosen γ = {best['gamma']:g} (best val top-1); test at that γ:")
    print(format_table({f"test γ={best['gamma']:g}": best["test"]}))
    print(f"written: {run_dir / 'rescale_sweep.json'}, {run_dir / 'rescale_sweep.png'}")
    return result


def _plot_sweep(path: Path, rows: list[dict], chosen: float, method: str) -> None:
    from engine.report import plt, save_png

    g = np.array([r["gamma"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(g, [100 - r["val"]["top1"] for r in rows], marker="o", label="val error")
    ax.plot(g, [100 - r["test"]["top1"] for r in rows], marker="s", label="test error")
    ax.axvline(chosen, color="gray", ls="--", lw=1, label=f"chosen γ={chosen:g}")
    ax.set(xlabel="γ", ylabel="top-1 error (%)", title=f"re-scaling sweep ({method})")
    ax.legend(fontsize=8)
    save_png(fig, path)
