"""Loader throughput (images/s) on one generated JPEG set.

* DALI CPU pipeline vs the torchvision DataLoader, same worker count (DALI threads =
  DataLoader workers), eval (resize + center crop) and train (random-resized crop + flip).
* Class-aware vs plain (instance) order through the same DALI pipeline: the sampler's
  overhead, plus the samplers alone on an ImageNet-LT-sized label vector.
* DALI mixed (GPU) decode at 224 px: skipped without a CUDA device.

Run:  .venv/bin/python -m pytest benchmarks/bench_loaders.py -q [--benchmark-disable]
images/s lands in `benchmark.extra_info["images_per_s"]`. BENCH_LOADER_WORKERS sets the
worker count (default 2), BENCH_LOADER_IMAGES the set size (default 96).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.loader import make_loader
from pipelines.long_tail import long_tailed_counts
from pipelines.samplers import build_sampler
from pipelines.spec import LoaderSpec
from pipelines.splits import SplitIndex

dali = pytest.importorskip("pipelines.dali")

WORKERS = int(os.environ.get("BENCH_LOADER_WORKERS", "2"))
N_IMAGES = int(os.environ.get("BENCH_LOADER_IMAGES", "96"))
BATCH = 16
SPEC = LoaderSpec(BATCH, image_size=224, workers=WORKERS)  # ImageNet mean/std and random-resized crop, CPU


@pytest.fixture(scope="module")
def jpeg_set(tmp_path_factory) -> SplitIndex:
    """N_IMAGES smooth JPEGs of ImageNet-like sizes (shorter side 240–330), 10 long-tailed classes."""
    folder = tmp_path_factory.mktemp("bench_jpegs")
    rng = np.random.default_rng(0)
    counts = np.asarray(long_tailed_counts(10, 100, 10.0))
    labels = rng.choice(10, size=N_IMAGES, p=counts / counts.sum())
    paths = []
    for i in range(N_IMAGES):
        h, w = int(rng.integers(240, 330)), int(rng.integers(300, 420))
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([127 + 120 * np.sin(x / (9 + c * 4) + y / (13 + c)) for c in range(3)], -1)
        img += rng.normal(0, 8, img.shape)
        p = folder / f"{i:04d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return SplitIndex(folder / "split.txt", paths, labels.astype(np.int64), 10)


def _epoch_rate(loader, set_epoch=None) -> dict[str, float]:
    """One timed epoch → images/s (the first epoch also pays pipeline / worker start-up)."""
    state = {"epoch": 0}

    def run() -> int:
        if set_epoch is not None:
            set_epoch(state["epoch"])
        state["epoch"] += 1
        n = 0
        for _, y in loader:
            n += len(y)
        return n

    return run


def _record(benchmark, run, **info) -> None:
    t0 = time.perf_counter()
    n = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
    if benchmark.enabled:
        rate = n / benchmark.stats.stats.mean
    else:  # --benchmark-disable runs `run` once, untimed: rate from wall time (start-up included)
        rate = n / (time.perf_counter() - t0)
    benchmark.extra_info.update(images_per_s=round(rate, 1), workers=WORKERS, batch=BATCH, images=n, **info)
    assert n > 0


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_dali_cpu(benchmark, jpeg_set, train):
    sampler = build_sampler("instance", jpeg_set.labels, 10) if train else None
    loader = dali.DaliLoader(jpeg_set, SPEC, train, sampler=sampler)
    _record(benchmark, _epoch_rate(loader, loader.set_epoch), loader="dali_cpu", mode="train" if train else "eval")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torchvision(benchmark, jpeg_set, train):
    sampler = build_sampler("instance", jpeg_set.labels, 10) if train else None
    loader = make_loader(jpeg_set, SPEC, train, sampler=sampler)
    set_epoch = sampler.set_epoch if sampler is not None else None
    _record(benchmark, _epoch_rate(loader, set_epoch), loader="torchvision", mode="train" if train else "eval")


@pytest.mark.parametrize("name", ["instance", "class_aware"])
def test_dali_cpu_sampler_order(benchmark, jpeg_set, name):
    """Same DALI train pipeline, plain vs class-aware order: the difference is the sampler's cost."""
    sampler = build_sampler(name, jpeg_set.labels, 10, seed=0)
    loader = dali.DaliLoader(jpeg_set, SPEC, True, sampler=sampler)
    _record(benchmark, _epoch_rate(loader, loader.set_epoch), loader="dali_cpu", sampler=name)


@pytest.mark.parametrize("name", ["instance", "class_aware", "sqrt", "progressive"])
def test_sampler_epoch_imagenet_lt_size(benchmark, name):
    """One epoch on an ImageNet-LT-like label vector (1,000 classes, 1,280 → 5 images, exp): indices/s."""
    labels = np.repeat(np.arange(1000), long_tailed_counts(1000, 1280, 256.0))
    sampler = build_sampler(name, labels, 1000, seed=0, total_epochs=90)
    state = {"epoch": 0}

    def run() -> int:
        sampler.set_epoch(state["epoch"])
        state["epoch"] += 1
        return len(list(sampler))

    _record(benchmark, run, sampler=name)
    benchmark.extra_info["indices_per_s"] = benchmark.extra_info.pop("images_per_s")
    benchmark.extra_info["indices"] = benchmark.extra_info.pop("images")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI mixed (GPU) decode needs a CUDA device; none here")
def test_dali_mixed_gpu_224(benchmark, jpeg_set):
    sampler = build_sampler("instance", jpeg_set.labels, 10)
    spec = replace(SPEC, device_id=0, layout="channels_last", dtype="float16")
    loader = dali.DaliLoader(jpeg_set, spec, True, sampler=sampler)

    def run() -> int:
        n = _epoch_rate(loader, loader.set_epoch)()
        torch.cuda.synchronize()
        return n

    _record(benchmark, run, loader="dali_mixed", image_size=224)
