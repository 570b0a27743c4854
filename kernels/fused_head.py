"""Fused Triton implementation of the estimated-offset head loss (Eq. 6 of the EO paper).

Same definition as `kernels.reference.offset_head_loss` (read that file first):

    f_i  (B, d) features        w_k (K, d) class weights      c_k (K, d) class centers
    õ_k  = ½ c_k·w_k                                   estimated offset, (K,)
    z_ik = w_k·f_i − õ_k (+ b_k)                       logits (the −õ only with use_offset)
    L    = 1/B Σ_i CE_ε(z_i, y_i)                       cross-entropy, label smoothing ε
         + λ1 · 1/B Σ_i ‖f_i − c_{y_i}‖²                center loss
         + λ2 · Σ_k p_k log p_k,  p = softmax(−õ)       uniform constraint (Eq. 5)

Design (after Apple's Cut Cross-Entropy and Liger-Kernel's fused linear cross-entropy,
not their code). The forward computes the loss, each row's log-sum-exp and the per-class
stats, and never stores a logit; the backward recomputes the logit tile from f and W,
forms dz in registers from the saved lse, and runs the two gradient GEMMs with
g_loss = grad_output read *on the device* and folded into their fp32 1/B scale (no host
sync, CUDA-graph capturable, no scaling pass over dF and dW). The batch is processed in row
chunks so that only the backward's (chunk, K) dz scratch exists, never a (B, K) buffer;
at the benchmark shapes (B=512, K ≤ 131072) one chunk holds the whole batch.

Kernels, in launch order (one launch each per row chunk; `plan_forward` / `plan_backward`):
  forward
    _logits_kernel        z tile = f·Wᵀ − õ + b on tensor cores, kept on chip; õ = ½ c·w is
                          computed from the W tile the GEMM loads plus the C tile (no separate
                          offset pass over W); writes õ, the uniform constraint's per-tile
                          partials (stage 1 of 2), per-row softmax partials of the tile
                          (m_t, Σe^{z−m_t}, Σz) and z_{i,y_i}                   grid M/BM × K/BN
    _rows_kernel          merges the partials (online softmax) into lse (saved), row loss
                          CE_ε + λ1‖f−c_y‖², per-class sums/counts (atomics) when asked, and the
                          uniform constraint's stage 2 (first program)         grid M
    loss = Σ row losses (+ λ2·UC, the last entry): one torch reduction (+ the stats zero-fill).
  backward (g = grad_output, a 0-dim device tensor)
    _dz_kernel            z tile again (same GEMM, õ loaded), dz = e^{z−lse} − (1−ε)[k=y] − ε/K
                          stored in the GEMM dtype (unscaled)                  grid M/BM × K/BN
    _grad_features_kernel dF = g·dz·W/B (+ g·2λ1/B (f − c_y))                  grid M/BM × d/BD
    _grad_weight_kernel   dW = g·dzᵀ·F/B + ½ c ∂L/∂õ, dC, dB, Σ_i dz_ik: the finalize is its
                          epilogue (an fp32 accumulator only across row chunks, only when dW
                          itself is not fp32)                                  grid d/BD × K/BN
Launches (eo_uc): forward 3 (logits, rows, loss sum; 4 with the stats zero-fill), backward 3
(dz, grad_features, grad_weight; grad_output is read in-kernel in its own dtype), per row chunk for
the Triton kernels. Every method: forward ≤ 4, backward 3. No host sync: labels are validated on
the host only when they live on the CPU (free), else in-kernel with tl.device_assert (flags.debug).

Why this split (issue 11 asked for ≤ 2× the ideal traffic; the previous design, every gradient
in the forward + a backward `grad * g_loss` pass, modelled 2.15–2.48×):
  (a) Cut Cross-Entropy, taken: no fp32 (B, K) logits round trip (−8·B·K bytes), no scaling
      pass (−2·(|f| + |W|)), at the price of one more read of f and W (the recompute) — and
      the separate offset pass is folded into the logits kernel (−|W|). Modelled 1.55–1.88×.
      FLOPs: 8·B·K·d instead of 6·B·K·d (+33%: the logits GEMM runs twice) plus 2·K·d·B/BM
      for õ (each of the B/BM row tiles recomputes it from its W and C tiles, ≤ 0.2% at
      B/BM = 4). On an H100's data-sheet limits (989 TFLOP/s dense bf16, 3.35 TB/s) the
      roofline floor max(FLOPs/rate, bytes/bandwidth) at (512, 2048, K) goes, in µs, for
      bf16: 17.6 → 13.3 (K=1000), 103 → 72 (8142), 1570 → 1112 (131072); AMP-bf16: 27 → 22,
      182 → 133, 2854 → 2052. The new arithmetic intensity is 190–300 FLOP/B (bf16) and
      115–160 (AMP), at or below the ~295 ridge: the extra FLOPs cost less than the bytes saved.
  (b) Keeping the gradient GEMMs in the forward but folding g_loss "into something that must
      read/write anyway": no such pass exists — after the forward nothing reads dF or dW
      again except the autograd engine — so the scale costs 2·(|f| + |W|) whatever it is
      fused into. Deferring only the gradient GEMMs to the backward (forward writes dz, the
      backward reads it with g folded into 1/B) would model ~1.67–1.96× with 6·B·K·d FLOPs,
      but dz would have to live from forward to backward: a (B, K) buffer (128 MB at K=131072,
      GB at larger B), which the row chunking exists to avoid.
  (c) One backward kernel producing dF and dW with atomics (CCE's own backward) needs fp32
      (B, d) and (K, d) accumulators — the fp32 K×d scratch issue 11 rules out for bf16 W —
      and atomics traffic the model cannot bound honestly; not taken.

GEMM precision — one operand dtype for all GEMMs (z = f·Wᵀ in the forward and again in the
backward, dF = dz·W, dW = dzᵀ·F),
loaded in the storage dtype and converted in registers, always accumulated in fp32;
the softmax/CE/UC math is fp32 everywhere:

    | features   | weight/centers | GEMM operands               | dz stored as |
    |------------|----------------|-----------------------------|--------------|
    | bf16       | bf16 or fp32   | bf16 tensor cores (AMP: W   | bf16         |
    |            | (AMP)          | tile cast in registers)     |              |
    | fp16       | fp16 or fp32   | fp16 tensor cores           | fp16         |
    | fp32       | bf16 / fp16    | that low-precision dtype    | that dtype   |
    | fp32       | fp32           | TF32 tensor cores if tf32   | fp32         |
    |            |                | (flags.tf32, default torch. |              |
    |            |                | backends.cuda.matmul.       |              |
    |            |                | allow_tf32), else IEEE fp32 |              |
    |            |                | FMA with small tiles        |              |

dz is stored without the 1/B factor (|dz| ≤ 1), so fp16 loses only probabilities below
fp16's subnormal range (< 6e-8), as an autocast fp16 linear's backward would; 1/B is
applied to the fp32 accumulators. Under the interpreter (TRITON_INTERPRET=1) bf16/fp16
modes round the operands to that dtype and multiply in fp32 (numpy has no bf16 dot).

Gradient derivation (everything is divided by B):
    CE_ε(z_i, y) = lse(z_i) − (1−ε) z_iy − ε/K Σ_k z_ik
    dz_ik = softmax(z_i)_k − (1−ε)[k = y_i] − ε/K;      ∂L/∂z_ik = dz_ik / B
    ∂L/∂f_i = Σ_k dz_ik w_k / B,   ∂L/∂w_k = Σ_i dz_ik f_i / B,   ∂L/∂b_k = Σ_i dz_ik / B
    ∂L/∂õ_k += −Σ_i dz_ik / B  (use_offset)
    center loss: ∂L/∂f_i += 2λ1/B (f_i − c_{y_i}),  ∂L/∂c_k += −2λ1/B (S_k − n_k c_k)
        S_k = Σ_{i: y_i=k} f_i, n_k the class count (also Wen's update statistics)
    uniform constraint UC = Σ_k p_k log p_k, p = softmax(q), q = −õ:
        with m = max q, s = Σ e^{q−m}, t = Σ e^{q−m} q (merged over CTAs):
        lse = m + log s,  UC = t/s − lse,   ∂UC/∂õ_j = −p_j (log p_j − UC),  ∂L/∂õ += λ2 ∂UC/∂õ
    õ_k = ½ c_k·w_k ⇒ ∂L/∂w_k += ½ c_k ∂L/∂õ_k,  ∂L/∂c_k += ½ w_k ∂L/∂õ_k
    center_grad=False: c is a constant (the reference's `c.detach()`).

HBM traffic — `modelled_bytes` (the numbers below are its output; its keys are exactly the
launches of `plan_forward` + `plan_backward`, a test checks it). Each kernel's docstring
(kernels/fused_head_triton.py) gives its bytes/FLOPs; the model counts every tensor once per
kernel, which holds because each grid is ordered (program id 0 fastest) so that programs
sharing the large operand tile run side by side and share it through L2 (logits / dz: the
M/BM programs of one W tile; grad_features: the M/BM programs of one W column slab;
grad_weight: the d/BD programs of one dz column slab).
Ideal = read f and W twice, C once (offset), write dF and dW, logits streamed once in the
feature dtype. Engine default (eo_uc, center_grad=False, no stats), B=512, d=2048, per fwd+bwd:

    | dtype (f / W)  | K      | modelled GB | ideal GB | ratio |
    |----------------|--------|-------------|----------|-------|
    | bf16 / bf16    | 1000   | 0.0445      | 0.0237   | 1.88  |
    | bf16 / bf16    | 8142   | 0.242       | 0.148    | 1.64  |
    | bf16 / bf16    | 131072 | 3.65        | 2.29     | 1.60  |
    | bf16 / fp32    | 1000   | 0.0733      | 0.0401   | 1.83  |
    | bf16 / fp32    | 8142   | 0.447       | 0.281    | 1.59  |
    | bf16 / fp32    | 131072 | 6.88        | 4.44     | 1.55  |
    | fp32 / fp32    | 1000   | 0.0889      | 0.0474   | 1.88  |
    | fp32 / fp32    | 8142   | 0.484       | 0.296    | 1.64  |
    | fp32 / fp32    | 131072 | 7.29        | 4.58     | 1.59  |
(regenerate: `python -c "from kernels import fused_head; print(fused_head._traffic_table())"`;
fp16 and AMP-fp16 give the bf16 / AMP-bf16 numbers, TF32 the fp32 ones: 1.55–1.88× for all,
tests/test_fused_head.py asserts ≤ 2× for every precision).
Per kernel at bf16 / fp32 (AMP), K=131072 (GB): logits 2.15 (W and C, for õ), rows 0.01,
dz 1.21 (W, dz), grad_features 1.22 (dz, W), grad_weight 2.28 (dz, C for ½c∂L/∂õ, dW).
What is left above the ideal: dz written once and read twice in the GEMM dtype (the ideal
streams logits once) and the third read of W (the backward's recompute).

Entry points:
    fused_offset_head_loss(...)              -> loss              (autograd-aware)
    fused_offset_head_loss_with_stats(...)   -> (loss, sums, counts)
    offset_head_loss(..., backend="auto")    dispatcher: "triton" | "torch" | "auto"
The work is two custom ops (torch.library), `lt_engine::fused_offset_head_cce` (forward: loss,
lse, õ, UC statistics, per-class stats) and `lt_engine::fused_offset_head_cce_backward` (grad_output
→ dF, dW, dC, dB), each with a fake implementation, joined by an autograd formula:
torch.compile traces both without a graph break,
and it captures in a CUDA graph (no host sync, no data-dependent shape).
"""

