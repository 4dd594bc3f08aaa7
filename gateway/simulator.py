"""The fleet simulator: many reference machines, each on its own MQTT connection.

Tests, benchmarks and ``vendgate simulate`` use it to drive a gateway the way a real fleet
would and to check exactly-once from the machines' side. Each simulated machine is a
`protocols.device.Device` (the sans-I/O reference machine) over its own `MemoryStore`, so a
simulated reboot keeps the durable vend log and loses everything volatile (SPEC §7.1). This
module is the I/O shell around it: one MQTT 5 connection per machine (client id = machine id,
Clean Start 0, session expiry 600 s, the device's will retained on ``status``), timers for the
spiral motors, and a dispense log that records every motor turn.

Every motor turn is appended to the dispense log (JSON lines) and flushed when the motor
starts, and its outcome is appended when it stops. A checker therefore counts motor turns per
wire vend id even if the simulator is killed mid-turn (`read_dispense_log`,
`duplicate_dispenses`): a vend id turned twice is a double dispense.

All machines share one event loop: one named task per machine owns its connection
(connect, wait for loss, reconnect with jittered backoff), one task ticks every device, one
keeps every connection alive, and motors are ``call_later`` timers, not threads. Everything
runs in a `TaskGroup` owned by `Fleet`'s async context manager.

The MQTT client is a small driver of the sans-I/O codec `protocols.mqtt5` over an
`asyncio.Protocol`, as `gateway.mqtt` is, rather than gmqtt (a read-loop task and a
keep-alive timer per connection): the simulator must stay cheap next to the gateway it drives
(10,000 machines within one core at 1,000 vends/s). A machine's connection is one protocol
object: a socket read is parsed in one call and each message handed to the device at once;
what the fleet writes in one loop iteration goes out in one ``transport.write`` per
connection; one fleet-wide task does every connection's keep-alive.
benchmarks/simulator_fleet.py measures the cost.

Tests inject faults on the real MQTT path through `Fleet.faults` (`Faults`: drop an uplink
frame before it is published, hand a received downlink message to the device twice) and
`Fleet.cut_off` (take one machine off the network for a while).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TextIO

import structlog

from gateway.errors import BrokerUnavailableError, GatewayError
from gateway.logs import get_logger
from protocols import mqtt5
from protocols.codec import FrameKey, check_machine_id, decode, encode
from protocols.device import (
    Action,
    Device,
    DeviceSettings,
    MemoryStore,
    MotorReport,
    Publish,
    StartMotor,
)
from protocols.errors import ProtocolError
from protocols.frames import (
    Config,
    Direction,
    FailReason,
    Frame,
    Outcome,
    Reading,
    SlotConfig,
)
from protocols.topics import DEFAULT_PREFIX, QOS, RETAIN, Channel, Topics

__all__ = [
    "POWER_LOSS",
    "DispenseRecord",
    "Faults",
    "Fleet",
    "FleetSettings",
    "FramePredicate",
    "OfflineWindow",
    "SimulatedMachineError",
    "duplicate_dispenses",
    "read_dispense_log",
]

_log = get_logger("gateway.simulator")

#: Outcome of a motor turn cut short by a simulated power loss (the device reports the vend
#: ``UNCERTAIN``/``POWER_LOSS`` after its reboot, SPEC §7.6).
POWER_LOSS: Final = "power_loss"

#: SPEC §3.5: at least the gateway's longest vend deadline window (vend.max_deadline_s).
SESSION_EXPIRY_S: Final = 600
#: SPEC §3.5 / §7.8: keep-alive of 60 s or less.
KEEPALIVE_S: Final = 60
#: One connect attempt (TCP, CONNACK, SUBACK) gives up after this long and backs off.
CONNECT_TIMEOUT_S: Final = 10.0
DISCONNECT_TIMEOUT_S: Final = 5.0
#: How often one task checks every connection's keep-alive: ping after KEEPALIVE_S / 2
#: without writing (the broker allows 1.5 x KEEPALIVE_S), give up after 1.5 x KEEPALIVE_S
#: without hearing from the broker; both within this much. A scan of 10,000 connections
#: costs a few milliseconds.
KEEPALIVE_SCAN_S: Final = 5.0
#: Reconnect backoff: uniform(0, base * 2 ** min(attempt, cap)), house style #10.
BACKOFF_BASE_S: Final = 0.5
BACKOFF_CAP: Final = 5  # at most 16 s between attempts (SPEC §7.8)
#: Extra time given to running motors at shutdown, beyond the longest possible turn.
MOTOR_DRAIN_MARGIN_S: Final = 1.0


def _now_ms() -> int:
    # The machines' raw clock: wall time, unsynced until the gateway answers Hello with Time.
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------
# Settings and records


@dataclass(frozen=True, slots=True)
class OfflineWindow:
    """Cut machine ``machine_index`` off abruptly ``start_s`` after start-up, for ``duration_s``.

    The connection is dropped without DISCONNECT, so the broker publishes the machine's will;
    the machine keeps running (a motor keeps turning) and reconnects when the window ends.
    """

    machine_index: int
    start_s: float
    duration_s: float


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """What to simulate: how many machines, where, and how often things go wrong."""

    broker_host: str
    broker_port: int
    master_secret: bytes
    machines: int
    id_prefix: str = "SIM-"
    topic_prefix: str = DEFAULT_PREFIX
    #: Physical slots 1..slots; a Config naming any other slot is refused INVALID.
    slots: int = 10
    #: Stock per slot in the reference planogram (`planogram`). A Device starts a newly
    #: configured slot full, so this is each slot's stock once the gateway's Config arrives.
    capacity: int = 1000
    dispense_ms: int = 1500
    #: A turn lasts dispense_ms plus or minus up to this much, uniformly.
    dispense_jitter_ms: int = 500
    #: Per dispense: a JAM fault (FAILED/JAM with the drop sensor on).
    jam_rate: float = 0.0
    #: Per dispense: the motor turned but the drop sensor saw nothing (FAILED/NO_DROP).
    no_drop_rate: float = 0.0
    #: Per dispense: power loss while the motor turns. The connection drops abruptly (the
    #: will fires), and after reboot_ms a new Device over the same store reconnects.
    reboot_rate: float = 0.0
    reboot_ms: int = 3000
    offline: tuple[OfflineWindow, ...] = ()
    tick_ms: int = 1000
    #: Between two heartbeats of a connected machine (SPEC §7.8 recommends 30 s).
    heartbeat_ms: int = 30_000
    #: Connection attempts (and clean disconnects) in flight at once, fleet-wide.
    connect_concurrency: int = 50
    #: `Fleet.__aenter__` fails if the whole fleet is not connected within this time.
    connect_timeout_s: float = 60.0
    seed: int = 0
    dispense_log: Path | None = None

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be between 0 and 1"
            for name in ("jam_rate", "no_drop_rate", "reboot_rate")
            if not 0.0 <= getattr(self, name) <= 1.0
        ]
        if self.jam_rate + self.no_drop_rate > 1.0:
            problems.append("jam_rate + no_drop_rate must not exceed 1")
        if self.machines < 1:
            problems.append("machines must be at least 1")
        if not 1 <= self.slots <= 128:
            problems.append("slots must be between 1 and 128")
        if not 1 <= self.capacity <= 0xFFFF:
            problems.append("capacity must be between 1 and 65535")
        if self.dispense_ms < 0 or self.dispense_jitter_ms < 0 or self.reboot_ms < 0:
            problems.append("dispense_ms, dispense_jitter_ms and reboot_ms must not be negative")
        if self.tick_ms < 1 or self.connect_concurrency < 1 or self.connect_timeout_s <= 0:
            problems.append("tick_ms, connect_concurrency and connect_timeout_s must be positive")
        problems.extend(
            f"offline window {window} is outside the fleet or has a negative time"
            for window in self.offline
            if not 0 <= window.machine_index < self.machines
            or window.start_s < 0
            or window.duration_s < 0
        )
        if problems:
            raise ValueError("; ".join(problems))
        Topics(self.topic_prefix)  # raises ValueError for a bad prefix
        check_machine_id(self.machine_id(self.machines - 1))
        if len(self.master_secret) < 32:
            raise ValueError("master_secret must be at least 32 bytes")

    def machine_id(self, index: int) -> str:
        """Return the id of machine ``index`` (0-based): ``SIM-0001`` for index 0."""
        width = max(4, len(str(self.machines)))
        return f"{self.id_prefix}{index + 1:0{width}d}"

    def planogram(self, version: int = 1) -> Config:
        """Return the reference Config: slots 1..slots, ``capacity`` each, drop sensors on."""
        return Config(
            version=version,
            slots=tuple(
                SlotConfig(
                    slot=n,
                    product_code=f"P{n:03d}",
                    name=f"Product {n}",
                    price=100 * n,
                    capacity=self.capacity,
                    drop_sensor=True,
                )
                for n in range(1, self.slots + 1)
            ),
        )


@dataclass(frozen=True, slots=True)
class DispenseRecord:
    """One motor turn of a simulated machine.

    ``outcome`` is the Outcome name (``DISPENSED``, ``FAILED``, ``UNCERTAIN``), `POWER_LOSS`
    for a turn cut short by a simulated reboot, or None while the motor turns (or if the
    simulator died during the turn). ``reason`` is the FailReason name, when there is one.
    """

    machine_id: str
    vend_id: int
    slot: int
    at_ms: int
    boot: int
    outcome: str | None = None
    reason: str | None = None


def read_dispense_log(path: Path) -> list[DispenseRecord]:
    """Read a dispense log: one record per motor turn, in the order the turns started.

    A turn is a start line (``turn``, ``machine_id``, ``vend_id``, ``slot``, ``at_ms``,
    ``boot``) and, once it ended, an outcome line (``turn``, ``outcome``, ``reason``); one
    line may carry both. A truncated last line (the simulator killed mid-write) is skipped.
    """
    records: dict[str, DispenseRecord] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(item, dict):
            # The file's content is wrong, not the caller's argument: ValueError, not TypeError.
            raise ValueError(f"{path}:{number}: not a JSON object")  # noqa: TRY004
        turn = str(item.get("turn", f"line-{number}"))
        try:
            if "machine_id" in item:
                records[turn] = DispenseRecord(
                    machine_id=str(item["machine_id"]),
                    vend_id=int(item["vend_id"]),
                    slot=int(item["slot"]),
                    at_ms=int(item["at_ms"]),
                    boot=int(item["boot"]),
                )
            if "outcome" in item:
                reason = item.get("reason")
                records[turn] = dataclasses.replace(
                    records[turn],
                    outcome=str(item["outcome"]),
                    reason=None if reason is None else str(reason),
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{number}: bad dispense record: {exc!r}") from None
    return list(records.values())


def duplicate_dispenses(records: Iterable[DispenseRecord]) -> dict[int, int]:
    """Return wire vend id -> motor turns, for every vend id the motor turned more than once."""
    turns = Counter(record.vend_id for record in records)
    return {vend_id: count for vend_id, count in turns.items() if count > 1}


FramePredicate = Callable[[str, Frame], bool]
"""A fault rule: called with (machine id, verified frame); True means "this one"."""


@dataclass(slots=True)
class Faults:
    """Test-only fault injection on the machines' real MQTT path; every rule fires once.

    Append predicates to the lists; the first rule (in list order) that matches a frame is
    removed and its fault applied, so ``drop_up.append(lambda m, f: isinstance(f, VendAck))``
    loses exactly one VendAck of any machine.

    - ``drop_up``: the uplink frame is not published at all, as if lost between the machine
      and the broker. The device does not know: it re-sends what the protocol says it must
      (results, SPEC §7.7) and the gateway re-sends what it must (Vend, SPEC §6.2).
    - ``repeat_down``: a downlink message received from the broker is handed to the device
      twice in a row, as a QoS 1 redelivery would (SPEC §3.2).

    With no rules nothing is decoded, so an idle `Faults` costs nothing. Frames the hooks
    acted on are kept in ``dropped`` and ``repeated`` for the test to inspect.
    """

    drop_up: list[FramePredicate] = field(default_factory=list)
    repeat_down: list[FramePredicate] = field(default_factory=list)
    #: Machines whose every uplink is lost while their connection stays up (a hung radio).
    muted: set[str] = field(default_factory=set)
    dropped: list[tuple[str, Frame]] = field(default_factory=list)
    repeated: list[tuple[str, Frame]] = field(default_factory=list)

    def should_drop(self, machine_id: str, key: FrameKey, payload: bytes) -> bool:
        """Consume a ``drop_up`` rule matching this uplink payload; True if one did."""
        return self._take(self.drop_up, self.dropped, machine_id, key, payload, Direction.UP)

    def should_repeat(self, machine_id: str, key: FrameKey, payload: bytes) -> bool:
        """Consume a ``repeat_down`` rule matching this downlink payload; True if one did."""
        return self._take(self.repeat_down, self.repeated, machine_id, key, payload, Direction.DOWN)

    @staticmethod
    def _take(  # noqa: PLR0917  (a private helper shared by the two public checks)
        rules: list[FramePredicate],
        taken: list[tuple[str, Frame]],
        machine_id: str,
        key: FrameKey,
        payload: bytes,
        direction: Direction,
    ) -> bool:
        if not rules:
            return False
        try:
            frame = decode(payload, key, direction=direction)
        except ProtocolError:
            return False  # not a frame the device would act on: no fault to inject
        for index, rule in enumerate(rules):
            if rule(machine_id, frame):
                del rules[index]
                taken.append((machine_id, frame))
                return True
        return False


class SimulatedMachineError(GatewayError):
    """A simulated machine's event handler failed: a bug in the simulator or the device."""

    def __init__(self, machine_id: str, reason: str) -> None:
        super().__init__(machine_id, reason)
        self.machine_id = machine_id
        self.reason = reason

    def __str__(self) -> str:
        return f"simulated machine {self.machine_id!r} failed: {self.reason}"


