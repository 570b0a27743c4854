"""`engine train`: split file → sampler → batch → backbone → head + loss → SGD step (+ the
method's after-step: Wen center update / WVN / in-loop RS) → eval → checkpoint → report.

Single process, or one process per GPU under torchrun (DDP; gloo on CPU). Only rank 0
writes files, and holds the run folder's lock (engine/runlock.py) for the whole run. Read
`train` top to bottom; `train_step` is one optimizer step, `train_epochs` the loop.

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
import json
import logging
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from common.errors import CheckpointError, ConfigError, EngineError, TrainingError
from common.io import atomic_write_text, check_folder, write_json
from engine import report
from engine.checkpoint import all_finite, check_fits, load_checkpoint, nonfinite_tensors, save_checkpoint
from engine.config import (
    Config,
    config_diff,
    config_from_dict,
    effective_lr,
    format_diff,
    resume_changes,
    to_dict,
    to_yaml,
)
from engine.data import Data, load_data, make_loaders, train_features_loader
from engine.device import Speed, apply_speed, resolve_device, resolve_speed
from engine.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum_,
    global_class_sums,
    init_distributed,
    shutdown,
)
from engine.evaluate import ClassSums, class_sums_pass, evaluate_loader, scalars
from engine.logs import log_to_file
from engine.models import Classifier, build_model, convert_sync_bn
from engine.preemption import Preempted, StopRequest, stop_on_signals
from engine.run_status import STATUS_NAME, one_line, write_status
from engine.runlock import LOCK_NAME, RunFolderBusy, RunLock
from pipelines.check import write_bad_list
from pipelines.progress import progress_bar
from pipelines.screen_cache import CACHE_NAME as SCREEN_CACHE

logger = logging.getLogger(__name__)


def build_optimizer(cfg: Config, model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.SGD(model.parameters(), lr=effective_lr(o), momentum=o.momentum,
                           weight_decay=o.weight_decay, nesterov=o.nesterov, **({"fused": True} if fused else {}))


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


# --------------------------------------------------------------------------- the run folder


def open_run_dir(out_dir: Path, resume: bool | str, dist: DistInfo) -> tuple[bool, bool, RunLock | None]:
    """Lock the run folder and decide whether this run resumes; returns (created now, resuming, lock).

    resume: False (a new run: the folder must be new or empty), True (`--resume`: last.pt must
    exist) or "auto" (`--resume auto`: resume when last.pt exists, else start fresh, also in a
    folder left by a run killed before its first checkpoint). Rank 0 decides and holds the lock;
    every rank waits for its verdict (a sync point: a slower rank must not see rank 0's new files).
    """
    error, created, resuming, lock = None, False, False, None
    if dist.is_main:
        existed = out_dir.exists()
        try:
            lock = RunLock(out_dir).acquire()
        except RunFolderBusy as exc:
            error = str(exc)
        except OSError as exc:
            error = f"cannot create the run folder {out_dir}: {exc.strerror or exc}"
        if lock is not None:
            created = not existed
            has_last = (out_dir / "last.pt").is_file()
            ours = (out_dir / "config.yaml").is_file()  # a run folder of ours (maybe killed before a checkpoint)
            held = [p for p in out_dir.iterdir() if p.name not in (LOCK_NAME, SCREEN_CACHE)]  # a cache holds no run
            resuming = resume is True or (resume == "auto" and has_last)
            if resume is True and not has_last:
                error = (f"--resume: {out_dir / 'last.pt'} does not exist; nothing to resume "
                         "(--resume auto starts fresh when there is no checkpoint)")
            elif not resuming and held and not (resume == "auto" and ours):
                error = f"run folder {out_dir} already holds files; choose another --out or pass --resume"
    error, resuming = all_gather_objects((error, resuming))[0]  # rank 0's verdict
    if error:
        if lock is not None:
            lock.release()
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
        raise TrainingError(error)
    return created, resuming, lock


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
    bad_images: list = field(default_factory=list)  # [path, reason] met by the training loader (all ranks)

    def autocast(self):
        if self.speed.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.speed.amp_dtype)


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


def default_run_dir(cfg: Config) -> str:
    """runs/<method>-<time>-s<seed>-<4 random hex>: two runs started in the same second get different folders."""
    return str(Path("runs") / f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}-s{cfg.seed}-{secrets.token_hex(2)}")


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
    # label is checked before anything is written into it.
    created, resuming, lock = open_run_dir(out_dir, resume, dist)
    started = False  # training has started: from here on the run folder is kept, with its status
    try:
        data = load_data(cfg, out_dir, dist)
        layout = "channels_last" if speed.channels_last else "NCHW"
        train_loader, val_loader, test_loader = make_loaders(cfg, data, dist, device.type, layout)
        run = build_run(cfg, out_dir, dist, device, speed, data, len(train_loader))
        with log_to_file(out_dir / "train.log", dist.rank) if dist.is_main else contextlib.nullcontext():
            logger.info("training %s (%s, %d classes) on %s into %s", cfg.method, cfg.model.arch, data.num_classes,
                        device, out_dir)
            if cfg.optim.lr_base_batch:
                logger.info("lr %.6g = optim.lr %g × global batch %d / optim.lr_base_batch %d",
                            effective_lr(cfg.optim), cfg.optim.lr, cfg.optim.batch_size, cfg.optim.lr_base_batch)
            state = load_checkpoint(out_dir / "last.pt") if resuming else None
            started = True
            run_status(dist, out_dir, "running", resumed=resuming)
            history = train_epochs(run, train_loader, val_loader, state, stop)
            metrics = finish(run, history, test_loader, val_loader)
            run_status(dist, out_dir, "finished", top1=metrics["top1"])
            return metrics
    except Preempted as exc:
        run_status(dist, out_dir, "preempted", **getattr(exc, "where", {}))
        all_gather_objects(None)  # no rank exits before rank 0 wrote last.pt and the status: see run_status
        raise
    except BaseException as exc:
        # A run that fails before training starts leaves nothing behind; one that started keeps its folder.
        if started or (out_dir / STATUS_NAME).exists():
            with contextlib.suppress(EngineError):  # a full disk: the error to report is the one raised
                run_status(dist, out_dir, "failed", reason=one_line(exc))
        elif created:
            lock.release()
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def run_status(dist: DistInfo, out_dir: Path, state: str, **detail) -> None:
    """Rank 0 records how the run stands in `<run>/status.json` (engine/run_status.py): `engine status` and
    job scripts read it, since launchers turn a rank's exit code 75 into 1. After a preemption every rank
    waits for that write: torchrun (and srun --kill-on-bad-exit) stop the other ranks as soon as one exits."""
    if dist.is_main:
        write_status(out_dir, state, **detail)


def build_run(cfg: Config, out_dir: Path, dist: DistInfo, device: torch.device, speed: Speed, data: Data | None,
              steps_per_epoch: int, class_counts=None) -> Run:
    """Model (the one builder), optimizer, schedule and scaler of a run; `class_counts` defaults to the data's."""
    counts = data.class_counts if class_counts is None else class_counts
    model = build_model(cfg, counts).to(
        device, memory_format=torch.channels_last if speed.channels_last else torch.contiguous_format)
    if dist.enabled:
        model = convert_sync_bn(model, cfg.model.sync_bn)
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
        groups = ", ".join(f"{g} {metrics[g]:.2f}" if metrics.get(g) is not None else f"{g} –"
                           for g in ("many", "medium", "few"))
        logger.info("test top-1 %.2f (%s); report: %s", metrics["top1"], groups, run.out_dir / "report.md")
    return metrics


class LossMeter:
    """The training loss, kept on the device so the step never waits for it.

    `add` folds a step's loss into float64 sums (an epoch sum and a window since the last read)
    and records the first step whose loss is not finite, all on the device. `read` brings them to
    the host: one all-reduce of five numbers under DDP (which also agrees on a stop request),
    then one `.tolist()`. The loop reads every `run.log_every` steps, before every checkpoint and
    at the end of every epoch; each read checks for a non-finite and a diverging loss.
    """

    def __init__(self, run: Run, loss_sum: float = 0.0, seen: int = 0) -> None:
        self.run = run
        f64 = dict(dtype=torch.float64, device=run.device)
        self.sum = torch.tensor(loss_sum, **f64)  # Σ step loss × rows over this epoch, this rank
        self.seen = seen  # rows this epoch, this rank (known on the host: no sync)
        self.window = torch.zeros((), **f64)  # Σ step loss × rows since the last read
        self.window_rows = 0
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=run.device)  # step of the first non-finite loss
        self.bad_value = torch.zeros((), **f64)
        self.dirty = False  # steps added since the last read
        self.read_sum = loss_sum  # the epoch sum (mean over ranks) at the last read
        self.max_loss = run.cfg.run.max_loss or 1e4 * math.log(max(len(run.counts), 2))

    def add(self, loss: torch.Tensor, rows: int, step: int) -> None:
        part = loss * rows
        self.sum += part
        self.window += part
        self.seen, self.window_rows, self.dirty = self.seen + rows, self.window_rows + rows, True
        first = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(first, step, self.first_bad)
        self.bad_value = torch.where(first, loss, self.bad_value)

    def new_epoch(self) -> None:
        self.sum.zero_()
        self.seen, self.read_sum = 0, 0.0

    def read(self, epoch: int, stop: bool = False) -> tuple[float, float, bool]:
        """(epoch mean loss, window mean loss, stop agreed) over all ranks; raises TrainingError on a
        non-finite or diverging loss (the last checkpoint, written before, is kept)."""
        run, world = self.run, self.run.dist.world_size
        stop_flag = torch.tensor(float(stop), dtype=torch.float64, device=run.device)
        packed = torch.stack([self.sum, self.window, (self.first_bad >= 0).double(), stop_flag])
        all_reduce_sum_(packed)
        # Sync point (one per read): the only place the loop waits for the device.
        epoch_sum, window_sum, bad_ranks, stops = packed.tolist()
        self.read_sum = epoch_sum / world  # exact for one process
        epoch_mean = self.read_sum / max(self.seen, 1)
        window_mean = window_sum / world / max(self.window_rows, 1)
        self.window.zero_()
        self.window_rows, self.dirty = 0, False
        if bad_ranks:
            firsts = [(s, v) for s, v in all_gather_objects(torch.stack(
                [self.first_bad.double(), self.bad_value]).tolist()) if s >= 0]
            step, value = min(firsts)
            raise TrainingError(f"loss is {value} at epoch {int(step) // run.steps_per_epoch + 1}, step {int(step)} "
                                f"(method {run.cfg.method}, lr {run.scheduler.get_last_lr()[0]:.4g}); "
                                f"{_kept_checkpoint(run)}")
        if window_mean > self.max_loss:
            raise TrainingError(f"the loss is diverging: {window_mean:.4g} over the last steps of epoch {epoch + 1} "
                                f"exceeds run.max_loss={self.max_loss:.4g} (method {run.cfg.method}, lr "
                                f"{run.scheduler.get_last_lr()[0]:.4g}); {_kept_checkpoint(run)}; lower optim.lr "
                                "or raise run.max_loss")
        return epoch_mean, window_mean, stops > 0


