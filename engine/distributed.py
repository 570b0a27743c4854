"""torchrun / torch.distributed glue: who am I, which device, how to reduce.

`engine train` started by torchrun (env:// rendezvous: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT set by torchrun) runs one process per GPU with DDP over NCCL, or per
CPU process over gloo. A plain `engine train` is world size 1 and uses none of this.

Multi-node (2 nodes × 8 GPUs), on every node:
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \
        --rdzv-id RUN_ID -m engine.cli train --preset imagenet-lt-resnext152 data.root=/data/imagenet
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (no-op for a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(rank, world_size, local_rank)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """In-place sum over ranks (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a (possibly differently sized) tensor from every rank, in rank order."""
    return torch.cat(all_gather_objects(tensor.cpu()))


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order ([obj] when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_main(obj, timeout_s: float = 4 * 3600):
    """Rank 0's `obj` on every rank (`obj` as it is when not distributed).

    It goes over a gloo group of its own with a long timeout: the other ranks may wait here while
    rank 0 does a long job alone (screening a million images on a network file system), longer
    than the default group's timeout (NCCL: 10 minutes)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    try:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]
    finally:
        dist.destroy_process_group(group)


def broadcast_error(message: str | None) -> str | None:
    """Agree on a failure: if any rank has an error message, every rank gets the first one.

    Used at sync points so one rank's bad input or NaN brings all ranks down with its cause.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return message
    return next((f"rank {r}: {m}" for r, m in enumerate(all_gather_objects(message)) if m), None)


# --------------------------------------------------------------------------- Wen center update under DDP


def exchange_bytes(rows_per_rank: int, dim: int, num_classes: int, world_size: int, feature_bytes: int = 4) -> dict:
    """Bytes each rank sends (= receives) to build the global batch's per-class sums, per strategy.

    reduce: ring all-reduce of the (K, d) sums and (K,) counts in fp32: 2·(W−1)/W · K·(d+1)·4.
    gather: all-gather of every rank's (B, d) features and (B,) int64 labels: (W−1)·B·(d·e + 8).
    """
    w = world_size
    return {
        "reduce": int(2 * (w - 1) / w * num_classes * (dim + 1) * 4),
        "gather": int((w - 1) * rows_per_rank * (dim * feature_bytes + 8)),
    }


def global_class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int, class_sums,
                      rows_per_rank: int, local: tuple[torch.Tensor, torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums (K, d) and counts (K,) over the global batch, the same on every rank.

    `class_sums(features, labels, K)` computes them for one set of rows (it must be deterministic, so that
    every rank computing from the same gathered rows gets the same bits). Whichever exchange moves fewer
    bytes is used: the K×d sums (all-reduce) or the B×d rows (all-gather, padded to `rows_per_rank` with
    label −1 so no rank needs to know another's batch size: no extra sync). `local`: this rank's sums and
    counts when already computed (the fused head's pass), used as they are by the all-reduce.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return local if local is not None else class_sums(features, labels, num_classes)
    world = dist.get_world_size()
    cost = exchange_bytes(rows_per_rank, features.shape[1], num_classes, world, features.element_size())
    if cost["reduce"] <= cost["gather"]:
        sums, counts = local if local is not None else class_sums(features, labels, num_classes)
        all_reduce_sum_(sums, counts)
        return sums, counts
    pad = rows_per_rank - features.shape[0]
    if pad < 0:
        raise ValueError(f"global_class_sums: {features.shape[0]} rows on this rank, rows_per_rank={rows_per_rank}")
    rows = torch.cat([features.detach(), features.new_zeros(pad, features.shape[1])])
    ids = torch.cat([labels, labels.new_full((pad,), -1)])
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_rows, rows)
    dist.all_gather(all_ids, ids)
    rows, ids = torch.cat(all_rows), torch.cat(all_ids)
    # Padding rows go to an extra class K that is dropped: masking would need a data-dependent shape (a sync).
    sums, counts = class_sums(rows, torch.where(ids < 0, num_classes, ids), num_classes + 1)
    return sums[:num_classes], counts[:num_classes]
