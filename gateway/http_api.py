"""The HTTP API: ``/v1`` vend and machine routes, health, readiness, metrics, OpenAPI.

Handlers validate the JSON body by hand (the rules are few and the error must name the
field), hand every write to the group-commit writer, and answer only after the commit: a
202 means the vend is durable (docs/architecture.md, "exactly once"). Errors are JSON
``{"error": {"code", "message", "field"?}}``; a :class:`~gateway.errors.GatewayError` is
answered with its class's ``http_status``, anything else with 500 and a logged traceback.

Payment backends re-send their notifications for hours (vending-domain.md), so a repeated
``POST /v1/vends`` with the same body is answered 200 with the stored vend, never a second
vend and never an error.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any, Final, Protocol

import asyncpg
import prometheus_client
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.config import VendConfig
from gateway.errors import (
    DatabaseUnavailableError,
    GatewayError,
    PriceMismatchError,
    ShuttingDownError,
    SlotDisabledError,
    SlotNotInPlanogramError,
    SlotRefusedError,
    UnknownMachineError,
    UnknownVendError,
    ValidationError,
    VendConflictError,
)
from gateway.lifecycle import VendEvent, VendStatus
from gateway.logs import get_logger
from gateway.store import machines, vends
from gateway.store.db import Conn
from gateway.store.vends import Transition, VendRequest, VendRow
from gateway.store.writer import Batchable, GroupCommitter
from protocols.codec import check_machine_id

__all__ = [
    "OPENAPI",
    "ApiExtension",
    "Readiness",
    "VendSink",
    "begin_shutdown",
    "create_app",
    "openapi_document",
]

log = get_logger("gateway.http_api")

_VEND_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_CURRENCY: Final = re.compile(r"[A-Z]{3}")
# RFC 3339 §5.6 date-time; datetime.fromisoformat alone also takes dates, week dates, no zone.
_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})"
)
# C0 controls and DEL; PostgreSQL text and jsonb cannot hold NUL at all.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_SPACE: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_MAX_PRICE: Final = 0xFFFF_FFFF  # SPEC: a u32 in minor units
_VEND_FIELDS: Final = frozenset(
    {"vend_id", "machine_id", "slot", "price", "currency", "deadline", "deadline_s"}
)
_RESOLVE_FIELDS: Final = frozenset({"outcome", "operator", "reason"})
_MACHINE_FIELDS: Final = frozenset({"machine_id"})
_RESOLUTIONS: Final = {
    "dispensed": VendEvent.OPERATOR_DISPENSED,
    "not_dispensed": VendEvent.OPERATOR_NOT_DISPENSED,
}
#: Read-side errors that mean "the database is not there" (the writer maps its own the same way).
_UNAVAILABLE: Final = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
)
_SLOT_ERRORS: Final[dict[str, type[SlotRefusedError]]] = {
    "slot_disabled": SlotDisabledError,
    "not_in_planogram": SlotNotInPlanogramError,
    "price_mismatch": PriceMismatchError,
}
_UNMATCHED: Final = "unmatched"  # the route label of a request no route matched

_Created = tuple[vends.CreateOutcome, VendRow | vends.Refusal | None]


_CREATES: Final[Batchable[tuple[VendRequest, datetime], _Created]] = Batchable(
    "vend_creates", vends.create_many
)


class VendSink(Protocol):
    """Where freshly committed vends go: the dispatcher's queues."""

    def vend_accepted(self, row: VendRow) -> None:
        """Queue a vend that was just created (called after its commit, once per vend)."""


class ApiExtension(Protocol):
    """A group of routes added by another module (machines, planograms), with their OpenAPI.

    ``add_routes`` registers the handlers (``allow_head=False`` on GETs) and keeps whatever
    they need in its own ``web.AppKey``. The error middleware, metrics and shutdown gate of
    this module apply to them as to every route.
    """

    openapi_paths: Mapping[str, Any]
    openapi_schemas: Mapping[str, Any]

    def add_routes(self, app: web.Application) -> None:
        """Register the extension's routes on ``app``."""


