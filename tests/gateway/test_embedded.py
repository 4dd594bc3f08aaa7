import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import gmqtt
import pytest

from gateway import embedded
from gateway.embedded import EmbeddedPostgres, Mosquitto, find_mosquitto
from gateway.errors import EmbeddedServiceError

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

TIMEOUT = 5.0


class Inbox:
    """Collects the messages a gmqtt client receives and the SUBACKs it gets."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[tuple[str, bytes, int]] = asyncio.Queue()
        self.subscribed = asyncio.Event()

    def on_message(self, _client: Any, topic: str, payload: bytes, qos: int, _props: Any) -> int:
        """Queue a received message; gmqtt calls this for every PUBLISH."""
        self.messages.put_nowait((topic, payload, qos))
        return 0  # PUBACK reason code: success

    def on_subscribe(self, _client: Any, _mid: int, _qos: Any, _props: Any) -> None:
        """Note that the broker acknowledged a subscription."""
        self.subscribed.set()

    async def next(self) -> tuple[str, bytes, int]:
        """Wait for the next message, failing the test after TIMEOUT seconds."""
        async with asyncio.timeout(TIMEOUT):
            return await self.messages.get()


@asynccontextmanager
async def connected(
    broker: Mosquitto, client_id: str, **session: Any
) -> AsyncIterator[tuple[Any, Inbox]]:
    """Connect a gmqtt client (MQTT 5) and disconnect it cleanly afterwards."""
    client = gmqtt.Client(client_id, **session)
    inbox = Inbox()
    client.on_message = inbox.on_message
    client.on_subscribe = inbox.on_subscribe
    async with asyncio.timeout(TIMEOUT):
        await client.connect(broker.host, broker.port)
    try:
        yield client, inbox
    finally:
        await client.disconnect()


async def subscribe(client: Any, inbox: Inbox, topic: str) -> None:
    inbox.subscribed.clear()
    client.subscribe(topic, qos=1)
    async with asyncio.timeout(TIMEOUT):
        await inbox.subscribed.wait()


async def test_broker_delivers_qos1_message(mosquitto: Mosquitto) -> None:
    """The broker accepts an MQTT 5 connection and delivers a QoS 1 message to a subscriber."""
    topic = f"test/{uuid.uuid4().hex}"
    async with connected(mosquitto, "sub") as (sub, inbox), connected(mosquitto, "pub") as (pub, _):
        await subscribe(sub, inbox, topic)
        pub.publish(topic, b"\x01vend", qos=1)
        assert await inbox.next() == (topic, b"\x01vend", 1)
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"


async def test_restart_keeps_port_and_queued_message(mosquitto: Mosquitto) -> None:
    """After restart() the broker keeps its port and delivers a message queued while offline."""
    topic = f"test/{uuid.uuid4().hex}"
    session = {"clean_session": False, "session_expiry_interval": 3600}
    async with connected(mosquitto, "gateway-1", **session) as (sub, inbox):
        await subscribe(sub, inbox, topic)

    # The publisher also subscribes, so receiving its own message proves the broker has
    # routed it, and queued it for the offline session, before the restart.
    async with connected(mosquitto, "machine-1") as (pub, echo):
        await subscribe(pub, echo, topic)
        pub.publish(topic, b"while-offline", qos=1)
        assert (await echo.next())[1] == b"while-offline"

    port = mosquitto.port
    await mosquitto.restart()
    assert mosquitto.port == port

    async with connected(mosquitto, "gateway-1", **session) as (_, inbox):
        assert await inbox.next() == (topic, b"while-offline", 1)


async def test_kill_then_start(mosquitto: Mosquitto) -> None:
    """After kill() the port refuses connections, and start() brings the broker back on it."""
    await mosquitto.kill()
    assert not mosquitto.running
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(mosquitto.host, mosquitto.port)

    await mosquitto.start()
    topic = f"test/{uuid.uuid4().hex}"
    async with connected(mosquitto, "after-kill") as (client, inbox):
        await subscribe(client, inbox, topic)
        client.publish(topic, b"back", qos=1)
        assert (await inbox.next())[1] == b"back"


async def test_missing_binary_names_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a mosquitto binary, find_mosquitto() and start() say how to install it."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(embedded, "_SYSTEM_LOCATIONS", (tmp_path / "sbin" / "mosquitto",))
    with pytest.raises(EmbeddedServiceError, match="apt-get install -y mosquitto"):
        find_mosquitto()
    broker = Mosquitto(tmp_path / "broker")
    with pytest.raises(EmbeddedServiceError, match="apt-get install -y mosquitto"):
        await broker.start()
    assert not broker.running


async def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    """A broker that cannot start raises EmbeddedServiceError quoting its own error output."""
    broker = Mosquitto(tmp_path / "broker", extra_config="no_such_option 1")
    with pytest.raises(EmbeddedServiceError, match="no_such_option"):
        await broker.start()
    assert not broker.running


async def test_postgres_database_accepts_queries(database: str) -> None:
    """A database from the embedded PostgreSQL accepts an asyncpg connection and runs SQL."""
    connection = await asyncpg.connect(database)
    try:
        assert await connection.fetchval("SELECT 1 + 1") == 2
        name = await connection.fetchval("SELECT current_database()")
        assert database.startswith(f"postgresql://postgres@/{name}?host=")
    finally:
        await connection.close()


async def test_databases_are_isolated(pg_server: EmbeddedPostgres) -> None:
    """A table created in one database is invisible in another on the same server."""
    names = [f"iso_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    first, second = [await pg_server.create_database(name) for name in names]
    try:
        a = await asyncpg.connect(first)
        b = await asyncpg.connect(second)
        try:
            await a.execute("CREATE TABLE vends (id text PRIMARY KEY)")
            await a.execute("INSERT INTO vends VALUES ('v-1')")
            assert await a.fetchval("SELECT count(*) FROM vends") == 1
            assert await b.fetchval("SELECT to_regclass('vends')") is None
        finally:
            await a.close()
            await b.close()
    finally:
        for name in names:
            await pg_server.drop_database(name)


async def test_postgres_stop_and_start_keep_data(
    private_pg: tuple[EmbeddedPostgres, str],
) -> None:
    """stop() really stops the server, and start() on the same data_dir brings its data back."""
    server, dsn = private_pg
    try:
        connection = await asyncpg.connect(dsn)
        await connection.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")
        await connection.close()
        await server.stop()
        with pytest.raises(EmbeddedServiceError, match="not started"):
            _ = server.dsn
        with pytest.raises(FileNotFoundError):  # the Unix socket is gone
            await asyncpg.connect(dsn)

        connection = await asyncpg.connect(await server.start())
        try:
            assert await connection.fetchval("SELECT n FROM kept") == 7
        finally:
            await connection.close()
    finally:
        await server.stop()
