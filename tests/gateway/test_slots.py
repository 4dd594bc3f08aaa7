"""Slot health: failed dispenses in a row take a slot out of service; operators put it back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from gateway.store import slots
from gateway.store.slots import SlotRow
from protocols.frames import Dispense, FailReason, Outcome
from tests.gateway.planogram_harness import MACHINE, Env, planogram_body, serve

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

LIMIT = 3
SLOTS = f"/v1/machines/{MACHINE}/slots"


@pytest_asyncio.fixture
async def env(database: str) -> AsyncIterator[Env]:
    async with serve(database, slot_failure_limit=LIMIT) as running:
        yield running


async def _result(env: Env, slot: int, reason: str, *, failed: bool = True) -> bool:
    """Record one result as the vend's result transaction would (through the writer)."""
    return await env.writer.submit(
        lambda conn: slots.record_result(
            conn, MACHINE, slot, failed=failed, reason=reason, limit=LIMIT, vend_id="order-1"
        )
    )


async def _dispense(env: Env, slot: int, outcome: Outcome, reason: FailReason) -> bool:
    record = Dispense(outcome=outcome, reason=reason, drop_detected=False, motor_ms=0, retries=0)
    return await env.writer.submit(
        lambda conn: slots.record_dispense(conn, MACHINE, slot, record, limit=LIMIT)
    )


async def _slot(env: Env, slot: int) -> SlotRow | None:
    async with env.pool.acquire() as conn:
        return await slots.get(conn, MACHINE, slot)


async def _audit(env: Env) -> list[dict[str, Any]]:
    async with env.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM slot_audit ORDER BY id")
    return [dict(r) for r in rows]


async def test_three_failures_in_a_row_disable_the_slot(env: Env) -> None:
    """The failure that reaches the limit disables the slot, audits it and returns True once."""
    await env.put(planogram_body(1, 2))
    assert [await _result(env, 2, "JAM") for _ in range(LIMIT)] == [False, False, True]
    row = await _slot(env, 2)
    assert row is not None
    assert (row.enabled, row.consecutive_failures) == (False, 3)
    assert row.disabled_reason == "3 failed dispenses in a row (last: JAM)"
    assert row.disabled_at is not None
    assert row.price == 302  # the product stays; only its health changed
    (audit,) = await _audit(env)
    assert (audit["slot"], audit["action"], audit["actor"]) == (2, "auto_disable", "gateway")
    assert audit["reason"] == row.disabled_reason
    assert '"vend_id": "order-1"' in audit["detail"]

    assert await _result(env, 2, "jam") is False  # already out of service: no second audit
    row = await _slot(env, 2)
    assert row is not None
    assert row.consecutive_failures == 4
    assert len(await _audit(env)) == 1


async def test_a_slot_unknown_to_the_gateway_is_counted_too(env: Env) -> None:
    """A failing slot with no row yet (no planogram) gets one, and is disabled all the same."""
    assert await _result(env, 40, "MOTOR_FAULT") is False
    assert await _result(env, 40, "NO_DROP") is False
    assert await _result(env, 40, "SENSOR_FAULT") is True
    row = await _slot(env, 40)
    assert row is not None
    assert row.disabled_reason == "3 failed dispenses in a row (last: SENSOR_FAULT)"
    assert not row.in_planogram


async def test_a_good_dispense_in_between_resets_the_count(env: Env) -> None:
    """Two failures, a success, two failures: still in service; a third in a row disables."""
    for reason in ("JAM", "JAM"):
        await _result(env, 1, reason)
    await _result(env, 1, "NONE", failed=False)
    row = await _slot(env, 1)
    assert row is not None
    assert row.consecutive_failures == 0
    assert [await _result(env, 1, "NO_DROP") for _ in range(LIMIT)] == [False, False, True]


def _record(outcome: Outcome, reason: FailReason) -> Dispense:
    return Dispense(outcome=outcome, reason=reason, drop_detected=False, motor_ms=0, retries=0)


