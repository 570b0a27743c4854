"""Long-tailed class profiles, exactly as CIFAR-LT is built (Cui et al., CVPR 2019).

Class i of C keeps
    exp:   n_i = int(n_max · (1/IF)^(i/(C−1)))        (Cui et al.'s `img_max * imb_factor**(i / (C - 1.0))`)
    step:  n_i = n_max for i < C/2, int(n_max / IF) otherwise   (Buda et al.; Cao et al.'s LDAM step split)
so class 0 is the most frequent and class C−1 has n_max / IF images.

`long_tailed_profile` is the same formula before int(): the counts the official
AdjustBnd4Imbalance code (Kim & Kim 2020, `cifar.py --evaluate`) re-scales with,
`img_max * (1/IF)**(i/(C−1))` un-rounded, class i = label i (`rescale.counts=profile`).
"""

from __future__ import annotations

import numpy as np

PROFILES = ("exp", "step")


def shot_groups(class_counts, many_threshold: int, few_threshold: int) -> dict[str, np.ndarray]:
    """Class ids per shot group: many: n > many_threshold; few: n < few_threshold (an empty class too);
    medium: the rest (ImageNet-LT, Liu et al. 2019: 100 / 20)."""
    counts = np.asarray(class_counts)
    many = counts > many_threshold
    few = counts < few_threshold
    return {"many": np.flatnonzero(many), "medium": np.flatnonzero(~many & ~few), "few": np.flatnonzero(few)}


def long_tailed_profile(num_classes: int, n_max: float, imbalance_ratio: float, profile: str = "exp") -> list[float]:
    """The profile's un-rounded class sizes: n_max·IF^(−i/(C−1)) (exp); n_max, n_max / IF (step)."""
    if num_classes < 2:
        raise ValueError(f"a long-tailed profile needs at least 2 classes, got {num_classes}")
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance ratio must be ≥ 1, got {imbalance_ratio}")
    factor = 1.0 / imbalance_ratio
    if profile == "exp":
        return [n_max * factor ** (i / (num_classes - 1.0)) for i in range(num_classes)]
    if profile == "step":
        half = num_classes // 2
        return [n_max if i < half else n_max * factor for i in range(num_classes)]
    raise ValueError(f"unknown imbalance profile {profile!r}; expected one of {PROFILES}")


def long_tailed_counts(num_classes: int, n_max: int, imbalance_ratio: float, profile: str = "exp") -> list[int]:
    counts = [int(n) for n in long_tailed_profile(num_classes, n_max, imbalance_ratio, profile)]
    if min(counts) < 1:
        raise ValueError(
            f"n_max={n_max} with imbalance ratio {imbalance_ratio} leaves a class with no image ({counts})"
        )
    return counts


def profile_counts(observed: list[int], imbalance_ratio: float, profile: str = "exp") -> list[float]:
    """The un-rounded profile of a data set built by `long_tailed_counts` (n_max = class 0's count),
    checked against its observed training counts: the profile stands in only for the counts it made."""
    observed = [int(n) for n in observed]
    built = long_tailed_counts(len(observed), observed[0], imbalance_ratio, profile)
    if built != observed:
        raise ValueError(
            f"training counts {observed} are not the {profile} profile with imbalance ratio {imbalance_ratio:g} "
            f"and n_max {observed[0]} (that profile gives {built}); profile counts need a CIFAR-LT-style split"
        )
    return long_tailed_profile(len(observed), observed[0], imbalance_ratio, profile)
