"""The dispatcher against reference machines: exactly once through losses, repeats and restarts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from gateway.lifecycle import VendEvent, VendStatus
from gateway.store import vends
from protocols.device import MotorReport
from protocols.frames import (
    FailReason,
    ResultAck,
    StatusQuery,
    StatusReply,
    Vend,
    VendAck,
    VendResult,
)
from tests.gateway.pipeline_harness import JAM, Wire, attach, pipeline, prepare, running

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

S = VendStatus


async def test_happy_path_dispenses_once_and_acks_after_commit(database: str) -> None:
    """A vend goes accepted → sent → acknowledged → dispensed; ResultAck follows the commit."""
    async with pipeline(database) as p:
        row = await p.vend("order-1")
        assert await p.wait_for("order-1", S.DISPENSED) is S.DISPENSED
        assert p.wire.motor_runs[row.wire_id] == 1
        async with p.pool.acquire() as conn:
            history = [h.to_state for h in await vends.history(conn, "order-1")]
        assert history == [S.ACCEPTED, S.SENT, S.ACKNOWLEDGED, S.DISPENSED]
        await asyncio.sleep(0.1)
        acks = [f for _, f in p.wire.down_frames if isinstance(f, ResultAck)]
        assert [a.vend_id for a in acks] == [row.wire_id]
        entry = p.wire.machines["VM-1"].device.log_entry(row.wire_id)
        assert entry is not None
        assert entry.result_acked


async def test_machine_locks_are_kept_only_while_in_use(database: str) -> None:
    """Each machine's steps take its lock in turn; a lock nobody holds or waits for is gone."""
    async with pipeline(database) as p:
        await p.vend("order-1")
        assert await p.wait_for("order-1", S.DISPENSED) is S.DISPENSED
        await asyncio.sleep(0.1)  # the ResultAck after the commit
        assert p.dispatcher._locks == {}

        order: list[str] = []

        async def step(name: str, hold_s: float) -> None:
            async with p.dispatcher._lock("VM-9"):
                order.append(f"{name}+")
                await asyncio.sleep(hold_s)
                order.append(f"{name}-")

        first = asyncio.create_task(step("a", 0.05))
        await asyncio.sleep(0)  # a holds the lock
        waiting = asyncio.create_task(step("b", 0))
        cancelled = asyncio.create_task(step("c", 0))
        await asyncio.sleep(0)  # b and c wait for it
        assert list(p.dispatcher._locks) == ["VM-9"]
        cancelled.cancel()
        await asyncio.gather(first, waiting, cancelled, return_exceptions=True)
        assert order == ["a+", "a-", "b+", "b-"]
        assert p.dispatcher._locks == {}


async def test_lost_vend_ack_is_recovered_by_a_resend(database: str) -> None:
    """Losing the first VendAck makes the gateway re-send; the machine answers from its log."""
    async with pipeline(database) as p:
        p.wire.lose_up.append(lambda f: isinstance(f, VendAck))
        p.wire.machines["VM-1"].dispense_s = 0.5  # the re-send comes before the result
        row = await p.vend("order-1")
        assert await p.wait_for("order-1", S.DISPENSED) is S.DISPENSED
        attempts = [f.attempt for _, f in p.wire.down_frames if isinstance(f, Vend)]
        assert attempts[:2] == [1, 2]
        assert p.wire.motor_runs[row.wire_id] == 1


async def test_vend_delivered_twice_turns_the_motor_once(database: str) -> None:
    """A duplicated Vend frame is answered from the machine's log."""
    async with pipeline(database) as p:
        p.wire.duplicate_down.append(lambda f: isinstance(f, Vend))
        row = await p.vend("order-1")
        await p.wait_for("order-1", S.DISPENSED)
        assert p.wire.motor_runs[row.wire_id] == 1


async def test_lost_result_is_resent_until_acknowledged(database: str) -> None:
    """Losing VendResult twice only delays the outcome; it is committed once."""
    async with pipeline(database) as p:
        p.wire.lose_up += [lambda f: isinstance(f, VendResult)] * 2
        row = await p.vend("order-1")
        assert await p.wait_for("order-1", S.DISPENSED) is S.DISPENSED
        results = [f for m, f in p.wire.up_frames if isinstance(f, VendResult)]
        assert len(results) >= 3
        assert p.wire.motor_runs[row.wire_id] == 1


