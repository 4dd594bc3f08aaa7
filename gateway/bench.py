"""``vendgate bench``: the end-to-end vend benchmark, with an exactly-once check.

The gateway, the simulated fleet and the payment load generator run as separate
processes (``vendgate run``; ``python -m gateway.bench fleet``; ``python -m
gateway.bench load``); the broker and PostgreSQL are embedded ones unless a broker URL
or DSN is given; this process orchestrates and receives the webhooks. After the load,
it compares three independent records — the fleet's dispense log (every motor turn),
the database, and the webhooks received — and fails unless every accepted vend was
dispensed at most once and ended dispensed or reported not dispensed.

With ``gateways`` > 1, that many gateway processes share the broker and the database, each
with its own HTTP port and state folder (so its own MQTT client id, in the shared
subscription); the load generator spreads its requests round robin over their URLs and
every gateway sends its webhooks to the same recorder.

Latency is measured from the database: ``settled_at - created_at`` of each vend, both
stamped by PostgreSQL (accepted to final). Gateway CPU is read from /proc for the
gateway processes alone (summed), between the go given to the load generator and the last
settled vend; the fleet's CPU over the same window, the load generator's over its own run,
and the whole host's busy time, say which process, if any, was the bottleneck.

Telemetry (profile ``mixed``, or ``telemetry_rate`` > 0 in any): the fleet also publishes
``Telemetry`` frames (`Fleet.report`), open loop at ``telemetry_rate`` frames/s in total, round
robin over its machines, from the go until every vend is settled; it says how many it
published when told to stop. Reading 0 of each frame is numbered: its value is the frame's
number for its machine (1, 2, ...), so that every frame the fleet published can be found in
PostgreSQL. Once they are durable (or have stopped arriving), each must be stored exactly
once: under one (machine, boot, seq), with all its rows, and no row key (machine, boot, seq,
idx) twice. ``telemetry_lost`` (published, not stored) and ``telemetry_duplicated`` fail the
run as vend duplicates do. ``telemetry`` (``msgs``, ``rows``, ``mps``) counts the frames and
rows durable for the run's machines since the start, over the window from the start to the
last durable frame (PostgreSQL's clock): all 0 when the fleet sends none. The gateway's CPU
per vend then includes the telemetry it stored.

Then, unless ``limits`` is off, with the gateways stopped: ``limits.http_rps``, the same
load generator (same vends, concurrency and rate) against a bare aiohttp handler
(``python -m gateway.bench bare-http``) that reads the JSON body and answers 202; and the
telemetry profile's two limits (`gateway.bench_telemetry.measure_limits`) for frames of the
same shape, as many as the fleet published (at least `LIMIT_MIN_MESSAGES`, at most the
broker's queue), against the same broker and database: ``limits.mqtt_raw_ingest_mps``, one
bare MQTT client receiving them, and ``limits.pg_copy_rows_s``, a bare ``COPY`` of their rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg

from gateway import bench_telemetry
from gateway.benchkit import (
    GatewayProcess,
    Services,
    cpu_seconds,
    host_cpu_seconds,
    percentile,
    rss_mb,
    start_gateway,
    start_services,
    stop_process,
)
from gateway.checker import VendFact, check
from gateway.config import mqtt_address
from gateway.lifecycle import FINAL, NOT_DISPENSED, VendStatus
from gateway.logs import configure_logging
from gateway.simulator import DispenseRecord, Fleet, FleetSettings, read_dispense_log
from gateway.store import db, outbox, vends
from gateway.store.db import Conn
from gateway.webhooks import WebhookRecorder
from protocols.frames import Reading, ReadingKind

WEBHOOK_SECRET = "bench-webhook-secret-0123456789"  # noqa: S105  (a throwaway test secret)
READY_MARK = b"FLEET-READY "
FLEET_LINE_LIMIT = 16 * 1024 * 1024
LOAD_READY: Final = "LOAD-READY"
HTTP_READY: Final = "HTTP-READY "
RESULT_MARK: Final = "RESULT "
TELEMETRY_MARK: Final = "TELEMETRY "
# The fleet's telemetry publisher wakes this often and publishes the frames due by then.
TELEMETRY_TICK_S: Final = 0.005
# Telemetry frames still arriving after the stop: how long to wait for them, at most, and
# how long without a new durable frame before giving up.
TELEMETRY_SETTLE_S: Final = 60.0
TELEMETRY_STALL_S: Final = 10.0
# The telemetry limits are measured for this many frames at least (the vends profile's
# fleet sends none) and at most the embedded broker's queue (the drain runs queue them).
LIMIT_MIN_MESSAGES: Final = 10_000
NO_LIMITS: Final[dict[str, Any]] = {"http_rps": None, **bench_telemetry.NO_LIMITS}
TARGET_US_PER_VEND: Final = 250
# Cores busy on average at which a single-threaded (asyncio) process is taken as saturated,
# and the share of the host's CPUs at which the host is.
SATURATED_CORES: Final = 0.9
HOST_SATURATED: Final = 0.9


@dataclass
class BenchSettings:
    """What to run."""

    machines: int = 50
    vends: int = 500
    rate: float | None = None  # vends/s open loop; None: closed loop
    concurrency: int = 64
    dispense_ms: int = 0
    # Per dispense, in the simulated fleet: a jam, a turn with no drop (both: not
    # dispensed, refunded), a power loss mid-turn (the machine reboots; the vend is unknown
    # until an operator resolves it).
    jam_rate: float = 0.0
    no_drop_rate: float = 0.0
    reboot_rate: float = 0.0
    slots: int = 10
    deadline_s: int = 60
    settle_timeout_s: float = 120.0
    gateways: int = 1
    limits: bool = True  # measure the limits (HTTP, MQTT ingest, COPY) after the run
    profile: str = "vends"  # the name in the result: "vends", or "mixed" (with telemetry)
    telemetry_rate: float = 0.0  # Telemetry frames/s over the fleet, open loop; 0: none
    telemetry_readings: int = 4  # readings per frame
    broker: str | None = None
    dsn: str | None = None
    workdir: Path | None = None
    # Where gateways 2..N keep their state folder (their MQTT client ids): a stable place, so
    # that against an external broker a later run resumes their sessions in the shared
    # subscription instead of leaving them behind. None: the work directory. Gateway 1 keeps
    # the default state folder, as a single gateway always has.
    state_dir: Path | None = None


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds of the run's processes, read from /proc, and the windows they cover."""

    window_s: float  # the go to the last settled vend: the gateways, the fleet, the host
    gateways_s: tuple[float, ...]
    fleet_s: float
    loadgen_s: float  # over the load generator's own run, from the go to its last answer
    host_busy_s: float  # every process on the host, over window_s
    host_cpus: int


@dataclass(frozen=True)
class _Sample:
    wall: float
    gateways: tuple[float, ...]
    fleet: float
    host: float


def _sample(gateways: list[GatewayProcess], fleet_pid: int) -> _Sample:
    return _Sample(
        wall=time.time(),
        gateways=tuple(cpu_seconds(g.pid) for g in gateways),
        fleet=cpu_seconds(fleet_pid),
        host=host_cpu_seconds(),
    )


