"""Frames to bytes and back, with the MAC (SPEC §4).

A frame on the wire is ``body || tag``: ``body`` is a msgpack array
``[version, type, field1, field2, ...]`` whose first three bytes are always a
fixarray header, the version and the type code (each a positive fixint), and
``tag`` is the first 16 bytes of HMAC-SHA256(machine key, body).

The decoder checks the size, the fixed header and the MAC before it parses any
msgpack, so a forged frame costs one HMAC and is never parsed. The fields are
then checked by a decoder compiled for the frame's class (``protocols.compiled``);
only a frame that fails goes through the generic schema walk, which names the
field at fault.
"""

from __future__ import annotations

import hmac
import re
from hashlib import sha256
from typing import TYPE_CHECKING, Any, Final

import msgpack

from protocols.compiled import compile_decoder
from protocols.errors import (
    BadMacError,
    EncodeError,
    FrameTooLargeError,
    MalformedFrameError,
    TruncatedFrameError,
    UnknownFrameTypeError,
    UnsupportedVersionError,
    WrongDirectionError,
)
from protocols.frames import FRAME_TYPES, PROTOCOL_VERSION, Direction, Frame
from protocols.schema import at_location, decode_fields, encode_fields

if TYPE_CHECKING:
    from collections.abc import Callable

#: Bytes of HMAC-SHA256 kept as the tag (SPEC §4.4 justifies 128 bits).
TAG_SIZE: Final = 16
#: Largest frame, tag included, that a receiver accepts (SPEC §8).
MAX_FRAME_SIZE: Final = 16384
#: fixarray marker, version, type code.
HEADER_SIZE: Final = 3
MIN_FRAME_SIZE: Final = HEADER_SIZE + TAG_SIZE
#: Length of a machine's frame key in bytes.
KEY_SIZE: Final = 32
#: Shortest master secret accepted for key derivation.
MIN_MASTER_SECRET: Final = 32

_KEY_LABEL: Final = b"vendgate/v1/frame-key/"
_MAX_FIELDS: Final = 15  # a top-level fixarray holds at most 15 elements
_MAX_MACHINE_ID: Final = 64
# SPEC §3: 1-64 of [A-Za-z0-9._-] (ASCII only: \w and str.isalnum would admit more).
_MACHINE_ID: Final = re.compile(rf"[A-Za-z0-9._\-]{{1,{_MAX_MACHINE_ID}}}")
#: The direction of each type byte, None for the reserved ones (SPEC §4.2).
_DIRECTIONS: Final = tuple(Direction.of_type(code) for code in range(0x100))
#: Fields start after the version and the type code.
_FIELDS_OFFSET: Final = 2
#: The compiled decoder of each frame class, built at import from its WIRE_FIELDS.
_DECODERS: Final[dict[type[Frame], Callable[[list[Any]], Frame | None]]] = {
    cls: compile_decoder(cls, offset=_FIELDS_OFFSET) for cls in FRAME_TYPES.values()
}


def derive_machine_key(master_secret: bytes, machine_id: str) -> bytes:
    """Derive a machine's 32-byte frame key from the gateway master secret (SPEC §4.3)."""
    if len(master_secret) < MIN_MASTER_SECRET:
        raise ValueError(f"master secret must be at least {MIN_MASTER_SECRET} bytes")
    check_machine_id(machine_id)
    return hmac.digest(master_secret, _KEY_LABEL + machine_id.encode("ascii"), sha256)


def check_machine_id(machine_id: str) -> str:
    """Return ``machine_id`` if it is a valid id (SPEC §3), else raise ValueError."""
    if _MACHINE_ID.fullmatch(machine_id) is None:
        raise ValueError(f"invalid machine id {machine_id!r}: use 1-64 of [A-Za-z0-9._-]")
    return machine_id


class FrameKey:
    """A machine's frame key with the HMAC pads pre-hashed (RFC 2104 §4).

    Holding the inner and outer SHA-256 states halves the cost of each MAC:
    two compression rounds per short frame instead of four.
    """

    __slots__ = ("_inner", "_outer", "secret")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_SIZE:
            raise ValueError(f"a frame key is {KEY_SIZE} bytes, got {len(secret)}")
        self.secret = secret
        block = secret.ljust(64, b"\0")
        self._inner = sha256(bytes(b ^ 0x36 for b in block))
        self._outer = sha256(bytes(b ^ 0x5C for b in block))

    @classmethod
    def derive(cls, master_secret: bytes, machine_id: str) -> FrameKey:
        """Derive a machine's key from the master secret (SPEC §4.3)."""
        return cls(derive_machine_key(master_secret, machine_id))

    def tag(self, body: bytes) -> bytes:
        """Return the truncated HMAC-SHA256 tag of ``body``."""
        inner = self._inner.copy()
        inner.update(body)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:TAG_SIZE]

    def __repr__(self) -> str:
        return "FrameKey(<secret>)"