async def test_offline_machine_past_deadline_is_unknown_then_proven_expired(
    database: str,
) -> None:
    """Silence makes a vend unknown, never expired; the machine's tombstone proves expiry."""
    async with pipeline(database) as p:
        p.wire.disconnect("VM-1")
        row = await p.vend("order-1", ttl_s=2.0)
        assert await p.wait_for("order-1", S.UNKNOWN) is S.UNKNOWN
        p.wire.connect("VM-1")
        assert await p.wait_for("order-1", S.EXPIRED) is S.EXPIRED
        assert any(isinstance(f, StatusQuery) for _, f in p.wire.down_frames)
        assert p.wire.motor_runs[row.wire_id] == 0
        async with p.pool.acquire() as conn:
            types = [
                r["event_type"] for r in await conn.fetch("SELECT event_type FROM webhook_outbox")
            ]
        assert types == ["vend.unknown", "vend.not_dispensed"]


async def test_a_vend_too_close_to_its_deadline_is_never_sent(database: str) -> None:
    """A vend that cannot be published in time expires without a frame: never sent, proven."""
    async with pipeline(database) as p:
        await p.vend("order-1", ttl_s=0.5)
        assert await p.wait_for("order-1", S.EXPIRED) is S.EXPIRED
        assert not any(isinstance(f, Vend) for _, f in p.wire.down_frames)


async def test_jam_fails_the_vend_for_a_refund(database: str) -> None:
    """A jam with the drop sensor on is FAILED, reported not dispensed."""
    async with pipeline(database) as p:
        p.wire.machines["VM-1"].report = JAM
        await p.vend("order-1")
        assert await p.wait_for("order-1", S.FAILED) is S.FAILED
        async with p.pool.acquire() as conn:
            row = await vends.get(conn, "order-1")
        assert row is not None
        assert row.dispense is not None
        assert row.dispense["reason"] == "jam"


async def test_reboot_mid_vend_is_unknown_for_an_operator(database: str) -> None:
    """Power lost while the motor turns: UNCERTAIN, kept unknown, never guessed."""
    async with pipeline(database) as p:
        p.wire.machines["VM-1"].crash_during_motor = True
        row = await p.vend("order-1")
        assert await p.wait_for("order-1", S.UNKNOWN) is S.UNKNOWN
        async with p.pool.acquire() as conn:
            before = len(await vends.history(conn, "order-1"))
        for _ in range(10):  # the machine keeps answering UNCERTAIN; nothing may loop
            await p.wire.tick()
            await asyncio.sleep(0.1)
        assert await p.state("order-1") is S.UNKNOWN
        async with p.pool.acquire() as conn:
            assert len(await vends.history(conn, "order-1")) == before
        queries = [f for _, f in p.wire.down_frames if isinstance(f, StatusQuery)]
        assert len(queries) <= 2
        assert p.wire.motor_runs[row.wire_id] == 1
        async with p.pool.acquire() as conn:
            stored = await vends.get(conn, "order-1")
        assert stored is not None
        assert stored.dispense is not None
        assert stored.dispense["outcome"] == "uncertain"


async def test_one_vend_at_a_time_per_machine_in_order(database: str) -> None:
    """Three vends for one machine are sent in order, never two in flight at once."""
    async with pipeline(database) as p:
        p.wire.machines["VM-1"].dispense_s = 0.2
        rows = [await p.vend(f"order-{i}", ttl_s=10) for i in range(3)]
        for i in range(3):
            await p.wait_for(f"order-{i}", S.DISPENSED)
        first_sends = []
        for _, frame in p.wire.down_frames:
            if isinstance(frame, Vend) and frame.vend_id not in first_sends:
                first_sends.append(frame.vend_id)
        assert first_sends == [r.wire_id for r in rows]
        busy = [f for _, f in p.wire.up_frames if isinstance(f, VendAck) and f.code.is_transient]
        assert busy == []


