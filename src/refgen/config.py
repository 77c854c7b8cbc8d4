"""Typed dataclass configs from YAML or dicts: the one `from_dict` / `from_yaml` behind every config class.

A field whose type is a dataclass is built from a nested mapping, recursively; a tuple field from a list. A key
the dataclass does not have is an error that names it, its section and the file (a typo must not silently fall
back to a default); CLI overrides that are None leave the file's value alone.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    """Each field's resolved annotation; Any for one that cannot be resolved at run time (then its value is
    passed through as given)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation names something only imported for type checkers
        import sys

        ns = vars(sys.modules[cls.__module__])
        out = {}
        for f in dataclasses.fields(cls):
            try:
                out[f.name] = eval(f.type, ns) if isinstance(f.type, str) else f.type
            except Exception:
                out[f.name] = Any
        return out


def _dataclass_in(tp) -> type | None:
    """The dataclass a field annotation names, directly or as `X | None`; else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a) and isinstance(a, type)]
        return found[0] if len(found) == 1 else None
    return None


def _scalars_in(tp) -> set:
    """The number/bool types a field annotation allows (`float`, `int | None`, ...); empty for anything else."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return {a for a in args if a in (int, float, bool)}


def _coerce(tp, value, section: str, source: str | None):
    if isinstance(value, str) and _scalars_in(tp) and str not in typing.get_args(tp):
        # PyYAML reads YAML 1.1, where `1e-3` (no dot) is text: say so instead of failing later in a comparison.
        where = f"{source}: " if source is not None else ""
        try:
            float(value)
            hint = " (YAML 1.1 reads 1e-3 as text: write 1.0e-3)"
        except ValueError:
            hint = ""
        raise ValueError(f"{where}{section} must be a number, got the string {value!r}{hint}")
    sub = _dataclass_in(tp)
    if sub is not None and value is not None and not isinstance(value, sub):
        return from_dict(sub, value, source=source, section=section)  # refuses anything but a mapping
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        if args and all(a is float for a in args if a is not Ellipsis):
            return tuple(float(x) for x in value)
        return tuple(value)
    return value


def from_dict(cls, d: dict[str, Any], *, source: str | Path | None = None, section: str = ""):
    """`cls(**d)` for a dataclass `cls`, with every nested dataclass field built from its own mapping.

    Refuses a key `cls` (or a nested section) does not define, naming the key, the section and `source` (the file
    the mapping came from, if any). Values that are already instances are kept as they are."""
    where = f"{source}: " if source is not None else ""
    if not isinstance(d, dict):
        what = f"section '{section}'" if section else cls.__name__
        raise ValueError(f"{where}{what} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
        inside = f" in section '{section}'" if section else ""
        raise ValueError(f"{where}unknown keys {bad}{inside} for {cls.__name__}; known: {sorted(known)}")
    types_ = _field_types(cls)
    prefix = f"{section}." if section else ""
    return cls(**{k: _coerce(types_[k], v, prefix + k, None if source is None else str(source))
                  for k, v in d.items()})


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: nested settings compared or logged key by key."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping ({} for an empty file)."""
    import yaml

    d = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(d).__name__}")
    return d


def from_yaml(cls, path: str | Path, **overrides):
    """`from_dict(cls, yaml | overrides)`; overrides that are None leave the file's value alone."""
    d = read_yaml(path)
    d.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, d, source=path)
