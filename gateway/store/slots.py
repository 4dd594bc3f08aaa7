"""The slots aggregate: per-slot health, taking failing slots out of service, and its audit.

A row of ``machine_slots`` exists for every slot the gateway knows of: one the planogram
lists (its product columns, written by :mod:`gateway.store.planograms`), one that failed, or
one an operator enabled or disabled. A missing row means a healthy slot with no failures.

Which dispense results count against a slot (vending-domain.md: "a slot that fails to
dispense several times in a row is taken out of service until an operator clears it") is
decided by :func:`effect_of`, by the result's reason alone:

========================  ===========  ==================================================
reason                    effect       why
========================  ===========  ==================================================
``NONE`` (dispensed)      reset to 0   the mechanism works
``JAM``                   +1           helix blocked (EVA-DTS EJC): a broken slot
``NO_DROP``               +1           the motor turned and nothing fell: a broken slot
``MOTOR_FAULT``           +1           a broken slot
``SENSOR_FAULT``          +1           the drop sensor fails (EVA-DTS EJL); with the sensor
                                       on this comes as ``UNCERTAIN`` (SPEC §7.3), and every
                                       vend from the slot would need an operator, so it counts
``SLOT_EMPTY``            no change    a stock problem, not a broken mechanism: the machine
                                       zeroes its stock and refuses the next vends itself
                                       (``SLOT_EMPTY``, SPEC §7.2), and a restock at the
                                       machine, which the gateway does not see, would not
                                       clear a gateway-side disable
``POWER_LOSS``            no change    settled by a reboot, not by the slot (SPEC §7.3:
                                       "results settled by a reboot do not count")
========================  ===========  ==================================================

The outcome does not matter beyond that: ``UNCERTAIN`` with ``POWER_LOSS`` neither counts
nor resets, ``UNCERTAIN`` with a hardware fault counts like ``FAILED`` with it. The
machine keeps its own count (SPEC §7.3) and refuses vends for a slot it disabled; this one
lets the gateway refuse them before the customer is charged.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg

from gateway.logs import get_logger
from gateway.store.db import Conn
from protocols.frames import Dispense, FailReason, Outcome

__all__ = [
    "AUDIT_PER_SLOT",
    "AuditEntry",
    "SlotEffect",
    "SlotRow",
    "all_for",
    "disable",
    "effect_of",
    "enable",
    "get",
    "recent_audit",
    "record_dispense",
    "record_dispenses",
    "record_result",
]

log = get_logger("gateway.store.slots")

#: Audit entries shown per slot by :func:`recent_audit` unless asked otherwise.
AUDIT_PER_SLOT: Final = 5


class SlotEffect(enum.Enum):
    """What one dispense result does to its slot's count of failures in a row."""

    COUNT = "count"
    RESET = "reset"
    NONE = "none"


_COUNTED: Final = frozenset(
    {FailReason.JAM, FailReason.NO_DROP, FailReason.MOTOR_FAULT, FailReason.SENSOR_FAULT}
)


def effect_of(*, failed: bool, reason: FailReason) -> SlotEffect:
    """Decide how a result counts against its slot; see the module docstring's table.

    ``failed`` is True for any outcome but ``DISPENSED``. A failed result with reason
    ``NONE`` breaks SPEC §8 (Dispense.check refuses it) and changes nothing.
    """
    if reason is FailReason.NONE:
        return SlotEffect.NONE if failed else SlotEffect.RESET
    return SlotEffect.COUNT if reason in _COUNTED else SlotEffect.NONE


