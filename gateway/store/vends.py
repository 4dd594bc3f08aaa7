"""The vends aggregate: creation, compare-and-set transitions, history, recovery reads.

Every function takes a connection, so callers choose the transaction: the HTTP API
and the dispatcher hand these to the group-commit writer. A state change is one
``UPDATE ... WHERE state = ANY(<allowed sources>)``, taken from the transition table
in :mod:`gateway.lifecycle`; its history row and its webhook event are written in the
same transaction, so all three happen once or not at all, whichever gateway gets there
first.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import asyncpg

from gateway.lifecycle import ACTIVE, WEBHOOK_EVENTS, VendEvent, VendStatus, next_status, sources
from gateway.store.db import Conn

WIRE_ID_BITS: Final = 63  # fits PostgreSQL bigint; 2**-63 collision odds per pair


@dataclass(frozen=True, slots=True)
class VendRequest:
    """A validated ``POST /v1/vends`` body; ``deadline`` is None when the caller gave none."""

    vend_id: str
    machine_id: str
    slot: int
    price: int
    currency: str
    deadline: datetime | None

    def fingerprint(self) -> bytes:
        """Hash of the request as given, to tell a repeat from a different request."""
        canonical = {
            "vend_id": self.vend_id,
            "machine_id": self.machine_id,
            "slot": self.slot,
            "price": self.price,
            "currency": self.currency,
            "deadline": None if self.deadline is None else self.deadline.isoformat(),
        }
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).digest()


@dataclass(frozen=True, slots=True)
class VendRow:
    """One row of ``vends``."""

    vend_id: str
    wire_id: int
    machine_id: str
    slot: int
    price: int
    currency: str
    deadline: datetime
    state: VendStatus
    attempts: int
    queue_seq: int
    dispense: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    first_sent_at: datetime | None
    settled_at: datetime | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> VendRow:
        """Build from a ``SELECT * FROM vends`` record."""
        dispense = r["dispense"]
        return cls(
            vend_id=r["vend_id"],
            wire_id=r["wire_id"],
            machine_id=r["machine_id"],
            slot=r["slot"],
            price=r["price"],
            currency=r["currency"],
            deadline=r["deadline"],
            state=VendStatus(r["state"]),
            attempts=r["attempts"],
            queue_seq=r["queue_seq"],
            dispense=json.loads(dispense) if isinstance(dispense, str) else dispense,
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            first_sent_at=r["first_sent_at"],
            settled_at=r["settled_at"],
        )


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of a vend's history."""

    from_state: VendStatus | None
    to_state: VendStatus
    event: str
    actor: str
    detail: dict[str, Any] | None
    at: datetime


