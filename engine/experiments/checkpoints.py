"""`engine eval | calibrate | rescale` on a trained checkpoint: load, compute (engine/posthoc.py), write, print.

`engine rescale` is `engine calibrate --method rs`: `--sweep` (γ chosen on val) and `--gamma` (one γ)
both write calibrate_rs.json and calibrate_rs.png next to the checkpoint (or in `--out DIR`); `--gamma G
--save PATH` also writes the re-scaled checkpoint. The result is computed and printed before anything is
written: a read-only checkpoint folder still shows it, then fails with one StorageError line naming the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common.io import write_json
from engine.checkpoint import save_checkpoint
from engine.data import make_loaders
from engine.distributed import DistInfo
from engine.evaluate import evaluate_loader, format_table
from engine.posthoc import calibrate, rs_counts, rs_weight
from engine.render import save_png, subplots
from engine.runs import LoadedRun, load_run


def evaluate_checkpoint(checkpoint: str | Path, split: str = "test",
                        overrides: Sequence[str] = ()) -> tuple[dict, list[str]]:
    """`engine eval`, the computing half: the checkpoint's report on one split; returns (result, lines to print).
    Nothing is written here (the command prints first, then `write_evaluation`).

    `overrides`: dotted key=value on top of the checkpoint's config (engine.runs.load_run says which)."""
    loaded = load_run(checkpoint, overrides)
    loaders = dict(zip(("val", "test"), make_loaders(loaded.cfg, loaded.data, DistInfo(), loaded.device.type)[1:]))
    cfg = loaded.cfg
    report = evaluate_loader(loaded.model, loaders[split], loaded.device, loaded.data.class_counts,
                             cfg.eval.many_threshold, cfg.eval.few_threshold,
                             desc=f"eval {split}" if cfg.run.progress else None)
    result = {**report, "split": split, "checkpoint": str(checkpoint), "epoch": loaded.state["epoch"],
              "overrides": list(overrides), "run_dir": str(loaded.run_dir)}
    return result, [format_table({f"{split} ({loaded.cfg.method})": result})]


def write_evaluation(result: dict, out_dir: Path | None = None) -> list[str]:
    """eval_<split>.json in `out_dir` (default: the checkpoint's folder); returns the line naming it."""
    out = Path(out_dir if out_dir is not None else result["run_dir"]) / f"eval_{result['split']}.json"
    write_json(out, result)
    return [f"written: {out}"]


def calibrate_checkpoint(checkpoint: str | Path, method: str, values: list[float] | None = None, epochs: int = 10,
                         lr: float = 0.1, batch_size: int = 128, seed: int = 0,
                         rs_count: str | None = None) -> tuple[LoadedRun, dict, list[str]]:
    """`engine calibrate` (and `engine rescale`), the computing half: (loaded run, result, lines to print).

    Nothing is written here: the command prints the lines first, then `write_calibration` writes the files,
    so a folder that cannot be written never costs the user the result."""
    loaded = load_run(checkpoint)
    result = calibrate(loaded, method, values, epochs, lr, batch_size, seed, rs_count=rs_count)
    result["checkpoint"] = str(checkpoint)
    name, chosen = result["parameter"], result["chosen"]
    lines = [format_table({"val  before": result["before"]["val"], "test before": result["before"]["test"],
                           f"val  {name}={chosen:g}": result["val"], f"test {name}={chosen:g}": result["test"]}),
             f"{method}: chosen {name} = {chosen:g} (best val top-1)"]
    return loaded, result, lines


def write_calibration(loaded: LoadedRun, result: dict, out_dir: Path | None = None,
                      save: Path | None = None) -> list[str]:
    """calibrate_<method>.json and .png in `out_dir` (default: the checkpoint's folder); returns the lines naming them.

    `save` (RS with one γ): also write the checkpoint with the re-scaled classifier there (it records
    γ and the counts convention, and a later RS on it is refused)."""
    out_dir = loaded.run_dir if out_dir is None else Path(out_dir)
    method, lines = result["method"], []
    out_json, out_png = out_dir / f"calibrate_{method}.json", out_dir / f"calibrate_{method}.png"
    write_json(out_json, result)
    plot_calibration(out_png, result)
    if save:
        head = loaded.model.head
        with torch.no_grad():
            counts = rs_counts(loaded.cfg, loaded.data.class_counts, result["counts"])
            head.weight.copy_(rs_weight(head.weight.detach().float().cpu(), counts, result["chosen"]).to(head.weight))
        save_checkpoint(Path(save), {**loaded.state, "model": loaded.model.state_dict(),
                                     "rescaled_gamma": result["chosen"], "rescaled_counts": result["counts"]})
        lines.append(f"re-scaled checkpoint: {save}")
    return [*lines, f"written: {out_json}, {out_png}"]


def plot_calibration(path: Path, result: dict) -> None:
    """Val/test top-1 and test many/medium/few along the swept parameter (or the epochs)."""
    name, rows = result["parameter"], result["rows"]
    x = np.array([r[name] for r in rows], dtype=float)
    fig, (ax1, ax2) = subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(x, [r["val"]["top1"] for r in rows], marker="o", label="val top-1")
    ax1.plot(x, [r["test"]["top1"] for r in rows], marker="s", label="test top-1")
    ax1.axhline(result["before"]["test"]["top1"], color="gray", ls=":", lw=1, label="test, uncalibrated")
    ax1.axvline(result["chosen"], color="gray", ls="--", lw=1, label=f"chosen {name}={result['chosen']:g}")
    ax1.set(xlabel=name, ylabel="accuracy (%)", title=f"{result['method']} on {result['model_method']}")
    ax1.legend(fontsize=8)
    for group in ("many", "medium", "few"):
        pts = [(xi, r["test"][group]) for xi, r in zip(x, rows) if r["test"].get(group) is not None]
        if pts:
            ax2.plot(*zip(*pts), marker=".", label=group)
    ax2.axvline(result["chosen"], color="gray", ls="--", lw=1)
    ax2.set(xlabel=name, ylabel="test accuracy (%)", title="test accuracy by shot group")
    ax2.legend(fontsize=8)
    save_png(fig, path)
