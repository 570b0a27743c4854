"""The rules of each config key as data, and everything generated from them.

Every value is first checked against its field's type (`coerce`). A config key is declared once, in
engine/config.py, with `key(default, range=…, choices=…, resume=…, eval=…, reuse_ignored=…, help=…)`.
From those declarations this module derives the per-key value checks, the config comparisons (what a
`--resume` may change, what `engine eval` overrides may change, which keys a sweep ignores when it
re-uses a finished run) and the README's key table.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError

ABSENT = "(absent)"  # a key one of two configs does not have (written before the key existed)
_RANGE = re.compile(r"^(?:(>=|>) *(\S+)|([\[(]) *(\S+?) *, *(\S+?) *([\])]))$")


@dataclass(frozen=True)
class Rule:
    """Where a key's value may lie and where it may change.

    range: ">= 0", "> 0", "[0, 1)", "(0, 1]", … (numbers; the bounds are floats or 2^63);
    choices: the allowed values; resume: True (any change) or "grow" (only a larger value) on `--resume`;
    eval: `engine eval` overrides may change it (every resume-changeable key may too);
    reuse_ignored: a sweep re-uses a finished run whatever this key's value."""

    range: str = ""
    choices: tuple = ()
    resume: bool | str = False
    eval: bool = False
    reuse_ignored: bool = False
    help: str = ""


def key(default: Any, *, range: str = "", choices: typing.Iterable = (), resume: bool | str = False,
        eval: bool = False, reuse_ignored: bool = False, help: str = "") -> Any:
    """A dataclass field carrying its Rule; list defaults are copied per instance."""
    if range and not _RANGE.match(range):
        raise ValueError(f"key range {range!r} is not of the form '>= a', '> a' or '[a, b)'")
    meta = {"rule": Rule(range, tuple(choices), resume, eval, reuse_ignored, help)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _bound(text: str) -> float:
    return 2.0**63 if text == "2^63" else float(text)


def in_range(value: float, range: str) -> bool:
    """Whether `value` lies in a Rule range such as '>= 0' or '[0, 1)'."""
    m = _RANGE.match(range)
    if m.group(1):
        return value >= _bound(m.group(2)) if m.group(1) == ">=" else value > _bound(m.group(2))
    lo, hi = _bound(m.group(4)), _bound(m.group(5))
    low_ok = value >= lo if m.group(3) == "[" else value > lo
    return low_ok and (value <= hi if m.group(6) == "]" else value < hi)


def _expected(tp: Any, range: str) -> str:
    kind = "an integer" if tp is int else "a number"
    shown = range.replace(">=", "≥")
    return f"{kind} {shown}" if shown[0] in "≥>" else f"{kind} in {shown}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list of {_type_name(item_tp)}, got {value!r}")
        return [coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
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


def rules(cls: type, prefix: str = "") -> dict[str, tuple[Rule, Any, Any]]:
    """{dotted key: (rule, type, default)} for every leaf key of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[Rule, Any, Any]] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(rules(tp, f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out[f"{prefix}{f.name}"] = (f.metadata.get("rule", Rule()), tp, default)
    return out


def check_keys(cfg: Any) -> None:
    """Each key's own range and choices; a ConfigError naming the first key out of them."""
    for dotted, (rule, tp, _) in rules(type(cfg)).items():
        value = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        if rule.choices and value not in rule.choices:
            raise ConfigError(f"config key '{dotted}' = {value!r} is invalid: expected one of "
                              f"{', '.join(map(str, rule.choices))}")
        if rule.range and not in_range(value, rule.range):
            raise ConfigError(f"config key '{dotted}' = {value!r} is invalid: expected {_expected(tp, rule.range)}"
                              + (f" ({rule.help})" if rule.help.startswith("0 =") else ""))


# --------------------------------------------------------------------------- comparing configs


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} → {'optim.lr': 0.1}."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


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


def _may_change(rule: Rule, old: Any, new: Any, on: str) -> bool:
    if rule.resume == "grow":
        grows = old == ABSENT or (new != ABSENT and new >= old)
        return grows
    return bool(rule.resume) or (on == "eval" and rule.eval)


def split_changes(cls: type, old: dict, new: dict, on: str) -> tuple[list[str], list[str]]:
    """(changed keys accepted, changed keys refused) between two config trees, `on` "resume" or "eval"."""
    table = rules(cls)
    accepted, refused = [], []
    for k, (a, b) in config_diff(old, new).items():
        ok = k in table and _may_change(table[k][0], a, b, on)
        (accepted if ok else refused).append(k)
    return accepted, refused


def changeable(cls: type, on: str) -> list[str]:
    """The keys that may change `on` "resume" or "eval" ('epochs (larger)' for a key that may only grow)."""
    return [k + (" (larger)" if r.resume == "grow" else "") for k, (r, _, _) in rules(cls).items()
            if r.resume or (on == "eval" and r.eval)]


def reuse_comparable(cls: type, tree: dict) -> dict:
    """A config tree flattened, without the keys a sweep ignores when it re-uses a finished run."""
    ignored = {k for k, (r, _, _) in rules(cls).items() if r.reuse_ignored}
    return {k: v for k, v in flatten(tree).items() if k not in ignored}


# --------------------------------------------------------------------------- README


def key_table(cls: type) -> str:
    """The README's "Config keys" table (Markdown), one row per key."""
    rows = ["| key | default | values | resume | eval | what |", "|---|---|---|---|---|---|"]
    for dotted, (rule, tp, default) in rules(cls).items():
        values = (" \\| ".join(map(str, rule.choices)) if rule.choices
                  else rule.range.replace(">=", "≥") if rule.range else getattr(tp, "__name__", str(tp)))
        resume = "larger" if rule.resume == "grow" else "yes" if rule.resume else ""
        evals = "yes" if rule.resume or rule.eval else ""
        help_text = rule.help.replace("|", "\\|")
        rows.append(f"| `{dotted}` | `{default!r}` | {values} | {resume} | {evals} | {help_text} |")
    return "\n".join(rows)