CreateOutcome = Literal[
    "created",
    "exists",
    "conflict",
    "unknown_machine",
    "slot_disabled",
    "not_in_planogram",
    "price_mismatch",
]
#: The outcomes that refuse a new vend because of its slot (the vend is not stored).
SLOT_REFUSALS: Final = frozenset({"slot_disabled", "not_in_planogram", "price_mismatch"})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a new vend was refused for its slot, in words for the backend."""

    reason: str


# New vends, with distinct ids, in their order (queue_seq follows it). A vend is inserted only
# if its slot may sell it: the slot is not disabled, and, once the machine has a planogram
# (config_desired set), the planogram lists the slot at this price and currency. One statement,
# so the check and the insert see the same planogram. The first history row goes in with it
# (a data-modifying CTE: one round trip, not two).
_INSERT_MANY: Final = """
WITH x AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::smallint[], $5::bigint[],
                         $6::text[], $7::timestamptz[], $8::bytea[])
        WITH ORDINALITY AS x (vend_id, wire_id, machine_id, slot, price, currency, deadline,
                              request_hash, n)
), created AS (
    INSERT INTO vends (vend_id, wire_id, machine_id, slot, price, currency, deadline,
                       request_hash, state)
    SELECT x.vend_id, x.wire_id, x.machine_id, x.slot, x.price, x.currency, x.deadline,
           x.request_hash, 'accepted'
    FROM x
    JOIN machines m ON m.machine_id = x.machine_id
    LEFT JOIN machine_slots s ON s.machine_id = m.machine_id AND s.slot = x.slot
    WHERE COALESCE(s.enabled, true)
      AND (m.config_desired IS NULL OR (s.price = x.price AND s.currency = x.currency))
    ORDER BY x.n
    ON CONFLICT DO NOTHING
    RETURNING *
), history AS (
    INSERT INTO vend_transitions (vend_id, from_state, to_state, event, actor)
    SELECT vend_id, NULL, 'accepted', 'created', 'gateway' FROM created
)
SELECT * FROM created
"""

_SLOT: Final = """
SELECT m.config_desired, s.price, s.currency, s.enabled, s.disabled_reason
FROM machines m
LEFT JOIN machine_slots s ON s.machine_id = m.machine_id AND s.slot = $2
WHERE m.machine_id = $1
"""


async def create(
    conn: Conn, request: VendRequest, deadline: datetime
) -> tuple[CreateOutcome, VendRow | Refusal | None]:
    """Store a new vend in state ``accepted``, idempotently on ``vend_id``.

    Returns ``created`` with the row; ``exists`` with the stored row when the same
    request was stored before; ``conflict`` with the stored row when the id is taken by
    a different request; ``unknown_machine`` when the machine is not registered; one of
    :data:`SLOT_REFUSALS` with a :class:`Refusal` when the slot may not sell it. A repeat
    of a stored vend is answered as stored even if the planogram or the slot changed since.
    """
    fingerprint = request.fingerprint()
    for _ in range(3):  # a wire-id collision (2**-63) is retried with a fresh id
        row = (await _insert(conn, [(request, deadline)])).get(request.vend_id)
        if row is not None:
            return "created", row
        existing = await conn.fetchrow("SELECT * FROM vends WHERE vend_id = $1", request.vend_id)
        if existing is not None:
            outcome: CreateOutcome = (
                "exists" if bytes(existing["request_hash"]) == fingerprint else "conflict"
            )
            return outcome, VendRow.from_record(existing)
        slot = await conn.fetchrow(_SLOT, request.machine_id, request.slot)
        if slot is None:
            return "unknown_machine", None
        refused = _refusal(slot, request)
        if refused is not None:
            return refused
    raise RuntimeError("could not draw a unique wire id three times")  # pragma: no cover


async def create_many(
    conn: Conn, requests: Sequence[tuple[VendRequest, datetime]]
) -> list[tuple[CreateOutcome, VendRow | Refusal | None]]:
    """`create` for requests with distinct ids: the new ones in one statement.

    What that statement did not insert (a repeat, a conflict, an unknown machine, a refused
    slot, a wire-id collision) goes through `create` one by one, for its precise answer.
    """
    if len({r.vend_id for r, _ in requests}) != len(requests):
        raise ValueError("create_many needs distinct vend ids")
    created = await _insert(conn, requests)
    outcomes: list[tuple[CreateOutcome, VendRow | Refusal | None]] = []
    for request, deadline in requests:
        row = created.get(request.vend_id)
        outcomes.append(
            ("created", row) if row is not None else await create(conn, request, deadline)
        )
    return outcomes


async def _insert(
    conn: Conn, requests: Sequence[tuple[VendRequest, datetime]]
) -> dict[str, VendRow]:
    """Insert what may be inserted of ``requests`` (`_INSERT_MANY`); the new rows by id."""
    records = await conn.fetch(
        _INSERT_MANY,
        [r.vend_id for r, _ in requests],
        [secrets.randbits(WIRE_ID_BITS) for _ in requests],
        [r.machine_id for r, _ in requests],
        [r.slot for r, _ in requests],
        [r.price for r, _ in requests],
        [r.currency for r, _ in requests],
        [deadline for _, deadline in requests],
        [r.fingerprint() for r, _ in requests],
    )
    return {record["vend_id"]: VendRow.from_record(record) for record in records}


def _refusal(slot: asyncpg.Record, request: VendRequest) -> tuple[CreateOutcome, Refusal] | None:
    if slot["enabled"] is False:
        why = slot["disabled_reason"] or "disabled"
        return "slot_disabled", Refusal(f"the slot is out of service ({why}); do not charge")
    version = slot["config_desired"]
    if version is None:
        return None
    if slot["price"] is None:
        return "not_in_planogram", Refusal(f"planogram version {version} has no such slot")
    if (slot["price"], slot["currency"]) != (request.price, request.currency):
        return "price_mismatch", Refusal(
            f"the price is {slot['price']} {slot['currency']} in planogram version {version}; "
            f"the request says {request.price} {request.currency}"
        )
    return None


#: PostgreSQL NOTIFY channel: "<vend_id> <origin>" whenever a change settles a vend, so that
#: the gateway whose queue holds it (another gateway may have taken the machine's result,
#: MQTT 5 shared subscriptions) moves on at once rather than at its next reconcile pass.
SETTLED_CHANNEL: Final = "vendgate_vend_settled"


async def apply(
    conn: Conn,
    vend_id: str,
    event: VendEvent,
    *,
    detail: dict[str, Any] | None = None,
    dispense: dict[str, Any] | None = None,
    attempts: int = 0,
    actor: str = "gateway",
    origin: str = "",
) -> VendRow | None:
    """Apply ``event`` if the vend's current state allows it; return the new row or None.

    When it settles the vend, `SETTLED_CHANNEL` is notified with ``origin``.

    None means the compare-and-set found the vend in a state the event does not move
    (already moved by another message or gateway, or no such vend): nothing was written.
    """
    (row,) = await apply_many(
        conn, [Move(vend_id, event, detail, dispense, attempts, actor, origin)]
    )
    return row


@dataclass(frozen=True, slots=True)
class Move:
    """One `apply` call's arguments, for `apply_many`."""

    vend_id: str
    event: VendEvent
    detail: dict[str, Any] | None = None
    dispense: dict[str, Any] | None = None
    attempts: int = 0
    actor: str = "gateway"
    origin: str = ""  # who moves it, in the settled notification


