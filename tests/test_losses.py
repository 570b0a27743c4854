"""Baseline losses (engine/losses.py) against float64 hand formulas, and the head serving them."""

import math

import numpy as np
import pytest
import torch

from engine import losses
from engine.heads import METHODS, Head
from engine.methods import LossConfig
from kernels import reference as R

COUNTS = [100, 40, 10, 2]
K = len(COUNTS)


def _batch(seed=0, b=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, K, generator=g, dtype=torch.float64), torch.randint(0, K, (b,), generator=g)


def _softmax_row(z):
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def _cb_weights(beta):
    w = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    return [v * K / sum(w) for v in w]


def test_class_balanced_weights_and_margins_and_prior():
    assert losses.class_balanced_weights(COUNTS, 0.99).tolist() == pytest.approx(_cb_weights(0.99), rel=1e-12)
    assert losses.class_balanced_weights(COUNTS, 0.0).tolist() == pytest.approx([1.0] * K)
    m = [n**-0.25 for n in COUNTS]
    assert losses.ldam_margins(COUNTS, 0.5).tolist() == pytest.approx([0.5 * v / max(m) for v in m], rel=1e-12)
    assert losses.ldam_margins(COUNTS, 0.5)[-1].item() == pytest.approx(0.5)  # rarest class gets C
    assert losses.log_prior(COUNTS).tolist() == pytest.approx([math.log(n / sum(COUNTS)) for n in COUNTS], rel=1e-12)
    with pytest.raises(ValueError, match=r"β must be in \[0, 1\), got 1.0"):
        losses.class_balanced_weights(COUNTS, 1.0)
    with pytest.raises(ValueError, match="positive training counts"):
        losses.log_prior([3, 0])


@pytest.mark.parametrize("gamma,beta", [(0.0, None), (2.0, None), (1.5, 0.999)])
def test_focal_and_cb_softmax_focal(gamma, beta):
    z, y = _batch()
    w = _cb_weights(beta) if beta is not None else [1.0] * K
    expected = 0.0
    for zi, yi in zip(z.tolist(), y.tolist()):
        p = _softmax_row(zi)[yi]
        expected += w[yi] * -((1 - p) ** gamma) * math.log(p)
    expected /= len(y)
    weight = losses.class_balanced_weights(COUNTS, beta) if beta is not None else None
    got = losses.focal_loss(z, y, gamma, weight)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(expected, rel=1e-12)


