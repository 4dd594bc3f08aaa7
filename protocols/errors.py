"""The protocol's own error types.

Decoding arbitrary bytes raises only subclasses of :class:`ProtocolError`; callers
can tell "not enough data" (:class:`TruncatedFrameError`) from "malformed" from
"forged" (:class:`BadMacError`) from "authentic but not understood"
(:class:`UnsupportedVersionError`, :class:`UnknownFrameTypeError`).
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error raised by the wire protocol."""

    #: Short stable name, usable as a metric label value.
    kind: str = "protocol"


class FrameTooLargeError(ProtocolError):
    """The frame is longer than ``MAX_FRAME_SIZE``; it was not parsed."""

    kind = "too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit


class TruncatedFrameError(ProtocolError):
    """The frame is shorter than the fixed header plus the MAC tag."""

    kind = "truncated"

    def __init__(self, size: int, minimum: int) -> None:
        super().__init__(f"frame of {size} bytes is shorter than the {minimum}-byte minimum")
        self.size = size
        self.minimum = minimum


class MalformedFrameError(ProtocolError):
    """The bytes are not a well-formed frame: bad header, bad msgpack or bad field."""

    kind = "malformed"


class WrongDirectionError(MalformedFrameError):
    """A downlink frame arrived where uplink was expected, or the reverse."""

    kind = "wrong_direction"


class UnsupportedVersionError(ProtocolError):
    """The frame declares a protocol version this implementation does not speak."""

    kind = "unsupported_version"

    def __init__(self, version: int) -> None:
        super().__init__(f"unsupported protocol version {version}")
        self.version = version


class BadMacError(ProtocolError):
    """The MAC tag does not match: wrong key, corrupted or forged frame."""

    kind = "bad_mac"


class UnknownFrameTypeError(ProtocolError):
    """The frame is authentic (its MAC verified) but its type code is unknown."""

    kind = "unknown_type"

    def __init__(self, type_code: int) -> None:
        super().__init__(f"unknown frame type 0x{type_code:02x}")
        self.type_code = type_code


class EncodeError(ProtocolError, ValueError):
    """A frame holds a value that cannot be put on the wire (out of range, too long)."""

    kind = "encode"