def compute_tag(key: FrameKey | bytes, body: bytes) -> bytes:
    """Return the truncated MAC of a frame body."""
    if isinstance(key, FrameKey):
        return key.tag(body)
    return hmac.digest(key, body, sha256)[:TAG_SIZE]


def encode_body(frame: Frame) -> bytes:
    """Encode a frame's msgpack body (without the tag), checking every field."""
    name = type(frame).__name__
    try:
        items = [PROTOCOL_VERSION, frame.TYPE, *encode_fields(frame)]
    except EncodeError as exc:
        raise at_location(exc, name) from None
    body: bytes = msgpack.packb(items, use_bin_type=True)
    if len(body) + TAG_SIZE > MAX_FRAME_SIZE:
        raise EncodeError(f"{name}: {len(body) + TAG_SIZE} bytes exceeds {MAX_FRAME_SIZE}")
    return body


def encode(frame: Frame, key: FrameKey | bytes) -> bytes:
    """Encode ``frame`` and append its MAC under ``key``."""
    body = encode_body(frame)
    return body + compute_tag(key, body)


def peek_header(data: bytes) -> tuple[int, type[Frame] | None, Direction]:
    """Check size and fixed header; return (type code, frame class or None, direction).

    Raises the size, header and version errors of :func:`decode`, but never
    looks at the MAC or the msgpack body.
    """
    size = len(data)
    if size > MAX_FRAME_SIZE:
        raise FrameTooLargeError(size, MAX_FRAME_SIZE)
    if size < MIN_FRAME_SIZE:
        raise TruncatedFrameError(size, MIN_FRAME_SIZE)
    marker, version, type_code = data[0], data[1], data[2]
    if not 0x92 <= marker <= 0x9F:
        raise MalformedFrameError(f"first byte 0x{marker:02x} is not a fixarray of 2..15")
    if version >= 0x80:
        raise MalformedFrameError(f"version byte 0x{version:02x} is not a positive fixint")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersionError(version)
    direction = _DIRECTIONS[type_code]
    if direction is None:
        raise MalformedFrameError(f"type byte 0x{type_code:02x} is not a valid type code")
    return type_code, FRAME_TYPES.get(type_code), direction


def decode(data: bytes, key: FrameKey | bytes, *, direction: Direction | None = None) -> Frame:
    """Verify and decode one frame.

    With ``direction`` set, a frame travelling the other way raises
    :class:`WrongDirectionError` before the MAC is checked (a machine's
    downlink frame replayed on its uplink topic is refused). Any input raises
    only :class:`~protocols.errors.ProtocolError` subclasses.
    """
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
    return _parse(cls, body)


def decode_unverified(data: bytes) -> Frame:
    """Parse a frame WITHOUT checking its MAC: for diagnostics only, never act on it.

    A machine uses this to echo the vend id of a ``Vend`` whose MAC failed
    (``VendAck`` code ``BAD_MAC``); operators use it to inspect captures.
    """
    type_code, cls, _ = peek_header(data)
    if cls is None:
        raise UnknownFrameTypeError(type_code)
    return _parse(cls, data[:-TAG_SIZE])


def _parse(cls: type[Frame], body: bytes) -> Frame:
    try:
        # Bounded by the limits of SPEC §8: no maps, bins or extension types at all.
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
        # ExtraData, FormatError, StackError, limit and UTF-8 errors all land here.
        raise MalformedFrameError(f"{cls.__name__}: bad msgpack: {exc}") from None
    if type(items) is not list or len(items) > _MAX_FIELDS:
        raise MalformedFrameError(f"{cls.__name__}: body is not a fixarray")
    decoder = _DECODERS.get(cls)
    if decoder is None:  # a frame class registered after this module was imported
        decoder = _DECODERS[cls] = compile_decoder(cls, offset=_FIELDS_OFFSET)
    frame = decoder(items)
    if frame is not None:
        return frame
    # The compiled decoder only says that some value is wrong. The generic walk finds the
    # first one and raises the located error (SPEC §8); a frame it accepts after all would
    # be a compiler bug, which tests/protocols/test_compiled.py looks for, and the generic
    # walk's frame is the one to trust.
    try:
        return decode_fields(cls, items[_FIELDS_OFFSET:])
    except MalformedFrameError as exc:
        raise at_location(exc, cls.__name__) from None
