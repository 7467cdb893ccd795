"""A stage's parameters as one frozen dataclass, and the TOML schema derived from it.

Why. A stage used to be defined in three to five places: a hand-written key table for the
TOML schema, the constructor's arguments, the kernel's parameter dataclass, each with its own
copy of the defaults. Now a stage declares ``Params`` (a frozen dataclass, reusing the
kernel's where they are the same thing, validated in ``__post_init__``) and this module reads
everything else off it: the allowed keys and their types (from the annotations), defaults,
choices (``Literal``), the one-line docs (field metadata), the "did you mean" messages, and
the schema tables of ``pipelines/README.md`` (:func:`schema_markdown`).

Keys every stage takes besides its ``Params``: ``type``, ``name`` (default: the type) and
``streams`` (default: the class's ``streams``). A field whose type is itself a Params
dataclass is a nested TOML table (the risk stage's ``signal = { long_threshold = 0.55 }``),
validated key by key like the outer one.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from typing import Any, Literal, get_args, get_origin

from .errors import ConfigError


def param(default: Any = MISSING, doc: str = "", **kw: Any) -> Any:
    """A ``Params`` field with its one-line meaning (shown in errors and in the docs)."""
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple (or a default_factory) for a mutable default")
    return dataclasses.field(default=default, metadata={"doc": doc}, **kw)


@dataclass(frozen=True)
class Key:
    """One allowed key of a table: its type, default and meaning."""

    type: type | tuple[type, ...]
    default: Any = None
    doc: str = ""
    required: bool = False
    choices: tuple[Any, ...] | None = None
    schema: Mapping[str, Key] | None = None  # a nested table's own keys


def _typename(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(_typename(x) for x in t)
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false",
            list: "a list", dict: "a table"}.get(t, t.__name__)


def take(table: Any, schema: Mapping[str, Key], where: str, source: str) -> dict[str, Any]:
    """Validate ``table`` against ``schema``; return the values with defaults filled in.

    ``where`` is the dotted location (``stages[2]``), ``source`` the file, both for messages.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {where} must be a table, got {type(table).__name__}")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{source}: unknown key {where}.{key}{hint}; allowed: {', '.join(sorted(schema))}"
            )
        spec = schema[key]
        types_ = spec.type if isinstance(spec.type, tuple) else (spec.type,)
        ok = isinstance(value, types_) and not (isinstance(value, bool) and bool not in types_)
        if not ok and float in types_ and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"{source}: {where}.{key} must be {_typename(spec.type)}, got {value!r}")
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(
                f"{source}: {where}.{key} = {value!r} is not allowed; choose one of "
                f"{', '.join(repr(c) for c in spec.choices)}"
            )
        if spec.schema is not None:
            value = take(value, spec.schema, f"{where}.{key}", source)
        out[key] = value
    for key, spec in schema.items():
        if key not in out:
            if spec.required:
                raise ConfigError(f"{source}: {where}.{key} is required ({spec.doc})")
            out[key] = spec.default
    return out


# --- dataclass → schema ----------------------------------------------------------------
_TOML_TYPES = {int: int, float: float, str: str, bool: bool}


def _toml_types(annotation: Any) -> tuple[tuple[type, ...], tuple[Any, ...] | None]:
    """The TOML value types an annotation accepts, and its choices (``Literal``)."""
    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        return tuple(dict.fromkeys(type(c) for c in choices)), choices
    if origin in (typing.Union, types.UnionType):
        out: list[type] = []
        choices = None
        for arg in get_args(annotation):
            if arg is type(None):
                continue
            ts, cs = _toml_types(arg)
            out.extend(ts)
            choices = cs or choices
        return tuple(dict.fromkeys(out)), choices
    if origin in (tuple, list) or annotation in (tuple, list):
        return (list,), None
    if origin in (dict, Mapping) or annotation in (dict, Mapping) or origin is typing.Mapping:
        return (dict,), None
    if annotation in _TOML_TYPES:
        return (_TOML_TYPES[annotation],), None
    raise TypeError(f"a Params field cannot be read from TOML: {annotation!r}")


def _field_doc(cls: type, f: dataclasses.Field) -> str:
    return f.metadata.get("doc") or getattr(cls, "DOCS", {}).get(f.name, "")