class Readiness(Protocol):
    """The gateway's dependencies, as seen by ``/readyz``."""

    def ready(self) -> dict[str, bool]:
        """Return one flag per dependency, e.g. ``{"database": True, "mqtt": True}``."""


@dataclass(slots=True)
class _Api:
    pool: asyncpg.Pool
    writer: GroupCommitter
    sink: VendSink
    readiness: Readiness
    vend: VendConfig
    clock: Callable[[], float]
    requests: prometheus_client.Counter
    seconds: prometheus_client.Histogram
    slot_refusals: prometheus_client.Counter
    on_registered: Callable[[str], None]
    shutting_down: bool = False
    # The metrics' children by labels: a labels() lookup takes a lock and builds a tuple.
    _timers: dict[str, Any] = field(default_factory=dict)
    _counters: dict[tuple[str, str, int], Any] = field(default_factory=dict)

    def observe(self, request: web.Request, status: int, started: float) -> None:
        """Count and time one answered request, by route pattern (never the raw path)."""
        resource = request.match_info.route.resource
        # The pattern, never the raw path: ids in labels would grow the series without bound.
        route = _UNMATCHED if resource is None else resource.canonical
        timer = self._timers.get(route)
        if timer is None:
            timer = self._timers[route] = self.seconds.labels(route)
        timer.observe(time.perf_counter() - started)
        key = (route, request.method, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.requests.labels(route, request.method, str(status))
        counter.inc()


_API: Final = web.AppKey("vendgate.http_api", _Api)
_REGISTRY: Final = web.AppKey("vendgate.http_registry", prometheus_client.CollectorRegistry)
_DOCUMENT: Final = web.AppKey("vendgate.http_openapi", dict)


def create_app(
    *,
    pool: asyncpg.Pool,
    writer: GroupCommitter,
    sink: VendSink,
    readiness: Readiness,
    vend: VendConfig,
    registry: prometheus_client.CollectorRegistry,
    clock: Callable[[], float] = time.time,
    max_body_bytes: int = 64 * 1024,
    extensions: Sequence[ApiExtension] = (),
    on_registered: Callable[[str], None] = lambda _machine_id: None,
) -> web.Application:
    """Build the aiohttp application; the caller runs it (``web.AppRunner``).

    ``on_registered`` is told every machine id registered (or registered again) through
    ``POST /v1/machines``, after the commit: the uplink's cache of known machines.
    """
    api = _Api(
        pool=pool,
        writer=writer,
        sink=sink,
        readiness=readiness,
        vend=vend,
        clock=clock,
        on_registered=on_registered,
        requests=prometheus_client.Counter(
            "vendgate_http_requests",
            "HTTP requests answered, by route pattern, method and status.",
            ["route", "method", "status"],
            registry=registry,
        ),
        seconds=prometheus_client.Histogram(
            "vendgate_http_request_seconds",
            "Time to answer an HTTP request, by route pattern.",
            ["route"],
            registry=registry,
        ),
        slot_refusals=prometheus_client.Counter(
            "vendgate_vends_refused",
            "Vends refused with 409 before being stored, by reason (slot_disabled, "
            "not_in_planogram, price_mismatch).",
            ["reason"],
            registry=registry,
        ),
    )
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_middleware])
    app[_API] = api
    app[_REGISTRY] = registry
    # allow_head=False: the routes are exactly those the OpenAPI document lists.
    app.router.add_post("/v1/vends", _create_vend)
    app.router.add_get("/v1/vends/{vend_id}", _get_vend, allow_head=False)
    app.router.add_post("/v1/vends/{vend_id}/resolve", _resolve_vend)
    app.router.add_post("/v1/machines", _register_machine)
    if not any("/v1/machines/{machine_id}" in ext.openapi_paths for ext in extensions):
        app.router.add_get("/v1/machines/{machine_id}", _get_machine, allow_head=False)
    for extension in extensions:
        extension.add_routes(app)
    app[_DOCUMENT] = openapi_document(extensions)
    app.router.add_get("/healthz", _healthz, allow_head=False)
    app.router.add_get("/readyz", _readyz, allow_head=False)
    app.router.add_get("/metrics", _metrics, allow_head=False)
    app.router.add_get("/v1/openapi.json", _openapi, allow_head=False)
    return app


