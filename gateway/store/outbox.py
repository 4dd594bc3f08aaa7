"""The webhook outbox: events written with a vend's state change, delivered later, in order.

`gateway.store.vends` inserts an event in the same transaction as the state change it
reports; this module is the delivery side. Events are claimed with a lease
(``leased_until``, migration 0002) rather than by holding a transaction open across the
HTTP POST: a claim is one statement that locks candidate rows ``FOR UPDATE SKIP LOCKED``
(so concurrent claimers never take the same row) and stamps them with a lease that other
gateways respect until it runs out. The worker keeps no connection while it waits for the
receiver, and a gateway that dies mid-delivery only delays its events by the lease.

Only the oldest undelivered event of each vend is ever claimable, and not while it is
leased, so a vend's events are delivered one at a time, in the order they were written
(``id``; the vend's row lock serialises the transactions that write them).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg

from gateway.store.db import Conn

__all__ = [
    "OutboxEvent",
    "claim_due",
    "mark_delivered",
    "mark_failed",
    "oldest_pending_age_s",
    "pending_count",
]

_MAX_ERROR_CHARS: Final = 1000

#: The lease has to outlast one delivery (the POST timeout plus recording the outcome).
DEFAULT_LEASE_S: Final = 60.0

# Candidates in the pending index's order (next_attempt_at, id), each checked to be its vend's
# oldest undelivered event by one probe of the per-vend index: the cost grows with the limit,
# not with the backlog. (The first form took every vend's head with DISTINCT ON over all
# pending events, then sorted them: 539 ms a claim with 8,000 events behind, measured, so the
# deliverer fell further behind the more it had to do.)
_CLAIM: Final = """
WITH due AS (
    -- The conditions are on `o`, the locked row, so that READ COMMITTED re-checks them
    -- against the latest version of a row another claimer changed while we waited.
    SELECT o.id
    FROM webhook_outbox o
    WHERE o.delivered_at IS NULL
      AND o.next_attempt_at <= now()
      AND (o.leased_until IS NULL OR o.leased_until <= now())
      AND NOT EXISTS (
          SELECT 1 FROM webhook_outbox e
          WHERE e.vend_id = o.vend_id AND e.id < o.id AND e.delivered_at IS NULL
      )
    ORDER BY o.next_attempt_at, o.id
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE webhook_outbox o
SET leased_until = now() + make_interval(secs => $2::float8),
    attempts = o.attempts + 1
FROM due
WHERE o.id = due.id
RETURNING o.id, o.event_id, o.vend_id, o.event_type, o.payload, o.attempts, o.created_at,
          now() AS claimed_at
"""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One claimed webhook event."""

    id: int
    event_id: uuid.UUID
    vend_id: str
    event_type: str
    payload: dict[str, Any]
    #: Delivery attempts so far, this one included (counted when the event is claimed).
    attempts: int
    created_at: datetime
    #: The database's clock at the claim; retries are scheduled on that clock.
    claimed_at: datetime

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> OutboxEvent:
        """Build from a row returned by the claim."""
        payload = r["payload"]
        return cls(
            id=r["id"],
            event_id=r["event_id"],
            vend_id=r["vend_id"],
            event_type=r["event_type"],
            # jsonb arrives as text unless the pool registered a codec for it.
            payload=json.loads(payload) if isinstance(payload, str) else payload,
            attempts=r["attempts"],
            created_at=r["created_at"],
            claimed_at=r["claimed_at"],
        )


async def claim_due(
    conn: Conn, limit: int, *, lease_s: float = DEFAULT_LEASE_S
) -> list[OutboxEvent]:
    """Lease up to ``limit`` due events: each the oldest undelivered event of its vend.

    An event is due when its ``next_attempt_at`` has passed and it is not leased. The lease
    lasts ``lease_s`` seconds; record the outcome with `mark_delivered` or `mark_failed`
    before then, or another claimer may deliver the event again. Oldest-due first.

    Run it on a connection with ``plan_cache_mode = force_custom_plan`` (the gateway's
    outbox pool): a generic plan made while the outbox was small scans the whole backlog.
    """
    if limit <= 0:
        return []
    records = await conn.fetch(_CLAIM, limit, lease_s)
    return sorted((OutboxEvent.from_record(r) for r in records), key=lambda e: e.id)


async def mark_delivered(conn: Conn, id: int) -> bool:  # noqa: A002  (the column's name)
    """Record that the receiver accepted event ``id``; False if it was recorded already."""
    done = await conn.fetchval(
        "UPDATE webhook_outbox SET delivered_at = now(), leased_until = NULL "
        "WHERE id = $1 AND delivered_at IS NULL RETURNING true",
        id,
    )
    return bool(done)


async def mark_delivered_many(conn: Conn, ids: list[int]) -> int:
    """`mark_delivered` for several events in one statement; return how many it recorded."""
    done = await conn.fetchval(
        "WITH d AS (UPDATE webhook_outbox SET delivered_at = now(), leased_until = NULL "
        "WHERE id = ANY($1::bigint[]) AND delivered_at IS NULL RETURNING 1) "
        "SELECT count(*) FROM d",
        ids,
    )
    return int(done)


async def mark_failed(
    conn: Conn,
    id: int,  # noqa: A002  (the column's name)
    error: str,
    next_attempt_at: datetime,
    *,
    attempt: int | None = None,
) -> bool:
    """Record a failed attempt and release the lease until ``next_attempt_at``.

    With ``attempt`` (the claimed event's `OutboxEvent.attempts`), nothing is written if
    the event was claimed again since, which only happens when a lease ran out: the newer
    claim owns the event now. Returns whether the failure was recorded.
    """
    done = await conn.fetchval(
        "UPDATE webhook_outbox SET last_error = $2, next_attempt_at = $3, leased_until = NULL "
        "WHERE id = $1 AND delivered_at IS NULL AND ($4::integer IS NULL OR attempts = $4) "
        "RETURNING true",
        id,
        error[:_MAX_ERROR_CHARS],
        next_attempt_at,
        attempt,
    )
    return bool(done)


async def pending_count(conn: Conn) -> int:
    """Return how many events are not delivered yet."""
    count = await conn.fetchval("SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NULL")
    return int(count)


async def oldest_pending_age_s(conn: Conn) -> float:
    """Return the age in seconds of the oldest undelivered event, 0.0 when there is none."""
    age = await conn.fetchval(
        "SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 "
        "FROM webhook_outbox WHERE delivered_at IS NULL"
    )
    return float(age)
