"""Reference machine logic, sans-I/O (SPEC §7).

:class:`Device` is what a vending machine's communication module does with the
protocol, written to be read by firmware engineers and driven by vendgate's
simulator and tests. It never touches a network, a clock or a motor: the host
calls it with events and the current time, and carries out the actions it
returns (:class:`Publish`, :class:`StartMotor`).

Durable state (boot count, vend log, log floor, planogram) lives behind the
small :class:`DeviceStore` interface. Constructing a :class:`Device` over an
existing store is a reboot: volatile state (clock offset, sessions, timers) is
lost, the durable log is not.

Time is in milliseconds. ``now_ms`` is the machine's own free-running clock;
the device adds the offset learnt from ``Time`` frames to get wall-clock time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from protocols.codec import FrameKey, decode, decode_unverified, encode
from protocols.errors import BadMacError, ProtocolError
from protocols.frames import (
    AckCode,
    Config,
    ConfigAck,
    ConfigStatus,
    Direction,
    Dispense,
    Event,
    FailReason,
    Frame,
    Heartbeat,
    Hello,
    Outcome,
    Presence,
    Reading,
    ResultAck,
    SlotConfig,
    StatusQuery,
    StatusReply,
    Telemetry,
    Time,
    UplinkFrame,
    Vend,
    VendAck,
    VendResult,
    VendState,
)
from protocols.topics import Channel

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

UF = TypeVar("UF", bound=UplinkFrame)

# --- actions the host carries out -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish ``payload`` on the machine's ``channel`` topic (QoS 1; retained on STATUS)."""

    channel: Channel
    payload: bytes
    frame: Frame


@dataclass(frozen=True, slots=True)
class StartMotor:
    """Turn the spiral of ``slot`` for ``vend_id``; report back with ``motor_finished``."""

    vend_id: int
    slot: int


Action = Publish | StartMotor


@dataclass(frozen=True, slots=True)
class MotorReport:
    """What the vend hardware observed while dispensing."""

    dropped: bool
    motor_ms: int
    retries: int = 0
    fault: FailReason | None = None


# --- durable state ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One vend id in the persistent vend log.

    ``slot`` and ``price`` are None for a tombstone written by a status query
    about a vend the machine never saw (SPEC §7.5).
    """

    vend_id: int
    deadline: int
    slot: int | None
    price: int | None
    state: VendState
    code: AckCode = AckCode.ACCEPTED
    dispense: Dispense | None = None
    result_acked: bool = False

    @property
    def evictable(self) -> bool:
        """Final and settled: a refusal, or a result the gateway has acknowledged."""
        return self.state is VendState.REJECTED or (
            self.state is VendState.DONE and self.result_acked
        )


@dataclass(frozen=True, slots=True)
class SlotRecord:
    """Durable state of one slot: stock count, in service or not, failures in a row."""

    slot: int
    stock: int
    enabled: bool
    failures: int


@dataclass(frozen=True, slots=True)
class DeviceMeta:
    """Durable scalars: boot count, log floor, the applied planogram and the slots' state."""

    boot: int = 0
    log_floor: int = 0
    config: Config | None = None
    slots: tuple[SlotRecord, ...] = ()


class DeviceStore(Protocol):
    """Durable storage. Every write must be on stable storage when the call returns."""

    def load_meta(self) -> DeviceMeta:
        """Return the stored scalars (defaults on a factory-new machine)."""
        ...

    def write_meta(self, meta: DeviceMeta) -> None:
        """Replace the stored scalars."""
        ...

    def load_log(self) -> Iterable[LogEntry]:
        """Return every vend log entry."""
        ...

    def write_entry(self, entry: LogEntry) -> None:
        """Insert or replace the entry for ``entry.vend_id``."""
        ...

    def remove_entry(self, vend_id: int) -> None:
        """Delete the entry for ``vend_id``."""
        ...


