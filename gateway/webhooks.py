"""The outbox worker: signs webhook events and POSTs them to the payment backend.

Events come from the outbox (`gateway.store.outbox`), written in the same transaction as
the state change they report. Delivery is at least once: an event is retried, with
jittered, capped exponential backoff, until the receiver answers 2xx, and the receiver
de-duplicates on ``Vendgate-Event-Id``. Delivery is in order per vend: only the oldest
undelivered event of a vend is ever claimed, so a vend's later events wait while an
earlier one is retried, and events of other vends go on meanwhile. No event is POSTed by
two workers at once, in this gateway or another: a claim is a lease that outlasts the POST.

Every request carries ``Vendgate-Signature: t=<unix seconds>,v1=<hex>``, where ``<hex>`` is
HMAC-SHA256 of ``f"{t}."`` followed by the body, keyed with ``webhook.secret``. Receivers
check it with `verify` (or its equivalent in their language), which also refuses a stale
timestamp so that a captured request cannot be replayed later.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Final, Self

import aiohttp
import asyncpg
from aiohttp import web

from gateway.config import WebhookConfig
from gateway.logs import get_logger
from gateway.store import outbox
from gateway.store.outbox import OutboxEvent

__all__ = [
    "SIGNATURE_HEADER",
    "WebhookDeliverer",
    "WebhookStats",
    "encode_body",
    "retry_delay",
    "sign",
    "verify",
]

SIGNATURE_HEADER: Final = "Vendgate-Signature"
EVENT_ID_HEADER: Final = "Vendgate-Event-Id"
EVENT_TYPE_HEADER: Final = "Vendgate-Event-Type"
DEFAULT_TOLERANCE_S: Final = 300

# The lease must outlast a delivery: the POST (bounded by webhook.timeout_s, and started as
# soon as the event is claimed) plus recording its outcome. Past it another worker may
# deliver the event again, which at-least-once allows but "never twice at once" does not.
_LEASE_MARGIN_S: Final = 30.0
# Errors that mean the database is not reachable right now; the loop waits and tries again.
_DB_ERRORS: Final = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

log = get_logger("gateway.webhooks")


# --- signatures (pure) -------------------------------------------------------------------------


def _mac(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """Return the ``Vendgate-Signature`` header value for ``body`` sent at ``timestamp``."""
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify(
    secret: bytes,
    header: str,
    body: bytes,
    *,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> bool:
    """Tell whether ``header`` signs ``body`` with ``secret`` within ``tolerance_s`` of ``now``.

    The reference check for receivers. Several ``v1=`` entries are allowed (any may match),
    so a sender can sign with an old and a new secret while the receiver rotates.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            if timestamp is not None or not (value.isascii() and value.isdigit()):
                return False
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body).encode()
    # compare_digest on every candidate: the time taken does not tell which one matched.
    matches = [hmac.compare_digest(expected, c.encode("ascii", "replace")) for c in candidates]
    return any(matches)


def encode_body(payload: Mapping[str, Any]) -> bytes:
    """Return the request body for a stored payload: compact JSON with sorted keys.

    Deterministic, so every attempt (from any gateway) sends the same bytes.
    """
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def retry_delay(attempt: int, *, base_s: float, cap_s: float, draw: float) -> float:
    """Return the wait after failed attempt ``attempt`` (1-based), given ``draw`` in [0, 1).

    Exponential from ``base_s``, capped at ``cap_s``, jittered into the upper half of the
    ceiling: many events failing together spread out, yet none retries at once.
    """
    exponent = min(max(attempt - 1, 0), 62)  # 2.0 ** 1024 overflows; the cap is hit long before
    ceiling = min(cap_s, base_s * 2.0**exponent)
    return ceiling * (0.5 + 0.5 * draw)


# --- the worker --------------------------------------------------------------------------------


@dataclass(slots=True)
class WebhookStats:
    """Counters for metrics; read them at any time."""

    claimed: int = 0
    delivered: int = 0
    failed: int = 0  # attempts that did not get a 2xx (the three below, summed)
    http_errors: int = 0  # an answer other than 2xx
    timeouts: int = 0
    connection_errors: int = 0
    database_errors: int = 0  # claims or outcomes that could not reach the database
    in_flight: int = 0


