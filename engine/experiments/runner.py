"""One runner for `engine sweep` and `engine study`: train every run not finished yet.

A run is (Config, run folder). A finished run (metrics.json present, trained with the same config up
to NEUTRAL_KEYS) is re-used; one finished with another config stops the command; an unfinished
one is resumed from its last.pt when that was written with the same config, else started over.
Runs go in this process or in `jobs` spawned worker processes (one torch thread each).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Hashable

import yaml

from engine import train as training
from engine.config import Config, config_from_dict, to_dict, yaml_load
from engine.errors import CheckpointError, ConfigError
from engine.io import write_json

logger = logging.getLogger(__name__)

# Config keys that do not change a run's numbers: a finished run is re-used across them.
NEUTRAL_KEYS = (("run", "progress"), ("run", "threads"), ("run", "tensorboard"), ("run", "checkpoint_every"))


def _comparable(cfg_dict: dict) -> dict:
    d = json.loads(json.dumps(cfg_dict))
    for section, key in NEUTRAL_KEYS:
        d.get(section, {}).pop(key, None)
    return d


def saved_config(run_dir: Path) -> dict | None:
    try:
        return yaml_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None


def is_finished(run_dir: Path, cfg: Config) -> bool:
    """metrics.json present and trained with this config (up to NEUTRAL_KEYS); a different config stops."""
    if not (run_dir / "metrics.json").is_file():
        return False
    saved = saved_config(run_dir)
    if saved is None or _comparable(saved) != _comparable(to_dict(cfg)):
        raise ConfigError(f"{run_dir} holds a finished run trained with a different config; choose another --out "
                          "or delete that folder")
    return True


def train_one(cfg_dict: dict, run_dir: str) -> tuple[str, float, float]:
    """Train (or resume) one run in this process; returns (run_dir, seconds, test top-1)."""
    import torch

    cfg = config_from_dict(cfg_dict)
    path = Path(run_dir)
    resume = (path / "last.pt").is_file() and saved_config(path) == to_dict(cfg)
    if not resume:
        shutil.rmtree(path, ignore_errors=True)  # an unfinished run with another config starts over
    (path / "study_posthoc.json").unlink(missing_ok=True)  # post-hoc results of an older checkpoint
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    t0 = time.perf_counter()
    try:
        metrics = training.train(cfg, path, resume=resume)
    except CheckpointError:
        if not resume:
            raise
        shutil.rmtree(path, ignore_errors=True)  # an unreadable last.pt: start over
        metrics = training.train(cfg, path)
    seconds = time.perf_counter() - t0
    write_json(path / "run_time.json", {"train_seconds": seconds, "resumed": resume}, indent=None)
    return run_dir, seconds, metrics["top1"]


def train_seconds(run_dir: Path) -> float | None:
    """The training time `train_one` recorded for a run (None when it was trained otherwise)."""
    for name in ("run_time.json", "study_time.json"):  # study_time.json: written by older versions
        try:
            return json.loads((run_dir / name).read_text())["train_seconds"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def train_all(runs: dict[Hashable, tuple[Config, Path]], jobs: int = 1, name: str = "engine") -> dict:
    """Train every run not finished yet; returns {"trained", "reused", "train_seconds"}."""
    pending = [k for k, (cfg, run_dir) in runs.items() if not is_finished(run_dir, cfg)]
    stats = {"trained": len(pending), "reused": len(runs) - len(pending), "train_seconds": 0.0}
    logger.info("%s: %d runs, %d finished already, %d to train%s", name, len(runs), stats["reused"], len(pending),
                f" ({jobs} processes)" if jobs > 1 and pending else "")
    t0 = time.perf_counter()

    def done(i: int, key, seconds: float, top1: float) -> None:
        stats["train_seconds"] += seconds
        elapsed = time.perf_counter() - t0
        logger.info("[%d/%d] %s: test top-1 %.1f (%.1f s; elapsed %.1f min, ETA %.1f min)", i, len(pending),
                    " ".join(map(str, key)) if isinstance(key, tuple) else key, top1, seconds, elapsed / 60,
                    elapsed / i * (len(pending) - i) / 60)

    args = {k: (to_dict(runs[k][0]), str(runs[k][1])) for k in pending}
    if jobs <= 1:
        for i, key in enumerate(pending, 1):
            _, seconds, top1 = train_one(*args[key])
            done(i, key, seconds, top1)
        return stats
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(train_one, *args[k]): k for k in pending}
        for i, fut in enumerate(as_completed(futures), 1):
            _, seconds, top1 = fut.result()
            done(i, futures[fut], seconds, top1)
    return stats
