"""The reference head loss (kernels/reference.py) against hand-derived float64 formulas.

Every term of Eq. 6 (estimated-offset paper) and its gradients is checked on its own,
then the whole loss by gradcheck. Tolerances: float64 vs float64, 1e-10 relative.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kernels import reference as R

TOL = dict(rtol=1e-10, atol=1e-12)


def _inputs(B=7, K=5, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, d, generator=g, dtype=dtype)
    w = torch.randn(K, d, generator=g, dtype=dtype)
    c = torch.randn(K, d, generator=g, dtype=dtype)
    y = torch.randint(0, K, (B,), generator=g)
    return f, w, c, y


def test_estimated_offset_is_half_center_dot_weight():
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    c = torch.tensor([[4.0, 0.5], [2.0, 2.0]], dtype=torch.float64)
    # ½(1·4 + 2·0.5) = 2.5 ; ½(3·2 − 1·2) = 2.0
    torch.testing.assert_close(R.estimated_offset(w, c), torch.tensor([2.5, 2.0], dtype=torch.float64))


def test_uniform_constraint_value_and_minimum():
    o = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=torch.float64)
    p = torch.softmax(-o, 0)
    torch.testing.assert_close(R.uniform_constraint(o), (p * p.log()).sum(), **TOL)
    # A constant offset is the minimum: −H(uniform) = −log K, whatever the constant.
    for const in (0.0, 5.0, -3.0):
        v = R.uniform_constraint(torch.full((4,), const, dtype=torch.float64))
        assert v.item() == pytest.approx(-math.log(4), abs=1e-12)
    assert R.uniform_constraint(o).item() > -math.log(4)


def test_uniform_constraint_gradient_closed_form():
    # d(Σ p log p)/d o_k = −p_k (log p_k − Σ_j p_j log p_j),  p = softmax(−o)
    o = torch.randn(6, dtype=torch.float64, requires_grad=True)
    R.uniform_constraint(o).backward()
    p = torch.softmax(-o.detach(), 0)
    expected = -p * (p.log() - (p * p.log()).sum())
    torch.testing.assert_close(o.grad, expected, **TOL)


def test_plain_ce_matches_torch_and_hand_gradients():
    f, w, c, y = _inputs()
    f.requires_grad_(), w.requires_grad_()
    loss = R.offset_head_loss(f, w, c, y, lambda_center=0, lambda_uniform=0, use_offset=False)
    torch.testing.assert_close(loss, F.cross_entropy(f @ w.t(), y), **TOL)
    loss.backward()
    B, K = f.shape[0], w.shape[0]
    dz = (torch.softmax(f.detach() @ w.detach().t(), 1) - F.one_hot(y, K)) / B
    torch.testing.assert_close(f.grad, dz @ w.detach(), **TOL)
    torch.testing.assert_close(w.grad, dz.t() @ f.detach(), **TOL)


def test_offset_logits_and_weight_gradient_with_constant_centers():
    # z_ik = w_k·f_i − ½ c_k·w_k  ⇒  ∂L/∂w_k = Σ_i dz_ik (f_i − ½ c_k),  c constant (training protocol)
    f, w, c, y = _inputs(seed=1)
    w.requires_grad_(), c.requires_grad_()
    loss = R.offset_head_loss(f, w, c, y, lambda_center=0, lambda_uniform=0, center_grad=False)
    z = f @ w.detach().t() - 0.5 * (c.detach() * w.detach()).sum(1)
    torch.testing.assert_close(loss, F.cross_entropy(z, y), **TOL)
    loss.backward()
    dz = (torch.softmax(z, 1) - F.one_hot(y, w.shape[0])) / f.shape[0]
    expected = dz.t() @ f - 0.5 * dz.sum(0)[:, None] * c.detach()
    torch.testing.assert_close(w.grad, expected, **TOL)
    assert c.grad is None  # centers get no gradient at all with center_grad=False


def test_center_term_value_and_gradients():
    f, w, c, y = _inputs(seed=2)
    f.requires_grad_(), c.requires_grad_()
    lam = 0.7
    base = R.offset_head_loss(f, w, c, y, lambda_center=0, lambda_uniform=0, use_offset=False)
    full = R.offset_head_loss(f, w, c, y, lambda_center=lam, lambda_uniform=0, use_offset=False)
    B = f.shape[0]
    diff = f.detach() - c.detach()[y]
    torch.testing.assert_close(full - base, lam * diff.pow(2).sum(1).mean(), **TOL)
    (full - base).backward()
    torch.testing.assert_close(f.grad, 2 * lam * diff / B, **TOL)
    expected_c = torch.zeros_like(c).index_add_(0, y, -2 * lam * diff / B)
    torch.testing.assert_close(c.grad, expected_c, **TOL)


def test_uniform_term_reaches_weights_through_offset():
    # λ2·UC(õ) with õ_k = ½ c_k·w_k  ⇒  ∂/∂w_k = λ2 · dUC/dõ_k · ½ c_k
    f, w, c, y = _inputs(seed=3)
    w.requires_grad_()
    lam = 1.3
    with_uc = R.offset_head_loss(f, w, c, y, lambda_center=0, lambda_uniform=lam, center_grad=False)
    without = R.offset_head_loss(f, w, c, y, lambda_center=0, lambda_uniform=0, center_grad=False)
    o = R.estimated_offset(w.detach(), c)
    torch.testing.assert_close(with_uc - without, lam * R.uniform_constraint(o), **TOL)
    (with_uc - without).backward()
    p = torch.softmax(-o, 0)
    duc_do = -p * (p.log() - (p * p.log()).sum())
    torch.testing.assert_close(w.grad, lam * duc_do[:, None] * 0.5 * c, **TOL)


@pytest.mark.parametrize("use_offset", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_full_loss_gradcheck(use_offset, bias, smoothing):
    f, w, c, y = _inputs(B=5, K=4, d=3, seed=4)
    b = torch.randn(4, dtype=torch.float64) if bias else None
    args = [t.clone().requires_grad_() for t in (f, w, c)] + ([b.clone().requires_grad_()] if bias else [])

    def fn(f, w, c, b=None):
        return R.offset_head_loss(f, w, c, y, 0.3, 0.8, use_offset=use_offset, bias=b, label_smoothing=smoothing)

    assert torch.autograd.gradcheck(fn, args)


def test_low_precision_inputs_accumulate_in_fp32():
    f, w, c, y = _inputs(B=16, K=10, d=8, seed=5)
    ref = R.offset_head_loss(f, w, c, y, 0.1, 1.0)
    for dt in (torch.float32, torch.bfloat16):
        out = R.offset_head_loss(f.to(dt), w.to(dt), c.to(dt), y, 0.1, 1.0)
        assert out.dtype == torch.float32
        rel = abs(out.item() - ref.item()) / abs(ref.item())
        assert rel < (1e-6 if dt == torch.float32 else 2e-2), (dt, rel)


def test_wen_center_update_by_hand():
    centers = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    f = torch.tensor([[2.0, 0.0], [4.0, 2.0], [3.0, 3.0]])
    y = torch.tensor([0, 0, 1])
    sums, counts = R.class_feature_sums(f, y, 3)
    torch.testing.assert_close(counts, torch.tensor([2.0, 1.0, 0.0]))
    R.wen_center_update(centers, sums, counts, alpha=0.5)
    # class 0: Σ(c − f) = (−6, −2); /(1+2) → (−2, −2/3); c ← 0 − 0.5·that = (1, 1/3)
    # class 1: Σ(c − f) = (−2, −2); /(1+1) → (−1, −1);   c ← 1 + 0.5 = (1.5, 1.5)
    # class 2: absent, unchanged
    torch.testing.assert_close(centers, torch.tensor([[1.0, 1 / 3], [1.5, 1.5], [5.0, 5.0]]))


def test_wen_update_converges_to_class_mean_at_the_same_rate_for_rare_classes():
    torch.manual_seed(0)
    centers = torch.zeros(2, 3)
    mean = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
    for _ in range(60):  # class 0: 30 samples a batch, class 1: 1 sample a batch
        y = torch.tensor([0] * 30 + [1])
        f = mean[y] + 0.01 * torch.randn(31, 3)
        R.wen_center_update(centers, *R.class_feature_sums(f, y, 2), alpha=0.5)
    torch.testing.assert_close(centers, mean, atol=0.02, rtol=0)


def test_wen_update_from_batch_equals_dense_update():
    """The per-sample (sparse) form of Wen's update moves the centers exactly like the dense one."""
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(6, 5, generator=g, dtype=torch.float64)
    f = torch.randn(20, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 2, 2, 5] + [1] * 14)  # classes 3, 4 absent
    dense, sparse, given = centers.clone(), centers.clone(), centers.clone()
    R.wen_center_update(dense, *R.class_feature_sums(f, y, 6), alpha=0.5)
    R.wen_center_update_from_batch(sparse, f, y, alpha=0.5)
    R.wen_center_update_from_batch(given, f, y, alpha=0.5, counts=R.class_feature_sums(f, y, 6)[1])
    torch.testing.assert_close(sparse, dense.float().double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(given, sparse, rtol=0, atol=0)
    torch.testing.assert_close(sparse[3:5], centers[3:5], rtol=0, atol=0)  # absent classes stay