async def test_many_results_reset_in_one_statement_and_count_in_order(env: Env) -> None:
    """`record_dispenses`: what one result at a time would do, with a slot listed twice too."""
    good, jam = _record(Outcome.DISPENSED, FailReason.NONE), _record(Outcome.FAILED, FailReason.JAM)
    for slot in (1, 2, 4):
        for _ in range(LIMIT - 1):
            await _result(env, slot, "JAM")
    disabled = await env.writer.submit(
        lambda conn: slots.record_dispenses(
            conn,
            [
                (MACHINE, 1, good, "order-a"),
                (MACHINE, 2, jam, "order-b"),
                (MACHINE, 3, good, "order-c"),  # no row yet: a healthy slot stays without one
                (MACHINE, 5, _record(Outcome.FAILED, FailReason.SLOT_EMPTY), None),
            ],
            limit=LIMIT,
        )
    )
    assert disabled == [(MACHINE, 2, "order-b")]
    assert [await _slot(env, s) for s in (3, 5)] == [None, None]
    one, two = await _slot(env, 1), await _slot(env, 2)
    assert one is not None
    assert two is not None
    assert (one.enabled, one.consecutive_failures) == (True, 0)
    assert (two.enabled, two.consecutive_failures) == (False, LIMIT)
    # Slot 4 twice: a jam that would disable it, then a good dispense. In order, the jam
    # disables it first (a set-based reset run ahead of the count would not).
    disabled = await env.writer.submit(
        lambda conn: slots.record_dispenses(
            conn, [(MACHINE, 4, jam, "order-d"), (MACHINE, 4, good, "order-e")], limit=LIMIT
        )
    )
    assert disabled == [(MACHINE, 4, "order-d")]
    four = await _slot(env, 4)
    assert four is not None
    assert (four.enabled, four.consecutive_failures) == (False, 0)


async def test_uncertain_power_loss_and_empty_slots_neither_count_nor_reset(env: Env) -> None:
    """A power loss (uncertain or failed) and an empty slot leave the count where it was."""
    await _dispense(env, 1, Outcome.FAILED, FailReason.JAM)
    await _dispense(env, 1, Outcome.FAILED, FailReason.JAM)
    assert await _dispense(env, 1, Outcome.UNCERTAIN, FailReason.POWER_LOSS) is False
    assert await _dispense(env, 1, Outcome.FAILED, FailReason.POWER_LOSS) is False
    assert await _dispense(env, 1, Outcome.FAILED, FailReason.SLOT_EMPTY) is False
    assert await _result(env, 1, "NOT_A_REASON") is False
    row = await _slot(env, 1)
    assert row is not None
    assert (row.enabled, row.consecutive_failures) == (True, 2)
    assert await _dispense(env, 1, Outcome.FAILED, FailReason.MOTOR_FAULT) is True


async def test_uncertain_with_a_sensor_fault_counts(env: Env) -> None:
    """An uncertain result caused by the slot's own hardware (a sensor fault) counts."""
    results = [
        await _dispense(env, 5, Outcome.UNCERTAIN, FailReason.SENSOR_FAULT) for _ in range(LIMIT)
    ]
    assert results == [False, False, True]


async def test_a_healthy_slot_costs_no_write_per_vend(env: Env) -> None:
    """A good dispense on a slot with no failures writes nothing (and creates no row)."""
    await env.put(planogram_body(1))
    xmin = await env.fetchval(
        "SELECT xmin::text FROM machine_slots WHERE machine_id = $1 AND slot = 1", MACHINE
    )
    await _dispense(env, 1, Outcome.DISPENSED, FailReason.NONE)
    await _dispense(env, 9, Outcome.DISPENSED, FailReason.NONE)
    assert (
        await env.fetchval(
            "SELECT xmin::text FROM machine_slots WHERE machine_id = $1 AND slot = 1", MACHINE
        )
        == xmin
    )
    assert await _slot(env, 9) is None


async def test_operator_enable_resets_and_is_audited(env: Env) -> None:
    """Enabling over HTTP puts the slot back in service, resets failures, and audits who."""
    await env.put(planogram_body(1, 2))
    for _ in range(LIMIT):
        await _result(env, 2, "JAM")
    status, view = await env.get(SLOTS)
    assert status == 200
    assert view["failure_limit"] == LIMIT
    by_slot = {s["slot"]: s for s in view["slots"]}
    assert set(by_slot) == {1, 2}
    assert by_slot[1]["enabled"] is True
    assert by_slot[1]["audit"] == []
    assert by_slot[2]["enabled"] is False
    assert by_slot[2]["consecutive_failures"] == LIMIT
    assert [a["action"] for a in by_slot[2]["audit"]] == ["auto_disable"]

    status, slot = await env.post(
        f"{SLOTS}/2/enable", {"operator": "alice", "reason": "cleared the helix"}
    )
    assert status == 200
    assert slot["slot"] == 2
    assert (slot["enabled"], slot["consecutive_failures"]) == (True, 0)
    assert (slot["disabled_at"], slot["disabled_reason"]) == (None, None)
    assert (slot["product_code"], slot["price"], slot["currency"]) == ("P-002", 302, "CNY")
    assert slot["in_planogram"] is True
    newest = slot["audit"][0]
    assert (newest["action"], newest["actor"]) == ("enable", "operator:alice")
    assert newest["reason"] == "cleared the helix"
    assert newest["detail"] == {"was_enabled": False, "consecutive_failures": LIMIT}
    assert [a["action"] for a in slot["audit"]] == ["enable", "auto_disable"]
    _, view = await env.get(SLOTS)
    assert {s["slot"]: s for s in view["slots"]}[2] == slot
    assert await _result(env, 2, "JAM") is False  # counting starts over


