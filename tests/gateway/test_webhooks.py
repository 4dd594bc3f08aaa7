import asyncio
import json
import re
import socket
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import WebhookConfig
from gateway.lifecycle import VendEvent
from gateway.store import machines, outbox, vends
from gateway.store.db import create_pool, migrate
from gateway.webhooks import WebhookDeliverer, encode_body, retry_delay, sign, verify

pytestmark = pytest.mark.integration

SECRET = "whsec-test-0123456789"  # noqa: S105  (a test key, not a credential)
KEY = SECRET.encode()
MACHINE = "vm-1"
TIMEOUT_S = 10.0

E = VendEvent
ONE_EVENT = (E.PUBLISHED, E.RESULT_DISPENSED)  # vend.dispensed
TWO_EVENTS = (E.PUBLISHED, E.NO_ACK, E.OPERATOR_DISPENSED)  # vend.unknown, vend.dispensed
# vend.unknown, vend.unknown, vend.dispensed. The lifecycle emits "unknown" at most once per
# vend; the second one is an outbox row added by hand (see make_vend), so that delivery
# order is checked over three events of one vend, not just two.
THREE_EVENTS = (E.PUBLISHED, E.NO_ACK, E.OPERATOR_DISPENSED)
_EXTRA_UNKNOWN_AFTER = E.NO_ACK


# --- a real receiver on 127.0.0.1 ------------------------------------------------------------


@dataclass
class Hit:
    """One POST the receiver got, and what it answered."""

    event_id: str
    event_type: str
    signature: str
    content_type: str
    body: bytes
    status: int


@dataclass
class Receiver:
    """A webhook endpoint that records every POST and de-duplicates by event id."""

    #: Answer for a request: given the event id, the vend id and how often this id came
    #: before; 2xx means the receiver kept the event.
    answer: Callable[[str, str, int], int] = lambda _event, _vend, _seen: 200
    delay_s: float = 0.0
    hits: list[Hit] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # event ids, each once, in order kept
    in_flight: Counter[str] = field(default_factory=Counter)  # by event id and by vend id
    overlaps: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        """Record the POST, answer as told, and keep each event id once."""
        body = await request.read()
        event_id = request.headers["Vendgate-Event-Id"]
        vend_id = json.loads(body)["vend_id"]
        for key in (event_id, vend_id):
            if self.in_flight[key]:
                self.overlaps.append(key)
            self.in_flight[key] += 1
        try:
            await asyncio.sleep(self.delay_s)
            seen = sum(hit.event_id == event_id for hit in self.hits)
            status = self.answer(event_id, vend_id, seen)
            self.hits.append(
                Hit(
                    event_id,
                    request.headers["Vendgate-Event-Type"],
                    request.headers["Vendgate-Signature"],
                    request.headers["Content-Type"],
                    body,
                    status,
                )
            )
            if status // 100 == 2 and event_id not in self.kept:
                self.kept.append(event_id)
            return web.Response(status=status)
        finally:
            for key in (event_id, vend_id):
                self.in_flight[key] -= 1

    def posts(self, event_id: str) -> int:
        """Return how many times ``event_id`` was POSTed."""
        return sum(hit.event_id == event_id for hit in self.hits)


@asynccontextmanager
async def serving(receiver: Receiver, port: int | None = None) -> AsyncIterator[str]:
    """Serve ``receiver`` on 127.0.0.1 and yield its URL."""
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    try:
        yield str(server.make_url("/hook"))
    finally:
        await server.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- database and deliverer helpers ----------------------------------------------------------


@pytest_asyncio.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database, min_size=1, max_size=6)
    async with pool.acquire() as conn:
        await migrate(conn)
        await machines.register(conn, MACHINE)
    try:
        yield pool
    finally:
        await pool.close()


async def make_vend(pool: asyncpg.Pool, vend_id: str, events: Sequence[VendEvent]) -> list[str]:
    """Create a vend, move it through ``events``, and return its outbox event ids in order."""
    request = vends.VendRequest(vend_id, MACHINE, 1, 250, "EUR", None)
    async with pool.acquire() as conn:
        outcome, _ = await vends.create(conn, request, datetime.now(UTC) + timedelta(minutes=1))
        assert outcome == "created"
        for event in events:
            assert await vends.apply(conn, vend_id, event) is not None
            if events is THREE_EVENTS and event is _EXTRA_UNKNOWN_AFTER:
                await conn.execute(
                    "INSERT INTO webhook_outbox (event_id, vend_id, event_type, payload) "
                    "SELECT gen_random_uuid(), vend_id, event_type, payload FROM webhook_outbox "
                    "WHERE vend_id = $1",
                    vend_id,
                )
        return await event_ids(conn, vend_id)


