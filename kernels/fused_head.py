"""Fused Triton head loss: input checks, the custom ops, their autograd and the public entry points.

The loss is the estimated-offset head loss (Eq. 6 of the EO paper) as `kernels.reference.offset_head_loss`
defines it (read that file first):

    f_i  (B, d) features        w_k (K, d) class weights      c_k (K, d) class centers
    õ_k  = ½ c_k·w_k                                   estimated offset, (K,)
    z_ik = w_k·f_i − õ_k (+ b_k)                       logits (the −õ only with use_offset)
    L    = 1/B Σ_i CE_ε(z_i, y_i)                       cross-entropy, label smoothing ε
         + λ1 · 1/B Σ_i ‖f_i − c_{y_i}‖²                center loss
         + λ2 · Σ_k p_k log p_k,  p = softmax(−õ)       uniform constraint (Eq. 5)

Design (after Apple's Cut Cross-Entropy and Liger-Kernel's fused linear cross-entropy, not their
code): the forward computes the loss, each row's log-sum-exp and the per-class stats and stores no
logit; the backward recomputes the logit tile from f and W, forms dz in registers from the saved
lse and runs the two gradient GEMMs with grad_output read on the device and folded into their fp32
1/B scale. What that buys, and what it costs:
  * no (B, K) buffer: the backward's (chunk, K) dz scratch is the only (·, K) tensor, under 512 MiB
    per row chunk (one chunk at B = 512, K ≤ 131072);
  * launches, for every method: forward 2 Triton kernels per row chunk (logits, rows) + the loss
    sum (+ the stats zero-fill when asked), so ≤ 4 at one chunk; backward 3 per row chunk (dz,
    grad_features, grad_weight) and nothing else;
  * no host sync and no data-dependent shape: the op captures in a CUDA graph and torch.compile
    traces it without a graph break. Labels are checked on the host only when they live on the CPU
    (free), else in-kernel with tl.device_assert under flags.debug;
  * modelled HBM traffic 1.55–1.88× the ideal at B = 512, d = 2048, K ∈ {1000, 8142, 131072} for
    every precision, for 8·B·K·d matmul FLOPs — the recompute adds a third to the 6·B·K·d minimum,
    which at these shapes costs less than the bytes it saves (`kernels.head_traffic`).

One concern per file:
    kernels/reference.py          the definition, in plain PyTorch (the tests' float64 oracle)
    kernels/head_plan.py          HeadFlags, GEMM precision, tiles, row chunks and the launches
    kernels/head_traffic.py       bytes and FLOPs per launch: the model the tests hold the plan to
    kernels/fused_head_triton.py  the Triton kernels and the gradient derivation
    kernels/fused_head.py         this file
    kernels/aot.py                the ahead-of-time compile report for sm_90 / sm_80

Entry points (each builds one `HeadFlags` from its arguments):
    fused_offset_head_loss(...)              -> loss              (autograd-aware)
    fused_offset_head_loss_with_stats(...)   -> (loss, sums, counts)
    offset_head_loss(..., backend="auto")    dispatcher: "triton" | "torch" | "auto"
    offset_head_loss_with_stats(...)         the same, with the per-class sums and counts
The work is two custom ops (torch.library) whose schemas take the tensors, then HeadFlags' fields:
`lt_engine::fused_offset_head_cce` (forward: loss, lse, õ, UC statistics, per-class stats) and
`lt_engine::fused_offset_head_cce_backward` (grad_output → dF, dW, dC, dB), each with a fake
implementation, joined by an autograd formula.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor

from kernels import head_plan
from kernels import reference as _ref
from kernels.head_plan import SUPPORTED_DTYPES, HeadFlags, HeadInputs, Saved, plan_backward, plan_forward

# --------------------------------------------------------------------------- host side


def _check_inputs(inputs: HeadInputs, flags: HeadFlags) -> None:
    """Shape / dtype / device checks that need no data (also run while tracing)."""
    features, weight, centers, labels, bias = inputs
    for name, t in (("features", features), ("weight", weight), ("centers", centers)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
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
        if bias.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"bias has dtype {bias.dtype}; expected float32, bfloat16 or float16")
    devices = {t.device for t in inputs if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if not 0.0 <= flags.label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {flags.label_smoothing}")


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


def _run(launches: list, flags: HeadFlags) -> None:
    for launch in launches:
        launch.run(debug=bool(flags.debug) and not head_plan.INTERPRET)


def _forward_impl(inputs: HeadInputs, flags: HeadFlags) -> tuple[Tensor, ...]:
    """(loss, *Saved): the loss and what the backward needs, in one pass over the batch (+ the
    per-class stats); the Saved tensors the flags need none of are empty (0,) tensors."""
    if not head_plan.HAS_TRITON:
        raise RuntimeError("the fused head needs triton; use backend='torch'")
    _check_inputs(inputs, flags)
    if inputs.features.device.type == "cpu" and not head_plan.INTERPRET:
        raise RuntimeError(
            "backend='triton' got CPU tensors but Triton's interpreter is off: set the environment "
            "variable TRITON_INTERPRET=1 before importing `kernels` (or use backend='torch')"
        )
    inputs = inputs.prepared()
    _check_labels(inputs.labels, inputs.weight.shape[0])
    plan = plan_forward(inputs, flags)
    _run(plan.launches, flags)
    return (plan.rowloss.sum(), *plan.saved)


def _backward_impl(g: Tensor, inputs: HeadInputs, saved: Saved, flags: HeadFlags) -> tuple[Tensor, ...]:
    """(dF, dW, dC, dB) of grad_output g (0-dim, any float dtype, read on the device);
    dC / dB are empty (0,) when the centers take no gradient / there is no bias."""
    plan = plan_backward(g.reshape(()), inputs.prepared(), saved, flags)
    _run(plan.launches, flags)
    return plan.dF, plan.dW, plan.dC, plan.dB


def split_stats(stats: Tensor, K: int, D: int) -> tuple[Tensor, Tensor]:
    """The op's flat stats buffer as (sums (K, d), counts (K,)) views."""
    return stats[: K * D].view(K, D), stats[K * D:]


