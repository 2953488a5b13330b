"""Strict loading machinery of the typed config (trainer/config.py holds the schema): YAML mapping -> dataclass
tree with every value checked against its annotation, dotted `a.b=value` overrides, flat params, and the field
docstrings as data. It knows no field of ours: every function takes the dataclass to build or describe.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key."""


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` to the annotated type `tp`; raise ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads bare no/off/yes/on (`mixed_precision=no`) as booleans
            value = next((w for w in (("yes", "on") if value else ("no", "off")) if w in args), value)
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan / .inf, or 1e999: no field of ours means anything by them
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this module


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """`cls(**data)` with every value converted to its annotation, recursively; ConfigError names the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s} (valid keys here: {', '.join(sorted(names))})")
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - every field has a default
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    # YAML scalars give the natural types: 1e-5 -> float, true -> bool, null -> None, [a, b] -> list.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)$")


def coerce_number_strings(value: Any) -> Any:
    # YAML 1.1 (PyYAML) reads "3e-5" (no dot) as a string; researchers write it that way, so accept it.
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: coerce_number_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce_number_strings(v) for v in value]
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to a nested dict (the strict build afterwards rejects unknown keys)."""
    data = dict(data)
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = value
    return data


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"optim.lr": 3e-5, ...}`: the resolved config as flat params (for MLflow)."""
    out: dict[str, Any] = {}
    for key, value in (dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every field: the field docstrings as data."""
    try:
        body = ast.parse(inspect.cleandoc(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    except (OSError, TypeError):  # pragma: no cover - no source to read
        body = []
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], prefix + f.name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((prefix + f.name, repr(default), docs.get(f.name, "")))
    return rows


def read_mapping(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """The YAML run file's mapping (empty when `path` is None) with the overrides applied, numbers coerced."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    return coerce_number_strings(apply_overrides(data, overrides or []))