async def test_gateway_restart_recovers_every_vend_exactly_once(database: str) -> None:
    """Stopping the dispatcher mid-flight and starting a new one finishes every vend once."""
    pool = await prepare(database)
    wire = Wire()
    try:
        async with running(pool, wire) as p:
            await attach(wire)
            wire.machines["VM-1"].dispense_s = 0.1
            rows = [await p.vend(f"order-{i}", ttl_s=10) for i in range(4)]
            await p.wait_for("order-0", S.ACKNOWLEDGED, S.DISPENSED)
        # The first dispatcher is gone mid-flight. A new one recovers from the database.
        async with running(pool, wire) as q:
            wire.connect("VM-1")
            for i in range(4):
                assert await q.wait_for(f"order-{i}", S.DISPENSED, timeout=15) is S.DISPENSED
            assert all(wire.motor_runs[r.wire_id] == 1 for r in rows)
            assert q.dispatcher.recovered >= 3
    finally:
        await wire.close()
        await pool.close()


async def test_unknown_machine_and_forged_frames_are_dropped(database: str) -> None:
    """Frames from an unregistered machine or with a bad MAC are counted and ignored."""
    async with pipeline(database) as p:
        assert p.wire.uplink is not None
        await p.wire.uplink.process("vg/m/VM-9/up", b"\x97\x01\x41" + b"\x00" * 30)
        await p.wire.uplink.process("vg/m/VM-1/up", b"\x97\x01\x41" + b"\x00" * 30)
        await p.wire.uplink.process("elsewhere/x", b"")
        text = p.registry.get_sample_value
        assert text("vendgate_bad_frames_total", {"kind": "unknown_machine"}) == 1
        assert text("vendgate_bad_frames_total", {"kind": "bad_mac"}) == 1
        assert text("vendgate_bad_frames_total", {"kind": "bad_topic"}) == 1


async def test_sensor_off_fault_after_motor_moved_is_unknown(database: str) -> None:
    """Without a drop sensor a mid-turn fault cannot prove a refund: the vend is unknown."""
    async with pipeline(database) as p:
        machine = p.wire.machines["VM-1"]
        from protocols.codec import encode  # noqa: PLC0415
        from protocols.frames import Config, SlotConfig  # noqa: PLC0415

        config = Config(2, (SlotConfig(1, "P1", "Product 1", 100, 50, False),))  # noqa: FBT003
        machine.device.receive(encode(config, p.wire.keys.key("VM-1")), p.wire.now_ms())
        machine.report = MotorReport(dropped=False, motor_ms=700, fault=FailReason.MOTOR_FAULT)
        await p.vend("order-1")
        assert await p.wait_for("order-1", S.UNKNOWN) is S.UNKNOWN


async def test_reconcile_adopts_a_vend_that_was_never_handed_over(database: str) -> None:
    """A vend committed without reaching the dispatcher is found by reconcile and dispensed."""
    async with pipeline(database) as p:
        request = vends.VendRequest("order-1", "VM-1", 1, 100, "CNY", None)
        deadline = datetime.now(UTC) + timedelta(seconds=10)
        await p.writer.submit(lambda conn: vends.create(conn, request, deadline))
        await asyncio.sleep(0.3)
        assert await p.state("order-1") is S.ACCEPTED  # nobody told the dispatcher
        await p.dispatcher.reconcile()
        assert await p.wait_for("order-1", S.DISPENSED) is S.DISPENSED


async def test_a_result_after_an_operator_settled_is_recorded_and_flagged(database: str) -> None:
    """A DISPENSED result for a vend an operator refunded is stored as a conflict, then acked."""
    async with pipeline(database) as p:
        # Everything the machine says about the vend is lost until an operator has acted.
        p.wire.lose_up += [lambda f: isinstance(f, (VendAck, VendResult, StatusReply))] * 200
        row = await p.vend("order-1", ttl_s=1.5)
        assert await p.wait_for("order-1", S.UNKNOWN) is S.UNKNOWN
        async with p.pool.acquire() as conn:
            await vends.apply(
                conn,
                "order-1",
                VendEvent.OPERATOR_NOT_DISPENSED,
                actor="operator:test",
                detail={"reason": "test"},
            )
        p.wire.lose_up.clear()
        for _ in range(40):  # the machine re-sends its DISPENSED result
            await p.wire.tick()
            await asyncio.sleep(0.1)
            async with p.pool.acquire() as conn:
                history = await vends.history(conn, "order-1")
            if any(h.event == "late_result" for h in history):
                break
        late = [h for h in history if h.event == "late_result"]
        assert len(late) == 1
        assert late[0].detail is not None
        assert late[0].detail["conflict"] is True
        assert p.registry.get_sample_value("vendgate_result_conflicts_total") == 1
        await asyncio.sleep(0.2)
        entry = p.wire.machines["VM-1"].device.log_entry(row.wire_id)
        assert entry is not None
        assert entry.result_acked


