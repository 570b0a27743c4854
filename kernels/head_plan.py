"""Launch plan of the fused head: its options, GEMM precision, tiles, row chunks and kernel launches.

`HeadFlags` holds every scalar option of the op; it is the one object that carries them from the
public entry points through the custom ops (whose schema it defines) to the plans. `HeadShape` is
what the forward plan, the backward plan and the traffic model (`kernels.head_traffic`) derive alike
from the shapes, dtypes and flags: the GEMM mode, the tiles and the row chunks.

Launches per row chunk, in order (kernels in `kernels.fused_head_triton`):
    forward   _logits_kernel         grid M/BM × K/BN   z tile on chip; õ, softmax and UC partials
              _rows_kernel           grid M             lse, row losses, per-class stats, UC merge
    backward  _dz_kernel             grid M/BM × K/BN   z tile again; dz = softmax − target
              _grad_features_kernel  grid M/BM × d/BD   dF = g·dz·W/B (+ center term)
              _grad_weight_kernel    grid d/BD × K/BN   dW, dC, dB (finalize as its epilogue)
The forward adds the loss sum (and, when the stats are asked for, their zero-fill) as torch
kernels: at one chunk every method launches ≤ 4 kernels forward and 3 backward. The batch is split
into row chunks so that the backward's (chunk, K) dz scratch stays under 512 MiB: no (B, K) buffer
exists, and at the benchmark shapes (B = 512, K ≤ 131072) one chunk holds the whole batch.

GEMM precision: one operand dtype for the three GEMMs (z = f·Wᵀ, dF = dz·W, dW = dzᵀ·F), loaded
in the storage dtype, converted in registers, accumulated in fp32; softmax/CE/UC math is fp32:

    | features | weight/centers | GEMM operands (`gemm_mode`)                  | dz stored as |
    |----------|----------------|----------------------------------------------|--------------|
    | bf16     | bf16 or fp32   | bf16 tensor cores (AMP: W cast in registers) | bf16         |
    | fp16     | fp16 or fp32   | fp16 tensor cores                            | fp16         |
    | fp32     | bf16 / fp16    | that low-precision dtype                     | that dtype   |
    | fp32     | fp32           | TF32 tensor cores if tf32, else IEEE fp32    | fp32         |

dz is stored without the 1/B factor (|dz| ≤ 1), so fp16 loses only probabilities below its
subnormal range (< 6e-8), as an autocast fp16 linear's backward would. Under the interpreter
(TRITON_INTERPRET=1) the bf16/fp16 modes round the operands and multiply in fp32 (numpy has no
bf16 dot).

Planning runs no kernel and reads no tensor: with meta tensors it gives the launches that
`kernels.aot` compiles ahead of time for sm_90 / sm_80.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

try:  # Triton is a Linux-only dependency; without it only the torch backend exists.
    import triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    HAS_TRITON = False

# Decided when this module is imported, as Triton does when decorating the kernels
# (same truthy spellings as Triton's boolean environment knobs).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

if HAS_TRITON:
    from kernels.fused_head_triton import (
        _dz_kernel,
        _grad_features_kernel,
        _grad_weight_kernel,
        _logits_kernel,
        _rows_kernel,
    )

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# GEMM operand modes (constexpr MODE of `_mma`).
MODE_IEEE = 0  # fp32 operands, exact fp32 FMA products
MODE_TF32 = 1  # fp32 operands on TF32 tensor cores
MODE_BF16 = 2  # bf16 operands (cast in registers), fp32 accumulation
MODE_FP16 = 3  # fp16 operands (cast in registers), fp32 accumulation
MODE_BF16_EMULATED = 4  # interpreter: operands rounded to bf16, multiplied in fp32
MODE_FP16_EMULATED = 5  # interpreter: operands rounded to fp16, multiplied in fp32
TENSOR_CORE_MODES = (MODE_TF32, MODE_BF16, MODE_FP16)

# Triton compile options of flags.debug: device assertions on; Triton's integer-overflow
# sanitizer (on by default with debug) off — it fails to compile `d0 + tl.arange(...)` loops.
DEBUG_OPTIONS = {"debug": True, "sanitize_overflow": False}

# Row-chunk size: the backward's (chunk, K) dz scratch stays under this many bytes.
CHUNK_BYTES = 512 * 2**20

# Op-schema type of each HeadFlags field type (ints are SymInt, as torch.library infers them).
_SCHEMA_TYPES = {"float": "float", "bool": "bool", "int": "SymInt"}


@dataclass(frozen=True)
class HeadFlags:
    """Every scalar option of the op, in the custom ops' schema order (their one definition).

    tf32: -1 follows torch.backends.cuda.matmul.allow_tf32, 0 = IEEE fp32, 1 = TF32 (fp32 inputs only).
    debug: in-kernel label range assertion (tl.device_assert) on CUDA.
    stats: also return the batch's per-class feature sums (K, d) and counts (K,).
    chunk_rows: > 0 forces the row-chunk size (tests)."""

    lambda_center: float = 1.0
    lambda_uniform: float = 1.0
    use_offset: bool = True
    label_smoothing: float = 0.0
    center_grad: bool = True
    chunk_rows: int = 0
    tf32: int = -1
    debug: bool = False
    stats: bool = False

    @classmethod
    def of(cls, lambda_center=1.0, lambda_uniform=1.0, *, use_offset=True, label_smoothing=0.0, center_grad=True,
           chunk_rows=0, tf32: bool | None = None, debug=False, stats=False) -> HeadFlags:
        """The flags of a public entry point's arguments, in the schema's types (tf32 None → -1)."""
        return cls(float(lambda_center), float(lambda_uniform), bool(use_offset), float(label_smoothing),
                   bool(center_grad), int(chunk_rows), -1 if tf32 is None else int(bool(tf32)), bool(debug),
                   bool(stats))

    @classmethod
    def schema(cls) -> str:
        """The flags' part of a custom op schema: "float lambda_center, ..., bool stats"."""
        return ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in fields(cls))

    def op_args(self) -> tuple:
        """The flags as the custom ops take them: positional, in field order."""
        return tuple(getattr(self, f.name) for f in fields(self))

    @property
    def center(self) -> bool:
        return self.lambda_center != 0.0

    @property
    def uniform(self) -> bool:
        return self.lambda_uniform != 0.0

    @property
    def smooth(self) -> bool:
        return self.label_smoothing != 0.0

    @property
    def need_off(self) -> bool:
        """õ appears in the loss: in the logits (use_offset) or in the uniform constraint."""
        return self.use_offset or self.uniform

    @property
    def c_grad(self) -> bool:
        """c takes a gradient only when asked and when it appears in the loss at all."""
        return bool(self.center_grad) and (self.need_off or self.center)

    @property
    def sums(self) -> bool:
        """Per-class sums S_k are computed when returned or needed by dC's center term."""
        return self.stats or (self.c_grad and self.center)


