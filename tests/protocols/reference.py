"""The frame decoder as it was before the compiled decoders, kept as the tests' oracle.

A frozen copy of the decode path of ``protocols.codec`` at the time compiled
decoders (``protocols/compiled.py``) replaced the generic schema walk on the hot
path: the same header checks in the same order (SPEC §8), the same msgpack
limits, and ``decode_fields`` over every frame. ``test_compiled`` decodes the same
bytes with this and with ``protocols.codec`` and requires equal frames or the
same error. Do not speed this module up: its value is that it stays the old code.

The helpers at the end compare the two decoders' results strictly.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, TypeVar

import msgpack

from protocols.codec import MAX_FRAME_SIZE, MIN_FRAME_SIZE, TAG_SIZE, FrameKey, compute_tag
from protocols.errors import (
    BadMacError,
    FrameTooLargeError,
    MalformedFrameError,
    ProtocolError,
    TruncatedFrameError,
    UnknownFrameTypeError,
    UnsupportedVersionError,
    WrongDirectionError,
)
from protocols.frames import FRAME_TYPES, PROTOCOL_VERSION, Direction, Frame
from protocols.schema import Record, at_location, decode_fields

if TYPE_CHECKING:
    from collections.abc import Callable

_MAX_FIELDS = 15


def peek_header(data: bytes) -> tuple[int, type[Frame] | None, Direction]:
    """Check size and fixed header; return (type code, frame class or None, direction)."""
    size = len(data)
    if size > MAX_FRAME_SIZE:
        raise FrameTooLargeError(size, MAX_FRAME_SIZE)
    if size < MIN_FRAME_SIZE:
        raise TruncatedFrameError(size, MIN_FRAME_SIZE)
    marker, version, type_code = data[0], data[1], data[2]
    if marker & 0xF0 != 0x90 or marker & 0x0F < 2:
        raise MalformedFrameError(f"first byte 0x{marker:02x} is not a fixarray of 2..15")
    if version >= 0x80:
        raise MalformedFrameError(f"version byte 0x{version:02x} is not a positive fixint")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersionError(version)
    direction = Direction.of_type(type_code)
    if direction is None:
        raise MalformedFrameError(f"type byte 0x{type_code:02x} is not a valid type code")
    return type_code, FRAME_TYPES.get(type_code), direction


def decode(data: bytes, key: FrameKey | bytes, *, direction: Direction | None = None) -> Frame:
    """Verify and decode one frame with the generic schema walk."""
    type_code, cls, frame_direction = peek_header(data)
    if direction is not None and frame_direction is not direction:
        raise WrongDirectionError(
            f"type 0x{type_code:02x} is {frame_direction.value}link, expected {direction.value}link"
        )
    body = data[:-TAG_SIZE]
    if not hmac.compare_digest(data[-TAG_SIZE:], compute_tag(key, body)):
        raise BadMacError("MAC does not verify")
    if cls is None:
        raise UnknownFrameTypeError(type_code)
    return parse(cls, body)


def decode_unverified(data: bytes) -> Frame:
    """Parse a frame without checking its MAC, with the generic schema walk."""
    type_code, cls, _ = peek_header(data)
    if cls is None:
        raise UnknownFrameTypeError(type_code)
    return parse(cls, data[:-TAG_SIZE])


def parse(cls: type[Frame], body: bytes) -> Frame:
    """Unpack a frame body and build ``cls`` from it with ``decode_fields``."""
    try:
        items = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            max_str_len=255,
            max_bin_len=0,
            max_array_len=256,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MalformedFrameError(f"{cls.__name__}: bad msgpack: {exc}") from None
    if type(items) is not list or len(items) > _MAX_FIELDS:
        raise MalformedFrameError(f"{cls.__name__}: body is not a fixarray")
    try:
        return decode_fields(cls, items[2:])
    except MalformedFrameError as exc:
        raise at_location(exc, cls.__name__) from None


# --- comparing the two decoders ------------------------------------------------------------

T = TypeVar("T")


def result_of(fn: Callable[[], T]) -> T | ProtocolError:
    """Run a decoder; return its result or its ProtocolError (anything else propagates)."""
    try:
        return fn()
    except ProtocolError as exc:
        return exc


def assert_same_value(new: object, old: object, where: str = "frame") -> None:
    """Require equal values of exactly the same types, all the way down.

    ``==`` alone would let ``1`` pass for ``True`` or for ``ReadingKind.TEMPERATURE``.
    """
    assert type(new) is type(old), f"{where}: {type(new).__name__}, expected {type(old).__name__}"
    if isinstance(old, Record):
        for name, _ in old.WIRE_FIELDS:
            assert_same_value(getattr(new, name), getattr(old, name), f"{where}.{name}")
    elif isinstance(old, tuple):
        assert isinstance(new, tuple)
        assert len(new) == len(old), f"{where}: {len(new)} items, expected {len(old)}"
        for i, (a, b) in enumerate(zip(new, old, strict=True)):
            assert_same_value(a, b, f"{where}[{i}]")
    assert new == old, f"{where}: {new!r}, expected {old!r}"


def assert_same_result(new: object, old: object) -> None:
    """Require the same frame, or the same error: class, kind, message and attributes."""
    if isinstance(old, ProtocolError):
        assert isinstance(new, ProtocolError), f"decoded {new!r}; the reference raised {old!r}"
        assert type(new) is type(old), f"raised {new!r}; the reference raised {old!r}"
        assert new.kind == old.kind
        assert str(new) == str(old)
        assert vars(new) == vars(old)
    else:
        assert not isinstance(new, ProtocolError), f"raised {new!r}; the reference gave {old!r}"
        assert_same_value(new, old)
