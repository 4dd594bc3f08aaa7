"""The frame codec: round trips, bounded decoding of hostile input, field validation, keys."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hmac
from hashlib import sha256
from typing import TYPE_CHECKING, Any, Final

import msgpack
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from protocols.codec import (
    KEY_SIZE,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    TAG_SIZE,
    FrameKey,
    compute_tag,
    decode,
    decode_unverified,
    derive_machine_key,
    encode,
    encode_body,
    peek_header,
)
from protocols.errors import (
    BadMacError,
    EncodeError,
    FrameTooLargeError,
    MalformedFrameError,
    ProtocolError,
    TruncatedFrameError,
    UnknownFrameTypeError,
    UnsupportedVersionError,
    WrongDirectionError,
)
from protocols.frames import (
    FRAME_TYPES,
    PROTOCOL_VERSION,
    AckCode,
    Config,
    ConfigAck,
    ConfigStatus,
    Direction,
    Dispense,
    Event,
    FailReason,
    Frame,
    Heartbeat,
    Hello,
    Outcome,
    Presence,
    Reading,
    ReadingKind,
    ResultAck,
    SlotConfig,
    StatusQuery,
    StatusReply,
    Telemetry,
    Time,
    Vend,
    VendAck,
    VendResult,
    VendState,
)
from protocols.schema import Record
from tests.protocols.strategies import (
    frames,
    frames_of,
    future_values,
    msgpack_values,
    records,
)

if TYPE_CHECKING:
    from collections.abc import Callable

KEY: Final = FrameKey(bytes(range(32)))
RAW_KEY: Final = bytes(range(32))
OTHER_KEY: Final = FrameKey(bytes(range(1, 33)))
MASTER: Final = bytes(range(100, 132))

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Hand-picked frames, one per type, for the exhaustive (every bit, every length) tests.
VEND: Final = Vend(vend_id=123456789, slot=12, price=250, deadline=1_760_000_000, attempt=1)
CONFIG: Final = Config(
    version=3,
    slots=(
        SlotConfig(1, "A1", "Cola 0,33 l", 150, 10, drop_sensor=True),
        SlotConfig(2, "B2", "Café crème", 220, 8, drop_sensor=False),
    ),
)
HELLO: Final = Hello(boot=4, seq=0, firmware="vm-2.1.0", config_version=3, clock_ms=1_760_000_000)
VEND_RESULT: Final = VendResult(
    boot=4,
    seq=2,
    vend_id=7,
    dispense=Dispense(Outcome.FAILED, FailReason.JAM, drop_detected=False, motor_ms=900, retries=2),
)
STATUS_REPLY: Final = StatusReply(
    boot=4,
    seq=3,
    vend_id=7,
    vend_state=VendState.DONE,
    code=AckCode.ACCEPTED,
    dispense=Dispense(
        Outcome.DISPENSED, FailReason.NONE, drop_detected=True, motor_ms=1, retries=0
    ),
    active_vend=None,
    config_version=3,
    clock_ms=5,
)
TELEMETRY: Final = Telemetry(
    boot=4,
    seq=4,
    t0_ms=99,
    readings=(Reading(0, ReadingKind.TEMPERATURE, None, -350),),
    events=(Event(10, "EA2", 3, active=True),),
)
HEARTBEAT: Final = Heartbeat(boot=4, seq=5, clock_ms=1, rssi=-71, uptime_s=3600, want_time=True)
PRESENCE: Final = Presence(boot=4, seq=6, session=1, online=False)
SAMPLES: Final[list[Frame]] = [
    VEND,
    ResultAck(vend_id=2**64 - 1),
    StatusQuery(vend_id=7, deadline=1_760_000_000),
    CONFIG,
    Time(now_ms=1_760_000_000_123, echo_boot=4, echo_seq=0),
    HELLO,
    VendAck(boot=4, seq=1, vend_id=7, attempt=2, code=AckCode.BUSY, duplicate=False),
    VEND_RESULT,
    STATUS_REPLY,
    ConfigAck(boot=4, seq=7, version=3, status=ConfigStatus.APPLIED, current_version=3),
    TELEMETRY,
    HEARTBEAT,
    PRESENCE,
]


def sign(body: bytes, key: FrameKey | bytes = KEY) -> bytes:
    """Append the correct tag, so that the frame reaches the parser behind the MAC."""
    return body + compute_tag(key, body)


def to_wire(value: object) -> object:
    """Turn a record into its msgpack value without any checking (to forge bad frames)."""
    if isinstance(value, Record):
        return [to_wire(getattr(value, name)) for name, _ in value.WIRE_FIELDS]
    if isinstance(value, tuple):
        return [to_wire(v) for v in value]
    if isinstance(value, enum.IntEnum):
        return int(value)
    return value


def wire_items(frame: Frame) -> list[Any]:
    """Return the unchecked msgpack array of a frame body: version, type code, fields."""
    fields = to_wire(frame)
    assert isinstance(fields, list)
    return [PROTOCOL_VERSION, frame.TYPE, *fields]


def forge(frame: Frame, key: FrameKey | bytes = KEY) -> bytes:
    """Sign a frame body built by hand from ``frame``'s values, valid or not."""
    return sign(msgpack.packb(wire_items(frame)), key)


