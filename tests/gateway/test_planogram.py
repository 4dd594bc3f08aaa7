"""Planograms over HTTP: validation to the wire's rules, versions, conditional PUTs, the view."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from gateway.store import planograms
from protocols.codec import MAX_FRAME_SIZE, encode
from protocols.frames import ConfigStatus
from tests.gateway.planogram_harness import (
    MACHINE,
    Env,
    planogram_body,
    serve,
    slot_body,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

PLANOGRAM = f"/v1/machines/{MACHINE}/planogram"
KEY = bytes(range(32))


@pytest_asyncio.fixture
async def env(database: str) -> AsyncIterator[Env]:
    async with serve(database) as running:
        yield running


def _with_slot(index: int, **changes: object) -> dict[str, object]:
    body = planogram_body(1, 2, 3)
    slots: list[dict[str, object]] = body["slots"]  # type: ignore[assignment]  # built above
    slots[index] = {**slots[index], **changes}
    return body


def _without(field: str, index: int | None = None) -> dict[str, object]:
    body = planogram_body(1, 2, 3)
    if index is None:
        del body[field]
    else:
        slots: list[dict[str, object]] = body["slots"]  # type: ignore[assignment]  # built above
        del slots[index][field]
    return body


INVALID: list[tuple[str, dict[str, object], str]] = [
    ("no currency", _without("currency"), "currency"),
    ("lower-case currency", planogram_body(currency="cny"), "currency"),
    ("numeric currency", planogram_body(currency=156), "currency"),
    ("no slots", _without("slots"), "slots"),
    ("slots not a list", planogram_body(slots={"1": {}}), "slots"),
    ("no slot at all", planogram_body(slots=[]), "slots"),
    ("129 slots", planogram_body(slots=[slot_body(n) for n in range(129)]), "slots"),
    ("a slot that is not an object", planogram_body(slots=[slot_body(1), 7]), "slots[1]"),
    ("negative price", _with_slot(2, price=-1), "slots[2].price"),
    ("price beyond u32", _with_slot(2, price=2**32), "slots[2].price"),
    ("price as text", _with_slot(2, price="350"), "slots[2].price"),
    ("fractional price", _with_slot(2, price=3.5), "slots[2].price"),
    ("boolean price", _with_slot(2, price=True), "slots[2].price"),
    ("slot beyond u8", _with_slot(0, slot=256), "slots[0].slot"),
    ("negative slot", _with_slot(0, slot=-1), "slots[0].slot"),
    ("slot listed twice", _with_slot(1, slot=1), "slots[1].slot"),
    ("product code of 33 bytes", _with_slot(0, product_code="x" * 33), "slots[0].product_code"),
    # 12 characters, 36 bytes: the limit is in bytes (SPEC §8), not characters.
    (
        "product code of 36 UTF-8 bytes",
        _with_slot(0, product_code="饮料" * 6),
        "slots[0].product_code",
    ),
    ("name of 65 bytes", _with_slot(1, name="n" * 65), "slots[1].name"),
    ("name with a newline", _with_slot(1, name="Cola\nZero"), "slots[1].name"),
    ("name with a C1 control", _with_slot(1, name="Cola\x85"), "slots[1].name"),
    ("name with NUL", _with_slot(1, name="Cola\x00"), "slots[1].name"),
    ("name with a lone surrogate", _with_slot(1, name="Cola \ud800"), "slots[1].name"),
    ("name as a number", _with_slot(1, name=7), "slots[1].name"),
    ("capacity beyond u16", _with_slot(0, capacity=65536), "slots[0].capacity"),
    ("drop sensor as 1", _with_slot(0, drop_sensor=1), "slots[0].drop_sensor"),
    ("no drop sensor", _without("drop_sensor", 0), "slots[0].drop_sensor"),
    ("no price", _without("price", 2), "slots[2].price"),
    ("unknown slot field", _with_slot(0, colour="red"), "slots[0].colour"),
    ("unknown field", planogram_body(version=3), "version"),
    ("blank updated_by", planogram_body(updated_by=" "), "updated_by"),
    ("updated_by with a control", planogram_body(updated_by="a\tb"), "updated_by"),
]


@pytest.mark.parametrize(("body", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
async def test_put_validation_names_the_field(
    env: Env, body: dict[str, object], field: str
) -> None:
    """A planogram the wire cannot carry is refused 422, naming the field, and nothing is stored."""
    status, answer = await env.put(body)
    assert status == 422, answer
    assert answer["error"]["code"] == "validation"
    assert answer["error"]["field"] == field
    status, view = await env.get(PLANOGRAM)
    assert (status, view["desired_version"], view["slots"]) == (200, None, [])


async def test_body_that_is_not_an_object_is_400(env: Env) -> None:
    """A JSON array body is a 400, like every other route."""
    status, answer = await env.put([planogram_body()])
    assert status == 400
    assert answer["error"]["code"] == "bad_request"


async def test_versions_increment_and_machine_slots_follow(env: Env) -> None:
    """Each change is the next version; listed slots carry the product, unlisted ones lose it."""
    status, first, headers = await env.request("PUT", PLANOGRAM, planogram_body(1, 2, 3))
    assert status == 201
    assert headers["ETag"] == '"1"'
    assert first["desired_version"] == 1
    assert [s["slot"] for s in first["slots"]] == [1, 2, 3]
    assert first["updated_by"] == "api"

    changed = planogram_body(2, 3, 4, updated_by="merchant-7")
    changed["slots"][0]["price"] = 999  # type: ignore[index]  # a list of dicts
    status, second = await env.put(changed)
    assert status == 201
    assert second["desired_version"] == 2
    assert second["updated_by"] == "merchant-7"
    assert second["slots"][0] == slot_body(2, price=999)

    async with env.pool.acquire() as conn:
        rows = {
            r["slot"]: dict(r)
            for r in await conn.fetch(
                "SELECT * FROM machine_slots WHERE machine_id = $1 ORDER BY slot", MACHINE
            )
        }
        versions = await conn.fetchval(
            "SELECT array_agg(version ORDER BY version) FROM planograms WHERE machine_id = $1",
            MACHINE,
        )
        desired = await conn.fetchval(
            "SELECT config_desired FROM machines WHERE machine_id = $1", MACHINE
        )
    assert versions == [1, 2]
    assert desired == 2
    assert set(rows) == {1, 2, 3, 4}
    assert rows[1]["product_code"] is None
    assert rows[1]["price"] is None
    assert rows[1]["currency"] is None
    assert (rows[2]["price"], rows[2]["currency"]) == (999, "CNY")
    assert rows[4]["product_code"] == "P-004"


async def test_identical_put_is_a_noop(env: Env) -> None:
    """The same planogram again, in another slot order, is answered 200 and writes nothing."""
    status, first = await env.put(planogram_body(1, 2, 3))
    assert status == 201
    await env.settle()
    pushes = len(env.link.configs())
    xmin = await env.fetchval("SELECT xmin::text FROM machines WHERE machine_id = $1", MACHINE)

    same = planogram_body(3, 1, 2, updated_by="someone-else")
    status, again, headers = await env.request("PUT", PLANOGRAM, same)
    assert status == 200
    assert headers["ETag"] == '"1"'
    assert {**again, "sent_at": None} == {**first, "sent_at": None}  # a push happened between
    await env.settle()
    assert len(env.link.configs()) == pushes
    assert await env.fetchval("SELECT count(*) FROM planograms") == 1
    assert (
        await env.fetchval("SELECT xmin::text FROM machines WHERE machine_id = $1", MACHINE) == xmin
    )


async def test_if_match(env: Env) -> None:
    """If-Match must name the current version (412 otherwise); * needs one to exist."""
    status, answer = await env.put(planogram_body(1), headers={"If-Match": '"1"'})
    assert status == 412
    assert answer["error"]["code"] == "precondition_failed"
    status, answer = await env.put(planogram_body(1), headers={"If-Match": "*"})
    assert status == 412

    assert (await env.put(planogram_body(1)))[0] == 201
    status, answer = await env.put(planogram_body(2), headers={"If-Match": '"2"'})
    assert status == 412
    assert "version 1" in answer["error"]["message"]
    status, answer = await env.put(planogram_body(2), headers={"If-Match": 'W/"1"'})
    assert status == 412  # weak tags never match a strong comparison (RFC 9110 §13.1.1)
    status, answer = await env.put(planogram_body(2), headers={"If-Match": '"7", "1"'})
    assert (status, answer["desired_version"]) == (201, 2)
    status, answer = await env.put(planogram_body(3), headers={"If-Match": "*"})
    assert (status, answer["desired_version"]) == (201, 3)

    # A retry of the request that made version 3, with its old precondition: already done.
    status, answer = await env.put(planogram_body(3), headers={"If-Match": '"2"'})
    assert (status, answer["desired_version"]) == (200, 3)

    status, answer = await env.put(planogram_body(4), headers={"If-Match": "3"})
    assert status == 422
    assert answer["error"]["field"] == "If-Match"


async def test_get_shows_desired_against_reported(env: Env) -> None:
    """GET shows the desired version, what the machine reports, its answer and the last send."""
    status, view = await env.get(PLANOGRAM)
    assert status == 200
    assert view == {
        "machine_id": MACHINE,
        "desired_version": None,
        "reported_version": None,
        "config_status": None,
        "in_sync": False,
        "sent_at": None,
        "currency": None,
        "slots": [],
        "updated_at": None,
        "updated_by": None,
    }
    await env.sync.on_frame(MACHINE, env.hello(0))
    await env.put(planogram_body(1, 2))
    await env.until(lambda: len(env.link.configs()) == 1, "the push")
    await env.settle()
    status, view = await env.get(PLANOGRAM)
    assert (view["desired_version"], view["reported_version"]) == (1, 0)
    assert view["in_sync"] is False
    assert view["config_status"] is None
    assert view["sent_at"] is not None
    assert view["currency"] == "CNY"

    await env.sync.on_frame(MACHINE, env.ack(1, ConfigStatus.APPLIED, 1))
    status, view, headers = await env.request("GET", PLANOGRAM)
    assert headers["ETag"] == '"1"'
    assert (view["desired_version"], view["reported_version"]) == (1, 1)
    assert view["config_status"] == "applied"
    assert view["in_sync"] is True


async def test_put_pushes_the_new_version(env: Env) -> None:
    """A committed version is sent to the online machine as Config, slots in slot order."""
    await env.put(planogram_body(3, 1, 2))
    await env.until(lambda: len(env.link.configs()) == 1, "the push")
    (config,) = env.link.configs()
    assert config.version == 1
    assert [s.slot for s in config.slots] == [1, 2, 3]
    assert config.slots[0].product_code == "P-001"
    assert env.metric("vendgate_config_pushes_total", {"trigger": "new_version"}) == 1


async def test_new_version_is_past_the_reported_one(env: Env) -> None:
    """A machine that runs version 5 (set at installation) gets version 6, not a stale 1."""
    await env.sync.on_frame(MACHINE, env.hello(5))
    status, view = await env.put(planogram_body())
    assert (status, view["desired_version"]) == (201, 6)
    await env.until(lambda: len(env.link.configs()) == 1, "the push")
    assert env.link.configs()[0].version == 6


async def test_largest_planogram_fits_one_frame(env: Env) -> None:
    """128 slots with every string at its byte limit are accepted and encode within 16 KiB."""
    slots = [
        slot_body(
            n,
            product_code="码" * 10 + "xx",  # 32 bytes
            name="名" * 21 + "x",  # 64 bytes
            price=2**32 - 1,
            capacity=65535,
        )
        for n in range(128)
    ]
    status, view = await env.put({"currency": "JPY", "slots": slots})
    assert status == 201, view
    await env.until(lambda: len(env.link.configs()) == 1, "the push")
    frame = encode(env.link.configs()[0], KEY)
    assert len(frame) <= MAX_FRAME_SIZE


async def test_unknown_machine_is_404(env: Env) -> None:
    """Every planogram and slot route answers 404 for a machine that is not registered."""
    for machine_id in ("VM-404", "bad%20id"):
        status, answer = await env.put(planogram_body(), machine_id=machine_id)
        assert status == 404
        assert answer["error"]["code"] == "unknown_machine"
        for path in ("planogram", "slots"):
            status, answer = await env.get(f"/v1/machines/{machine_id}/{path}")
            assert (status, answer["error"]["code"]) == (404, "unknown_machine")


async def test_store_reads_back_the_planogram(env: Env) -> None:
    """The store returns the current planogram as stored, and its Config frame."""
    await env.put(planogram_body(2, 1))
    async with env.pool.acquire() as conn:
        current = await planograms.current(conn, MACHINE)
        config = await planograms.desired_config(conn, MACHINE)
        none = await planograms.current(conn, "VM-404")
    assert current is not None
    assert config is not None
    assert none is None
    assert (current.version, current.currency, current.created_by) == (1, "CNY", "api")
    assert config == current.config()
    assert [s.slot for s in config.slots] == [1, 2]


async def test_openapi_lists_exactly_the_routes_with_the_extension(env: Env) -> None:
    """With the extension, the OpenAPI document still names exactly the served routes."""
    status, document = await env.get("/v1/openapi.json")
    assert status == 200
    served = {
        (route.resource.canonical, route.method.lower())
        for route in env.app.router.routes()
        if route.resource is not None
    }
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert documented == served
    assert ("/v1/machines/{machine_id}/planogram", "put") in served
    assert ("/v1/machines/{machine_id}/slots/{slot}/disable", "post") in served
    schemas = document["components"]["schemas"]
    assert {ref.removeprefix("#/components/schemas/") for ref in _refs(document)} <= set(schemas)
    json.dumps(document)  # the document is plain JSON


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []
