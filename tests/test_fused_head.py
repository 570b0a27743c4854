"""Fused Triton head loss vs the float64 reference.

On a CUDA machine the compiled kernels run on the GPU; without one, the same kernels run
under Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 only then).
Errors are measured as max|x − ref| / max|ref| per tensor (normwise relative error)
against `kernels.reference.offset_head_loss` evaluated in float64 on CPU on the same
(dtype-rounded) inputs, so only the kernel's own rounding is measured.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must set TRITON_INTERPRET on CPU"

import kernels  # noqa: E402
from kernels import fused_head, head_plan, head_traffic, reference  # noqa: E402
from kernels.fused_head import fused_offset_head_loss, fused_offset_head_loss_with_stats  # noqa: E402
from kernels.head_plan import HeadFlags, HeadInputs, Saved  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CPU runs the kernels in Triton's interpreter)")
cpu_only = pytest.mark.skipif(CUDA, reason="host-side label check runs only for CPU labels (CUDA: tl.device_assert)")

# Relative error (vs float64) allowed per input dtype. fp32: accumulation-order noise only.
# bf16 / fp16: the gradients are returned in the input dtype, so the bound is its rounding
# (2^-8 for bf16, 2^-11 for fp16) plus a margin; the loss itself is always fp32.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}

FLAG_NAMES = ("use_offset", "bias", "center", "uniform", "smoothing", "center_grad")


def make_inputs(B, K, D, seed=0, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, generator=g, dtype=torch.float64)  # CPU float64; moved to DEVICE by the tests
    w = torch.randn(K, D, generator=g, dtype=torch.float64) / D**0.5 * 2
    c = torch.randn(K, D, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(K, generator=g, dtype=torch.float64) * 0.3 if with_bias else None
    y = torch.randint(0, K, (B,), generator=g)
    y[: min(3, B)] = y[0]  # repeated labels: atomics on the same class row
    return f, w, c, b, y


def rel_err(x, ref):
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    scale = ref.abs().max().item()
    diff = (x - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def run_both(f, w, c, b, y, dtype, lam_c, lam_u, **kw):
    """(loss, grads) of the fused kernel on `dtype` inputs and of the reference in float64."""
    chunk_rows = kw.pop("chunk_rows", 0)
    xs = [t.to(DEVICE, dtype).requires_grad_() if t is not None else None for t in (f, w, c, b)]
    rs = [t.to(dtype).double().requires_grad_() if t is not None else None for t in (f, w, c, b)]
    loss = fused_offset_head_loss(
        xs[0], xs[1], xs[2], y.to(DEVICE), lam_c, lam_u, bias=xs[3], chunk_rows=chunk_rows, tf32=False, **kw
    )
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
    xs = out[1]
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


# Under AMP the GEMMs run on bf16 operands (the weight tile is cast in registers, as autocast
# casts a linear layer's weight): the loss moves by ~2^-9 relative, gradients to bf16 accuracy.
AMP_LOSS_TOL = 2e-3


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_dtypes_and_autocast(amp_dtype):
    """Under autocast the backbone hands low-precision features to the fp32 head: its GEMMs run
    in the autocast dtype, the loss math in fp32, the weight gradient comes back fp32."""
    f, w, c, b, y = make_inputs(8, 37, 19, seed=5)
    lin = torch.nn.Linear(19, 19).to(DEVICE)
    x = f.float().to(DEVICE)
    wp = w.float().to(DEVICE).requires_grad_()
    with torch.autocast(DEVICE.type, dtype=amp_dtype):
        feats = lin(x)
        assert feats.dtype == amp_dtype
        feats.retain_grad()
        loss = kernels.offset_head_loss(
            feats, wp, c.float().to(DEVICE), y.to(DEVICE), 0.5, 0.5, bias=b.float().to(DEVICE), backend="triton"
        )
    loss.backward()
    fr = feats.detach().double().cpu().requires_grad_()
    wr = w.float().double().requires_grad_()
    ref = reference.offset_head_loss(fr, wr, c.float().double(), y, 0.5, 0.5, bias=b.float().double())
    ref.backward()
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref) < AMP_LOSS_TOL
    assert feats.grad.dtype == amp_dtype and wp.grad.dtype == torch.float32
    assert rel_err(feats.grad, fr.grad) < TOL[torch.bfloat16]
    assert rel_err(wp.grad, wr.grad) < TOL[torch.bfloat16]


def test_gemm_precision_table():
    """The docstring's table: one operand dtype for the three GEMMs per input dtype pair."""
    bf, hf, f32 = torch.bfloat16, torch.float16, torch.float32
    gm = head_plan.gemm_mode
    assert gm(bf, f32, tf32=False) == gm(bf, bf, tf32=True) == gm(f32, bf, tf32=False) == head_plan.MODE_BF16
    assert gm(hf, f32, tf32=True) == gm(hf, hf, tf32=False) == head_plan.MODE_FP16
    assert gm(f32, f32, tf32=True) == head_plan.MODE_TF32
    assert gm(f32, f32, tf32=False) == head_plan.MODE_IEEE
    assert gm(bf, f32, tf32=False, interpret=True) == head_plan.MODE_BF16_EMULATED
    assert gm(f32, f32, tf32=True, interpret=True) == head_plan.MODE_IEEE