class WebhookDeliverer:
    """Deliver outbox events until closed; see the module docstring.

    Run `run` in the caller's TaskGroup; call `wake` after committing new events so they go
    out without waiting for the poll interval; call `close` to stop. With no
    ``webhook.url`` it delivers nothing and events stay in the outbox.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        config: WebhookConfig,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._pool = pool
        self._config = config
        self._secret = (config.secret or "").encode()
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311  (jitter, not security)
        self._session = session  # None: run() makes one and closes it
        self._lease_s = config.timeout_s + _LEASE_MARGIN_S
        self._wake = asyncio.Event()
        self._closing = False
        self._stopped = asyncio.Event()
        self._running = False
        self.stats = WebhookStats()
        # Deliveries finishing in this loop iteration, to be marked in one statement.
        self._delivered: list[OutboxEvent] | None = None
        self._delivered_done: asyncio.Future[None] | None = None

    def wake(self) -> None:
        """Look for due events now rather than at the next poll."""
        self._wake.set()

    async def close(self) -> None:
        """Stop claiming, let deliveries in flight finish, and return once `run` has ended.

        Each delivery is bounded by ``webhook.timeout_s``; events not yet claimed stay in
        the outbox for the next start (or another gateway).
        """
        self._closing = True
        self._wake.set()
        if self._running:
            await self._stopped.wait()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def run(self) -> None:
        """Deliver due events, up to ``webhook.concurrency`` at once, until `close`."""
        if self._running:
            raise RuntimeError("WebhookDeliverer.run() is already running")
        self._running = True
        try:
            if self._config.url is None:
                log.info("webhook_delivery_disabled", reason="webhook.url is not set")
                while not self._closing:
                    self._wake.clear()
                    await self._wake.wait()
                return
            if self._session is not None:
                await self._loop(self._session, self._config.url)
                return
            timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                await self._loop(session, self._config.url)
        finally:
            self._running = False
            self._stopped.set()

    async def _loop(self, session: aiohttp.ClientSession, url: str) -> None:
        concurrency = self._config.concurrency
        quiet = True  # the last wait ran to the poll interval
        async with asyncio.TaskGroup() as group:
            while not self._closing:
                # Cleared before the claim, so a wake() during it is not lost.
                self._wake.clear()
                free = concurrency - self.stats.in_flight
                # Claim only what can start now: a claimed event's lease is already running.
                # Under load, wait until half the slots are free, so that one claim (a round
                # trip) starts several deliveries rather than one each.
                claim = free > 0 and (quiet or 2 * free >= concurrency)
                events = await self._claim(free) if claim else []
                for event in events:
                    self.stats.in_flight += 1
                    group.create_task(
                        self._deliver(session, url, event),
                        name=f"gateway.webhooks.deliver.{event.id}",
                    )
                if events and len(events) == free:
                    continue  # maybe more due; the next pass waits if all slots are busy
                # A finished delivery wakes the loop too: a slot is free, and the vend's
                # next event may now be due.
                quiet = False
                try:
                    await asyncio.wait_for(self._wake.wait(), self._config.poll_interval_s)
                except TimeoutError:
                    quiet = True

    async def _claim(self, limit: int) -> list[OutboxEvent]:
        try:
            async with self._pool.acquire() as conn:
                events = await outbox.claim_due(conn, limit, lease_s=self._lease_s)
        except _DB_ERRORS as exc:
            self.stats.database_errors += 1
            log.warning("webhook_claim_failed", error=f"{type(exc).__name__}: {exc}")
            return []
        self.stats.claimed += len(events)
        return events

    async def _deliver(self, session: aiohttp.ClientSession, url: str, event: OutboxEvent) -> None:
        started = time.monotonic()
        try:
            status, error = await self._post(session, url, event)
            if status is not None and status // 100 == 2:
                await self._record_delivered(event)
            else:
                await self._record_failed(event, status, error, time.monotonic() - started)
        finally:
            self.stats.in_flight -= 1
            self._wake.set()

    async def _post(
        self, session: aiohttp.ClientSession, url: str, event: OutboxEvent
    ) -> tuple[int | None, str]:
        """POST one event; return the HTTP status (None if there was none) and an error text."""
        body = encode_body(event.payload)
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: str(event.event_id),
            EVENT_TYPE_HEADER: event.event_type,
            SIGNATURE_HEADER: sign(self._secret, int(self._clock()), body),
        }
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
        try:
            # A redirect is a failure: following it would turn the POST into a GET, or send
            # signed events somewhere the configuration does not name.
            async with session.post(
                url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                status = response.status
                reason = response.reason or ""
        except TimeoutError:
            self.stats.timeouts += 1
            return None, f"timeout after {self._config.timeout_s}s"
        except (aiohttp.ClientError, OSError) as exc:
            self.stats.connection_errors += 1
            return None, f"{type(exc).__name__}: {exc}"
        if status // 100 != 2:
            self.stats.http_errors += 1
        return status, f"HTTP {status} {reason}".strip()

    async def _record_delivered(self, event: OutboxEvent) -> None:
        """Mark ``event`` delivered, in one statement with the others finishing meanwhile.

        The first delivery to finish opens a batch and yields once, so that every delivery
        finishing in the same loop iteration joins it; they all wait for its statement.
        """
        self.stats.delivered += 1
        batch, done = self._delivered, self._delivered_done
        if batch is not None and done is not None:
            batch.append(event)
            await asyncio.shield(done)
            return
        batch = self._delivered = [event]
        done = self._delivered_done = asyncio.get_running_loop().create_future()
        try:
            try:
                await asyncio.sleep(0)
            finally:
                self._delivered = None  # deliveries finishing from now on open a new batch
            await self._mark_delivered(batch)
        finally:
            # Also when cancelled: the others stop waiting (unrecorded, their leases lapse
            # and they go again; receivers de-duplicate).
            if not done.done():
                done.set_result(None)

    async def _mark_delivered(self, batch: list[OutboxEvent]) -> None:
        try:
            async with self._pool.acquire() as conn:
                await outbox.mark_delivered_many(conn, [event.id for event in batch])
        except _DB_ERRORS as exc:
            # The receiver has it; the lease will lapse and it goes again (it de-duplicates).
            self.stats.database_errors += 1
            log.warning(
                "webhook_outcome_not_recorded",
                events=len(batch),
                event_id=str(batch[0].event_id),
                vend_id=batch[0].vend_id,
                outcome="delivered",
                error=f"{type(exc).__name__}: {exc}",
            )

    async def _record_failed(
        self, event: OutboxEvent, status: int | None, error: str, elapsed_s: float
    ) -> None:
        self.stats.failed += 1
        delay = retry_delay(
            event.attempts,
            base_s=self._config.retry_base_s,
            cap_s=self._config.retry_cap_s,
            draw=self._rng.random(),
        )
        log.warning(
            "webhook_delivery_failed",
            event_id=str(event.event_id),
            vend_id=event.vend_id,
            event_type=event.event_type,
            status=status,
            error=error,
            attempt=event.attempts,
            retry_in_s=round(delay, 3),
        )
        # On the database's clock, which is the one claim_due compares against.
        next_attempt_at = event.claimed_at + timedelta(seconds=elapsed_s + delay)
        try:
            async with self._pool.acquire() as conn:
                await outbox.mark_failed(
                    conn, event.id, error, next_attempt_at, attempt=event.attempts
                )
        except _DB_ERRORS as exc:
            # Not recorded: the lease lapses and the event is retried then, later than planned.
            self.stats.database_errors += 1
            log.warning(
                "webhook_outcome_not_recorded",
                event_id=str(event.event_id),
                vend_id=event.vend_id,
                outcome="failed",
                error=f"{type(exc).__name__}: {exc}",
            )


class WebhookRecorder:
    """A reference receiver: verifies each delivery and keeps events by event id.

    What a payment backend does with vendgate's webhooks, in a few lines; the demo and
    the benchmark use it as their backend.
    """

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._runner: web.AppRunner | None = None
        self.events: dict[str, dict[str, Any]] = {}
        self.deliveries = 0
        self.rejected = 0

    async def serve(self, path: str = "/hooks") -> str:
        """Listen on 127.0.0.1 (a free port) and return the URL to give ``webhook.url``."""
        from gateway.http_api import bound_port  # noqa: PLC0415  (receiver side only)

        app = web.Application()
        app.router.add_post(path, self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{bound_port(site)}{path}"

    async def close(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def handle(self, request: web.Request) -> web.Response:
        """Record one delivery (de-duplicated by event id); 401 for a bad signature."""
        body = await request.read()
        header = request.headers.get("Vendgate-Signature", "")
        if not verify(self._secret, header, body, now=time.time()):
            self.rejected += 1
            return web.Response(status=401)
        self.deliveries += 1
        event = json.loads(body)
        self.events.setdefault(str(event["event_id"]), event)
        return web.Response(status=204)
