"""A sans-I/O MQTT 5 client codec: packets to bytes, and bytes to packets.

The subset a client of a broker needs (OASIS MQTT 5.0): it writes CONNECT, SUBSCRIBE, PUBLISH
(QoS 0 and 1), PUBACK, PINGREQ and DISCONNECT, and reads CONNACK, PUBLISH, PUBACK, SUBACK,
PINGRESP and DISCONNECT. No sockets, no clock, no asyncio (SPEC §1, house style #1):
`gateway.mqtt` drives it over a transport, and the fleet simulator may too.

It exists for speed. A gateway receives tens of thousands of small PUBLISH packets a second;
`Reader.feed` parses every packet of one socket read in one call, yielding each PUBLISH as a
plain tuple, so that the caller can handle a whole read without a task, callback or object per
message (benchmarks/mqtt_link.py measures it against gmqtt). The rarely used parts (CONNACK
properties, DISCONNECT reasons) are decoded generically and slowly.

What it refuses, with `MqttProtocolError` carrying the MQTT 5 reason code a client sends in
its DISCONNECT: a packet larger than the reader's limit (0x95, §3.1.2.11.4), a malformed packet
(0x81), a packet a server may not send or a topic alias we never allowed (0x82, 0x94).
"""

from __future__ import annotations

import struct
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from protocols.errors import ProtocolError

__all__ = [
    "ConnAck",
    "Disconnect",
    "MqttProtocolError",
    "PingResp",
    "PubAck",
    "Publish",
    "Reader",
    "SubAck",
    "connect",
    "disconnect",
    "next_packet_id",
    "puback",
    "publish",
    "reason_name",
    "subscribe",
]

# Packet types (§2.1.2).
CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
SUBSCRIBE: Final = 8
SUBACK: Final = 9
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14
AUTH: Final = 15

# Property identifiers (§2.2.2.2) this module writes or looks at.
PAYLOAD_FORMAT: Final = 0x01
MESSAGE_EXPIRY: Final = 0x02
SESSION_EXPIRY: Final = 0x11
ASSIGNED_CLIENT_ID: Final = 0x12
SERVER_KEEP_ALIVE: Final = 0x13
REASON_STRING: Final = 0x1F
RECEIVE_MAXIMUM: Final = 0x21
TOPIC_ALIAS_MAXIMUM: Final = 0x22
TOPIC_ALIAS: Final = 0x23
MAXIMUM_QOS: Final = 0x24
RETAIN_AVAILABLE: Final = 0x25
USER_PROPERTY: Final = 0x26
MAXIMUM_PACKET_SIZE: Final = 0x27
SERVER_REFERENCE: Final = 0x1C

# Reason codes a client sends (§3.14.2.1).
MALFORMED_PACKET: Final = 0x81
PROTOCOL_ERROR: Final = 0x82
TOPIC_ALIAS_INVALID: Final = 0x94
PACKET_TOO_LARGE: Final = 0x95

# Names of the reason codes a server sends in CONNACK, PUBACK, SUBACK and DISCONNECT (§2.4).
REASON_NAMES: Final[dict[int, str]] = {
    0x00: "Success",
    0x01: "Granted QoS 1",
    0x02: "Granted QoS 2",
    0x04: "Disconnect with Will Message",
    0x10: "No matching subscribers",
    0x80: "Unspecified error",
    0x81: "Malformed Packet",
    0x82: "Protocol Error",
    0x83: "Implementation specific error",
    0x84: "Unsupported Protocol Version",
    0x85: "Client Identifier not valid",
    0x86: "Bad User Name or Password",
    0x87: "Not authorized",
    0x88: "Server unavailable",
    0x89: "Server busy",
    0x8A: "Banned",
    0x8B: "Server shutting down",
    0x8C: "Bad authentication method",
    0x8D: "Keep Alive timeout",
    0x8E: "Session taken over",
    0x8F: "Topic Filter invalid",
    0x90: "Topic Name invalid",
    0x91: "Packet Identifier in use",
    0x93: "Receive Maximum exceeded",
    0x94: "Topic Alias invalid",
    0x95: "Packet too large",
    0x96: "Message rate too high",
    0x97: "Quota exceeded",
    0x98: "Administrative action",
    0x99: "Payload format invalid",
    0x9A: "Retain not supported",
    0x9B: "QoS not supported",
    0x9C: "Use another server",
    0x9D: "Server moved",
    0x9E: "Shared Subscriptions not supported",
    0x9F: "Connection rate exceeded",
    0xA0: "Maximum connect time",
    0xA1: "Subscription Identifiers not supported",
    0xA2: "Wildcard Subscriptions not supported",
}