def test_cb_ce():
    z, y = _batch(1)
    w = _cb_weights(0.9999)
    expected = sum(w[yi] * -math.log(_softmax_row(zi)[yi]) for zi, yi in zip(z.tolist(), y.tolist())) / len(y)
    got = losses.weighted_cross_entropy(z, y, losses.class_balanced_weights(COUNTS, 0.9999))
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("epoch,reweighted", [(3, False), (4, True), (9, True)])
def test_ldam_with_drw(epoch, reweighted):
    g = torch.Generator().manual_seed(2)
    f, w = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(K, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 3, 1])
    s, c, beta = 30.0, 0.5, 0.9999
    m = [c * n**-0.25 / max(v**-0.25 for v in COUNTS) for n in COUNTS]
    weights = _cb_weights(beta) if reweighted else [1.0] * K
    assert losses.drw_weights(COUNTS, beta, epoch, drw_epoch=4).tolist() == pytest.approx(weights, rel=1e-12)
    expected = 0.0
    for fi, yi in zip(f.numpy(), y.tolist()):
        cos = [float(fi @ wk / (np.linalg.norm(fi) * np.linalg.norm(wk))) for wk in w.numpy()]
        z = [s * (cos[k] - (m[k] if k == yi else 0.0)) for k in range(K)]
        expected += weights[yi] * -math.log(_softmax_row(z)[yi])
    expected /= sum(weights[yi] for yi in y.tolist())  # Cao et al.: Σ_i w_{y_i} (= B before the DRW epoch)
    cosine = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(w, dim=1).t()
    got = losses.ldam_loss(cosine, y, losses.ldam_margins(COUNTS, c), s, losses.drw_weights(COUNTS, beta, epoch, 4))
    assert got.item() == pytest.approx(expected, rel=1e-10)

    # The head: DRW switches on at set_epoch(drw_epoch), prediction logits are s·cos.
    head = Head(5, K, METHODS["ldam_drw"], LossConfig(drw_epoch=4, cb_beta=beta), np.array(COUNTS)).double()
    with torch.no_grad():
        head.weight.copy_(w)
    head.set_epoch(epoch)
    assert head.loss(f, y).item() == pytest.approx(expected, rel=1e-5)  # the head computes in float32
    torch.testing.assert_close(head(f).double(), s * cosine, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,tau", [("balanced_softmax", 1.0), ("logit_adjusted", 0.7)])
def test_logit_adjusted_losses_use_the_reference_bias_flag(method, tau):
    g = torch.Generator().manual_seed(3)
    f, y = torch.randn(8, 5, generator=g), torch.randint(0, K, (8,), generator=g)
    head = Head(5, K, METHODS[method], LossConfig(logit_adjust_tau=0.7), np.array(COUNTS))
    z = (f.double() @ head.weight.double().t()).tolist()
    prior = [n / sum(COUNTS) for n in COUNTS]
    expected = 0.0
    for zi, yi in zip(z, y.tolist()):
        adj = [zi[k] + tau * math.log(prior[k]) for k in range(K)]
        expected -= math.log(_softmax_row(adj)[yi])
    expected /= len(y)
    assert head.loss(f, y).item() == pytest.approx(expected, rel=1e-5)
    bias = (tau * losses.log_prior(COUNTS)).float()
    torch.testing.assert_close(head.loss(f, y), R.offset_head_loss(f, head.weight, head.centers, y, 0.0, 0.0,
                                                                   use_offset=False, bias=bias))
    torch.testing.assert_close(head(f), f @ head.weight.t())  # prediction: the plain logits
    assert "prior_bias" not in head.state_dict()  # a function of the counts, not a checkpoint entry


@pytest.mark.parametrize("method", ["focal", "cb_ce", "cb_focal", "cb_softmax_focal"])
def test_head_serves_focal_and_cb(method):
    g = torch.Generator().manual_seed(4)
    f, y = torch.randn(8, 5, generator=g), torch.randint(0, K, (8,), generator=g)
    head = Head(5, K, METHODS[method], LossConfig(focal_gamma=1.5, cb_beta=0.99), np.array(COUNTS))
    z = f @ head.weight.t()
    if method == "cb_focal":  # Cui et al.'s trained bias, initialized to −log(K − 1)
        z = z + head.bias
    w = losses.class_balanced_weights(COUNTS, 0.99) if method.startswith("cb_") else None
    if method == "cb_ce":
        expected = losses.weighted_cross_entropy(z, y, w)
    elif method == "cb_focal":  # Cui et al.'s sigmoid form
        expected = losses.sigmoid_focal_loss(z, y, 1.5, w)
    else:  # focal, cb_softmax_focal
        expected = losses.focal_loss(z, y, 1.5, w)
    torch.testing.assert_close(head.loss(f, y), expected.float())
    torch.testing.assert_close(head(f), z)  # prediction logits: w·f (+ b)
    head.loss(f, y).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_baselines_need_class_counts():
    for method, spec in METHODS.items():
        if spec.loss != "offset":
            with pytest.raises(ValueError, match=f"method '{method}' needs the training class counts"):
                Head(5, K, spec)


# --------------------------------------------------------------------------- the authors' definitions, by hand
#
# A 3-class example whose numbers are derived on paper from the authors' formulas (not from the code
# under test): counts n = (4, 2, 1), β = 0.5. Effective-number weights (1 − β)/(1 − β^n) =
# (0.5/(15/16), 0.5/(3/4), 0.5/0.5) = (8/15, 2/3, 1), sum 11/5, scaled to Σ = K = 3: w = (8/11, 10/11, 15/11).
# Logits use ln 3 and 0, where σ(ln 3) = 3/4, σ(−ln 3) = 1/4, σ(0) = 1/2.

HAND_COUNTS = [4, 2, 1]
HAND_W = [8 / 11, 10 / 11, 15 / 11]
LN3 = math.log(3)
HAND_Z = torch.tensor([[LN3, 0.0, -LN3], [LN3, -LN3, 0.0]], dtype=torch.float64)  # two samples
HAND_Y = torch.tensor([0, 2])


def test_class_balanced_weights_by_hand():
    assert losses.class_balanced_weights(HAND_COUNTS, 0.5).tolist() == pytest.approx(HAND_W, rel=1e-15)
    # Cao et al.'s DRW: idx = epoch // 160 → β = 0 (all ones) before epoch 160 of 200, 0.9999 from it on.
    assert losses.drw_weights(HAND_COUNTS, 0.5, 159, 160).tolist() == [1.0, 1.0, 1.0]
    assert losses.drw_weights(HAND_COUNTS, 0.5, 160, 160).tolist() == pytest.approx(HAND_W, rel=1e-15)


def test_ldam_drw_normalizes_by_the_weights_as_cao():
    """Cao et al. Algorithm 1 lines 10–11 / `F.cross_entropy(s·z, y, weight=per_cls_weights)`.

    Sample A (y = 0): margin-adjusted logits (ln 2, 0, 0) → p_y = 2/4, ℓ_A = ln 2.
    Sample B (y = 2): margin-adjusted logits (0, ln 3, 0) → p_y = 1/5, ℓ_B = ln 5.
    Before DRW: (ln 2 + ln 5)/2 = ln(10)/2 = 1.1512925464970228.
    DRW: (8/11·ln 2 + 15/11·ln 5)/(8/11 + 15/11) = (8 ln 2 + 15 ln 5)/23 = 1.2907280926517857
    (Cui's / B would give (8 ln 2 + 15 ln 5)/22 = 1.349397551408685)."""
    margins = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64)  # m_y is subtracted from the target cosine
    cosine = torch.tensor([[math.log(2) + 0.5, 0.0, 0.0], [0.0, LN3, 1.0]], dtype=torch.float64)
    plain = losses.ldam_loss(cosine, HAND_Y, margins, 1.0)
    drw = losses.ldam_loss(cosine, HAND_Y, margins, 1.0, losses.class_balanced_weights(HAND_COUNTS, 0.5))
    assert plain.item() == pytest.approx(1.1512925464970228, rel=1e-14)
    assert drw.item() == pytest.approx(1.2907280926517857, rel=1e-14)
    # The scale multiplies the margin-adjusted cosine: s = 2 on halved cosines and margins is the same loss.
    assert losses.ldam_loss(cosine / 2, HAND_Y, margins / 2, 2.0).item() == pytest.approx(1.1512925464970228, rel=1e-14)


