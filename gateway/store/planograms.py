"""The planograms aggregate: versioned desired configurations, and how far machines follow them.

Every version a merchant sets is kept in ``planograms``; ``machines.config_desired`` names
the latest, and ``machine_slots`` carries its product columns per slot so that a new vend
is checked against it in the statement that inserts it (:mod:`gateway.store.vends`). What
the machine last reported (``config_reported``), its answer to the desired version
(``config_status``) and when ``Config`` was last published (``config_sent_at``) are
written by :mod:`gateway.configsync`.

Versions are the only thing compared (SPEC §7.9), never contents, so a version number
must never name two different planograms on one machine. A new version is therefore one
past both the previous desired version and the version the machine reports: a machine
configured at installation (or from an older database) would otherwise answer ``STALE``
to the gateway's first versions, or look in sync while running something else.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import asyncpg

from gateway.store.db import Conn
from protocols.frames import Config, SlotConfig

__all__ = [
    "ANY_VERSION",
    "INT32_MAX",
    "IfMatch",
    "Planogram",
    "PutOutcome",
    "PutResult",
    "SyncRow",
    "canonical",
    "current",
    "desired_config",
    "get",
    "next_version",
    "put",
    "record_report",
    "record_sent",
    "sync_row",
    "sync_rows",
    "with_sync",
]

#: The ``machines.config_*`` columns are PostgreSQL integers, narrower than the wire's u32.
INT32_MAX: Final = 2**31 - 1
#: ``If-Match: *``: any current version will do, but there must be one (RFC 9110 §13.1.1).
ANY_VERSION: Final = "*"
#: The versions a conditional PUT accepts: None (unconditional), ``"*"``, or a set.
IfMatch = frozenset[int] | Literal["*"] | None


@dataclass(frozen=True, slots=True)
class Planogram:
    """One version of a machine's planogram."""

    machine_id: str
    version: int
    currency: str
    slots: tuple[SlotConfig, ...]
    created_at: datetime
    created_by: str

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Planogram:
        """Build from a ``SELECT * FROM planograms`` record."""
        raw = r["slots"]
        items: list[dict[str, Any]] = json.loads(raw) if isinstance(raw, str) else raw
        return cls(
            machine_id=r["machine_id"],
            version=r["version"],
            currency=r["currency"],
            slots=tuple(_slot_config(item) for item in items),
            created_at=r["created_at"],
            created_by=r["created_by"],
        )

    def config(self) -> Config:
        """Return the ``Config`` frame that carries this version."""
        return Config(version=self.version, slots=self.slots)


def _slot_config(item: dict[str, Any]) -> SlotConfig:
    return SlotConfig(
        slot=item["slot"],
        product_code=item["product_code"],
        name=item["name"],
        price=item["price"],
        capacity=item["capacity"],
        drop_sensor=item["drop_sensor"],
    )


def _slot_json(slot: SlotConfig) -> dict[str, Any]:
    return {
        "slot": slot.slot,
        "product_code": slot.product_code,
        "name": slot.name,
        "price": slot.price,
        "capacity": slot.capacity,
        "drop_sensor": slot.drop_sensor,
    }


def canonical(slots: Iterable[SlotConfig]) -> tuple[SlotConfig, ...]:
    """Return the slots in slot order: the order a planogram is stored and compared in."""
    return tuple(sorted(slots, key=lambda s: s.slot))


def next_version(desired: int | None, reported: int | None) -> int:
    """Return the version for a new planogram: past the desired and the reported one.

    A reported version that would push the next one past the column's range is ignored
    (a machine can report any u32; only the gateway's own versions must fit).
    """
    base = desired or 0
    if reported is not None and base < reported < INT32_MAX:
        base = reported
    return base + 1


class PutOutcome(enum.Enum):
    """What :func:`put` did."""

    CREATED = "created"
    UNCHANGED = "unchanged"
    UNKNOWN_MACHINE = "unknown_machine"
    PRECONDITION_FAILED = "precondition_failed"


@dataclass(frozen=True, slots=True)
class PutResult:
    """The outcome of :func:`put` and the machine's desired version after it."""

    outcome: PutOutcome
    version: int | None


