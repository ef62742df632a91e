"""Config values from YAML files and `key=value` pairs, type-checked against the dataclass
fields they set (a config section is any dataclass; `redheart.config` holds them).

`ConfigError` is the one error of a configuration: an invalid value, a bad override or an
unreadable config file.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration value, a bad override or an unreadable config file."""


def _field_types(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in fields(obj)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)  # digits, exactly (through a float a large number would change)
            except ValueError:
                pass
        try:
            f = float(value)  # 1e3, 2.0
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare on/off (and yes/no) as a boolean
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if origin is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vtyp = typing.get_args(typ)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, vtyp, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"{where}: unsupported field type {typ}")


def set_value(cfg: Any, key: str, value: Any, origin: str = "--set") -> None:
    """Set one dotted key (`train.lr`, `train.head_weights.surd`) with type checks."""
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    apply_mapping(cfg, nested, origin)


def apply_mapping(obj: Any, data: Any, origin: str, prefix: str = "") -> None:
    """Merge a nested mapping of config keys into a config (section by section)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types = _field_types(obj)
    for k, v in data.items():
        where = f"{origin}: {prefix}{k}"
        if k not in types:
            raise ConfigError(f"{origin}: unknown config key {prefix + str(k)!r} "
                              f"(known here: {', '.join(types)})")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            apply_mapping(current, v, origin, prefix=f"{prefix}{k}.")
        elif typing.get_origin(types[k]) is dict and isinstance(v, dict):
            merged = dict(current)
            merged.update(_coerce(v, types[k], where))
            setattr(obj, k, merged)
        else:
            setattr(obj, k, _coerce(v, types[k], where))


def parse_assignment(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 3e-4); the value is read as YAML (numbers, lists, true/false)."""
    if "=" not in text:
        raise ConfigError(f"--set: expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config sections at the top level")
    return data
