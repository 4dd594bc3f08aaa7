"""The running gateway: every component, started in order and stopped in reverse.

Start-up: embedded services (only those not configured) → database pool and migrations
→ group-commit writer → MQTT link (connect, subscribe) → dispatcher (recovers unfinished
vends) → webhook deliverer → HTTP API. Shutdown follows house style #9: stop intake
(the API answers 503), stop dispatching (vends stay in the database and are recovered by
the next start), let the writer drain, close MQTT, then the pool, then embedded services.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import socket
from collections.abc import Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.config import Config, mqtt_address
from gateway.configsync import ConfigSync, PlanogramMetrics
from gateway.dispatcher import Dispatcher
from gateway.embedded import EmbeddedPostgres, Mosquitto
from gateway.errors import ConfigError
from gateway.http_api import begin_shutdown, bound_port, create_app
from gateway.http_machines import MachineRoutes
from gateway.http_planogram import PlanogramApi
from gateway.keys import KeyRing
from gateway.lifecycle import Timing
from gateway.logs import get_logger
from gateway.metrics import VendMetrics
from gateway.mqtt import MqttLink, MqttSettings
from gateway.sessions import PresenceService, SessionMetrics
from gateway.store import db, slots
from gateway.store.db import Conn
from gateway.store.dispenses import DispenseRecord, record_dispenses
from gateway.store.partitions import PartitionKeeper
from gateway.store.vends import VendRow
from gateway.store.writer import GroupCommitter
from gateway.telemetry import TelemetryIngest, TelemetryMetrics
from gateway.uplink import MachineDirectory, Outcome, Uplink
from gateway.webhooks import WebhookDeliverer
from protocols.frames import (
    ConfigAck,
    Dispense,
    Heartbeat,
    Hello,
    Presence,
    StatusReply,
    Telemetry,
    UplinkFrame,
)
from protocols.topics import QOS, Channel, Topics

log = get_logger("gateway.app")

SECRET_FILE = "master_secret"  # noqa: S105  (a file name, not a secret)
CLIENT_ID_FILE = "mqtt_client_id"
ONE_OFF_SESSION_S = 60
#: Uplink frames that report the machine's configuration version (to the planogram sync).
_CONFIG_REPORTS = (Hello, StatusReply, ConfigAck)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the running gateway and its services can be reached."""

    http_url: str
    mqtt_host: str
    mqtt_port: int
    dsn: str
    master_secret: bytes


