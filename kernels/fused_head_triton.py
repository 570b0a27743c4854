"""The Triton kernels of the fused head (the loss is defined in `kernels.reference`, the design is
described in `kernels.fused_head`, the launches are built by `kernels.head_plan`). This file holds
only @triton.jit functions, so that `kernels.aot` can load a compiled — not interpreted — copy of it
for ahead-of-time compilation even when TRITON_INTERPRET=1 is set for the CPU tests.

Every kernel's docstring gives its HBM bytes and FLOPs (M = rows of the row chunk, e = bytes of
the dz element type, BN/BD = its tile sizes); `kernels.head_traffic` sums them.

Gradients (everything is divided by B; g = grad_output scales every term):
    CE_ε(z_i, y) = lse(z_i) − (1−ε) z_iy − ε/K Σ_k z_ik
    dz_ik = softmax(z_i)_k − (1−ε)[k = y_i] − ε/K;      ∂L/∂z_ik = dz_ik / B
    ∂L/∂f_i = Σ_k dz_ik w_k / B,   ∂L/∂w_k = Σ_i dz_ik f_i / B,   ∂L/∂b_k = Σ_i dz_ik / B
    ∂L/∂õ_k += −Σ_i dz_ik / B  (use_offset)
    center loss: ∂L/∂f_i += 2λ1/B (f_i − c_{y_i}),  ∂L/∂c_k += −2λ1/B (S_k − n_k c_k)
        S_k = Σ_{i: y_i=k} f_i, n_k the class count (also Wen's update statistics)
    uniform constraint UC = Σ_k p_k log p_k, p = softmax(q), q = −õ:
        with m = max q, s = Σ e^{q−m}, t = Σ e^{q−m} q (merged over CTAs):
        lse_q = m + log s,  UC = t/s − lse_q,   ∂UC/∂õ_j = −p_j (log p_j − UC),  ∂L/∂õ += λ2 ∂UC/∂õ
    õ_k = ½ c_k·w_k ⇒ ∂L/∂w_k += ½ c_k ∂L/∂õ_k,  ∂L/∂c_k += ½ w_k ∂L/∂õ_k
    center_grad=False: c is a constant (the reference's `c.detach()`).
"""
import triton
import triton.language as tl


@triton.jit
def _mma(a, b, acc, MODE: tl.constexpr):
    """acc + a @ b, fp32 accumulation; MODE picks the operand dtype fed to the tensor cores."""
    if MODE == 0:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif MODE == 1:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    elif MODE == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif MODE == 3:
        out = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif MODE == 4:
        a32 = a.to(tl.bfloat16).to(tl.float32)
        b32 = b.to(tl.bfloat16).to(tl.float32)
        out = tl.dot(a32, b32, acc, input_precision="ieee")
    else:
        a32 = a.to(tl.float16).to(tl.float32)
        b32 = b.to(tl.float16).to(tl.float32)
        out = tl.dot(a32, b32, acc, input_precision="ieee")
    return out

