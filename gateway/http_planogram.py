"""HTTP routes for planograms and slot health: an :class:`~gateway.http_api.ApiExtension`.

- ``PUT /v1/machines/{machine_id}/planogram`` sets the desired planogram. A change is a new
  version (201); the same planogram again is answered 200 with the current version and
  writes nothing, so a merchant system may re-send freely. ``If-Match: "<version>"`` makes
  the change conditional (412 when another version is current). The push to the machine
  starts after the commit (:mod:`gateway.configsync`).
- ``GET .../planogram``: the desired planogram beside what the machine reports.
- ``GET .../slots``: each slot the gateway knows of, its health and its latest audit.
- ``POST .../slots/{slot}/enable`` and ``/disable``: an operator's decision, audited as
  ``operator:<name>`` like a vend resolution.

Bodies are validated to exactly what the wire carries (``SlotConfig``, SPEC §5.4 and §8),
so a planogram that is stored can always be sent; errors name the field
(``slots[2].price``). Writes go through the group-commit writer and are answered after the
commit; reads use a pooled connection.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, Protocol

import asyncpg
import structlog
from aiohttp import web

from gateway.errors import PreconditionFailedError, UnknownMachineError, ValidationError
from gateway.http_api import (
    CONTROL,
    CONTROL_BUT_SPACE,
    TIMESTAMP,
    integer_field,
    json_object,
    openapi_errors,
    openapi_json_body,
    openapi_ref,
    path_machine_id,
    reading,
    required,
    rfc3339,
    rfc3339_or_none,
    text_field,
)
from gateway.logs import get_logger
from gateway.store import machines, planograms, slots
from gateway.store.db import Conn
from gateway.store.planograms import ANY_VERSION, INT32_MAX, IfMatch, Planogram, PutOutcome
from gateway.store.slots import AuditEntry, SlotRow
from gateway.store.writer import GroupCommitter
from protocols.codec import encode_body
from protocols.errors import EncodeError
from protocols.frames import Config, SlotConfig

__all__ = [
    "DesiredSink",
    "PlanogramApi",
    "parse_if_match",
    "parse_planogram",
    "planogram_view",
    "slots_view",
]

log = get_logger("gateway.http_planogram")

MAX_SLOTS: Final = 128  # SPEC §5.1: Config.slots is array(..128)
_MAX_U32: Final = 0xFFFF_FFFF
_MAX_U16: Final = 0xFFFF
_PRODUCT_CODE_BYTES: Final = 32
_NAME_BYTES: Final = 64
_CURRENCY: Final = re.compile(r"[A-Z]{3}")
# C0, DEL and C1 controls: a machine's display has no use for them, and NUL cannot be stored.
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ENTITY_TAG: Final = re.compile(r'\s*(W/)?"([\x21\x23-\x7e]*)"\s*')  # RFC 9110 §8.8.3
_VERSION_TAG: Final = re.compile(r"[0-9]{1,10}")
_SLOT_NUMBER: Final = re.compile(r"[0-9]{1,3}")
_PUT_FIELDS: Final = frozenset({"currency", "slots", "updated_by"})
_SLOT_FIELDS: Final = frozenset(
    {"slot", "product_code", "name", "price", "capacity", "drop_sensor"}
)
_ACTION_FIELDS: Final = frozenset({"operator", "reason"})


class DesiredSink(Protocol):
    """Told about every new desired version after its commit (``ConfigSync``)."""

    def desired_changed(self, machine_id: str, version: int | None = None) -> None:
        """Start pushing ``version`` to ``machine_id``; must not block."""


class PlanogramApi:
    """The planogram and slot routes, with their OpenAPI description."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        writer: GroupCommitter,
        configsync: DesiredSink,
        slot_failure_limit: int,
    ) -> None:
        self.pool = pool
        self.writer = writer
        self.configsync = configsync
        self.slot_failure_limit = slot_failure_limit
        self.openapi_paths: Mapping[str, Any] = OPENAPI_PATHS
        self.openapi_schemas: Mapping[str, Any] = OPENAPI_SCHEMAS

    def add_routes(self, app: web.Application) -> None:
        """Register the routes; the handlers find this object under their own app key."""
        app[_KEY] = self
        app.router.add_put("/v1/machines/{machine_id}/planogram", _put_planogram)
        app.router.add_get("/v1/machines/{machine_id}/planogram", _get_planogram, allow_head=False)
        app.router.add_get("/v1/machines/{machine_id}/slots", _get_slots, allow_head=False)
        app.router.add_post("/v1/machines/{machine_id}/slots/{slot}/enable", _enable_slot)
        app.router.add_post("/v1/machines/{machine_id}/slots/{slot}/disable", _disable_slot)


