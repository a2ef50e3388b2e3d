"""Typed configs from plain mappings (params.yaml sections, checkpoint config.json).

`from_mapping` builds a dataclass from a dict, refusing unknown keys and values of the wrong type with a
`ConfigError` that names the offending key (for example `etl.splits.train`), so a typo in params.yaml fails
loudly instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from hndsr.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A params or config value a user must fix; the message names the key. Exit status 2."""

    exit_code = 2


def from_mapping(cls: type[T], data: Any, *, where: str) -> T:
    """Return `cls(**data)` with every value checked against the field's type annotation.

    `where` is the dotted path of `data` in its file (e.g. ``"etl"``), used in error messages.
    Nested dataclasses, ``list[X]``, ``dict[str, X]``, ``X | None`` and unions such as ``str | list[str]`` (the
    first alternative that fits) are supported.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed keys: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: missing required key")
    return cls(**kwargs)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:  # e.g. `str | list[str]`: the first alternative the value fits
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: expected {' or '.join(_describe(a) for a in inner)}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        return from_mapping(annotation, value, where=key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if annotation is Any:
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is list:
        return f"a list of {_describe(typing.get_args(annotation)[0]).removeprefix('a ')}s"
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return names.get(annotation, str(annotation))