# --------------------------------------------------------------------------- custom ops

_INPUTS_SCHEMA = "Tensor features, Tensor weight, Tensor centers, Tensor labels, Tensor? bias"
_SAVED_SCHEMA = "Tensor lse, Tensor off, Tensor ucs, Tensor class_stats"


@torch.library.custom_op(
    "lt_engine::fused_offset_head_cce", mutates_args=(),
    schema=f"({_INPUTS_SCHEMA}, {HeadFlags.schema()}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _fused_head_op(features, weight, centers, labels, bias, *flag_args):
    return _forward_impl(HeadInputs(features, weight, centers, labels, bias), HeadFlags(*flag_args))


@_fused_head_op.register_fake
def _fused_head_fake(features, weight, centers, labels, bias, *flag_args):
    inputs, flags = HeadInputs(features, weight, centers, labels, bias), HeadFlags(*flag_args)
    _check_inputs(inputs, flags)
    K, D = weight.shape
    B = features.shape[0]
    f32 = torch.float32
    return (
        features.new_empty((), dtype=f32),
        features.new_empty((B,), dtype=f32),
        features.new_empty((K if flags.need_off else 0,), dtype=f32),
        features.new_empty((2 if flags.uniform else 0,), dtype=f32),
        features.new_empty((K * D + K if flags.sums else 0,), dtype=f32),
    )


@torch.library.custom_op(
    "lt_engine::fused_offset_head_cce_backward", mutates_args=(),
    schema=f"(Tensor g, {_INPUTS_SCHEMA}, {_SAVED_SCHEMA}, {HeadFlags.schema()}) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _fused_head_backward_op(g, features, weight, centers, labels, bias, lse, off, ucs, class_stats, *flag_args):
    return _backward_impl(g, HeadInputs(features, weight, centers, labels, bias), Saved(lse, off, ucs, class_stats),
                          HeadFlags(*flag_args))


@_fused_head_backward_op.register_fake
def _fused_head_backward_fake(g, features, weight, centers, labels, bias, lse, off, ucs, class_stats, *flag_args):
    flags = HeadFlags(*flag_args)
    K, D = weight.shape
    return (
        torch.empty_like(features, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        centers.new_empty((K, D)) if flags.c_grad else centers.new_empty((0,)),
        bias.new_empty((K,)) if bias is not None else features.new_empty((0,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    ctx.flag_args = tuple(inputs[5:])
    ctx.flags = HeadFlags(*ctx.flag_args)
    ctx.has_bias = inputs[4] is not None
    ctx.save_for_backward(*inputs[:5], *output[1:])  # the inputs, then Saved (lse, õ, UC stats, class stats)


def _backward(ctx, g_loss, *_unused):
    # Cut Cross-Entropy's split: the gradient GEMMs run here, with g_loss read in-kernel and
    # folded into the 1/B scale of their fp32 accumulators (no host sync, no scaling pass).
    dF, dW, dC, dB = _fused_head_backward_op(g_loss, *ctx.saved_tensors, *ctx.flag_args)
    grads = (dF, dW, dC if ctx.flags.c_grad else None, None, dB if ctx.has_bias else None)
    return grads + (None,) * len(fields(HeadFlags))


_fused_head_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API


def fused_head_loss(inputs: HeadInputs, flags: HeadFlags):
    """The fused op on `inputs` under `flags`: the loss (scalar, float32, differentiable like the
    reference), or with flags.stats (loss, sums (K, d), counts (K,)), the stats float32 and detached."""
    out = _fused_head_op(*inputs, *flags.op_args())
    if not flags.stats:
        return out[0]
    sums, counts = split_stats(out[4].detach(), *inputs.weight.shape)
    return out[0], sums, counts


def fused_offset_head_loss(
    features: Tensor, weight: Tensor, centers: Tensor, labels: Tensor,
    lambda_center: float = 1.0, lambda_uniform: float = 1.0, *,
    use_offset: bool = True, bias: Tensor | None = None, label_smoothing: float = 0.0, center_grad: bool = True,
    chunk_rows: int = 0, tf32: bool | None = None, debug: bool = False,
) -> Tensor:
    """The fused Triton head loss (scalar, float32); the reference's arguments, plus chunk_rows
    (> 0 forces the row-chunk size), tf32 (None: follow torch.backends.cuda.matmul.allow_tf32)
    and debug (in-kernel label check)."""
    flags = HeadFlags.of(lambda_center, lambda_uniform, use_offset=use_offset, label_smoothing=label_smoothing,
                         center_grad=center_grad, chunk_rows=chunk_rows, tf32=tf32, debug=debug)
    return fused_head_loss(HeadInputs(features, weight, centers, labels, bias), flags)


def fused_offset_head_loss_with_stats(
    features: Tensor, weight: Tensor, centers: Tensor, labels: Tensor,
    lambda_center: float = 1.0, lambda_uniform: float = 1.0, *,
    use_offset: bool = True, bias: Tensor | None = None, label_smoothing: float = 0.0, center_grad: bool = True,
    chunk_rows: int = 0, tf32: bool | None = None, debug: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """`fused_offset_head_loss` plus the batch's per-class feature sums (K, d) and counts (K,) in
    float32 (= `reference.class_feature_sums`), computed in the same pass, for `wen_center_update`."""
    flags = HeadFlags.of(lambda_center, lambda_uniform, use_offset=use_offset, label_smoothing=label_smoothing,
                         center_grad=center_grad, chunk_rows=chunk_rows, tf32=tf32, debug=debug, stats=True)
    return fused_head_loss(HeadInputs(features, weight, centers, labels, bias), flags)


BACKENDS = ("auto", "triton", "torch")


def _triton_usable(inputs: HeadInputs) -> bool:
    floats = [t for t in (inputs.features, inputs.weight, inputs.centers, inputs.bias) if t is not None]
    return (
        head_plan.HAS_TRITON
        and not head_plan.INTERPRET
        and all(t.is_cuda for t in floats)
        and all(t.dtype in SUPPORTED_DTYPES for t in floats if t.is_floating_point())
    )


def _reference_loss(inputs: HeadInputs, flags: HeadFlags):
    """The torch backend: `reference.offset_head_loss` (+ `reference.class_feature_sums` with flags.stats)."""
    f, w, c, y, b = inputs
    loss = _ref.offset_head_loss(f, w, c, y, flags.lambda_center, flags.lambda_uniform, use_offset=flags.use_offset,
                                 bias=b, label_smoothing=flags.label_smoothing, center_grad=flags.center_grad)
    if not flags.stats:
        return loss
    return (loss, *_ref.class_feature_sums(f, y, w.shape[0]))


def head_loss(inputs: HeadInputs, flags: HeadFlags, backend: str = "auto"):
    """Both public entry points' backend choice: the fused op or the reference, loss or (with
    flags.stats) loss + per-class stats."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if _triton_usable(inputs) else "torch"
    return fused_head_loss(inputs, flags) if backend == "triton" else _reference_loss(inputs, flags)


def offset_head_loss(
    features: Tensor, weight: Tensor, centers: Tensor, labels: Tensor,
    lambda_center: float = 1.0, lambda_uniform: float = 1.0, *,
    use_offset: bool = True, bias: Tensor | None = None, label_smoothing: float = 0.0, center_grad: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Eq. 6 head loss, dispatched: "torch" = `kernels.reference.offset_head_loss`,
    "triton" = the fused kernel (CUDA, or CPU under TRITON_INTERPRET=1),
    "auto" = Triton for CUDA tensors of float32/bfloat16/float16, the reference otherwise
    (so CPU training is unchanged)."""
    flags = HeadFlags.of(lambda_center, lambda_uniform, use_offset=use_offset, label_smoothing=label_smoothing,
                         center_grad=center_grad)
    return head_loss(HeadInputs(features, weight, centers, labels, bias), flags, backend)


def offset_head_loss_with_stats(
    features: Tensor, weight: Tensor, centers: Tensor, labels: Tensor,
    lambda_center: float = 1.0, lambda_uniform: float = 1.0, *,
    use_offset: bool = True, bias: Tensor | None = None, label_smoothing: float = 0.0, center_grad: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """`offset_head_loss` plus the batch's per-class feature sums (K, d) and counts (K,), float32,
    detached, for `wen_center_update` after the optimizer step — without a host sync on either
    backend (fused: from the same pass; torch: `reference.class_feature_sums`, index_add_ only)."""
    flags = HeadFlags.of(lambda_center, lambda_uniform, use_offset=use_offset, label_smoothing=label_smoothing,
                         center_grad=center_grad, stats=True)
    return head_loss(HeadInputs(features, weight, centers, labels, bias), flags, backend)


__all__ = [
    "BACKENDS",
    "HeadFlags",
    "HeadInputs",
    "fused_head_loss",
    "fused_offset_head_loss",
    "fused_offset_head_loss_with_stats",
    "head_loss",
    "offset_head_loss",
    "offset_head_loss_with_stats",
    "split_stats",
]