_KEY: Final = web.AppKey("vendgate.http_planogram", PlanogramApi)


# --- views (also used by GET /v1/machines/{machine_id}) -----------------------------------------


async def planogram_view(conn: Conn, machine_id: str) -> dict[str, Any] | None:
    """Return the desired planogram beside the machine's reported version; None if unknown.

    A machine with no planogram yet has ``desired_version`` null and no slots. ``in_sync``
    is true when the machine reports the desired version (false while none is set).
    ``config_status`` is the machine's answer to the desired version (``applied``,
    ``stale``, ``invalid``), null until it answers.
    """
    found = await planograms.with_sync(conn, machine_id)
    if found is None:
        return None
    sync, planogram = found
    return _planogram_json(sync, planogram)


async def slots_view(conn: Conn, machine_id: str) -> list[dict[str, Any]]:
    """Return every slot the gateway knows of, with health and its latest audit entries.

    An unknown machine has no slots (an empty list); check the machine first to tell.
    """
    rows = await slots.all_for(conn, machine_id)
    audit = await slots.recent_audit(conn, machine_id) if rows else {}
    return [_slot_json(row, audit.get(row.slot, [])) for row in rows]


def _planogram_json(sync: planograms.SyncRow, planogram: Planogram | None) -> dict[str, Any]:
    return {
        "machine_id": sync.machine_id,
        "desired_version": sync.desired,
        "reported_version": sync.reported,
        "config_status": sync.status,
        "in_sync": sync.in_sync,
        "sent_at": rfc3339_or_none(sync.sent_at),
        "currency": None if planogram is None else planogram.currency,
        "slots": [] if planogram is None else [_slot_config_json(s) for s in planogram.slots],
        "updated_at": None if planogram is None else rfc3339(planogram.created_at),
        "updated_by": None if planogram is None else planogram.created_by,
    }


def _slot_config_json(slot: SlotConfig) -> dict[str, Any]:
    return {
        "slot": slot.slot,
        "product_code": slot.product_code,
        "name": slot.name,
        "price": slot.price,
        "capacity": slot.capacity,
        "drop_sensor": slot.drop_sensor,
    }


def _slot_json(row: SlotRow, audit: list[AuditEntry]) -> dict[str, Any]:
    return {
        "slot": row.slot,
        "in_planogram": row.in_planogram,
        "product_code": row.product_code,
        "name": row.name,
        "price": row.price,
        "currency": row.currency,
        "capacity": row.capacity,
        "drop_sensor": row.drop_sensor,
        "enabled": row.enabled,
        "consecutive_failures": row.consecutive_failures,
        "disabled_at": rfc3339_or_none(row.disabled_at),
        "disabled_reason": row.disabled_reason,
        "audit": [
            {
                "action": entry.action,
                "actor": entry.actor,
                "reason": entry.reason,
                "detail": entry.detail,
                "at": rfc3339(entry.at),
            }
            for entry in audit
        ],
    }


def _etag(version: int | None) -> dict[str, str]:
    return {} if version is None else {"ETag": f'"{version}"'}


# --- handlers ------------------------------------------------------------------------------------


