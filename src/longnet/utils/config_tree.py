"""Configuration declared once: a tree of dataclasses, and everything else generated from it.

A *tree* is a dataclass whose fields are *sections*, themselves dataclasses whose fields are
*settings*. Each setting is declared once, with :func:`setting`: its type (the annotation), its
default, whether it fixes a run's identity, and its help text (the string literal written right
below it, as for module attributes). From that declaration this module generates

* the command line (:func:`add_arguments`): one ``--name`` per setting, in one argument group per
  section, typed from the annotation (``bool`` gives ``--x/--no-x``, ``list[int]`` takes
  ``1,2,4``, ``dict`` takes a JSON object), its help from the docstring, ``[run]`` before the
  settings that fix a run's identity and ``(default: ...)`` from the default itself;
* the file form: :func:`read_toml` reads ``[section]`` tables (or top-level ``name = value``
  keys) and :func:`to_toml` writes a tree back;
* type and range checks (:func:`check_types`), with errors naming the option;
* the identity rule on resume (:func:`merge_stored`).

Setting names are unique across the sections, so each has one flat spelling, ``--seq-len`` on the
command line and ``seq_len`` in a flat dict, and its section is only where it is documented.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import tomllib

__all__ = ["setting", "Leaf", "leaves", "flag", "add_arguments", "given_values", "read_toml", "to_toml",
           "nested", "flat", "from_flat", "check_types", "merge_stored", "field_docs"]

_META = "longnet_setting"


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
            identity: bool = False, inherit: bool = True, choices: tuple[Any, ...] | None = None,
            minimum: float | None = None, metavar: str | None = None, default_text: str | None = None) -> Any:
    """A setting of a config section (a ``dataclasses.field`` carrying its rules).

    Args:
        default, factory: the default value, or a function making it.
        identity: the setting fixes a run's identity: a resumed run keeps the stored value, and a
            different given value is refused (``[run]`` in ``--help``).
        inherit: a resumed run takes the stored value unless one is given (False: the setting
            describes one launch, such as the device, and falls back to its default).
        choices: the allowed values.
        minimum: the smallest allowed value of a number (``None`` is always allowed for
            optional settings).
        metavar: the placeholder in ``--help``.
        default_text: how ``--help`` states a default that is derived (``None`` in the code).
    """
    meta = {_META: {"identity": identity, "inherit": inherit, "choices": choices, "minimum": minimum,
                    "metavar": metavar, "default_text": default_text}}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Leaf:
    """One setting of a tree: where it lives, its type and rules, its help."""

    section: str
    name: str
    type: Any
    default: Any
    doc: str
    identity: bool
    inherit: bool
    choices: tuple[Any, ...] | None
    minimum: float | None
    metavar: str | None
    default_text: str | None

    @property
    def flag(self) -> str:
        return flag(self.name)

    @property
    def base_type(self) -> Any:
        """The annotation without ``| None``."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        if typing.get_origin(self.type) in (typing.Union, types.UnionType) and len(args) == 1:
            return args[0]
        return self.type

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.type)


def flag(name: str) -> str:
    """The command-line spelling of a setting: ``seq_len`` -> ``--seq-len``."""
    return "--" + name.replace("_", "-")


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written below the fields of a dataclass (one paragraph each, whitespace
    normalised), read from its source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@functools.lru_cache(maxsize=None)
def leaves(tree: type) -> tuple[Leaf, ...]:
    """Every setting of ``tree``, section by section; names must be unique across sections."""
    out: list[Leaf] = []
    for section in dataclasses.fields(tree):
        cls = typing.get_type_hints(tree)[section.name]
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata.get(_META)
            if meta is None:
                raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting()")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append(Leaf(section.name, f.name, hints[f.name], default, docs.get(f.name, ""), **meta))
    names = [leaf.name for leaf in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TypeError(f"settings named in two sections of {tree.__name__}: {twice}")
    return tuple(out)


def _leaf_map(tree: type) -> dict[str, Leaf]:
    return {leaf.name: leaf for leaf in leaves(tree)}


# ------------------------------------------------------------------------------- command line
def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}")
    return values


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value) if value else "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def help_text(leaf: Leaf) -> str:
    """``--help`` of one setting: ``[run]``, the docstring, the default."""
    text = ("[run] " if leaf.identity else "") + leaf.doc
    shown = leaf.default_text if leaf.default_text is not None else (
        None if leaf.default is None else _show(leaf.default))
    if shown is not None:
        text += f" (default: {shown})"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, tree: type) -> None:
    """One option per setting of ``tree``, grouped by section; an option not given is absent
    from the parsed namespace (so given values can be told from defaults)."""
    groups: dict[str, Any] = {}
    for leaf in leaves(tree):
        if leaf.section not in groups:
            cls = typing.get_type_hints(tree)[leaf.section]
            title = (inspect.getdoc(cls) or leaf.section).splitlines()[0]
            groups[leaf.section] = parser.add_argument_group(f"{leaf.section}: {title}")
        kind = leaf.base_type
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text(leaf), "dest": leaf.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            origin = typing.get_origin(kind) or kind
            kwargs["type"] = {int: int, float: float, str: str, list: _int_list, dict: _json_object}[origin]
            placeholder = {list: "N,...", dict: "JSON"}.get(origin, leaf.name.upper().split("_")[-1])
            kwargs["metavar"] = leaf.metavar or placeholder
            if leaf.choices is not None:
                kwargs["choices"] = leaf.choices
                kwargs.pop("metavar")
        groups[leaf.section].add_argument(leaf.flag, **kwargs)


