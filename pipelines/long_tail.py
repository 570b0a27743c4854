"""Long-tailed class profiles, exactly as CIFAR-LT is built (Cui et al., CVPR 2019).

Class i of C keeps
    exp:   n_i = int(n_max · (1/IF)^(i/(C−1)))        (Cui et al.'s `img_max * imb_factor**(i / (C - 1.0))`)
    step:  n_i = n_max for i < C/2, int(n_max / IF) otherwise   (Buda et al.; Cao et al.'s LDAM step split)
so class 0 is the most frequent and class C−1 has n_max / IF images.
"""

from __future__ import annotations

PROFILES = ("exp", "step")


def long_tailed_counts(num_classes: int, n_max: int, imbalance_ratio: float, profile: str = "exp") -> list[int]:
    if num_classes < 2:
        raise ValueError(f"a long-tailed profile needs at least 2 classes, got {num_classes}")
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance ratio must be ≥ 1, got {imbalance_ratio}")
    factor = 1.0 / imbalance_ratio
    if profile == "exp":
        counts = [int(n_max * factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    elif profile == "step":
        half = num_classes // 2
        counts = [n_max if i < half else int(n_max * factor) for i in range(num_classes)]
    else:
        raise ValueError(f"unknown imbalance profile {profile!r}; expected one of {PROFILES}")
    if min(counts) < 1:
        raise ValueError(
            f"n_max={n_max} with imbalance ratio {imbalance_ratio} leaves a class with no image ({counts})"
        )
    return counts
