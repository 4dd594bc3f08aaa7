"""Machine routes of the HTTP API: the fleet list, one machine in full, its session history.

Presence is read from PostgreSQL, where every gateway writes what it sees in batches
(``sessions.flush_interval_s``, 1 s by default), so any gateway answers for the whole fleet
and an answer is at most that much behind the machine. ``POST /v1/machines`` (register)
stays in :mod:`gateway.http_api`; planogram and slot routes are in
:mod:`gateway.http_planogram`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from aiohttp import web

from gateway.errors import UnknownMachineError, ValidationError
from gateway.http_api import (
    TIMESTAMP,
    openapi_errors,
    openapi_json_body,
    openapi_ref,
    path_machine_id,
    reading,
    rfc3339,
    rfc3339_or_none,
)
from gateway.http_planogram import slots_view
from gateway.lifecycle import ACTIVE
from gateway.store import sessions
from protocols.codec import check_machine_id

__all__ = ["MachineRoutes"]

DEFAULT_PAGE: Final = 100
MAX_PAGE: Final = 1000
_ACTIVE_STATES: Final = [s.value for s in ACTIVE]


@dataclass(frozen=True, slots=True)
class _Machines:
    pool: asyncpg.Pool


_KEY: Final = web.AppKey("vendgate.http_machines", _Machines)


class MachineRoutes:
    """The :class:`gateway.http_api.ApiExtension` for machine reads."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._state = _Machines(pool)
        self.openapi_paths: Mapping[str, Any] = _PATHS
        self.openapi_schemas: Mapping[str, Any] = _SCHEMAS

    def add_routes(self, app: web.Application) -> None:
        """Register ``GET /v1/machines``, ``/v1/machines/{id}`` and its sessions."""
        app[_KEY] = self._state
        app.router.add_get("/v1/machines", _list_machines, allow_head=False)
        app.router.add_get("/v1/machines/{machine_id}", _get_machine, allow_head=False)
        app.router.add_get("/v1/machines/{machine_id}/sessions", _get_sessions, allow_head=False)


# --- handlers ---------------------------------------------------------------------------------


async def _list_machines(request: web.Request) -> web.Response:
    pool = request.app[_KEY].pool
    query = request.rel_url.query
    unknown = sorted(set(query) - {"online", "after", "limit"})
    if unknown:
        raise ValidationError(unknown[0], "unknown query parameter")
    online = _online(query.get("online"))
    after = query.get("after")
    if after is not None:
        try:
            check_machine_id(after)
        except ValueError:
            raise ValidationError("after", "expected a machine id from a previous page") from None
    limit = _limit(query.get("limit"), DEFAULT_PAGE)
    async with reading(pool) as conn:
        rows = await sessions.list_machines(conn, online=online, after=after, limit=limit)
    items = [_machine_json(row) for row in rows]
    next_after = rows[-1]["machine_id"] if len(rows) == limit else None
    return web.json_response({"machines": items, "next": next_after})


async def _get_machine(request: web.Request) -> web.Response:
    pool = request.app[_KEY].pool
    machine_id = path_machine_id(request)
    # No snapshot transaction: each part is read once and is current; BEGIN and COMMIT would
    # add two round trips to a read that must stay quick during a reconnect storm.
    async with reading(pool) as conn:
        row = await sessions.get_machine(conn, machine_id)
        if row is None:
            raise UnknownMachineError(machine_id)
        slots = await slots_view(conn, machine_id)
        active = await conn.fetch(
            "SELECT vend_id, slot, price, currency, state, deadline FROM vends "
            "WHERE machine_id = $1 AND state = ANY($2::text[]) ORDER BY queue_seq",
            machine_id,
            _ACTIVE_STATES,
        )
    body = _machine_json(row)
    body["slots"] = slots
    body["active_vends"] = [
        {
            "vend_id": v["vend_id"],
            "slot": v["slot"],
            "price": v["price"],
            "currency": v["currency"],
            "state": v["state"],
            "deadline": rfc3339(v["deadline"]),
        }
        for v in active
    ]
    return web.json_response(body)


async def _get_sessions(request: web.Request) -> web.Response:
    pool = request.app[_KEY].pool
    machine_id = path_machine_id(request)
    query = request.rel_url.query
    unknown = sorted(set(query) - {"limit"})
    if unknown:
        raise ValidationError(unknown[0], "unknown query parameter")
    limit = _limit(query.get("limit"), DEFAULT_PAGE)
    async with reading(pool) as conn:
        if await sessions.get_machine(conn, machine_id) is None:
            raise UnknownMachineError(machine_id)
        rows = await sessions.session_history(conn, machine_id, limit=limit)
    return web.json_response(
        {
            "machine_id": machine_id,
            "sessions": [
                {
                    "session_id": str(r["session_id"]),
                    "boot": r["boot"],
                    "session": r["session"],
                    "connected_at": rfc3339(r["connected_at"]),
                    "disconnected_at": rfc3339_or_none(r["disconnected_at"]),
                    "end_reason": r["end_reason"],
                }
                for r in rows
            ],
        }
    )


# --- helpers ----------------------------------------------------------------------------------


def _online(text: str | None) -> bool | None:
    if text is None:
        return None
    if text in ("true", "false"):
        return text == "true"
    raise ValidationError("online", "expected true or false")


def _limit(text: str | None, default: int) -> int:
    if text is None:
        return default
    if not text.isdecimal() or not 1 <= int(text) <= MAX_PAGE:
        raise ValidationError("limit", f"expected an integer from 1 to {MAX_PAGE}")
    return int(text)


