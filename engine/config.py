"""One typed config tree, YAML presets, dotted command-line overrides.

Resolution order: dataclass defaults → preset (`engine/configs/NAME.yaml`) →
`--config FILE` → `key=value` overrides. Every layer is checked against the
dataclasses: unknown keys and wrong types are rejected with the key, the value
received and what was expected. The resolved tree is saved with every run.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError, EngineError
from engine.archs import ARCH_NAMES
from engine.config_rules import (
    ABSENT,
    changeable,
    check_keys,
    coerce,
    config_diff,
    flatten,
    format_diff,
    key,
    reuse_comparable,
    split_changes,
)
from engine.config_rules import key_table as rules_key_table
from engine.methods import METHODS, LossConfig
from pipelines import formats
from pipelines.long_tail import PROFILES
from pipelines.sampler_names import SAMPLERS

__all__ = ["ABSENT", "Config", "ConfigError", "LossConfig", "load_config", "config_from_dict", "to_dict", "to_yaml",
           "config_diff", "flatten", "format_diff"]

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
    format: str = key("digits_lt", choices=FORMATS,
                      help="digits_lt: the embedded default; split_files: ImageNet-LT / Places-LT (engine/data.py)")
    root: str = key("", resume=True, help="your data: image root (split_files, inat), CIFAR pickles folder (cifar*_lt)")
    cache_dir: str = key("", resume=True,
                         help="where digits_lt / cifar*_lt images are written once (\"\" = ~/.cache/lt-engine)")
    train_split: str = key("", help="split file / json / folder, relative to data.root or absolute")
    val_split: str = key("", help="as data.train_split")
    test_split: str = key("", help="\"\" = the validation split")
    num_classes: int = key(0, range=">= 0", help="0 = infer (split_files: one more than the largest training label)")
    imbalance_ratio: float = key(50.0, range=">= 1", help="IF of the long-tailed construction (Cui et al. 2019)")
    imbalance_profile: str = key("exp", choices=PROFILES,
                                 help="exp: n_i = int(n_max·IF^(−i/(C−1))); step: n_max, then int(n_max/IF)")
    n_max: int = key(100, range=">= 1", help="digits_lt: images of the most frequent class")
    val_per_class: int = key(20, range=">= 1", help="balanced held-out validation split")
    test_per_class: int = key(50, range=">= 1", help="balanced held-out test split")
    sampler: str = key("instance", choices=SAMPLERS, help="pipelines/samplers.py")
    sampler_epoch_length: int = key(0, range=">= 0", help="0 = the training split's size (images per epoch)")
    samples_per_class: int = key(1, range=">= 1", help="class_aware: consecutive draws per visited class")
    loader: str = key("auto", choices=LOADERS, resume=True,
                      help="auto = DALI on GPU when importable, torchvision otherwise")
    augment: str = key("pad_crop", choices=AUGMENTS,
                       help="pad_crop (CIFAR: pad + random crop) | random_resized_crop (ImageNet)")
    image_size: int = key(32, range=">= 8")
    resize_size: int = key(0, help="0 = image_size·256/224 for random_resized_crop (eval resize before the crop)")
    crop_padding: int = key(4, range=">= 0", help="pad_crop: zero padding of the random crop (0 = off)")
    hflip: bool = key(True)
    mean: list[float] = key([0.485, 0.456, 0.406], help="RGB")
    std: list[float] = key([0.229, 0.224, 0.225], help="RGB, positive")
    num_workers: int = key(0, range=">= 0", resume=True)
    allow_outside_root: bool = key(False, help="accept split paths that leave data.root (`../x`, absolute paths)")
    on_bad_image: str = key("fail", choices=("fail", "skip"),
                            help="skip: a train image that cannot be read is replaced by one of its class")
    max_bad_images: float = key(0.01, range="[0, 1]", resume=True,
                                help="skip: the run fails once more than this fraction of a split is bad")
    exclude_file: str = key("", help="one relative image path per line (`engine data check --decode`): dropped")
    verify_images: str = key("auto", choices=AUTO_ON_OFF, resume=True,
                             help="decode val/test, open train before training; auto = on for your data")


@dataclass
class ModelConfig:
    arch: str = key("resnet32_cifar", choices=ARCH_NAMES, help="engine/archs.py")
    cifar_widths: list[int] = key([16, 32, 64], help="*_cifar archs: channels of the three stages (He et al.: "
                                  "16, 32, 64); the last is the feature dimension")
    pretrained: str = key("", help="local torchvision/timm-style state_dict for the backbone (\"\" = random init)")
    sync_bn: str = key("off", choices=SYNC_BN,
                       help="BatchNorm statistics over all ranks under DDP: torch.nn.SyncBatchNorm or apex's")


@dataclass
class OptimConfig:
    batch_size: int = key(128, range=">= 1", help="the global batch per optimizer step")
    lr: float = key(0.1, range="> 0", help="scaled by batch_size / lr_base_batch when lr_base_batch > 0")
    momentum: float = key(0.9, range="[0, 1)")
    weight_decay: float = key(5e-4, range=">= 0")
    nesterov: bool = key(False)
    schedule: str = key("cosine", choices=SCHEDULES)
    warmup_epochs: int = key(0, help="0 ≤ warmup < epochs")
    milestones: list[int] = key([], help="multistep: epochs where lr ×= lr_decay")
    lr_decay: float = key(0.1, range="(0, 1]")
    grad_accum: int = key(1, range=">= 1", help="micro-batches per optimizer step")
    fused: str = key("auto", choices=AUTO_ON_OFF, help="torch.optim.SGD(fused=True); auto = on for CUDA")
    lr_base_batch: int = key(0, range=">= 0", help="0 = no lr scaling; else lr × batch_size / lr_base_batch")


@dataclass
class RescaleConfig:
    in_loop: bool = key(False, help="Algorithm 1: WVN then w_i ← (n_1/n_i)^γ·w_i after every step (method=wvn)")
    gamma: float = key(0.0, range=">= 0")
    counts: str = key("observed", choices=RS_COUNTS,
                      help="n_i of RS: the training counts, or the un-rounded profile (official code)")


@dataclass
class EvalConfig:
    many_threshold: int = key(100, range=">= 0", resume=True, help="many: n_train > many_threshold")
    few_threshold: int = key(20, range=">= 0", resume=True, help="few: n_train < few_threshold")
    every: int = key(1, range=">= 1", resume=True, help="evaluate on the validation split every N epochs")
    batch_size: int = key(256, range=">= 1", resume=True)
    diagnostics: str = key("epoch", choices=DIAGNOSTICS, resume=True,
                           help="½μ̃_k·w_k from the last epoch's features | an extra pass after training | off")


@dataclass
class RunConfig:
    device: str = key("auto", choices=DEVICES, eval=True)
    amp: str = key("auto", choices=AMP, help="auto = bf16 on CUDA; fp16 with GradScaler")
    channels_last: str = key("auto", choices=AUTO_ON_OFF, help="auto = on for CUDA")
    compile: str = key("auto", choices=AUTO_ON_OFF, help="torch.compile of the model; auto = on for CUDA")
    cudnn_benchmark: bool = key(True)
    tf32: str = key("auto", choices=AUTO_ON_OFF, help="TF32 matmuls and convolutions; auto = on for CUDA")
    checkpoint_every: int = key(0, range=">= 0", resume=True, reuse_ignored=True,
                                help="0 = end of each epoch only; else also every N optimizer steps")
    tensorboard: bool = key(False, resume=True, reuse_ignored=True, help="scalars under <run>/tb")
    progress: bool = key(True, resume=True, reuse_ignored=True)
    threads: int = key(0, range=">= 0", resume=True, reuse_ignored=True, help="0 = torch's default")
    log_every: int = key(50, range=">= 1", resume=True, help="read the loss to the host every N optimizer steps")
    max_loss: float = key(0.0, range=">= 0", resume=True, help="0 = auto: 1e4 · ln(num_classes)")
    max_steps: int = key(0, range=">= 0", resume=True, help="0 = no limit (optimizer steps in total)")
    keep_last: int = key(0, range=">= 0", resume=True, help="0 = only last.pt; else also N epoch-XXX.pt")
    save_best: bool = key(False, resume=True, help="also keep best.pt (best val top-1)")


@dataclass
class Config:
    method: str = key("eo_uc", choices=tuple(METHODS), help="README's method table")
    seed: int = key(0, range="[0, 2^63)")
    epochs: int = key(30, range=">= 1", resume="grow", help="a resume may make it larger")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rescale: RescaleConfig = field(default_factory=RescaleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------- merging


def _merge(node: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested dict of updates onto a dataclass instance, rejecting unknown keys."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' expects a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(node))
    names = [f.name for f in dataclasses.fields(node)]
    for name, value in updates.items():
        dotted = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key '{dotted}' (expected one of: {', '.join(names)})")
        current = getattr(node, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value, prefix=f"{dotted}.")
        else:
            setattr(node, name, coerce(dotted, value, hints[name]))


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
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    if not dotted:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({yaml_problem(exc)})") from None
    return _nest(dotted, value)


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


def resume_changes(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(changed keys a resume accepts, changed keys it refuses) between a checkpoint's config and `cfg`."""
    return split_changes(Config, saved, to_dict(cfg), "resume")