async def test_a_late_ack_does_not_bring_an_unknown_vend_back(database: str) -> None:
    """Once unknown, a vend stays unknown on a late VendAck; one unknown webhook only."""
    async with pipeline(database) as p:
        p.wire.disconnect("VM-1")
        await p.vend("order-1", ttl_s=2.0)
        assert await p.wait_for("order-1", S.UNKNOWN) is S.UNKNOWN
        machine = p.wire.machines["VM-1"]
        machine.report = MotorReport(dropped=True, motor_ms=10)
        p.wire.connect("VM-1")  # it now gets the queued re-sends / status queries
        final = await p.wait_for("order-1", S.EXPIRED, S.DISPENSED, timeout=15)
        async with p.pool.acquire() as conn:
            types = [
                r["event_type"]
                for r in await conn.fetch("SELECT event_type FROM webhook_outbox ORDER BY id")
            ]
            states = [h.to_state for h in await vends.history(conn, "order-1")]
        assert types.count("vend.unknown") == 1
        assert S.ACKNOWLEDGED not in states[states.index(S.UNKNOWN) :]
        assert final in (S.EXPIRED, S.DISPENSED)


async def test_reconcile_drops_vends_settled_elsewhere_but_keeps_newer_ones(
    database: str,
) -> None:
    """Reconcile forgets a vend an operator settled, and keeps one missing from its snapshot."""
    async with pipeline(database) as p:
        p.wire.disconnect("VM-1")
        await p.vend("order-1", ttl_s=30)
        await p.vend("order-2", ttl_s=30)
        await p.wait_for("order-1", S.SENT)
        assert p.dispatcher.tracked == 2
        # A snapshot taken before order-2 existed: it must not be dropped for that.
        real = p.dispatcher._read_active

        async def stale(*, retry: bool) -> list[vends.VendRow]:
            return [row for row in await real(retry=retry) if row.vend_id != "order-2"]

        p.dispatcher._read_active = stale  # type: ignore[method-assign]
        await p.dispatcher.reconcile()
        assert p.dispatcher.tracked == 2
        p.dispatcher._read_active = real  # type: ignore[method-assign]
        async with p.pool.acquire() as conn:
            await vends.apply(conn, "order-1", VendEvent.NO_ACK)
            await vends.apply(
                conn, "order-1", VendEvent.OPERATOR_NOT_DISPENSED, actor="operator:test"
            )
        await p.dispatcher.reconcile()
        assert p.dispatcher.tracked == 1  # order-1 is final now; order-2 is still queued


async def test_a_vend_settled_by_another_gateway_frees_the_machine_queue_at_once(
    database: str,
) -> None:
    """Settled elsewhere (NOTIFY), the head of a machine's queue gives way to the next vend.

    The machine's results for the first vend never reach this gateway, and its deadline and
    the reconcile pass are a minute away: only the notification explains a prompt hand-over.
    """
    async with pipeline(database) as p:
        first = await p.vend("order-1", ttl_s=60.0)
        p.wire.lose_up += [
            lambda f: isinstance(f, VendResult) and f.vend_id == first.wire_id
        ] * 1000
        await p.vend("order-2", ttl_s=60.0)
        assert await p.wait_for("order-1", S.ACKNOWLEDGED) is S.ACKNOWLEDGED
        async with p.pool.acquire() as conn, conn.transaction():
            dispense = {"outcome": "dispensed", "reason": "none"}
            row = await vends.apply(
                conn,
                "order-1",
                VendEvent.RESULT_DISPENSED,
                dispense=dispense,
                origin="another-gateway",
            )
            assert row is not None
        async with asyncio.timeout(5):
            assert await p.wait_for("order-2", S.DISPENSED) is S.DISPENSED
        assert p.dispatcher.tracked == 0
