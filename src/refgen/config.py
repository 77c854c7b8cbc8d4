"""Typed dataclass configs from YAML: the one `from_yaml` behind every config class.

A key the dataclass does not have is an error that names it (a typo must not silently fall back to a
default); CLI overrides that are None leave the file's value alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


def from_yaml(cls, path: str | Path, **overrides):
    """`cls(**yaml, **overrides)` for a dataclass `cls`, refusing keys it does not define."""
    import yaml

    d = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
        raise ValueError(f"{path}: unknown keys {bad} for {cls.__name__}; known: {sorted(known)}")
    d.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**d)
