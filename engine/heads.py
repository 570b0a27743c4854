"""The classifier head: where both papers' methods live.

One `method=` switch selects what the head does:

| method   | logits              | loss terms                     | after each optimizer step          |
|----------|---------------------|--------------------------------|------------------------------------|
| ce       | w·f                 | CE                             | –                                  |
| ce_bias  | w·f + b             | CE                             | –                                  |
| eo       | w·f − õ             | CE + λ1·center                 | Wen center update                  |
| uc_only  | w·f                 | CE + λ1·center + λ2·UC(õ)      | Wen center update                  |
| eo_uc    | w·f − õ             | CE + λ1·center + λ2·UC(õ)      | Wen center update                  |
| wvn      | w·f                 | CE                             | ‖w_k‖ = 1 (+ Algorithm 1 RS)       |

Baselines the papers compare against (loss math in engine/losses.py; they need the
training class counts, passed in at construction):

| method           | logits (predict)    | training loss                                        |
|------------------|---------------------|------------------------------------------------------|
| focal            | w·f                 | focal, γ = loss.focal_gamma (Lin et al.)             |
| cb_ce            | w·f                 | class-balanced CE, β = loss.cb_beta (Cui et al.)     |
| cb_focal         | w·f                 | class-balanced sigmoid focal, Cui et al.'s (one-vs-all) |
| cb_softmax_focal | w·f                 | class-balanced weights × softmax focal, / B          |
| ldam_drw         | s·cos(f, w)         | LDAM margins + DRW from loss.drw_epoch, / Σ w_y (Cao et al.) |
| balanced_softmax | w·f                 | CE on w·f + log π (Ren et al.)                       |
| logit_adjusted   | w·f                 | CE on w·f + τ·log π, τ = loss.logit_adjust_tau (Menon et al.) |

õ_k = ½ c_k·w_k (estimated offset). `eo` is the paper's "Ours w/o UC" and `uc_only`
its "UC only" ablation (Table 3); both keep the center loss, since it is what
makes c_k estimate the class feature mean. The centers are buffers, not
parameters: they move only by Wen et al.'s count-normalized update (the paper
follows that protocol), so the offset and UC gradients shape w and f, not c.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from engine import losses


@dataclass(frozen=True)
class MethodSpec:
    bias: bool = False  # trained per-class bias added to the logits
    offset: bool = False  # estimated offset subtracted from the logits
    center: bool = False  # λ1 center loss + Wen center update
    uniform: bool = False  # λ2 uniform constraint on the estimated offset
    wvn: bool = False  # unit-norm weight vectors after every step
    loss: str = "offset"  # "offset" (kernels.offset_head_loss) or a baseline loss of engine/losses.py
    cosine: bool = False  # logits s·cos(f, w) (LDAM's normalized classifier)


METHODS: dict[str, MethodSpec] = {
    "ce": MethodSpec(),
    "ce_bias": MethodSpec(bias=True),
    "eo": MethodSpec(offset=True, center=True),
    "uc_only": MethodSpec(center=True, uniform=True),
    "eo_uc": MethodSpec(offset=True, center=True, uniform=True),
    "wvn": MethodSpec(wvn=True),
    "focal": MethodSpec(loss="focal"),
    "cb_ce": MethodSpec(loss="cb_ce"),
    "cb_focal": MethodSpec(loss="cb_focal"),
    "cb_softmax_focal": MethodSpec(loss="cb_softmax_focal"),
    "ldam_drw": MethodSpec(loss="ldam_drw", cosine=True),
    "balanced_softmax": MethodSpec(loss="logit_adjusted"),
    "logit_adjusted": MethodSpec(loss="logit_adjusted"),
}


class OffsetHead(nn.Module):
    """Linear classifier with optional bias, estimated offset, center loss, uniform constraint, WVN."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        method: str,
        lambda_center: float = 1.0,
        lambda_uniform: float = 1.0,
        center_alpha: float = 0.5,
        label_smoothing: float = 0.0,
        class_counts: Tensor | np.ndarray | None = None,
        focal_gamma: float = 2.0,
        cb_beta: float = 0.9999,
        ldam_max_margin: float = 0.5,
        ldam_scale: float = 30.0,
        drw_epoch: int = 0,
        logit_adjust_tau: float = 1.0,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        self.method = method
        self.spec = METHODS[method]
        self.num_classes = num_classes
        self.lambda_center = lambda_center if self.spec.center else 0.0
        self.lambda_uniform = lambda_uniform if self.spec.uniform else 0.0
        self.center_alpha = center_alpha
        self.label_smoothing = label_smoothing

        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init
        if self.spec.bias:
            self.bias = nn.Parameter(torch.zeros(num_classes))
        else:
            self.register_parameter("bias", None)
        # Centers start at the origin (õ = 0); Wen's update pulls each to its class mean.
        self.register_buffer("centers", torch.zeros(num_classes, in_features))
        if self.spec.wvn:
            self.normalize_weights()
        self._init_baseline_loss(class_counts, focal_gamma, cb_beta, ldam_max_margin, ldam_scale, drw_epoch,
                                 logit_adjust_tau)

    def _init_baseline_loss(self, class_counts, focal_gamma, cb_beta, ldam_max_margin, ldam_scale, drw_epoch,
                            logit_adjust_tau) -> None:
        """Fixed per-class tensors of the baseline losses: non-persistent buffers (they follow .to(),
        stay out of the state_dict: they are a function of the class counts and the config)."""
        self.focal_gamma, self.cb_beta, self.drw_epoch = focal_gamma, cb_beta, drw_epoch
        self.cosine_scale = ldam_scale
        self.epoch = 0
        if self.spec.loss == "offset":
            return
        if class_counts is None:
            raise ValueError(f"method {self.method!r} needs the training class counts; received class_counts=None")
        if len(class_counts) != self.num_classes:
            raise ValueError(f"class_counts has {len(class_counts)} entries, expected num_classes={self.num_classes}")
        tau = 1.0 if self.method == "balanced_softmax" else logit_adjust_tau
        fixed = {
            "class_weight": losses.class_balanced_weights(class_counts, cb_beta),
            "margins": losses.ldam_margins(class_counts, ldam_max_margin),
            "prior_bias": tau * losses.log_prior(class_counts),
        }
        for name, value in fixed.items():
            self.register_buffer(name, value.float(), persistent=False)

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop at the start of every epoch (0-based); DRW switches on it."""
        self.epoch = int(epoch)

    def forward(self, features: Tensor) -> Tensor:
        """Logits used for prediction: w·f − õ (+ b); s·cos(f, w) for a cosine head."""
        if self.spec.cosine:
            return self.cosine_scale * self._cosine(features)
        return kernels.head_logits(features, self.weight, self.centers, self.bias, use_offset=self.spec.offset)

    def _cosine(self, features: Tensor) -> Tensor:
        return F.normalize(features.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).t()

    def loss(self, features: Tensor, labels: Tensor) -> Tensor:
        """Training loss of the selected method (mean over the batch)."""
        kind = self.spec.loss
        if kind == "logit_adjusted":  # fixed additive bias τ·log π through the kernel's `bias=` flag
            return kernels.offset_head_loss(
                features, self.weight, self.centers, labels, lambda_center=0.0, lambda_uniform=0.0,
                use_offset=False, bias=self.prior_bias, label_smoothing=self.label_smoothing, center_grad=False,
            )
        if kind == "ldam_drw":
            weight = self.class_weight if self.epoch >= self.drw_epoch else None
            return losses.ldam_loss(self._cosine(features), labels, self.margins, self.cosine_scale, weight)
        if kind != "offset":
            logits = features.float() @ self.weight.float().t()
            weight = self.class_weight if kind.startswith("cb_") else None
            if kind == "cb_ce":
                return losses.weighted_cross_entropy(logits, labels, weight)
            if kind == "cb_focal":  # Cui et al.'s sigmoid form
                return losses.sigmoid_focal_loss(logits, labels, self.focal_gamma, weight)
            return losses.focal_loss(logits, labels, self.focal_gamma, weight)  # focal, cb_softmax_focal
        return kernels.offset_head_loss(
            features,
            self.weight,
            self.centers,
            labels,
            lambda_center=self.lambda_center,
            lambda_uniform=self.lambda_uniform,
            use_offset=self.spec.offset,
            bias=self.bias,
            label_smoothing=self.label_smoothing,
            center_grad=False,
        )

    @torch.no_grad()
    def after_step(
        self, features: Tensor, labels: Tensor, class_counts: Tensor | None, gamma: float = 0.0, reduce=None
    ) -> None:
        """Everything the method does after an optimizer step, in the papers' order.

        `reduce(*tensors)` sums tensors over ranks in place (DDP): the center update then sees
        the global batch, so every rank keeps identical centers."""
        if self.spec.center:
            sums, counts = kernels.class_feature_sums(features, labels, self.num_classes)
            if reduce is not None:
                reduce(sums, counts)
            kernels.wen_center_update(self.centers, sums, counts, self.center_alpha)
        if self.spec.wvn:
            self.normalize_weights()  # Algorithm 1, line 8
            if gamma:
                self.rescale(class_counts, gamma)  # Algorithm 1, line 9

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


def rescale_factors(class_counts: Tensor, gamma: float) -> Tensor:
    """(n_1 / n_i)^γ per class; n_1 = max_i n_i (the most frequent class)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if (counts <= 0).any():
        raise ValueError(f"re-scaling needs a positive training count for every class, got {counts.tolist()}")
    return (counts.max() / counts) ** gamma