async def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run the whole benchmark and return the JSON result."""
    if settings.gateways < 1:
        raise ValueError("a benchmark needs at least one gateway")
    work = settings.workdir or Path(tempfile.mkdtemp(prefix="vendgate-bench-"))
    secret = secrets.token_bytes(32)
    async with contextlib.AsyncExitStack() as stack:
        services = await start_services(stack, work, broker_url=settings.broker, dsn=settings.dsn)
        broker_url, dsn = services.broker_url, services.dsn

        receiver = WebhookRecorder(WEBHOOK_SECRET.encode())
        hook_url = await receiver.serve()
        stack.push_async_callback(receiver.close)

        gateways = await _start_gateways(
            stack, services, secret, hook_url=hook_url, settings=settings, work=work
        )
        urls = [g.http_url for g in gateways]

        # Machines are registered before they connect, as in production: a gateway drops
        # frames from machines it does not know (the others find them in the database).
        names = FleetSettings(
            broker_host="127.0.0.1", broker_port=1, master_secret=secret, machines=settings.machines
        )
        machine_ids = [names.machine_id(i) for i in range(settings.machines)]
        await _register(urls[0], machine_ids)

        fleet_log = work / "dispense.jsonl"
        telemetry_on = settings.telemetry_rate > 0
        fleet, connected = await start_fleet(
            stack,
            {
                "broker": broker_url,
                "secret": secret.hex(),
                "machines": settings.machines,
                "dispense_ms": settings.dispense_ms,
                "jam_rate": settings.jam_rate,
                "no_drop_rate": settings.no_drop_rate,
                "reboot_rate": settings.reboot_rate,
                "slots": settings.slots,
                "log": str(fleet_log),
                "telemetry_rate": settings.telemetry_rate,
                "telemetry_readings": settings.telemetry_readings,
            },
            timeout_s=120,
            control=telemetry_on,
        )
        if connected != machine_ids:
            raise RuntimeError("the fleet's machine ids differ from the registered ones")
        await asyncio.sleep(0.5)  # Hello -> Time for every machine

        load_args = {
            "urls": urls,
            "machines": machine_ids,
            "vends": settings.vends,
            "rate": settings.rate,
            "concurrency": settings.concurrency,
            "slots": settings.slots,
            "deadline_s": settings.deadline_s,
        }
        pool = await db.create_pool(dsn, min_size=1, max_size=2)
        stack.push_async_callback(pool.close)
        started = time.time()
        load = await _LoadGenerator.start(stack, load_args)
        since = await pool.fetchval("SELECT now()")  # telemetry counts from here (its clock)
        before = _sample(gateways, fleet.pid)
        if telemetry_on:
            await _tell(fleet, "telemetry-start")
        await load.go()
        load_result, loadgen_cpu = await load.finish()

        settled = await _settle(pool, gateways, settings.settle_timeout_s)
        after = _sample(gateways, fleet.pid)
        elapsed = time.time() - started
        rss = [rss_mb(g.pid) for g in gateways]
        published, durable_in_time = (
            await _end_telemetry(fleet, pool, machine_ids, since) if telemetry_on else ({}, True)
        )
        await asyncio.sleep(1.0)  # let the last webhooks and result re-sends land
        rows, history = await _fetch_vends(pool, work)
        counts = await check_telemetry(
            pool, machine_ids, since, published, settings.telemetry_readings
        )
        await stop_process(fleet)
        turns = read_dispense_log(fleet_log)

        limits: dict[str, Any] = dict(NO_LIMITS)
        if settings.limits:
            for gateway in gateways:  # the limits are measured on a quiet host
                await stop_process(gateway.process)
            limits = await _measure_limits(
                services, secret, settings, load_args, int(published.get("published", 0))
            )

    cpu = CpuUse(
        window_s=after.wall - before.wall,
        gateways_s=tuple(a - b for a, b in zip(after.gateways, before.gateways, strict=True)),
        fleet_s=after.fleet - before.fleet,
        loadgen_s=loadgen_cpu,
        host_busy_s=after.host - before.host,
        host_cpus=os.cpu_count() or 1,
    )
    return _report(
        settings,
        load=load_result,
        rows=rows,
        history=history,
        turns=turns,
        receiver=receiver,
        settled=settled,
        elapsed=elapsed,
        cpu=cpu,
        rss=rss,
        limits=limits,
        telemetry=telemetry_result(
            counts,
            published,
            rate=settings.telemetry_rate,
            readings=settings.telemetry_readings,
            durable_in_time=durable_in_time,
        ),
        work=work,
    )


async def _end_telemetry(
    fleet: asyncio.subprocess.Process, pool: asyncpg.Pool, machine_ids: list[str], since: datetime
) -> tuple[dict[str, Any], bool]:
    """Stop the fleet's telemetry, wait for what it published; return that and if all came."""
    published = await _stop_telemetry(fleet)
    durable = await _wait_telemetry(pool, machine_ids, since, int(published["published"]))
    return published, durable


async def _measure_limits(
    services: Services,
    secret: bytes,
    settings: BenchSettings,
    load_args: dict[str, Any],
    published: int,
) -> dict[str, Any]:
    """Measure the three limits, one after the other, with the gateways stopped."""
    # Closed loop whatever the run's pace: a paced load would measure its own pace.
    limits = {**NO_LIMITS, **await http_limit({**load_args, "rate": None})}
    limits.update(
        await telemetry_limits(
            services,
            secret,
            machines=settings.machines,
            readings=settings.telemetry_readings,
            published=published,
        )
    )
    return limits


async def _start_gateways(
    stack: contextlib.AsyncExitStack,
    services: Services,
    secret: bytes,
    *,
    hook_url: str,
    settings: BenchSettings,
    work: Path,
) -> list[GatewayProcess]:
    """Start the gateways one after the other (each applies the migrations at start-up)."""
    common = [
        f"webhook.url={hook_url}",
        f"webhook.secret={WEBHOOK_SECRET}",
        "webhook.retry_base_s=0.2",
    ]
    state_base = settings.state_dir or work
    gateways: list[GatewayProcess] = []
    for i in range(settings.gateways):
        own: list[str] = []
        if i:
            # Its own state folder, so its own MQTT client id and session in the shared
            # subscription (gateway.app.Gateway._client_id): next to database.data_dir.
            own.append(f"database.data_dir={state_base / f'bench-gateway-{i + 1}' / 'pgdata'}")
        name = "gateway" if settings.gateways == 1 else f"gateway-{i + 1}"
        gateways.append(await start_gateway(stack, services, secret, common + own, name=name))
    return gateways


async def _wait_told(conn: Conn, timeout_s: float) -> bool:
    """Wait until every vend is settled and every webhook delivered; False if not in time.

    A vend is done when the backend has been told: the CPU window runs to here, so the
    gateway's CPU per vend includes the webhook deliveries.
    """
    deadline = time.monotonic() + timeout_s
    if not await vends.wait_settled(conn, timeout_s):
        return False
    while await outbox.pending_count(conn):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def _settle(pool: asyncpg.Pool, gateways: list[GatewayProcess], timeout_s: float) -> bool:
    """Wait for `_wait_told` (False: not in ``timeout_s``); fail if a gateway dies."""
    async with pool.acquire() as conn:
        settle = asyncio.create_task(_wait_told(conn, timeout_s), name="bench.settle")
        exits = [
            asyncio.create_task(g.process.wait(), name=f"bench.gateway_exit.{i}")
            for i, g in enumerate(gateways)
        ]
        try:
            await asyncio.wait([settle, *exits], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in exits:
                task.cancel()
        if not settle.done():
            settle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await settle
            dead = next(g for g in gateways if g.process.returncode is not None)
            raise RuntimeError(
                f"a gateway exited with code {dead.process.returncode} during the run "
                f"(its log: {dead.log})"
            )
        return settle.result()


async def _register(http_url: str, machine_ids: list[str]) -> None:
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


async def _fetch_vends(
    pool: asyncpg.Pool, work: Path
) -> tuple[list[asyncpg.Record], list[tuple[str, str, float]]]:
    """Return every vend's facts and the transitions (vend, state, at); write those down."""
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
    lines = [json.dumps({k: float(v) if k == "at" else v for k, v in h.items()}) for h in history]
    (work / "transitions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return list(rows), [(h["vend_id"], h["to_state"], float(h["at"])) for h in history]


class _LoadGenerator:
    """The load generator child (``_load_main``): started, then told to go on its stdin.

    It prints its result, then waits for its stdin to close before it exits, so that its
    CPU time can still be read from /proc once its load is done.
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._cpu_at_go = 0.0

    @classmethod
    async def start(
        cls, stack: contextlib.AsyncExitStack | None, args: dict[str, Any]
    ) -> _LoadGenerator:
        """Start it; return once it is ready to send, its HTTP session made."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.bench",
            "load",
            json.dumps({**args, "go_on_stdin": True}),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        if stack is not None:
            stack.push_async_callback(stop_process, process)
        assert process.stdout is not None  # noqa: S101  (PIPE was asked for)
        try:
            await asyncio.wait_for(_read_marked(process.stdout, LOAD_READY), timeout=60)
        except BaseException:
            await stop_process(process)
            raise
        return cls(process)

    async def go(self) -> None:
        """Start the load."""
        assert self.process.stdin is not None  # noqa: S101  (PIPE was asked for)
        self._cpu_at_go = cpu_seconds(self.process.pid)
        self.process.stdin.write(b"go\n")
        await self.process.stdin.drain()

    async def finish(self) -> tuple[dict[str, Any], float]:
        """Wait for the result; return it and the CPU seconds the load took; let it exit."""
        assert self.process.stdout is not None  # noqa: S101  (PIPE was asked for)
        assert self.process.stdin is not None  # noqa: S101
        result = await _read_marked(self.process.stdout, RESULT_MARK)
        cpu = cpu_seconds(self.process.pid) - self._cpu_at_go
        self.process.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), timeout=10)
        await stop_process(self.process)
        return result, cpu


