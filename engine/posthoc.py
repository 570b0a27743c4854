"""Post-hoc calibration of a trained model, without retraining the backbone: pure functions.

The formulas take tensors, the searches take collected features and return rows; nothing here
reads or writes files (the commands are engine/experiments/checkpoints.py).

Every method is chosen on the validation split and reported on the test split.
Backbone features are collected once per split (backbone in eval mode) and re-used.

Sweeps of one parameter (the value with the best val top-1 is chosen; ties: the smaller):

* ``rs``           WVN paper Eq. 7: w_k ← (n_1/n_k)^γ · w_k (`engine rescale` is this method); n_k the
                   observed training counts, or with `rescale.counts=profile` / `--counts profile` the
                   un-rounded profile n_max·IF^(−k/(C−1)) of the official AdjustBnd4Imbalance code.
* ``tau_norm``     Kang et al. 2020: w_k ← w_k / ‖w_k‖^τ, logits w̃·f without the trained bias b (their
                   τ-normalized classifier has none), so on a head with a bias even τ = 0 drops b.
* ``logit_adjust`` Menon et al. 2021 (post-hoc): z_k ← z_k − τ · log π_k, π_k = n_k / Σ n.

With an estimated offset in the head, the re-scaled w also enters õ_k = ½c_k·w_k (RS and tau_norm);
on a cosine head (`ldam_drw`) the row norms cancel, so tau_norm is a no-op there.

Second-stage classifier re-training (Kang et al. 2020), frozen backbone, class-aware sampling:

* ``crt``  re-initializes a linear classifier z = W·f + b (nn.Linear's init) and trains it
  with cross-entropy (SGD, momentum 0.9, weight decay 5e-4, cosine schedule);
* ``lws``  learns one scale s_k per class of the existing classifier (w_k, b_k, õ_k all
  scaled, i.e. z_k ← s_k · z_k), initialized at 1, same optimizer without weight decay.

The backbone stays frozen *and in eval mode* (BatchNorm statistics frozen too), so its
features are a fixed function of the image: both are trained on the training split's
collected features, which is exact and fast. Data augmentation is therefore off during
the second stage (Kang et al. train it with augmentation). Batches are drawn with
`pipelines.samplers.ClassAwareSampler` (Shen et al.; p_k = 1/K) over the feature indices,
one epoch = as many draws as training images. The epoch with the best val top-1 is chosen.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.errors import CalibrationError
from engine.evaluate import Features, scalars
from engine.heads import Head, rescale_factors
from engine.losses import log_prior
from engine.runs import EVAL_SPLITS, LoadedRun, split_features
from pipelines.long_tail import profile_counts
from pipelines.samplers import ClassAwareSampler

SWEEPS = ("rs", "tau_norm", "logit_adjust")
RETRAIN = ("crt", "lws")
CALIBRATIONS = SWEEPS + RETRAIN  # the calibration methods (engine.methods.METHODS are the training methods)
# The one default search space per sweep (START, STOP, STEP inclusive): engine calibrate, rescale, study.
DEFAULT_GRIDS = {"rs": (0.0, 1.0, 0.05), "tau_norm": (0.0, 2.0, 0.1), "logit_adjust": (0.0, 2.0, 0.1)}
PARAM_NAME = {"rs": "gamma", "tau_norm": "tau", "logit_adjust": "tau", "crt": "epoch", "lws": "epoch"}

ReportFn = Callable[[Tensor, Tensor], dict]


# --------------------------------------------------------------------------- formulas


def inclusive_range(start: float, stop: float, step: float) -> list[float]:
    """start, start + step, …, stop (both ends included), rounded against float drift."""
    return [round(start + i * step, 10) for i in range(int(round((stop - start) / step)) + 1)]


def default_values(method: str) -> list[float]:
    return inclusive_range(*DEFAULT_GRIDS[method])


def rs_weight(weight: Tensor, class_counts: np.ndarray, gamma: float) -> Tensor:
    """w_k ← (n_1/n_k)^γ · w_k."""
    return weight * rescale_factors(class_counts, gamma).to(weight)[:, None]


def rs_counts(cfg, class_counts: np.ndarray, counts: str | None = None) -> np.ndarray:
    """The n_k that RS re-scales with: `counts` (default cfg.rescale.counts) = "observed" → the
    training counts; "profile" → the un-rounded profile those counts were built from (float64)."""
    from engine.config import PROFILE_FORMATS, RS_COUNTS

    counts = counts or cfg.rescale.counts
    if counts not in RS_COUNTS:
        raise CalibrationError(f"RS counts must be one of {', '.join(RS_COUNTS)}, got {counts!r}")
    if counts == "observed":
        return np.asarray(class_counts)
    if cfg.data.format not in PROFILE_FORMATS:
        raise CalibrationError(f"RS counts 'profile' need data built by the long-tailed profile (data.format in "
                               f"{', '.join(PROFILE_FORMATS)}), got data.format={cfg.data.format}")
    try:
        return np.asarray(profile_counts(class_counts, cfg.data.imbalance_ratio, cfg.data.imbalance_profile))
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None


def tau_norm_weight(weight: Tensor, tau: float) -> Tensor:
    """w_k ← w_k / ‖w_k‖^τ (τ = 0: unchanged, τ = 1: unit rows)."""
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau)


def logit_adjust(logits: Tensor, class_counts: np.ndarray, tau: float) -> Tensor:
    """z_k ← z_k − τ · log π_k."""
    return logits - tau * log_prior(class_counts).to(logits)


@torch.no_grad()
def calibrated_logits(method: str, head: Head, features: Tensor, value: float, class_counts: np.ndarray) -> Tensor:
    """Logits of the head calibrated by one of SWEEPS at parameter `value` (the head is not changed)."""
    w = head.weight.detach().float().to(features.device)
    if method == "rs":
        return head.logits(features, rs_weight(w, class_counts, value))
    if method == "tau_norm":
        return head.logits(features, tau_norm_weight(w, value), use_bias=False)
    if method == "logit_adjust":
        return logit_adjust(head.logits(features), class_counts, value)
    raise CalibrationError(f"unknown sweep method {method!r}; expected one of {', '.join(SWEEPS)}")


# --------------------------------------------------------------------------- searches (choose on val)


def sweep(values: list[float], logits_fn: Callable[[Features, float], Tensor], feats: dict[str, Features],
          report: ReportFn, name: str = "param") -> tuple[list[dict], dict]:
    """One row per value: full val and test reports. Returns (rows, chosen row)."""
    rows = [{name: v, **{s: report(logits_fn(feats[s], v), feats[s].labels) for s in EVAL_SPLITS}} for v in values]
    return rows, choose_on_val(rows, name)


def choose_on_val(rows: list[dict], name: str) -> dict:
    """The row with the best val top-1; ties go to the smaller parameter (the least change)."""
    if not rows:
        raise CalibrationError("nothing to choose from: the sweep has no values")
    return max(rows, key=lambda r: (r["val"]["top1"], -r[name]))


def class_aware_batches(labels: Tensor, num_classes: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """One epoch of class-aware sampled index batches over the collected training features."""
    sampler = ClassAwareSampler(labels.numpy(), num_classes, seed=seed)
    sampler.set_epoch(epoch)
    order = torch.as_tensor(np.fromiter(iter(sampler), dtype=np.int64))
    return list(order.split(batch_size))


def _second_stage(method: str, head: Head, feats: dict[str, Features], k: int, seed: int):
    """(parameters, weight decay, logits_of(split, idx)) of cRT (a fresh linear classifier) or LWS (scales)."""
    if method == "crt":
        d = feats["train"].features.shape[1]
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(d)  # nn.Linear's init: U(−1/√d, 1/√d) for W and b
        weight = ((torch.rand(k, d, generator=gen) * 2 - 1) * bound).requires_grad_()
        bias = ((torch.rand(k, generator=gen) * 2 - 1) * bound).requires_grad_()

        def crt_logits(split: str, idx: Tensor | None = None) -> Tensor:
            f = feats[split].features if idx is None else feats[split].features[idx]
            return f @ weight.t() + bias

        return [weight, bias], 5e-4, crt_logits
    with torch.no_grad():
        base = {s: head.logits(feats[s].features) for s in feats}  # z of the trained head, fixed
    scales = torch.ones(k, requires_grad=True)

    def lws_logits(split: str, idx: Tensor | None = None) -> Tensor:
        return (base[split] if idx is None else base[split][idx]) * scales

    return [scales], 0.0, lws_logits


def retrain_classifier(method: str, head: Head, feats: dict[str, Features], class_counts: np.ndarray,
                       report: ReportFn, epochs: int = 10, lr: float = 0.1, batch_size: int = 128,
                       seed: int = 0) -> tuple[list, dict, dict]:
    """cRT or LWS on collected features. Returns (rows per epoch, chosen row, learned state)."""
    if method not in RETRAIN:
        raise CalibrationError(f"unknown re-training method {method!r}; expected one of {', '.join(RETRAIN)}")
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise CalibrationError(f"need epochs ≥ 1, lr > 0, batch size ≥ 1; got {epochs}, {lr}, {batch_size}")
    k = len(class_counts)
    params, wd, logits_of = _second_stage(method, head, feats, k, seed)
    labels = feats["train"].labels
    steps = epochs * math.ceil(len(labels) / batch_size)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    rows, states = [], []
    for epoch in range(epochs):
        loss_sum, seen = 0.0, 0
        for idx in class_aware_batches(labels, k, batch_size, seed, epoch):
            loss = F.cross_entropy(logits_of("train", idx), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, seen = loss_sum + loss.item() * len(idx), seen + len(idx)
        with torch.no_grad():
            rows.append({"epoch": epoch + 1, "train_loss": loss_sum / seen,
                         **{s: report(logits_of(s), feats[s].labels) for s in EVAL_SPLITS}})
            states.append([p.detach().clone() for p in params])
    chosen = choose_on_val(rows, "epoch")
    best = states[chosen["epoch"] - 1]
    state = {"weight": best[0], "bias": best[1]} if method == "crt" else {"scales": best[0]}
    return rows, chosen, state


# --------------------------------------------------------------------------- one method on a loaded run


def calibrate(loaded: LoadedRun, method: str, values: list[float] | None = None, epochs: int = 10, lr: float = 0.1,
              batch_size: int = 128, seed: int = 0, feats: dict[str, Features] | None = None,
              rs_count: str | None = None) -> dict:
    """Run one calibration method on a loaded run (the model is left untouched); returns the result dict.

    `feats` (from `split_features`) lets several methods share one pass of the backbone; `rs_count`
    (observed | profile; default cfg.rescale.counts) is the n_k of `rs` (see `rs_counts`)."""
    if method not in CALIBRATIONS:
        raise CalibrationError(f"unknown calibration method {method!r}; expected one of {', '.join(CALIBRATIONS)}")
    if rs_count is not None and method != "rs":
        raise CalibrationError(f"RS counts ({rs_count}) go with method rs, got method {method}")
    if method in ("rs", "tau_norm", "lws", "crt") and loaded.state.get("rescaled_gamma") is not None:
        raise CalibrationError(f"{loaded.checkpoint} already holds a classifier re-scaled with γ = "
                               f"{loaded.state['rescaled_gamma']}; calibrate the original checkpoint instead")
    counts, head, name = loaded.data.class_counts, loaded.model.head, PARAM_NAME[method]
    if feats is None:
        feats = split_features(loaded, EVAL_SPLITS if method in SWEEPS else (*EVAL_SPLITS, "train"))
    with torch.no_grad():
        before = {s: loaded.report(head.logits(feats[s].features), feats[s].labels) for s in EVAL_SPLITS}
    result: dict = {"method": method, "model_method": loaded.cfg.method, "parameter": name, "chosen_by": "val top1"}
    if method in SWEEPS:
        values = default_values(method) if values is None else values
        if any(v < 0 for v in values):
            raise CalibrationError(f"{method}: parameter values must be ≥ 0, got {values}")
        fn_counts = rs_counts(loaded.cfg, counts, rs_count) if method == "rs" else counts
        rows, chosen = sweep(values, lambda f, v: calibrated_logits(method, head, f.features, v, fn_counts), feats,
                             loaded.report, name)
        if method == "rs":
            result["counts"] = rs_count or loaded.cfg.rescale.counts
    else:
        rows, chosen, state = retrain_classifier(method, head, feats, counts, loaded.report, epochs, lr, batch_size,
                                                 seed)
        result.update({"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                       "sampler": "class_aware (on collected features; no data augmentation)",
                       "learned": {k: v.tolist() for k, v in state.items()}})
    result.update({
        "chosen": chosen[name],
        "before": before,
        "val": chosen["val"],
        "test": chosen["test"],
        "rows": [{name: r[name], **({"train_loss": r["train_loss"]} if "train_loss" in r else {}),
                  "val": scalars(r["val"]), "test": scalars(r["test"])} for r in rows],
    })
    return result
