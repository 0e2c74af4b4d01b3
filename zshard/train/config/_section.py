"""The machinery of config sections: frozen keyword-only dataclasses that type-check every field
against its hint on construction, then run their own range checks; and building one from a tree
of plain YAML values, naming the dotted key of anything wrong."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from zshard.errors import ConfigError

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(hint))
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type hint; return it normalised (int -> float, list ->
    tuple). Raise ConfigError naming ``key``, the expected type and the value."""
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        # `True == 1` in Python: never let a YAML boolean select stage 1.
        if not isinstance(value, bool) and value in choices:
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint in (int, float) and isinstance(value, str) and _NUMBER.match(value.strip()):
        # YAML 1.1 reads `5e8` (no dot) as a string; users mean the number.
        return _coerce(float(value), hint, key)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # YAML reads 5e8 as a float: accept integral floats for element counts.
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is dict:
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif origin is tuple:
        args = get_args(hint)
        if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, (Mapping, str)) and issubclass(hint, _Section):
            return _build(hint, value, key)
    else:  # pragma: no cover - a field type this module does not handle is a bug here
        raise TypeError(f"unsupported config field type {hint!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True, kw_only=True)
class _Section:
    """Base of every section: type-checks fields against their hints, then ``_check()``."""

    _section: ClassVar[str] = ""
    # YAML keys that differ from field names (``async`` is a Python keyword): {yaml: field}.
    _aliases: ClassVar[dict[str, str]] = {}
    # The field a section sets when given as one string (``precision: bf16``), if any.
    _shorthand: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), hints[f.name], self._key(f.name))
            object.__setattr__(self, f.name, value)
        self._check()

    def _key(self, name: str) -> str:
        return f"{self._section}.{name}" if self._section else name

    @classmethod
    def _translate(cls, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        """Raw keys -> field keys before building (foreign spellings); identity by default."""
        return dict(data)

    def _check(self) -> None:
        """Range checks and cross-field rules of one section."""

    def _positive(self, *names: str, allow_zero: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if value is None:
                continue
            if value < 0 or (value == 0 and not allow_zero):
                bound = ">= 0" if allow_zero else "> 0"
                raise ConfigError(f"{self._key(name)}: expected a number {bound}, got {value!r}")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        back = {v: k for k, v in getattr(obj, "_aliases", {}).items()}
        return {
            back.get(f.name, f.name): _to_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
        }
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _section_hint(hint: Any) -> type[_Section] | None:
    """The section class of a field typed ``Section`` or ``Section | None``, else None."""
    for arg in get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,):
        if isinstance(arg, type) and issubclass(arg, _Section):
            return arg
    return None


def _build(cls: type[_Section], data: Any, prefix: str) -> Any:
    where = prefix or "config"
    if isinstance(data, str) and cls._shorthand is not None:
        data = {cls._shorthand: data}  # `precision: bf16`, `offload_optimizer: cpu`
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    data = cls._translate(data, where)
    aliases = cls._aliases
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = aliases.get(raw_key, raw_key)
        dotted = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if key not in fields:
            shown = {v: k for k, v in aliases.items()}
            allowed = sorted(shown.get(name, name) for name in fields)
            raise ConfigError(f"{dotted}: unknown key; expected one of {', '.join(allowed)}")
        hint = _section_hint(hints[key])
        if hint is not None and (value is not None or hint is hints[key]):
            kwargs[key] = _build(hint, value, dotted)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - fields are checked above
        raise ConfigError(f"{where}: {e}") from None