@dataclass(frozen=True, slots=True)
class SlotRow:
    """One row of ``machine_slots``; the product columns are None when not in the planogram."""

    machine_id: str
    slot: int
    product_code: str | None
    name: str | None
    price: int | None
    currency: str | None
    capacity: int | None
    drop_sensor: bool | None
    consecutive_failures: int
    enabled: bool
    disabled_at: datetime | None
    disabled_reason: str | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> SlotRow:
        """Build from a ``SELECT * FROM machine_slots`` record."""
        return cls(
            machine_id=r["machine_id"],
            slot=r["slot"],
            product_code=r["product_code"],
            name=r["name"],
            price=r["price"],
            currency=r["currency"],
            capacity=r["capacity"],
            drop_sensor=r["drop_sensor"],
            consecutive_failures=r["consecutive_failures"],
            enabled=r["enabled"],
            disabled_at=r["disabled_at"],
            disabled_reason=r["disabled_reason"],
        )

    @property
    def in_planogram(self) -> bool:
        """Whether the current planogram lists this slot."""
        return self.price is not None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of ``slot_audit``: who enabled or disabled a slot, and why."""

    slot: int
    action: str
    actor: str
    reason: str
    detail: dict[str, Any] | None
    at: datetime


# --- results -------------------------------------------------------------------------------------

_COUNT: Final = """
INSERT INTO machine_slots AS s (machine_id, slot, consecutive_failures) VALUES ($1, $2, 1)
ON CONFLICT (machine_id, slot) DO UPDATE SET consecutive_failures = s.consecutive_failures + 1
RETURNING consecutive_failures, enabled
"""
_AUTO_DISABLE: Final = """
UPDATE machine_slots SET enabled = false, disabled_at = now(), disabled_reason = $3
WHERE machine_id = $1 AND slot = $2 AND enabled
"""
_RESET: Final = """
UPDATE machine_slots SET consecutive_failures = 0
WHERE machine_id = $1 AND slot = $2 AND consecutive_failures <> 0
"""
_AUDIT: Final = """
INSERT INTO slot_audit (machine_id, slot, action, actor, reason, detail)
VALUES ($1, $2, $3, $4, $5, $6::jsonb)
"""


async def record_result(
    conn: Conn,
    machine_id: str,
    slot: int,
    *,
    failed: bool,
    reason: str,
    limit: int,
    vend_id: str | None = None,
) -> bool:
    """Count one dispense result against its slot; return True if this call disabled the slot.

    Call it in the transaction that stores the vend's result, once per result. ``failed``
    is True for any outcome but ``DISPENSED``; ``reason`` is the ``FailReason`` name, in
    any case (``"JAM"``, ``"jam"``). A counted failure adds one to the slot's failures in a
    row; the one that reaches ``limit`` on an enabled slot disables it (reason
    ``"3 failed dispenses in a row (last: JAM)"``) and writes an ``auto_disable`` audit row
    by ``gateway``, with ``vend_id`` in its detail when given. A good dispense resets the
    count. Other results change nothing (module docstring). Writes nothing when nothing
    changes, so a healthy slot costs no write per vend.
    """
    try:
        fail_reason = FailReason[reason.upper()]
    except KeyError:
        log.warning("slot_result_unknown_reason", machine_id=machine_id, slot=slot, reason=reason)
        return False
    effect = effect_of(failed=failed, reason=fail_reason)
    if effect is SlotEffect.RESET:
        await conn.execute(_RESET, machine_id, slot)
        return False
    if effect is SlotEffect.NONE:
        return False
    counted = await conn.fetchrow(_COUNT, machine_id, slot)
    assert counted is not None  # noqa: S101  (an upsert always returns its row)
    failures: int = counted["consecutive_failures"]
    if failures < limit or not counted["enabled"]:
        return False
    why = f"{failures} failed dispenses in a row (last: {fail_reason.name})"
    status = await conn.execute(_AUTO_DISABLE, machine_id, slot, why)
    if status != "UPDATE 1":  # pragma: no cover - the row is locked by the upsert above
        return False
    detail: dict[str, Any] = {
        "consecutive_failures": failures,
        "limit": limit,
        "last_reason": fail_reason.name,
    }
    if vend_id is not None:
        detail["vend_id"] = vend_id
    await conn.execute(_AUDIT, machine_id, slot, "auto_disable", "gateway", why, json.dumps(detail))
    log.warning(
        "slot_auto_disabled", machine_id=machine_id, slot=slot, failures=failures, reason=why
    )
    return True


async def record_dispense(
    conn: Conn,
    machine_id: str,
    slot: int,
    dispense: Dispense,
    *,
    limit: int,
    vend_id: str | None = None,
) -> bool:
    """Like :func:`record_result`, from the machine's ``Dispense`` record."""
    return await record_result(
        conn,
        machine_id,
        slot,
        failed=dispense.outcome is not Outcome.DISPENSED,
        reason=dispense.reason.name,
        limit=limit,
        vend_id=vend_id,
    )


def _effect(dispense: Dispense) -> SlotEffect:
    return effect_of(failed=dispense.outcome is not Outcome.DISPENSED, reason=dispense.reason)


_RESET_MANY: Final = """
UPDATE machine_slots s SET consecutive_failures = 0
FROM unnest($1::text[], $2::int[]) AS u (machine_id, slot)
WHERE s.machine_id = u.machine_id AND s.slot = u.slot AND s.consecutive_failures <> 0
"""


async def record_dispenses(
    conn: Conn, results: Sequence[tuple[str, int, Dispense, str | None]], *, limit: int
) -> list[tuple[str, int, str | None]]:
    """`record_dispense` for many results, (machine, slot, dispense, vend id) each.

    The resets of good dispenses share one statement; failures are counted one by one (they
    are rare, and the one that disables a slot writes its audit row). Results for the same
    slot keep their order: with a slot listed twice, everything goes one by one. Returns
    the slots this call disabled, (machine, slot, vend id) each.
    """
    disabled: list[tuple[str, int, str | None]] = []
    keys = {(machine_id, slot) for machine_id, slot, _, _ in results}
    one_by_one = list(results)
    if len(keys) == len(results):
        resets = [r for r in results if _effect(r[2]) is SlotEffect.RESET]
        if resets:
            await conn.execute(_RESET_MANY, [r[0] for r in resets], [r[1] for r in resets])
        one_by_one = [r for r in results if _effect(r[2]) is SlotEffect.COUNT]
    for machine_id, slot, dispense, vend_id in one_by_one:
        if await record_dispense(conn, machine_id, slot, dispense, limit=limit, vend_id=vend_id):
            disabled.append((machine_id, slot, vend_id))
    return disabled


