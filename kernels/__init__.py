"""Head-loss kernels. `offset_head_loss` is the entry point the engine calls."""

from kernels.reference import (
    class_feature_sums,
    empirical_offset,
    estimated_offset,
    head_logits,
    offset_head_loss,
    uniform_constraint,
    wen_center_update,
)

__all__ = [
    "class_feature_sums",
    "empirical_offset",
    "estimated_offset",
    "head_logits",
    "offset_head_loss",
    "uniform_constraint",
    "wen_center_update",
]