async def _put_planogram(request: web.Request) -> web.Response:
    api = request.app[_KEY]
    machine_id = path_machine_id(request)
    with structlog.contextvars.bound_contextvars(machine_id=machine_id):
        # Several If-Match fields make one list (RFC 9110 §5.3).
        fields = request.headers.getall("If-Match", [])
        header = ", ".join(fields) if fields else None
        if_match = parse_if_match(header)
        body = await json_object(request, _PUT_FIELDS)
        currency, wanted, updated_by = parse_planogram(body)

        async def put(conn: Conn) -> tuple[planograms.PutResult, dict[str, Any] | None]:
            result = await planograms.put(
                conn, machine_id, currency, wanted, created_by=updated_by, if_match=if_match
            )
            stored = result.outcome in (PutOutcome.CREATED, PutOutcome.UNCHANGED)
            # Read in the same transaction: the answer shows what was committed.
            return result, (await planogram_view(conn, machine_id) if stored else None)

        result, view = await api.writer.submit(put)
        if result.outcome is PutOutcome.UNKNOWN_MACHINE:
            raise UnknownMachineError(machine_id)
        if result.outcome is PutOutcome.PRECONDITION_FAILED:
            current = "none" if result.version is None else str(result.version)
            raise PreconditionFailedError("planogram", str(header), current)
        assert view is not None  # noqa: S101  (stored outcomes read the view)
        created = result.outcome is PutOutcome.CREATED
        if created:
            log.info(
                "planogram_set", version=result.version, slots=len(wanted), updated_by=updated_by
            )
            try:
                api.configsync.desired_changed(machine_id, result.version)
            except Exception:  # committed; the resend pass or the next Hello pushes it
                log.exception("planogram_push_not_started")
        return web.json_response(
            view, status=201 if created else 200, headers=_etag(result.version)
        )


async def _get_planogram(request: web.Request) -> web.Response:
    api = request.app[_KEY]
    machine_id = path_machine_id(request)
    async with reading(api.pool) as conn:
        view = await planogram_view(conn, machine_id)
    if view is None:
        raise UnknownMachineError(machine_id)
    return web.json_response(view, headers=_etag(view["desired_version"]))


async def _get_slots(request: web.Request) -> web.Response:
    api = request.app[_KEY]
    machine_id = path_machine_id(request)
    async with reading(api.pool) as conn, conn.transaction(isolation="repeatable_read"):
        # One snapshot: the audit agrees with the health shown beside it.
        known = await machines.exists(conn, machine_id)
        view = await slots_view(conn, machine_id) if known else []
    if not known:
        raise UnknownMachineError(machine_id)
    return web.json_response(
        {"machine_id": machine_id, "failure_limit": api.slot_failure_limit, "slots": view}
    )


async def _enable_slot(request: web.Request) -> web.Response:
    return await _slot_action(request, enable=True)


async def _disable_slot(request: web.Request) -> web.Response:
    return await _slot_action(request, enable=False)


async def _slot_action(request: web.Request, *, enable: bool) -> web.Response:
    api = request.app[_KEY]
    machine_id = path_machine_id(request)
    slot = _path_slot(request)
    with structlog.contextvars.bound_contextvars(machine_id=machine_id, slot=slot):
        body = await json_object(request, _ACTION_FIELDS)
        operator = text_field(body, "operator", 64, CONTROL)
        reason = text_field(body, "reason", 500, CONTROL_BUT_SPACE)
        actor = f"operator:{operator}"
        change = slots.enable if enable else slots.disable

        async def act(conn: Conn) -> dict[str, Any] | None:
            row = await change(conn, machine_id, slot, actor, reason)
            if row is None:
                return None
            audit = await slots.recent_audit(conn, machine_id, slot=slot)
            return _slot_json(row, audit.get(slot, []))

        view = await api.writer.submit(act)
        if view is None:
            raise UnknownMachineError(machine_id)
        return web.json_response(view)


def _path_slot(request: web.Request) -> int:
    raw = request.match_info["slot"]
    if _SLOT_NUMBER.fullmatch(raw) is None or int(raw) > 255:
        raise ValidationError("slot", f"expected a slot number from 0 to 255, got {raw!r}")
    return int(raw)


# --- request parsing -----------------------------------------------------------------------------


def parse_if_match(header: str | None) -> IfMatch:
    """Parse ``If-Match``: None when absent, ``"*"``, or the versions it names.

    Entity tags compare strongly (RFC 9110 §13.1.1), so a weak tag ``W/"3"`` or one that is
    not a version number is kept out of the set and never matches.
    """
    if header is None:
        return None
    if header.strip() == "*":
        return ANY_VERSION
    versions: set[int] = set()
    for part in header.split(","):
        tag = _ENTITY_TAG.fullmatch(part)
        if tag is None:
            raise ValidationError("If-Match", 'expected "<version>" (quoted), a list of them, or *')
        if tag[1] is None and _VERSION_TAG.fullmatch(tag[2]):
            versions.add(int(tag[2]))
    return frozenset(versions)


