"""``vendgate demo``: the whole pipeline on embedded defaults, with faults, in about a minute.

It starts the gateway exactly as ``vendgate run`` would with no configuration (PostgreSQL
from the pgserver wheel, a private Mosquitto), a simulated fleet with jams, sensor misses,
power losses and one machine offline for a while, a webhook receiver standing in for the
payment backend, and a payment load. It prints progress, then a summary, and exits 0
only if the exactly-once checker (:mod:`gateway.checker`) finds nothing wrong.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aiohttp

from gateway.app import Gateway
from gateway.checker import VendFact, Verdict, check
from gateway.config import Config, load_config
from gateway.lifecycle import NOT_DISPENSED, VendStatus
from gateway.simulator import Fleet, FleetSettings, OfflineWindow
from gateway.store import vends
from gateway.webhooks import WebhookRecorder

HOOK_SECRET = "demo-webhook-secret-0123456789"  # noqa: S105  (a throwaway demo secret)


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """The demo's shape; the defaults take about a minute."""

    duration_s: float = 60.0  # 0: until Ctrl-C
    machines: int = 12
    rate: float = 4.0  # vends per second
    deadline_s: int = 20
    dispense_ms: int = 700
    jam_rate: float = 0.05
    no_drop_rate: float = 0.03
    reboot_rate: float = 0.02
    seed: int = 7


async def run(out: TextIO, settings: DemoSettings | None = None) -> int:
    """Run the demo, print progress and the summary; return the exit code."""
    s = settings or DemoSettings()
    root = _make_root()
    hooks = WebhookRecorder(HOOK_SECRET.encode())
    hook_url = await hooks.serve("/payments/vend-events")
    config = _config(root, hook_url)
    gateway = Gateway(config, state_dir=root)
    stop = asyncio.Event()
    out.write(f"vendgate demo: embedded PostgreSQL and Mosquitto in {root}\n")
    try:
        async with asyncio.TaskGroup() as tasks:
            serving = tasks.create_task(gateway.run(stop), name="demo.gateway")
            await _until_ready(gateway, serving)
            assert gateway.endpoints is not None  # noqa: S101  (set before ready)
            endpoints = gateway.endpoints
            out.write(
                f"gateway ready: API {endpoints.http_url}, broker "
                f"mqtt://{endpoints.mqtt_host}:{endpoints.mqtt_port}\n"
            )
            try:
                verdict, latencies = await _drive(out, s, gateway, hooks)
            finally:
                stop.set()
    finally:
        await hooks.close()
    _summary(out, verdict, latencies, hooks)
    shutil.rmtree(root, ignore_errors=True)
    return 0 if verdict.ok and not hooks.rejected else 1


def _make_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="vendgate-demo-"))
    root.chmod(0o755)  # pgserver's own user must reach its data folder when run as root
    return root


def _config(root: Path, hook_url: str) -> Config:
    return load_config(
        path=None,
        environ={},
        overrides=[
            f"database.data_dir={root / 'pgdata'}",
            f"security.master_secret={secrets.token_hex(32)}",
            "http.port=0",
            "log.level=warning",
            f"webhook.url={hook_url}",
            f"webhook.secret={HOOK_SECRET}",
            "webhook.retry_base_s=0.5",
            "vend.retry_base_s=0.5",
            "vend.retry_cap_s=2",
        ],
    )


async def _until_ready(gateway: Gateway, serving: asyncio.Task[None]) -> None:
    ready = asyncio.create_task(gateway.ready.wait(), name="demo.ready")
    done, _ = await asyncio.wait({ready, serving}, return_when=asyncio.FIRST_COMPLETED)
    if serving in done:
        ready.cancel()
        serving.result()  # raises the reason the gateway stopped
        raise RuntimeError("the gateway stopped before it was ready")


async def _drive(
    out: TextIO, s: DemoSettings, gateway: Gateway, hooks: WebhookRecorder
) -> tuple[Verdict, list[float]]:
    endpoints = gateway.endpoints
    assert endpoints is not None  # noqa: S101  (ready)
    fleet_settings = FleetSettings(
        broker_host=endpoints.mqtt_host,
        broker_port=endpoints.mqtt_port,
        master_secret=endpoints.master_secret,
        machines=s.machines,
        id_prefix="VM-",
        dispense_ms=s.dispense_ms,
        jam_rate=s.jam_rate,
        no_drop_rate=s.no_drop_rate,
        reboot_rate=s.reboot_rate,
        # One machine loses its link for 25 s: vends for it wait, or end unknown / expired.
        offline=(OfflineWindow(machine_index=2, start_s=10.0, duration_s=25.0),),
        seed=s.seed,
    )
    ids = [fleet_settings.machine_id(i) for i in range(s.machines)]
    async with aiohttp.ClientSession() as http:
        for machine_id in ids:
            async with http.post(
                f"{endpoints.http_url}/v1/machines", json={"machine_id": machine_id}
            ) as r:
                r.raise_for_status()
        async with Fleet(fleet_settings) as fleet:
            await _set_planograms(out, http, endpoints.http_url, fleet)
            accepted = await _load(
                out, s, http=http, url=endpoints.http_url, ids=ids, gateway=gateway
            )
            out.write("load finished; waiting for the last vends to settle...\n")
            await _settle(endpoints.dsn, s.deadline_s + 30.0)
            await asyncio.sleep(2.0)  # the last webhooks
            facts, latencies = await _facts(endpoints.dsn)
            turns = list(fleet.dispenses)
    out.write(f"{accepted} vends accepted by the API\n")
    return check(facts, turns, hooks.events.values(), expect_webhooks=True), latencies


