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

õ_k = ½ c_k·w_k (estimated offset). `eo` is the paper's "Ours w/o UC" and `uc_only`
its "UC only" ablation (Table 3); both keep the center loss, since it is what
makes c_k estimate the class feature mean. The centers are buffers, not
parameters: they move only by Wen et al.'s count-normalized update (the paper
follows that protocol), so the offset and UC gradients shape w and f, not c.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import kernels


@dataclass(frozen=True)
class MethodSpec:
    bias: bool = False  # trained per-class bias added to the logits
    offset: bool = False  # estimated offset subtracted from the logits
    center: bool = False  # λ1 center loss + Wen center update
    uniform: bool = False  # λ2 uniform constraint on the estimated offset
    wvn: bool = False  # unit-norm weight vectors after every step


METHODS: dict[str, MethodSpec] = {
    "ce": MethodSpec(),
    "ce_bias": MethodSpec(bias=True),
    "eo": MethodSpec(offset=True, center=True),
    "uc_only": MethodSpec(center=True, uniform=True),
    "eo_uc": MethodSpec(offset=True, center=True, uniform=True),
    "wvn": MethodSpec(wvn=True),
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

    def forward(self, features: Tensor) -> Tensor:
        """Logits used for prediction: w·f − õ (+ b)."""
        return kernels.head_logits(features, self.weight, self.centers, self.bias, use_offset=self.spec.offset)

    def loss(self, features: Tensor, labels: Tensor) -> Tensor:
        """Training loss of the selected method (mean over the batch)."""
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
    def after_step(self, features: Tensor, labels: Tensor, class_counts: Tensor | None, gamma: float = 0.0) -> None:
        """Everything the method does after an optimizer step, in the papers' order."""
        if self.spec.center:
            sums, counts = kernels.class_feature_sums(features, labels, self.num_classes)
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