def test_grad_output_scaling_and_no_grad_inputs():
    f, w, c, b, y = make_inputs(7, 37, 19, seed=11)
    fx = f.float().to(DEVICE).requires_grad_()
    wx = w.float().to(DEVICE).requires_grad_()
    loss = fused_offset_head_loss(fx, wx, c.float().to(DEVICE), y.to(DEVICE), 1.0, 1.0, bias=b.float().to(DEVICE),
                                  tf32=False)  # c, b: no grad
    (3.0 * loss).backward()
    fr = f.float().double().requires_grad_()
    wr = w.float().double().requires_grad_()
    (3.0 * reference.offset_head_loss(fr, wr, c.float().double(), y, 1.0, 1.0, bias=b.float().double())).backward()
    assert rel_err(fx.grad, fr.grad) < TOL[torch.float32]
    assert rel_err(wx.grad, wr.grad) < TOL[torch.float32]


@pytest.mark.parametrize("chunk_rows", [0, 3], ids=["1chunk", "3chunks"])
def test_non_unit_grad_output_scales_every_gradient(chunk_rows):
    """backward(grad_output=3.7) gives 3.7× every gradient (dF, dW, dC, dB: g_loss is read on the
    device and folded into the kernels' 1/B scale), and matches the float64 reference."""
    f, w, c, b, y = make_inputs(8, 37, 19, seed=12)
    grads = {}
    for g in (1.0, 3.7):
        xs = [t.float().to(DEVICE).requires_grad_() for t in (f, w, c, b)]
        loss = fused_offset_head_loss(xs[0], xs[1], xs[2], y.to(DEVICE), 0.7, 0.6, bias=xs[3], label_smoothing=0.1,
                                      chunk_rows=chunk_rows, tf32=False)
        loss.backward(torch.tensor(g, device=DEVICE))
        grads[g] = [x.grad for x in xs]
    rs = [t.float().double().requires_grad_() for t in (f, w, c, b)]
    reference.offset_head_loss(rs[0], rs[1], rs[2], y, 0.7, 0.6, bias=rs[3], label_smoothing=0.1).backward(
        torch.tensor(3.7, dtype=torch.float64))
    for name, g1, g37, r in zip(("features", "weight", "centers", "bias"), grads[1.0], grads[3.7], rs):
        torch.testing.assert_close(g37, 3.7 * g1, rtol=1e-5, atol=1e-7, msg=f"{name}: not 3.7× the unit gradient")
        assert rel_err(g37, r.grad) < TOL[torch.float32], name


# --------------------------------------------------------------------------- poison / stats


def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _on_device(dtype, *ts):
    return [t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE) for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [32, 0], ids=["3chunks", "1chunk"])
def test_poisoned_buffers_are_all_written(monkeypatch, dtype, smoothing, chunk_rows):
    """Every buffer the kernels should overwrite starts as NaN: any unwritten element shows."""
    monkeypatch.setattr(head_plan, "_empty", _nan_empty)
    f, w, c, b, y = make_inputs(70, 130, 65, seed=2)
    out = run_both(f, w, c, b, y, dtype, 0.5, 0.5, label_smoothing=smoothing, chunk_rows=chunk_rows)
    check_close(*out, dtype)
    fd, wd, cd, bd, yd = _on_device(dtype, f, w, c, b, y)
    flags = HeadFlags(0.5, 0.5, True, smoothing, True, chunk_rows, 0, stats=True)
    inputs = HeadInputs(fd, wd, cd, yd, bd)
    res = fused_head._forward_impl(inputs, flags)
    grads = fused_head._backward_impl(torch.tensor(1.0, device=DEVICE), inputs, Saved(*res[1:]), flags)
    for name, t in zip(("loss", "lse", "off", "ucs", "stats", "dF", "dW", "dC", "dB"), res + grads):
        assert t.numel() > 0 and torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"