def reason_name(code: int) -> str:
    """Return ``0x87 Not authorized`` for 0x87: the code and its name in the spec."""
    return f"0x{code:02x} {REASON_NAMES.get(code, 'unknown reason')}"


# How each property's value is encoded (§2.2.2.2): byte, two-byte, four-byte integer, variable
# byte integer, UTF-8 string, binary data, string pair.
_BYTE, _TWO, _FOUR, _VARINT, _STRING, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES: Final[dict[int, int]] = {
    0x01: _BYTE,
    0x02: _FOUR,
    0x03: _STRING,
    0x08: _STRING,
    0x09: _BINARY,
    0x0B: _VARINT,
    0x11: _FOUR,
    0x12: _STRING,
    0x13: _TWO,
    0x15: _STRING,
    0x16: _BINARY,
    0x17: _BYTE,
    0x18: _FOUR,
    0x19: _BYTE,
    0x1A: _STRING,
    0x1C: _STRING,
    0x1F: _STRING,
    0x21: _TWO,
    0x22: _TWO,
    0x23: _TWO,
    0x24: _BYTE,
    0x25: _BYTE,
    0x26: _PAIR,
    0x27: _FOUR,
    0x28: _BYTE,
    0x29: _BYTE,
    0x2A: _BYTE,
}
# Properties that may appear more than once; their values are collected in a tuple.
_REPEATABLE: Final = frozenset({USER_PROPERTY, 0x0B})

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_PUBACK: Final = struct.Struct(">BBH")
_PINGREQ: Final = b"\xc0\x00"
_MAX_VARINT: Final = 268_435_455  # §1.5.5: four bytes
MAX_PACKET_ID: Final = 0xFFFF
DEFAULT_MAX_PACKET: Final = 1 << 20


class MqttProtocolError(ProtocolError):
    """The broker sent something this client cannot accept; the connection must end."""

    kind = "mqtt"

    def __init__(self, message: str, reason_code: int = MALFORMED_PACKET) -> None:
        super().__init__(message)
        self.reason_code = reason_code


# --- packets read ------------------------------------------------------------------------------


class Publish(NamedTuple):
    """An incoming PUBLISH. ``packet_id`` is 0 at QoS 0. Properties are not kept."""

    topic: str
    payload: bytes
    qos: int
    packet_id: int
    retain: bool
    dup: bool


@dataclass(frozen=True, slots=True)
class ConnAck:
    """The server's answer to CONNECT (§3.2); a reason code of 0x80 or more is a refusal."""

    session_present: bool
    reason_code: int
    properties: dict[int, object] = field(default_factory=dict)

    @property
    def receive_maximum(self) -> int:
        """How many of our QoS 1 PUBLISH packets may await a PUBACK at once (§3.2.2.3.3)."""
        value = self.properties.get(RECEIVE_MAXIMUM, 65_535)
        return value if isinstance(value, int) else 65_535

    @property
    def server_keep_alive(self) -> int | None:
        """The keep alive the server imposes instead of ours (§3.2.2.3.14), if any."""
        value = self.properties.get(SERVER_KEEP_ALIVE)
        return value if isinstance(value, int) else None

    @property
    def maximum_packet_size(self) -> int | None:
        """The largest packet the server accepts (§3.2.2.3.6), if it says."""
        value = self.properties.get(MAXIMUM_PACKET_SIZE)
        return value if isinstance(value, int) else None

    @property
    def reason_string(self) -> str | None:
        """The server's human-readable reason (§3.2.2.3.9, §3.14.2.2.3), if any."""
        value = self.properties.get(REASON_STRING)
        return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class PubAck:
    """The acknowledgement of one of our QoS 1 PUBLISH packets (§3.4)."""

    packet_id: int
    reason_code: int = 0


