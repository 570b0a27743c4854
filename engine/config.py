"""One typed config tree, YAML presets, dotted command-line overrides.

Resolution order: dataclass defaults → preset (`engine/configs/NAME.yaml`) →
`--config FILE` → `key=value` overrides. Every layer is checked against the
dataclasses: unknown keys and wrong types are rejected with the key, the value
received and what was expected. The resolved tree is saved with every run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "digits-lt"
FORMATS = ("digits_lt", "split_files", "inat", "image_folder", "cifar10_lt", "cifar100_lt")
SAMPLERS = ("instance", "class_aware", "sqrt", "progressive")
AUTO_ON_OFF = ("auto", "on", "off")
PROFILE_FORMATS = ("digits_lt", "cifar10_lt", "cifar100_lt")  # built by pipelines.long_tail's profile
RS_COUNTS = ("observed", "profile")


class ConfigError(ValueError):
    """A config key, type or value that cannot be used; the message says which and why."""


@dataclass
class DataConfig:
    # digits_lt (the embedded default) | split_files (ImageNet-LT / Places-LT) | inat | image_folder
    # | cifar10_lt | cifar100_lt   (see engine/data.py)
    format: str = "digits_lt"
    root: str = ""  # your data: image root (split_files, inat), CIFAR pickles folder (cifar*_lt)
    cache_dir: str = ""  # where digits_lt / cifar*_lt images are written once ("" = ~/.cache/lt-engine)
    train_split: str = ""  # split file / json / folder, relative to `root` or absolute
    val_split: str = ""
    test_split: str = ""  # "" = the validation split
    num_classes: int = 0  # split_files: 0 = one more than the largest training label
    # Long-tailed construction of digits_lt (Cui et al. 2019, as CIFAR-LT):
    # exp: n_i = int(n_max · IF^(−i/(C−1)));  step: n_max for the first half, int(n_max / IF) after.
    imbalance_ratio: float = 50.0
    imbalance_profile: str = "exp"
    n_max: int = 100
    val_per_class: int = 20  # balanced held-out validation split
    test_per_class: int = 50  # balanced held-out test split
    # Sampling: instance | class_aware | sqrt | progressive (pipelines/samplers.py)
    sampler: str = "instance"
    sampler_epoch_length: int = 0  # images per epoch (0 = the training split's size)
    samples_per_class: int = 1  # class_aware: consecutive draws per visited class
    # Input pipeline: loader auto = DALI on GPU when importable, torchvision otherwise
    loader: str = "auto"  # auto | dali | torchvision
    augment: str = "pad_crop"  # pad_crop (CIFAR: pad + random crop) | random_resized_crop (ImageNet)
    image_size: int = 32
    resize_size: int = 0  # eval resize before the center crop (0 = image_size·256/224 for random_resized_crop)
    crop_padding: int = 4  # pad_crop: zero padding of the random crop (0 = off)
    hflip: bool = True
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_workers: int = 0


@dataclass
class ModelConfig:
    arch: str = "resnet32_cifar"
    pretrained: str = ""  # local torchvision/timm-style state_dict for the backbone ("" = random init)


@dataclass
class LossConfig:
    lambda_center: float = 1.0  # λ1 (estimated-offset paper fixes λ1 = λ2 = 1)
    lambda_uniform: float = 1.0  # λ2
    center_alpha: float = 0.5  # α of Wen et al.'s center update
    label_smoothing: float = 0.0
    # Baseline losses (engine/losses.py); each is read only by its own method.
    focal_gamma: float = 2.0  # focal, cb_focal, cb_softmax_focal: (1 − p_t)^γ (Lin et al.)
    cb_beta: float = 0.9999  # cb_*, ldam_drw's DRW weights: effective-number β (Cui et al.)
    ldam_max_margin: float = 0.5  # ldam_drw: margin C of the rarest class (Cao et al.)
    ldam_scale: float = 30.0  # ldam_drw: s of the normalized logits
    drw_epoch: int = 0  # ldam_drw: 0-based epoch re-weighting starts (0 = ⌊0.8·epochs⌋, Cao's 160 of 200)
    logit_adjust_tau: float = 1.0  # logit_adjusted: τ of z + τ·log π (balanced_softmax: τ = 1)


@dataclass
class OptimConfig:
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"  # "cosine" | "multistep"
    warmup_epochs: int = 0
    milestones: list[int] = field(default_factory=list)  # multistep: epochs where lr ×= lr_decay
    lr_decay: float = 0.1
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is the global batch per step)
    fused: str = "auto"  # auto (on for CUDA) | on | off: torch.optim.SGD(fused=True)


@dataclass
class RescaleConfig:
    # Algorithm 1 of the adjusting-decision-boundary paper: after every step, WVN then
    # w_i ← (n_1/n_i)^γ · w_i. Needs method=wvn. Post-hoc RS is `engine rescale`.
    in_loop: bool = False
    gamma: float = 0.0
    # n_i of post-hoc RS (`engine rescale`, `engine calibrate --method rs`): observed = the training
    # counts; profile = the un-rounded n_max·IF^(−i/(C−1)) the official AdjustBnd4Imbalance code uses
    # (data built by the profile: digits_lt, cifar10_lt, cifar100_lt).
    counts: str = "observed"


@dataclass
class EvalConfig:
    # many: n_train > many_threshold; few: n_train < few_threshold; medium: the rest.
    many_threshold: int = 100  # ImageNet-LT's split
    few_threshold: int = 20
    every: int = 1  # evaluate on the validation split every N epochs
    batch_size: int = 256
    diagnostics: bool = True  # end-of-run pass over the training split for the empirical offset


@dataclass
class RunConfig:
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    # Speed switches; "auto" = on for CUDA, off on CPU (bf16 autocast is ~15× slower on CPU).
    amp: str = "auto"  # auto (bf16 on CUDA) | off | bf16 | fp16 (with GradScaler)
    channels_last: str = "auto"  # auto | on | off
    compile: str = "auto"  # auto | on | off: torch.compile of the model (fused head stays in the graph)
    cudnn_benchmark: bool = True
    checkpoint_every: int = 0  # also write last.pt every N optimizer steps (0 = end of each epoch only)
    tensorboard: bool = False  # TensorBoard scalars under <run>/tb (needs the tensorboard package)
    progress: bool = True
    threads: int = 0  # torch CPU threads (0 = torch's default)


@dataclass
class Config:
    # ce | ce_bias | eo | uc_only | eo_uc | wvn | focal | cb_ce | cb_focal | cb_softmax_focal | ldam_drw
    # | balanced_softmax | logit_adjusted  (see engine/heads.py)
    method: str = "eo_uc"
    seed: int = 0
    epochs: int = 30
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rescale: RescaleConfig = field(default_factory=RescaleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------- merging


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"config key '{key}': union types are not supported")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare on/off (yes/no) as a boolean
            return "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported field type {tp}")


def _merge(node: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested dict of updates onto a dataclass instance, rejecting unknown keys."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' expects a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(node))
    names = [f.name for f in dataclasses.fields(node)]
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (expected one of: {', '.join(names)})")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, prefix=f"{dotted}.")
        else:
            setattr(node, key, _coerce(dotted, value, hints[key]))


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def parse_override(text: str) -> dict:
    """`optim.lr=0.05` → {'optim': {'lr': 0.05}}; the value is parsed as YAML (safe loader)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return _nest(key, value)


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(
    preset: str | None = DEFAULT_PRESET,
    config_file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
) -> Config:
    """Resolve defaults → preset → config file → overrides, then validate values."""
    cfg = Config()
    if preset:
        path = CONFIG_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset '{preset}' (available: {', '.join(available_presets())})")
        _merge(cfg, _read_yaml(path))
    if config_file:
        _merge(cfg, _read_yaml(Path(config_file)))
    for text in overrides:
        _merge(cfg, parse_override(text))
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from its saved dict form (checkpoints, config.yaml)."""
    cfg = Config()
    _merge(cfg, data)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------- values


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {expected}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    from engine.heads import METHODS  # local import: heads imports nothing from config
    from engine.models import ARCHS

    _check(cfg.method in METHODS, "method", cfg.method, f"one of {', '.join(METHODS)}")
    _check(cfg.epochs >= 1, "epochs", cfg.epochs, "an integer ≥ 1")
    d = cfg.data
    _check(d.format in FORMATS, "data.format", d.format, f"one of {', '.join(FORMATS)}")
    _check(d.sampler in SAMPLERS, "data.sampler", d.sampler, f"one of {', '.join(SAMPLERS)}")
    _check(d.sampler_epoch_length >= 0, "data.sampler_epoch_length", d.sampler_epoch_length, "an integer ≥ 0")
    _check(d.samples_per_class >= 1, "data.samples_per_class", d.samples_per_class, "an integer ≥ 1")
    _check(d.loader in ("auto", "dali", "torchvision"), "data.loader", d.loader, "'auto', 'dali' or 'torchvision'")
    _check(d.augment in ("pad_crop", "random_resized_crop"), "data.augment", d.augment,
           "'pad_crop' or 'random_resized_crop'")
    _check(d.resize_size == 0 or d.resize_size >= d.image_size, "data.resize_size", d.resize_size,
           f"0 or ≥ data.image_size ({d.image_size})")
    _check(d.imbalance_profile in ("exp", "step"), "data.imbalance_profile", d.imbalance_profile, "'exp' or 'step'")
    _check(d.imbalance_ratio >= 1, "data.imbalance_ratio", d.imbalance_ratio, "a number ≥ 1")
    _check(d.n_max >= 1, "data.n_max", d.n_max, "an integer ≥ 1")
    _check(d.val_per_class >= 1, "data.val_per_class", d.val_per_class, "an integer ≥ 1")
    _check(d.test_per_class >= 1, "data.test_per_class", d.test_per_class, "an integer ≥ 1")
    _check(d.image_size >= 8, "data.image_size", d.image_size, "an integer ≥ 8")
    _check(d.crop_padding >= 0, "data.crop_padding", d.crop_padding, "an integer ≥ 0")
    _check(len(d.mean) == 3 and len(d.std) == 3, "data.mean/std", (d.mean, d.std), "three values each (RGB)")
    _check(all(s > 0 for s in d.std), "data.std", d.std, "positive values")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer ≥ 0")
    _check(d.num_classes >= 0, "data.num_classes", d.num_classes, "an integer ≥ 0 (0 = infer)")
    if d.format != "digits_lt":
        _check(bool(d.root), "data.root", d.root, f"your data folder (data.format={d.format})")
    if d.format in ("split_files", "inat", "image_folder"):
        for key in ("train_split", "val_split"):
            _check(bool(getattr(d, key)), f"data.{key}", getattr(d, key), f"a split path (data.format={d.format})")
    _check(cfg.model.arch in ARCHS, "model.arch", cfg.model.arch, f"one of {', '.join(ARCHS)}")
    lo = cfg.loss
    _check(lo.lambda_center >= 0, "loss.lambda_center", lo.lambda_center, "a number ≥ 0")
    _check(lo.lambda_uniform >= 0, "loss.lambda_uniform", lo.lambda_uniform, "a number ≥ 0")
    _check(0 < lo.center_alpha <= 1, "loss.center_alpha", lo.center_alpha, "a number in (0, 1]")
    _check(0 <= lo.label_smoothing < 1, "loss.label_smoothing", lo.label_smoothing, "a number in [0, 1)")
    _check(lo.label_smoothing == 0 or METHODS[cfg.method].loss in ("offset", "logit_adjusted"),
           "loss.label_smoothing", lo.label_smoothing, f"0 with method={cfg.method} (its loss has no smoothed form here)")
    _check(lo.focal_gamma >= 0, "loss.focal_gamma", lo.focal_gamma, "a number ≥ 0")
    _check(0 <= lo.cb_beta < 1, "loss.cb_beta", lo.cb_beta, "a number in [0, 1)")
    _check(lo.ldam_max_margin > 0, "loss.ldam_max_margin", lo.ldam_max_margin, "a number > 0")
    _check(lo.ldam_scale > 0, "loss.ldam_scale", lo.ldam_scale, "a number > 0")
    _check(0 <= lo.drw_epoch < cfg.epochs, "loss.drw_epoch", lo.drw_epoch, f"0 (auto) or an epoch in [1, {cfg.epochs})")
    o = cfg.optim
    _check(o.batch_size >= 1, "optim.batch_size", o.batch_size, "an integer ≥ 1")
    _check(o.lr > 0, "optim.lr", o.lr, "a number > 0")
    _check(o.schedule in ("cosine", "multistep"), "optim.schedule", o.schedule, "'cosine' or 'multistep'")
    _check(o.grad_accum >= 1, "optim.grad_accum", o.grad_accum, "an integer ≥ 1")
    _check(o.batch_size % o.grad_accum == 0, "optim.batch_size", o.batch_size,
           f"a multiple of optim.grad_accum ({o.grad_accum})")
    _check(o.fused in AUTO_ON_OFF, "optim.fused", o.fused, "'auto', 'on' or 'off'")
    _check(0 <= o.warmup_epochs < cfg.epochs, "optim.warmup_epochs", o.warmup_epochs, f"0 ≤ warmup < epochs ({cfg.epochs})")
    _check(all(0 < m < cfg.epochs for m in o.milestones), "optim.milestones", o.milestones, f"epochs in (0, {cfg.epochs})")
    _check(cfg.rescale.gamma >= 0, "rescale.gamma", cfg.rescale.gamma, "a number ≥ 0")
    if cfg.rescale.in_loop:
        _check(cfg.method == "wvn", "rescale.in_loop", True,
               "method=wvn (Algorithm 1 normalizes the weight vectors before re-scaling them every step)")
    _check(cfg.rescale.counts in RS_COUNTS, "rescale.counts", cfg.rescale.counts, "'observed' or 'profile'")
    if cfg.rescale.counts == "profile":
        _check(d.format in PROFILE_FORMATS, "rescale.counts", "profile",
               f"data.format in {', '.join(PROFILE_FORMATS)} (data built by the profile), got {d.format}")
        _check(not cfg.rescale.in_loop, "rescale.counts", "profile",
               "rescale.in_loop=false (the profile convention is the official code's post-hoc RS)")
    e = cfg.eval
    _check(e.few_threshold <= e.many_threshold + 1, "eval.few_threshold", e.few_threshold,
           f"≤ eval.many_threshold + 1 ({e.many_threshold + 1})")
    _check(e.every >= 1, "eval.every", e.every, "an integer ≥ 1")
    r = cfg.run
    _check(r.device in ("auto", "cpu", "cuda"), "run.device", r.device, "'auto', 'cpu' or 'cuda'")
    _check(r.amp in ("auto", "off", "bf16", "fp16"), "run.amp", r.amp, "'auto', 'off', 'bf16' or 'fp16'")
    _check(r.channels_last in AUTO_ON_OFF, "run.channels_last", r.channels_last, "'auto', 'on' or 'off'")
    _check(r.compile in AUTO_ON_OFF, "run.compile", r.compile, "'auto', 'on' or 'off'")
    _check(r.checkpoint_every >= 0, "run.checkpoint_every", r.checkpoint_every, "an integer ≥ 0")
