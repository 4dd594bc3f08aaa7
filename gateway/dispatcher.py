"""Dispatch: send each machine its vends one at a time, re-send, and settle them.

The dispatcher keeps the vends this gateway is working on in memory, with one timer
heap for re-sends, deadlines and status queries; PostgreSQL holds the truth. Every
state change goes through :func:`gateway.store.vends.apply` (compare-and-set) on the
group-commit writer, and the dispatcher acts on a change only after it has committed:

- a vend is marked ``sent`` *before* its first ``Vend`` frame is published, so a crash
  can never leave a published vend looking unpublished (SPEC §6.5);
- ``ResultAck`` is published only after the result is committed (SPEC §6.1), and a
  result that arrives after the vend was settled is recorded before it is acknowledged.

No step may leave a vend stuck: every timer step that fails (database or broker down)
is scheduled again, and a reconcile pass every ``reconcile_s`` re-reads the vends that
are not final, so a vend the API committed but never handed over, or one another
gateway or an operator moved, is picked up or dropped. Timers run on the event loop's
monotonic clock; deadlines are wall-clock instants converted when a timer is set.

At start-up :meth:`Dispatcher.run` recovers every vend that is not final and re-sends
or queries it as its state requires. Timing rules come from :class:`gateway.lifecycle.Timing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import asyncpg

from gateway.errors import GatewayError
from gateway.keys import KeyRing
from gateway.lifecycle import WEBHOOK_EVENTS, Timing, VendEvent, VendStatus
from gateway.logs import get_logger
from gateway.metrics import VendMetrics
from gateway.store import vends
from gateway.store.db import Conn
from gateway.store.vends import VendRow
from gateway.store.writer import Batchable, GroupCommitter
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
STEP_RETRY_S = 1.0  # a timer step that failed (database or broker down) runs again after this


#: Runs in the transaction that stores machines' results, (row, dispense, late) each (``late``:
#: the vend was settled before): the dispense records and slot health are written with the
#: results or not at all; one call for all the results of a commit.
ResultHook = Callable[[Conn, Sequence[tuple[VendRow, Dispense, bool]]], Awaitable[None]]


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
    #: Only an operator can settle it: the machine said UNCERTAIN, or its log cannot tell.
    operator_only: bool = False
    #: The live timer of each kind; a newer timer of a kind replaces the older one.
    timers: dict[str, int] = field(default_factory=dict)
    #: Timer kinds whose step is running now (a step is never run twice at once).
    running: set[str] = field(default_factory=set)

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
            operator_only=(row.dispense or {}).get("outcome") == "uncertain",
        )


@dataclass(order=True, slots=True)
class _Timer:
    due: float  # event-loop (monotonic) time
    order: int
    kind: str = field(compare=False)
    vend_id: str = field(compare=False)


_RESULT_EVENTS = {
    Outcome.DISPENSED: VendEvent.RESULT_DISPENSED,
    Outcome.FAILED: VendEvent.RESULT_FAILED,
    Outcome.UNCERTAIN: VendEvent.RESULT_UNCERTAIN,
}


def _set_on_close(event: asyncio.Event, _conn: object) -> None:
    event.set()


_MOVES: Final[Batchable[vends.Move, VendRow | None]] = Batchable("vend_moves", vends.apply_many)


class _MachineLock:
    """``async with``: one machine's steps one at a time, the lock kept only while in use.

    It leaves ``locks`` when the last holder or waiter does: a lock kept for every machine
    that ever had a vend cost about 160 bytes a machine (the lock, its key, the dict entry)
    for the life of the gateway.
    """

    __slots__ = ("_lock", "_locks", "_machine_id", "_users")

    def __init__(self, locks: dict[str, _MachineLock], machine_id: str) -> None:
        self._locks = locks
        self._machine_id = machine_id
        self._lock = asyncio.Lock()
        self._users = 0  # holding it or waiting for it

    async def __aenter__(self) -> None:
        self._users += 1  # before any await: the entry cannot leave ``locks`` meanwhile
        try:
            await self._lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *_exc_info: object) -> None:
        self._lock.release()
        self._leave()

    def _leave(self) -> None:
        self._users -= 1
        if not self._users:
            del self._locks[self._machine_id]


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
        reconcile_s: float = 30.0,
        on_result: ResultHook | None = None,
        listen: asyncpg.Pool | None = None,
    ) -> None:
        self._writer = writer
        # Where to LISTEN for vends settled by other gateways (vends.SETTLED_CHANNEL), and
        # this dispatcher's name in those notifications, to skip its own.
        self._listen = listen
        self._origin = secrets.token_hex(6)
        self._publisher = publisher
        self._keys = keys
        self._topics = topics
        self._timing = timing
        self._metrics = metrics
        self._clock = clock
        self._on_webhook = on_webhook
        self._reconcile_s = reconcile_s
        self._result_hook = on_result
        # The hook as a batchable follow-up of result moves: one call per commit's results.
        self._results: Batchable[tuple[Dispense, VendRow], None] | None = None
        if on_result is not None:

            async def results(conn: Conn, pairs: list[tuple[Dispense, VendRow]]) -> list[None]:
                await on_result(conn, [(row, dispense, False) for dispense, row in pairs])
                return [None] * len(pairs)

            self._results = Batchable("vend_results", results)
        self._vends: dict[str, Tracked] = {}
        self._settled: dict[str, float] = {}  # vend id -> when this gateway saw it settle
        self._by_wire: dict[int, str] = {}
        self._by_machine: dict[str, set[str]] = {}
        self._queues: dict[str, deque[str]] = {}
        self._current: dict[str, str] = {}  # machine -> vend in sent/acknowledged
        self._locks: dict[str, _MachineLock] = {}  # only while held or waited for
        self._timers: list[_Timer] = []
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None
        self._slots = asyncio.Semaphore(max_tasks)
        self.recovered = 0

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Recover unfinished vends, then run the timers and the reconcile pass until cancelled."""
        rows = await self._read_active(retry=True)
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            try:
                self._recover(rows)
                tasks.create_task(self._reconcile_loop(), name="gateway.dispatch.reconcile")
                if self._listen is not None:
                    tasks.create_task(
                        self._listen_loop(self._listen), name="gateway.dispatch.listen"
                    )
                await self._timer_loop()
            finally:
                self._tasks = None

    @property
    def tracked(self) -> int:
        """Vends in memory (not final)."""
        return len(self._vends)

    def vend_accepted(self, row: VendRow) -> None:
        """Queue a vend the API has committed (the HTTP layer's sink; idempotent)."""
        if row.vend_id in self._vends:
            return
        self._adopt(row)
        self._spawn(self._advance(row.machine_id), f"gateway.dispatch.{row.machine_id}")

    async def _read_active(self, *, retry: bool) -> list[VendRow]:
        delay = STEP_RETRY_S
        while True:
            try:
                return await self._writer.read(vends.active)
            except GatewayError as exc:
                if not (retry and exc.retriable):
                    raise
                log.warning("dispatch_recovery_waiting", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _recover(self, rows: list[VendRow]) -> None:
        machines = {row.machine_id for row in rows}
        for row in rows:
            self._adopt(row)
        self.recovered = len(rows)
        for machine_id in machines:
            self._spawn(self._advance(machine_id), f"gateway.dispatch.{machine_id}")
        log.info("dispatch_recovered", vends=len(rows), machines=len(machines))

    def _adopt(self, row: VendRow) -> Tracked:
        """Track a stored vend and set the timers its state needs."""
        t = Tracked.from_row(row)
        self._vends[t.vend_id] = t
        self._by_wire[t.wire_id] = t.vend_id
        self._by_machine.setdefault(t.machine_id, set()).add(t.vend_id)
        self._metrics.in_flight.labels(t.state.value).inc()
        if t.state is VendStatus.ACCEPTED:
            self._queues.setdefault(t.machine_id, deque()).append(t.vend_id)
        self._schedule(t)
        return t

    def _schedule(self, t: Tracked) -> None:
        """Set the timers a vend needs in its current state (recovery, reconcile, refresh)."""
        now = self._clock()
        if t.state is VendStatus.SENT:
            self._current.setdefault(t.machine_id, t.vend_id)
            self._push(now, "resend", t)
            self._push(self._timing.ack_deadline(t.deadline), "ack_deadline", t)
        elif t.state is VendStatus.ACKNOWLEDGED:
            self._current.setdefault(t.machine_id, t.vend_id)
            self._push(self._timing.result_deadline(t.deadline), "result_deadline", t)
        elif t.state is VendStatus.UNKNOWN and not t.operator_only:
            self._push(now, "query", t)

    def _forget(self, t: Tracked) -> None:
        self._settled[t.vend_id] = time.monotonic()
        self._vends.pop(t.vend_id, None)
        self._by_wire.pop(t.wire_id, None)
        machine = self._by_machine.get(t.machine_id)
        if machine is not None:
            machine.discard(t.vend_id)
            if not machine:
                del self._by_machine[t.machine_id]
        if self._current.get(t.machine_id) == t.vend_id:
            del self._current[t.machine_id]
            self._spawn(self._advance(t.machine_id), f"gateway.dispatch.{t.machine_id}")

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
                # Timer steps reschedule themselves on failure (see _on_timer); here end
                # only hand-offs whose vend the reconcile pass or the machine brings back.
                log.warning("dispatch_step_failed", error=str(exc), retriable=exc.retriable)
            except Exception:  # a bug: log it loudly, keep the other vends moving
                log.exception("dispatch_step_crashed")
                self._metrics.bad_frames.labels("internal_error").inc()

    def _lock(self, machine_id: str) -> _MachineLock:
        """Return the machine's lock, for ``async with`` at once (dropped when unused)."""
        lock = self._locks.get(machine_id)
        if lock is None:
            lock = self._locks[machine_id] = _MachineLock(self._locks, machine_id)
        return lock

    async def _listen_loop(self, pool: asyncpg.Pool) -> None:
        """Hold a connection that LISTENs for settled vends; reconnect, and reconcile, if lost.

        Another gateway may take a machine's result (the uplinks are a shared subscription)
        and settle a vend that this one holds at the head of the machine's queue; without
        the notification the queue would wait for the next reconcile pass.
        """
        attempt = 0
        while True:
            try:
                async with pool.acquire() as conn:
                    lost = asyncio.Event()
                    conn.add_termination_listener(functools.partial(_set_on_close, lost))
                    await conn.add_listener(vends.SETTLED_CHANNEL, self._on_settled)
                    try:
                        if attempt:
                            await self.reconcile()  # what was settled while not listening
                        attempt = 0
                        await lost.wait()
                    finally:
                        with contextlib.suppress(Exception):
                            await conn.remove_listener(vends.SETTLED_CHANNEL, self._on_settled)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, GatewayError) as exc:
                log.warning("dispatch_listen_failed", error=f"{type(exc).__name__}: {exc}")
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(10.0, 0.2 * 2**attempt)))  # noqa: S311

    def _on_settled(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        """Catch up with a vend settled elsewhere, if this gateway still tracks it."""
        vend_id, _, origin = str(payload).rpartition(" ")
        if origin == self._origin:
            return
        t = self._vends.get(vend_id)
        if t is None or t.state.is_final:
            return
        self._spawn(self._refresh(t), f"gateway.dispatch.settled.{vend_id}")

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reconcile_s)
            try:
                await self.reconcile()
            except GatewayError as exc:
                log.warning("dispatch_reconcile_failed", error=str(exc))

    async def reconcile(self) -> None:
        """Adopt active vends missing from memory; drop tracked ones settled elsewhere."""
        rows = await self._read_active(retry=False)
        active = {row.vend_id for row in rows}
        # Not active in the snapshot: settled elsewhere (another gateway, an operator), or
        # created after the snapshot was read. Only a fresh read of the row can tell.
        for t in [t for t in self._vends.values() if t.vend_id not in active]:
            await self._refresh(t)
        # Active in the snapshot but untracked: never handed over, or settled by us after
        # the snapshot was read (remembered for a while, so it is not taken up again).
        self._prune_settled()
        fresh = [
            row
            for row in rows
            if row.vend_id not in self._vends and row.vend_id not in self._settled
        ]
        for row in fresh:
            self._adopt(row)
        for machine_id in {row.machine_id for row in fresh}:
            self._spawn(self._advance(machine_id), f"gateway.dispatch.{machine_id}")
        if fresh:
            log.info("dispatch_reconciled", vends=len(fresh))

    def _prune_settled(self) -> None:
        horizon = time.monotonic() - 3 * self._reconcile_s
        for vend_id in [v for v, at in self._settled.items() if at < horizon]:
            del self._settled[vend_id]

    # --- sending ------------------------------------------------------------------------------

    async def _advance(self, machine_id: str) -> None:
        """Start the machine's next queued vend if it has none in flight."""
        async with self._lock(machine_id):
            queue = self._queues.get(machine_id)
            while queue and machine_id not in self._current:
                t = self._vends.get(queue.popleft())
                if t is None or t.state is not VendStatus.ACCEPTED:
                    continue
                try:
                    await self._start(t)
                except GatewayError:
                    queue.appendleft(t.vend_id)  # not started: first in line again
                    self._push(self._clock() + STEP_RETRY_S, "advance", t)
                    raise
            if queue is not None and not queue:
                del self._queues[machine_id]

    async def _start(self, t: Tracked) -> None:
        if self._clock() >= t.deadline - 1:
            # Never published, and too late to be: provably not dispensed.
            await self._apply(t, VendEvent.PROVEN_NOT_SENT, {"why": "deadline passed"})
            return
        # Durable first: "sent" is committed before the frame can reach the machine.
        if await self._apply(t, VendEvent.PUBLISHED, attempts=1) is None:
            return
        self._current[t.machine_id] = t.vend_id
        t.sent = self._clock()
        self._metrics.stage_seconds.labels("accepted_to_sent").observe(t.sent - t.created)
        t.attempts = 1
        self._push(t.sent + self._timing.resend_delay(1), "resend", t)
        self._push(self._timing.ack_deadline(t.deadline), "ack_deadline", t)
        with contextlib.suppress(GatewayError):  # the re-send timer is set: it will retry
            await self._send_vend(t)

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

    async def send(self, machine_id: str, frame: Frame) -> None:
        """Publish a downlink frame to ``machine_id`` (QoS 1); for other components' frames."""
        await self._send(machine_id, frame)

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
        after = None if dispense is None or self._results is None else (self._results, dispense)
        move = vends.Move(t.vend_id, event, detail, record, attempts, actor, self._origin)
        # Batched with other vends' moves: one statement for all of a commit's state changes.
        row = await self._writer.submit_batchable(_MOVES, t.vend_id, move, after=after)
        if row is None:
            await self._refresh(t)
            return None
        self._moved(t, row.state)
        return row

    async def _refresh(self, t: Tracked) -> None:
        """Re-read a vend whose compare-and-set failed (another gateway or an operator moved it)."""
        row = await self._writer.read(lambda conn: vends.get(conn, t.vend_id))
        if row is not None and row.state is not t.state:
            self._moved(t, row.state)
            if not row.state.is_final:
                self._schedule(t)

    def _moved(self, t: Tracked, state: VendStatus) -> None:
        before = t.state
        if state is before:
            return
        self._metrics.in_flight.labels(before.value).dec()
        self._metrics.transitions.labels(state.value).inc()
        t.state = state
        if state in WEBHOOK_EVENTS and self._on_webhook is not None:
            self._on_webhook()  # an outbox event was committed with the change
        if state.is_final:
            self._metrics.stage_seconds.labels("accepted_to_final").observe(
                self._clock() - t.created
            )
            self._forget(t)
            return
        self._metrics.in_flight.labels(state.value).inc()
        if state.settled and self._current.get(t.machine_id) == t.vend_id:
            del self._current[t.machine_id]
            self._spawn(self._advance(t.machine_id), f"gateway.dispatch.{t.machine_id}")
        if state is VendStatus.UNKNOWN and not t.operator_only:
            self._push(self._clock(), "query", t)

    # --- timers -------------------------------------------------------------------------------

    def _push(self, due: float, kind: str, t: Tracked) -> None:
        """Set the timer ``kind`` of ``t`` for wall-clock time ``due`` (replacing the last)."""
        loop = asyncio.get_running_loop()
        timer = _Timer(loop.time() + (due - self._clock()), next(self._order), kind, t.vend_id)
        t.timers[kind] = timer.order
        heapq.heappush(self._timers, timer)
        if self._timers[0] is timer:
            self._wake.set()

    async def _timer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            while self._timers and self._timers[0].due <= now:
                timer = heapq.heappop(self._timers)
                t = self._vends.get(timer.vend_id)
                if t is None or t.timers.get(timer.kind) != timer.order:
                    continue  # replaced by a newer timer, or the vend is final
                if timer.kind in t.running:  # the previous step is still at it
                    self._push(self._clock() + STEP_RETRY_S, timer.kind, t)
                    continue
                t.running.add(timer.kind)
                self._spawn(self._on_timer(timer.kind, t), f"gateway.timer.{timer.kind}")
            self._wake.clear()
            # Woken by the earliest timer or by _push (an earlier one): a plain timer
            # handle, as wait_for costs a task and a timeout per wake-up.
            due = self._timers[0].due if self._timers else now + 3600.0
            alarm = loop.call_at(due, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                alarm.cancel()

    async def _on_timer(self, kind: str, t: Tracked) -> None:
        try:
            if kind == "advance":
                await self._advance(t.machine_id)
                return
            async with self._lock(t.machine_id):
                await self._timer_step(kind, t)
        except GatewayError:
            if t.vend_id in self._vends and kind != "advance":
                self._push(self._clock() + STEP_RETRY_S, kind, t)  # never left stuck
            raise
        finally:
            t.running.discard(kind)

    async def _timer_step(self, kind: str, t: Tracked) -> None:
        now = self._clock()
        if kind == "resend" and t.state is VendStatus.SENT and now < t.deadline:
            t.attempts = min(t.attempts + 1, MAX_ATTEMPT)
            self._metrics.resends.inc()
            self._push(now + self._timing.resend_delay(t.attempts), "resend", t)
            with contextlib.suppress(GatewayError):  # the next re-send is already set
                await self._send_vend(t)
        elif kind == "ack_deadline" and t.state is VendStatus.SENT:
            detail = {"attempts": t.attempts}
            await self._apply(t, VendEvent.NO_ACK, detail, attempts=t.attempts)
        elif kind == "result_deadline" and t.state is VendStatus.ACKNOWLEDGED:
            await self._apply(t, VendEvent.NO_RESULT)
        elif kind == "query" and t.state is VendStatus.UNKNOWN and not t.operator_only:
            await self._query(t, now)

    async def _query(self, t: Tracked, now: float) -> None:
        if not self._timing.query_due(t.deadline, now):
            self._push(t.deadline + self._timing.clock_skew_s, "query", t)
            return
        t.queries += 1
        self._metrics.status_queries.inc()
        wait = min(QUERY_BACKOFF_CAP_S, self._timing.query_interval_s * 2 ** min(t.queries - 1, 6))
        self._push(now + wait, "query", t)
        query = StatusQuery(vend_id=t.wire_id, deadline=int(t.deadline))
        # A query is worth nothing once the next one is due: let the broker drop it then.
        with contextlib.suppress(GatewayError):
            await self._send(t.machine_id, query, message_expiry_s=max(1, int(wait)))

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
                self._on_reconnect(machine_id)
            case Heartbeat() if frame.want_time:
                await self._send(machine_id, self._time_for(frame))
            case _:
                pass  # presence, telemetry and config acks belong to the sessions layer

    def _time_for(self, request: UplinkFrame) -> Time:
        return Time(now_ms=int(self._clock() * 1000), echo_boot=request.boot, echo_seq=request.seq)

    async def _lookup(self, machine_id: str, wire_id: int) -> Tracked | VendRow | None:
        """Find a vend by wire id: tracked, or its stored row if this gateway has none."""
        vend_id = self._by_wire.get(wire_id)
        if vend_id is not None:
            t = self._vends[vend_id]
            return t if t.machine_id == machine_id else None
        row = await self._writer.read(lambda conn: vends.get_by_wire_id(conn, wire_id))
        if row is None or row.machine_id != machine_id:
            return None
        if row.state.is_final:
            return row
        return self._vends.get(row.vend_id) or self._adopt(row)

    async def _on_ack(self, machine_id: str, ack: VendAck) -> None:
        self._metrics.acks.labels(ack.code.name.lower()).inc()
        t = await self._lookup(machine_id, ack.vend_id)
        if not isinstance(t, Tracked):
            return
        async with self._lock(machine_id):
            if ack.code is AckCode.ACCEPTED:
                if t.state is VendStatus.SENT:
                    row = await self._apply(t, VendEvent.ACK_ACCEPTED, attempts=t.attempts)
                    if row is not None:
                        t.acked = self._clock()
                        if t.sent is not None:
                            self._metrics.stage_seconds.labels("sent_to_ack").observe(
                                t.acked - t.sent
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
        found = await self._lookup(machine_id, wire_id)
        if found is None:
            self._metrics.bad_frames.labels("unknown_vend").inc()
            return  # no such vend of ours: not acknowledged, so nothing is forgotten
        if isinstance(found, VendRow):
            await self._late_result(found, dispense)
        elif not await self._settle(found, dispense):
            return  # nothing committed: no ResultAck, the machine re-sends
        # Committed (by us now, or earlier): only now may the machine stop re-sending it.
        await self._send(machine_id, ResultAck(vend_id=wire_id))

    async def _settle(self, t: Tracked, dispense: Dispense) -> bool:
        """Commit a result; return whether it (or an earlier one) is now stored."""
        async with self._lock(t.machine_id):
            if t.operator_only and dispense.outcome is Outcome.UNCERTAIN:
                return True  # recorded already; the machine re-sends it until acknowledged
            was_acknowledged = t.state is VendStatus.ACKNOWLEDGED
            detail = {"reason": dispense.reason.name} if dispense.reason.value else None
            event = _RESULT_EVENTS[dispense.outcome]
            row = await self._apply(t, event, detail, dispense=dispense)
            if row is None:
                # Settled meanwhile (another gateway, an operator): keep the machine's word.
                stored = await self._writer.read(lambda conn: vends.get(conn, t.vend_id))
                if stored is None or not stored.state.is_final:
                    log.warning("result_not_applicable", vend_id=t.vend_id, state=t.state.value)
                    return False
                await self._late_result(stored, dispense)
                return True
            if dispense.outcome is Outcome.UNCERTAIN:
                t.operator_only = True  # only an operator can settle it now (SPEC §7.6)
            if was_acknowledged and t.acked is not None:
                self._metrics.stage_seconds.labels("ack_to_result").observe(self._clock() - t.acked)
            return True

    async def _late_result(self, row: VendRow, dispense: Dispense) -> None:
        """Record a result for a settled vend before acknowledging it; alarm on a contradiction."""
        said = {
            Outcome.DISPENSED: "dispensed",
            Outcome.FAILED: "not_dispensed",
            Outcome.UNCERTAIN: None,
        }[dispense.outcome]
        conflict = said is not None and row.state.outcome is not None and said != row.state.outcome
        received = _dispense_json(dispense)
        if row.dispense == received and not conflict:
            return  # the same result again: stored already

        async def op(conn: Conn) -> None:
            await vends.record_late_result(conn, row.vend_id, received, conflict=conflict)
            if self._result_hook is not None:
                await self._result_hook(conn, [(row, dispense, True)])

        await self._writer.submit(op)
        if conflict:
            self._metrics.result_conflicts.inc()
            log.error(
                "result_conflict",
                vend_id=row.vend_id,
                machine_id=row.machine_id,
                state=row.state.value,
                received=received,
            )

    async def _on_status(self, machine_id: str, reply: StatusReply) -> None:
        if reply.vend_id is None:
            return
        if reply.vend_state is VendState.DONE and reply.dispense is not None:
            await self._on_result(machine_id, reply.vend_id, reply.dispense)
            return
        t = await self._lookup(machine_id, reply.vend_id)
        if not isinstance(t, Tracked):
            return
        async with self._lock(machine_id):
            if reply.vend_state is VendState.REJECTED and reply.code is AckCode.EXPIRED:
                await self._apply(t, VendEvent.PROVEN_EXPIRED, {"proof": "machine tombstone"})
            elif reply.vend_state is VendState.REJECTED and reply.code.is_final_refusal:
                await self._apply(t, VendEvent.ACK_REFUSED, {"code": reply.code.name})
            elif reply.vend_state in (VendState.FORGOTTEN, VendState.MISMATCH):
                # The machine's log cannot tell: an operator decides (SPEC §6.5). Stop asking.
                t.operator_only = True
                log.warning(
                    "status_inconclusive",
                    vend_id=t.vend_id,
                    machine_id=machine_id,
                    state=reply.vend_state.name,
                )
            # ACCEPTED / DISPENSING: still in progress; the result or the next query settles it.
            # NOT_SEEN: the machine's clock has not passed the deadline yet; ask again later.

    def _on_reconnect(self, machine_id: str) -> None:
        """Re-send a reconnected machine's vend in flight and ask about its unknown ones."""
        now = self._clock()
        for vend_id in self._by_machine.get(machine_id, ()):
            t = self._vends[vend_id]
            if t.state is VendStatus.SENT:
                self._push(now, "resend", t)
            elif t.state is VendStatus.UNKNOWN and not t.operator_only:
                self._push(now, "query", t)


def _dispense_json(dispense: Dispense) -> dict[str, Any]:
    return {
        "outcome": dispense.outcome.name.lower(),
        "reason": dispense.reason.name.lower(),
        "drop_detected": dispense.drop_detected,
        "motor_ms": dispense.motor_ms,
        "retries": dispense.retries,
    }
