"""The head's methods: which terms each method uses, WVN, RS (post-hoc and Algorithm 1), centers."""

import pytest
import torch

from engine.heads import METHODS, Head, rescale_factors
from engine.methods import LossConfig
from kernels import reference as R

COUNTS = torch.tensor([100.0, 40.0, 10.0, 2.0])


def _head(method, **kw):
    torch.manual_seed(0)
    return Head(6, 4, METHODS[method], LossConfig(**kw))


def test_method_table_matches_the_papers():
    assert {m for m, s in METHODS.items() if s.loss == "offset"} == {"ce", "ce_bias", "eo", "uc_only", "eo_uc", "wvn"}
    assert METHODS["eo_uc"].offset and METHODS["eo_uc"].uniform and METHODS["eo_uc"].center
    assert METHODS["eo"].offset and not METHODS["eo"].uniform
    assert not METHODS["uc_only"].offset and METHODS["uc_only"].uniform
    assert METHODS["ce_bias"].bias and not METHODS["ce"].bias and not METHODS["ce"].offset


@pytest.mark.parametrize("method", [m for m, s in METHODS.items() if s.loss == "offset"])  # baselines: test_losses.py
def test_head_loss_equals_reference_with_its_flags(method):
    head = _head(method, lambda_center=0.3, lambda_uniform=0.9)
    head.centers.normal_()
    if head.bias is not None:
        head.bias.data.normal_()
    f, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    spec = METHODS[method]
    expected = R.offset_head_loss(
        f, head.weight, head.centers, y,
        lambda_center=0.3 if spec.center else 0.0, lambda_uniform=0.9 if spec.uniform else 0.0,
        use_offset=spec.offset, bias=head.bias,
    )
    torch.testing.assert_close(head.loss(f, y), expected)
    z = f @ head.weight.t()
    if spec.offset:
        z = z - 0.5 * (head.centers * head.weight).sum(1)
    if spec.bias:
        z = z + head.bias
    torch.testing.assert_close(head(f), z)


def test_centers_are_not_trained_by_gradients_only_by_wen_update():
    head = _head("eo_uc")
    assert "centers" not in dict(head.named_parameters())
    f, y = torch.randn(8, 6, requires_grad=True), torch.randint(0, 4, (8,))
    head.loss(f, y).backward()
    assert head.weight.grad is not None and f.grad is not None
    before = head.centers.clone()
    head.after_step(f.detach(), y, COUNTS)
    sums, counts = R.class_feature_sums(f.detach(), y, 4)
    R.wen_center_update(before, sums, counts, 0.5)
    torch.testing.assert_close(head.centers, before)


def test_ce_head_keeps_centers_still():
    head = _head("ce")
    f, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    head.after_step(f, y, COUNTS)
    assert torch.count_nonzero(head.centers) == 0


def test_wvn_gives_unit_norm_rows_after_every_step():
    head = _head("wvn")
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(4))
    with torch.no_grad():
        head.weight.mul_(torch.tensor([3.0, 0.2, 1.5, 7.0])[:, None])
    direction = head.weight / head.weight.norm(dim=1, keepdim=True)
    head.after_step(torch.randn(2, 6), torch.tensor([0, 1]), COUNTS)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(head.weight, direction)  # direction is kept


def test_rescale_factors_formula():
    g = 0.3
    expected = torch.tensor([1.0, (100 / 40) ** g, (100 / 10) ** g, (100 / 2) ** g], dtype=torch.float64)
    torch.testing.assert_close(rescale_factors(COUNTS, g), expected)
    torch.testing.assert_close(rescale_factors(COUNTS, 0.0), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive training count"):
        rescale_factors(torch.tensor([5.0, 0.0]), 0.5)


def test_posthoc_rescale_scales_each_row():
    head = _head("ce")
    w0 = head.weight.detach().clone()
    head.rescale(COUNTS, 0.5)
    torch.testing.assert_close(head.weight, w0 * (COUNTS.max() / COUNTS).sqrt()[:, None])


def test_algorithm1_in_loop_normalizes_then_rescales():
    head = _head("wvn")
    with torch.no_grad():
        head.weight.mul_(5.0)
    head.after_step(torch.randn(2, 6), torch.tensor([0, 3]), COUNTS, gamma=0.4)
    torch.testing.assert_close(head.weight.norm(dim=1), rescale_factors(COUNTS, 0.4).float())


def test_wen_update_takes_the_loss_pass_statistics(monkeypatch):
    """A center method's training loss returns the batch's class sums from its own pass (the fused head's
    epilogue on CUDA); after_step consumes them (summed over micro-batches) instead of a second pass."""
    import kernels

    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(12, 6, generator=g), torch.randint(0, 5, (12,), generator=g)
    expected = Head(6, 5, "eo_uc")
    head = Head(6, 5, "eo_uc")
    head.load_state_dict(expected.state_dict())
    sums, counts = kernels.class_feature_sums(f, y, 5)
    kernels.wen_center_update(expected.centers, sums, counts, expected.center_alpha)

    head.train()
    for part in (slice(0, 5), slice(5, 12)):  # two micro-batches
        head.loss(f[part], y[part]).backward()
    monkeypatch.setattr(kernels, "class_feature_sums", lambda *a: pytest.fail("second pass over the features"))
    head.after_step(f, y, None)
    torch.testing.assert_close(head.centers, expected.centers)
    assert head._step_stats is None  # consumed

    head.eval()  # evaluation never leaves statistics behind
    head.loss(f, y)
    assert head._step_stats is None


def _wvn_step(placement: str):
    """One SGD step of a tiny WVN head whose rows start off unit norm; returns (row norms the update
    started from, row norms after the step)."""
    head = _head("wvn", wvn_placement=placement)
    with torch.no_grad():
        head.weight.mul_(torch.tensor([3.0, 0.2, 1.5, 7.0])[:, None])
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    f, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    head.loss(f, y).backward()
    head.before_step(COUNTS)
    at_update = head.weight.norm(dim=1).detach().clone()
    opt.step()
    head.after_step(f, y, COUNTS)
    return at_update, head.weight.norm(dim=1).detach()


def test_wvn_after_step_placement_is_algorithm_1():
    """Algorithm 1: update, then normalize: the rows are unit norm after the step, not before the update."""
    at_update, after = _wvn_step("after_step")
    assert not torch.allclose(at_update, torch.ones(4))
    torch.testing.assert_close(after, torch.ones(4))


def test_wvn_before_step_placement_is_the_authors_code():
    """The authors' code normalizes in the backward pass: unit rows when the update starts, rows of norm
    1 + O(lr) after it (what the next forward sees)."""
    at_update, after = _wvn_step("before_step")
    torch.testing.assert_close(at_update, torch.ones(4))
    assert not torch.allclose(after, torch.ones(4), atol=1e-4)
    assert (after - 1).abs().max() < 1.0  # one step of lr 0.5 away from unit norm


def test_wvn_before_step_with_in_loop_rescale():
    head = _head("wvn", wvn_placement="before_step")
    with torch.no_grad():
        head.weight.mul_(5.0)
    head.before_step(COUNTS, gamma=0.4)
    torch.testing.assert_close(head.weight.norm(dim=1), rescale_factors(COUNTS, 0.4).float())
    w = head.weight.detach().clone()
    head.after_step(torch.randn(2, 6), torch.tensor([0, 3]), COUNTS, gamma=0.4)
    torch.testing.assert_close(head.weight, w)  # the after-step leaves the rows alone