async def event_ids(conn: Any, vend_id: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT event_id FROM webhook_outbox WHERE vend_id = $1 ORDER BY id", vend_id
    )
    return [str(r["event_id"]) for r in rows]


def config(url: str | None, **settings: Any) -> WebhookConfig:
    fast: dict[str, Any] = {
        "timeout_s": 2.0,
        "retry_base_s": 0.05,
        "retry_cap_s": 0.2,
        "poll_interval_s": 0.05,
    }
    return WebhookConfig(url=url, secret=None if url is None else SECRET, **(fast | settings))


@asynccontextmanager
async def delivering(
    pool: asyncpg.Pool, settings: WebhookConfig
) -> AsyncIterator[WebhookDeliverer]:
    """Run a deliverer in a TaskGroup for the duration of the block, then close it."""
    deliverer = WebhookDeliverer(pool, settings)
    async with asyncio.TaskGroup() as group:
        group.create_task(deliverer.run(), name="test.webhooks")
        try:
            yield deliverer
        finally:
            await deliverer.close()


async def until(check: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout_s):
        # Polling is the point: the conditions are plain predicates over receiver and stats.
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


# --- signatures --------------------------------------------------------------------------------


def test_sign_verify_round_trip_and_rejections() -> None:
    """A signature verifies for its body and secret; tampered, stale or malformed ones do not."""
    body = b'{"event_id":"e","type":"vend.dispensed"}'
    now = 1_700_000_000
    header = sign(KEY, now, body)
    assert re.fullmatch(r"t=1700000000,v1=[0-9a-f]{64}", header)
    assert verify(KEY, header, body, now=now)
    assert verify(KEY, header, body, now=now + 300)  # within the tolerance
    assert not verify(KEY, header, body + b" ", now=now)  # body changed
    assert not verify(b"another-secret-0000", header, body, now=now)
    assert not verify(KEY, header, body, now=now + 301)  # stale: a replay
    assert not verify(KEY, header, body, now=now - 301)  # from the future
    assert not verify(KEY, header.replace("t=1700000000", "t=1700000001"), body, now=now)
    assert not verify(KEY, header, body, now=now + 30, tolerance_s=10)
    for bad in ("", "t=1700000000", header.split(",")[1], "garbage", "t=x,v1=00", "t=²,v1=00"):
        assert not verify(KEY, bad, body, now=now), bad
    # While a receiver rotates secrets, a header may carry one v1 per secret.
    rotated = f"{header},v1={sign(b'old-secret-000000', now, body).split('v1=')[1]}"
    assert verify(KEY, rotated, body, now=now)
    assert verify(b"old-secret-000000", rotated, body, now=now)


def test_retry_delay_is_jittered_capped_exponential() -> None:
    """The retry delay doubles per attempt from the base, stays under the cap, and is jittered."""
    assert retry_delay(1, base_s=1.0, cap_s=300.0, draw=0.999) == pytest.approx(1.0, rel=1e-3)
    assert retry_delay(1, base_s=1.0, cap_s=300.0, draw=0.0) == 0.5
    assert retry_delay(4, base_s=1.0, cap_s=300.0, draw=0.0) == 4.0
    assert retry_delay(10_000, base_s=1.0, cap_s=300.0, draw=0.0) == 150.0
    assert retry_delay(10_000, base_s=1.0, cap_s=300.0, draw=0.999) <= 300.0


# --- delivery ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_delivers_exact_payload_with_valid_signature(pool: asyncpg.Pool) -> None:
    """An event arrives once, signed, with the headers and exactly the stored payload as body."""
    (event_id,) = await make_vend(pool, "order-1", ONE_EVENT)
    receiver = Receiver()
    async with serving(receiver) as url, delivering(pool, config(url)) as deliverer:
        await until(lambda: receiver.kept == [event_id])
        await until(lambda: deliverer.stats.in_flight == 0)
    (hit,) = receiver.hits
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT * FROM webhook_outbox WHERE event_id = $1::uuid", event_id
        )
        assert await outbox.pending_count(conn) == 0
    assert row is not None
    stored = json.loads(row["payload"])
    assert hit.body == encode_body(stored)
    assert json.loads(hit.body) == stored
    assert stored["event_id"] == event_id
    assert stored["state"] == "dispensed"
    assert hit.event_type == "vend.dispensed" == row["event_type"]
    assert hit.content_type == "application/json"
    assert verify(KEY, hit.signature, hit.body, now=time.time())
    assert row["delivered_at"] is not None
    assert row["leased_until"] is None
    assert row["attempts"] == 1
    assert deliverer.stats.delivered == 1
    assert deliverer.stats.failed == 0


