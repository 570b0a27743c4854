"""Plain-PyTorch reference for the classifier head losses of both papers.

This file is the definition every faster implementation must match (the fused
Triton head is tested and benchmarked against it). It is written for clarity,
not speed: it materialises the full (B, K) logits.

Notation (estimated-offset paper, Eq. 6):
    f_i   features of sample i                      (B, d)
    w_k   classifier weight vector of class k       (K, d)
    c_k   learnable class center of class k         (K, d)
    õ_k = ½ c_k·w_k                                 estimated offset (K,)
    z_ik = w_k·f_i − õ_k (+ b_k)                    logits
    L = mean_i CE(z_i, y_i)
        + λ1 · mean_i ‖f_i − c_{y_i}‖²              center loss (Wen et al.)
        + λ2 · (−H(softmax(−õ)))                     uniform constraint, Eq. 5

The same function serves every head of the engine through flags:
    use_offset=False          no estimated offset in the logits (CE baseline, UC-only)
    lambda_center=0           no center term
    lambda_uniform=0          no uniform constraint
    bias=(K,) tensor          additive per-class logit bias (trained bias of `ce_bias`,
                              or a fixed log-prior for logit-adjusted losses)
    label_smoothing=ε         smoothed cross-entropy targets
    center_grad=False         centers are treated as constants (the training protocol:
                              they move only by Wen's update, see `wen_center_update`)

All arithmetic happens in float32 (or float64 when the inputs are float64),
whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, float32 otherwise (bf16/fp16 accumulate in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def estimated_offset(weight: Tensor, centers: Tensor) -> Tensor:
    """õ_k = ½ c_k·w_k for every class, shape (K,)."""
    return 0.5 * (centers * weight).sum(dim=1)


def empirical_offset(weight: Tensor, class_means: Tensor) -> Tensor:
    """w0_k^emp = ½ μ̃_k·w_k with μ̃_k the mean training feature of class k (diagnostic, EO Fig. 1c/3)."""
    return 0.5 * (class_means * weight).sum(dim=1)


def uniform_constraint(offset: Tensor) -> Tensor:
    """−H(softmax(−o)) = Σ_k p_k log p_k with p = softmax(−o). Minimal (−log K) when o is constant."""
    log_p = F.log_softmax(-offset, dim=0)
    return (log_p.exp() * log_p).sum()


def head_logits(
    features: Tensor,
    weight: Tensor,
    centers: Tensor | None = None,
    bias: Tensor | None = None,
    use_offset: bool = True,
) -> Tensor:
    """z_ik = w_k·f_i − õ_k (+ b_k): the logits the head predicts with (train and test)."""
    logits = features @ weight.t()
    if use_offset:
        if centers is None:
            raise ValueError("use_offset=True needs centers (K, d); received None")
        logits = logits - estimated_offset(weight, centers)
    if bias is not None:
        logits = logits + bias
    return logits


def offset_head_loss(
    features: Tensor,
    weight: Tensor,
    centers: Tensor,
    labels: Tensor,
    lambda_center: float = 1.0,
    lambda_uniform: float = 1.0,
    *,
    use_offset: bool = True,
    bias: Tensor | None = None,
    label_smoothing: float = 0.0,
    center_grad: bool = True,
) -> Tensor:
    """Scalar loss of Eq. 6 (estimated-offset paper), mean over the batch.

    Differentiable in features, weight, centers (and bias) with the exact
    gradients of the formula. With `center_grad=False` the centers are
    constants: the offset and center terms still shape w and f, but c gets no
    gradient (the training protocol moves c only by `wen_center_update`).
    """
    with torch.autocast(features.device.type, enabled=False):  # the math stays in fp32 under autocast
        return _offset_head_loss(
            features, weight, centers, labels, lambda_center, lambda_uniform,
            use_offset, bias, label_smoothing, center_grad,
        )


def _offset_head_loss(
    features, weight, centers, labels, lambda_center, lambda_uniform, use_offset, bias, label_smoothing, center_grad
) -> Tensor:
    dtype = _compute_dtype(features, weight, centers, bias)
    f = features.to(dtype)
    w = weight.to(dtype)
    c = centers.to(dtype)
    if not center_grad:
        c = c.detach()
    b = bias.to(dtype) if bias is not None else None

    logits = head_logits(f, w, c, b, use_offset=use_offset)
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if lambda_center:
        loss = loss + lambda_center * (f - c[labels]).pow(2).sum(dim=1).mean()
    if lambda_uniform:
        loss = loss + lambda_uniform * uniform_constraint(estimated_offset(w, c))
    return loss


@torch.no_grad()
def class_feature_sums(features: Tensor, labels: Tensor, num_classes: int,
                       out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Per-class sums Σ_{i: y_i=j} f_i (K, d) and counts n_j (K,) of one batch, in float32;
    with `out` = (sums, counts) they are added into those running float32 tensors instead.

    No host sync (no bincount, nonzero or .item()), so it can run inside a CUDA graph and never
    stalls the training step. Deterministic: on CUDA index_add_ accumulates with atomics (the order,
    and so the rounding, varies run to run), so the sums go through index_put_(accumulate=True),
    which sorts the indices first; DDP ranks summing the same gathered rows then agree bit for bit.
    On the CPU index_add_ is sequential (and is what the engine's recorded runs used)."""
    f = features.detach().float()
    if out is None:
        out = (torch.zeros(num_classes, f.shape[1], dtype=f.dtype, device=f.device),
               torch.zeros(num_classes, dtype=f.dtype, device=f.device))
    sums, counts = out
    if f.is_cuda:
        sums.index_put_((labels,), f, accumulate=True)
    else:
        sums.index_add_(0, labels, f)
    counts.index_add_(0, labels, torch.ones(labels.shape[0], dtype=f.dtype, device=f.device))
    return sums, counts