class _ConnectionLostError(Exception):
    """The connection went away while it was being set up."""


# ---------------------------------------------------------------------------------------------
# The dispense log


class _DispenseLog:
    """Appends motor turns to the JSON-lines file, flushing every line."""

    def __init__(self, path: Path | None) -> None:
        # One token per run: turn ids stay unique when several runs append to one file.
        self._run = secrets.token_hex(4)
        self._count = 0
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    def start(self, record: DispenseRecord) -> str:
        self._count += 1
        turn = f"{self._run}:{self._count}"
        # The record's fields but the outcome (dataclasses.asdict costs more than the rest).
        self._write(
            {
                "turn": turn,
                "machine_id": record.machine_id,
                "vend_id": record.vend_id,
                "slot": record.slot,
                "at_ms": record.at_ms,
                "boot": record.boot,
            }
        )
        return turn

    def finish(self, turn: str, outcome: str, reason: str | None) -> None:
        self._write({"turn": turn, "outcome": outcome, "reason": reason, "end_ms": _now_ms()})

    def _write(self, item: dict[str, object]) -> None:
        if self._file is not None:
            # Flushed to the OS at once, so the line survives the simulator being killed
            # (not the host losing power; fsync per turn would cost more than it proves).
            self._file.write(json.dumps(item, separators=(",", ":")) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------------------------
# One machine


class _Drop(enum.Enum):
    """Why a machine's connection went away."""

    NETWORK = "network"  # the broker or the network closed it
    OFFLINE = "offline"  # an OfflineWindow cut it
    POWER_LOSS = "power_loss"  # a simulated power loss while the motor turned


@dataclass(slots=True)
class _Motor:
    vend_id: int
    turn: str
    index: int  # position in Fleet.dispenses
    handle: asyncio.TimerHandle


class _ConnectRefusedError(Exception):
    """CONNACK with a reason code of 0x80 or more (MQTT 5 §3.2.2.2): back off and retry."""

    def __init__(self, code: int, reason: str | None) -> None:
        detail = f": {reason}" if reason else ""
        # One readable argument: the machine logs the error's repr when it backs off.
        super().__init__(f"CONNACK reason {mqtt5.reason_name(code)}{detail}")
        self.code = code
        self.reason = reason


_NEVER: Final = float("inf")
_MQTT_PUBLISH: Final = mqtt5.Publish
_PUBACK: Final = mqtt5.puback


class _Writes:
    """The fleet's pending writes: every connection written to in one loop iteration.

    A connection buffers what it is given and goes out in one ``transport.write`` at the
    next iteration, for all connections by one callback rather than one each.
    """

    __slots__ = ("_dirty",)

    def __init__(self) -> None:
        self._dirty: list[_Connection] = []

    def mark(self, connection: _Connection) -> None:
        """Flush ``connection`` at the next loop iteration (it has just begun buffering)."""
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self.flush)
        self._dirty.append(connection)

    def flush(self) -> None:
        """Write out every connection marked since the last flush."""
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            connection.flush()


