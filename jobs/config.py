"""Config loading shared by every job: a typed dataclass, filled from a YAML file, then a few
CLI overrides on top.

Contract: `load_config(Cls, path, overrides)` returns a `Cls` instance. YAML keys must be field
names of `Cls` (nested dataclasses are nested mappings); an unknown key is an error that names the
key and the file, so a typo never silently falls back to a default. Overrides whose value is None
(a CLI flag that was not given) are ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, TypeVar

import yaml

T = TypeVar("T")


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a (possibly nested) mapping, rejecting unknown keys."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = from_mapping(hint, value, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def to_mapping(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(obj: T, overrides: Mapping[str, Any]) -> T:
    """Set dotted fields (`"train.max_steps": 10`) on a copy of `obj`; None values are skipped."""
    obj = copy.deepcopy(obj)
    for dotted, value in overrides.items():
        if value is None:
            continue
        target = obj
        *parents, leaf = dotted.split(".")
        for p in parents:
            target = getattr(target, p)
        if leaf not in {f.name for f in dataclasses.fields(target)}:
            raise ValueError(f"override {dotted!r}: {type(target).__name__} has no field {leaf!r}")
        setattr(target, leaf, value)
    return obj


def load_config(cls: type[T], path: Optional[str | Path] = None, overrides: Optional[Mapping[str, Any]] = None,
                base: Optional[T] = None) -> T:
    """`base` (or `cls()`), updated by the YAML file at `path`, then by `overrides`."""
    cfg = base if base is not None else cls()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
        merged = _merge(to_mapping(cfg), data)
        cfg = from_mapping(cls, merged, str(p))
    return apply_overrides(cfg, overrides or {})


def _merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out