def eval_changes(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(changed keys `engine eval` overrides may make, changed keys they may not) against a checkpoint's config."""
    return split_changes(Config, saved, to_dict(cfg), "eval")


def changeable_keys(on: str) -> list[str]:
    """The keys that may change on "resume" or in "eval" overrides, as listed in refusals."""
    return changeable(Config, on)


def with_current_keys(saved: dict) -> dict:
    """A saved config tree (config.yaml, a checkpoint's) in today's keys: a key added since it was written
    takes its default, the behaviour the run had. A tree that is not valid today is returned as it is,
    so the comparison that follows names its keys."""
    try:
        return to_dict(config_from_dict(saved))
    except EngineError:
        return saved


def reuse_differences(saved: dict, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, requested value)} that stop a sweep re-using a finished run."""
    return config_diff(reuse_comparable(Config, with_current_keys(saved)), reuse_comparable(Config, to_dict(cfg)))


def key_table() -> str:
    """README's "Config keys" table, generated from the declarations above."""
    return rules_key_table(Config)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------- values


def effective_lr(o: OptimConfig) -> float:
    """The lr the optimizer uses: optim.lr, scaled by batch_size / lr_base_batch when lr_base_batch > 0
    (the linear scaling rule, Goyal et al. 2017; timm's --lr-base-size). batch_size is the global batch."""
    return o.lr * o.batch_size / o.lr_base_batch if o.lr_base_batch else o.lr