async def _read_marked(stream: asyncio.StreamReader, mark: str) -> dict[str, Any]:
    """Read a child's stdout until a line starting with ``mark``; return its JSON, if any."""
    while line := await stream.readline():
        text = line.decode().rstrip("\n")
        if text.startswith(mark):
            rest = text[len(mark) :].strip()
            value: dict[str, Any] = json.loads(rest) if rest else {}
            return value
    raise RuntimeError(f"a bench child exited before its {mark.strip()} line")


async def http_limit(load_args: dict[str, Any]) -> dict[str, Any]:
    """Run the same load against a bare aiohttp handler; return ``http_rps`` and details."""
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.bench",
        "bare-http",
        "{}",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert server.stdout is not None  # noqa: S101  (PIPE was asked for)
        ready = await asyncio.wait_for(_read_marked(server.stdout, HTTP_READY), timeout=60)
        load = await _LoadGenerator.start(None, {**load_args, "urls": [ready["url"]]})
        try:
            server_before = cpu_seconds(server.pid)
            await load.go()
            result, loadgen_cpu = await load.finish()
            server_cpu = cpu_seconds(server.pid) - server_before
        finally:
            await stop_process(load.process)
    finally:
        await stop_process(server)
    answered = int(result["statuses"].get("202", 0))
    load_s = float(result["elapsed_s"])
    rps = round(answered / load_s, 1) if answered and load_s > 0 else None
    return {
        "http_rps": rps,
        "http": {
            "rps": rps,
            "requests": load_args["vends"],
            "answered_202": answered,
            "statuses": result["statuses"],
            "elapsed_s": load_s,
            "post_p99_ms": result["post_p99_ms"],
            "rate": load_args["rate"],
            "concurrency": load_args["concurrency"],
            "server": f"aiohttp {aiohttp.__version__}, one process, POST /v1/vends -> 202",
            "server_cpu_s": round(server_cpu, 3),
            "server_cpu_us_per_request": round(server_cpu * 1e6 / answered, 1)
            if answered
            else None,
            "loadgen_cpu_s": round(loadgen_cpu, 3),
            "loadgen_cores": _per_s(loadgen_cpu, load_s),
        },
    }


async def start_fleet(
    stack: contextlib.AsyncExitStack,
    args: dict[str, Any],
    *,
    timeout_s: float,
    stop_timeout_s: float = 15.0,
    control: bool = False,
) -> tuple[asyncio.subprocess.Process, list[str]]:
    """Start the fleet process (``_fleet_main`` takes ``args``); return it once connected.

    ``control``: its stdin is a pipe that takes commands (``telemetry-start``,
    ``telemetry-stop``; see `_fleet_main`).
    """
    fleet = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.bench",
        "fleet",
        json.dumps(args),
        stdin=asyncio.subprocess.PIPE if control else None,
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


# --- telemetry: the fleet's publishing, the durable frames, the limits ------------------------


async def _tell(process: asyncio.subprocess.Process, command: str) -> None:
    assert process.stdin is not None  # noqa: S101  (started with control=True)
    process.stdin.write(command.encode() + b"\n")
    await process.stdin.drain()


async def _stop_telemetry(fleet: asyncio.subprocess.Process) -> dict[str, Any]:
    """Stop the fleet's telemetry; return what it says it published (`_TelemetryPublisher`)."""
    await _tell(fleet, "telemetry-stop")
    assert fleet.stdout is not None  # noqa: S101  (PIPE was asked for)
    return await asyncio.wait_for(_read_marked(fleet.stdout, TELEMETRY_MARK), timeout=60)


_COUNT_FRAMES: Final = """
SELECT count(*) FROM telemetry_frames WHERE machine_id = ANY($1::text[]) AND received_at >= $2
"""


async def _wait_telemetry(
    pool: asyncpg.Pool,
    machine_ids: list[str],
    since: datetime,
    expected: int,
) -> bool:
    """Wait until ``expected`` frames are durable (True), or stop arriving (False).

    Gives up after `TELEMETRY_STALL_S` without a new frame, or `TELEMETRY_SETTLE_S` in all.
    """
    start = changed = time.monotonic()
    last = -1
    while True:
        durable = int(await pool.fetchval(_COUNT_FRAMES, machine_ids, since))
        now = time.monotonic()
        if durable >= expected:
            return True
        if durable != last:
            last, changed = durable, now
        elif now - changed > TELEMETRY_STALL_S or now - start > TELEMETRY_SETTLE_S:
            return False
        await asyncio.sleep(0.1)


def expected_frames(
    machine_ids: list[str], sent: list[int], unsent: Iterable[tuple[int, int]]
) -> tuple[list[str], list[int]]:
    """Return the frames the fleet published, as (machine ids, frame numbers), two columns.

    ``sent[m]``: the frames machine ``m`` built, numbered 1.. ``sent[m]``; ``unsent``: the
    (machine index, number) of those it could not publish (offline, or its window full).
    """
    skip = {(m, n) for m, n in unsent}
    machines: list[str] = []
    numbers: list[int] = []
    for m, last in enumerate(sent):
        for n in range(1, last + 1):
            if (m, n) not in skip:
                machines.append(machine_ids[m])
                numbers.append(n)
    return machines, numbers


# $1: the run's machines; $2: the start; $3, $4: the frames published, (machine, number);
# $5: readings per frame. Rows are those of the frames in the ledger since the start (their
# own received_at, the gateway's clock, only narrows the partitions read).
_CHECK_TELEMETRY: Final = """
WITH f AS (
    SELECT machine_id, boot, seq, received_at FROM telemetry_frames
     WHERE machine_id = ANY($1::text[]) AND received_at >= $2
),
r AS (
    SELECT machine_id, boot, seq, t.idx, t.value FROM telemetry_readings t
      JOIN f USING (machine_id, boot, seq)
     WHERE t.received_at >= $2::timestamptz - interval '10 minutes'
),
ev AS (
    SELECT machine_id, boot, seq, t.idx FROM telemetry_events t
      JOIN f USING (machine_id, boot, seq)
     WHERE t.received_at >= $2::timestamptz - interval '10 minutes'
),
frames AS (
    SELECT machine_id, boot, seq, count(DISTINCT idx) AS readings,
           min(value) FILTER (WHERE idx = 0) AS number
      FROM r GROUP BY 1, 2, 3
),
twice AS (
    SELECT DISTINCT machine_id, boot, seq
      FROM (SELECT machine_id, boot, seq, idx FROM r
            UNION ALL SELECT machine_id, boot, seq, idx FROM ev) k
     GROUP BY machine_id, boot, seq, idx HAVING count(*) > 1
),
published AS (
    SELECT * FROM unnest($3::text[], $4::int[]) AS p(machine_id, number)
),
found AS (
    SELECT p.machine_id, p.number, count(fr.seq) AS copies,
           coalesce(bool_and(fr.readings >= $5), false) AS whole
      FROM published p
      LEFT JOIN frames fr ON (fr.machine_id, fr.number) = (p.machine_id, p.number)
     GROUP BY 1, 2
)
SELECT
    (SELECT count(*) FROM f) AS msgs,
    (SELECT count(*) FROM r) AS readings,
    (SELECT count(*) FROM ev) AS events,
    (SELECT extract(epoch FROM max(received_at) - $2::timestamptz) FROM f) AS window_s,
    (SELECT count(*) FROM published) AS published,
    (SELECT count(*) FROM found WHERE copies = 0) AS missing,
    (SELECT count(*) FROM found WHERE copies > 0 AND NOT whole) AS incomplete,
    (SELECT count(*) FROM found WHERE copies > 1) AS copied,
    (SELECT count(*) FROM twice) AS rows_twice,
    (SELECT count(*) FROM frames fr WHERE NOT EXISTS (
        SELECT 1 FROM published p WHERE (p.machine_id, p.number) = (fr.machine_id, fr.number)
    )) AS unexpected
"""


