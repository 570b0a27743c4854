"""Baseline losses the papers compare against (the math; the head in engine/heads.py calls it).

All functions take logits (B, K) and int64 labels (B,) and return a batch mean; they
compute in the logits' dtype (float64 in the tests). n_j is the training count of class j.

* `focal`: the softmax focal loss of Cao et al.'s LDAM-DRW code (their `FocalLoss` baseline):
  ℓ_i = −(1 − p_{i,y})^γ · log p_{i,y}, p = softmax(z), batch mean.
* `sigmoid_focal` (Lin et al. 2017, RetinaNet): per-class sigmoids, α-balanced,
  ℓ_ik = −α_t·(1 − p_t)^γ·log p_t with α_t = α (= `FOCAL_ALPHA`, 0.25) for the label class and
  1 − α for the others, summed over classes and divided by the number of positives (B); the
  classifier bias starts at −log((1 − π)/π), π = 0.01 (`RARE_PRIOR`).
* class-balanced (Cui et al. 2019): w_j = (1 − β) / (1 − β^{n_j}) (inverse effective number
  of samples), normalized so Σ_j w_j = K (their code: `weights / np.sum(weights) * K`);
  `cb_ce` ℓ_i = w_{y_i}·CE, batch loss Σ_i w_{y_i} ℓ_i / B (Cui's softmax branch).
* `cb_focal` is Cui et al.'s class-balanced focal loss, the sigmoid (one-vs-all) form their
  paper defines and their code trains (`focal_loss` in src/cifar_main.py): one-hot targets
  y_{ik}, per-class BCE ℓ_{ik} = −y log σ(z) − (1 − y) log(1 − σ(z)), modulator
  (1 − p_t)^γ = exp(−γ·y·z − γ·log(1 + e^{−z})), each sample's weight w_{y_i} broadcast over its
  K terms, summed and divided by Σ_{ik} y_{ik} = B. `sigmoid_focal_loss` below.
  `cb_softmax_focal` keeps the softmax form w_{y_i}·focal (divided by B; not a form Cui et al.
  report). As in Cui's model, `cb_focal`'s logits carry a trained last-layer bias initialized to
  −log(K − 1) (`sigmoid_prior_bias` at π = 1/K), so every σ(z_ik) starts at 1/K.
* LDAM (Cao et al. 2019): logits s·cos(f, w_k) (normalized features and weights),
  margin m_j = C · n_j^{−1/4} / max_k n_k^{−1/4} (largest margin C) subtracted from the
  target logit before the scale: ℓ_i = CE(s·(cos_i − m_{y_i}·e_{y_i}), y_i).
* DRW (Cao et al.): no weights before the deferral epoch (plain batch mean), the
  class-balanced weights (β = 0.9999, Σ w = K) from it on, and then the batch loss is
  Σ_i w_{y_i} ℓ_i / Σ_i w_{y_i} (Algorithm 1 lines 10–11; their code
  `F.cross_entropy(..., weight=per_cls_weights)`), not Cui's / B.
* logit-adjusted / Balanced Softmax (Menon et al. 2021 / Ren et al. 2020): CE on
  z + τ·log π with π_j = n_j / Σ n (τ = 1: Balanced Softmax). The head serves it through
  the reference kernel's `bias=` flag, a fixed additive bias (so the fused head does too);
  prediction uses the plain logits.

Two normalizations of a class-weighted batch, each as its authors wrote it: Cui et al.
(`cb_ce`, `cb_focal`; `cb_softmax_focal` follows them) divide Σ_i w_{y_i} ℓ_i by B; Cao et
al. (`ldam_drw`) divide it by Σ_i w_{y_i}.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

RARE_PRIOR = 0.01  # Lin et al.'s π of the sigmoid focal loss's bias initialization
FOCAL_ALPHA = 0.25  # Lin et al.'s α of the sigmoid focal loss (the label class; 1 − α for the others)


def _counts(class_counts: Tensor | np.ndarray | list, dtype: torch.dtype = torch.float64) -> Tensor:
    counts = torch.as_tensor(np.asarray(class_counts), dtype=dtype)
    if counts.ndim != 1 or (counts <= 0).any():
        raise ValueError(f"class counts must be a 1-D list of positive training counts, got {counts.tolist()}")
    return counts


def sigmoid_prior_bias(prior: float) -> float:
    """b = −log((1 − π)/π): the logit bias at which σ(b) = π (Lin et al.'s prior initialization)."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"a sigmoid prior π must be in (0, 1), got {prior}")
    return -math.log((1.0 - prior) / prior)


def log_prior(class_counts: Tensor | np.ndarray | list) -> Tensor:
    """log π_j = log(n_j / Σ_k n_k), float64."""
    counts = _counts(class_counts)
    return torch.log(counts / counts.sum())


def class_balanced_weights(class_counts: Tensor | np.ndarray | list, beta: float) -> Tensor:
    """Cui et al.: w_j ∝ (1 − β)/(1 − β^{n_j}), normalized to Σ_j w_j = K (float64). β = 0: all ones."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"class-balanced β must be in [0, 1), got {beta}")
    counts = _counts(class_counts)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return w * (len(counts) / w.sum())


def ldam_margins(class_counts: Tensor | np.ndarray | list, max_margin: float) -> Tensor:
    """Cao et al.: m_j = C · n_j^{−1/4} / max_k n_k^{−1/4} (the rarest class gets C), float64."""
    if max_margin <= 0:
        raise ValueError(f"LDAM's largest margin C must be > 0, got {max_margin}")
    m = _counts(class_counts) ** -0.25
    return m * (max_margin / m.max())


def drw_weights(class_counts: Tensor | np.ndarray | list, beta: float, epoch: int, drw_epoch: int) -> Tensor:
    """Deferred re-weighting: ones before `drw_epoch` (0-based), class-balanced weights from it on."""
    if epoch < drw_epoch:
        return torch.ones(len(_counts(class_counts)), dtype=torch.float64)
    return class_balanced_weights(class_counts, beta)


def _weighted_mean(per_sample: Tensor, labels: Tensor, weight: Tensor | None) -> Tensor:
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample)[labels]
    return per_sample.mean()


def focal_loss(logits: Tensor, labels: Tensor, gamma: float, weight: Tensor | None = None) -> Tensor:
    """Softmax focal: mean_i w_{y_i}·(−(1 − p_{i,y_i})^γ · log p_{i,y_i}); γ = 0 and no weight is plain CE."""
    if gamma < 0:
        raise ValueError(f"focal γ must be ≥ 0, got {gamma}")
    log_p = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    per_sample = -((1.0 - log_p.exp()).clamp_min(0.0) ** gamma) * log_p
    return _weighted_mean(per_sample, labels, weight)


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """mean_i w_{y_i}·CE(z_i, y_i)."""
    return _weighted_mean(F.cross_entropy(logits, labels, reduction="none"), labels, weight)


def sigmoid_focal_loss(logits: Tensor, labels: Tensor, gamma: float, weight: Tensor | None = None,
                       alpha: float | None = None) -> Tensor:
    """Sigmoid focal loss: Σ_{i,k} w_{y_i}·α_t·(1 − p_{t,ik})^γ·BCE(z_ik, y_ik) / B.

    Cui et al.'s class-balanced form takes `weight` and no α; Lin et al.'s α-balanced form takes
    `alpha` (α_t = α where y = 1, 1 − α where y = 0) and no weight.

    y = one-hot(labels); p_t = σ(z) where y = 1, 1 − σ(z) where y = 0. Both factors in
    log-sigmoid form, stable for any z:
        BCE = softplus(z) − y·z                       (= −log p_t)
        (1 − p_t)^γ = exp(−γ·(y·z + softplus(−z)))   (Cui's exp(−γ·y·z − γ·log(1 + e^{−z})))
    The sum is divided by Σ y = B (Cui: "normalize by the total number of positive samples")."""
    if gamma < 0:
        raise ValueError(f"focal γ must be ≥ 0, got {gamma}")
    onehot = F.one_hot(labels, logits.shape[1]).to(logits)
    bce = F.softplus(logits) - onehot * logits
    per_term = bce if gamma == 0 else torch.exp(-gamma * (onehot * logits + F.softplus(-logits))) * bce
    if alpha is not None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"focal α must be in [0, 1], got {alpha}")
        per_term = per_term * (alpha * onehot + (1.0 - alpha) * (1.0 - onehot))
    if weight is not None:
        per_term = per_term * weight.to(logits)[labels][:, None]
    return per_term.sum() / onehot.sum()


def ldam_loss(cosine: Tensor, labels: Tensor, margins: Tensor, scale: float, weight: Tensor | None = None) -> Tensor:
    """CE(s·(cos_i − m_{y_i} e_{y_i}), y_i) with cos the normalized logits: the plain batch mean without
    `weight`, Σ_i w_{y_i} ℓ_i / Σ_i w_{y_i} with it (Cao et al.'s DRW phase, `F.cross_entropy(weight=)`)."""
    onehot = F.one_hot(labels, cosine.shape[1]).to(cosine)
    logits = scale * (cosine - onehot * margins.to(cosine)[None, :])
    return F.cross_entropy(logits, labels, weight=None if weight is None else weight.to(logits))
