"""SPEC.md stays true to the code: field tables, type codes and the worked example."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from protocols.frames import FRAME_TYPES, Dispense, Event, Reading, SlotConfig
from protocols.schema import Record
from protocols.vectors import generate

SPEC = (Path(generate.__file__).parent.parent / "SPEC.md").read_text(encoding="utf-8")
NESTED: list[type[Record]] = [Dispense, SlotConfig, Reading, Event]


def _table_after(heading: str) -> list[tuple[int, str, str]]:
    """Return (index, field, type) rows of the first table after a `#### `heading`` line."""
    match = re.search(rf"^#### `{heading}`.*?$", SPEC, flags=re.MULTILINE)
    assert match, f"SPEC.md has no section for {heading}"
    rows: list[tuple[int, str, str]] = []
    in_table = False
    for line in SPEC[match.end() :].splitlines():
        if line.startswith("|"):
            in_table = True
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0].isdigit():
                rows.append((int(cells[0]), cells[1].strip("`"), cells[2]))
        elif in_table:
            break
    return rows


@pytest.mark.parametrize("cls", list(FRAME_TYPES.values()), ids=lambda c: c.__name__)
def test_frame_table_matches_schema(cls: type[Record]) -> None:
    """Each frame's SPEC table lists the frame's wire fields, in order, with their types."""
    expected = [(i + 2, name, kind.spec_name) for i, (name, kind) in enumerate(cls.WIRE_FIELDS)]
    assert _table_after(cls.__name__) == expected


@pytest.mark.parametrize("cls", NESTED, ids=lambda c: c.__name__)
def test_nested_table_matches_schema(cls: type[Record]) -> None:
    """Each nested record's SPEC table lists its wire fields, in order, with their types."""
    expected = [(i, name, kind.spec_name) for i, (name, kind) in enumerate(cls.WIRE_FIELDS)]
    assert _table_after(cls.__name__) == expected


@pytest.mark.parametrize("code", sorted(FRAME_TYPES))
def test_type_code_table_matches_registry(code: int) -> None:
    """The SPEC's type-code table names each registered frame with its code."""
    name = FRAME_TYPES[code].__name__
    assert re.search(rf"^\| `0x{code:02x}` \| `{name}` \|", SPEC, flags=re.MULTILINE)
    assert re.search(rf"^#### `{name}` \(0x{code:02x}\)$", SPEC, flags=re.MULTILINE)


def test_worked_example_matches_vectors() -> None:
    """The hex in the SPEC's worked example is the first vector's key, body, tag and frame."""
    vectors = json.loads(generate.VECTORS_PATH.read_text(encoding="utf-8"))
    first = vectors["valid"][0]
    flat = re.sub(r"\s+", "", SPEC)
    assert f"K_m={vectors['key']}" in flat
    assert f"={first['body']}" in flat
    assert f"tag={first['tag']}" in flat
    assert f"frame={first['frame']}" in flat
