"""The run folder: its name, its lock, its life (started → finished, preempted or failed) and the files
a training run writes into it while it trains.

One writer per folder: rank 0 takes the folder's lock (engine/runlock.py) before anything else and holds
it for the whole run. `RunFolder.running` is the one place where a run's life in its folder begins and
ends, and rank 0 records it in `status.json` (engine/run_status.py: `running`, `preempted`, `failed`,
`finished`), which job scripts read with `engine status` since launchers such as torchrun turn a rank's
exit code 75 into 1. A run that fails before training starts (bad data found while screening) leaves
nothing behind in a folder it created; once training has started the folder is kept, with its train.log,
its status and the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import ConfigError, EngineError, TrainingError
from common.io import atomic_write_text
from engine.config import Config, to_yaml
from engine.distributed import DistInfo, all_gather_objects
from engine.preemption import Preempted
from engine.run_status import STATUS_NAME, one_line, write_status
from engine.runlock import LOCK_NAME, RunFolderBusy, RunLock
from pipelines.check import write_bad_list
from pipelines.screen_cache import CACHE_NAME as SCREEN_CACHE

if TYPE_CHECKING:
    from engine.trainer import Trainer

logger = logging.getLogger(__name__)


def default_run_dir(cfg: Config) -> str:
    """runs/<method>-<time>-s<seed>-<4 random hex>: two runs started in the same second get different folders."""
    return str(Path("runs") / f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}-s{cfg.seed}-{secrets.token_hex(2)}")


def kept_checkpoint(out_dir: Path) -> str:
    """The end of a failure message: which checkpoint the failed run leaves to resume from."""
    last = out_dir / "last.pt"
    return f"the last complete checkpoint is {last}" if last.exists() else "no checkpoint was written yet"


class RunFolder:
    """A locked run folder (the lock on rank 0 only) and whether this run resumes the one in it."""

    def __init__(self, path: Path, created: bool, resuming: bool, lock: RunLock | None, dist: DistInfo) -> None:
        self.path = path
        self.created = created  # made by this run: removed again when it fails before training starts
        self.resuming = resuming
        self.lock = lock
        self.dist = dist
        self.started = False  # training has started: from here on the folder is kept, with its status

    @classmethod
    def open(cls, path: Path, resume: bool | str, dist: DistInfo) -> RunFolder:
        """Lock the run folder and decide whether this run resumes.

        resume: False (a new run: the folder must be new or empty), True (`--resume`: last.pt must
        exist) or "auto" (`--resume auto`: resume when last.pt exists, else start fresh, also in a
        folder left by a run killed before its first checkpoint). Rank 0 decides and holds the lock;
        every rank waits for its verdict (a sync point: a slower rank must not see rank 0's new files).
        """
        error, created, resuming, lock = None, False, False, None
        if dist.is_main:
            existed = path.exists()
            try:
                lock = RunLock(path).acquire()
            except RunFolderBusy as exc:
                error = str(exc)
            except OSError as exc:
                error = f"cannot create the run folder {path}: {exc.strerror or exc}"
            if lock is not None:
                created = not existed
                has_last = (path / "last.pt").is_file()
                ours = (path / "config.yaml").is_file()  # a run folder of ours (maybe killed before a checkpoint)
                held = [p for p in path.iterdir() if p.name not in (LOCK_NAME, SCREEN_CACHE)]  # a cache holds no run
                resuming = resume is True or (resume == "auto" and has_last)
                if resume is True and not has_last:
                    error = (f"--resume: {path / 'last.pt'} does not exist; nothing to resume "
                             "(--resume auto starts fresh when there is no checkpoint)")
                elif not resuming and held and not (resume == "auto" and ours):
                    error = f"run folder {path} already holds files; choose another --out or pass --resume"
        error, resuming = all_gather_objects((error, resuming))[0]  # rank 0's verdict
        folder = cls(path, created, resuming, lock, dist)
        if error:
            folder.release()
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise TrainingError(error)
        return folder

    @contextlib.contextmanager
    def running(self) -> Iterator[RunFolder]:
        """The run's life in this folder, the one place where it starts (`start`, just before the first
        step), finishes (`finish`), and fails or is preempted (an exception; `engine.preemption.Preempted`
        after its checkpoint). The lock is released in every case."""
        try:
            yield self
        except Preempted as exc:
            self.status("preempted", **exc.where)
            all_gather_objects(None)  # sync point: no rank exits before rank 0 wrote last.pt and the status
            raise
        except BaseException as exc:
            if self.started or (self.path / STATUS_NAME).exists():
                with contextlib.suppress(EngineError):  # a full disk: the error to report is the one raised
                    self.status("failed", reason=one_line(exc))
            elif self.created:  # failed before training started: nothing to keep
                self.release()
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        finally:
            self.release()

    def start(self) -> None:
        """Training starts now: the folder is kept from here on, whatever happens."""
        self.started = True
        self.status("running", resumed=self.resuming)

    def finish(self, top1: float) -> None:
        self.status("finished", top1=top1)

    def status(self, state: str, **detail) -> None:
        """Rank 0 records how the run stands in status.json (engine/run_status.py)."""
        if self.dist.is_main:
            write_status(self.path, state, **detail)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def start_log(out_dir: Path, cfg: Config, history: list[dict], dist: DistInfo) -> None:
    """Rank 0: config.yaml, and metrics.jsonl rewritten from the checkpoint's history on resume (no line
    lost or doubled)."""
    if dist.is_main:
        atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))
        atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


class EpochLog:
    """Rank 0's per-epoch outputs: a metrics.jsonl line and, with run.tensorboard, TensorBoard scalars."""

    def __init__(self, out_dir: Path, cfg: Config, dist: DistInfo) -> None:
        self.out_dir = out_dir
        self.writer = None
        if cfg.run.tensorboard and dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("run.tensorboard=true needs the tensorboard package (pip install tensorboard)") \
                    from None
            self.writer = SummaryWriter(str(out_dir / "tb"))

    def write(self, record: dict) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def record_bad_images(trainer: Trainer, mine: list) -> int:
    """Gather every rank's newly met bad training images (small lists; one all_gather_object under DDP),
    log the new ones, and (rank 0) rewrite bad_images.txt: those dropped before training, then those
    replaced during it. Returns how many distinct images were replaced during training so far."""
    seen_before = trainer.state.bad_images
    known = {p for p, _ in seen_before}
    new = [[p, r] for rank_list in all_gather_objects([list(b) for b in mine]) for p, r in rank_list
           if p not in known]
    for path, reason in {p: r for p, r in new}.items():  # first reason per path, in the order met
        logger.warning("bad training image replaced by another of its class: %s (%s)", path, reason)
        seen_before.append([path, reason])
        known.add(path)
    data, out_dir = trainer.data, trainer.out_dir
    listed = list({p: (p, r) for p, r in [*data.bad_images, *seen_before]}.values()) if data else []
    if trainer.dist.is_main and listed and (new or not (out_dir / "bad_images.txt").exists()):
        write_bad_list(out_dir / "bad_images.txt", listed, trainer.cfg.data.root or None)
    return len(seen_before)