class Gateway:
    """The vendgate service. ``await Gateway(config).run(stop)`` until ``stop`` is set."""

    def __init__(self, config: Config, *, state_dir: Path | None = None) -> None:
        self.config = config
        self.state_dir = state_dir or config.database.data_dir.parent
        self.ready = asyncio.Event()
        self.endpoints: Endpoints | None = None
        self.registry = CollectorRegistry()
        self.metrics = VendMetrics(self.registry)
        self._link: MqttLink | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._dispatcher: Dispatcher | None = None

    # -- the HTTP layer's readiness and sink ------------------------------------------------------

    def ready_checks(self) -> dict[str, bool]:
        """Readiness: the database writer runs and MQTT is connected."""
        writer = self._writer_task
        return {
            "database": writer is not None and not writer.done(),
            "mqtt": self._link is not None and self._link.connected,
        }

    def vend_accepted(self, row: VendRow) -> None:
        """Pass a committed vend to the dispatcher."""
        if self._dispatcher is not None:
            self._dispatcher.vend_accepted(row)

    # -- running -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then shut down in order."""
        config = self.config
        async with AsyncExitStack() as stack:
            dsn = config.database.dsn or await self._embedded_postgres(stack)
            host, port = await self._broker(stack)
            pool = await db.create_pool(
                dsn, min_size=config.database.pool_min, max_size=config.database.pool_max
            )
            stack.push_async_callback(pool.close)
            async with pool.acquire() as conn:
                applied = await db.migrate(conn)
            log.info("database_ready", migrations_applied=applied)
            secret = self._master_secret()
            parts = await self._assemble(stack, pool, dsn, broker=(host, port), secret=secret)
            async with asyncio.TaskGroup() as tasks:
                await self._serve(parts, tasks, stop, host, port, dsn, secret)
            log.info("gateway_stopped")

    async def _assemble(
        self,
        stack: AsyncExitStack,
        pool: asyncpg.Pool,
        dsn: str,
        *,
        broker: tuple[str, int],
        secret: bytes,
    ) -> _Parts:
        """Build every component; presence and partitions are read and made before MQTT."""
        config = self.config
        host, port = broker
        keys = KeyRing(secret)
        topics = Topics(config.mqtt.topic_prefix)
        writer = GroupCommitter(pool, writers=config.database.writers)
        presence = PresenceService(pool, config.sessions, SessionMetrics(self.registry))
        await presence.load()
        telemetry_metrics = TelemetryMetrics(self.registry)
        keeper = PartitionKeeper(pool, config.telemetry, telemetry_metrics)
        await keeper.run_once()  # today's partitions exist before any row needs one
        telemetry = TelemetryIngest(pool, config.telemetry, telemetry_metrics)
        uplink: Uplink | None = None

        def handle(topic: str, payload: bytes) -> Outcome:
            assert uplink is not None  # noqa: S101  (set before the link connects)
            return uplink.handle(topic, payload)

        client_id, one_off = self._client_id(stack)
        self._link = link = MqttLink(
            MqttSettings(
                host=host,
                port=port,
                client_id=client_id,
                username=config.mqtt.username,
                password=config.mqtt.password,
                keepalive_s=config.mqtt.keepalive_s,
                receive_maximum=config.mqtt.receive_maximum,
                # A one-off id is never resumed: let its session go soon after we stop,
                # so it does not keep a share of the uplinks queued for nobody.
                session_expiry_s=ONE_OFF_SESSION_S if one_off else 3600,
            ),
            handle,
            [
                (topics.shared_filter(Channel.UP, config.mqtt.shared_group), QOS[Channel.UP]),
                # Not shared: every gateway sees all presence, retained included (SPEC §3.4).
                (topics.filter(Channel.STATUS), QOS[Channel.STATUS]),
            ],
        )
        # The outbox's claims on connections of their own, planned for each call: a plan
        # cached while the outbox was small scans the whole backlog once it is not (measured:
        # a claim then kept a database core busy while 6,000 events waited). Its statements
        # are a few per batch of deliveries, so planning each costs little.
        outbox_pool = await db.create_pool(
            dsn,
            min_size=1,
            max_size=2,
            server_settings={"plan_cache_mode": "force_custom_plan"},
        )
        stack.push_async_callback(outbox_pool.close)
        deliverer = WebhookDeliverer(outbox_pool, config.webhook)
        self._dispatcher = dispatcher = Dispatcher(
            writer=writer,
            publisher=link,
            keys=keys,
            topics=topics,
            timing=Timing(
                retry_base_s=config.vend.retry_base_s,
                retry_cap_s=config.vend.retry_cap_s,
                clock_skew_s=config.vend.clock_skew_s,
            ),
            metrics=self.metrics,
            on_webhook=deliverer.wake,
            on_result=_ResultHook(config.planogram.slot_failure_limit, self.metrics).run,
            listen=pool,
        )
        configsync = ConfigSync(
            send=dispatcher.send,
            is_online=presence.tracker.is_online,
            writer=writer,
            pool=pool,
            config=config.planogram,
            metrics=PlanogramMetrics(self.registry),
        )
        directory = MachineDirectory(writer)
        await directory.load()
        uplink = Uplink(
            topics=topics,
            keys=keys,
            directory=directory,
            sink=_Router(presence, telemetry, configsync, dispatcher).route,
            metrics=self.metrics,
        )
        app = create_app(
            pool=pool,
            writer=writer,
            sink=self,
            readiness=_Ready(self),
            vend=config.vend,
            registry=self.registry,
            on_registered=directory.learn,
            extensions=[
                MachineRoutes(pool),
                PlanogramApi(pool, writer, configsync, config.planogram.slot_failure_limit),
            ],
        )
        return _Parts(
            writer, presence, keeper, telemetry, link, dispatcher, deliverer, configsync, app
        )

    async def _serve(  # noqa: PLR0917  (the run's parts, handed over once)
        self,
        parts: _Parts,
        tasks: asyncio.TaskGroup,
        stop: asyncio.Event,
        host: str,
        port: int,
        dsn: str,
        secret: bytes,
    ) -> None:
        """Start the tasks, serve HTTP until ``stop``, then stop in order (house style #9)."""
        config = self.config
        self._writer_task = tasks.create_task(parts.writer.run(), name="gateway.store.writer")
        ingest = tasks.create_task(parts.telemetry.run(), name="gateway.telemetry")
        background = [
            tasks.create_task(parts.presence.run(), name="gateway.sessions"),
            tasks.create_task(parts.keeper.run(), name="gateway.store.partitions"),
        ]
        await parts.configsync.load()  # before the first Hello asks what the machine runs
        async with parts.link:
            working = [
                tasks.create_task(parts.dispatcher.run(), name="gateway.dispatcher"),
                tasks.create_task(parts.deliverer.run(), name="gateway.webhooks"),
                tasks.create_task(parts.configsync.run(), name="gateway.configsync"),
            ]
            runner = web.AppRunner(parts.app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, config.http.host, config.http.port)
            await site.start()
            self.endpoints = Endpoints(
                http_url=f"http://{config.http.host}:{bound_port(site)}",
                mqtt_host=host,
                mqtt_port=port,
                dsn=dsn,
                master_secret=secret,
            )
            self.ready.set()
            log.info("gateway_ready", http=self.endpoints.http_url, broker=f"{host}:{port}")
            await stop.wait()
            log.info("gateway_stopping")
            begin_shutdown(parts.app)  # 1. stop intake
            await runner.cleanup()
            for task in working:  # 2. stop dispatching; the state is durable
                task.cancel()
            await asyncio.gather(*working, return_exceptions=True)
            await parts.deliverer.close()
            with suppress(TimeoutError):  # 3. flush pending writes and telemetry
                await asyncio.wait_for(
                    asyncio.gather(parts.writer.drain(), parts.telemetry.drain()), timeout=5.0
                )
        # 4. MQTT is closed: whatever was not acknowledged is redelivered to the next gateway.
        ingest.cancel()
        with suppress(TimeoutError):
            await asyncio.wait_for(parts.presence.flush(), timeout=5.0)
        for task in background:
            task.cancel()
        self._writer_task.cancel()

    # -- embedded services and secrets ---------------------------------------------------------

    async def _embedded_postgres(self, stack: AsyncExitStack) -> str:
        server = EmbeddedPostgres(self.config.database.data_dir)
        dsn = await server.start()
        stack.push_async_callback(server.stop)
        log.info("embedded_postgres_started", data_dir=str(self.config.database.data_dir))
        return dsn

    async def _broker(self, stack: AsyncExitStack) -> tuple[str, int]:
        url = self.config.mqtt.url
        if url is not None:
            return mqtt_address(url)
        broker = Mosquitto(self.state_dir / "mosquitto")
        await broker.start()
        stack.push_async_callback(broker.stop)
        log.info("embedded_mosquitto_started", url=broker.url)
        return broker.host, broker.port

    def _client_id(self, stack: AsyncExitStack) -> tuple[str, bool]:
        """Return ``mqtt.client_id``, or this installation's own id, kept in the state folder.

        The MQTT session outlives the process (`MqttSettings.session_expiry_s`), and a session
        that nobody resumes keeps its place in the shared subscription: the broker goes on
        handing it its share of the uplinks and queues them for a client that never returns
        (MQTT 5 §4.8.2 lets it; Mosquitto does). A gateway that restarts, after a crash
        above all, must therefore come back under the same id, resume its session and get
        what was queued for it. The file is locked while the gateway runs; a second gateway
        on the same state folder gets a one-off id (returned with True), and a warning; its
        session is given a short expiry, since nobody will resume it.
        """
        if self.config.mqtt.client_id is not None:
            return self.config.mqtt.client_id, False
        path = self.state_dir / CLIENT_ID_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+", encoding="ascii")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            one_off = f"vendgate-{socket.gethostname()}-{os.getpid()}"
            log.warning("mqtt_client_id_in_use", path=str(path), client_id=one_off)
            return one_off, True
        stack.callback(handle.close)  # holds the lock until the gateway has stopped
        handle.seek(0)
        client_id = handle.read().strip()
        if not client_id:
            client_id = f"vendgate-{socket.gethostname()}-{secrets.token_hex(4)}"
            handle.write(client_id + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            log.info("mqtt_client_id_created", path=str(path), client_id=client_id)
        return client_id, False

    def _master_secret(self) -> bytes:
        """Return the configured master secret, or a development one kept in the state folder."""
        secret = self.config.security.master_secret_bytes()
        if secret is not None:
            return secret
        if self.config.mqtt.url is not None or self.config.database.dsn is not None:
            raise ConfigError(
                "security.master_secret (or master_secret_file) is required with an external "
                "broker or database",
                source="configuration",
                key="security.master_secret",
            )
        path = self.state_dir / SECRET_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32) + "\n", encoding="ascii")
            path.chmod(0o600)
            log.warning("development_master_secret_created", path=str(path))
        return bytes.fromhex(path.read_text(encoding="ascii").strip())


