"""`engine train`: split file → sampler → batch → backbone → head + loss → SGD step (+ the
method's after-step: Wen center update / WVN / in-loop RS) → eval → checkpoint → report.

Single process, or one process per GPU under torchrun (DDP; gloo on CPU). Only rank 0
writes files, and holds the run folder's lock (engine/run_folder.py) for the whole run. Read
`train` top to bottom; `train_step` is one optimizer step, `train_epochs` the loop. Every other
job is one call away: the run's parts (engine/trainer.py), what a checkpoint holds and the
checkpoint policy (engine/checkpoint_policy.py), the loss meter (engine/meter.py), the run folder
(engine/run_folder.py), evaluation (engine/eval_schedule.py), preemption (engine/preemption.py).

Host syncs: the step itself never reads a value back to the host. The loss stays on the
device (`LossMeter`) and is read once every `run.log_every` steps, at every checkpoint and at
the end of an epoch; that read is also where a non-finite loss, a diverging loss
(`run.max_loss`) and, under DDP, a preemption request are noticed (one small all-reduce).
A checkpoint is written only after such a read and a check that every parameter and buffer
is finite, so last.pt is always the last good state.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path

import torch

from common.errors import ConfigError
from common.io import check_folder, write_json
from engine import eval_schedule, report
from engine.checkpoint import load_checkpoint
from engine.checkpoint_policy import checkpoint, epoch_batches, keep_epoch_checkpoints, restore
from engine.config import Config, effective_lr
from engine.data import load_data, make_loaders
from engine.device import apply_speed, resolve_device, resolve_speed
from engine.diagnostics import collect_class_sums
from engine.distributed import DistInfo, all_gather_objects, global_class_sums, init_distributed, shutdown
from engine.logs import log_to_file
from engine.meter import LossMeter, epoch_record
from engine.preemption import StopRequest, preempted, stop_on_signals
from engine.run_folder import EpochLog, RunFolder, default_run_dir, record_bad_images, start_log
from engine.trainer import Trainer, build_trainer
from pipelines.progress import progress_bar

logger = logging.getLogger(__name__)


def train(cfg: Config, out_dir: str | Path | None = None, resume: bool | str = False) -> dict:
    """Train one model; returns the final metrics (also written to out_dir/metrics.json by rank 0) and
    "run_dir" (out_dir, or the default folder `default_run_dir` chose when it is None).

    resume: False, True (continue last.pt) or "auto" (continue it when it exists). A SIGTERM or
    SIGUSR1 stops the run at the next step boundary with a checkpoint and raises `Preempted`."""
    if out_dir is not None:
        check_folder(out_dir, expected="a run folder (new, or one to --resume)")
    want_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    dist = init_distributed("cuda" if want_cuda else "cpu")
    try:
        # Rank 0 names a default folder; every rank takes its name (clocks and random draws differ between ranks).
        out = Path(all_gather_objects(str(out_dir) if out_dir is not None else default_run_dir(cfg))[0])
        with stop_on_signals() as stop:
            metrics = _train(cfg, out, resume, dist, stop)
        return {**metrics, "run_dir": str(out)}
    finally:
        shutdown()


def _train(cfg: Config, out_dir: Path, resume: bool | str, dist: DistInfo, stop: StopRequest) -> dict:
    device = resolve_device(cfg.run.device, dist)
    speed = resolve_speed(cfg, device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    apply_speed(speed, cfg, device)
    torch.manual_seed(cfg.seed)
    if cfg.optim.batch_size % (dist.world_size * cfg.optim.grad_accum):
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} must divide into {dist.world_size} ranks × "
                          f"{cfg.optim.grad_accum} micro-batches (optim.grad_accum)")

    # The run folder is locked first (a second writer fails at once); every split file, image path and
    # label is checked before training starts (rank 0 remembers the image verdicts in the folder).
    folder = RunFolder.open(out_dir, resume, dist)
    with folder.running():
        data = load_data(cfg, out_dir, dist)
        layout = "channels_last" if speed.channels_last else "NCHW"
        train_loader, val_loader, test_loader = make_loaders(cfg, data, dist, device.type, layout)
        trainer = build_trainer(cfg, out_dir, dist, device, speed, data, len(train_loader))
        with log_to_file(out_dir / "train.log", dist.rank) if dist.is_main else contextlib.nullcontext():
            logger.info("training %s (%s, %d classes) on %s into %s", cfg.method, cfg.model.arch, data.num_classes,
                        device, out_dir)
            if cfg.optim.lr_base_batch:
                logger.info("lr %.6g = optim.lr %g × global batch %d / optim.lr_base_batch %d",
                            effective_lr(cfg.optim), cfg.optim.lr, cfg.optim.batch_size, cfg.optim.lr_base_batch)
            saved = load_checkpoint(out_dir / "last.pt") if folder.resuming else None
            folder.start()
            history = train_epochs(trainer, train_loader, val_loader, saved, stop)
            metrics = finish(trainer, history, test_loader, val_loader)
            folder.finish(metrics["top1"])
            return metrics


def finish(trainer: Trainer, history: list[dict], test_loader, val_loader) -> dict:
    """The end of the run: final evaluation (all ranks evaluate a shard), then (rank 0) metrics.json,
    the report and its plots."""
    metrics = eval_schedule.final_metrics(trainer, history, test_loader, val_loader)
    if trainer.dist.is_main:
        out_dir = trainer.out_dir
        write_json(out_dir / "metrics.json", metrics)
        report.write_plots(out_dir, history, metrics)
        groups = ", ".join(f"{g} {metrics[g]:.2f}" if metrics.get(g) is not None else f"{g} –"
                           for g in ("many", "medium", "few"))
        logger.info("test top-1 %.2f (%s); report: %s", metrics["top1"], groups, out_dir / "report.md")
    return metrics


def train_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step over this rank's batch; returns this rank's batch mean loss as a float64
    device scalar (no host sync: the caller's LossMeter reads it every run.log_every steps).

    With optim.grad_accum = A the batch is split by stride, micro-batch r = batch[r::A]: under
    interleaved rank shards that is exactly what rank r of an A-rank run sees, so 1 process × A
    micro-batches and A ranks × 1 compute the same step (BatchNorm statistics included).
    """
    cfg, A, state = trainer.cfg, trainer.cfg.optim.grad_accum, trainer.state
    x = x.to(trainer.device, non_blocking=True)
    y = y.to(trainer.device, non_blocking=True)
    state.optimizer.zero_grad(set_to_none=True)
    features, labels, total = [], [], 0.0
    for r in range(A):
        xb, yb = x[r::A], y[r::A]
        last = r == A - 1
        no_sync = trainer.step_model.no_sync() \
            if trainer.dist.enabled and not last and hasattr(trainer.step_model, "no_sync") \
            else contextlib.nullcontext()
        with no_sync:
            with trainer.autocast():
                loss, feats = trainer.step_model(xb, yb)
            state.scaler.scale(loss / A).backward()
        total = total + loss.detach().double() / A  # float64 on the device: exact as the host sum it replaces
        features.append(feats.detach())
        collect_class_sums(trainer, trainer.model.head.epoch, feats, yb)  # eval.diagnostics=epoch: last epoch only
        labels.append(yb)
    trainer.model.head.before_step(trainer.counts, cfg.rescale.gamma if cfg.rescale.in_loop else 0.0)  # WVN placement
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    gamma = cfg.rescale.gamma if cfg.rescale.in_loop else 0.0
    # Under DDP the Wen center update sees the global batch: the cheaper of a K×d all-reduce and a B×d all-gather.
    exchange = functools.partial(global_class_sums, rows_per_rank=len(y)) if trainer.dist.enabled else None
    trainer.model.head.after_step(torch.cat(features), torch.cat(labels), trainer.counts, gamma, exchange=exchange)
    return total


