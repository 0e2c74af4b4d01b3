"""The vocabulary of the DeepSpeed key table: a :class:`Rule` per key, the :class:`DsMapping`
that applying the rules fills in, and the handlers and value tests the table's rows name.

The table itself is data (``_ds_table.py``, ``_ds_table_zero.py``); the code walking a DeepSpeed
config through it is ``_deepspeed.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from zshard.errors import ConfigError

AUTO = "auto"
ANY = object()  # any value (the table), or no value found (resolving "auto")

Treatment = Literal["mapped", "same", "warn", "refused"]
Handler = Callable[["DsMapping", str, Any], None]

PERF = "tunes DeepSpeed's implementation, speed or memory only"


@dataclass(frozen=True)
class Rule:
    """How zshard treats one DeepSpeed key.

    ``treatment`` applies to any value, except the values in ``ok`` (or those ``ok_if``
    accepts), which are accepted silently because zshard already behaves that way. ``mapped``
    keys are applied by ``apply``; their ``caveat``, if any, is reported as a warning (a key
    whose effect is memory or speed only and is approximated). ``zshard`` names the zshard key
    it sets, for the docs and for ``"auto"`` resolution.
    """

    key: str
    treatment: Treatment
    zshard: str = ""
    note: str = ""
    ok: tuple[Any, ...] = ()
    ok_if: Callable[[Any], bool] | None = None
    ok_doc: str = ""
    apply: Handler | None = None
    caveat: str = ""
    section: bool = False  # a mapping whose keys have rules of their own

    def accepts_quietly(self, value: Any) -> bool:
        if self.ok_if is not None and self.ok_if(value):
            return True
        return any(same_value(value, v) for v in self.ok)

    def doc_treatment(self) -> str:
        """The treatment column of docs/deepspeed.md."""
        quiet = self.ok_doc or ", ".join(f"`{show(v)}`" for v in self.ok)
        words = {
            "mapped": "honoured",
            "same": "honoured (zshard already does it)",
            "warn": "warning (cannot change the result)",
            "refused": "refused",
        }
        text = words[self.treatment]
        if self.caveat:
            text += ", with a warning"
        if quiet:
            text = f"{quiet}: honoured; other values: {text}"
        return text


class Table:
    """Rules in the order docs/deepspeed.md lists them."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []

    def add(
        self, key: str, treatment: Treatment, zshard: str = "", note: str = "", **kw: Any
    ) -> None:
        self.rules.append(Rule(key, treatment, zshard, note, **kw))


def same_value(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value, booleans only to booleans."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


class DsMapping:
    """Collects zshard leaves (dotted key -> value, and which DeepSpeed key set it), the notes
    for the warning line, and the keys left to zshard by ``"auto"``."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.leaves: dict[str, Any] = {}
        self.origin: dict[str, str] = {}
        self.notes: list[str] = []
        self.auto: list[tuple[str, str]] = []  # (DeepSpeed key, zshard key)
        self.pending: dict[str, tuple[str, Any]] = {}

    def set(self, key: str, value: Any, ds_key: str) -> None:
        self.leaves[key] = value
        self.origin[key] = ds_key

    def note(self, ds_key: str, value: Any = None, why: str = "") -> None:
        shown = ds_key if value is None else f"{ds_key}={show(value)}"
        self.notes.append(f"{shown} ({why})" if why else shown)

    def bad(self, ds_key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.where}: {ds_key}: expected {expected}, got {value!r}")

    def refuse(self, ds_key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"{self.where}: {ds_key}={show(value)} is not supported: {why}")

    def integer(self, ds_key: str, value: Any, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad(ds_key, value, "a number")
        if isinstance(value, float) and not value.is_integer():
            raise self.bad(ds_key, value, "a whole number")
        if value < minimum:
            raise self.bad(ds_key, value, f"a number >= {minimum}")
        return int(value)

    def number(self, ds_key: str, value: Any, minimum: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad(ds_key, value, "a number")
        if minimum is not None and value < minimum:
            raise self.bad(ds_key, value, f"a number >= {minimum:g}")
        return float(value)

    def flag(self, ds_key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.bad(ds_key, value, "true or false")
        return value

    def block(self, ds_key: str, value: Any) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.bad(ds_key, value, "a mapping")
        return value


# -- handlers -------------------------------------------------------------------------------


def sets(target: str, kind: str = "int", minimum: float = 0) -> Handler:
    """Set zshard ``target`` from the value, checked as ``kind`` (int, number, flag, str)."""

    def apply(m: DsMapping, ds_key: str, value: Any) -> None:
        if kind == "int":
            v: Any = m.integer(ds_key, value, int(minimum))
        elif kind == "number":
            v = m.number(ds_key, value, minimum)
        elif kind == "positive":
            v = m.number(ds_key, value, 0)
            if v <= 0:
                raise m.bad(ds_key, value, "a number > 0")
        elif kind == "flag":
            v = m.flag(ds_key, value)
        else:
            if not isinstance(value, str) or not value:
                raise m.bad(ds_key, value, "a string")
            v = value
        m.set(target, v, ds_key)

    return apply


def pending(name: str) -> Handler:
    """Keep the value for the section's post-processing."""

    def apply(m: DsMapping, ds_key: str, value: Any) -> None:
        m.pending[name] = (ds_key, value)

    return apply


# -- value tests ----------------------------------------------------------------------------


def is_off(value: Any) -> bool:
    """A section that is not turned on: absent keys, ``enabled: false``, or false/null."""
    if value in (None, False):
        return True
    return isinstance(value, Mapping) and not value.get("enabled", False)


def empty_or_off(value: Any) -> bool:
    return value in (None, False, {}) or (
        isinstance(value, Mapping) and all(v in (None, False, 0, "", []) for v in value.values())
    )
