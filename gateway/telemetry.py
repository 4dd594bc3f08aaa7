"""Telemetry ingest: Telemetry frames become rows in PostgreSQL, by batched COPY, exactly once.

The MQTT handler waits for what `TelemetryIngest.submit_nowait` returns: it encodes the frame's
rows, queues them and hands back a future that completes when their transaction has committed
(or the frame proved a duplicate). The
PUBACK waits for that return (gateway/mqtt.py), so a slow database fills the broker's in-flight
window and the broker slows down: that is the backpressure, and nothing is ever dropped for
want of room. `TelemetryIngest.run` is the flusher: it takes a batch when ``batch_rows`` rows are
waiting or the oldest has waited ``max_age_s``, and writes it in one transaction on one pooled
connection:

1. ``INSERT INTO telemetry_frames ... ON CONFLICT DO NOTHING`` records the batch's frames in the
   dedup ledger (primary key machine, boot, seq) and tells which were already there. QoS 1 is at
   least once (MQTT 5 §4.3.2), so a redelivered frame must add no rows.
2. ``COPY`` the rows of the new frames into ``telemetry_readings`` and ``telemetry_events``.

The ledger and the rows commit together, so a retry after a commit whose outcome was lost (the
connection died during COMMIT) finds its frames in the ledger and copies nothing twice. Hence
database failures are retried, with capped jittered backoff, until the batch commits; callers
never see them. A failure that may come from some frame's data (a value PostgreSQL refuses, a
NUL in a string, an exception while encoding) splits the batch in halves until the bad frame is
alone; that frame is dropped with an error log and a metric, and its caller is answered so the
message is acked. Bad input from a machine never stops ingestion. A failure that any frame would
meet (a missing table) is retried like an outage instead, so it loses nothing. Values that
cannot fit their columns are refused in `submit` already, before they are queued.

Row ``i`` of a frame is ``(machine, boot, seq, i)``: readings first, then events, ``idx``
continuing. ``at`` is the machine's clock (``t0_ms + dt_ms``); ``received_at`` is the gateway's,
and picks the daily partition (gateway/store/partitions.py), which the ingest creates itself if
the keeper has not.

CPU per message is what a Python gateway controls (docs/performance-landscape.md), so the hot
path encodes the frame's rows straight into binary COPY data (gateway/store/telemetry.py says
why not ``copy_records_to_table``), and keeps one tuple per message and no other per-message
objects, futures, tasks or metric calls: the messages queued between two takes share one
future (`_Group`), which the MQTT link settles with one callback.
"""

from __future__ import annotations

import asyncio
import random
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Final, TypeAlias

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.config import TelemetryConfig
from gateway.errors import ShuttingDownError
from gateway.logs import get_logger
from gateway.store import partitions
from gateway.store import telemetry as store
from gateway.store.db import Conn
from gateway.store.telemetry import EVENTS, READINGS, InvalidFrameError
from protocols.frames import Telemetry

__all__ = ["BulkHistogram", "TelemetryIngest", "TelemetryMetrics"]

log = get_logger("gateway.telemetry")


class _Group:
    """The messages queued between two takes, and the one future they all wait for.

    One future per group rather than per message: the MQTT link then settles a whole group
    with one callback (gateway/mqtt.py). It completes once ``left``, the group's messages not
    yet answered, drops to 0, even if `_take` split the group across batches.
    """

    __slots__ = ("future", "left")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.left = 0


# One queued message: (group, machine_id, boot, seq, received unix s, readings data, reading
# count, events data, event count). A plain tuple, as one is made per message on the hot path.
_Message: TypeAlias = tuple[_Group, str, int, int, float, bytes, int, bytes, int]

_LAG_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_FLUSH_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


# --- metrics -----------------------------------------------------------------------------------