@dataclass
class MemoryStore:
    """A :class:`DeviceStore` in memory; it survives a simulated reboot, not the process."""

    meta: DeviceMeta = field(default_factory=DeviceMeta)
    log: dict[int, LogEntry] = field(default_factory=dict)
    writes: int = 0

    def load_meta(self) -> DeviceMeta:
        """Return the stored scalars."""
        return self.meta

    def write_meta(self, meta: DeviceMeta) -> None:
        """Replace the stored scalars."""
        self.meta = meta
        self.writes += 1

    def load_log(self) -> Iterable[LogEntry]:
        """Return every entry."""
        return list(self.log.values())

    def write_entry(self, entry: LogEntry) -> None:
        """Insert or replace one entry."""
        self.log[entry.vend_id] = entry
        self.writes += 1

    def remove_entry(self, vend_id: int) -> None:
        """Delete one entry."""
        self.log.pop(vend_id, None)
        self.writes += 1


# --- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    """Tunables of the reference machine; the defaults are the SPEC's recommendations."""

    firmware: str = "vendgate-ref/1"
    #: Physical slots; a ``Config`` naming any other slot is refused as INVALID.
    slots: frozenset[int] = frozenset(range(1, 61))
    log_capacity: int = 256
    #: A settled entry stays at least this long past its deadline before it may be evicted.
    log_grace_s: int = 600
    heartbeat_ms: int = 30_000
    result_retry_ms: tuple[int, ...] = (2_000, 4_000, 8_000, 16_000, 30_000)
    time_resync_ms: int = 6 * 3600 * 1000
    max_time_rtt_ms: int = 2_000
    #: Least time between two time requests made outside the heartbeat (SPEC §9).
    time_request_interval_ms: int = 5_000
    bad_mac_answer_interval_ms: int = 10_000
    #: Consecutive failed dispenses after which a slot is taken out of service.
    slot_fault_limit: int = 3


@dataclass
class SlotState:
    """Working copy of one slot's state; saved as a :class:`SlotRecord` when it changes."""

    stock: int
    enabled: bool = True
    consecutive_failures: int = 0


# --- the machine ------------------------------------------------------------------------------


