"""Machine sessions and telemetry over a real Mosquitto and PostgreSQL.

Presence comes only from what machines publish (their retained status with its last will,
Hello and heartbeats), read back through the HTTP API and the database: transitions, the
last will, the heartbeat timeout, session history across a gateway restart, and telemetry
rows, including while PostgreSQL is paused.
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.embedded import EmbeddedPostgres, Mosquitto
from gateway.simulator import Fleet
from protocols.frames import Reading, ReadingKind
from tests.integration.harness import (
    Api,
    Diagnostics,
    fleet_settings,
    gateway_config,
    gateway_overrides,
    pipeline,
    running_gateway,
)
from tests.pgfaults import paused

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

#: Fast presence for tests: heartbeats every 0.3 s, silence for 1.5 s ends a session.
FAST = ["sessions.heartbeat_timeout_s=1.5", "sessions.flush_interval_s=0.1"]


async def _machine(api: Api, machine_id: str) -> dict[str, Any]:
    status, body = await api.request("GET", f"/v1/machines/{machine_id}")
    assert status == 200, body
    return body


async def _sessions(api: Api, machine_id: str) -> list[dict[str, Any]]:
    status, body = await api.request("GET", f"/v1/machines/{machine_id}/sessions")
    assert status == 200, body
    sessions: list[dict[str, Any]] = body["sessions"]
    return sessions


async def _online(api: Api, machine_id: str, *, online: bool) -> bool:
    return bool((await _machine(api, machine_id))["online"] is online)


async def test_presence_follows_wills_timeouts_and_goodbyes(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """Online on connect; a will, a silent radio and a clean goodbye each end a session."""
    async with pipeline(
        mosquitto,
        database,
        tmp_path,
        diagnostics,
        fleet={"machines": 3, "heartbeat_ms": 300},
        gateway=FAST,
    ) as p:
        willed, muted, steady = p.fleet.machine_ids
        for machine_id in p.fleet.machine_ids:
            await p.eventually(partial(_online, p.api, machine_id, online=True), machine_id)
        status, page = await p.api.request("GET", "/v1/machines?online=true&limit=2")
        assert status == 200
        assert [m["machine_id"] for m in page["machines"]] == [willed, muted]
        status, rest = await p.api.request("GET", f"/v1/machines?online=true&after={page['next']}")
        assert [m["machine_id"] for m in rest["machines"]] == [steady]
        assert rest["next"] is None
        detail = await _machine(p.api, steady)
        assert detail["firmware"] == "vendgate-ref/1"
        assert detail["session"]["session"] == 1
        assert detail["active_vends"] == []

        # The connection drops without a DISCONNECT: the broker publishes the will.
        p.fleet.cut_off(willed, 2.0)
        await p.eventually(lambda: _online(p.api, willed, online=False), "the will seen")
        # The radio hangs: the connection stays, nothing arrives. Offline after the timeout.
        p.fleet.faults.muted.add(muted)
        await p.eventually(
            lambda: _online(p.api, muted, online=False), "heartbeat timeout", within=10
        )
        p.fleet.faults.muted.discard(muted)
        for machine_id in (willed, muted):
            await p.eventually(partial(_online, p.api, machine_id, online=True), machine_id)
        # One heartbeat lost is not a disconnection: the steady machine never flapped.
        assert [s["end_reason"] for s in await _sessions(p.api, steady)] == [None]

        willed_sessions = await _sessions(p.api, willed)
        assert [s["end_reason"] for s in willed_sessions] == [None, "last_will"]
        assert [s["session"] for s in willed_sessions] == [2, 1]
        muted_sessions = await _sessions(p.api, muted)
        assert [s["end_reason"] for s in muted_sessions] == [None, "heartbeat_timeout"]

        text = await p.api.metrics()
        assert 'vendgate_machine_disconnects_total{reason="last_will"} 1.0' in text
        assert 'vendgate_machine_disconnects_total{reason="heartbeat_timeout"} 1.0' in text
        assert "vendgate_machines_online 3.0" in text

    # The fleet said goodbye before the gateway stopped, which saved it on the way out.
    conn = await asyncpg.connect(database)
    try:
        reasons = await conn.fetch(
            "SELECT DISTINCT ON (machine_id) machine_id, end_reason FROM machine_sessions "
            "ORDER BY machine_id, connected_at DESC"
        )
        online = await conn.fetchval("SELECT count(*) FROM machines WHERE online")
    finally:
        await conn.close()
    assert {r["end_reason"] for r in reasons} == {"clean"}
    assert online == 0


async def test_session_history_survives_a_gateway_restart(
    mosquitto: Mosquitto, database: str, tmp_path: Path, diagnostics: Diagnostics
) -> None:
    """A will published while no gateway runs ends the same session row after the restart."""
    overrides = gateway_overrides(mosquitto.url, database, webhook_url=None, extra=FAST)
    settings = fleet_settings(mosquitto, tmp_path / "dispenses.jsonl", machines=2, heartbeat_ms=300)
    state = tmp_path / "state"
    async with Fleet(settings) as fleet:
        gone, stays = fleet.machine_ids
        async with running_gateway(gateway_config(overrides), state, diagnostics) as gw:
            assert gw.endpoints is not None
            api = Api(gw.endpoints.http_url, diagnostics)
            try:
                for machine_id in fleet.machine_ids:
                    await api.register(machine_id)
                    # Registered after it connected: its next frame (a heartbeat) or a
                    # reconnect is what the gateway sees. Reconnect it for a clean start.
                    fleet.cut_off(machine_id, 0.1)
                for machine_id in fleet.machine_ids:
                    await diagnostics.eventually(
                        partial(_open_session, api, machine_id), f"{machine_id} session open"
                    )
                before = await _sessions(api, gone)
            finally:
                await api.close()
        # No gateway now. The machine drops off; its will is retained on its status topic.
        fleet.cut_off(gone, 3.0)
        await diagnostics.eventually(lambda: not fleet.is_online(gone), "the machine gone")
        await asyncio.sleep(0.5)
        async with running_gateway(gateway_config(overrides), state, diagnostics) as gw:
            assert gw.endpoints is not None
            api = Api(gw.endpoints.http_url, diagnostics)
            try:
                await diagnostics.eventually(
                    lambda: _ended(api, gone, before[0]["session_id"]), "the old session ended"
                )
                after = await _sessions(api, gone)
                ended = next(s for s in after if s["session_id"] == before[0]["session_id"])
                assert ended["end_reason"] == "last_will"
                assert ended["connected_at"] == before[0]["connected_at"]
                await diagnostics.eventually(
                    lambda: _online(api, gone, online=True), "back after the cut", within=10
                )
                newest = (await _sessions(api, gone))[0]
                assert newest["session_id"] != before[0]["session_id"]
                assert newest["end_reason"] is None
                # The other machine's session simply continued across the restart.
                kept = await _sessions(api, stays)
                assert [s["end_reason"] for s in kept] == [None]
            finally:
                await api.close()


async def _open_session(api: Api, machine_id: str) -> bool:
    sessions = await _sessions(api, machine_id)
    return bool(sessions) and sessions[0]["end_reason"] is None


async def _ended(api: Api, machine_id: str, session_id: str) -> bool:
    return any(
        s["session_id"] == session_id and s["end_reason"] is not None
        for s in await _sessions(api, machine_id)
    )


def _readings(n: int) -> list[Reading]:
    return [
        Reading(dt_ms=0, kind=ReadingKind.TEMPERATURE, slot=None, value=400 + n),
        Reading(dt_ms=5, kind=ReadingKind.STOCK, slot=1, value=n % 10),
    ]


async def _count(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))  # noqa: S608
    finally:
        await conn.close()


async def _has(dsn: str, table: str, rows: int) -> bool:
    return await _count(dsn, table) == rows


async def test_telemetry_lands_once_and_waits_out_a_paused_database(
    mosquitto: Mosquitto,
    private_pg: tuple[EmbeddedPostgres, str],
    tmp_path: Path,
    diagnostics: Diagnostics,
) -> None:
    """Rows land; while PostgreSQL is paused they wait unacknowledged, then land once."""
    server, dsn = private_pg
    async with pipeline(mosquitto, dsn, tmp_path, diagnostics, gateway=FAST) as p:
        (machine,) = p.fleet.machine_ids
        device = p.fleet.device(machine)
        assert device is not None
        device.record_event("EGS", None, 0, active=True)
        assert p.fleet.report(machine, _readings(0))
        await p.eventually(lambda: _has(dsn, "telemetry_readings", 2), "the first rows")
        assert await _count(dsn, "telemetry_events") == 1

        with paused(server):
            for n in range(1, 41):
                assert p.fleet.report(machine, _readings(n))
            await asyncio.sleep(1.0)
            text = await p.api.metrics()
            depth = next(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("vendgate_telemetry_queue_messages ")
            )
            assert depth > 0, f"queue depth {depth}"  # held, unacknowledged at the broker
        # The count reached goes in the failure: this test failed rarely (twice in one
        # session, once in another) and the message said only what was awaited.
        seen: list[int] = []

        async def all_rows() -> bool:
            seen.append(await _count(dsn, "telemetry_readings"))
            return seen[-1] == 82

        await p.eventually(
            all_rows, lambda: f"82 rows after the pause; counts seen {seen[-5:]}", 30
        )
        conn = await asyncpg.connect(dsn)
        try:
            duplicated = await conn.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM telemetry_readings "
                "GROUP BY machine_id, boot, seq, idx HAVING count(*) > 1) d"
            )
            code = await conn.fetchval("SELECT code FROM telemetry_events")
            temperatures = await conn.fetch(
                "SELECT value FROM telemetry_readings WHERE kind = 1 ORDER BY value"
            )
        finally:
            await conn.close()
        assert duplicated == 0
        assert code == "EGS"
        assert [r["value"] for r in temperatures] == [400 + n for n in range(41)]