from __future__ import annotations

import os
from dataclasses import astuple, dataclass, fields, replace
from typing import Any, Optional

import torch
from torch import Tensor

from kernels import reference as _ref

try:  # Triton is a Linux-only dependency; without it only the torch backend exists.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

# Decided when this module is imported, as Triton does when decorating the kernels
# (same truthy spellings as Triton's boolean environment knobs).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

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

# Row-chunk size: the (chunk, K) fp32 logits + dz scratch stays under this many bytes.
_CHUNK_BYTES = 512 * 2**20


@dataclass(frozen=True)
class HeadFlags:
    """Every scalar option of the op, in the custom op's schema order (its one definition).

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
    def c_grad(self) -> bool:
        """c takes a gradient only when asked and when it appears in the loss at all."""
        return bool(self.center_grad) and (self.use_offset or self.uniform or self.center)

    @property
    def sums(self) -> bool:
        """Per-class sums S_k are computed when returned or needed by dC's center term."""
        return self.stats or (self.c_grad and self.center)

    def op_args(self) -> tuple:
        return astuple(self)


def _empty(shape, dtype, device) -> Tensor:
    """Allocation of every buffer the kernels fully overwrite (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


if HAS_TRITON:
    from kernels.fused_head_triton import (
        _dz_kernel,
        _grad_features_kernel,
        _grad_weight_kernel,
        _logits_kernel,
        _rows_kernel,
    )


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


def _dz_dtype(mode: int) -> torch.dtype:
    """dz is stored in the GEMM operand dtype (the kernels would cast it to that anyway)."""
    if mode in (MODE_BF16, MODE_BF16_EMULATED):
        return torch.bfloat16
    if mode in (MODE_FP16, MODE_FP16_EMULATED):
        return torch.float16
    return torch.float32


def _resolve_tf32(flag: int) -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32) if flag < 0 else bool(flag)


# --------------------------------------------------------------------------- tile configs


@dataclass(frozen=True)
class _Tiles:
    m: int  # rows of the batch per program (BLOCK_M)
    n: int  # classes per program (BLOCK_N / BLOCK_K over K)
    d: int  # feature columns per program / per step (BLOCK_D)
    warps: int
    stages: int


# Compiled configs, chosen so that every specialization compiles without register spills
# and within sm_80's 163 KiB of shared memory (tests/test_fused_head_aot.py proves it;
# `python -m kernels.aot` prints registers / spills / shared / MMA per kernel).
# IEEE fp32 runs on FMA units: its accumulators live in registers, so its tiles are small.
_GPU_TILES = {
    # kernel:        {mode: tiles}
    "logits": {
        MODE_BF16: _Tiles(128, 128, 64, 8, 3), MODE_FP16: _Tiles(128, 128, 64, 8, 3),
        MODE_TF32: _Tiles(128, 128, 32, 8, 3), MODE_IEEE: _Tiles(64, 64, 16, 4, 2),
    },
    "grad_features": {
        MODE_BF16: _Tiles(64, 64, 128, 4, 3), MODE_FP16: _Tiles(64, 64, 128, 4, 3),
        MODE_TF32: _Tiles(64, 32, 128, 4, 3), MODE_IEEE: _Tiles(32, 32, 64, 4, 2),
    },
    "grad_weight": {
        MODE_BF16: _Tiles(64, 128, 128, 8, 3), MODE_FP16: _Tiles(64, 128, 128, 8, 3),
        MODE_TF32: _Tiles(32, 128, 128, 8, 3), MODE_IEEE: _Tiles(16, 64, 64, 4, 2),
    },
}
_INTERPRET_TILES = _Tiles(64, 128, 64, 4, 1)  # interpreter: big blocks, few loop iterations


def _tiles(kernel: str, mode: int, interpret: bool) -> _Tiles:
    return _INTERPRET_TILES if interpret else _GPU_TILES[kernel][mode]


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- launch plan


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
    """Every launch of one forward, in order, and the buffers it fills (saved for the backward)."""

    launches: list
    rowloss: Tensor  # (B,) or (B + 1,) with λ2·UC last: loss = rowloss.sum()
    lse: Tensor  # (B,) fp32: each row's log-sum-exp of the logits (the backward's softmax)
    off: Tensor  # (K,) fp32 õ (use_offset or uniform), else (0,)
    ucs: Tensor  # (2,) fp32 (lse_q, UC) of the uniform constraint, else (0,)
    stats: Tensor  # (K·d + K,) fp32: per-class sums (K, d) then counts (K,); (0,) when not needed
    mode: int
    chunk_rows: int


@dataclass
class BackwardPlan:
    """Every launch of one backward, in order, and the gradients it writes."""

    launches: list
    dF: Tensor
    dW: Tensor
    dC: Tensor  # (K, d) when flags.c_grad, else (0,)
    dB: Tensor  # (K,) with a bias, else (0,)


def _chunking(B: int, K: int, mode: int, flags: HeadFlags, interpret: bool) -> tuple[int, int]:
    """(rows per chunk, number of chunks): the backward's (chunk, K) dz scratch stays under
    _CHUNK_BYTES (the forward needs no (·, K) buffer, it is chunked alike for simplicity)."""
    chunk = flags.chunk_rows
    if chunk <= 0:
        m = _tiles("logits", mode, interpret).m
        chunk = max(m, (_CHUNK_BYTES // (K * _dz_dtype(mode).itemsize)) // m * m)
    M_max = min(B, chunk)
    return M_max, _cdiv(B, M_max)


def _plan_shape(features: Tensor, weight: Tensor, flags: HeadFlags, interpret: bool | None):
    """(interpret, B, D, K, GEMM mode, rows per chunk, chunks): what both plans derive alike."""
    interpret = INTERPRET if interpret is None else interpret
    B, D = features.shape
    K = weight.shape[0]
    mode = gemm_mode(features.dtype, weight.dtype, _resolve_tf32(flags.tf32), interpret)
    return (interpret, B, D, K, mode, *_chunking(B, K, mode, flags, interpret))


def plan_forward(
    features: Tensor, weight: Tensor, centers: Tensor, labels: Tensor, bias: Tensor | None, flags: HeadFlags,
    *, interpret: bool | None = None,
) -> Plan:
    """Allocate the outputs/scratch and list the launches of one forward. No kernel runs and no
    tensor is read here (meta tensors work: tests/test_fused_head_aot.py compiles these launches).
    Expects contiguous inputs and int64 labels (`_forward_impl` makes them so)."""
    interpret, B, D, K, mode, M_max, _ = _plan_shape(features, weight, flags, interpret)
    f, w, c, b, y = features, weight, centers, bias, labels
    dev = f.device
    f32 = torch.float32
    has_bias = b is not None
    t_log = _tiles("logits", mode, interpret)
    NT = _cdiv(K, t_log.n)

    dummy = torch.empty(1, dtype=f32, device=dev)
    need_off = flags.use_offset or flags.uniform
    off = _empty((K,), f32, dev) if need_off else torch.empty(0, dtype=f32, device=dev)
    ucp = _empty((NT * 3,), f32, dev) if flags.uniform else dummy
    ucs = _empty((2,), f32, dev) if flags.uniform else torch.empty(0, dtype=f32, device=dev)
    pmax = _empty((M_max, NT), f32, dev)
    psum = _empty((M_max, NT), f32, dev)
    pz = _empty((M_max, NT), f32, dev) if flags.smooth else dummy
    zy = _empty((M_max,), f32, dev)
    lse = _empty((B,), f32, dev)
    rowloss = _empty((B + 1 if flags.uniform else B,), f32, dev)
    if flags.sums:  # one zero-fill for both accumulators
        stats = torch.zeros(K * D + K, dtype=f32, device=dev)
        sums_arg, counts_arg = stats[: K * D], stats[K * D:]
    else:
        stats = torch.empty(0, dtype=f32, device=dev)
        sums_arg = counts_arg = dummy
    bias_arg = b if has_bias else dummy
    off_arg = off if need_off else dummy
    ucs_arg = ucs if flags.uniform else dummy

    launches = []
    bt = _pow2(NT, 16, 1024)
    for r0 in range(0, B, M_max):
        M = min(M_max, B - r0)
        launches.append(Launch(
            _logits_kernel, (_cdiv(M, t_log.m), NT),
            (f, w, c, off_arg, ucp, bias_arg, y, pmax, psum, pz, zy, r0, M, K, D, NT),
            dict(USE_OFFSET=flags.use_offset, NEED_OFF=need_off, UNIFORM=flags.uniform, HAS_BIAS=has_bias,
                 SMOOTH=flags.smooth, MODE=mode, DEBUG=bool(flags.debug) and not interpret,
                 BLOCK_M=t_log.m, BLOCK_N=t_log.n, BLOCK_D=t_log.d),
            t_log.warps, t_log.stages,
        ))
        launches.append(Launch(
            _rows_kernel, (M,),
            (pmax, psum, pz, zy, f, c, y, ucp, ucs_arg, lse, rowloss, sums_arg, counts_arg,
             r0, B, K, D, NT, 1.0 / B, float(flags.label_smoothing), float(flags.lambda_center),
             float(flags.lambda_uniform)),
            dict(SMOOTH=flags.smooth, CENTER=flags.center, UNIFORM=flags.uniform, STATS=flags.sums,
                 BLOCK_T=bt, BLOCK_D=_pow2(D, 16, 1024)),
            4,
        ))
    return Plan(launches, rowloss, lse, off, ucs, stats, mode, M_max)


def plan_backward(
    g: Tensor, features: Tensor, weight: Tensor, centers: Tensor, labels: Tensor, bias: Tensor | None,
    lse: Tensor, off: Tensor, ucs: Tensor, stats: Tensor, flags: HeadFlags, *, interpret: bool | None = None,
) -> BackwardPlan:
    """The launches of one backward (per row chunk: dz recompute, dF, dW/dC/dB), from the forward's
    saved lse / õ / UC statistics / per-class sums and g = grad_output (a 0-dim device tensor,
    read in-kernel). Like `plan_forward`, runs and reads nothing (meta tensors work)."""
    interpret, B, D, K, mode, M_max, n_chunks = _plan_shape(features, weight, flags, interpret)
    f, w, c, b, y = features, weight, centers, bias, labels
    dev = f.device
    f32 = torch.float32
    has_bias = b is not None
    t_dz, t_gf, t_gw = (_tiles(k, mode, interpret) for k in ("logits", "grad_features", "grad_weight"))
    if not interpret and flags.c_grad:  # the dC epilogue gets narrower d tiles: no spills
        t_gw = replace(t_gw, d=min(t_gw.d, 64))

    dummy = torch.empty(1, dtype=f32, device=dev)
    need_off = flags.use_offset or flags.uniform
    dz = _empty((M_max, K), _dz_dtype(mode), dev)
    dF = _empty((B, D), f.dtype, dev)
    dW = _empty((K, D), w.dtype, dev)
    if n_chunks == 1:
        acc = dummy
    else:  # accumulator across row chunks: dW itself when fp32, else an fp32 scratch
        acc = dW if w.dtype == f32 else _empty((K, D), f32, dev)
    need_colsum = flags.use_offset or has_bias
    dzsum = _empty((K,), f32, dev) if (need_colsum and n_chunks > 1) else dummy
    dC = _empty((K, D), c.dtype, dev) if flags.c_grad else torch.empty(0, dtype=c.dtype, device=dev)
    dB = _empty((K,), b.dtype, dev) if has_bias else torch.empty(0, dtype=f32, device=dev)
    bias_arg = b if has_bias else dummy
    off_arg = off if need_off else dummy
    ucs_arg = ucs if flags.uniform else dummy
    sums_arg, counts_arg = (stats[: K * D], stats[K * D:]) if flags.sums else (dummy, dummy)

    inv_b = 1.0 / B
    center_scale = 2.0 * float(flags.lambda_center) / B
    launches = []
    for i, r0 in enumerate(range(0, B, M_max)):
        M = min(M_max, B - r0)
        launches.append(Launch(
            _dz_kernel, (_cdiv(M, t_dz.m), _cdiv(K, t_dz.n)),
            (f, w, off_arg, bias_arg, y, lse, dz, r0, M, K, D, float(flags.label_smoothing)),
            dict(USE_OFFSET=flags.use_offset, HAS_BIAS=has_bias, SMOOTH=flags.smooth, MODE=mode,
                 BLOCK_M=t_dz.m, BLOCK_N=t_dz.n, BLOCK_D=t_dz.d),
            t_dz.warps, t_dz.stages,
        ))
        launches.append(Launch(
            _grad_features_kernel, (_cdiv(M, t_gf.m), _cdiv(D, t_gf.d)),
            (dz, w, f, c, y, g, dF, r0, M, K, D, inv_b, center_scale),
            dict(CENTER=flags.center, MODE=mode, BLOCK_M=t_gf.m, BLOCK_K=t_gf.n, BLOCK_D=t_gf.d),
            t_gf.warps, t_gf.stages,
        ))
        launches.append(Launch(
            _grad_weight_kernel, (_cdiv(D, t_gw.d), _cdiv(K, t_gw.n)),
            (dz, f, w, c, off_arg, ucs_arg, sums_arg, counts_arg, g, acc, dzsum, dW, dC if flags.c_grad else dummy,
             dB if has_bias else dummy,
             r0, M, K, D, inv_b, float(flags.lambda_uniform), center_scale, int(i == 0), int(i == n_chunks - 1)),
            dict(USE_OFFSET=flags.use_offset, UNIFORM=flags.uniform, CENTER=flags.center,
                 CENTER_GRAD=flags.c_grad, HAS_BIAS=has_bias, MODE=mode,
                 BLOCK_M=t_gw.m, BLOCK_N=t_gw.n, BLOCK_D=t_gw.d),
            t_gw.warps, t_gw.stages,
        ))
    return BackwardPlan(launches, dF, dW, dC, dB)


# --------------------------------------------------------------------------- traffic model


def modelled_bytes(
    B: int, D: int, K: int, features_dtype=torch.bfloat16, weight_dtype=torch.bfloat16, flags: HeadFlags | None = None,
    tf32: bool = True,
) -> dict:
    """HBM bytes per fwd+bwd of the fused head, per launch (keys: the Triton kernels of
    `plan_forward` then `plan_backward`, and the torch kernels `stats_memset`, `loss_sum`), as the
    kernels' docstrings count them (each tensor once per kernel: the grids are ordered for L2
    reuse of the shared operand), and the ideal: f and W read twice, C once (offset), dF and dW
    written, logits streamed once in the feature dtype. Centers and bias have W's dtype."""
    flags = flags or HeadFlags(lambda_center=1.0, lambda_uniform=1.0, use_offset=True, center_grad=False)
    ef, ew = features_dtype.itemsize, weight_dtype.itemsize
    mode = gemm_mode(features_dtype, weight_dtype, tf32)
    ez = _dz_dtype(mode).itemsize
    f, W, cy = B * D * ef, K * D * ew, B * D * ew  # features, weight (= centers), gathered c_y rows
    _, chunks = _chunking(B, K, mode, flags, False)
    NT = _cdiv(K, _tiles("logits", mode, False).n)
    need_off = flags.use_offset or flags.uniform
    parts = 3 if flags.smooth else 2
    out = {}
    # forward
    out["_logits_kernel"] = (f + chunks * (W + (W if need_off else 0)) + 4 * B * NT * parts + 4 * B
                             + (4 * K + 12 * NT if need_off else 0))
    out["_rows_kernel"] = (4 * B * NT * parts + 4 * B + (f if (flags.center or flags.sums) else 0)
                           + (cy if flags.center else 0) + 4 * B + 4 * B + (8 * B * D + 8 * B if flags.sums else 0))
    out["stats_memset"] = 4 * (K * D + K) if flags.sums else 0
    out["loss_sum"] = 4 * (B + 1)
    # backward
    out["_dz_kernel"] = f + chunks * W + ez * B * K + (4 * K if flags.use_offset else 0) + 4 * B
    out["_grad_features_kernel"] = ez * B * K + chunks * W + f + ((f + cy) if flags.center else 0)
    gw = ez * B * K + chunks * f + W + (W if need_off else 0)
    if chunks > 1:
        gw += (chunks - 1) * 2 * K * D * 4
    if flags.c_grad:
        gw += 3 * W + 4 * K * D
    out["_grad_weight_kernel"] = gw
    total = sum(out.values())
    ideal = 2 * (f + W) + (W if need_off else 0) + f + W + B * K * ef
    return dict(kernels=out, total=total, ideal=ideal, ratio=total / ideal, chunks=chunks)


