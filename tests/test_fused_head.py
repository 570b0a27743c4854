"""Fused Triton head loss vs the float64 reference, run on CPU under TRITON_INTERPRET=1.

Errors are measured as max|x − ref| / max|ref| per tensor (normwise relative error)
against `kernels.reference.offset_head_loss` evaluated in float64 on the same
(dtype-rounded) inputs, so only the kernel's own rounding is measured.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must set TRITON_INTERPRET before imports"

import kernels  # noqa: E402
from kernels import fused_head  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.fused_head import fused_offset_head_loss, fused_offset_head_loss_with_stats  # noqa: E402

# Relative error (vs float64) allowed per input dtype. fp32: accumulation-order noise only.
# bf16 / fp16: the gradients are returned in the input dtype, so the bound is its rounding
# (2^-8 for bf16, 2^-11 for fp16) plus a margin; the loss itself is always fp32.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}

FLAG_NAMES = ("use_offset", "bias", "center", "uniform", "smoothing", "center_grad")


def make_inputs(B, K, D, seed=0, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.randn(K, D, generator=g, dtype=torch.float64) / D**0.5 * 2
    c = torch.randn(K, D, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(K, generator=g, dtype=torch.float64) * 0.3 if with_bias else None
    y = torch.randint(0, K, (B,), generator=g)
    y[: min(3, B)] = y[0]  # repeated labels: atomics on the same class row
    return f, w, c, b, y


def rel_err(x, ref):
    x = x.detach().double()
    ref = ref.detach().double()
    scale = ref.abs().max().item()
    diff = (x - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def run_both(f, w, c, b, y, dtype, lam_c, lam_u, **kw):
    """(loss, grads) of the fused kernel on `dtype` inputs and of the reference in float64."""
    chunk_rows = kw.pop("chunk_rows", 0)
    xs = [t.to(dtype).requires_grad_() if t is not None else None for t in (f, w, c, b)]
    rs = [t.to(dtype).double().requires_grad_() if t is not None else None for t in (f, w, c, b)]
    loss = fused_offset_head_loss(xs[0], xs[1], xs[2], y, lam_c, lam_u, bias=xs[3], chunk_rows=chunk_rows, **kw)
    loss.backward()
    ref = reference.offset_head_loss(rs[0], rs[1], rs[2], y, lam_c, lam_u, bias=rs[3], **kw)
    ref.backward()
    return loss, xs, ref, rs


def check_close(loss, xs, ref, rs, dtype):
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, ref) < LOSS_TOL[dtype], (loss.item(), ref.item())
    for name, x, r in zip(("features", "weight", "centers", "bias"), xs, rs):
        if r is None:
            continue
        if r.grad is None:
            assert x.grad is None, f"{name}: reference has no gradient, fused gave one"
            continue
        assert x.grad is not None, f"{name}: fused kernel gave no gradient"
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
        assert torch.isfinite(x.grad).all(), name
        err = rel_err(x.grad, r.grad)
        assert err < TOL[dtype], f"{name} grad: relative error {err:.2e} > {TOL[dtype]:.0e}"


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=6)), ids=lambda fl: "".join("01"[x] for x in fl))
def test_every_flag_combination(flags):
    use_offset, with_bias, center, uniform, smoothing, center_grad = flags
    f, w, c, b, y = make_inputs(10, 37, 19, seed=sum(v << i for i, v in enumerate(flags)), with_bias=with_bias)
    out = run_both(
        f, w, c, b, y, torch.float32, 0.7 if center else 0.0, 0.6 if uniform else 0.0,
        use_offset=use_offset, label_smoothing=0.15 if smoothing else 0.0, center_grad=center_grad,
        chunk_rows=4,  # 3 row chunks, the last one partial
    )
    check_close(*out, torch.float32)
    xs, rs = out[1], out[3]
    if not center_grad:
        assert xs[2].grad is None  # centers are constants, like the reference's c.detach()


@pytest.mark.parametrize(
    "B,K,D",
    [
        (6, 1000, 64),  # 8 class tiles, one d tile
        (10, 37, 19),  # nothing a multiple of a block
        (70, 37, 19),  # two row blocks inside one chunk (BLOCK_M = 64)
        (3, 130, 65),  # K and d one past a block boundary
        (5, 2100, 16),  # several iterations of the per-row loop over K (block 1024)
    ],
)
def test_shapes_fp32(B, K, D):
    f, w, c, b, y = make_inputs(B, K, D, seed=B + K + D)
    check_close(*run_both(f, w, c, b, y, torch.float32, 1.0, 1.0, label_smoothing=0.1), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("center_grad", [True, False])
def test_low_precision(dtype, center_grad):
    f, w, c, b, y = make_inputs(9, 37, 19, seed=3)
    out = run_both(f, w, c, b, y, dtype, 0.5, 1.0, label_smoothing=0.1, center_grad=center_grad, chunk_rows=4)
    check_close(*out, dtype)


def test_mixed_dtypes_and_autocast():
    """Under autocast the backbone hands bf16 features to an fp32 head: computed in fp32."""
    f, w, c, b, y = make_inputs(8, 37, 19, seed=5)
    lin = torch.nn.Linear(19, 19).double()
    x = f.clone()
    wp = w.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = lin.float()(x.float())
        assert feats.dtype == torch.bfloat16
        feats.retain_grad()
        loss = kernels.offset_head_loss(feats, wp, c.float(), y, 0.5, 0.5, bias=b.float(), backend="triton")
    loss.backward()
    fr = feats.detach().double().requires_grad_()
    wr = w.float().double().requires_grad_()
    ref = reference.offset_head_loss(fr, wr, c.float().double(), y, 0.5, 0.5, bias=b.float().double())
    ref.backward()
    assert rel_err(loss, ref) < 1e-5
    assert feats.grad.dtype == torch.bfloat16 and wp.grad.dtype == torch.float32
    assert rel_err(feats.grad, fr.grad) < TOL[torch.bfloat16]
    assert rel_err(wp.grad, wr.grad) < TOL[torch.float32]


def test_grad_output_scaling_and_no_grad_inputs():
    f, w, c, b, y = make_inputs(7, 37, 19, seed=11)
    fx = f.float().requires_grad_()
    wx = w.float().requires_grad_()
    loss = fused_offset_head_loss(fx, wx, c.float(), y, 1.0, 1.0, bias=b.float())  # c, b: no grad
    (3.0 * loss).backward()
    fr = f.float().double().requires_grad_()
    wr = w.float().double().requires_grad_()
    (3.0 * reference.offset_head_loss(fr, wr, c.float().double(), y, 1.0, 1.0, bias=b.float().double())).backward()
    assert rel_err(fx.grad, fr.grad) < TOL[torch.float32]
    assert rel_err(wx.grad, wr.grad) < TOL[torch.float32]


# --------------------------------------------------------------------------- poison / stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_poisoned_buffers_are_all_written(monkeypatch, dtype, smoothing):
    """Every buffer the kernels should overwrite starts as NaN: any unwritten element shows."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(fused_head, "_empty", nan_empty)
    f, w, c, b, y = make_inputs(70, 130, 65, seed=2)
    out = run_both(f, w, c, b, y, dtype, 0.5, 0.5, label_smoothing=smoothing, chunk_rows=32)
    check_close(*out, dtype)
    args = [t.to(dtype) for t in (f, w, c, b)]
    res = fused_head._forward_impl(args[0], args[1], args[2], y, args[3], 0.5, 0.5, True, smoothing, True, 32)
    for name, t in zip(("loss", "dF", "dW", "dC", "dB", "sums", "counts"), res):
        assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"


