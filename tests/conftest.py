"""Fixtures for integration tests: a private Mosquitto per test, one PostgreSQL per session.

Both are real servers started from `gateway.embedded`, never mocks, so a test can stop, kill or
restart them to check how the gateway copes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import pytest_asyncio

from gateway.embedded import EmbeddedPostgres, Mosquitto
from gateway.store import db
from tests.pgfaults import signal_server

_T = TypeVar("_T")
_log = logging.getLogger(__name__)


def _run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    # A private loop, not asyncio.run(): with a loop_factory, Runner leaves the thread's
    # current event loop alone, so pytest-asyncio's per-test loops are not disturbed.
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coroutine)


@pytest_asyncio.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    """Run a fresh broker on a free port for one test, which may stop, kill or restart it."""
    broker = Mosquitto(tmp_path / "mosquitto")
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


def _server_root(prefix: str) -> Path:
    """Make a folder for a PostgreSQL data directory, outside pytest's base temp folder.

    Run as root, pgserver opens the folders above the data directory to its own user, and a
    concurrent pytest run resets /tmp/pytest-of-<user> to 0700, which would cut the server off.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    """Run one PostgreSQL for the whole session; tests get their own database from `database`."""
    # Synchronous, with start and stop on a private loop: the server lives in another process
    # and its handle is not tied to any event loop, so every test's loop can use it.
    # Its data lives outside pytest's base temp folder: run as root, pgserver opens the
    # folders above the data directory to its own user, and a concurrent pytest run resets
    # /tmp/pytest-of-<user> to 0700, which would cut the server off mid-session.
    root = _server_root("vendgate-test-pg-")
    server = EmbeddedPostgres(root / "data")
    _run(server.start())
    try:
        yield server
    finally:
        _run(server.stop())
        shutil.rmtree(root, ignore_errors=True)


@pytest_asyncio.fixture
async def database(
    pg_server: EmbeddedPostgres, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """Create a uniquely named database for one test, yield its DSN, then drop it."""
    # Named after the test to make a leftover easy to trace; PostgreSQL allows 63 bytes.
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    name = f"t_{slug}_{uuid.uuid4().hex[:8]}"
    dsn = await pg_server.create_database(name)
    try:
        yield dsn
    finally:
        # Best effort: a failed drop must not hide the test's own result, and the whole
        # server is thrown away at the end of the session anyway.
        try:
            await pg_server.drop_database(name)
        except (OSError, asyncpg.PostgresError):
            # Logged, not warned: warnings are errors in this suite.
            _log.warning("could not drop test database %s", name, exc_info=True)


@pytest_asyncio.fixture
async def private_pg() -> AsyncIterator[tuple[EmbeddedPostgres, str]]:
    """Run a migrated PostgreSQL of this test's own, which it may pause, stop and restart."""
    root = _server_root("vendgate-test-private-pg-")
    server = EmbeddedPostgres(root / "data")
    dsn = await server.start()
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await db.migrate(conn)
        finally:
            await conn.close()
        yield server, dsn
    finally:
        signal_server(server.data_dir, signal.SIGCONT)
        await server.stop()
        shutil.rmtree(root, ignore_errors=True)
