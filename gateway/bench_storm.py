"""``vendgate bench --profile storm``: a broker restart under a connected fleet.

The gateway, the simulated fleet and an API prober run as separate processes against a
private Mosquitto and PostgreSQL. Once the gateway has every machine online, the broker is
stopped and started again (SIGTERM; it keeps its persistence file, as a restart by an
operator would). Every machine loses its connection and comes back with jittered backoff,
publishing its online ``Presence`` and a ``Hello``; the gateway loses its own connection too.

Measured:

* **recovery**: the time from the broker being back until the gateway has recorded a new
  session for every machine (``machine_sessions.connected_at`` after the restart, read from
  PostgreSQL, which presence reaches in batches), and until ``machines.online`` is true for
  all of them;
* **API during the storm**: the prober sends ``GET /v1/machines/{id}`` and
  ``GET /v1/machines?online=true`` open loop at a fixed rate from before the restart until
  after recovery; latencies and errors are reported for the storm window.

It passes when all machines are back within ``--recover-within-s`` (30 s) and the API's p99
in the storm window is at most ``--api-p99-ms`` (1,000 ms) with no 5xx or failed request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from gateway.bench import start_fleet
from gateway.benchkit import (
    cpu_seconds,
    percentile,
    register_machines,
    rss_mb,
    start_gateway,
    start_services,
    stop_process,
    wait_online,
)
from gateway.logs import configure_logging
from gateway.simulator import FleetSettings


@dataclass
class StormSettings:
    """What to run."""

    machines: int = 10_000
    api_rps: float = 50.0
    recover_within_s: float = 30.0
    api_p99_ms: float = 1000.0
    connect_concurrency: int = 200
    settle_s: float = 5.0  # keep probing this long after recovery
    #: The simulated fleet runs at this niceness: on a 2-core machine, 10,000 simulated
    #: devices reconnecting would otherwise take the CPU the gateway under test needs.
    fleet_nice: int = 10
    timeout_s: float = 120.0
    workdir: Path | None = None


async def run_storm(settings: StormSettings) -> dict[str, Any]:
    """Run the storm and return the JSON result."""
    work = settings.workdir or Path(tempfile.mkdtemp(prefix="vendgate-storm-"))
    secret = secrets.token_bytes(32)
    async with contextlib.AsyncExitStack() as stack:
        services = await start_services(stack, work, broker_url=None, dsn=None)
        broker = services.broker
        assert broker is not None  # noqa: S101  (the storm restarts its own broker)
        names = FleetSettings(
            broker_host="127.0.0.1", broker_port=1, master_secret=secret, machines=settings.machines
        )
        machine_ids = [names.machine_id(i) for i in range(settings.machines)]
        await register_machines(services.dsn, machine_ids)
        gateway = await start_gateway(stack, services, secret, [])
        pool = await asyncpg.create_pool(services.dsn, min_size=1, max_size=2)
        stack.push_async_callback(pool.close)

        t_fleet = time.monotonic()
        await start_fleet(
            stack,
            {
                "broker": services.broker_url,
                "secret": secret.hex(),
                "machines": settings.machines,
                "dispense_ms": 0,
                "slots": 10,
                "log": str(work / "dispense.jsonl"),
                "connect_concurrency": settings.connect_concurrency,
                "connect_timeout_s": settings.timeout_s,
                "nice": settings.fleet_nice,
            },
            timeout_s=settings.timeout_s,
            stop_timeout_s=60.0,
        )
        fleet_connected_s = time.monotonic() - t_fleet
        initial = await wait_online(pool, settings.machines, settings.timeout_s)

        probe_out = work / "probe.json"
        prober = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.bench_storm",
            "probe",
            json.dumps(
                {
                    "url": gateway.http_url,
                    "machines": machine_ids,
                    "rps": settings.api_rps,
                    "out": str(probe_out),
                }
            ),
        )
        stack.push_async_callback(stop_process, prober)
        await asyncio.sleep(2.0)  # a calm baseline before the storm

        cpu_before = cpu_seconds(gateway.pid)
        down_wall = time.time()
        t_down = time.monotonic()
        await broker.stop()
        await broker.start()
        t_up = time.monotonic()
        up_wall = time.time()
        sessions_s, online_s, counts = await _wait_recovered(
            pool, settings.machines, down_wall, t_up, settings.timeout_s
        )
        cpu_storm = cpu_seconds(gateway.pid) - cpu_before
        recovered_wall = time.time()
        await asyncio.sleep(settings.settle_s)
        prober.send_signal(signal.SIGINT)
        await asyncio.wait_for(prober.wait(), timeout=30)
        probes = json.loads(probe_out.read_text(encoding="utf-8"))
        rss = rss_mb(gateway.pid)

    storm = [p for p in probes if down_wall <= p[0] <= recovered_wall]
    calm = [p for p in probes if p[0] < down_wall]
    result = {
        "profile": "storm",
        "machines": settings.machines,
        "fleet_connected_s": round(fleet_connected_s, 2),
        "initial_online": initial,
        "broker_restart_s": round(t_up - t_down, 2),
        "recovered_sessions_s": None if sessions_s is None else round(sessions_s, 2),
        "recovered_online_s": None if online_s is None else round(online_s, 2),
        "recovered": counts,
        "api": {"storm": _latency(storm), "before": _latency(calm), "all": _latency(probes)},
        "gateway_cpu_storm_s": round(cpu_storm, 2),
        "gateway_rss_mb": round(rss, 1),
        "broker_back_at": up_wall,
        "settings": {
            "api_rps": settings.api_rps,
            "recover_within_s": settings.recover_within_s,
            "api_p99_ms": settings.api_p99_ms,
            "fleet_nice": settings.fleet_nice,
        },
        "workdir": str(work),
    }
    result["passed"] = storm_passed(result)
    return result


def _latency(probes: list[list[float]]) -> dict[str, Any]:
    latencies = [p[1] for p in probes if p[2] == 200]
    statuses = Counter(str(int(p[2])) for p in probes)
    return {
        "requests": len(probes),
        "statuses": dict(statuses),
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(max(latencies, default=0.0), 1),
    }


async def _wait_recovered(
    pool: asyncpg.Pool, machines: int, down_wall: float, t_up: float, timeout_s: float
) -> tuple[float | None, float | None, dict[str, int]]:
    """Poll until every machine has a session opened after the restart and is online."""
    deadline = t_up + timeout_s
    sessions_s = online_s = None
    fresh = online = 0
    while time.monotonic() < deadline and (sessions_s is None or online_s is None):
        fresh = await pool.fetchval(
            "SELECT count(DISTINCT machine_id) FROM machine_sessions "
            "WHERE connected_at >= to_timestamp($1)",
            down_wall,
        )
        online = await pool.fetchval("SELECT count(*) FROM machines WHERE online")
        now = time.monotonic() - t_up
        if sessions_s is None and fresh >= machines:
            sessions_s = now
        if online_s is None and online >= machines and fresh >= machines:
            online_s = now
        await asyncio.sleep(0.25)
    return sessions_s, online_s, {"new_sessions": int(fresh), "online": int(online)}


def storm_passed(result: dict[str, Any]) -> bool:
    """Return whether every machine came back in time and the API stayed fast and correct."""
    limits = result["settings"]
    api = result["api"]["storm"]
    recovered = result["recovered_online_s"]
    return bool(
        recovered is not None
        and recovered <= limits["recover_within_s"]
        and api["requests"] > 0
        and set(api["statuses"]) == {"200"}
        and api["p99_ms"] <= limits["api_p99_ms"]
    )


def storm_summary(result: dict[str, Any]) -> str:
    """Return the human summary of a storm result."""
    api = result["api"]["storm"]
    return (
        f"machines {result['machines']}: connected in {result['fleet_connected_s']} s; "
        f"broker restart took {result['broker_restart_s']} s\n"
        f"back online in the gateway {result['recovered_online_s']} s after the broker "
        f"(new sessions for all: {result['recovered_sessions_s']} s; {result['recovered']})\n"
        f"API during the storm: {api['requests']} requests {api['statuses']}, "
        f"p50 {api['p50_ms']} ms, p99 {api['p99_ms']} ms, max {api['max_ms']} ms\n"
        f"gateway CPU during the storm {result['gateway_cpu_storm_s']} s, "
        f"RSS {result['gateway_rss_mb']} MB"
    )


# --- the prober (a child process) ------------------------------------------------------------


async def _probe_main(args: dict[str, Any]) -> list[list[float]]:
    """GET machines open loop at ``rps`` until SIGINT; return [t, ms, status] per request."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    machines: list[str] = args["machines"]
    rng = random.Random(7)  # noqa: S311  (which machine to ask about, not security)
    results: list[list[float]] = []
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def probe(path: str) -> None:
            sent = time.time()
            t0 = time.perf_counter()
            try:
                async with session.get(args["url"] + path) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            results.append([sent, (time.perf_counter() - t0) * 1000, status])

        tasks: set[asyncio.Task[None]] = set()
        interval = 1.0 / args["rps"]
        start = time.perf_counter()
        i = 0
        while not stop.is_set():
            path = (
                "/v1/machines?online=true&limit=100"
                if i % 5 == 0
                else f"/v1/machines/{rng.choice(machines)}"
            )
            task = asyncio.create_task(probe(path), name=f"storm.probe.{i}")
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    stop.wait(), max(0.0, start + i * interval - time.perf_counter())
                )
        await asyncio.gather(*tasks)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: storm child processes")
    parser.add_argument("role", choices=["probe"])
    parser.add_argument("args")
    ns = parser.parse_args()
    configure_logging("warning", "json", sys.stderr)
    probe_args = json.loads(ns.args)
    Path(probe_args["out"]).write_text(json.dumps(asyncio.run(_probe_main(probe_args))))
