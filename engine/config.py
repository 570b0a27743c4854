"""One typed config tree, YAML presets, dotted command-line overrides.

Resolution order: dataclass defaults → preset (`engine/configs/NAME.yaml`) →
`--config FILE` → `key=value` overrides. Every layer is checked against the
dataclasses: unknown keys and wrong types are rejected with the key, the value
received and what was expected. The resolved tree is saved with every run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError
from engine.methods import METHODS, LossConfig
from pipelines import formats
from pipelines.long_tail import PROFILES
from pipelines.samplers import SAMPLERS

__all__ = ["Config", "ConfigError", "LossConfig", "load_config", "config_from_dict", "to_dict", "to_yaml"]

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "digits-lt"
# Choice lists: each defined once, next to the code that serves it.
FORMATS = ("digits_lt", *formats.FORMATS)  # digits_lt: pipelines/digits_lt.py; the rest: pipelines/formats.py
AUGMENTS = ("pad_crop", "random_resized_crop")  # pad_crop: CIFAR; random_resized_crop: ImageNet
LOADERS = ("auto", "dali", "torchvision")
SCHEDULES = ("cosine", "multistep")
AMP = ("auto", "off", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
AUTO_ON_OFF = ("auto", "on", "off")
DIAGNOSTICS = ("epoch", "pass", "off")  # eval.diagnostics: engine/train.py `diagnostics`
PROFILE_FORMATS = ("digits_lt", "cifar10_lt", "cifar100_lt")  # built by pipelines.long_tail's profile
SYNC_BN = ("off", "on", "apex")
RS_COUNTS = ("observed", "profile")  # the n_i of RS: training counts, or the un-rounded profile (official code)


class _Loader(yaml.SafeLoader):
    """The safe loader, plus YAML 1.2 floats: PyYAML follows YAML 1.1, where `1e6` and `5e-4` (no dot)
    are strings; ML configs write learning rates and weight decays exactly that way."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(  # tried after YAML 1.1's own int/float resolvers: only exponent forms reach it
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML with the safe loader (no tags that build objects) and YAML 1.2 floats (`1e6`, `-3e-5`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 — _Loader is a SafeLoader subclass


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
    # Untrusted and bad data (pipelines/check.py, pipelines/loader.py, pipelines/dali.py):
    allow_outside_root: bool = False  # accept split paths that leave data.root (`../x`, absolute paths elsewhere)
    on_bad_image: str = "fail"  # fail | skip: a train image that cannot be read is replaced by one of its class
    max_bad_images: float = 0.01  # skip: the run fails once more than this fraction of a split is bad
    exclude_file: str = ""  # one relative image path per line (as `engine data check --decode` writes): dropped
    # before training: decode val/test, open train; auto = on for your data, off for the built-in caches
    verify_images: str = "auto"


@dataclass
class ModelConfig:
    arch: str = "resnet32_cifar"
    pretrained: str = ""  # local torchvision/timm-style state_dict for the backbone ("" = random init)
    # BatchNorm statistics over all ranks under DDP: off | on (torch.nn.SyncBatchNorm) | apex (apex's, if importable)
    sync_bn: str = "off"


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
    # Linear lr scaling (timm's --lr-base-size): 0 = off; else the lr used is lr × batch_size / lr_base_batch
    lr_base_batch: int = 0


@dataclass
class RescaleConfig:
    # Algorithm 1 of the adjusting-decision-boundary paper: after every step, WVN then
    # w_i ← (n_1/n_i)^γ · w_i. Needs method=wvn. Post-hoc RS is `engine rescale`.
    in_loop: bool = False
    gamma: float = 0.0
    # n_i of RS (post hoc and in the loop): observed = the training counts (the formula's definition);
    # profile = the un-rounded n_max·IF^(−i/(C−1)) the official AdjustBnd4Imbalance code uses (CIFAR-LT-style data)
    counts: str = "observed"


@dataclass
class EvalConfig:
    # many: n_train > many_threshold; few: n_train < few_threshold; medium: the rest.
    many_threshold: int = 100  # ImageNet-LT's split
    few_threshold: int = 20
    every: int = 1  # evaluate on the validation split every N epochs
    batch_size: int = 256
    # Empirical offset ½μ̃_k·w_k (metrics.json → diagnostics): epoch = class means of the last training
    # epoch's features (augmented images, moving model; no extra pass) | pass = an extra pass over the
    # training split after training (un-augmented, final model) | off
    diagnostics: str = "epoch"


@dataclass
class RunConfig:
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    # Speed switches; "auto" = on for CUDA, off on CPU (bf16 autocast is ~15× slower on CPU).
    amp: str = "auto"  # auto (bf16 on CUDA) | off | bf16 | fp16 (with GradScaler)
    channels_last: str = "auto"  # auto | on | off
    compile: str = "auto"  # auto | on | off: torch.compile of the model (fused head stays in the graph)
    cudnn_benchmark: bool = True
    # TF32 for fp32 matmuls and convolutions (torch.backends.*.allow_tf32; the fused head follows it): auto = on
    # for CUDA, as timm and NVIDIA's DeepLearningExamples train; off = IEEE fp32
    tf32: str = "auto"
    checkpoint_every: int = 0  # also write last.pt every N optimizer steps (0 = end of each epoch only)
    tensorboard: bool = False  # TensorBoard scalars under <run>/tb (needs the tensorboard package)
    progress: bool = True
    threads: int = 0  # torch CPU threads (0 = torch's default)
    log_every: int = 50  # read the loss to the host (log, NaN and divergence checks) every N optimizer steps
    max_loss: float = 0.0  # divergence guard on the logged loss (0 = auto: 1e4 · ln(num_classes))
    max_steps: int = 0  # stop after N optimizer steps in total, checkpoint, evaluate (0 = run all epochs)
    keep_last: int = 0  # also keep the last N end-of-epoch checkpoints as epoch-XXX.pt (0 = only last.pt)
    save_best: bool = False  # also keep best.pt: the end-of-epoch checkpoint with the best val top-1


@dataclass
class Config:
    # ce | ce_bias | eo | uc_only | eo_uc | wvn | focal | cb_ce | cb_focal | ldam_drw | balanced_softmax
    # | logit_adjusted  (see engine/heads.py)
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
        if isinstance(value, float) and value.is_integer():  # `1e5` steps: written as a float, meant as an int
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' expects a finite number, got {value!r}")
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


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line: the problem and where (its own message spans several lines with carets)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


def parse_override(text: str) -> dict:
    """`optim.lr=0.05` → {'optim': {'lr': 0.05}}; the value is parsed as YAML (safe loader)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({yaml_problem(exc)})") from None
    return _nest(key, value)


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") from None
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


def config_from_dict(data: dict, overrides: typing.Sequence[str] = ()) -> Config:
    """Rebuild a Config from its saved dict form (checkpoints, config.yaml), then apply `overrides`."""
    cfg = Config()
    _merge(cfg, data)
    for text in overrides:
        _merge(cfg, parse_override(text))
    validate(cfg)
    return cfg


# Keys a `--resume` may change: they do not change the model or the optimization, only how the run
# is fed, logged, checkpointed and evaluated. `epochs` may grow (the schedule is recomputed for it).
RESUME_MAY_CHANGE = (
    "epochs", "data.root", "data.cache_dir", "data.num_workers", "data.loader", "data.max_bad_images", "eval.",
    "run.progress", "run.tensorboard", "run.threads", "run.checkpoint_every", "run.log_every", "run.max_loss",
    "run.max_steps", "run.keep_last", "run.save_best",
)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} → {'optim.lr': 0.1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


ABSENT = "(absent)"  # a key one of two configs does not have (written before the key existed)


def config_diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every key whose value differs between two config trees."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(a.keys() | b.keys())
            if a.get(k, ABSENT) != b.get(k, ABSENT)}


def format_diff(diff: dict[str, tuple[Any, Any]], limit: int | None = None) -> str:
    """`key: old → new; …` (the first `limit` keys, then how many more)."""
    items = list(diff.items())
    shown = "; ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if limit is not None and len(items) > limit else "")


def resume_changes(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(changed keys a resume accepts, changed keys it refuses) between a checkpoint's config and `cfg`."""
    diff = config_diff(saved, to_dict(cfg))

    def allowed(key: str) -> bool:
        if key == "epochs":
            old, new = diff[key]
            return old == ABSENT or new >= old
        return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE)

    return [k for k in diff if allowed(k)], [k for k in diff if not allowed(k)]


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------- values