def outcome(fn: Callable[[], Frame]) -> Frame | ProtocolError:
    """Run a decoder; return its frame or its ProtocolError (anything else propagates)."""
    try:
        return fn()
    except ProtocolError as exc:
        return exc


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(FRAME_TYPES.values()), ids=lambda c: c.__name__)
def test_strategies_cover_every_frame_type(cls: type[Frame]) -> None:
    """The ``frames()`` strategy produces every class registered in FRAME_TYPES."""
    found = find(
        frames(),
        lambda frame: type(frame) is cls,
        settings=settings(max_examples=2000, deadline=None, database=None),
    )
    assert found.check() is None


@pytest.mark.parametrize("cls", list(FRAME_TYPES.values()), ids=lambda c: c.__name__)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_frames_of_builds_valid_instances(cls: type[Frame], data: st.DataObject) -> None:
    """``frames_of(cls)`` builds instances of exactly ``cls`` that pass every check()."""
    frame = data.draw(frames_of(cls))
    assert type(frame) is cls
    assert frame.check() is None


@FAST
@given(frames())
def test_round_trip_with_frame_key(frame: Frame) -> None:
    """A frame encoded under a FrameKey decodes to an equal frame under that key."""
    assert decode(encode(frame, KEY), KEY) == frame


@FAST
@given(frames())
def test_round_trip_with_raw_key(frame: Frame) -> None:
    """Raw 32-byte keys and FrameKey produce the same frame bytes, which decode either way."""
    data = encode(frame, RAW_KEY)
    assert data == encode(frame, KEY)
    assert decode(data, RAW_KEY) == frame
    assert decode(data, KEY) == frame


@FAST
@given(frames())
def test_round_trip_with_direction(frame: Frame) -> None:
    """A frame decodes with its own direction, and peek_header reports its type and direction."""
    data = encode(frame, KEY)
    assert decode(data, KEY, direction=frame.DIRECTION) == frame
    assert decode_unverified(data) == frame
    assert peek_header(data) == (frame.TYPE, type(frame), frame.DIRECTION)
    assert len(data) == len(encode_body(frame)) + TAG_SIZE


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_opposite_direction_is_refused_before_the_mac(frame: Frame) -> None:
    """A frame decoded as the other direction raises WrongDirectionError, even under a wrong key."""
    other = Direction.UP if frame.DIRECTION is Direction.DOWN else Direction.DOWN
    data = encode(frame, KEY)
    with pytest.raises(WrongDirectionError):
        decode(data, KEY, direction=other)
    with pytest.raises(WrongDirectionError):
        decode(data, OTHER_KEY, direction=other)