def _machine_json(row: asyncpg.Record) -> dict[str, Any]:
    desired, reported = row["config_desired"], row["config_reported"]
    return {
        "machine_id": row["machine_id"],
        "registered_at": rfc3339(row["created_at"]),
        "online": row["online"],
        "last_seen": rfc3339_or_none(row["last_seen"]),
        "firmware": row["firmware"],
        "boot": row["boot"],
        "rssi": row["rssi"],
        "session": None
        if row["session_id"] is None
        else {
            "session_id": str(row["session_id"]),
            "session": row["session"],
            "connected_at": rfc3339_or_none(row["connected_at"]),
            "disconnected_at": rfc3339_or_none(row["disconnected_at"]),
        },
        "config": {
            "desired_version": desired,
            "reported_version": reported,
            "status": row["config_status"],
            "in_sync": desired is None or desired == reported,
            "sent_at": rfc3339_or_none(row["config_sent_at"]),
        },
    }


# --- OpenAPI ----------------------------------------------------------------------------------

_MACHINE_ID_PARAM: Final = {
    "name": "machine_id",
    "in": "path",
    "required": True,
    "schema": openapi_ref("MachineId"),
}
_LIMIT_PARAM: Final = {
    "name": "limit",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE},
}
_NULLABLE_TIME: Final = {"type": ["string", "null"], "format": "date-time"}

_PATHS: Final[dict[str, Any]] = {
    "/v1/machines": {
        "get": {
            "operationId": "listMachines",
            "summary": "Registered machines with their presence, in id order, a page at a time.",
            "parameters": [
                {
                    "name": "online",
                    "in": "query",
                    "required": False,
                    "schema": {"enum": ["true", "false"]},
                    "description": "Only online (true) or offline (false) machines.",
                },
                {
                    "name": "after",
                    "in": "query",
                    "required": False,
                    "schema": openapi_ref("MachineId"),
                    "description": "The `next` of the previous page.",
                },
                _LIMIT_PARAM,
            ],
            "responses": {
                "200": openapi_json_body(openapi_ref("MachinePage"), "A page of machines."),
                **openapi_errors(422, 500, 503),
            },
        }
    },
    "/v1/machines/{machine_id}": {
        "get": {
            "operationId": "getMachine",
            "summary": "A machine: presence, configuration versions, slots and active vends.",
            "parameters": [_MACHINE_ID_PARAM],
            "responses": {
                "200": openapi_json_body(openapi_ref("MachineDetail"), "The machine."),
                **openapi_errors(404, 500, 503),
            },
        }
    },
    "/v1/machines/{machine_id}/sessions": {
        "get": {
            "operationId": "getMachineSessions",
            "summary": "The machine's MQTT sessions, newest first, and how each ended.",
            "parameters": [_MACHINE_ID_PARAM, _LIMIT_PARAM],
            "responses": {
                "200": openapi_json_body(openapi_ref("SessionHistory"), "Its sessions."),
                **openapi_errors(404, 422, 500, 503),
            },
        }
    },
}

_END_REASONS: Final = ["clean", "last_will", "heartbeat_timeout", "superseded", None]

_SCHEMAS: Final[dict[str, Any]] = {
    "MachineStatus": {
        "type": "object",
        "properties": {
            "machine_id": openapi_ref("MachineId"),
            "registered_at": TIMESTAMP,
            "online": {"type": "boolean"},
            "last_seen": _NULLABLE_TIME,
            "firmware": {"type": ["string", "null"]},
            "boot": {"type": ["integer", "null"]},
            "rssi": {"type": ["integer", "null"], "description": "dBm"},
            "session": {
                "type": ["object", "null"],
                "properties": {
                    "session_id": {"type": "string", "format": "uuid"},
                    "session": {"type": ["integer", "null"]},
                    "connected_at": _NULLABLE_TIME,
                    "disconnected_at": _NULLABLE_TIME,
                },
            },
            "config": {
                "type": "object",
                "properties": {
                    "desired_version": {"type": ["integer", "null"]},
                    "reported_version": {"type": ["integer", "null"]},
                    "status": {"type": ["string", "null"]},
                    "in_sync": {"type": "boolean"},
                    "sent_at": _NULLABLE_TIME,
                },
                "required": ["desired_version", "reported_version", "status", "in_sync"],
            },
        },
        "required": ["machine_id", "online", "last_seen", "session", "config"],
    },
    "MachinePage": {
        "type": "object",
        "properties": {
            "machines": {"type": "array", "items": openapi_ref("MachineStatus")},
            "next": {"type": ["string", "null"], "description": "Pass as `after`; null: last."},
        },
        "required": ["machines", "next"],
    },
    "MachineDetail": {
        "allOf": [
            openapi_ref("MachineStatus"),
            {
                "type": "object",
                "properties": {
                    "slots": {"type": "array", "items": {"type": "object"}},
                    "active_vends": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "vend_id": {"type": "string"},
                                "slot": {"type": "integer"},
                                "price": {"type": "integer"},
                                "currency": {"type": "string"},
                                "state": {"type": "string"},
                                "deadline": TIMESTAMP,
                            },
                        },
                    },
                },
                "required": ["slots", "active_vends"],
            },
        ]
    },
    "SessionHistory": {
        "type": "object",
        "properties": {
            "machine_id": openapi_ref("MachineId"),
            "sessions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "session_id": {"type": "string", "format": "uuid"},
                        "boot": {"type": "integer"},
                        "session": {"type": ["integer", "null"]},
                        "connected_at": TIMESTAMP,
                        "disconnected_at": _NULLABLE_TIME,
                        "end_reason": {"enum": _END_REASONS},
                    },
                },
            },
        },
        "required": ["machine_id", "sessions"],
    },
}
