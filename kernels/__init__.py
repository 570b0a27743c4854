"""Head-loss kernels. `offset_head_loss` is the entry point the engine calls.

`offset_head_loss` dispatches (backend="auto" | "triton" | "torch") between the fused
Triton head (`kernels.fused_head`; its launch plan in `kernels.head_plan`, its traffic model
in `kernels.head_traffic`) and the plain-PyTorch definition, which stays
importable as `kernels.reference.offset_head_loss`. "auto" keeps the reference on CPU.
`offset_head_loss_with_stats` also returns the batch's per-class feature sums and counts
(from the same fused pass on CUDA) for `wen_center_update`, with no host sync on either path.
"""

from kernels.fused_head import (
    fused_offset_head_loss,
    fused_offset_head_loss_with_stats,
    offset_head_loss,
    offset_head_loss_with_stats,
)
from kernels.head_plan import HeadFlags
from kernels.reference import (
    class_feature_sums,
    empirical_offset,
    estimated_offset,
    head_logits,
    uniform_constraint,
    wen_center_update,
    wen_center_update_from_batch,
)

__all__ = [
    "HeadFlags",
    "class_feature_sums",
    "empirical_offset",
    "estimated_offset",
    "fused_offset_head_loss",
    "fused_offset_head_loss_with_stats",
    "head_logits",
    "offset_head_loss",
    "offset_head_loss_with_stats",
    "uniform_constraint",
    "wen_center_update",
    "wen_center_update_from_batch",
]