def parse_planogram(body: Mapping[str, Any]) -> tuple[str, tuple[SlotConfig, ...], str]:
    """Validate a PUT body; return (currency, slots, updated_by) or raise ValidationError."""
    currency = required(body, "currency")
    if not isinstance(currency, str):
        raise ValidationError("currency", f"expected a string, got {_kind(currency)}")
    if _CURRENCY.fullmatch(currency) is None:
        raise ValidationError("currency", "expected 3 upper-case letters (ISO 4217)")
    items = required(body, "slots")
    if not isinstance(items, list):
        raise ValidationError("slots", f"expected an array, got {_kind(items)}")
    if not 1 <= len(items) <= MAX_SLOTS:
        raise ValidationError("slots", f"expected 1 to {MAX_SLOTS} slots, got {len(items)}")
    parsed: list[SlotConfig] = []
    seen: dict[int, int] = {}
    for index, item in enumerate(items):
        where = f"slots[{index}]"
        try:
            slot = _slot_config(item)
        except ValidationError as exc:
            raise ValidationError(
                f"{where}.{exc.field}" if exc.field else where, exc.reason
            ) from None
        if slot.slot in seen:
            raise ValidationError(
                f"{where}.slot", f"slot {slot.slot} is listed twice (also slots[{seen[slot.slot]}])"
            )
        seen[slot.slot] = index
        parsed.append(slot)
    try:
        # The rules above are the wire's, so this only guards against them drifting apart.
        encode_body(Config(version=INT32_MAX, slots=tuple(parsed)))
    except EncodeError as exc:  # pragma: no cover - every field was checked above
        raise ValidationError("slots", f"cannot be sent to a machine: {exc}") from None
    updated_by = text_field(body, "updated_by", 64, CONTROL) if "updated_by" in body else "api"
    return currency, tuple(parsed), updated_by


def _slot_config(item: object) -> SlotConfig:
    """Validate one slot object; errors name the field within it (the caller adds where)."""
    if not isinstance(item, dict):
        raise ValidationError("", f"expected an object, got {_kind(item)}")
    unknown = sorted(set(item) - _SLOT_FIELDS)
    if unknown:
        raise ValidationError(unknown[0], f"unknown field(s): {', '.join(unknown)}")
    drop_sensor = required(item, "drop_sensor")
    if not isinstance(drop_sensor, bool):
        raise ValidationError("drop_sensor", f"expected a boolean, got {_kind(drop_sensor)}")
    return SlotConfig(
        slot=integer_field(item, "slot", 0, 255),
        product_code=_wire_text(item, "product_code", _PRODUCT_CODE_BYTES),
        name=_wire_text(item, "name", _NAME_BYTES),
        price=integer_field(item, "price", 0, _MAX_U32),
        capacity=integer_field(item, "capacity", 0, _MAX_U16),
        drop_sensor=drop_sensor,
    )


def _wire_text(item: Mapping[str, Any], field: str, max_bytes: int) -> str:
    """Return a wire string (SPEC §8): at most ``max_bytes`` of UTF-8, no control characters."""
    value = required(item, field)
    if not isinstance(value, str):
        raise ValidationError(field, f"expected a string, got {_kind(value)}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON ("\ud800")
        raise ValidationError(field, "not valid Unicode (a lone surrogate)") from None
    if size > max_bytes:
        raise ValidationError(field, f"expected at most {max_bytes} bytes of UTF-8, got {size}")
    if _CONTROL_CHARS.search(value):
        raise ValidationError(field, "control characters are not allowed")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    names: dict[type, str] = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
    return names.get(type(value), type(value).__name__)


# --- OpenAPI -------------------------------------------------------------------------------------

_MACHINE_PARAM: Final = {
    "name": "machine_id",
    "in": "path",
    "required": True,
    "schema": openapi_ref("MachineId"),
}
_SLOT_PARAM: Final = {
    "name": "slot",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 0, "maximum": 255},
}
_PRECONDITION_FAILED: Final = {
    "412": openapi_json_body(
        openapi_ref("Error"), "If-Match names a version that is not the current one."
    )
}
_NULLABLE_TIME: Final = {**TIMESTAMP, "type": ["string", "null"]}


