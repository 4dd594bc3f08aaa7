"""Write (or check) ``protocols/vectors/v1.json``, the language-neutral test vectors.

Run ``python -m protocols.vectors.generate`` to rewrite the file, or with
``--check`` to fail if the file differs from what the code produces. Review
every diff of the file by hand: a change to a vector is a change to the protocol.

JSON form of field values: integers are JSON numbers, except ``uint64`` fields,
which are strings of decimal digits (JSON numbers lose precision above 2^53);
enumerations are their names; nested records are objects; nil is ``null``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgpack

from protocols.codec import (
    TAG_SIZE,
    compute_tag,
    decode,
    derive_machine_key,
    encode,
    encode_body,
)
from protocols.errors import ProtocolError
from protocols.frames import (
    FRAME_TYPES,
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
from protocols.jsonform import record_to_json

VECTORS_PATH = Path(__file__).with_name("v1.json")
MASTER_SECRET = bytes(range(32))
MACHINE_ID = "VM-0001"
DEADLINE = 1798761600  # 2027-01-01T00:00:00Z
CLOCK_MS = 1798761540123


def valid_frames() -> list[tuple[str, Frame]]:
    """Return the named frames the vectors cover: every type, edge values included."""
    dispensed = Dispense(Outcome.DISPENSED, FailReason.NONE, True, 1840, 0)  # noqa: FBT003
    return [
        ("vend", Vend(0x0123456789ABCDEF, 12, 350, DEADLINE, 1)),
        ("vend-max", Vend(2**64 - 1, 255, 2**32 - 1, 2**32 - 1, 255)),
        ("vend-min", Vend(0, 0, 0, 0, 1)),
        ("result-ack", ResultAck(0x0123456789ABCDEF)),
        ("status-query-vend", StatusQuery(0x0123456789ABCDEF, DEADLINE)),
        ("status-query-machine", StatusQuery(None, None)),
        (
            "config",
            Config(
                7,
                (
                    SlotConfig(1, "CC330", "Coca-Cola 330ml", 300, 8, True),  # noqa: FBT003
                    SlotConfig(12, "NFSQ550", "农夫山泉 550ml", 200, 10, False),  # noqa: FBT003
                ),
            ),
        ),
        ("config-empty", Config(1, ())),
        ("time", Time(CLOCK_MS + 60, 42, 1)),
        ("hello", Hello(42, 1, "vm-fw/2.3.1", 7, CLOCK_MS)),
        ("vend-ack-accepted", VendAck(42, 5, 0x0123456789ABCDEF, 1, AckCode.ACCEPTED, False)),  # noqa: FBT003
        ("vend-ack-expired-dup", VendAck(42, 9, 0x0123456789ABCDEF, 3, AckCode.EXPIRED, True)),  # noqa: FBT003
        ("vend-result", VendResult(42, 6, 0x0123456789ABCDEF, dispensed)),
        (
            "vend-result-jam",
            VendResult(
                42,
                7,
                0x0123456789ABCDEF,
                Dispense(Outcome.FAILED, FailReason.JAM, False, 9000, 3),  # noqa: FBT003
            ),
        ),
        (
            "status-reply-done",
            StatusReply(
                42,
                8,
                0x0123456789ABCDEF,
                VendState.DONE,
                AckCode.ACCEPTED,
                dispensed,
                None,
                7,
                CLOCK_MS,
            ),
        ),
        (
            "status-reply-tombstone",
            StatusReply(
                42,
                10,
                0x0123456789ABCDEF,
                VendState.REJECTED,
                AckCode.EXPIRED,
                None,
                None,
                7,
                CLOCK_MS,
            ),
        ),
        ("config-ack", ConfigAck(42, 11, 7, ConfigStatus.APPLIED, 7)),
        (
            "telemetry",
            Telemetry(
                42,
                12,
                CLOCK_MS,
                (
                    Reading(0, ReadingKind.TEMPERATURE, None, -415),
                    Reading(0, ReadingKind.STOCK, 12, 9),
                    Reading(500, ReadingKind.RSSI, None, -71),
                ),
                (Event(250, "EGS", None, True), Event(9000, "EJC", 12, True)),  # noqa: FBT003
            ),
        ),
        ("heartbeat", Heartbeat(42, 13, CLOCK_MS, -71, 3600, False)),  # noqa: FBT003
        ("presence-online", Presence(42, 2, 1, True)),  # noqa: FBT003
        ("presence-will", Presence(42, 0, 2, False)),  # noqa: FBT003
    ]


def _invalid(key: bytes) -> list[dict[str, object]]:
    """Frames a receiver must refuse, each with the error kind it must report."""
    vend = encode(valid_frames()[0][1], key)
    body = vend[:-TAG_SIZE]

    def signed(b: bytes) -> bytes:
        return b + compute_tag(key, b)

    extra = msgpack.packb([1, 0x01, 1, "twelve", 350, DEADLINE, 1])
    cases: list[tuple[str, bytes, str, str | None]] = [
        ("tag-bit-flipped", vend[:-1] + bytes([vend[-1] ^ 0x01]), "bad_mac", None),
        ("body-bit-flipped", vend[:5] + bytes([vend[5] ^ 0x80]) + vend[6:], "bad_mac", None),
        ("truncated", vend[:18], "truncated", None),
        ("version-2", signed(body[:1] + b"\x02" + body[2:]), "unsupported_version", None),
        ("type-0x00", signed(body[:2] + b"\x00" + body[3:]), "malformed", None),
        ("unknown-type-0x3e", signed(body[:2] + b"\x3e" + body[3:]), "unknown_type", None),
        ("not-a-fixarray", signed(b"\xdc\x00\x07" + body[1:]), "malformed", None),
        ("slot-is-a-string", signed(extra), "malformed", None),
        ("attempt-zero", signed(body[:-1] + b"\x00"), "malformed", None),
        ("missing-field", signed(b"\x96" + body[1:-1]), "malformed", None),
        ("downlink-on-uplink", vend, "wrong_direction", "up"),
    ]
    out: list[dict[str, object]] = []
    for name, frame, error, direction in cases:
        case: dict[str, object] = {"name": name, "frame": frame.hex(), "error": error}
        if direction is not None:
            case["expect_direction"] = direction
        out.append(case)
    return out


def build() -> dict[str, object]:
    """Compute the whole vectors document."""
    key = derive_machine_key(MASTER_SECRET, MACHINE_ID)
    valid: list[dict[str, object]] = []
    for name, frame in valid_frames():
        body = encode_body(frame)
        valid.append(
            {
                "name": name,
                "type": type(frame).__name__,
                "type_code": frame.TYPE,
                "direction": frame.DIRECTION.value,
                "fields": record_to_json(frame),
                "body": body.hex(),
                "tag": compute_tag(key, body).hex(),
                "frame": encode(frame, key).hex(),
            }
        )
    trailing = encode_body(valid_frames()[0][1])
    trailing = bytes([trailing[0] + 1]) + trailing[1:] + b"\xc0"  # one more element: nil
    doc: dict[str, object] = {
        "protocol_version": 1,
        "about": (
            "vendgate wire protocol v1 test vectors; see protocols/SPEC.md. uint64 fields are "
            "decimal strings, enumerations are names, nil is null."
        ),
        "master_secret": MASTER_SECRET.hex(),
        "machine_id": MACHINE_ID,
        "key_label": "vendgate/v1/frame-key/",
        "key": key.hex(),
        "tag_size": TAG_SIZE,
        "valid": valid,
        "forward_compatible": [
            {
                "name": "vend-with-extra-trailing-field",
                "type": "Vend",
                "frame": (trailing + compute_tag(key, trailing)).hex(),
                "fields": record_to_json(valid_frames()[0][1]),
            }
        ],
        "invalid": _invalid(key),
    }
    _self_check(doc, key)
    return doc


def _self_check(doc: dict[str, Any], key: bytes) -> None:
    """Refuse to write vectors the decoder itself disagrees with."""
    for case in doc["valid"] + doc["forward_compatible"]:
        frame = decode(bytes.fromhex(case["frame"]), key)
        if record_to_json(frame) != case["fields"]:
            raise AssertionError(f"vector {case['name']} does not round-trip")
    for case in doc["invalid"]:
        direction = case.get("expect_direction")
        try:
            decode(
                bytes.fromhex(case["frame"]),
                key,
                direction=Direction(direction) if direction else None,
            )
        except ProtocolError as exc:
            if exc.kind != case["error"]:
                raise AssertionError(f"vector {case['name']}: got {exc.kind}") from exc
        else:
            raise AssertionError(f"vector {case['name']} decoded")
    covered = {case["type_code"] for case in doc["valid"]}
    if covered != set(FRAME_TYPES):
        raise AssertionError(f"types without vectors: {set(FRAME_TYPES) - covered}")


def render() -> str:
    """Return the vectors file's exact text."""
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the vectors file, or check it with ``--check``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if VECTORS_PATH.read_text(encoding="utf-8") != text:
            sys.stderr.write(f"{VECTORS_PATH} is out of date; run make vectors\n")
            return 1
        return 0
    VECTORS_PATH.write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {VECTORS_PATH}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
