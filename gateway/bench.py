"""``vendgate bench``: the end-to-end vend benchmark, with an exactly-once check.

The gateway, the simulated fleet and the payment load generator run as separate
processes (``vendgate run``; ``python -m gateway.bench fleet``; ``python -m
gateway.bench load``); the broker and PostgreSQL are embedded ones unless a broker URL
or DSN is given; this process orchestrates and receives the webhooks. After the load,
it compares three independent records — the fleet's dispense log (every motor turn),
the database, and the webhooks received — and fails unless every accepted vend was
dispensed at most once and ended dispensed or reported not dispensed.

Latency is measured from the database: ``settled_at - created_at`` of each vend, both
stamped by PostgreSQL (accepted to final). Gateway CPU is read from /proc for the
gateway process alone, between the first request and the last settled vend.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from gateway.benchkit import (
    cpu_seconds,
    percentile,
    rss_mb,
    start_gateway,
    start_services,
    stop_process,
)
from gateway.checker import VendFact, check
from gateway.config import mqtt_address
from gateway.lifecycle import NOT_DISPENSED, VendStatus
from gateway.logs import configure_logging
from gateway.simulator import DispenseRecord, Fleet, FleetSettings, read_dispense_log
from gateway.store import db, vends
from gateway.webhooks import WebhookRecorder

WEBHOOK_SECRET = "bench-webhook-secret-0123456789"  # noqa: S105  (a throwaway test secret)
READY_MARK = b"FLEET-READY "
FLEET_LINE_LIMIT = 16 * 1024 * 1024


@dataclass
class BenchSettings:
    """What to run."""

    machines: int = 50
    vends: int = 500
    rate: float | None = None  # vends/s open loop; None: closed loop
    concurrency: int = 64
    dispense_ms: int = 0
    slots: int = 10
    deadline_s: int = 60
    settle_timeout_s: float = 120.0
    broker: str | None = None
    dsn: str | None = None
    workdir: Path | None = None


async def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run the whole benchmark and return the JSON result."""
    work = settings.workdir or Path(tempfile.mkdtemp(prefix="vendgate-bench-"))
    secret = secrets.token_bytes(32)
    async with contextlib.AsyncExitStack() as stack:
        services = await start_services(stack, work, broker_url=settings.broker, dsn=settings.dsn)
        broker_url, dsn = services.broker_url, services.dsn

        receiver = WebhookRecorder(WEBHOOK_SECRET.encode())
        hook_url = await receiver.serve()
        stack.push_async_callback(receiver.close)

        gateway = await start_gateway(
            stack,
            services,
            secret,
            [
                f"webhook.url={hook_url}",
                f"webhook.secret={WEBHOOK_SECRET}",
                "webhook.retry_base_s=0.2",
            ],
        )
        http_url = gateway.http_url

        # Machines are registered before they connect, as in production: a gateway drops
        # frames from machines it does not know.
        names = FleetSettings(
            broker_host="127.0.0.1", broker_port=1, master_secret=secret, machines=settings.machines
        )
        machine_ids = [names.machine_id(i) for i in range(settings.machines)]
        async with aiohttp.ClientSession() as session:
            sem = asyncio.Semaphore(32)

            async def register(machine_id: str) -> None:
                async with (
                    sem,
                    session.post(
                        f"{http_url}/v1/machines", json={"machine_id": machine_id}
                    ) as response,
                ):
                    response.raise_for_status()

            await asyncio.gather(*(register(m) for m in machine_ids))

        fleet_log = work / "dispense.jsonl"
        fleet, connected = await start_fleet(
            stack,
            {
                "broker": broker_url,
                "secret": secret.hex(),
                "machines": settings.machines,
                "dispense_ms": settings.dispense_ms,
                "slots": settings.slots,
                "log": str(fleet_log),
            },
            timeout_s=120,
        )
        if connected != machine_ids:
            raise RuntimeError("the fleet's machine ids differ from the registered ones")
        await asyncio.sleep(0.5)  # Hello -> Time for every machine

        load_args = {
            "url": http_url,
            "machines": machine_ids,
            "vends": settings.vends,
            "rate": settings.rate,
            "concurrency": settings.concurrency,
            "slots": settings.slots,
            "deadline_s": settings.deadline_s,
        }
        cpu_before = cpu_seconds(gateway.pid)
        started = time.time()
        load = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.bench",
            "load",
            json.dumps(load_args),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await load.communicate()
        load_result = json.loads(out.decode().strip().splitlines()[-1])

        pool = await db.create_pool(dsn, min_size=1, max_size=2)
        stack.push_async_callback(pool.close)
        async with pool.acquire() as conn:
            settled = await vends.wait_settled(conn, settings.settle_timeout_s)
        cpu_after = cpu_seconds(gateway.pid)
        elapsed = time.time() - started
        rss = rss_mb(gateway.pid)
        await asyncio.sleep(1.0)  # let the last webhooks and result re-sends land
        rows = await pool.fetch(
            "SELECT vend_id, wire_id, state, "
            "extract(epoch FROM settled_at - created_at) * 1000 AS latency_ms, "
            "extract(epoch FROM settled_at) AS settled, extract(epoch FROM created_at) AS created "
            "FROM vends"
        )
        history = await pool.fetch(
            "SELECT vend_id, to_state, event, extract(epoch FROM at) AS at "
            "FROM vend_transitions ORDER BY id"
        )
        lines = [
            json.dumps({k: float(v) if k == "at" else v for k, v in h.items()}) for h in history
        ]
        (work / "transitions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        await stop_process(fleet)
        turns = read_dispense_log(fleet_log)

    return _report(
        settings,
        load_result,
        rows,
        turns,
        receiver,
        settled,
        elapsed,
        cpu_after - cpu_before,
        rss,
        work,
    )


async def start_fleet(
    stack: contextlib.AsyncExitStack,
    args: dict[str, Any],
    *,
    timeout_s: float,
    stop_timeout_s: float = 15.0,
) -> tuple[asyncio.subprocess.Process, list[str]]:
    """Start the fleet process (``_fleet_main`` takes ``args``); return it once connected."""
    fleet = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.bench",
        "fleet",
        json.dumps(args),
        stdout=asyncio.subprocess.PIPE,
        limit=FLEET_LINE_LIMIT,  # the ready line lists every machine id
    )
    stack.push_async_callback(stop_process, fleet, stop_timeout_s)
    assert fleet.stdout is not None  # noqa: S101  (PIPE was asked for)
    connected = await asyncio.wait_for(fleet_ready(fleet.stdout), timeout=timeout_s)
    return fleet, connected