def test_largest_frames_round_trip() -> None:
    """A Config and a Telemetry filled to every declared limit fit the frame size and round-trip."""
    config = Config(
        version=2**32 - 1,
        slots=tuple(
            SlotConfig(i, "P" * 32, "é" * 32, 2**32 - 1, 2**16 - 1, drop_sensor=True)
            for i in range(128)
        ),
    )
    telemetry = Telemetry(
        boot=2**32 - 1,
        seq=2**32 - 1,
        t0_ms=2**64 - 1,
        readings=tuple(Reading(2**32 - 1, ReadingKind.RSSI, 255, -(2**31)) for _ in range(256)),
        events=tuple(Event(2**32 - 1, "ZZZZZZ", 255, active=False) for _ in range(256)),
    )
    for frame in (config, telemetry):
        data = encode(frame, KEY)
        assert len(data) <= MAX_FRAME_SIZE
        assert decode(data, KEY) == frame


def test_samples_cover_every_frame_type() -> None:
    """The hand-picked samples hold one valid frame of every registered type."""
    assert sorted(type(f).TYPE for f in SAMPLES) == sorted(FRAME_TYPES)
    assert all(f.check() is None for f in SAMPLES)


def test_max_vend_fits_64_bytes() -> None:
    """A Vend with the largest value in every field is at most 64 bytes, tag included."""
    vend = Vend(vend_id=2**64 - 1, slot=255, price=2**32 - 1, deadline=2**32 - 1, attempt=255)
    assert len(encode(vend, KEY)) <= 64


# --- arbitrary and hostile input --------------------------------------------------------------

HEADERS: Final = [bytes([0x90 | n, 1, code]) for n in (2, 3, 7, 15) for code in FRAME_TYPES]

arbitrary_bytes = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=MIN_FRAME_SIZE - 3, max_size=MIN_FRAME_SIZE + 3),
    st.builds(bytes.__add__, st.sampled_from(HEADERS), st.binary(max_size=80)),
    # Near and above MAX_FRAME_SIZE: a drawn prefix padded with a repeated byte (Hypothesis
    # cannot draw 16 KiB of entropy per example).
    st.builds(
        lambda head, fill, size: (head + bytes([fill]) * size)[:size],
        st.sampled_from([b"", *HEADERS]),
        st.integers(0, 255),
        st.integers(MAX_FRAME_SIZE - 40, MAX_FRAME_SIZE + 40),
    ),
)


@THOROUGH
@given(arbitrary_bytes)
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    """decode, decode_unverified and peek_header raise nothing but ProtocolError on any bytes."""
    outcome(lambda: decode(data, KEY))
    outcome(lambda: decode(data, KEY, direction=Direction.UP))
    outcome(lambda: decode_unverified(data))
    with contextlib.suppress(ProtocolError):
        peek_header(data)


TYPE_CODES: Final = st.one_of(st.sampled_from(sorted(FRAME_TYPES)), st.integers(0, 255))


def _expect_behind_mac(type_code: int, result: Frame | ProtocolError) -> None:
    """Check what decoding an authentic body with this type code may give."""
    if not 0x01 <= type_code <= 0x7F:
        assert type(result) is MalformedFrameError
    elif type_code not in FRAME_TYPES:
        assert type(result) is UnknownFrameTypeError
    else:
        assert type(result) in {FRAME_TYPES[type_code], MalformedFrameError}


@THOROUGH
@given(
    type_code=TYPE_CODES,
    count=st.integers(2, 15),
    values=st.lists(msgpack_values, max_size=8),
)
def test_mac_valid_msgpack_garbage_is_malformed(
    type_code: int, count: int, values: list[object]
) -> None:
    """Authentic bodies of arbitrary msgpack values decode or raise the expected ProtocolError."""
    body = bytes([0x90 | count, PROTOCOL_VERSION, type_code])
    body += b"".join(msgpack.packb(v) for v in values)
    _expect_behind_mac(type_code, outcome(lambda: decode(sign(body), KEY)))


@THOROUGH
@given(type_code=TYPE_CODES, count=st.integers(2, 15), tail=st.binary(max_size=120))
def test_mac_valid_raw_garbage_is_malformed(type_code: int, count: int, tail: bytes) -> None:
    """Authentic bodies of arbitrary bytes after the header raise the expected ProtocolError."""
    body = bytes([0x90 | count, PROTOCOL_VERSION, type_code]) + tail
    _expect_behind_mac(type_code, outcome(lambda: decode(sign(body), KEY)))


