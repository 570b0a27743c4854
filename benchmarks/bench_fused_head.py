"""Head loss forward+backward: fused Triton kernel vs eager reference vs torch.compile'd reference.

    pytest benchmarks/bench_fused_head.py                       # timings
    pytest benchmarks/bench_fused_head.py --benchmark-disable   # smoke run (each case once)

Every case records in `benchmark.extra_info`:
    shape, dtype, device, impl
    time_s          median fwd+bwd time (the smoke run records its single call)
    peak_mem_bytes  peak CUDA memory allocated during one fwd+bwd above the inputs (CUDA only)
    flops           6·B·K·d  (logits, dF = dz·W, dW = dzᵀ·F; the O(B·K + K·d) rest is ignored)
    bytes           minimum traffic: read F, W, C once, write dF, dW, dC once
    matmul_flops_s  measured rate of a plain large matmul in the case's dtype (fp32: TF32 only when
                    torch.backends.cuda.matmul.allow_tf32, as the kernels decide)
    copy_bytes_s    measured bandwidth of a plain large copy (read + write counted)
    limits_source   where those two came from: "native" (the cuBLASLt / copy probe), "torch" (see
                    benchmarks/device_limits.py)
    roofline_floor_s max(flops / matmul_flops_s, bytes / copy_bytes_s)
    roofline_frac   roofline_floor_s / time_s  (1.0 = as fast as the machine's own matmul/copy)
    tflop_s, gb_s   flops / time_s / 1e12, bytes / time_s / 1e9

On CPU the shapes are scaled down (B/8, d/8, K/8) and only the reference backends run; the
Triton cases skip (the interpreter is for correctness, not speed), and the compiled reference
runs at the smallest shape in fp32 only (a cold inductor compile on CPU costs 10-20 s per
case), so the smoke run stays around half a minute even with an empty inductor cache.
"""

from __future__ import annotations

import time

import pytest
import torch

from device_limits import copy_rate, device_limits, matmul_rate
from kernels import fused_head, reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

GPU_SHAPES = [(512, 2048, 1000), (512, 2048, 8142), (256, 2048, 131072)]  # (B, d, K)
SHAPES = GPU_SHAPES if CUDA else [(b // 8, d // 8, k // 8) for b, d, k in GPU_SHAPES]
DTYPES = [torch.float32, torch.bfloat16]
IMPLS = ["fused", "eager", "compiled"]

LAMBDA_C, LAMBDA_U = 1.0, 1.0


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _time(fn, reps):
    fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / reps


@pytest.fixture(scope="session")
def machine_rates():
    """Measured matmul FLOP/s per dtype and copy bandwidth (bytes/s, read + write): benchmarks/device_limits.py
    (the native probe's figures on a GPU, torch-measured ones on CPU)."""
    limits = device_limits()
    return {dt: matmul_rate(limits, dt) for dt in DTYPES}, copy_rate(limits), limits


_COMPILED: dict = {}


def _compiled_reference(dtype):
    if dtype not in _COMPILED:
        _COMPILED[dtype] = torch.compile(reference.offset_head_loss, fullgraph=True)
    return _COMPILED[dtype]


def _loss_fn(impl, dtype):
    if impl == "fused":
        return fused_head.fused_offset_head_loss
    if impl == "eager":
        return reference.offset_head_loss
    return _compiled_reference(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-d{}-K{}".format(*s))
def test_head_fwd_bwd(benchmark, machine_rates, shape, dtype, impl):
    if impl == "fused":
        if not CUDA:
            pytest.skip("fused Triton head needs a CUDA device (the CPU interpreter is for correctness tests, not timing)")
        if fused_head.INTERPRET:
            pytest.skip("TRITON_INTERPRET=1 is set in this process: Triton would run interpreted, timings meaningless")
        if not fused_head.HAS_TRITON:
            pytest.skip("triton is not installed")
    if impl == "compiled" and not CUDA and (shape != SHAPES[0] or dtype != torch.float32):
        pytest.skip(
            "CPU smoke run: the compiled reference runs only at the smallest shape in fp32 "
            "(each cold inductor compile on CPU costs 10-20 s)"
        )
    B, d, K = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    f = torch.randn(B, d, device=DEVICE, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(K, d, device=DEVICE, generator=g) / d**0.5).to(dtype).requires_grad_()
    c = torch.randn(K, d, device=DEVICE, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, K, (B,), device=DEVICE, generator=g)
    loss_fn = _loss_fn(impl, dtype)

    def step():
        for t in (f, w, c):
            t.grad = None
        loss = loss_fn(f, w, c, y, LAMBDA_C, LAMBDA_U)
        loss.backward()
        _sync()
        return loss

    t_first = _time(step, 1)  # warm-up (compilation / Triton JIT) + one timed call
    peak = None
    if CUDA:
        for t in (f, w, c):
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base

    benchmark.pedantic(step, rounds=10 if CUDA else 3, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    t = stats.stats.median if stats is not None else t_first  # --benchmark-disable: the single call

    rates, bw, limits = machine_rates
    esize = torch.finfo(dtype).bits // 8
    flops = 6 * B * K * d
    nbytes = 2 * (B * d + 2 * K * d) * esize
    floor = max(flops / rates[dtype], nbytes / bw)
    benchmark.extra_info.update(
        shape=dict(B=B, d=d, K=K),
        dtype=str(dtype).removeprefix("torch."),
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        impl=impl,
        time_s=t,
        peak_mem_bytes=peak if peak is not None else "n/a (CPU: no allocator statistics)",
        flops=flops,
        bytes=nbytes,
        matmul_flops_s=rates[dtype],
        copy_bytes_s=bw,
        limits_source=limits["source"],
        roofline_floor_s=floor,
        roofline_frac=floor / t,
        tflop_s=flops / t / 1e12,
        gb_s=nbytes / t / 1e9,
    )
    assert torch.isfinite(f.grad).all() and torch.isfinite(w.grad).all()
