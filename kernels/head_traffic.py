"""HBM bytes and FLOPs of the fused head per forward + backward: the model the tests hold the plan to.

`modelled_bytes` counts, per launch of `plan_forward` + `plan_backward` (its keys are exactly those
kernels, a test checks it), every tensor a kernel touches once per kernel. That holds because each
grid is ordered (program id 0 fastest) so that the programs sharing the large operand tile run side
by side and share it through L2: logits / dz: the M/BM programs of one W tile; grad_features: the
M/BM programs of one W column slab; grad_weight: the d/BD programs of one dz column slab. Each
kernel's docstring (kernels/fused_head_triton.py) gives the same bytes and FLOPs.

Ideal = f and W read twice, C once (õ), dF and dW written, the logits streamed once in the feature
dtype. Engine default (eo_uc, center_grad=False, no stats), B=512, d=2048, per fwd+bwd:

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

(`traffic_table()` prints it; fp16 and AMP-fp16 give the bf16 / AMP-bf16 numbers, TF32 the fp32
ones: 1.55–1.88× for every precision, and tests/test_fused_head.py asserts ≤ 2× for each.)
Per kernel at bf16 / fp32 (AMP), K=131072 (GB): logits 2.15 (W and C, for õ), rows 0.01, dz 1.21
(W, dz), grad_features 1.22 (dz, W), grad_weight 2.28 (dz, C for ½c∂L/∂õ, dW). Above the ideal are
dz, written once and read twice in the GEMM dtype (the ideal streams the logits once), and the third
read of W (the backward's recompute of the logits).

FLOPs: 8·B·K·d (`flops`): the logits GEMM runs twice (forward, backward recompute) besides dF and
dW, a third more than the 6·B·K·d minimum (`ideal_flops`), plus 2·K·d·B/BM for õ (each of the B/BM
row tiles recomputes it from its W and C tiles, ≤ 0.2% at B/BM = 4). On an H100's data-sheet limits
(989 TFLOP/s dense bf16, 3.35 TB/s) the roofline floor max(FLOPs/rate, bytes/bandwidth) at
(512, 2048, K) is 13.3 µs (K=1000), 72 µs (8142) and 1112 µs (131072) for bf16, 22, 133 and 2052 µs
for AMP-bf16; the arithmetic intensity is 190–300 FLOP/B (bf16) and 115–160 (AMP), at or below the
~295 ridge, so the recompute's FLOPs cost less than the bytes it saves.

The alternatives the model rules out, at the same shapes:
  (a) every gradient computed in the forward, scaled by grad_output in the backward, õ from a
      pass of its own: an fp32 (B, K) logits round trip (8·B·K bytes), a scaling pass over dF and
      dW (2·(|f| + |W|)) and one more read of W, 2.15–2.48× the ideal; its roofline floors are
      17.6, 103 and 1570 µs (bf16), 27, 182 and 2854 µs (AMP-bf16). Folding grad_output into
      another pass does not help: after the forward nothing but the autograd engine reads dF or
      dW, so the scale costs 2·(|f| + |W|) wherever it runs.
  (b) only the gradient GEMMs deferred to the backward, the forward writing dz: ~1.67–1.96× with
      6·B·K·d FLOPs, but dz lives from forward to backward as a (B, K) buffer (128 MB at
      K = 131072, GBs at larger B), which the row chunking exists to avoid.
  (c) one backward kernel producing dF and dW with atomics: fp32 (B, d) and (K, d) accumulators
      (an fp32 K×d scratch for a bf16 W) and atomic traffic the model cannot bound.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kernels.head_plan import HeadFlags, dz_dtype, head_shape

# The engine's default method, eo_uc: center and uniform terms, õ in the logits, constant centers.
ENGINE_FLAGS = HeadFlags(lambda_center=1.0, lambda_uniform=1.0, use_offset=True, center_grad=False)


def modelled_bytes(
    B: int, D: int, K: int, features_dtype=torch.bfloat16, weight_dtype=torch.bfloat16, flags: HeadFlags | None = None,
    tf32: bool = True,
) -> dict:
    """HBM bytes per fwd+bwd of the fused head, per launch (keys: the Triton kernels of `plan_forward`
    then `plan_backward`, and the torch kernels `stats_memset`, `loss_sum`), and the ideal (module
    docstring). Centers and bias have W's dtype. Returns {kernels, total, ideal, ratio, chunks}."""
    flags = flags or ENGINE_FLAGS
    s = head_shape(B, D, K, features_dtype, weight_dtype, replace(flags, tf32=int(tf32)), interpret=False)
    ef, ew, ez = features_dtype.itemsize, weight_dtype.itemsize, dz_dtype(s.mode).itemsize
    f, W, cy = B * D * ef, K * D * ew, B * D * ew  # features, weight (= centers), the gathered c_y rows
    chunks, NT = s.chunks, s.class_tiles
    parts = 3 if flags.smooth else 2  # per-row softmax partials of a class tile: max, Σe (, Σz)
    out = {}
    # forward
    # logits: F once (each chunk its rows); W, and C for õ, once per chunk; the partials of every
    # row and class tile (4·B·NT·parts) and z_{i,y_i} (4·B); õ (4·K) and the UC partials (12·NT).
    out["_logits_kernel"] = (f + chunks * (W + (W if flags.need_off else 0)) + 4 * B * NT * parts + 4 * B
                             + (4 * K + 12 * NT if flags.need_off else 0))
    # rows: the partials and z_y read back; F rows (center term or stats), c_y rows (center term);
    # lse and the row loss written (4·B each); stats: atomic adds on fp32 sums and counts, each a
    # read and a write (8·B·d + 8·B).
    out["_rows_kernel"] = (4 * B * NT * parts + 4 * B + (f if (flags.center or flags.sums) else 0)
                           + (cy if flags.center else 0) + 4 * B + 4 * B + (8 * B * D + 8 * B if flags.sums else 0))
    out["stats_memset"] = 4 * (K * D + K) if flags.sums else 0  # the zero-fill of sums and counts
    out["loss_sum"] = 4 * (B + 1)  # Σ row losses (+ λ2·UC)
    # backward
    # dz: F once, W once per chunk (the recompute), dz written (ez·B·K), õ (4·K), lse (4·B).
    out["_dz_kernel"] = f + chunks * W + ez * B * K + (4 * K if flags.use_offset else 0) + 4 * B
    # grad_features: dz read, W once per chunk, dF written (F's dtype); center term: F and c_y rows.
    out["_grad_features_kernel"] = ez * B * K + chunks * W + f + ((f + cy) if flags.center else 0)
    # grad_weight: dz read, F counted once per chunk, dW written, C read for ½c∂L/∂õ (õ in the loss).
    gw = ez * B * K + chunks * f + W + (W if flags.need_off else 0)
    if chunks > 1:  # fp32 accumulator across chunks: written by all but the last, read by all but the first
        gw += (chunks - 1) * 2 * K * D * 4
    if flags.c_grad:  # dC epilogue: W and C read, dC written (W's dtype), fp32 sums S read
        gw += 3 * W + 4 * K * D
    out["_grad_weight_kernel"] = gw
    total = sum(out.values())
    # ideal: f and W read twice (forward GEMM, backward GEMMs), C once (õ), dF and dW written,
    # the logits streamed once in the feature dtype.
    ideal = 2 * (f + W) + (W if flags.need_off else 0) + f + W + B * K * ef
    return dict(kernels=out, total=total, ideal=ideal, ratio=total / ideal, chunks=chunks)