def effective_lr(o: OptimConfig) -> float:
    """The lr the optimizer uses: optim.lr, scaled by batch_size / lr_base_batch when lr_base_batch > 0
    (the linear scaling rule, Goyal et al. 2017; timm's --lr-base-size). batch_size is the global batch."""
    return o.lr * o.batch_size / o.lr_base_batch if o.lr_base_batch else o.lr


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {expected}")


def _one_of(value: Any, choices, key: str) -> None:
    _check(value in choices, key, value, "one of " + ", ".join(map(str, choices)))


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    from engine.models import ARCHS  # local import: keeps `import engine.config` free of the backbones

    _one_of(cfg.method, METHODS, "method")
    _check(cfg.epochs >= 1, "epochs", cfg.epochs, "an integer ≥ 1")
    _check(0 <= cfg.seed < 2**63, "seed", cfg.seed, "an integer in [0, 2^63)")
    _one_of(cfg.model.arch, ARCHS, "model.arch")
    _validate_data(cfg.data)
    _validate_loss(cfg)
    _validate_optim(cfg)
    _validate_rescale(cfg)
    e = cfg.eval
    _check(e.every >= 1, "eval.every", e.every, "an integer ≥ 1")
    _check(e.diagnostics in DIAGNOSTICS, "eval.diagnostics", e.diagnostics,
           "one of epoch (class means of the last training epoch), pass (an extra pass over the training split), "
           "off" + (" — the boolean form is gone: true was `pass`, false is `off`" if e.diagnostics == "on" else ""))
    _check(e.few_threshold >= 0, "eval.few_threshold", e.few_threshold, "an integer ≥ 0")
    _check(e.many_threshold >= 0, "eval.many_threshold", e.many_threshold, "an integer ≥ 0")
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "an integer ≥ 1")
    _check(e.few_threshold <= e.many_threshold + 1, "eval.few_threshold", e.few_threshold,
           f"≤ eval.many_threshold + 1 ({e.many_threshold + 1})")
    r = cfg.run
    _one_of(r.device, DEVICES, "run.device")
    _one_of(r.amp, AMP, "run.amp")
    _one_of(r.channels_last, AUTO_ON_OFF, "run.channels_last")
    _one_of(r.compile, AUTO_ON_OFF, "run.compile")
    _one_of(r.tf32, AUTO_ON_OFF, "run.tf32")
    _check(r.checkpoint_every >= 0, "run.checkpoint_every", r.checkpoint_every, "an integer ≥ 0")
    _check(r.threads >= 0, "run.threads", r.threads, "an integer ≥ 0 (0 = torch's default)")
    _check(r.log_every >= 1, "run.log_every", r.log_every, "an integer ≥ 1")
    _check(r.max_loss >= 0, "run.max_loss", r.max_loss, "a number ≥ 0 (0 = auto: 1e4 · ln(num_classes))")
    _check(r.max_steps >= 0, "run.max_steps", r.max_steps, "an integer ≥ 0 (0 = no limit)")
    _check(r.keep_last >= 0, "run.keep_last", r.keep_last, "an integer ≥ 0 (0 = only last.pt)")
    _one_of(cfg.model.sync_bn, SYNC_BN, "model.sync_bn")