def _kept_checkpoint(run: Run) -> str:
    last = run.out_dir / "last.pt"
    return f"the last complete checkpoint is {last}" if last.exists() else "no checkpoint was written yet"


def train_epochs(run: Run, train_loader, val_loader, state: dict | None, stop: StopRequest | None = None) -> list[dict]:
    """The epoch loop; returns the log history. Rank 0 writes config.yaml, metrics.jsonl, last.pt.

    Stops early, with a checkpoint, at `run.max_steps` (then the run finishes as usual) or on a
    preemption signal (then `Preempted` is raised). A single process checks the signal flag after
    every step (a host flag: free); under DDP the ranks agree on it at each loss read."""
    cfg, out_dir, steps = run.cfg, run.out_dir, run.steps_per_epoch
    stop = stop if stop is not None else StopRequest()
    start, position, history, totals = 0, 0, [], (0.0, 0)
    resume_rng = None
    if state is not None:
        start, position, history, totals, resume_rng = restore(run, state, train_loader)
    if run.dist.is_main:
        atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))
        # Rewritten from the checkpoint's history on resume: no line lost or doubled.
        atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    _write_bad_images(run, [])
    writer = _tensorboard(run)
    clock = (time.perf_counter(), start * steps + position)  # (start time, steps done before it)
    meter = LossMeter(run, *totals)
    max_steps, log_every = cfg.run.max_steps, cfg.run.log_every

    for epoch in range(start, cfg.epochs):
        if max_steps and epoch * steps + position >= max_steps:
            break
        run.model.train()
        if position == 0:
            train_loader.sampler.set_epoch(epoch)
        run.model.head.set_epoch(epoch)  # DRW (ldam_drw) switches its class weights on at loss.drw_epoch
        t0 = time.perf_counter()
        batches = iter(train_loader)
        absorbing = None
        if resume_rng is not None:
            _set_rng(run, *resume_rng)
            absorbing = _absorb_iterator_seed(train_loader)
            resume_rng = None
        bar = progress_bar(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", initial=position,
                           total=steps, disable=not (cfg.run.progress and run.dist.is_main), leave=False)
        for x, y in bar:
            if absorbing is not None:  # the epoch's iterator exists now: later ones draw as before
                absorbing.generator, absorbing = None, None
            step = epoch * steps + position
            meter.add(train_step(run, x, y), len(y), step)
            position += 1
            if position == steps:
                continue  # the last batch: the end of the epoch reads, evaluates and checkpoints below
            if position % log_every == 0 or (stop and not run.dist.enabled):
                _, loss, stopping = meter.read(epoch, bool(stop))
                per_step = (time.perf_counter() - clock[0]) / (step + 1 - clock[1])
                bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{len(y) * run.dist.world_size / per_step:.0f}")
                logger.debug("epoch %d step %d  loss %.4f", epoch + 1, step + 1, loss)
                if stopping:
                    checkpoint(run, epoch, position, history, meter, train_loader)
                    raise _preempted(run, stop, epoch, position)
            if max_steps and step + 1 >= max_steps:
                checkpoint(run, epoch, position, history, meter, train_loader)
                logger.info("run.max_steps=%d reached (epoch %d, step %d of %d); last.pt written", max_steps,
                            epoch + 1, position, steps)
                return _finish_loop(writer, history)
            if cfg.run.checkpoint_every and position % cfg.run.checkpoint_every == 0:
                checkpoint(run, epoch, position, history, meter, train_loader)

        epoch_loss, _, stopping = meter.read(epoch, bool(stop))
        record = epoch_record(run, epoch, epoch_loss, meter.seen, time.perf_counter() - t0, clock)
        if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.epochs:
            record.update({f"val_{k}": v for k, v in scalars(evaluate(run, val_loader)).items()})
        record["bad_images"] = _write_bad_images(run, getattr(train_loader, "bad_images", []))
        history.append(record)
        position = 0
        meter.new_epoch()
        checkpoint(run, epoch + 1, 0, history, meter, train_loader)  # the checkpoint carries the log history
        if run.dist.is_main:
            _keep_epoch_checkpoints(run, history)
            log_epoch(run, record, writer)
        if stopping or (stop and not run.dist.enabled):
            raise _preempted(run, stop, epoch + 1, 0)
        if max_steps and (epoch + 1) * steps >= max_steps:
            logger.info("run.max_steps=%d reached at the end of epoch %d", max_steps, epoch + 1)
            break
    return _finish_loop(writer, history)