class BulkHistogram(Collector):
    """A Prometheus histogram that takes a whole batch of observations in one call.

    ``prometheus_client.Histogram.observe`` costs about a microsecond (a lock and a Python
    bucket search); the lag of every message of a batch is known at once at commit, so this
    counts them in one loop with a C bisect instead.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        """Count each of ``values`` into its bucket."""
        counts, bounds, total = self._counts, self._bounds, 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # le is inclusive: first bound >= value
            total += value
        self._sum += total

    def describe(self) -> Iterable[Metric]:
        """Name the metric without values, for the registry's duplicate check."""
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterator[Metric]:
        """Return the cumulative buckets, the count and the sum."""
        cumulative, running = [], 0
        for bound, count in zip((*map(str, self._bounds), "+Inf"), self._counts, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=cumulative, sum_value=self._sum
        )


class TelemetryMetrics:
    """The telemetry ingest's and the partition keeper's metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.queue_messages = Gauge(
            "vendgate_telemetry_queue_messages",
            "Telemetry messages accepted and waiting for their commit.",
            registry=registry,
        )
        self.waiting_submitters = Gauge(
            "vendgate_telemetry_waiting_submitters",
            "Telemetry messages waiting for room in the queue (backpressure).",
            registry=registry,
        )
        self.lag_seconds = BulkHistogram(
            "vendgate_telemetry_lag_seconds",
            "Seconds from a telemetry message's receipt to the commit of its rows.",
            _LAG_BUCKETS,
            registry,
        )
        self.rows = Counter(
            "vendgate_telemetry_rows",
            "Telemetry rows written, by table.",
            ["table"],
            registry=registry,
        )
        self.reading_rows = self.rows.labels(READINGS)
        self.event_rows = self.rows.labels(EVENTS)
        self.frames = Counter(
            "vendgate_telemetry_frames",
            "Telemetry frames committed for the first time.",
            registry=registry,
        )
        self.duplicate_frames = Counter(
            "vendgate_telemetry_duplicate_frames",
            "Telemetry frames received again (QoS 1 redelivery) and not written twice.",
            registry=registry,
        )
        self.batches = Counter(
            "vendgate_telemetry_batches",
            "Telemetry transactions committed.",
            registry=registry,
        )
        self.flush_seconds = Histogram(
            "vendgate_telemetry_flush_seconds",
            "Seconds to write one committed telemetry batch (connection, ledger, COPY, commit).",
            buckets=_FLUSH_BUCKETS,
            registry=registry,
        )
        self.flush_retries = Counter(
            "vendgate_telemetry_flush_retries",
            "Telemetry batches written again after a failed attempt.",
            registry=registry,
        )
        self.flush_failures = Counter(
            "vendgate_telemetry_flush_failures",
            "Failed telemetry transactions, by reason: unavailable, missing_partition, rejected "
            "(a frame's data; isolated and dropped), error (any frame; retried).",
            ["reason"],
            registry=registry,
        )
        self.bad_frames = Counter(
            "vendgate_telemetry_bad_frames",
            "Telemetry frames dropped as unstorable, by reason (invalid, rejected).",
            ["reason"],
            registry=registry,
        )
        self.partitions_created = Counter(
            "vendgate_partitions_created",
            "Daily partitions created, by table.",
            ["table"],
            registry=registry,
        )
        self.partitions_dropped = Counter(
            "vendgate_partitions_dropped",
            "Daily partitions dropped after the retention, by table.",
            ["table"],
            registry=registry,
        )
        self.ledger_trimmed = Counter(
            "vendgate_telemetry_ledger_trimmed",
            "Entries deleted from the telemetry dedup ledger (telemetry_frames).",
            registry=registry,
        )


def _weight(message: _Message) -> int:
    # An empty frame still costs a ledger row, so it counts as one towards batch_rows.
    return message[6] + message[8] or 1


def _frame_dependent(exc: BaseException) -> bool:
    """Whether a failed batch may owe its failure to the data of some frame in it.

    PostgreSQL's classes 22 (data exception: a value out of range, a NUL in text), 23
    (integrity constraint violation) and 54 (program limit exceeded: a row too large) are about
    the values; anything raised in the gateway while it encoded or sent them is too.
    """
    if isinstance(exc, asyncpg.PostgresError):
        return exc.sqlstate[:2] in {"22", "23", "54"}
    return True


def _missing_partition(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.exceptions.CheckViolationError) and (
        "no partition of relation" in str(exc)
    )


# --- the ingest --------------------------------------------------------------------------------


class TelemetryIngest:
    """Queue telemetry frames and write them by batched COPY; see the module docstring.

    ``clock`` gives the gateway's unix time, for ``received_at`` and the lag metric. ``flushers``
    is how many batches may be in flight at once (each on its own connection). Failed database
    attempts are retried after ``uniform(0, retry_base_s * 2 ** min(attempt, retry_exponent_cap))``
    seconds.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: TelemetryConfig,
        metrics: TelemetryMetrics,
        *,
        clock: Callable[[], float] = time.time,
        flushers: int = 1,
        retry_base_s: float = 0.05,
        retry_exponent_cap: int = 7,
    ) -> None:
        if flushers < 1:
            raise ValueError("flushers must be at least 1")
        self._pool = pool
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._flushers = flushers
        self._retry_base_s = retry_base_s
        self._retry_exponent_cap = retry_exponent_cap
        self._batch_rows = settings.batch_rows
        self._max_age_s = settings.max_age_s
        self._limit = settings.queue_messages

        self._pending: list[_Message] = []
        self._group: _Group | None = None  # the group new messages join
        self._pending_rows = 0
        self._oldest = 0.0  # loop time at which _pending last became non-empty
        self._in_flight: dict[int, list[_Message]] = {}  # by flusher
        self._depth = 0  # messages accepted and not yet answered: pending plus in flight
        self._waiting = 0  # submitters waiting for room
        self._draining = 0
        self._closed = False
        self._known_days: set[date] = set()
        self._wake = asyncio.Event()  # for the flushers: work arrived, or it is time
        self._room = asyncio.Event()  # for blocked submitters: the depth went down
        self._idle = asyncio.Event()  # for drain: nothing accepted is unanswered
        self._idle.set()
        metrics.queue_messages.set_function(lambda: self._depth)
        metrics.waiting_submitters.set_function(lambda: self._waiting)

    @property
    def depth(self) -> int:
        """Messages accepted and not yet committed."""
        return self._depth

    def submit_nowait(self, machine_id: str, frame: Telemetry) -> Awaitable[None] | None:
        """Queue the frame's rows; return what completes once they are committed.

        The hot path: a future, with no task or coroutine, while the queue has room; the
        coroutine of `submit` when it has none; None for a frame dropped as invalid.
        """
        if self._depth >= self._limit or self._closed:
            return self.submit(machine_id, frame)
        return self._enqueue(machine_id, frame)

    async def submit(self, machine_id: str, frame: Telemetry) -> None:
        """Return once the frame's rows are committed, or the frame proved a duplicate.

        Waits for room while ``queue_messages`` messages are unanswered, for as long as that
        takes: the MQTT handler's wait is what holds the broker back (gateway/mqtt.py), and
        failing here would only make the broker send the same message again. A frame whose
        times cannot be represented is dropped (logged and counted) and returns at once.
        Raises ShuttingDownError once the flusher has stopped.
        """
        if self._depth >= self._limit or self._closed:
            await self._wait_for_room()
        future = self._enqueue(machine_id, frame)
        if future is not None:
            # Shielded: the future is shared by the group, and cancelling this caller must
            # not cancel it for the others.
            await asyncio.shield(future)

    def _enqueue(self, machine_id: str, frame: Telemetry) -> asyncio.Future[None] | None:
        received = self._clock()
        try:
            rows = store.encode_frame(received, machine_id, frame)
        except InvalidFrameError as exc:
            self._drop(machine_id, frame.boot, frame.seq, "invalid", exc)
            return None
        group = self._group
        if group is None:
            group = self._group = _Group(asyncio.get_running_loop().create_future())
        group.left += 1
        pending = self._pending
        if not pending:
            self._oldest = asyncio.get_running_loop().time()
            self._wake.set()
        pending.append((group, machine_id, frame.boot, frame.seq, received, *rows))
        self._depth += 1
        self._pending_rows += rows[1] + rows[3] or 1
        if self._pending_rows >= self._batch_rows:
            self._wake.set()
        return group.future

    async def _wait_for_room(self) -> None:
        self._waiting += 1
        try:
            while True:
                if self._closed:
                    raise ShuttingDownError
                if self._depth < self._limit:
                    return
                self._room.clear()
                await self._room.wait()
        finally:
            self._waiting -= 1

    async def drain(self) -> None:
        """Flush everything without waiting for ``max_age_s``; return when all is answered.

        For shutdown, after intake has stopped; bound it with a timeout. ``run`` must be running.
        """
        self._draining += 1
        self._wake.set()
        try:
            while self._depth:
                self._idle.clear()
                await self._idle.wait()
        finally:
            self._draining -= 1

    async def run(self) -> None:
        """Run the flushers until cancelled; then fail every unanswered submit.

        Waiting callers get ShuttingDownError (retriable: the MQTT link leaves the message
        unacknowledged and the broker redelivers it), raised from the cause.
        """
        cause: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                for n in range(self._flushers):
                    group.create_task(self._flush_forever(n), name=f"gateway.telemetry.flush.{n}")
        except BaseException as exc:
            cause = exc
            raise
        finally:
            self._close(cause)

    # --- flushing ------------------------------------------------------------------------------

    async def _flush_forever(self, flusher: int) -> None:
        while True:
            batch = await self._next_batch()
            # Left in place if cancelled, so that _close answers its callers.
            self._in_flight[flusher] = batch
            await self._write(batch)
            del self._in_flight[flusher]
            self._release(len(batch))

    async def _next_batch(self) -> list[_Message]:
        loop = asyncio.get_running_loop()
        while True:
            timer = None
            if self._pending:
                due = self._oldest + self._max_age_s
                if self._pending_rows >= self._batch_rows or self._draining or loop.time() >= due:
                    return self._take()
                timer = loop.call_at(due, self._wake.set)
            self._wake.clear()
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    def _take(self) -> list[_Message]:
        self._group = None  # what arrives from now on waits for a later commit
        pending = self._pending
        if self._pending_rows <= self._batch_rows:
            self._pending, self._pending_rows = [], 0
            return pending
        # Whole frames up to batch_rows rows. What is left keeps the old _oldest: it is a
        # backlog, and goes out as soon as a flusher is free.
        rows, end = 0, 0
        while rows < self._batch_rows:
            rows += _weight(pending[end])
            end += 1
        self._pending, self._pending_rows = pending[end:], self._pending_rows - rows
        return pending[:end]

    async def _write(self, batch: list[_Message]) -> None:
        """Commit ``batch``, retrying database failures and isolating unstorable frames."""
        attempt = 0
        partition_retried = False
        while True:
            started = time.perf_counter()
            try:
                await self._commit(batch)
            except Exception as exc:  # noqa: BLE001  (classified below; nothing is lost)
                if partitions.retriable(exc):
                    reason = "unavailable"
                elif _missing_partition(exc) and not partition_retried:
                    # A partition dropped or never made behind our back: forget what we knew.
                    reason, partition_retried = "missing_partition", True
                    self._known_days.clear()
                elif _frame_dependent(exc):
                    self._metrics.flush_failures.labels("rejected").inc()
                    await self._isolate(batch, exc)
                    return
                else:
                    # The same statement would fail for any frame (a missing table, no
                    # privilege): dropping frames one by one would lose them all. Hold them,
                    # and the broker behind them, until someone fixes the database.
                    reason = "error"
                self._metrics.flush_failures.labels(reason).inc()
                self._metrics.flush_retries.inc()
                attempt += 1
                delay = 0.0 if reason == "missing_partition" else self._backoff(attempt)
                (log.error if reason == "error" else log.warning)(
                    "telemetry_flush_retry",
                    reason=reason,
                    attempt=attempt,
                    delay_s=round(delay, 3),
                    frames=len(batch),
                    error=f"{type(exc).__name__}: {exc}",
                )
                await asyncio.sleep(delay)
            else:
                self._metrics.flush_seconds.observe(time.perf_counter() - started)
                self._resolve(batch)
                return

    def _backoff(self, attempt: int) -> float:
        # House style #10: uniform(0, base * 2 ** min(attempt, cap)).
        ceiling = self._retry_base_s * 2 ** min(attempt, self._retry_exponent_cap)
        return random.uniform(0, ceiling)  # noqa: S311  (jitter, not security)

    async def _isolate(self, batch: list[_Message], exc: Exception) -> None:
        # Halving finds one bad frame in about 2*log2(n) transactions; the good halves commit
        # on the way (and answer their callers at once).
        if len(batch) == 1:
            _, machine_id, boot, seq, *_ = batch[0]
            self._drop(machine_id, boot, seq, "rejected", exc)
            self._resolve(batch, committed=False)
            return
        middle = len(batch) // 2
        await self._write(batch[:middle])
        await self._write(batch[middle:])

    async def _commit(self, batch: list[_Message]) -> None:
        """Write ``batch`` in one transaction; count it once committed."""
        unique, repeated = _dedup(batch)
        async with self._pool.acquire() as conn:
            await self._ensure_partitions(conn, batch)
            async with conn.transaction():
                known = await store.record_frames(
                    conn,
                    [m[1] for m in unique],
                    [m[2] for m in unique],
                    [m[3] for m in unique],
                    datetime.fromtimestamp(batch[0][4], UTC),
                )
                if known:
                    skip = set(known)
                    unique = [m for i, m in enumerate(unique) if i not in skip]
                readings = sum(m[6] for m in unique)
                events = sum(m[8] for m in unique)
                if readings:
                    await store.copy_rows(
                        conn, READINGS, store.READING_COLUMNS, [m[5] for m in unique]
                    )
                if events:
                    await store.copy_rows(
                        conn, EVENTS, store.EVENT_COLUMNS, [m[7] for m in unique if m[8]]
                    )
        metrics = self._metrics
        metrics.batches.inc()
        metrics.frames.inc(len(unique))
        if known or repeated:
            metrics.duplicate_frames.inc(len(known) + repeated)
        metrics.reading_rows.inc(readings)
        if events:
            metrics.event_rows.inc(events)

    async def _ensure_partitions(self, conn: Conn, batch: list[_Message]) -> None:
        first = min(m[4] for m in batch)
        last = max(m[4] for m in batch)
        days = {partitions.day_of(first), partitions.day_of(last)}
        if days <= self._known_days:
            return
        low, high = min(days), max(days)
        span = [low + timedelta(days=n) for n in range((high - low).days + 1)]
        created = await partitions.ensure(conn, span)
        for name in created:
            self._metrics.partitions_created.labels(partitions.table_of(name)).inc()
        self._known_days.update(span)

    def _resolve(self, batch: list[_Message], *, committed: bool = True) -> None:
        now = self._clock()
        if committed:
            self._metrics.lag_seconds.observe_many(max(0.0, now - m[4]) for m in batch)
        for message in batch:
            group = message[0]
            group.left -= 1
            if not group.left and not group.future.done():
                group.future.set_result(None)

    def _release(self, count: int) -> None:
        self._depth -= count
        if self._waiting:
            self._room.set()
        if not self._depth:
            self._idle.set()

    def _drop(self, machine_id: str, boot: int, seq: int, reason: str, exc: BaseException) -> None:
        self._metrics.bad_frames.labels(reason).inc()
        log.error(
            "telemetry_frame_dropped",
            machine_id=machine_id,
            boot=boot,
            seq=seq,
            reason=reason,
            error=f"{type(exc).__name__}: {exc}",
        )

    def _close(self, cause: BaseException | None) -> None:
        self._closed = True
        unanswered = [self._pending, *self._in_flight.values()]
        self._pending, self._pending_rows, self._in_flight = [], 0, {}
        self._group = None
        for batch in unanswered:
            for message in batch:
                future = message[0].future
                if not future.done():
                    error = ShuttingDownError()
                    error.__cause__ = cause
                    future.set_exception(error)
        self._depth = 0
        self._idle.set()
        self._room.set()


def _dedup(batch: list[_Message]) -> tuple[list[_Message], int]:
    """Return the batch with each (machine, boot, seq) once, and how many repeats were cut."""
    keys = {(m[1], m[2], m[3]): m for m in reversed(batch)}  # reversed: the first one wins
    if len(keys) == len(batch):
        return batch, 0
    unique = list(keys.values())
    unique.reverse()
    return unique, len(batch) - len(unique)
