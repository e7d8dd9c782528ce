"""Typed dataclass configs: strict construction from dicts, dotted CLI overrides, YAML.

Rules:
- every config is a (nested) dataclass; unknown keys are errors that name the closest key;
- values are coerced to the annotated type (``"3"`` -> 3 for int fields) or rejected;
- a choice field is a ``Literal[...]``: loading rejects other values, and so does building a
  config in Python (config classes derive from ``Checked``; ``validate_config`` re-checks a
  whole tree after it was changed), with one line naming the valid choices;
- a field annotated with a config base class that has a registry (``__registry__``) is
  polymorphic on its discriminator field (``__discriminator__``, default ``name``):
  ``{"name": "flair", ...}`` builds the registered subclass. A registry entry is either the
  config class itself or an object whose ``Config`` attribute is the class.
"""

from __future__ import annotations

import dataclasses
import functools
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
    key = getattr(base, "__discriminator__", "name")
    if registry is None:
        return base
    if key not in value:
        default = {f.name: f.default for f in dataclasses.fields(base)}.get(key)
        if not isinstance(default, str) or default not in registry:
            return base
        value = {**value, key: default}
    try:
        entry = registry.get(value[key])
    except ValueError as e:
        raise ConfigError(f"{where}.{key}: {e}") from None
    if isinstance(entry, type) and issubclass(entry, base):
        return entry
    return getattr(entry, "Config", base)


def choice_error(where: str, value: Any, choices: tuple[Any, ...]) -> ConfigError:
    """One line: ``unknown train.precision 'fp8' (did you mean 'fp16'?); valid choices: ...``."""
    names = [str(c) for c in choices]
    return ConfigError(
        f"unknown {where} {value!r}{suggest(str(value), names)}; valid choices: {', '.join(names)}"
    )


def literal_choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` (or ``Literal[...] | None``) type, else None."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [literal_choices(a) for a in typing.get_args(tp) if a is not type(None)]
        if inner and all(c is not None for c in inner):
            none = (None,) if type(None) in typing.get_args(tp) else ()
            return tuple(v for c in inner for v in c) + none
    return None


@functools.cache
def _choice_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    out = {}
    for name, tp in _field_types(cls).items():
        choices = literal_choices(tp)
        if choices is not None:
            out[name] = choices
    return out


def check_choices(cfg: Any, where: str = "") -> None:
    """Raise a one-line ``ConfigError`` when a ``Literal`` field of dataclass ``cfg`` (this
    level only) holds a value outside its choices."""
    for name, choices in _choice_fields(type(cfg)).items():
        value = getattr(cfg, name)
        if value not in choices:
            raise choice_error(f"{where}.{name}" if where else name, value, choices)


def validate_config(cfg: Any, where: str = "") -> None:
    """Check every ``Literal`` field of a config tree (dataclasses, lists, dicts), e.g. after
    a recipe built in Python changed fields; errors name the dotted path."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        check_choices(cfg, where)
        for f in dataclasses.fields(cfg):
            validate_config(getattr(cfg, f.name), f"{where}.{f.name}" if where else f.name)
    elif isinstance(cfg, (list, tuple)):
        for i, v in enumerate(cfg):
            validate_config(v, f"{where}[{i}]")
    elif isinstance(cfg, dict):
        for k, v in cfg.items():
            validate_config(v, f"{where}.{k}")


class Checked:
    """Base of the config dataclasses: their ``Literal`` fields are checked on construction,
    so a recipe written in Python fails on a bad choice as early as a YAML file does."""

    def __post_init__(self) -> None:
        check_choices(self, type(self).__name__)


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
        for a in args:  # CLI and YAML give strings: "1" may mean Literal[1]
            if value == a or (
                isinstance(value, str) and not isinstance(a, str) and value == str(a)
            ):
                return a
        raise choice_error(where, value, args)
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
        key = getattr(cls, "__discriminator__", None)
        kind = f" for {key}={data[key]}" if key and key in data else ""
        raise ConfigError(
            f"unknown config key '{full}'{kind}{suggest(k, list(types_))}; "
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
        value = yaml.safe_load(raw) if raw != "" else ""
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
    return from_dict(cls, yaml.safe_load(path.read_text()) or {})
