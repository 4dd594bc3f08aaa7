"""ConfigSync on real PostgreSQL with a recording link: when Config is sent, what is recorded."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import cast

import prometheus_client
import pytest
import pytest_asyncio
import structlog

from gateway.config import PlanogramConfig
from gateway.configsync import ConfigSync, PlanogramMetrics
from gateway.store import planograms
from gateway.store.db import Conn
from gateway.store.writer import GroupCommitter
from protocols.frames import ConfigStatus, SlotConfig
from tests.gateway.planogram_harness import (
    CONCURRENCY,
    MACHINE,
    RESEND_S,
    TIMEOUT_S,
    Env,
    FakeLink,
    planogram_body,
    serve,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

PLANOGRAM = f"/v1/machines/{MACHINE}/planogram"
FLEET = 5_000
SLOTS_JSON = json.dumps(
    [
        {
            "slot": 1,
            "product_code": "P-001",
            "name": "Water",
            "price": 200,
            "capacity": 8,
            "drop_sensor": True,
        }
    ]
)


@pytest_asyncio.fixture
async def env(database: str) -> AsyncIterator[Env]:
    async with serve(database, machines=(MACHINE, "VM-2")) as running:
        running.link.online.discard("VM-2")
        yield running


async def _set(env: Env, *slots: int, machine_id: str = MACHINE) -> int:
    status, view = await env.put(planogram_body(*slots), machine_id=machine_id)
    assert status == 201, view
    version: int = view["desired_version"]
    return version


async def _row(env: Env, machine_id: str = MACHINE) -> planograms.SyncRow:
    async with env.pool.acquire() as conn:
        row = await planograms.sync_row(conn, machine_id)
    assert row is not None
    return row


async def test_new_version_is_pushed_to_online_machines_and_on_hello(env: Env) -> None:
    """An online machine gets a new version at once; an offline one when its Hello comes."""
    await _set(env, 1, 2)
    await _set(env, 1, machine_id="VM-2")
    await env.until(lambda: len(env.link.configs()) == 1, "the push")
    await env.settle()
    assert env.link.configs("VM-2") == []
    assert (await _row(env)).sent_at is not None
    assert (await _row(env, "VM-2")).sent_at is None

    env.link.online.add("VM-2")
    await env.sync.on_frame("VM-2", env.hello(0))
    await env.until(lambda: len(env.link.configs("VM-2")) == 1, "the push on Hello")
    expected = SlotConfig(1, "P-001", "Product 1", 301, 8, drop_sensor=True)
    assert env.link.configs("VM-2")[0].slots == (expected,)
    assert env.metric("vendgate_config_pushes_total", {"trigger": "hello"}) == 1
    assert env.metric("vendgate_config_pushes_total", {"trigger": "new_version"}) == 1


async def test_hello_with_an_older_version_pushes_and_with_the_current_one_does_not(
    env: Env,
) -> None:
    """Hello reporting the desired version sends nothing; an older version is sent Config again."""
    await _set(env, 1)
    await env.until(lambda: len(env.link.configs()) == 1, "the push")
    await env.sync.on_frame(MACHINE, env.ack(1, ConfigStatus.APPLIED, 1))
    await env.sync.on_frame(MACHINE, env.hello(1))
    await env.settle()
    assert len(env.link.configs()) == 1

    # Right after a push: a Hello means a new connection, which may have lost it.
    await env.sync.on_frame(MACHINE, env.hello(0, boot=2))
    await env.until(lambda: len(env.link.configs()) == 2, "the push on Hello")
    assert (await _row(env)).reported == 0


async def test_applied_ack_records_the_version_and_in_sync(env: Env) -> None:
    """ConfigAck APPLIED records the reported version and status; the machine is in sync."""
    await _set(env, 1)
    await env.until(lambda: len(env.link.configs()) == 1, "the push")
    assert env.metric("vendgate_config_out_of_sync_machines") == 1
    await env.sync.on_frame(MACHINE, env.ack(1, ConfigStatus.APPLIED, 1))
    row = await _row(env)
    assert (row.desired, row.reported, row.status, row.in_sync) == (1, 1, "applied", True)
    assert env.metric("vendgate_config_out_of_sync_machines") == 0
    assert env.metric("vendgate_config_acks_total", {"status": "applied"}) == 1
    _, view = await env.get(PLANOGRAM)
    assert view["in_sync"] is True


async def test_invalid_ack_is_recorded_and_not_resent_in_a_tight_loop(env: Env) -> None:
    """INVALID stays visible, is logged as an error, and is re-sent only on the schedule."""
    await _set(env, 1)
    await env.until(lambda: len(env.link.configs()) == 1, "the push")
    await env.settle()
    with structlog.testing.capture_logs() as logs:
        await env.sync.on_frame(MACHINE, env.ack(1, ConfigStatus.INVALID, 0))
        await env.sync.on_frame(MACHINE, env.ack(1, ConfigStatus.INVALID, 0))
    assert [e["log_level"] for e in logs if e["event"] == "config_invalid"] == ["error"]
    row = await _row(env)
    assert (row.reported, row.status) == (0, "invalid")
    assert env.metric("vendgate_config_acks_total", {"status": "invalid"}) == 2

    env.clock.now += RESEND_S - 1
    await env.sync.on_frame(MACHINE, env.hello(0, boot=2))
    await env.sync.on_frame(MACHINE, env.status_reply(0))
    assert await env.sync.resend_due() == 0
    await env.settle()
    assert len(env.link.configs()) == 1

    env.clock.now += 1
    assert await env.sync.resend_due() == 1
    await env.until(lambda: len(env.link.configs()) == 2, "the scheduled re-send")
    assert env.metric("vendgate_config_pushes_total", {"trigger": "resend"}) == 1
    _, view = await env.get(PLANOGRAM)
    assert view["config_status"] == "invalid"

    # A corrected planogram is a new version: sent at once, and its status starts afresh.
    await _set(env, 2)
    await env.until(lambda: len(env.link.configs()) == 3, "the new version")
    assert (await _row(env)).status is None


async def test_stale_ack_with_a_later_version_warns_and_stops_pushing(env: Env) -> None:
    """A machine that runs a version never set here is logged, shown, and not pushed again."""
    await _set(env, 1)
    await env.until(lambda: len(env.link.configs()) == 1, "the push")
    with structlog.testing.capture_logs() as logs:
        await env.sync.on_frame(MACHINE, env.ack(1, ConfigStatus.STALE, 4))
    (warning,) = [e for e in logs if e["event"] == "config_machine_ahead"]
    assert warning["log_level"] == "warning"
    assert (warning["reported"], warning["desired"]) == (4, 1)
    row = await _row(env)
    assert (row.reported, row.status, row.in_sync) == (4, "stale", False)
    env.clock.now += RESEND_S
    assert await env.sync.resend_due() == 0
    await env.sync.on_frame(MACHINE, env.hello(4, boot=2))
    await env.settle()
    assert len(env.link.configs()) == 1
    assert env.metric("vendgate_config_out_of_sync_machines") == 1
    assert await _set(env, 2) == 5  # the next version passes the machine's


async def test_resend_schedule_follows_the_clock(env: Env) -> None:
    """While an online machine is behind, Config is re-sent every resend_s, and sent_at moves."""
    await _set(env, 1)
    await env.until(lambda: len(env.link.configs()) == 1, "the push")
    await env.settle()
    first = (await _row(env)).sent_at
    assert first == datetime.fromtimestamp(env.clock.now, UTC)

    env.clock.now += RESEND_S / 2
    assert await env.sync.resend_due() == 0
    await env.sync.on_frame(MACHINE, env.status_reply(0))  # seen, but not due either
    await env.settle()
    assert len(env.link.configs()) == 1

    env.clock.now += RESEND_S / 2
    env.link.online.clear()
    assert await env.sync.resend_due() == 0  # offline: its Hello will bring it
    env.link.online.add(MACHINE)
    assert await env.sync.resend_due() == 1
    await env.until(lambda: len(env.link.configs()) == 2, "the re-send")
    await env.settle()
    assert (await _row(env)).sent_at == datetime.fromtimestamp(env.clock.now, UTC)

    env.clock.now += RESEND_S
    await env.sync.on_frame(MACHINE, env.status_reply(0))  # due now: a status reply sends it
    await env.until(lambda: len(env.link.configs()) == 3, "the push on StatusReply")
    await env.sync.on_frame(MACHINE, env.ack(1, ConfigStatus.APPLIED, 1))
    env.clock.now += RESEND_S
    assert await env.sync.resend_due() == 0


async def test_version_set_elsewhere_is_pushed_by_the_resend_pass(env: Env) -> None:
    """A version committed by another gateway (no desired_changed here) is found and sent."""
    async with env.pool.acquire() as conn, conn.transaction():
        await planograms.put(
            conn, MACHINE, "CNY", [SlotConfig(4, "P", "N", 1, 1, drop_sensor=True)], created_by="x"
        )
    assert await env.sync.resend_due() == 1
    await env.until(lambda: len(env.link.configs()) == 1, "the push")
    assert env.link.configs()[0].version == 1


async def test_repeated_and_older_frames_are_ignored(env: Env) -> None:
    """A QoS 1 duplicate or an older frame of the same boot neither counts nor rewrites."""
    await _set(env, 1)
    await env.until(lambda: len(env.link.configs()) == 1, "the push")
    old = env.hello(0)
    ack = env.ack(1, ConfigStatus.APPLIED, 1)
    await env.sync.on_frame(MACHINE, ack)
    await env.sync.on_frame(MACHINE, ack)
    await env.sync.on_frame(MACHINE, old)
    assert env.metric("vendgate_config_acks_total", {"status": "applied"}) == 1
    assert (await _row(env)).reported == 1


async def test_broker_down_counts_a_failure_and_the_resend_pass_retries(env: Env) -> None:
    """A push the broker refuses is counted and not recorded as sent; the next pass sends it."""
    env.link.broken = True
    await _set(env, 1)
    await env.until(
        lambda: env.metric("vendgate_config_push_failures_total") == 1, "the failed push"
    )
    assert (await _row(env)).sent_at is None
    env.link.broken = False
    assert await env.sync.resend_due() == 1
    await env.until(lambda: len(env.link.configs()) == 1, "the retried push")


async def test_a_full_queue_drops_pushes_and_the_resend_pass_recovers(database: str) -> None:
    """Beyond the queue, pushes are dropped and counted; the resend pass sends them later."""
    fleet = tuple(f"Q-{n}" for n in range(20))

    async def prepare(conn: Conn) -> None:
        await _desire(conn, desired=1, reported=0)

    async with serve(database, machines=fleet, queue_size=1, prepare=prepare) as env:
        env.link.delay_s = 0.05
        # Nothing in on_frame waits here (no write: the reports match), so the workers take
        # nothing before the last Hello: one machine is queued, the others dropped.
        await asyncio.gather(*(env.sync.on_frame(m, env.hello(0)) for m in fleet))
        assert env.metric("vendgate_config_push_dropped_total") == len(fleet) - 1
        await env.settle()
        assert len(env.link.sent) == 1
        with structlog.testing.capture_logs() as logs:
            assert await env.sync.resend_due() == 1  # as many as the queue takes
        assert [e["count"] for e in logs if e["event"] == "config_pushes_dropped"] == [19]
        for _ in range(len(fleet)):
            await env.settle()
            await env.sync.resend_due()
        await env.settle()
        assert sorted(m for m, _ in env.link.sent) == sorted(fleet)
        assert env.metric("vendgate_config_push_dropped_total") == len(fleet) - 1


async def _desire(conn: Conn, *, desired: int, reported: int) -> None:
    """Give every machine planogram version ``desired``, reported as ``reported``."""
    await conn.execute(
        "UPDATE machines SET config_desired = $1, config_reported = $2", desired, reported
    )
    await conn.execute(
        "INSERT INTO planograms (machine_id, version, currency, slots, created_by) "
        "SELECT machine_id, config_desired, 'CNY', $1::jsonb, 'test' FROM machines",
        SLOTS_JSON,
    )


async def _fleet(conn: Conn, *, desired: int, reported: int) -> None:
    await conn.execute(
        "INSERT INTO machines (machine_id) SELECT 'S-' || g FROM generate_series(1, $1) g", FLEET
    )
    await _desire(conn, desired=desired, reported=reported)


def _fleet_ids() -> list[str]:
    return [f"S-{n}" for n in range(1, FLEET + 1)]


async def test_reconnect_storm_with_current_versions_costs_no_write(database: str) -> None:
    """5,000 Hellos reporting the desired version cost no write, no read and no push."""

    async def prepare(conn: Conn) -> None:
        await _fleet(conn, desired=1, reported=1)

    async with serve(database, machines=(), prepare=prepare) as env:
        env.link.online.update(_fleet_ids())
        xmin = await env.fetchval("SELECT array_agg(xmin::text ORDER BY machine_id) FROM machines")
        reads, ops = env.reads.acquired, env.writer.stats.ops
        await asyncio.gather(*(env.sync.on_frame(m, env.hello(1)) for m in _fleet_ids()))
        await env.settle()
        assert env.writer.stats.ops == ops
        assert env.reads.acquired == reads
        assert env.link.sent == []
        assert env.metric("vendgate_config_report_writes_total") == 0
        assert (
            await env.fetchval("SELECT array_agg(xmin::text ORDER BY machine_id) FROM machines")
            == xmin
        )


async def test_reconnect_storm_with_older_versions_is_bounded(database: str) -> None:
    """5,000 Hellos behind the desired version are all pushed, at most CONCURRENCY at a time."""

    async def prepare(conn: Conn) -> None:
        await _fleet(conn, desired=2, reported=1)

    async with serve(database, machines=(), prepare=prepare, pool_max=8) as env:
        env.link.online.update(_fleet_ids())
        env.link.delay_s = 0.001
        baseline = len(asyncio.all_tasks())
        most_tasks = 0

        async def watch() -> None:
            nonlocal most_tasks
            while True:
                names = [t.get_name() for t in asyncio.all_tasks()]
                most_tasks = max(most_tasks, sum(n.startswith("gateway.configsync") for n in names))
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(env.sync.on_frame(m, env.hello(1)) for m in _fleet_ids()))
        assert len(asyncio.all_tasks()) <= baseline + 1  # no task per Hello
        await env.until(lambda: len(env.link.sent) == FLEET, "every push", timeout_s=120)
        watcher.cancel()
        assert env.link.max_in_flight <= CONCURRENCY
        assert most_tasks <= CONCURRENCY + 1  # the workers and the resend loop
        assert {m for m, _ in env.link.sent} == set(_fleet_ids())
        assert env.metric("vendgate_config_report_writes_total") == 0  # still reports 1
        assert env.metric("vendgate_config_pushes_total", {"trigger": "hello"}) == FLEET
        assert env.metric("vendgate_config_out_of_sync_machines") == FLEET
        await env.settle()
        assert await env.fetchval("SELECT count(*) FROM machines WHERE config_sent_at IS NULL") == 0


async def test_machine_registered_after_start_is_read_once(env: Env) -> None:
    """A machine missing from the loaded state is read on its first frame, then cached."""
    async with env.pool.acquire() as conn:
        await conn.execute("INSERT INTO machines (machine_id) VALUES ('VM-new')")
    reads = env.reads.acquired
    await env.sync.on_frame("VM-new", env.hello(0))
    await env.sync.on_frame("VM-new", env.hello(0))
    assert env.reads.acquired == reads + 1
    assert (await _row(env, "VM-new")).reported == 0


class SwallowingWriter:
    """A writer whose submit eats one cancellation, as Python 3.11's wait_for may."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def submit(self, op: object) -> None:  # noqa: ARG002  (never run)
        """Wait until cancelled, then return as if the write had finished."""
        self.entered.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)


async def test_a_swallowed_cancellation_still_stops_the_workers(env: Env) -> None:
    """If the writer loses a cancellation (gh-86296), the push workers stop all the same."""
    await _set(env, 1)
    writer = SwallowingWriter()
    link = FakeLink(online={MACHINE})
    sync = ConfigSync(
        send=link.send,
        is_online=link.is_online,
        writer=cast("GroupCommitter", writer),
        pool=env.pool,
        config=PlanogramConfig(resend_s=RESEND_S),
        metrics=PlanogramMetrics(prometheus_client.CollectorRegistry()),
        tick_s=3600,
    )
    task = asyncio.create_task(sync.run())
    await env.until(lambda: sync.loaded, "the load")
    sync.desired_changed(MACHINE, 1)
    await asyncio.wait_for(writer.entered.wait(), TIMEOUT_S)  # sent; recording sent_at
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT_S)
    assert len(link.configs()) == 1
