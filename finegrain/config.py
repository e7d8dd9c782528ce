"""Typed dataclass configs: strict construction from dicts, dotted CLI overrides, YAML.

Rules:
- every config is a (nested) dataclass; unknown keys are errors that name the closest key;
- values are coerced to the annotated type (``"3"`` -> 3 for int fields) or rejected;
- a field annotated with a config base class that has a ``name`` field and a registry
  (``__registry__``) is polymorphic: ``{"name": "flair", ...}`` builds the registered subclass.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from finegrain.registry import suggest

C = TypeVar("C")


class ConfigError(ValueError):
    """A user mistake in a config or override; printed as one line by the CLI."""


def finegrain_home() -> Path:
    """Root for default paths (runs, caches): ``$FINEGRAIN_HOME`` or ``~/.finegrain``."""
    return Path(os.environ.get("FINEGRAIN_HOME", Path.home() / ".finegrain")).expanduser()


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _polymorphic_class(base: type, value: dict, where: str) -> type:
    registry = getattr(base, "__registry__", None)
    if registry is None or "name" not in value:
        return base
    try:
        entry = registry.get(value["name"])
    except ValueError as e:
        raise ConfigError(f"{where}.name: {e}") from None
    return getattr(entry, "Config", base)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot parse {value!r}")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(
                _coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))
            )
        inner = args[0] if args else Any
        out = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"{where}: {value!r} is not one of {', '.join(map(repr, args))}"
                f"{suggest(str(value), [str(a) for a in args])}"
            )
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "1",
            "yes",
            "on",
            "false",
            "0",
            "no",
            "off",
        ):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Build dataclass ``cls`` from a mapping, strictly (unknown keys are errors)."""
    cls = _polymorphic_class(cls, data, where or cls.__name__)
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        k = unknown[0]
        full = f"{where}.{k}" if where else k
        raise ConfigError(
            f"unknown config key '{full}'{suggest(k, list(types_))}; "
            f"valid keys here: {', '.join(types_)}"
        )
    kwargs = {k: _coerce(types_[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain-Python (YAML-safe) view of a config."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def apply_overrides(cfg: C, overrides: list[str]) -> C:
    """Return a copy of ``cfg`` with ``a.b.c=value`` overrides applied (values parsed as YAML).

    Changing a polymorphic ``name`` (e.g. ``method.name=siglip``) rebuilds that sub-config
    with the new class, keeping the fields both classes share.
    """
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': not a YAML value ({_yaml_problem(e)})") from None
        node, parts = data, key.strip().split(".")
        for i, part in enumerate(parts):
            here = ".".join(parts[: i + 1])
            if not isinstance(node, dict) or part not in node:
                valid = list(node) if isinstance(node, dict) else []
                raise ConfigError(
                    f"unknown config key '{here}'{suggest(part, valid)}; "
                    f"valid keys here: {', '.join(valid)}"
                )
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return _rebuild(type(cfg), data)


def _rebuild(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """from_dict that tolerates keys dropped by a polymorphic class change."""
    cls = _polymorphic_class(cls, data, where or cls.__name__)
    types_ = _field_types(cls)
    kept = {}
    for k, v in data.items():
        if k not in types_:
            continue
        tp = types_[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            kept[k] = _rebuild(tp, v, f"{where}.{k}" if where else k)
        else:
            kept[k] = _coerce(tp, v, f"{where}.{k}" if where else k)
    return cls(**kept)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(cls: type[C], path: str | Path) -> C:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:  # safe_load: tags such as !!python/object are refused, never executed
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not a valid config file ({_yaml_problem(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping, got {type(data).__name__}")
    return from_dict(cls, data)


def _yaml_problem(e: Exception) -> str:
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem}{f' at line {mark.line + 1}' if mark is not None else ''}"