async def check_telemetry(
    pool: asyncpg.Pool,
    machine_ids: list[str],
    since: datetime,
    published: dict[str, Any],
    readings: int,
) -> dict[str, Any]:
    """Count the run's durable telemetry and compare it with what the fleet published.

    Frames in the ledger (``telemetry_frames``) for the run's machines since ``since``, their
    rows, and per frame published (found by reading 0's number): ``missing`` (no frame has
    it), ``incomplete`` (stored without all ``readings`` readings), ``copied`` (under more
    than one (boot, seq)); ``rows_twice``: frames with a row key (machine, boot, seq, idx)
    twice; ``unexpected``: stored frames the fleet did not publish.
    """
    machines, numbers = expected_frames(
        machine_ids,
        [int(n) for n in published.get("sent", [])],
        [(int(m), int(n)) for m, n in published.get("unsent", [])],
    )
    row = await pool.fetchrow(_CHECK_TELEMETRY, machine_ids, since, machines, numbers, readings)
    assert row is not None  # noqa: S101  (an aggregate query returns one row)
    return {
        key: (float(value) if key == "window_s" else int(value)) if value is not None else None
        for key, value in row.items()
    }


def telemetry_result(
    counts: dict[str, Any],
    published: dict[str, Any],
    *,
    rate: float,
    readings: int,
    durable_in_time: bool,
) -> dict[str, Any]:
    """Return the result's ``telemetry``, from `check_telemetry`'s counts and the fleet's.

    ``mps`` and ``rows_s``: durable frames and rows over ``window_s``, the start to the last
    durable frame; 0.0 without telemetry. ``lost``: frames published and not stored whole;
    ``duplicated``: frames stored under two (boot, seq), or with a row twice.
    """
    msgs = int(counts.get("msgs") or 0)
    rows = int(counts.get("readings") or 0) + int(counts.get("events") or 0)
    window = float(counts.get("window_s") or 0.0)
    return {
        "msgs": msgs,
        "rows": rows,
        "mps": round(msgs / window, 1) if msgs and window > 0 else 0.0,
        "rows_s": round(rows / window, 1) if rows and window > 0 else 0.0,
        "window_s": round(window, 3),
        "rate": rate,
        "readings_per_frame": readings,
        "events": int(counts.get("events") or 0),
        "published": int(published.get("published", 0)),
        "unsent": len(published.get("unsent", [])),
        "fleet_publish_mps": published.get("publish_mps"),
        "lost": int(counts.get("missing") or 0) + int(counts.get("incomplete") or 0),
        "duplicated": int(counts.get("copied") or 0) + int(counts.get("rows_twice") or 0),
        "unexpected": int(counts.get("unexpected") or 0),
        "durable_in_time": durable_in_time,
    }


async def telemetry_limits(
    services: Services, secret: bytes, *, machines: int, readings: int, published: int
) -> dict[str, Any]:
    """Measure ``mqtt_raw_ingest_mps`` and ``pg_copy_rows_s`` for frames like the fleet's.

    The telemetry profile's limits (`bench_telemetry.measure_limits`), for ``published``
    frames of ``readings`` readings and no event over ``machines`` machines (at least
    `LIMIT_MIN_MESSAGES`, at most the broker's queue).
    """
    plan = bench_telemetry.Plan(
        id_prefix=f"lim{secrets.token_hex(3)}",
        machines=machines,
        messages=min(max(published, LIMIT_MIN_MESSAGES), bench_telemetry.BROKER_QUEUE),
        readings=readings,
        event_every=2**62,  # in effect never: the fleet's frames carry no events
        seed=1,
        t0_ms=int(time.time() * 1000),
    )
    return await bench_telemetry.measure_limits(
        services.broker_url, services.dsn, plan, secret=secret
    )


# --- the result --------------------------------------------------------------------------------


def _per_s(amount: float | None, seconds: float | None) -> float | None:
    if amount is None or not seconds or seconds <= 0:
        return None
    return round(amount / seconds, 3)


def _ratio(value: float | None, limit: float | None) -> float | None:
    if value is None or not limit:
        return None
    return round(value / limit, 3)


def ratios(
    throughput_vps: float | None,
    limits: dict[str, Any],
    telemetry: dict[str, Any] | None = None,
) -> dict[str, float | None]:
    """Return our rates over the limits measured.

    None where a limit is missing or zero, and for the telemetry ratios where the run had no
    telemetry (``mps`` or ``rows_s`` 0).
    """
    t = telemetry or {}
    return {
        "vps_over_http_rps": _ratio(throughput_vps, limits.get("http_rps")),
        "telemetry_mps_over_mqtt_raw_ingest_mps": _ratio(
            t.get("mps") or None, limits.get("mqtt_raw_ingest_mps")
        ),
        "telemetry_rows_s_over_pg_copy_rows_s": _ratio(
            t.get("rows_s") or None, limits.get("pg_copy_rows_s")
        ),
    }


def latency_stages(history: Iterable[tuple[str, str, float]]) -> dict[str, dict[str, float]]:
    """Split accepted-to-final by stage, from the transitions (vend, state, at in seconds).

    ``accepted_to_sent``: waiting in the gateway until the vend is published (a machine
    takes one vend at a time); ``sent_to_final``: the machine's round trip, dispensing
    included. Percentiles in ms over the vends that reached both ends of a stage.
    """
    final = {s.value for s in FINAL}
    firsts: dict[str, dict[str, float]] = {}
    for vend_id, state, at in history:
        seen = firsts.setdefault(vend_id, {})
        key = "final" if state in final else state
        if key not in seen:
            seen[key] = at
    stages: dict[str, list[float]] = {"accepted_to_sent": [], "sent_to_final": []}
    for seen in firsts.values():
        if "accepted" in seen and "sent" in seen:
            stages["accepted_to_sent"].append((seen["sent"] - seen["accepted"]) * 1000)
        if "sent" in seen and "final" in seen:
            stages["sent_to_final"].append((seen["final"] - seen["sent"]) * 1000)
    return {
        name: {
            "p50": round(percentile(values, 0.50), 1),
            "p99": round(percentile(values, 0.99), 1),
            "vends": len(values),
        }
        for name, values in stages.items()
    }


