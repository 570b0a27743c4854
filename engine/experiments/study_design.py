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