async def _set_planograms(out: TextIO, http: aiohttp.ClientSession, url: str, fleet: Fleet) -> None:
    """Set each machine's planogram as a merchant would; wait until every machine runs it."""
    config = fleet.settings.planogram()
    body = {
        "currency": "CNY",
        "updated_by": "demo-merchant",
        "slots": [
            {
                "slot": slot.slot,
                "product_code": slot.product_code,
                "name": slot.name,
                "price": slot.price,
                "capacity": slot.capacity,
                "drop_sensor": slot.drop_sensor,
            }
            for slot in config.slots
        ],
    }
    for machine_id in fleet.machine_ids:
        async with http.put(f"{url}/v1/machines/{machine_id}/planogram", json=body) as r:
            r.raise_for_status()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        synced = 0
        for machine_id in fleet.machine_ids:
            async with http.get(f"{url}/v1/machines/{machine_id}/planogram") as r:
                synced += bool((await r.json())["in_sync"])
        if synced == len(fleet.machine_ids):
            break
        await asyncio.sleep(0.5)
    out.write(
        f"planograms set through the API: {synced} of {len(fleet.machine_ids)} machines run them\n"
    )


async def _load(
    out: TextIO,
    s: DemoSettings,
    *,
    http: aiohttp.ClientSession,
    url: str,
    ids: list[str],
    gateway: Gateway,
) -> int:
    rng = random.Random(s.seed)  # noqa: S311  (demo traffic, not security)
    started = time.monotonic()
    load_s = s.duration_s - 15 if s.duration_s else float("inf")
    accepted = refused = 0
    next_report = started + 5
    i = 0
    while time.monotonic() - started < load_s:
        i += 1
        body = {
            "vend_id": f"wx-{int(time.time())}-{i:05d}",
            "machine_id": rng.choice(ids),
            "slot": (slot := rng.randint(1, 10)),
            "price": 100 * slot,  # the planogram's price (FleetSettings.planogram)
            "currency": "CNY",
            "deadline_s": s.deadline_s,
        }
        async with http.post(f"{url}/v1/vends", json=body) as response:
            accepted += response.status == 202
            refused += response.status == 409  # a slot out of service after failures
        if time.monotonic() >= next_report:
            next_report += 5
            out.write(_progress(gateway, time.monotonic() - started) + "\n")
        await asyncio.sleep(rng.expovariate(s.rate))
    if refused:
        out.write(f"{refused} vends refused before payment (409: slot out of service)\n")
    return accepted


def _progress(gateway: Gateway, elapsed: float) -> str:
    sample = gateway.registry.get_sample_value
    entered = {
        state.value: int(sample("vendgate_vend_transitions_total", {"state": state.value}) or 0)
        for state in VendStatus
        if state is not VendStatus.ACCEPTED
    }
    shown = ", ".join(f"{k} {v}" for k, v in entered.items() if v)
    return f"[{elapsed:5.1f} s] vends entering each state so far: {shown or 'none yet'}"


async def _settle(dsn: str, timeout_s: float) -> None:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(dsn)
    try:
        await vends.wait_settled(conn, timeout_s, poll_s=0.5)
    finally:
        await conn.close()


async def _facts(dsn: str) -> tuple[list[VendFact], list[float]]:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT vend_id, wire_id, state, "
            "extract(epoch FROM settled_at - created_at) * 1000 AS ms FROM vends"
        )
    finally:
        await conn.close()
    facts = [VendFact(r["vend_id"], r["wire_id"], VendStatus(r["state"])) for r in rows]
    latencies = [float(r["ms"]) for r in rows if r["ms"] is not None and r["state"] != "unknown"]
    return facts, latencies


def _summary(out: TextIO, verdict: Verdict, latencies: list[float], hooks: WebhookRecorder) -> None:
    by = verdict.by_state
    not_dispensed = Counter({s.value: by.get(s, 0) for s in NOT_DISPENSED})
    pct = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [0.0] * 99
    out.write("\nSummary\n")
    out.write(f"  dispensed:                 {by.get(VendStatus.DISPENSED, 0)}\n")
    out.write(
        f"  not dispensed (refunded):  {sum(not_dispensed.values())}  "
        f"({', '.join(f'{k} {v}' for k, v in not_dispensed.items())})\n"
    )
    out.write(f"  unknown (for an operator): {verdict.unknown}\n")
    out.write(f"  dispensed twice:           {verdict.duplicates}\n")
    out.write(f"  lost:                      {verdict.lost}\n")
    out.write(f"  conflicts:                 {verdict.conflicts}\n")
    out.write(
        f"  webhooks: {len(hooks.events)} events, missing {verdict.webhooks_missing}, "
        f"bad signatures {hooks.rejected}\n"
    )
    out.write(
        f"  latency accepted -> final: p50 {pct[49]:.0f} ms, p95 {pct[94]:.0f} ms, "
        f"p99 {pct[98]:.0f} ms\n"
    )
    for problem in verdict.problems[:10]:
        out.write(f"  problem: {problem}\n")
    out.write(f"\nexactly-once: {'holds' if verdict.ok else 'VIOLATED'}\n")
    out.write(
        "next: `vendgate run` serves the API on http://127.0.0.1:8080 "
        "(see README), `vendgate bench` measures it.\n"
    )