class _Connection(asyncio.Protocol):
    """One TCP connection of a machine's MQTT client: the transport and the codec.

    Control packets go to the client, PUBLISH packets are acknowledged (before they are
    handled, as gmqtt's optimistic acknowledgement did) and handed to the machine at once.
    """

    __slots__ = (
        "_chunks",
        "_closed",
        "_loop",
        "_reader",
        "_suback",
        "_transport",
        "_writes",
        "client",
        "connack",
        "last_in",
        "last_out",
        "lost",
        "ping_after_s",
        "ready",
        "silent_after_s",
    )

    def __init__(self, client: _MachineClient, writes: _Writes) -> None:
        self.client = client
        self._writes = writes
        self._loop = asyncio.get_running_loop()
        self._reader = mqtt5.Reader()
        self._transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self.connack: asyncio.Future[mqtt5.ConnAck] = self._loop.create_future()
        self._suback: tuple[int, asyncio.Future[tuple[int, ...]]] | None = None
        self._closed: asyncio.Future[None] | None = None
        self.ready = False  # CONNACK accepted
        self.lost = False
        self.last_in = self.last_out = self._loop.time()
        # Keep-alive thresholds, set from the keep alive in force once CONNACK arrives.
        self.ping_after_s = self.silent_after_s = _NEVER

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101  (a stream connection)
        self._transport = transport
        self.last_in = self.last_out = self._loop.time()

    def data_received(self, data: bytes) -> None:
        self.last_in = self._loop.time()
        client = self.client
        try:
            packets = self._reader.feed(data)
        except mqtt5.MqttProtocolError as exc:
            _log.warning(
                "simulator.mqtt_protocol_violation",
                machine_id=client.machine.machine_id,
                error=str(exc),
                reason=exc.reason_code,
            )
            self.write(mqtt5.disconnect(exc.reason_code))
            self.flush()
            self.abort()
            return
        on_message = client.machine.on_message
        transport = self._transport
        for packet in packets:
            if transport is None or transport.is_closing():
                return  # aborted meanwhile: the rest is neither acknowledged nor handled
            if type(packet) is _MQTT_PUBLISH:
                if packet.qos == 1:
                    self.write(_PUBACK(packet.packet_id))
                on_message(client, packet.topic, packet.payload)
            elif type(packet) is mqtt5.PubAck:
                client.acknowledged(packet.packet_id)
            else:
                self._control(packet)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.ready = False
        error = _ConnectionLostError(f"connection lost: {exc!r}" if exc else "connection closed")
        if not self.connack.done():
            self.connack.set_exception(error)
            self.connack.exception()  # retrieved: nobody may be waiting any more
        if self._suback is not None and not self._suback[1].done():
            self._suback[1].set_exception(error)
            self._suback[1].exception()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        self.client.connection_closed(self)

    def _control(self, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.ConnAck):
            if not self.connack.done():
                self.connack.set_result(packet)
        elif isinstance(packet, mqtt5.SubAck):
            if self._suback is not None and self._suback[0] == packet.packet_id:
                waiter = self._suback[1]
                if not waiter.done():
                    waiter.set_result(packet.reason_codes)
        elif isinstance(packet, mqtt5.Disconnect):
            _log.info(
                "simulator.disconnected_by_broker",
                machine_id=self.client.machine.machine_id,
                reason=mqtt5.reason_name(packet.reason_code),
                detail=packet.reason_string,
            )
            self.abort()
        # PINGRESP: its arrival has already moved last_in.

    # --- writing ---

    def write(self, data: bytes) -> None:
        """Buffer ``data``; it goes out with the rest of this iteration's writes."""
        chunks = self._chunks
        if not chunks:
            self._writes.mark(self)
        chunks.append(data)

    def flush(self) -> None:
        """Write what is buffered now; dropped once the connection is closing."""
        chunks = self._chunks
        if not chunks:
            return
        data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
        chunks.clear()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self.last_out = self._loop.time()
            transport.write(data)

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker publishes the will."""
        self.ready = False
        if self._transport is not None:
            self._transport.abort()

    # --- the session ---

    def accepted(self, keepalive_s: int) -> None:
        """CONNACK accepted the connection, with ``keepalive_s`` in force (0: none)."""
        self.ready = True
        if keepalive_s:
            self.ping_after_s = keepalive_s / 2
            self.silent_after_s = keepalive_s * 1.5

    def keep_alive(self, now: float) -> None:
        """MQTT 5 §3.1.2.10: ping when we have been quiet, give up on a silent broker."""
        if now - self.last_in > self.silent_after_s:
            _log.info(
                "simulator.keepalive_timeout",
                machine_id=self.client.machine.machine_id,
                silent_s=round(now - self.last_in, 1),
            )
            self.abort()
        elif now - self.last_out >= self.ping_after_s and not self._chunks:
            self.write(mqtt5.pingreq())

    async def subscribe(self, packet_id: int, topic: str, qos: int) -> tuple[int, ...]:
        """SUBSCRIBE to one filter and return the SUBACK's reason codes."""
        waiter: asyncio.Future[tuple[int, ...]] = self._loop.create_future()
        self._suback = (packet_id, waiter)
        self.write(mqtt5.subscribe(packet_id, [(topic, mqtt5.subscription_options(qos))]))
        try:
            return await waiter
        finally:
            self._suback = None

    async def close(self) -> None:
        """DISCONNECT (reason 0: the session stays, no will), close, wait until closed."""
        transport = self._transport
        if transport is None or self.lost:
            return
        self._closed = self._loop.create_future()
        self.write(mqtt5.disconnect())
        self.flush()
        self.ready = False
        transport.close()
        await self._closed