# --- operators -----------------------------------------------------------------------------------

_MACHINE_EXISTS: Final = "SELECT EXISTS (SELECT 1 FROM machines WHERE machine_id = $1)"
_BEFORE: Final = """
SELECT enabled, consecutive_failures FROM machine_slots
WHERE machine_id = $1 AND slot = $2 FOR UPDATE
"""
_ENABLE: Final = """
INSERT INTO machine_slots AS s (machine_id, slot) VALUES ($1, $2)
ON CONFLICT (machine_id, slot) DO UPDATE
    SET enabled = true, consecutive_failures = 0, disabled_at = NULL, disabled_reason = NULL
RETURNING *
"""
_DISABLE: Final = """
INSERT INTO machine_slots AS s (machine_id, slot, enabled, disabled_at, disabled_reason)
VALUES ($1, $2, false, now(), $3)
ON CONFLICT (machine_id, slot) DO UPDATE
    SET enabled = false, disabled_at = now(), disabled_reason = $3
RETURNING *
"""


async def enable(conn: Conn, machine_id: str, slot: int, actor: str, reason: str) -> SlotRow | None:
    """Put a slot back in service and reset its failures; None if the machine is unknown.

    Always audited (action ``enable``), also when the slot was enabled already: the
    operator's word is worth keeping, and the failures are reset either way.
    """
    return await _set(conn, machine_id, slot, actor, reason, enabled=True)


async def disable(
    conn: Conn, machine_id: str, slot: int, actor: str, reason: str
) -> SlotRow | None:
    """Take a slot out of service; None if the machine is unknown.

    Any slot number may be disabled, listed in the planogram or not, so that a slot can be
    kept out of service before it is stocked. Disabling a disabled slot replaces its
    reason and time with the operator's. The failure count is kept. Always audited.
    """
    return await _set(conn, machine_id, slot, actor, reason, enabled=False)


async def _set(
    conn: Conn, machine_id: str, slot: int, actor: str, reason: str, *, enabled: bool
) -> SlotRow | None:
    if not await conn.fetchval(_MACHINE_EXISTS, machine_id):
        return None
    before = await conn.fetchrow(_BEFORE, machine_id, slot)
    if enabled:
        record = await conn.fetchrow(_ENABLE, machine_id, slot)
    else:
        record = await conn.fetchrow(_DISABLE, machine_id, slot, reason)
    assert record is not None  # noqa: S101  (an upsert always returns its row)
    detail = {
        "was_enabled": True if before is None else before["enabled"],
        "consecutive_failures": 0 if before is None else before["consecutive_failures"],
    }
    action = "enable" if enabled else "disable"
    await conn.execute(_AUDIT, machine_id, slot, action, actor, reason, json.dumps(detail))
    event = "slot_enabled" if enabled else "slot_disabled"
    log.info(event, machine_id=machine_id, slot=slot, actor=actor, reason=reason)
    return SlotRow.from_record(record)


# --- reads ---------------------------------------------------------------------------------------


async def get(conn: Conn, machine_id: str, slot: int) -> SlotRow | None:
    """Return one slot's row, or None if the gateway has none for it."""
    record = await conn.fetchrow(
        "SELECT * FROM machine_slots WHERE machine_id = $1 AND slot = $2", machine_id, slot
    )
    return None if record is None else SlotRow.from_record(record)


async def all_for(conn: Conn, machine_id: str) -> list[SlotRow]:
    """Return every slot row of a machine, by slot number."""
    records = await conn.fetch(
        "SELECT * FROM machine_slots WHERE machine_id = $1 ORDER BY slot", machine_id
    )
    return [SlotRow.from_record(r) for r in records]


_RECENT_AUDIT: Final = """
SELECT slot, action, actor, reason, detail, at FROM (
    SELECT *, row_number() OVER (PARTITION BY slot ORDER BY id DESC) AS n
    FROM slot_audit WHERE machine_id = $1 AND ($2::smallint IS NULL OR slot = $2)
) recent
WHERE n <= $3
ORDER BY slot, id DESC
"""


async def recent_audit(
    conn: Conn, machine_id: str, *, slot: int | None = None, per_slot: int = AUDIT_PER_SLOT
) -> dict[int, list[AuditEntry]]:
    """Return the latest ``per_slot`` audit entries of each slot (or of one), newest first."""
    records = await conn.fetch(_RECENT_AUDIT, machine_id, slot, per_slot)
    found: dict[int, list[AuditEntry]] = {}
    for r in records:
        detail = r["detail"]
        found.setdefault(r["slot"], []).append(
            AuditEntry(
                slot=r["slot"],
                action=r["action"],
                actor=r["actor"],
                reason=r["reason"],
                detail=json.loads(detail) if isinstance(detail, str) else detail,
                at=r["at"],
            )
        )
    return found
