"""Dispatch: send each machine its vends one at a time, re-send, and settle them.

The dispatcher keeps the vends this gateway is working on in memory, with one timer
heap for re-sends, deadlines and status queries; PostgreSQL holds the truth. Every
state change goes through :func:`gateway.store.vends.apply` (compare-and-set) on the
group-commit writer, and the dispatcher acts on a change only after it has committed:

- a vend is marked ``sent`` *before* its first ``Vend`` frame is published, so a crash
  can never leave a published vend looking unpublished (SPEC §6.5);
- ``ResultAck`` is published only after the result is committed (SPEC §6.1).

At start-up :meth:`Dispatcher.run` recovers every vend that is not final and re-sends
or queries it as its state requires. Timing rules come from :class:`gateway.lifecycle.Timing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.errors import GatewayError
from gateway.keys import KeyRing
from gateway.lifecycle import WEBHOOK_EVENTS, Timing, VendEvent, VendStatus
from gateway.logs import get_logger
from gateway.metrics import VendMetrics
from gateway.store import vends
from gateway.store.vends import VendRow
from gateway.store.writer import GroupCommitter
from protocols.codec import encode
from protocols.frames import (
    AckCode,
    Dispense,
    Frame,
    Heartbeat,
    Hello,
    Outcome,
    ResultAck,
    StatusQuery,
    StatusReply,
    Time,
    UplinkFrame,
    Vend,
    VendAck,
    VendResult,
    VendState,
)
from protocols.topics import QOS, Channel, Topics

log = get_logger("gateway.dispatcher")

MAX_ATTEMPT = 255  # SPEC §8: the gateway keeps re-sending attempt 255
QUERY_BACKOFF_CAP_S = 60.0


class Publisher(Protocol):
    """What the dispatcher needs from the MQTT link."""

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        message_expiry_s: int | None = None,
    ) -> None:
        """Publish one message; return when the broker has it (QoS 1)."""
        ...


@dataclass(slots=True)
class Tracked:
    """A vend this gateway is working on."""

    vend_id: str
    wire_id: int
    machine_id: str
    slot: int
    price: int
    deadline: float  # unix seconds
    state: VendStatus
    attempts: int
    created: float
    sent: float | None = None
    acked: float | None = None
    queries: int = 0
    #: The machine itself said it cannot tell (UNCERTAIN): queries cannot settle it.
    uncertain: bool = False
    #: The live timer of each kind; a newer timer of a kind replaces the older one.
    timers: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: VendRow) -> Tracked:
        """Start tracking a stored vend."""
        return cls(
            vend_id=row.vend_id,
            wire_id=row.wire_id,
            machine_id=row.machine_id,
            slot=row.slot,
            price=row.price,
            deadline=row.deadline.timestamp(),
            state=row.state,
            attempts=row.attempts,
            created=row.created_at.timestamp(),
            sent=None if row.first_sent_at is None else row.first_sent_at.timestamp(),
        )


@dataclass(order=True, slots=True)
class _Timer:
    due: float
    order: int
    kind: str = field(compare=False)
    vend_id: str = field(compare=False)


_RESULT_EVENTS = {
    Outcome.DISPENSED: VendEvent.RESULT_DISPENSED,
    Outcome.FAILED: VendEvent.RESULT_FAILED,
    Outcome.UNCERTAIN: VendEvent.RESULT_UNCERTAIN,
}


class Dispatcher:
    """Per-machine vend queues, re-sends, deadlines and status queries; see the module doc."""

    def __init__(
        self,
        *,
        writer: GroupCommitter,
        publisher: Publisher,
        keys: KeyRing,
        topics: Topics,
        timing: Timing,
        metrics: VendMetrics,
        clock: Callable[[], float] = time.time,
        max_tasks: int = 1024,
        on_webhook: Callable[[], None] | None = None,
    ) -> None:
        self._writer = writer
        self._publisher = publisher
        self._keys = keys
        self._topics = topics
        self._timing = timing
        self._metrics = metrics
        self._clock = clock
        self._on_webhook = on_webhook
        self._vends: dict[str, Tracked] = {}
        self._by_wire: dict[int, str] = {}
        self._queues: dict[str, deque[str]] = {}
        self._current: dict[str, str] = {}  # machine -> vend in sent/acknowledged
        self._locks: dict[str, asyncio.Lock] = {}
        self._timers: list[_Timer] = []
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None
        self._slots = asyncio.Semaphore(max_tasks)
        self.recovered = 0

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Recover unfinished vends, then run the timers until cancelled."""
        rows = await self._writer.submit(vends.active)
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            try:
                self._recover(rows)
                await self._timer_loop()
            finally:
                self._tasks = None

    @property
    def tracked(self) -> int:
        """Vends in memory (not final)."""
        return len(self._vends)

    def vend_accepted(self, row: VendRow) -> None:
        """Queue a vend the API has just committed (the HTTP layer's sink)."""
        if row.vend_id in self._vends:
            return
        self._track(row)
        self._queues.setdefault(row.machine_id, deque()).append(row.vend_id)
        self._spawn(self._advance(row.machine_id), f"gateway.dispatch.{row.machine_id}")

    def _recover(self, rows: list[VendRow]) -> None:
        now = self._clock()
        machines: set[str] = set()
        for row in rows:
            t = self._track(row)
            machines.add(row.machine_id)
            if t.state is VendStatus.ACCEPTED:
                self._queues.setdefault(t.machine_id, deque()).append(t.vend_id)
            elif t.state is VendStatus.SENT:
                self._current[t.machine_id] = t.vend_id
                self._push(now, "resend", t)
                self._push(self._timing.ack_deadline(t.deadline), "ack_deadline", t)
            elif t.state is VendStatus.ACKNOWLEDGED:
                self._current[t.machine_id] = t.vend_id
                self._push(self._timing.result_deadline(t.deadline), "result_deadline", t)
            elif t.state is VendStatus.UNKNOWN:
                self._push(now, "query", t)
        self.recovered = len(rows)
        for machine_id in machines:
            self._spawn(self._advance(machine_id), f"gateway.dispatch.{machine_id}")
        log.info("dispatch_recovered", vends=len(rows), machines=len(machines))

    def _track(self, row: VendRow) -> Tracked:
        t = Tracked.from_row(row)
        self._vends[t.vend_id] = t
        self._by_wire[t.wire_id] = t.vend_id
        self._metrics.in_flight.labels(t.state.value).inc()
        return t

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        if self._tasks is None:  # not running yet: run() recovers from the database
            work.close()
            return
        self._tasks.create_task(self._guarded(work), name=name)

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        async with self._slots:
            try:
                await work
            except GatewayError as exc:
                # A retriable failure (database or broker down) is retried by the next
                # timer, which each step schedules before it does I/O, or by the machine's
                # own re-sends; the vend's durable state is unchanged.
                log.warning("dispatch_step_failed", error=str(exc), retriable=exc.retriable)
            except Exception:  # a bug: log it loudly, keep the other vends moving
                log.exception("dispatch_step_crashed")
                self._metrics.bad_frames.labels("internal_error").inc()

    def _lock(self, machine_id: str) -> asyncio.Lock:
        lock = self._locks.get(machine_id)
        if lock is None:
            lock = self._locks[machine_id] = asyncio.Lock()
        return lock

    # --- sending ------------------------------------------------------------------------------

    async def _advance(self, machine_id: str) -> None:
        """Start the machine's next queued vend if it has none in flight."""
        async with self._lock(machine_id):
            queue = self._queues.get(machine_id)
            while queue and machine_id not in self._current:
                t = self._vends.get(queue.popleft())
                if t is None or t.state is not VendStatus.ACCEPTED:
                    continue
                if self._clock() >= t.deadline - 1:
                    # Never published, and too late to be: provably not dispensed.
                    await self._apply(t, VendEvent.PROVEN_NOT_SENT, {"why": "deadline passed"})
                    continue
                # Durable first: "sent" is committed before the frame can reach the machine.
                if await self._apply(t, VendEvent.PUBLISHED, attempts=1):
                    self._current[machine_id] = t.vend_id
                    t.sent = self._clock()
                    self._metrics.stage_seconds.labels("accepted_to_sent").observe(
                        t.sent - t.created
                    )
                    t.attempts = 1
                    self._push(t.sent + self._timing.resend_delay(1), "resend", t)
                    self._push(self._timing.ack_deadline(t.deadline), "ack_deadline", t)
                    await self._send_vend(t)
            if queue is not None and not queue:
                del self._queues[machine_id]

    async def _send_vend(self, t: Tracked) -> None:
        frame = Vend(
            vend_id=t.wire_id,
            slot=t.slot,
            price=t.price,
            deadline=int(t.deadline),
            attempt=min(t.attempts, MAX_ATTEMPT),
        )
        expiry = max(1, int(t.deadline - self._clock()))
        await self._send(t.machine_id, frame, message_expiry_s=expiry)

    async def _send(
        self, machine_id: str, frame: Frame, *, message_expiry_s: int | None = None
    ) -> None:
        payload = encode(frame, self._keys.key(machine_id))
        topic = self._topics.topic(machine_id, Channel.DOWN)
        await self._publisher.publish(
            topic, payload, qos=QOS[Channel.DOWN], message_expiry_s=message_expiry_s
        )

    # --- state changes ------------------------------------------------------------------------

    async def _apply(
        self,
        t: Tracked,
        event: VendEvent,
        detail: dict[str, Any] | None = None,
        *,
        dispense: Dispense | None = None,
        attempts: int = 0,
        actor: str = "gateway",
    ) -> VendRow | None:
        """Commit ``event``; on success update memory and return the row, else None."""
        record = None if dispense is None else _dispense_json(dispense)

        async def op(conn: Any) -> VendRow | None:  # noqa: ANN401  (a pool connection)
            return await vends.apply(
                conn,
                t.vend_id,
                event,
                detail=detail,
                dispense=record,
                attempts=attempts,
                actor=actor,
            )

        row = await self._writer.submit(op)
        if row is None:
            await self._refresh(t)
            return None
        self._moved(t, row.state)
        return row

    async def _refresh(self, t: Tracked) -> None:
        """Re-read a vend whose compare-and-set failed (another gateway moved it)."""
        row = await self._writer.submit(lambda conn: vends.get(conn, t.vend_id))
        if row is not None and row.state is not t.state:
            self._moved(t, row.state)

    def _moved(self, t: Tracked, state: VendStatus) -> None:
        before = t.state
        if state is not before:
            self._metrics.in_flight.labels(before.value).dec()
            self._metrics.transitions.labels(state.value).inc()
            t.state = state
            if not state.is_final:
                self._metrics.in_flight.labels(state.value).inc()
            if state in WEBHOOK_EVENTS and self._on_webhook is not None:
                self._on_webhook()  # an outbox event was committed with the change
        if state.settled and self._current.get(t.machine_id) == t.vend_id:
            del self._current[t.machine_id]
            self._spawn(self._advance(t.machine_id), f"gateway.dispatch.{t.machine_id}")
        if state.is_final:
            self._metrics.stage_seconds.labels("accepted_to_final").observe(
                self._clock() - t.created
            )
            self._vends.pop(t.vend_id, None)
            self._by_wire.pop(t.wire_id, None)
        elif state is VendStatus.UNKNOWN and before is not VendStatus.UNKNOWN:
            self._push(self._clock(), "query", t)

    # --- timers -------------------------------------------------------------------------------

    def _push(self, due: float, kind: str, t: Tracked) -> None:
        timer = _Timer(due, next(self._order), kind, t.vend_id)
        t.timers[kind] = timer.order
        heapq.heappush(self._timers, timer)
        if self._timers[0] is timer:
            self._wake.set()

    async def _timer_loop(self) -> None:
        while True:
            now = self._clock()
            while self._timers and self._timers[0].due <= now:
                timer = heapq.heappop(self._timers)
                t = self._vends.get(timer.vend_id)
                if t is not None and t.timers.get(timer.kind) == timer.order:
                    self._spawn(self._on_timer(timer.kind, t), f"gateway.timer.{timer.kind}")
            self._wake.clear()
            delay = self._timers[0].due - now if self._timers else 3600.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, delay))

    async def _on_timer(self, kind: str, t: Tracked) -> None:
        async with self._lock(t.machine_id):
            now = self._clock()
            if kind == "resend" and t.state is VendStatus.SENT and now < t.deadline:
                t.attempts = min(t.attempts + 1, MAX_ATTEMPT)
                self._metrics.resends.inc()
                self._push(now + self._timing.resend_delay(t.attempts), "resend", t)
                await self._send_vend(t)
            elif kind == "ack_deadline" and t.state is VendStatus.SENT:
                await self._apply(
                    t, VendEvent.NO_ACK, {"attempts": t.attempts}, attempts=t.attempts
                )
            elif kind == "result_deadline" and t.state is VendStatus.ACKNOWLEDGED:
                await self._apply(t, VendEvent.NO_RESULT)
            elif kind == "query" and t.state is VendStatus.UNKNOWN and not t.uncertain:
                await self._query(t, now)

    async def _query(self, t: Tracked, now: float) -> None:
        if not self._timing.query_due(t.deadline, now):
            self._push(t.deadline + self._timing.clock_skew_s, "query", t)
            return
        t.queries += 1
        self._metrics.status_queries.inc()
        wait = min(QUERY_BACKOFF_CAP_S, self._timing.query_interval_s * 2 ** min(t.queries - 1, 6))
        self._push(now + wait, "query", t)
        await self._send(t.machine_id, StatusQuery(vend_id=t.wire_id, deadline=int(t.deadline)))

    # --- uplink -------------------------------------------------------------------------------

    async def on_uplink(self, machine_id: str, frame: UplinkFrame) -> None:
        """Act on one verified uplink frame from ``machine_id``."""
        match frame:
            case VendAck():
                await self._on_ack(machine_id, frame)
            case VendResult():
                await self._on_result(machine_id, frame.vend_id, frame.dispense)
            case StatusReply():
                await self._on_status(machine_id, frame)
            case Hello():
                await self._send(machine_id, self._time_for(frame))
                await self._on_reconnect(machine_id)
            case Heartbeat() if frame.want_time:
                await self._send(machine_id, self._time_for(frame))
            case _:
                pass  # presence, telemetry and config acks belong to the sessions layer

    def _time_for(self, request: UplinkFrame) -> Time:
        return Time(now_ms=int(self._clock() * 1000), echo_boot=request.boot, echo_seq=request.seq)

    async def _lookup(self, machine_id: str, wire_id: int) -> Tracked | None:
        """Find a tracked vend by wire id, loading it if another gateway created it."""
        vend_id = self._by_wire.get(wire_id)
        if vend_id is not None:
            t = self._vends[vend_id]
        else:
            row = await self._writer.submit(lambda conn: vends.get_by_wire_id(conn, wire_id))
            if row is None or row.state.is_final:
                return None
            t = self._vends.get(row.vend_id) or self._track(row)
        return t if t.machine_id == machine_id else None

    async def _on_ack(self, machine_id: str, ack: VendAck) -> None:
        self._metrics.acks.labels(ack.code.name.lower()).inc()
        t = await self._lookup(machine_id, ack.vend_id)
        if t is None:
            return
        async with self._lock(machine_id):
            if ack.code is AckCode.ACCEPTED:
                if t.state in (VendStatus.SENT, VendStatus.UNKNOWN):
                    row = await self._apply(t, VendEvent.ACK_ACCEPTED, attempts=t.attempts)
                    if row is not None:
                        t.acked = self._clock()
                        if t.sent is not None:
                            self._metrics.stage_seconds.labels("sent_to_ack").observe(
                                self._clock() - t.sent
                            )
                        self._push(self._timing.result_deadline(t.deadline), "result_deadline", t)
            elif ack.code.is_final_refusal:
                await self._apply(
                    t, VendEvent.ACK_REFUSED, {"code": ack.code.name}, attempts=t.attempts
                )
            elif ack.code.is_advisory:
                log.warning(
                    "vend_ack_advisory",
                    vend_id=t.vend_id,
                    machine_id=machine_id,
                    code=ack.code.name,
                )

    async def _on_result(self, machine_id: str, wire_id: int, dispense: Dispense) -> None:
        t = await self._lookup(machine_id, wire_id)
        if t is None:
            await self._ack_settled_result(machine_id, wire_id, dispense)
            return
        async with self._lock(machine_id):
            if t.uncertain and dispense.outcome is Outcome.UNCERTAIN:
                # Recorded already; the machine re-sends it until acknowledged.
                await self._send(machine_id, ResultAck(vend_id=wire_id))
                return
            was_acknowledged = t.state is VendStatus.ACKNOWLEDGED
            event = _RESULT_EVENTS[dispense.outcome]
            detail = {"reason": dispense.reason.name} if dispense.reason.value else None
            row = await self._apply(t, event, detail, dispense=dispense)
            if dispense.outcome is Outcome.UNCERTAIN and t.state is VendStatus.UNKNOWN:
                t.uncertain = True  # only an operator can settle it now (SPEC §7.6)
            if row is None and not t.state.is_final and t.state is not VendStatus.UNKNOWN:
                return  # not a state a result can settle; the machine re-sends it later
            if was_acknowledged and row is not None and t.acked is not None:
                self._metrics.stage_seconds.labels("ack_to_result").observe(self._clock() - t.acked)
        # Committed (by us now, or earlier): only now may the machine stop re-sending it.
        await self._send(machine_id, ResultAck(vend_id=wire_id))

    async def _ack_settled_result(self, machine_id: str, wire_id: int, dispense: Dispense) -> None:
        """Acknowledge a result for a vend that is final already, if the vend is ours."""
        row = await self._writer.submit(lambda conn: vends.get_by_wire_id(conn, wire_id))
        if row is None or row.machine_id != machine_id:
            self._metrics.bad_frames.labels("unknown_vend").inc()
            return
        if row.dispense is not None and row.dispense != _dispense_json(dispense):
            self._metrics.result_conflicts.inc()
            log.error(
                "result_conflict",
                vend_id=row.vend_id,
                machine_id=machine_id,
                stored=row.dispense,
                received=_dispense_json(dispense),
            )
        await self._send(machine_id, ResultAck(vend_id=wire_id))

    async def _on_status(self, machine_id: str, reply: StatusReply) -> None:
        if reply.vend_id is None:
            return
        if reply.vend_state is VendState.DONE and reply.dispense is not None:
            await self._on_result(machine_id, reply.vend_id, reply.dispense)
            return
        t = await self._lookup(machine_id, reply.vend_id)
        if t is None:
            return
        async with self._lock(machine_id):
            if reply.vend_state is VendState.REJECTED and reply.code is AckCode.EXPIRED:
                await self._apply(t, VendEvent.PROVEN_EXPIRED, {"proof": "machine tombstone"})
            elif reply.vend_state is VendState.REJECTED and reply.code.is_final_refusal:
                await self._apply(t, VendEvent.ACK_REFUSED, {"code": reply.code.name})
            elif reply.vend_state in (VendState.ACCEPTED, VendState.DISPENSING):
                if t.state is VendStatus.UNKNOWN:
                    await self._apply(t, VendEvent.ACK_ACCEPTED, {"via": "status_query"})
                    self._push(
                        self._clock() + self._timing.dispense_allowance_s, "result_deadline", t
                    )
            elif reply.vend_state in (VendState.FORGOTTEN, VendState.MISMATCH):
                # Not settled automatically: an operator decides (SPEC §6.5).
                log.warning(
                    "status_inconclusive",
                    vend_id=t.vend_id,
                    machine_id=machine_id,
                    state=reply.vend_state.name,
                )

    async def _on_reconnect(self, machine_id: str) -> None:
        """Re-send a reconnected machine's vend in flight and ask about its unknown ones."""
        now = self._clock()
        for t in [t for t in self._vends.values() if t.machine_id == machine_id]:
            if t.state is VendStatus.SENT:
                self._push(now, "resend", t)
            elif t.state is VendStatus.UNKNOWN:
                self._push(now, "query", t)


def _dispense_json(dispense: Dispense) -> dict[str, Any]:
    return {
        "outcome": dispense.outcome.name.lower(),
        "reason": dispense.reason.name.lower(),
        "drop_detected": dispense.drop_detected,
        "motor_ms": dispense.motor_ms,
        "retries": dispense.retries,
    }
