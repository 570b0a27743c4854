"""What a training method is: one registry entry, and the loss settings the methods read.

A method (`method=` in the config) is a `Method`: how the head turns features into logits
(linear w·f, + a trained bias b, − the estimated offset õ, or LDAM's s·cos(f, w)), which
loss it trains with (a key of `engine.heads.LOSSES`), and what it does after each optimizer
step (Wen center update, WVN). `engine.heads.Head(in_features, num_classes, METHODS[name],
loss_cfg, class_counts)` builds the head from it. This module holds data only (no torch),
so the config can check `method=` against the registry without importing the models.

To add a method: write its loss as a function `(head, features, labels) -> loss` in
engine/heads.py's LOSSES (e.g. `_cb_softmax_focal_loss`, which reads `head.class_weight`), then add
one `Method(name, loss=name, paper=...)` entry below; README's method table is `method_table()`
(tests/test_heads.py keeps them equal).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config_rules import key

# When WVN normalizes the classifier rows (loss.wvn_placement): after the optimizer update (the WVN
# paper's Algorithm 1, line 8) or before it (the authors' released code, a backward hook).
WVN_PLACEMENTS = ("after_step", "before_step")


@dataclass
class LossConfig:
    """The `loss.*` section of the config: every loss setting any method reads."""

    lambda_center: float = 1.0  # λ1 (estimated-offset paper fixes λ1 = λ2 = 1)
    lambda_uniform: float = 1.0  # λ2
    center_alpha: float = 0.5  # α of Wen et al.'s center update
    label_smoothing: float = 0.0
    # Baseline losses (engine/losses.py); each is read only by its own method.
    focal_gamma: float = 2.0  # focal, sigmoid_focal, cb_focal, cb_softmax_focal: (1 − p_t)^γ (Lin et al.)
    cb_beta: float = 0.9999  # cb_*, ldam_drw's DRW weights: effective-number β (Cui et al.)
    ldam_max_margin: float = 0.5  # ldam_drw: margin C of the rarest class (Cao et al.)
    ldam_scale: float = 30.0  # ldam_drw: s of the normalized logits
    drw_epoch: int = 0  # ldam_drw: 0-based epoch re-weighting starts (0 = ⌊0.8·epochs⌋, Cao's 160 of 200)
    logit_adjust_tau: float = 1.0  # logit_adjusted: τ of z + τ·log π (balanced_softmax: τ = 1)
    wvn_placement: str = key("after_step", choices=WVN_PLACEMENTS,
                             help="wvn: unit rows after the update (Algorithm 1) or before it (authors' code)")


@dataclass(frozen=True)
class Method:
    """One training method: logit transform + loss + after-step flags."""

    name: str
    # logit transform
    bias: bool = False  # trained per-class bias added to the logits
    # its initial value: "zero", or a sigmoid prior b_k = −log((1 − π)/π): "uniform_prior" π = 1/K
    # (b = −log(K − 1), Cui et al.'s code for their sigmoid losses), "rare_prior" π = 0.01 (Lin et al.)
    bias_init: str = "zero"
    offset: bool = False  # estimated offset õ_k = ½c_k·w_k subtracted from the logits
    cosine: bool = False  # logits s·cos(f, w) (LDAM's normalized classifier)
    # loss: a key of engine.heads.LOSSES ("offset" = kernels.offset_head_loss with the flags below)
    loss: str = "offset"
    prior_tau: float | None = None  # logit_adjusted: fixed τ of the log-prior bias (None = loss.logit_adjust_tau)
    # loss terms and after-step work
    center: bool = False  # λ1 center loss + Wen center update after every step
    uniform: bool = False  # λ2 uniform constraint on the estimated offset
    wvn: bool = False  # unit-norm weight vectors after every step (+ in-loop RS when rescale.in_loop)
    paper: str = ""  # where it comes from (README's method table)


_ALL = (
    Method("ce", paper="baseline (no offset)"),
    Method("ce_bias", bias=True, paper="baseline with trained bias (EO Fig. 1b)"),
    Method("eo", offset=True, center=True, paper='EO "Ours w/o UC"'),
    Method("uc_only", center=True, uniform=True, paper='EO "UC only"'),
    Method("eo_uc", offset=True, center=True, uniform=True, paper='EO "Ours" (default)'),
    Method("wvn", wvn=True, paper="Kim & Kim 2020 (WVN), Algorithm 1"),
    Method("focal", loss="focal", paper="Cao et al. 2019 (LDAM-DRW code's softmax focal)"),
    Method("sigmoid_focal", loss="sigmoid_focal", bias=True, bias_init="rare_prior", paper="Lin et al. 2017"),
    Method("cb_ce", loss="cb_ce", paper="Cui et al. 2019"),
    Method("cb_focal", loss="cb_focal", bias=True, bias_init="uniform_prior",
           paper="Cui et al. 2019 (their sigmoid form)"),
    Method("cb_softmax_focal", loss="cb_softmax_focal",
           paper="Cui et al. 2019's weights × Cao et al.'s softmax focal (a combination neither reports)"),
    Method("ldam_drw", loss="ldam_drw", cosine=True, paper="Cao et al. 2019 (LDAM + DRW, Algorithm 1)"),
    Method("balanced_softmax", loss="logit_adjusted", prior_tau=1.0, paper="Ren et al. 2020"),
    Method("logit_adjusted", loss="logit_adjusted", paper="Menon et al. 2021"),
)
METHODS: dict[str, Method] = {m.name: m for m in _ALL}

# The loss column of the method table for the losses that are not the offset head's.
LOSS_TEXT = {
    "focal": "softmax focal, γ = `loss.focal_gamma`",
    "sigmoid_focal": "α-balanced sigmoid (one-vs-all) focal, α = 0.25, γ = `loss.focal_gamma`, Σ/B",
    "cb_ce": "class-balanced CE, β = `loss.cb_beta`, Σ/B",
    "cb_focal": "class-balanced sigmoid (one-vs-all) focal, Σ/B",
    "cb_softmax_focal": "class-balanced softmax focal, Σ/B",
    "ldam_drw": "LDAM + DRW from `loss.drw_epoch`, Σ w_y ℓ / Σ w_y",
    "logit_adjusted": "CE on `w·f + τ·log π`",
}


# The initial bias of the sigmoid methods, for the method table.
BIAS_INIT_TEXT = {"zero": "", "uniform_prior": ", b₀ = −log(K − 1)", "rare_prior": ", b₀ = −log(99)"}


def logits_text(m: Method) -> str:
    if m.cosine:
        return "`s·cos(f, w)`"
    return "`w·f" + (" + b" if m.bias else "") + (" − õ" if m.offset else "") + "`" + BIAS_INIT_TEXT[m.bias_init]


def loss_text(m: Method) -> str:
    if m.loss != "offset":
        text = LOSS_TEXT[m.loss]
        if m.loss == "logit_adjusted":
            text += ", τ = 1" if m.prior_tau is not None else ", τ = `loss.logit_adjust_tau`"
        return text
    return "CE" + (" + λ1·center" if m.center else "") + (" + λ2·UC(õ)" if m.uniform else "")


def after_step_text(m: Method) -> str:
    steps = (["Wen center update"] if m.center else []) + (
        ["`‖w_k‖ = 1` (+ RS if `rescale.in_loop=true`), after or before the update: `loss.wvn_placement`"]
        if m.wvn else [])
    return ", ".join(steps) or "–"


def method_table() -> str:
    """README's method table, generated from METHODS."""
    lines = ["| method | logits | loss | after each step | paper |", "|---|---|---|---|---|"]
    lines += [f"| `{name}` | {logits_text(m)} | {loss_text(m)} | {after_step_text(m)} | {m.paper} |"
              for name, m in METHODS.items()]
    return "\n".join(lines)
