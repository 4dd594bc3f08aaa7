"""Planogram sync: send each machine its desired ``Config`` until it reports that version.

SPEC §7.9: a machine applies a ``Config`` only if its version is newer than the one it runs,
answers ``ConfigAck``, and tells its version in every ``Hello`` and ``StatusReply``. The
gateway sends the desired version

- when a merchant sets a new one (:meth:`ConfigSync.desired_changed`, after the commit);
- when a machine reports an older one: at once on ``Hello`` (a new connection may have lost
  an earlier send), and on ``StatusReply`` only if the last send is older than
  ``planogram.resend_s``;
- every ``resend_s`` while an online machine's reported version is below the desired one
  (:meth:`ConfigSync.resend_due`, run by :meth:`ConfigSync.run`).

A version the machine refused as ``INVALID`` is sent again only on that schedule (or
replaced by a new version), never on every ``Hello``, and its status stays visible.

Every verified uplink frame passes through :meth:`ConfigSync.on_frame`. What each machine
reports is kept in memory, loaded from the database at start-up, and written only when it
changes: a broker restart that reconnects the whole fleet at once costs no write and no
read for machines that already run the desired version. Pushes are bounded (house style
#8): machines wait in a bounded queue, at most once each, for a fixed number of workers; a
push that finds the queue full is dropped, counted, and left to the resend pass.

Several gateways may share the database: each keeps its own cache, and the resend pass
re-reads the machines that are behind, so a version set through another gateway is pushed
within ``resend_s``. A cache that lags costs at most an extra push (answered ``STALE``) or an
extra write, never a wrong decision about a vend.
"""

from __future__ import annotations

import asyncio
import enum
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, TypeVar

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.config import PlanogramConfig
from gateway.errors import GatewayError
from gateway.logs import get_logger
from gateway.store import planograms
from gateway.store.db import Conn
from gateway.store.planograms import INT32_MAX, SyncRow
from gateway.store.writer import GroupCommitter, unavailable
from protocols.frames import Config, ConfigAck, ConfigStatus, Frame, Hello, StatusReply, UplinkFrame

__all__ = ["ConfigSync", "PlanogramMetrics", "SyncState", "Trigger", "push_due"]

log = get_logger("gateway.configsync")

T = TypeVar("T")
Send = Callable[[str, Frame], Awaitable[None]]

LOAD_RETRY_CAP_S: Final = 30.0


class Trigger(enum.IntEnum):
    """Why a push was asked for; a stronger trigger replaces a weaker one in the queue."""

    RESEND = 0
    STATUS_REPLY = 1
    HELLO = 2
    NEW_VERSION = 3

    @property
    def label(self) -> str:
        """The metric label: ``resend``, ``status_reply``, ``hello``, ``new_version``."""
        return self.name.lower()


@dataclass(slots=True)
class SyncState:
    """What this gateway knows of one machine's configuration."""

    desired: int | None = None
    reported: int | None = None
    #: The machine's answer (ConfigAck) to ``desired``; None until it answers that version.
    status: ConfigStatus | None = None
    #: When Config was last sent (clock seconds), and which version.
    sent_at: float | None = None
    sent_version: int | None = None
    #: (boot, seq) of the latest frame that reported a version (SPEC §4.6: older are ignored).
    boot: int | None = None
    seq: int = 0

    @classmethod
    def from_row(cls, row: SyncRow) -> SyncState:
        """Build from the stored columns (the stored send is taken to be of ``desired``)."""
        return cls(
            desired=row.desired,
            reported=row.reported,
            status=_status(row.status),
            sent_at=None if row.sent_at is None else row.sent_at.timestamp(),
            sent_version=None if row.sent_at is None else row.desired,
        )

    @property
    def out_of_sync(self) -> bool:
        """A desired version is set and the machine does not report it."""
        return self.desired is not None and self.reported != self.desired

    def newer(self, boot: int, seq: int) -> bool:
        """Take (boot, seq) of a frame; False for a repeat or an older frame of the same boot.

        A different boot is always taken, lower too: a replaced communication module starts
        counting again, and must not be ignored until the gateway restarts.
        """
        if boot == self.boot and seq <= self.seq:
            return False
        self.boot, self.seq = boot, seq
        return True


def push_due(state: SyncState, trigger: Trigger, now: float, resend_s: float) -> bool:
    """Decide whether to send the desired ``Config`` now (pure; ``now`` in clock seconds).

    Never when no version is desired or the machine runs it or a later one (sending would
    only be answered ``STALE``). Always for a new version. On ``Hello`` unless the machine
    refused this very version as ``INVALID`` less than ``resend_s`` ago. Otherwise only if
    this version was not sent within ``resend_s``.
    """
    if state.desired is None:
        return False
    if state.reported is not None and state.reported >= state.desired:
        return False
    if trigger is Trigger.NEW_VERSION:
        return True
    recent = (
        state.sent_version == state.desired
        and state.sent_at is not None
        and now - state.sent_at < resend_s
    )
    if trigger is Trigger.HELLO:
        return not (recent and state.status is ConfigStatus.INVALID)
    return not recent