def bound_port(site: web.TCPSite) -> int:
    """Return the port a started site is listening on (useful when it was started on port 0)."""
    server = site._server  # noqa: SLF001  (aiohttp exposes the bound socket only here)
    for sock in getattr(server, "sockets", None) or []:
        return int(sock.getsockname()[1])
    raise RuntimeError("the HTTP site has no socket")


def begin_shutdown(app: web.Application) -> None:
    """Stop intake: writes (POST, PUT) now answer 503 and ``/readyz`` fails (house style #9)."""
    app[_API].shutting_down = True
    log.info("http_intake_stopped")


# --- middlewares --------------------------------------------------------------------------------


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Gate writes while shutting down, answer errors as JSON, count and time every request.

    One middleware rather than three: each is a coroutine more on every request. The
    shutdown gate answers before a handler reads a body; the metrics see the final status.
    """
    api = request.app[_API]
    started = time.perf_counter()
    try:
        if api.shutting_down and request.method not in ("GET", "HEAD"):
            raise ShuttingDownError  # noqa: TRY301  (answered below like a handler's)
        response = await handler(request)
    except GatewayError as exc:
        headers = {"Retry-After": "1"} if exc.retriable and exc.http_status == 503 else {}
        response = _error(exc.http_status, _code(exc), str(exc), _field_of(exc), headers)
    except web.HTTPException as exc:
        response = _http_error(exc)
    except Exception:  # any bug: answer 500, keep serving, log the traceback
        log.exception("http_unexpected_error", method=request.method, path=request.path)
        response = _error(500, "internal", "internal error; see the gateway log", None)
    except BaseException:  # cancelled (the client left): counted as a 500, as it ended so
        api.observe(request, 500, started)
        raise
    api.observe(request, response.status, started)
    return response


def _http_error(exc: web.HTTPException) -> web.Response:
    """Answer aiohttp's own errors (404 no route, 405, 413 body too large) in our JSON shape."""
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
    try:
        code = HTTPStatus(exc.status).phrase.lower().replace(" ", "_")
    except ValueError:
        code = "http_error"
    # Our own 400s put the message in reason; aiohttp's 413 puts the sizes in text.
    text = exc.text or ""
    message = exc.reason if not text or text.startswith(f"{exc.status}:") else text
    return _error(exc.status, code, message, None, headers)


