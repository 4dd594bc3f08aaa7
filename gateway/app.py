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
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.config import Config, mqtt_address
from gateway.dispatcher import Dispatcher
from gateway.embedded import EmbeddedPostgres, Mosquitto
from gateway.errors import ConfigError
from gateway.http_api import begin_shutdown, bound_port, create_app
from gateway.keys import KeyRing
from gateway.lifecycle import Timing
from gateway.logs import get_logger
from gateway.metrics import VendMetrics
from gateway.mqtt import MqttLink, MqttSettings
from gateway.store import db
from gateway.store.vends import VendRow
from gateway.store.writer import GroupCommitter
from gateway.uplink import MachineDirectory, Uplink
from gateway.webhooks import WebhookDeliverer
from protocols.topics import QOS, Channel, Topics

log = get_logger("gateway.app")

SECRET_FILE = "master_secret"  # noqa: S105  (a file name, not a secret)
CLIENT_ID_FILE = "mqtt_client_id"
ONE_OFF_SESSION_S = 60


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
            keys = KeyRing(secret)
            topics = Topics(config.mqtt.topic_prefix)
            writer = GroupCommitter(pool)
            uplink: Uplink | None = None

            async def handle(topic: str, payload: bytes) -> None:
                assert uplink is not None  # noqa: S101  (set before the link connects)
                await uplink.handle(topic, payload)

            client_id, one_off = self._client_id(stack)
            group = config.mqtt.shared_group
            self._link = link = MqttLink(
                MqttSettings(
                    host=host,
                    port=port,
                    client_id=client_id,
                    username=config.mqtt.username,
                    password=config.mqtt.password,
                    keepalive_s=config.mqtt.keepalive_s,
                    # A one-off id is never resumed: let its session go soon after we stop,
                    # so it does not keep a share of the uplinks queued for nobody.
                    session_expiry_s=ONE_OFF_SESSION_S if one_off else 3600,
                ),
                handle,
                [
                    (topics.shared_filter(Channel.UP, group), QOS[Channel.UP]),
                    # Not shared: every gateway sees all presence, retained included (SPEC §3.4).
                    (topics.filter(Channel.STATUS), QOS[Channel.STATUS]),
                ],
            )
            deliverer = WebhookDeliverer(pool, config.webhook)
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
            )
            directory = MachineDirectory(writer)
            uplink = Uplink(
                topics=topics,
                keys=keys,
                directory=directory,
                sink=dispatcher.on_uplink,
                metrics=self.metrics,
            )
            app = create_app(
                pool=pool,
                writer=writer,
                sink=self,
                readiness=_Ready(self),
                vend=config.vend,
                registry=self.registry,
            )
            async with asyncio.TaskGroup() as tasks:
                self._writer_task = tasks.create_task(writer.run(), name="gateway.store.writer")
                async with link:
                    dispatch = tasks.create_task(dispatcher.run(), name="gateway.dispatcher")
                    hooks = tasks.create_task(deliverer.run(), name="gateway.webhooks")
                    runner = web.AppRunner(app, access_log=None)
                    await runner.setup()
                    site = web.TCPSite(runner, config.http.host, config.http.port)
                    await site.start()
                    http_port = bound_port(site)
                    self.endpoints = Endpoints(
                        http_url=f"http://{config.http.host}:{http_port}",
                        mqtt_host=host,
                        mqtt_port=port,
                        dsn=dsn,
                        master_secret=secret,
                    )
                    self.ready.set()
                    log.info("gateway_ready", http=self.endpoints.http_url, broker=f"{host}:{port}")
                    await stop.wait()
                    log.info("gateway_stopping")
                    begin_shutdown(app)  # 1. stop intake
                    await runner.cleanup()
                    for task in (dispatch, hooks):  # 2. stop dispatching; state is durable
                        task.cancel()
                    await asyncio.gather(dispatch, hooks, return_exceptions=True)
                    await deliverer.close()
                    with suppress(TimeoutError):  # 3. flush pending writes
                        await asyncio.wait_for(writer.drain(), timeout=5.0)
                self._writer_task.cancel()  # 4. MQTT closed above; then the writer
            log.info("gateway_stopped")

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
class _Ready:
    gateway: Gateway

    def ready(self) -> dict[str, bool]:
        return self.gateway.ready_checks()