def _absorb_iterator_seed(loader):
    """Resume mid-epoch: a DataLoader draws its iterator's base seed from the global RNG when the epoch's
    iterator starts, lazily, at the first batch (ImageLoader iterates it inside a generator). The
    interrupted run made that draw before its checkpoint's RNG state was taken, so the resumed epoch
    must not draw it from the restored global RNG again: a throw-away generator takes the draw (with
    num_workers=0 the base seed is unused; with workers augmentation is position-seeded). Returns the
    DataLoader whose `generator` the caller resets to None once the first batch is out."""
    dl = getattr(loader, "loader", None)
    if isinstance(dl, torch.utils.data.DataLoader) and dl.generator is None:
        dl.generator = torch.Generator()
        return dl
    return None


def _finish_loop(writer, history: list[dict]) -> list[dict]:
    if writer is not None:
        writer.close()
    return history


def _preempted(run: Run, stop: StopRequest, epoch: int, position: int) -> Preempted:
    where = f"epoch {epoch + 1}, step {position} of {run.steps_per_epoch}" if position else f"the end of epoch {epoch}"
    message = (f"stopped by {stop.name or 'a signal on another rank'} at {where}; checkpoint "
               f"{run.out_dir / 'last.pt'} written; continue with --resume auto (exit code {Preempted.exit_code})")
    logger.warning("%s", message)
    preempted = Preempted(message)
    preempted.where = {"epoch": epoch + 1 if position else epoch, "step": position or run.steps_per_epoch,
                       "steps": run.steps_per_epoch}  # the status' "step N of M of epoch E"
    return preempted


