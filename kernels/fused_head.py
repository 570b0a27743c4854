"""Fused Triton implementation of the estimated-offset head loss (Eq. 6 of the EO paper).

Same definition as `kernels.reference.offset_head_loss` (read that file first):

    f_i  (B, d) features        w_k (K, d) class weights      c_k (K, d) class centers
    õ_k  = ½ c_k·w_k                                   estimated offset, (K,)
    z_ik = w_k·f_i − õ_k (+ b_k)                       logits (the −õ only with use_offset)
    L    = 1/B Σ_i CE_ε(z_i, y_i)                       cross-entropy, label smoothing ε
         + λ1 · 1/B Σ_i ‖f_i − c_{y_i}‖²                center loss
         + λ2 · Σ_k p_k log p_k,  p = softmax(−õ)       uniform constraint (Eq. 5)

Design (after Liger-Kernel's FusedLinearCrossEntropy, not its code): the loss is
a scalar, so every gradient is computed *in the forward pass* and the backward
only multiplies the saved gradients by grad_output. The batch is processed in
row chunks, so only a (chunk, K) fp32 logits scratch exists at any time, never
the full (B, K) one; K = 131,072 works. fp32 accumulators of size (K, d) for dW
(and the per-class feature sums, which double as Wen's center-update statistics
and as the center-loss gradient of c) are kept, as in Liger.

Kernels (all accumulate in fp32, whatever the input dtype):
    _offset_kernel        õ_k = ½ Σ_d c_kd w_kd                           grid K/BK
    _uniform_kernel       UC value and g_k = dUC/dõ_k (3 streaming passes) grid 1
  per row chunk [r0, r0+M):
    _logits_kernel        z tile = f·Wᵀ − õ + b  (tl.dot over d), stored to the
                          (M, K) scratch, plus per-tile softmax partials
                          (max m_t, Σexp(z − m_t), Σz) for an online softmax  grid M/BM × K/BN
    _ce_rows_kernel       merges the tile partials (online softmax), CE_ε per row,
                          then overwrites z with dz = ∂L/∂z in place          grid M
    _grad_features_kernel dF = dz·W  (+ center term), per-class sums/counts,
                          center-loss value per row                      grid M/BM × d/BD
    _grad_weight_kernel   dW_acc += dzᵀ·f_chunk,  colsum_k += Σ_i dz_ik       grid K/BN × d/BD
  once:
    _finalize_kernel      offset/uniform terms of dW, dC; dB; casts       grid K/BN × d/BD

Gradient derivation (everything is divided by B through dz):
    CE_ε(z_i, y) = lse(z_i) − (1−ε) z_iy − ε/K Σ_k z_ik
        (= (1−ε)(−log p_iy) + ε/K Σ_k (−log p_ik), PyTorch's label smoothing)
    dz_ik = ∂L/∂z_ik = (softmax(z_i)_k − (1−ε)[k = y_i] − ε/K) / B
    z_ik = f_i·w_k − õ_k + b_k  ⇒
        ∂L/∂f_i   += Σ_k dz_ik w_k                 (dF = dz·W)
        ∂L/∂w_k   += Σ_i dz_ik f_i                 (dW = dzᵀ·F)
        ∂L/∂b_k    = Σ_i dz_ik
        ∂L/∂õ_k   += −Σ_i dz_ik                    (only with use_offset)
    center loss  λ1/B Σ_i ‖f_i − c_{y_i}‖²  ⇒
        ∂L/∂f_i   += 2λ1/B (f_i − c_{y_i})
        ∂L/∂c_k   += −2λ1/B Σ_{i: y_i=k} (f_i − c_k) = −2λ1/B (S_k − n_k c_k)
        with S_k = Σ_{i: y_i=k} f_i and n_k the class count: exactly the statistics
        Wen's center update needs, so they are computed once and returned.
    uniform constraint UC = Σ_k p_k log p_k, p = softmax(q), q = −õ:
        ∂UC/∂q_j = Σ_k (log p_k + 1) p_k (δ_kj − p_j) = p_j (log p_j − Σ_k p_k log p_k)
        ⇒ g_j = ∂UC/∂õ_j = −p_j (log p_j − Σ_k p_k log p_k),   ∂L/∂õ_k += λ2 g_k
    õ_k = ½ c_k·w_k  ⇒  ∂L/∂w_k += ½ c_k ∂L/∂õ_k,   ∂L/∂c_k += ½ w_k ∂L/∂õ_k
    center_grad=False: c is a constant (the reference's `c.detach()`): no dC at all,
    but the offset and center terms still give dW and dF.

Entry points:
    fused_offset_head_loss(...)              -> loss              (autograd-aware)
    fused_offset_head_loss_with_stats(...)   -> (loss, sums, counts)
    offset_head_loss(..., backend="auto")    dispatcher: "triton" | "torch" | "auto"
The work is registered as the custom op `lt_engine::fused_offset_head` (torch.library),
with a fake (meta) implementation and an autograd formula, so torch.compile traces
it without a graph break.

Interpreter (TRITON_INTERPRET=1, CPU tensors): the same kernels run on numpy.
tl.dot on bf16/fp16 tiles is wrong there (numpy has no bf16), so every dot
upcasts its tiles to fp32 when interpreting (`_DOT_FP32_IEEE`).
"""