class Device:
    """The protocol logic of one vending machine."""

    def __init__(
        self,
        machine_id: str,
        key: FrameKey,
        store: DeviceStore,
        *,
        now_ms: int,
        settings: DeviceSettings | None = None,
    ) -> None:
        self.machine_id = machine_id
        self.settings = settings or DeviceSettings()
        self._key = key
        self._store = store
        meta = store.load_meta()
        self._meta = dataclasses.replace(meta, boot=meta.boot + 1)
        store.write_meta(self._meta)
        self._log: dict[int, LogEntry] = {e.vend_id: e for e in store.load_log()}
        self._seq = 0
        self._boot_ms = now_ms
        self._clock_offset_ms: int | None = None
        self._last_sync_ms = 0
        self._time_request: tuple[int, int] | None = None  # (seq, sent at)
        self._session = 0
        self._connected = False
        self._next_heartbeat_ms = 0
        self._resend_at: dict[int, tuple[int, int]] = {}  # vend id -> (due, retry index)
        self._last_bad_mac_answer_ms: int | None = None
        self._events: list[Event] = []
        self._events_t0_ms: int | None = None
        self.active_vend: int | None = None
        self.slots: dict[int, SlotState] = {}
        self.counters: dict[str, int] = {}
        if self._meta.config is not None:
            self._apply_slots(self._meta.config.slots)
        self.rssi = -67
        self._recover()

    # -- properties ---------------------------------------------------------------------------

    @property
    def boot(self) -> int:
        """The boot count, incremented durably at every start."""
        return self._meta.boot

    @property
    def config_version(self) -> int:
        """Version of the applied planogram, 0 if none."""
        return self._meta.config.version if self._meta.config else 0

    @property
    def log_floor(self) -> int:
        """Largest deadline ever evicted from the log (SPEC §7.4)."""
        return self._meta.log_floor

    @property
    def clock_synced(self) -> bool:
        """True once a ``Time`` frame has been accepted since boot."""
        return self._clock_offset_ms is not None

    def clock_ms(self, now_ms: int) -> int:
        """Wall-clock time as the machine believes it (raw clock if never synced)."""
        return now_ms + (self._clock_offset_ms or 0)

    def log_entry(self, vend_id: int) -> LogEntry | None:
        """Return the log entry for ``vend_id``, if any."""
        return self._log.get(vend_id)

    def log_entries(self) -> Iterator[LogEntry]:
        """Iterate over the vend log."""
        return iter(self._log.values())

    # -- connection ---------------------------------------------------------------------------

    def will(self) -> bytes:
        """Return the last-will payload to give the broker for the next connection.

        It is ``Presence(online=False)`` for the session that ``connected`` will open,
        with ``seq`` 0: a will is built before the session's frames are numbered (SPEC §5.2).
        """
        will = Presence(boot=self.boot, seq=0, session=self._session + 1, online=False)
        return encode(will, self._key)

    def disconnecting(self) -> list[Action]:
        """Call before a clean MQTT DISCONNECT: publish the offline presence ourselves."""
        self._connected = False
        offline = self._uplink(Presence, session=self._session, online=False)
        return [self._publish(Channel.STATUS, offline)]

    def connected(self, now_ms: int) -> list[Action]:
        """Call after CONNACK: announce presence and Hello, re-send pending results."""
        self._session += 1
        self._connected = True
        self._next_heartbeat_ms = now_ms + self.settings.heartbeat_ms
        presence = self._uplink(Presence, session=self._session, online=True)
        hello = self._uplink(
            Hello,
            firmware=self.settings.firmware,
            config_version=self.config_version,
            clock_ms=self.clock_ms(now_ms),
        )
        self._time_request = (hello.seq, now_ms)
        actions: list[Action] = [
            self._publish(Channel.STATUS, presence),
            self._publish(Channel.UP, hello),
        ]
        actions.extend(
            self._send_result(entry, now_ms, retry_index=0)
            for entry in list(self._log.values())
            if entry.state is VendState.DONE and not entry.result_acked
        )
        return actions

    def disconnected(self) -> None:
        """Call when the MQTT connection is lost or closed."""
        self._connected = False

    # -- inputs -------------------------------------------------------------------------------

    def receive(self, payload: bytes, now_ms: int) -> list[Action]:
        """Handle one message from the downlink topic."""
        try:
            frame = decode(payload, self._key, direction=Direction.DOWN)
        except BadMacError:
            self._count("bad_mac")
            return self._answer_bad_mac(payload, now_ms)
        except ProtocolError as exc:
            self._count(exc.kind)
            return []
        match frame:
            case Vend():
                return self._on_vend(frame, now_ms)
            case ResultAck():
                return self._on_result_ack(frame)
            case StatusQuery():
                return self._on_status_query(frame, now_ms)
            case Config():
                return self._on_config(frame)
            case Time():
                self._on_time(frame, now_ms)
                return []
            case _:  # pragma: no cover - decode(direction=DOWN) returns only the above
                return []

    def motor_finished(self, vend_id: int, report: MotorReport, now_ms: int) -> list[Action]:
        """Call when the motor stops: record the outcome durably, then report it."""
        entry = self._log.get(vend_id)
        if entry is None or entry.state is not VendState.DISPENSING or entry.slot is None:
            self._count("stray_motor_report")
            return []
        slot_no = entry.slot
        slot = self.slots.get(slot_no)
        sensor = self._slot_config(slot_no).drop_sensor if slot else True
        dispense = _judge(report, drop_sensor=sensor)
        self._put(dataclasses.replace(entry, state=VendState.DONE, dispense=dispense))
        self.active_vend = None
        if slot is not None:
            self._account(slot_no, slot, dispense, now_ms)
        entry = self._log[vend_id]
        return [self._send_result(entry, now_ms, retry_index=0)]

    def tick(self, now_ms: int) -> list[Action]:
        """Call periodically (every second is plenty): heartbeats and result re-sends."""
        if not self._connected:
            return []
        actions: list[Action] = []
        if now_ms >= self._next_heartbeat_ms:
            self._next_heartbeat_ms = now_ms + self.settings.heartbeat_ms
            actions.append(self._heartbeat(now_ms))
            if self._events:
                actions.append(self._publish(Channel.UP, self._telemetry((), now_ms)))
        for vend_id, (due, index) in list(self._resend_at.items()):
            entry = self._log.get(vend_id)
            if entry is None or entry.result_acked:
                del self._resend_at[vend_id]
            elif now_ms >= due:
                actions.append(self._send_result(entry, now_ms, retry_index=index + 1))
        return actions

    def report(self, readings: Iterable[Reading], now_ms: int) -> list[Action]:
        """Publish readings (and any pending events) as one ``Telemetry`` frame."""
        if not self._connected:
            return []
        return [self._publish(Channel.UP, self._telemetry(tuple(readings), now_ms))]

    def record_event(self, code: str, slot: int | None, now_ms: int, *, active: bool) -> None:
        """Queue an event for the next ``Telemetry`` frame."""
        if self._events_t0_ms is None:
            self._events_t0_ms = self.clock_ms(now_ms)
        dt = max(0, self.clock_ms(now_ms) - self._events_t0_ms)
        self._events.append(Event(dt_ms=dt, code=code, slot=slot, active=active))

    def restock(self, slot: int, stock: int) -> None:
        """Record that an operator refilled ``slot``, which also puts it back in service."""
        state = self.slots.get(slot)
        if state is not None:
            capacity = self._slot_config(slot).capacity
            state.stock = min(stock, capacity)
            state.consecutive_failures = 0
            state.enabled = True
            self._save_slots()

    # -- vend ---------------------------------------------------------------------------------

    def _on_vend(self, vend: Vend, now_ms: int) -> list[Action]:
        entry = self._log.get(vend.vend_id)
        if entry is not None:
            return self._on_duplicate(vend, entry, now_ms)
        code = self._refusal(vend, now_ms)
        if code.is_transient:
            self._count(f"refused_{code.name.lower()}")
            actions: list[Action] = [self._ack(vend, code, duplicate=False)]
            if code is AckCode.CLOCK_UNSYNCED and self._may_ask_time(now_ms):
                # Ask now rather than at the next heartbeat: the gateway is waiting (SPEC §9).
                actions.append(self._heartbeat(now_ms, want_time=True))
            return actions
        if not self._make_room(now_ms):
            if code is AckCode.EXPIRED and vend.deadline <= self.log_floor:
                # The durable floor refuses this deadline forever, so the answer is final
                # without an entry; LOG_FULL would invite retries of a vend that can never
                # happen, and after an eviction the log is full by construction (SPEC §7.4).
                self._count("refused_expired")
                return [self._ack(vend, code, duplicate=False)]
            self._count("refused_log_full")
            return [self._ack(vend, AckCode.LOG_FULL, duplicate=False)]
        if code is not AckCode.ACCEPTED:
            self._put(self._new_entry(vend, VendState.REJECTED, code))
            return [self._ack(vend, code, duplicate=False)]
        # Durable before the ack, and DISPENSING durable before the motor turns (SPEC §7.2).
        self._put(self._new_entry(vend, VendState.ACCEPTED, code))
        self._put(self._new_entry(vend, VendState.DISPENSING, code))
        self.active_vend = vend.vend_id
        return [self._ack(vend, code, duplicate=False), StartMotor(vend.vend_id, vend.slot)]

    def _refusal(self, vend: Vend, now_ms: int) -> AckCode:
        """Decide the answer to a vend the log has never seen (SPEC §7.2, in this order)."""
        if self._clock_offset_ms is None:
            return AckCode.CLOCK_UNSYNCED
        if self.clock_ms(now_ms) >= vend.deadline * 1000 or vend.deadline <= self.log_floor:
            return AckCode.EXPIRED
        slot = self.slots.get(vend.slot)
        if slot is None:
            return AckCode.UNKNOWN_SLOT
        if not slot.enabled:
            return AckCode.SLOT_DISABLED
        if slot.stock <= 0:
            return AckCode.SLOT_EMPTY
        if self.active_vend is not None:
            return AckCode.BUSY
        return AckCode.ACCEPTED

    def _on_duplicate(self, vend: Vend, entry: LogEntry, now_ms: int) -> list[Action]:
        self._count("duplicate_vend")
        if (
            vend.deadline != entry.deadline
            or entry.slot not in (None, vend.slot)
            or entry.price not in (None, vend.price)
        ):
            self._count("conflict")
            return [self._ack(vend, AckCode.CONFLICT, duplicate=False)]
        actions: list[Action] = [self._ack(vend, entry.code, duplicate=True)]
        if entry.state is VendState.DONE:
            actions.append(self._send_result(entry, now_ms, retry_index=0))
        return actions

    def _new_entry(self, vend: Vend, state: VendState, code: AckCode) -> LogEntry:
        return LogEntry(
            vend_id=vend.vend_id,
            deadline=vend.deadline,
            slot=vend.slot,
            price=vend.price,
            state=state,
            code=code,
        )

    def _make_room(self, now_ms: int) -> bool:
        """Evict one settled entry if the log is full; False if none may go (SPEC §7.4)."""
        if len(self._log) < self.settings.log_capacity:
            return True
        if self._clock_offset_ms is None:
            return False
        horizon_s = self.clock_ms(now_ms) // 1000 - self.settings.log_grace_s
        victims = [e for e in self._log.values() if e.evictable and e.deadline < horizon_s]
        if not victims:
            return False
        victim = min(victims, key=lambda e: e.deadline)
        # Raise the floor first: a crash between the two writes must not forget an id
        # without also refusing every deadline up to it.
        if victim.deadline > self._meta.log_floor:
            self._set_meta(log_floor=victim.deadline)
        self._store.remove_entry(victim.vend_id)
        del self._log[victim.vend_id]
        self._count("log_evicted")
        return True

    def _on_result_ack(self, ack: ResultAck) -> list[Action]:
        entry = self._log.get(ack.vend_id)
        if entry is not None and entry.state is VendState.DONE and not entry.result_acked:
            self._put(dataclasses.replace(entry, result_acked=True))
            self._resend_at.pop(ack.vend_id, None)
        return []

    def _send_result(self, entry: LogEntry, now_ms: int, *, retry_index: int) -> Publish:
        assert entry.dispense is not None  # noqa: S101  (only DONE entries are sent)
        delays = self.settings.result_retry_ms
        index = min(retry_index, len(delays) - 1)
        self._resend_at[entry.vend_id] = (now_ms + delays[index], index)
        frame = self._uplink(VendResult, vend_id=entry.vend_id, dispense=entry.dispense)
        return self._publish(Channel.UP, frame)

    def _account(self, slot_no: int, slot: SlotState, dispense: Dispense, now_ms: int) -> None:
        """Update stock and the fault counter; take a failing slot out of service."""
        if dispense.outcome is Outcome.DISPENSED:
            slot.stock = max(0, slot.stock - 1)
            slot.consecutive_failures = 0
        else:
            slot.consecutive_failures += 1
            if dispense.reason is FailReason.JAM:
                self.record_event("EJC", slot_no, now_ms, active=True)
            elif dispense.reason is FailReason.SENSOR_FAULT:
                self.record_event("EJL", slot_no, now_ms, active=True)
            elif dispense.reason is FailReason.SLOT_EMPTY:
                slot.stock = 0
            if slot.consecutive_failures >= self.settings.slot_fault_limit and slot.enabled:
                slot.enabled = False
                self.record_event("XSD", slot_no, now_ms, active=True)
        self._save_slots()

    # -- status, config, time -----------------------------------------------------------------

    def _on_status_query(self, query: StatusQuery, now_ms: int) -> list[Action]:
        state, code, dispense = VendState.NOT_SEEN, AckCode.ACCEPTED, None
        if query.vend_id is not None and query.deadline is not None:
            entry = self._log.get(query.vend_id)
            if entry is None:
                entry = self._tombstone(query.vend_id, query.deadline, now_ms)
            if entry is None:
                state = (
                    VendState.FORGOTTEN if query.deadline <= self.log_floor else VendState.NOT_SEEN
                )
            elif entry.deadline != query.deadline:
                # Not the vend the gateway means: answering its state would settle the wrong one.
                self._count("conflict")
                state, code = VendState.MISMATCH, AckCode.CONFLICT
            else:
                state, code, dispense = entry.state, entry.code, entry.dispense
        reply = self._uplink(
            StatusReply,
            vend_id=query.vend_id,
            vend_state=state,
            code=code,
            dispense=dispense,
            active_vend=self.active_vend,
            config_version=self.config_version,
            clock_ms=self.clock_ms(now_ms),
        )
        return [self._publish(Channel.UP, reply)]

    def _tombstone(self, vend_id: int, deadline: int, now_ms: int) -> LogEntry | None:
        """Record that a never-seen vend past its deadline will never be accepted (SPEC §7.5)."""
        if (
            self._clock_offset_ms is None
            or deadline <= self.log_floor
            or self.clock_ms(now_ms) < deadline * 1000
            or not self._make_room(now_ms)
        ):
            return None
        entry = LogEntry(
            vend_id=vend_id,
            deadline=deadline,
            slot=None,
            price=None,
            state=VendState.REJECTED,
            code=AckCode.EXPIRED,
        )
        self._put(entry)
        return entry

    def _on_config(self, config: Config) -> list[Action]:
        current = self.config_version
        if config.version <= current:
            status = ConfigStatus.STALE
        elif any(s.slot not in self.settings.slots for s in config.slots):
            status = ConfigStatus.INVALID
        else:
            self._set_meta(config=config)
            self._apply_slots(config.slots)
            self._save_slots()
            status = ConfigStatus.APPLIED
        ack = self._uplink(
            ConfigAck,
            version=config.version,
            status=status,
            current_version=self.config_version,
        )
        return [self._publish(Channel.UP, ack)]

    def _apply_slots(self, slots: Iterable[SlotConfig]) -> None:
        """Build the slot view for a planogram from the saved slot records (SPEC §7.9).

        A slot new to the machine starts full; a known slot keeps its stock (clipped to
        the new capacity), its service state and its failure count.
        """
        saved = {r.slot: r for r in self._meta.slots}
        new: dict[int, SlotState] = {}
        for cfg in slots:
            old = saved.get(cfg.slot)
            new[cfg.slot] = (
                SlotState(stock=cfg.capacity)
                if old is None
                else SlotState(
                    stock=min(old.stock, cfg.capacity),
                    enabled=old.enabled,
                    consecutive_failures=old.failures,
                )
            )
        self.slots = new

    def _save_slots(self) -> None:
        records = tuple(
            SlotRecord(slot=n, stock=s.stock, enabled=s.enabled, failures=s.consecutive_failures)
            for n, s in sorted(self.slots.items())
        )
        if records != self._meta.slots:
            self._set_meta(slots=records)

    def _slot_config(self, slot: int) -> SlotConfig:
        config = self._meta.config
        assert config is not None  # noqa: S101  (slots exist only once a config is applied)
        return next(s for s in config.slots if s.slot == slot)

    def _on_time(self, time: Time, now_ms: int) -> None:
        request = self._time_request
        if request is None or (time.echo_boot, time.echo_seq) != (self.boot, request[0]):
            self._count("time_unsolicited")
            return
        rtt = now_ms - request[1]
        self._time_request = None  # consumed: a duplicate delivery cannot step the clock again
        if not 0 <= rtt <= self.settings.max_time_rtt_ms:
            self._count("time_too_slow")
            return
        # The gateway read its clock about half a round trip ago (SPEC §9).
        self._clock_offset_ms = time.now_ms + rtt // 2 - now_ms
        self._last_sync_ms = now_ms

    def _may_ask_time(self, now_ms: int) -> bool:
        """Whether a new time request is allowed: none outstanding for the last interval."""
        request = self._time_request
        return request is None or now_ms - request[1] >= self.settings.time_request_interval_ms

    def _heartbeat(self, now_ms: int, *, want_time: bool = False) -> Publish:
        want_time = (
            want_time
            or self._clock_offset_ms is None
            or now_ms - self._last_sync_ms >= self.settings.time_resync_ms
        )
        frame = self._uplink(
            Heartbeat,
            clock_ms=self.clock_ms(now_ms),
            rssi=self.rssi,
            uptime_s=(now_ms - self._boot_ms) // 1000,
            want_time=want_time,
        )
        if want_time:
            self._time_request = (frame.seq, now_ms)
        return self._publish(Channel.UP, frame)

    def _telemetry(self, readings: tuple[Reading, ...], now_ms: int) -> Telemetry:
        t0 = self._events_t0_ms if self._events_t0_ms is not None else self.clock_ms(now_ms)
        events = tuple(self._events[:256])
        del self._events[:256]
        if not self._events:
            self._events_t0_ms = None
        return self._uplink(Telemetry, t0_ms=t0, readings=readings[:256], events=events)

    # -- recovery and helpers -----------------------------------------------------------------

    def _recover(self) -> None:
        """Settle vends a reboot interrupted (SPEC §7.6)."""
        for entry in list(self._log.values()):
            if entry.state is VendState.ACCEPTED:
                # The motor never started: provably not dispensed.
                outcome = _settled(Outcome.FAILED)
            elif entry.state is VendState.DISPENSING:
                # The motor may have turned and the product may have dropped: say so.
                outcome = _settled(Outcome.UNCERTAIN)
            else:
                continue
            self._put(dataclasses.replace(entry, state=VendState.DONE, dispense=outcome))

    def _answer_bad_mac(self, payload: bytes, now_ms: int) -> list[Action]:
        """Tell the gateway its key is wrong, at most once per interval (advisory only)."""
        last = self._last_bad_mac_answer_ms
        if last is not None and now_ms - last < self.settings.bad_mac_answer_interval_ms:
            return []
        try:
            claimed = decode_unverified(payload)
        except ProtocolError:
            return []
        if not isinstance(claimed, Vend):
            return []
        self._last_bad_mac_answer_ms = now_ms
        return [self._ack(claimed, AckCode.BAD_MAC, duplicate=False)]

    def _ack(self, vend: Vend, code: AckCode, *, duplicate: bool) -> Publish:
        frame = self._uplink(
            VendAck,
            vend_id=vend.vend_id,
            attempt=vend.attempt,
            code=code,
            duplicate=duplicate,
        )
        return self._publish(Channel.UP, frame)

    def _uplink(self, cls: type[UF], **fields: Any) -> UF:  # noqa: ANN401  (frame fields)
        self._seq += 1
        return cls(boot=self.boot, seq=self._seq, **fields)

    def _publish(self, channel: Channel, frame: Frame) -> Publish:
        return Publish(channel, encode(frame, self._key), frame)

    def _put(self, entry: LogEntry) -> None:
        self._store.write_entry(entry)
        self._log[entry.vend_id] = entry

    def _set_meta(self, **changes: object) -> None:
        self._meta = dataclasses.replace(self._meta, **changes)  # type: ignore[arg-type]  # fields checked by dataclasses
        self._store.write_meta(self._meta)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1