def _status(text: str | None) -> ConfigStatus | None:
    if text is None:
        return None
    return ConfigStatus.__members__.get(text.upper())


class PlanogramMetrics:
    """Metrics of planogram sync, on a registry passed down (slot health: VendMetrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.out_of_sync = Gauge(
            "vendgate_config_out_of_sync_machines",
            "Machines with a desired planogram version that report another one.",
            registry=registry,
        )
        self.pushes = Counter(
            "vendgate_config_pushes",
            "Config frames published, by trigger (new_version, hello, status_reply, resend).",
            ["trigger"],
            registry=registry,
        )
        self.push_failures = Counter(
            "vendgate_config_push_failures",
            "Config pushes that failed (broker or database unavailable); retried on schedule.",
            registry=registry,
        )
        self.push_dropped = Counter(
            "vendgate_config_push_dropped",
            "Config pushes not queued because the push queue was full; retried on schedule.",
            registry=registry,
        )
        self.acks = Counter(
            "vendgate_config_acks",
            "ConfigAck frames received, by status (applied, stale, invalid).",
            ["status"],
            registry=registry,
        )
        self.report_writes = Counter(
            "vendgate_config_report_writes",
            "Writes of a machine's reported configuration version or ConfigAck status.",
            registry=registry,
        )


class ConfigSync:
    """Pushes desired planograms to machines and records what they run; see the module doc."""

    def __init__(
        self,
        *,
        send: Send,
        is_online: Callable[[str], bool],
        writer: GroupCommitter,
        pool: asyncpg.Pool,
        config: PlanogramConfig,
        metrics: PlanogramMetrics,
        clock: Callable[[], float] = time.time,
        concurrency: int = 16,
        queue_size: int = 10_000,
        tick_s: float | None = None,
    ) -> None:
        self._send = send
        self._is_online = is_online
        self._writer = writer
        self._pool = pool
        self._resend_s = config.resend_s
        self._metrics = metrics
        self._clock = clock
        self._concurrency = concurrency
        # A machine is queued at most once (_pending), so this bounds memory, not the fleet.
        self._queue: asyncio.Queue[str] = asyncio.Queue(queue_size)
        self._pending: dict[str, Trigger] = {}
        self._tick_s = tick_s if tick_s is not None else config.resend_s / 3
        self._cache: dict[str, SyncState] = {}
        self._behind: set[str] = set()
        self._dropped = 0
        self._working = 0
        self.loaded = False

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Load the machines' sync state (unless :meth:`load` ran), then push until cancelled.

        Until the state is loaded, each machine's first frame costs a read: load before the
        MQTT link connects to spare a reconnecting fleet those reads.
        """
        if not self.loaded:
            await self._load_retrying()
        async with asyncio.TaskGroup() as tasks:
            for n in range(self._concurrency):
                tasks.create_task(self._worker(), name=f"gateway.configsync.push.{n}")
            tasks.create_task(self._resend_loop(), name="gateway.configsync.resend")

    async def load(self) -> None:
        """Read every machine's sync state into memory (entries seen meanwhile are kept)."""
        rows = await self._read(planograms.sync_rows)
        for row in rows:
            # Interned, as the uplink interns the ids of topics: one string per machine.
            machine_id = sys.intern(row.machine_id)
            state = self._cache.setdefault(machine_id, SyncState.from_row(row))
            self._track(machine_id, state)
        self.loaded = True
        log.info("configsync_loaded", machines=len(rows), out_of_sync=len(self._behind))

    async def _load_retrying(self) -> None:
        delay = 1.0
        while True:
            try:
                await self.load()
            except GatewayError as exc:
                if not exc.retriable:
                    raise
                log.warning("configsync_load_waiting", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, LOAD_RETRY_CAP_S)
            else:
                return

    @property
    def busy(self) -> int:
        """Machines waiting for a push or being pushed now."""
        return len(self._pending) + self._working

    def state(self, machine_id: str) -> SyncState | None:
        """Return what this gateway knows of a machine's configuration (for tests and views)."""
        return self._cache.get(machine_id)

    # --- inputs -------------------------------------------------------------------------------

    def desired_changed(self, machine_id: str, version: int | None = None) -> None:
        """Push a newly committed desired version to the machine if it is online.

        Call after the commit. ``version`` updates the cache at once; the push itself reads
        the stored planogram. An offline machine gets it when its ``Hello`` comes.
        """
        state = self._cache.get(machine_id)
        if state is not None and version is not None:
            self._set_desired(machine_id, state, version)
        if self._is_online(machine_id):
            self._enqueue(machine_id, Trigger.NEW_VERSION)

    async def on_frame(self, machine_id: str, frame: UplinkFrame) -> None:
        """Take the configuration version (and ConfigAck answer) from one verified frame.

        Cheap for every other frame type, and for a frame that reports nothing new. Raises
        the writer's retriable errors (database down, queue full) when a change cannot be
        recorded, so the MQTT layer may leave the message for redelivery.
        """
        answer: tuple[int, ConfigStatus] | None = None
        trigger: Trigger | None = None
        match frame:
            case Hello():
                reported, trigger = frame.config_version, Trigger.HELLO
            case StatusReply():
                reported, trigger = frame.config_version, Trigger.STATUS_REPLY
            case ConfigAck():
                reported, answer = frame.current_version, (frame.version, frame.status)
            case _:
                return
        state = self._cache.get(machine_id)
        if state is None:
            state = await self._fetch(machine_id)
        if not state.newer(frame.boot, frame.seq):
            return
        if answer is not None:
            self._metrics.acks.labels(answer[1].name.lower()).inc()
        if reported > INT32_MAX:
            # Never one of ours (they fit the column); nothing to compare or store.
            log.warning("config_version_out_of_range", machine_id=machine_id, reported=reported)
            return
        status = state.status
        if answer is not None and answer[0] == state.desired:
            status = answer[1]
        changed = (reported, status) != (state.reported, state.status)
        if changed:
            self._note_change(machine_id, state, reported, status, answer)
            state.reported, state.status = reported, status
            self._track(machine_id, state)
        if trigger is not None and push_due(state, trigger, self._clock(), self._resend_s):
            self._enqueue(machine_id, trigger)
        if changed:
            await self._record(machine_id, reported, answer)

    async def resend_due(self) -> int:
        """Queue a push for every online machine that is behind and due; return how many.

        Re-reads the machines the database says are behind first, so versions set through
        another gateway are picked up.
        """
        rows = await self._read(lambda conn: planograms.sync_rows(conn, behind_only=True))
        for row in rows:
            self._merge(row)
        now = self._clock()
        queued = 0
        for machine_id in list(self._behind):
            if self._queue.full():
                break  # the rest are still behind at the next pass; no drops to count
            state = self._cache[machine_id]
            if (
                self._is_online(machine_id)
                and push_due(state, Trigger.RESEND, now, self._resend_s)
                and self._enqueue(machine_id, Trigger.RESEND)
            ):
                queued += 1
        if self._dropped:
            log.warning("config_pushes_dropped", count=self._dropped, queue=self._queue.maxsize)
            self._dropped = 0
        return queued

    # --- pushing ------------------------------------------------------------------------------

    def _enqueue(self, machine_id: str, trigger: Trigger) -> bool:
        """Queue a push unless one is queued (then keep the stronger trigger)."""
        queued = self._pending.get(machine_id)
        if queued is not None:
            self._pending[machine_id] = max(queued, trigger)
            return False
        try:
            self._queue.put_nowait(machine_id)
        except asyncio.QueueFull:
            # Explicit drop (house style #8): the resend pass finds the machine behind.
            self._dropped += 1
            self._metrics.push_dropped.inc()
            return False
        self._pending[machine_id] = trigger
        return True

    async def _worker(self) -> None:
        while True:
            machine_id = await self._queue.get()
            trigger = self._pending.pop(machine_id, Trigger.RESEND)
            self._working += 1
            try:
                with structlog.contextvars.bound_contextvars(machine_id=machine_id):
                    await self.push(machine_id, trigger)
            except GatewayError as exc:
                self._metrics.push_failures.inc()
                log.warning(
                    "config_push_failed",
                    machine_id=machine_id,
                    error=str(exc),
                    retriable=exc.retriable,
                )
            except Exception:  # a bug: log it loudly, keep the other machines going
                log.exception("config_push_crashed", machine_id=machine_id)
            finally:
                self._working -= 1
                self._queue.task_done()
            # Python 3.11's wait_for (in GroupCommitter.submit) drops a cancellation that
            # races its inner await (gh-86296); one that was swallowed must still stop us.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError

    async def push(self, machine_id: str, trigger: Trigger) -> bool:
        """Send the desired ``Config`` now if it is still due; return whether it was sent.

        The workers call this; raises GatewayError when the database or broker is down.
        """
        config: Config | None = await self._read(
            lambda conn: planograms.desired_config(conn, machine_id)
        )
        if config is None:
            return False
        state = self._cache.get(machine_id)
        if state is None:
            state = await self._fetch(machine_id)
        self._set_desired(machine_id, state, config.version)
        now = self._clock()
        if not push_due(state, trigger, now, self._resend_s):
            return False  # the machine caught up, or it was sent meanwhile
        await self._send(machine_id, config)
        state.sent_at, state.sent_version = now, config.version
        self._metrics.pushes.labels(trigger.label).inc()
        log.debug("config_pushed", version=config.version, trigger=trigger.label)
        sent_at = datetime.fromtimestamp(now, UTC)
        try:
            await self._writer.submit(
                lambda conn: planograms.record_sent(conn, machine_id, sent_at)
            )
        except GatewayError as exc:  # sent all the same; only the time shown is older
            log.warning("config_sent_at_not_recorded", error=str(exc))
        return True

    async def _resend_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            try:
                await self.resend_due()
            except GatewayError as exc:
                log.warning("config_resend_pass_failed", error=str(exc))

    # --- state --------------------------------------------------------------------------------

    async def _fetch(self, machine_id: str) -> SyncState:
        """Read a machine missing from the cache (registered since the load, or before it)."""
        row = await self._read(lambda conn: planograms.sync_row(conn, machine_id))
        state = self._cache.setdefault(
            sys.intern(machine_id), SyncState() if row is None else SyncState.from_row(row)
        )
        self._track(machine_id, state)
        return state

    def _merge(self, row: SyncRow) -> None:
        """Take a stored row that is behind: its desired version and a newer send win."""
        state = self._cache.get(row.machine_id)
        if state is None:
            state = self._cache[sys.intern(row.machine_id)] = SyncState.from_row(row)
        elif row.desired is not None:
            self._set_desired(row.machine_id, state, row.desired)
            # Compared as stored (microseconds): our own send, read back, is not newer.
            mine = None if state.sent_at is None else datetime.fromtimestamp(state.sent_at, UTC)
            if row.sent_at is not None and (mine is None or row.sent_at > mine):
                state.sent_at, state.sent_version = row.sent_at.timestamp(), row.desired
        self._track(row.machine_id, state)

    def _set_desired(self, machine_id: str, state: SyncState, version: int) -> None:
        if state.desired != version:
            state.desired = version
            state.status = None  # the answer was to another version
            self._track(machine_id, state)

    def _track(self, machine_id: str, state: SyncState) -> None:
        if state.out_of_sync:
            self._behind.add(machine_id)
        else:
            self._behind.discard(machine_id)
        self._metrics.out_of_sync.set(len(self._behind))

    def _forget(self, machine_id: str) -> None:
        self._cache.pop(machine_id, None)
        self._behind.discard(machine_id)
        self._metrics.out_of_sync.set(len(self._behind))

    async def _record(
        self, machine_id: str, reported: int, answer: tuple[int, ConfigStatus] | None
    ) -> None:
        stored = None if answer is None else (answer[0], answer[1].name.lower())
        try:
            await self._writer.submit(
                lambda conn: planograms.record_report(conn, machine_id, reported, stored)
            )
        except GatewayError:
            # Not written: drop the cached view, so the next report reads the row and
            # writes again instead of finding "nothing changed".
            self._forget(machine_id)
            raise
        self._metrics.report_writes.inc()

    def _note_change(
        self,
        machine_id: str,
        state: SyncState,
        reported: int,
        status: ConfigStatus | None,
        answer: tuple[int, ConfigStatus] | None,
    ) -> None:
        """Log what a changed report means; once per change, not per frame."""
        if status is ConfigStatus.INVALID and state.status is not ConfigStatus.INVALID:
            log.error(
                "config_invalid",
                machine_id=machine_id,
                version=state.desired,
                current_version=reported,
                hint="the machine refused the planogram (a slot it does not have?); "
                "set a corrected one",
            )
        if state.desired is not None and reported > state.desired:
            log.warning(
                "config_machine_ahead",
                machine_id=machine_id,
                reported=reported,
                desired=state.desired,
                answer=None if answer is None else answer[1].name.lower(),
                hint="the machine runs a version this gateway never set; a new planogram "
                "gets a version past it",
            )
        if status is ConfigStatus.APPLIED and reported == state.desired:
            log.debug("config_applied", machine_id=machine_id, version=reported)

    async def _read(self, op: Callable[[Conn], Awaitable[T]]) -> T:
        try:
            async with self._pool.acquire() as conn:
                return await op(conn)
        except Exception as exc:
            error = unavailable(exc)
            if error is None:
                raise
            raise error from exc