@triton.jit
def _logit_tile(F, W, C, OFF, BIAS, row0, rl, rmask, ks, kmask, D,
                USE_OFFSET: tl.constexpr, OFF_FROM_C: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(z tile, õ of its classes): z = f·Wᵀ − õ + b over the full d for BLOCK_M rows × BLOCK_N
    classes, fp32. OFF_FROM_C: õ_k = ½ Σ_d c_kd w_kd is computed here from the W tile already
    loaded for the GEMM and the C tile (no separate pass over W); else õ is loaded from OFF."""
    frow = (row0 + rl).to(tl.int64) * D
    wrow = ks.to(tl.int64) * D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    cw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < D
        f = tl.load(F + frow[:, None] + ds[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        wm = kmask[:, None] & dmask[None, :]
        w = tl.load(W + wrow[:, None] + ds[None, :], mask=wm, other=0.0)
        acc = _mma(f, tl.trans(w), acc, MODE)
        if OFF_FROM_C:
            c = tl.load(C + wrow[:, None] + ds[None, :], mask=wm, other=0.0)
            cw += tl.sum(w.to(tl.float32) * c.to(tl.float32), axis=1)
    if OFF_FROM_C:
        off = 0.5 * cw
    elif USE_OFFSET:
        off = tl.load(OFF + ks, mask=kmask, other=0.0)
    else:
        off = cw  # zeros: no offset in the logits
    if USE_OFFSET:
        acc -= off[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
    return acc, off

@triton.jit
def _logits_kernel(
    F, W, C, OFF, UCP, BIAS, LABELS, PMAX, PSUM, PZ, ZY,
    row0, M, K, D, NT,
    USE_OFFSET: tl.constexpr, NEED_OFF: tl.constexpr, UNIFORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    SMOOTH: tl.constexpr, MODE: tl.constexpr,
    DEBUG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward. z tile (BLOCK_M rows × BLOCK_N classes) = f·Wᵀ − õ + b, kept on chip: only the
    per-row partials of the tile (m_t = max z, s_t = Σ e^{z−m_t}, Σ z) and z_{i,y_i} (when y_i
    is in the tile) leave it. NEED_OFF: õ = ½ c·w from the C tile (no separate offset pass);
    the pid_m == 0 program of each class tile stores õ and, with UNIFORM, the tile's partials
    (max q, Σe^{q−m}, Σe^{q−m}q) of q = −õ (stage 1 of the uniform-constraint reduction).
    Grid (M/BM, K/BN), m fastest: the M/BM programs reading one W (and C) tile are adjacent.
    Bytes: read F (M·d), W (K·d), C (K·d, NEED_OFF), write partials (4·M·K/BN·(2|3)), õ (4K).
    FLOPs: 2·M·K·d (tensor cores in MODE 1/2/3) + 2·K·d·M/BM (õ, on CUDA cores)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rl = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows local to the chunk
    rmask = rl < M
    ks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = ks < K
    acc, off = _logit_tile(F, W, C, OFF, BIAS, row0, rl, rmask, ks, kmask, D, USE_OFFSET, NEED_OFF, HAS_BIAS, MODE,
                           BLOCK_M, BLOCK_N, BLOCK_D)
    if NEED_OFF:
        if pid_m == 0:
            tl.store(OFF + ks, off, mask=kmask)
            if UNIFORM:
                q = tl.where(kmask, -off, -float("inf"))
                m_q = tl.max(q, axis=0)
                e = tl.where(kmask, tl.exp(q - m_q), 0.0)
                tl.store(UCP + pid_n * 3, m_q)
                tl.store(UCP + pid_n * 3 + 1, tl.sum(e, axis=0))
                tl.store(UCP + pid_n * 3 + 2, tl.sum(e * tl.where(kmask, q, 0.0), axis=0))
    y = tl.load(LABELS + row0 + rl, mask=rmask, other=0)
    if DEBUG:
        tl.device_assert((y >= 0) & (y < K), "label out of range [0, K)")
    in_tile = rmask & (y >= pid_n * BLOCK_N) & (y < pid_n * BLOCK_N + BLOCK_N)
    z_y = tl.sum(tl.where(ks[None, :] == y[:, None], acc, 0.0), axis=1)
    tl.store(ZY + rl, z_y, mask=in_tile)
    z = tl.where(kmask[None, :], acc, -float("inf"))
    m_t = tl.max(z, axis=1)
    s_t = tl.sum(tl.exp(z - m_t[:, None]), axis=1)
    prow = rl.to(tl.int64) * NT + pid_n
    tl.store(PMAX + prow, m_t, mask=rmask)
    tl.store(PSUM + prow, s_t, mask=rmask)
    if SMOOTH:
        tl.store(PZ + prow, tl.sum(tl.where(kmask[None, :], acc, 0.0), axis=1), mask=rmask)

@triton.jit
def _rows_kernel(
    PMAX, PSUM, PZ, ZY, F, C, LABELS, UCP, UCS, LSE, ROWLOSS, SUMS, COUNTS,
    row0, B, K, D, NT, inv_b, eps, lam_c, lam_u,
    SMOOTH: tl.constexpr, CENTER: tl.constexpr, UNIFORM: tl.constexpr, STATS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward, one row: lse from the tile partials (m ← max(m, m_t), s ← s·e^{m_old−m} +
    s_t·e^{m_t−m}), saved to LSE for the backward; row loss (CE_ε + λ1‖f − c_y‖²)/B with
    CE_ε = lse − (1−ε) z_y − ε/K Σ z; STATS: per-class sums S_y += f, counts n_y += 1 (atomics:
    labels repeat). The first program of the first chunk also merges the uniform-constraint
    partials (stage 2): UCS = (lse_q, UC), ROWLOSS[B] = λ2·UC.
    Bytes: read partials (4·M·K/BN·(2|3)), F, C rows (M·d each, CENTER or STATS: F), write
    LSE, ROWLOSS (4·M each); STATS: 4·M·d atomics (read + write).  FLOPs: O(M·(K/BN + d))."""
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
    row = row0 + r
    y = tl.load(LABELS + row).to(tl.int64)
    ce = lse - (1.0 - eps) * tl.load(ZY + r)
    if SMOOTH:
        ce -= eps / K * zsum
    if CENTER or STATS:
        sq = 0.0
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            f = tl.load(F + row.to(tl.int64) * D + ds, mask=dmask, other=0.0).to(tl.float32)
            if STATS:
                tl.atomic_add(SUMS + y * D + ds, f, mask=dmask)
            if CENTER:
                c = tl.load(C + y * D + ds, mask=dmask, other=0.0).to(tl.float32)
                sq += tl.sum((f - c) * (f - c), axis=0)
        if STATS:
            tl.atomic_add(COUNTS + y, 1.0)
        if CENTER:
            ce += lam_c * sq
    tl.store(LSE + row, lse)
    tl.store(ROWLOSS + row, ce * inv_b)
    if UNIFORM:
        if (r == 0) & (row0 == 0):
            um = -float("inf")
            us = 0.0
            ut = 0.0
            for t0 in range(0, NT, BLOCK_T):
                ts = t0 + tl.arange(0, BLOCK_T)
                tmask = ts < NT
                mt = tl.load(UCP + ts * 3, mask=tmask, other=-float("inf"))
                st = tl.load(UCP + ts * 3 + 1, mask=tmask, other=0.0)
                qt = tl.load(UCP + ts * 3 + 2, mask=tmask, other=0.0)
                m_new = tl.maximum(um, tl.max(mt, axis=0))
                scale = tl.exp(mt - m_new)
                us = us * tl.exp(um - m_new) + tl.sum(st * scale, axis=0)
                ut = ut * tl.exp(um - m_new) + tl.sum(qt * scale, axis=0)
                um = m_new
            lse_q = um + tl.log(us)
            uc = ut / us - lse_q
            tl.store(UCS, lse_q)
            tl.store(UCS + 1, uc)
            tl.store(ROWLOSS + B, lam_u * uc)

@triton.jit
def _dz_kernel(
    F, W, OFF, BIAS, LABELS, LSE, DZ,
    row0, M, K, D, eps,
    USE_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward (Cut Cross-Entropy's recompute): the z tile again from f and W (the same GEMM
    and epilogue as the forward, õ loaded), then dz = e^{z − lse} − (1−ε)[k=y] − ε/K with the
    forward's saved lse, stored in the GEMM dtype (unscaled: |dz| ≤ 1; 1/B and g_loss are
    applied to the fp32 accumulators of the gradient GEMMs).
    Grid (M/BM, K/BN), m fastest (W tile shared through L2).
    Bytes: read F (M·d), W (K·d), õ, lse, write DZ (e·M·K).  FLOPs: 2·M·K·d."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rl = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rl < M
    ks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = ks < K
    acc, off = _logit_tile(F, W, W, OFF, BIAS, row0, rl, rmask, ks, kmask, D, USE_OFFSET, False, HAS_BIAS, MODE,
                           BLOCK_M, BLOCK_N, BLOCK_D)
    lse = tl.load(LSE + row0 + rl, mask=rmask, other=0.0)
    y = tl.load(LABELS + row0 + rl, mask=rmask, other=0)
    dz = tl.exp(acc - lse[:, None]) - tl.where(ks[None, :] == y[:, None], 1.0 - eps, 0.0)
    if SMOOTH:
        dz -= eps / K
    zrow = rl.to(tl.int64) * K
    tl.store(DZ + zrow[:, None] + ks[None, :], dz.to(DZ.dtype.element_ty), mask=rmask[:, None] & kmask[None, :])

@triton.jit
def _grad_features_kernel(
    DZ, W, F, C, LABELS, G, DF,
    row0, M, K, D, inv_b, center_scale,
    CENTER: tl.constexpr, MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward. dF tile = g·(Σ_k dz[:, k] w_k)/B (+ g·2λ1/B (f − c_y)), written once in F's
    dtype; g = grad_output, read from G on the device (no host sync, graph-capturable).
    Grid (M/BM, d/BD), m fastest: the M/BM programs streaming one W column slab are adjacent.
    Bytes: read DZ (e·M·K), W (K·d), F, C rows (M·d each, CENTER), write dF (M·d).
    FLOPs: 2·M·K·d."""
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
    g = tl.load(G).to(tl.float32)
    acc = acc * (g * inv_b)
    rows = (row0 + rl).to(tl.int64)
    m2 = rmask[:, None] & dmask[None, :]
    if CENTER:
        f = tl.load(F + rows[:, None] * D + ds[None, :], mask=m2, other=0.0).to(tl.float32)
        y = tl.load(LABELS + rows, mask=rmask, other=0).to(tl.int64)
        c = tl.load(C + y[:, None] * D + ds[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += (g * center_scale) * (f - c)
    tl.store(DF + rows[:, None] * D + ds[None, :], acc.to(DF.dtype.element_ty), mask=m2)

@triton.jit
def _grad_weight_kernel(
    DZ, F, W, C, OFF, UCS, SUMS, COUNTS, G, ACC, DZSUM, DW, DC, DB,
    row0, M, K, D, inv_b, lam_u, center_scale, first, last,
    USE_OFFSET: tl.constexpr, UNIFORM: tl.constexpr, CENTER: tl.constexpr,
    CENTER_GRAD: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward. g = grad_output, read from G on the device: every term below is scaled by it.
    dW tile = (Σ_i dz_ik f_i)/B over the chunk (+ earlier chunks' ACC), colsum_k = Σ_i dz_ik/B.
    Last chunk — the finalize as epilogue: ∂L/∂õ = −colsum [USE_OFFSET] + λ2 ∂UC/∂õ [UNIFORM]
    (from õ and UCS), dW = acc + ½ c ∂L/∂õ in W's dtype, dC = ½ w ∂L/∂õ − 2λ1/B (S − n c)
    [CENTER_GRAD], dB = colsum. Other chunks store acc to ACC (fp32; ACC is DW when DW is fp32).
    Grid (d/BD, K/BN), d fastest: the d/BD programs of one dz column slab are adjacent, so dz
    is read from HBM once, not once per d slice.
    Bytes: read DZ (e·M·K), F (M·d); last: read C (K·d, offset/UC), write dW (K·d);
    CENTER_GRAD: read W, C, S, write dC (K·d each).  FLOPs: 2·M·K·d."""
    pid_d = tl.program_id(0)
    pid_n = tl.program_id(1)
    ks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = ks < K
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < D
    NEED_COLSUM: tl.constexpr = USE_OFFSET or HAS_BIAS
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rl = m0 + tl.arange(0, BLOCK_M)
        rmask = rl < M
        dz = tl.load(DZ + rl.to(tl.int64)[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        f = tl.load(F + (row0 + rl).to(tl.int64)[:, None] * D + ds[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc = _mma(tl.trans(dz), f, acc, MODE)
        if NEED_COLSUM:
            colsum += tl.sum(dz.to(tl.float32), axis=0)
    g = tl.load(G).to(tl.float32)
    acc = acc * (g * inv_b)
    colsum = colsum * (g * inv_b)
    offs = ks.to(tl.int64)[:, None] * D + ds[None, :]
    m2 = kmask[:, None] & dmask[None, :]
    if first == 0:
        acc += tl.load(ACC + offs, mask=m2, other=0.0)
    # DZSUM carries Σ dz across chunks; only the pid_d == 0 column writes it, and it is
    # read by the other columns only in the last chunk, when nobody writes it.
    if NEED_COLSUM:
        if first == 0:
            if (last != 0) | (pid_d == 0):
                colsum += tl.load(DZSUM + ks, mask=kmask, other=0.0)
    if last == 0:
        tl.store(ACC + offs, acc, mask=m2)
        if NEED_COLSUM:
            if pid_d == 0:
                tl.store(DZSUM + ks, colsum, mask=kmask)
    else:
        if USE_OFFSET or UNIFORM:
            doff = tl.zeros((BLOCK_N,), dtype=tl.float32)
            if USE_OFFSET:
                doff -= colsum
            if UNIFORM:
                logp = -tl.load(OFF + ks, mask=kmask, other=0.0) - tl.load(UCS)
                doff += (g * lam_u) * (-tl.exp(logp) * (logp - tl.load(UCS + 1)))
            c = tl.load(C + offs, mask=m2, other=0.0).to(tl.float32)
            acc += 0.5 * c * doff[:, None]
        tl.store(DW + offs, acc.to(DW.dtype.element_ty), mask=m2)
        if CENTER_GRAD:
            dc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            if USE_OFFSET or UNIFORM:
                w = tl.load(W + offs, mask=m2, other=0.0).to(tl.float32)
                dc += 0.5 * w * doff[:, None]
            if CENTER:
                c2 = tl.load(C + offs, mask=m2, other=0.0).to(tl.float32)
                s = tl.load(SUMS + offs, mask=m2, other=0.0)
                n = tl.load(COUNTS + ks, mask=kmask, other=0.0)
                dc -= (g * center_scale) * (s - n[:, None] * c2)
            tl.store(DC + offs, dc.to(DC.dtype.element_ty), mask=m2)
        if HAS_BIAS:
            if pid_d == 0:
                tl.store(DB + ks, colsum.to(DB.dtype.element_ty), mask=kmask)