def fields_of(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """The init fields of a Params dataclass with their resolved annotations."""
    return dict(_fields_of(cls))


@functools.cache
def _fields_of(cls: type) -> tuple[tuple[str, tuple[dataclasses.Field, Any]], ...]:
    """Once per class: ``get_type_hints`` evaluates every string annotation (``compile``
    per field) for each of a pipeline's stage classes, which every batch job paid."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, (f, hints[f.name])) for f in dataclasses.fields(cls) if f.init)


def schema_of(cls: type) -> dict[str, Key]:
    """The TOML keys of a Params dataclass (without ``name``/``streams``)."""
    out = {}
    for name, (f, hint) in fields_of(cls).items():
        if dataclasses.is_dataclass(hint):
            default = f.default if f.default is not MISSING else f.default_factory()
            out[name] = Key(dict, params_as_toml(default), _field_doc(cls, f), schema=schema_of(hint))
            continue
        accepted, choices = _toml_types(hint)
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = None
        out[name] = Key(accepted if len(accepted) > 1 else accepted[0], _toml_default(default),
                        _field_doc(cls, f),
                        required=f.default is MISSING and f.default_factory is MISSING,
                        choices=choices)
    return out


def _toml_default(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def build_params(cls: type, values: Mapping[str, Any]) -> Any:
    """A Params instance from validated TOML values (lists become tuples where annotated)."""
    kwargs = {}
    for name, (_, hint) in fields_of(cls).items():
        if name not in values:
            continue
        v = values[name]
        if isinstance(v, list):
            v = _list_items(name, v, hint)
        elif isinstance(v, Mapping) and dataclasses.is_dataclass(hint):
            v = build_params(hint, v)
        kwargs[name] = v
    return cls(**kwargs)


def _list_items(name: str, values: list, hint: Any) -> Any:
    """A TOML list checked against ``tuple[X, ...]`` (a tuple of X; ints taken as floats)."""
    for h in (get_args(hint) if get_origin(hint) in (typing.Union, types.UnionType) else (hint,)):
        if get_origin(h) is tuple:
            args = get_args(h)
            item = args[0] if args else Any
            if item in _TOML_TYPES:
                out = []
                for x in values:
                    if item is float and isinstance(x, int) and not isinstance(x, bool):
                        x = float(x)
                    if not isinstance(x, item) or (isinstance(x, bool) and item is not bool):
                        raise ConfigError(f"{name} must be a list of {_typename(item).split(' ', 1)[1]}s, "
                                          f"got {values!r}")
                    out.append(x)
                return tuple(out)
            return tuple(values)
    return values


def params_as_toml(params: Any) -> dict[str, Any]:
    """A Params instance as TOML-ready values (the inverse of :func:`build_params`)."""
    out = {}
    for k in fields_of(type(params)):
        v = getattr(params, k)
        out[k] = params_as_toml(v) if dataclasses.is_dataclass(v) else _toml_default(v)
    return out


def schema_markdown(type_name: str, stage_cls: type) -> str:
    """A stage type's keys as a Markdown table (``pipelines/README.md`` is made of these)."""
    summary = " ".join((stage_cls.__doc__ or "").strip().split("\n\n")[0].split())
    rows = [f"#### `type = \"{type_name}\"`", "", summary, "",
            "| key | type | default | meaning |", "|---|---|---|---|",
            "| `name` | string | the type | stage name (topics, logs, stats) |",
            f"| `streams` | list | `{list(stage_cls.streams)}` | compute stream preference list, first usable wins |"]
    params_cls = getattr(stage_cls, "Params", None)
    if params_cls is not None:
        for name, key in _flat_keys(schema_of(params_cls)):
            kind = " or ".join(_typename(t).removeprefix("a ").removeprefix("an ")
                               for t in (key.type if isinstance(key.type, tuple) else (key.type,)))
            if key.choices:
                kind = " / ".join(f"`{c!r}`".replace("'", '"') for c in key.choices)
            default = "required" if key.required else f"`{_md_value(key.default)}`"
            rows.append(f"| `{name}` | {kind} | {default} | {key.doc} |")
    return "\n".join(rows) + "\n"


def _flat_keys(schema: Mapping[str, Key], prefix: str = "") -> list[tuple[str, Key]]:
    """A schema's keys with nested tables spelled out as ``table.key``."""
    out = []
    for name, key in schema.items():
        if key.schema is not None:
            out.extend(_flat_keys(key.schema, f"{prefix}{name}."))
        else:
            out.append((prefix + name, key))
    return out


def _md_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, float) and v == float("inf"):
        return "inf"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:_}"
    return repr(v)
