"""The classifier head: where both papers' methods live.

`Head(in_features, num_classes, METHODS[cfg.method], cfg.loss, class_counts)`: the method
(engine/methods.py) picks the logit transform (w·f, + b, − õ, or s·cos(f, w)), the loss (a
function of LOSSES below; the baselines' math is in engine/losses.py and needs the training
class counts) and the step work: Wen center update after the optimizer step, WVN after it or
before it (`loss.wvn_placement`: `after_step` / `before_step`). The method table is
`engine.methods.method_table()`, copied into README.md.

õ_k = ½ c_k·w_k (estimated offset). `eo` is the paper's "Ours w/o UC" and `uc_only`
its "UC only" ablation (Table 3); both keep the center loss, since it is what
makes c_k estimate the class feature mean. The centers are buffers, not
parameters: they move only by Wen et al.'s count-normalized update (the paper
follows that protocol), so the offset and UC gradients shape w and f, not c.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from engine import losses
from engine.methods import METHODS, LossConfig, Method

__all__ = ["Head", "LOSSES", "METHODS", "Method", "rescale_factors"]


class Head(nn.Module):
    """Linear classifier with optional bias, estimated offset, center loss, uniform constraint, WVN.

    `Head(in_features, num_classes, METHODS[cfg.method], cfg.loss, class_counts)`; `method` may
    also be given by name. The baselines' per-class tensors are built from `class_counts`."""

    def __init__(self, in_features: int, num_classes: int, method: Method | str, loss: LossConfig | None = None,
                 class_counts: Tensor | np.ndarray | None = None) -> None:
        super().__init__()
        if isinstance(method, str):
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
            method = METHODS[method]
        loss = loss if loss is not None else LossConfig()
        self.spec = method
        self.method = method.name
        self.num_classes = num_classes
        self.lambda_center = loss.lambda_center if method.center else 0.0
        self.lambda_uniform = loss.lambda_uniform if method.uniform else 0.0
        self.center_alpha = loss.center_alpha
        self.label_smoothing = loss.label_smoothing
        self.focal_gamma, self.drw_epoch, self.cosine_scale = loss.focal_gamma, loss.drw_epoch, loss.ldam_scale
        self.wvn_placement = loss.wvn_placement
        self.epoch = 0
        self._step_stats: tuple[Tensor, Tensor] | None = None  # center methods: this step's class sums, counts

        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init
        if method.bias:
            self.bias = nn.Parameter(initial_bias(method.bias_init, num_classes))
        else:
            self.register_parameter("bias", None)
        # Centers start at the origin (õ = 0); Wen's update pulls each to its class mean.
        self.register_buffer("centers", torch.zeros(num_classes, in_features))
        if method.wvn:
            self.normalize_weights()
        if method.loss != "offset":
            self._register_class_tensors(loss, class_counts)

    def _register_class_tensors(self, loss: LossConfig, class_counts) -> None:
        """Fixed per-class tensors of the baseline losses: non-persistent buffers (they follow .to(),
        stay out of the state_dict: they are a function of the class counts and the config)."""
        if class_counts is None:
            raise ValueError(f"method {self.method!r} needs the training class counts; received class_counts=None")
        if len(class_counts) != self.num_classes:
            raise ValueError(f"class_counts has {len(class_counts)} entries, expected num_classes={self.num_classes}")
        tau = self.spec.prior_tau if self.spec.prior_tau is not None else loss.logit_adjust_tau
        fixed = {
            "class_weight": losses.class_balanced_weights(class_counts, loss.cb_beta),
            "margins": losses.ldam_margins(class_counts, loss.ldam_max_margin),
            "prior_bias": tau * losses.log_prior(class_counts),
        }
        for name, value in fixed.items():
            self.register_buffer(name, value.float(), persistent=False)

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop at the start of every epoch (0-based); DRW switches on it."""
        self.epoch = int(epoch)

    def logits(self, features: Tensor, weight: Tensor | None = None, use_bias: bool = True) -> Tensor:
        """Logits used for prediction: w·f − õ (+ b); s·cos(f, w) for a cosine head.

        `weight` replaces the head's classifier (post-hoc RS / τ-norm), `use_bias=False` leaves the
        trained bias out (τ-norm); the head's tensors follow `features` to its device, so evaluation
        can score features collected on the CPU."""
        w = self.weight if weight is None else weight
        if features.device != w.device:
            w = w.to(features.device)
        if self.spec.cosine:
            return self.cosine_scale * _cosine(features, w)
        centers, bias = self.centers.to(features.device), self.bias if use_bias else None
        if bias is not None:
            bias = bias.to(features.device)
        return kernels.head_logits(features, w, centers, bias, use_offset=self.spec.offset)

    def forward(self, features: Tensor) -> Tensor:
        return self.logits(features)

    def loss(self, features: Tensor, labels: Tensor) -> Tensor:
        """Training loss of the selected method (mean over the batch)."""
        return LOSSES[self.spec.loss](self, features, labels)

    @torch.no_grad()
    def center_statistics(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-class feature sums (K, d) and counts (K,) of this step's batch: the statistics of Wen's update.

        In training they come out of the loss's own pass (`_offset_loss` → `kernels.offset_head_loss_with_stats`:
        the fused head's epilogue on CUDA), summed over the step's micro-batches; otherwise from `features`.
        Either way without a host sync (index_add_, no bincount)."""
        if self._step_stats is not None:
            stats, self._step_stats = self._step_stats, None
            return stats
        return kernels.class_feature_sums(features, labels, self.num_classes)

    def _add_step_stats(self, sums: Tensor, counts: Tensor) -> None:
        if self._step_stats is None:
            self._step_stats = (sums, counts)
        else:
            self._step_stats = (self._step_stats[0] + sums, self._step_stats[1] + counts)

    @torch.no_grad()
    def before_step(self, class_counts: Tensor | None, gamma: float = 0.0) -> None:
        """WVN with `loss.wvn_placement=before_step`: unit rows (+ in-loop RS) after the backward pass and
        before the optimizer update, as the WVN authors' released code does in a backward hook; the next
        forward then sees rows of norm 1 + O(lr). Nothing for any other method or placement."""
        if self.spec.wvn and self.wvn_placement == "before_step":
            self._normalize_and_rescale(class_counts, gamma)

    def _normalize_and_rescale(self, class_counts: Tensor | None, gamma: float) -> None:
        self.normalize_weights()  # Algorithm 1, line 8
        if gamma:
            self.rescale(class_counts, gamma)  # Algorithm 1, line 9

    @torch.no_grad()
    def after_step(
        self, features: Tensor, labels: Tensor, class_counts: Tensor | None, gamma: float = 0.0, reduce=None,
        exchange=None,
    ) -> None:
        """Everything the method does after an optimizer step, in the papers' order.

        Under DDP the center update must see the global batch, so every rank keeps identical centers:
        `exchange(features, labels, num_classes, class_sums)` returns the global (K, d) sums and (K,)
        counts (engine.distributed.global_class_sums: the cheaper of a K×d all-reduce and a B×d
        all-gather), or `reduce(*tensors)` sums this rank's statistics over ranks in place."""
        if self.spec.center:
            if exchange is not None:
                sums, counts = exchange(features.detach(), labels, self.num_classes, kernels.class_feature_sums,
                                        local=self.center_statistics(features, labels))
            else:
                sums, counts = self.center_statistics(features, labels)
                if reduce is not None:
                    reduce(sums, counts)
            kernels.wen_center_update(self.centers, sums, counts, self.center_alpha)
        if self.spec.wvn and self.wvn_placement == "after_step":
            self._normalize_and_rescale(class_counts, gamma)

    @torch.no_grad()
    def normalize_weights(self) -> None:
        """WVN: w_k ← w_k / ‖w_k‖ for every class."""
        self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def rescale(self, class_counts: Tensor, gamma: float) -> None:
        """RS: w_i ← (n_1 / n_i)^γ · w_i with n_1 the largest training count."""
        self.weight.mul_(rescale_factors(class_counts, gamma).to(self.weight)[:, None])

    @torch.no_grad()
    def estimated_offset(self) -> Tensor:
        return kernels.estimated_offset(self.weight, self.centers)


