"""The fleet simulator against a real private Mosquitto and a small test-only gateway stand-in."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio
import structlog
from gmqtt import Client

from gateway import simulator
from gateway.cli import main
from gateway.embedded import Mosquitto
from gateway.errors import BrokerUnavailableError
from gateway.simulator import (
    POWER_LOSS,
    DispenseRecord,
    Fleet,
    FleetSettings,
    OfflineWindow,
    SimulatedMachineError,
    duplicate_dispenses,
    read_dispense_log,
)
from protocols.codec import FrameKey, decode, encode
from protocols.device import Device
from protocols.frames import (
    AckCode,
    Config,
    ConfigAck,
    ConfigStatus,
    Direction,
    FailReason,
    Frame,
    Heartbeat,
    Hello,
    Outcome,
    Presence,
    Reading,
    ReadingKind,
    ResultAck,
    SlotConfig,
    Telemetry,
    Time,
    Vend,
    VendAck,
    VendResult,
)
from protocols.topics import Channel, Topics

pytestmark = pytest.mark.integration

SECRET = bytes(range(32))
TIMEOUT = 10.0
F = TypeVar("F", bound=Frame)


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Wait until ``check()`` is true, failing the test with ``what`` after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class StandIn:
    """A test-only gateway: answers time requests, configures slots 1..3, acks results."""

    def __init__(self, broker: Mosquitto, prefix: str = "vg") -> None:
        self.broker = broker
        self.topics = Topics(prefix)
        self.config = Config(
            version=1,
            slots=tuple(
                SlotConfig(
                    slot=n,
                    product_code=f"P{n}",
                    name=f"Product {n}",
                    price=100,
                    capacity=20,
                    drop_sensor=True,
                )
                for n in (1, 2, 3)
            ),
        )
        #: Every uplink frame: (machine id, frame, retained flag).
        self.seen: list[tuple[str, Frame, bool]] = []
        self._keys: dict[str, FrameKey] = {}
        self._client = Client(f"standin-{uuid.uuid4().hex[:8]}")
        self._client.on_message = self._on_message
        self._subacks: asyncio.Queue[int] = asyncio.Queue()
        self._client.on_subscribe = lambda *_args: self._subacks.put_nowait(1)

    async def start(self) -> None:
        """Connect and subscribe to every machine's up and status topics."""
        await self._client.connect(self.broker.host, self.broker.port)
        for channel in (Channel.UP, Channel.STATUS):
            self._client.subscribe(self.topics.filter(channel), qos=1)
            await asyncio.wait_for(self._subacks.get(), TIMEOUT)

    async def stop(self) -> None:
        """Disconnect cleanly."""
        await self._client.disconnect()

    def key(self, machine_id: str) -> FrameKey:
        """Return the machine's frame key."""
        if machine_id not in self._keys:
            self._keys[machine_id] = FrameKey.derive(SECRET, machine_id)
        return self._keys[machine_id]

    def send(self, machine_id: str, frame: Frame) -> bytes:
        """Publish a downlink frame to the machine; return the payload sent."""
        payload = encode(frame, self.key(machine_id))
        self.send_raw(machine_id, payload)
        return payload

    def send_raw(self, machine_id: str, payload: bytes) -> None:
        """Publish a payload on the machine's down topic."""
        self._client.publish(self.topics.topic(machine_id, Channel.DOWN), payload, qos=1)

    def frames(self, machine_id: str, kind: type[F]) -> list[F]:
        """Return the machine's uplink frames of one type, in arrival order."""
        return [f for m, f, _ in self.seen if m == machine_id and isinstance(f, kind)]

    def presences(self, machine_id: str) -> list[Presence]:
        """Return the machine's Presence frames, in arrival order."""
        return self.frames(machine_id, Presence)

    async def ready(self, fleet: Fleet, machine_id: str) -> None:
        """Wait until the machine has applied the Config and synced its clock."""

        def check() -> bool:
            device = fleet.device(machine_id)
            acks = self.frames(machine_id, ConfigAck)
            applied = any(a.status is ConfigStatus.APPLIED for a in acks)
            return applied and device is not None and device.clock_synced

        await eventually(check, f"{machine_id} configured and synced")

    def _on_message(
        self, _client: object, topic: str, payload: bytes, _qos: int, properties: Any
    ) -> int:
        machine_id, _channel = self.topics.parse(topic)
        frame = decode(payload, self.key(machine_id), direction=Direction.UP)
        self.seen.append((machine_id, frame, bool(properties.get("retain"))))
        match frame:
            case Hello():
                self.send(machine_id, Time(_now_ms(), frame.boot, frame.seq))
                if frame.config_version < self.config.version:
                    self.send(machine_id, self.config)
            case Heartbeat(want_time=True):
                self.send(machine_id, Time(_now_ms(), frame.boot, frame.seq))
            case VendResult():
                self.send(machine_id, ResultAck(vend_id=frame.vend_id))
            case _:
                pass
        return 0


