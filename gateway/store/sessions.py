"""The presence aggregate: machines' presence columns and ``machine_sessions`` (0003_sessions).

Presence lives in the gateway's memory (:mod:`gateway.sessions`) and is written here in
batches, with set-based statements: one ``unnest`` per table per batch, never one statement
per machine (house style #5). Several gateways write the same rows (MQTT 5 §4.8.2 shared
subscriptions spread a machine's frames over them), so the writes only move forward where
that is decidable: ``last_seen`` never goes back, a session once ended stays ended.
The readers at the bottom serve the HTTP API.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import asyncpg

from gateway.store.db import Conn

if TYPE_CHECKING:
    from gateway.sessions import MachinePresence, SessionRecord

_INT32_MAX: Final = 2**31 - 1

# Every gateway locks the machines it updates in one order, so two batches that share
# machines wait for each other instead of deadlocking (an UPDATE ... FROM locks rows in
# whatever order its join visits them).
_LOCK_MACHINES: Final = """
    SELECT machine_id FROM machines WHERE machine_id = ANY($1::text[])
    ORDER BY machine_id FOR NO KEY UPDATE"""

# firmware and rssi are kept when this gateway has none (rssi also comes from telemetry).
_UPDATE_MACHINES: Final = """
    UPDATE machines AS m
       SET online     = u.online,
           last_seen  = GREATEST(m.last_seen, u.last_seen),
           firmware   = COALESCE(u.firmware, m.firmware),
           boot       = u.boot,
           session    = u.session,
           session_id = u.session_id,
           rssi       = COALESCE(u.rssi, m.rssi)
      FROM unnest($1::text[], $2::boolean[], $3::timestamptz[], $4::text[], $5::bigint[],
                  $6::integer[], $7::uuid[], $8::smallint[])
           AS u(machine_id, online, last_seen, firmware, boot, session, session_id, rssi)
     WHERE m.machine_id = u.machine_id"""

# A session of a machine that was deleted meanwhile is dropped, not a foreign-key error that
# would fail the whole batch again at every retry. A session ended by any gateway stays
# ended (the first end wins); its number is filled in when a gateway learns it.
_UPSERT_SESSIONS: Final = """
    INSERT INTO machine_sessions AS s
           (session_id, machine_id, boot, session, connected_at, disconnected_at, end_reason)
    SELECT u.session_id, u.machine_id, u.boot, u.session, u.connected_at, u.disconnected_at,
           u.end_reason
      FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::integer[], $5::timestamptz[],
                  $6::timestamptz[], $7::text[])
           AS u(session_id, machine_id, boot, session, connected_at, disconnected_at, end_reason)
     WHERE EXISTS (SELECT 1 FROM machines m WHERE m.machine_id = u.machine_id)
    ON CONFLICT (session_id) DO UPDATE
       SET session         = COALESCE(EXCLUDED.session, s.session),
           disconnected_at = COALESCE(s.disconnected_at, EXCLUDED.disconnected_at),
           end_reason      = COALESCE(s.end_reason, EXCLUDED.end_reason)"""

_LOAD: Final = """
    SELECT m.machine_id, m.online, m.last_seen, m.firmware, m.boot, m.session, m.session_id,
           m.rssi, s.boot AS session_boot, s.session AS session_number, s.connected_at,
           s.disconnected_at
      FROM machines m
      LEFT JOIN machine_sessions s ON s.session_id = m.session_id
     WHERE m.last_seen IS NOT NULL OR m.boot IS NOT NULL OR m.online"""

# Rows of the machine readers: every column of machines, plus the current (or last) session's
# times, for "online since" without a second query. Three fixed texts rather than
# "$1 IS NULL OR online = $1": only a literal `m.online` lets the planner use the partial
# index machines_online.
_LIST: Final[dict[bool | None, str]] = {
    None: """
        SELECT m.*, s.connected_at, s.disconnected_at
          FROM machines m LEFT JOIN machine_sessions s ON s.session_id = m.session_id
         WHERE ($1::text IS NULL OR m.machine_id > $1)
         ORDER BY m.machine_id LIMIT $2""",
    True: """
        SELECT m.*, s.connected_at, s.disconnected_at
          FROM machines m LEFT JOIN machine_sessions s ON s.session_id = m.session_id
         WHERE m.online AND ($1::text IS NULL OR m.machine_id > $1)
         ORDER BY m.machine_id LIMIT $2""",
    False: """
        SELECT m.*, s.connected_at, s.disconnected_at
          FROM machines m LEFT JOIN machine_sessions s ON s.session_id = m.session_id
         WHERE NOT m.online AND ($1::text IS NULL OR m.machine_id > $1)
         ORDER BY m.machine_id LIMIT $2""",
}
_GET: Final = """
    SELECT m.*, s.connected_at, s.disconnected_at
      FROM machines m LEFT JOIN machine_sessions s ON s.session_id = m.session_id
     WHERE m.machine_id = $1"""


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _int32(value: int | None) -> int | None:
    # The wire's session is a uint32, the column an integer. No machine reconnects 2**31
    # times in one boot; a number that large is kept as unknown rather than failing every
    # batch it is in, forever.
    return value if value is not None and value <= _INT32_MAX else None


async def write_presence(
    conn: Conn, machines: Sequence[MachinePresence], sessions: Sequence[SessionRecord]
) -> None:
    """Write machines' presence and sessions; run it in a transaction, as one batch.

    Machines that are not registered (any more) are skipped, with their sessions.
    """
    if sessions:
        await conn.execute(
            _UPSERT_SESSIONS,
            [s.session_id for s in sessions],
            [s.machine_id for s in sessions],
            [s.boot for s in sessions],
            [_int32(s.session) for s in sessions],
            [_ts(s.connected_at) for s in sessions],
            [_ts(s.disconnected_at) for s in sessions],
            [None if s.end_reason is None else s.end_reason.value for s in sessions],
        )
    if machines:
        ordered = sorted(machines, key=lambda m: m.machine_id)
        ids = [m.machine_id for m in ordered]
        await conn.execute(_LOCK_MACHINES, ids)
        await conn.execute(
            _UPDATE_MACHINES,
            ids,
            [m.online for m in ordered],
            [_ts(m.last_seen) for m in ordered],
            [m.firmware for m in ordered],
            [m.boot for m in ordered],
            [_int32(m.session) for m in ordered],
            [m.session_id for m in ordered],
            [m.rssi for m in ordered],
        )


async def last_seen(conn: Conn, machine_ids: Sequence[str]) -> dict[str, datetime | None]:
    """Return ``machines.last_seen`` of each of ``machine_ids`` that is registered."""
    rows = await conn.fetch(
        "SELECT machine_id, last_seen FROM machines WHERE machine_id = ANY($1::text[])",
        list(machine_ids),
    )
    return {r["machine_id"]: r["last_seen"] for r in rows}


async def load_presence(conn: Conn) -> list[asyncpg.Record]:
    """Return the saved presence of every machine that has any, with its current session.

    Columns: those of ``machines`` that presence writes, plus ``session_boot``,
    ``session_number``, ``connected_at`` and ``disconnected_at`` of the row named by
    ``machines.session_id`` (NULL if there is none).
    """
    return await conn.fetch(_LOAD)


async def list_machines(
    conn: Conn, *, online: bool | None, after: str | None, limit: int
) -> list[asyncpg.Record]:
    """Return up to ``limit`` machines with ids above ``after``, in id order (keyset pages).

    ``online`` filters on presence (None: all). Rows have every column of ``machines`` plus
    ``connected_at`` and ``disconnected_at`` of its current (or last) session. The next page
    starts after the last row's ``machine_id``.
    """
    return await conn.fetch(_LIST[online], after, limit)


async def get_machine(conn: Conn, machine_id: str) -> asyncpg.Record | None:
    """Return one machine with the columns of :func:`list_machines`, or None."""
    return await conn.fetchrow(_GET, machine_id)


async def session_history(conn: Conn, machine_id: str, *, limit: int) -> list[asyncpg.Record]:
    """Return the newest ``limit`` sessions of ``machine_id``, newest first (every column)."""
    return await conn.fetch(
        """SELECT * FROM machine_sessions WHERE machine_id = $1
           ORDER BY connected_at DESC, session_id LIMIT $2""",
        machine_id,
        limit,
    )
