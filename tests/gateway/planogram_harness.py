"""A gateway slice for planogram tests, with a fake MQTT link that records every downlink.

Real PostgreSQL, the HTTP API with the planogram extension, and a running ConfigSync.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg
import prometheus_client
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import PlanogramConfig, VendConfig
from gateway.configsync import ConfigSync, PlanogramMetrics
from gateway.errors import BrokerUnavailableError
from gateway.http_api import create_app
from gateway.http_planogram import PlanogramApi
from gateway.store.db import Conn, migrate
from gateway.store.vends import VendRow
from gateway.store.writer import GroupCommitter
from protocols.frames import (
    AckCode,
    Config,
    ConfigAck,
    ConfigStatus,
    Frame,
    Hello,
    StatusReply,
    VendState,
)

MACHINE = "VM-1"
RESEND_S = 30.0
CONCURRENCY = 8
TIMEOUT_S = 10.0


@dataclass
class Clock:
    """A settable wall clock, in epoch seconds."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        """Return the current time."""
        return self.now


@dataclass
class FakeLink:
    """Records the frames ConfigSync publishes; can be offline or broken per test."""

    online: set[str] = field(default_factory=set)
    sent: list[tuple[str, Frame]] = field(default_factory=list)
    broken: bool = False
    delay_s: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0

    async def send(self, machine_id: str, frame: Frame) -> None:
        """Publish ``frame`` (record it), or fail as a broker that is down would."""
        if self.broken:
            raise BrokerUnavailableError("test broker is down")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        self.sent.append((machine_id, frame))

    def is_online(self, machine_id: str) -> bool:
        """Whether the machine is connected."""
        return machine_id in self.online

    def configs(self, machine_id: str = MACHINE) -> list[Config]:
        """Return the Config frames sent to one machine, in order."""
        return [f for m, f in self.sent if m == machine_id and isinstance(f, Config)]


class CountingPool:
    """Wraps a pool to count how often ConfigSync borrows a connection (its reads)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.acquired = 0

    def acquire(self) -> Any:
        """Borrow a connection, counting it."""
        self.acquired += 1
        return self.pool.acquire()


class _Sink:
    def vend_accepted(self, row: VendRow) -> None:
        pass


class _Ready:
    def ready(self) -> dict[str, bool]:
        return {"database": True}


@dataclass
class Env:
    """Everything a planogram test touches."""

    pool: asyncpg.Pool
    writer: GroupCommitter
    sync: ConfigSync
    link: FakeLink
    clock: Clock
    registry: prometheus_client.CollectorRegistry
    reads: CountingPool
    client: TestClient[web.Request, web.Application]
    app: web.Application
    _frames: int = 0

    async def request(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        """Send a request; return (status, decoded JSON, response headers)."""
        async with self.client.request(method, path, json=body, headers=headers) as response:
            return response.status, await response.json(), response.headers

    async def put(
        self, body: object, machine_id: str = MACHINE, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """PUT a planogram; return (status, JSON)."""
        status, data, _ = await self.request(
            "PUT", f"/v1/machines/{machine_id}/planogram", body, headers
        )
        return status, data

    async def get(self, path: str) -> tuple[int, Any]:
        """GET ``path``; return (status, JSON)."""
        status, data, _ = await self.request("GET", path)
        return status, data

    async def post(self, path: str, body: object) -> tuple[int, Any]:
        """POST ``body``; return (status, JSON)."""
        status, data, _ = await self.request("POST", path, body)
        return status, data

    def seq(self) -> int:
        """Return a fresh uplink sequence number."""
        self._frames += 1
        return self._frames

    def hello(self, version: int, boot: int = 1) -> Hello:
        """Return a Hello reporting ``version``."""
        return Hello(
            boot=boot, seq=self.seq(), firmware="test/1", config_version=version, clock_ms=0
        )

    def status_reply(self, version: int) -> StatusReply:
        """Return a machine-status StatusReply reporting ``version``."""
        return StatusReply(
            boot=1,
            seq=self.seq(),
            vend_id=None,
            vend_state=VendState.NOT_SEEN,
            code=AckCode.ACCEPTED,
            dispense=None,
            active_vend=None,
            config_version=version,
            clock_ms=0,
        )

    def ack(self, version: int, status: ConfigStatus, current: int) -> ConfigAck:
        """Return a ConfigAck."""
        return ConfigAck(
            boot=1, seq=self.seq(), version=version, status=status, current_version=current
        )

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Read a metric sample (0 when absent)."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    async def until(
        self, check: Callable[[], bool], what: str = "condition", timeout_s: float = TIMEOUT_S
    ) -> None:
        """Wait until ``check()`` holds (the push workers run in the background)."""
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)

    async def settle(self) -> None:
        """Let queued pushes finish."""
        await self.until(lambda: self.sync.busy == 0, "pushes to finish")

    async def fetchval(self, sql: str, *args: object) -> Any:
        """Run one query on a fresh connection."""
        async with self.pool.acquire() as conn:
            return await conn.fetchval(sql, *args)


