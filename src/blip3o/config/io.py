"""Generic I/O for dataclass config trees: dicts, strict loading, dotted overrides, YAML and diffs.

Nothing here knows a concrete section: the structure and the types come from ``dataclasses.fields``
and ``typing.get_type_hints``, so new sections in :mod:`blip3o.config.schema` work unchanged. Loading
is strict in the spirit of nanoGPT's ``configurator.py``: unknown keys and type mismatches are errors
(:class:`ConfigError`) naming the dotted key, what was expected and what was given.

Supported field types: ``int`` (bools rejected), ``float`` (ints accepted and converted; numeric
strings such as ``"1e-4"``, which YAML 1.1 reads as strings, too), ``bool``, ``str``, ``pathlib.Path``,
``Literal[...]``, unions such as ``X | None``, ``list[T]``, ``tuple[T, ...]``, ``tuple[A, B]``,
``dict[str, T]``, ``Any`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from blip3o.config.schema import ConfigError

__all__ = ["apply_overrides", "diff", "dump_yaml", "dumps_yaml", "from_dict", "load_yaml", "to_dict"]

T = TypeVar("T")

# A float written without a dot (``1e-4``) is a string to YAML 1.1; accept exactly such numerals.
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def to_dict(cfg: Any) -> Any:
    """Plain, YAML-safe form of a config tree: dataclasses become dicts (in field order), tuples lists.

    Only ``init`` fields are written, so derived fields never reach a file.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {key: to_dict(value) for key, value in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [to_dict(value) for value in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _init_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _type_name(tp: Any) -> str:
    """Readable name of a type hint: ``int | None``, ``list[str]``, ``one of 'a', 'b'``."""
    if tp is type(None):
        return "None"
    if tp is Ellipsis:
        return "..."
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in typing.get_args(tp))}]"
    return getattr(tp, "__name__", repr(tp))


def _mismatch(tp: Any, value: Any, path: str) -> ConfigError:
    return ConfigError(f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})", key=path)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and return it in its typed form."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, path=path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        # ``True == 1``: compare types too, so Literal[1] does not accept True.
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        choices = ", ".join(repr(choice) for choice in args)
        raise ConfigError(f"must be one of {choices}, got {value!r}", key=path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as err:
                errors.append(err)
        # An error from inside a nested value (a section's field, a list item) is the precise one.
        if len(errors) == 1 and errors[0].key != path:
            raise errors[0]
        raise _mismatch(tp, value, path)
    if origin is list or origin is tuple:
        if not isinstance(value, list | tuple):
            raise _mismatch(tp, value, path)
        if origin is list:
            return [_convert(args[0] if args else Any, item, f"{path}[{i}]") for i, item in enumerate(value)]
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item_tp = args[0] if args else Any
            return tuple(_convert(item_tp, item, f"{path}[{i}]") for i, item in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"expected {_type_name(tp)} ({len(args)} items), got {value!r}", key=path)
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_convert(arg, item, f"{path}[{i}]") for i, (arg, item) in pairs)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(tp, value, path)
        key_tp, value_tp = args if args else (Any, Any)
        return {
            _convert(key_tp, key, _join(path, str(key))): _convert(value_tp, item, _join(path, str(key)))
            for key, item in value.items()
        }
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
        raise _mismatch(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, Path) and isinstance(value, str | Path):
        return tp(value)
    # bool, int, str, None and any other class: an instance check, except that bool (an int
    # subclass) must not pass for int.
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    hint = "; quote it to pass it as text" if tp is str else ""
    raise ConfigError(f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}", key=path)


