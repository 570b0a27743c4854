"""Every method of the registry takes one real training step (the engine's `build_trainer` + `train_step`):
finite loss, the classifier moves, and the method's after-step work happens (centers, WVN, in-loop RS).
One step each proves what a one-epoch run per method proved, in a fraction of the time."""

import math

import numpy as np
import pytest
import torch

from engine.config import Config
from engine.device import resolve_speed
from engine.distributed import DistInfo
from engine.heads import METHODS, rescale_factors
from engine.train import train_step
from engine.trainer import build_trainer

COUNTS = np.array([30, 23, 17, 13, 10, 8, 6, 5, 3, 3])
CPU = torch.device("cpu")


def _one_step(method: str, tmp_path, wvn_placement: str = "after_step", **rescale):
    cfg = Config()
    cfg.method, cfg.model.arch, cfg.epochs, cfg.optim.batch_size = method, "resnet8_cifar", 2, 8
    cfg.run.device, cfg.loss.wvn_placement = "cpu", wvn_placement
    if rescale:
        cfg.rescale.in_loop, cfg.rescale.gamma = True, rescale["gamma"]
    torch.manual_seed(0)
    run = build_trainer(cfg, tmp_path, DistInfo(), CPU, resolve_speed(cfg, CPU), None, 4, class_counts=COUNTS)
    head = run.model.head
    with torch.no_grad():
        head.weight.mul_(torch.linspace(0.5, 2.0, len(COUNTS))[:, None])  # rows off unit norm before the step
    before = {"weight": head.weight.detach().clone(), "stem": run.model.backbone.stem[0].weight.detach().clone()}
    # The classifier's row norms when the optimizer update starts.
    run.state.optimizer.register_step_pre_hook(lambda *_: before.update(at_update=head.weight.norm(dim=1).clone()))
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 5, 8, 9])
    loss = train_step(run, x, y)
    return run, head, before, loss


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_takes_a_training_step(method, tmp_path):
    spec = METHODS[method]
    run, head, before, loss = _one_step(method, tmp_path)
    assert math.isfinite(loss)
    assert not torch.equal(head.weight, before["weight"]) and not torch.equal(run.model.backbone.stem[0].weight,
                                                                               before["stem"])
    moved = head.centers.abs().sum() > 0
    assert bool(moved) == spec.center, "Wen's center update runs exactly for the center methods"
    assert (head.bias is not None) == spec.bias
    if spec.bias:
        assert head.bias.abs().sum() > 0  # the trained bias got a gradient step
    if spec.wvn:
        torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(10))
    assert run.state.scheduler.last_epoch == 1  # one optimizer step, one schedule step


def test_wvn_in_loop_rescale_after_a_step(tmp_path):
    """Algorithm 1 in the loop: after a step ‖w_i‖ = (n_1/n_i)^γ."""
    _, head, _, _ = _one_step("wvn", tmp_path, gamma=0.3)
    torch.testing.assert_close(head.weight.norm(dim=1).double(), rescale_factors(COUNTS, 0.3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", ["after_step", "before_step"])
def test_wvn_placement_in_the_training_step(placement, tmp_path):
    """after_step (Algorithm 1): unit rows after the update; before_step (the authors' code): unit rows when
    the update starts, 1 + O(lr) after it."""
    _, head, before, _ = _one_step("wvn", tmp_path, wvn_placement=placement)
    unit_at_update = torch.allclose(before["at_update"], torch.ones(10))
    unit_after = torch.allclose(head.weight.norm(dim=1), torch.ones(10))
    assert (unit_at_update, unit_after) == ((False, True) if placement == "after_step" else (True, False))
