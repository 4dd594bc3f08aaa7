"""Frames as JSON-ready values, for test vectors, logs and operator tools.

Integers are JSON numbers, except ``uint64`` fields, which are strings of
decimal digits (JSON numbers lose precision above 2^53); enumerations are their
names; nested records are objects; nil is ``null``.
"""

from __future__ import annotations

import enum
from typing import Any

from protocols.schema import Enum, List, Nested, Optional, Record, UInt, WireType

__all__ = ["from_json", "record_from_json", "record_to_json", "to_json"]


def to_json(value: object, kind: WireType[Any]) -> object:
    """Turn one field value into its JSON form (see the module docstring)."""
    if value is None:
        return None
    if isinstance(kind, Optional):
        return to_json(value, kind.inner)
    if isinstance(value, enum.IntEnum):
        return value.name
    if isinstance(kind, UInt) and kind.limit > 2**53:
        return str(value)
    if isinstance(kind, List):
        assert isinstance(value, tuple)  # noqa: S101  (List fields hold tuples)
        return [to_json(v, kind.item) for v in value]
    if isinstance(value, Record):
        return record_to_json(value)
    return value


def record_to_json(rec: Record) -> dict[str, object]:
    """Turn a frame or nested record into a JSON object of its fields."""
    return {name: to_json(getattr(rec, name), kind) for name, kind in rec.WIRE_FIELDS}


def from_json(raw: object, kind: WireType[Any]) -> object:
    """Inverse of :func:`to_json` for one field."""
    if raw is None:
        return None
    if isinstance(kind, Optional):
        return from_json(raw, kind.inner)
    if isinstance(kind, Enum):
        return kind.cls[str(raw)]
    if isinstance(kind, UInt) and isinstance(raw, str):
        return int(raw)
    if isinstance(kind, List):
        assert isinstance(raw, list)  # noqa: S101  (JSON arrays)
        return tuple(from_json(v, kind.item) for v in raw)
    if isinstance(kind, Nested):
        assert isinstance(raw, dict)  # noqa: S101  (JSON objects)
        return record_from_json(kind.cls, raw)
    return raw


def record_from_json(cls: type[Record], raw: dict[str, Any]) -> Any:  # noqa: ANN401
    """Build a frame or nested record from its JSON object."""
    if set(raw) != {name for name, _ in cls.WIRE_FIELDS}:
        raise ValueError(f"{cls.__name__}: fields {sorted(raw)} do not match the schema")
    return cls(*(from_json(raw[name], kind) for name, kind in cls.WIRE_FIELDS))
