"""The config loader's mechanics, for any tree of dataclasses: ``key.sub=value`` overrides, building
a dataclass from a dict with each value coerced to its field's type and checked against its range,
and the way back to a plain dict with secrets masked. ``steelray.config`` holds the tree itself and
the rules that involve more than one field.

A small loader of our own rather than OmegaConf or pydantic: the brief asks for plain dataclasses,
and neither library's errors list the valid keys and choices as we need them to.
"""

from __future__ import annotations

import dataclasses
import datetime
import typing
from dataclasses import field
from typing import Any, Literal

import yaml

SECRET_MASK = "***"


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or out of range."""


def setting(default: Any, *, min: float | None = None, max: float | None = None, secret: bool = False):
    """A dataclass field with an optional inclusive range; lists get a fresh copy per instance."""
    meta = {"min": min, "max": max, "secret": secret}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta, repr=not secret)


def to_dict(cfg: Any, *, redact: bool = True) -> dict:
    """Plain dict of a config; secret fields are masked unless ``redact=False``."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value, redact=redact)
        elif redact and f.metadata.get("secret") and value:
            value = SECRET_MASK
        elif isinstance(value, (list, dict)):
            value = type(value)(value)
        out[f.name] = value
    return out


def apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.sub=value, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except (yaml.YAMLError, ValueError):  # ValueError: a date-like text that is no date (2026-13-01)
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(f"{key}: unknown key; valid keys{' in ' + where if where else ''}: "
                          f"{', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value, key)
        else:
            value = coerce(value, hint, key)
            check_range(value, fields[name].metadata, key)
            kwargs[name] = value
    return cls(**kwargs)


def coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if not any(type(c) is type(value) and c == value for c in choices):  # 1 is not True here
            raise ConfigError(f"{key}: {value!r} is not a valid choice; choose one of: "
                              f"{', '.join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of names to values, got {value!r}")
        value = {str(k): v for k, v in value.items()}  # YAML reads class names 1, 2 as numbers
        _, item_type = typing.get_args(hint)
        if item_type in (int, float, str, bool):
            return {k: coerce(v, item_type, f"{key}.{k}") for k, v in value.items()}
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {item_type.__name__}, got {value!r}")
        return [coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # class ids written as 1, 2, 3
            return str(value)
        if isinstance(value, datetime.date):  # YAML reads 2026-11-22 as a date
            return value.isoformat()
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def check_range(value: Any, meta: typing.Mapping, key: str) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    for v in value if isinstance(value, list) else [value]:
        if lo is not None and v < lo:
            raise ConfigError(f"{key}: must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise ConfigError(f"{key}: must be <= {hi}, got {v}")


def is_date(text: str) -> bool:
    try:
        return datetime.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False