async def test_operator_disable_is_audited(env: Env) -> None:
    """Disabling over HTTP takes any slot out of service with the operator's reason."""
    await env.put(planogram_body(1))
    status, slot = await env.post(f"{SLOTS}/9/disable", {"operator": "bob", "reason": "no stock"})
    assert status == 200
    assert (slot["slot"], slot["enabled"], slot["in_planogram"]) == (9, False, False)
    assert slot["disabled_reason"] == "no stock"
    assert slot["disabled_at"] is not None
    assert [(a["action"], a["actor"]) for a in slot["audit"]] == [("disable", "operator:bob")]
    assert await _result(env, 9, "JAM") is False  # already out of service: no auto_disable


async def test_health_survives_planogram_changes(env: Env) -> None:
    """A disabled slot left out of a planogram and listed again is still out of service."""
    await env.put(planogram_body(1, 2))
    await env.post(f"{SLOTS}/1/disable", {"operator": "bob", "reason": "door broken"})
    await env.put(planogram_body(2))
    row = await _slot(env, 1)
    assert row is not None
    assert (row.enabled, row.in_planogram) == (False, False)
    await env.put(planogram_body(1, 2))
    row = await _slot(env, 1)
    assert row is not None
    assert (row.enabled, row.in_planogram, row.disabled_reason) == (False, True, "door broken")


async def test_audit_shows_the_latest_entries_newest_first(env: Env) -> None:
    """GET slots shows at most five audit entries per slot, newest first."""
    for n in range(4):
        await env.post(f"{SLOTS}/3/disable", {"operator": "op", "reason": f"d{n}"})
        await env.post(f"{SLOTS}/3/enable", {"operator": "op", "reason": f"e{n}"})
    _, view = await env.get(SLOTS)
    (slot,) = view["slots"]
    assert [a["reason"] for a in slot["audit"]] == ["e3", "d3", "e2", "d2", "e1"]


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        (f"{SLOTS}/1/enable", {"reason": "x"}, 422, "operator"),
        (f"{SLOTS}/1/enable", {"operator": "x"}, 422, "reason"),
        (f"{SLOTS}/1/disable", {"operator": " ", "reason": "x"}, 422, "operator"),
        (f"{SLOTS}/1/disable", {"operator": "x", "reason": "x", "by": "y"}, 422, "by"),
        (f"{SLOTS}/1/disable", {"operator": "a\nb", "reason": "x"}, 422, "operator"),
        (f"{SLOTS}/256/enable", {"operator": "x", "reason": "x"}, 422, "slot"),
        (f"{SLOTS}/one/enable", {"operator": "x", "reason": "x"}, 422, "slot"),
        (f"{SLOTS}/-1/enable", {"operator": "x", "reason": "x"}, 422, "slot"),
        ("/v1/machines/VM-404/slots/1/enable", {"operator": "x", "reason": "x"}, 404, "machine_id"),
        (
            "/v1/machines/VM-404/slots/1/disable",
            {"operator": "x", "reason": "x"},
            404,
            "machine_id",
        ),
    ],
)
async def test_slot_route_errors(
    env: Env, path: str, body: dict[str, object], status: int, field: str
) -> None:
    """Missing or bad operator fields are 422, a bad slot number is 422, a machine 404."""
    got, answer = await env.post(path, body)
    assert got == status, answer
    assert answer["error"]["field"] == field
    assert await _audit(env) == []


async def test_store_enable_and_disable_of_an_unknown_machine_return_none(env: Env) -> None:
    """The store answers None for a machine that is not registered, and writes nothing."""
    async with env.pool.acquire() as conn:
        assert await slots.enable(conn, "VM-404", 1, "operator:x", "y") is None
        assert await slots.disable(conn, "VM-404", 1, "operator:x", "y") is None
    assert await _audit(env) == []