def flops(B: int, D: int, K: int) -> int:
    """Matmul FLOPs per fwd+bwd: logits (forward), logits again (backward recompute),
    dF = dz·W, dW = dzᵀ·F: 8·B·K·d (the O(B·K + K·d·B/BM) rest — õ, softmax — is ignored).
    The minimum, with the logits kept from the forward, is 6·B·K·d: the recompute is +33%."""
    return 8 * B * K * D


def ideal_flops(B: int, D: int, K: int) -> int:
    """Matmul FLOPs per fwd+bwd with nothing recomputed: logits, dF, dW (the roofline's numerator)."""
    return 6 * B * K * D


# --------------------------------------------------------------------------- host side


def _check_inputs(features, weight, centers, labels, bias, label_smoothing) -> None:
    """Shape / dtype / device checks that need no data (also run while tracing)."""
    for name, t in (("features", features), ("weight", weight), ("centers", centers)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; the Triton head supports float32, bfloat16 and float16 "
                "(use backend='torch' for float64)"
            )
    B, D = features.shape
    K = weight.shape[0]
    if B == 0 or K == 0 or D == 0:
        raise ValueError(f"empty input: features {tuple(features.shape)}, weight {tuple(weight.shape)}")
    if weight.shape[1] != D:
        raise ValueError(f"weight must be (K, d) with d={D} as in features {tuple(features.shape)}, got {tuple(weight.shape)}")
    if tuple(centers.shape) != (K, D):
        raise ValueError(f"centers must have the shape of weight {(K, D)}, got {tuple(centers.shape)}")
    if labels.dim() != 1 or labels.shape[0] != B:
        raise ValueError(f"labels must be 1-D of length B={B}, got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32) class indices, got {labels.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (K,):
            raise ValueError(f"bias must be (K,) = ({K},), got {tuple(bias.shape)}")
        if bias.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"bias has dtype {bias.dtype}; expected float32, bfloat16 or float16")
    tensors = [features, weight, centers, labels] + ([bias] if bias is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def _check_labels(labels: Tensor, K: int) -> None:
    """Out-of-range labels would read/write outside the (K, ·) buffers. Checked here only for CPU
    labels, where it costs no device sync; CUDA labels are validated where the data is read
    (the pipelines) and in-kernel with tl.device_assert under flags.debug."""
    if labels.device.type != "cpu":
        return
    bad = (labels < 0) | (labels >= K)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{i}] = {int(labels[i])} is out of range: valid class indices are 0..{K - 1} (K={K})"
        )