@THOROUGH
@given(frame=frames(), data=st.data())
def test_one_bad_field_behind_the_mac_is_malformed(frame: Frame, data: st.DataObject) -> None:
    """Replacing one field of an authentic frame with any msgpack value decodes or is malformed."""
    items = wire_items(frame)
    index = data.draw(st.integers(2, len(items) - 1))
    items[index] = data.draw(msgpack_values)
    result = outcome(lambda: decode(sign(msgpack.packb(items)), KEY))
    assert type(result) in {type(frame), MalformedFrameError}


def test_deeply_nested_array_is_malformed() -> None:
    """Arrays nested as deep as msgpack allows, in any field, raise MalformedFrameError."""
    for depth in (10, 999, 1000, 1023, 1024, 5000):
        body = bytes([0x93, PROTOCOL_VERSION, ResultAck.TYPE]) + b"\x91" * depth + b"\x01"
        with pytest.raises(MalformedFrameError):
            decode(sign(body), KEY)


def test_huge_length_headers_are_malformed() -> None:
    """str, bin, array and map headers announcing ~4 GiB raise MalformedFrameError at once."""
    for marker in (b"\xdb", b"\xc6", b"\xdd", b"\xdf"):
        body = bytes([0x93, PROTOCOL_VERSION, Hello.TYPE]) + marker + b"\xff\xff\xff\xff" + b"a"
        with pytest.raises(MalformedFrameError):
            decode(sign(body), KEY)


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_every_single_bit_flip_is_refused(frame: Frame) -> None:
    """Flipping any one bit of a valid frame makes decode raise a ProtocolError."""
    data = encode(frame, KEY)
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ProtocolError):
            decode(bytes(flipped), KEY)
        outcome(lambda: decode_unverified(bytes(flipped)))  # noqa: B023  (called right here)


@FAST
@given(frame=frames(), data=st.data())
def test_random_bit_flip_is_refused(frame: Frame, data: st.DataObject) -> None:
    """Flipping a random bit of a random valid frame makes decode raise a ProtocolError."""
    encoded = bytearray(encode(frame, KEY))
    bit = data.draw(st.integers(0, len(encoded) * 8 - 1))
    encoded[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ProtocolError):
        decode(bytes(encoded), KEY)


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_every_truncation_is_refused(frame: Frame) -> None:
    """A valid frame cut short raises TruncatedFrameError, or BadMacError from 19 bytes on."""
    data = encode(frame, KEY)
    for size in range(len(data)):
        with pytest.raises(ProtocolError) as info:
            decode(data[:size], KEY)
        expected = TruncatedFrameError if size < MIN_FRAME_SIZE else BadMacError
        assert type(info.value) is expected


# --- specific errors --------------------------------------------------------------------------


def test_too_large_frame() -> None:
    """A frame longer than MAX_FRAME_SIZE raises FrameTooLargeError without being parsed."""
    data = encode(VEND, KEY)
    big = data[:3] + bytes(MAX_FRAME_SIZE - 2)
    for fn in (lambda: decode(big, KEY), lambda: decode_unverified(big), lambda: peek_header(big)):
        with pytest.raises(FrameTooLargeError) as info:
            fn()
        assert (info.value.size, info.value.limit) == (MAX_FRAME_SIZE + 1, MAX_FRAME_SIZE)


def test_short_frame_is_truncated() -> None:
    """A frame shorter than 19 bytes (header plus tag) raises TruncatedFrameError."""
    assert MIN_FRAME_SIZE == 19
    for data in (b"", b"\x93", bytes([0x93, 1, 1]) + bytes(15)):
        with pytest.raises(TruncatedFrameError):
            decode(data, KEY)


def test_version_two_is_unsupported() -> None:
    """A body declaring version 2 raises UnsupportedVersionError, whatever its tag."""
    body = bytearray(encode_body(VEND))
    body[1] = 2
    for data in (sign(bytes(body)), bytes(body) + bytes(TAG_SIZE)):
        with pytest.raises(UnsupportedVersionError) as info:
            decode(data, KEY)
        assert info.value.version == 2