def epoch_record(run: Run, epoch: int, loss_mean: float, seen: int, elapsed: float, clock: tuple[float, int]) -> dict:
    """One metrics.jsonl line: mean training loss, lr, throughput and ETA after `epoch` (0-based)."""
    cfg, steps = run.cfg, run.steps_per_epoch
    done = (epoch + 1) * steps
    return {
        "epoch": epoch + 1,
        "step": done,
        "train_loss": loss_mean,
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


def _write_bad_images(run: Run, mine: list) -> int:
    """Gather every rank's newly met bad training images (small lists; one all_gather_object under DDP),
    log the new ones, and (rank 0) rewrite bad_images.txt: those dropped before training, then those
    replaced during it. Returns how many distinct images were replaced during training so far."""
    known = {p for p, _ in run.bad_images}
    new = [[p, r] for rank_list in all_gather_objects([list(b) for b in mine]) for p, r in rank_list
           if p not in known]
    for path, reason in {p: r for p, r in new}.items():  # first reason per path, in the order met
        logger.warning("bad training image replaced by another of its class: %s (%s)", path, reason)
        run.bad_images.append([path, reason])
        known.add(path)
    listed = list({p: (p, r) for p, r in [*run.data.bad_images, *run.bad_images]}.values()) if run.data else []
    if run.dist.is_main and listed and (new or not (run.out_dir / "bad_images.txt").exists()):
        write_bad_list(run.out_dir / "bad_images.txt", listed, run.cfg.data.root or None)
    return len(run.bad_images)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step over this rank's batch; returns this rank's batch mean loss as a float64
    device scalar (no host sync: the caller's LossMeter reads it every run.log_every steps).

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
            run.scaler.scale(loss / A).backward()
        total = total + loss.detach().double() / A  # float64 on the device: exact as the host sum it replaces
        features.append(feats.detach())
        collect_class_sums(run, run.model.head.epoch, feats, yb)  # eval.diagnostics=epoch: last epoch only
        labels.append(yb)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    gamma = cfg.rescale.gamma if cfg.rescale.in_loop else 0.0
    # Under DDP the Wen center update sees the global batch: the cheaper of a K×d all-reduce and a B×d all-gather.
    exchange = functools.partial(global_class_sums, rows_per_rank=len(y)) if run.dist.enabled else None
    run.model.head.after_step(torch.cat(features), torch.cat(labels), run.counts, gamma, exchange=exchange)
    return total


def checkpoint(run: Run, epoch: int, position: int, history: list[dict], meter: LossMeter, train_loader=None) -> None:
    """last.pt (atomic; rank 0): resume restarts at optimizer step `position` of epoch `epoch`.

    Written only when the loss read so far is finite (the meter's read raises otherwise) and every
    parameter and buffer (BN running statistics included) is finite: the last good checkpoint is
    never replaced by a broken one. Every rank's RNG and loader state is gathered into it, so each
    rank continues its own augmentations."""
    if meter.dirty:
        meter.read(epoch)  # raises on a non-finite loss since the last read
    state = run.model.state_dict()
    broken = None
    if run.dist.is_main and not all_finite(state.values()):
        broken = (f"non-finite values in {', '.join(nonfinite_tensors(state)[:5])} at epoch {epoch + 1}, step "
                  f"{position}; refusing to overwrite the last good checkpoint ({_kept_checkpoint(run)})")
    loader_state = None
    if train_loader is not None and hasattr(train_loader, "state_dict"):
        with contextlib.suppress(RuntimeError):  # a DALI loader before its first batch has no state yet
            loader_state = train_loader.state_dict()
    gathered = all_gather_objects((torch.get_rng_state(),
                                   torch.cuda.get_rng_state_all() if run.device.type == "cuda" else [],
                                   loader_state, broken))
    broken = gathered[0][3]
    if broken:
        raise TrainingError(broken)
    if not run.dist.is_main:
        return
    save_checkpoint(run.out_dir / "last.pt", {
        "config": to_dict(run.cfg),
        "epoch": epoch,  # 0-based epoch to continue (== epochs when training is complete)
        "position": position,  # optimizer steps already done in that epoch
        "model": state,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": [g[0] for g in gathered],  # per rank
        "cuda_rng": [g[1] for g in gathered],
        "loader": [g[2] for g in gathered],  # per rank: train_loader.state_dict() (DALI: its pipeline checkpoint)
        "class_counts": run.data.class_counts.tolist(),
        "history": history,
        "bad_images": run.bad_images,
        "epoch_loss_sum": meter.read_sum,  # Σ step loss × rows this epoch (mean over ranks)
        "epoch_seen": meter.seen,
    })


def _keep_epoch_checkpoints(run: Run, history: list[dict]) -> None:
    """run.keep_last: epoch-XXX.pt for the last N epochs; run.save_best: best.pt by val top-1. Both are hard
    links to the last.pt just written (atomic, no copy; last.pt's next replacement leaves them intact)."""
    r, last = run.cfg.run, run.out_dir / "last.pt"
    epoch = history[-1]["epoch"]
    if r.keep_last:
        _link(last, run.out_dir / f"epoch-{epoch:03d}.pt")
        for old in sorted(run.out_dir.glob("epoch-*.pt"))[:-r.keep_last]:
            old.unlink(missing_ok=True)
    if r.save_best and "val_top1" in history[-1]:
        earlier = [h["val_top1"] for h in history[:-1] if "val_top1" in h]
        if not earlier or history[-1]["val_top1"] > max(earlier) or not (run.out_dir / "best.pt").exists():
            _link(last, run.out_dir / "best.pt")
            logger.info("best.pt: epoch %d, val top-1 %.2f", epoch, history[-1]["val_top1"])


def _link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def restore(run: Run, state: dict, train_loader) -> tuple[int, int, list[dict], tuple[float, int], tuple | None]:
    """Load last.pt into the run; returns (epoch, position, history, epoch totals, RNG to re-apply after
    the epoch's loader iterator exists, or None)."""
    path = run.out_dir / "last.pt"
    try:
        saved = to_dict(config_from_dict(state["config"]))  # keys added since it was written take their defaults
    except EngineError:
        saved = state["config"]
    accepted, refused = resume_changes(saved, run.cfg)
    if refused:
        diff = config_diff(saved, to_dict(run.cfg))
        diffs = format_diff({k: diff[k] for k in refused})
        raise CheckpointError(f"--resume: the config differs from the one {path} was trained with in keys a resume "
                              f"may not change ({diffs}); resume with the original settings (--config "
                              f"{run.out_dir / 'config.yaml'}) or start a new run")
    if accepted:
        logger.warning("resuming with changed settings: %s", ", ".join(accepted))
    check_fits(run.model, state["model"], path, "--resume")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.bad_images = [list(b) for b in state.get("bad_images", [])]
    epoch, position = state["epoch"], state["position"]
    saved_world, world = len(state["rng"]), run.dist.world_size
    per_rank = run.cfg.optim.batch_size // world
    loader_state = {"epoch": epoch, "position": position * per_rank}  # the same global sample position
    resume_rng = None
    if saved_world == world:
        rng = (state["rng"][run.dist.rank], state["cuda_rng"][run.dist.rank])
        _set_rng(run, *rng)
        if position:
            # Mid-epoch: the interrupted run had created this epoch's loader iterator (which draws its
            # base seed from the global RNG) before the checkpoint; re-apply the saved RNG state after
            # the new iterator is created so the augmentations continue bit for bit.
            resume_rng = rng
        saved_loader = (state.get("loader") or [None] * world)[run.dist.rank]
        loader_state = {**(saved_loader or {}), **loader_state}
    else:
        logger.warning("resuming a checkpoint of %d ranks on %d: training continues at the same global sample "
                       "(epoch %d, step %d) but not bit for bit (each rank's augmentation and RNG streams differ)",
                       saved_world, world, epoch + 1, position)
    if set(loader_state) - {"epoch", "position"}:
        train_loader.load_state_dict(loader_state)  # e.g. DALI: its random operators' state too
    else:
        train_loader.sampler.set_epoch(loader_state["epoch"])
        train_loader.sampler.set_position(loader_state["position"])
    return epoch, position, state["history"], (state["epoch_loss_sum"], state["epoch_seen"]), resume_rng


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