def initial_bias(kind: str, num_classes: int) -> Tensor:
    """The classifier bias at initialization (`Method.bias_init`): zeros, or the sigmoid prior
    b_k = −log((1 − π)/π) for every class, so that σ(b_k) = π at the start of training."""
    priors = {"zero": None, "uniform_prior": 1.0 / num_classes, "rare_prior": losses.RARE_PRIOR}
    if kind not in priors:
        raise ValueError(f"unknown bias_init {kind!r}; expected one of {', '.join(priors)}")
    if priors[kind] is None:
        return torch.zeros(num_classes)
    return torch.full((num_classes,), losses.sigmoid_prior_bias(priors[kind]))


def _cosine(features: Tensor, weight: Tensor) -> Tensor:
    return F.normalize(features.float(), dim=1) @ F.normalize(weight.float(), dim=1).t()


# --------------------------------------------------------------------------- losses: (head, features, labels) → loss


def _offset_loss(head: Head, features: Tensor, labels: Tensor) -> Tensor:
    """CE on w·f (− õ) (+ b) + λ1·center + λ2·UC through the kernel (fused on CUDA). A training step of a
    center method also takes the batch's per-class feature sums and counts from the same pass, for the
    Wen update in `after_step` (no second pass over the features, no host sync)."""
    kw = dict(lambda_center=head.lambda_center, lambda_uniform=head.lambda_uniform, use_offset=head.spec.offset,
              bias=head.bias, label_smoothing=head.label_smoothing, center_grad=False)
    if not (head.spec.center and head.training):
        return kernels.offset_head_loss(features, head.weight, head.centers, labels, **kw)
    loss, sums, counts = kernels.offset_head_loss_with_stats(features, head.weight, head.centers, labels, **kw)
    head._add_step_stats(sums, counts)
    return loss


