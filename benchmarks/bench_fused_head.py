"""Head loss forward+backward: fused Triton kernel vs eager reference vs torch.compile'd reference.

    pytest benchmarks/bench_fused_head.py                       # timings
    pytest benchmarks/bench_fused_head.py --benchmark-disable   # smoke run (each case once)

Precisions: "fp32", "bf16" (features, weight and centers bf16) and "amp_bf16" (bf16 features from an
autocast backbone, fp32 weight and centers: the engine's default CUDA run; recorded as dtype
"amp_bfloat16"). Every case records in `benchmark.extra_info`:
    shape, dtype, device, impl
    time_s          GPU: median of triton.testing.do_bench (fwd+bwd, grads reset between calls);
                    CPU: pytest-benchmark's median (the smoke run records its single call)
    peak_mem_bytes  peak CUDA memory allocated during one fwd+bwd above the inputs (CUDA only)
    flops           6·B·K·d  (logits, dF = dz·W, dW = dzᵀ·F: the minimum; the O(B·K + K·d) rest is ignored)
    executed_flops  the fused kernels' matmul FLOPs, 8·B·K·d (`head_traffic.flops`: the backward recomputes
                    the logits), for the fused case
    bytes           ideal HBM traffic (`kernels.head_traffic.modelled_bytes`: f and W read twice, C once,
                    dF and dW written, logits streamed once)
    modelled_bytes  the fused kernels' modelled traffic (same function), for the fused case
    matmul_flops_s  measured rate of a plain large matmul in the GEMM precision (AMP: bf16; fp32: TF32
                    only when torch.backends.cuda.matmul.allow_tf32, as the kernels decide)
    copy_bytes_s    measured bandwidth of a plain large copy (read + write counted)
    limits_source   where those two came from (benchmarks/device_limits.py)
    roofline_floor_s max(flops / matmul_flops_s, bytes / copy_bytes_s)
    roofline_frac   roofline_floor_s / time_s  (1.0 = as fast as the machine's own matmul/copy)
    tflop_s, gb_s   flops / time_s / 1e12, bytes / time_s / 1e9

On CPU the shapes are scaled down (B/8, d/8, K/8) and only the reference backends run; the
Triton cases skip (the interpreter is for correctness, not speed), and the compiled reference
runs at the smallest shape in fp32 only (a cold inductor compile on CPU costs 10-20 s per case).
"""

from __future__ import annotations

import pytest
import torch
from device_limits import copy_rate, device_limits, matmul_rate

from kernels import fused_head, head_plan, head_traffic, reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