class _MachineClient:
    """A machine's MQTT 5 client: its session's state across connections, and the current one.

    The session outlives a connection (Clean Start 0, MQTT 5 §4.1): QoS 1 publishes not yet
    acknowledged are kept, with their packet ids, and sent again with DUP when the broker
    resumes the session (§4.4), as gmqtt did. A simulated power loss drops the whole client.
    Reconnecting is `_Machine.run`'s job (jittered backoff, and a will naming the session
    being opened, SPEC §3.3).
    """

    __slots__ = ("_next_id", "_quota", "_unacked", "connection", "machine")

    def __init__(self, machine: _Machine) -> None:
        self.machine = machine
        self.connection: _Connection | None = None
        # Our QoS 1 PUBLISH packets awaiting PUBACK, by packet id, as written.
        self._unacked: dict[int, bytes] = {}
        self._next_id = 0
        self._quota = mqtt5.MAX_PACKET_ID  # the broker's Receive Maximum (§3.2.2.3.3)

    @property
    def is_connected(self) -> bool:
        """Whether the current connection is up and its CONNACK accepted it."""
        connection = self.connection
        return connection is not None and connection.ready

    async def connect(self, host: str, port: int, *, will: tuple[str, bytes, int, bool]) -> None:
        """Open a connection and wait for CONNACK; ``will`` is (topic, payload, QoS, retain).

        Raises OSError, _ConnectionLostError or _ConnectRefusedError (and the caller's
        timeout); the connection then stays this client's until the caller aborts it.
        """
        machine = self.machine
        loop = asyncio.get_running_loop()
        connection = _Connection(self, machine.fleet.writes)
        self.connection = connection
        await loop.create_connection(lambda: connection, host, port)
        topic, payload, qos, retain = will
        connection.write(
            mqtt5.connect(
                machine.machine_id,
                clean_start=False,  # MQTT 5 Clean Start = 0 (SPEC §3.5)
                keepalive_s=KEEPALIVE_S,
                session_expiry_s=SESSION_EXPIRY_S,
                # SPEC §3.1: the machine id is also the username, for broker ACL patterns.
                username=machine.machine_id,
                will_topic=topic,
                will_payload=payload,
                will_qos=qos,
                will_retain=retain,
            )
        )
        connack = await connection.connack
        if connack.reason_code >= 0x80:
            raise _ConnectRefusedError(connack.reason_code, connack.reason_string)
        keepalive = connack.server_keep_alive
        connection.accepted(KEEPALIVE_S if keepalive is None else keepalive)
        self._quota = connack.receive_maximum
        if connack.session_present:
            self._resend()
        else:
            self._unacked.clear()  # §4.1: the broker has no session: neither do we

    def _resend(self) -> None:
        """Send every unacknowledged QoS 1 publish again, with DUP, same packet id (§4.4)."""
        connection = self.connection
        assert connection is not None  # noqa: S101  (called on a fresh connection)
        unacked = self._unacked
        for count, (packet_id, first) in enumerate(list(unacked.items())):
            if count >= self._quota:
                # The broker now takes fewer at once; what cannot be sent is dropped, as a
                # publish beyond the receive maximum is (`publish`).
                del unacked[packet_id]
                self.machine.fleet.stats["publish_dropped_inflight"] += 1
                continue
            again = bytes((first[0] | 0x08,)) + first[1:]
            unacked[packet_id] = again
            connection.write(again)

    async def subscribe_down(self, topic: str) -> None:
        """Subscribe to ``topic`` at QoS 1 and wait for the SUBACK (SPEC §7.8 step 2)."""
        connection = self.connection
        if connection is None or not connection.ready:
            raise _ConnectionLostError("connection closed before SUBSCRIBE")
        granted = await connection.subscribe(self._allocate_id(), topic, QOS[Channel.DOWN])
        if any(code >= 0x80 for code in granted):
            raise _ConnectionLostError(f"subscription to {topic} refused: {granted}")

    def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool) -> bool:
        """Write a PUBLISH on the current connection; False if the receive maximum is reached.

        QoS 1 publishes are not waited for: their PUBACK only frees the packet id.
        """
        connection = self.connection
        assert connection is not None  # noqa: S101  (the caller checked is_connected)
        if not qos:
            connection.write(mqtt5.publish(topic, payload, retain=retain))
            return True
        if len(self._unacked) >= self._quota:
            return False
        packet_id = self._allocate_id()
        data = mqtt5.publish(topic, payload, qos=1, packet_id=packet_id, retain=retain)
        self._unacked[packet_id] = data
        connection.write(data)
        return True

    def acknowledged(self, packet_id: int) -> None:
        """PUBACK: the broker has one of our publishes (whatever its reason code)."""
        self._unacked.pop(packet_id, None)

    def _allocate_id(self) -> int:
        self._next_id = mqtt5.next_packet_id(self._next_id, self._unacked)
        return self._next_id

    def connection_closed(self, connection: _Connection) -> None:
        """Forget a closed transport; tell the machine if it was the current connection."""
        if connection is self.connection:
            self.connection = None
            self.machine.on_disconnect(self)

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, as a power cut or a dead link does.

        The broker then publishes the will (MQTT 5 §3.1.2.5).
        """
        if self.connection is not None:
            self.connection.abort()

    async def disconnect(self) -> None:
        """DISCONNECT cleanly (the session stays, the will is discarded) and close."""
        if self.connection is not None:
            await self.connection.close()


_CONNECT_ERRORS: Final = (OSError, TimeoutError, _ConnectionLostError, _ConnectRefusedError)


class _Machine:
    """One simulated machine: a Device, its durable store, its connection and its motor."""

    def __init__(self, fleet: Fleet, index: int, machine_id: str) -> None:
        settings = fleet.settings
        self.fleet = fleet
        self.index = index
        self.machine_id = machine_id
        self.key = FrameKey.derive(settings.master_secret, machine_id)
        self.store = MemoryStore()
        # Per machine, so a machine's faults do not depend on how the others interleave.
        # Simulated faults and backoff jitter, not secrets: a seeded PRNG is the point.
        self.rng = random.Random(f"{settings.seed}/{machine_id}")  # noqa: S311
        self.backoff_rng = random.Random(f"{settings.seed}/{machine_id}/backoff")  # noqa: S311
        topics = Topics(settings.topic_prefix)
        self.topics = {channel: topics.topic(machine_id, channel) for channel in Channel}
        self.device: Device | None = None  # None while the power is off
        self.client: _MachineClient | None = None
        self.online = False
        self.lost = asyncio.Event()
        self.drop = _Drop.NETWORK
        self.down_until = 0.0  # loop time: offline window or reboot in progress until then
        self.motor: _Motor | None = None
        self.connected_once = False

    # -- the connection task --------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the machine connected until the fleet closes: connect, wait, reconnect."""
        fleet = self.fleet
        loop = asyncio.get_running_loop()
        # This task's own context: its log events (and its connections' protocol callbacks,
        # registered from it) carry the machine id.
        structlog.contextvars.bind_contextvars(machine_id=self.machine_id)
        attempt = 0
        while not fleet.is_closing():
            wait = self.down_until - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # a window may have been extended meanwhile
            if self.device is None:
                self.power_on()
            try:
                async with fleet.connect_slots, asyncio.timeout(CONNECT_TIMEOUT_S):
                    await self._connect()
            except _CONNECT_ERRORS as exc:
                self._discard_connection()
                if fleet.is_closing():
                    return
                attempt += 1
                delay = self.backoff_rng.uniform(0, BACKOFF_BASE_S * 2 ** min(attempt, BACKOFF_CAP))
                fleet.stats["connect_failures"] += 1
                _log.info(
                    "simulator.connect_failed",
                    attempt=attempt,
                    retry_in_s=round(delay, 3),
                    error=repr(exc),
                )
                await asyncio.sleep(delay)
                continue
            if self.connected_once:
                fleet.stats["reconnects"] += 1
            else:
                self.connected_once = True
                fleet.machine_connected()
            fleet.stats["connects"] += 1
            await self.lost.wait()
            if fleet.is_closing():
                return
            drop, self.drop = self.drop, _Drop.NETWORK
            if drop is _Drop.NETWORK:
                fleet.stats["connection_losses"] += 1
                _log.info("simulator.connection_lost")
                attempt = 1
                await asyncio.sleep(self.backoff_rng.uniform(0, BACKOFF_BASE_S * 2))
            else:
                attempt = 0

    def power_on(self) -> None:
        """Start (or restart) the machine: a new Device over the same durable store."""
        self.device = Device(
            self.machine_id,
            self.key,
            self.store,
            now_ms=_now_ms(),
            settings=self.fleet.device_settings,
        )

    async def _connect(self) -> None:
        device = self.device
        assert device is not None  # noqa: S101  (run() powers on before connecting)
        if self.client is None:
            self.client = _MachineClient(self)
        client = self.client
        # SPEC §3.3: the will is Presence(online=false) for the session being opened.
        status = Channel.STATUS
        will = (self.topics[status], device.will(), QOS[status], RETAIN[status])
        self.lost.clear()
        await client.connect(
            self.fleet.settings.broker_host, self.fleet.settings.broker_port, will=will
        )
        # SPEC §7.8: subscribe to down (and have the SUBACK) before Presence and Hello.
        await client.subscribe_down(self.topics[Channel.DOWN])
        if not client.is_connected or self.fleet.is_closing() or self.device is not device:
            raise _ConnectionLostError("connection closed during set-up")
        # Forget a loss signalled by an earlier, discarded connection.
        self.lost.clear()
        self.drop = _Drop.NETWORK
        self.online = True
        self.execute(device.connected(_now_ms()))

    def _discard_connection(self) -> None:
        if self.client is not None:
            self.client.abort()
        self._mark_offline()

    def _mark_offline(self) -> None:
        self.online = False
        if self.device is not None:
            self.device.disconnected()

    # -- connection callbacks (run on the event loop, outside any task) --------------------------

    def on_message(self, client: _MachineClient, topic: str, payload: bytes) -> None:
        """Hand a downlink message to the device and carry out what it says."""
        device = self.device
        if client is not self.client or device is None or self.fleet.is_closing():
            return
        if topic != self.topics[Channel.DOWN]:
            self.fleet.stats["foreign_messages"] += 1
            return
        self.fleet.stats["messages_in"] += 1
        try:
            self.execute(device.receive(payload, _now_ms()))
            faults = self.fleet.faults
            if faults.repeat_down and faults.should_repeat(self.machine_id, self.key, payload):
                self.fleet.stats["fault_repeated_down"] += 1
                self.execute(device.receive(payload, _now_ms()))
        except Exception as exc:  # noqa: BLE001  (a protocol callback has no task to fail)
            self.fleet.fail(self.machine_id, exc)

    def on_disconnect(self, client: _MachineClient) -> None:
        """Note that the current connection is gone; `run` reconnects."""
        if client is not self.client:
            return  # a connection a power loss already discarded
        self._mark_offline()
        self.lost.set()

    # -- actions ---------------------------------------------------------------------------------

    def execute(self, actions: Iterable[Action]) -> None:
        """Carry out the device's actions: publish frames, start the motor."""
        for action in actions:
            if isinstance(action, Publish):
                self._publish(action)
            else:
                self._start_motor(action)

    def _publish(self, action: Publish) -> None:
        client = self.client
        if client is None or not client.is_connected:
            # Explicit drop: the device re-sends what matters (results, SPEC §7.7) on connect.
            self.fleet.stats["publish_dropped_offline"] += 1
            return
        faults = self.fleet.faults
        if self.machine_id in faults.muted or (
            faults.drop_up and faults.should_drop(self.machine_id, self.key, action.payload)
        ):
            self.fleet.stats["fault_dropped_up"] += 1
            return
        channel = action.channel
        if not client.publish(
            self.topics[channel], action.payload, QOS[channel], retain=RETAIN[channel]
        ):
            # The broker's receive maximum of our publishes await PUBACK (MQTT 5 §4.9): the
            # broker is not keeping up. Dropped like an offline publish, and counted.
            self.fleet.stats["publish_dropped_inflight"] += 1
            return
        self.fleet.stats["publishes"] += 1

    def _start_motor(self, action: StartMotor) -> None:
        device = self.device
        assert device is not None  # noqa: S101  (only a powered device starts the motor)
        settings = self.fleet.settings
        jitter = settings.dispense_jitter_ms
        duration_ms = max(0, settings.dispense_ms + self.rng.randint(-jitter, jitter))
        power_loss = self.rng.random() < settings.reboot_rate
        cut_at = self.rng.uniform(0.1, 0.9)
        report = self._motor_report(duration_ms)
        record = DispenseRecord(
            machine_id=self.machine_id,
            vend_id=action.vend_id,
            slot=action.slot,
            at_ms=_now_ms(),
            boot=device.boot,
        )
        turn, index = self.fleet.motor_started(record)
        loop = asyncio.get_running_loop()
        if power_loss:
            handle = loop.call_later(duration_ms * cut_at / 1000, self._power_loss)
        else:
            handle = loop.call_later(duration_ms / 1000, self._motor_done, report)
        self.motor = _Motor(action.vend_id, turn, index, handle)

    def _motor_report(self, duration_ms: int) -> MotorReport:
        settings = self.fleet.settings
        draw = self.rng.random()
        if draw < settings.jam_rate:
            return MotorReport(dropped=False, motor_ms=duration_ms, retries=3, fault=FailReason.JAM)
        if draw < settings.jam_rate + settings.no_drop_rate:
            return MotorReport(dropped=False, motor_ms=duration_ms, retries=3)
        return MotorReport(dropped=True, motor_ms=duration_ms)

    def _motor_done(self, report: MotorReport) -> None:
        motor, device = self.motor, self.device
        try:
            assert motor is not None  # noqa: S101  (the timer is cancelled with the motor)
            assert device is not None  # noqa: S101  (a power loss cancels the timer)
            self.motor = None
            actions = device.motor_finished(motor.vend_id, report, _now_ms())
            entry = device.log_entry(motor.vend_id)
            dispense = entry.dispense if entry is not None else None
            if dispense is None:
                self.fleet.motor_stopped(motor, "unreported", None)
            else:
                self.fleet.motor_stopped(motor, dispense.outcome.name, dispense.reason.name)
            self.execute(actions)
        except Exception as exc:  # noqa: BLE001  (a timer callback has no task to fail)
            self.fleet.fail(self.machine_id, exc)

    def _power_loss(self) -> None:
        motor = self.motor
        self.motor = None
        if motor is not None:
            self.fleet.motor_stopped(motor, POWER_LOSS, None)
        self.fleet.stats["reboots"] += 1
        _log.info("simulator.power_loss", machine_id=self.machine_id)
        self.cut(_Drop.POWER_LOSS, self.fleet.settings.reboot_ms / 1000)

    def cut(self, drop: _Drop, down_for_s: float) -> None:
        """Drop the connection abruptly and stay down for ``down_for_s`` seconds."""
        loop = asyncio.get_running_loop()
        self.down_until = max(self.down_until, loop.time() + down_for_s)
        self.drop = drop
        self._discard_connection()
        if drop is _Drop.POWER_LOSS:
            # RAM is gone: the device's volatile state and the MQTT client's in-flight queue.
            # (The motor turn already ended in _power_loss.)
            self.device = None
            self.client = None
        self.lost.set()

    async def shut_down(self) -> None:
        """Announce offline presence (SPEC §7.8), then DISCONNECT cleanly."""
        client, device = self.client, self.device
        if client is None or device is None or not client.is_connected:
            self._discard_connection()
            return
        self.execute(device.disconnecting())
        self.online = False
        try:
            async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                await client.disconnect()
        except TimeoutError:
            _log.warning("simulator.disconnect_timeout", machine_id=self.machine_id)
            client.abort()