@dataclass(frozen=True, slots=True)
class SubAck:
    """The answer to SUBSCRIBE (§3.9): one reason code per filter, the granted QoS or >= 0x80."""

    packet_id: int
    reason_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PingResp:
    """The answer to PINGREQ (§3.13)."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The server is closing the connection (§3.14), with its reason."""

    reason_code: int = 0
    properties: dict[int, object] = field(default_factory=dict)

    @property
    def reason_string(self) -> str | None:
        """The server's human-readable reason (§3.2.2.3.9, §3.14.2.2.3), if any."""
        value = self.properties.get(REASON_STRING)
        return value if isinstance(value, str) else None


Packet = Publish | ConnAck | PubAck | SubAck | PingResp | Disconnect


class Reader:
    """Turns the bytes a broker sends into packets, whatever the read boundaries.

    ``max_packet_size`` is the limit this client announces in its CONNECT (`connect`): a
    larger packet is a protocol violation (§3.1.2.11.4).
    """

    __slots__ = ("_buffer", "_limit")

    def __init__(self, max_packet_size: int = DEFAULT_MAX_PACKET) -> None:
        self._buffer = b""
        self._limit = max_packet_size

    @property
    def buffered(self) -> int:
        """Bytes held back: the start of a packet not yet whole."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Packet]:  # noqa: PLR0912  (the hot path, inlined)
        """Return every packet completed by ``data``, in order; keep the rest for next time.

        Raises MqttProtocolError for anything malformed; the reader is then unusable.
        """
        buffer = self._buffer + data if self._buffer else data
        size = len(buffer)
        limit = self._limit
        packets: list[Packet] = []
        append = packets.append
        position = 0
        while size - position >= 2:
            first = buffer[position]
            length = buffer[position + 1]
            start = position + 2
            if length & 0x80:
                length, start = _long_length(buffer, position + 1)
                if start < 0:
                    break  # the length itself is not all here yet
            end = start + length
            if end - position > limit:
                raise MqttProtocolError(
                    f"packet of {end - position} bytes exceeds the {limit}-byte maximum",
                    PACKET_TOO_LARGE,
                )
            if end > size:
                break
            if first >> 4 == PUBLISH:
                # §3.3: topic (two-byte length + UTF-8), packet id if QoS > 0, properties
                # (variable byte integer length + properties), payload: the rest.
                qos = (first >> 1) & 3
                if length < 3:  # the topic length and the property length, at least
                    raise MqttProtocolError("PUBLISH shorter than its header")
                topic_end = start + 2 + (buffer[start] << 8 | buffer[start + 1])
                # The header's last byte, the property length, must be inside the packet.
                cursor = topic_end + (2 if qos else 0)
                if cursor >= end or topic_end == start + 2:
                    raise MqttProtocolError(
                        "PUBLISH shorter than its header"
                        if cursor >= end
                        else "PUBLISH without a topic name",  # we allow no topic alias
                        MALFORMED_PACKET if cursor >= end else PROTOCOL_ERROR,
                    )
                packet_id = 0
                if qos:
                    if qos == 3:
                        raise MqttProtocolError("PUBLISH with QoS 3")
                    packet_id = buffer[topic_end] << 8 | buffer[topic_end + 1]
                if buffer[cursor]:
                    cursor = _publish_properties(buffer, cursor, end)
                else:
                    cursor += 1
                try:
                    topic = buffer[start + 2 : topic_end].decode()
                except UnicodeDecodeError as exc:
                    raise MqttProtocolError("topic name is not UTF-8") from exc
                append(
                    Publish(
                        topic,
                        buffer[cursor:end],
                        qos,
                        packet_id,
                        bool(first & 1),
                        bool(first & 8),
                    )
                )
            else:
                append(_control(first, buffer[start:end]))
            position = end
        self._buffer = buffer[position:] if position < size else b""
        return packets


def _long_length(data: bytes, at: int) -> tuple[int, int]:
    """Decode the variable byte integer at ``at`` (§1.5.5): (value, index after it).

    Returns (0, -1) when ``data`` ends inside it (the rest of a packet's remaining length
    may still be on its way); raises MqttProtocolError when it runs past four bytes.
    """
    value, shift = 0, 0
    for index in range(at, min(at + 4, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    if len(data) - at >= 4:
        raise MqttProtocolError("variable byte integer longer than four bytes")
    return 0, -1


def _varint_at(data: bytes, at: int) -> tuple[int, int]:
    """`_long_length` inside a whole packet, where being cut short is malformed too."""
    value, end = _long_length(data, at)
    if end < 0:
        raise MqttProtocolError("variable byte integer cut short")
    return value, end


def _publish_properties(buffer: bytes, cursor: int, end: int) -> int:
    """Check a PUBLISH's properties and return where its payload starts."""
    length, cursor = _varint_at(buffer, cursor)
    stop = cursor + length
    if stop > end:
        raise MqttProtocolError("PUBLISH properties overrun the packet")
    properties = _properties(buffer[cursor:stop])
    if TOPIC_ALIAS in properties:
        # We announce no Topic Alias Maximum, so the server may use none (§3.3.2.3.4).
        raise MqttProtocolError("topic alias sent though none was allowed", TOPIC_ALIAS_INVALID)
    return stop


