"""The MQTT 5 client codec: exact encodings, stream reading at any boundary, refusals."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protocols import mqtt5
from protocols.errors import ProtocolError
from protocols.mqtt5 import (
    ConnAck,
    Disconnect,
    MqttProtocolError,
    Packet,
    PingResp,
    PubAck,
    Publish,
    Reader,
    SubAck,
    connect,
    disconnect,
    pingreq,
    puback,
    publish,
    subscribe,
    subscription_options,
)
from tests.protocols.strategies import utf8_text

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Reason codes a client may put in its DISCONNECT after a refusal (module docstring).
REFUSAL_CODES: Final = frozenset({0x81, 0x82, 0x94, 0x95})

CONNACK_PROPERTIES: Final = (
    b"\x20\x1a\x00\x00\x17"
    b"\x21\x00\x14"  # receive maximum 20
    b"\x13\x00\x3c"  # server keep alive 60
    b"\x27\x00\x00\x10\x00"  # maximum packet size 4096
    b"\x1f\x00\x02ok"  # reason string
    b"\x26\x00\x01k\x00\x01v"  # user property
)
CONNACK_VALUES: Final = {0x21: 20, 0x13: 60, 0x27: 4096, 0x1F: "ok", 0x26: (("k", "v"),)}
#: A server's QoS 1 PUBLISH with many properties; its payload looks like a property on purpose.
RICH_PUBLISH: Final = (
    b"\x32\x2b\x00\x03s/1\x01\x02\x1f"
    b"\x02\x00\x00\x0e\x10"  # message expiry 3600
    b"\x26\x00\x01k\x00\x01v"  # user property
    b"\x26\x00\x01a\x00\x01b"  # user property, again
    b"\x01\x01"  # payload format indicator
    b"\x03\x00\x04text"  # content type
    b"\x0b\x80\x01"  # subscription identifier 128 (two-byte varint)
    b"\x26\x00\x01k"  # payload
)
#: Packets a server sends, written by hand from the spec, with what the Reader must return.
SERVER_PACKETS: Final[list[tuple[bytes, Packet]]] = [
    (b"\x20\x03\x01\x00\x00", ConnAck(session_present=True, reason_code=0)),
    (b"\x20\x02\x00\x87", ConnAck(session_present=False, reason_code=0x87)),
    (CONNACK_PROPERTIES, ConnAck(session_present=False, reason_code=0, properties=CONNACK_VALUES)),
    (b"\x90\x06\x00\x07\x00\x00\x01\x80", SubAck(7, (0, 1, 0x80))),
    (b"\x90\x0a\x00\x08\x05\x1f\x00\x02no\x02\x97", SubAck(8, (2, 0x97))),
    (b"\x40\x02\x12\x34", PubAck(0x1234)),
    (b"\x40\x03\x00\x01\x10", PubAck(1, 0x10)),
    (b"\x40\x04\x00\x03\x00\x00", PubAck(3, 0)),
    (b"\x40\x0a\x00\x02\x87\x06\x1f\x00\x03bad", PubAck(2, 0x87)),
    (b"\xd0\x00", PingResp()),
    (b"\xe0\x08\x8b\x06\x1f\x00\x03bye", Disconnect(0x8B, {0x1F: "bye"})),
    (b"\xe0\x01\x8e", Disconnect(0x8E)),
    (b"\xe0\x00", Disconnect()),
    (RICH_PUBLISH, Publish("s/1", b"\x26\x00\x01k", 1, 0x0102, retain=False, dup=False)),
]


def split(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Cut ``stream`` at every offset in ``cuts`` (repeats give empty pieces)."""
    points = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def read(pieces: Iterable[bytes], reader: Reader | None = None) -> list[Packet]:
    """Feed ``pieces`` in order to one reader; return every packet it produced."""
    reader = reader if reader is not None else Reader()
    return [packet for piece in pieces for packet in reader.feed(piece)]


def outcome(pieces: Iterable[bytes]) -> list[Packet] | MqttProtocolError:
    """Read ``pieces``; return the packets or the MqttProtocolError (anything else propagates)."""
    try:
        packets = read(pieces)
    except MqttProtocolError as exc:
        return exc
    return packets


