"""What the model configs share: reading one from a dict (a file's metadata, a training config)."""

from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], d: dict) -> T:
    """``cls(**d)`` for a config dataclass, refusing keys it does not have: an error that names
    them and the fields it knows (a file from a newer pack, a typo in a training config)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**d)