def _validate_rescale(cfg: Config) -> None:
    rs = cfg.rescale
    _check(rs.gamma >= 0, "rescale.gamma", rs.gamma, "a number ≥ 0")
    if rs.in_loop:
        _check(METHODS[cfg.method].wvn, "rescale.in_loop", True,
               "method=wvn (Algorithm 1 normalizes the weight vectors before re-scaling them every step)")
    _one_of(rs.counts, RS_COUNTS, "rescale.counts")
    if rs.counts == "profile":
        _check(cfg.data.format in PROFILE_FORMATS, "rescale.counts", "profile",
               f"data.format in {', '.join(PROFILE_FORMATS)} (data built by the profile), got {cfg.data.format}")
        _check(not rs.in_loop, "rescale.counts", "profile",
               "rescale.in_loop=false (the profile convention is the official code's post-hoc RS)")


def _validate_data(d: DataConfig) -> None:
    _one_of(d.format, FORMATS, "data.format")
    _one_of(d.sampler, SAMPLERS, "data.sampler")
    _check(d.sampler_epoch_length >= 0, "data.sampler_epoch_length", d.sampler_epoch_length, "an integer ≥ 0")
    _check(d.samples_per_class >= 1, "data.samples_per_class", d.samples_per_class, "an integer ≥ 1")
    _one_of(d.loader, LOADERS, "data.loader")
    _one_of(d.augment, AUGMENTS, "data.augment")
    _check(d.resize_size == 0 or d.resize_size >= d.image_size, "data.resize_size", d.resize_size,
           f"0 or ≥ data.image_size ({d.image_size})")
    _one_of(d.imbalance_profile, PROFILES, "data.imbalance_profile")
    _check(d.imbalance_ratio >= 1, "data.imbalance_ratio", d.imbalance_ratio, "a number ≥ 1")
    _check(d.n_max >= 1, "data.n_max", d.n_max, "an integer ≥ 1")
    n_max = {"digits_lt": d.n_max, "cifar10_lt": 5000, "cifar100_lt": 500}.get(d.format)  # CIFAR: n_max is fixed
    if n_max is not None:  # the rarest class keeps int(n_max / IF) images
        _check(int(n_max / d.imbalance_ratio) >= 1, "data.imbalance_ratio", d.imbalance_ratio,
               f"a ratio ≤ {n_max} (n_max of data.format={d.format}), so that the rarest class keeps an image")
    _check(d.val_per_class >= 1, "data.val_per_class", d.val_per_class, "an integer ≥ 1")
    _check(d.test_per_class >= 1, "data.test_per_class", d.test_per_class, "an integer ≥ 1")
    _check(d.image_size >= 8, "data.image_size", d.image_size, "an integer ≥ 8")
    _check(d.crop_padding >= 0, "data.crop_padding", d.crop_padding, "an integer ≥ 0")
    _check(len(d.mean) == 3 and len(d.std) == 3, "data.mean/std", (d.mean, d.std), "three values each (RGB)")
    _check(all(s > 0 for s in d.std), "data.std", d.std, "positive values")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer ≥ 0")
    _check(d.num_classes >= 0, "data.num_classes", d.num_classes, "an integer ≥ 0 (0 = infer)")
    _check(d.on_bad_image in ("fail", "skip"), "data.on_bad_image", d.on_bad_image, "'fail' or 'skip'")
    _check(0 <= d.max_bad_images <= 1, "data.max_bad_images", d.max_bad_images, "a fraction in [0, 1]")
    _check(d.verify_images in AUTO_ON_OFF, "data.verify_images", d.verify_images, "'auto', 'on' or 'off'")
    if d.format != "digits_lt":
        _check(bool(d.root), "data.root", d.root, f"your data folder (data.format={d.format})")
    if d.format in ("split_files", "inat", "image_folder"):
        for key in ("train_split", "val_split"):
            _check(bool(getattr(d, key)), f"data.{key}", getattr(d, key), f"a split path (data.format={d.format})")