def _now_ms() -> int:
    return int(time.time() * 1000)


def _vend(slot: int = 1, attempt: int = 1) -> Vend:
    return Vend(
        vend_id=secrets.randbits(63),
        slot=slot,
        price=100,
        deadline=int(time.time()) + 60,
        attempt=attempt,
    )


def _settings(broker: Mosquitto, **changes: Any) -> FleetSettings:
    fields: dict[str, Any] = {
        "broker_host": broker.host,
        "broker_port": broker.port,
        "master_secret": SECRET,
        "machines": 1,
        "dispense_ms": 200,
        "dispense_jitter_ms": 50,
        "tick_ms": 100,
        **changes,
    }
    return FleetSettings(**fields)


@pytest_asyncio.fixture
async def standin(mosquitto: Mosquitto) -> AsyncIterator[StandIn]:
    gateway = StandIn(mosquitto)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


@pytest.mark.asyncio
async def test_machines_connect_and_announce(mosquitto: Mosquitto, standin: StandIn) -> None:
    """Five machines connect, leave a retained online Presence, say Hello and sync their clocks."""
    async with Fleet(_settings(mosquitto, machines=5)) as fleet:
        assert fleet.machine_ids == [f"SIM-000{n}" for n in range(1, 6)]
        for machine_id in fleet.machine_ids:
            await standin.ready(fleet, machine_id)
            (presence,) = standin.presences(machine_id)
            assert presence.online
            assert presence.boot == 1
            assert presence.session == 1
            (hello,) = standin.frames(machine_id, Hello)
            assert hello.boot == 1
            assert presence.seq < hello.seq  # Presence first, then Hello (SPEC §7.8)

        # A newcomer reads every machine's state from the retained status messages.
        late = StandIn(mosquitto)
        await late.start()
        try:
            await eventually(lambda: len(late.seen) == 5, "five retained presences")
            assert all(
                retained and isinstance(frame, Presence) and frame.online
                for _, frame, retained in late.seen
            )
        finally:
            await late.stop()
        assert fleet.stats["connects"] == 5

    # A clean shutdown replaces the retained online Presence with an offline one.
    await eventually(
        lambda: all(not standin.presences(m)[-1].online for m in fleet.machine_ids),
        "offline presences at shutdown",
    )
    assert all(standin.presences(m)[-1].seq > 0 for m in fleet.machine_ids)  # not the will