def effective_notes(cfg: Config) -> dict[str, str]:
    """{dotted key: note} for the keys whose value in use differs from the one written (the scaled lr)."""
    o = cfg.optim
    if not o.lr_base_batch:
        return {}
    return {"optim.lr": f"effective {effective_lr(o):g} = {o.lr:g} × batch {o.batch_size} / lr_base_batch "
                        f"{o.lr_base_batch}"}


def to_annotated_yaml(cfg: Config) -> str:
    """`to_yaml`, with `  # effective …` after each key that `effective_notes` names (`--print-config`)."""
    notes, lines, section = effective_notes(cfg), [], ""
    for line in to_yaml(cfg).splitlines():
        name = line.strip().split(":", 1)[0]
        if not line.startswith(" "):
            section = name
        note = notes.get(f"{section}.{name}" if line.startswith(" ") else name)
        lines.append(f"{line}  # {note}" if note else line)
    return "\n".join(lines) + "\n"


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {expected}")


def validate(cfg: Config) -> None:
    """Each key's own range and choices (declared with it), then the checks that relate keys."""
    e = cfg.eval
    if e.diagnostics == "on":
        _check(False, "eval.diagnostics", "on", "one of epoch, pass, off — the boolean form is gone: true was "
               "`pass`, false is `off`")
    check_keys(cfg)
    _check(e.few_threshold <= e.many_threshold + 1, "eval.few_threshold", e.few_threshold,
           f"≤ eval.many_threshold + 1 ({e.many_threshold + 1})")
    _validate_data(cfg.data)
    _validate_model(cfg.model)
    _validate_loss(cfg)
    _validate_optim(cfg)
    _validate_rescale(cfg)


