"""The dispenses aggregate: one row per vend result committed, in the vend's own transaction.

``dispenses`` is partitioned by ``recorded_at`` (the transaction's ``now()``), one partition a
UTC day, made ahead by `gateway.store.partitions.PartitionKeeper`. A vend result must never fail
because maintenance fell behind, so the insert checks, in the same statement, that today's
partition exists; only if it does not is the partition created (in a savepoint of the caller's
transaction) and the row inserted again. The common case stays one round trip.
"""

from __future__ import annotations

from datetime import date
from typing import Final

from gateway.store import partitions
from gateway.store.db import Conn
from protocols.frames import Dispense

__all__ = ["record_dispense"]

# to_regclass of today's partition name: with no partition the SELECT yields no row, the
# INSERT adds none, and the caller's transaction is not aborted by a routing error.
_INSERT_IF_PARTITION: Final = """
INSERT INTO dispenses
       (vend_id, machine_id, slot, outcome, reason, drop_detected, motor_ms, retries, late)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9
 WHERE to_regclass('dispenses_p' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')) IS NOT NULL
RETURNING 1"""
_INSERT: Final = """
INSERT INTO dispenses
       (vend_id, machine_id, slot, outcome, reason, drop_detected, motor_ms, retries, late)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"""


async def record_dispense(
    conn: Conn,
    *,
    vend_id: str,
    machine_id: str,
    slot: int,
    dispense: Dispense,
    late: bool,
) -> None:
    """Insert one ``dispenses`` row for a vend result, in the caller's transaction.

    ``late`` marks a result received after the vend was settled (one that contradicts or
    completes the settled outcome).
    """
    args = (
        vend_id,
        machine_id,
        slot,
        dispense.outcome.name.lower(),
        dispense.reason.name.lower(),
        dispense.drop_detected,
        dispense.motor_ms,
        dispense.retries,
        late,
    )
    if await conn.fetchval(_INSERT_IF_PARTITION, *args) is not None:
        return
    today: date = await conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
    await partitions.ensure(conn, [today], tables=("dispenses",))
    await conn.execute(_INSERT, *args)
