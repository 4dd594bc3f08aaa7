"""The checked-in test vectors agree with the code, byte for byte, in both directions."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest

from protocols import jsonform
from protocols.codec import FrameKey, decode, derive_machine_key, encode, encode_body
from protocols.errors import ProtocolError
from protocols.frames import FRAME_TYPES, Direction
from protocols.vectors import generate

VECTORS: dict[str, Any] = json.loads(generate.VECTORS_PATH.read_text(encoding="utf-8"))
KEY = bytes.fromhex(VECTORS["key"])


def test_vectors_file_is_what_the_generator_writes() -> None:
    """The vectors file is up to date with the generator (run `make vectors` otherwise)."""
    assert generate.main(["--check"]) == 0


def test_key_derivation_matches_an_independent_hmac() -> None:
    """The derived machine key equals HMAC-SHA256(master, label || machine id) computed here."""
    master = bytes.fromhex(VECTORS["master_secret"])
    message = (VECTORS["key_label"] + VECTORS["machine_id"]).encode("ascii")
    expected = hmac.new(master, message, hashlib.sha256).digest()
    assert expected == KEY
    assert derive_machine_key(master, VECTORS["machine_id"]) == KEY


@pytest.mark.parametrize("case", VECTORS["valid"], ids=lambda c: c["name"])
def test_valid_vector_encodes_to_exact_bytes(case: dict[str, Any]) -> None:
    """The frame built from a vector's fields has exactly the vector's body, tag and frame."""
    frame = jsonform.record_from_json(FRAME_TYPES[case["type_code"]], case["fields"])
    assert type(frame).__name__ == case["type"]
    body = encode_body(frame)
    assert body.hex() == case["body"]
    independent_tag = hmac.new(KEY, body, hashlib.sha256).digest()[: VECTORS["tag_size"]]
    assert independent_tag.hex() == case["tag"]
    assert encode(frame, KEY).hex() == case["frame"]
    assert encode(frame, FrameKey(KEY)).hex() == case["frame"]


@pytest.mark.parametrize("case", VECTORS["valid"], ids=lambda c: c["name"])
def test_valid_vector_decodes_to_its_fields(case: dict[str, Any]) -> None:
    """Decoding the vector's bytes, with its direction enforced, gives back its fields."""
    frame = decode(bytes.fromhex(case["frame"]), KEY, direction=Direction(case["direction"]))
    assert jsonform.record_to_json(frame) == case["fields"]


@pytest.mark.parametrize("case", VECTORS["forward_compatible"], ids=lambda c: c["name"])
def test_extra_trailing_fields_are_ignored(case: dict[str, Any]) -> None:
    """A frame with more fields than version 1 defines decodes to the known fields."""
    frame = decode(bytes.fromhex(case["frame"]), KEY)
    assert type(frame).__name__ == case["type"]
    assert jsonform.record_to_json(frame) == case["fields"]


@pytest.mark.parametrize("case", VECTORS["invalid"], ids=lambda c: c["name"])
def test_invalid_vector_is_refused_with_its_error(case: dict[str, Any]) -> None:
    """Each invalid vector is refused with the error kind the vectors file names."""
    direction = case.get("expect_direction")
    with pytest.raises(ProtocolError) as info:
        decode(
            bytes.fromhex(case["frame"]),
            KEY,
            direction=Direction(direction) if direction else None,
        )
    assert info.value.kind == case["error"]


def test_every_frame_type_has_a_vector() -> None:
    """The vectors cover every registered frame type."""
    assert {c["type_code"] for c in VECTORS["valid"]} == set(FRAME_TYPES)


def test_vend_vector_fits_the_size_target() -> None:
    """Every Vend vector, MAC included, is at most 64 bytes."""
    sizes = [len(c["frame"]) // 2 for c in VECTORS["valid"] if c["type"] == "Vend"]
    assert sizes
    assert max(sizes) <= 64