def _validate_rescale(cfg: Config) -> None:
    rs = cfg.rescale
    if rs.in_loop:
        _check(METHODS[cfg.method].wvn, "rescale.in_loop", True,
               "method=wvn (Algorithm 1 normalizes the weight vectors before re-scaling them every step)")
    if rs.counts == "profile":
        _check(cfg.data.format in PROFILE_FORMATS, "rescale.counts", "profile",
               f"data.format in {', '.join(PROFILE_FORMATS)} (data built by the profile), got {cfg.data.format}")
        _check(not rs.in_loop, "rescale.counts", "profile",
               "rescale.in_loop=false (the profile convention is the official code's post-hoc RS)")


def _validate_data(d: DataConfig) -> None:
    _check(d.resize_size == 0 or d.resize_size >= d.image_size, "data.resize_size", d.resize_size,
           f"0 or ≥ data.image_size ({d.image_size})")
    n_max = {"digits_lt": d.n_max, "cifar10_lt": 5000, "cifar100_lt": 500}.get(d.format)  # CIFAR: n_max is fixed
    if n_max is not None:  # the rarest class keeps int(n_max / IF) images
        _check(int(n_max / d.imbalance_ratio) >= 1, "data.imbalance_ratio", d.imbalance_ratio,
               f"a ratio ≤ {n_max} (n_max of data.format={d.format}), so that the rarest class keeps an image")
    _check(len(d.mean) == 3 and len(d.std) == 3, "data.mean/std", (d.mean, d.std), "three values each (RGB)")
    _check(all(s > 0 for s in d.std), "data.std", d.std, "positive values")
    if d.format != "digits_lt":
        _check(bool(d.root), "data.root", d.root, f"your data folder (data.format={d.format})")
    if d.format in ("split_files", "inat", "image_folder"):
        for name in ("train_split", "val_split"):
            _check(bool(getattr(d, name)), f"data.{name}", getattr(d, name), f"a split path (data.format={d.format})")


def _validate_model(m: ModelConfig) -> None:
    _check(len(m.cifar_widths) == 3 and all(w >= 1 for w in m.cifar_widths), "model.cifar_widths", m.cifar_widths,
           "three channel counts ≥ 1 (one per stage)")
    if not m.arch.endswith("_cifar"):
        _check(m.cifar_widths == [16, 32, 64], "model.cifar_widths", m.cifar_widths,
               f"the default [16, 32, 64]: model.arch={m.arch} is not a CIFAR ResNet")


def _validate_loss(cfg: Config) -> None:
    """loss.* is declared in engine/methods.py (LossConfig), so its ranges are checked here."""
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
    _check(o.batch_size % o.grad_accum == 0, "optim.batch_size", o.batch_size,
           f"a multiple of optim.grad_accum ({o.grad_accum})")
    _check(0 <= o.warmup_epochs < cfg.epochs, "optim.warmup_epochs", o.warmup_epochs, f"0 ≤ warmup < epochs ({cfg.epochs})")
    _check(all(0 < m < cfg.epochs for m in o.milestones), "optim.milestones", o.milestones, f"epochs in (0, {cfg.epochs})")
