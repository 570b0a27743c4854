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
