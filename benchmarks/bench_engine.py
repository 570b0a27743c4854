"""End to end `engine train` images/s: split file → the engine's real loader → model → loss → SGD step.

`engine.train.train` runs on a generated long-tailed JPEG set in the ImageNet-LT split-file format;
the figure is the training loop's own `images_per_s` of the LAST epoch in the run's metrics.jsonl
(epoch 1 also pays torch.compile / cudnn autotuning / loader start-up; evaluation and checkpoints are
outside that timer).

* CUDA: ResNeXt-50 32x4d, 224 px random-resized crop, batch 256, the engine's GPU defaults (bf16 autocast,
  channels-last, torch.compile, fused SGD), DALI mixed decode when DALI imports (else torchvision), 3 epochs.
* CPU: a 1-epoch tiny run (ResNet-8, 16 px, batch 32): a smoke check that the path works, not a figure
  to compare with the targets.

Knobs: BENCH_ENGINE_ARCH, BENCH_ENGINE_IMAGE_SIZE, BENCH_ENGINE_BATCH, BENCH_ENGINE_EPOCHS,
BENCH_ENGINE_STEPS (optimizer steps per epoch), BENCH_ENGINE_WORKERS.

    .venv/bin/python -m pytest benchmarks/bench_engine.py -q [--benchmark-disable]

`extra_info`: images_per_s (last epoch), images_per_s_per_epoch, arch, image_size, batch, epochs,
steps_per_epoch, loader (dali / torchvision), device, amp, channels_last, compile, wall_s,
peak_mem_bytes (CUDA).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import load_config
from engine.data import _use_dali
from engine.device import resolve_device, resolve_speed
from engine.train import train

CUDA = torch.cuda.is_available()
if CUDA:
    DEFAULTS = dict(arch="resnext50_32x4d", image_size=224, batch=256, epochs=3, steps=20, workers=8, classes=100)
else:
    DEFAULTS = dict(arch="resnet8_cifar", image_size=16, batch=32, epochs=1, steps=4, workers=0, classes=10)
ARCH = os.environ.get("BENCH_ENGINE_ARCH", DEFAULTS["arch"])
IMAGE_SIZE = int(os.environ.get("BENCH_ENGINE_IMAGE_SIZE", DEFAULTS["image_size"]))
BATCH = int(os.environ.get("BENCH_ENGINE_BATCH", DEFAULTS["batch"]))
EPOCHS = int(os.environ.get("BENCH_ENGINE_EPOCHS", DEFAULTS["epochs"]))
STEPS = int(os.environ.get("BENCH_ENGINE_STEPS", DEFAULTS["steps"]))
WORKERS = int(os.environ.get("BENCH_ENGINE_WORKERS", DEFAULTS["workers"]))
CLASSES = DEFAULTS["classes"]
UNIQUE_JPEGS = 256 if CUDA else 48  # split lines cycle over these files (decode cost is per line)


def _jpeg(path: Path, h: int, w: int, rng: np.random.Generator) -> None:
    y, x = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 6.28, 3)
    img = np.stack([127 + 120 * np.sin(x / (7 + 3 * c) + y / (11 + c) + phase[c]) for c in range(3)], -1)
    img += rng.normal(0, 8, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


@pytest.fixture(scope="module")
def jpeg_split(tmp_path_factory) -> Path:
    """A long-tailed split-file data set: STEPS·BATCH training lines over CLASSES classes (every class at
    least once, exponential profile), one val and one test line per class, ImageNet-like JPEG sizes on
    CUDA (shorter side 240–330), small ones on CPU."""
    root = tmp_path_factory.mktemp("bench_engine_data")
    rng = np.random.default_rng(0)
    big = IMAGE_SIZE >= 64
    files = []
    for i in range(UNIQUE_JPEGS):
        h, w = (int(rng.integers(240, 330)), int(rng.integers(300, 420))) if big else (IMAGE_SIZE * 2, IMAGE_SIZE * 2 + 8)
        name = f"img/{i:04d}.jpg"
        (root / "img").mkdir(exist_ok=True)
        _jpeg(root / name, h, w, rng)
        files.append(name)
    n_train = STEPS * BATCH
    weights = 10.0 ** (-np.arange(CLASSES) / (CLASSES - 1))  # imbalance factor 10
    labels = np.concatenate([np.arange(CLASSES), rng.choice(CLASSES, n_train - CLASSES, p=weights / weights.sum())])
    cycle = itertools.cycle(files)
    (root / "train.txt").write_text("".join(f"{next(cycle)} {y}\n" for y in labels))
    eval_rows = "".join(f"{files[c % len(files)]} {c}\n" for c in range(CLASSES))
    (root / "val.txt").write_text(eval_rows)
    (root / "test.txt").write_text(eval_rows)
    return root


def _config(root: Path):
    overrides = [
        "data.format=split_files", f"data.root={root}", "data.train_split=train.txt", "data.val_split=val.txt",
        "data.test_split=test.txt", f"data.num_classes={CLASSES}", f"model.arch={ARCH}", f"epochs={EPOCHS}",
        f"data.image_size={IMAGE_SIZE}", f"optim.batch_size={BATCH}", f"data.num_workers={WORKERS}",
        "optim.warmup_epochs=0", "run.progress=false", "eval.diagnostics=false", "eval.many_threshold=20",
        "eval.few_threshold=5", f"eval.batch_size={BATCH}",
    ]
    if IMAGE_SIZE >= 64:
        overrides += ["data.augment=random_resized_crop", "data.hflip=true"]
    return load_config(None, overrides=overrides)


def test_engine_train_images_per_s(benchmark, jpeg_split, tmp_path):
    cfg = _config(jpeg_split)
    device = resolve_device(cfg.run.device)
    speed = resolve_speed(cfg, device)
    runs = itertools.count()
    last: dict = {}

    def run() -> list[dict]:
        out = tmp_path / f"run{next(runs)}"
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        train(cfg, out)
        last["wall_s"] = time.perf_counter() - t0
        last["peak"] = torch.cuda.max_memory_allocated() if CUDA else None
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    history = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert len(history) == EPOCHS
    rates = [r["images_per_s"] for r in history]
    benchmark.extra_info.update(
        images_per_s=round(rates[-1], 1),
        images_per_s_per_epoch=[round(r, 1) for r in rates],
        arch=ARCH,
        image_size=IMAGE_SIZE,
        batch=BATCH,
        epochs=EPOCHS,
        steps_per_epoch=history[-1]["step"] // EPOCHS,
        images_per_epoch=STEPS * BATCH,
        loader="dali" if _use_dali(cfg, device.type) else "torchvision",
        workers=WORKERS,
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        amp=str(speed.amp_dtype).removeprefix("torch.") if speed.amp_dtype else "off",
        channels_last=speed.channels_last,
        compile=speed.compile,
        method=cfg.method,
        wall_s=round(last["wall_s"], 2),
        peak_mem_bytes=last["peak"] if last["peak"] is not None else "n/a (CPU: no allocator statistics)",
    )
    assert all(np.isfinite(r["train_loss"]) for r in history)
    assert rates[-1] > 0
