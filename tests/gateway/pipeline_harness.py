"""An in-process pipeline for component tests: real PostgreSQL, in-memory wire.

The dispatcher, the uplink handler and the group-commit writer are the real ones,
on a real database. The broker is replaced by :class:`Wire`, which carries frames
between the dispatcher and reference machines (:class:`protocols.device.Device`)
and can lose, duplicate or hold back messages in either direction. Real-broker
tests live in the integration tests; this harness is for the dispatcher's logic.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry

from gateway.dispatcher import Dispatcher
from gateway.keys import KeyRing
from gateway.lifecycle import Timing, VendStatus
from gateway.metrics import VendMetrics
from gateway.store import db, machines, vends
from gateway.store.vends import VendRequest, VendRow
from gateway.store.writer import GroupCommitter
from gateway.uplink import MachineDirectory, Uplink
from protocols.codec import decode
from protocols.device import Device, DeviceSettings, MemoryStore, MotorReport, Publish, StartMotor
from protocols.frames import FailReason, Frame, SlotConfig, UplinkFrame
from protocols.topics import Channel, Topics

MASTER = bytes(range(32))
TOPICS = Topics()
FAST = Timing(
    retry_base_s=0.05,
    retry_cap_s=0.2,
    clock_skew_s=0.5,
    dispense_allowance_s=1.0,
    query_interval_s=0.2,
)

Rule = Callable[[Frame], bool]


@dataclass
class Machine:
    """One reference machine attached to the wire."""

    machine_id: str
    device: Device
    store: MemoryStore
    online: bool = True
    dispense_s: float = 0.05
    report: MotorReport = field(default_factory=lambda: MotorReport(dropped=True, motor_ms=50))
    crash_during_motor: bool = False


@dataclass
class Wire:
    """Carries frames both ways; rules decide what is lost or duplicated."""

    uplink: Uplink | None = None
    keys: KeyRing = field(default_factory=lambda: KeyRing(MASTER))
    machines: dict[str, Machine] = field(default_factory=dict)
    lose_down: list[Rule] = field(default_factory=list)
    lose_up: list[Rule] = field(default_factory=list)
    duplicate_down: list[Rule] = field(default_factory=list)
    motor_runs: Counter[int] = field(default_factory=Counter)
    down_frames: list[tuple[str, Frame]] = field(default_factory=list)
    up_frames: list[tuple[str, Frame]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def now_ms(self) -> int:
        """Return the machines' clock: the same wall clock as the gateway's."""
        return int(time.time() * 1000)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        message_expiry_s: int | None = None,
    ) -> None:
        """Deliver a downlink frame to its machine unless a rule loses it (the publisher)."""
        del qos, retain, message_expiry_s
        machine_id, _ = TOPICS.parse(topic)
        frame = decode(payload, self.keys.key(machine_id))
        self.down_frames.append((machine_id, frame))
        machine = self.machines[machine_id]
        if not machine.online or _take(self.lose_down, frame):
            return
        copies = 2 if _take(self.duplicate_down, frame) else 1
        for _ in range(copies):
            self._run(machine, machine.device.receive(payload, self.now_ms()))

    def _run(self, machine: Machine, actions: list[Publish | StartMotor]) -> None:
        for action in actions:
            if isinstance(action, StartMotor):
                self.motor_runs[action.vend_id] += 1
                self._spawn(self._motor(machine, action))
            else:
                self._spawn(self._up(machine, action))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _up(self, machine: Machine, action: Publish) -> None:
        frame = action.frame
        self.up_frames.append((machine.machine_id, frame))
        if not machine.online or _take(self.lose_up, frame):
            return
        assert self.uplink is not None
        topic = TOPICS.topic(machine.machine_id, action.channel)
        await self.uplink.process(topic, action.payload)

    async def _motor(self, machine: Machine, start: StartMotor) -> None:
        await asyncio.sleep(machine.dispense_s)
        if machine.crash_during_motor:
            machine.crash_during_motor = False
            self.reboot(machine.machine_id)
            return
        device = machine.device
        self._run(machine, device.motor_finished(start.vend_id, machine.report, self.now_ms()))

    def add_machine(self, machine_id: str) -> Machine:
        """Attach a machine (not yet connected)."""
        store = MemoryStore()
        device = Device(
            machine_id,
            self.keys.key(machine_id),
            store,
            now_ms=self.now_ms(),
            settings=DeviceSettings(result_retry_ms=(100, 200, 400)),
        )
        machine = Machine(machine_id, device, store)
        self.machines[machine_id] = machine
        return machine

    def connect(self, machine_id: str) -> None:
        """Bring a machine online: presence, Hello (the dispatcher answers with Time)."""
        machine = self.machines[machine_id]
        machine.online = True
        self._run(machine, machine.device.connected(self.now_ms()))

    def disconnect(self, machine_id: str) -> None:
        """Take a machine offline abruptly."""
        machine = self.machines[machine_id]
        machine.online = False
        machine.device.disconnected()

    def reboot(self, machine_id: str) -> None:
        """Power-cycle a machine over its durable store and reconnect it."""
        machine = self.machines[machine_id]
        machine.device = Device(
            machine_id,
            self.keys.key(machine_id),
            machine.store,
            now_ms=self.now_ms(),
            settings=machine.device.settings,
        )
        self.connect(machine_id)

    def configure(self, machine_id: str, slots: int = 3) -> None:
        """Give the machine a planogram directly (config sync is another issue's job)."""
        from protocols.codec import encode  # noqa: PLC0415
        from protocols.frames import Config  # noqa: PLC0415

        config = Config(
            1,
            tuple(
                SlotConfig(s, f"P{s}", f"Product {s}", 100, 50, drop_sensor=True)
                for s in range(1, slots + 1)
            ),
        )
        machine = self.machines[machine_id]
        payload = encode(config, self.keys.key(machine_id))
        self._run(machine, machine.device.receive(payload, self.now_ms()))

    async def close(self) -> None:
        """Stop the machines' pending work (motors, in-flight uplinks)."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def tick(self) -> None:
        """Drive every online machine's timers (result re-sends, heartbeats)."""
        for machine in self.machines.values():
            if machine.online:
                self._run(machine, machine.device.tick(self.now_ms()))


def _take(rules: list[Rule], frame: Frame) -> bool:
    """Apply the first matching rule once (rules are one-shot)."""
    for i, rule in enumerate(rules):
        if rule(frame):
            del rules[i]
            return True
    return False


@dataclass
class Pipeline:
    """The gateway side: pool, writer, dispatcher, uplink, metrics."""

    pool: asyncpg.Pool
    writer: GroupCommitter
    dispatcher: Dispatcher
    wire: Wire
    registry: CollectorRegistry

    async def vend(
        self, vend_id: str, machine_id: str = "VM-1", *, slot: int = 1, ttl_s: float = 3.0
    ) -> VendRow:
        """Create a vend as the API would and hand it to the dispatcher."""
        request = VendRequest(vend_id, machine_id, slot, 100, "CNY", None)
        deadline = datetime.now(UTC) + timedelta(seconds=ttl_s)
        outcome, row = await self.writer.submit(lambda conn: vends.create(conn, request, deadline))
        assert outcome == "created"
        assert isinstance(row, VendRow)
        self.dispatcher.vend_accepted(row)
        return row

    async def state(self, vend_id: str) -> VendStatus:
        """Return a vend's committed state."""
        async with self.pool.acquire() as conn:
            row = await vends.get(conn, vend_id)
        assert row is not None
        return row.state

    async def wait_for(
        self,
        vend_id: str,
        *states: VendStatus,
        timeout: float = 10.0,  # noqa: ASYNC109  (a polling budget, not a cancellation scope)
    ) -> VendStatus:
        """Wait until a vend reaches one of ``states`` (ticking the machines meanwhile)."""
        deadline = time.monotonic() + timeout
        while True:
            state = await self.state(vend_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"{vend_id} is {state}, expected one of {states}")
            await self.wire.tick()
            await asyncio.sleep(0.05)


async def prepare(dsn: str, machine_ids: tuple[str, ...] = ("VM-1",)) -> asyncpg.Pool:
    """Open a pool on a migrated database with ``machine_ids`` registered."""
    pool = await db.create_pool(dsn, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await db.migrate(conn)
        for machine_id in machine_ids:
            await machines.register(conn, machine_id)
    return pool


async def attach(wire: Wire, machine_ids: tuple[str, ...] = ("VM-1",)) -> None:
    """Add machines to the wire, connect and configure them, and let the clock sync."""
    for machine_id in machine_ids:
        wire.add_machine(machine_id)
        wire.connect(machine_id)
        wire.configure(machine_id)
    await asyncio.sleep(0.1)  # Hello -> Time


@asynccontextmanager
async def pipeline(dsn: str, machine_ids: tuple[str, ...] = ("VM-1",)) -> AsyncIterator[Pipeline]:
    """Run a dispatcher on ``dsn`` with machines wired to it, connected and configured."""
    pool = await prepare(dsn, machine_ids)
    try:
        wire = Wire()
        try:
            async with running(pool, wire) as p:
                await attach(wire, machine_ids)
                yield p
        finally:
            await wire.close()
    finally:
        await pool.close()


@asynccontextmanager
async def running(pool: asyncpg.Pool, wire: Wire) -> AsyncIterator[Pipeline]:
    """Start writer and dispatcher tasks on an existing pool and wire; stop them after."""
    registry = CollectorRegistry()
    metrics = VendMetrics(registry)
    writer = GroupCommitter(pool)
    dispatcher = Dispatcher(
        writer=writer,
        publisher=wire,
        keys=wire.keys,
        topics=TOPICS,
        timing=FAST,
        metrics=metrics,
        listen=pool,
    )
    wire.uplink = Uplink(
        topics=TOPICS,
        keys=wire.keys,
        directory=MachineDirectory(writer),
        sink=dispatcher.on_uplink,
        metrics=metrics,
    )
    writer_task = asyncio.create_task(writer.run(), name="test.writer")
    dispatch_task = asyncio.create_task(dispatcher.run(), name="test.dispatcher")
    try:
        yield Pipeline(pool, writer, dispatcher, wire, registry)
    finally:
        dispatch_task.cancel()
        writer_task.cancel()
        for task in (dispatch_task, writer_task):
            with suppress(asyncio.CancelledError):
                await task


JAM = MotorReport(dropped=False, motor_ms=900, retries=3, fault=FailReason.JAM)

__all__ = ["JAM", "Channel", "Pipeline", "UplinkFrame", "Wire", "pipeline", "running"]
