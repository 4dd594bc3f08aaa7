"""Telemetry ingest on real PostgreSQL: rows, dedup, batching, backpressure, outages, partitions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from gateway.config import TelemetryConfig
from gateway.embedded import EmbeddedPostgres
from gateway.errors import ShuttingDownError
from gateway.store import db, partitions
from gateway.store.dispenses import record_dispense
from gateway.store.telemetry import InvalidFrameError, encode_frame
from gateway.telemetry import BulkHistogram, TelemetryIngest, TelemetryMetrics
from protocols.frames import Dispense, Event, FailReason, Outcome, Reading, ReadingKind, Telemetry
from tests.pgfaults import paused

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

NOON = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC)
T0_MS = 1_795_000_000_000
TABLES = partitions.PARTITIONED_TABLES


class Clock:
    """A settable unix clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        """Return the time set."""
        return self.now

    def set_day(self, day: date) -> None:
        """Move to noon UTC (and some microseconds) of ``day``."""
        self.now = datetime.combine(day, NOON.timetz()).timestamp()


def settings(**changes: object) -> TelemetryConfig:
    return replace(TelemetryConfig(batch_rows=1000, max_age_s=0.01), **changes)  # type: ignore[arg-type]  # test overrides, checked by the dataclass


def frame(seq: int, *, readings: int = 3, events: int = 0, boot: int = 7) -> Telemetry:
    return Telemetry(
        boot,
        seq,
        T0_MS + seq,
        tuple(
            Reading(10 * i, ReadingKind(1 + i % 3), None if i % 2 else i, 100 * seq + i)
            for i in range(readings)
        ),
        tuple(Event(5 * i, "EJC", i if i % 2 else None, active=i % 2 == 0) for i in range(events)),
    )


def make_ingest(
    pool: asyncpg.Pool,
    config: TelemetryConfig | None = None,
    clock: Clock | None = None,
    **kwargs: object,
) -> tuple[TelemetryIngest, CollectorRegistry]:
    registry = CollectorRegistry()
    ingest = TelemetryIngest(
        pool,
        config or settings(),
        TelemetryMetrics(registry),
        clock=clock or Clock(NOON.timestamp()),
        retry_base_s=0.02,
        retry_exponent_cap=4,
        **kwargs,  # type: ignore[arg-type]  # flushers and the like, per test
    )
    return ingest, registry


