"""Generate the frame decoder's fuzz corpus: ``python -m tests.fuzz.make_corpus``.

The corpus is a folder of small binary frames: valid frames of every type,
truncations, bit flips, header variants, authentic (MAC-valid) bodies of garbage,
and a few hostile msgpack constructs. Every file is signed, where a tag is
needed, with the fixed corpus key ``FrameKey(bytes(range(32)))`` (bytes 00..1f).

Running the module deletes ``corpus/*.bin`` and rewrites it together with
``expected.json``, which records what ``decode(data, KEY)`` gives for each file
(``ok:<FrameClass>`` or ``error:<ErrorClass>``). Generation is seeded, so a
rerun reproduces the same bytes; ``test_corpus`` checks both.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias

import msgpack

from protocols.codec import MAX_FRAME_SIZE, MIN_FRAME_SIZE, TAG_SIZE, FrameKey, compute_tag
from protocols.codec import decode as decode_frame
from protocols.codec import encode as encode_frame
from protocols.errors import ProtocolError
from protocols.frames import (
    FRAME_TYPES,
    PROTOCOL_VERSION,
    AckCode,
    Config,
    ConfigAck,
    ConfigStatus,
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

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: The corpus key: bytes 0x00 to 0x1f. Public on purpose; it protects nothing.
KEY: Final = FrameKey(bytes(range(32)))
SEED: Final = 20_251_126
HERE: Final = Path(__file__).parent
CORPUS_DIR: Final = HERE / "corpus"
EXPECTED_FILE: Final = HERE / "expected.json"
#: Files allowed above the usual 2 KiB size cap start with this.
OVERSIZE_PREFIX: Final = "oversize-"

U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1


def _typical_frames() -> list[Frame]:
    return [
        Vend(vend_id=123_456_789, slot=12, price=250, deadline=1_760_000_000, attempt=1),
        ResultAck(vend_id=123_456_789),
        StatusQuery(vend_id=None, deadline=None),
        Config(
            version=7,
            slots=(
                SlotConfig(1, "A1", "Cola 0,33 l", 150, 10, drop_sensor=True),
                SlotConfig(2, "B2", "Café crème", 220, 8, drop_sensor=False),
                SlotConfig(3, "C3", "おにぎり", 300, 6, drop_sensor=True),
            ),
        ),
        Time(now_ms=1_760_000_000_123, echo_boot=3, echo_seq=0),
        Hello(boot=3, seq=0, firmware="vm-2.1.0", config_version=7, clock_ms=1_760_000_000_000),
        VendAck(
            boot=3, seq=1, vend_id=123_456_789, attempt=1, code=AckCode.ACCEPTED, duplicate=False
        ),
        VendResult(
            boot=3,
            seq=2,
            vend_id=123_456_789,
            dispense=Dispense(
                Outcome.DISPENSED, FailReason.NONE, drop_detected=True, motor_ms=840, retries=0
            ),
        ),
        StatusReply(
            boot=3,
            seq=3,
            vend_id=None,
            vend_state=VendState.NOT_SEEN,
            code=AckCode.ACCEPTED,
            dispense=None,
            active_vend=None,
            config_version=7,
            clock_ms=1_760_000_001_000,
        ),
        ConfigAck(boot=3, seq=4, version=7, status=ConfigStatus.APPLIED, current_version=7),
        Telemetry(
            boot=3,
            seq=5,
            t0_ms=1_760_000_000_000,
            readings=(
                Reading(0, ReadingKind.TEMPERATURE, None, 412),
                Reading(10, ReadingKind.STOCK, 2, 5),
                Reading(20, ReadingKind.RSSI, None, -67),
            ),
            events=(Event(30, "EA2", 3, active=True), Event(40, "X1", None, active=False)),
        ),
        Heartbeat(
            boot=3, seq=6, clock_ms=1_760_000_060_000, rssi=-67, uptime_s=3600, want_time=False
        ),
        Presence(boot=3, seq=7, session=1, online=True),
    ]


def _extreme_frames() -> list[Frame]:
    dispense = Dispense(
        Outcome.UNCERTAIN,
        FailReason.SENSOR_FAULT,
        drop_detected=False,
        motor_ms=U32_MAX,
        retries=255,
    )
    return [
        Vend(vend_id=U64_MAX, slot=255, price=U32_MAX, deadline=U32_MAX, attempt=255),
        ResultAck(vend_id=0),
        StatusQuery(vend_id=U64_MAX, deadline=U32_MAX),
        Config(
            version=U32_MAX,
            slots=tuple(
                SlotConfig(255 - i, "P" * 32, "é" * 32, U32_MAX, 2**16 - 1, drop_sensor=True)
                for i in range(8)
            ),
        ),
        Time(now_ms=U64_MAX, echo_boot=U32_MAX, echo_seq=U32_MAX),
        Hello(boot=U32_MAX, seq=U32_MAX, firmware="€" * 10 + "xy", config_version=0, clock_ms=0),
        VendAck(boot=0, seq=0, vend_id=U64_MAX, attempt=255, code=AckCode.CONFLICT, duplicate=True),
        VendResult(boot=U32_MAX, seq=U32_MAX, vend_id=U64_MAX, dispense=dispense),
        StatusReply(
            boot=U32_MAX,
            seq=U32_MAX,
            vend_id=U64_MAX,
            vend_state=VendState.DONE,
            code=AckCode.CLOCK_UNSYNCED,
            dispense=dispense,
            active_vend=U64_MAX,
            config_version=U32_MAX,
            clock_ms=U64_MAX,
        ),
        ConfigAck(
            boot=U32_MAX,
            seq=U32_MAX,
            version=U32_MAX,
            status=ConfigStatus.INVALID,
            current_version=0,
        ),
        Telemetry(
            boot=U32_MAX,
            seq=U32_MAX,
            t0_ms=U64_MAX,
            readings=tuple(Reading(U32_MAX, ReadingKind.STOCK, 255, -(2**31)) for _ in range(16)),
            events=tuple(Event(U32_MAX, "ZZZZZZZZ", 255, active=True) for _ in range(16)),
        ),
        Heartbeat(boot=0, seq=0, clock_ms=U64_MAX, rssi=-(2**15), uptime_s=U32_MAX, want_time=True),
        Presence(boot=0, seq=0, session=U32_MAX, online=False),
    ]


def _sign(body: bytes) -> bytes:
    return body + compute_tag(KEY, body)


def _header(count: int, type_code: int, version: int = PROTOCOL_VERSION) -> bytes:
    return bytes([0x90 | count, version, type_code])


_SCALARS: Final[list[Callable[[random.Random], object]]] = [
    lambda _: None,
    lambda rng: rng.random() < 0.5,
    lambda rng: rng.randrange(-32, 128),
    lambda rng: rng.choice([-(2**63), -1, 255, 256, 2**16, 2**32, 2**63, U64_MAX]),
    lambda rng: rng.randrange(-(2**63), 2**64),
    lambda rng: rng.choice([0.0, -1.5, 1e300, float("inf"), float("nan")]),
    lambda rng: "".join(rng.choice("aZ9-€é語\u00a0") for _ in range(rng.randrange(40))),
    lambda rng: rng.randbytes(rng.randrange(20)),
]


def _random_value(rng: random.Random, depth: int = 0) -> object:
    """Return an arbitrary msgpack-encodable value, nested at most three deep."""
    choice = rng.randrange(len(_SCALARS) + (2 if depth < 3 else 0))
    if choice < len(_SCALARS):
        return _SCALARS[choice](rng)
    if choice == len(_SCALARS):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    return {rng.randrange(5): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _items(frame: Frame) -> list[object]:
    """Return the body array of a valid frame, decoded back from its bytes."""
    items = msgpack.unpackb(encode_frame(frame, KEY)[:-TAG_SIZE])
    assert isinstance(items, list)
    return items


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def _with_field(frame: Frame, name: str, value: object) -> bytes:
    """Sign the body of ``frame`` with one field replaced by ``value`` on the wire."""
    items = _items(frame)
    items[2 + [n for n, _ in frame.WIRE_FIELDS].index(name)] = value
    return _sign(msgpack.packb(items))


Cases: TypeAlias = "Iterator[tuple[str, bytes]]"


def _valid_frames() -> Cases:
    for frame in _typical_frames():
        yield f"valid-{frame.TYPE:02x}-{type(frame).__name__}", encode_frame(frame, KEY)
    for frame in _extreme_frames():
        yield f"valid-{frame.TYPE:02x}-{type(frame).__name__}-extreme", encode_frame(frame, KEY)


def _truncations(vend: bytes, config: bytes) -> Cases:
    for size in (0, 1, 3, MIN_FRAME_SIZE - 1, MIN_FRAME_SIZE, len(vend) - 1):
        yield f"truncated-vend-{size:03d}", vend[:size]
    for size in (len(config) // 2, len(config) - 1):
        yield f"truncated-config-{size:03d}", config[:size]
    yield "truncated-vend-body-only", vend[:-TAG_SIZE]


def _bit_flips(rng: random.Random, valid: dict[str, bytes]) -> Cases:
    vend = valid["Vend"]
    for where, bit in (("marker", 0), ("version", 8), ("type", 16), ("type-high", 23)):
        yield f"bitflip-vend-{where}", _flip(vend, bit)
    yield "bitflip-vend-tag-last", _flip(vend, len(vend) * 8 - 1)
    names = sorted(valid)
    for i in range(12):
        name = rng.choice(names)
        bit = rng.randrange(len(valid[name]) * 8)
        yield f"bitflip-{i:02d}-{name}-bit{bit}", _flip(valid[name], bit)


def _headers(vend: bytes) -> Cases:
    """Yield header variants, all correctly signed so that only the header decides."""
    fields = vend[3:-TAG_SIZE]
    for label, header in (
        ("version-0", _header(7, 0x01, version=0)),
        ("version-2", _header(7, 0x01, version=2)),
        ("version-127", _header(7, 0x01, version=0x7F)),
        ("version-uint8", bytes([0x97, 0xCC, 0x01])),
        ("marker-fixarray0", bytes([0x90, 0x01, 0x01])),
        ("marker-fixarray1", bytes([0x91, 0x01, 0x01])),
        ("marker-fixarray15", _header(15, 0x01)),
        ("marker-fixmap", bytes([0x87, 0x01, 0x01])),
        ("marker-array16", bytes([0xDC, 0x00, 0x07])),
        ("type-00", _header(7, 0x00)),
        ("type-3e-unknown-down", _header(7, 0x3E)),
        ("type-7f-unknown-up", _header(7, 0x7F)),
        ("type-80", _header(7, 0x80)),
        ("type-ff", _header(7, 0xFF)),
        ("type-uint8", bytes([0x97, 0x01, 0xCC])),
    ):
        yield f"header-{label}", _sign(header + fields)
    yield "header-version-2-unsigned", _header(7, 0x01, version=2) + fields + bytes(TAG_SIZE)
    yield "header-ok-wrong-key", vend[:-TAG_SIZE] + compute_tag(bytes(32), vend[:-TAG_SIZE])


def _mac_valid_garbage(rng: random.Random, typical: list[Frame]) -> Cases:
    """Yield authentic bodies of arbitrary msgpack values, or of arbitrary bytes."""
    codes = sorted(FRAME_TYPES)
    for i in range(16):
        code = rng.choice(codes) if i < 12 else rng.choice([0x06, 0x3F, 0x48, 0x7E])
        values = [_random_value(rng) for _ in range(rng.randrange(9))]
        count = 2 + len(values) if rng.random() < 0.7 else rng.randrange(2, 16)
        body = _header(count, code) + b"".join(msgpack.packb(v) for v in values)
        yield f"macvalid-msgpack-{i:02d}-type{code:02x}", _sign(body)
    for i in range(8):
        code = rng.choice(codes)
        body = _header(rng.randrange(2, 16), code) + rng.randbytes(rng.randrange(1, 120))
        yield f"macvalid-raw-{i:02d}-type{code:02x}", _sign(body)
    for i in range(8):  # one field of a valid frame replaced by an arbitrary value
        frame = rng.choice(typical)
        name = rng.choice(frame.WIRE_FIELDS)[0]
        yield (
            f"macvalid-field-{i:02d}-{type(frame).__name__}-{name}",
            _with_field(frame, name, _random_value(rng)),
        )


def _hostile_msgpack(vend: bytes, hello: Hello) -> Cases:
    """Yield msgpack constructs that a bounded decoder must refuse cheaply, behind a valid MAC."""
    result_ack = _header(3, ResultAck.TYPE)
    for depth in (100, 1023, 1024, 1900):
        yield f"hostile-nested-array-{depth}", _sign(result_ack + b"\x91" * depth + b"\x01")
    for label, marker in (
        ("str32", b"\xdb"),
        ("bin32", b"\xc6"),
        ("array32", b"\xdd"),
        ("map32", b"\xdf"),
        ("ext32", b"\xc9"),
    ):
        huge = marker + b"\xff\xff\xff\xff" + b"x"
        yield f"hostile-huge-{label}-header", _sign(result_ack + huge)
    items = _items(hello)
    at = 2 + [name for name, _ in Hello.WIRE_FIELDS].index("firmware")
    before = b"".join(msgpack.packb(v) for v in items[2:at])
    after = b"".join(msgpack.packb(v) for v in items[at + 1 :])
    for label, firmware in (
        ("invalid-utf8", b"\xa3\xff\xfe\xfd"),
        ("str-256-bytes", msgpack.packb("a" * 256)),
        ("fixext", b"\xd4\x01\x00"),
        ("timestamp-ext", msgpack.packb(msgpack.Timestamp(0))),
        ("float", msgpack.packb(1.0)),
        ("empty-bin", b"\xc4\x00"),
        ("reserved-c1", b"\xc1"),
    ):
        body = _header(len(items), Hello.TYPE) + before + firmware + after
        yield f"hostile-hello-firmware-{label}", _sign(body)
    yield "hostile-trailing-bytes", _sign(vend[:-TAG_SIZE] + b"\xc0")
    yield "hostile-missing-elements", _sign(_header(9, Vend.TYPE) + vend[3:-TAG_SIZE])


def _schema_rules(frames: dict[str, Frame]) -> Cases:
    """Yield authentic frames that break one schema rule each, and two that extend it."""
    vend, config, hello = frames["Vend"], frames["Config"], frames["Hello"]
    result = frames["VendResult"]
    yield "schema-vend-slot-256", _with_field(vend, "slot", 256)
    yield "schema-vend-price-negative", _with_field(vend, "price", -1)
    yield "schema-vend-attempt-0", _with_field(vend, "attempt", 0)
    yield "schema-vend-attempt-bool", _with_field(vend, "attempt", True)  # noqa: FBT003
    yield "schema-vend-id-nil", _with_field(vend, "vend_id", None)
    yield "schema-presence-online-int", _with_field(frames["Presence"], "online", 1)
    yield "schema-heartbeat-rssi-32768", _with_field(frames["Heartbeat"], "rssi", 2**15)
    yield "schema-hello-firmware-33-ascii", _with_field(hello, "firmware", "v" * 33)
    yield "schema-hello-firmware-33-utf8", _with_field(hello, "firmware", "€" * 11)
    yield "schema-hello-firmware-32-utf8", _with_field(hello, "firmware", "€" * 10 + "xy")
    yield "schema-config-version-0", _with_field(config, "version", 0)
    slot = [1, "A1", "Cola", 150, 10, True]
    yield "schema-config-duplicate-slot", _with_field(config, "slots", [slot, slot])
    many = [[i % 256, "", "", 0, 0, False] for i in range(129)]
    yield "schema-config-129-slots", _with_field(config, "slots", many)
    yield "schema-dispensed-with-reason", _with_field(result, "dispense", [0, 1, True, 1, 0])
    yield "schema-failed-without-reason", _with_field(result, "dispense", [1, 0, True, 1, 0])
    done = [0, 0, True, 1, 0]
    yield "schema-dispense-not-done", _with_field(frames["StatusReply"], "dispense", done)
    yield "schema-statusquery-half-set", _with_field(frames["StatusQuery"], "vend_id", 5)
    no_code = [[0, "", None, True]]
    yield "schema-event-empty-code", _with_field(frames["Telemetry"], "events", no_code)
    yield "schema-ack-unknown-code", _with_field(frames["VendAck"], "code", 5)
    yield "forward-extra-fields", _sign(msgpack.packb([*_items(vend), None, 1, "later", [2, 3]]))
    longer = [0, 0, True, 840, 0, "more", None]
    yield "forward-extra-nested-fields", _with_field(result, "dispense", longer)


def _sizes(vend: bytes) -> Cases:
    """Yield the smallest frame and frames around the size limit (the only big files)."""
    yield "size-19-bytes", _sign(bytes([0x92, PROTOCOL_VERSION, ResultAck.TYPE]))
    filler = b"\xc0" * (MAX_FRAME_SIZE - len(vend))  # body + filler + tag = MAX_FRAME_SIZE
    yield f"{OVERSIZE_PREFIX}exactly-max-trailing-nils", _sign(vend[:-TAG_SIZE] + filler)
    yield f"{OVERSIZE_PREFIX}max-plus-one", _sign(vend[:-TAG_SIZE] + filler + b"\xc0")


def build_corpus() -> dict[str, bytes]:
    """Return the corpus as {file name: bytes}; the same on every run."""
    rng = random.Random(SEED)
    typical = _typical_frames()
    frames = {type(f).__name__: f for f in typical}
    valid = {name: encode_frame(f, KEY) for name, f in frames.items()}
    hello = frames["Hello"]
    assert isinstance(hello, Hello)
    out: dict[str, bytes] = {}
    for cases in (
        _valid_frames(),
        _truncations(valid["Vend"], valid["Config"]),
        _bit_flips(rng, valid),
        _headers(valid["Vend"]),
        _mac_valid_garbage(rng, typical),
        _hostile_msgpack(valid["Vend"], hello),
        _schema_rules(frames),
        _sizes(valid["Vend"]),
    ):
        for name, data in cases:
            assert f"{name}.bin" not in out, name
            out[f"{name}.bin"] = data
    return out


def outcome_of(data: bytes) -> str:
    """Describe what ``decode(data, KEY)`` does, as recorded in ``expected.json``."""
    try:
        frame = decode_frame(data, KEY)
    except ProtocolError as exc:
        return f"error:{type(exc).__name__}"
    return f"ok:{type(frame).__name__}"


def main() -> None:
    """Rewrite ``corpus/`` and ``expected.json`` from :func:`build_corpus`."""
    corpus = build_corpus()
    CORPUS_DIR.mkdir(exist_ok=True)
    for old in CORPUS_DIR.glob("*.bin"):
        old.unlink()
    for name, data in corpus.items():
        (CORPUS_DIR / name).write_bytes(data)
    expected = {name: outcome_of(data) for name, data in sorted(corpus.items())}
    EXPECTED_FILE.write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