@pytest.mark.asyncio
async def test_vend_dispensed_once_and_logged(
    mosquitto: Mosquitto, standin: StandIn, tmp_path: Path
) -> None:
    """A vend is acknowledged, dispensed once, acknowledged back, and logged as one motor turn."""
    log_path = tmp_path / "dispenses.jsonl"
    async with Fleet(_settings(mosquitto, dispense_log=log_path)) as fleet:
        (machine_id,) = fleet.machine_ids
        await standin.ready(fleet, machine_id)
        vend = _vend()
        standin.send(machine_id, vend)
        await eventually(lambda: bool(standin.frames(machine_id, VendResult)), "the result")
        (ack,) = standin.frames(machine_id, VendAck)
        assert (ack.vend_id, ack.code, ack.duplicate) == (vend.vend_id, AckCode.ACCEPTED, False)
        (result,) = standin.frames(machine_id, VendResult)
        assert result.dispense.outcome is Outcome.DISPENSED
        await eventually(
            lambda: fleet.store(machine_id).log[vend.vend_id].result_acked, "ResultAck applied"
        )
        assert fleet.dispenses == [
            DispenseRecord(
                machine_id=machine_id,
                vend_id=vend.vend_id,
                slot=1,
                at_ms=fleet.dispenses[0].at_ms,
                boot=1,
                outcome="DISPENSED",
                reason="NONE",
            )
        ]

    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(lines) == 2  # the start, flushed when the motor started, then the outcome
    assert lines[0]["vend_id"] == vend.vend_id
    assert "outcome" not in lines[0]
    assert lines[1]["outcome"] == "DISPENSED"
    assert read_dispense_log(log_path) == fleet.dispenses
    assert duplicate_dispenses(read_dispense_log(log_path)) == {}


@pytest.mark.asyncio
async def test_vend_delivered_twice_turns_motor_once(
    mosquitto: Mosquitto, standin: StandIn
) -> None:
    """A Vend delivered twice, and re-sent after its result, turns the motor only once."""
    async with Fleet(_settings(mosquitto)) as fleet:
        (machine_id,) = fleet.machine_ids
        await standin.ready(fleet, machine_id)
        vend = _vend(slot=2)
        payload = standin.send(machine_id, vend)
        standin.send_raw(machine_id, payload)  # a QoS 1 redelivery of the same frame
        await eventually(lambda: len(standin.frames(machine_id, VendAck)) == 2, "two acks")
        await eventually(lambda: bool(standin.frames(machine_id, VendResult)), "the result")
        standin.send(machine_id, Vend(**{**_fields(vend), "attempt": 2}))  # a late re-send
        await eventually(lambda: len(standin.frames(machine_id, VendResult)) == 2, "re-sent result")

        acks = standin.frames(machine_id, VendAck)
        assert [(a.code, a.duplicate, a.attempt) for a in acks] == [
            (AckCode.ACCEPTED, False, 1),
            (AckCode.ACCEPTED, True, 1),
            (AckCode.ACCEPTED, True, 2),
        ]
        results = standin.frames(machine_id, VendResult)
        assert {r.dispense for r in results} == {results[0].dispense}
        assert len(fleet.dispenses) == 1
        assert duplicate_dispenses(fleet.dispenses) == {}


def _fields(vend: Vend) -> dict[str, Any]:
    return {
        "vend_id": vend.vend_id,
        "slot": vend.slot,
        "price": vend.price,
        "deadline": vend.deadline,
        "attempt": vend.attempt,
    }


@pytest.mark.asyncio
async def test_jam_gives_failed_result(mosquitto: Mosquitto, standin: StandIn) -> None:
    """With jam_rate=1 every dispense fails with JAM, in the result and in the dispense record."""
    async with Fleet(_settings(mosquitto, jam_rate=1.0)) as fleet:
        (machine_id,) = fleet.machine_ids
        await standin.ready(fleet, machine_id)
        for count, slot in enumerate((1, 3), start=1):
            standin.send(machine_id, _vend(slot=slot))

            def answered(n: int = count) -> bool:
                return len(standin.frames(machine_id, VendResult)) == n

            await eventually(answered, "a result")
        results = standin.frames(machine_id, VendResult)
        assert [(r.dispense.outcome, r.dispense.reason) for r in results] == [
            (Outcome.FAILED, FailReason.JAM)
        ] * 2
        assert [(d.outcome, d.reason) for d in fleet.dispenses] == [("FAILED", "JAM")] * 2


