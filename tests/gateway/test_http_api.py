import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import prometheus_client
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import VendConfig
from gateway.errors import OverloadedError
from gateway.http_api import OPENAPI, begin_shutdown, create_app
from gateway.lifecycle import VendEvent
from gateway.logs import configure_logging
from gateway.store import vends
from gateway.store.db import migrate
from gateway.store.vends import VendRow
from gateway.store.writer import GroupCommitter, Op

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

T = TypeVar("T")
MACHINE = "m-1"
VEND_CONFIG = VendConfig(default_deadline_s=60, max_deadline_s=600)


class RecordingSink:
    """Records the vends the API hands to the dispatcher."""

    def __init__(self) -> None:
        self.rows: list[VendRow] = []

    def vend_accepted(self, row: VendRow) -> None:
        """Record ``row``."""
        self.rows.append(row)


class FakeReadiness:
    """Readiness flags a test can flip, or make raise."""

    def __init__(self) -> None:
        self.checks = {"database": True, "mqtt": True}
        self.broken = False

    def ready(self) -> dict[str, bool]:
        """Return the flags, or raise when broken."""
        if self.broken:
            raise RuntimeError("readiness probe exploded")
        return dict(self.checks)


@dataclass
class Clock:
    """A settable wall clock, in epoch seconds."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        """Return the current time."""
        return self.now


class OverloadedWriter(GroupCommitter):
    """A writer whose queue is always full."""

    async def submit(self, op: Op[T]) -> T:  # noqa: ARG002  (the same signature, never run)
        """Refuse ``op`` as a full queue would."""
        raise OverloadedError("database write queue", 1)

    async def submit_batchable(self, *_args: object, **_kwargs: object) -> Any:
        """Refuse a batchable operation as a full queue would."""
        raise OverloadedError("database write queue", 1)


@dataclass
class Api:
    """A running app with its client and collaborators."""

    client: TestClient[web.Request, web.Application]
    app: web.Application
    pool: asyncpg.Pool
    sink: RecordingSink
    readiness: FakeReadiness
    clock: Clock

    async def post(self, path: str, body: object) -> tuple[int, Any]:
        """POST ``body`` as JSON; return the status and the decoded answer."""
        async with self.client.post(path, json=body) as response:
            return response.status, await response.json()

    async def get(self, path: str) -> tuple[int, Any]:
        """GET ``path``; return the status and the decoded answer."""
        async with self.client.get(path) as response:
            return response.status, await response.json()


@contextlib.asynccontextmanager
async def serve(
    dsn: str, writer_class: type[GroupCommitter] = GroupCommitter
) -> AsyncIterator[Api]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
        await conn.execute("INSERT INTO machines (machine_id) VALUES ($1)", MACHINE)
    writer = writer_class(pool)
    writer_task = asyncio.create_task(writer.run(), name="test.writer")
    sink, readiness, clock = RecordingSink(), FakeReadiness(), Clock()
    app = create_app(
        pool=pool,
        writer=writer,
        sink=sink,
        readiness=readiness,
        vend=VEND_CONFIG,
        registry=prometheus_client.CollectorRegistry(),
        clock=clock,
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield Api(client, app, pool, sink, readiness, clock)
    finally:
        await client.close()
        writer_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer_task
        await pool.close()


@pytest_asyncio.fixture
async def api(database: str) -> AsyncIterator[Api]:
    async with serve(database) as running:
        yield running


def vend_body(vend_id: str = "order-1", **changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "vend_id": vend_id,
        "machine_id": MACHINE,
        "slot": 3,
        "price": 250,
        "currency": "CNY",
    }
    body.update(changes)
    return body


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def parse(timestamp: str) -> datetime:
    assert timestamp.endswith("Z")
    return datetime.fromisoformat(timestamp)


async def to_unknown(api: Api, vend_id: str) -> None:
    async with api.pool.acquire() as conn, conn.transaction():
        assert await vends.apply(conn, vend_id, VendEvent.PUBLISHED) is not None
        assert await vends.apply(conn, vend_id, VendEvent.NO_ACK) is not None


# --- POST /v1/vends ---------------------------------------------------------------------------


async def test_create_answers_202_and_hands_the_row_to_the_sink(api: Api) -> None:
    """A new vend is answered 202 with its JSON and passed to the sink once, after commit."""
    status, vend = await api.post("/v1/vends", vend_body())
    assert status == 202
    assert vend["vend_id"] == "order-1"
    assert vend["machine_id"] == MACHINE
    assert (vend["slot"], vend["price"], vend["currency"]) == (3, 250, "CNY")
    assert vend["state"] == "accepted"
    assert vend["outcome"] is None
    assert vend["refund_required"] is False
    assert vend["attempts"] == 0
    assert vend["dispense"] is None
    assert parse(vend["deadline"]) == datetime.fromtimestamp(api.clock.now + 60, UTC)
    assert parse(vend["created_at"]) <= parse(vend["updated_at"])
    assert [row.vend_id for row in api.sink.rows] == ["order-1"]
    async with api.pool.acquire() as conn:
        assert await vends.get(conn, "order-1") == api.sink.rows[0]


async def test_identical_repeat_answers_200_and_hands_over_a_still_waiting_vend(api: Api) -> None:
    """A repeat returns the stored vend with 200; if still accepted it is handed over again.

    The first answer may have been lost after the commit but before the hand-off to the
    dispatcher; handing over again is safe because the dispatcher ignores vends it has.
    """
    first_status, first = await api.post("/v1/vends", vend_body())
    api.clock.now += 30  # a re-sent notification arrives later; no deadline was given
    status, again = await api.post("/v1/vends", vend_body())
    assert (first_status, status) == (202, 200)
    assert again == first
    assert [row.vend_id for row in api.sink.rows] == ["order-1", "order-1"]


async def test_repeat_with_an_explicit_deadline_after_it_passed_returns_the_vend(api: Api) -> None:
    """A re-sent request whose absolute deadline has passed still gets its vend, not a 422."""
    body = vend_body(deadline=rfc3339(api.clock.now + 20))
    assert (await api.post("/v1/vends", body))[0] == 202
    api.clock.now += 3600
    status, vend = await api.post("/v1/vends", body)
    assert status == 200
    assert vend["vend_id"] == "order-1"
    status, error = await api.post("/v1/vends", {**body, "price": 1})
    assert status == 422
    assert error["error"]["field"] == "deadline"


async def test_repeat_with_a_different_body_is_a_conflict(api: Api) -> None:
    """Reusing a vend id for a different request is refused with 409 naming vend_id."""
    await api.post("/v1/vends", vend_body())
    status, error = await api.post("/v1/vends", vend_body(price=999))
    assert status == 409
    assert error["error"]["code"] == "vend_conflict"
    assert error["error"]["field"] == "vend_id"
    assert len(api.sink.rows) == 1


async def test_unknown_machine_is_404(api: Api) -> None:
    """A vend for a machine that is not registered is refused with 404 naming machine_id."""
    status, error = await api.post("/v1/vends", vend_body(machine_id="nowhere"))
    assert status == 404
    assert error["error"]["field"] == "machine_id"
    assert api.sink.rows == []


async def test_price_or_slot_the_planogram_refuses_is_409_before_payment(api: Api) -> None:
    """A stale price, a slot not in the planogram or a disabled slot: 409, nothing stored."""
    async with api.pool.acquire() as conn:
        await conn.execute("UPDATE machines SET config_desired = 1 WHERE machine_id = $1;", MACHINE)
        await conn.execute(
            "INSERT INTO machine_slots (machine_id, slot, price, currency, enabled,"
            " disabled_reason) VALUES ($1, 3, 350, 'CNY', true, NULL),"
            " ($1, 4, 200, 'CNY', false, '3 failed dispenses in a row (last: JAM)')",
            MACHINE,
        )
    cases = [
        ({"slot": 3, "price": 300}, "price_mismatch", "350 CNY in planogram version 1"),
        ({"slot": 5, "price": 300}, "slot_not_in_planogram", "has no such slot"),
        ({"slot": 4, "price": 200}, "slot_disabled", "out of service"),
    ]
    for i, (changes, code, words) in enumerate(cases):
        status, body = await api.post("/v1/vends", vend_body(f"refused-{i}", **changes))
        assert status == 409, body
        assert body["error"]["code"] == code
        assert words in body["error"]["message"]
    status, _ = await api.post("/v1/vends", vend_body("fine", slot=3, price=350))
    assert status == 202
    assert [row.vend_id for row in api.sink.rows] == ["fine"]
    async with api.client.get("/metrics") as response:
        text = await response.text()
    assert 'vendgate_vends_refused_total{reason="price_mismatch"} 1.0' in text


async def test_deadline_given_absolute_or_relative_is_used(api: Api) -> None:
    """An RFC 3339 deadline (any offset) is kept as that instant; deadline_s counts from now."""
    now = api.clock.now
    status, vend = await api.post(
        "/v1/vends",
        vend_body("a", deadline=datetime.fromtimestamp(now + 100, UTC).isoformat()),
    )
    assert status == 202
    assert parse(vend["deadline"]) == datetime.fromtimestamp(now + 100, UTC)
    status, vend = await api.post("/v1/vends", vend_body("b", deadline_s=30))
    assert status == 202
    assert parse(vend["deadline"]) == datetime.fromtimestamp(now + 30, UTC)


def _in(seconds: float) -> Callable[[float], str]:
    return lambda now: rfc3339(now + seconds)


INVALID: list[tuple[str, dict[str, object], str]] = [
    ("missing vend_id", {"vend_id": None}, "vend_id"),
    ("missing slot", {"slot": None}, "slot"),
    ("slot as a string", {"slot": "3"}, "slot"),
    ("price as a float", {"price": 2.5}, "price"),
    ("machine_id as a number", {"machine_id": 7}, "machine_id"),
    ("slot as a bool", {"slot": True}, "slot"),
    ("price as a bool", {"price": False}, "price"),
    ("slot above 255", {"slot": 256}, "slot"),
    ("slot below 0", {"slot": -1}, "slot"),
    ("price above u32", {"price": 2**32}, "price"),
    ("price below 0", {"price": -1}, "price"),
    ("currency lower case", {"currency": "cny"}, "currency"),
    ("currency of four letters", {"currency": "EURO"}, "currency"),
    ("empty vend_id", {"vend_id": ""}, "vend_id"),
    ("vend_id with a space", {"vend_id": "a b"}, "vend_id"),
    ("vend_id of 65 characters", {"vend_id": "x" * 65}, "vend_id"),
    ("machine_id with a slash", {"machine_id": "m/1"}, "machine_id"),
    ("deadline in the past", {"deadline": _in(-1)}, "deadline"),
    ("deadline too far", {"deadline": _in(601)}, "deadline"),
    ("deadline without a zone", {"deadline": "2030-01-01T00:00:00"}, "deadline"),
    ("deadline as a date", {"deadline": "2030-01-01"}, "deadline"),
    ("deadline as a number", {"deadline": 1_900_000_000}, "deadline"),
    ("deadline_s zero", {"deadline_s": 0}, "deadline_s"),
    ("deadline_s too far", {"deadline_s": 601}, "deadline_s"),
    ("deadline_s as a bool", {"deadline_s": True}, "deadline_s"),
    ("both deadlines", {"deadline": _in(30), "deadline_s": 30}, "deadline"),
    ("unknown field", {"colour": "red"}, "colour"),
]


@pytest.mark.parametrize(
    ("changes", "field_name"),
    [(changes, name) for _, changes, name in INVALID],
    ids=[case for case, _, _ in INVALID],
)
async def test_invalid_vend_is_422_naming_the_field(
    api: Api, changes: dict[str, object], field_name: str
) -> None:
    """Each invalid or missing field is refused with 422 and the field's name."""
    body = vend_body()
    for key, value in changes.items():
        if value is None:
            del body[key]
        else:
            body[key] = value(api.clock.now) if callable(value) else value
    status, error = await api.post("/v1/vends", body)
    assert status == 422, error
    assert error["error"]["code"] == "validation"
    assert error["error"]["field"] == field_name
    assert api.sink.rows == []