def refusal(pieces: Iterable[bytes], reader: Reader | None = None) -> int:
    """Read ``pieces``, which must be refused; return the refusal's reason code."""
    with pytest.raises(ProtocolError) as info:
        read(pieces, reader)
    assert isinstance(info.value, MqttProtocolError)
    return info.value.reason_code


@st.composite
def publishes(draw: st.DrawFn, max_payload: int = 3000) -> tuple[bytes, Publish]:
    """Draw an encoded PUBLISH and the tuple the Reader must return for it."""
    topic = draw(utf8_text(min_bytes=1, max_bytes=40))
    payload = draw(st.binary(max_size=max_payload))
    qos = draw(st.sampled_from([0, 1]))
    packet_id = draw(st.integers(1, 0xFFFF))
    retain, dup = draw(st.booleans()), draw(st.booleans())
    ttl = draw(st.none() | st.integers(0, 2**32 - 1))
    wire = publish(
        topic, payload, qos=qos, packet_id=packet_id, retain=retain, dup=dup, message_expiry_s=ttl
    )
    return wire, Publish(topic, payload, qos, packet_id if qos else 0, retain, dup)


def streams(max_payload: int = 3000) -> st.SearchStrategy[list[tuple[bytes, Packet]]]:
    """Draw lists of (wire, expected packet): PUBLISH packets and the hand-written ones."""
    item = publishes(max_payload) | st.sampled_from(SERVER_PACKETS)
    return st.lists(item, min_size=1, max_size=8)


# --- encoders: exact bytes ----------------------------------------------------------------------


def test_connect_bytes() -> None:
    """CONNECT carries name, level 5, flags 0xC2, keep alive, properties, then id/user/password."""
    wire = connect(
        "c",
        clean_start=True,
        keepalive_s=30,
        session_expiry_s=3600,
        receive_maximum=1000,
        username="u",
        password="p",  # noqa: S106  (a spec test vector)
    )
    assert wire == (
        b"\x10\x21\x00\x04MQTT\x05\xc2\x00\x1e"
        b"\x0d\x27\x00\x10\x00\x00\x11\x00\x00\x0e\x10\x21\x03\xe8"
        b"\x00\x01c\x00\x01u\x00\x01p"
    )


def test_connect_defaults_leave_out_default_properties() -> None:
    """No session expiry, receive maximum 65535 and no credentials: only 0x27, flags 0."""
    wire = connect("", clean_start=False, keepalive_s=0, max_packet_size=0x0102_0304)
    assert wire == b"\x10\x12\x00\x04MQTT\x05\x00\x00\x00\x05\x27\x01\x02\x03\x04\x00\x00"


def test_connect_with_will_bytes() -> None:
    """A will sets flags 0x04 | QoS << 3 | 0x20 and follows the client id (§3.1.2.5, §3.1.3)."""
    wire = connect(
        "c",
        clean_start=False,
        keepalive_s=60,
        session_expiry_s=600,
        username="c",
        will_topic="s",
        will_payload=b"\x01\x02",
        will_qos=1,
        will_retain=True,
    )
    assert wire == (
        b"\x10\x23\x00\x04MQTT\x05\xac\x00\x3c"  # flags: user name, retain, QoS 1, will
        b"\x0a\x27\x00\x10\x00\x00\x11\x00\x00\x02\x58"
        b"\x00\x01c"  # client id
        b"\x00"  # will properties: none
        b"\x00\x01s"  # will topic
        b"\x00\x02\x01\x02"  # will payload: binary data
        b"\x00\x01c"  # user name, after the will
    )


@pytest.mark.parametrize(
    ("qos", "retain", "flags"),
    [(0, False, 0x06), (1, False, 0x0E), (2, False, 0x16), (0, True, 0x26), (2, True, 0x36)],
)
def test_connect_will_flags(qos: int, retain: bool, flags: int) -> None:
    """Will QoS sits in bits 3-4 and Will Retain in bit 5, beside Clean Start (bit 1)."""
    wire = connect(
        "", clean_start=True, keepalive_s=0, will_topic="w", will_qos=qos, will_retain=retain
    )
    header = b"\x10\x18\x00\x04MQTT\x05" + bytes((flags,)) + b"\x00\x00"
    assert wire == header + (
        b"\x05\x27\x00\x10\x00\x00"
        b"\x00\x00"  # empty client id
        b"\x00\x00\x01w\x00\x00"  # no will properties, topic "w", empty payload
    )