def given_values(args: argparse.Namespace, tree: type) -> dict[str, Any]:
    """The settings given on the command line (a flat dict)."""
    return {leaf.name: getattr(args, leaf.name) for leaf in leaves(tree) if hasattr(args, leaf.name)}


# ---------------------------------------------------------------------------------- file form
def read_toml(path: str | Path, tree: type) -> dict[str, Any]:
    """The settings of a TOML file as a flat dict: ``[section]`` tables of ``name = value``, or
    top-level ``name = value`` keys. Unknown names raise ``ValueError`` naming them and the file."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"--config {path}: cannot read it ({err.strerror or err})") from err
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"--config {path}: not valid TOML ({err})") from err
    known = _leaf_map(tree)
    sections = {f.name for f in dataclasses.fields(tree)}
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key in sections and isinstance(value, dict):  # a table (the setting `data` is a string)
            for name, v in value.items():
                leaf = known.get(name)
                if leaf is None or leaf.section != key:
                    where = f" (it belongs in [{leaf.section}])" if leaf is not None else ""
                    raise ValueError(f"--config {path}: [{key}] has no setting {name!r}{where}")
                out[name] = v
        elif key in known:
            out[key] = value
        else:
            raise ValueError(f"--config {path}: unknown setting or section {key!r}; the sections are "
                             f"{', '.join(sorted(sections))}")
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if not (isinstance(value, float) and not math.isfinite(value)) else str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(config: Any, header: str = "") -> str:
    """``config`` (a tree instance) as TOML, one table per section; ``None`` values are left out
    (they mean "derived") and each setting carries its help as a comment."""
    lines = [f"# {line}" for line in header.splitlines()]
    section = None
    for leaf in leaves(type(config)):
        value = getattr(getattr(config, leaf.section), leaf.name)
        if leaf.section != section:
            section = leaf.section
            lines += ["", f"[{section}]"]
        if value is None:
            continue
        lines.append(f"{leaf.name} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


# ------------------------------------------------------------------------------- conversions
def nested(config: Any) -> dict[str, dict[str, Any]]:
    """``{section: {name: value}}`` (JSON types)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def flat(config: Any) -> dict[str, Any]:
    """``{name: value}`` over every section."""
    return {name: value for section in nested(config).values() for name, value in section.items()}


def from_flat(tree: type, values: dict[str, Any]) -> Any:
    """A tree instance from a flat dict (missing names take their defaults)."""
    known = _leaf_map(tree)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown settings {unknown}")
    parts: dict[str, dict[str, Any]] = {f.name: {} for f in dataclasses.fields(tree)}
    for name, value in values.items():
        parts[known[name].section][name] = value
    hints = typing.get_type_hints(tree)
    return tree(**{name: hints[name](**kw) for name, kw in parts.items()})


def _is(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind) or kind
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(kind) or (Any,)
        return isinstance(value, list) and (item is Any or all(_is(v, item) for v in value))
    return isinstance(value, origin)


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
          dict: "a JSON object / TOML table"}


def check_types(config: Any) -> None:
    """``ValueError`` naming the first setting whose value has the wrong type, is not one of its
    choices or is below its minimum."""
    for leaf in leaves(type(config)):
        value = getattr(getattr(config, leaf.section), leaf.name)
        if value is None and leaf.optional:
            continue
        kind = leaf.base_type
        if not _is(value, kind):
            what = _NAMES.get(typing.get_origin(kind) or kind, str(kind))
            if typing.get_origin(kind) is list:
                what = "a list of integers"
            raise ValueError(f"{leaf.flag} must be {what}, got {value!r}")
        if leaf.choices is not None and value not in leaf.choices:
            raise ValueError(f"{leaf.flag} must be one of {', '.join(map(str, leaf.choices))}, got {value!r}")
        if leaf.minimum is not None:
            items = value if isinstance(value, list) else [value]
            if any(not (v >= leaf.minimum) or (isinstance(v, float) and not math.isfinite(v)) for v in items):
                bound = "positive" if leaf.minimum == 1 and kind is int else f">= {leaf.minimum:g}"
                raise ValueError(f"{leaf.flag} must be {bound}, got {value!r}")


def _same(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def merge_stored(tree: type, given: dict[str, Any], stored: dict[str, Any], where: str) -> dict[str, Any]:
    """The flat settings of a resumed run: its identity settings as stored (a different given
    value raises ``ValueError`` naming the setting, the stored and the given value), its other
    settings as given, else as stored when they are inherited."""
    values: dict[str, Any] = {}
    for leaf in leaves(tree):
        if leaf.identity:
            if leaf.name not in stored:
                raise ValueError(f"{where} lacks the setting {leaf.name!r}: not a run of this longnet version")
            if leaf.name in given and not _same(given[leaf.name], stored[leaf.name]):
                raise ValueError(
                    f"{leaf.flag} {given[leaf.name]!r} differs from the resumed run's {stored[leaf.name]!r} "
                    f"(stored in {where}); it fixes the run's identity: drop {leaf.flag} to keep the run's "
                    "value, or start a new run with another --out")
            values[leaf.name] = stored[leaf.name]
        elif leaf.name in given:
            values[leaf.name] = given[leaf.name]
        elif leaf.inherit and leaf.name in stored:
            values[leaf.name] = stored[leaf.name]
    return values


def iter_sections(tree: type) -> Iterator[tuple[str, type]]:
    """``(section name, section class)`` of ``tree``."""
    hints = typing.get_type_hints(tree)
    for f in dataclasses.fields(tree):
        yield f.name, hints[f.name]