def _properties(data: bytes) -> dict[int, object]:
    """Decode a properties block (without its length prefix)."""
    properties: dict[int, object] = {}
    cursor, size = 0, len(data)
    try:
        while cursor < size:
            identifier, cursor = _varint_at(data, cursor)
            kind = _PROPERTY_TYPES.get(identifier)
            value: object
            if kind is None:
                raise MqttProtocolError(f"unknown property 0x{identifier:02x}")
            if kind == _BYTE:
                value, cursor = data[cursor], cursor + 1
            elif kind == _TWO:
                (value,), cursor = _U16.unpack_from(data, cursor), cursor + 2
            elif kind == _FOUR:
                (value,), cursor = _U32.unpack_from(data, cursor), cursor + 4
            elif kind == _VARINT:
                value, cursor = _varint_at(data, cursor)
            elif kind == _PAIR:
                key, cursor = _string_at(data, cursor)
                text, cursor = _string_at(data, cursor)
                value = (key, text)
            else:
                raw, cursor = _binary_at(data, cursor)
                value = raw.decode("utf-8", "replace") if kind == _STRING else raw
            if identifier in _REPEATABLE:
                earlier = properties.get(identifier, ())
                assert isinstance(earlier, tuple)  # noqa: S101  (only this branch stores it)
                value = (*earlier, value)
            properties[identifier] = value
    except (IndexError, struct.error) as exc:
        raise MqttProtocolError("properties overrun their length") from exc
    if cursor != size:
        raise MqttProtocolError("properties overrun their length")
    return properties


def _binary_at(data: bytes, at: int) -> tuple[bytes, int]:
    (length,) = _U16.unpack_from(data, at)
    end = at + 2 + length
    if end > len(data):
        raise MqttProtocolError("string overruns the packet")
    return data[at + 2 : end], end


def _string_at(data: bytes, at: int) -> tuple[str, int]:
    raw, end = _binary_at(data, at)
    return raw.decode("utf-8", "replace"), end


def _properties_after(body: bytes, at: int) -> dict[int, object]:
    """Decode the properties block at ``at`` (length included), if the body has one."""
    if at >= len(body):
        return {}
    length, start = _varint_at(body, at)
    if start + length > len(body):
        raise MqttProtocolError("properties overrun the packet")
    return _properties(body[start : start + length])