@pytest.mark.parametrize(
    "will",
    [
        {"will_topic": "w", "will_qos": 3},
        {"will_topic": "w", "will_qos": -1},
        {"will_qos": 1},
        {"will_retain": True},
        {"will_payload": b"x"},
        {"will_topic": "w", "will_payload": bytes(0x10000)},
    ],
)
def test_connect_refuses_a_bad_will(will: dict[str, Any]) -> None:
    """A will QoS other than 0-2, will details without a topic, or a huge payload: ValueError."""
    with pytest.raises(ValueError, match="will"):
        connect("c", clean_start=False, keepalive_s=0, **will)


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (subscribe(7, [("a/+", subscription_options(1, retain_handling=1))]),
         b"\x82\x09\x00\x07\x00\x00\x03a/+\x11"),
        (subscribe(0x0102, [("x", subscription_options(0, no_local=True)), ("#", 2 | 2 << 4)]),
         b"\x82\x0b\x01\x02\x00\x00\x01x\x04\x00\x01#\x22"),
        (publish("a/b", b"hi"), b"\x30\x08\x00\x03a/b\x00hi"),
        (publish("a/b", b"hi", qos=1, packet_id=0x1234), b"\x32\x0a\x00\x03a/b\x12\x34\x00hi"),
        (publish("a/b", b"hi", message_expiry_s=60),
         b"\x30\x0d\x00\x03a/b\x05\x02\x00\x00\x00\x3chi"),
        (publish("a/b", b"", qos=1, packet_id=1, retain=True, dup=True, message_expiry_s=0x0102),
         b"\x3b\x0d\x00\x03a/b\x00\x01\x05\x02\x00\x00\x01\x02"),
        (publish("é", b""), b"\x30\x05\x00\x02\xc3\xa9\x00"),
        (puback(0x1234), b"\x40\x02\x12\x34"),
        (disconnect(), b"\xe0\x00"),
        (disconnect(0x04), b"\xe0\x02\x04\x00"),
        (pingreq(), b"\xc0\x00"),
    ],
)  # fmt: skip
def test_encoder_bytes(wire: bytes, expected: bytes) -> None:
    """Each encoder writes exactly the bytes the OASIS MQTT 5.0 spec gives for its packet."""
    assert wire == expected