# The state changes of vends with distinct ids, compare-and-set on each one's state, with their
# history rows, in one statement whatever their number, and the notification when a change
# settles a vend (delivered at commit).
_APPLY_MANY: Final = """
WITH x AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::bool[],
                         $6::int[], $7::text[], $8::text[], $9::jsonb[])
        AS x (vend_id, target, allowed, dispense, settles, attempts, event, actor, detail)
), old AS (
    SELECT v.vend_id, v.state FROM vends v JOIN x USING (vend_id)
    ORDER BY v.vend_id FOR UPDATE OF v
), moved AS (
    UPDATE vends v
    SET state = x.target,
        updated_at = now(),
        dispense = COALESCE(x.dispense, v.dispense),
        first_sent_at = CASE WHEN x.target = 'sent' THEN COALESCE(v.first_sent_at, now())
                             ELSE v.first_sent_at END,
        settled_at = CASE WHEN x.settles THEN now() ELSE v.settled_at END,
        attempts = GREATEST(v.attempts, x.attempts)
    FROM x JOIN old USING (vend_id)
    WHERE v.vend_id = x.vend_id AND v.state = ANY(string_to_array(x.allowed, ','))
    RETURNING v.*, old.state AS from_state
), history AS (
    INSERT INTO vend_transitions (vend_id, from_state, to_state, event, actor, detail)
    SELECT m.vend_id, m.from_state, m.state, x.event, x.actor, x.detail
    FROM moved m JOIN x USING (vend_id)
)
SELECT m.*, CASE WHEN x.settles AND m.from_state <> m.state
                 THEN pg_notify('vendgate_vend_settled', m.vend_id || ' ' || $10) END
FROM moved m JOIN x USING (vend_id)
"""


def _target(event: VendEvent) -> tuple[VendStatus, list[str]]:
    """Return the one state ``event`` leads to, and the states it may leave (its sources)."""
    allowed = sources(event)
    # All sources of one event lead to the same state; checked here, cheaply, so that the
    # single-statement update stays honest if the table ever changes.
    targets = {next_status(s, event) for s in allowed}
    if len(targets) != 1:  # pragma: no cover - a table error, caught by the lifecycle tests
        raise RuntimeError(f"event {event} leads to several states: {targets}")
    (target,) = targets
    assert target is not None  # noqa: S101  (sources() only lists allowed pairs)
    return target, [s.value for s in allowed]


async def apply_many(conn: Conn, moves: Sequence[Move]) -> list[VendRow | None]:
    """`apply` for vends with distinct ids, in one statement; results in ``moves`` order."""
    if len({m.vend_id for m in moves}) != len(moves):
        raise ValueError("apply_many needs distinct vend ids")
    if len({m.origin for m in moves}) > 1:
        raise ValueError("apply_many needs one origin")
    targets = [_target(m.event) for m in moves]
    records = await conn.fetch(
        _APPLY_MANY,
        [m.vend_id for m in moves],
        [t.value for t, _ in targets],
        [",".join(allowed) for _, allowed in targets],
        [None if m.dispense is None else json.dumps(m.dispense) for m in moves],
        [t.settled for t, _ in targets],
        [m.attempts for m in moves],
        [m.event.value for m in moves],
        [m.actor for m in moves],
        [None if m.detail is None else json.dumps(m.detail) for m in moves],
        moves[0].origin if moves else "",
    )
    rows: dict[str, VendRow] = {}
    webhooks: list[tuple[VendRow, str, dict[str, Any] | None]] = []
    by_id = {m.vend_id: m for m in moves}
    for record in records:
        row = VendRow.from_record(record)
        rows[row.vend_id] = row
        webhook = WEBHOOK_EVENTS.get(row.state)
        # One event per state entered.
        if webhook is not None and record["from_state"] != row.state.value:
            webhooks.append((row, webhook, by_id[row.vend_id].detail))
    if webhooks:
        await _enqueue_webhooks(conn, webhooks)
    return [rows.get(m.vend_id) for m in moves]