def train_epochs(trainer: Trainer, train_loader, val_loader, saved: dict | None = None,
                 stop: StopRequest | None = None) -> list[dict]:
    """The epoch loop from the trainer's state (or last.pt's `saved` dict); returns the log history.
    Rank 0 writes config.yaml, metrics.jsonl, last.pt.

    Stops early, with a checkpoint, at `run.max_steps` (then the run finishes as usual) or on a
    preemption signal (then `Preempted` is raised). A single process checks the signal flag after
    every step (a host flag: free); under DDP the ranks agree on it at each loss read."""
    cfg, state, steps, dist = trainer.cfg, trainer.state, trainer.steps_per_epoch, trainer.dist
    stop = stop if stop is not None else StopRequest()
    resume_rng = restore(trainer, saved, train_loader) if saved is not None else None
    start_log(trainer.out_dir, cfg, state.history, dist)
    record_bad_images(trainer, [])
    log = EpochLog(trainer.out_dir, cfg, dist)
    clock = (time.perf_counter(), state.epoch * steps + state.position)  # (start time, steps done before it)
    meter = LossMeter(trainer, state.loss_sum, state.seen)
    max_steps, log_every, last_pt = cfg.run.max_steps, cfg.run.log_every, trainer.out_dir / "last.pt"

    while state.epoch < cfg.epochs and not (max_steps and state.epoch * steps + state.position >= max_steps):
        epoch, t0 = state.epoch, time.perf_counter()
        trainer.model.train()
        if state.position == 0:
            train_loader.sampler.set_epoch(epoch)
        trainer.model.head.set_epoch(epoch)  # DRW (ldam_drw) switches its class weights on at loss.drw_epoch
        desc = trainer.progress(f"epoch {epoch + 1}/{cfg.epochs}")
        bar = progress_bar(epoch_batches(trainer, train_loader, resume_rng), desc=desc, initial=state.position,
                           total=steps, disable=desc is None, leave=False)
        resume_rng = None
        for x, y in bar:
            step = epoch * steps + state.position
            meter.add(train_step(trainer, x, y), len(y), step)
            state.position += 1
            if state.position == steps:
                continue  # the last batch: the end of the epoch reads, evaluates and checkpoints below
            # Stop flag: a single process checks its host flag after every step; DDP ranks vote in the loss read.
            if state.position % log_every == 0 or (stop and not dist.enabled):
                _, loss, stopping = meter.read(epoch, bool(stop))  # sync point: the loss read
                _show_loss(bar, loss, epoch, step, len(y) * dist.world_size, clock)
                if stopping:
                    checkpoint(trainer, meter, train_loader)  # sync point: the checkpoint (RNG, loader state)
                    raise preempted(stop, epoch, state.position, steps, last_pt)
            if max_steps and step + 1 >= max_steps:
                checkpoint(trainer, meter, train_loader)
                logger.info("run.max_steps=%d reached (epoch %d, step %d of %d); last.pt written", max_steps,
                            epoch + 1, state.position, steps)
                log.close()
                return state.history
            if cfg.run.checkpoint_every and state.position % cfg.run.checkpoint_every == 0:
                checkpoint(trainer, meter, train_loader)

        epoch_loss, _, stopping = meter.read(epoch, bool(stop))  # sync point: the epoch's loss read
        record = epoch_record(trainer, epoch, epoch_loss, meter.seen, time.perf_counter() - t0, clock)
        record.update(eval_schedule.validate_epoch(trainer, epoch, val_loader))
        record["bad_images"] = record_bad_images(trainer, getattr(train_loader, "bad_images", []))
        state.history.append(record)
        state.epoch, state.position = epoch + 1, 0
        meter.new_epoch()
        checkpoint(trainer, meter, train_loader)  # sync point: the checkpoint carries the log history
        if dist.is_main:
            keep_epoch_checkpoints(trainer.out_dir, cfg, state.history)
            log.write(record)
            _log_epoch(record, cfg)
        if stopping or (stop and not dist.enabled):
            raise preempted(stop, state.epoch, 0, steps, last_pt)
        if max_steps and state.epoch * steps >= max_steps:
            logger.info("run.max_steps=%d reached at the end of epoch %d", max_steps, state.epoch)
            break
    log.close()
    return state.history


def _show_loss(bar, loss: float, epoch: int, step: int, images: int, clock: tuple[float, int]) -> None:
    """The progress bar's loss and images/s after a loss read (and a debug line in train.log)."""
    per_step = (time.perf_counter() - clock[0]) / (step + 1 - clock[1])
    bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images / per_step:.0f}")
    logger.debug("epoch %d step %d  loss %.4f", epoch + 1, step + 1, loss)


def _log_epoch(record: dict, cfg: Config) -> None:
    """The epoch's line in train.log (and on the console with run.progress)."""
    val_txt = f"  val top-1 {record['val_top1']:.2f}" if "val_top1" in record else ""
    logger.log(logging.INFO if cfg.run.progress else logging.DEBUG,
               "epoch %d/%d  loss %.4f%s  %.0f img/s  ETA %.1f min", record["epoch"], cfg.epochs,
               record["train_loss"], val_txt, record["images_per_s"], record["eta_s"] / 60)