@pytest.mark.parametrize(
    ("payload_size", "header"),
    [
        (123, b"\x30\x7f"),  # remaining length 127: one byte
        (124, b"\x30\x80\x01"),  # 128: two bytes
        (200, b"\x30\xcc\x01"),  # 204
        (16_379, b"\x30\xff\x7f"),  # 16383: two bytes
        (16_380, b"\x30\x80\x80\x01"),  # 16384: three bytes
        (20_000, b"\x30\xa4\x9c\x01"),  # 20004
    ],
)
def test_publish_remaining_length_varint(payload_size: int, header: bytes) -> None:
    """The remaining length is a variable byte integer (§1.5.5), and the Reader reads it back."""
    payload = bytes(range(256)) * (payload_size // 256) + bytes(payload_size % 256)
    wire = publish("t", payload)
    assert wire == header + b"\x00\x01t\x00" + payload
    assert read([wire]) == [Publish("t", payload, 0, 0, retain=False, dup=False)]


# --- reading streams ----------------------------------------------------------------------------


@FAST
@given(items=streams(), data=st.data())
def test_reader_round_trip_at_any_cut(
    items: list[tuple[bytes, Packet]], data: st.DataObject
) -> None:
    """Packets come out equal and in order however the stream is cut, each as soon as whole."""
    stream = b"".join(wire for wire, _ in items)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    ends = list(itertools.accumulate(len(wire) for wire, _ in items))
    reader, got, offset = Reader(), [], 0
    for piece in split(stream, cuts):
        got += reader.feed(piece)
        offset += len(piece)
        done = [end for end in ends if end <= offset]
        assert len(got) == len(done)
        assert reader.buffered == offset - (done[-1] if done else 0)
    assert got == [packet for _, packet in items]
    assert reader.buffered == 0


def test_every_split_of_one_stream() -> None:
    """Cutting one stream in two at every offset, or feeding it byte by byte, changes nothing.

    The stream also holds what puback() and disconnect() write, which the Reader knows too.
    """
    wires = [wire for wire, _ in SERVER_PACKETS] + [publish("ü/x", b"p" * 130, qos=1, packet_id=9)]
    stream = b"".join(wires) + puback(0xBEEF) + disconnect(0x04)
    expected = [packet for _, packet in SERVER_PACKETS]
    expected += [Publish("ü/x", b"p" * 130, 1, 9, retain=False, dup=False), PubAck(0xBEEF)]
    expected.append(Disconnect(0x04))
    assert read([stream]) == expected
    for cut in range(len(stream) + 1):
        assert read([stream[:cut], stream[cut:]]) == expected, cut
    assert read(stream[i : i + 1] for i in range(len(stream))) == expected


def test_property_accessors() -> None:
    """ConnAck and Disconnect accessors give the server's properties, or the spec defaults."""
    (full,) = read([CONNACK_PROPERTIES])
    assert isinstance(full, ConnAck)
    assert (full.receive_maximum, full.server_keep_alive) == (20, 60)
    assert (full.maximum_packet_size, full.reason_string) == (4096, "ok")
    assert full.properties == CONNACK_VALUES
    (bare,) = read([b"\x20\x03\x00\x00\x00"])
    assert isinstance(bare, ConnAck)
    assert (bare.receive_maximum, bare.server_keep_alive) == (65_535, None)
    assert (bare.maximum_packet_size, bare.reason_string) == (None, None)
    (gone,) = read([b"\xe0\x08\x8b\x06\x1f\x00\x03bye"])
    assert isinstance(gone, Disconnect)
    assert (gone.reason_code, gone.reason_string) == (0x8B, "bye")


@pytest.mark.parametrize("qos_bits", [0x30, 0x32])
def test_server_publish_payload_follows_its_properties(qos_bits: int) -> None:
    """With user properties and message expiry, the payload is exactly the bytes after them."""
    properties = b"\x26\x00\x01k\x00\x02vv\x02\x00\x00\x00\x3c\x26\x00\x00\x00\x00"
    header = b"\x00\x03a/b" + (b"\xab\xcd" if qos_bits & 2 else b"")
    payload = b"\x00\x0d\x26tail"
    body = header + bytes((len(properties),)) + properties + payload
    (packet,) = read([bytes((qos_bits, len(body))) + body])
    assert packet == Publish("a/b", payload, qos_bits >> 1 & 3, 0xABCD if qos_bits & 2 else 0,
                             retain=False, dup=False)  # fmt: skip


# --- robustness ---------------------------------------------------------------------------------


def check_only_mqtt_errors(pieces: list[bytes]) -> None:
    """Check that ``pieces`` give packets or an MqttProtocolError with a refusal code."""
    result = outcome(pieces)
    if isinstance(result, MqttProtocolError):
        assert result.reason_code in REFUSAL_CODES


@FAST
@example(data=b"\x30\x00", cuts=[])
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=5))
def test_arbitrary_bytes_only_raise_mqtt_errors(data: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes, in arbitrary pieces, give packets or MqttProtocolError, nothing else."""
    check_only_mqtt_errors(split(data, [min(cut, len(data)) for cut in cuts]))


@FAST
@given(items=streams(max_payload=16), data=st.data())
def test_mutated_streams_only_raise_mqtt_errors(
    items: list[tuple[bytes, Packet]], data: st.DataObject
) -> None:
    """Valid streams with flipped bytes, or truncated and followed by garbage, never crash."""
    stream = bytearray(b"".join(wire for wire, _ in items))
    for _ in range(data.draw(st.integers(0, 3))):
        stream[data.draw(st.integers(0, len(stream) - 1))] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        stream = stream[: data.draw(st.integers(0, len(stream)))] + data.draw(st.binary(max_size=8))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=4))
    check_only_mqtt_errors(split(bytes(stream), cuts))


@pytest.mark.parametrize(
    ("wire", "payload"),
    [
        (publish("a", b""), b""),
        (publish("a", b"xy", qos=1, packet_id=1), b"xy"),
        (publish("a/b", b"z", qos=1, packet_id=9, message_expiry_s=5), b"z"),
    ],
    ids=["qos0", "qos1", "qos1-expiry"],
)
@pytest.mark.parametrize("after", [b"", b"\xd0\x00"], ids=["alone", "then-pingresp"])
def test_publish_cut_inside_its_header_is_malformed(
    wire: bytes, payload: bytes, after: bytes
) -> None:
    """A PUBLISH whose remaining length ends inside topic, packet id or properties gets 0x81."""
    body = wire[2:]
    for length in range(len(body) - len(payload)):
        cut = bytes((wire[0], length)) + body[:length] + after
        assert refusal([cut]) == 0x81, cut


# --- refusals -----------------------------------------------------------------------------------


def test_packet_over_the_limit_is_refused_from_its_header() -> None:
    """Reader(100) takes a 100-byte packet, and refuses a 101-byte one once its length is read."""
    assert len(publish("t", bytes(94))) == 100
    assert read([publish("t", bytes(94))], Reader(100)) == [
        Publish("t", bytes(94), 0, 0, retain=False, dup=False)
    ]
    too_big = publish("t", bytes(95))
    assert refusal([too_big[:2]], Reader(100)) == 0x95
    assert refusal([too_big[:1], too_big[1:2]], Reader(100)) == 0x95
    long_header = publish("t", bytes(200))[:3]
    assert refusal([long_header[:2], long_header[2:]], Reader(100)) == 0x95
    assert refusal([b"\x30\xff\xff\xff\x7f"]) == 0x95  # 256 MiB against the 1 MiB default


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"\x30\xff\xff\xff\xff\x7f", 0x81),  # remaining length of five bytes
        (b"\x36\x06\x00\x03a/b\x00", 0x81),  # QoS bits 3
        (b"\x30\x09\x00\x03a/b\x03\x23\x00\x01", 0x94),  # topic alias
        (b"\x30\x0f\x00\x03a/b\x08\x02\x00\x00\x00\x3c\x23\x00\x07p", 0x94),  # alias after expiry
        (b"\x30\x05\x00\x09abc", 0x81),  # topic length overruns the packet
        (b"\x32\x05\x00\x09abc", 0x81),  # the same at QoS 1
        (b"\x30\x06\x00\x01a\x05\x02\x00", 0x81),  # properties overrun the packet
        (b"\x30\x06\x00\x01a\x02\x7f\x00", 0x81),  # unknown property 0x7f
        (b"\x30\x07\x00\x01a\x03\x26\x00\x05", 0x81),  # user property overruns its block
        (b"\x90\x03\x00\x01\x00", 0x81),  # SUBACK without reason codes
        (b"\x20\x01\x00", 0x81),  # CONNACK too short
        (b"\x40\x01\x00", 0x81),  # PUBACK too short
        (b"\xe0\x03\x00\x05\x1f", 0x81),  # DISCONNECT properties overrun
    ],
)
def test_malformed_packets_are_refused(wire: bytes, code: int) -> None:
    """Each malformed packet is refused with its reason code, whole or fed byte by byte."""
    assert refusal([wire]) == code
    assert refusal(wire[i : i + 1] for i in range(len(wire))) == code


@pytest.mark.parametrize("first", [0x00, 0x10, 0x52, 0x62, 0x70, 0x82, 0xA2, 0xB0, 0xC0, 0xF0])
def test_packets_a_server_may_not_send_are_protocol_errors(first: int) -> None:
    """CONNECT, PUBREC/PUBREL/PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, UNSUBACK, PINGREQ, AUTH: 0x82."""
    assert refusal([bytes((first, 0))]) == 0x82


def test_next_packet_id_skips_ids_in_use_and_wraps() -> None:
    """Ids run 1..65535 and wrap; an id any of the sets holds is skipped; none free raises."""
    assert mqtt5.next_packet_id(0) == 1
    assert mqtt5.next_packet_id(5, {6, 7}, {8}) == 9
    assert mqtt5.next_packet_id(0xFFFF, {1}) == 2
    with pytest.raises(OverflowError):
        mqtt5.next_packet_id(1, range(1, 0x10000))
