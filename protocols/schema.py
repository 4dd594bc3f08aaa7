"""Wire types: how one field is checked and turned into a msgpack value and back.

Each frame field declares one of these through :func:`wire`. The same objects
drive encoding, bounded decoding and the field tables in ``SPEC.md`` (a test
keeps the spec's tables and these declarations in step). The codec decodes valid
frames with straight-line decoders that ``protocols.compiled`` generates from
these declarations; :func:`decode_fields` is the definition they must match, and
locates the error in a frame they refuse.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import reprlib
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from protocols.errors import EncodeError, MalformedFrameError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

T = TypeVar("T")
E = TypeVar("E", bound=enum.IntEnum)


class WireType(Generic[T]):
    """A field's wire representation: validation in both directions."""

    #: How the type is written in SPEC.md's field tables.
    spec_name: str

    def encode(self, value: T) -> object:
        """Check ``value`` and return what msgpack should pack."""
        raise NotImplementedError

    def decode(self, raw: object) -> T:
        """Check an unpacked msgpack value and return the field's value."""
        raise NotImplementedError


class UInt(WireType[int]):
    """Unsigned integer of at most ``bits`` bits (msgpack positive int)."""

    def __init__(self, bits: int) -> None:
        self.limit = 1 << bits
        self.spec_name = f"uint{bits}"

    def encode(self, value: int) -> object:
        if type(value) is not int or not 0 <= value < self.limit:
            raise EncodeError(f"{value!r} is not a {self.spec_name}")
        return value

    def decode(self, raw: object) -> int:
        if type(raw) is not int or not 0 <= raw < self.limit:
            raise MalformedFrameError(f"expected {self.spec_name}, got {_show(raw)}")
        return raw


class SInt(WireType[int]):
    """Signed integer of at most ``bits`` bits."""

    def __init__(self, bits: int) -> None:
        self.low = -(1 << (bits - 1))
        self.high = 1 << (bits - 1)
        self.spec_name = f"int{bits}"

    def encode(self, value: int) -> object:
        if type(value) is not int or not self.low <= value < self.high:
            raise EncodeError(f"{value!r} is not an {self.spec_name}")
        return value

    def decode(self, raw: object) -> int:
        if type(raw) is not int or not self.low <= raw < self.high:
            raise MalformedFrameError(f"expected {self.spec_name}, got {_show(raw)}")
        return raw


class Bool(WireType[bool]):
    """msgpack ``true``/``false``; integers are not accepted."""

    spec_name = "bool"

    def encode(self, value: bool) -> object:
        if type(value) is not bool:
            raise EncodeError(f"{value!r} is not a bool")
        return value

    def decode(self, raw: object) -> bool:
        if type(raw) is not bool:
            raise MalformedFrameError(f"expected bool, got {_show(raw)}")
        return raw