def _forward_impl(features, weight, centers, labels, bias, flags: HeadFlags):
    """Loss and what the backward needs, in one pass over the batch (+ the per-class stats).

    Returns (loss, lse, off, ucs, stats): the rows' log-sum-exp (B,), õ (K,), the uniform
    constraint's (lse_q, UC) and the per-class sums/counts (`split_stats`); off / ucs / stats
    are empty (0,) tensors when the flags need none."""
    if not HAS_TRITON:
        raise RuntimeError("the fused head needs triton; use backend='torch'")
    _check_inputs(features, weight, centers, labels, bias, flags.label_smoothing)
    if features.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "backend='triton' got CPU tensors but Triton's interpreter is off: set the environment "
            "variable TRITON_INTERPRET=1 before importing `kernels` (or use backend='torch')"
        )
    K = weight.shape[0]
    labels = labels.to(torch.int64).contiguous()
    _check_labels(labels, K)
    plan = plan_forward(
        features.contiguous(), weight.contiguous(), centers.contiguous(), labels,
        bias.contiguous() if bias is not None else None, flags,
    )
    for launch in plan.launches:
        launch.run(debug=bool(flags.debug) and not INTERPRET)
    loss = plan.rowloss.sum()
    return loss, plan.lse, plan.off, plan.ucs, plan.stats