async def fleet_ready(stdout: asyncio.StreamReader) -> list[str]:
    """Read the fleet's stdout until its ready line, which lists the machine ids."""
    while line := await stdout.readline():
        if line.startswith(READY_MARK):
            machines: list[str] = json.loads(line[len(READY_MARK) :])
            return machines
    raise RuntimeError("the fleet process exited before it was ready")


def _report(  # noqa: PLR0917  (the whole run's evidence, assembled once)
    settings: BenchSettings,
    load: dict[str, Any],
    rows: list[asyncpg.Record],
    turns: list[DispenseRecord],
    receiver: WebhookRecorder,
    settled: bool,
    elapsed: float,
    cpu_s: float,
    rss_mb: float,
    work: Path,
) -> dict[str, Any]:
    verdict = check(
        [VendFact(r["vend_id"], r["wire_id"], VendStatus(r["state"])) for r in rows],
        turns,
        receiver.events.values(),
        expect_webhooks=True,
    )
    not_dispensed = {s.value for s in NOT_DISPENSED}
    final_rows = [r for r in rows if r["state"] in not_dispensed | {"dispensed"}]
    latencies = [float(r["latency_ms"]) for r in final_rows if r["latency_ms"] is not None]
    window = (
        max(float(r["settled"]) for r in final_rows) - min(float(r["created"]) for r in final_rows)
        if final_rows
        else 0.0
    )
    completed = len(final_rows)
    return {
        "machines": settings.machines,
        "vends_requested": settings.vends,
        "vends_accepted": load["accepted"],
        "vends_dispensed": verdict.by_state.get(VendStatus.DISPENSED, 0),
        "vends_not_dispensed": sum(verdict.by_state.get(s, 0) for s in NOT_DISPENSED),
        "vends_unknown": verdict.unknown,
        "duplicates": verdict.duplicates,
        "lost": verdict.lost,
        "conflicts": verdict.conflicts,
        "webhooks_missing": verdict.webhooks_missing,
        "webhook_duplicate_events": verdict.webhook_duplicates,
        "problems": verdict.problems[:20],
        "webhook_bad_signatures": receiver.rejected,
        "throughput_vps": round(completed / window, 1) if window > 0 else 0.0,
        "latency_ms": {
            "p50": round(percentile(latencies, 0.50), 1),
            "p95": round(percentile(latencies, 0.95), 1),
            "p99": round(percentile(latencies, 0.99), 1),
            "mean": round(statistics.fmean(latencies), 1) if latencies else 0.0,
        },
        "gateway_cpu_us_per_vend": round(cpu_s * 1e6 / completed, 1) if completed else None,
        "gateway_cpu_s": round(cpu_s, 3),
        "gateway_rss_mb": round(rss_mb, 1),
        "elapsed_s": round(elapsed, 2),
        "load": load,
        "settled_in_time": settled,
        "settings": {
            "rate": settings.rate,
            "concurrency": settings.concurrency,
            "dispense_ms": settings.dispense_ms,
            "deadline_s": settings.deadline_s,
        },
        "workdir": str(work),
    }