def _report(
    settings: BenchSettings,
    *,
    load: dict[str, Any],
    rows: list[asyncpg.Record],
    history: list[tuple[str, str, float]],
    turns: list[DispenseRecord],
    receiver: WebhookRecorder,
    settled: bool,
    elapsed: float,
    cpu: CpuUse,
    rss: list[float],
    limits: dict[str, Any],
    telemetry: dict[str, Any],
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
    cpu_s = sum(cpu.gateways_s)
    throughput = round(completed / window, 1) if window > 0 else 0.0
    cpu_us = round(cpu_s * 1e6 / completed, 1) if completed else None
    problems = verdict.problems[:20] + telemetry_problems(telemetry)
    result: dict[str, Any] = {
        "profile": settings.profile,
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
        "problems": problems,
        "webhook_bad_signatures": receiver.rejected,
        "throughput_vps": throughput,
        "latency_ms": {
            "p50": round(percentile(latencies, 0.50), 1),
            "p95": round(percentile(latencies, 0.95), 1),
            "p99": round(percentile(latencies, 0.99), 1),
            "mean": round(statistics.fmean(latencies), 1) if latencies else 0.0,
        },
        "latency_stages_ms": latency_stages(history),
        # Over every gateway: CPU summed, RSS summed (each in the *_each lists).
        "gateway_cpu_us_per_vend": cpu_us,
        "gateway_cpu_s": round(cpu_s, 3),
        "gateway_rss_mb": round(sum(rss), 1),
        "elapsed_s": round(elapsed, 2),
        "load": load,
        "settled_in_time": settled,
        "settings": {
            "rate": settings.rate,
            "concurrency": settings.concurrency,
            "dispense_ms": settings.dispense_ms,
            "jam_rate": settings.jam_rate,
            "no_drop_rate": settings.no_drop_rate,
            "reboot_rate": settings.reboot_rate,
            "deadline_s": settings.deadline_s,
            "slots": settings.slots,
            "gateways": settings.gateways,
            "limits": settings.limits,
            "telemetry_rate": settings.telemetry_rate,
            "telemetry_readings": settings.telemetry_readings,
            "broker": "external" if settings.broker else "embedded",
            "database": "external" if settings.dsn else "embedded",
        },
        "workdir": str(work),
        "gateways": settings.gateways,
        "gateway_cpu_s_each": [round(c, 3) for c in cpu.gateways_s],
        "gateway_rss_mb_each": [round(r, 1) for r in rss],
        "fleet_cpu_s": round(cpu.fleet_s, 3),
        "loadgen_cpu_s": round(cpu.loadgen_s, 3),
        "cpu_window_s": round(cpu.window_s, 3),
        "cpu_cores_busy": {
            "gateways": _per_s(cpu_s, cpu.window_s),
            "gateway_each": [_per_s(c, cpu.window_s) for c in cpu.gateways_s],
            "fleet": _per_s(cpu.fleet_s, cpu.window_s),
            "loadgen": _per_s(cpu.loadgen_s, load.get("elapsed_s")),
            "host": _per_s(cpu.host_busy_s, cpu.window_s),
            # The host's busy time less the processes above: the broker, PostgreSQL, this
            # orchestrator and anything else running on the host.
            "other": _per_s(
                max(0.0, cpu.host_busy_s - cpu_s - cpu.fleet_s - cpu.loadgen_s), cpu.window_s
            ),
            "host_cpus": cpu.host_cpus,
        },
        "telemetry": telemetry,
        "telemetry_lost": telemetry["lost"],
        "telemetry_duplicated": telemetry["duplicated"],
        "limits": limits,
        "ratios": ratios(throughput, limits, telemetry),
        "target_us_per_vend": TARGET_US_PER_VEND,
        "meets_target": cpu_us is not None and cpu_us <= TARGET_US_PER_VEND,
    }
    result["bottlenecks"] = bottlenecks(result)
    result["passed"] = passed(result)
    return result


def telemetry_problems(telemetry: dict[str, Any]) -> list[str]:
    """Say what went wrong with the run's telemetry, if anything."""
    out = []
    if telemetry.get("lost"):
        out.append(
            f"{telemetry['lost']} telemetry frames published by the fleet and not stored (whole)"
        )
    if telemetry.get("duplicated"):
        out.append(f"{telemetry['duplicated']} telemetry frames stored more than once")
    if telemetry.get("unexpected"):
        out.append(f"{telemetry['unexpected']} telemetry frames stored that were not published")
    if telemetry.get("durable_in_time") is False:
        out.append(
            f"only {telemetry.get('msgs')} of {telemetry.get('published')} telemetry frames "
            "published became durable"
        )
    return out


def bottlenecks(result: dict[str, Any]) -> list[str]:
    """Name the processes (or the host) that were CPU-bound over the run, by cores busy.

    ``gateway N``, ``fleet``, ``loadgen``: at least `SATURATED_CORES` of a core (each is
    one asyncio thread); ``host``: at least `HOST_SATURATED` of all its CPUs busy.
    """
    cores = result.get("cpu_cores_busy") or {}
    out = [
        f"gateway {i}"
        for i, busy in enumerate(cores.get("gateway_each") or [], start=1)
        if busy is not None and busy >= SATURATED_CORES
    ]
    out += [
        name
        for name in ("fleet", "loadgen")
        if cores.get(name) is not None and cores[name] >= SATURATED_CORES
    ]
    host, cpus = cores.get("host"), cores.get("host_cpus")
    if host is not None and cpus and host >= HOST_SATURATED * cpus:
        out.append("host")
    return out


def _num(value: Any, unit: str = "") -> str:  # noqa: ANN401  (any JSON value)
    if value is None:
        return "not measured"
    return f"{value} {unit}".rstrip()


def _cores(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2f}"


def _pace(settings: dict[str, Any]) -> str:
    if settings.get("rate"):
        return (
            f"open loop at {settings['rate']:g} vends/s "
            f"(at most {settings['concurrency']} requests in flight)"
        )
    return f"closed loop with {settings['concurrency']} requests in flight"


def cpu_findings(result: dict[str, Any]) -> list[str]:
    """Say, in sentences, which process (if any) bounded the run, from the cores busy."""
    cores = result.get("cpu_cores_busy") or {}
    found = set(result.get("bottlenecks") or bottlenecks(result))
    lines: list[str] = []
    for i, busy in enumerate(cores.get("gateway_each") or [], start=1):
        if f"gateway {i}" in found:
            lines.append(
                f"Gateway {i} was CPU-bound ({_cores(busy)} of a core over the window): the "
                "gateway set the pace."
            )
    for key, name in (("fleet", "The fleet"), ("loadgen", "The load generator")):
        busy = cores.get(key)
        if busy is None:
            lines.append(f"{name}'s CPU was not measured.")
        elif key in found:
            lines.append(
                f"{name} was CPU-bound ({_cores(busy)} of a core): it may have bounded the "
                "throughput; the gateway's CPU per vend is still its own."
            )
        else:
            lines.append(f"{name} was not the bottleneck ({_cores(busy)} of a core).")
    host, cpus, other = cores.get("host"), cores.get("host_cpus"), cores.get("other")
    rest = (
        f" ({_cores(other)} cores besides the processes above: the broker, PostgreSQL and "
        "anything else running)"
        if other is not None
        else ""
    )
    if "host" in found:
        lines.append(
            f"The host's {cpus} CPUs were saturated, {_cores(host)} cores busy on average"
            f"{rest}: the processes competed for them, so the rates are the host's; compare "
            "CPU per vend across runs rather than vends/s."
        )
    elif host is not None and cpus and host >= 0.7 * cpus:
        lines.append(
            f"The host was busy, {_cores(host)} of {cpus} cores on average{rest}: the "
            "processes competed for CPU at times."
        )
    elif host is not None:
        lines.append(f"The host had CPU to spare, {_cores(host)} of {cpus} cores busy{rest}.")
    if not found and host is not None and cpus and host >= 0.7 * cpus:
        lines.append(
            "No single process was CPU-bound on average over the window, but with the host "
            "this busy they slowed each other down."
        )
    elif not found and host is not None:
        lines.append(
            "No process was CPU-bound on average over the window: the pace was set by waiting "
            "(round trips through the broker and the database, dispense time, requests in "
            "flight, or a vend waiting for its machine)."
        )
    return lines


def latency_findings(result: dict[str, Any]) -> list[str]:
    """Say where the accepted-to-final latency went, when one stage dominates it."""
    stages = result.get("latency_stages_ms") or {}
    waited = (stages.get("accepted_to_sent") or {}).get("p50")
    trip = (stages.get("sent_to_final") or {}).get("p50")
    if waited is None or trip is None or waited < 1000 or waited < 5 * trip:
        return []
    lines = [
        (
            f"Most of the latency was spent before the vend was sent (p50 {waited} ms, against "
            f"{trip} ms for the machine's round trip): vends were accepted faster than they "
            "were sent, and a machine takes one vend at a time, so they queued in the gateway."
        )
    ]
    n = result.get("gateways", 1)
    if n > 1:
        lines.append(
            f"With {n} gateways the wait is longer when the previous vend's result went to "
            "another gateway: the one holding the queue must learn that the vend is final "
            "before it sends the next; compare with a single gateway's wait."
        )
    return lines


def _limit_lines(result: dict[str, Any]) -> list[str]:
    s, limits, ratio = result["settings"], result.get("limits") or {}, result.get("ratios") or {}
    http = limits.get("http") or {}
    raw, copy = limits.get("mqtt_raw") or {}, limits.get("pg_copy") or {}
    measured = ("http_rps", "mqtt_raw_ingest_mps", "pg_copy_rows_s")
    if all(limits.get(key) is None for key in measured) and not (http or raw or copy):
        return ["Not measured (`--no-limits`)."]
    lines = [
        "| limit | value | our rate over it |",
        "|---|---|---|",
        (
            "| bare aiohttp handler (reads the JSON body, answers 202), the same load "
            f"generator: {http.get('requests')} requests, "
            f"{_pace({'concurrency': http.get('concurrency', s.get('concurrency'))})} "
            f"| {_num(limits.get('http_rps'), 'requests/s')} "
            f"| {_num(ratio.get('vps_over_http_rps'))} |"
        ),
    ]
    if "mqtt_raw_ingest_mps" in limits or "pg_copy_rows_s" in limits:
        lines += _telemetry_limit_rows(result)
    lines += [
        "",
        (
            f"The bare server used {_num(http.get('server_cpu_us_per_request'), 'µs')} of CPU "
            f"per request ({_num(http.get('server_cpu_s'), 's')}); the load generator "
            f"{_num(http.get('loadgen_cpu_s'), 's')} ({_cores(http.get('loadgen_cores'))} of a "
            f"core) over {_num(http.get('elapsed_s'), 's')}, p99 "
            f"{_num(http.get('post_p99_ms'), 'ms')}."
        ),
    ]
    loadgen = http.get("loadgen_cores")
    if loadgen is not None and loadgen >= SATURATED_CORES:
        lines.append(
            "The load generator was CPU-bound here: the limit is what this load generator "
            "can send, and the bare server could answer more."
        )
    if s.get("rate"):
        lines.append(
            f"The run was paced at {s['rate']:g} vends/s; the HTTP limit is measured in closed "
            "loop (as fast as the bare handler answers), so its ratio is the share of it that "
            "pace took."
        )
    telemetry_rate = (result.get("telemetry") or {}).get("rate")
    if telemetry_rate and limits.get("mqtt_raw_ingest_mps") is not None:
        lines.append(
            f"The fleet's telemetry was paced at {telemetry_rate:g} frames/s (open loop), so "
            "its ratios say what share of the MQTT and COPY limits that load took, not how "
            "fast the gateway could store telemetry (`--profile telemetry` measures that)."
        )
    return lines


def _telemetry_limit_rows(result: dict[str, Any]) -> list[str]:
    limits, ratio = result.get("limits") or {}, result.get("ratios") or {}
    raw, copy = limits.get("mqtt_raw") or {}, limits.get("pg_copy") or {}
    runs = {mode: (raw.get(mode) or {}).get("mps") for mode in ("live", "drain", "drain_codec")}
    frames = (raw.get("drain") or raw.get("live") or {}).get("received")
    sent = bool((result.get("telemetry") or {}).get("msgs"))

    def over(key: str) -> str:
        return _num(ratio.get(key)) if sent else "none: no telemetry in this run"

    return [
        (
            f"| MQTT raw ingest: one bare client receiving {_num(frames)} `Telemetry` frames "
            "like the fleet's, the fastest of gmqtt through a shared subscription while they "
            f"are published ({_num(runs['live'], 'msg/s')}), gmqtt taking them queued "
            f"({_num(runs['drain'], 'msg/s')}) and protocols.mqtt5 taking them queued "
            f"({_num(runs['drain_codec'], 'msg/s')}) "
            f"| {_num(limits.get('mqtt_raw_ingest_mps'), 'msg/s')} "
            f"| {over('telemetry_mps_over_mqtt_raw_ingest_mps')} |"
        ),
        (
            f"| PostgreSQL `COPY` of their rows ({_num(copy.get('rows'))} rows into the "
            f"telemetry tables, {_num(copy.get('into'))}, {_num(copy.get('batch_rows'))} rows "
            f"per transaction) | {_num(limits.get('pg_copy_rows_s'), 'rows/s')} "
            f"| {over('telemetry_rows_s_over_pg_copy_rows_s')} |"
        ),
    ]


def _telemetry_lines(result: dict[str, Any]) -> dict[str, list[str]]:
    """Return the report's telemetry lines, by section (``ran``, ``results``, ``check``)."""
    t = result.get("telemetry")
    if t is None:
        return {"ran": [], "results": [], "check": []}
    unsent = (
        f", {t['unsent']} not sent (machine offline or its window full)" if t.get("unsent") else ""
    )
    if t.get("rate"):
        ran = [
            (
                f"- The fleet also published `Telemetry` frames (QoS 1, "
                f"{t.get('readings_per_frame')} readings each), open loop at {t['rate']:g} "
                "frames/s in total, round robin over its machines, from the go until every "
                f"vend was settled: {t.get('published')} published{unsent}, at "
                f"{_num(t.get('fleet_publish_mps'), 'frames/s')}. Reading 0 of each frame "
                "carries its number for its machine, so that each one published is found "
                "in the database. The gateway's CPU per vend includes the telemetry."
            )
        ]
    else:
        ran = ["- No telemetry was published (`--telemetry-rate 0`)."]
    results = [
        f"| telemetry durable: messages / rows | {t['msgs']} / {t['rows']} |",
        (
            f"| telemetry rate, start to last durable frame ({t.get('window_s')} s) "
            f"| {t['mps']} msg/s, {t.get('rows_s')} rows/s |"
        ),
    ]
    check_line = (
        f"Telemetry: published {t.get('published', 0)}, durable {t['msgs']} frames "
        f"({t['rows']} rows); lost {t['lost']}, duplicated {t['duplicated']}, unexpected "
        f"{t.get('unexpected', 0)}. Each frame the fleet published must be stored once, "
        "under one (machine, boot, seq), with all its rows."
    )
    if t.get("durable_in_time") is False:
        check_line += " Not every frame published became durable before the wait gave up."
    return {"ran": ran, "results": results, "check": ["", check_line]}


def _cpu_table(result: dict[str, Any]) -> list[str]:
    cores, load = result.get("cpu_cores_busy") or {}, result["load"]
    cpu_each = result.get("gateway_cpu_s_each") or [result["gateway_cpu_s"]]
    busy_each = cores.get("gateway_each") or [cores.get("gateways")]
    lines = ["| process | CPU s | cores busy on average |", "|---|---|---|"]
    lines += [
        f"| gateway {i} | {c} | {_cores(busy)} |"
        for i, (c, busy) in enumerate(zip(cpu_each, busy_each, strict=False), start=1)
    ]
    lines += [
        (
            f"| fleet ({result['machines']} machines) | {_num(result.get('fleet_cpu_s'))} "
            f"| {_cores(cores.get('fleet'))} |"
        ),
        (
            f"| load generator (over its own {_num(load.get('elapsed_s'), 's')}) "
            f"| {_num(result.get('loadgen_cpu_s'))} | {_cores(cores.get('loadgen'))} |"
        ),
        f"| the rest of the host (broker, PostgreSQL, others) | | {_cores(cores.get('other'))} |",
        (
            f"| host, every process | | {_cores(cores.get('host'))} of "
            f"{cores.get('host_cpus', '?')} |"
        ),
    ]
    return lines


def markdown(result: dict[str, Any]) -> str:
    """Return a short Markdown report of a result."""
    s, lat, load = result["settings"], result["latency_ms"], result["load"]
    stages = result.get("latency_stages_ms") or {}
    cores = result.get("cpu_cores_busy") or {}
    n = result.get("gateways", 1)
    verdict = "PASS" if passed(result) else "FAIL"
    target = result.get("target_us_per_vend", TARGET_US_PER_VEND)
    cpu_us = result["gateway_cpu_us_per_vend"]
    met = "met" if cpu_us is not None and cpu_us <= target else "not met"
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(load.get("statuses", {}).items()))
    rss_each = result.get("gateway_rss_mb_each") or [result["gateway_rss_mb"]]
    rss = (
        f"{result['gateway_rss_mb']} MB"
        if n == 1
        else " + ".join(f"{r}" for r in rss_each) + f" = {result['gateway_rss_mb']} MB"
    )
    spread = (
        ""
        if n == 1
        else " round robin over the gateways' URLs (shifted by one every pass over the "
        "machines, so that each machine's vends reach every gateway),"
    )
    services = (
        f"Mosquitto ({s.get('broker', 'embedded')}) and PostgreSQL "
        f"({s.get('database', 'embedded')})"
    )
    telemetry = _telemetry_lines(result)
    title = (
        "vendgate mixed benchmark (vends and telemetry)"
        if result.get("profile") == "mixed"
        else "vendgate vend benchmark"
    )
    lines = [
        f"# {title}",
        "",
        (
            f"Exactly-once: **{verdict}**. Throughput {result['throughput_vps']} vends/s; "
            f"gateway CPU {_num(cpu_us, 'µs/vend')} against a target of {target} µs/vend: "
            f"**{met}**."
        ),
        "",
        "## What ran",
        "",
        (
            f"- {services}, {n} gateway process{'es' if n != 1 else ''} "
            "(`vendgate run`) sharing them, a simulated fleet and a payment load generator, "
            f"each its own process, on a host with {cores.get('host_cpus', '?')} CPUs (work "
            f"directory `{result['workdir']}`)."
        ),
        (
            f"- {result['machines']} machines ({s.get('slots', '?')} slots, dispense "
            f"{s['dispense_ms']} ms); {result['vends_requested']} vends posted to "
            f"`/v1/vends`,{spread} {_pace(s)}; vend deadline {s['deadline_s']} s."
        ),
        (
            "- Latency: `settled_at - created_at` of each vend, both stamped by PostgreSQL "
            "(accepted to final). CPU: /proc, from the go given to the load generator to the "
            f"last settled vend ({_num(result.get('cpu_window_s'), 's')})."
        ),
        *telemetry["ran"],
        "",
        "## Results",
        "",
        "| measure | value |",
        "|---|---|",
        (
            f"| vends accepted / requested | {result['vends_accepted']} / "
            f"{result['vends_requested']} |"
        ),
        f"| HTTP statuses | {statuses} |",
        f"| throughput, first accepted to last final | {result['throughput_vps']} vends/s |",
        (
            f"| load generator POST rate, p99 | {load.get('post_rps')} requests/s, "
            f"{load.get('post_p99_ms')} ms |"
        ),
        (
            f"| latency accepted to final, p50 / p95 / p99 (mean) | {lat['p50']} / {lat['p95']} "
            f"/ {lat['p99']} ms ({lat['mean']} ms) |"
        ),
    ]
    for key, label in (
        ("accepted_to_sent", "of which accepted to sent (waiting in the gateway)"),
        ("sent_to_final", "of which sent to final (the machine's round trip)"),
    ):
        if key in stages:
            lines.append(f"| {label}, p50 / p99 | {stages[key]['p50']} / {stages[key]['p99']} ms |")
    lines += [
        (
            f"| gateway CPU{' (sum)' if n != 1 else ''} | {result['gateway_cpu_s']} s, "
            f"{_num(cpu_us, 'µs/vend')} (target {target}: {met}) |"
        ),
        f"| gateway RSS{' (each = sum)' if n != 1 else ''} | {rss} |",
        f"| all settled in time | {'yes' if result['settled_in_time'] else 'no'} |",
        f"| elapsed, load start to last settled | {result['elapsed_s']} s |",
        *telemetry["results"],
    ]
    if findings := latency_findings(result):
        lines += ["", *findings]
    lines += [
        "",
        "## Exactly-once",
        "",
        (
            f"**{verdict}**: dispensed {result['vends_dispensed']}, not dispensed "
            f"{result['vends_not_dispensed']}, unknown {result['vends_unknown']}; duplicates "
            f"{result['duplicates']}, lost {result['lost']}, conflicts {result['conflicts']}; "
            f"webhooks missing {result['webhooks_missing']}, duplicate webhook events "
            f"{result['webhook_duplicate_events']}, bad signatures "
            f"{result['webhook_bad_signatures']}. The fleet's dispense log, the database and "
            "the webhooks received were compared."
        ),
        *telemetry["check"],
    ]
    if result["problems"]:
        lines += ["", *(f"- {p}" for p in result["problems"])]
    lines += ["", "## Limits (same run, gateways stopped)", "", *_limit_lines(result)]
    lines += ["", "## Where the CPU went", "", *_cpu_table(result), "", *cpu_findings(result)]
    return "\n".join(lines) + "\n"


