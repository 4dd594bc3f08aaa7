"""The checked-in fuzz corpus: each file decodes or fails as recorded, only with ProtocolError."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Final, TypeVar

import pytest

from protocols.codec import decode, decode_unverified, peek_header
from protocols.errors import BadMacError, ProtocolError
from protocols.frames import Direction, Frame
from tests.fuzz.make_corpus import (
    CORPUS_DIR,
    EXPECTED_FILE,
    KEY,
    OVERSIZE_PREFIX,
    build_corpus,
    outcome_of,
)
from tests.protocols import reference
from tests.protocols.reference import assert_same_result, result_of

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")
FILES: Final = sorted(p.name for p in CORPUS_DIR.glob("*.bin"))
EXPECTED: Final[dict[str, str]] = json.loads(EXPECTED_FILE.read_text(encoding="utf-8"))


def test_corpus_matches_its_generator() -> None:
    """The corpus on disk is exactly what make_corpus builds (rerun it after a codec change)."""
    assert {p.name: p.read_bytes() for p in CORPUS_DIR.glob("*.bin")} == build_corpus()


def test_every_file_has_an_expected_outcome() -> None:
    """expected.json names every corpus file and nothing else."""
    assert len(FILES) >= 60
    assert sorted(EXPECTED) == FILES


def test_corpus_files_are_small() -> None:
    """Files are at most 2 KiB except the few oversize ones, and the corpus is under 1 MiB."""
    sizes = {p.name: p.stat().st_size for p in CORPUS_DIR.glob("*.bin")}
    assert all(size <= 2048 for name, size in sizes.items() if not name.startswith(OVERSIZE_PREFIX))
    assert sum(sizes.values()) < 1 << 20


@pytest.mark.parametrize("name", FILES)
def test_corpus_file_decodes_as_recorded(name: str) -> None:
    """Decoding a corpus file with the corpus key gives the frame class or error recorded for it."""
    assert outcome_of((CORPUS_DIR / name).read_bytes()) == EXPECTED[name]


@pytest.mark.parametrize("name", FILES)
def test_corpus_file_raises_only_protocol_errors(name: str) -> None:
    """decode, decode_unverified and peek_header give a frame or raise only ProtocolError."""
    data = (CORPUS_DIR / name).read_bytes()
    verified = _outcome(lambda: decode(data, KEY))
    unverified = _outcome(lambda: decode_unverified(data))
    header = _outcome(lambda: peek_header(data))
    if isinstance(verified, Frame):
        assert unverified == verified
    elif not isinstance(verified, BadMacError):
        # Everything but the MAC is checked the same way with and without a key.
        assert type(unverified) is type(verified)
    if isinstance(header, ProtocolError):
        assert type(header) is type(verified)


@pytest.mark.parametrize("name", FILES)
def test_corpus_file_decodes_as_the_reference_decoder(name: str) -> None:
    """Each file decodes to the reference decoder's frame, or fails with its exact error."""
    data = (CORPUS_DIR / name).read_bytes()
    for direction in (None, Direction.UP, Direction.DOWN):
        assert_same_result(
            result_of(lambda: decode(data, KEY, direction=direction)),  # noqa: B023  (called here)
            result_of(lambda: reference.decode(data, KEY, direction=direction)),  # noqa: B023
        )
    assert_same_result(
        result_of(lambda: decode_unverified(data)),
        result_of(lambda: reference.decode_unverified(data)),
    )


def _outcome(fn: Callable[[], T]) -> T | ProtocolError:
    """Run a decoder; return its result or its ProtocolError (anything else propagates)."""
    try:
        return fn()
    except ProtocolError as exc:
        return exc
