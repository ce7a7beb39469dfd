"""The one rule by which an experiment's plan is built from a named preset and overrides."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def from_preset(cls: type[T], presets: dict[str, dict[str, Any]], name: str, overrides: dict[str, Any]) -> T:
    """``cls`` (a dataclass) with preset ``name``'s fields, then every override that is not None.

    Raises ``ValueError`` for an unknown preset or an override that is not a field of ``cls``.
    """
    if name not in presets:
        raise ValueError(f"unknown scale {name!r}; choose one of: {', '.join(presets)}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    return cls(**{**presets[name], **{k: v for k, v in overrides.items() if v is not None}})
