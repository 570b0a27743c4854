"""`engine train`: split file → sampler → batch → backbone → head + loss → SGD step (+ the
method's after-step: Wen center update / WVN / in-loop RS) → eval → checkpoint → report.

Single process, or one process per GPU under torchrun (DDP; gloo on CPU). Only rank 0
writes files. Read `train` top to bottom; `train_step` is one optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from engine import report
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.config import Config, to_dict, to_yaml
from engine.data import Data, load_data, make_loaders, train_features_loader
from engine.device import Speed, resolve_device, resolve_speed
from engine.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum_,
    broadcast_error,
    init_distributed,
    shutdown,
)
from engine.errors import CheckpointError, ConfigError, TrainingError
from engine.evaluate import ClassSums, class_sums_pass, evaluate_loader, scalars
from engine.io import atomic_write_text, write_json
from engine.logs import log_to_file
from engine.models import Classifier, build_model

logger = logging.getLogger(__name__)


def build_optimizer(cfg: Config, model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov, **({"fused": True} if fused else {}))


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


def prepare_run_dir(out_dir: Path, resume: bool, is_main: bool) -> bool:
    """Check the run folder can take this run; returns whether it was created now (rank 0 only).

    Rank 0 checks and every rank waits for its verdict (a sync point): were each rank to look
    on its own, a slower rank would find the files rank 0 has started writing and stop.
    """
    error = None
    if is_main:
        if resume and not (out_dir / "last.pt").is_file():
            error = f"--resume: {out_dir / 'last.pt'} does not exist; nothing to resume"
        elif not resume and out_dir.exists() and any(out_dir.iterdir()):
            error = f"run folder {out_dir} already holds files; choose another --out or pass --resume"
    error = broadcast_error(error)
    if error:
        raise TrainingError(error)
    if resume or not is_main:
        return False
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    return created


@dataclass
class Run:
    """Everything one training run holds, passed to the step / eval / checkpoint helpers."""

    cfg: Config
    out_dir: Path
    dist: DistInfo
    device: torch.device
    speed: Speed
    data: Data
    model: Classifier  # the plain model: eval, checkpoints, after-step updates
    step_model: torch.nn.Module  # what the training step calls: model, DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    counts: torch.Tensor  # training class counts on the device
    steps_per_epoch: int
    epoch_class_sums: ClassSums | None = None  # eval.diagnostics=epoch: filled by `collect_class_sums`

    def autocast(self):
        if self.speed.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.speed.amp_dtype)


def train(cfg: Config, out_dir: str | Path, resume: bool = False) -> dict:
    """Train one model; returns the final metrics (also written to out_dir/metrics.json by rank 0)."""
    out_dir = Path(out_dir)
    want_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    dist = init_distributed("cuda" if want_cuda else "cpu")
    try:
        return _train(cfg, out_dir, resume, dist)
    finally:
        shutdown()


def _train(cfg: Config, out_dir: Path, resume: bool, dist: DistInfo) -> dict:
    device = resolve_device(cfg.run.device, dist)
    speed = resolve_speed(cfg, device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # late in training, float32 denormals cost ~6× on x86 CPUs
    else:
        torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
    torch.manual_seed(cfg.seed)
    if cfg.optim.batch_size % (dist.world_size * cfg.optim.grad_accum):
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} must divide into {dist.world_size} ranks × "
                          f"{cfg.optim.grad_accum} micro-batches (optim.grad_accum)")

    # Every split file, image path and label is checked before the run folder exists.
    data = load_data(cfg)
    layout = "channels_last" if speed.channels_last else "NCHW"
    train_loader, val_loader, test_loader = make_loaders(cfg, data, dist, device.type, layout)
    run = build_run(cfg, out_dir, dist, device, speed, data, len(train_loader))

    created = prepare_run_dir(out_dir, resume, dist.is_main)
    try:
        with log_to_file(out_dir / "train.log", dist.rank) if dist.is_main else contextlib.nullcontext():
            logger.info("training %s (%s, %d classes) on %s into %s", cfg.method, cfg.model.arch, data.num_classes,
                        device, out_dir)
            history = train_epochs(run, train_loader, val_loader,
                                   load_checkpoint(out_dir / "last.pt") if resume else None)
            return finish(run, history, test_loader, val_loader)
    except BaseException:
        # A run that fails before its first checkpoint leaves nothing behind: there is nothing to resume.
        if created and not (out_dir / "last.pt").exists():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def build_run(cfg: Config, out_dir: Path, dist: DistInfo, device: torch.device, speed: Speed, data: Data | None,
              steps_per_epoch: int, class_counts=None) -> Run:
    """Model (the one builder), optimizer, schedule and scaler of a run; `class_counts` defaults to the data's."""
    counts = data.class_counts if class_counts is None else class_counts
    model = build_model(cfg, counts).to(
        device, memory_format=torch.channels_last if speed.channels_last else torch.contiguous_format)
    if dist.enabled:
        # DDP copies rank 0's initial weights to every rank; from here on each rank draws its
        # own augmentations (the same seed everywhere would give every rank the same crops).
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)
    optimizer = build_optimizer(cfg, model, speed.fused_sgd)
    step_model: torch.nn.Module = model
    if dist.enabled:
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if speed.compile:
        step_model = torch.compile(step_model)
    return Run(cfg, out_dir, dist, device, speed, data, model, step_model, optimizer,
               build_scheduler(cfg, optimizer, steps_per_epoch),
               torch.amp.GradScaler(device.type, enabled=speed.grad_scaler),
               torch.as_tensor(counts, dtype=torch.float32, device=device), steps_per_epoch)