def _backward_impl(g, features, weight, centers, labels, bias, lse, off, ucs, stats, flags: HeadFlags):
    """(dF, dW, dC, dB) of grad_output g (0-dim, any float dtype, read on the device);
    dC / dB are empty (0,) when the centers take no gradient / there is no bias."""
    plan = plan_backward(
        g.reshape(()), features.contiguous(), weight.contiguous(), centers.contiguous(),
        labels.to(torch.int64).contiguous(), bias.contiguous() if bias is not None else None,
        lse, off, ucs, stats, flags,
    )
    for launch in plan.launches:
        launch.run(debug=bool(flags.debug) and not INTERPRET)
    return plan.dF, plan.dW, plan.dC, plan.dB


def split_stats(stats: Tensor, K: int, D: int) -> tuple[Tensor, Tensor]:
    """The op's flat stats buffer as (sums (K, d), counts (K,)) views."""
    return stats[: K * D].view(K, D), stats[K * D:]


# --------------------------------------------------------------------------- custom ops

# The forward op's outputs changed with the Cut-Cross-Entropy split (v2 returned the gradients):
# a new name, so that no compiled graph cached by inductor for the old op is ever reused for it.
_OP_NAME = "lt_engine::fused_offset_head_cce"
_BWD_OP_NAME = "lt_engine::fused_offset_head_cce_backward"


