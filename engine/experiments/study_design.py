"""What `engine study` compares: the trained methods, the post-hoc rows, their labels, and the recipe."""

from __future__ import annotations

TRAINED = ("ce", "ce_bias", "eo", "uc_only", "eo_uc", "wvn")
# row key → (checkpoint method it is computed on, engine.posthoc calibration method)
POSTHOC = {
    "ce_rs": ("ce", "rs"),
    "wvn_rs": ("wvn", "rs"),
    "tau_norm": ("ce", "tau_norm"),
    "logit_adjust": ("ce", "logit_adjust"),
    "crt": ("ce", "crt"),
}
ROWS = TRAINED + tuple(POSTHOC)
LABELS = {
    "ce": "Baseline (CE)",
    "ce_bias": "CE + trained bias",
    "uc_only": "UC only",
    "eo": "EO (Ours w/o UC)",
    "eo_uc": "EO+UC (Ours)",
    "wvn": "WVN",
    "ce_rs": "Baseline+RS",
    "wvn_rs": "WVN+RS",
    "tau_norm": "τ-norm (on CE)",
    "logit_adjust": "Logit adjustment (on CE)",
    "crt": "cRT (on CE)",
}
TABLE_ORDER = ("ce", "ce_bias", "uc_only", "eo", "eo_uc", "wvn", "ce_rs", "wvn_rs", "tau_norm", "logit_adjust", "crt")
CRT = {"epochs": 10, "lr": 0.1, "batch_size": 128}  # cRT settings (engine calibrate's defaults)
R_MIN = 0.5  # claim (a): "tracks" = mean Pearson r(bias, log n_k) ≥ R_MIN

# The study's training recipe (chosen to fit 2 CPU cores in ≤ 30 min; see README / docs/study).
DEFAULT_ARCH = "resnet8_cifar"
DEFAULT_IMAGE_SIZE = {"digits_lt": 16, "cifar10_lt": 32, "cifar100_lt": 32}
DEFAULT_EPOCHS = 30
DEFAULT_BATCH = {"digits_lt": 32, "cifar10_lt": 128, "cifar100_lt": 128}
PRESETS = {"digits_lt": "digits-lt", "cifar10_lt": "cifar10-lt-resnet32", "cifar100_lt": "cifar100-lt-resnet32"}
GRID_KEYS = ("method", "seed", "data.imbalance_ratio", "data.imbalance_profile", "data.format", "data.root")

# --------------------------------------------------------------------------- `engine study --suite baselines`

SUITES = ("ablation", "baselines", "order")
# The baselines table's trained methods (engine.methods.METHODS; ce_bias is the ablation's, not a baseline).
BASELINE_TRAINED = ("ce", "focal", "sigmoid_focal", "cb_ce", "cb_focal", "cb_softmax_focal", "ldam_drw",
                    "balanced_softmax", "logit_adjusted", "wvn", "eo", "uc_only", "eo_uc")
# Each method's main hyper-parameters, config key → values; every combination is trained and the one with
# the best mean val top-1 over seeds is reported (ties: the earlier point). An empty grid: the preset's values.
_LAMBDA_1 = (0.01, 0.1, 1.0)
BASELINE_GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "ce": {},
    "focal": {"loss.focal_gamma": (0.5, 1.0, 2.0)},
    "sigmoid_focal": {"loss.focal_gamma": (0.5, 1.0, 2.0)},
    "cb_ce": {"loss.cb_beta": (0.9, 0.99, 0.999, 0.9999)},
    "cb_focal": {"loss.cb_beta": (0.9, 0.99, 0.999, 0.9999)},
    "cb_softmax_focal": {"loss.cb_beta": (0.9, 0.99, 0.999, 0.9999)},
    "ldam_drw": {"loss.ldam_max_margin": (0.3, 0.5), "loss.drw_epoch": (0.6, 0.8)},
    "balanced_softmax": {},
    "logit_adjusted": {"loss.logit_adjust_tau": (0.5, 1.0, 1.5)},
    "wvn": {},
    "eo": {"loss.lambda_center": _LAMBDA_1},
    "uc_only": {"loss.lambda_center": _LAMBDA_1, "loss.lambda_uniform": (0.1, 1.0)},
    "eo_uc": {"loss.lambda_center": _LAMBDA_1, "loss.lambda_uniform": (0.1, 1.0)},
}
# Grid keys whose values are fractions of the run's epochs (the run gets ⌊value · epochs⌋).
EPOCH_FRACTION_KEYS = ("loss.drw_epoch",)
# Post-hoc rows: row key → (trained method whose checkpoint it calibrates, engine.posthoc calibration);
# each parameter (RS γ, τ, the cRT/LWS epoch) is swept and chosen per seed on val by engine.posthoc.
BASELINE_POSTHOC = {
    "ce_rs": ("ce", "rs"),
    "wvn_rs": ("wvn", "rs"),
    "tau_norm": ("ce", "tau_norm"),
    "crt": ("ce", "crt"),
    "lws": ("ce", "lws"),
    "logit_adjust": ("ce", "logit_adjust"),
}
BASELINE_ROWS = BASELINE_TRAINED + tuple(BASELINE_POSTHOC)
BASELINE_LABELS = {
    **{m: m for m in BASELINE_TRAINED},
    "ce": "CE", "wvn": "WVN", "eo": "EO (w/o UC)", "uc_only": "UC only", "eo_uc": "EO+UC",
    "ce_rs": "CE + RS", "wvn_rs": "WVN + RS", "tau_norm": "τ-norm (on CE)", "crt": "cRT (on CE)",
    "lws": "LWS (on CE)", "logit_adjust": "post-hoc logit adjustment (on CE)",
}
EO_FAMILY = ("eo", "uc_only", "eo_uc")  # not baselines: EO+UC is compared with the best of the others
OURS = "eo_uc"
BASELINE_SPLITS = ("exp-if50", "exp-if100", "step-if10")

# --------------------------------------------------------------------------- `engine study --suite order`

# The ablation order (EO Table 3: EO+UC > EO > UC only > CE) across scale. One factor moves at a time from
# the recipe's point (ORDER_BASE on top of the study recipe); every level trains every ORDER_METHOD per seed.
ORDER_METHODS = ("ce", "eo", "uc_only", "eo_uc")
PAPER_ORDER = ("eo_uc", "eo", "uc_only", "ce")  # EO paper Table 3, best first
ORDER_BASE = {"data.imbalance_profile": "exp", "data.imbalance_ratio": 50.0, "data.n_max": 100,
              "model.arch": DEFAULT_ARCH, "model.cifar_widths": [16, 32, 64], "loss.lambda_center": 0.01}
# axis → (config key, levels); the recipe's level is one of them. Digits-LT has ≈ 108 training images per
# class, so n_max stops at 100; at IF 50 the rarest class keeps ⌊n_max / 50⌋ images.
ORDER_AXES: dict[str, tuple[str, tuple]] = {
    "depth": ("model.arch", ("resnet8_cifar", "resnet20_cifar", "resnet32_cifar")),
    "width": ("model.cifar_widths", ([8, 16, 32], [16, 32, 64], [32, 64, 128])),
    "feature dim": ("model.cifar_widths", ([16, 32, 16], [16, 32, 64], [16, 32, 256])),
    "data size": ("data.n_max", (50, 75, 100)),
    "imbalance": ("data.imbalance_ratio", (10.0, 50.0, 100.0)),
    "λ1": ("loss.lambda_center", (0.001, 0.01, 0.1, 1.0)),
}
