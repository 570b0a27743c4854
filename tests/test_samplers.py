"""Samplers: class histograms, (seed, epoch) determinism, disjoint shards, mid-epoch resume."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.long_tail import long_tailed_counts
from pipelines.samplers import (
    SAMPLERS,
    ClassAwareSampler,
    InstanceSampler,
    ProgressivelyBalancedSampler,
    SquareRootSampler,
    build_sampler,
)

COUNTS = long_tailed_counts(10, 400, 100.0, "exp")  # 400 … 4 images per class


def _labels(counts=COUNTS, shuffle_seed=1) -> np.ndarray:
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(shuffle_seed).permutation(labels)  # classes interleaved in the data set


LABELS = _labels()


def _make(name: str, **kw):
    return build_sampler(name, LABELS, 10, total_epochs=10, **kw)


def test_instance_is_a_permutation_each_epoch():
    s = InstanceSampler(LABELS, seed=3)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == list(range(len(LABELS))) == sorted(e1)
    assert e0 != e1


def test_class_aware_histogram_is_uniform_and_cycles_within_class():
    s = ClassAwareSampler(LABELS, 10, seed=0, num_samples=10_000)
    idx = np.array(list(s))
    hist = np.bincount(LABELS[idx], minlength=10)
    assert hist.tolist() == [1000] * 10  # visits cycle over all classes: exact, not just in expectation
    # Each pass over the classes visits every class once, in a shuffled order.
    passes = LABELS[idx].reshape(-1, 10)
    assert all(sorted(p.tolist()) == list(range(10)) for p in passes)
    assert len({tuple(p) for p in passes[:20]}) > 1
    # Within a class, every image appears once per cycle before any repeats (class 9 has 4 images).
    members = np.flatnonzero(LABELS == 9)
    drawn = idx[LABELS[idx] == 9]
    for k in range(0, len(drawn) - len(members) + 1, len(members)):
        assert sorted(drawn[k : k + len(members)].tolist()) == members.tolist()


def test_class_aware_default_length_and_samples_per_class():
    assert len(ClassAwareSampler(LABELS)) == len(LABELS)
    s = ClassAwareSampler(LABELS, samples_per_class=4, num_samples=400, seed=2)
    lab = LABELS[np.array(list(s))].reshape(-1, 4)
    assert (lab == lab[:, :1]).all()  # each visit takes 4 images of one class


def test_sqrt_histogram_follows_sqrt_counts():
    s = SquareRootSampler(LABELS, 10, seed=0, num_samples=60_000)
    hist = np.bincount(LABELS[np.array(list(s))], minlength=10) / 60_000
    expected = np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()
    np.testing.assert_allclose(hist, expected, atol=0.01)
    # An instance histogram would differ clearly from √n on this profile.
    assert np.abs(np.asarray(COUNTS) / sum(COUNTS) - expected).max() > 0.05


def test_progressive_moves_from_instance_to_balanced():
    s = ProgressivelyBalancedSampler(LABELS, 10, total_epochs=4, seed=0, num_samples=40_000)
    inst = np.asarray(COUNTS) / sum(COUNTS)
    for epoch, t in ((0, 0.0), (2, 0.5), (4, 1.0), (9, 1.0)):
        s.set_epoch(epoch)
        hist = np.bincount(LABELS[np.array(list(s))], minlength=10) / 40_000
        np.testing.assert_allclose(hist, (1 - t) * inst + t / 10, atol=0.012)
    np.testing.assert_allclose(s.class_probs(1), 0.75 * inst + 0.025)


@pytest.mark.parametrize("name", SAMPLERS)
def test_deterministic_from_seed_and_epoch(name):
    a, b = _make(name, seed=7), _make(name, seed=7)
    for s in (a, b):
        list(s)  # an iteration in between must not matter
        s.set_epoch(3)
    assert list(a) == list(b)
    fresh = _make(name, seed=7)
    fresh.set_epoch(3)
    assert list(fresh) == list(a)
    other_epoch = _make(name, seed=7)
    other_seed = _make(name, seed=8)
    other_seed.set_epoch(3)
    assert list(other_epoch) != list(fresh) and list(other_seed) != list(fresh)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_shards_are_disjoint_equal_and_cover_the_epoch(name, world_size):
    n = len(LABELS) + 1 if name == "class_aware" else None  # an epoch length not divisible by world_size
    shards = [_make(name, seed=5, rank=r, world_size=world_size, num_samples=n) for r in range(world_size)]
    for s in shards:
        s.set_epoch(2)
    orders = [list(s) for s in shards]
    lengths = {len(o) for o in orders}
    assert len(lengths) == 1 and lengths == {len(shards[0])}
    full = shards[0].global_order()
    total = (n or len(LABELS))
    pad = len(full) - total
    assert 0 <= pad < world_size
    # Positions are disjoint: interleaving the shards gives back the global order exactly.
    interleaved = np.empty(len(full), dtype=np.int64)
    for r, o in enumerate(orders):
        interleaved[r::world_size] = o
    np.testing.assert_array_equal(interleaved, full)
    np.testing.assert_array_equal(full[total:], full[:pad])  # padding wraps around like DistributedSampler
    if name == "instance":
        assert sorted(set(np.concatenate(orders).tolist())) == list(range(len(LABELS)))  # every image once


@pytest.mark.parametrize("name", SAMPLERS)
def test_resume_mid_epoch_is_the_tail_of_the_epoch(name):
    full_sampler = _make(name, seed=11, rank=1, world_size=2)
    full_sampler.set_epoch(4)
    full = list(full_sampler)
    resumed = _make(name, seed=11, rank=1, world_size=2, start=123)
    resumed.set_epoch(4)
    assert len(resumed) == len(full) - 123
    assert list(resumed) == full[123:]
    assert len(resumed) == len(full)  # the offset applies to one iteration only
    assert list(resumed) == full
    # Through state_dict, as a checkpoint would carry it.
    state = {"epoch": 4, "position": 400, "seed": 11}
    again = _make(name, seed=11, rank=1, world_size=2)
    again.load_state_dict(state)
    assert list(again) == full[400:]


def test_bad_arguments_name_what_was_received():
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        InstanceSampler(LABELS, rank=2, world_size=2)
    with pytest.raises(ValueError, match="position must be in"):
        InstanceSampler(LABELS).set_position(len(LABELS) + 1)
    with pytest.raises(ValueError, match="unknown sampler 'balanced'"):
        build_sampler("balanced", LABELS)
    with pytest.raises(ValueError, match="total_epochs"):
        build_sampler("progressive", LABELS)
    with pytest.raises(ValueError, match=r"label 9 is outside \[0, 8\]"):
        InstanceSampler(LABELS, num_classes=9)
    with pytest.raises(ValueError, match="seed 1"):
        InstanceSampler(LABELS, seed=2).load_state_dict({"epoch": 0, "position": 0, "seed": 1})


def test_empty_class_is_never_drawn():
    labels = np.array([0, 0, 0, 2, 2])  # class 1 of 3 is empty
    for name in SAMPLERS:
        s = build_sampler(name, labels, 3, num_samples=300, total_epochs=1)
        s.set_epoch(1)
        assert set(labels[np.array(list(s))].tolist()) == {0, 2}