def from_dict(cls: type[T], data: Any, *, path: str = "") -> T:
    """Build ``cls`` from a plain mapping, strictly: unknown keys and wrong types raise ConfigError.

    Missing keys take the dataclass defaults; nested sections recurse; the section's
    ``__post_init__`` runs, and its errors are re-raised with their dotted ``path``. An instance of
    ``cls`` is accepted too and re-validated.
    """
    if isinstance(data, cls):
        data = to_dict(data)
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping for {cls.__name__}, got {data!r} ({type(data).__name__})", key=path)
    fields = _init_fields(cls)
    allowed = [f.name for f in fields]
    for key in data:
        if key not in allowed:
            raise ConfigError(f"unknown key; allowed keys: {', '.join(allowed)}", key=_join(path, str(key)))
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], _join(path, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError("missing required key", key=_join(path, f.name))
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.with_prefix(path) from None
    except (TypeError, ValueError) as err:
        # A section whose __post_init__ raised a plain error: keep its text, add where it happened.
        raise ConfigError(f"invalid {cls.__name__}: {err}", key=path) from err


def _strip_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _merge(old: Any, new: Any) -> Any:
    """Deep-merge mapping ``new`` into mapping ``old`` (a section override keeps unnamed fields)."""
    if isinstance(old, dict) and isinstance(new, Mapping):
        merged = dict(old)
        for key, value in new.items():
            merged[key] = _merge(old.get(key), value)
        return merged
    return new


def _set_override(data: dict[str, Any], cls: type, item: str) -> str:
    """Apply one ``dotted.key=value`` override to the plain tree ``data``; return the dotted key."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is malformed: expected dotted.key=value, e.g. world.size=32")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
    parts = key.split(".")
    node, tp, where = data, cls, ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            allowed = [f.name for f in _init_fields(tp)]
            if part not in allowed:
                level = f" at {where!r}" if where else ""
                raise ConfigError(
                    f"override {item!r}: unknown key {_join(where, part)!r}; valid keys{level}: {', '.join(allowed)}"
                )
            child_tp = _strip_optional(_hints(tp)[part])
        elif typing.get_origin(tp) is dict:
            args = typing.get_args(tp)
            child_tp = _strip_optional(args[1]) if args else Any
        else:
            raise ConfigError(f"override {item!r}: {where!r} is a {_type_name(tp)}, not a section")
        if last:
            is_section = dataclasses.is_dataclass(child_tp) and isinstance(child_tp, type)
            node[part] = _merge(node.get(part), value) if is_section else value
        else:
            if node.get(part) is None:
                node[part] = {}  # descending into an unset optional section or dict starts from defaults
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {item!r}: {_join(where, part)!r} is {node[part]!r}, not a section")
            node, tp = node[part], child_tp
        where = _join(where, part)
    return key


def _related(a: str, b: str) -> bool:
    """Whether dotted keys ``a`` and ``b`` are equal or one is a section containing the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".") or a.startswith(b + "[")


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Return a new, re-validated config with ``dotted.key=value`` overrides applied in order.

    Values are parsed with ``yaml.safe_load`` (``1e-4``, ``true``, ``[1, 2]``, ``null``). A mapping
    given for a whole section (``world={size: 32}``) is merged into it; a mapping for a ``dict``
    field replaces it. ``cfg`` is never mutated.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not a single str")
    cls = type(cfg)
    data = to_dict(cfg)
    keys = [_set_override(data, cls, item) for item in overrides]
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        culprits = [item for item, key in zip(overrides, keys, strict=True) if err.key and _related(err.key, key)]
        if culprits:
            raise ConfigError(f"override {culprits[-1]!r}: {err}") from None
        if overrides:
            quoted = ", ".join(repr(item) for item in overrides)
            raise ConfigError(f"{err} (after overrides {quoted})") from None
        raise


def dumps_yaml(cfg: Any) -> str:
    """YAML text of a config tree, fields in declaration order; ``from_dict`` reads it back exactly."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_yaml(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``cfg`` as YAML atomically (temp file in the same directory, then ``os.replace``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = dumps_yaml(cfg)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; a config is meant to be read by anyone
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


def load_yaml(path: str | os.PathLike[str], cls: type[T]) -> T:
    """Read a YAML (or JSON) file into ``cls`` with :func:`from_dict`; an empty file gives the defaults."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{os.fspath(path)}: not valid YAML ({err})") from err
    try:
        return from_dict(cls, {} if data is None else data)
    except ConfigError as err:
        raise ConfigError(f"{os.fspath(path)}: {err}") from None


def diff(cfg: Any, base: Any) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ, as ``{key: (base_value, cfg_value)}`` in plain form.

    Recurses through nested dataclasses; lists, dicts and scalars are compared as whole values.
    Typical use: what a run changed with respect to its preset.
    """
    if type(cfg) is not type(base):
        raise TypeError(f"cannot diff a {type(cfg).__name__} against a {type(base).__name__}")
    changes: dict[str, tuple[Any, Any]] = {}

    def walk(new: Any, old: Any, prefix: str) -> None:
        for f in _init_fields(type(new)):
            key = _join(prefix, f.name)
            new_value, old_value = getattr(new, f.name), getattr(old, f.name)
            if dataclasses.is_dataclass(new_value) and type(new_value) is type(old_value):
                walk(new_value, old_value, key)
            elif to_dict(new_value) != to_dict(old_value):
                changes[key] = (to_dict(old_value), to_dict(new_value))

    walk(cfg, base, "")
    return changes