def finish(run: Run, history: list[dict], test_loader, val_loader) -> dict:
    """Final evaluation: the test split once; val re-used from the last epoch's record when that epoch was
    validated (the loop always validates the last epoch); diagnostics; report (all ranks evaluate a shard)."""
    cfg, data = run.cfg, run.data
    test = evaluate(run, test_loader, "test")
    last = history[-1] if history else {}
    if last.get("epoch") == cfg.epochs and "val_top1" in last:
        val = {k[len("val_"):]: v for k, v in last.items() if k.startswith("val_")}
    else:
        val = scalars(evaluate(run, val_loader, "val"))
    diag = diagnostics(run) if cfg.eval.diagnostics != "off" else None
    metrics = {
        **test,
        "val": val,
        "method": cfg.method,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "class_counts": data.class_counts.tolist(),
        "notes": data.notes,
        "diagnostics": diag,
    }
    if run.dist.is_main:
        write_json(run.out_dir / "metrics.json", metrics)
        report.write_plots(run.out_dir, history, metrics)
        logger.info("test top-1 %.2f (many %s, medium %s, few %s); report: %s", metrics["top1"], metrics["many"],
                    metrics["medium"], metrics["few"], run.out_dir / "report.md")
    return metrics


def train_epochs(run: Run, train_loader, val_loader, state: dict | None) -> list[dict]:
    """The epoch loop; returns the log history. Rank 0 writes config.yaml, metrics.jsonl, last.pt."""
    cfg, out_dir = run.cfg, run.out_dir
    start, position, history, totals = 0, 0, [], (0.0, 0)
    resume_rng = None
    if state is not None:
        start, position, history, totals = restore(run, state)
        train_loader.sampler.set_epoch(start)
        train_loader.sampler.set_position(position * (cfg.optim.batch_size // run.dist.world_size))
        if position:
            # Mid-epoch: the interrupted run had created this epoch's loader iterator (which draws its
            # base seed from the global RNG) before the checkpoint; re-apply the saved RNG state after
            # the new iterator is created so the augmentations continue bit for bit.
            resume_rng = _rank_rng(run, state)
    if run.dist.is_main:
        atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))
        # Rewritten from the checkpoint's history on resume: no line lost or doubled.
        atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    writer = _tensorboard(run)
    clock = (time.perf_counter(), start * run.steps_per_epoch + position)  # (start time, steps done before it)

    for epoch in range(start, cfg.epochs):
        run.model.train()
        if position == 0:
            train_loader.sampler.set_epoch(epoch)
        run.model.head.set_epoch(epoch)  # DRW (ldam_drw) switches its class weights on at loss.drw_epoch
        t0, (loss_sum, seen) = time.perf_counter(), totals
        batches = iter(train_loader)
        if resume_rng is not None:
            _set_rng(run, *resume_rng)
            resume_rng = None
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", initial=position,
                   total=run.steps_per_epoch, disable=not (cfg.run.progress and run.dist.is_main), leave=False)
        for x, y in bar:
            step = epoch * run.steps_per_epoch + position
            loss_value = train_step(run, x, y, epoch, step)
            loss_sum, seen, position = loss_sum + loss_value * len(y), seen + len(y), position + 1
            per_step = (time.perf_counter() - clock[0]) / (step + 1 - clock[1])
            bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{len(y) * run.dist.world_size / per_step:.0f}")
            if cfg.run.checkpoint_every and position % cfg.run.checkpoint_every == 0 and position < run.steps_per_epoch:
                checkpoint(run, epoch, position, history, (loss_sum, seen))

        record = epoch_record(run, epoch, loss_sum, seen, time.perf_counter() - t0, clock)
        if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.epochs:
            record.update({f"val_{k}": v for k, v in scalars(evaluate(run, val_loader)).items()})
        history.append(record)
        position, totals = 0, (0.0, 0)
        checkpoint(run, epoch + 1, 0, history, totals)  # the checkpoint carries the log history
        if run.dist.is_main:
            log_epoch(run, record, writer)
    if writer is not None:
        writer.close()
    return history


