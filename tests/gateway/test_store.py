"""Storage on a real PostgreSQL: migrations, idempotent creation, compare-and-set, group commit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from gateway.embedded import EmbeddedPostgres
from gateway.errors import DatabaseUnavailableError
from gateway.lifecycle import VendEvent, VendStatus
from gateway.store import db, machines, vends
from gateway.store.db import Conn
from gateway.store.vends import VendRequest
from gateway.store.writer import Batchable, GroupCommitter
from gateway.uplink import MachineDirectory

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


@pytest_asyncio.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(database, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await db.migrate(conn)
        await machines.register(conn, "VM-1")
    try:
        yield pool
    finally:
        await pool.close()


def _request(vend_id: str = "order-1", **changes: object) -> VendRequest:
    fields: dict[str, object] = {
        "vend_id": vend_id,
        "machine_id": "VM-1",
        "slot": 3,
        "price": 350,
        "currency": "CNY",
        "deadline": None,
    }
    fields.update(changes)
    return VendRequest(**fields)  # type: ignore[arg-type]  # test data, checked by the dataclass


DEADLINE = datetime.now(UTC) + timedelta(minutes=1)


async def test_migrations_apply_once_even_when_raced(database: str) -> None:
    """Two connections migrating at once apply every file exactly once."""
    conns = [await asyncpg.connect(database) for _ in range(2)]
    try:
        results = await asyncio.gather(*(db.migrate(c) for c in conns))
        assert sorted(results[0] + results[1]) == [m.version for m in db.migrations()]
        assert await db.migrate(conns[0]) == []
    finally:
        for conn in conns:
            await conn.close()


async def test_create_is_idempotent_and_detects_conflicts(pool: asyncpg.Pool) -> None:
    """A repeat returns the stored vend, a different body is a conflict, a stranger is unknown."""
    async with pool.acquire() as conn:
        outcome, row = await vends.create(conn, _request(), DEADLINE)
        assert outcome == "created"
        assert isinstance(row, vends.VendRow)
        assert row.state is VendStatus.ACCEPTED
        assert 0 <= row.wire_id < 2**63
        again, same = await vends.create(conn, _request(), DEADLINE + timedelta(seconds=5))
        assert again == "exists"
        assert isinstance(same, vends.VendRow)
        assert same.wire_id == row.wire_id
        assert same.deadline == row.deadline
        clash, _ = await vends.create(conn, _request(price=400), DEADLINE)
        assert clash == "conflict"
        missing, nothing = await vends.create(
            conn, _request("order-2", machine_id="VM-X"), DEADLINE
        )
        assert (missing, nothing) == ("unknown_machine", None)
        history = await vends.history(conn, "order-1")
        assert [(h.from_state, h.to_state) for h in history] == [(None, VendStatus.ACCEPTED)]


async def test_create_checks_the_slot_against_planogram_and_health(pool: asyncpg.Pool) -> None:
    """Once a planogram exists it decides slot and price; a disabled slot refuses; repeats pass."""
    async with pool.acquire() as conn:
        # No planogram, no slot row: the vend is accepted as sent.
        outcome, _ = await vends.create(conn, _request("free"), DEADLINE)
        assert outcome == "created"
        await conn.execute(
            "UPDATE machines SET config_desired = 2 WHERE machine_id = 'VM-1';"
            "INSERT INTO machine_slots (machine_id, slot, product_code, name, price, currency)"
            " VALUES ('VM-1', 3, 'P3', 'Cola', 350, 'CNY'), ('VM-1', 4, 'P4', 'Tea', 200, 'CNY')"
        )
        assert (await vends.create(conn, _request("ok"), DEADLINE))[0] == "created"
        outcome, why = await vends.create(conn, _request("cheap", price=300), DEADLINE)
        assert outcome == "price_mismatch"
        assert isinstance(why, vends.Refusal)
        assert "350 CNY in planogram version 2" in why.reason
        assert "300 CNY" in why.reason
        outcome, _ = await vends.create(conn, _request("usd", currency="USD"), DEADLINE)
        assert outcome == "price_mismatch"
        outcome, why = await vends.create(conn, _request("nine", slot=9), DEADLINE)
        assert outcome == "not_in_planogram"
        assert isinstance(why, vends.Refusal)
        await conn.execute(
            "UPDATE machine_slots SET enabled = false, disabled_reason = '3 failed dispenses'"
            " WHERE machine_id = 'VM-1' AND slot = 3"
        )
        outcome, why = await vends.create(conn, _request("late"), DEADLINE)
        assert outcome == "slot_disabled"
        assert isinstance(why, vends.Refusal)
        assert "3 failed dispenses" in why.reason
        # A backend re-sending a vend stored before the change gets the stored vend back.
        again, row = await vends.create(conn, _request("ok"), DEADLINE)
        assert again == "exists"
        assert isinstance(row, vends.VendRow)
        stored = await conn.fetchval("SELECT count(*) FROM vends")
        assert stored == 2


async def test_apply_is_compare_and_set_with_history_and_webhook(pool: asyncpg.Pool) -> None:
    """An event moves a vend once; a repeat changes nothing; final states enqueue one webhook."""
    async with pool.acquire() as conn:
        await vends.create(conn, _request(), DEADLINE)
        sent = await vends.apply(conn, "order-1", VendEvent.PUBLISHED, attempts=1)
        assert sent is not None
        assert sent.state is VendStatus.SENT
        assert sent.first_sent_at is not None
        assert await vends.apply(conn, "order-1", VendEvent.PUBLISHED) is None
        dispense = {"outcome": "dispensed", "reason": "none"}
        done = await vends.apply(conn, "order-1", VendEvent.RESULT_DISPENSED, dispense=dispense)
        assert done is not None
        assert done.state is VendStatus.DISPENSED
        assert done.dispense == dispense
        assert done.settled_at is not None
        assert await vends.apply(conn, "order-1", VendEvent.RESULT_FAILED) is None
        events = await conn.fetch("SELECT event_type, payload FROM webhook_outbox")
        assert [e["event_type"] for e in events] == ["vend.dispensed"]
        history = await vends.history(conn, "order-1")
        assert [h.to_state for h in history] == [
            VendStatus.ACCEPTED,
            VendStatus.SENT,
            VendStatus.DISPENSED,
        ]
        assert await vends.active(conn) == []


async def test_racing_gateways_apply_an_event_once(pool: asyncpg.Pool) -> None:
    """Ten connections racing to settle the same vend produce one winner and one history row."""
    async with pool.acquire() as conn:
        await vends.create(conn, _request(), DEADLINE)
        await vends.apply(conn, "order-1", VendEvent.PUBLISHED)

    async def settle(event: VendEvent) -> bool:
        async with pool.acquire() as conn, conn.transaction():
            return await vends.apply(conn, "order-1", event) is not None

    events = [VendEvent.RESULT_DISPENSED, VendEvent.RESULT_FAILED] * 5
    wins = await asyncio.gather(*(settle(e) for e in events))
    assert sum(wins) == 1
    async with pool.acquire() as conn:
        rows = await conn.fetchval(
            "SELECT count(*) FROM vend_transitions WHERE from_state = 'sent'"
        )
        outbox = await conn.fetchval("SELECT count(*) FROM webhook_outbox")
    assert rows == 1
    assert outbox == 1


async def test_operator_resolution_is_audited(pool: asyncpg.Pool) -> None:
    """Settling an unknown vend records who did it and why."""
    async with pool.acquire() as conn:
        await vends.create(conn, _request(), DEADLINE)
        await vends.apply(conn, "order-1", VendEvent.PUBLISHED)
        assert await vends.apply(conn, "order-1", VendEvent.NO_ACK) is not None
        row = await vends.apply(
            conn,
            "order-1",
            VendEvent.OPERATOR_NOT_DISPENSED,
            actor="operator:alice",
            detail={"reason": "machine opened, product still in the spiral"},
        )
        assert row is not None
        assert row.state is VendStatus.FAILED
        last = (await vends.history(conn, "order-1"))[-1]
        assert last.actor == "operator:alice"
        assert last.detail == {"reason": "machine opened, product still in the spiral"}
        types = [r["event_type"] for r in await conn.fetch("SELECT event_type FROM webhook_outbox")]
        assert types == ["vend.unknown", "vend.not_dispensed"]


async def test_active_lists_unfinished_vends_in_queue_order(pool: asyncpg.Pool) -> None:
    """Recovery reads every vend that is not final, oldest first per machine."""
    async with pool.acquire() as conn:
        for i in range(4):
            await vends.create(conn, _request(f"order-{i}"), DEADLINE)
        await vends.apply(conn, "order-0", VendEvent.PUBLISHED)
        await vends.apply(conn, "order-0", VendEvent.ACK_REFUSED)
        await vends.apply(conn, "order-1", VendEvent.PUBLISHED)
        active = await vends.active(conn)
    assert [v.vend_id for v in active] == ["order-1", "order-2", "order-3"]


async def test_group_commit_shares_transactions_and_isolates_a_bad_op(
    pool: asyncpg.Pool,
) -> None:
    """Concurrent submissions share batches; a failing op fails alone and the rest commit."""
    writer = GroupCommitter(pool, max_batch=64)
    task = asyncio.create_task(writer.run(), name="test.writer")
    try:

        async def create(i: int) -> str:
            outcome, _ = await writer.submit(
                lambda conn: vends.create(conn, _request(f"order-{i}"), DEADLINE)
            )
            return outcome

        async def bad(conn: Conn) -> None:
            await conn.execute("SELECT * FROM no_such_table")

        results = await asyncio.gather(
            *(create(i) for i in range(50)), writer.submit(bad), return_exceptions=True
        )
        assert results[:50] == ["created"] * 50
        assert isinstance(results[50], asyncpg.UndefinedTableError)
        assert writer.stats.batches < 50
        assert writer.stats.largest_batch > 1
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM vends") == 50
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_two_writers_commit_at_once_and_keep_each_vends_moves_in_order(
    pool: asyncpg.Pool,
) -> None:
    """With two writer loops, batches overlap; each caller's awaited moves stay in order.

    Forty vends each go created, sent, acknowledged, dispensed, every step awaited before
    the next (as the dispatcher does), all vends at once. The writers' transactions overlap
    (one is open while the other commits), and every vend ends dispensed with its four
    transitions in order.
    """
    with pytest.raises(ValueError, match="at least one writer"):
        GroupCommitter(pool, writers=0)
    async with pool.acquire() as conn:
        for i in range(40):
            await vends.create(conn, _request(f"order-{i}"), DEADLINE)
    writer = GroupCommitter(pool, max_batch=8, writers=2)
    open_now = 0
    overlapped = False

    async def move(conn: Conn, moves: list[vends.Move]) -> list[vends.VendRow | None]:
        nonlocal open_now, overlapped
        open_now += 1
        overlapped = overlapped or open_now > 1
        try:
            await asyncio.sleep(0.01)  # a slow statement: the other writer takes the next batch
            return await vends.apply_many(conn, moves)
        finally:
            open_now -= 1

    kind = Batchable("test_moves", move)

    async def walk(vend_id: str) -> list[VendStatus | None]:
        states = []
        for event in (VendEvent.PUBLISHED, VendEvent.ACK_ACCEPTED, VendEvent.RESULT_DISPENSED):
            row = await writer.submit_batchable(kind, vend_id, vends.Move(vend_id, event))
            states.append(None if row is None else row.state)
        return states

    task = asyncio.create_task(writer.run(), name="test.writers")
    try:
        walks = await asyncio.gather(*(walk(f"order-{i}") for i in range(40)))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert walks == [[VendStatus.SENT, VendStatus.ACKNOWLEDGED, VendStatus.DISPENSED]] * 40
    assert overlapped
    async with pool.acquire() as conn:
        steps = await conn.fetch(
            "SELECT vend_id, array_agg(to_state ORDER BY id) AS states FROM vend_transitions "
            "GROUP BY vend_id"
        )
    assert {tuple(r["states"]) for r in steps} == {
        ("accepted", "sent", "acknowledged", "dispensed")
    }


async def test_group_commit_survives_a_database_restart(
    private_pg: tuple[EmbeddedPostgres, str],
) -> None:
    """With the server down callers get a retriable error, not a hang; after a restart, it works."""
    server, dsn = private_pg
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    writer = GroupCommitter(pool)
    task = asyncio.create_task(writer.run(), name="test.writer")
    try:
        assert await writer.submit(lambda conn: conn.fetchval("SELECT 1")) == 1
        await server.stop()
        with pytest.raises(DatabaseUnavailableError) as info:
            await writer.submit(lambda conn: conn.fetchval("SELECT 1"))
        assert info.value.retriable
        await server.start()
        assert await writer.submit(lambda conn: conn.fetchval("SELECT 2")) == 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pool.terminate()


async def test_machine_directory_loads_the_registry_and_shares_one_query_per_id(
    pool: asyncpg.Pool,
) -> None:
    """load() caches every registered id; a burst of lookups for a new id makes one query."""
    writer = GroupCommitter(pool)
    directory = MachineDirectory(writer)
    assert await directory.load() == 1
    assert "VM-1" in directory.known
    async with pool.acquire() as conn:
        await machines.register(conn, "VM-2")
    queries = 0
    read = writer.read

    async def counting_read(op: Any) -> Any:
        nonlocal queries
        queries += 1
        return await read(op)

    writer.read = counting_read  # type: ignore[method-assign]
    answers = await asyncio.gather(*(directory.is_known("VM-2") for _ in range(50)))
    assert answers == [True] * 50
    assert queries == 1
    answers = await asyncio.gather(*(directory.is_known("VM-404") for _ in range(50)))
    assert answers == [False] * 50
    assert queries == 2  # and the miss is remembered for a while
    assert not await directory.is_known("VM-404")
    assert queries == 2


async def _state_of(conn: Conn) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]], int]:
    states = [
        (r["vend_id"], r["state"])
        for r in await conn.fetch("SELECT vend_id, state FROM vends ORDER BY vend_id")
    ]
    history = [
        (r["vend_id"], r["from_state"] or "", r["to_state"])
        for r in await conn.fetch(
            "SELECT vend_id, from_state, to_state FROM vend_transitions ORDER BY vend_id, id"
        )
    ]
    outbox = await conn.fetchval("SELECT count(*) FROM webhook_outbox")
    return states, history, outbox


async def test_apply_many_does_what_apply_does_one_by_one(database: str) -> None:
    """The set-based apply leaves the same states, history and outbox as apply in a loop."""
    dispensed = {"outcome": "dispensed", "reason": "none"}
    plan = [
        vends.Move("order-1", VendEvent.PUBLISHED, attempts=1),
        vends.Move("order-2", VendEvent.RESULT_DISPENSED, dispense=dispensed),  # not sent: no
        vends.Move("order-3", VendEvent.PUBLISHED, detail={"why": "test"}),
        vends.Move("order-4", VendEvent.PUBLISHED),  # no such vend
    ]
    seen = []
    for many in (False, True):
        pool = await db.create_pool(database, min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await db.migrate(conn)
                await conn.execute("TRUNCATE machines, vends CASCADE")
                await machines.register(conn, "VM-1")
                for i in (1, 2, 3):
                    await vends.create(conn, _request(f"order-{i}"), DEADLINE)
                async with conn.transaction():
                    if many:
                        rows = await vends.apply_many(conn, plan)
                        settled = await vends.apply_many(
                            conn,
                            [vends.Move("order-1", VendEvent.RESULT_DISPENSED, dispense=dispensed)],
                        )
                    else:
                        rows = [
                            await vends.apply(
                                conn,
                                m.vend_id,
                                m.event,
                                detail=m.detail,
                                dispense=m.dispense,
                                attempts=m.attempts,
                            )
                            for m in plan
                        ]
                        settled = [
                            await vends.apply(
                                conn, "order-1", VendEvent.RESULT_DISPENSED, dispense=dispensed
                            )
                        ]
                assert [r is not None for r in rows] == [True, False, True, False]
                assert settled[0] is not None
                assert settled[0].state is VendStatus.DISPENSED
                seen.append(await _state_of(conn))
        finally:
            await pool.close()
    assert seen[0] == seen[1]
    assert seen[1][2] == 1  # one webhook: order-1 dispensed
    with pytest.raises(ValueError, match="distinct"):
        await vends.apply_many(None, [plan[0], plan[0]])  # type: ignore[arg-type]


async def test_batchable_ops_share_one_statement_and_keep_per_key_order(
    pool: asyncpg.Pool,
) -> None:
    """Moves of many vends in one batch make one run_many call; a repeated key waits its turn.

    Their ``after`` follow-ups run in one call per segment too, after the segment's moves,
    with (argument, result) pairs, and not for an operation whose result is None.
    """
    async with pool.acquire() as conn:
        for i in range(10):
            await vends.create(conn, _request(f"order-{i}"), DEADLINE)
    calls: list[int] = []
    afters: list[list[tuple[str, str]]] = []

    async def many(conn: Conn, moves: list[vends.Move]) -> list[vends.VendRow | None]:
        calls.append(len(moves))
        return await vends.apply_many(conn, moves)

    async def follow(conn: Conn, pairs: list[tuple[str, vends.VendRow]]) -> list[None]:
        # In the same transaction: the move is visible, not yet committed.
        states = [
            await conn.fetchval("SELECT state FROM vends WHERE vend_id = $1", row.vend_id)
            for _, row in pairs
        ]
        assert states == [row.state.value for _, row in pairs]
        afters.append([(arg, row.vend_id) for arg, row in pairs])
        return [None] * len(pairs)

    kind = Batchable("test_moves", many)
    then = Batchable("test_after", follow)
    writer = GroupCommitter(pool, max_batch=64)
    sent = [
        writer.submit_batchable(
            kind,
            f"order-{i}",
            vends.Move(f"order-{i}", VendEvent.PUBLISHED),
            after=(then, f"arg-{i}") if i % 2 else None,
        )
        for i in range(10)
    ]
    # The same vend again, in the same batch: it must run after its first move.
    again = writer.submit_batchable(
        kind, "order-0", vends.Move("order-0", VendEvent.ACK_ACCEPTED), after=(then, "again")
    )
    # A move the state does not allow: no result, so no follow-up.
    refused = writer.submit_batchable(
        kind, "order-1", vends.Move("order-1", VendEvent.PUBLISHED), after=(then, "refused")
    )
    futures = [asyncio.ensure_future(c) for c in [*sent, again, refused]]
    await asyncio.sleep(0)  # all queued before the writer takes its first batch
    task = asyncio.create_task(writer.run(), name="test.writer")
    try:
        rows = await asyncio.gather(*futures)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert all(r is not None for r in rows[:-1])
    assert rows[-2] is not None
    assert rows[-2].state is VendStatus.ACKNOWLEDGED
    assert rows[-1] is None
    assert writer.stats.batches == 1
    assert calls == [10, 2]
    assert afters == [
        [(f"arg-{i}", f"order-{i}") for i in range(1, 10, 2)],
        [("again", "order-0")],
    ]


async def test_create_many_answers_as_create_does(pool: asyncpg.Pool) -> None:
    """New vends in one statement; repeats, conflicts and unknown machines as `create` says."""
    async with pool.acquire() as conn:
        assert (await vends.create(conn, _request("order-old"), DEADLINE))[0] == "created"
        answers = await vends.create_many(
            conn,
            [
                (_request("order-a"), DEADLINE),
                (_request("order-old"), DEADLINE),  # the same request again
                (_request("order-b", machine_id="VM-404"), DEADLINE),
                (_request("order-c"), DEADLINE),
            ],
        )
        assert [outcome for outcome, _ in answers] == [
            "created",
            "exists",
            "unknown_machine",
            "created",
        ]
        conflict = await vends.create_many(conn, [(_request("order-a", slot=9), DEADLINE)])
        assert conflict[0][0] == "conflict"
        rows = await conn.fetch(
            "SELECT vend_id FROM vends WHERE machine_id = 'VM-1' ORDER BY queue_seq"
        )
        assert [r["vend_id"] for r in rows] == ["order-old", "order-a", "order-c"]
        created = await conn.fetchval(
            "SELECT count(*) FROM vend_transitions WHERE event = 'created'"
        )
        assert created == 3