def flops(B: int, D: int, K: int) -> int:
    """Matmul FLOPs per fwd+bwd: logits (forward), logits again (backward recompute),
    dF = dz·W, dW = dzᵀ·F, 2·B·K·d each: 8·B·K·d (the O(B·K + K·d·B/BM) rest — õ, softmax — is ignored)."""
    return 8 * B * K * D


def ideal_flops(B: int, D: int, K: int) -> int:
    """Matmul FLOPs per fwd+bwd with nothing recomputed: logits, dF, dW (the roofline's numerator)."""
    return 6 * B * K * D


def traffic_table() -> str:
    """The module docstring's table: `modelled_bytes` at the engine default, B=512, d=2048."""
    rows = ["| dtype (f / W)  | K      | modelled GB | ideal GB | ratio |",
            "|----------------|--------|-------------|----------|-------|"]
    for fd, wd, name in ((torch.bfloat16, torch.bfloat16, "bf16 / bf16"), (torch.bfloat16, torch.float32, "bf16 / fp32"),
                         (torch.float32, torch.float32, "fp32 / fp32")):
        for K in (1000, 8142, 131072):
            m = modelled_bytes(512, 2048, K, fd, wd)
            rows.append(f"| {name:<14} | {K:<6} | {m['total'] / 1e9:<11.3g} | {m['ideal'] / 1e9:<8.3g} | {m['ratio']:.2f}  |")
    return "\n".join(rows)