def test_poison_detector_can_fail(monkeypatch):
    """The poison check catches a kernel that skips elements (here: a grad-weight pass that writes nothing)."""
    monkeypatch.setattr(head_plan, "_empty", _nan_empty)

    class _Skip:
        __name__ = "_skip"

        def __getitem__(self, grid):
            return lambda *a, **k: None

    monkeypatch.setattr(head_plan, "_grad_weight_kernel", _Skip())
    f, w, c, b, y = make_inputs(5, 37, 19, seed=4)
    fd, wd, cd, bd, yd = _on_device(torch.bfloat16, f, w, c, b, y)
    flags = HeadFlags(1.0, 1.0, True, 0.0, True)
    inputs = HeadInputs(fd, wd, cd, yd, bd)
    res = fused_head._forward_impl(inputs, flags)
    grads = fused_head._backward_impl(torch.tensor(1.0, device=DEVICE), inputs, Saved(*res[1:]), flags)
    for name, t in zip(("dW", "dC", "dB"), grads[1:]):
        assert torch.isnan(t).all(), f"{name}: grad-weight pass skipped, yet not NaN"
    assert torch.isfinite(grads[0]).all()  # dF comes from another kernel


@pytest.mark.parametrize("chunk_rows", [0, 4])
def test_class_stats_match_reference(chunk_rows):
    f, w, c, b, y = make_inputs(23, 37, 19, seed=8)
    y[5:12] = 36  # last class, many repeats
    fd, wd, cd, bd, yd = _on_device(torch.float32, f, w, c, b, y)
    loss, sums, counts = fused_offset_head_loss_with_stats(fd, wd, cd, yd, 1.0, 1.0, bias=bd, chunk_rows=chunk_rows)
    rs, rc = reference.class_feature_sums(f.float(), y, 37)
    assert sums.dtype == torch.float32 and counts.dtype == torch.float32
    torch.testing.assert_close(sums.cpu(), rs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(counts.cpu(), rc, rtol=0, atol=0)
    # Wen's update from the fused stats equals the one from the reference stats.
    c1, c2 = c.float().clone(), c.float().clone()
    reference.wen_center_update(c1, sums.cpu(), counts.cpu(), 0.5)
    reference.wen_center_update(c2, rs, rc, 0.5)
    torch.testing.assert_close(c1, c2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_with_stats_dispatcher(backend):
    """`kernels.offset_head_loss_with_stats`: the engine's one call for loss + Wen statistics."""
    f, w, c, b, y = make_inputs(12, 37, 19, seed=9)
    fd, wd, cd, bd, yd = _on_device(torch.float32, f, w, c, b, y)
    loss, sums, counts = kernels.offset_head_loss_with_stats(fd, wd, cd, yd, 0.3, 0.4, bias=bd, center_grad=False,
                                                             backend=backend)
    ref = reference.offset_head_loss(fd, wd, cd, yd, 0.3, 0.4, bias=bd, center_grad=False)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    rs, rc = reference.class_feature_sums(f.float(), y, 37)
    torch.testing.assert_close(sums.cpu(), rs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(counts.cpu(), rc, rtol=0, atol=0)
    assert not sums.requires_grad and not counts.requires_grad


# --------------------------------------------------------------------------- syncs, launches, graphs


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op dispatched (names), to find host syncs and count launches."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.paused = False  # inside a Triton launch (the interpreter's own tensor traffic)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            self.ops.append(name)
            out = func(*args, **(kwargs or {}))
            if name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor):
                src = args[1] if name == "copy_" else args[0]
                if src.device.type != "cpu" and out.device.type == "cpu":
                    self.ops.append("device_to_host")
            return out
        return func(*args, **(kwargs or {}))


# aten ops that copy a device value to the host (a sync on CUDA) or have a data-dependent shape.
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "bincount", "unique", "masked_select", "is_nonzero",
            "device_to_host", "equal"}
# aten ops that launch no kernel (allocation, metadata).
NO_KERNEL_OPS = {"empty", "empty_strided", "view", "slice", "reshape", "as_strided", "alias", "detach", "t",
                 "_unsafe_view", "new_empty", "select", "expand", "lift_fresh"}


def _head_ops(monkeypatch, flags, with_bias=False):
    """{"forward"|"backward": (aten ops, Triton launches)} of one fused forward and its backward on
    the non-CPU path (label check skipped: it runs only for CPU labels, where it costs no sync)."""
    phase = {}
    real_run = head_plan.Launch.run
    log = _OpLog()

    def counting_run(self, debug=False):
        phase["launches"].append(self.name)
        log.paused = True
        try:
            return real_run(self, debug)
        finally:
            log.paused = False

    monkeypatch.setattr(head_plan.Launch, "run", counting_run)
    monkeypatch.setattr(fused_head, "_check_labels", lambda labels, K: None)
    f, w, c, b, y = make_inputs(10, 37, 19, seed=3, with_bias=with_bias)
    args = _on_device(torch.float32, f, w, c, *([b] if with_bias else []), y)
    inputs = HeadInputs(args[0], args[1], args[2], args[-1], args[3] if with_bias else None)
    g = torch.tensor(1.0, device=DEVICE)
    out = {}
    phase["launches"] = []
    with log:
        res = fused_head._forward_impl(inputs, flags)
    out["forward"] = (log.ops, phase["launches"])
    log.ops, phase["launches"] = [], []
    with log:
        fused_head._backward_impl(g, inputs, Saved(*res[1:]), flags)
    out["backward"] = (log.ops, phase["launches"])
    return out


@pytest.mark.parametrize("stats", [False, True])
def test_eo_uc_launches_and_syncs(monkeypatch, stats):
    """eo_uc: forward = 2 Triton kernels + the loss sum (+ the stats zero-fill): ≤ 8 launches;
    backward = 3 Triton kernels and nothing else; no host sync in either."""
    flags = HeadFlags(1.0, 1.0, True, 0.0, False, stats=stats)
    phases = _head_ops(monkeypatch, flags)
    expect = {"forward": ["_logits_kernel", "_rows_kernel"],
              "backward": ["_dz_kernel", "_grad_features_kernel", "_grad_weight_kernel"]}
    for name, (ops, launches) in phases.items():
        assert not SYNC_OPS.intersection(ops), f"host-sync ops in the {name}: {sorted(SYNC_OPS.intersection(ops))}"
        torch_kernels = [op for op in ops if op not in NO_KERNEL_OPS]
        assert launches == expect[name], (name, launches)
        assert len(launches) + len(torch_kernels) <= 8, (name, launches, torch_kernels)
        if name == "forward":
            assert torch_kernels.count("sum") == 1 and len(torch_kernels) == 1 + int(stats), torch_kernels
        else:
            assert torch_kernels == [], torch_kernels


def test_sync_detector_can_fail(monkeypatch):
    """The op log sees a host sync when one happens (here: the CPU label check, left in place)."""
    f, w, c, b, y = make_inputs(6, 37, 19, seed=1)
    with _OpLog() as log:
        reference.offset_head_loss  # noqa: B018 - nothing dispatched by attribute access
        bool((y < 0).any())
    assert SYNC_OPS.intersection(log.ops)


def test_center_update_path_has_no_sync():
    """class_feature_sums + wen_center_update (dense) and wen_center_update_from_batch: no bincount/.item()."""
    f, w, c, b, y = make_inputs(16, 37, 19, seed=2)
    centers, fd, yd = c.float().to(DEVICE), f.float().to(DEVICE), y.to(DEVICE)
    with _OpLog() as log:
        sums, counts = kernels.class_feature_sums(fd, yd, 37)
        kernels.wen_center_update(centers, sums, counts, 0.5)
        kernels.wen_center_update_from_batch(centers, fd, yd, 0.5)
    assert not SYNC_OPS.intersection(log.ops), sorted(SYNC_OPS.intersection(log.ops))
    assert counts.sum().item() == 16


@needs_cuda
def test_cuda_no_sync_and_graph_capture():
    """The whole head (forward + backward) under sync-debug 'error', then captured in a CUDA graph."""
    f, w, c, b, y = make_inputs(64, 1000, 256, seed=7)
    fd = f.float().cuda().requires_grad_()
    wd = w.float().cuda().requires_grad_()
    cd, yd = c.float().cuda(), y.cuda()

    def step():
        loss, sums, counts = kernels.offset_head_loss_with_stats(fd, wd, cd, yd, 1.0, 1.0, center_grad=False,
                                                                 backend="triton")
        loss.backward()
        return loss, sums, counts

    step()  # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        kernels.wen_center_update(cd.clone(), *reference.class_feature_sums(fd, yd, 1000))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fd.grad = wd.grad = None
        step()
    torch.cuda.current_stream().wait_stream(s)
    fd.grad = wd.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_loss, g_sums, g_counts = step()
    graph.replay()
    torch.cuda.synchronize()
    eager = reference.offset_head_loss(fd.detach(), wd.detach(), cd, yd, 1.0, 1.0, center_grad=False)
    torch.testing.assert_close(g_loss, eager, rtol=1e-4, atol=0)


@needs_cuda
def test_cuda_k131072():
    """The shape eager cannot hold comfortably: B=256, d=256, K=131072, bf16, vs the float64 reference on CPU."""
    f, w, c, b, y = make_inputs(256, 131072, 256, seed=13)
    check_close(*run_both(f, w, c, b, y, torch.bfloat16, 0.5, 0.5, label_smoothing=0.1), torch.bfloat16)


# --------------------------------------------------------------------------- host boundary


def _small():
    f, w, c, b, y = make_inputs(6, 37, 19, seed=1)
    return _on_device(torch.float32, f, w, c, b, y)


@cpu_only
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
    monkeypatch.setattr(head_plan, "INTERPRET", False)
    f, w, c, b, y = make_inputs(6, 37, 19, seed=1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.offset_head_loss(f.float(), w.float(), c.float(), y, backend="triton")


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
    fc, wc, cc, bc, yc = (t.cpu() for t in (f, w, c, b, y))
    kw["bias"] = bc
    torch.testing.assert_close(kernels.offset_head_loss(fc, wc, cc, yc, 0.5, 0.5, **kw), ref.cpu(), rtol=1e-6, atol=0)


def test_engine_head_loss_unchanged_on_cpu():
    from engine.heads import Head

    head = Head(19, 37, "eo_uc")
    f, _, _, _, y = (t.cpu() for t in _small())
    expect = reference.offset_head_loss(
        f, head.weight, head.centers, y, head.lambda_center, head.lambda_uniform,
        use_offset=True, bias=None, label_smoothing=0.0, center_grad=False,
    )
    torch.testing.assert_close(head.loss(f, y), expect, rtol=0, atol=0)


# --------------------------------------------------------------------------- torch.library / compile


def test_opcheck():
    f, w, c, b, y = _small()
    flags = HeadFlags(0.5, 0.5, True, 0.1, True, 0, 0, False, True)
    args = (f.requires_grad_(), w.requires_grad_(), c.requires_grad_(), y, b.requires_grad_(), *flags.op_args())
    torch.library.opcheck(
        fused_head._fused_head_op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
    )
    with torch.no_grad():
        saved = fused_head._fused_head_op(*args)[1:]
    bwd_args = (torch.tensor(3.7, device=f.device), *args[:5], *saved, *flags.op_args())
    torch.library.opcheck(fused_head._fused_head_backward_op, bwd_args, test_utils=("test_schema", "test_faketensor"))


def test_head_flags_define_the_op_schemas():
    """Both custom ops take HeadFlags' fields, in order, after their tensors; `HeadFlags.of` turns the
    public arguments into the schema's types (tf32: None → -1 follows torch's allow_tf32)."""
    ops = {torch.ops.lt_engine.fused_offset_head_cce.default: 5, torch.ops.lt_engine.fused_offset_head_cce_backward.default: 10}
    for op, n_tensors in ops.items():
        names = [a.name for a in op._schema.arguments]
        assert names[n_tensors:] == [f.name for f in dataclasses.fields(HeadFlags)], names
    flags = HeadFlags.of(1, 0, use_offset=0, label_smoothing=0, center_grad=1)
    assert flags == HeadFlags(1.0, 0.0, False, 0.0, True, 0, -1, False, False)
    assert [type(v) for v in flags.op_args()] == [float, float, bool, float, bool, int, int, bool, bool]
    assert (HeadFlags.of(tf32=True).tf32, HeadFlags.of(tf32=False).tf32) == (1, 0)


@pytest.mark.slow  # a torch.compile (Dynamo + Inductor) build
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


# --------------------------------------------------------------------------- traffic model


def test_traffic_table_in_docstring_is_current():
    """head_traffic's docstring table is `modelled_bytes`' output (regenerate it when a kernel changes)."""
    for line in head_traffic.traffic_table().splitlines():
        assert "    " + line in head_traffic.__doc__, f"docstring table out of date; expected the row:\n{line}"


def test_modelled_bytes_accounting():
    """Hand check at K=1000, bf16: f = 2 MiB-ish, W = 4 MB; the model's ideal and a few kernel terms."""
    B, D, K = 512, 2048, 1000
    m = head_traffic.modelled_bytes(B, D, K, torch.bfloat16, torch.bfloat16)
    f, W = B * D * 2, K * D * 2
    assert m["ideal"] == 2 * (f + W) + W + f + W + B * K * 2
    assert m["kernels"]["_dz_kernel"] == f + W + 2 * B * K + 4 * K + 4 * B
    assert m["kernels"]["_grad_features_kernel"] == 2 * B * K + W + f + 2 * f  # eo_uc: center term reads f, c_y
    assert m["total"] == sum(m["kernels"].values()) and m["ratio"] == m["total"] / m["ideal"]
    # fp32 accumulators across row chunks appear only when B·K forces several chunks.
    big = head_traffic.modelled_bytes(4096, D, 131072, torch.bfloat16, torch.bfloat16)
    assert big["chunks"] > 1
    assert big["kernels"]["_grad_weight_kernel"] > head_traffic.modelled_bytes(512, D, 131072)["kernels"][
        "_grad_weight_kernel"]


@pytest.mark.parametrize("fd,wd,tf32", [(torch.bfloat16, torch.bfloat16, False), (torch.bfloat16, torch.float32, False),
                                        (torch.float16, torch.float16, False), (torch.float16, torch.float32, False),
                                        (torch.float32, torch.float32, True), (torch.float32, torch.float32, False)],
                         ids=["bf16", "amp_bf16", "fp16", "amp_fp16", "tf32", "fp32"])
def test_modelled_traffic_within_twice_ideal(fd, wd, tf32):
    """The design's bound: modelled HBM bytes per fwd+bwd ≤ 2× the ideal at (512, 2048, K), engine default flags."""
    for K in (1000, 8142, 131072):
        m = head_traffic.modelled_bytes(512, 2048, K, fd, wd, tf32=tf32)
        assert m["ratio"] <= 2.0, (K, m["ratio"], m["kernels"])


@pytest.mark.parametrize("B,K", [(512, 8142), (4096, 131072)], ids=["1chunk", "chunks"])
@pytest.mark.parametrize("flags", [HeadFlags(1.0, 1.0, True, 0.0, False), HeadFlags(1.0, 1.0, True, 0.1, True, stats=True),
                                   HeadFlags(0.0, 0.0, False, 0.0, False)], ids=["eo_uc", "everything", "plain_ce"])
def test_modelled_kernels_are_the_launch_plan(B, K, flags):
    """`modelled_bytes` describes exactly the launches the host code makes: its Triton kernels (those
    with bytes) are the forward then backward plan's kernels in order, once per row chunk each."""
    from kernels import aot

    D, fd, wd = 2048, torch.bfloat16, torch.float32
    inputs = aot.meta_inputs(B, D, K, fd, wd, bias=False)
    fwd = head_plan.plan_forward(inputs, flags, interpret=False)
    bwd = head_plan.plan_backward(torch.empty((), device="meta"), inputs, fwd.saved, flags, interpret=False)
    names = [launch.name for launch in fwd.launches + bwd.launches]
    m = head_traffic.modelled_bytes(B, D, K, fd, wd, flags, tf32=False)
    modelled = [k for k, v in m["kernels"].items() if k.startswith("_") and v > 0]
    assert list(dict.fromkeys(names)) == modelled
    assert all(names.count(k) == m["chunks"] for k in modelled), (names, m["chunks"])
    assert [k for k, v in m["kernels"].items() if not k.startswith("_") and v > 0] == (
        ["stats_memset", "loss_sum"] if flags.sums else ["loss_sum"])
