"""Planograms and slot health over a real Mosquitto and PostgreSQL.

The merchant's side through the HTTP API, the machines' side through the simulated fleet:
a planogram set through the API reaches the machine, and again when it reconnects with an
older one; a stale price is refused before payment; a slot that keeps failing is taken out
of service, and an operator puts it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.embedded import Mosquitto
from protocols.frames import Config, Hello
from tests.integration.harness import Diagnostics, Pipeline, pipeline, planogram_body

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


async def _planogram(p: Pipeline, machine_id: str) -> dict[str, Any]:
    status, body = await p.api.request("GET", f"/v1/machines/{machine_id}/planogram")
    assert status == 200, body
    return body


async def _in_sync(p: Pipeline, machine_id: str, version: int) -> bool:
    body = await _planogram(p, machine_id)
    return bool(body["in_sync"] and body["reported_version"] == version)


async def test_planogram_is_pushed_and_pushed_again_on_reconnect(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """A new version reaches the machine; one set while it is away reaches it on reconnect."""
    async with pipeline(mosquitto, database, tmp_path, diagnostics) as p:
        (machine,) = p.fleet.machine_ids
        first = await _planogram(p, machine)
        version = first["desired_version"]
        await p.eventually(lambda: _in_sync(p, machine, version), "the first version reported")
        detail = (await p.api.request("GET", f"/v1/machines/{machine}"))[1]
        assert detail["config"] == {
            "desired_version": version,
            "reported_version": version,
            "status": "applied",
            "in_sync": True,
            "sent_at": detail["config"]["sent_at"],
        }
        # The same planogram again is not a new version.
        config = p.fleet.settings.planogram()
        status, same = await p.api.request(
            "PUT", f"/v1/machines/{machine}/planogram", planogram_body(config)
        )
        assert (status, same["desired_version"]) == (200, version)

        # The machine is away while the merchant raises a price: the gateway cannot reach it.
        p.fleet.cut_off(machine, 3.0)
        await p.eventually(lambda: not p.fleet.is_online(machine), "the machine away")
        changed = planogram_body(config)
        changed["slots"][0]["price"] = 150
        status, body = await p.api.request("PUT", f"/v1/machines/{machine}/planogram", changed)
        assert status == 201, body
        newer = body["desired_version"]
        assert newer == version + 1
        assert body["in_sync"] is False
        hellos_before = len(p.sniffer.frames(Hello, machine))

        # Back online, its Hello reports the old version and the gateway sends the new one.
        await p.eventually(lambda: _in_sync(p, machine, newer), "the new version reported", 20)
        device = p.fleet.device(machine)
        assert device is not None
        assert device.config_version == newer
        hellos = p.sniffer.frames(Hello, machine)[hellos_before:]
        assert hellos, "the machine said Hello after reconnecting"
        assert hellos[0].config_version == version
        assert any(c.version == newer for c in p.sniffer.frames(Config, machine))

        text = await p.api.metrics()
        assert "vendgate_config_out_of_sync_machines 0.0" in text

        # The new price holds at once for the backend: the old one is refused before payment.
        status, refused = await p.api.post_vend(
            {
                "vend_id": "old-price",
                "machine_id": machine,
                "slot": 1,
                "price": 100,
                "currency": "CNY",
            }
        )
        assert status == 409
        assert refused["error"]["code"] == "price_mismatch"
        assert "150 CNY" in refused["error"]["message"]
        await p.api.create("new-price", machine, slot=1, price=150)
        vend = await p.api.wait_state("new-price", "dispensed")
        assert vend["price"] == 150


async def test_failing_slot_is_disabled_and_an_operator_enables_it(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """Three jams in a row disable the slot (409 before payment); enabling it is audited."""
    async with pipeline(
        mosquitto,
        database,
        tmp_path,
        diagnostics,
        fleet={"jam_rate": 1.0},
        gateway=["planogram.slot_failure_limit=3"],
    ) as p:
        (machine,) = p.fleet.machine_ids
        for n in range(3):
            await p.api.create(f"jam-{n}", machine, slot=2, price=200)
            vend = await p.api.wait_state(f"jam-{n}", "failed")
            assert vend["dispense"]["reason"] == "jam"

        # Each result is also a dispense record, written with the vend's own state change.
        conn = await asyncpg.connect(p.dsn)
        try:
            records = await conn.fetch(
                "SELECT vend_id, slot, outcome, reason, drop_detected, late FROM dispenses "
                "ORDER BY vend_id"
            )
        finally:
            await conn.close()
        assert [tuple(r) for r in records] == [
            (f"jam-{n}", 2, "failed", "jam", False, False) for n in range(3)
        ]

        status, slots = await p.api.request("GET", f"/v1/machines/{machine}/slots")
        assert status == 200
        slot = next(s for s in slots["slots"] if s["slot"] == 2)
        assert slot["enabled"] is False
        assert slot["consecutive_failures"] == 3
        assert "3 failed dispenses in a row" in slot["disabled_reason"]
        assert [a["action"] for a in slot["audit"]] == ["auto_disable"]
        assert slot["audit"][0]["actor"] == "gateway"

        status, refused = await p.api.post_vend(
            {"vend_id": "jam-4", "machine_id": machine, "slot": 2, "price": 200, "currency": "CNY"}
        )
        assert status == 409, refused
        assert refused["error"]["code"] == "slot_disabled"
        status, _ = await p.api.request("GET", "/v1/vends/jam-4")
        assert status == 404  # refused before it was stored: nothing to refund

        # Another slot of the machine still sells.
        status, _ = await p.api.post_vend(
            {
                "vend_id": "other-slot",
                "machine_id": machine,
                "slot": 1,
                "price": 100,
                "currency": "CNY",
            }
        )
        assert status == 202

        status, enabled = await p.api.request(
            "POST",
            f"/v1/machines/{machine}/slots/2/enable",
            {"operator": "li.wei", "reason": "helix replaced"},
        )
        assert status == 200, enabled
        status, slots = await p.api.request("GET", f"/v1/machines/{machine}/slots")
        slot = next(s for s in slots["slots"] if s["slot"] == 2)
        assert slot["enabled"] is True
        assert slot["consecutive_failures"] == 0
        assert sorted(a["action"] for a in slot["audit"]) == ["auto_disable", "enable"]
        enable = next(a for a in slot["audit"] if a["action"] == "enable")
        assert enable["actor"] == "operator:li.wei"
        assert enable["reason"] == "helix replaced"

        status, _ = await p.api.post_vend(
            {
                "vend_id": "after-fix",
                "machine_id": machine,
                "slot": 2,
                "price": 200,
                "currency": "CNY",
            }
        )
        assert status == 202
        text = await p.api.metrics()
        assert "vendgate_slots_disabled_total 1.0" in text