from __future__ import annotations

import os
from typing import Optional

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

# tl.dot modes (constexpr MODE of `_mma`).
_DOT_FP32_IEEE = 0  # fp32 tiles, exact fp32 products (interpreter; fp32 without TF32)
_DOT_FP32_TF32 = 1  # fp32 tiles on TF32 tensor cores (fp32 when torch allows TF32; fp16 grads)
_DOT_BF16 = 2  # bf16 tiles, fp32 accumulation
_DOT_FP16 = 3  # fp16 tiles, fp32 accumulation (logits of fp16 inputs only)

# Row-chunk size: the (chunk, K) fp32 logits scratch stays under this many bytes.
_CHUNK_BYTES = 256 * 2**20


def _empty(shape, dtype, device) -> Tensor:
    """Allocation of every buffer the kernels fully overwrite (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


if HAS_TRITON:

    @triton.jit
    def _mma(a, b, acc, MODE: tl.constexpr):
        """acc + a @ b with fp32 accumulation; MODE picks the tile dtype fed to the tensor cores."""
        if MODE == 0:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif MODE == 1:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
        elif MODE == 2:
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        else:
            out = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
        return out

    @triton.jit
    def _offset_kernel(W, C, OFF, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        # õ_k = ½ Σ_d c_kd w_kd, fp32.
        pid = tl.program_id(0)
        ks = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = ks < K
        rows = ks.to(tl.int64) * D
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            m = kmask[:, None] & (ds < D)[None, :]
            w = tl.load(W + rows[:, None] + ds[None, :], mask=m, other=0.0).to(tl.float32)
            c = tl.load(C + rows[:, None] + ds[None, :], mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(w * c, axis=1)
        tl.store(OFF + ks, 0.5 * acc, mask=kmask)

    @triton.jit
    def _uniform_kernel(OFF, G, UC, K, BLOCK: tl.constexpr):
        # p = softmax(q), q = −õ.  Pass 1: lse(q) by online max/sum.  Pass 2: H' = Σ p log p.
        # Pass 3: g_k = dUC/dõ_k = −p_k (log p_k − H')  (derivation in the module docstring).
        m = -float("inf")
        s = 0.0
        for k0 in range(0, K, BLOCK):
            ks = k0 + tl.arange(0, BLOCK)
            q = -tl.load(OFF + ks, mask=ks < K, other=float("inf"))
            m_new = tl.maximum(m, tl.max(q, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(q - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        h = 0.0
        for k0 in range(0, K, BLOCK):
            ks = k0 + tl.arange(0, BLOCK)
            kmask = ks < K
            logp = -tl.load(OFF + ks, mask=kmask, other=0.0) - lse
            h += tl.sum(tl.where(kmask, tl.exp(logp) * logp, 0.0), axis=0)
        for k0 in range(0, K, BLOCK):
            ks = k0 + tl.arange(0, BLOCK)
            kmask = ks < K
            logp = -tl.load(OFF + ks, mask=kmask, other=0.0) - lse
            tl.store(G + ks, -tl.exp(logp) * (logp - h), mask=kmask)
        tl.store(UC, h)

    @triton.jit
    def _logits_kernel(
        F, W, OFF, BIAS, Z, PMAX, PSUM, PZ,
        row0, M, K, D, NT,
        USE_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, MODE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # z tile (BLOCK_M rows of the chunk × BLOCK_N classes) = f·Wᵀ − õ + b, then per-row
        # partials of this tile for the online softmax: m_t = max z, s_t = Σ exp(z − m_t), Σ z.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rl = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows local to the chunk
        rmask = rl < M
        ks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = ks < K
        frow = (row0 + rl).to(tl.int64) * D
        wrow = ks.to(tl.int64) * D
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            f = tl.load(F + frow[:, None] + ds[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            w = tl.load(W + wrow[:, None] + ds[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
            acc = _mma(f, tl.trans(w), acc, MODE)
        if USE_OFFSET:
            acc -= tl.load(OFF + ks, mask=kmask, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
        zrow = rl.to(tl.int64) * K
        tl.store(Z + zrow[:, None] + ks[None, :], acc, mask=rmask[:, None] & kmask[None, :])
        z = tl.where(kmask[None, :], acc, -float("inf"))
        m_t = tl.max(z, axis=1)
        s_t = tl.sum(tl.exp(z - m_t[:, None]), axis=1)
        prow = rl.to(tl.int64) * NT + pid_n
        tl.store(PMAX + prow, m_t, mask=rmask)
        tl.store(PSUM + prow, s_t, mask=rmask)
        if SMOOTH:
            tl.store(PZ + prow, tl.sum(tl.where(kmask[None, :], acc, 0.0), axis=1), mask=rmask)

    @triton.jit
    def _ce_rows_kernel(
        Z, PMAX, PSUM, PZ, LABELS, CE,
        row0, K, NT, inv_b, eps,
        SMOOTH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # One row: merge the tile partials (online softmax: m ← max(m, m_t),
        # s ← s·e^{m_old−m} + s_t·e^{m_t−m}), lse = m + log s,
        # CE_ε = lse − (1−ε) z_y − ε/K Σ_k z_k, then dz_k = (e^{z_k − lse} − (1−ε)[k=y] − ε/K)/B
        # written over z.
        r = tl.program_id(0)
        prow = r.to(tl.int64) * NT
        m = -float("inf")
        s = 0.0
        zsum = 0.0
        for t0 in range(0, NT, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            tmask = ts < NT
            mt = tl.load(PMAX + prow + ts, mask=tmask, other=-float("inf"))
            st = tl.load(PSUM + prow + ts, mask=tmask, other=0.0)
            m_new = tl.maximum(m, tl.max(mt, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(st * tl.exp(mt - m_new), axis=0)
            m = m_new
            if SMOOTH:
                zsum += tl.sum(tl.load(PZ + prow + ts, mask=tmask, other=0.0), axis=0)
        lse = m + tl.log(s)
        y = tl.load(LABELS + row0 + r)
        zrow = r.to(tl.int64) * K
        z_y = tl.load(Z + zrow + y)
        ce = lse - (1.0 - eps) * z_y
        if SMOOTH:
            ce -= eps / K * zsum
        tl.store(CE + row0 + r, ce)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            z = tl.load(Z + zrow + ks, mask=kmask, other=0.0)
            dz = tl.exp(z - lse) - tl.where(ks == y, 1.0 - eps, 0.0)
            if SMOOTH:
                dz -= eps / K
            tl.store(Z + zrow + ks, dz * inv_b, mask=kmask)

    @triton.jit
    def _grad_features_kernel(
        DZ, W, F, C, LABELS, DF, SUMS, COUNTS, SQ,
        row0, M, K, D, center_scale,
        CENTER: tl.constexpr, MODE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # dF tile = Σ_k dz[:, k] w_k  (+ 2λ1/B (f − c_y)), written once in F's dtype.
        # Epilogue also accumulates the per-class sums S_y += f, counts n_y += 1 and the
        # center-loss value ‖f − c_y‖² per row (atomics: labels repeat across rows).
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        rl = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rl < M
        ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = ds < D
        zrow = rl.to(tl.int64) * K
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            dz = tl.load(DZ + zrow[:, None] + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(W + ks.to(tl.int64)[:, None] * D + ds[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
            acc = _mma(dz, w, acc, MODE)
        rows = (row0 + rl).to(tl.int64)
        m2 = rmask[:, None] & dmask[None, :]
        f = tl.load(F + rows[:, None] * D + ds[None, :], mask=m2, other=0.0).to(tl.float32)
        y = tl.load(LABELS + rows, mask=rmask, other=0)
        tl.atomic_add(SUMS + y[:, None] * D + ds[None, :], f, mask=m2)
        if pid_d == 0:
            tl.atomic_add(COUNTS + y, tl.full((BLOCK_M,), 1.0, tl.float32), mask=rmask)
        if CENTER:
            c = tl.load(C + y[:, None] * D + ds[None, :], mask=m2, other=0.0).to(tl.float32)
            diff = f - c
            tl.atomic_add(SQ + rows, tl.sum(diff * diff, axis=1), mask=rmask)
            acc += center_scale * diff
        tl.store(DF + rows[:, None] * D + ds[None, :], acc.to(DF.dtype.element_ty), mask=m2)

    @triton.jit
    def _grad_weight_kernel(
        DZ, F, DW_ACC, DZSUM,
        row0, M, K, D,
        NEED_COLSUM: tl.constexpr, MODE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # dW_acc[k-tile, d-tile] += Σ_i dz_ik f_i over the chunk's rows (this program owns the
        # tile, launches of successive chunks are ordered: plain load-add-store, no atomics).
        # colsum_k = Σ_i dz_ik (for ∂L/∂b and ∂L/∂õ) is accumulated by the pid_d == 0 column.
        pid_n = tl.program_id(0)
        pid_d = tl.program_id(1)
        ks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = ks < K
        ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = ds < D
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rl = m0 + tl.arange(0, BLOCK_M)
            rmask = rl < M
            dz = tl.load(DZ + rl.to(tl.int64)[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            f = tl.load(F + (row0 + rl).to(tl.int64)[:, None] * D + ds[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            acc = _mma(tl.trans(dz), f, acc, MODE)
            if NEED_COLSUM:
                colsum += tl.sum(dz, axis=0)
        ptrs = DW_ACC + ks.to(tl.int64)[:, None] * D + ds[None, :]
        m2 = kmask[:, None] & dmask[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=m2, other=0.0) + acc, mask=m2)
        if NEED_COLSUM:
            if pid_d == 0:
                tl.store(DZSUM + ks, tl.load(DZSUM + ks, mask=kmask, other=0.0) + colsum, mask=kmask)

    @triton.jit
    def _finalize_kernel(
        DW_ACC, DZSUM, G, W, C, SUMS, COUNTS, DW, DC, DB,
        K, D, lam_u, center_scale,
        USE_OFFSET: tl.constexpr, UNIFORM: tl.constexpr, CENTER: tl.constexpr,
        CENTER_GRAD: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # ∂L/∂õ_k = −colsum_k [use_offset] + λ2 g_k [uniform]
        # dW = dW_acc + ½ c ∂L/∂õ;   dC = ½ w ∂L/∂õ − 2λ1/B (S − n c)  [center_grad];  dB = colsum.
        pid_n = tl.program_id(0)
        pid_d = tl.program_id(1)
        ks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = ks < K
        ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m2 = kmask[:, None] & (ds < D)[None, :]
        offs = ks.to(tl.int64)[:, None] * D + ds[None, :]
        dw = tl.load(DW_ACC + offs, mask=m2, other=0.0)
        if USE_OFFSET or UNIFORM:
            doff = tl.zeros((BLOCK_N,), dtype=tl.float32)
            if USE_OFFSET:
                doff -= tl.load(DZSUM + ks, mask=kmask, other=0.0)
            if UNIFORM:
                doff += lam_u * tl.load(G + ks, mask=kmask, other=0.0)
            c = tl.load(C + offs, mask=m2, other=0.0).to(tl.float32)
            dw += 0.5 * c * doff[:, None]
        tl.store(DW + offs, dw.to(DW.dtype.element_ty), mask=m2)
        if CENTER_GRAD:
            dc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            if USE_OFFSET or UNIFORM:
                w = tl.load(W + offs, mask=m2, other=0.0).to(tl.float32)
                dc += 0.5 * w * doff[:, None]
            if CENTER:
                c2 = tl.load(C + offs, mask=m2, other=0.0).to(tl.float32)
                s = tl.load(SUMS + offs, mask=m2, other=0.0)
                n = tl.load(COUNTS + ks, mask=kmask, other=0.0)
                dc -= center_scale * (s - n[:, None] * c2)
            tl.store(DC + offs, dc.to(DC.dtype.element_ty), mask=m2)
        if HAS_BIAS:
            if pid_d == 0:
                colsum = tl.load(DZSUM + ks, mask=kmask, other=0.0)
                tl.store(DB + ks, colsum.to(DB.dtype.element_ty), mask=kmask)


# --------------------------------------------------------------------------- host side


def _fp32_dot_mode() -> int:
    if INTERPRET:
        return _DOT_FP32_IEEE
    return _DOT_FP32_TF32 if torch.backends.cuda.matmul.allow_tf32 else _DOT_FP32_IEEE


def _logits_dot_mode(a: torch.dtype, b: torch.dtype) -> int:
    """Tile dtype of f·Wᵀ: native bf16/fp16 when both operands are, fp32 otherwise (mixed inputs)."""
    if INTERPRET:
        return _DOT_FP32_IEEE  # interpreter: tl.dot on bf16/fp16 tiles is wrong
    if a == b == torch.bfloat16:
        return _DOT_BF16
    if a == b == torch.float16:
        return _DOT_FP16
    return _fp32_dot_mode()


def _grad_dot_mode(other: torch.dtype) -> int:
    """Tile dtype of dz·W and dzᵀ·F: dz (fp32, ~p/B) is rounded to bf16 only when the other
    operand is bf16 (same exponent range as fp32); fp16 would flush small dz to zero, so
    fp16 operands are multiplied as TF32 (10-bit mantissa, fp32 range: exact for fp16)."""
    if INTERPRET:
        return _DOT_FP32_IEEE
    if other == torch.bfloat16:
        return _DOT_BF16
    if other == torch.float16:
        return _DOT_FP32_TF32
    return _fp32_dot_mode()


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
    """Out-of-range labels would read/write outside the (K, ·) buffers: reject them on the host."""
    bad = (labels < 0) | (labels >= K)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{i}] = {int(labels[i])} is out of range: valid class indices are 0..{K - 1} (K={K})"
        )


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _forward_impl(
    features: Tensor,
    weight: Tensor,
    centers: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    lambda_center: float,
    lambda_uniform: float,
    use_offset: bool,
    label_smoothing: float,
    center_grad: bool,
    chunk_rows: int,
):
    """Loss, all gradients and the per-class stats in one pass over the batch.

    Returns (loss, dF, dW, dC, dB, sums, counts); dC / dB are empty (0,) tensors when the
    centers take no gradient / there is no bias.
    """
    if not HAS_TRITON:
        raise RuntimeError("the fused head needs triton; use backend='torch'")
    _check_inputs(features, weight, centers, labels, bias, label_smoothing)
    if features.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "backend='triton' got CPU tensors but Triton's interpreter is off: set the environment "
            "variable TRITON_INTERPRET=1 before importing `kernels` (or use backend='torch')"
        )
    B, D = features.shape
    K = weight.shape[0]
    labels = labels.to(torch.int64).contiguous()
    _check_labels(labels, K)
    f = features.contiguous()
    w = weight.contiguous()
    c = centers.contiguous()
    b = bias.contiguous() if bias is not None else None
    dev = f.device

    center = lambda_center != 0.0
    uniform = lambda_uniform != 0.0
    smooth = label_smoothing != 0.0
    has_bias = b is not None
    # c takes a gradient only when asked and when it appears in the loss at all.
    c_grad = bool(center_grad) and (use_offset or uniform or center)
    need_colsum = use_offset or has_bias
    f32 = torch.float32

    # Block sizes. Interpreter: every loop iteration costs milliseconds, so blocks are large.
    if INTERPRET:
        BM, BN, BD, BKR, warps, stages = 64, 128, 64, 1024, 4, 1
    else:
        BM, BN, BD, BKR, warps, stages = 64, 128, 64, 2048, 4, 3
    if chunk_rows <= 0:
        chunk_rows = max(BM, (_CHUNK_BYTES // (4 * K)) // BM * BM)
    M_max = min(B, chunk_rows)
    NT = triton.cdiv(K, BN)

    # Outputs / scratch. `_empty` buffers are entirely written by a kernel; zeros are accumulators.
    dummy = torch.empty(1, dtype=f32, device=dev)
    off = _empty((K,), f32, dev) if (use_offset or uniform) else dummy
    g = _empty((K,), f32, dev) if uniform else dummy
    uc = _empty((1,), f32, dev) if uniform else dummy
    z = _empty((M_max, K), f32, dev)
    pmax = _empty((M_max, NT), f32, dev)
    psum = _empty((M_max, NT), f32, dev)
    pz = _empty((M_max, NT), f32, dev) if smooth else dummy
    ce = _empty((B,), f32, dev)
    sq = torch.zeros(B, dtype=f32, device=dev) if center else dummy
    sums = torch.zeros(K, D, dtype=f32, device=dev)
    counts = torch.zeros(K, dtype=f32, device=dev)
    dzsum = torch.zeros(K, dtype=f32, device=dev) if need_colsum else dummy
    dF = _empty((B, D), f.dtype, dev)
    if w.dtype == f32:
        # fp32 weights: dW itself is the accumulator; _finalize_kernel reads then writes each
        # element from the same program, so the in-place update is race-free (saves K·d·4 bytes).
        dW = dw_acc = torch.zeros(K, D, dtype=f32, device=dev)
    else:
        dw_acc = torch.zeros(K, D, dtype=f32, device=dev)
        dW = _empty((K, D), w.dtype, dev)
    dC = _empty((K, D), c.dtype, dev) if c_grad else torch.empty(0, dtype=c.dtype, device=dev)
    dB = _empty((K,), b.dtype, dev) if has_bias else torch.empty(0, dtype=f32, device=dev)

    center_scale = 2.0 * float(lambda_center) / B
    if use_offset or uniform:
        _offset_kernel[(triton.cdiv(K, BN),)](w, c, off, K, D, BLOCK_K=BN, BLOCK_D=BD, num_warps=warps)
    if uniform:
        _uniform_kernel[(1,)](off, g, uc, K, BLOCK=_pow2(K, 16, 4096), num_warps=8 if not INTERPRET else 1)

    logits_mode = _logits_dot_mode(f.dtype, w.dtype)
    bt = _pow2(NT, 16, 1024)
    bkr = _pow2(K, 16, BKR)
    for r0 in range(0, B, M_max):
        M = min(M_max, B - r0)
        _logits_kernel[(triton.cdiv(M, BM), NT)](
            f, w, off, b if has_bias else dummy, z, pmax, psum, pz,
            r0, M, K, D, NT,
            USE_OFFSET=use_offset, HAS_BIAS=has_bias, SMOOTH=smooth, MODE=logits_mode,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_warps=warps, num_stages=stages,
        )
        _ce_rows_kernel[(M,)](
            z, pmax, psum, pz, labels, ce,
            r0, K, NT, 1.0 / B, float(label_smoothing),
            SMOOTH=smooth, BLOCK_T=bt, BLOCK_K=bkr, num_warps=warps,
        )
        _grad_features_kernel[(triton.cdiv(M, BM), triton.cdiv(D, BD))](
            z, w, f, c, labels, dF, sums, counts, sq,
            r0, M, K, D, center_scale,
            CENTER=center, MODE=_grad_dot_mode(w.dtype),
            BLOCK_M=BM, BLOCK_K=BN, BLOCK_D=BD, num_warps=warps, num_stages=stages,
        )
        _grad_weight_kernel[(triton.cdiv(K, BN), triton.cdiv(D, BD))](
            z, f, dw_acc, dzsum,
            r0, M, K, D,
            NEED_COLSUM=need_colsum, MODE=_grad_dot_mode(f.dtype),
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_warps=warps, num_stages=stages,
        )
    _finalize_kernel[(triton.cdiv(K, BN), triton.cdiv(D, BD))](
        dw_acc, dzsum, g, w, c, sums, counts, dW, dC if c_grad else dummy, dB if has_bias else dummy,
        K, D, float(lambda_uniform), center_scale,
        USE_OFFSET=use_offset, UNIFORM=uniform, CENTER=center, CENTER_GRAD=c_grad, HAS_BIAS=has_bias,
        BLOCK_N=BN, BLOCK_D=BD, num_warps=warps,
    )

    loss = ce.sum() / B
    if center:
        loss = loss + float(lambda_center) * (sq.sum() / B)
    if uniform:
        loss = loss + float(lambda_uniform) * uc[0]
    return loss.reshape(()), dF, dW, dC, dB, sums, counts


# --------------------------------------------------------------------------- custom op

_OP_NAME = "lt_engine::fused_offset_head"


@torch.library.custom_op(_OP_NAME, mutates_args=())
def _fused_head_op(
    features: Tensor,
    weight: Tensor,
    centers: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    lambda_center: float,
    lambda_uniform: float,
    use_offset: bool,
    label_smoothing: float,
    center_grad: bool,
    chunk_rows: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(
        features, weight, centers, labels, bias, lambda_center, lambda_uniform,
        use_offset, label_smoothing, center_grad, chunk_rows,
    )


@_fused_head_op.register_fake
def _fused_head_fake(
    features, weight, centers, labels, bias, lambda_center, lambda_uniform,
    use_offset, label_smoothing, center_grad, chunk_rows,
):
    _check_inputs(features, weight, centers, labels, bias, label_smoothing)
    K, D = weight.shape
    c_grad = bool(center_grad) and (use_offset or lambda_uniform != 0.0 or lambda_center != 0.0)
    f32 = torch.float32
    return (
        features.new_empty((), dtype=f32),
        torch.empty_like(features, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        centers.new_empty((K, D)) if c_grad else centers.new_empty((0,)),
        bias.new_empty((K,)) if bias is not None else features.new_empty((0,), dtype=f32),
        features.new_empty((K, D), dtype=f32),
        features.new_empty((K,), dtype=f32),
    )


def _setup_context(ctx, inputs, output):
    _, dF, dW, dC, dB, _, _ = output
    ctx.has_dc = dC.numel() > 0
    ctx.has_db = inputs[4] is not None
    ctx.save_for_backward(dF, dW, dC, dB)


def _backward(ctx, g_loss, *_unused):
    # The loss is a scalar: every gradient was computed in the forward, scale by grad_output.
    # (A 0-dim fp32 tensor times a bf16 tensor stays bf16: no promotion, no extra copy.)
    dF, dW, dC, dB = ctx.saved_tensors
    g = g_loss.to(torch.float32)
    return (
        dF * g,
        dW * g,
        dC * g if ctx.has_dc else None,
        None,
        dB * g if ctx.has_db else None,
        None, None, None, None, None, None,
    )


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
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused loss (differentiable like the reference) plus the batch's per-class feature
    sums (K, d) and counts (K,) in float32 (= `reference.class_feature_sums`), for
    `wen_center_update`. `chunk_rows` > 0 forces the row-chunk size (tests)."""
    out = _fused_head_op(
        features, weight, centers, labels, bias,
        float(lambda_center), float(lambda_uniform), bool(use_offset),
        float(label_smoothing), bool(center_grad), int(chunk_rows),
    )
    loss, sums, counts = out[0], out[5], out[6]
    return loss, sums.detach(), counts.detach()


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
) -> Tensor:
    """The fused Triton head loss (scalar, float32); same arguments as the reference."""
    return fused_offset_head_loss_with_stats(
        features, weight, centers, labels, lambda_center, lambda_uniform,
        use_offset=use_offset, bias=bias, label_smoothing=label_smoothing,
        center_grad=center_grad, chunk_rows=chunk_rows,
    )[0]


BACKENDS = ("auto", "triton", "torch")


def _triton_usable(*tensors: Tensor) -> bool:
    return (
        HAS_TRITON
        and not INTERPRET
        and all(t.is_cuda for t in tensors)
        and all(t.dtype in _SUPPORTED_DTYPES for t in tensors if t.is_floating_point())
    )


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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    args = (features, weight, centers, labels, lambda_center, lambda_uniform)
    kwargs = dict(use_offset=use_offset, bias=bias, label_smoothing=label_smoothing, center_grad=center_grad)
    if backend == "auto":
        ts = [features, weight, centers] + ([bias] if bias is not None else [])
        backend = "triton" if _triton_usable(*ts) else "torch"
    if backend == "torch":
        return _ref.offset_head_loss(*args, **kwargs)
    return fused_offset_head_loss(*args, **kwargs)


__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "INTERPRET",
    "fused_offset_head_loss",
    "fused_offset_head_loss_with_stats",
    "offset_head_loss",
]
