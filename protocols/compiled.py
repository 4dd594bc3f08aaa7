"""Record decoders compiled from the field declarations: the generic schema walk, unrolled.

:func:`protocols.schema.decode_fields` walks a record's ``WIRE_FIELDS`` and, per
value, calls a ``WireType.decode`` method (and ``List.decode``, ``Nested.decode``
and ``decode_fields`` again for every nested record), then the dataclass
``__init__``. That walk costs about 3 us per telemetry reading, most of a
telemetry frame's decoding time. :func:`compile_decoder` turns the same
declarations into the source of one Python function per record class, in which
every check of every field, nested records and lists included, is written out
inline, and builds each record by filling its slots directly.

A compiled decoder only says "here is the record" or ``None``: it formats no
error. On ``None`` the codec runs the generic walk over the same values, which
finds the first field that fails and raises the error it always raised, located
(``Telemetry.readings[2].kind: ...``). Errors therefore stay those of the
generic walk by construction, and a compiled decoder has one duty: to accept
exactly the values the generic walk accepts and return an equal record.
``tests/protocols/test_compiled.py`` checks that on random and mutated frames.
"""

from __future__ import annotations

import dataclasses
import inspect
import linecache
from collections.abc import Callable
from types import MemberDescriptorType
from typing import Any, TypeAlias, TypeVar

from protocols.errors import MalformedFrameError
from protocols.schema import Bool, Enum, List, Nested, Optional, Record, SInt, Str, UInt, WireType

__all__ = ["compile_decoder", "decoder_source"]

R = TypeVar("R", bound=Record)

#: msgpack carries integers from -2**63 to 2**64 - 1, so ``unpackb`` never returns a larger one.
_MSGPACK_INT_LIMIT = 1 << 64


class _Writer:
    """The lines of one generated function and the objects its code refers to."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.namespace: dict[str, Any] = {"MalformedFrameError": MalformedFrameError}
        self._count = 0
        self._names: dict[int, str] = {}

    def emit(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def reject_if(self, depth: int, condition: str) -> None:
        self.emit(depth, f"if {condition}:")
        self.emit(depth + 1, "return None")

    def fresh(self, stem: str) -> str:
        """Return a new local variable name (identifiers plus a unique counter)."""
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, value: object, stem: str) -> str:
        """Return the global name under which the generated code sees ``value``."""
        name = self._names.get(id(value))
        if name is None:
            # The namespace keeps ``value`` alive, so its id() is not reused while cached.
            name = self._names[id(value)] = self.fresh(f"_{stem}")
            self.namespace[name] = value
        return name


#: Emits the checks of one wire type: (writer, wire type, local name, depth) -> result.
_Emitter: TypeAlias = Callable[[_Writer, Any, str, int], str]


def _value(w: _Writer, kind: WireType[Any], src: str, depth: int) -> str:
    """Emit the checks of one value held in local ``src``; return the expression of the result.

    Each emitter mirrors the ``decode`` method of its wire type in ``protocols.schema``:
    the same tests, with ``return None`` where that method raises. ``src`` is always a
    local of the generated function, so an emitter may reassign it.
    """
    emitter: _Emitter = _EMITTERS.get(type(kind), _call_decode)
    return emitter(w, kind, src, depth)


def _uint(w: _Writer, kind: UInt, src: str, depth: int) -> str:
    if kind.limit >= _MSGPACK_INT_LIMIT:
        w.reject_if(depth, f"type({src}) is not int or {src} < 0")
    else:
        w.reject_if(depth, f"type({src}) is not int or not 0 <= {src} < {kind.limit}")
    return src


def _sint(w: _Writer, kind: SInt, src: str, depth: int) -> str:
    w.reject_if(depth, f"type({src}) is not int or not {kind.low} <= {src} < {kind.high}")
    return src


def _bool(w: _Writer, _kind: Bool, src: str, depth: int) -> str:
    w.reject_if(depth, f"type({src}) is not bool")
    return src


def _str(w: _Writer, kind: Str, src: str, depth: int) -> str:
    size = w.fresh("size")
    w.reject_if(depth, f"type({src}) is not str")
    w.emit(
        depth,
        f"{size} = len({src}) if {src}.isascii() else len({src}.encode('utf-8', 'surrogatepass'))",
    )
    w.reject_if(depth, f"not {kind.min_bytes} <= {size} <= {kind.max_bytes}")
    return src


def _enum(w: _Writer, kind: Enum[Any], src: str, depth: int) -> str:
    table = w.const({int(m): m for m in kind.cls}, kind.cls.__name__)
    # The type test keeps True from passing for 1 and unhashable values from the lookup.
    w.emit(depth, f"{src} = {table}.get({src}) if type({src}) is int else None")
    w.reject_if(depth, f"{src} is None")
    return src


def _optional(w: _Writer, kind: Optional[Any], src: str, depth: int) -> str:
    w.emit(depth, f"if {src} is not None:")
    inner = _value(w, kind.inner, src, depth + 1)
    if inner != src:
        w.emit(depth + 1, f"{src} = {inner}")
    return src


def _list(w: _Writer, kind: List[Any], src: str, depth: int) -> str:
    w.reject_if(depth, f"type({src}) is not list or len({src}) > {kind.max_items}")
    item = w.fresh("item")
    if _kept_as_received(kind.item):  # check every item, then copy the list as it is
        w.emit(depth, f"for {item} in {src}:")
        _value(w, kind.item, item, depth + 1)
        w.emit(depth, f"{src} = tuple({src})")
    else:
        out = w.fresh("out")
        w.emit(depth, f"{out} = []")
        w.emit(depth, f"for {item} in {src}:")
        decoded = _value(w, kind.item, item, depth + 1)
        w.emit(depth + 1, f"{out}.append({decoded})")
        w.emit(depth, f"{src} = tuple({out})")
    return src


def _nested(w: _Writer, kind: Nested[Any], src: str, depth: int) -> str:
    w.reject_if(depth, f"type({src}) is not list")
    return _record(w, kind.cls, src, 0, depth)


def _call_decode(w: _Writer, kind: WireType[Any], src: str, depth: int) -> str:
    """Emit a call of the wire type's own decode: for wire types this module does not know."""
    decode = w.const(kind.decode, f"decode_{type(kind).__name__}")
    w.emit(depth, "try:")
    w.emit(depth + 1, f"{src} = {decode}({src})")
    w.emit(depth, "except MalformedFrameError:")
    w.emit(depth + 1, "return None")
    return src