def _error(
    status: int,
    code: str,
    message: str,
    field: str | None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return web.json_response({"error": body}, status=status, headers=headers)


def _code(exc: GatewayError) -> str:
    """Return ``unknown_machine`` for UnknownMachineError, and so on."""
    name = type(exc).__name__.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _field_of(exc: GatewayError) -> str | None:
    if isinstance(exc, ValidationError):
        return exc.field
    if isinstance(exc, UnknownMachineError):
        return "machine_id"
    if isinstance(exc, UnknownVendError | VendConflictError):
        return "vend_id"
    return None


# --- vends --------------------------------------------------------------------------------------


async def _create_vend(request: web.Request) -> web.Response:
    api = request.app[_API]
    body = await _json_object(request, _VEND_FIELDS)
    vend_id = _vend_id(body)
    machine_id = _machine_id(body)
    with structlog.contextvars.bound_contextvars(vend_id=vend_id, machine_id=machine_id):
        slot = _integer(body, "slot", 0, 255)
        price = _integer(body, "price", 0, _MAX_PRICE)
        currency = _string(body, "currency", _CURRENCY, "expected 3 upper-case letters (ISO 4217)")
        now = datetime.fromtimestamp(api.clock(), UTC)
        given, deadline = _deadline(body, api.vend, now)
        vend_request = VendRequest(vend_id, machine_id, slot, price, currency, given)
        problem = _deadline_problem(deadline, now, api.vend)
        if problem is not None:
            # A backend re-sending an accepted request after its deadline passed must get
            # the vend back, not a 4xx it could read as "not served" and refund.
            repeat = await _stored_repeat(api.pool, vend_request)
            if repeat is None:
                raise ValidationError("deadline" if given is not None else "deadline_s", problem)
            return web.json_response(_vend_json(repeat), status=200)

        # Batched with other requests' inserts: one statement for a commit's new vends.
        outcome, row = await api.writer.submit_batchable(
            _CREATES, vend_request.vend_id, (vend_request, deadline)
        )
        if outcome == "unknown_machine":
            raise UnknownMachineError(machine_id)
        if isinstance(row, vends.Refusal):
            api.slot_refusals.labels(outcome).inc()
            log.info("vend_refused_for_slot", outcome=outcome, slot=slot, reason=row.reason)
            raise _SLOT_ERRORS[outcome](machine_id, slot, row.reason)
        assert row is not None  # noqa: S101  (create returns a row for the other outcomes)
        if outcome == "conflict":
            log.warning("vend_conflict", stored_state=row.state.value)
            raise VendConflictError(vend_id, "the id is taken by a different request")
        if outcome == "exists":
            log.debug("vend_repeated", state=row.state.value)
            if row.state is VendStatus.ACCEPTED:
                # The first answer may have been lost after the commit, before the hand-off:
                # hand it over again (the dispatcher ignores vends it already has).
                api.sink.vend_accepted(row)
            return web.json_response(_vend_json(row), status=200)
        log.debug("vend_accepted", slot=slot, deadline=_rfc3339(row.deadline))
        try:
            api.sink.vend_accepted(row)
        except Exception:  # the vend is committed; recovery queues it again
            # 202 stays true: the vend is durable and the dispatcher's start-up recovery
            # reads every active vend from the database. A 5xx here would only make the
            # backend re-send and get 200 for the same vend.
            log.exception("vend_sink_failed")
        return web.json_response(_vend_json(row), status=202)


async def _get_vend(request: web.Request) -> web.Response:
    api = request.app[_API]
    vend_id = request.match_info["vend_id"]
    if _VEND_ID.fullmatch(vend_id) is None:
        raise UnknownVendError(vend_id)
    async with _reading(api.pool) as conn, conn.transaction(isolation="repeatable_read"):
        # One snapshot: the history agrees with the state shown beside it.
        row = await vends.get(conn, vend_id)
        steps = [] if row is None else await vends.history(conn, vend_id)
    if row is None:
        raise UnknownVendError(vend_id)
    return web.json_response({**_vend_json(row), "history": [_transition_json(s) for s in steps]})


async def _resolve_vend(request: web.Request) -> web.Response:
    api = request.app[_API]
    vend_id = request.match_info["vend_id"]
    if _VEND_ID.fullmatch(vend_id) is None:
        raise UnknownVendError(vend_id)
    with structlog.contextvars.bound_contextvars(vend_id=vend_id):
        body = await _json_object(request, _RESOLVE_FIELDS)
        outcome = _required(body, "outcome")
        if not isinstance(outcome, str) or outcome not in _RESOLUTIONS:
            raise ValidationError("outcome", "expected 'dispensed' or 'not_dispensed'")
        operator = _text(body, "operator", 64, _CONTROL)
        reason = _text(body, "reason", 500, _CONTROL_BUT_SPACE)
        event = _RESOLUTIONS[outcome]
        actor = f"operator:{operator}"

        async def resolve(conn: Conn) -> tuple[VendRow | None, VendRow | None]:
            moved = await vends.apply(conn, vend_id, event, actor=actor, detail={"reason": reason})
            # Read in the same transaction, so a refusal reports the state that refused.
            return moved, (None if moved is not None else await vends.get(conn, vend_id))

        moved, current = await api.writer.submit(resolve)
        if moved is None:
            if current is None:
                raise UnknownVendError(vend_id)
            raise VendConflictError(
                vend_id,
                f"the vend is {current.state.value}; only an unknown vend can be resolved",
            )
        log.info("vend_resolved_by_operator", actor=actor, outcome=outcome, reason=reason)
        return web.json_response(_vend_json(moved))


async def _stored_repeat(pool: asyncpg.Pool, request: VendRequest) -> VendRow | None:
    """Return the stored vend if ``request`` (with a deadline given) repeats it exactly."""
    if request.deadline is None:
        return None
    async with _reading(pool) as conn:
        row = await vends.get(conn, request.vend_id)
    same = row is not None and (
        row.machine_id,
        row.slot,
        row.price,
        row.currency,
        row.deadline,
    ) == (request.machine_id, request.slot, request.price, request.currency, request.deadline)
    return row if same else None


@contextlib.asynccontextmanager
async def _reading(pool: asyncpg.Pool) -> AsyncIterator[Conn]:
    """Lend a pooled connection for reads; a lost database becomes a retriable 503."""
    try:
        async with pool.acquire() as conn:
            yield conn
    except _UNAVAILABLE as exc:
        raise DatabaseUnavailableError(f"{type(exc).__name__}: {exc}") from exc


# --- machines -----------------------------------------------------------------------------------


async def _register_machine(request: web.Request) -> web.Response:
    api = request.app[_API]
    body = await _json_object(request, _MACHINE_FIELDS)
    machine_id = _machine_id(body)
    created = await api.writer.submit(lambda conn: machines.register(conn, machine_id))
    api.on_registered(machine_id)
    if created:
        log.info("machine_registered", machine_id=machine_id)
    return web.json_response({"machine_id": machine_id}, status=201 if created else 200)


def _path_machine_id(request: web.Request) -> str:
    """Return the ``{machine_id}`` of the path; one that cannot exist is an unknown machine."""
    machine_id = request.match_info["machine_id"]
    try:
        check_machine_id(machine_id)
    except ValueError:
        raise UnknownMachineError(machine_id) from None
    return machine_id


async def _get_machine(request: web.Request) -> web.Response:
    api = request.app[_API]
    machine_id = _path_machine_id(request)
    async with _reading(api.pool) as conn:
        found = await machines.exists(conn, machine_id)
    if not found:
        raise UnknownMachineError(machine_id)
    return web.json_response({"machine_id": machine_id})


# --- operations ---------------------------------------------------------------------------------


async def _healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    api = request.app[_API]
    checks = dict(api.readiness.ready())
    if api.shutting_down:
        status = "shutting_down"
    else:
        status = "ready" if all(checks.values()) else "not_ready"
    return web.json_response(
        {"status": status, "checks": checks}, status=200 if status == "ready" else 503
    )


async def _metrics(request: web.Request) -> web.Response:
    text = prometheus_client.generate_latest(request.app[_REGISTRY])
    # Set as a header: aiohttp's content_type argument refuses the charset parameter.
    return web.Response(body=text, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[_DOCUMENT])


def openapi_document(extensions: Sequence[ApiExtension] = ()) -> dict[str, Any]:
    """Return :data:`OPENAPI` with the paths and schemas of ``extensions`` merged in."""
    paths = dict(OPENAPI["paths"])
    schemas = dict(OPENAPI["components"]["schemas"])
    for extension in extensions:
        for path, operations in extension.openapi_paths.items():
            paths[path] = {**paths.get(path, {}), **operations}
        schemas.update(extension.openapi_schemas)
    return {**OPENAPI, "paths": paths, "components": {**OPENAPI["components"], "schemas": schemas}}


# --- request parsing ----------------------------------------------------------------------------


async def _json_object(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    """Read the body as a JSON object with only ``allowed`` keys (413 if over the limit)."""
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 and bad JSON are ValueErrors
        raise web.HTTPBadRequest(reason=f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(reason="body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValidationError(unknown[0], f"unknown field(s): {', '.join(unknown)}")
    return body


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _required(body: Mapping[str, Any], field: str) -> object:
    if field not in body:
        raise ValidationError(field, "required")
    return body[field]


def _string(body: Mapping[str, Any], field: str, pattern: re.Pattern[str], rule: str) -> str:
    value = _required(body, field)
    if not isinstance(value, str):
        raise ValidationError(field, f"expected a string, got {_json_type(value)}")
    if pattern.fullmatch(value) is None:
        raise ValidationError(field, rule)
    return value


def _text(body: Mapping[str, Any], field: str, max_len: int, forbidden: re.Pattern[str]) -> str:
    value = _required(body, field)
    if not isinstance(value, str):
        raise ValidationError(field, f"expected a string, got {_json_type(value)}")
    if not 1 <= len(value) <= max_len or not value.strip():
        raise ValidationError(field, f"expected 1 to {max_len} characters, not all blank")
    if forbidden.search(value):
        raise ValidationError(field, "control characters are not allowed")
    return value


def _integer(body: Mapping[str, Any], field: str, low: int, high: int) -> int:
    value = _required(body, field)
    # bool is an int subclass in Python, but `"slot": true` is a client bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"expected an integer, got {_json_type(value)}")
    if not low <= value <= high:
        raise ValidationError(field, f"expected {low} to {high}, got {value}")
    return value


def _vend_id(body: Mapping[str, Any]) -> str:
    return _string(body, "vend_id", _VEND_ID, "expected 1 to 64 of [A-Za-z0-9._:-]")


def _machine_id(body: Mapping[str, Any]) -> str:
    value = _required(body, "machine_id")
    if not isinstance(value, str):
        raise ValidationError("machine_id", f"expected a string, got {_json_type(value)}")
    try:
        return check_machine_id(value)
    except ValueError:
        raise ValidationError("machine_id", "expected 1 to 64 of [A-Za-z0-9._-]") from None


def _deadline(
    body: Mapping[str, Any], config: VendConfig, now: datetime
) -> tuple[datetime | None, datetime]:
    """Return (the deadline as given, for the fingerprint; the effective deadline)."""
    if "deadline" in body and "deadline_s" in body:
        raise ValidationError("deadline", "give deadline or deadline_s, not both")
    if "deadline" in body:
        value = body["deadline"]
        if not isinstance(value, str):
            raise ValidationError("deadline", f"expected a string, got {_json_type(value)}")
        if _RFC3339.fullmatch(value) is None:
            raise ValidationError("deadline", "expected an RFC 3339 timestamp with a time zone")
        try:
            given = datetime.fromisoformat(value.upper())
        except ValueError as exc:  # a month 13, a day 32
            raise ValidationError("deadline", f"not a valid timestamp: {exc}") from None
        try:
            # The same instant in any offset is the same request.
            given = given.astimezone(UTC)
        except OverflowError:  # year 1 or 9999 pushed past the calendar by its offset
            raise ValidationError("deadline", "out of range") from None
        return given, given
    if "deadline_s" in body:
        seconds = body["deadline_s"]
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ValidationError("deadline_s", f"expected a number, got {_json_type(seconds)}")
        if not math.isfinite(seconds) or seconds <= 0 or seconds > config.max_deadline_s:
            raise ValidationError(
                "deadline_s", f"expected more than 0 and at most {config.max_deadline_s} seconds"
            )
        # Relative to the moment of arrival, so a re-sent notification would name another
        # instant: the fingerprint leaves it out, like an absent deadline.
        return None, now + timedelta(seconds=seconds)
    return None, now + timedelta(seconds=config.default_deadline_s)


def _deadline_problem(deadline: datetime, now: datetime, config: VendConfig) -> str | None:
    if deadline <= now:
        return f"the deadline {_rfc3339(deadline)} has passed"
    if deadline > now + timedelta(seconds=config.max_deadline_s):
        return f"the deadline is more than {config.max_deadline_s} s ahead (vend.max_deadline_s)"
    return None


def _json_type(value: object) -> str:
    names: dict[type, str] = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


# --- responses ----------------------------------------------------------------------------------


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _rfc3339_or_none(moment: datetime | None) -> str | None:
    return None if moment is None else _rfc3339(moment)


def _vend_json(row: VendRow) -> dict[str, Any]:
    outcome = row.state.outcome
    return {
        "vend_id": row.vend_id,
        "machine_id": row.machine_id,
        "slot": row.slot,
        "price": row.price,
        "currency": row.currency,
        "deadline": _rfc3339(row.deadline),
        "state": row.state.value,
        "outcome": outcome,
        "refund_required": outcome == "not_dispensed",
        "attempts": row.attempts,
        "dispense": row.dispense,
        "created_at": _rfc3339(row.created_at),
        "updated_at": _rfc3339(row.updated_at),
    }


def _transition_json(step: Transition) -> dict[str, Any]:
    return {
        "from": None if step.from_state is None else step.from_state.value,
        "to": step.to_state.value,
        "event": step.event,
        "actor": step.actor,
        "detail": step.detail,
        "at": _rfc3339(step.at),
    }


# --- OpenAPI ------------------------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "The body is not a JSON object.",
        404: "Not found; error.field names what.",
        409: "Conflicts with what is stored (vend, planogram, slot); error.code says what.",
        413: "The body is larger than the limit.",
        422: "A field is missing, unknown, mistyped or out of range; error.field names it.",
        500: "Unexpected error; the gateway logged it.",
        503: "Shutting down, overloaded or database unavailable; retry after Retry-After.",
    }
    return {str(s): _json_body(_ref("Error"), reasons[s]) for s in statuses}


_TIMESTAMP: Final = {"type": "string", "format": "date-time"}
_VEND_ID_PARAM: Final = {
    "name": "vend_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"},
}
_STATES: Final = [s.value for s in VendStatus]

#: The OpenAPI 3.1 description of every route; a test keeps it equal to the router.
OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {
        "title": "vendgate",
        "version": "1",
        "description": "Gateway between payment backends and vending machines. A vend is "
        "committed before 202 is answered; repeating the same request returns the same vend.",
    },
    "paths": {
        "/v1/vends": {
            "post": {
                "operationId": "createVend",
                "summary": "Accept a paid vend (idempotent on vend_id).",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("VendRequest")}},
                },
                "responses": {
                    "202": _json_body(_ref("Vend"), "Created and committed; it will be sent."),
                    "200": _json_body(_ref("Vend"), "The same request was accepted before."),
                    **_errors(400, 404, 409, 413, 422, 500, 503),
                },
            }
        },
        "/v1/vends/{vend_id}": {
            "get": {
                "operationId": "getVend",
                "summary": "A vend with its state history.",
                "parameters": [_VEND_ID_PARAM],
                "responses": {
                    "200": _json_body(_ref("VendWithHistory"), "The vend."),
                    **_errors(404, 500, 503),
                },
            }
        },
        "/v1/vends/{vend_id}/resolve": {
            "post": {
                "operationId": "resolveVend",
                "summary": "An operator settles an unknown vend; audited in its history.",
                "parameters": [_VEND_ID_PARAM],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Resolution")}},
                },
                "responses": {
                    "200": _json_body(_ref("Vend"), "Resolved."),
                    **_errors(400, 404, 409, 413, 422, 500, 503),
                },
            }
        },
        "/v1/machines": {
            "post": {
                "operationId": "registerMachine",
                "summary": "Register a machine (idempotent).",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Machine")}},
                },
                "responses": {
                    "201": _json_body(_ref("Machine"), "Registered now."),
                    "200": _json_body(_ref("Machine"), "Registered before."),
                    **_errors(400, 413, 422, 500, 503),
                },
            }
        },
        "/v1/machines/{machine_id}": {
            "get": {
                "operationId": "getMachine",
                "summary": "A registered machine.",
                "parameters": [
                    {
                        "name": "machine_id",
                        "in": "path",
                        "required": True,
                        "schema": _ref("MachineId"),
                    }
                ],
                "responses": {
                    "200": _json_body(_ref("Machine"), "The machine."),
                    **_errors(404, 500, 503),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Liveness: 200 while the process runs.",
                "responses": {
                    "200": _json_body(
                        {
                            "type": "object",
                            "properties": {"status": {"const": "ok"}},
                            "required": ["status"],
                        },
                        "Alive.",
                    )
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "ready",
                "summary": "Readiness: 200 when every dependency is up and intake is open.",
                "responses": {
                    "200": _json_body(_ref("Readiness"), "Ready."),
                    "503": _json_body(_ref("Readiness"), "Not ready, or shutting down."),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics.",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {"200": _json_body({"type": "object"}, "OpenAPI 3.1 document.")},
            }
        },
    },
    "components": {
        "schemas": {
            "MachineId": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
            "Machine": {
                "type": "object",
                "properties": {"machine_id": _ref("MachineId")},
                "required": ["machine_id"],
                "additionalProperties": False,
            },
            "VendRequest": {
                "type": "object",
                "properties": {
                    "vend_id": {
                        "type": "string",
                        "pattern": "^[A-Za-z0-9._:-]{1,64}$",
                        "description": "The payment's order number.",
                    },
                    "machine_id": _ref("MachineId"),
                    "slot": {"type": "integer", "minimum": 0, "maximum": 255},
                    "price": {
                        "type": "integer",
                        "minimum": 0,
                        "maximum": _MAX_PRICE,
                        "description": "In minor units (cents, fen).",
                    },
                    "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                    "deadline": {
                        **_TIMESTAMP,
                        "description": "RFC 3339 with a time zone; in the future and at most "
                        "vend.max_deadline_s ahead. Default: now + vend.default_deadline_s.",
                    },
                    "deadline_s": {
                        "type": "number",
                        "exclusiveMinimum": 0,
                        "description": "Seconds from now, instead of deadline; at most "
                        "vend.max_deadline_s.",
                    },
                },
                "required": ["vend_id", "machine_id", "slot", "price", "currency"],
                "not": {"required": ["deadline", "deadline_s"]},
                "additionalProperties": False,
            },
            "Vend": {
                "type": "object",
                "properties": {
                    "vend_id": {"type": "string"},
                    "machine_id": {"type": "string"},
                    "slot": {"type": "integer"},
                    "price": {"type": "integer"},
                    "currency": {"type": "string"},
                    "deadline": _TIMESTAMP,
                    "state": {"enum": _STATES},
                    "outcome": {"enum": ["dispensed", "not_dispensed", None]},
                    "refund_required": {"type": "boolean"},
                    "attempts": {"type": "integer"},
                    "dispense": {"type": ["object", "null"]},
                    "created_at": _TIMESTAMP,
                    "updated_at": _TIMESTAMP,
                },
                "required": [
                    "vend_id",
                    "machine_id",
                    "slot",
                    "price",
                    "currency",
                    "deadline",
                    "state",
                    "outcome",
                    "refund_required",
                    "attempts",
                    "dispense",
                    "created_at",
                    "updated_at",
                ],
            },
            "Transition": {
                "type": "object",
                "properties": {
                    "from": {"enum": [*_STATES, None]},
                    "to": {"enum": _STATES},
                    "event": {"type": "string"},
                    "actor": {"type": "string", "description": "gateway, or operator:<name>"},
                    "detail": {"type": ["object", "null"]},
                    "at": _TIMESTAMP,
                },
                "required": ["from", "to", "event", "actor", "detail", "at"],
            },
            "VendWithHistory": {
                "allOf": [
                    _ref("Vend"),
                    {
                        "type": "object",
                        "properties": {"history": {"type": "array", "items": _ref("Transition")}},
                        "required": ["history"],
                    },
                ]
            },
            "Resolution": {
                "type": "object",
                "properties": {
                    "outcome": {"enum": ["dispensed", "not_dispensed"]},
                    "operator": {"type": "string", "minLength": 1, "maxLength": 64},
                    "reason": {"type": "string", "minLength": 1, "maxLength": 500},
                },
                "required": ["outcome", "operator", "reason"],
                "additionalProperties": False,
            },
            "Readiness": {
                "type": "object",
                "properties": {
                    "status": {"enum": ["ready", "not_ready", "shutting_down"]},
                    "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
                },
                "required": ["status", "checks"],
            },
            "Error": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "field": {"type": "string"},
                        },
                        "required": ["code", "message"],
                    }
                },
                "required": ["error"],
            },
        }
    },
}


# --- for extensions (gateway/http_machines.py, gateway/http_planogram.py) -----------------------

json_object = _json_object
required = _required
text_field = _text
integer_field = _integer
reading = _reading
rfc3339 = _rfc3339
rfc3339_or_none = _rfc3339_or_none
path_machine_id = _path_machine_id
openapi_ref = _ref
openapi_json_body = _json_body
openapi_errors = _errors
CONTROL = _CONTROL
CONTROL_BUT_SPACE = _CONTROL_BUT_SPACE
TIMESTAMP = _TIMESTAMP