# The fixed header's flags are reserved (§2.1.3): 0 for every packet a server sends but PUBLISH.
_RESERVED_FLAGS: Final = 0x0F
_SERVER_SENDS: Final = frozenset({CONNACK, PUBACK, SUBACK, PINGRESP, DISCONNECT})


def _control(first: int, body: bytes) -> Packet:
    kind = first >> 4
    if kind not in _SERVER_SENDS:
        raise MqttProtocolError(f"a server may not send packet type {kind}", PROTOCOL_ERROR)
    if first & _RESERVED_FLAGS:
        raise MqttProtocolError(f"packet type {kind} with reserved flags 0x{first & 0x0F:x}")
    try:
        if kind == PUBACK:
            # §3.4.2.1: the reason code and properties may be left out when 0 and empty.
            (packet_id,) = _U16.unpack_from(body)
            return PubAck(packet_id, body[2] if len(body) > 2 else 0)
        if kind == SUBACK:
            (packet_id,) = _U16.unpack_from(body)
            length, start = _varint_at(body, 2)
            codes = body[start + length :]
            if not codes:
                raise MqttProtocolError("SUBACK without reason codes")
            return SubAck(packet_id, tuple(codes))
        if kind == CONNACK:
            if len(body) < 2:
                raise MqttProtocolError("CONNACK too short")
            return ConnAck(bool(body[0] & 1), body[1], _properties_after(body, 2))
        if kind == PINGRESP:
            return PingResp()
        if kind == DISCONNECT:
            if not body:
                return Disconnect()
            return Disconnect(body[0], _properties_after(body, 1))
    except (IndexError, struct.error) as exc:
        raise MqttProtocolError(f"packet type {kind} too short") from exc
    raise MqttProtocolError(f"a server may not send packet type {kind}", PROTOCOL_ERROR)


# --- packets written ---------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    if value > _MAX_VARINT:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        value, byte = divmod(value, 128)
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65,535 bytes")
    return _U16.pack(len(raw)) + raw


