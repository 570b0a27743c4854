"""`engine train`: split file → sampler → batch → backbone → head + loss → SGD step (+ method's
after-step) → eval → checkpoint → report. One function, read top to bottom.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine import report
from engine.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from engine.config import Config, to_dict, to_yaml
from engine.data import load_data, make_loaders, train_features_loader
from engine.evaluate import accuracy_report, collect_features, format_table, head_logits, scalars
from engine.losses import head_loss_kwargs
from engine.models import build_model


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a run folder that is in the way)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("run.device=cuda but no CUDA device is available; use run.device=cpu")
    return torch.device(name)


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.SGD(
        model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
    )


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-step schedule: linear warmup, then cosine to 0 or step decay at epoch milestones."""
    o = cfg.optim
    warmup = o.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        epoch = step / steps_per_epoch
        return o.lr_decay ** sum(epoch >= m for m in o.milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_run_dir(out_dir: Path, resume: bool) -> bool:
    """Check the run folder can take this run; returns whether it was created now."""
    if resume:
        if not (out_dir / "last.pt").is_file():
            raise TrainingError(f"--resume: {out_dir / 'last.pt'} does not exist; nothing to resume")
        return False
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TrainingError(f"run folder {out_dir} already holds files; choose another --out or pass --resume")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    return created


def train(cfg: Config, out_dir: str | Path, resume: bool = False) -> dict:
    """Train one model; returns the final metrics (also written to out_dir/metrics.json)."""
    out_dir = Path(out_dir)
    device = resolve_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if device.type == "cpu":
        # Late in training, activations hit float32 denormals, which cost ~6× on x86 CPUs.
        torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)

    # Every split file, image path and label is checked before the run folder exists.
    data = load_data(cfg)
    counts = torch.as_tensor(data.class_counts, dtype=torch.float32, device=device)
    train_loader, val_loader, test_loader = make_loaders(cfg, data, pin_memory=device.type == "cuda")

    model = build_model(
        cfg.model.arch,
        data.num_classes,
        cfg.method,
        pretrained=cfg.model.pretrained,
        lambda_center=cfg.loss.lambda_center,
        lambda_uniform=cfg.loss.lambda_uniform,
        center_alpha=cfg.loss.center_alpha,
        label_smoothing=cfg.loss.label_smoothing,
        **head_loss_kwargs(cfg, data.class_counts),  # class counts + baseline-loss settings
    ).to(device)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader))

    created = prepare_run_dir(out_dir, resume)
    try:
        history = _train_epochs(cfg, out_dir, resume, model, optimizer, scheduler, data, train_loader, val_loader,
                                device, counts)
    except BaseException:
        # A run that fails before its first checkpoint leaves nothing behind: there is nothing to resume.
        if created and not (out_dir / "last.pt").exists():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise

    # Final evaluation on the held-out test split, diagnostics, report.
    test = _evaluate(cfg, model, test_loader, data.class_counts, device)
    val = _evaluate(cfg, model, val_loader, data.class_counts, device)
    metrics = {
        **test,
        "val": scalars(val),
        "method": cfg.method,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "class_counts": data.class_counts.tolist(),
        "diagnostics": diagnostics(cfg, model, data, device) if cfg.eval.diagnostics else None,
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    report.write_plots(out_dir, history, metrics)
    print(format_table({f"test ({cfg.method})": test}))
    return metrics


def _train_epochs(cfg, out_dir, resume, model, optimizer, scheduler, data, train_loader, val_loader, device, counts):
    """The epoch loop; returns the log history. Writes config.yaml, metrics.jsonl and last.pt."""
    gamma = cfg.rescale.gamma if cfg.rescale.in_loop else 0.0
    start_epoch, history = 0, []
    if resume:
        state = load_checkpoint(out_dir / "last.pt")
        if state["config"] != to_dict(cfg):
            raise CheckpointError(f"--resume: the config differs from the one {out_dir / 'last.pt'} was trained with")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_epoch, history = state["epoch"] + 1, state["history"]
    atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))
    log_path = out_dir / "metrics.jsonl"  # rewritten from the checkpoint's history: no line lost or doubled
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in history))

    step = start_epoch * len(train_loader)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        train_loader.sampler.set_epoch(epoch)
        model.head.set_epoch(epoch)  # DRW (ldam_drw) switches its class weights on at loss.drw_epoch
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.run.progress, leave=False)
        for x, y in bar:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            features = model.forward_features(x)
            loss = model.head.loss(features, y)
            loss_value = loss.item()  # sync point: the loss is checked before it can touch the weights
            if not math.isfinite(loss_value):
                last = out_dir / "last.pt"
                kept = f"the last complete checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
                raise TrainingError(
                    f"loss is {loss_value} at epoch {epoch + 1}, step {step} (method {cfg.method}, lr "
                    f"{scheduler.get_last_lr()[0]:.4g}); {kept}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            model.head.after_step(features.detach(), y, counts, gamma)  # Wen update / WVN / in-loop RS
            loss_sum += loss_value * len(y)
            seen += len(y)
            step += 1
            bar.set_postfix(loss=f"{loss_value:.3f}")

        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": loss_sum / max(seen, 1),
            "lr": scheduler.get_last_lr()[0],
            "images_per_s": seen / (time.perf_counter() - t0),
        }
        if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.epochs:
            val = _evaluate(cfg, model, val_loader, data.class_counts, device)
            record.update({f"val_{k}": v for k, v in scalars(val).items()})
        # The checkpoint carries the log history, so a resume restores both together.
        history.append(record)
        save_checkpoint(
            out_dir / "last.pt",
            {
                "config": to_dict(cfg),
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "class_counts": data.class_counts.tolist(),
                "history": history,
            },
        )
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if cfg.run.progress:
            val_txt = f"  val top-1 {record['val_top1']:.2f}" if "val_top1" in record else ""
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}{val_txt}")

    return history


def _evaluate(cfg: Config, model, loader, class_counts: np.ndarray, device) -> dict:
    feats = collect_features(model, loader, device)
    return accuracy_report(
        head_logits(model, feats), feats.labels, class_counts, cfg.eval.many_threshold, cfg.eval.few_threshold
    )


@torch.no_grad()
def diagnostics(cfg: Config, model, data, device) -> dict:
    """Per-class offsets and norms (EO Fig. 1/3, WVN Fig. 2): estimated õ_k = ½c_k·w_k,
    empirical ½μ̃_k·w_k from the training features' class means, trained bias, ‖w_k‖."""
    import kernels

    feats = collect_features(model, train_features_loader(cfg, data), device)
    k = data.num_classes
    sums, n = kernels.class_feature_sums(feats.features, feats.labels, k)
    means = sums / n.clamp_min(1)[:, None]
    head = model.head
    w = head.weight.detach().float().cpu()
    return {
        "estimated_offset": kernels.estimated_offset(w, head.centers.float().cpu()).tolist(),
        "empirical_offset": kernels.empirical_offset(w, means).tolist(),
        "bias": head.bias.detach().float().cpu().tolist() if head.bias is not None else None,
        "weight_norm": w.norm(dim=1).tolist(),
    }
