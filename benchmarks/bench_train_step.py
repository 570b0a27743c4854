"""One training step (the engine's own `train_step`) on synthetic input, no loader: images/s and MFU.

ResNeXt-50 32x4d and ResNeXt-152 32x4d with the EO+UC head (1000 classes), each over
eager / torch.compile × NCHW / channels-last × fp32 / bf16 autocast, batch 256 at 224 px on CUDA.
The step is `engine.train.train_step` on a `Trainer` built the way `engine train` builds it (SGD fused on
CUDA, cosine schedule, loss all-reduce check, backward, step, Wen center update), so the figure is the
engine's step, minus only the data loader.

    pytest benchmarks/bench_train_step.py                       # timings (CUDA: the full grid)
    pytest benchmarks/bench_train_step.py --benchmark-disable   # smoke run (each case once)

`benchmark.extra_info` of every case:
    arch, mode, layout, dtype, batch, image_size, device
    time_s              median step time (the smoke run records its single timed step)
    images_per_s        batch / time_s
    flops_per_image     FlopCounterMode count of one forward (backbone + head loss) × 3 (fwd + bwd)
    matmul_flops_s      the device's measured dense-matmul rate (benchmarks/device_limits.py) in the case's
                        precision (bf16; fp32 cases use the TF32 rate on CUDA: cuDNN convolutions use TF32)
    mfu                 images_per_s × flops_per_image / matmul_flops_s
    target_images_per_s the H100 target (bf16 + channels-last + compile, batch 256): ResNeXt-50
                        ≥ 4,500, ResNeXt-152 ≥ 1,600; meets_target compares (recorded, not asserted)
    peak_mem_bytes      CUDA peak allocation during one step

On CPU only a smoke case runs (ResNeXt-50, eager, NCHW, fp32, batch 4 at 32 px); the rest of the grid
skips with its reason, so `pytest benchmarks --benchmark-disable` stays fast.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from device_limits import device_limits, matmul_rate
from torch.utils.flop_counter import FlopCounterMode

from engine.config import Config
from engine.device import resolve_speed
from engine.distributed import DistInfo
from engine.train import train_step
from engine.trainer import Trainer, build_trainer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCH, IMAGE_SIZE = (256, 224) if CUDA else (4, 32)
NUM_CLASSES = 1000
ARCHS = ["resnext50_32x4d", "resnext152_32x4d"]
TARGETS = {"resnext50_32x4d": 4500.0, "resnext152_32x4d": 1600.0}  # H100, bf16 + channels-last + compile
CPU_SMOKE = ("resnext50_32x4d", "eager", "nchw", "fp32")


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def matmul_rates() -> dict[str, float]:
    """The device's measured matmul FLOP/s (benchmarks/device_limits.py) for the MFU denominator."""
    limits = device_limits()
    # fp32 convolutions run on TF32 tensor cores (torch.backends.cudnn.allow_tf32 defaults to True).
    rates = {"fp32": matmul_rate(limits, torch.float32, allow_tf32=CUDA and torch.backends.cudnn.allow_tf32)}
    if CUDA:
        rates["bf16"] = matmul_rate(limits, torch.bfloat16)
    return rates


_FLOPS: dict[str, int] = {}


def _flops_per_image(model: torch.nn.Module, arch: str) -> int:
    """Forward FLOPs of one image (backbone + EO+UC loss) × 3 for forward + backward."""
    if arch not in _FLOPS:
        x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, device=DEVICE)
        y = torch.randint(0, NUM_CLASSES, (2,), device=DEVICE)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x, y)
        _FLOPS[arch] = 3 * counter.get_total_flops() // 2
    return _FLOPS[arch]


def _make_trainer(arch: str, mode: str, layout: str, dtype: str, tmp: Path) -> Trainer:
    cfg = Config()
    cfg.method, cfg.model.arch, cfg.epochs = "eo_uc", arch, 90
    cfg.optim.batch_size, cfg.optim.lr = BATCH, 0.2
    cfg.run.device = DEVICE.type
    cfg.run.amp = "bf16" if dtype == "bf16" else "off"
    cfg.run.channels_last = "on" if layout == "channels_last" else "off"
    cfg.run.compile = "on" if mode == "compiled" else "off"
    torch.manual_seed(0)
    # The training loop's own builder: model + optimizer + schedule (1000 steps per epoch), 100 images per class.
    return build_trainer(cfg, tmp, DistInfo(), DEVICE, resolve_speed(cfg, DEVICE), None, 1000,
                         class_counts=np.full(NUM_CLASSES, 100))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("arch", ARCHS)
def test_train_step(benchmark, matmul_rates, tmp_path, arch, mode, layout, dtype):
    if not CUDA and (arch, mode, layout, dtype) != CPU_SMOKE:
        pytest.skip("CPU smoke run: only ResNeXt-50 eager NCHW fp32 at 32 px, batch 4; the grid (batch 256 at "
                    "224 px, compile, channels-last, bf16) is a CUDA benchmark (CPU bf16 is 15-20× slower than fp32 "
                    "here and a cold inductor compile of a ResNeXt costs minutes)")
    trainer = _make_trainer(arch, mode, layout, dtype, tmp_path)
    flops = _flops_per_image(trainer.model, arch)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, device=DEVICE, generator=g)
    if trainer.speed.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), device=DEVICE, generator=g)
    def step():
        loss = train_step(trainer, x, y)
        _sync()
        return loss

    try:
        for _ in range(3 if CUDA else 1):  # compile, cudnn autotuning, allocator warm-up
            step()
        peak = None
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            peak = torch.cuda.max_memory_allocated() - base
        t0 = time.perf_counter()
        loss = benchmark.pedantic(step, rounds=20 if CUDA else 3, iterations=1, warmup_rounds=0)
        t_one = time.perf_counter() - t0  # what --benchmark-disable ran: one step
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{arch} {mode} {layout} {dtype}: out of memory at batch {BATCH} on {torch.cuda.get_device_name()}")
    finally:
        if mode == "compiled":
            torch._dynamo.reset()
    stats = getattr(benchmark, "stats", None)
    t = stats.stats.median if stats is not None else t_one  # --benchmark-disable: the single timed step
    rate = matmul_rates[dtype]
    images_per_s = BATCH / t
    target = TARGETS[arch] if (CUDA and mode == "compiled" and layout == "channels_last" and dtype == "bf16") else None
    benchmark.extra_info.update(
        arch=arch, mode=mode, layout=layout, dtype=dtype, batch=BATCH, image_size=IMAGE_SIZE,
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        time_s=t,
        images_per_s=images_per_s,
        flops_per_image=flops,
        matmul_flops_s=rate,
        mfu=images_per_s * flops / rate,
        target_images_per_s=target,
        meets_target=None if target is None else images_per_s >= target,
        peak_mem_bytes=peak if peak is not None else "n/a (CPU: no allocator statistics)",
    )
    assert torch.is_tensor(loss) and bool(torch.isfinite(loss))  # train_step returns the loss on the device
    assert torch.isfinite(trainer.model.head.centers).all() and trainer.model.head.centers.abs().sum() > 0  # centers moved