def _judge(report: MotorReport, *, drop_sensor: bool) -> Dispense:
    """Turn what the hardware saw into an outcome (SPEC §7.3).

    FAILED is a promise that nothing fell, so it is given only with proof: a working
    drop sensor that saw nothing, or a motor that never moved. Where the product may
    have fallen unseen (a sensor fault, or a fault mid-turn with no sensor), the
    outcome is UNCERTAIN and an operator decides.
    """
    if drop_sensor and report.dropped:
        outcome, reason = Outcome.DISPENSED, FailReason.NONE
    elif drop_sensor:
        reason = report.fault or FailReason.NO_DROP
        outcome = Outcome.UNCERTAIN if reason is FailReason.SENSOR_FAULT else Outcome.FAILED
    elif report.fault is None:
        outcome, reason = Outcome.DISPENSED, FailReason.NONE
    else:
        reason = report.fault
        outcome = Outcome.FAILED if report.motor_ms == 0 else Outcome.UNCERTAIN
    return Dispense(
        outcome=outcome,
        reason=reason,
        drop_detected=drop_sensor and report.dropped,
        motor_ms=report.motor_ms,
        retries=report.retries,
    )


def _settled(outcome: Outcome) -> Dispense:
    """Return the record of a vend that a reboot interrupted."""
    return Dispense(
        outcome=outcome,
        reason=FailReason.POWER_LOSS,
        drop_detected=False,
        motor_ms=0,
        retries=0,
    )