@pytest.mark.asyncio
async def test_events_of_a_vend_arrive_in_order_despite_failures(pool: asyncpg.Pool) -> None:
    """A vend's later events wait while its first is refused twice, then all arrive in order."""
    ids = await make_vend(pool, "order-1", THREE_EVENTS)
    assert len(ids) == 3
    receiver = Receiver(answer=lambda _event, _vend, _seen: 500 if len(receiver.hits) < 2 else 200)
    with structlog.testing.capture_logs() as logs:
        async with serving(receiver) as url, delivering(pool, config(url)) as deliverer:
            await until(lambda: len(receiver.kept) == 3)
            await until(lambda: deliverer.stats.in_flight == 0)
    assert [(hit.event_id, hit.status) for hit in receiver.hits] == [
        (ids[0], 500),
        (ids[0], 500),
        (ids[0], 200),
        (ids[1], 200),
        (ids[2], 200),
    ]
    assert [hit.event_type for hit in receiver.hits[2:]] == [
        "vend.unknown",
        "vend.unknown",
        "vend.dispensed",
    ]
    failures = [entry for entry in logs if entry["event"] == "webhook_delivery_failed"]
    assert [(f["log_level"], f["event_id"], f["status"]) for f in failures] == [
        ("warning", ids[0], 500),
        ("warning", ids[0], 500),
    ]
    assert [f["attempt"] for f in failures] == [1, 2]
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT attempts, last_error FROM webhook_outbox ORDER BY id")
    assert [r["attempts"] for r in rows] == [3, 1, 1]
    assert rows[0]["last_error"].startswith("HTTP 500")
    assert deliverer.stats.http_errors == 2
    assert deliverer.stats.delivered == 3


@pytest.mark.asyncio
async def test_vends_do_not_block_each_other(pool: asyncpg.Pool) -> None:
    """While one vend's first event keeps failing, other vends' events are delivered."""
    stuck = await make_vend(pool, "order-stuck", TWO_EVENTS)
    others = [
        *await make_vend(pool, "order-b", TWO_EVENTS),
        *await make_vend(pool, "order-c", ONE_EVENT),
    ]
    receiver = Receiver(answer=lambda _event, vend, _seen: 503 if vend == "order-stuck" else 200)
    async with serving(receiver) as url, delivering(pool, config(url)):
        await until(lambda: sorted(receiver.kept) == sorted(others))
        await until(lambda: receiver.posts(stuck[0]) >= 3)
    assert receiver.posts(stuck[1]) == 0  # waits behind the vend's first event
    assert receiver.kept.index(others[0]) < receiver.kept.index(others[1])
    async with pool.acquire() as conn:
        assert await outbox.pending_count(conn) == 2
        assert await outbox.oldest_pending_age_s(conn) > 0


@pytest.mark.asyncio
async def test_receiver_down_then_up(pool: asyncpg.Pool) -> None:
    """Events retried while the receiver is down arrive once it is up, each kept exactly once."""
    ids = [*await make_vend(pool, "order-1", TWO_EVENTS)]
    for n in range(2, 6):
        ids += await make_vend(pool, f"order-{n}", ONE_EVENT)
    port = free_port()
    # The receiver keeps the first event but its answer is lost (500): it comes again.
    receiver = Receiver(
        answer=lambda event, _vend, seen: 500 if event == ids[2] and not seen else 200
    )
    async with delivering(pool, config(f"http://127.0.0.1:{port}/hook")) as deliverer:
        await until(lambda: deliverer.stats.connection_errors >= 3 * 5)  # a few rounds each
        async with pool.acquire() as conn:
            assert await outbox.pending_count(conn) == 6
        async with serving(receiver, port) as url:
            assert url.endswith(f":{port}/hook")
            await until(lambda: len(receiver.kept) == 6)
            await until(lambda: deliverer.stats.in_flight == 0)
    posts = Counter(hit.event_id for hit in receiver.hits)
    assert set(posts) == set(ids)
    assert posts[ids[2]] == 2
    assert sorted(receiver.kept) == sorted(ids)  # de-duplicated: each exactly once
    assert receiver.kept.index(ids[0]) < receiver.kept.index(ids[1])
    async with pool.acquire() as conn:
        assert await outbox.pending_count(conn) == 0
        assert await outbox.oldest_pending_age_s(conn) == 0.0
        rows = await conn.fetch("SELECT event_id, attempts, last_error FROM webhook_outbox")
    attempts = {str(r["event_id"]): r["attempts"] for r in rows}
    # The vend's second event waited behind its first, so it went out only once, at the end.
    assert attempts.pop(ids[1]) == 1
    assert min(attempts.values()) >= 4
    assert any("Connect" in (r["last_error"] or "") for r in rows)