@torch.library.custom_op(_OP_NAME, mutates_args=())
def _fused_head_op(
    features: Tensor,
    weight: Tensor,
    centers: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    lambda_center: float,  # ↓ HeadFlags' fields, in order
    lambda_uniform: float,
    use_offset: bool,
    label_smoothing: float,
    center_grad: bool,
    chunk_rows: int,
    tf32: int,
    debug: bool,
    stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    flags = HeadFlags(lambda_center, lambda_uniform, use_offset, label_smoothing, center_grad, chunk_rows, tf32,
                      debug, stats)
    return _forward_impl(features, weight, centers, labels, bias, flags)


_N_FLAGS = len(fields(HeadFlags))


@_fused_head_op.register_fake
def _fused_head_fake(features, weight, centers, labels, bias, *flag_args):
    flags = HeadFlags(*flag_args)
    _check_inputs(features, weight, centers, labels, bias, flags.label_smoothing)
    K, D = weight.shape
    B = features.shape[0]
    f32 = torch.float32
    return (
        features.new_empty((), dtype=f32),
        features.new_empty((B,), dtype=f32),
        features.new_empty((K if (flags.use_offset or flags.uniform) else 0,), dtype=f32),
        features.new_empty((2 if flags.uniform else 0,), dtype=f32),
        features.new_empty((K * D + K if flags.sums else 0,), dtype=f32),
    )


@torch.library.custom_op(_BWD_OP_NAME, mutates_args=())
def _fused_head_backward_op(
    g: Tensor,
    features: Tensor,
    weight: Tensor,
    centers: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    lse: Tensor,
    off: Tensor,
    ucs: Tensor,
    stats: Tensor,
    lambda_center: float,  # ↓ HeadFlags' fields, in order
    lambda_uniform: float,
    use_offset: bool,
    label_smoothing: float,
    center_grad: bool,
    chunk_rows: int,
    tf32: int,
    debug: bool,
    stats_flag: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    flags = HeadFlags(lambda_center, lambda_uniform, use_offset, label_smoothing, center_grad, chunk_rows, tf32,
                      debug, stats_flag)
    return _backward_impl(g, features, weight, centers, labels, bias, lse, off, ucs, stats, flags)


@_fused_head_backward_op.register_fake
def _fused_head_backward_fake(g, features, weight, centers, labels, bias, lse, off, ucs, stats, *flag_args):
    flags = HeadFlags(*flag_args)
    K, D = weight.shape
    return (
        torch.empty_like(features, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        centers.new_empty((K, D)) if flags.c_grad else centers.new_empty((0,)),
        bias.new_empty((K,)) if bias is not None else features.new_empty((0,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    features, weight, centers, labels, bias = inputs[:5]
    _, lse, off, ucs, stats = output
    ctx.flag_args = tuple(inputs[5:])
    ctx.has_dc = HeadFlags(*ctx.flag_args).c_grad
    ctx.has_db = bias is not None
    ctx.save_for_backward(features, weight, centers, labels, bias, lse, off, ucs, stats)


def _backward(ctx, g_loss, *_unused):
    # Cut Cross-Entropy's split: the gradient GEMMs run here, with g_loss read in-kernel and
    # folded into the 1/B scale of their fp32 accumulators (no host sync, no scaling pass).
    features, weight, centers, labels, bias, lse, off, ucs, stats = ctx.saved_tensors
    dF, dW, dC, dB = _fused_head_backward_op(g_loss, features, weight, centers, labels, bias, lse, off, ucs, stats,
                                             *ctx.flag_args)
    return (
        dF,
        dW,
        dC if ctx.has_dc else None,
        None,
        dB if ctx.has_db else None,
    ) + (None,) * _N_FLAGS


_fused_head_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API


def fused_offset_head_loss_with_stats(
    features: Tensor,
    weight: Tensor,
    centers: Tensor,
    labels: Tensor,
    lambda_center: float = 1.0,
    lambda_uniform: float = 1.0,
    *,
    use_offset: bool = True,
    bias: Tensor | None = None,
    label_smoothing: float = 0.0,
    center_grad: bool = True,
    chunk_rows: int = 0,
    tf32: bool | None = None,
    debug: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused loss (differentiable like the reference) plus the batch's per-class feature
    sums (K, d) and counts (K,) in float32 (= `reference.class_feature_sums`), computed in
    the same pass, for `wen_center_update`. `chunk_rows` > 0 forces the row-chunk size (tests)."""
    out = _fused_head_op(features, weight, centers, labels, bias, *_flags(
        lambda_center, lambda_uniform, use_offset, label_smoothing, center_grad, chunk_rows, tf32, debug, True,
    ).op_args())
    sums, counts = split_stats(out[4].detach(), *weight.shape)
    return out[0], sums, counts


def _flags(lambda_center, lambda_uniform, use_offset, label_smoothing, center_grad, chunk_rows, tf32, debug,
           stats) -> HeadFlags:
    return HeadFlags(
        float(lambda_center), float(lambda_uniform), bool(use_offset), float(label_smoothing), bool(center_grad),
        int(chunk_rows), -1 if tf32 is None else int(bool(tf32)), bool(debug), bool(stats),
    )


def fused_offset_head_loss(
    features: Tensor,
    weight: Tensor,
    centers: Tensor,
    labels: Tensor,
    lambda_center: float = 1.0,
    lambda_uniform: float = 1.0,
    *,
    use_offset: bool = True,
    bias: Tensor | None = None,
    label_smoothing: float = 0.0,
    center_grad: bool = True,
    chunk_rows: int = 0,
    tf32: bool | None = None,
    debug: bool = False,
) -> Tensor:
    """The fused Triton head loss (scalar, float32); same arguments as the reference, plus
    tf32 (None: follow torch.backends.cuda.matmul.allow_tf32) and debug (in-kernel label check)."""
    return _fused_head_op(features, weight, centers, labels, bias, *_flags(
        lambda_center, lambda_uniform, use_offset, label_smoothing, center_grad, chunk_rows, tf32, debug, False,
    ).op_args())[0]


BACKENDS = ("auto", "triton", "torch")


def _triton_usable(*tensors: Tensor) -> bool:
    return (
        HAS_TRITON
        and not INTERPRET
        and all(t.is_cuda for t in tensors)
        and all(t.dtype in _SUPPORTED_DTYPES for t in tensors if t.is_floating_point())
    )


def _dispatch(backend: str, with_stats: bool, features, weight, centers, labels, *args, **kwargs):
    """The backend choice of both public entry points (loss, or loss + per-class stats)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        ts = [features, weight, centers] + ([kwargs["bias"]] if kwargs["bias"] is not None else [])
        backend = "triton" if _triton_usable(*ts) else "torch"
    if backend == "triton":
        fused = fused_offset_head_loss_with_stats if with_stats else fused_offset_head_loss
        return fused(features, weight, centers, labels, *args, **kwargs)
    loss = _ref.offset_head_loss(features, weight, centers, labels, *args, **kwargs)
    if not with_stats:
        return loss
    return (loss, *_ref.class_feature_sums(features, labels, weight.shape[0]))


def offset_head_loss(
    features: Tensor,
    weight: Tensor,
    centers: Tensor,
    labels: Tensor,
    lambda_center: float = 1.0,
    lambda_uniform: float = 1.0,
    *,
    use_offset: bool = True,
    bias: Tensor | None = None,
    label_smoothing: float = 0.0,
    center_grad: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Eq. 6 head loss, dispatched: "torch" = `kernels.reference.offset_head_loss`,
    "triton" = the fused kernel (CUDA, or CPU under TRITON_INTERPRET=1),
    "auto" = Triton for CUDA tensors of float32/bfloat16/float16, the reference otherwise
    (so CPU training is unchanged)."""
    return _dispatch(backend, False, features, weight, centers, labels, lambda_center, lambda_uniform,
                     use_offset=use_offset, bias=bias, label_smoothing=label_smoothing, center_grad=center_grad)


def offset_head_loss_with_stats(
    features: Tensor,
    weight: Tensor,
    centers: Tensor,
    labels: Tensor,
    lambda_center: float = 1.0,
    lambda_uniform: float = 1.0,
    *,
    use_offset: bool = True,
    bias: Tensor | None = None,
    label_smoothing: float = 0.0,
    center_grad: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """`offset_head_loss` plus the batch's per-class feature sums (K, d) and counts (K,), float32,
    detached, for `wen_center_update` after the optimizer step — without a host sync on either
    backend (fused: from the same pass; torch: `reference.class_feature_sums`, index_add_ only)."""
    return _dispatch(backend, True, features, weight, centers, labels, lambda_center, lambda_uniform,
                     use_offset=use_offset, bias=bias, label_smoothing=label_smoothing, center_grad=center_grad)


__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "HeadFlags",
    "INTERPRET",
    "Launch",
    "fused_offset_head_loss",
    "fused_offset_head_loss_with_stats",
    "gemm_mode",
    "modelled_bytes",
    "offset_head_loss",
    "offset_head_loss_with_stats",
    "plan_backward",
    "plan_forward",
]


def _traffic_table() -> str:
    rows = ["| dtype (f / W)  | K      | modelled GB | ideal GB | ratio |",
            "|----------------|--------|-------------|----------|-------|"]
    for fd, wd, name in ((torch.bfloat16, torch.bfloat16, "bf16 / bf16"), (torch.bfloat16, torch.float32, "bf16 / fp32"),
                         (torch.float32, torch.float32, "fp32 / fp32")):
        for K in (1000, 8142, 131072):
            m = modelled_bytes(512, 2048, K, fd, wd)
            rows.append(f"| {name:<14} | {K:<6} | {m['total'] / 1e9:<11.3g} | {m['ideal'] / 1e9:<8.3g} | {m['ratio']:.2f}  |")
    return "\n".join(rows)


