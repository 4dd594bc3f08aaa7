"""The whole pipeline over a real Mosquitto and PostgreSQL: exactly once, end to end.

Each test runs the gateway, the simulated fleet (`gateway.simulator.Fleet`, one MQTT
connection per machine) and a webhook receiver, and drives them only through the HTTP API,
the broker and the fleet's fault hooks. The same scenarios run in-process with an in-memory
wire in ``tests/gateway/test_dispatcher.py``; here every frame crosses the real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from gateway.embedded import Mosquitto
from gateway.simulator import POWER_LOSS, Fleet, duplicate_dispenses, read_dispense_log
from protocols.frames import (
    AckCode,
    Outcome,
    ResultAck,
    StatusQuery,
    StatusReply,
    Vend,
    VendAck,
    VendResult,
    VendState,
)
from tests.integration.harness import (
    Api,
    Diagnostics,
    GatewayProcess,
    Receiver,
    Sniffer,
    fleet_settings,
    free_port,
    gateway_overrides,
    history,
    log_events,
    outbox,
    pipeline,
    provision,
    wire_ids,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def _machine_offline(fleet: Fleet, machine_id: str, diag: Diagnostics) -> None:
    await diag.eventually(lambda: not fleet.is_online(machine_id), f"{machine_id} offline")


# ---------------------------------------------------------------------------------------------
# The normal case and repeated requests


async def test_happy_path_dispenses_once_and_reports_once(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """A vend goes accepted → sent → acknowledged → dispensed: one motor turn, one signed event."""
    async with pipeline(mosquitto, database, tmp_path, diagnostics) as p:
        (machine,) = p.fleet.machine_ids
        await p.api.create("order-1", machine)
        vend = await p.api.wait_state("order-1", "dispensed")
        assert history(vend) == ["accepted", "sent", "acknowledged", "dispensed"]
        assert vend["outcome"] == "dispensed"
        assert vend["refund_required"] is False
        assert vend["dispense"]["outcome"] == "dispensed"
        assert await p.turns("order-1") == 1

        await p.webhooks("order-1", "vend.dispensed")
        (event,) = p.receiver.for_vend("order-1")
        assert p.receiver.copies(event.event_id) == 1
        assert event.payload["state"] == "dispensed"
        assert event.payload["refund_required"] is False
        assert p.receiver.refused == []

        # The gateway acknowledges the committed result; the machine stops re-sending it.
        wire = (await wire_ids(database))["order-1"]
        await p.eventually(
            lambda: any(a.vend_id == wire for a in p.sniffer.frames(ResultAck, machine)),
            "ResultAck for the vend",
        )
        await p.eventually(
            lambda: p.fleet.store(machine).log[wire].result_acked, "the machine marks it acked"
        )
        assert duplicate_dispenses(p.fleet.dispenses) == {}


async def test_repeated_request_returns_the_same_vend(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """A backend re-sending the same request gets 200 with the same vend, never a second vend."""
    async with pipeline(mosquitto, database, tmp_path, diagnostics) as p:
        (machine,) = p.fleet.machine_ids
        deadline = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
        body = {
            "vend_id": "pay-42",
            "machine_id": machine,
            "slot": 2,
            "price": 200,
            "currency": "CNY",
            "deadline": deadline,
        }
        status, first = await p.api.post_vend(body)
        assert status == 202, first
        status, again = await p.api.post_vend(body)
        assert status == 200, again
        assert again["vend_id"] == first["vend_id"]
        assert again["created_at"] == first["created_at"]

        await p.api.wait_state("pay-42", "dispensed")
        status, late = await p.api.post_vend(body)  # the wallet's notification, re-sent later
        assert status == 200, late
        assert late["state"] == "dispensed"
        assert list(await wire_ids(database)) == ["pay-42"]
        assert await p.turns("pay-42") == 1
        await p.webhooks("pay-42", "vend.dispensed")
        assert duplicate_dispenses(p.fleet.dispenses) == {}


async def test_mismatched_repeat_is_refused_with_409(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """The same vend id with a different price is a conflict; the stored vend is untouched."""
    async with pipeline(mosquitto, database, tmp_path, diagnostics) as p:
        (machine,) = p.fleet.machine_ids
        body = {
            "vend_id": "pay-7",
            "machine_id": machine,
            "slot": 1,
            "price": 100,
            "currency": "CNY",
            "deadline_s": 30,
        }
        status, first = await p.api.post_vend(body)
        assert status == 202, first
        status, refused = await p.api.post_vend({**body, "price": 999})
        assert status == 409, refused
        assert refused["error"]["code"] == "vend_conflict"
        assert refused["error"]["field"] == "vend_id"

        vend = await p.api.wait_state("pay-7", "dispensed")
        assert vend["price"] == 100
        assert await p.turns("pay-7") == 1
        assert [v.price for v in p.sniffer.frames(Vend, machine)] == [100] * len(
            p.sniffer.frames(Vend, machine)
        )
        assert duplicate_dispenses(p.fleet.dispenses) == {}


# ---------------------------------------------------------------------------------------------
# Losses and repeats on the wire


async def test_vend_delivered_twice_turns_the_motor_once(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """A Vend handed to the machine twice, and replayed after the result, turns the motor once."""
    async with pipeline(mosquitto, database, tmp_path, diagnostics) as p:
        (machine,) = p.fleet.machine_ids
        p.fleet.faults.repeat_down.append(lambda _m, f: isinstance(f, Vend))
        await p.api.create("order-1", machine)
        await p.api.wait_state("order-1", "dispensed")
        wire = (await wire_ids(database))["order-1"]
        assert [f.vend_id for _, f in p.fleet.faults.repeated if isinstance(f, Vend)] == [wire]

        def duplicate_acks() -> int:
            acks = p.sniffer.frames(VendAck, machine)
            return sum(a.vend_id == wire and a.duplicate for a in acks)

        await p.eventually(lambda: duplicate_acks() >= 1, "a VendAck answered from the log")
        answered = duplicate_acks()
        # A stale copy of the frame, published again on the real topic after the result.
        (captured, *_) = p.sniffer.payloads(Vend, machine)
        p.sniffer.publish_down(machine, captured)
        await p.eventually(lambda: duplicate_acks() > answered, "the replay answered from the log")
        # The replay makes the machine re-send its result; the gateway acknowledges it again.
        await p.eventually(
            lambda: sum(a.vend_id == wire for a in p.sniffer.frames(ResultAck, machine)) >= 2,
            "a second ResultAck for the re-sent result",
        )
        acks = [a for a in p.sniffer.frames(VendAck, machine) if a.vend_id == wire]
        assert all(a.code is AckCode.ACCEPTED for a in acks)
        assert (await p.api.get("order-1"))["state"] == "dispensed"
        assert await p.turns("order-1") == 1
        assert p.receiver.types("order-1") in ([], ["vend.dispensed"])
        await p.webhooks("order-1", "vend.dispensed")
        assert duplicate_dispenses(p.fleet.dispenses) == {}


async def test_lost_vend_ack_is_recovered_by_a_resend(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """The first VendAck lost: the gateway re-sends, the machine answers from its log, once."""
    # A turn long enough for the re-send to come before the result.
    fleet = {"dispense_ms": 600}
    async with pipeline(mosquitto, database, tmp_path, diagnostics, fleet=fleet) as p:
        (machine,) = p.fleet.machine_ids
        p.fleet.faults.drop_up.append(lambda _m, f: isinstance(f, VendAck))
        await p.api.create("order-1", machine)
        vend = await p.api.wait_state("order-1", "dispensed")
        wire = (await wire_ids(database))["order-1"]
        (dropped,) = p.fleet.faults.dropped
        assert isinstance(dropped[1], VendAck)
        assert dropped[1].vend_id == wire
        assert not dropped[1].duplicate
        attempts = [v.attempt for v in p.sniffer.frames(Vend, machine)]
        assert attempts[:2] == [1, 2]
        assert any(a.duplicate for a in p.sniffer.frames(VendAck, machine))
        assert "sent" in history(vend)
        assert await p.turns("order-1") == 1
        await p.webhooks("order-1", "vend.dispensed")
        assert duplicate_dispenses(p.fleet.dispenses) == {}


async def test_lost_result_is_resent_by_the_machine(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """The first VendResult lost: the machine re-sends it (SPEC §7.7) and it is committed once."""
    async with pipeline(mosquitto, database, tmp_path, diagnostics) as p:
        (machine,) = p.fleet.machine_ids
        p.fleet.faults.drop_up.append(lambda _m, f: isinstance(f, VendResult))
        await p.api.create("order-1", machine)
        await p.api.wait_state("order-1", "acknowledged")
        await p.eventually(lambda: bool(p.fleet.faults.dropped), "the first result to be lost")
        vend = await p.api.wait_state("order-1", "dispensed", within=10)
        assert history(vend) == ["accepted", "sent", "acknowledged", "dispensed"]
        wire = (await wire_ids(database))["order-1"]
        results = [r for r in p.sniffer.frames(VendResult, machine) if r.vend_id == wire]
        assert results
        assert all(r.dispense.outcome is Outcome.DISPENSED for r in results)
        assert await p.turns("order-1") == 1
        await p.webhooks("order-1", "vend.dispensed")
        assert duplicate_dispenses(p.fleet.dispenses) == {}


# ---------------------------------------------------------------------------------------------
# Not dispensed, and unknown


async def test_offline_machine_is_unknown_then_proven_expired(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """Silence past the deadline is unknown, not a refund; the machine's tombstone proves expiry."""
    async with pipeline(mosquitto, database, tmp_path, diagnostics) as p:
        (machine,) = p.fleet.machine_ids
        p.fleet.cut_off(machine, 6.0)
        await _machine_offline(p.fleet, machine, diagnostics)
        await p.api.create("order-1", machine, deadline_s=2.5)
        await p.api.wait_state("order-1", "unknown", within=6)
        assert not p.fleet.is_online(machine), "unknown must come from silence, not an answer"
        await p.webhooks("order-1", "vend.unknown")

        vend = await p.api.wait_state("order-1", "expired", within=10)
        assert history(vend) == ["accepted", "sent", "unknown", "expired"]
        assert vend["refund_required"] is True
        await p.webhooks("order-1", "vend.unknown", "vend.not_dispensed")
        refund = p.receiver.for_vend("order-1")[-1].payload
        assert refund["refund_required"] is True
        assert refund["outcome"] == "not_dispensed"

        wire = (await wire_ids(database))["order-1"]
        assert any(q.vend_id == wire for q in p.sniffer.frames(StatusQuery, machine))
        replies = [r for r in p.sniffer.frames(StatusReply, machine) if r.vend_id == wire]
        assert any(
            r.vend_state is VendState.REJECTED and r.code is AckCode.EXPIRED for r in replies
        )
        assert await p.turns("order-1") == 0
        assert duplicate_dispenses(p.fleet.dispenses) == {}