@pytest.mark.asyncio
async def test_timeout_is_retried(pool: asyncpg.Pool) -> None:
    """A receiver slower than the timeout counts as a failure and the event is sent again."""
    (event_id,) = await make_vend(pool, "order-1", ONE_EVENT)
    receiver = Receiver(delay_s=0.0)
    first = asyncio.Event()

    async def slow_once(request: web.Request) -> web.Response:
        if not first.is_set():
            first.set()
            await asyncio.sleep(0.6)
        return await receiver.handle(request)

    app = web.Application()
    app.router.add_post("/hook", slow_once)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with delivering(
            pool, config(str(server.make_url("/hook")), timeout_s=0.2)
        ) as deliverer:
            await until(lambda: deliverer.stats.delivered == 1)
            await until(lambda: deliverer.stats.in_flight == 0)
        assert deliverer.stats.timeouts == 1
        assert event_id in receiver.kept
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_two_deliverers_never_send_an_event_twice(database: str, pool: asyncpg.Pool) -> None:
    """Two gateways sharing an outbox POST each event once and never one vend twice at once."""
    per_vend = {f"order-{n}": await make_vend(pool, f"order-{n}", ONE_EVENT) for n in range(30)}
    for n in range(3):
        per_vend[f"order-x{n}"] = await make_vend(pool, f"order-x{n}", THREE_EVENTS)
    all_ids = [event for ids in per_vend.values() for event in ids]
    receiver = Receiver(delay_s=0.02)
    other_pool = await create_pool(database, min_size=1, max_size=6)
    try:
        async with serving(receiver) as url:
            settings = config(url, concurrency=4)
            async with delivering(pool, settings) as one, delivering(other_pool, settings) as two:
                await until(lambda: len(receiver.kept) == len(all_ids))
                await until(lambda: one.stats.in_flight == two.stats.in_flight == 0)
    finally:
        await other_pool.close()
    assert Counter(hit.event_id for hit in receiver.hits) == Counter(all_ids)  # once each
    assert receiver.overlaps == []
    assert one.stats.delivered + two.stats.delivered == len(all_ids)
    assert one.stats.delivered > 0
    assert two.stats.delivered > 0
    order: dict[str, list[str]] = defaultdict(list)
    for event in receiver.kept:
        order[next(v for v, ids in per_vend.items() if event in ids)].append(event)
    assert order == per_vend


@pytest.mark.asyncio
async def test_no_url_keeps_events_in_the_outbox(pool: asyncpg.Pool) -> None:
    """With no URL nothing is claimed or sent, and events accumulate in the outbox."""
    await make_vend(pool, "order-1", TWO_EVENTS)
    async with delivering(pool, config(None)) as deliverer:
        deliverer.wake()
        await asyncio.sleep(0.2)
    assert deliverer.stats.claimed == 0
    async with pool.acquire() as conn:
        assert await outbox.pending_count(conn) == 2
        assert await outbox.oldest_pending_age_s(conn) > 0


@pytest.mark.asyncio
async def test_claim_takes_only_the_head_of_each_vend(pool: asyncpg.Pool) -> None:
    """A claim leases the oldest due event per vend, and a leased event is not claimed again."""
    first = await make_vend(pool, "order-1", THREE_EVENTS)
    second = await make_vend(pool, "order-2", ONE_EVENT)
    async with pool.acquire() as conn:
        claimed = await outbox.claim_due(conn, 10, lease_s=30)
        assert [str(e.event_id) for e in claimed] == [first[0], second[0]]
        assert [e.attempts for e in claimed] == [1, 1]
        assert await outbox.claim_due(conn, 10) == []  # leased, and later events wait
        # A failure releases the lease until the retry time; a stale claim cannot overwrite it.
        later = claimed[0].claimed_at + timedelta(hours=1)
        assert await outbox.mark_failed(conn, claimed[0].id, "HTTP 500", later, attempt=1)
        assert not await outbox.mark_failed(conn, claimed[0].id, "old", later, attempt=0)
        assert await outbox.claim_due(conn, 10) == []  # not due yet
        assert await outbox.mark_delivered_many(conn, [claimed[1].id]) == 1
        assert await outbox.mark_delivered_many(conn, [claimed[1].id, claimed[1].id]) == 0
        assert not await outbox.mark_delivered(conn, claimed[1].id)
        now = await conn.fetchval("SELECT now()")
        assert await outbox.mark_failed(conn, claimed[0].id, "HTTP 500", now, attempt=1)
        (again,) = await outbox.claim_due(conn, 10)
        assert (str(again.event_id), again.attempts) == (first[0], 2)
        assert await outbox.pending_count(conn) == 3