@contextlib.asynccontextmanager
async def serve(
    dsn: str,
    *,
    machines: tuple[str, ...] = (MACHINE,),
    online: bool = True,
    slot_failure_limit: int = 3,
    queue_size: int = 10_000,
    pool_max: int = 4,
    prepare: Callable[[Conn], Awaitable[None]] | None = None,
) -> AsyncIterator[Env]:
    """Run the slice on a fresh database with ``machines`` registered.

    ``prepare`` runs after the migrations and before ConfigSync loads its state.
    """
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_max)
    async with pool.acquire() as conn:
        await migrate(conn)
        await conn.execute(
            "INSERT INTO machines (machine_id) SELECT unnest($1::text[])", list(machines)
        )
        if prepare is not None:
            await prepare(conn)
    writer = GroupCommitter(pool)
    link = FakeLink(online=set(machines) if online else set())
    clock = Clock()
    registry = prometheus_client.CollectorRegistry()
    reads = CountingPool(pool)
    sync = ConfigSync(
        send=link.send,
        is_online=link.is_online,
        writer=writer,
        pool=cast("asyncpg.Pool", reads),
        config=PlanogramConfig(resend_s=RESEND_S, slot_failure_limit=slot_failure_limit),
        metrics=PlanogramMetrics(registry),
        clock=clock,
        concurrency=CONCURRENCY,
        queue_size=queue_size,
        tick_s=3600,  # tests call resend_due() themselves, with the fake clock
    )
    extension = PlanogramApi(pool, writer, sync, slot_failure_limit)
    app = create_app(
        pool=pool,
        writer=writer,
        sink=_Sink(),
        readiness=_Ready(),
        vend=VendConfig(),
        registry=registry,
        extensions=[extension],
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    tasks = [
        asyncio.create_task(writer.run(), name="test.writer"),
        asyncio.create_task(sync.run(), name="test.configsync"),
    ]
    env = Env(pool, writer, sync, link, clock, registry, reads, client, app)
    try:
        await env.until(lambda: sync.loaded, "the sync state to load")
        yield env
    finally:
        await client.close()
        # In the gateway's shutdown order: stop the work, then the writer, then the pool.
        for task in reversed(tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await pool.close()


def slot_body(slot: int, **changes: object) -> dict[str, object]:
    """Return one slot of a planogram body."""
    body: dict[str, object] = {
        "slot": slot,
        "product_code": f"P-{slot:03d}",
        "name": f"Product {slot}",
        "price": 300 + slot,
        "capacity": 8,
        "drop_sensor": True,
    }
    body.update(changes)
    return body


def planogram_body(*slots: int, **changes: object) -> dict[str, object]:
    """Return a planogram body listing ``slots`` (1, 2, 3 by default)."""
    body: dict[str, object] = {
        "currency": "CNY",
        "slots": [slot_body(n) for n in slots or (1, 2, 3)],
    }
    body.update(changes)
    return body