def epoch_record(run: Run, epoch: int, loss_sum: float, seen: int, elapsed: float, clock: tuple[float, int]) -> dict:
    """One metrics.jsonl line: mean training loss, lr, throughput and ETA after `epoch` (0-based)."""
    cfg, steps = run.cfg, run.steps_per_epoch
    done = (epoch + 1) * steps
    return {
        "epoch": epoch + 1,
        "step": done,
        "train_loss": loss_sum / max(seen, 1),
        "lr": run.scheduler.get_last_lr()[0],
        "images_per_s": seen * run.dist.world_size / elapsed,
        "eta_s": (cfg.epochs - epoch - 1) * steps * (time.perf_counter() - clock[0]) / max(1, done - clock[1]),
    }


def log_epoch(run: Run, record: dict, writer) -> None:
    """Rank 0: append the record to metrics.jsonl, TensorBoard, train.log (and the console with run.progress)."""
    with open(run.out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                writer.add_scalar(key, value, record["step"])
    val_txt = f"  val top-1 {record['val_top1']:.2f}" if "val_top1" in record else ""
    logger.log(logging.INFO if run.cfg.run.progress else logging.DEBUG,
               "epoch %d/%d  loss %.4f%s  %.0f img/s  ETA %.1f min", record["epoch"], run.cfg.epochs,
               record["train_loss"], val_txt, record["images_per_s"], record["eta_s"] / 60)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int) -> float:
    """One optimizer step over this rank's batch; returns the batch's mean loss (over all ranks).

    With optim.grad_accum = A the batch is split by stride, micro-batch r = batch[r::A]: under
    interleaved rank shards that is exactly what rank r of an A-rank run sees, so 1 process × A
    micro-batches and A ranks × 1 compute the same step (BatchNorm statistics included).
    """
    cfg, A = run.cfg, run.cfg.optim.grad_accum
    x = x.to(run.device, non_blocking=True)
    y = y.to(run.device, non_blocking=True)
    run.optimizer.zero_grad(set_to_none=True)
    features, labels, total = [], [], 0.0
    for r in range(A):
        xb, yb = x[r::A], y[r::A]
        last = r == A - 1
        no_sync = run.step_model.no_sync() if run.dist.enabled and not last and hasattr(run.step_model, "no_sync") \
            else contextlib.nullcontext()
        with no_sync:
            with run.autocast():
                loss, feats = run.step_model(xb, yb)
            # Sync point: the loss (averaged over ranks) is checked before it can touch the weights.
            value = loss.detach().float().clone()
            all_reduce_sum_(value)
            value = value.item() / run.dist.world_size
            if not math.isfinite(value):
                last_ckpt = run.out_dir / "last.pt"
                kept = f"the last complete checkpoint is {last_ckpt}" if last_ckpt.exists() else "no checkpoint was written yet"
                raise TrainingError(f"loss is {value} at epoch {epoch + 1}, step {step} (method {cfg.method}, lr "
                                    f"{run.scheduler.get_last_lr()[0]:.4g}); {kept}")
            run.scaler.scale(loss / A).backward()
        total += value / A
        features.append(feats.detach())
        collect_class_sums(run, epoch, feats, yb)  # diagnostics hook (eval.diagnostics=epoch, last epoch only)
        labels.append(yb)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    gamma = cfg.rescale.gamma if cfg.rescale.in_loop else 0.0
    reduce = all_reduce_sum_ if run.dist.enabled else None
    run.model.head.after_step(torch.cat(features), torch.cat(labels), run.counts, gamma, reduce)
    return total


def checkpoint(run: Run, epoch: int, position: int, history: list[dict], totals: tuple[float, int]) -> None:
    """last.pt (atomic; rank 0): resume restarts at optimizer step `position` of epoch `epoch`.
    Every rank's RNG state is gathered into it, so each rank continues its own augmentations."""
    rank_rngs = all_gather_objects((torch.get_rng_state(),
                                    torch.cuda.get_rng_state_all() if run.device.type == "cuda" else []))
    if not run.dist.is_main:
        return
    save_checkpoint(run.out_dir / "last.pt", {
        "config": to_dict(run.cfg),
        "epoch": epoch,  # 0-based epoch to continue (== epochs when training is complete)
        "position": position,  # optimizer steps already done in that epoch
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": [r[0] for r in rank_rngs],  # per rank
        "cuda_rng": [r[1] for r in rank_rngs],
        "class_counts": run.data.class_counts.tolist(),
        "history": history,
        "epoch_loss_sum": totals[0],
        "epoch_seen": totals[1],
    })


