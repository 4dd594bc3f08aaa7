"""The dispenses aggregate: one row per vend result committed, in the vend's own transaction.

``dispenses`` is partitioned by ``recorded_at`` (the transaction's ``now()``), one partition a
UTC day, made ahead by `gateway.store.partitions.PartitionKeeper`. A vend result must never fail
because maintenance fell behind, so the insert checks, in the same statement, that today's
partition exists; only if it does not is the partition created (in a savepoint of the caller's
transaction) and the rows inserted again. The common case stays one round trip for all of a
commit's results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Final

from gateway.store import partitions
from gateway.store.db import Conn
from protocols.frames import Dispense

__all__ = ["DispenseRecord", "record_dispense", "record_dispenses"]

# to_regclass of today's partition name: with no partition the SELECT yields no row, the
# INSERT adds none, and the caller's transaction is not aborted by a routing error.
_INSERT_IF_PARTITION: Final = """
INSERT INTO dispenses
       (vend_id, machine_id, slot, outcome, reason, drop_detected, motor_ms, retries, late)
SELECT * FROM unnest($1::text[], $2::text[], $3::smallint[], $4::text[], $5::text[],
                     $6::bool[], $7::int[], $8::smallint[], $9::bool[])
 WHERE to_regclass('dispenses_p' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')) IS NOT NULL"""
_INSERT: Final = """
INSERT INTO dispenses
       (vend_id, machine_id, slot, outcome, reason, drop_detected, motor_ms, retries, late)
SELECT * FROM unnest($1::text[], $2::text[], $3::smallint[], $4::text[], $5::text[],
                     $6::bool[], $7::int[], $8::smallint[], $9::bool[])"""


@dataclass(frozen=True, slots=True)
class DispenseRecord:
    """One ``dispenses`` row: a vend result as the machine reported it.

    ``late`` marks a result received after the vend was settled (one that contradicts or
    completes the settled outcome).
    """

    vend_id: str
    machine_id: str
    slot: int
    dispense: Dispense
    late: bool = False


async def record_dispenses(conn: Conn, records: Sequence[DispenseRecord]) -> None:
    """Insert ``dispenses`` rows for vend results in the caller's transaction, in one statement."""
    if not records:
        return
    columns = (
        [r.vend_id for r in records],
        [r.machine_id for r in records],
        [r.slot for r in records],
        [r.dispense.outcome.name.lower() for r in records],
        [r.dispense.reason.name.lower() for r in records],
        [r.dispense.drop_detected for r in records],
        [r.dispense.motor_ms for r in records],
        [r.dispense.retries for r in records],
        [r.late for r in records],
    )
    if await conn.execute(_INSERT_IF_PARTITION, *columns) != "INSERT 0 0":
        return
    today: date = await conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
    await partitions.ensure(conn, [today], tables=("dispenses",))
    await conn.execute(_INSERT, *columns)


async def record_dispense(
    conn: Conn,
    *,
    vend_id: str,
    machine_id: str,
    slot: int,
    dispense: Dispense,
    late: bool,
) -> None:
    """Insert one ``dispenses`` row (`record_dispenses` with one record)."""
    await record_dispenses(conn, [DispenseRecord(vend_id, machine_id, slot, dispense, late)])