# ---------------------------------------------------------------------------------------------
# The fleet


class Fleet:
    """A fleet of simulated machines; an async context manager that owns their tasks.

    ``async with Fleet(settings) as fleet:`` connects every machine (at most
    ``connect_concurrency`` at a time) and returns once all are connected; leaving the block
    stops intake, lets running motors finish, publishes each machine's offline presence and
    disconnects cleanly.
    """

    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self.device_settings = DeviceSettings(
            slots=frozenset(range(1, settings.slots + 1)), heartbeat_ms=settings.heartbeat_ms
        )
        self.machine_ids: list[str] = [settings.machine_id(i) for i in range(settings.machines)]
        self.dispenses: list[DispenseRecord] = []
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "connects",
                "reconnects",
                "connect_failures",
                "connection_losses",
                "offline_windows",
                "reboots",
                "motor_turns",
                "messages_in",
                "foreign_messages",
                "publishes",
                "publish_dropped_offline",
                "publish_dropped_inflight",
                "fault_dropped_up",
                "fault_repeated_down",
            ),
            0,
        )
        #: Test-only fault injection (see `Faults`); empty, it changes nothing.
        self.faults = Faults()
        #: Every connection's buffered writes, flushed once per loop iteration.
        self.writes = _Writes()
        self._closing = False
        self.connect_slots = asyncio.Semaphore(settings.connect_concurrency)
        self._machines = {
            machine_id: _Machine(self, index, machine_id)
            for index, machine_id in enumerate(self.machine_ids)
        }
        self._log: _DispenseLog | None = None
        self._task_group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._failure: asyncio.Future[tuple[str, BaseException]] | None = None
        self._all_connected = asyncio.Event()
        self._waiting_for = settings.machines
        self._motors = 0
        self._motors_idle = asyncio.Event()
        self._motors_idle.set()

    # -- context manager -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._task_group is not None:
            raise RuntimeError("a Fleet can be entered only once")
        # Opened before any task starts: a brief blocking call, once.
        self._log = _DispenseLog(self.settings.dispense_log)
        self._failure = asyncio.get_running_loop().create_future()
        self._task_group = asyncio.TaskGroup()
        await self._task_group.__aenter__()
        try:
            self._spawn(self._watch(), "simulator.watchdog")
            self._spawn(self._keep_alive(), "simulator.keepalive")
            for machine in self._machines.values():
                self._spawn(machine.run(), f"simulator.machine.{machine.machine_id}")
            timeout = self.settings.connect_timeout_s
            try:
                async with asyncio.timeout(timeout):
                    await self._all_connected.wait()
            except TimeoutError:
                raise BrokerUnavailableError(
                    f"{self._waiting_for} of {self.settings.machines} simulated machines not "
                    f"connected to {self.settings.broker_host}:{self.settings.broker_port} "
                    f"after {timeout} s"
                ) from None
            self._spawn(self._tick(), "simulator.ticker")
            if self.settings.offline:
                self._spawn(self._offline_windows(), "simulator.offline_windows")
        except BaseException as exc:
            await self._close(type(exc), exc, exc.__traceback__)
            raise
        _log.info("simulator.connected", machines=self.settings.machines)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close(exc_type, exc, tb)

    async def run_until(self, stop: asyncio.Event) -> None:
        """Keep simulating until ``stop`` is set (the work itself runs in the fleet's tasks)."""
        await stop.wait()

    # -- views -----------------------------------------------------------------------------------

    def device(self, machine_id: str) -> Device | None:
        """Return the machine's current Device, or None while it reboots."""
        return self._machines[machine_id].device

    def configure_locally(self, config: Config | None = None) -> None:
        """Apply a planogram on every machine directly, as a technician would at installation.

        The gateway pushes the planogram set through its API (``PUT .../planogram``); this
        is for runs that set none (benchmarks), and gives the machines slots to vend from
        (the reference planogram by default).
        """
        planogram = config or self.settings.planogram()
        now_ms = int(time.time() * 1000)
        for machine in self._machines.values():
            if machine.device is not None:
                machine.device.receive(encode(planogram, machine.key), now_ms)

    def report(self, machine_id: str, readings: Iterable[Reading]) -> bool:
        """Publish ``readings`` (and queued events) from the machine as one ``Telemetry``.

        Returns False, publishing nothing, while the machine is off or disconnected.
        """
        machine = self._machines[machine_id]
        device = machine.device
        if device is None:
            return False
        actions = device.report(readings, int(time.time() * 1000))
        machine.execute(actions)
        return bool(actions)

    def store(self, machine_id: str) -> MemoryStore:
        """Return the machine's durable store (it survives simulated reboots)."""
        return self._machines[machine_id].store

    def is_online(self, machine_id: str) -> bool:
        """Whether the machine is connected and has announced itself."""
        return self._machines[machine_id].online

    def outcomes(self) -> Counter[str]:
        """Count motor turns by outcome; a turn still running counts as ``running``."""
        return Counter(record.outcome or "running" for record in self.dispenses)

    def summary(self) -> str:
        """Return the one-line summary ``vendgate simulate`` prints."""
        outcomes = self.outcomes()
        names = [o.name for o in Outcome] + [POWER_LOSS]
        names += sorted(set(outcomes) - set(names))
        by_outcome = ", ".join(f"{name} {outcomes[name]}" for name in names)
        duplicates = duplicate_dispenses(self.dispenses)
        return (
            f"{len(self.machine_ids)} machines, {len(self.dispenses)} motor turns "
            f"({by_outcome}), {len(duplicates)} vend ids turned more than once"
        )

    # -- faults ----------------------------------------------------------------------------------

    def cut_off(self, machine_id: str, duration_s: float) -> None:
        """Drop the machine's connection abruptly now and keep it off for ``duration_s``.

        Like an `OfflineWindow` that starts now: no DISCONNECT, so the broker publishes the
        will; the machine keeps running (and its session keeps queueing downlink messages)
        and reconnects when the time is up. Must be called on the fleet's event loop.
        """
        machine = self._machines[machine_id]
        self.stats["offline_windows"] += 1
        _log.info("simulator.offline", machine_id=machine_id, duration_s=duration_s)
        machine.cut(_Drop.OFFLINE, duration_s)

    # -- used by the machines --------------------------------------------------------------------

    def is_closing(self) -> bool:
        """Whether the fleet is shutting down (machines stop taking messages and reconnecting)."""
        return self._closing

    def machine_connected(self) -> None:
        """Count one machine's first connection; wake `__aenter__` when all are up."""
        self._waiting_for -= 1
        if self._waiting_for == 0:
            self._all_connected.set()

    def motor_started(self, record: DispenseRecord) -> tuple[str, int]:
        """Record a motor turn (and flush it to the log); return its turn id and index."""
        assert self._log is not None  # noqa: S101  (machines run only inside the context)
        turn = self._log.start(record)
        self.dispenses.append(record)
        self.stats["motor_turns"] += 1
        self._motors += 1
        self._motors_idle.clear()
        return turn, len(self.dispenses) - 1

    def motor_stopped(self, motor: _Motor, outcome: str, reason: str | None) -> None:
        """Record how a motor turn ended."""
        assert self._log is not None  # noqa: S101  (machines run only inside the context)
        self._log.finish(motor.turn, outcome, reason)
        record = self.dispenses[motor.index]
        self.dispenses[motor.index] = dataclasses.replace(record, outcome=outcome, reason=reason)
        self._motors -= 1
        if self._motors == 0:
            self._motors_idle.set()

    def fail(self, machine_id: str, exc: BaseException) -> None:
        """Fail the fleet from a callback: the watchdog task raises it in the task group."""
        if self._failure is not None and not self._failure.done():
            self._failure.set_result((machine_id, exc))

    # -- internals -------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        assert self._task_group is not None  # noqa: S101  (called inside the context only)
        self._tasks.append(self._task_group.create_task(coro, name=name))

    async def _watch(self) -> None:
        assert self._failure is not None  # noqa: S101  (created before the task)
        machine_id, exc = await self._failure
        raise SimulatedMachineError(machine_id, repr(exc)) from exc

    async def _tick(self) -> None:
        interval = self.settings.tick_ms / 1000
        machines = list(self._machines.values())
        while not self._closing:
            await asyncio.sleep(interval)
            now = _now_ms()
            for machine in machines:
                device = machine.device
                if device is not None and (actions := device.tick(now)):
                    machine.execute(actions)

    async def _keep_alive(self) -> None:
        # One task for every connection's keep-alive (MQTT 5 §3.1.2.10), not a timer each.
        loop = asyncio.get_running_loop()
        machines = list(self._machines.values())
        while True:
            await asyncio.sleep(KEEPALIVE_SCAN_S)
            now = loop.time()
            for machine in machines:
                client = machine.client
                connection = None if client is None else client.connection
                if connection is not None and (
                    now - connection.last_out >= connection.ping_after_s
                    or now - connection.last_in > connection.silent_after_s
                ):
                    connection.keep_alive(now)

    async def _offline_windows(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        machines = list(self._machines.values())
        for window in sorted(self.settings.offline, key=lambda w: w.start_s):
            await asyncio.sleep(max(0.0, start + window.start_s - loop.time()))
            self.cut_off(machines[window.machine_index].machine_id, window.duration_s)

    async def _close(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Shutdown order (house style #9): stop intake, let running motors finish within a
        # deadline, stop the tasks, announce offline presence and disconnect.
        try:
            self._closing = True
            await self._drain_motors()
            # A machine task cancelled mid-connect leaves a connection shut_down aborts.
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks)
            async with asyncio.TaskGroup() as group:
                for machine in self._machines.values():
                    group.create_task(
                        self._bounded(machine.shut_down()),
                        name=f"simulator.shutdown.{machine.machine_id}",
                    )
        finally:
            for task in self._tasks:
                task.cancel()
            try:
                await self._exit_task_group(exc_type, exc, tb)
            finally:
                if self._log is not None:
                    self._log.close()
        _log.info("simulator.closed", **self.stats)

    async def _drain_motors(self) -> None:
        drain_s = (
            self.settings.dispense_ms + self.settings.dispense_jitter_ms
        ) / 1000 + MOTOR_DRAIN_MARGIN_S
        try:
            async with asyncio.timeout(drain_s):
                await self._motors_idle.wait()
        except TimeoutError:
            _log.warning("simulator.motors_still_running", motors=self._motors)
        for machine in self._machines.values():
            if machine.motor is not None:
                machine.motor.handle.cancel()

    async def _exit_task_group(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task_group is None:
            return
        # Our own tasks are cancelled by now, so the group has only its children's errors to
        # report. A cancellation is passed on for the group's bookkeeping (it may stand for a
        # failed child); any other error from the body stays the caller's own, rather than
        # being wrapped in the group's ExceptionGroup.
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            await self._task_group.__aexit__(exc_type, exc, tb)
        else:
            await self._task_group.__aexit__(None, None, None)

    async def _bounded(self, work: Coroutine[Any, Any, None]) -> None:
        async with self.connect_slots:
            await work