def test_drw_epoch_is_caos_160_of_200():
    from engine.config import load_config
    from engine.models import head_loss_config

    cfg = load_config(overrides=["epochs=200", "method=ldam_drw"])
    assert head_loss_config(cfg).drw_epoch == 160


@pytest.mark.parametrize("weighted,gamma,expected", [
    # Per-class terms (1 − p_t)^γ·(−log p_t), p_t = σ(z) for the label class, 1 − σ(z) otherwise:
    # A (y = 0, z = (ln 3, 0, −ln 3)): ln(4/3)/16 + ln 2/4 + ln(4/3)/16 = ln(4/3)/8 + ln 2/4
    # B (y = 2, z = (ln 3, −ln 3, 0)): (9/16)·ln 4 + ln(4/3)/16 + ln 2/4 = 11 ln 2/8 + ln(4/3)/16
    # γ = 2: (A + B)/2 = 3/32·ln(4/3) + 13/16·ln 2
    (False, 2.0, 0.59015227849731),
    # class-balanced: (8/11·A + 15/11·B)/2 = (31/16·ln(4/3) + 181/8·ln 2)/22
    (True, 2.0, 0.7381744988883677),
    # γ = 0 (Cui's modulator = 1): A = 2 ln(4/3) + ln 2, B = 3 ln 2 + ln(4/3)
    (False, 0.0, 1.8178174697975618),  # (A + B)/2
    (True, 0.0, 2.0752247643491954),  # (8/11·A + 15/11·B)/2
])
def test_cb_focal_is_cuis_sigmoid_focal_by_hand(weighted, gamma, expected):
    w = losses.class_balanced_weights(HAND_COUNTS, 0.5) if weighted else None
    got = losses.sigmoid_focal_loss(HAND_Z, HAND_Y, gamma, w)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(expected, rel=1e-14)


def test_cb_softmax_focal_by_hand():
    """Softmax form: A: e^z = (3, 1, 1/3) → p_0 = 9/13; B: p_2 = 1/(13/3) = 3/13. With γ = 2 and the weights / B:
    (8/11·(4/13)²·ln(13/9) + 15/11·(10/13)²·ln(13/3))/2 = 0.6042427044233946, not Cui's sigmoid
    number above."""
    got = losses.focal_loss(HAND_Z, HAND_Y, 2.0, losses.class_balanced_weights(HAND_COUNTS, 0.5))
    assert got.item() == pytest.approx(0.6042427044233946, rel=1e-14)


def test_sigmoid_focal_against_the_direct_formula_and_stable():
    z, y = _batch(5, b=9)
    w = _cb_weights(0.99)
    for gamma in (0.0, 0.5, 2.0):
        total = 0.0
        for zi, yi in zip(z.tolist(), y.tolist()):
            for k, zk in enumerate(zi):
                p = 1 / (1 + math.exp(-zk))
                pt = p if k == yi else 1 - p
                total += w[yi] * (1 - pt) ** gamma * -math.log(pt)
        got = losses.sigmoid_focal_loss(z, y, gamma, losses.class_balanced_weights(COUNTS, 0.99))
        assert got.item() == pytest.approx(total / len(y), rel=1e-12)
    # Saturated logits, where σ underflows: y = 0, z = (−200, 200, 0), γ = 2 → 200 + 200 + ln 2/4 per sample.
    for dtype in (torch.float64, torch.float32):
        zs = torch.tensor([[-200.0, 200.0, 0.0]], dtype=dtype, requires_grad=True)
        loss = losses.sigmoid_focal_loss(zs, torch.tensor([0]), 2.0)
        assert loss.item() == pytest.approx(400 + math.log(2) / 4, rel=1e-6)
        loss.backward()
        assert torch.isfinite(zs.grad).all()
    assert torch.autograd.gradcheck(lambda t: losses.sigmoid_focal_loss(t, y, 1.5), (z.clone().requires_grad_(),))
    with pytest.raises(ValueError, match="focal γ must be ≥ 0, got -1"):
        losses.sigmoid_focal_loss(z, y, -1.0)