class Str(WireType[str]):
    """UTF-8 string of at most ``max_bytes`` encoded bytes (msgpack str)."""

    def __init__(self, max_bytes: int, *, min_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self.spec_name = f"str({min_bytes}..{max_bytes})" if min_bytes else f"str(..{max_bytes})"

    def _check(self, value: str) -> bool:
        size = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
        return self.min_bytes <= size <= self.max_bytes

    def encode(self, value: str) -> object:
        if type(value) is not str or not self._check(value):
            raise EncodeError(f"{value!r} is not a {self.spec_name}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EncodeError("not encodable as UTF-8") from exc
        return value

    def decode(self, raw: object) -> str:
        if type(raw) is not str or not self._check(raw):
            raise MalformedFrameError(f"expected {self.spec_name}, got {_show(raw)}")
        return raw


class Enum(WireType[E]):
    """An ``IntEnum`` carried as its integer code (uint8)."""

    def __init__(self, cls: type[E]) -> None:
        self.cls = cls
        self.spec_name = f"uint8 ({cls.__name__})"
        self._by_code: dict[int, E] = {int(m): m for m in cls}

    def encode(self, value: E) -> object:
        if not isinstance(value, self.cls):
            raise EncodeError(f"{value!r} is not a {self.cls.__name__}")
        return int(value)

    def decode(self, raw: object) -> E:
        member = self._by_code.get(raw) if type(raw) is int else None
        if member is None:
            raise MalformedFrameError(
                f"{_show(raw)} is not a {self.cls.__name__} code",
            )
        return member


class Optional(WireType[T | None]):
    """The inner type, or msgpack ``nil``."""

    def __init__(self, inner: WireType[T]) -> None:
        self.inner = inner
        self.spec_name = f"{inner.spec_name} or nil"

    def encode(self, value: T | None) -> object:
        return None if value is None else self.inner.encode(value)

    def decode(self, raw: object) -> T | None:
        return None if raw is None else self.inner.decode(raw)


class List(WireType[tuple[T, ...]]):
    """A msgpack array of at most ``max_items`` values of one type."""

    def __init__(self, item: WireType[T], max_items: int) -> None:
        self.item = item
        self.max_items = max_items
        self.spec_name = f"array(..{max_items}) of {item.spec_name}"

    def encode(self, value: tuple[T, ...]) -> object:
        if type(value) is not tuple or len(value) > self.max_items:
            raise EncodeError(f"expected a tuple of at most {self.max_items} items")
        enc = self.item.encode
        try:
            return [enc(v) for v in value]
        except EncodeError as exc:
            raise at_location(exc, f"[{_failed_index(value, enc)}]") from None

    def decode(self, raw: object) -> tuple[T, ...]:
        if type(raw) is not list or len(raw) > self.max_items:
            raise MalformedFrameError(
                f"expected an array of at most {self.max_items} items, got {_show(raw)}",
            )
        dec = self.item.decode
        try:
            return tuple([dec(v) for v in raw])
        except MalformedFrameError as exc:
            raise at_location(exc, f"[{_failed_index(raw, dec)}]") from None


class Record:
    """Base for frozen dataclasses whose fields are all declared with :func:`wire`.

    A record is carried as a msgpack array of its fields in declaration order.
    Receivers ignore extra trailing elements (forward compatibility, SPEC §8).
    """

    __slots__ = ()

    #: (attribute name, wire type) in wire order; filled in by :func:`record`.
    WIRE_FIELDS: ClassVar[tuple[tuple[str, WireType[Any]], ...]] = ()

    def check(self) -> str | None:
        """Return a problem with the record as a whole (cross-field rules), or None."""
        return None


R = TypeVar("R", bound=Record)


def wire(kind: WireType[Any]) -> Any:  # noqa: ANN401  (stands in for the field's value type)
    """Declare a dataclass field together with its wire type."""
    return dataclasses.field(metadata={"wire": kind})


def record(cls: type[R]) -> type[R]:
    """Collect the wire types of a dataclass's fields into ``WIRE_FIELDS``."""
    fields = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # cls is a dataclass subtype of Record
        kind = f.metadata.get("wire")
        if not isinstance(kind, WireType):
            raise TypeError(f"{cls.__name__}.{f.name} has no wire type")
        fields.append((f.name, kind))
    cls.WIRE_FIELDS = tuple(fields)
    return cls


def encode_fields(rec: Record) -> list[object]:
    """Encode a record's fields in wire order, checking every value."""
    name = ""
    out: list[object] = []
    try:
        for name, kind in rec.WIRE_FIELDS:
            out.append(kind.encode(getattr(rec, name)))
    except EncodeError as exc:
        raise at_location(exc, f".{name}") from None
    # After the fields, as in decode_fields: check() may assume every field has its type.
    problem = rec.check()
    if problem is not None:
        raise EncodeError(problem)
    return out


def decode_fields(cls: type[R], raw: list[object]) -> R:
    """Build a record from msgpack values; extra trailing values are ignored."""
    spec = cls.WIRE_FIELDS
    if len(raw) < len(spec):
        raise MalformedFrameError(f"{len(raw)} fields, at least {len(spec)} expected")
    name = ""
    values: list[object] = []
    try:
        for (name, kind), value in zip(spec, raw, strict=False):  # noqa: B007  (name locates errors)
            values.append(kind.decode(value))
    except MalformedFrameError as exc:
        raise at_location(exc, f".{name}") from None
    rec = cls(*values)
    problem = rec.check()
    if problem is not None:
        raise MalformedFrameError(problem)
    return rec


class Nested(WireType[R]):
    """A record nested inside another, carried as a msgpack array."""

    def __init__(self, cls: type[R]) -> None:
        self.cls = cls
        self.spec_name = cls.__name__

    def encode(self, value: R) -> object:
        if not isinstance(value, self.cls):
            raise EncodeError(f"{value!r} is not a {self.cls.__name__}")
        return encode_fields(value)

    def decode(self, raw: object) -> R:
        if type(raw) is not list:
            raise MalformedFrameError(f"expected an array, got {_show(raw)}")
        return decode_fields(self.cls, raw)


PE = TypeVar("PE", EncodeError, MalformedFrameError)

_LOCATED = re.compile(r"(?:\.\w+|\[-?\d+\])+: ")


def at_location(exc: PE, where: str) -> PE:
    """Return a copy of ``exc`` whose message is prefixed with a field location."""
    text = str(exc)
    # Only a location this function added counts: a message may also start with a
    # value's repr, and "[1] is not a uint32" is a list, not item 1.
    sep = "" if _LOCATED.match(text) else ": "
    return type(exc)(f"{where}{sep}{text}")


def _failed_index(values: Iterable[Any], check: Callable[[Any], object]) -> int:
    """Find which item of a list fails ``check`` (only called on the error path)."""
    for i, v in enumerate(values):
        try:
            check(v)
        except (EncodeError, MalformedFrameError):
            return i
    return -1


def _show(raw: object) -> str:
    """Describe a received value briefly, without echoing large or binary payloads."""
    # reprlib bounds the depth: msgpack unpacks arrays nested up to ~1024 deep, and a
    # plain repr() of one recurses past Python's limit and raises RecursionError.
    text = reprlib.repr(raw)
    return f"{type(raw).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
