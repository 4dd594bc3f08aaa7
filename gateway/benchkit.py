"""Shared parts of the ``vendgate bench`` profiles: services, the gateway process, probes.

Every profile runs the gateway as its own process (``vendgate run``) against a private
Mosquitto and PostgreSQL (embedded ones unless a broker URL or DSN is given), so that the
gateway's CPU time can be read from /proc for that process alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

from gateway.embedded import EmbeddedPostgres, Mosquitto, free_port
from gateway.store import db

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU time of process ``pid`` (man 5 proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def host_cpu_seconds() -> float:
    """Return the CPU time the whole host has been busy, over all its CPUs (man 5 proc).

    User, nice, system, irq, softirq and steal time of the ``cpu`` line of /proc/stat; idle
    and iowait are left out. Divided by a wall-clock span, it gives the cores busy on average.
    """
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu "):
            ticks = [int(v) for v in line.split()[1:]]
            user, nice, system, _idle, _iowait, irq, softirq, steal = (ticks + [0] * 8)[:8]
            return (user + nice + system + irq + softirq + steal) / CLK_TCK
    return 0.0


def rss_mb(pid: int) -> float:
    """Return the resident set size of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    """Return the ``q`` quantile (nearest rank) of ``values``, 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def wait_online(pool: asyncpg.Pool, machines: int, timeout_s: float) -> int:
    """Poll until at least ``machines`` machines are online, or ``timeout_s``; return the count."""
    deadline = time.monotonic() + timeout_s
    while True:
        online = int(await pool.fetchval("SELECT count(*) FROM machines WHERE online"))
        if online >= machines or time.monotonic() > deadline:
            return online
        await asyncio.sleep(0.25)


async def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    """Wait until the gateway at ``url`` answers ``/readyz`` with 200."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway at {url} not ready after {timeout_s} s")
            await asyncio.sleep(0.2)


async def stop_process(process: asyncio.subprocess.Process, timeout_s: float = 15.0) -> None:
    """Stop a child with SIGINT, then SIGKILL if it does not exit in time."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(process.wait(), timeout=timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()


def prepare_workdir(work: Path) -> None:
    """Create ``work``, open to pgserver's own user (it drops root) as well."""
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)


@dataclass
class Services:
    """A broker and a database for one benchmark run."""

    work: Path
    broker: Mosquitto | None  # None: an external broker
    broker_url: str
    dsn: str


async def start_services(
    stack: contextlib.AsyncExitStack, work: Path, *, broker_url: str | None, dsn: str | None
) -> Services:
    """Start the embedded broker and database that are not given; stopped by ``stack``."""
    prepare_workdir(work)
    broker: Mosquitto | None = None
    if broker_url is None:
        broker = Mosquitto(work / "mosquitto")
        await broker.start()
        stack.push_async_callback(broker.stop)
        broker_url = broker.url
    if dsn is None:
        pg = EmbeddedPostgres(work / "pgdata")
        dsn = await pg.start()
        stack.push_async_callback(pg.stop)
    return Services(work=work, broker=broker, broker_url=broker_url, dsn=dsn)


@dataclass
class GatewayProcess:
    """A running ``vendgate run``."""

    process: asyncio.subprocess.Process
    http_url: str
    log: Path

    @property
    def pid(self) -> int:
        """The gateway's process id."""
        return self.process.pid


async def start_gateway(
    stack: contextlib.AsyncExitStack,
    services: Services,
    secret: bytes,
    settings: list[str],
    *,
    name: str = "gateway",
    ready_timeout_s: float = 60.0,
    module: str = "gateway.cli",
    env: dict[str, str] | None = None,
) -> GatewayProcess:
    """Start ``vendgate run`` with ``--set`` ``settings``; wait until it is ready.

    ``module`` is what ``python -m`` runs, given the command line of ``gateway.cli`` (a
    wrapper that adds instrumentation, say); ``env`` replaces the child's environment.
    """
    http_port = free_port()
    log_path = services.work / f"{name}.log"
    log_file = log_path.open("wb")
    stack.callback(log_file.close)
    argv = [
        "--log-format",
        "json",
        "--log-level",
        "warning",
        "--set",
        f"mqtt.url={services.broker_url}",
        "--set",
        f"database.dsn={services.dsn}",
        "--set",
        f"security.master_secret={secret.hex()}",
        "--set",
        f"http.port={http_port}",
    ]
    for setting in settings:
        argv += ["--set", setting]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *argv,
        "run",
        stdout=log_file,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    stack.push_async_callback(stop_process, process)
    http_url = f"http://127.0.0.1:{http_port}"
    await wait_ready(http_url, ready_timeout_s)
    return GatewayProcess(process=process, http_url=http_url, log=log_path)


async def register_machines(dsn: str, machine_ids: list[str]) -> None:
    """Register machines straight in the database: 10,000 POSTs would only time the setup.

    Applies the gateway's migrations first (idempotent), so that this can run before the
    gateway starts: a gateway reads the registry at start-up, as it would a fleet it serves.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await db.migrate(conn)
        await conn.execute(
            "INSERT INTO machines (machine_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
            machine_ids,
        )
    finally:
        await conn.close()