class HeadInputs(NamedTuple):
    """The op's tensor inputs, in its schema order."""

    features: Tensor  # (B, d)
    weight: Tensor  # (K, d)
    centers: Tensor  # (K, d)
    labels: Tensor  # (B,) int64 or int32
    bias: Optional[Tensor]  # (K,) or None

    def prepared(self) -> HeadInputs:
        """Contiguous tensors and int64 labels, as the kernels index them."""
        return HeadInputs(self.features.contiguous(), self.weight.contiguous(), self.centers.contiguous(),
                          self.labels.to(torch.int64).contiguous(),
                          self.bias.contiguous() if self.bias is not None else None)


class Saved(NamedTuple):
    """What the forward leaves for the backward (empty (0,) tensors when the flags need none)."""

    lse: Tensor  # (B,) fp32: each row's log-sum-exp of the logits (the backward's softmax)
    off: Tensor  # (K,) fp32 õ (flags.need_off), else (0,)
    ucs: Tensor  # (2,) fp32 (lse_q, UC) of the uniform constraint, else (0,)
    stats: Tensor  # (K·d + K,) fp32: per-class sums (K, d) then counts (K,) (flags.sums), else (0,)


def _empty(shape, dtype, device) -> Tensor:
    """Allocation of every buffer the kernels fully overwrite (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------- precision


def gemm_mode(features_dtype: torch.dtype, weight_dtype: torch.dtype, tf32: bool, interpret: bool = False) -> int:
    """The operand mode of all three GEMMs (table in the module docstring): the low-precision
    dtype of the features (autocast's dtype) or else of the weight; fp32 → TF32 or IEEE."""
    low = next((t for t in (features_dtype, weight_dtype) if t in (torch.bfloat16, torch.float16)), None)
    if low is None:
        return MODE_IEEE if (interpret or not tf32) else MODE_TF32
    if low == torch.bfloat16:
        return MODE_BF16_EMULATED if interpret else MODE_BF16
    return MODE_FP16_EMULATED if interpret else MODE_FP16


def dz_dtype(mode: int) -> torch.dtype:
    """dz is stored in the GEMM operand dtype (the kernels would cast it to that anyway)."""
    if mode in (MODE_BF16, MODE_BF16_EMULATED):
        return torch.bfloat16
    if mode in (MODE_FP16, MODE_FP16_EMULATED):
        return torch.float16
    return torch.float32


def resolve_tf32(flag: int) -> bool:
    """HeadFlags.tf32 as a bool: -1 reads torch.backends.cuda.matmul.allow_tf32 now."""
    return bool(torch.backends.cuda.matmul.allow_tf32) if flag < 0 else bool(flag)


# --------------------------------------------------------------------------- tiles and row chunks


@dataclass(frozen=True)
class Tiles:
    m: int  # rows of the batch per program (BLOCK_M)
    n: int  # classes per program (BLOCK_N / BLOCK_K over K)
    d: int  # feature columns per program / per step (BLOCK_D)
    warps: int
    stages: int


# Compiled configs, chosen so that every specialization compiles without register spills
# and within sm_80's 163 KiB of shared memory (tests/test_fused_head_aot.py proves it;
# `python -m kernels.aot` prints registers / spills / shared / MMA per kernel).
# IEEE fp32 runs on FMA units: its accumulators live in registers, so its tiles are small.
# The logits tiles serve both z-tile kernels (_logits_kernel, _dz_kernel).
_GPU_TILES = {
    # kernel:        {mode: tiles}
    "logits": {
        MODE_BF16: Tiles(128, 128, 64, 8, 3), MODE_FP16: Tiles(128, 128, 64, 8, 3),
        MODE_TF32: Tiles(128, 128, 32, 8, 3), MODE_IEEE: Tiles(64, 64, 16, 4, 2),
    },
    "grad_features": {
        MODE_BF16: Tiles(64, 64, 128, 4, 3), MODE_FP16: Tiles(64, 64, 128, 4, 3),
        MODE_TF32: Tiles(64, 32, 128, 4, 3), MODE_IEEE: Tiles(32, 32, 64, 4, 2),
    },
    "grad_weight": {
        MODE_BF16: Tiles(64, 128, 128, 8, 3), MODE_FP16: Tiles(64, 128, 128, 8, 3),
        MODE_TF32: Tiles(32, 128, 128, 8, 3), MODE_IEEE: Tiles(16, 64, 64, 4, 2),
    },
}
_INTERPRET_TILES = Tiles(64, 128, 64, 4, 1)  # interpreter: big blocks, few loop iterations


def _tiles(kernel: str, mode: int, interpret: bool) -> Tiles:
    return _INTERPRET_TILES if interpret else _GPU_TILES[kernel][mode]


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class HeadShape:
    """Sizes, GEMM mode, tiles and row chunks of one call: what both plans and the traffic model share."""

    B: int
    D: int
    K: int
    mode: int
    interpret: bool
    logits: Tiles  # _logits_kernel and _dz_kernel
    grad_features: Tiles
    grad_weight: Tiles
    chunk_rows: int  # rows per chunk (the last chunk may hold fewer)
    chunks: int

    @property
    def class_tiles(self) -> int:
        """NT: the logits kernel's class tiles, each leaving one softmax partial per row."""
        return cdiv(self.K, self.logits.n)

    def row_chunks(self):
        """(index, first row, rows) of each row chunk."""
        for i, r0 in enumerate(range(0, self.B, self.chunk_rows)):
            yield i, r0, min(self.chunk_rows, self.B - r0)


def head_shape(B: int, D: int, K: int, features_dtype: torch.dtype, weight_dtype: torch.dtype, flags: HeadFlags,
               interpret: bool | None = None) -> HeadShape:
    """The HeadShape of (B, d) features and (K, d) weights under `flags` (interpret: None = INTERPRET)."""
    interpret = INTERPRET if interpret is None else interpret
    mode = gemm_mode(features_dtype, weight_dtype, resolve_tf32(flags.tf32), interpret)
    logits, grad_features, grad_weight = (_tiles(k, mode, interpret) for k in ("logits", "grad_features", "grad_weight"))
    if not interpret and flags.c_grad:  # the dC epilogue gets narrower d tiles: no spills
        grad_weight = replace(grad_weight, d=min(grad_weight.d, 64))
    chunk = flags.chunk_rows
    if chunk <= 0:  # the largest multiple of the logits row tile whose dz scratch fits CHUNK_BYTES
        m = logits.m
        chunk = max(m, (CHUNK_BYTES // (K * dz_dtype(mode).itemsize)) // m * m)
    chunk = min(B, chunk)
    return HeadShape(B, D, K, mode, interpret, logits, grad_features, grad_weight, chunk, cdiv(B, chunk))


# --------------------------------------------------------------------------- launches


@dataclass
class Launch:
    """One kernel launch: what the launcher runs and what the AOT test compiles."""

    kernel: Any  # triton.JITFunction
    grid: tuple
    args: tuple  # runtime arguments in the kernel's order (tensors, ints, floats)
    constexprs: dict
    num_warps: int
    num_stages: int = 1

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def run(self, debug: bool = False) -> None:
        opts = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if debug:  # on CUDA only: compiles tl.device_assert in (the interpreter ignores it)
            opts.update(DEBUG_OPTIONS)
        self.kernel[self.grid](*self.args, **self.constexprs, **opts)


@dataclass
class Plan:
    """Every launch of one forward, in order, and the buffers it fills (`saved` for the backward)."""

    launches: list
    rowloss: Tensor  # (B,) or (B + 1,) with λ2·UC last: loss = rowloss.sum()
    saved: Saved
    shape: HeadShape


@dataclass
class BackwardPlan:
    """Every launch of one backward, in order, and the gradients it writes."""

    launches: list
    dF: Tensor
    dW: Tensor
    dC: Tensor  # (K, d) when flags.c_grad, else (0,)
    dB: Tensor  # (K,) with a bias, else (0,)


def _shape_of(inputs: HeadInputs, flags: HeadFlags, interpret: bool | None) -> HeadShape:
    B, D = inputs.features.shape
    return head_shape(B, D, inputs.weight.shape[0], inputs.features.dtype, inputs.weight.dtype, flags, interpret)


def plan_forward(inputs: HeadInputs, flags: HeadFlags, *, interpret: bool | None = None) -> Plan:
    """Allocate the outputs/scratch and list the launches of one forward. No kernel runs and no
    tensor is read here (meta tensors work: tests/test_fused_head_aot.py compiles these launches).
    Expects `HeadInputs.prepared` inputs (contiguous, int64 labels)."""
    f, w, c, y, b = inputs
    s = _shape_of(inputs, flags, interpret)
    B, D, K, NT, t = s.B, s.D, s.K, s.class_tiles, s.logits
    dev, f32 = f.device, torch.float32
    dummy = torch.empty(1, dtype=f32, device=dev)  # every pointer the flags leave unread
    off = _empty((K,), f32, dev) if flags.need_off else torch.empty(0, dtype=f32, device=dev)
    ucp = _empty((NT * 3,), f32, dev) if flags.uniform else dummy  # UC stage-1 partials, 3 per class tile
    ucs = _empty((2,), f32, dev) if flags.uniform else torch.empty(0, dtype=f32, device=dev)
    pmax, psum = _empty((s.chunk_rows, NT), f32, dev), _empty((s.chunk_rows, NT), f32, dev)
    pz = _empty((s.chunk_rows, NT), f32, dev) if flags.smooth else dummy
    zy = _empty((s.chunk_rows,), f32, dev)
    lse = _empty((B,), f32, dev)
    rowloss = _empty((B + 1 if flags.uniform else B,), f32, dev)
    if flags.sums:  # one zero-fill for both accumulators
        stats = torch.zeros(K * D + K, dtype=f32, device=dev)
        sums_arg, counts_arg = stats[: K * D], stats[K * D:]
    else:
        stats = torch.empty(0, dtype=f32, device=dev)
        sums_arg = counts_arg = dummy
    bias_arg = b if b is not None else dummy
    off_arg = off if flags.need_off else dummy
    ucs_arg = ucs if flags.uniform else dummy

    launches = []
    for _, r0, M in s.row_chunks():
        launches.append(Launch(
            _logits_kernel, (cdiv(M, t.m), NT),
            (f, w, c, off_arg, ucp, bias_arg, y, pmax, psum, pz, zy, r0, M, K, D, NT),
            dict(USE_OFFSET=flags.use_offset, NEED_OFF=flags.need_off, UNIFORM=flags.uniform, HAS_BIAS=b is not None,
                 SMOOTH=flags.smooth, MODE=s.mode, DEBUG=bool(flags.debug) and not s.interpret,
                 BLOCK_M=t.m, BLOCK_N=t.n, BLOCK_D=t.d),
            t.warps, t.stages,
        ))
        launches.append(Launch(
            _rows_kernel, (M,),
            (pmax, psum, pz, zy, f, c, y, ucp, ucs_arg, lse, rowloss, sums_arg, counts_arg,
             r0, B, K, D, NT, 1.0 / B, float(flags.label_smoothing), float(flags.lambda_center),
             float(flags.lambda_uniform)),
            dict(SMOOTH=flags.smooth, CENTER=flags.center, UNIFORM=flags.uniform, STATS=flags.sums,
                 BLOCK_T=_pow2(NT, 16, 1024), BLOCK_D=_pow2(D, 16, 1024)),
            4,
        ))
    return Plan(launches, rowloss, Saved(lse, off, ucs, stats), s)


def plan_backward(g: Tensor, inputs: HeadInputs, saved: Saved, flags: HeadFlags, *,
                  interpret: bool | None = None) -> BackwardPlan:
    """The launches of one backward (per row chunk: dz recompute, dF, dW/dC/dB), from the forward's
    `saved` tensors and g = grad_output (a 0-dim device tensor, read in-kernel). Like
    `plan_forward`, runs and reads nothing (meta tensors work)."""
    f, w, c, y, b = inputs
    s = _shape_of(inputs, flags, interpret)
    B, D, K = s.B, s.D, s.K
    dev, f32 = f.device, torch.float32
    dummy = torch.empty(1, dtype=f32, device=dev)  # every pointer the flags leave unread
    dz = _empty((s.chunk_rows, K), dz_dtype(s.mode), dev)
    dF = _empty((B, D), f.dtype, dev)
    dW = _empty((K, D), w.dtype, dev)
    if s.chunks == 1:
        acc = dummy
    else:  # accumulator across row chunks: dW itself when fp32, else an fp32 scratch
        acc = dW if w.dtype == f32 else _empty((K, D), f32, dev)
    need_colsum = flags.use_offset or b is not None  # Σ_i dz_ik feeds ∂L/∂õ and dB
    dzsum = _empty((K,), f32, dev) if (need_colsum and s.chunks > 1) else dummy
    dC = _empty((K, D), c.dtype, dev) if flags.c_grad else torch.empty(0, dtype=c.dtype, device=dev)
    dB = _empty((K,), b.dtype, dev) if b is not None else torch.empty(0, dtype=f32, device=dev)
    off_arg = saved.off if flags.need_off else dummy
    ucs_arg = saved.ucs if flags.uniform else dummy
    sums_arg, counts_arg = (saved.stats[: K * D], saved.stats[K * D:]) if flags.sums else (dummy, dummy)
    bias_arg, dB_arg = (b, dB) if b is not None else (dummy, dummy)
    dC_arg = dC if flags.c_grad else dummy

    inv_b, center_scale = 1.0 / B, 2.0 * float(flags.lambda_center) / B
    t_dz, t_gf, t_gw = s.logits, s.grad_features, s.grad_weight
    launches = []
    for i, r0, M in s.row_chunks():
        launches.append(Launch(
            _dz_kernel, (cdiv(M, t_dz.m), cdiv(K, t_dz.n)),
            (f, w, off_arg, bias_arg, y, saved.lse, dz, r0, M, K, D, float(flags.label_smoothing)),
            dict(USE_OFFSET=flags.use_offset, HAS_BIAS=b is not None, SMOOTH=flags.smooth, MODE=s.mode,
                 BLOCK_M=t_dz.m, BLOCK_N=t_dz.n, BLOCK_D=t_dz.d),
            t_dz.warps, t_dz.stages,
        ))
        launches.append(Launch(
            _grad_features_kernel, (cdiv(M, t_gf.m), cdiv(D, t_gf.d)),
            (dz, w, f, c, y, g, dF, r0, M, K, D, inv_b, center_scale),
            dict(CENTER=flags.center, MODE=s.mode, BLOCK_M=t_gf.m, BLOCK_K=t_gf.n, BLOCK_D=t_gf.d),
            t_gf.warps, t_gf.stages,
        ))
        launches.append(Launch(
            _grad_weight_kernel, (cdiv(D, t_gw.d), cdiv(K, t_gw.n)),
            (dz, f, w, c, off_arg, ucs_arg, sums_arg, counts_arg, g, acc, dzsum, dW, dC_arg, dB_arg,
             r0, M, K, D, inv_b, float(flags.lambda_uniform), center_scale, int(i == 0), int(i == s.chunks - 1)),
            dict(USE_OFFSET=flags.use_offset, UNIFORM=flags.uniform, CENTER=flags.center,
                 CENTER_GRAD=flags.c_grad, HAS_BIAS=b is not None, MODE=s.mode,
                 BLOCK_M=t_gw.m, BLOCK_N=t_gw.n, BLOCK_D=t_gw.d),
            t_gw.warps, t_gw.stages,
        ))
    return BackwardPlan(launches, dF, dW, dC, dB)
