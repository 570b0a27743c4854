"""Epoch samplers for long-tailed training: instance, class-aware, square-root, progressively balanced.

Every sampler here

* is deterministic from ``(seed, epoch)`` only: the epoch's order is drawn from a
  ``numpy.random.Generator`` seeded with ``SeedSequence([seed, epoch])``; no global RNG is
  touched, so the order does not depend on what ran before in the process;
* draws one *global* epoch order (identical on every rank), pads it by wrapping to a
  multiple of ``world_size`` (as ``torch.utils.data.DistributedSampler`` does) and gives
  rank ``r`` the positions ``r, r + world_size, …`` — disjoint shards of equal length;
* resumes inside an epoch: ``set_position(n)`` (or the constructor's ``start``) skips the
  first ``n`` indices of this rank's epoch on the *next* iteration only, so a run restarted
  from a checkpoint taken after ``n`` samples yields exactly the tail of the interrupted
  epoch. ``state_dict()`` / ``load_state_dict()`` carry ``epoch`` and ``position``.

Samplers (p_j is the probability of drawing class j, n_j its training count):

* ``InstanceSampler``: a shuffled permutation of the data set (p_j ∝ n_j), no replacement.
* ``ClassAwareSampler`` (Shen et al., ECCV 2016; Kang et al., ICLR 2020): cycle over the
  classes in a shuffled order (reshuffled after each pass); each visit takes
  ``samples_per_class`` images from that class's own shuffled cycle, reshuffled when
  exhausted. p_j = 1/C.
* ``SquareRootSampler`` (Mahajan et al. 2018; Kang et al.): p_j ∝ √n_j, an image drawn
  uniformly within its class (with replacement).
* ``ProgressivelyBalancedSampler`` (Kang et al.): at epoch t of T,
  p_j(t) = (1 − t/T)·n_j/N + (t/T)·1/C, an image drawn uniformly within its class.

Epoch length (``num_samples``, over all ranks) defaults to the data set's size.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from pipelines.sampler_names import SAMPLERS


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch: a function of (seed, epoch) only."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be ≥ 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng(np.random.SeedSequence([seed, epoch]))


def _as_labels(labels: Sequence[int] | np.ndarray, num_classes: int | None) -> tuple[np.ndarray, int]:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(f"labels must be ≥ 0, got {int(arr.min())}")
    c = int(arr.max()) + 1 if num_classes is None else int(num_classes)
    if arr.max() >= c:
        raise ValueError(f"label {int(arr.max())} is outside [0, {c - 1}] (num_classes={c})")
    return arr, c


class EpochSampler(Sampler[int]):
    """Common part: (seed, epoch) determinism, rank sharding with wrap padding, resume.

    Subclasses implement `_global_order(rng, epoch)`, returning the epoch's full order of
    data-set indices (length `num_samples`) before padding and sharding.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        num_classes: int | None = None,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_samples: int | None = None,
        start: int = 0,
    ) -> None:
        self.labels, self.num_classes = _as_labels(labels, num_classes)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 ≤ rank < world_size, got rank={rank}, world_size={world_size}")
        n = len(self.labels) if num_samples is None else int(num_samples)
        if n < 1:
            raise ValueError(f"num_samples (epoch length over all ranks) must be ≥ 1, got {num_samples}")
        self.seed, self.rank, self.world_size, self.num_samples = int(seed), rank, world_size, n
        self.epoch = 0
        self.counts = np.bincount(self.labels, minlength=self.num_classes)
        # members[c]: the data-set indices of class c, ascending.
        order = np.argsort(self.labels, kind="stable")
        self.members = np.split(order, np.cumsum(self.counts)[:-1])
        self._start = 0
        self.set_position(start)

    # ---- epoch / position -------------------------------------------------------------
    @property
    def samples_per_rank(self) -> int:
        """Indices one rank draws per epoch (the padded total divided by world_size)."""
        return math.ceil(self.num_samples / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (does not reset a pending position)."""
        if epoch < 0:
            raise ValueError(f"epoch must be ≥ 0, got {epoch}")
        self.epoch = int(epoch)

    def set_position(self, position: int) -> None:
        """Skip the first `position` indices of this rank's epoch on the next iteration (resume)."""
        if not 0 <= position <= self.samples_per_rank:
            raise ValueError(
                f"position must be in [0, {self.samples_per_rank}] (this rank's epoch length), got {position}"
            )
        self._start = int(position)

    @property
    def position(self) -> int:
        """The pending resume offset: where the next iteration starts in this rank's epoch."""
        return self._start

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self._start, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.set_epoch(int(state["epoch"]))
        self.set_position(int(state["position"]))

    # ---- orders -------------------------------------------------------------------------
    def _global_order(self, rng: np.random.Generator, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's order over all ranks, padded by wrapping to a multiple of world_size."""
        e = self.epoch if epoch is None else epoch
        order = np.asarray(self._global_order(epoch_rng(self.seed, e), e), dtype=np.int64)
        assert len(order) == self.num_samples, (len(order), self.num_samples)
        total = self.samples_per_rank * self.world_size
        if total > len(order):
            order = np.resize(order, total)  # np.resize repeats from the start: DistributedSampler's wrap
        return order

    def rank_order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's full epoch (no resume offset applied)."""
        return self.global_order(epoch)[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        order = self.rank_order()[self._start :]
        self._start = 0  # a resume position applies to one iteration only
        return iter(order.tolist())

    def __len__(self) -> int:
        """Indices the next iteration yields (this rank's epoch minus a pending resume offset)."""
        return self.samples_per_rank - self._start

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(N={len(self.labels)}, classes={self.num_classes}, num_samples={self.num_samples}, "
            f"seed={self.seed}, rank={self.rank}/{self.world_size}, epoch={self.epoch})"
        )

    # ---- helpers ------------------------------------------------------------------------
    def _draw_by_class_probs(self, rng: np.random.Generator, class_probs: np.ndarray) -> np.ndarray:
        """num_samples draws: a class from `class_probs`, then an image uniformly within it."""
        if np.any((class_probs > 0) & (self.counts == 0)):
            raise ValueError("a class with no image has non-zero sampling probability")
        classes = rng.choice(self.num_classes, size=self.num_samples, p=class_probs)
        within = rng.random(self.num_samples)
        offsets = np.minimum((within * self.counts[classes]).astype(np.int64), self.counts[classes] - 1)
        starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        sorted_idx = np.concatenate(self.members)
        return sorted_idx[starts[classes] + offsets]


class InstanceSampler(EpochSampler):
    """Instance-balanced: a fresh permutation each epoch (p_j ∝ n_j).

    With `num_samples` larger than the data set, further permutations are appended.
    """

    def _global_order(self, rng: np.random.Generator, epoch: int) -> np.ndarray:
        # torch.randperm from a generator seeded with seed·1_000_003 + epoch: the order the
        # engine's runs have always used (reproducible results across versions).
        n = len(self.labels)
        reps = math.ceil(self.num_samples / n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return np.concatenate([torch.randperm(n, generator=g).numpy() for _ in range(reps)])[: self.num_samples]


class ClassAwareSampler(EpochSampler):
    """Class-aware sampling (Shen et al. 2016, as in Kang et al.'s ClassAwareSampler).

    Classes are visited in a shuffled order that is reshuffled after every pass over all
    (non-empty) classes; each visit takes `samples_per_class` images from that class's own
    cycle, a shuffled list of its images reshuffled whenever it is exhausted. The result
    is the same as running those two nested random cycles one draw at a time; it is
    computed class by class with numpy (each class's cycle consumes the epoch's
    generator in class-id order), so an ImageNet-LT epoch takes milliseconds.
    """

    def __init__(self, labels, num_classes=None, *, samples_per_class: int = 1, **kw) -> None:
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class must be ≥ 1, got {samples_per_class}")
        self.samples_per_class = samples_per_class
        super().__init__(labels, num_classes, **kw)

    def _global_order(self, rng: np.random.Generator, epoch: int) -> np.ndarray:
        present = np.flatnonzero(self.counts > 0)
        k = self.samples_per_class
        visits = math.ceil(self.num_samples / k)
        passes = math.ceil(visits / len(present))
        class_seq = np.concatenate([rng.permutation(present) for _ in range(passes)])[:visits]
        slot_class = np.repeat(class_seq, k)[: self.num_samples]  # class of every output position
        out = np.empty(self.num_samples, dtype=np.int64)
        by_class = np.argsort(slot_class, kind="stable")  # output positions grouped by class, ascending
        bounds = np.cumsum(np.bincount(slot_class, minlength=self.num_classes))
        for c in present:
            slots = by_class[(bounds[c - 1] if c else 0) : bounds[c]]
            if len(slots) == 0:
                continue
            members = self.members[c]
            cycles = math.ceil(len(slots) / len(members))
            draws = np.concatenate([rng.permutation(members) for _ in range(cycles)])
            out[slots] = draws[: len(slots)]
        return out


class ClassPowerSampler(EpochSampler):
    """p_j ∝ n_j^q with replacement: q = 1 instance-balanced, ½ square-root, 0 class-balanced."""

    def __init__(self, labels, num_classes=None, *, power: float = 0.5, **kw) -> None:
        if not 0.0 <= power <= 1.0:
            raise ValueError(f"power q of p_j ∝ n_j^q must be in [0, 1], got {power}")
        self.power = float(power)
        super().__init__(labels, num_classes, **kw)
        w = np.where(self.counts > 0, self.counts.astype(np.float64) ** self.power, 0.0)
        self.class_probs = w / w.sum()

    def _global_order(self, rng: np.random.Generator, epoch: int) -> np.ndarray:
        return self._draw_by_class_probs(rng, self.class_probs)


class SquareRootSampler(ClassPowerSampler):
    """Square-root sampling: p_j ∝ √n_j (Mahajan et al. 2018; Kang et al. 2020)."""

    def __init__(self, labels, num_classes=None, **kw) -> None:
        super().__init__(labels, num_classes, power=0.5, **kw)


class ProgressivelyBalancedSampler(EpochSampler):
    """Kang et al.'s progressively-balanced sampling over `total_epochs` epochs.

    p_j(t) = (1 − t/T)·n_j/N + (t/T)·1/C at epoch t (t/T clamped to 1 after T), with the
    image drawn uniformly within its class; epoch 0 is instance-balanced in expectation.
    """

    def __init__(self, labels, num_classes=None, *, total_epochs: int, **kw) -> None:
        if total_epochs < 1:
            raise ValueError(f"total_epochs (T of p_j(t)) must be ≥ 1, got {total_epochs}")
        self.total_epochs = int(total_epochs)
        super().__init__(labels, num_classes, **kw)

    def class_probs(self, epoch: int) -> np.ndarray:
        t = min(epoch / self.total_epochs, 1.0)
        present = self.counts > 0
        instance = self.counts / self.counts.sum()
        balanced = present / present.sum()
        return (1.0 - t) * instance + t * balanced

    def _global_order(self, rng: np.random.Generator, epoch: int) -> np.ndarray:
        return self._draw_by_class_probs(rng, self.class_probs(epoch))


def build_sampler(
    name: str,
    labels: Sequence[int] | np.ndarray,
    num_classes: int | None = None,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_samples: int | None = None,
    start: int = 0,
    total_epochs: int | None = None,
    samples_per_class: int = 1,
) -> EpochSampler:
    """Make a sampler by name: one of SAMPLERS ("instance", "class_aware", "sqrt", "progressive")."""
    common: dict[str, Any] = dict(seed=seed, rank=rank, world_size=world_size, num_samples=num_samples, start=start)
    if name == "instance":
        return InstanceSampler(labels, num_classes, **common)
    if name == "class_aware":
        return ClassAwareSampler(labels, num_classes, samples_per_class=samples_per_class, **common)
    if name == "sqrt":
        return SquareRootSampler(labels, num_classes, **common)
    if name == "progressive":
        if total_epochs is None:
            raise ValueError("the progressive sampler needs total_epochs (T of p_j(t) = (1 − t/T)·p_IB + t/T·p_CB)")
        return ProgressivelyBalancedSampler(labels, num_classes, total_epochs=total_epochs, **common)
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")


class ShardSampler(Sampler[int]):
    """Evaluation shards: rank r takes indices r, r + world_size, … of the data set's order,
    with no padding (no image counted twice); `set_epoch` is accepted and ignored."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 ≤ rank < world_size, got rank={rank}, world_size={world_size}")
        self.size, self.rank, self.world_size = size, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))
