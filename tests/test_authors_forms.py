"""Each baseline as its authors define it, pinned to numbers derived by hand from their formulas."""

import math

import numpy as np
import pytest
import torch

from engine.heads import Head
from engine.methods import LossConfig

HAND_COUNTS = np.array([4, 2, 1])  # β = 0.5 → class-balanced weights (8/11, 10/11, 15/11), see test_losses.py
HAND_Y = torch.tensor([0, 2])


def _zero_weight_head(method: str, k: int, counts, **loss) -> Head:
    head = Head(5, k, method, LossConfig(**loss), counts).double()
    with torch.no_grad():
        head.weight.zero_()
    return head


def test_cb_focal_starts_from_cuis_prior_bias():
    """Cui et al.'s code: last-layer bias −log(K − 1) for the sigmoid losses, so σ(z) = 1/K at zero weights.

    K = 3: b = −ln 2, σ(b) = 1/3 for every class. γ = 2, per sample: the label term (1 − 1/3)²·ln 3 and
    two negatives (1/3)²·ln(3/2), ℓ = 4/9·ln 3 + 2/9·ln(3/2). Batch y = (0, 2), weights (8/11, 15/11), / B = 2:
    23/22·ℓ = 0.6046653…"""
    head = _zero_weight_head("cb_focal", 3, HAND_COUNTS, cb_beta=0.5, focal_gamma=2.0)
    torch.testing.assert_close(head.bias.detach(), torch.full((3,), -math.log(2), dtype=torch.float64), rtol=1e-7, atol=0)
    expected = 23 / 22 * (4 / 9 * math.log(3) + 2 / 9 * math.log(1.5))
    assert head.loss(torch.randn(2, 5, dtype=torch.float64), HAND_Y).item() == pytest.approx(expected, rel=1e-6)
    head.loss(torch.randn(2, 5, dtype=torch.float64), HAND_Y).backward()
    assert head.bias.grad is not None and head.bias.grad.abs().sum() > 0  # the bias is trained


def test_cb_focal_prior_bias_at_100_classes():
    """K = 100: b = −log 99; β = 0 (unit weights), γ = 0: ℓ = log 100 + 99·log(100/99) = 5.6152…
    (without the bias every σ is 1/2 and ℓ = 100·log 2 = 69.3)."""
    counts = np.arange(1, 101)
    head = _zero_weight_head("cb_focal", 100, counts, cb_beta=0.0, focal_gamma=0.0)
    assert head.bias[0].item() == pytest.approx(-math.log(99), rel=1e-7)  # a float32 parameter
    expected = math.log(100) + 99 * math.log(100 / 99)
    got = head.loss(torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 7, 50, 99])).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # The prediction logits carry the bias too.
    torch.testing.assert_close(head(torch.randn(3, 5, dtype=torch.float64)).float(),
                               torch.full((3, 100), -math.log(99)))


# Two samples whose logits use ln 3 and 0 (σ(ln 3) = 3/4, σ(0) = 1/2); the head gets them as features
# through an identity classifier with a zero bias.
LN3 = math.log(3)
HAND_Z = torch.tensor([[LN3, 0.0, -LN3], [LN3, -LN3, 0.0]], dtype=torch.float64)  # y = 0, y = 2


def _identity_head(method: str, **loss) -> Head:
    head = Head(3, 3, method, LossConfig(**loss), HAND_COUNTS).double()
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
        if head.bias is not None:
            head.bias.zero_()
    return head


def test_focal_is_caos_softmax_focal_by_hand():
    """Cao et al.'s LDAM-DRW `FocalLoss`: (1 − p)^γ·CE with p = softmax, batch mean. e^z: A (3, 1, 1/3) →
    p_0 = 9/13; B (3, 1/3, 1) → p_2 = 3/13. γ = 2: ((4/13)²·ln(13/9) + (10/13)²·ln(13/3))/2 = 0.4512…"""
    expected = (16 / 169 * math.log(13 / 9) + 100 / 169 * math.log(13 / 3)) / 2
    head = _identity_head("focal", focal_gamma=2.0)
    assert head.bias is None
    assert head.loss(HAND_Z, HAND_Y).item() == pytest.approx(expected, rel=1e-6)


def test_sigmoid_focal_is_lins_alpha_balanced_form_by_hand():
    """Lin et al.: −α_t(1 − p_t)^γ·log p_t per class, α_t = 0.25 (label) / 0.75 (others), γ = 2, / B.

    A (y = 0): ¼·(¼)²·ln(4/3) + ¾·(½)²·ln 2 + ¾·(¼)²·ln(4/3) = ln(4/3)/16 + 3 ln 2/16
    B (y = 2): ¾·(¾)²·ln 4 + ¾·(¼)²·ln(4/3) + ¼·(½)²·ln 2 = 29 ln 2/32 + 3 ln(4/3)/64
    (A + B)/2 = 7/128·ln(4/3) + 35/64·ln 2."""
    expected = 7 / 128 * math.log(4 / 3) + 35 / 64 * math.log(2)
    head = _identity_head("sigmoid_focal", focal_gamma=2.0)
    assert head.loss(HAND_Z, HAND_Y).item() == pytest.approx(expected, rel=1e-6)
    # γ = 0 leaves α-weighted BCE: A = ¼·ln(4/3) + ¾·ln 2 + ¾·ln(4/3), B = ¾·ln 4 + ¾·ln(4/3) + ¼·ln 2.
    head0 = _identity_head("sigmoid_focal", focal_gamma=0.0)
    expected0 = (7 / 4 * math.log(4 / 3) + 10 / 4 * math.log(2)) / 2
    assert head0.loss(HAND_Z, HAND_Y).item() == pytest.approx(expected0, rel=1e-6)


def test_sigmoid_focal_starts_from_lins_rare_prior():
    """Bias −log((1 − π)/π) = −log 99, π = 0.01: at zero weights σ = 0.01 for every class. K = 3, γ = 2:
    ℓ = 0.25·0.99²·ln 100 + 2·0.75·0.01²·ln(1/0.99) per sample."""
    head = _zero_weight_head("sigmoid_focal", 3, HAND_COUNTS, focal_gamma=2.0)
    assert head.bias.detach().tolist() == pytest.approx([-math.log(99)] * 3, rel=1e-7)
    expected = 0.25 * 0.99**2 * math.log(100) + 1.5 * 0.01**2 * -math.log(0.99)
    assert head.loss(torch.randn(2, 5, dtype=torch.float64), HAND_Y).item() == pytest.approx(expected, rel=1e-6)