def test_unknown_authentic_type_code() -> None:
    """An authentic frame of an unassigned type code raises UnknownFrameTypeError."""
    body = bytes([0x93, PROTOCOL_VERSION, 0x3E, 0x01])
    with pytest.raises(UnknownFrameTypeError) as info:
        decode(sign(body), KEY)
    assert info.value.type_code == 0x3E
    with pytest.raises(UnknownFrameTypeError):
        decode_unverified(sign(body))
    with pytest.raises(BadMacError):  # the MAC is checked before the type is looked up
        decode(sign(body, OTHER_KEY), KEY)


@pytest.mark.parametrize("code", [0x00, 0x80, 0xC0, 0xFF])
def test_reserved_type_code_is_malformed(code: int) -> None:
    """A type byte of 0x00 or 0x80 and above raises MalformedFrameError."""
    body = bytes([0x93, PROTOCOL_VERSION, code, 0x01])
    with pytest.raises(MalformedFrameError):
        decode(sign(body), KEY)


@pytest.mark.parametrize(
    "header",
    [b"\x80\x01\x01", b"\x91\x01\x01", b"\xdc\x00\x03", b"\x93\xcc\x01", b"\x93\x01\xcc"],
    ids=["fixmap", "fixarray1", "array16", "uint8-version", "uint8-type"],
)
def test_bad_fixed_header_is_malformed(header: bytes) -> None:
    """First bytes other than fixarray(2..15), fixint version, fixint type are malformed."""
    with pytest.raises(MalformedFrameError):
        decode(sign(header + b"\x01\x02"), KEY)


def test_wrong_key_is_bad_mac() -> None:
    """A frame verified under another key raises BadMacError but still parses unverified."""
    data = encode(VEND, KEY)
    with pytest.raises(BadMacError):
        decode(data, OTHER_KEY)
    with pytest.raises(BadMacError):
        decode(data, bytes(KEY_SIZE))
    assert decode_unverified(data) == VEND


# --- forward compatibility --------------------------------------------------------------------


@FAST
@given(frame=frames(), data=st.data())
def test_extra_trailing_fields_are_ignored(frame: Frame, data: st.DataObject) -> None:
    """An authentic frame with extra trailing elements decodes to the same frame (SPEC §8)."""
    items = wire_items(frame)
    extra = data.draw(st.lists(future_values, min_size=1, max_size=15 - len(items)))
    assert decode(sign(msgpack.packb(items + extra)), KEY) == frame


def test_extra_trailing_fields_in_nested_records_are_ignored() -> None:
    """Nested records with extra trailing elements decode to the same record (SPEC §8)."""
    frame = VEND_RESULT
    items = wire_items(frame)
    items[-1] += [None, 5, "later", [1, 2]]
    assert decode(sign(msgpack.packb(items)), KEY) == frame


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_missing_fields_are_malformed(frame: Frame) -> None:
    """An authentic frame with fewer fields than declared raises MalformedFrameError."""
    items = wire_items(frame)
    for keep in range(2, len(items)):
        with pytest.raises(MalformedFrameError):
            decode(sign(msgpack.packb(items[:keep])), KEY)


def test_nested_record_missing_fields_is_malformed() -> None:
    """A nested record with fewer fields than declared raises MalformedFrameError."""
    frame = VEND_RESULT
    items = wire_items(frame)
    items[-1] = items[-1][:-1]
    with pytest.raises(MalformedFrameError, match=r"^VendResult\.dispense"):
        decode(sign(msgpack.packb(items)), KEY)


# --- field validation -------------------------------------------------------------------------


def replace_at(value: Any, path: tuple[str | int, ...], new: object) -> Any:
    """Return ``value`` with the attribute or tuple item at ``path`` set to ``new``, unchecked."""
    if not path:
        return new
    step, rest = path[0], path[1:]
    if isinstance(step, int):
        items = list(value)
        items[step] = replace_at(items[step], rest, new)
        return tuple(items)
    return dataclasses.replace(value, **{step: replace_at(getattr(value, step), rest, new)})