@pytest.mark.asyncio
async def test_power_loss_mid_vend(mosquitto: Mosquitto, standin: StandIn, tmp_path: Path) -> None:
    """A power loss mid-turn fires the will; after a reboot the vend is UNCERTAIN/POWER_LOSS."""
    log_path = tmp_path / "dispenses.jsonl"
    settings = _settings(mosquitto, reboot_rate=1.0, reboot_ms=300, dispense_log=log_path)
    async with Fleet(settings) as fleet:
        (machine_id,) = fleet.machine_ids
        await standin.ready(fleet, machine_id)
        vend = _vend()
        standin.send(machine_id, vend)
        await eventually(lambda: bool(standin.frames(machine_id, VendResult)), "the result")

        presences = [(p.boot, p.session, p.seq, p.online) for p in standin.presences(machine_id)]
        # Online, the will (seq 0, SPEC §3.3) published by the broker, then online after reboot.
        assert presences == [(1, 1, 1, True), (1, 1, 0, False), (2, 1, 1, True)]
        (result,) = standin.frames(machine_id, VendResult)
        assert result.boot == 2
        assert (result.dispense.outcome, result.dispense.reason) == (
            Outcome.UNCERTAIN,
            FailReason.POWER_LOSS,
        )
        assert [h.boot for h in standin.frames(machine_id, Hello)] == [1, 2]
        assert fleet.stats["reboots"] == 1
        assert [(d.boot, d.outcome) for d in fleet.dispenses] == [(1, POWER_LOSS)]
    assert read_dispense_log(log_path) == fleet.dispenses


@pytest.mark.asyncio
async def test_offline_window_drops_and_returns(mosquitto: Mosquitto, standin: StandIn) -> None:
    """An offline window drops a machine abruptly (its will fires); it resumes its session."""
    window = OfflineWindow(machine_index=1, start_s=0.5, duration_s=0.5)
    async with Fleet(_settings(mosquitto, machines=2, offline=(window,))) as fleet:
        dropped, steady = fleet.machine_ids[1], fleet.machine_ids[0]
        await standin.ready(fleet, dropped)
        await eventually(lambda: len(standin.presences(dropped)) == 2, "the will")
        assert not fleet.is_online(dropped)
        # Queued in the machine's persistent session (SPEC §3.5) and delivered on reconnect.
        vend = _vend()
        standin.send(dropped, vend)
        await eventually(lambda: bool(standin.frames(dropped, VendResult)), "the result")

        presences = [(p.boot, p.session, p.seq, p.online) for p in standin.presences(dropped)]
        assert presences[:2] == [(1, 1, 1, True), (1, 1, 0, False)]  # online, then the will
        assert presences[2][:2] == (1, 2)  # same boot, next session
        assert presences[2][3]
        assert [p.online for p in standin.presences(steady)] == [True]
        (result,) = standin.frames(dropped, VendResult)
        assert result.dispense.outcome is Outcome.DISPENSED
        assert fleet.is_online(dropped)
        assert fleet.stats["offline_windows"] == 1
        assert fleet.stats["reconnects"] == 1