_LOCK_MACHINE: Final = """
SELECT config_desired, config_reported FROM machines WHERE machine_id = $1 FOR UPDATE
"""
_INSERT_PLANOGRAM: Final = """
INSERT INTO planograms (machine_id, version, currency, slots, created_by)
VALUES ($1, $2, $3, $4::jsonb, $5)
"""
# Set-based (house style #5): one statement for every listed slot, one for the others.
_UPSERT_SLOTS: Final = """
INSERT INTO machine_slots AS s
    (machine_id, slot, product_code, name, price, currency, capacity, drop_sensor)
SELECT $1, n.slot, n.product_code, n.name, n.price, $2, n.capacity, n.drop_sensor
FROM unnest($3::smallint[], $4::text[], $5::text[], $6::bigint[], $7::integer[], $8::boolean[])
    AS n (slot, product_code, name, price, capacity, drop_sensor)
ON CONFLICT (machine_id, slot) DO UPDATE SET
    product_code = EXCLUDED.product_code,
    name = EXCLUDED.name,
    price = EXCLUDED.price,
    currency = EXCLUDED.currency,
    capacity = EXCLUDED.capacity,
    drop_sensor = EXCLUDED.drop_sensor
"""
# Health columns (failures, enabled, disabled_*) are kept: a slot that comes back into a
# later planogram is still out of service if it was.
_CLEAR_UNLISTED: Final = """
UPDATE machine_slots SET product_code = NULL, name = NULL, price = NULL, currency = NULL,
                         capacity = NULL, drop_sensor = NULL
WHERE machine_id = $1 AND NOT (slot = ANY($2::smallint[]))
  AND (product_code IS NOT NULL OR price IS NOT NULL OR currency IS NOT NULL)
"""
# A status is the machine's answer to the desired version; a new version has none yet.
_SET_DESIRED: Final = """
UPDATE machines SET config_desired = $2, config_status = NULL WHERE machine_id = $1
"""


async def put(
    conn: Conn,
    machine_id: str,
    currency: str,
    slots: Iterable[SlotConfig],
    *,
    created_by: str,
    if_match: IfMatch = None,
) -> PutResult:
    """Make a planogram the machine's desired one, as a new version if it changes anything.

    Returns ``UNCHANGED`` with the current version when the machine's desired planogram has
    the same currency and slots (in any order), even if ``if_match`` names another version:
    the change has been applied already, most likely by this same request whose answer was
    lost (RFC 9110 §13.1.1 allows a 2xx then). Otherwise ``PRECONDITION_FAILED`` when
    ``if_match`` does not name the current version, or ``CREATED`` with the new version
    (:func:`next_version`). The machine's row is locked, so concurrent puts serialise.
    """
    locked = await conn.fetchrow(_LOCK_MACHINE, machine_id)
    if locked is None:
        return PutResult(PutOutcome.UNKNOWN_MACHINE, None)
    desired: int | None = locked["config_desired"]
    ordered = canonical(slots)
    if desired is not None:
        now = await get(conn, machine_id, desired)
        if now is not None and (now.currency, canonical(now.slots)) == (currency, ordered):
            return PutResult(PutOutcome.UNCHANGED, desired)
    if not _matches(if_match, desired):
        return PutResult(PutOutcome.PRECONDITION_FAILED, desired)
    version = next_version(desired, locked["config_reported"])
    await conn.execute(
        _INSERT_PLANOGRAM,
        machine_id,
        version,
        currency,
        json.dumps([_slot_json(s) for s in ordered]),
        created_by,
    )
    numbers = [s.slot for s in ordered]
    await conn.execute(
        _UPSERT_SLOTS,
        machine_id,
        currency,
        numbers,
        [s.product_code for s in ordered],
        [s.name for s in ordered],
        [s.price for s in ordered],
        [s.capacity for s in ordered],
        [s.drop_sensor for s in ordered],
    )
    await conn.execute(_CLEAR_UNLISTED, machine_id, numbers)
    await conn.execute(_SET_DESIRED, machine_id, version)
    return PutResult(PutOutcome.CREATED, version)


def _matches(if_match: IfMatch, current: int | None) -> bool:
    if if_match is None:
        return True
    if current is None:  # no current version: nothing can match, not even "*"
        return False
    return if_match == ANY_VERSION or current in if_match


async def get(conn: Conn, machine_id: str, version: int) -> Planogram | None:
    """Return one stored version of a machine's planogram."""
    record = await conn.fetchrow(
        "SELECT * FROM planograms WHERE machine_id = $1 AND version = $2", machine_id, version
    )
    return None if record is None else Planogram.from_record(record)