@pytest.mark.parametrize(
    "raw", [b"{", b"[1, 2]", b'"text"', b'{"slot": NaN}', b"\xff\xfe", b"[" * 50_000]
)
async def test_malformed_body_is_400(api: Api, raw: bytes) -> None:
    """A body that is not a JSON object is refused with 400."""
    async with api.client.post("/v1/vends", data=raw) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "bad_request"


async def test_body_over_the_limit_is_413(api: Api) -> None:
    """A body larger than max_body_bytes is refused with 413 before it is parsed."""
    body = json.dumps(vend_body(padding="x" * (64 * 1024))).encode()
    async with api.client.post("/v1/vends", data=body) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_entity_too_large"


async def test_concurrent_identical_posts_create_one_vend(api: Api) -> None:
    """Twenty identical requests at once make one vend: one 202, nineteen 200, one vend."""
    results = await asyncio.gather(*(api.post("/v1/vends", vend_body()) for _ in range(20)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * 19 + [202]
    assert len({json.dumps(vend, sort_keys=True) for _, vend in results}) == 1
    # Repeats of a still-accepted vend are handed over again; the dispatcher ignores them.
    assert {(row.vend_id, row.wire_id) for row in api.sink.rows} == {
        ("order-1", api.sink.rows[0].wire_id)
    }
    async with api.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM vends") == 1


async def test_overloaded_writer_is_503_with_retry_after(database: str) -> None:
    """A full write queue is answered 503 with Retry-After so the backend retries."""
    async with serve(database, OverloadedWriter) as api:
        async with api.client.post("/v1/vends", json=vend_body()) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["error"]["code"] == "overloaded"
        assert api.sink.rows == []


# --- GET /v1/vends/{vend_id} ------------------------------------------------------------------


async def test_get_returns_state_and_history(api: Api) -> None:
    """GET shows the vend's current state and every transition with its time and actor."""
    await api.post("/v1/vends", vend_body())
    await to_unknown(api, "order-1")
    status, vend = await api.get("/v1/vends/order-1")
    assert status == 200
    assert vend["state"] == "unknown"
    steps = [(h["from"], h["to"], h["event"], h["actor"]) for h in vend["history"]]
    assert steps == [
        (None, "accepted", "created", "gateway"),
        ("accepted", "sent", "published", "gateway"),
        ("sent", "unknown", "no_ack", "gateway"),
    ]
    times = [parse(h["at"]) for h in vend["history"]]
    assert times == sorted(times)


async def test_get_unknown_vend_is_404(api: Api) -> None:
    """GET of a vend id never stored is 404 naming vend_id."""
    status, error = await api.get("/v1/vends/nosuch")
    assert status == 404
    assert error["error"]["field"] == "vend_id"


# --- POST /v1/vends/{vend_id}/resolve ---------------------------------------------------------


RESOLUTION = {"outcome": "not_dispensed", "operator": "alice", "reason": "tray empty on visit"}


async def test_resolve_is_refused_unless_the_vend_is_unknown(api: Api) -> None:
    """Resolving a vend that is not unknown is 409 and says the state it is in."""
    await api.post("/v1/vends", vend_body())
    status, error = await api.post("/v1/vends/order-1/resolve", RESOLUTION)
    assert status == 409
    assert error["error"]["field"] == "vend_id"
    assert "accepted" in error["error"]["message"]


async def test_resolve_settles_an_unknown_vend_and_audits_it(api: Api) -> None:
    """An operator's resolution of an unknown vend is applied and recorded with actor and reason."""
    await api.post("/v1/vends", vend_body())
    await to_unknown(api, "order-1")
    status, vend = await api.post("/v1/vends/order-1/resolve", RESOLUTION)
    assert status == 200
    assert (vend["state"], vend["outcome"], vend["refund_required"]) == (
        "failed",
        "not_dispensed",
        True,
    )
    _, shown = await api.get("/v1/vends/order-1")
    last = shown["history"][-1]
    assert (last["from"], last["to"], last["event"]) == (
        "unknown",
        "failed",
        "operator_not_dispensed",
    )
    assert last["actor"] == "operator:alice"
    assert last["detail"] == {"reason": "tray empty on visit"}
    status, _ = await api.post("/v1/vends/order-1/resolve", {**RESOLUTION, "outcome": "dispensed"})
    assert status == 409


async def test_resolve_unknown_vend_is_404(api: Api) -> None:
    """Resolving a vend id never stored is 404."""
    status, error = await api.post("/v1/vends/nosuch/resolve", RESOLUTION)
    assert status == 404
    assert error["error"]["field"] == "vend_id"


@pytest.mark.parametrize(
    ("changes", "field_name"),
    [
        ({"outcome": "maybe"}, "outcome"),
        ({"operator": ""}, "operator"),
        ({"operator": "x" * 65}, "operator"),
        ({"reason": 5}, "reason"),
        ({"reason": "x" * 501}, "reason"),
        ({"reason": "nul\x00byte"}, "reason"),
        ({"ticket": 1}, "ticket"),
    ],
)
async def test_invalid_resolution_is_422(
    api: Api, changes: dict[str, object], field_name: str
) -> None:
    """A resolution with a bad outcome, operator, reason or an extra field is 422 naming it."""
    await api.post("/v1/vends", vend_body())
    await to_unknown(api, "order-1")
    status, error = await api.post("/v1/vends/order-1/resolve", {**RESOLUTION, **changes})
    assert status == 422
    assert error["error"]["field"] == field_name


# --- machines ---------------------------------------------------------------------------------


async def test_register_and_get_machine(api: Api) -> None:
    """Registering answers 201, again 200; GET finds it, and an unknown id is 404."""
    assert await api.post("/v1/machines", {"machine_id": "m-2"}) == (201, {"machine_id": "m-2"})
    assert await api.post("/v1/machines", {"machine_id": "m-2"}) == (200, {"machine_id": "m-2"})
    assert await api.get("/v1/machines/m-2") == (200, {"machine_id": "m-2"})
    status, error = await api.get("/v1/machines/m-3")
    assert status == 404
    assert error["error"]["field"] == "machine_id"
    status, error = await api.post("/v1/machines", {"machine_id": "bad id"})
    assert status == 422
    assert error["error"]["field"] == "machine_id"


# --- operations -------------------------------------------------------------------------------


async def test_health_and_readiness(api: Api) -> None:
    """/healthz is always 200; /readyz is 200 only while every check passes."""
    assert await api.get("/healthz") == (200, {"status": "ok"})
    status, ready = await api.get("/readyz")
    assert (status, ready["status"]) == (200, "ready")
    api.readiness.checks["mqtt"] = False
    status, ready = await api.get("/readyz")
    assert status == 503
    assert ready["checks"] == {"database": True, "mqtt": False}
    assert (await api.get("/healthz"))[0] == 200


async def test_shutdown_stops_intake(api: Api) -> None:
    """After begin_shutdown POST routes answer 503 and /readyz fails, while GETs still work."""
    await api.post("/v1/vends", vend_body())
    begin_shutdown(api.app)
    async with api.client.post("/v1/vends", json=vend_body("order-2")) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["error"]["code"] == "shutting_down"
    assert (await api.post("/v1/machines", {"machine_id": "m-9"}))[0] == 503
    assert (await api.post("/v1/vends/order-1/resolve", RESOLUTION))[0] == 503
    status, ready = await api.get("/readyz")
    assert (status, ready["status"]) == (503, "shutting_down")
    assert (await api.get("/v1/vends/order-1"))[0] == 200
    assert len(api.sink.rows) == 1


async def test_unexpected_error_is_500_and_the_server_keeps_serving(api: Api) -> None:
    """An exception escaping a handler is answered 500 as JSON and its traceback is logged."""
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    api.readiness.broken = True
    status, error = await api.get("/readyz")
    assert status == 500
    assert error["error"]["code"] == "internal"
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    (event,) = [e for e in events if e["event"] == "http_unexpected_error"]
    assert "readiness probe exploded" in event["exception"]
    assert (await api.get("/healthz"))[0] == 200


async def test_metrics_label_routes_by_pattern(api: Api) -> None:
    """/metrics counts requests by route pattern, method and status, never by raw path."""
    await api.post("/v1/vends", vend_body())
    await api.get("/v1/vends/order-1")
    await api.get("/v1/vends/nosuch")
    await api.get("/no/such/path")
    async with api.client.get("/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    assert 'vendgate_http_requests_total{method="POST",route="/v1/vends",status="202"} 1.0' in text
    assert (
        'vendgate_http_requests_total{method="GET",route="/v1/vends/{vend_id}",status="404"} 1.0'
        in text
    )
    assert 'route="unmatched"' in text
    assert 'vendgate_http_request_seconds_count{route="/v1/vends/{vend_id}"} 2.0' in text
    assert "nosuch" not in text
    assert "order-1" not in text


async def test_openapi_lists_exactly_the_routes(api: Api) -> None:
    """The OpenAPI document names every route and method the router serves, and no others."""
    status, document = await api.get("/v1/openapi.json")
    assert status == 200
    assert document == json.loads(json.dumps(OPENAPI))
    assert document["openapi"].startswith("3.1")
    served = {
        (route.resource.canonical, route.method.lower())
        for route in api.app.router.routes()
        if route.resource is not None
    }
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert documented == served
    refs = set(_refs(document))
    schemas = document["components"]["schemas"]
    assert {ref.removeprefix("#/components/schemas/") for ref in refs} <= set(schemas)


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


async def test_reads_without_a_database_are_503(api: Api) -> None:
    """A read that cannot reach PostgreSQL is answered 503 with Retry-After, not 500."""
    await api.pool.close()
    async with api.client.get("/v1/vends/order-1") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["error"]["code"] == "database_unavailable"