def _validate_loss(cfg: Config) -> None:
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


def _validate_optim(cfg: Config) -> None:
    o = cfg.optim
    _check(o.batch_size >= 1, "optim.batch_size", o.batch_size, "an integer ≥ 1")
    _check(o.lr > 0, "optim.lr", o.lr, "a number > 0")
    _check(o.momentum >= 0, "optim.momentum", o.momentum, "a number ≥ 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number ≥ 0")
    _check(0 < o.lr_decay <= 1, "optim.lr_decay", o.lr_decay, "a number in (0, 1]")
    _one_of(o.schedule, SCHEDULES, "optim.schedule")
    _check(o.grad_accum >= 1, "optim.grad_accum", o.grad_accum, "an integer ≥ 1")
    _check(o.batch_size % o.grad_accum == 0, "optim.batch_size", o.batch_size,
           f"a multiple of optim.grad_accum ({o.grad_accum})")
    _one_of(o.fused, AUTO_ON_OFF, "optim.fused")
    _check(o.lr_base_batch >= 0, "optim.lr_base_batch", o.lr_base_batch, "an integer ≥ 0 (0 = no lr scaling)")
    _check(0 <= o.warmup_epochs < cfg.epochs, "optim.warmup_epochs", o.warmup_epochs, f"0 ≤ warmup < epochs ({cfg.epochs})")
    _check(all(0 < m < cfg.epochs for m in o.milestones), "optim.milestones", o.milestones, f"epochs in (0, {cfg.epochs})")