def restore(run: Run, state: dict) -> tuple[int, int, list[dict], tuple[float, int]]:
    if state["config"] != to_dict(run.cfg):
        raise CheckpointError(f"--resume: the config differs from the one {run.out_dir / 'last.pt'} was trained with")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    _set_rng(run, *_rank_rng(run, state))
    return state["epoch"], state["position"], state["history"], (state["epoch_loss_sum"], state["epoch_seen"])


def _rank_rng(run: Run, state: dict) -> tuple[torch.Tensor, list]:
    if len(state["rng"]) != run.dist.world_size:
        raise CheckpointError(f"--resume: the checkpoint was written by {len(state['rng'])} ranks, this run has "
                              f"{run.dist.world_size}; resume with the same number of processes")
    return state["rng"][run.dist.rank], state["cuda_rng"][run.dist.rank]


def _set_rng(run: Run, rng: torch.Tensor, cuda_rng: list) -> None:
    torch.set_rng_state(rng)
    if cuda_rng and run.device.type == "cuda":
        torch.cuda.set_rng_state_all(cuda_rng)


def _tensorboard(run: Run):
    if not (run.cfg.run.tensorboard and run.dist.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("run.tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(run.out_dir / "tb"))


def _progress(run: Run, what: str) -> str | None:
    """A progress bar's description on rank 0 with run.progress, else None (no bar)."""
    return what if run.cfg.run.progress and run.dist.is_main else None


def evaluate(run: Run, loader, split: str = "val") -> dict:
    """The split's report: every rank tallies its shard on the device, the counts are summed over ranks."""
    return evaluate_loader(run.model, loader, run.device, run.data.class_counts, run.cfg.eval.many_threshold,
                           run.cfg.eval.few_threshold, run.autocast, _progress(run, f"eval {split}"))


# ---------------------------------------------------------------- diagnostics hook (called from train_step)
def collect_class_sums(run: Run, epoch: int, features: torch.Tensor, labels: torch.Tensor) -> None:
    """Diagnostics hook: with eval.diagnostics=epoch, add one (micro-)batch's training features to the
    running per-class sums of the last epoch (on the device, no sync). A no-op otherwise."""
    if run.cfg.eval.diagnostics != "epoch" or epoch != run.cfg.epochs - 1:
        return
    if run.epoch_class_sums is None:
        run.epoch_class_sums = ClassSums(len(run.counts), features.shape[1], run.device)
    run.epoch_class_sums.add(features, labels)


DIAGNOSTIC_SOURCES = {
    "epoch": "last training epoch: features of augmented training images, taken during the steps (the model "
             "moved during the epoch)",
    "pass": "a pass over the training split after training: un-augmented images (eval transforms), final model",
}


@torch.no_grad()
def diagnostics(run: Run) -> dict:
    """Per-class offsets and norms (EO Fig. 1/3, WVN Fig. 2): estimated õ_k = ½c_k·w_k,
    empirical ½μ̃_k·w_k from the training features' class means, trained bias, ‖w_k‖.

    μ̃_k comes from the last epoch's features (eval.diagnostics=epoch, no extra pass) or from a
    full pass over the training split (pass). An epoch run that summed nothing (resumed after its
    last epoch) falls back to the pass."""
    import kernels

    mode, sums = run.cfg.eval.diagnostics, run.epoch_class_sums
    if mode == "epoch" and sums is None:
        logger.info("diagnostics: no training step of the last epoch ran in this process; passing over the "
                    "training split instead")
        mode = "pass"
    if mode == "pass":
        sums = class_sums_pass(run.model, train_features_loader(run.cfg, run.data, run.dist), run.device,
                               run.data.num_classes, run.autocast, _progress(run, "diagnostics: train pass"))
    means = sums.means().cpu()
    head = run.model.head
    w = head.weight.detach().float().cpu()
    return {
        "mode": mode,
        "source": DIAGNOSTIC_SOURCES[mode],
        "images": int(sums.counts.sum().item()),
        "estimated_offset": kernels.estimated_offset(w, head.centers.float().cpu()).tolist(),
        "empirical_offset": kernels.empirical_offset(w, means).tolist(),
        "bias": head.bias.detach().float().cpu().tolist() if head.bias is not None else None,
        "weight_norm": w.norm(dim=1).tolist(),
    }
