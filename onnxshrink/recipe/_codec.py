"""Typed dataclasses from plain dicts (recipe files) and back, with one-line errors.

A value read from YAML or JSON is checked against the field's annotation: ``bool``, ``int``,
``float`` (ints accepted), ``str``, ``Literal[...]``, ``X | None``, ``tuple[T, ...]`` (a list
in the file) and ``Mapping[str, T]``. Unknown keys get a did-you-mean hint (difflib).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from onnxshrink.errors import ConfigError


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when a known word is close to ``word``, else ``''``."""
    close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_keys(where: str, given: Iterable[str], known: Iterable[str]) -> None:
    """Raise ConfigError naming the first unknown key of ``given``, with a hint."""
    known = list(known)
    for key in given:
        if key not in known:
            raise ConfigError(f"{where}: unknown option '{key}'{did_you_mean(str(key), known)}; known: {', '.join(known)}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin in (Mapping, dict, typing.Mapping):
        return f"a mapping of names to {_describe(typing.get_args(hint)[1])}"
    if hint is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the annotation ``hint`` asks, or ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue
    elif origin is typing.Literal:
        if value in typing.get_args(hint) and isinstance(value, str | int):
            return value
    elif origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, list | tuple):
            return tuple(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    elif origin in (Mapping, dict, typing.Mapping):
        key_t, val_t = typing.get_args(hint)
        if isinstance(value, Mapping):
            return {coerce(k, key_t, where): coerce(v, val_t, f"{where}[{k!r}]") for k, v in value.items()}
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is type(None):
        if value is None:
            return None
    else:  # pragma: no cover - a field type this codec does not know is a bug
        raise TypeError(f"cannot read {hint!r} from a recipe")
    raise ConfigError(f"{where} must be {_describe(hint)}, not {value!r}")


def field_hints(cls: type[Any]) -> dict[str, Any]:
    """Resolved annotations of a dataclass's init fields, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def build(cls: type[Any], data: Mapping[str, Any], where: str) -> Any:
    """``cls(**data)`` with every value checked against its annotation."""
    hints = field_hints(cls)
    unknown_keys(where, data, hints)
    values = {k: coerce(v, hints[k], f"{where}: option '{k}'") for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None


def plain(value: Any) -> Any:
    """A dataclass value as YAML/JSON-ready data (tuples as lists, mappings sorted by key)."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(value[k]) for k in sorted(value)}
    return value


def to_plain_dict(obj: Any) -> dict[str, Any]:
    """Every init field of a dataclass instance, in declaration order."""
    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