#: (frame, path, bad value, where the error is located): each breaks one rule.
BAD_FIELDS: Final[list[tuple[Frame, tuple[str | int, ...], object, str]]] = [
    (VEND, ("slot",), 256, "Vend.slot"),
    (VEND, ("price",), -1, "Vend.price"),
    (VEND, ("vend_id",), -(2**63), "Vend.vend_id"),
    (VEND, ("deadline",), 2**32, "Vend.deadline"),
    (VEND, ("attempt",), True, "Vend.attempt"),
    (VEND, ("attempt",), 1.0, "Vend.attempt"),
    (VEND, ("attempt",), "1", "Vend.attempt"),
    (VEND, ("attempt",), 0, "Vend"),
    (HEARTBEAT, ("rssi",), 2**15, "Heartbeat.rssi"),
    (HEARTBEAT, ("rssi",), -(2**15) - 1, "Heartbeat.rssi"),
    (HEARTBEAT, ("want_time",), 1, "Heartbeat.want_time"),
    (PRESENCE, ("online",), 0, "Presence.online"),
    (PRESENCE, ("online",), None, "Presence.online"),
    (HELLO, ("firmware",), "v" * 33, "Hello.firmware"),
    (HELLO, ("firmware",), "€" * 11, "Hello.firmware"),  # 11 characters, 33 bytes
    (HELLO, ("boot",), None, "Hello.boot"),
    (HELLO, ("seq",), [1], "Hello.seq"),
    (CONFIG, ("version",), 0, "Config"),
    (CONFIG, ("slots", 1, "name"), "é" * 33, "Config.slots[1].name"),
    (CONFIG, ("slots", 1, "slot"), 1, "Config"),  # a duplicate slot
    (CONFIG, ("slots", 0, "drop_sensor"), 1, "Config.slots[0].drop_sensor"),
    (CONFIG, ("slots", 1, "capacity"), 2**16, "Config.slots[1].capacity"),
    (VEND_RESULT, ("dispense", "reason"), FailReason.NONE, "VendResult.dispense"),
    (VEND_RESULT, ("dispense", "outcome"), Outcome.DISPENSED, "VendResult.dispense"),
    (VEND_RESULT, ("dispense", "drop_detected"), 0, "VendResult.dispense.drop_detected"),
    (STATUS_REPLY, ("dispense", "reason"), FailReason.MOTOR_FAULT, "StatusReply.dispense"),
    (STATUS_REPLY, ("vend_state",), VendState.ACCEPTED, "StatusReply"),
    (STATUS_REPLY, ("code",), 5, "StatusReply.code"),
    (STATUS_REPLY, ("code",), True, "StatusReply.code"),
    (StatusQuery(vend_id=7, deadline=1), ("deadline",), None, "StatusQuery"),
    (TELEMETRY, ("events", 0, "code"), "", "Telemetry.events[0].code"),
    (TELEMETRY, ("events", 0, "code"), "ÉÉÉÉÉ", "Telemetry.events[0].code"),  # 10 bytes
    (TELEMETRY, ("readings", 0, "kind"), 0, "Telemetry.readings[0].kind"),
    (TELEMETRY, ("readings", 0, "slot"), -1, "Telemetry.readings[0].slot"),
    (TELEMETRY, ("readings", 0, "value"), 2**31, "Telemetry.readings[0].value"),
]


@pytest.mark.parametrize(
    ("frame", "path", "bad", "where"),
    BAD_FIELDS,
    ids=[f"{where}={bad!r}"[:48] for _, _, bad, where in BAD_FIELDS],
)
def test_bad_field_is_refused_both_ways(
    frame: Frame, path: tuple[str | int, ...], bad: object, where: str
) -> None:
    """A field breaking its rule raises EncodeError on encode, MalformedFrameError on decode."""
    broken: Frame = replace_at(frame, path, bad)
    with pytest.raises(EncodeError) as encoding:
        encode(broken, KEY)
    with pytest.raises(MalformedFrameError) as decoding:
        decode(forge(broken), KEY)
    for exc in (encoding.value, decoding.value):
        text = str(exc)
        assert text.startswith(where)
        assert text[len(where)] in ":", f"{text!r} is not located at {where!r}"