def _packet(first: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return bytes((first,)) + _varint(len(body)) + body


def _property_block(properties: Iterable[tuple[int, int, int]]) -> bytes:
    """Encode (identifier, kind, value) integer properties as a block with its length."""
    out = bytearray()
    for identifier, kind, value in properties:
        out.append(identifier)
        if kind == _BYTE:
            out.append(value)
        elif kind == _TWO:
            out += _U16.pack(value)
        else:
            out += _U32.pack(value)
    return _varint(len(out)) + bytes(out)


def connect(
    client_id: str,
    *,
    clean_start: bool,
    keepalive_s: int,
    session_expiry_s: int = 0,
    receive_maximum: int = 65_535,
    max_packet_size: int = DEFAULT_MAX_PACKET,
    username: str | None = None,
    password: str | None = None,
    will_topic: str | None = None,
    will_payload: bytes = b"",
    will_qos: int = 0,
    will_retain: bool = False,
) -> bytes:
    """CONNECT (§3.1); no topic aliases.

    With ``will_topic``, the broker publishes ``will_payload`` there (at ``will_qos``,
    retained if ``will_retain``) when the connection ends without a DISCONNECT of reason 0
    (§3.1.2.5-3.1.2.7); the will has no properties (§3.1.3.2).
    """
    if not 0 <= keepalive_s <= 0xFFFF:
        raise ValueError("keepalive_s must fit two bytes")
    if not 1 <= receive_maximum <= 0xFFFF:
        raise ValueError("receive_maximum must be 1..65535")
    if will_qos not in (0, 1, 2):
        raise ValueError(f"will QoS must be 0, 1 or 2, not {will_qos}")
    if will_topic is None and (will_payload or will_qos or will_retain):
        raise ValueError("a will payload, QoS or retain flag needs a will topic")  # §3.1.2.6
    if len(will_payload) > 0xFFFF:
        raise ValueError("will payload longer than 65,535 bytes")
    flags = (0x02 if clean_start else 0) | (0x80 if username is not None else 0)
    flags |= 0x40 if password is not None else 0
    if will_topic is not None:
        # §3.1.2.5-3.1.2.7: Will Flag (bit 2), Will QoS (bits 3-4), Will Retain (bit 5).
        flags |= 0x04 | will_qos << 3 | (0x20 if will_retain else 0)
    properties = [(MAXIMUM_PACKET_SIZE, _FOUR, max_packet_size)]
    if session_expiry_s:
        properties.append((SESSION_EXPIRY, _FOUR, session_expiry_s))
    if receive_maximum != 0xFFFF:
        properties.append((RECEIVE_MAXIMUM, _TWO, receive_maximum))
    payload = [_string(client_id)]
    if will_topic is not None:
        # §3.1.3.2-3.1.3.4: Will Properties (none), Will Topic, Will Payload (binary data).
        payload += (b"\x00", _string(will_topic), _U16.pack(len(will_payload)) + will_payload)
    if username is not None:
        payload.append(_string(username))
    if password is not None:
        payload.append(_string(password))
    return _packet(
        CONNECT << 4,
        _string("MQTT"),
        bytes((5, flags)),
        _U16.pack(keepalive_s),
        _property_block(properties),
        *payload,
    )


def subscribe(packet_id: int, filters: Sequence[tuple[str, int]]) -> bytes:
    """SUBSCRIBE (§3.8): (topic filter, subscription options byte) pairs."""
    if not filters:
        raise ValueError("SUBSCRIBE needs at least one filter")
    body = [_U16.pack(packet_id), b"\x00"]
    for topic, options in filters:
        body += (_string(topic), bytes((options,)))
    return _packet(SUBSCRIBE << 4 | 0x02, *body)


def subscription_options(qos: int, *, retain_handling: int = 0, no_local: bool = False) -> int:
    """Return the options byte of a SUBSCRIBE filter (§3.8.3.1)."""
    return qos | (0x04 if no_local else 0) | retain_handling << 4


def publish(
    topic: str,
    payload: bytes,
    *,
    qos: int = 0,
    packet_id: int = 0,
    retain: bool = False,
    dup: bool = False,
    message_expiry_s: int | None = None,
) -> bytes:
    """PUBLISH (§3.3) at QoS 0 or 1."""
    if qos not in (0, 1):
        raise ValueError(f"QoS must be 0 or 1, not {qos}")
    if qos and not 1 <= packet_id <= 0xFFFF:
        raise ValueError(f"packet id {packet_id} is not in 1..65535")
    if message_expiry_s is not None and not 0 <= message_expiry_s <= 0xFFFFFFFF:
        raise ValueError(f"message expiry {message_expiry_s} does not fit four bytes")
    first = PUBLISH << 4 | qos << 1 | (0x08 if dup else 0) | (0x01 if retain else 0)
    header = _string(topic)
    if qos:
        header += _U16.pack(packet_id)
    if message_expiry_s is None:
        header += b"\x00"
    else:
        header += b"\x05\x02" + _U32.pack(message_expiry_s)
    length = len(header) + len(payload)
    return bytes((first,)) + _varint(length) + header + payload


def next_packet_id(last: int, *in_use: Container[int]) -> int:
    """Return the packet id after ``last`` (1 to 65,535, wrapping) that none of ``in_use`` holds.

    Raises OverflowError when every id is taken (§2.2.1: an id is in use until its
    acknowledgement arrives).
    """
    candidate = last
    for _ in range(MAX_PACKET_ID):
        candidate = candidate % MAX_PACKET_ID + 1
        if not any(candidate in used for used in in_use):
            return candidate
    raise OverflowError("every packet id is in use")


def puback(packet_id: int) -> bytes:
    """PUBACK (§3.4) with reason code 0, in its short form."""
    return _PUBACK.pack(PUBACK << 4, 2, packet_id)


def pingreq() -> bytes:
    """PINGREQ (§3.12)."""
    return _PINGREQ


def disconnect(reason_code: int = 0) -> bytes:
    """DISCONNECT (§3.14); reason 0 keeps the session and does not publish a will."""
    if not reason_code:
        return b"\xe0\x00"
    return bytes((DISCONNECT << 4, 2, reason_code, 0))