def summary(result: dict[str, Any]) -> str:
    """Return the human summary of a result."""
    lat = result["latency_ms"]
    cores = result.get("cpu_cores_busy") or {}
    limits, ratio = result.get("limits") or {}, result.get("ratios") or {}
    n = result.get("gateways", 1)
    text = (
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
    if "gateways" in result:
        text += (
            f"\ngateways {n} (CPU {result['gateway_cpu_s']} s"
            + (f", each {result['gateway_cpu_s_each']} s" if n != 1 else "")
            + (f"; RSS each {result['gateway_rss_mb_each']} MB" if n != 1 else "")
            + f"), fleet CPU {result['fleet_cpu_s']} s ({_cores(cores.get('fleet'))} core), "
            f"load generator CPU {result['loadgen_cpu_s']} s ({_cores(cores.get('loadgen'))} "
            f"core); host {_cores(cores.get('host'))} of {cores.get('host_cpus')} CPUs busy"
            f"\nlimit: bare aiohttp {_num(limits.get('http_rps'), 'requests/s')}; "
            f"vends/s over it {_num(ratio.get('vps_over_http_rps'))}"
        )
        if result.get("bottlenecks"):
            text += f"; CPU-bound: {', '.join(result['bottlenecks'])}"
    if (t := result.get("telemetry")) is not None:
        text += (
            f"\ntelemetry: {t['msgs']} msgs, {t['rows']} rows durable, {t['mps']} msg/s "
            f"(published {t.get('published', 0)} at {t.get('rate', 0):g}/s); lost {t['lost']}, "
            f"duplicated {t['duplicated']}"
        )
    if "mqtt_raw_ingest_mps" in limits or "pg_copy_rows_s" in limits:
        over = (
            f"telemetry over them {_num(ratio.get('telemetry_mps_over_mqtt_raw_ingest_mps'))} "
            f"and {_num(ratio.get('telemetry_rows_s_over_pg_copy_rows_s'))}"
            if (result.get("telemetry") or {}).get("msgs")
            else "no telemetry in this run to compare"
        )
        text += (
            f"\nlimits: MQTT raw ingest {_num(limits.get('mqtt_raw_ingest_mps'), 'msg/s')}, "
            f"PostgreSQL COPY {_num(limits.get('pg_copy_rows_s'), 'rows/s')}; {over}"
        )
    return text


def passed(result: dict[str, Any]) -> bool:
    """Return whether the exactly-once invariants held, for vends and for telemetry.

    A vend's outcome counts only once the backend was told: a missing webhook fails too.
    """
    telemetry = result.get("telemetry") or {}
    return bool(
        result["duplicates"] == 0
        and result["lost"] == 0
        and result["conflicts"] == 0
        and result["webhooks_missing"] == 0
        and not result.get("telemetry_lost")
        and not result.get("telemetry_duplicated")
        and not telemetry.get("unexpected")
    )


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
        jam_rate=args.get("jam_rate", 0.0),
        no_drop_rate=args.get("no_drop_rate", 0.0),
        reboot_rate=args.get("reboot_rate", 0.0),
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
        rate = float(args.get("telemetry_rate") or 0.0)
        if rate > 0:
            publisher = _TelemetryPublisher(
                fleet, rate, int(args.get("telemetry_readings", 4)), settings.slots
            )
            await _telemetry_commands(publisher, stop)
        await stop.wait()


def telemetry_readings(number: int, count: int, slots: int) -> tuple[Reading, ...]:
    """Return the ``count`` readings of a machine's frame ``number`` (1, 2, ...).

    Reading 0 is a temperature whose value is ``number``: the benchmark's own numbering, by
    which the check finds each frame in the database. Then signal strength and stock levels,
    like the telemetry profile's frames; no event.
    """
    readings = [
        Reading(0, ReadingKind.TEMPERATURE, None, number),
        Reading(200, ReadingKind.RSSI, None, -60 - number % 20),
    ]
    readings.extend(
        Reading(400 + 100 * k, ReadingKind.STOCK, (number + k) % slots + 1, 12 - (number + k) % 12)
        for k in range(max(0, count - 2))
    )
    return tuple(readings[:count])


class _TelemetryPublisher:
    """In the fleet: ``Telemetry`` frames at ``rate`` per second in all, round robin (open loop).

    Every `TELEMETRY_TICK_S` it publishes the frames due since the start, so a late wake-up
    catches up instead of lowering the rate. A frame the fleet could not put on the wire
    (its machine offline, or its window of unacknowledged publishes full) is counted as
    unsent, by (machine index, number).
    """

    def __init__(self, fleet: Fleet, rate: float, readings: int, slots: int) -> None:
        self.fleet = fleet
        self.rate = rate
        self.readings = readings
        self.slots = slots
        self.sent = [0] * len(fleet.machine_ids)  # frames built per machine (the last number)
        self.unsent: list[tuple[int, int]] = []
        self.published = 0
        self.span_s = 0.0

    def _dropped(self) -> int:
        stats = self.fleet.stats
        return (
            stats["publish_dropped_offline"]
            + stats["publish_dropped_inflight"]
            + stats["fault_dropped_up"]
        )

    async def run(self, halt: asyncio.Event) -> None:
        """Publish until ``halt`` is set."""
        fleet, machine_ids = self.fleet, self.fleet.machine_ids
        n = len(machine_ids)
        start = time.perf_counter()
        k = 0
        try:
            while not halt.is_set():
                due = int((time.perf_counter() - start) * self.rate) + 1
                while k < due:
                    m = k % n
                    self.sent[m] += 1
                    number = self.sent[m]
                    dropped = self._dropped()
                    readings = telemetry_readings(number, self.readings, self.slots)
                    if fleet.report(machine_ids[m], readings) and self._dropped() == dropped:
                        self.published += 1
                    else:
                        self.unsent.append((m, number))
                    k += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(halt.wait(), timeout=TELEMETRY_TICK_S)
        finally:
            self.span_s = time.perf_counter() - start

    def result(self) -> dict[str, Any]:
        """Return what was published: counts, each machine's last number, the unsent."""
        return {
            "published": self.published,
            "sent": self.sent,
            "unsent": self.unsent,
            "span_s": round(self.span_s, 3),
            "publish_mps": round(self.published / self.span_s, 1) if self.span_s > 0 else None,
        }


async def _telemetry_commands(publisher: _TelemetryPublisher, stop: asyncio.Event) -> None:
    """Start the publisher on ``telemetry-start`` from stdin; stop it on ``telemetry-stop``.

    Then print what it published on a `TELEMETRY_MARK` line. The end of stdin, or ``stop``,
    stops it too.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stopped = asyncio.create_task(stop.wait(), name="bench.fleet.stop")

    async def command() -> str:
        line = asyncio.create_task(reader.readline(), name="bench.fleet.command")
        await asyncio.wait([line, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not line.done():
            line.cancel()
            return ""
        return line.result().decode().strip()

    try:
        if await command() != "telemetry-start":
            return
        halt = asyncio.Event()
        task = asyncio.create_task(publisher.run(halt), name="bench.fleet.telemetry")
        await command()  # telemetry-stop, or the end
        halt.set()
        await task
        sys.stdout.write(TELEMETRY_MARK + json.dumps(publisher.result()) + "\n")
        sys.stdout.flush()
    finally:
        stopped.cancel()


def gateway_of(request: int, gateways: int, machines: int) -> int:
    """Return which gateway request ``request`` goes to: round robin over ``gateways``.

    Request ``i`` is for machine ``i % machines``; plain round robin would then send all of
    a machine's vends to one gateway whenever the counts share a factor (50 machines, 2
    gateways). So the rotation shifts by one after every ``lcm(machines, gateways)``
    requests: each gateway still gets an equal share, and each machine meets every gateway.
    """
    return (request + request // math.lcm(max(1, machines), gateways)) % gateways


async def _load_main(args: dict[str, Any]) -> None:
    """Post ``vends`` vends, round robin over ``urls``; print the result line.

    With ``go_on_stdin``: say ready once the HTTP session is made, start on a line from
    stdin, and after the result wait for stdin to close (the orchestrator reads this
    process's CPU time from /proc first).
    """
    machines: list[str] = args["machines"]
    urls: list[str] = args.get("urls") or [args["url"]]
    handshake = bool(args.get("go_on_stdin"))
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
            url = urls[gateway_of(i, len(urls), len(machines))]
            async with sem:
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{url}/v1/vends", json=body) as response:
                        await response.read()
                        statuses[response.status] += 1
                except aiohttp.ClientError:
                    statuses[0] += 1
                latencies.append((time.perf_counter() - t0) * 1000)

        if handshake:
            sys.stdout.write(LOAD_READY + "\n")
            sys.stdout.flush()
            await asyncio.to_thread(sys.stdin.readline)
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
        "gateways": len(urls),
    }
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    if handshake:
        await asyncio.to_thread(sys.stdin.read)  # until the orchestrator closes it


async def _bare_http_main(args: dict[str, Any]) -> None:
    """Serve ``POST /v1/vends`` with a trivial handler: read the JSON body, answer 202."""
    from aiohttp import web  # noqa: PLC0415  (only this child serves)

    from gateway.http_api import bound_port  # noqa: PLC0415

    async def vend(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(
            {"vend_id": body.get("vend_id"), "machine_id": body.get("machine_id"), "state": "new"},
            status=202,
        )

    app = web.Application()
    app.router.add_post("/v1/vends", vend)
    runner = web.AppRunner(app, access_log=None)  # as the gateway runs its own
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(args.get("port", 0)))
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(HTTP_READY + json.dumps({"url": f"http://127.0.0.1:{bound_port(site)}"}))
    sys.stdout.write("\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _child(argv: list[str]) -> int:
    role, raw = argv[0], json.loads(argv[1])
    configure_logging("warning", "json", sys.stderr)  # stdout carries the results
    if role == "fleet":
        asyncio.run(_fleet_main(raw))
    elif role == "load":
        asyncio.run(_load_main(raw))
    elif role == "bare-http":
        asyncio.run(_bare_http_main(raw))
    else:
        raise SystemExit(f"unknown role {role!r}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: bench child processes")
    parser.add_argument("role")
    parser.add_argument("args")
    ns = parser.parse_args()
    raise SystemExit(_child([ns.role, ns.args]))