def test_duplicate_dispenses_finds_planted_duplicate(tmp_path: Path) -> None:
    """duplicate_dispenses reports a vend id the motor turned twice in a hand-written log."""
    log_path = tmp_path / "planted.jsonl"
    lines = [
        {"turn": "a", "machine_id": "VM-1", "vend_id": 11, "slot": 1, "at_ms": 1, "boot": 1},
        {"turn": "b", "machine_id": "VM-2", "vend_id": 22, "slot": 4, "at_ms": 2, "boot": 1},
        {"turn": "a", "outcome": "DISPENSED", "reason": "NONE"},
        # The planted duplicate: vend 11 again, after a reboot; killed before the outcome.
        {"turn": "c", "machine_id": "VM-1", "vend_id": 11, "slot": 1, "at_ms": 9, "boot": 2},
        {"turn": "b", "outcome": "FAILED", "reason": "JAM"},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    log_path.write_text(text + '{"turn": "d", "machine_id": "VM-3", "ven')  # killed mid-line
    records = read_dispense_log(log_path)
    assert [(r.vend_id, r.outcome) for r in records] == [
        (11, "DISPENSED"),
        (22, "FAILED"),
        (11, None),
    ]
    assert duplicate_dispenses(records) == {11: 2}


@pytest.mark.asyncio
async def test_cli_simulate_runs_and_summarises(
    mosquitto: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Vendgate simulate connects the fleet for --duration seconds and prints a summary line."""
    argv = [
        "--set",
        f"mqtt.url={mosquitto.url}",
        "--set",
        f"security.master_secret={SECRET.hex()}",
        "--log-level",
        "error",
        "simulate",
        "--machines",
        "3",
        "--duration",
        "0.5",
        "--dispense-log",
        str(tmp_path / "d.jsonl"),
    ]
    # main() runs its own event loop, so it gets a thread of its own.
    assert await asyncio.to_thread(main, argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("simulate: 3 machines, 0 motor turns (DISPENSED 0, FAILED 0")
    assert out.endswith("0 vend ids turned more than once\n")


def test_cli_simulate_needs_broker_and_secret(capsys: pytest.CaptureFixture[str]) -> None:
    """Vendgate simulate refuses to start without a broker URL or without a master secret."""
    assert main(["simulate", "--machines", "1"]) == 2
    assert "no broker" in capsys.readouterr().err
    assert main(["simulate", "--broker", "mqtt://127.0.0.1:1"]) == 2
    assert "master_secret" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_unreachable_broker_fails_enter() -> None:
    """Entering a fleet whose broker never answers fails with BrokerUnavailableError."""
    settings = FleetSettings(
        broker_host="127.0.0.1",
        broker_port=1,  # nothing listens on tcpmux
        master_secret=SECRET,
        machines=2,
        connect_timeout_s=0.3,
    )
    with pytest.raises(BrokerUnavailableError, match="2 of 2 simulated machines"):
        async with Fleet(settings):
            pass


@pytest.mark.asyncio
@pytest.mark.usefixtures("standin")
async def test_handler_failure_fails_the_fleet(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in a machine's message handler fails the fleet instead of being logged."""

    def broken(*_args: object) -> list[Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(Device, "receive", broken)
    # The stand-in's Time (its answer to Hello) is the first message the device receives.
    with pytest.raises(ExceptionGroup) as caught:
        async with Fleet(_settings(mosquitto)):
            await asyncio.sleep(TIMEOUT)
    (error,) = caught.value.exceptions
    assert isinstance(error, SimulatedMachineError)
    assert error.machine_id == "SIM-0001"
    assert isinstance(error.__cause__, RuntimeError)


@pytest.mark.asyncio
async def test_aborted_connection_leaves_its_will_retained(
    mosquitto: Mosquitto, standin: StandIn
) -> None:
    """CONNECT carries the will of SPEC §3.3: cut off, the machine's retained status is it."""
    async with Fleet(_settings(mosquitto, machines=2)) as fleet:
        gone, stays = fleet.machine_ids
        await standin.ready(fleet, gone)
        fleet.cut_off(gone, 30.0)
        await eventually(lambda: len(standin.presences(gone)) == 2, "the will")
        assert not fleet.is_online(gone)

        # A newcomer reads the will as the machine's retained status; the other is online.
        late = StandIn(mosquitto)
        await late.start()
        try:
            await eventually(lambda: len(late.seen) == 2, "two retained presences")
            retained = {machine_id: (frame, flag) for machine_id, frame, flag in late.seen}
        finally:
            await late.stop()
        will, flag = retained[gone]
        assert flag
        assert isinstance(will, Presence)
        assert (will.boot, will.session, will.seq, will.online) == (1, 1, 0, False)
        online, flag = retained[stays]
        assert flag
        assert isinstance(online, Presence)
        assert online.online
    # SPEC §3.1, §3.5: MQTT 5, Clean Start 0, keep-alive 60 s, the machine id as username.
    for machine_id in fleet.machine_ids:
        assert f"as {machine_id} (p5, c0, k60, u'{machine_id}')" in mosquitto.log_tail(200)


@pytest.mark.asyncio
async def test_idle_machine_pings_and_keeps_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing to publish, a machine sends PINGREQ and the broker keeps it connected."""
    monkeypatch.setattr(simulator, "KEEPALIVE_S", 1)
    monkeypatch.setattr(simulator, "KEEPALIVE_SCAN_S", 0.1)
    broker = Mosquitto(tmp_path / "broker", extra_config="log_type debug")
    async with broker, Fleet(_settings(broker, heartbeat_ms=60_000)) as fleet:
        (machine_id,) = fleet.machine_ids
        await asyncio.sleep(3.0)  # twice the 1.5 s of silence after which a broker drops it
        assert fleet.is_online(machine_id)
        assert (fleet.stats["connects"], fleet.stats["connection_losses"]) == (1, 0)
        pings = broker.log_tail(400).count(f"Received PINGREQ from {machine_id}")
    assert pings >= 3


def _reading(value: int) -> Reading:
    return Reading(dt_ms=0, kind=ReadingKind.TEMPERATURE, slot=None, value=value)


@pytest.mark.asyncio
async def test_frozen_broker_is_noticed_and_unacknowledged_publishes_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A silent broker (SIGSTOP) is given up after 1.5 keep-alive periods.

    On reconnect the resumed session gets the publish it never acknowledged again, with DUP
    and its packet id (MQTT 5 §4.4), so telemetry is not lost (SPEC §7.10).
    """
    monkeypatch.setattr(simulator, "KEEPALIVE_S", 1)
    monkeypatch.setattr(simulator, "KEEPALIVE_SCAN_S", 0.1)
    broker = Mosquitto(tmp_path / "broker", extra_config="log_type debug")
    async with broker:
        process = broker._process
        assert process is not None
        gateway = StandIn(broker)
        await gateway.start()
        try:
            with structlog.testing.capture_logs() as logs:
                async with Fleet(_settings(broker, heartbeat_ms=60_000)) as fleet:
                    (machine_id,) = fleet.machine_ids
                    await gateway.ready(fleet, machine_id)
                    await asyncio.sleep(0.2)  # the PUBACKs of its last publishes
                    loop = asyncio.get_running_loop()
                    os.kill(process.pid, signal.SIGSTOP)
                    try:
                        frozen_at = loop.time()
                        assert fleet.report(machine_id, [_reading(401)])  # no PUBACK comes
                        await eventually(lambda: not fleet.is_online(machine_id), "silence seen")
                        noticed_after = loop.time() - frozen_at
                    finally:
                        os.kill(process.pid, signal.SIGCONT)
                    await eventually(lambda: fleet.is_online(machine_id), "back online")
                    await eventually(
                        lambda: bool(gateway.frames(machine_id, Telemetry)), "the telemetry"
                    )
                    assert fleet.stats["connection_losses"] == 1
                    assert fleet.stats["reconnects"] == 1
        finally:
            await gateway.stop()
        log = broker.log_tail(2000)
    assert noticed_after < 2.5
    assert any(entry["event"] == "simulator.keepalive_timeout" for entry in logs)
    (telemetry, *_) = gateway.frames(machine_id, Telemetry)
    assert [reading.value for reading in telemetry.readings] == [401]
    # Only the telemetry was unacknowledged; the broker may or may not have read the first
    # copy from the dead connection once it was resumed.
    pattern = rf"Received PUBLISH from {machine_id} \(d1, q1, r0, m(\d+), '[^']*/up'"
    assert len(set(re.findall(pattern, log))) == 1


@pytest.mark.asyncio
async def test_refused_connect_backs_off_and_retries(tmp_path: Path) -> None:
    """A CONNACK refusal (0x87: the user name is unknown) is a failed attempt, retried later."""
    passwords = tmp_path / "passwords"
    passwords.write_text("")  # no users: a client sending a user name is refused
    broker = Mosquitto(tmp_path / "broker", extra_config=f"password_file {passwords}")
    settings = _settings(broker, connect_timeout_s=2.0)
    async with broker:
        with (
            structlog.testing.capture_logs() as logs,
            pytest.raises(BrokerUnavailableError, match="1 of 1 simulated machines"),
        ):
            async with Fleet(settings):
                pass
    failures = [entry for entry in logs if entry["event"] == "simulator.connect_failed"]
    assert len(failures) >= 2
    assert all("CONNACK reason 0x87 Not authorized" in entry["error"] for entry in failures)