# --- child processes -----------------------------------------------------------------------


async def _fleet_main(args: dict[str, Any]) -> None:
    if args.get("nice"):
        # The fleet stands in for thousands of separate devices; on a shared machine it must
        # not take CPU from the gateway, broker and database it is measuring.
        os.nice(int(args["nice"]))
    host, port = mqtt_address(args["broker"])
    settings = FleetSettings(
        broker_host=host,
        broker_port=port,
        master_secret=bytes.fromhex(args["secret"]),
        machines=args["machines"],
        dispense_ms=args["dispense_ms"],
        dispense_jitter_ms=0,
        slots=args["slots"],
        dispense_log=Path(args["log"]),
        connect_concurrency=args.get("connect_concurrency", 50),
        connect_timeout_s=args.get("connect_timeout_s", 60.0),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Fleet(settings) as fleet:
        # As installed by a technician; the gateway has no planogram, so prices go unchecked.
        fleet.configure_locally()
        sys.stdout.write(READY_MARK.decode() + json.dumps(fleet.machine_ids) + "\n")
        sys.stdout.flush()
        await stop.wait()


async def _load_main(args: dict[str, Any]) -> None:
    machines: list[str] = args["machines"]
    rng = random.Random(1)  # noqa: S311  (slot choice for load, not security)
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    sem = asyncio.Semaphore(args["concurrency"])
    run_id = secrets.token_hex(4)
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=args["concurrency"])
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def post(i: int) -> None:
            body = {
                "vend_id": f"bench-{run_id}-{i}",
                "machine_id": machines[i % len(machines)],
                "slot": rng.randint(1, args["slots"]),
                "price": 300,
                "currency": "CNY",
                "deadline_s": args["deadline_s"],
            }
            async with sem:
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{args['url']}/v1/vends", json=body) as response:
                        await response.read()
                        statuses[response.status] += 1
                except aiohttp.ClientError:
                    statuses[0] += 1
                latencies.append((time.perf_counter() - t0) * 1000)

        start = time.perf_counter()
        rate = args["rate"]
        tasks = []
        for i in range(args["vends"]):
            if rate:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post(i), name=f"bench.load.{i}"))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    result = {
        "accepted": statuses.get(202, 0),
        "statuses": {str(k): v for k, v in statuses.items()},
        "elapsed_s": round(elapsed, 3),
        "post_rps": round(args["vends"] / elapsed, 1) if elapsed else 0.0,
        "post_p99_ms": round(percentile(latencies, 0.99), 1),
    }
    sys.stdout.write(json.dumps(result) + "\n")


def _child(argv: list[str]) -> int:
    role, raw = argv[0], json.loads(argv[1])
    configure_logging("warning", "json", sys.stderr)  # stdout carries the results
    if role == "fleet":
        asyncio.run(_fleet_main(raw))
    elif role == "load":
        asyncio.run(_load_main(raw))
    else:
        raise SystemExit(f"unknown role {role!r}")
    return 0


def summary(result: dict[str, Any]) -> str:
    """Return the human summary of a result."""
    lat = result["latency_ms"]
    return (
        f"machines {result['machines']}, vends accepted {result['vends_accepted']}: "
        f"dispensed {result['vends_dispensed']}, not dispensed {result['vends_not_dispensed']}, "
        f"unknown {result['vends_unknown']}\n"
        f"duplicates {result['duplicates']}, lost {result['lost']}, "
        f"conflicts {result['conflicts']}\n"
        f"throughput {result['throughput_vps']} vends/s; latency accepted->final "
        f"p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms\n"
        f"gateway CPU {result['gateway_cpu_us_per_vend']} us/vend, "
        f"RSS {result['gateway_rss_mb']} MB"
    )


def passed(result: dict[str, Any]) -> bool:
    """Return whether the exactly-once invariants held."""
    return bool(result["duplicates"] == 0 and result["lost"] == 0 and result["conflicts"] == 0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: bench child processes")
    parser.add_argument("role")
    parser.add_argument("args")
    ns = parser.parse_args()
    raise SystemExit(_child([ns.role, ns.args]))