#: The emitter of each wire type, by exact type: a subclass may decode differently.
_EMITTERS: dict[type[WireType[Any]], _Emitter] = {
    UInt: _uint,
    SInt: _sint,
    Bool: _bool,
    Str: _str,
    Enum: _enum,
    Optional: _optional,
    List: _list,
    Nested: _nested,
}


def _kept_as_received(kind: WireType[Any]) -> bool:
    """Whether a valid value of ``kind`` decodes to the msgpack value itself."""
    if type(kind) is Optional:
        return _kept_as_received(kind.inner)
    return type(kind) in {UInt, SInt, Bool, Str}


def _record(w: _Writer, cls: type[Record], src: str, offset: int, depth: int) -> str:
    """Emit the decoding of record ``cls`` from list ``src`` (fields from ``offset``)."""
    fields = cls.WIRE_FIELDS
    count = offset + len(fields)
    length = w.fresh("length")
    skipped = [w.fresh("_skip") for _ in range(offset)]
    names = [w.fresh(name) for name, _ in fields]
    targets = ", ".join([*skipped, *names])
    # As decode_fields: too few values is malformed, extra trailing values are ignored (SPEC §8).
    w.emit(depth, f"{length} = len({src})")
    w.reject_if(depth, f"{length} < {count}")
    w.emit(depth, f"{targets}, = {src} if {length} == {count} else {src}[:{count}]")
    values = [_value(w, kind, name, depth) for name, (_, kind) in zip(names, fields, strict=True)]
    rec = _construct(w, cls, values, depth)
    if cls.check is not Record.check:  # decode_fields calls it on every record it builds
        w.reject_if(depth, f"{rec}.check() is not None")
    return rec


def _construct(w: _Writer, cls: type[Record], values: list[str], depth: int) -> str:
    rec = w.fresh(cls.__name__.lower())
    setters = _slot_setters(cls)
    if setters is None:
        w.emit(depth, f"{rec} = {w.const(cls, cls.__name__)}({', '.join(values)})")
        return rec
    new = w.const(object.__new__, "new")
    w.emit(depth, f"{rec} = {new}({w.const(cls, cls.__name__)})")
    for (name, _), setter, value in zip(cls.WIRE_FIELDS, setters, values, strict=True):
        w.emit(depth, f"{w.const(setter, f'set_{cls.__name__}_{name}')}({rec}, {value})")
    return rec


def _slot_setters(cls: type[Record]) -> list[Callable[[object, object], None]] | None:
    """Return the slot setter of each field, or None if ``cls(*values)`` does more than that.

    A frozen dataclass's ``__init__`` stores each argument with ``object.__setattr__``,
    which for a slots class calls the slot's member descriptor; calling the descriptors
    directly builds the same object without the name lookups (half the cost). Any other
    kind of class (a ``__post_init__``, extra or reordered ``__init__`` parameters, a
    field that is not a slot, a non-frozen class whose ``__setattr__`` may be overridden)
    is built by calling it.
    """
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or hasattr(cls, "__post_init__"):
        return None
    names = [name for name, _ in cls.WIRE_FIELDS]
    if list(inspect.signature(cls).parameters) != names:
        return None
    if [f.name for f in dataclasses.fields(cls)] != names:  # type: ignore[arg-type]  # a dataclass, checked above
        return None
    setters = []
    for name in names:
        # The attribute object.__setattr__ would find: the first class in the MRO naming it.
        attr = next((k.__dict__[name] for k in cls.__mro__ if name in k.__dict__), None)
        if type(attr) is not MemberDescriptorType:
            return None
        setters.append(attr.__set__)
    return setters


def decoder_source(cls: type[Record], *, offset: int = 0) -> tuple[str, dict[str, Any]]:
    """Return the source of the decoder :func:`compile_decoder` builds, and its globals."""
    w = _Writer()
    rec = _record(w, cls, "items", offset, 1)
    w.emit(1, f"return {rec}")
    header = f"def decode_{cls.__name__}(items):"
    return "\n".join([header, *w.lines]) + "\n", w.namespace


def compile_decoder(cls: type[R], *, offset: int = 0) -> Callable[[list[Any]], R | None]:
    """Compile a decoder for ``cls``: record from a list of msgpack values, or None if invalid.

    The record's fields start at index ``offset`` of the list (2 for a frame body, after
    the version and the type code); the caller has checked that it is a list. For values
    as ``msgpack.unpackb`` returns them (integers from -2**63 to 2**64 - 1), the result
    equals what ``decode_fields(cls, values[offset:])`` returns, and is None exactly when
    that raises.
    """
    source, namespace = decoder_source(cls, offset=offset)
    filename = f"<compiled decoder {cls.__module__}.{cls.__qualname__}>"
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102  (source built from WIRE_FIELDS)
    # Tracebacks, pdb and profilers can then show the generated lines.
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    decoder: Callable[[list[Any]], R | None] = namespace[f"decode_{cls.__name__}"]
    return decoder
