"""One runner for `engine sweep` and `engine study`: train every run not finished yet.

A training spec is (Config, run folder). Before anything is trained, every run folder that already holds a
run is compared with the config requested for it, up to the keys engine/config.py declares reuse_ignored=True
(they do not change the numbers):

* same config, finished (metrics.json present): re-used, not trained again;
* same config, unfinished (killed, preempted; last.pt present): resumed from its last checkpoint
  (`train(..., resume=True)`), never deleted;
* another config, finished or not: the command stops, naming the keys that differ (saved → requested),
  before training anything: results of one config are never labelled with another's settings, and a
  resumable run is never deleted. Choose another --out, or delete the folder to train it again.

A folder with a config but no checkpoint (killed before its first one) holds nothing trained and
starts over; an unreadable last.pt is moved aside (`<run>.unreadable-<time>`) and the run starts over.
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

from common.errors import CheckpointError, ConfigError
from common.io import write_json
from engine import train as training
from engine.config import Config, config_from_dict, format_diff, reuse_differences, to_dict, yaml_load

logger = logging.getLogger(__name__)

def saved_config(run_dir: Path) -> dict | None:
    try:
        saved = yaml_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def folder_state(run_dir: Path, cfg: Config) -> str:
    """"finished" | "unfinished" (resumable) | "new"; a folder holding a run of another config is refused."""
    finished, resumable = (run_dir / "metrics.json").is_file(), (run_dir / "last.pt").is_file()
    if not (finished or resumable):
        return "new"
    saved = saved_config(run_dir)
    if saved is None:
        raise ConfigError(f"{run_dir} holds a {'finished' if finished else 'started'} run without a readable "
                          "config.yaml; choose another --out or delete that folder")
    diff = reuse_differences(saved, cfg)  # keys declared reuse_ignored=True do not count
    if diff:
        raise ConfigError(f"{run_dir} holds a {'finished' if finished else 'resumable'} run trained with another "
                          f"config: {format_diff(diff, 8)} (saved → requested); choose another --out, or delete that folder "
                          "to train it again")
    return "finished" if finished else "unfinished"


def train_one(cfg_dict: dict, run_dir: str) -> tuple[str, float, float]:
    """Train (or resume) one run in this process; returns (run_dir, seconds, test top-1)."""
    import torch

    cfg = config_from_dict(cfg_dict)
    path = Path(run_dir)
    resume = (path / "last.pt").is_file()  # folder_state checked its config up front
    threads = cfg.run.threads
    if resume:  # continue with the config it was trained with (equal to cfg up to its reuse_ignored keys)
        cfg = config_from_dict(saved_config(path))
    elif path.exists():
        logger.info("%s: no checkpoint yet (killed before its first one); starting it over", path)
        shutil.rmtree(path)
    for cached in ("study_posthoc.json", "study_mechanism.json"):  # the studies' caches of an older checkpoint
        (path / cached).unlink(missing_ok=True)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        metrics = training.train(cfg, path, resume=resume)
    except CheckpointError as exc:
        if not resume:
            raise
        aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        logger.warning("%s: cannot resume (%s); moved to %s, starting the run over", path, exc, aside)
        path.rename(aside)
        resume = False
        metrics = training.train(cfg, path)
    seconds = time.perf_counter() - t0
    write_json(path / "run_time.json", {"train_seconds": seconds, "resumed": resume}, indent=None)
    return run_dir, seconds, metrics["top1"]


def train_seconds(run_dir: Path) -> float | None:
    """The training time `train_one` recorded for a run (None when it was trained otherwise)."""
    for name in ("run_time.json", "study_time.json"):  # study_time.json: the same record in run folders of earlier releases
        try:
            return json.loads((run_dir / name).read_text())["train_seconds"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def train_all(specs: dict[Hashable, tuple[Config, Path]], jobs: int = 1, name: str = "engine") -> dict:
    """Train every spec ({key: (Config, run folder)}) not finished yet;
    returns {"trained", "reused", "resumed", "train_seconds"}."""
    status = {k: folder_state(run_dir, cfg) for k, (cfg, run_dir) in specs.items()}  # all checked before training
    pending = [k for k in specs if status[k] != "finished"]
    stats = {"trained": len(pending), "reused": len(specs) - len(pending), "train_seconds": 0.0,
             "resumed": sum(s == "unfinished" for s in status.values())}
    logger.info("%s: %d runs, %d finished already, %d to train (%d resumed)%s", name, len(specs), stats["reused"],
                len(pending), stats["resumed"], f" ({jobs} processes)" if jobs > 1 and pending else "")
    t0 = time.perf_counter()

    def done(i: int, key, seconds: float, top1: float) -> None:
        stats["train_seconds"] += seconds
        elapsed = time.perf_counter() - t0
        logger.info("[%d/%d] %s: test top-1 %.1f (%.1f s; elapsed %.1f min, ETA %.1f min)", i, len(pending),
                    " ".join(map(str, key)) if isinstance(key, tuple) else key, top1, seconds, elapsed / 60,
                    elapsed / i * (len(pending) - i) / 60)

    args = {k: (to_dict(specs[k][0]), str(specs[k][1])) for k in pending}
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