def _logit_adjusted_loss(head: Head, features: Tensor, labels: Tensor) -> Tensor:
    """CE on w·f + τ·log π: the fixed additive bias goes through the kernel's `bias=` flag."""
    return kernels.offset_head_loss(
        features, head.weight, head.centers, labels, lambda_center=0.0, lambda_uniform=0.0,
        use_offset=False, bias=head.prior_bias, label_smoothing=head.label_smoothing, center_grad=False,
    )


def _linear(head: Head, features: Tensor) -> Tensor:
    """w·f (+ b): the logits of the baseline losses, in float32."""
    z = features.float() @ head.weight.float().t()
    return z if head.bias is None else z + head.bias.float()


def _focal_loss(head: Head, features: Tensor, labels: Tensor) -> Tensor:
    return losses.focal_loss(_linear(head, features), labels, head.focal_gamma)


def _cb_ce_loss(head: Head, features: Tensor, labels: Tensor) -> Tensor:
    return losses.weighted_cross_entropy(_linear(head, features), labels, head.class_weight)


def _cb_focal_loss(head: Head, features: Tensor, labels: Tensor) -> Tensor:
    """Cui et al.'s class-balanced focal loss: per-class sigmoids (one-vs-all), as their paper and code."""
    return losses.sigmoid_focal_loss(_linear(head, features), labels, head.focal_gamma, head.class_weight)


def _sigmoid_focal_loss(head: Head, features: Tensor, labels: Tensor) -> Tensor:
    """Lin et al.'s α-balanced sigmoid focal loss (α = 0.25) on w·f + b, b initialized to the prior π = 0.01."""
    return losses.sigmoid_focal_loss(_linear(head, features), labels, head.focal_gamma, alpha=losses.FOCAL_ALPHA)


def _cb_softmax_focal_loss(head: Head, features: Tensor, labels: Tensor) -> Tensor:
    """Class-balanced weights × softmax focal loss, / B (a softmax variant; not Cui et al.'s definition)."""
    return losses.focal_loss(_linear(head, features), labels, head.focal_gamma, head.class_weight)


def _ldam_drw_loss(head: Head, features: Tensor, labels: Tensor) -> Tensor:
    weight = head.class_weight if head.epoch >= head.drw_epoch else None  # DRW
    return losses.ldam_loss(_cosine(features, head.weight), labels, head.margins, head.cosine_scale, weight)


# Method.loss → loss function. A new loss is one function here plus one Method in engine/methods.py.
LOSSES: dict[str, Callable[[Head, Tensor, Tensor], Tensor]] = {
    "offset": _offset_loss,
    "logit_adjusted": _logit_adjusted_loss,
    "focal": _focal_loss,
    "sigmoid_focal": _sigmoid_focal_loss,
    "cb_ce": _cb_ce_loss,
    "cb_focal": _cb_focal_loss,
    "cb_softmax_focal": _cb_softmax_focal_loss,
    "ldam_drw": _ldam_drw_loss,
}


def rescale_factors(class_counts: Tensor, gamma: float) -> Tensor:
    """(n_1 / n_i)^γ per class; n_1 = max_i n_i (the most frequent class)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    # Checked on the host only: in-loop RS calls this every step with the run's device counts (checked
    # positive when the data was read), and a check there would stall the step on a device→host sync.
    if counts.device.type == "cpu" and (counts <= 0).any():
        raise ValueError(f"re-scaling needs a positive training count for every class, got {counts.tolist()}")
    return (counts.max() / counts) ** gamma