GPU_SHAPES = [(512, 2048, 1000), (512, 2048, 8142), (512, 2048, 131072)]  # (B, d, K)
SHAPES = GPU_SHAPES if CUDA else [(b // 8, d // 8, k // 8) for b, d, k in GPU_SHAPES]
# name → (features dtype, weight/centers dtype, extra_info dtype)
PRECISIONS = {
    "fp32": (torch.float32, torch.float32, "float32"),
    "bf16": (torch.bfloat16, torch.bfloat16, "bfloat16"),
    "amp_bf16": (torch.bfloat16, torch.float32, "amp_bfloat16"),
}
IMPLS = ["fused", "eager", "compiled"]

LAMBDA_C, LAMBDA_U = 1.0, 1.0


@pytest.fixture(scope="session")
def machine_limits():
    """Measured matmul FLOP/s and copy bandwidth: benchmarks/device_limits.py (the native probe's
    figures on a GPU, torch-measured ones on CPU)."""
    return device_limits()


_COMPILED: dict = {}


def _loss_fn(impl):
    if impl == "fused":
        return fused_head.fused_offset_head_loss
    if impl == "eager":
        return reference.offset_head_loss
    if "ref" not in _COMPILED:
        _COMPILED["ref"] = torch.compile(reference.offset_head_loss, fullgraph=True)
    return _COMPILED["ref"]


def _gemm_dtype(fdt, wdt):
    """The dtype the fused kernels multiply in (the roofline's matmul rate)."""
    mode = head_plan.gemm_mode(fdt, wdt, tf32=torch.backends.cuda.matmul.allow_tf32)
    return {head_plan.MODE_BF16: torch.bfloat16, head_plan.MODE_FP16: torch.float16}.get(mode, torch.float32)


def _skip_reason(shape, precision, impl) -> str | None:
    """Why this case does not run here (None: it runs)."""
    if impl == "fused":
        if not CUDA:
            return "fused Triton head needs a CUDA device (the CPU interpreter is for correctness tests, not timing)"
        if head_plan.INTERPRET:
            return "TRITON_INTERPRET=1 is set in this process: Triton would run interpreted, timings meaningless"
        if not head_plan.HAS_TRITON:
            return "triton is not installed"
    if impl == "compiled" and not CUDA and (shape != SHAPES[0] or precision != "fp32"):
        return ("CPU smoke run: the compiled reference runs only at the smallest shape in fp32 "
                "(each cold inductor compile on CPU costs 10-20 s)")
    return None


def _measure(benchmark, step, reset, params) -> tuple[float, int | None]:
    """(median seconds of one fwd+bwd, peak CUDA bytes above the inputs or None on CPU)."""
    reset()
    step()  # warm-up: compilation / Triton JIT
    peak, t_gpu = None, None
    if CUDA:
        import triton.testing

        reset()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        t_gpu = triton.testing.do_bench(step, grad_to_none=params, return_mode="median") * 1e-3

    benchmark.pedantic(lambda: (reset(), step()), rounds=5 if CUDA else 3, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    t = t_gpu if t_gpu is not None else (stats.stats.median if stats is not None else None)
    if t is None:  # --benchmark-disable on CPU: time the single call here
        import time

        t0 = time.perf_counter()
        reset()
        step()
        t = time.perf_counter() - t0
    return t, peak


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-d{}-K{}".format(*s))
def test_head_fwd_bwd(benchmark, machine_limits, shape, precision, impl):
    reason = _skip_reason(shape, precision, impl)
    if reason:
        pytest.skip(reason)
    fdt, wdt, dtype_name = PRECISIONS[precision]
    B, d, K = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    f = torch.randn(B, d, device=DEVICE, generator=g).to(fdt).requires_grad_()
    w = (torch.randn(K, d, device=DEVICE, generator=g) / d**0.5).to(wdt).requires_grad_()
    c = torch.randn(K, d, device=DEVICE, generator=g).to(wdt)  # centers: buffers (engine: center_grad=False)
    y = torch.randint(0, K, (B,), device=DEVICE, generator=g)
    loss_fn = _loss_fn(impl)

    def step():
        loss = loss_fn(f, w, c, y, LAMBDA_C, LAMBDA_U, center_grad=False)
        loss.backward()
        return loss

    def reset():
        f.grad = w.grad = None

    t, peak = _measure(benchmark, step, reset, [f, w])

    traffic = head_traffic.modelled_bytes(B, d, K, fdt, wdt, head_plan.HeadFlags(LAMBDA_C, LAMBDA_U, True, 0.0, False))
    flops = head_traffic.ideal_flops(B, d, K)
    rate = matmul_rate(machine_limits, _gemm_dtype(fdt, wdt))
    bw = copy_rate(machine_limits)
    floor = max(flops / rate, traffic["ideal"] / bw)
    benchmark.extra_info.update(
        shape=dict(B=B, d=d, K=K),
        dtype=dtype_name,
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        impl=impl,
        time_s=t,
        peak_mem_bytes=peak if peak is not None else "n/a (CPU: no allocator statistics)",
        flops=flops,
        bytes=traffic["ideal"],
        modelled_bytes=traffic["total"] if impl == "fused" else None,
        executed_flops=head_traffic.flops(B, d, K) if impl == "fused" else None,
        matmul_flops_s=rate,
        copy_bytes_s=bw,
        limits_source=machine_limits["source"],
        roofline_floor_s=floor,
        roofline_frac=floor / t,
        tflop_s=flops / t / 1e12,
        gb_s=traffic["ideal"] / t / 1e9,
    )
    assert torch.isfinite(f.grad).all() and torch.isfinite(w.grad).all()