async def record_late_result(
    conn: Conn, vend_id: str, dispense: dict[str, Any], *, conflict: bool
) -> None:
    """Record a result that arrived after the vend was settled, before it is acknowledged.

    The vend keeps its state; the history keeps the machine's word, flagged when it
    contradicts the outcome already reported (an alarm for an operator).
    """
    await conn.execute(
        "INSERT INTO vend_transitions (vend_id, from_state, to_state, event, actor, detail) "
        "SELECT vend_id, state, state, 'late_result', 'machine', $2::jsonb "
        "FROM vends WHERE vend_id = $1",
        vend_id,
        json.dumps({"dispense": dispense, "conflict": conflict}),
    )


async def set_attempts(conn: Conn, vend_id: str, attempts: int) -> None:
    """Record that ``attempts`` Vend frames have been published (never decreases)."""
    await conn.execute(
        "UPDATE vends SET attempts = GREATEST(attempts, $2), updated_at = now() WHERE vend_id = $1",
        vend_id,
        attempts,
    )


async def get(conn: Conn, vend_id: str) -> VendRow | None:
    """Return one vend by its API id."""
    record = await conn.fetchrow("SELECT * FROM vends WHERE vend_id = $1", vend_id)
    return None if record is None else VendRow.from_record(record)


async def get_by_wire_id(conn: Conn, wire_id: int) -> VendRow | None:
    """Return one vend by its wire id."""
    record = await conn.fetchrow("SELECT * FROM vends WHERE wire_id = $1", wire_id)
    return None if record is None else VendRow.from_record(record)


async def history(conn: Conn, vend_id: str) -> list[Transition]:
    """Return a vend's transitions, oldest first."""
    records = await conn.fetch(
        "SELECT from_state, to_state, event, actor, detail, at FROM vend_transitions "
        "WHERE vend_id = $1 ORDER BY id",
        vend_id,
    )
    return [
        Transition(
            from_state=None if r["from_state"] is None else VendStatus(r["from_state"]),
            to_state=VendStatus(r["to_state"]),
            event=r["event"],
            actor=r["actor"],
            detail=json.loads(r["detail"]) if isinstance(r["detail"], str) else r["detail"],
            at=r["at"],
        )
        for r in records
    ]


async def active(conn: Conn) -> list[VendRow]:
    """Return every vend that is not final, in each machine's queue order (for recovery)."""
    records = await conn.fetch(
        "SELECT * FROM vends WHERE state = ANY($1::text[]) ORDER BY machine_id, queue_seq",
        [s.value for s in ACTIVE],
    )
    return [VendRow.from_record(r) for r in records]


async def unsettled_count(conn: Conn) -> int:
    """Return how many vends are still on their way (accepted, sent or acknowledged)."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM vends WHERE state IN ('accepted', 'sent', 'acknowledged')"
    )
    return count


async def wait_settled(conn: Conn, timeout_s: float, *, poll_s: float = 0.25) -> bool:
    """Poll until no vend is on its way any more; False if ``timeout_s`` passed first."""
    deadline = time.monotonic() + timeout_s
    while await unsettled_count(conn):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll_s)
    return True


def webhook_payload(
    row: VendRow, event_type: str, event_id: uuid.UUID, detail: dict[str, Any] | None
) -> dict[str, Any]:
    """Build the JSON body of a webhook event (documented in the README)."""
    return {
        "event_id": str(event_id),
        "type": event_type,
        "vend_id": row.vend_id,
        "machine_id": row.machine_id,
        "slot": row.slot,
        "price": row.price,
        "currency": row.currency,
        "state": row.state.value,
        "outcome": row.state.outcome,
        "refund_required": row.state.outcome == "not_dispensed",
        "dispense": row.dispense,
        "detail": detail,
        "occurred_at": row.updated_at.isoformat(),
    }


_OUTBOX_INSERT: Final = (
    "INSERT INTO webhook_outbox (event_id, vend_id, event_type, payload) "
    "VALUES ($1, $2, $3, $4::jsonb)"
)


async def _enqueue_webhooks(
    conn: Conn, events: Sequence[tuple[VendRow, str, dict[str, Any] | None]]
) -> None:
    """Queue webhook events (row, event type, detail) in one round trip (``executemany``)."""
    args = []
    for row, event_type, detail in events:
        event_id = uuid.uuid4()
        payload = webhook_payload(row, event_type, event_id, detail)
        args.append((event_id, row.vend_id, event_type, json.dumps(payload)))
    await conn.executemany(_OUTBOX_INSERT, args)
