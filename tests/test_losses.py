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
def test_focal_and_cb_focal(gamma, beta):
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
    expected /= len(y)
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


@pytest.mark.parametrize("method", ["focal", "cb_ce", "cb_focal"])
def test_head_serves_focal_and_cb(method):
    g = torch.Generator().manual_seed(4)
    f, y = torch.randn(8, 5, generator=g), torch.randint(0, K, (8,), generator=g)
    head = Head(5, K, METHODS[method], LossConfig(focal_gamma=1.5, cb_beta=0.99), np.array(COUNTS))
    z = f @ head.weight.t()
    w = losses.class_balanced_weights(COUNTS, 0.99) if method.startswith("cb_") else None
    expected = (losses.weighted_cross_entropy(z, y, w) if method == "cb_ce" else losses.focal_loss(z, y, 1.5, w))
    torch.testing.assert_close(head.loss(f, y), expected.float())
    head.loss(f, y).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_baselines_need_class_counts():
    for method, spec in METHODS.items():
        if spec.loss != "offset":
            with pytest.raises(ValueError, match=f"method '{method}' needs the training class counts"):
                Head(5, K, spec)