def test_encode_error_names_the_nested_field_path() -> None:
    """An overlong name in the second slot of a Config is reported as Config.slots[1].name."""
    broken: Frame = replace_at(CONFIG, ("slots", 1, "name"), "x" * 65)
    with pytest.raises(EncodeError, match=r"^Config\.slots\[1\]\.name: "):
        encode(broken, KEY)


def test_too_many_list_items_are_refused() -> None:
    """A list longer than its declared maximum is refused on encode and on decode."""
    broken = dataclasses.replace(
        CONFIG, slots=tuple(SlotConfig(i, "", "", 0, 0, drop_sensor=False) for i in range(129))
    )
    with pytest.raises(EncodeError, match=r"^Config\.slots: "):
        encode(broken, KEY)
    with pytest.raises(MalformedFrameError, match=r"^Config\.slots: "):
        decode(forge(broken), KEY)


def test_unencodable_string_is_an_encode_error() -> None:
    """A string holding a lone surrogate raises EncodeError, not UnicodeEncodeError."""
    with pytest.raises(EncodeError, match=r"^Hello\.firmware"):
        encode(dataclasses.replace(HELLO, firmware="a\udc80"), KEY)


@FAST
@given(records(Dispense))
def test_generated_dispense_records_are_consistent(dispense: Dispense) -> None:
    """Generated Dispense records have reason NONE exactly when the outcome is DISPENSED."""
    assert (dispense.outcome is Outcome.DISPENSED) == (dispense.reason is FailReason.NONE)


# --- keys -------------------------------------------------------------------------------------


def test_derive_machine_key_is_deterministic_and_per_machine() -> None:
    """The same master and id give the same key; other ids give other keys."""
    key = derive_machine_key(MASTER, "VM-0001")
    assert len(key) == KEY_SIZE
    assert key == derive_machine_key(MASTER, "VM-0001")
    assert key != derive_machine_key(MASTER, "VM-0002")
    assert key != derive_machine_key(bytes(32), "VM-0001")
    assert FrameKey.derive(MASTER, "VM-0001").secret == key


def test_derive_machine_key_follows_spec_formula() -> None:
    """K_m = HMAC-SHA256(S, "vendgate/v1/frame-key/" || machine_id) (SPEC §4.3)."""
    expected = hmac.new(MASTER, b"vendgate/v1/frame-key/VM-0001", sha256).digest()
    assert derive_machine_key(MASTER, "VM-0001") == expected


def test_derive_machine_key_rejects_short_master_secret() -> None:
    """A master secret shorter than 32 bytes raises ValueError."""
    with pytest.raises(ValueError, match="master secret"):
        derive_machine_key(bytes(31), "VM-0001")


@pytest.mark.parametrize("machine_id", ["", "a/b", "a+b", "#", "a b", "VM-é", "x" * 65])
def test_derive_machine_key_rejects_invalid_machine_ids(machine_id: str) -> None:
    """Machine ids outside 1-64 of [A-Za-z0-9._-] raise ValueError."""
    with pytest.raises(ValueError, match="invalid machine id"):
        derive_machine_key(MASTER, machine_id)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_frame_key_requires_32_bytes(size: int) -> None:
    """A FrameKey of any length other than 32 bytes raises ValueError."""
    with pytest.raises(ValueError, match="32 bytes"):
        FrameKey(bytes(size))


def test_frame_key_repr_hides_the_secret() -> None:
    """The repr of a FrameKey does not show its secret."""
    assert repr(KEY) == "FrameKey(<secret>)"


@FAST
@given(secret=st.binary(min_size=32, max_size=32), body=st.binary(max_size=300))
def test_frame_key_tag_matches_hmac_module(secret: bytes, body: bytes) -> None:
    """FrameKey.tag and compute_tag equal the first 16 bytes of hmac.digest(key, body, sha256)."""
    expected = hmac.digest(secret, body, "sha256")[:16]
    assert FrameKey(secret).tag(body) == expected
    assert compute_tag(FrameKey(secret), body) == expected
    assert compute_tag(secret, body) == expected