async def test_jam_fails_the_vend_for_a_refund(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """A jam with the drop sensor on is failed, and the backend is told to refund."""
    async with pipeline(mosquitto, database, tmp_path, diagnostics, fleet={"jam_rate": 1.0}) as p:
        (machine,) = p.fleet.machine_ids
        await p.api.create("order-1", machine)
        vend = await p.api.wait_state("order-1", "failed")
        assert vend["dispense"]["reason"] == "jam"
        assert vend["refund_required"] is True
        await p.webhooks("order-1", "vend.not_dispensed")
        (event,) = p.receiver.for_vend("order-1")
        assert event.payload["refund_required"] is True
        assert [(d.outcome, d.reason) for d in p.fleet.dispenses] == [("FAILED", "JAM")]
        assert duplicate_dispenses(p.fleet.dispenses) == {}


async def test_reboot_mid_vend_is_unknown_until_an_operator_says_dispensed(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """Power lost mid-turn: the re-sent UNCERTAIN result keeps the vend unknown, never guessed."""
    fleet = {"reboot_rate": 1.0, "dispense_ms": 400}
    async with pipeline(mosquitto, database, tmp_path, diagnostics, fleet=fleet) as p:
        (machine,) = p.fleet.machine_ids
        await p.api.create("order-1", machine, deadline_s=2)
        vend = await p.api.wait_state("order-1", "unknown", within=8)
        assert vend["dispense"]["outcome"] == "uncertain"
        assert vend["dispense"]["reason"] == "power_loss"
        assert [d.outcome for d in p.fleet.dispenses] == [POWER_LOSS]
        assert p.fleet.stats["reboots"] == 1
        await p.webhooks("order-1", "vend.unknown")

        await asyncio.sleep(2.0)  # past deadline + tolerance: time alone settles nothing
        assert (await p.api.get("order-1"))["state"] == "unknown"

        status, resolved = await p.api.resolve("order-1", "dispensed", "bob", "customer has it")
        assert status == 200, resolved
        assert (resolved["state"], resolved["refund_required"]) == ("dispensed", False)
        last = (await p.api.get("order-1"))["history"][-1]
        assert (last["event"], last["actor"]) == ("operator_dispensed", "operator:bob")
        await p.webhooks("order-1", "vend.unknown", "vend.dispensed")
        assert await p.turns("order-1") == 1
        assert duplicate_dispenses(p.fleet.dispenses) == {}


async def test_reboot_with_answers_lost_is_queried_and_stays_unknown(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """A status query answered DONE/UNCERTAIN leaves the vend unknown until an operator acts."""
    fleet = {"reboot_rate": 1.0, "dispense_ms": 400}
    async with pipeline(mosquitto, database, tmp_path, diagnostics, fleet=fleet) as p:
        (machine,) = p.fleet.machine_ids
        # Every VendAck and VendResult lost until the deadline: the gateway hears nothing,
        # so the vend goes unknown by silence and only a StatusQuery can learn its fate.
        for _ in range(60):
            p.fleet.faults.drop_up.append(lambda _m, f: isinstance(f, VendAck | VendResult))
        await p.api.create("order-1", machine, deadline_s=2.5)
        await p.api.wait_state("order-1", "unknown", within=8)
        assert [d.outcome for d in p.fleet.dispenses] == [POWER_LOSS]
        wire = (await wire_ids(database))["order-1"]

        def answered() -> bool:
            return any(
                r.vend_id == wire
                and r.vend_state is VendState.DONE
                and r.dispense is not None
                and r.dispense.outcome is Outcome.UNCERTAIN
                for r in p.sniffer.frames(StatusReply, machine)
            )

        await p.eventually(answered, "a StatusReply DONE/UNCERTAIN", within=8)

        async def recorded() -> bool:
            steps = (await p.api.get("order-1"))["history"]
            return any(s["event"] == "result_uncertain" for s in steps)

        await p.eventually(recorded, "the status reply recorded in the history")
        vend = await p.api.get("order-1")
        assert vend["state"] == "unknown"
        assert vend["dispense"]["outcome"] == "uncertain"
        steps = history(vend)
        assert steps[:3] == ["accepted", "sent", "unknown"]
        assert set(steps[2:]) == {"unknown"}, steps  # the reply is recorded, settles nothing
        await p.webhooks("order-1", "vend.unknown")

        status, resolved = await p.api.resolve(
            "order-1", "not_dispensed", "alice", "CCTV shows nothing fell"
        )
        assert status == 200, resolved
        assert (resolved["state"], resolved["refund_required"]) == ("failed", True)
        last = (await p.api.get("order-1"))["history"][-1]
        assert (last["from"], last["to"], last["event"], last["actor"]) == (
            "unknown",
            "failed",
            "operator_not_dispensed",
            "operator:alice",
        )
        assert last["detail"] == {"reason": "CCTV shows nothing fell"}
        status, again = await p.api.resolve("order-1", "dispensed", "bob", "second opinion")
        assert status == 409, again

        await p.webhooks("order-1", "vend.unknown", "vend.not_dispensed")
        assert p.receiver.for_vend("order-1")[-1].payload["refund_required"] is True
        assert await p.turns("order-1") == 1
        assert duplicate_dispenses(p.fleet.dispenses) == {}


# ---------------------------------------------------------------------------------------------
# Crashes and outages


@dataclass(slots=True)
class _Crash:
    """Two `vendgate run` processes taking turns on one broker, database and receiver."""

    first: GatewayProcess
    second: GatewayProcess
    api: Api
    receiver: Receiver
    sniffer: Sniffer
    db: asyncpg.Connection


@contextlib.asynccontextmanager
async def _crash_rig(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> AsyncIterator[_Crash]:
    diagnostics.broker = mosquitto
    receiver = Receiver()
    http_port = free_port()
    overrides = gateway_overrides(
        mosquitto.url, database, webhook_url=receiver.url, http_port=http_port
    )
    # Restarted where it ran before: the same working directory, so the same state folder.
    home = tmp_path / "gateway-home"
    first = GatewayProcess(overrides, tmp_path / "gateway-1.log", http_port, cwd=home)
    second = GatewayProcess(overrides, tmp_path / "gateway-2.log", http_port, cwd=home)
    diagnostics.logs += [first.log_path, second.log_path]
    sniffer = Sniffer(mosquitto)
    api = Api(first.http_url, diagnostics)
    db = await asyncpg.connect(database)
    try:
        await receiver.start()
        await first.start(diagnostics)
        await sniffer.start()
        yield _Crash(first, second, api, receiver, sniffer, db)
    finally:
        await second.stop()
        await first.kill()
        await db.close()
        await sniffer.stop()
        await api.close()
        await receiver.stop()


async def test_gateway_killed_mid_flight_recovers_every_vend_exactly_once(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """SIGKILL with vends in every state: a restarted gateway settles each once, reports once."""
    dispense_log = tmp_path / "dispenses.jsonl"
    settings = fleet_settings(
        mosquitto, dispense_log, machines=5, dispense_ms=300, dispense_jitter_ms=100
    )
    async with _crash_rig(mosquitto, database, tmp_path, diagnostics) as rig:
        for machine in [settings.machine_id(i) for i in range(settings.machines)]:
            await rig.api.register(machine)
        async with Fleet(settings) as fleet:
            await provision(fleet, rig.api, diagnostics)
            # One machine off the network keeps its first vend "sent" and the rest "accepted".
            fleet.cut_off(fleet.machine_ids[-1], 3.0)
            vend_ids = [f"kill-{i:02d}" for i in range(30)]
            for i, vend_id in enumerate(vend_ids):
                machine = fleet.machine_ids[i % len(fleet.machine_ids)]
                slot = 1 + i % 4
                await rig.api.create(vend_id, machine, slot=slot, price=100 * slot, deadline_s=40)

            async def every_state() -> bool:
                rows = await rig.db.fetch("SELECT DISTINCT state FROM vends")
                return {"accepted", "sent", "acknowledged", "dispensed"} <= {
                    r["state"] for r in rows
                }

            await diagnostics.eventually(every_state, "vends in every state at once")
            await rig.first.kill()
            counts = await rig.db.fetch("SELECT state, count(*) AS n FROM vends GROUP BY state")
            at_kill: dict[str, int] = {r["state"]: r["n"] for r in counts}

            await rig.second.start(diagnostics)
            final = await rig.api.wait_final(vend_ids, within=30)
            states = {vend_id: vend["state"] for vend_id, vend in final.items()}
            assert set(states.values()) == {"dispensed"}, (at_kill, states)

            # Exactly one motor turn per dispensed vend, per the machines' own log.
            wires = await wire_ids(database)
            turns = read_dispense_log(dispense_log)
            assert duplicate_dispenses(turns) == {}
            assert sorted(t.vend_id for t in turns) == sorted(wires[v] for v in vend_ids)
            assert all(t.outcome == "DISPENSED" for t in turns)

            # One final event per vend once de-duplicated; a copy of an event id is allowed.
            # An event claimed by the killed gateway waits for its lease (timeout + 30 s).
            def reported() -> bool:
                return all(rig.receiver.types(v) == ["vend.dispensed"] for v in vend_ids)

            await diagnostics.eventually(reported, "one vend.dispensed per vend", within=45)
            assert rig.receiver.refused == []

            # The new process resumed the killed one's MQTT session, and with it the uplinks
            # the broker queued meanwhile.
            (before,) = log_events(rig.first.log_path, "mqtt.connected")
            (after,) = log_events(rig.second.log_path, "mqtt.connected")
            assert after["mqtt_client_id"] == before["mqtt_client_id"]
            assert after["session_present"] is True
            assert duplicate_dispenses(fleet.dispenses) == {}


async def test_webhooks_wait_for_a_receiver_that_is_down(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """Events for a receiver that is down arrive once it is up: each once, in order per vend."""
    receiver = Receiver()  # its port refuses connections until start()
    fleet = {"machines": 2}
    async with pipeline(
        mosquitto,
        database,
        tmp_path,
        diagnostics,
        fleet=fleet,
        receiver=receiver,
        start_receiver=False,
    ) as p:
        busy, away = p.fleet.machine_ids
        p.fleet.cut_off(away, 4.5)
        await _machine_offline(p.fleet, away, diagnostics)
        await p.api.create("away-1", away, deadline_s=2.5)
        served = [f"busy-{i}" for i in range(3)]
        for vend_id in served:
            await p.api.create(vend_id, busy)
        await p.api.wait_final([*served, "away-1"], within=12)
        assert (await p.api.get("away-1"))["state"] == "expired"

        rows = await outbox(database)
        assert len(rows) == 5
        assert all(r["delivered_at"] is None for r in rows)

        async def retried() -> bool:
            heads: dict[str, asyncpg.Record] = {}
            for row in await outbox(database):
                heads.setdefault(row["vend_id"], row)  # each vend's oldest event
            return all(row["attempts"] >= 2 for row in heads.values())

        await p.eventually(retried, "each vend's first event retried")
        # A vend's later event waits behind its first: never tried while that one fails.
        later = [r for r in await outbox(database) if r["vend_id"] == "away-1"][1:]
        assert [(r["event_type"], r["attempts"]) for r in later] == [("vend.not_dispensed", 0)]
        assert p.receiver.deliveries == []

        await receiver.start()
        for vend_id in served:
            await p.webhooks(vend_id, "vend.dispensed")
        await p.webhooks("away-1", "vend.unknown", "vend.not_dispensed")

        async def all_delivered() -> bool:
            return all(r["delivered_at"] is not None for r in await outbox(database))

        await p.eventually(all_delivered, "every outbox event marked delivered")
        # In the order they were written, per vend, each event id once after de-duplication.
        written: dict[str, list[str]] = {}
        for row in await outbox(database):
            written.setdefault(row["vend_id"], []).append(str(row["event_id"]))
        for vend_id, event_ids in written.items():
            assert [d.event_id for d in p.receiver.for_vend(vend_id)] == event_ids
        assert p.receiver.refused == []
        assert duplicate_dispenses(p.fleet.dispenses) == {}


async def test_broker_restart_mid_run_dispenses_each_vend_once(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """Vends created before and after a broker restart are each dispensed exactly once."""
    async with pipeline(mosquitto, database, tmp_path, diagnostics, fleet={"machines": 2}) as p:
        one, two = p.fleet.machine_ids
        before = {"before-1": one, "before-2": two, "before-3": one}
        for vend_id, machine in before.items():
            await p.api.create(vend_id, machine)
        await mosquitto.restart()
        after = {"after-1": one, "after-2": two}
        for vend_id, machine in after.items():
            await p.api.create(vend_id, machine)
        vend_ids = [*before, *after]
        final = await p.api.wait_final(vend_ids, within=20)
        assert {v["state"] for v in final.values()} == {"dispensed"}, final
        for vend_id in vend_ids:
            assert await p.turns(vend_id) == 1, vend_id
            await p.webhooks(vend_id, "vend.dispensed")
        # Everyone really lost the broker and came back.
        assert p.fleet.stats["reconnects"] >= len(p.fleet.machine_ids)
        assert log_events(diagnostics.logs[0], "mqtt.connection_lost")
        assert duplicate_dispenses(p.fleet.dispenses) == {}