async def current(conn: Conn, machine_id: str) -> Planogram | None:
    """Return the machine's desired planogram, or None if it has none (or is unknown)."""
    record = await conn.fetchrow(
        "SELECT p.* FROM machines m "
        "JOIN planograms p ON p.machine_id = m.machine_id AND p.version = m.config_desired "
        "WHERE m.machine_id = $1",
        machine_id,
    )
    return None if record is None else Planogram.from_record(record)


_WITH_SYNC: Final = """
SELECT m.machine_id, m.config_desired, m.config_reported, m.config_status, m.config_sent_at,
       p.version, p.currency, p.slots, p.created_at, p.created_by
FROM machines m
LEFT JOIN planograms p ON p.machine_id = m.machine_id AND p.version = m.config_desired
WHERE m.machine_id = $1
"""


async def with_sync(conn: Conn, machine_id: str) -> tuple[SyncRow, Planogram | None] | None:
    """Return the machine's sync state and desired planogram in one read; None if unknown."""
    record = await conn.fetchrow(_WITH_SYNC, machine_id)
    if record is None:
        return None
    planogram = None if record["version"] is None else Planogram.from_record(record)
    return SyncRow.from_record(record), planogram


async def desired_config(conn: Conn, machine_id: str) -> Config | None:
    """Return the ``Config`` frame of the machine's desired planogram, or None."""
    planogram = await current(conn, machine_id)
    return None if planogram is None else planogram.config()


# --- sync state ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncRow:
    """A machine's configuration columns: desired, reported, the answer, the last send."""

    machine_id: str
    desired: int | None
    reported: int | None
    status: str | None
    sent_at: datetime | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> SyncRow:
        """Build from a record with the columns of ``_SYNC_COLUMNS``."""
        return cls(
            machine_id=r["machine_id"],
            desired=r["config_desired"],
            reported=r["config_reported"],
            status=r["config_status"],
            sent_at=r["config_sent_at"],
        )

    @property
    def in_sync(self) -> bool:
        """True when the machine reports the desired version (False with no desired one)."""
        return self.desired is not None and self.reported == self.desired


_SYNC_COLUMNS: Final = "machine_id, config_desired, config_reported, config_status, config_sent_at"


async def sync_row(conn: Conn, machine_id: str) -> SyncRow | None:
    """Return one machine's sync state, or None if the machine is unknown."""
    record = await conn.fetchrow(
        f"SELECT {_SYNC_COLUMNS} FROM machines WHERE machine_id = $1",  # noqa: S608  (constant)
        machine_id,
    )
    return None if record is None else SyncRow.from_record(record)


async def sync_rows(conn: Conn, *, behind_only: bool = False) -> list[SyncRow]:
    """Return every machine's sync state, or only of those not running the desired version."""
    where = (
        "WHERE config_desired IS NOT NULL AND config_reported IS DISTINCT FROM config_desired"
        if behind_only
        else ""
    )
    records = await conn.fetch(f"SELECT {_SYNC_COLUMNS} FROM machines {where}")  # noqa: S608
    return [SyncRow.from_record(r) for r in records]


# The answer's status is kept only when it answers the desired version (read in the same
# statement, so a version set meanwhile is not given an older version's answer).
_REPORT: Final = """
UPDATE machines SET
    config_reported = $2,
    config_status = CASE WHEN $3::integer = config_desired THEN $4 ELSE config_status END
WHERE machine_id = $1
  AND (config_reported IS DISTINCT FROM $2
       OR ($3::integer = config_desired AND config_status IS DISTINCT FROM $4))
"""


async def record_report(
    conn: Conn, machine_id: str, reported: int, answer: tuple[int, str] | None = None
) -> bool:
    """Record the version a machine runs and, from a ``ConfigAck``, (version, status).

    ``status`` is ``applied``, ``stale`` or ``invalid``. Writes only what differs from the
    row; returns whether anything was written.
    """
    version, status = answer if answer is not None else (None, None)
    result = await conn.execute(_REPORT, machine_id, reported, version, status)
    return result != "UPDATE 0"


async def record_sent(conn: Conn, machine_id: str, at: datetime) -> None:
    """Record when ``Config`` was last published to the machine."""
    await conn.execute(
        "UPDATE machines SET config_sent_at = $2 WHERE machine_id = $1", machine_id, at
    )
