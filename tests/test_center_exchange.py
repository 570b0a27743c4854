"""Wen center update under DDP: both exchanges give every rank the single-process centers (gloo, 2 ranks)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from engine.distributed import exchange_bytes, global_class_sums
from kernels import class_feature_sums, wen_center_update

K, D, B = 40, 5, 6  # per-rank batch B; rank 1 has a short last batch (B - 2 rows)


def _rank_data(rank: int):
    g = torch.Generator().manual_seed(rank)
    rows = B - 2 * rank
    return torch.randn(rows, D, generator=g, dtype=torch.float64), torch.randint(0, K, (rows,), generator=g)


CASES = {"gather": B, "reduce": 400}  # exchange → the rows_per_rank that makes it the cheaper one


def _worker(rank: int, port: int, out_dir: str):
    """One gloo group for both exchanges (one spawn: the processes cost more than the exchanges)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        feats, labels = _rank_data(rank)
        for strategy, rows_per_rank in CASES.items():
            sums, counts = global_class_sums(feats, labels, K, class_feature_sums, rows_per_rank)
            centers = torch.zeros(K, D, dtype=torch.float64)
            wen_center_update(centers, sums, counts, 0.5)
            torch.save({"sums": sums, "counts": counts, "centers": centers}, f"{out_dir}/{strategy}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned gloo ranks
def test_both_exchanges_give_identical_centers_on_every_rank(tmp_path):
    for strategy, rows_per_rank in CASES.items():
        cost = exchange_bytes(rows_per_rank, D, K, 2, 8)
        assert min(cost, key=cost.get) == strategy  # the test reaches the path it names
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    feats, labels = (torch.cat(t) for t in zip(_rank_data(0), _rank_data(1)))
    sums, counts = class_feature_sums(feats, labels, K)
    centers = torch.zeros(K, D, dtype=torch.float64)
    wen_center_update(centers, sums, counts, 0.5)
    for strategy in CASES:
        r0, r1 = (torch.load(tmp_path / f"{strategy}-rank{r}.pt") for r in (0, 1))
        for key in ("sums", "counts", "centers"):
            assert torch.equal(r0[key], r1[key]), (strategy, key)  # bit-identical across ranks
        torch.testing.assert_close(r0["centers"], centers.to(r0["centers"].dtype), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r0["counts"], counts.to(r0["counts"].dtype))


def test_bytes_exchanged_at_imagenet_and_inaturalist_scale():
    """B = 256 per rank × 8 ranks, d = 2048, bf16 features: gathering rows moves far less at K = 8142."""
    k1000 = exchange_bytes(256, 2048, 1000, 8, 2)
    k8142 = exchange_bytes(256, 2048, 8142, 8, 2)
    assert k1000 == {"reduce": 14_343_000, "gather": 7_354_368}
    assert k8142 == {"reduce": 116_780_706, "gather": 7_354_368}
