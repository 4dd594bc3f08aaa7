"""Hypothesis strategies for valid frames, derived from their ``WIRE_FIELDS``.

Each field's values come from its wire type, so a new frame or field is covered
without touching this module. Cross-field rules (``Record.check``) are met by a
small per-class fix-up that redraws the offending fields; a rule without a fix-up
is still honoured by rejecting the record, which Hypothesis reports as a health
check failure if it rejects too often.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from hypothesis import assume
from hypothesis import strategies as st

from protocols.frames import (
    FRAME_TYPES,
    Config,
    Dispense,
    Event,
    FailReason,
    Frame,
    Outcome,
    StatusQuery,
    StatusReply,
    Vend,
    VendState,
)
from protocols.schema import (
    Bool,
    Enum,
    List,
    Nested,
    Optional,
    Record,
    SInt,
    Str,
    UInt,
    WireType,
)

if TYPE_CHECKING:
    from collections.abc import Callable

R = TypeVar("R", bound=Record)
F = TypeVar("F", bound=Frame)

#: Lists are drawn with at most this many items, to keep the suite fast; the
#: largest frames are built explicitly in ``test_codec``.
MAX_LIST_ITEMS = 12

Values = dict[str, Any]


def utf8_text(*, min_bytes: int = 0, max_bytes: int) -> st.SearchStrategy[str]:
    """Text (non-ASCII included) whose UTF-8 encoding is ``min_bytes..max_bytes`` long."""

    def fit(text: str) -> str:
        while len(text.encode("utf-8")) > max_bytes:
            text = text[:-1]
        return text

    chars = st.characters(codec="utf-8")  # no lone surrogates: they are not UTF-8
    return (
        st.text(chars, min_size=min_bytes, max_size=max_bytes)
        .map(fit)
        .filter(lambda s: len(s.encode("utf-8")) >= min_bytes)
    )


def wire_values(kind: WireType[Any], *, max_list: int = MAX_LIST_ITEMS) -> st.SearchStrategy[Any]:
    """Values that ``kind`` accepts, drawn from its declared bounds."""
    if isinstance(kind, UInt):
        return st.integers(min_value=0, max_value=kind.limit - 1)
    if isinstance(kind, SInt):
        return st.integers(min_value=kind.low, max_value=kind.high - 1)
    if isinstance(kind, Bool):
        return st.booleans()
    if isinstance(kind, Str):
        return utf8_text(min_bytes=kind.min_bytes, max_bytes=kind.max_bytes)
    if isinstance(kind, Enum):
        return st.sampled_from(kind.cls)
    if isinstance(kind, Optional):
        return st.none() | wire_values(kind.inner, max_list=max_list)
    if isinstance(kind, List):
        item = wire_values(kind.item, max_list=max_list)
        return st.lists(item, max_size=min(kind.max_items, max_list)).map(tuple)
    if isinstance(kind, Nested):
        return records(kind.cls)
    raise TypeError(f"no strategy for wire type {type(kind).__name__}")  # a new wire type


# --- fix-ups for the cross-field rules of Record.check ------------------------------------


def _present(cls: type[Record], name: str) -> st.SearchStrategy[Any]:
    """Values of an optional field other than nil."""
    kind = dict(cls.WIRE_FIELDS)[name]
    return wire_values(kind.inner if isinstance(kind, Optional) else kind)


def _fix_dispense(draw: st.DrawFn, v: Values) -> Values:
    if v["outcome"] is Outcome.DISPENSED:
        v["reason"] = FailReason.NONE
    elif v["reason"] is FailReason.NONE:
        v["reason"] = draw(st.sampled_from([r for r in FailReason if r is not FailReason.NONE]))
    return v


def _fix_status_query(draw: st.DrawFn, v: Values) -> Values:
    if (v["vend_id"] is None) != (v["deadline"] is None):
        if draw(st.booleans()):
            v["vend_id"] = v["deadline"] = None
        elif v["vend_id"] is None:
            v["vend_id"] = draw(_present(StatusQuery, "vend_id"))
        else:
            v["deadline"] = draw(_present(StatusQuery, "deadline"))
    return v


def _fix_status_reply(draw: st.DrawFn, v: Values) -> Values:
    if v["vend_state"] is VendState.DONE and v["dispense"] is None:
        v["dispense"] = draw(records(Dispense))
    elif v["vend_state"] is not VendState.DONE:
        v["dispense"] = None
    return v


def _fix_config(_draw: st.DrawFn, v: Values) -> Values:
    v["version"] = max(1, v["version"])
    seen: set[int] = set()
    unique = []
    for slot in v["slots"]:
        if slot.slot not in seen:
            seen.add(slot.slot)
            unique.append(slot)
    v["slots"] = tuple(unique)
    return v


def _fix_vend(_draw: st.DrawFn, v: Values) -> Values:
    v["attempt"] = max(1, v["attempt"])
    return v


def _fix_event(draw: st.DrawFn, v: Values) -> Values:
    v["code"] = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=8))
    return v


_FIXUPS: dict[type[Record], Callable[[st.DrawFn, Values], Values]] = {
    Dispense: _fix_dispense,
    StatusQuery: _fix_status_query,
    StatusReply: _fix_status_reply,
    Config: _fix_config,
    Vend: _fix_vend,
    Event: _fix_event,
}


@st.composite
def _records(draw: st.DrawFn, cls: type[R]) -> R:
    values = {name: draw(wire_values(kind)) for name, kind in cls.WIRE_FIELDS}
    fix = _FIXUPS.get(cls)
    if fix is not None:
        values = fix(draw, values)
    rec = cls(**values)
    assume(rec.check() is None)  # a rule added to check() without a fix-up above
    return rec


def records(cls: type[R]) -> st.SearchStrategy[R]:
    """Build valid instances of a record class (nested record or frame)."""
    return _records(cls)


def frames_of(cls: type[F]) -> st.SearchStrategy[F]:
    """Build valid frames of one class."""
    return records(cls)


def frames() -> st.SearchStrategy[Frame]:
    """Build valid frames of every type registered in ``FRAME_TYPES``."""
    return st.one_of([frames_of(FRAME_TYPES[code]) for code in sorted(FRAME_TYPES)])


#: msgpack-encodable values of every kind, for fuzzing what sits behind the MAC.
#: Integers span the whole msgpack range (int64 minimum to uint64 maximum).
msgpack_values: st.SearchStrategy[object] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.sampled_from([-(2**63), -1, 2**7, 2**8, 2**16, 2**32, 2**63, 2**64 - 1])
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.integers(-5, 5) | st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)

#: Values a later protocol version might append to a frame (SPEC §8 allows only
#: nil, bool, int, str and arrays on the wire).
future_values: st.SearchStrategy[object] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4),
    max_leaves=8,
)
