"""Ahead-of-time proof that the fused head compiles well for H100 (sm_90) and A100 (sm_80), on CPU.

For every method the engine can run through the fused op, every precision (fp32, fp32+TF32,
bf16, fp16, AMP-bf16, AMP-fp16) and the benchmark shapes, the launches are produced by
`kernels.head_plan.plan_forward` / `plan_backward` — what the launcher runs — and compiled with Triton
for GPUTarget("cuda", 90|80, 32). Each specialization must:
  * compile;
  * fit the SM's shared memory (sm_90: 227 KiB, sm_80: 163 KiB);
  * spill no register (ptxas -v: 0 bytes spill stores / loads);
  * for the GEMM kernels under bf16/fp16/AMP/TF32, use tensor cores (wgmma on sm_90, mma.sync on sm_80).
The engine's flags come from the engine itself: `engine.heads.Head.loss` is called with
`kernels.offset_head_loss` replaced by a recorder, so a new method or flag shows up here.

Default (see `cases`): every kernel × precision × arch at least once, every engine method and
every benchmark shape for the default precision (AMP bf16); compiled in a child process, one
worker per core, each specialization once (2–3 minutes on two cores with a cold Triton cache).
LT_AOT_FULL=1: the whole methods × precisions × B{256,512} × d{512,2048} × K{1000,8142,131072}
matrix, also with label smoothing and every optional epilogue.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

import kernels  # noqa: E402
from kernels import aot  # noqa: E402
from kernels import head_plan as hp  # noqa: E402

# Every test here is an ahead-of-time test (`-m aot` runs them alone); those that compile are also `slow`
# (seconds per specialization on CPU), so the quick loop `-m "not slow"` keeps only the flag check.
pytestmark = pytest.mark.aot
compiles = pytest.mark.slow

FULL = os.environ.get("LT_AOT_FULL", "0") == "1"
ARCHS = (90, 80)
SHAPES_FULL = list(itertools.product((256, 512), (512, 2048), (1000, 8142, 131072)))  # (B, d, K)


def engine_flag_sets(label_smoothing: float) -> dict[str, tuple[hp.HeadFlags, bool]]:
    """method → (HeadFlags, has bias) as the engine's own head passes them to the fused op in a training
    step (center methods take the per-class statistics from the same pass: `offset_head_loss_with_stats`)."""
    from engine.heads import METHODS, Head
    from engine.methods import LossConfig

    seen = {}
    real = {"offset_head_loss": kernels.offset_head_loss,
            "offset_head_loss_with_stats": kernels.offset_head_loss_with_stats}

    def recorder(name: str, stats: bool):
        def record(features, weight, centers, labels, lambda_center=1.0, lambda_uniform=1.0, *, use_offset=True,
                   bias=None, label_smoothing=0.0, center_grad=True, backend="auto"):
            seen["call"] = (hp.HeadFlags.of(lambda_center, lambda_uniform, use_offset=use_offset,
                                            label_smoothing=label_smoothing, center_grad=center_grad, stats=stats),
                            bias is not None)
            return real[name](features, weight, centers, labels, lambda_center, lambda_uniform,
                              use_offset=use_offset, bias=bias, label_smoothing=label_smoothing,
                              center_grad=center_grad, backend="torch")
        return record

    out = {}
    kernels.offset_head_loss = recorder("offset_head_loss", False)
    kernels.offset_head_loss_with_stats = recorder("offset_head_loss_with_stats", True)
    try:
        for method in METHODS:
            seen.clear()
            head = Head(16, 10, METHODS[method], LossConfig(label_smoothing=label_smoothing), np.arange(1, 11))
            head.train()
            head.loss(torch.randn(4, 16), torch.tensor([0, 1, 2, 3]))
            if "call" in seen:  # the baselines of engine/losses.py do not use the fused op
                out[method] = seen["call"]
    finally:
        kernels.offset_head_loss = real["offset_head_loss"]
        kernels.offset_head_loss_with_stats = real["offset_head_loss_with_stats"]
    return out


# The non-engine variant the tests and `fused_offset_head_loss_with_stats` launch: every
# optional epilogue on (per-class stats, dC, dB, label smoothing).
EVERYTHING = (hp.HeadFlags(1.0, 1.0, True, 0.1, True, stats=True), True)
DEFAULT_DTYPE = "amp_bf16"  # the engine's default CUDA run (run.amp=auto)


def cases(dtype: str, arch: int):
    """(label, launches) to compile for one precision and arch.

    Default: eo_uc (all five kernels, the engine's method) and EVERYTHING at (512, 2048, 8142) for
    every precision; for the default precision also every engine method (with and without label
    smoothing) and eo_uc at every benchmark shape (K = 131072 is the one divisible by 16: other
    specializations). LT_AOT_FULL=1: every method × shape × precision."""
    methods = engine_flag_sets(0.0)
    methods.update({f"{m}+ls": v for m, v in engine_flag_sets(0.1).items()})
    methods["everything"] = EVERYTHING
    if FULL:
        grid = itertools.product(methods.items(), SHAPES_FULL)
    elif dtype == DEFAULT_DTYPE:
        grid = itertools.chain(
            itertools.product(methods.items(), [(512, 2048, 8142)]),
            itertools.product([("eo_uc", methods["eo_uc"])], SHAPES_FULL),
        )
    else:
        grid = itertools.product([("eo_uc", methods["eo_uc"]), ("everything", EVERYTHING)], [(512, 2048, 8142)])
    for (method, (flags, bias)), (B, d, K) in grid:
        yield f"{method} B{B} d{d} K{K}", aot.launches_for(B, d, K, dtype, flags, bias)


def test_engine_methods_reach_the_fused_op():
    """The recorder sees the methods that use the fused op, with the engine's flags."""
    sets = engine_flag_sets(0.0)
    assert {"ce", "ce_bias", "eo", "uc_only", "eo_uc", "wvn", "logit_adjusted"} <= set(sets), sorted(sets)
    flags, bias = sets["eo_uc"]
    assert flags.use_offset and flags.center and flags.uniform and not flags.center_grad and not bias
    assert sets["ce_bias"][1] and not sets["ce"][1]


@compiles
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("dtype", list(aot.DTYPES))
def test_every_specialization_compiles_fits_and_uses_tensor_cores(dtype, arch):
    fdt, wdt, tf32 = aot.DTYPES[dtype]
    mode = hp.gemm_mode(fdt, wdt, tf32)
    problems, kernels_seen = [], set()
    labelled = [(label, launch) for label, launches in cases(dtype, arch) for launch in launches]
    compiled = aot.compile_launches([launch for _, launch in labelled], arch)  # one batch, deduplicated
    for (label, launch), c in zip(labelled, compiled):
        kernels_seen.add(launch.name)
        where = f"{launch.name} [{dtype}, sm_{arch}, {label}]"
        if c.shared > aot.SHARED_LIMIT[arch]:
            problems.append(f"{where}: {c.shared} B shared > {aot.SHARED_LIMIT[arch]}")
        if c.spill_stores or c.spill_loads:
            problems.append(f"{where}: spills {c.spill_stores}/{c.spill_loads} B (registers {c.registers})")
        if launch.name in aot.GEMM_KERNELS:
            want = ("wgmma" if arch >= 90 else "mma") if mode in hp.TENSOR_CORE_MODES else ""
            if c.mma != want:
                problems.append(f"{where}: tensor-core instruction {c.mma or 'none'!r}, expected {want or 'none'!r}")
    assert set(aot.GEMM_KERNELS) | {"_rows_kernel"} <= kernels_seen
    assert not problems, "\n".join(problems)


@compiles
def test_default_amp_bf16_runs_all_gemms_on_bf16_tensor_cores():
    """The engine's default CUDA configuration (eo_uc, AMP bf16): every GEMM on bf16 operands."""
    flags, bias = engine_flag_sets(0.0)["eo_uc"]
    launches = aot.launches_for(512, 2048, 8142, "amp_bf16", flags, bias)
    gemms = [launch for launch in launches if launch.name in aot.GEMM_KERNELS]
    assert len(gemms) == 4 and all(launch.constexprs["MODE"] == hp.MODE_BF16 for launch in gemms)
    for arch in ARCHS:
        for launch, compiled in zip(gemms, aot.compile_launches(gemms, arch)):
            assert compiled.mma == ("wgmma" if arch >= 90 else "mma"), (launch.name, arch)


@compiles
def test_debug_label_assert_compiles():
    """flags.debug compiles tl.device_assert into the logits kernel (no spill either)."""
    flags = hp.HeadFlags(1.0, 1.0, True, 0.0, False, debug=True)
    (launch,) = [x for x in aot.launches_for(512, 2048, 1000, "amp_bf16", flags, False) if x.name == "_logits_kernel"]
    assert launch.constexprs["DEBUG"] is True
    c = aot.compile_launch(launch, 90, debug=True)
    assert c.spill_stores == 0 and c.mma == "wgmma"


@compiles
def test_detector_sees_spills_and_missing_tensor_cores():
    """The checks can fail: an oversized IEEE tile spills, and IEEE fp32 has no tensor-core instruction."""
    flags = hp.HeadFlags(1.0, 1.0, True, 0.0, False)
    (launch,) = [x for x in aot.launches_for(512, 2048, 8142, "fp32", flags, False) if x.name == "_grad_weight_kernel"]
    big = hp.Launch(launch.kernel, launch.grid, launch.args,
                    {**launch.constexprs, "BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_D": 128}, 4, 2)
    c = aot.compile_launch(big, 80)
    assert c.spill_stores > 0 and c.mma == "" and c.ffma > 0