def _slot_action_doc(verb: str, effect: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"{verb}Slot",
            "summary": effect,
            "parameters": [_MACHINE_PARAM, _SLOT_PARAM],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": openapi_ref("SlotAction")}},
            },
            "responses": {
                "200": openapi_json_body(openapi_ref("Slot"), "The slot after the change."),
                **openapi_errors(400, 404, 413, 422, 500, 503),
            },
        }
    }


OPENAPI_PATHS: Final[dict[str, Any]] = {
    "/v1/machines/{machine_id}/planogram": {
        "put": {
            "operationId": "putPlanogram",
            "summary": "Set the machine's desired planogram; a change is a new version, which "
            "is pushed to the machine (Config) until it reports it.",
            "parameters": [
                _MACHINE_PARAM,
                {
                    "name": "If-Match",
                    "in": "header",
                    "required": False,
                    "description": 'Apply only if the current version is this one: "<version>" '
                    "as in the ETag of GET, or *. Re-sending a planogram that is current "
                    "already is answered 200 whatever this says.",
                    "schema": {"type": "string"},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": openapi_ref("PlanogramRequest")}},
            },
            "responses": {
                "201": openapi_json_body(
                    openapi_ref("Planogram"), "A new version; ETag is its version."
                ),
                "200": openapi_json_body(
                    openapi_ref("Planogram"),
                    "The same as the current planogram: nothing changed; ETag is its version.",
                ),
                **_PRECONDITION_FAILED,
                **openapi_errors(400, 404, 413, 422, 500, 503),
            },
        },
        "get": {
            "operationId": "getPlanogram",
            "summary": "The desired planogram and what the machine reports.",
            "parameters": [_MACHINE_PARAM],
            "responses": {
                "200": openapi_json_body(
                    openapi_ref("Planogram"),
                    "The planogram (no slots and a null version if none was set); ETag is "
                    "the desired version.",
                ),
                **openapi_errors(404, 500, 503),
            },
        },
    },
    "/v1/machines/{machine_id}/slots": {
        "get": {
            "operationId": "getSlots",
            "summary": "Every slot the gateway knows of: product, price, health, audit.",
            "parameters": [_MACHINE_PARAM],
            "responses": {
                "200": openapi_json_body(openapi_ref("Slots"), "The slots, by number."),
                **openapi_errors(404, 500, 503),
            },
        }
    },
    "/v1/machines/{machine_id}/slots/{slot}/enable": _slot_action_doc(
        "enable",
        "An operator puts a slot back in service and resets its failures; audited.",
    ),
    "/v1/machines/{machine_id}/slots/{slot}/disable": _slot_action_doc(
        "disable", "An operator takes a slot out of service; audited."
    ),
}

_SLOT_NUMBER_SCHEMA: Final = {"type": "integer", "minimum": 0, "maximum": 255}
_PRICE_SCHEMA: Final = {
    "type": "integer",
    "minimum": 0,
    "maximum": _MAX_U32,
    "description": "In minor units (cents, fen) of the planogram's currency.",
}

OPENAPI_SCHEMAS: Final[dict[str, Any]] = {
    "PlanogramSlot": {
        "type": "object",
        "properties": {
            "slot": _SLOT_NUMBER_SCHEMA,
            "product_code": {
                "type": "string",
                "maxLength": _PRODUCT_CODE_BYTES,
                "description": "At most 32 bytes of UTF-8, no control characters.",
            },
            "name": {
                "type": "string",
                "maxLength": _NAME_BYTES,
                "description": "At most 64 bytes of UTF-8, no control characters.",
            },
            "price": _PRICE_SCHEMA,
            "capacity": {"type": "integer", "minimum": 0, "maximum": _MAX_U16},
            "drop_sensor": {
                "type": "boolean",
                "description": "Whether the slot has a working drop sensor (SPEC §7.3).",
            },
        },
        "required": ["slot", "product_code", "name", "price", "capacity", "drop_sensor"],
        "additionalProperties": False,
    },
    "PlanogramRequest": {
        "type": "object",
        "properties": {
            "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "slots": {
                "type": "array",
                "items": openapi_ref("PlanogramSlot"),
                "minItems": 1,
                "maxItems": MAX_SLOTS,
                "description": "Each slot number at most once; slots left out are not sold.",
            },
            "updated_by": {
                "type": "string",
                "minLength": 1,
                "maxLength": 64,
                "description": "Who sets it, for the record; default api.",
            },
        },
        "required": ["currency", "slots"],
        "additionalProperties": False,
    },
    "Planogram": {
        "type": "object",
        "properties": {
            "machine_id": openapi_ref("MachineId"),
            "desired_version": {"type": ["integer", "null"], "minimum": 1},
            "reported_version": {
                "type": ["integer", "null"],
                "description": "The version the machine last reported (Hello, StatusReply, "
                "ConfigAck).",
            },
            "config_status": {
                "enum": ["applied", "stale", "invalid", None],
                "description": "The machine's answer to the desired version; null until it "
                "answers.",
            },
            "in_sync": {
                "type": "boolean",
                "description": "The machine reports the desired version.",
            },
            "sent_at": {**_NULLABLE_TIME, "description": "When Config was last published."},
            "currency": {"type": ["string", "null"]},
            "slots": {"type": "array", "items": openapi_ref("PlanogramSlot")},
            "updated_at": _NULLABLE_TIME,
            "updated_by": {"type": ["string", "null"]},
        },
        "required": [
            "machine_id",
            "desired_version",
            "reported_version",
            "config_status",
            "in_sync",
            "sent_at",
            "currency",
            "slots",
            "updated_at",
            "updated_by",
        ],
    },
    "SlotAuditEntry": {
        "type": "object",
        "properties": {
            "action": {"enum": ["auto_disable", "disable", "enable"]},
            "actor": {"type": "string", "description": "gateway, or operator:<name>"},
            "reason": {"type": "string"},
            "detail": {"type": ["object", "null"]},
            "at": TIMESTAMP,
        },
        "required": ["action", "actor", "reason", "detail", "at"],
    },
    "Slot": {
        "type": "object",
        "properties": {
            "slot": _SLOT_NUMBER_SCHEMA,
            "in_planogram": {"type": "boolean"},
            "product_code": {"type": ["string", "null"]},
            "name": {"type": ["string", "null"]},
            "price": {**_PRICE_SCHEMA, "type": ["integer", "null"]},
            "currency": {"type": ["string", "null"]},
            "capacity": {"type": ["integer", "null"]},
            "drop_sensor": {"type": ["boolean", "null"]},
            "enabled": {"type": "boolean"},
            "consecutive_failures": {
                "type": "integer",
                "minimum": 0,
                "description": "Failed dispenses in a row (JAM, NO_DROP, MOTOR_FAULT, "
                "SENSOR_FAULT); reset by a good dispense or an operator's enable.",
            },
            "disabled_at": _NULLABLE_TIME,
            "disabled_reason": {"type": ["string", "null"]},
            "audit": {
                "type": "array",
                "items": openapi_ref("SlotAuditEntry"),
                "description": "The latest entries, newest first.",
            },
        },
        "required": [
            "slot",
            "in_planogram",
            "product_code",
            "name",
            "price",
            "currency",
            "capacity",
            "drop_sensor",
            "enabled",
            "consecutive_failures",
            "disabled_at",
            "disabled_reason",
            "audit",
        ],
    },
    "Slots": {
        "type": "object",
        "properties": {
            "machine_id": openapi_ref("MachineId"),
            "failure_limit": {
                "type": "integer",
                "description": "Failed dispenses in a row that take a slot out of service.",
            },
            "slots": {"type": "array", "items": openapi_ref("Slot")},
        },
        "required": ["machine_id", "failure_limit", "slots"],
    },
    "SlotAction": {
        "type": "object",
        "properties": {
            "operator": {"type": "string", "minLength": 1, "maxLength": 64},
            "reason": {"type": "string", "minLength": 1, "maxLength": 500},
        },
        "required": ["operator", "reason"],
        "additionalProperties": False,
    },
}