@torch.no_grad()
def wen_center_update(centers: Tensor, sums: Tensor, counts: Tensor, alpha: float = 0.5) -> None:
    """Wen et al.'s center update, in place:  c_j ← c_j − α·Σ_{i: y_i=j}(c_j − f_i) / (1 + n_j).

    Σ_{i: y_i=j}(c_j − f_i) = n_j·c_j − S_j with S_j the batch's feature sum of class j,
    so class j moves the fraction α·n_j/(1+n_j) of the way to its batch mean: the step
    is normalized by the class's own count, not by the batch size, so a rare class's
    center moves as fast as a frequent one's whenever it appears (a plain gradient step
    on the batch-mean center loss would move it ∝ n_j/B). Absent classes (n_j = 0) stay.
    """
    delta = (counts[:, None] * centers.float() - sums) / (1.0 + counts[:, None])
    centers.sub_((alpha * delta).to(centers.dtype))


@torch.no_grad()
def wen_center_update_from_batch(
    centers: Tensor, features: Tensor, labels: Tensor, alpha: float = 0.5, counts: Tensor | None = None
) -> None:
    """`wen_center_update` computed per sample, in place, with no (K, d) temporary and no host sync:

        c_j ← c_j + α Σ_{i: y_i=j} (f_i − c_j) / (1 + n_j)      (= c_j − α (n_j c_j − S_j)/(1 + n_j))

    Every sample's step uses the *old* c_{y_i} (gathered before the scatter-add), so the result
    equals the dense update up to float summation order. Traffic O(B·d + K) instead of O(K·d):
    the form to use at large K on one process (under DDP the dense sums/counts are what the ranks
    all-reduce). `counts` (K,) may be given (e.g. the fused head's); otherwise it is counted here."""
    f = features.detach().float()
    if counts is None:
        counts = torch.zeros(centers.shape[0], dtype=f.dtype, device=f.device)
        counts.index_add_(0, labels, torch.ones(labels.shape[0], dtype=f.dtype, device=f.device))
    step = alpha * (f - centers[labels].float()) / (1.0 + counts[labels].float())[:, None]
    centers.index_add_(0, labels, step.to(centers.dtype))