@dataclass(frozen=True, slots=True)
class _Parts:
    """The gateway's components, built by ``Gateway._assemble``."""

    writer: GroupCommitter
    presence: PresenceService
    keeper: PartitionKeeper
    telemetry: TelemetryIngest
    link: MqttLink
    dispatcher: Dispatcher
    deliverer: WebhookDeliverer
    configsync: ConfigSync
    app: web.Application


@dataclass(frozen=True, slots=True)
class _Router:
    """Where each verified uplink frame goes: presence sees all, then its one consumer."""

    presence: PresenceService
    telemetry: TelemetryIngest
    configsync: ConfigSync
    dispatcher: Dispatcher

    def route(self, machine_id: str, frame: UplinkFrame) -> Outcome:
        """Take one frame; return what the MQTT acknowledgement must wait for, if anything.

        Synchronous for the frames of the steady state: telemetry (a future that completes
        when its rows are durable), plain heartbeats and presence (done at once). Every other
        frame goes on to the config sync and the dispatcher in a coroutine.
        """
        self.presence.observe(machine_id, frame)
        kind = type(frame)
        if kind is Telemetry:
            assert isinstance(frame, Telemetry)  # noqa: S101  (for the type checker)
            return self.telemetry.submit_nowait(machine_id, frame)
        if kind is Presence or (isinstance(frame, Heartbeat) and not frame.want_time):
            return None  # Dispatcher.on_uplink and ConfigSync.on_frame have nothing to do
        return self._act(machine_id, frame)

    async def _act(self, machine_id: str, frame: UplinkFrame) -> None:
        if isinstance(frame, _CONFIG_REPORTS):
            await self.configsync.on_frame(machine_id, frame)
        await self.dispatcher.on_uplink(machine_id, frame)


@dataclass(frozen=True, slots=True)
class _ResultHook:
    """Runs in the transaction that stores machines' results: dispense records, slot health."""

    slot_failure_limit: int
    metrics: VendMetrics

    async def run(self, conn: Conn, results: Sequence[tuple[VendRow, Dispense, bool]]) -> None:
        await record_dispenses(
            conn,
            [
                DispenseRecord(row.vend_id, row.machine_id, row.slot, d, late)
                for row, d, late in results
            ],
        )
        # A late result (the vend was settled before) was counted when it was settled.
        counted = [
            (row.machine_id, row.slot, d, row.vend_id) for row, d, late in results if not late
        ]
        if not counted:
            return
        disabled = await slots.record_dispenses(conn, counted, limit=self.slot_failure_limit)
        for machine_id, slot, vend_id in disabled:
            self.metrics.slots_disabled.inc()
            log.warning(
                "slot_disabled_after_failures",
                machine_id=machine_id,
                slot=slot,
                limit=self.slot_failure_limit,
                vend_id=vend_id,
            )


@dataclass(frozen=True, slots=True)
class _Ready:
    gateway: Gateway

    def ready(self) -> dict[str, bool]:
        return self.gateway.ready_checks()