def test_poison_detector_can_fail(monkeypatch):
    """The poison check catches a kernel that skips elements (here: a finalize that writes nothing)."""
    monkeypatch.setattr(
        fused_head, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )

    class _Skip:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    monkeypatch.setattr(fused_head, "_finalize_kernel", _Skip())
    f, w, c, b, y = make_inputs(5, 37, 19, seed=4)
    bf = [t.to(torch.bfloat16) for t in (f, w, c, b)]
    res = fused_head._forward_impl(bf[0], bf[1], bf[2], y, bf[3], 1.0, 1.0, True, 0.0, True, 0)
    for name, t in zip(("dW", "dC", "dB"), res[2:5]):
        assert torch.isnan(t).all(), f"{name}: finalize skipped, yet not NaN"
    assert torch.isfinite(res[1]).all()  # dF comes from another kernel


@pytest.mark.parametrize("chunk_rows", [0, 4])
def test_class_stats_match_reference(chunk_rows):
    f, w, c, b, y = make_inputs(23, 37, 19, seed=8)
    y[5:12] = 36  # last class, many repeats
    loss, sums, counts = fused_offset_head_loss_with_stats(
        f.float(), w.float(), c.float(), y, 1.0, 1.0, bias=b.float(), chunk_rows=chunk_rows
    )
    rs, rc = reference.class_feature_sums(f.float(), y, 37)
    assert sums.dtype == torch.float32 and counts.dtype == torch.float32
    torch.testing.assert_close(sums, rs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(counts, rc, rtol=0, atol=0)
    # Wen's update from the fused stats equals the one from the reference stats.
    c1, c2 = c.float().clone(), c.float().clone()
    reference.wen_center_update(c1, sums, counts, 0.5)
    reference.wen_center_update(c2, rs, rc, 0.5)
    torch.testing.assert_close(c1, c2)


# --------------------------------------------------------------------------- host boundary


def _small():
    f, w, c, b, y = make_inputs(6, 37, 19, seed=1)
    return f.float(), w.float(), c.float(), b.float(), y


@pytest.mark.parametrize("bad", [37, -1, 1000])
def test_label_out_of_range_message(bad):
    f, w, c, b, y = _small()
    y[3] = bad
    with pytest.raises(ValueError, match=rf"labels\[3\] = {bad} is out of range.*0\.\.36"):
        fused_offset_head_loss(f, w, c, y)


@pytest.mark.parametrize(
    "mutate,exc,msg",
    [
        (lambda a: a.update(features=a["features"][:, :5]), ValueError, "weight must be"),
        (lambda a: a.update(centers=a["centers"][:-1]), ValueError, "centers must have the shape"),
        (lambda a: a.update(labels=a["labels"][:-1]), ValueError, "labels must be 1-D of length"),
        (lambda a: a.update(labels=a["labels"].float()), TypeError, "labels must be int64"),
        (lambda a: a.update(bias=a["bias"][:-2]), ValueError, "bias must be"),
        (lambda a: a.update(features=a["features"].double()), TypeError, "features has dtype torch.float64"),
        (lambda a: a.update(weight=a["weight"].int()), TypeError, "weight has dtype torch.int32"),
        (lambda a: a.update(features=a["features"][0]), ValueError, "features must be 2-D"),
        (lambda a: a.update(labels=a["labels"].to("meta")), ValueError, "one device"),
        (lambda a: a.update(label_smoothing=1.5), ValueError, "label_smoothing"),
    ],
)
def test_host_boundary_errors(mutate, exc, msg):
    f, w, c, b, y = _small()
    a = dict(features=f, weight=w, centers=c, labels=y, bias=b, label_smoothing=0.0)
    mutate(a)
    with pytest.raises(exc, match=msg):
        fused_offset_head_loss(
            a["features"], a["weight"], a["centers"], a["labels"], bias=a["bias"], label_smoothing=a["label_smoothing"]
        )


def test_non_contiguous_inputs():
    f, w, c, b, y = _small()
    wt = w.t().contiguous().t()  # same values, transposed strides
    ft = f.t().contiguous().t()
    assert not wt.is_contiguous() and not ft.is_contiguous()
    a = fused_offset_head_loss(ft, wt, c, y, bias=b)
    e = fused_offset_head_loss(f, w, c, y, bias=b)
    torch.testing.assert_close(a, e, rtol=1e-6, atol=0)


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setattr(fused_head, "INTERPRET", False)
    f, w, c, b, y = _small()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.offset_head_loss(f, w, c, y, backend="triton")


# --------------------------------------------------------------------------- dispatcher


def test_dispatcher_backends(monkeypatch):
    f, w, c, b, y = _small()
    kw = dict(use_offset=True, bias=b, label_smoothing=0.1, center_grad=False)
    ref = reference.offset_head_loss(f, w, c, y, 0.5, 0.5, **kw)
    assert kernels.reference.offset_head_loss is reference.offset_head_loss
    torch.testing.assert_close(kernels.offset_head_loss(f, w, c, y, 0.5, 0.5, backend="torch", **kw), ref, rtol=0, atol=0)
    torch.testing.assert_close(kernels.offset_head_loss(f, w, c, y, 0.5, 0.5, backend="triton", **kw), ref, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.offset_head_loss(f, w, c, y, backend="cuda")

    # "auto" on CPU tensors is the reference: the fused path must not run at all.
    def boom(*a, **k):
        raise AssertionError("auto dispatched CPU tensors to the Triton kernel")

    monkeypatch.setattr(fused_head, "_forward_impl", boom)
    torch.testing.assert_close(kernels.offset_head_loss(f, w, c, y, 0.5, 0.5, **kw), ref, rtol=0, atol=0)


def test_engine_head_loss_unchanged_on_cpu():
    from engine.heads import OffsetHead

    head = OffsetHead(19, 37, "eo_uc")
    f, _, _, _, y = _small()
    expect = reference.offset_head_loss(
        f, head.weight, head.centers, y, head.lambda_center, head.lambda_uniform,
        use_offset=True, bias=None, label_smoothing=0.0, center_grad=False,
    )
    torch.testing.assert_close(head.loss(f, y), expect, rtol=0, atol=0)


# --------------------------------------------------------------------------- torch.library / compile


def test_opcheck():
    f, w, c, b, y = _small()
    args = (f.requires_grad_(), w.requires_grad_(), c.requires_grad_(), y, b.requires_grad_(), 0.5, 0.5, True, 0.1, True, 0)
    torch.library.opcheck(
        fused_head._fused_head_op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )


def test_torch_compile_fullgraph():
    f, w, c, b, y = _small()

    def step(f, w, c, y, b):
        return 2.0 * kernels.offset_head_loss(f, w, c, y, 0.5, 0.7, bias=b, label_smoothing=0.1, backend="triton")

    compiled = torch.compile(step, fullgraph=True)
    fc, wc = f.clone().requires_grad_(), w.clone().requires_grad_()
    out = compiled(fc, wc, c, y, b)
    out.backward()
    fe, we = f.clone().requires_grad_(), w.clone().requires_grad_()
    ref = step(fe, we, c, y, b)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(fc.grad, fe.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(wc.grad, we.grad, rtol=1e-5, atol=1e-7)