@contextlib.asynccontextmanager
async def running(ingest: TelemetryIngest) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(ingest.run(), name="test.telemetry.run")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def counts(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> dict[str, int]:
    return {
        table: await conn.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608  (fixed names)
        for table in ("telemetry_readings", "telemetry_events", "telemetry_frames")
    }


async def duplicated_rows(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> int:
    total = 0
    for table in ("telemetry_readings", "telemetry_events"):
        total += await conn.fetchval(
            f"""SELECT count(*) FROM (SELECT 1 FROM {table}
                 GROUP BY machine_id, boot, seq, idx HAVING count(*) > 1) d"""  # noqa: S608  (fixed names)
        )
    return total


async def partition_names(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> set[str]:
    rows = await conn.fetch(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = ANY($1::text[]::regclass[])""",
        list(TABLES),
    )
    return {row[0] for row in rows}


@pytest_asyncio.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(database, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await db.migrate(conn)
    try:
        yield pool
    finally:
        await pool.close()


# --- rows ----------------------------------------------------------------------------------------


async def test_rows_land_with_their_values(pool: asyncpg.Pool) -> None:
    """Readings then events get idx 0..n-1, at = t0 + dt, received_at = the gateway clock."""
    ingest, registry = make_ingest(pool)
    telemetry = Telemetry(
        3,
        41,
        T0_MS,
        (
            Reading(0, ReadingKind.TEMPERATURE, None, -1234),
            Reading(250, ReadingKind.STOCK, 12, 7),
            Reading(4_294_967_295, ReadingKind.RSSI, None, -71),
        ),
        (Event(1000, "EGS", None, active=True), Event(1500, "XSD", 12, active=False)),
    )
    async with running(ingest), asyncio.timeout(10):
        await ingest.submit("VM-1", telemetry)
    async with pool.acquire() as conn:
        readings = await conn.fetch("SELECT * FROM telemetry_readings ORDER BY idx")
        events = await conn.fetch("SELECT * FROM telemetry_events ORDER BY idx")
        ledger = await conn.fetch("SELECT machine_id, boot, seq FROM telemetry_frames")
    t0 = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=T0_MS)
    key = (NOON, "VM-1", 3, 41)
    assert [tuple(r) for r in readings] == [
        (*key, 0, t0, 1, None, -1234),
        (*key, 1, t0 + timedelta(milliseconds=250), 2, 12, 7),
        (*key, 2, t0 + timedelta(milliseconds=4_294_967_295), 3, None, -71),
    ]
    assert [tuple(r) for r in events] == [
        (*key, 3, t0 + timedelta(seconds=1), "EGS", None, True),
        (*key, 4, t0 + timedelta(milliseconds=1500), "XSD", 12, False),
    ]
    assert [tuple(r) for r in ledger] == [("VM-1", 3, 41)]
    assert sample(registry, "vendgate_telemetry_rows_total", table="telemetry_readings") == 3
    assert sample(registry, "vendgate_telemetry_rows_total", table="telemetry_events") == 2
    assert sample(registry, "vendgate_telemetry_frames_total") == 1
    assert sample(registry, "vendgate_telemetry_lag_seconds_count") == 1
    assert sample(registry, "vendgate_telemetry_queue_messages") == 0


async def test_empty_frames_are_recorded_without_rows(pool: asyncpg.Pool) -> None:
    """A frame with no readings and no events is answered and enters the ledger only."""
    ingest, _ = make_ingest(pool)
    async with running(ingest), asyncio.timeout(10):
        await asyncio.gather(*(ingest.submit("VM-1", frame(s, readings=0)) for s in range(3)))
    async with pool.acquire() as conn:
        assert await counts(conn) == {
            "telemetry_readings": 0,
            "telemetry_events": 0,
            "telemetry_frames": 3,
        }


async def test_many_machines_and_frames_all_land_once(pool: asyncpg.Pool) -> None:
    """Frames from many concurrent submitters all land, in several batches, each row once."""
    ingest, registry = make_ingest(pool, settings(batch_rows=200))
    frames = [(f"VM-{m}", frame(s, readings=4, events=s % 3)) for m in range(20) for s in range(30)]
    async with running(ingest), asyncio.timeout(20):
        await asyncio.gather(*(ingest.submit(m, f) for m, f in frames))
    async with pool.acquire() as conn:
        assert await counts(conn) == {
            "telemetry_readings": 4 * 600,
            "telemetry_events": 20 * sum(s % 3 for s in range(30)),
            "telemetry_frames": 600,
        }
        assert await duplicated_rows(conn) == 0
    assert sample(registry, "vendgate_telemetry_batches_total") > 1


# --- dedup ---------------------------------------------------------------------------------------


async def test_duplicates_in_one_batch_and_across_batches_add_no_rows(pool: asyncpg.Pool) -> None:
    """A frame repeated in the same batch, and redelivered in a later one, is written once."""
    ingest, registry = make_ingest(pool, settings(max_age_s=0.05))
    async with running(ingest), asyncio.timeout(10):
        await asyncio.gather(
            ingest.submit("VM-1", frame(1, events=1)),
            ingest.submit("VM-1", frame(1, events=1)),
            ingest.submit("VM-1", frame(2)),
        )
        assert sample(registry, "vendgate_telemetry_batches_total") == 1
        await ingest.submit("VM-1", frame(1, events=1))
        await ingest.submit("VM-2", frame(1, events=1))  # same boot/seq, other machine: new
    async with pool.acquire() as conn:
        assert await counts(conn) == {
            "telemetry_readings": 9,
            "telemetry_events": 2,
            "telemetry_frames": 3,
        }
        assert await duplicated_rows(conn) == 0
    assert sample(registry, "vendgate_telemetry_duplicate_frames_total") == 2
    assert sample(registry, "vendgate_telemetry_frames_total") == 3


class _LosesCommitOutcome(TelemetryIngest):
    """Commits its first batch, then reports it lost, as a connection dying in COMMIT would."""

    lost = 0

    async def _commit(self, batch: list[tuple[object, ...]]) -> None:  # type: ignore[override]  # test hook
        await super()._commit(batch)  # type: ignore[arg-type]  # test hook
        if not self.lost:
            self.lost += 1
            raise ConnectionResetError("connection lost after COMMIT was sent")


async def test_retry_after_a_lost_commit_adds_no_rows(pool: asyncpg.Pool) -> None:
    """A batch retried after its commit outcome was lost finds its frames in the ledger."""
    registry = CollectorRegistry()
    ingest = _LosesCommitOutcome(
        pool, settings(), TelemetryMetrics(registry), retry_base_s=0.01, retry_exponent_cap=1
    )
    async with running(ingest), asyncio.timeout(10):
        await asyncio.gather(*(ingest.submit("VM-1", frame(s, events=1)) for s in range(5)))
    assert ingest.lost == 1
    async with pool.acquire() as conn:
        assert await counts(conn) == {
            "telemetry_readings": 15,
            "telemetry_events": 5,
            "telemetry_frames": 5,
        }
    assert sample(registry, "vendgate_telemetry_flush_retries_total") == 1
    assert sample(registry, "vendgate_telemetry_duplicate_frames_total") == 5


# --- batching ------------------------------------------------------------------------------------


async def test_a_full_batch_is_flushed_without_waiting_for_its_age(pool: asyncpg.Pool) -> None:
    """Reaching batch_rows flushes at once; fewer rows wait for max_age_s."""
    ingest, registry = make_ingest(pool, settings(batch_rows=8, max_age_s=60))
    async with running(ingest):
        alone = asyncio.create_task(ingest.submit("VM-1", frame(1, readings=4)))
        await asyncio.sleep(0.3)
        assert not alone.done()
        async with asyncio.timeout(5):
            await asyncio.gather(alone, ingest.submit("VM-1", frame(2, readings=4)))
    assert sample(registry, "vendgate_telemetry_batches_total") == 1


async def test_a_batch_is_flushed_when_its_oldest_row_reaches_max_age(pool: asyncpg.Pool) -> None:
    """A batch short of batch_rows is written once its first message has waited max_age_s."""
    ingest, registry = make_ingest(pool, settings(batch_rows=10_000, max_age_s=0.3))
    async with running(ingest):
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.create_task(ingest.submit("VM-1", frame(1)))
        await asyncio.sleep(0.1)
        async with asyncio.timeout(5):
            await asyncio.gather(first, ingest.submit("VM-1", frame(2)))
        waited = loop.time() - started
    assert 0.29 <= waited < 2
    assert sample(registry, "vendgate_telemetry_batches_total") == 1


async def test_drain_flushes_without_waiting_for_the_age(pool: asyncpg.Pool) -> None:
    """drain() writes what is queued now and returns when every caller is answered."""
    ingest, _ = make_ingest(pool, settings(max_age_s=60))
    async with running(ingest):
        submits = [asyncio.create_task(ingest.submit("VM-1", frame(s))) for s in range(4)]
        await asyncio.sleep(0.05)
        async with asyncio.timeout(5):
            await ingest.drain()
        # Answered: a caller of submit() resumes within two loop iterations (the group's
        # future, then the shield around it).
        for _ in range(2):
            await asyncio.sleep(0)
        assert all(s.done() for s in submits)
    assert ingest.depth == 0


async def test_submitters_wait_for_room_and_nothing_is_dropped(pool: asyncpg.Pool) -> None:
    """With queue_messages full, submit waits instead of growing the queue; all land later."""
    ingest, registry = make_ingest(pool, settings(queue_messages=3))
    submits = [asyncio.create_task(ingest.submit("VM-1", frame(s))) for s in range(10)]
    await asyncio.sleep(0.1)  # no flusher yet: the queue fills and stays full
    assert ingest.depth == 3
    assert sample(registry, "vendgate_telemetry_queue_messages") == 3
    assert sample(registry, "vendgate_telemetry_waiting_submitters") == 7
    assert not any(s.done() for s in submits)
    async with running(ingest), asyncio.timeout(10):
        await asyncio.gather(*submits)
    async with pool.acquire() as conn:
        assert (await counts(conn))["telemetry_frames"] == 10
    assert sample(registry, "vendgate_telemetry_waiting_submitters") == 0


async def test_stopping_the_flusher_fails_waiting_callers_retriably(pool: asyncpg.Pool) -> None:
    """Cancelling run() answers every waiting caller with ShuttingDownError; later submits too."""
    ingest, _ = make_ingest(pool, settings(max_age_s=60, queue_messages=2))
    async with running(ingest):
        submits = [asyncio.create_task(ingest.submit("VM-1", frame(s))) for s in range(3)]
        await asyncio.sleep(0.05)
    results = await asyncio.gather(*submits, return_exceptions=True)
    assert all(isinstance(r, ShuttingDownError) for r in results)
    with pytest.raises(ShuttingDownError):
        await ingest.submit("VM-1", frame(9))


# --- bad input -----------------------------------------------------------------------------------


async def test_a_frame_the_database_rejects_is_dropped_and_the_rest_commit(
    pool: asyncpg.Pool,
) -> None:
    """A frame PostgreSQL refuses (NUL in text) is isolated and dropped; its batch still lands."""
    ingest, registry = make_ingest(pool, settings(max_age_s=0.1))
    bad = replace(frame(5, events=1), events=(Event(0, "E\x00J", None, active=True),))
    frames = [frame(s, events=1) for s in range(5)] + [bad] + [frame(s) for s in range(6, 12)]
    async with running(ingest), asyncio.timeout(10):
        await asyncio.gather(*(ingest.submit("VM-1", f) for f in frames))
        await ingest.submit("VM-1", frame(12))  # and ingestion goes on
    async with pool.acquire() as conn:
        seqs = await conn.fetch("SELECT seq FROM telemetry_frames ORDER BY seq")
        assert [r[0] for r in seqs] == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]
        assert await conn.fetchval("SELECT count(*) FROM telemetry_readings WHERE seq = 5") == 0
        assert (await counts(conn))["telemetry_readings"] == 12 * 3
    assert sample(registry, "vendgate_telemetry_bad_frames_total", reason="rejected") == 1
    assert sample(registry, "vendgate_telemetry_flush_failures_total", reason="rejected") >= 1


async def test_a_schema_error_holds_the_batch_until_it_is_fixed(pool: asyncpg.Pool) -> None:
    """An error any frame would hit (a missing table) drops nothing: the batch waits, retried."""
    ingest, registry = make_ingest(pool)
    async with pool.acquire() as conn:
        await conn.execute("ALTER TABLE telemetry_events RENAME TO telemetry_events_away")
    async with running(ingest):
        submits = [asyncio.create_task(ingest.submit("VM-1", frame(s, events=1))) for s in range(4)]
        async with asyncio.timeout(10):
            # Polls a metric: there is nothing to wait on.
            while sample(registry, "vendgate_telemetry_flush_failures_total", reason="error") < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert not any(s.done() for s in submits)
        async with pool.acquire() as conn:
            await conn.execute("ALTER TABLE telemetry_events_away RENAME TO telemetry_events")
        async with asyncio.timeout(10):
            await asyncio.gather(*submits)
    async with pool.acquire() as conn:
        assert await counts(conn) == {
            "telemetry_readings": 12,
            "telemetry_events": 4,
            "telemetry_frames": 4,
        }
    assert sample(registry, "vendgate_telemetry_bad_frames_total", reason="rejected") == 0


async def test_a_frame_with_unstorable_values_is_dropped_at_once(pool: asyncpg.Pool) -> None:
    """Values beyond their columns (or a datetime) are refused before queueing, and acked."""
    ingest, registry = make_ingest(pool)
    too_big = replace(frame(1), readings=(Reading(0, ReadingKind.STOCK, 1, 2**40),))
    far_future = replace(frame(2), t0_ms=2**63)
    async with running(ingest), asyncio.timeout(10):
        await ingest.submit("VM-1", too_big)
        await ingest.submit("VM-1", far_future)
        await ingest.submit("VM-1", frame(3))
    async with pool.acquire() as conn:
        assert (await counts(conn))["telemetry_frames"] == 1
    assert sample(registry, "vendgate_telemetry_bad_frames_total", reason="invalid") == 2
    with pytest.raises(InvalidFrameError):
        encode_frame(0.0, "VM-1", too_big)


# --- partitions ----------------------------------------------------------------------------------


async def test_ingest_makes_a_missing_partition_and_remakes_a_vanished_one(
    pool: asyncpg.Pool,
) -> None:
    """The ingest creates its day's partition, and recovers when one is dropped behind it."""
    clock = Clock(NOON.timestamp())
    ingest, registry = make_ingest(pool, clock=clock)
    async with running(ingest), asyncio.timeout(10):
        await ingest.submit("VM-1", frame(1))
        async with pool.acquire() as conn:
            assert "telemetry_readings_p20261126" in await partition_names(conn)
            await conn.execute("DROP TABLE telemetry_readings_p20261126")
        await ingest.submit("VM-1", frame(2))
    async with pool.acquire() as conn:
        assert (await counts(conn))["telemetry_readings"] == 3
    failures = sample(
        registry, "vendgate_telemetry_flush_failures_total", reason="missing_partition"
    )
    assert failures == 1


async def test_partition_bounds_are_utc_days(pool: asyncpg.Pool) -> None:
    """A partition holds [day 00:00 UTC, next day 00:00 UTC), whatever the session time zone."""
    async with pool.acquire() as conn:
        await conn.execute("SET TimeZone = 'Asia/Shanghai'")
        day = date(2026, 3, 4)
        created = await partitions.ensure(conn, [day, day + timedelta(days=1)])
        assert sorted(created) == sorted(
            partitions.partition_name(t, d) for t in TABLES for d in (day, day + timedelta(days=1))
        )
        assert await partitions.ensure(conn, [day]) == []
        midnight = datetime(2026, 3, 5, tzinfo=UTC)
        for at in (midnight - timedelta(microseconds=1), midnight):
            await conn.execute(
                "INSERT INTO dispenses (recorded_at, vend_id, machine_id, slot, outcome, reason,"
                " drop_detected, motor_ms, retries) VALUES ($1, 'v', 'VM-1', 1, 'dispensed',"
                " 'none', true, 1, 0)",
                at,
            )
        placed = await conn.fetch(
            "SELECT tableoid::regclass::text FROM dispenses ORDER BY recorded_at"
        )
        assert [r[0] for r in placed] == ["dispenses_p20260304", "dispenses_p20260305"]
        await conn.execute("RESET TimeZone")


@pytest.mark.usefixtures("pool")  # migrated
async def test_concurrent_ensures_do_not_collide(database: str) -> None:
    """Several gateways ensuring the same days at once all succeed; each partition is made once."""
    conns = [await asyncpg.connect(database) for _ in range(4)]
    try:
        days = [date(2026, 5, 1) + timedelta(days=n) for n in range(3)]
        results = await asyncio.gather(*(partitions.ensure(c, days) for c in conns))
    finally:
        for c in conns:
            await c.close()
    made = [name for result in results for name in result]
    assert sorted(made) == sorted(partitions.partition_name(t, d) for t in TABLES for d in days)


async def test_retention_drops_exactly_the_expired_partitions(pool: asyncpg.Pool) -> None:
    """Maintenance drops whole partitions older than the retention and trims the ledger."""
    today = date(2026, 11, 26)
    clock = Clock(0.0)
    registry = CollectorRegistry()
    metrics = TelemetryMetrics(registry)
    config = settings(retention_days=3)
    async with pool.acquire() as conn:
        await partitions.ensure(conn, [today + timedelta(days=n) for n in range(-6, 3)])
        before = await partition_names(conn)
    assert len(before) == 9 * 3
    ingest = TelemetryIngest(pool, config, metrics, clock=clock)
    async with running(ingest), asyncio.timeout(20):
        for offset in range(-6, 1):
            clock.set_day(today + timedelta(days=offset))
            await ingest.submit("VM-1", frame(offset + 100))
    clock.set_day(today)
    keeper = partitions.PartitionKeeper(pool, config, metrics, clock=clock)
    result = await keeper.run_once()
    old_days = [today - timedelta(days=n) for n in (4, 5, 6)]
    expired = {partitions.partition_name(t, d) for t in TABLES for d in old_days}
    assert result.created == ()
    assert set(result.dropped) == expired
    assert result.ledger_trimmed == 5
    async with pool.acquire() as conn:
        assert await partition_names(conn) == before - expired
        seqs = await conn.fetch("SELECT DISTINCT seq FROM telemetry_readings ORDER BY seq")
        assert [r[0] for r in seqs] == [97, 98, 99, 100]  # the frames of days -3..0
        ledger = await conn.fetch("SELECT seq FROM telemetry_frames ORDER BY seq")
        assert [r[0] for r in ledger] == [99, 100]  # received since midnight of yesterday
        again = await partitions.drop_expired(conn, 3, today)
        assert (again.dropped, again.ledger_trimmed) == ((), 0)
    assert sample(registry, "vendgate_partitions_dropped_total", table="dispenses") == 3
    assert sample(registry, "vendgate_telemetry_ledger_trimmed_total") == 5


async def test_keeper_follows_the_clock_across_midnight(pool: asyncpg.Pool) -> None:
    """The keeper runs at start and every interval, making the new day's partitions."""
    today = date(2026, 11, 26)
    clock = Clock(0.0)
    clock.set_day(today)
    registry = CollectorRegistry()
    keeper = partitions.PartitionKeeper(
        pool,
        settings(maintenance_interval_s=1, retention_days=1),
        TelemetryMetrics(registry),
        clock=clock,
    )
    task = asyncio.create_task(keeper.run(), name="test.partitions.keeper")
    try:
        async with asyncio.timeout(10):
            target = partitions.partition_name("dispenses", today + timedelta(days=2))
            await eventually(lambda names: target in names, pool)
            clock.set_day(today + timedelta(days=3))
            expected = partitions.partition_name("dispenses", today + timedelta(days=5))
            gone = partitions.partition_name("dispenses", today)
            await eventually(lambda names: expected in names and gone not in names, pool)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert sample(registry, "vendgate_partitions_dropped_total", table="dispenses") >= 1


async def eventually(predicate: Callable[[set[str]], bool], pool: asyncpg.Pool) -> None:
    """Poll the partition names until ``predicate`` holds for them."""
    while True:
        async with pool.acquire() as conn:
            if predicate(await partition_names(conn)):
                return
        await asyncio.sleep(0.05)


# --- dispenses -----------------------------------------------------------------------------------


async def test_record_dispense_makes_the_partition_if_maintenance_fell_behind(
    pool: asyncpg.Pool,
) -> None:
    """record_dispense inserts one row in the caller's transaction, making today's partition."""
    dispense = Dispense(Outcome.FAILED, FailReason.JAM, False, 1840, 2)  # noqa: FBT003  (positional record)
    async with pool.acquire() as conn:
        for late in (False, True):
            async with conn.transaction():
                await record_dispense(
                    conn, vend_id="order-1", machine_id="VM-1", slot=4, dispense=dispense, late=late
                )
        rows = await conn.fetch(
            "SELECT vend_id, machine_id, slot, outcome, reason, drop_detected, motor_ms,"
            " retries, late FROM dispenses ORDER BY late"
        )
        assert [tuple(r) for r in rows] == [
            ("order-1", "VM-1", 4, "failed", "jam", False, 1840, 2, False),
            ("order-1", "VM-1", 4, "failed", "jam", False, 1840, 2, True),
        ]
        today = await conn.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
        assert partitions.partition_name("dispenses", today) in await partition_names(conn)


# --- database outages ----------------------------------------------------------------------------


async def test_a_paused_database_holds_callers_and_loses_nothing(
    private_pg: tuple[EmbeddedPostgres, str],
) -> None:
    """With PostgreSQL stopped by SIGSTOP, submits wait (queue > 0); after SIGCONT all land once."""
    server, dsn = private_pg
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        ingest, registry = make_ingest(pool, clock=Clock(datetime.now(UTC).timestamp()))
        async with running(ingest):
            async with asyncio.timeout(10):
                await ingest.submit("VM-1", frame(0))
            with paused(server):
                submits = [
                    asyncio.create_task(ingest.submit(f"VM-{s % 3}", frame(s, events=s % 2)))
                    for s in range(1, 61)
                ]
                await asyncio.sleep(1.5)
                assert not any(s.done() for s in submits)
                assert sample(registry, "vendgate_telemetry_queue_messages") == 60
            async with asyncio.timeout(20):
                await asyncio.gather(*submits)
        async with pool.acquire() as conn:
            assert await counts(conn) == {
                "telemetry_readings": 61 * 3,
                "telemetry_events": 30,
                "telemetry_frames": 61,
            }
            assert await duplicated_rows(conn) == 0
    finally:
        await pool.close()


async def test_a_restarted_database_is_reconnected_and_loses_nothing(
    private_pg: tuple[EmbeddedPostgres, str],
) -> None:
    """With PostgreSQL stopped, batches are retried; after a restart the pool reconnects."""
    server, dsn = private_pg
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        ingest, registry = make_ingest(pool, clock=Clock(datetime.now(UTC).timestamp()))
        async with running(ingest):
            async with asyncio.timeout(10):
                await ingest.submit("VM-1", frame(0))
            await server.stop()
            submits = [
                asyncio.create_task(ingest.submit("VM-1", frame(s, events=1))) for s in range(1, 41)
            ]
            async with asyncio.timeout(10):
                # Polls a metric: there is nothing to wait on.
                while sample(registry, "vendgate_telemetry_flush_retries_total") < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert not any(s.done() for s in submits)
            assert await server.start() == dsn
            async with asyncio.timeout(30):
                await asyncio.gather(*submits)
        async with pool.acquire() as conn:
            assert await counts(conn) == {
                "telemetry_readings": 41 * 3,
                "telemetry_events": 40,
                "telemetry_frames": 41,
            }
            assert await duplicated_rows(conn) == 0
        failures = sample(registry, "vendgate_telemetry_flush_failures_total", reason="unavailable")
        assert failures >= 2
    finally:
        await pool.close()


# --- metrics -------------------------------------------------------------------------------------


async def test_bulk_histogram_counts_like_a_prometheus_histogram() -> None:
    """observe_many puts each value in the first bucket whose bound is >= it (le is inclusive)."""
    registry = CollectorRegistry()
    histogram = BulkHistogram("t_lag_seconds", "test", (0.1, 1.0), registry)
    histogram.observe_many([0.05, 0.1, 0.5, 1.0, 7.0])
    assert registry.get_sample_value("t_lag_seconds_bucket", {"le": "0.1"}) == 2
    assert registry.get_sample_value("t_lag_seconds_bucket", {"le": "1.0"}) == 4
    assert registry.get_sample_value("t_lag_seconds_bucket", {"le": "+Inf"}) == 5
    assert registry.get_sample_value("t_lag_seconds_count") == 5
    assert registry.get_sample_value("t_lag_seconds_sum") == pytest.approx(8.65)
