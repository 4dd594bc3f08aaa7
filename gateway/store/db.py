"""Connection pool and versioned plain-SQL migrations.

Migrations are the files ``migrations/NNNN_name.sql``, applied in order, each in its
own transaction, under an advisory lock so that several gateways starting at once
apply each file exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import asyncpg

from gateway.errors import DatabaseUnavailableError
from gateway.logs import get_logger

MIGRATIONS_DIR: Final = Path(__file__).with_name("migrations")
_NAME: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_ID: Final = 0x76656E64  # "vend": one advisory lock for migrations
log = get_logger("gateway.store")

#: A connection, or a pool's proxy for one; every store function accepts either.
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str


def migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Return the migration files in version order; refuse gaps and stray names."""
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"migration versions must be 1..n without gaps, got {versions}")
    return found


async def migrate(conn: Conn, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Apply pending migrations; return the versions applied now."""
    applied: list[int] = []
    async with conn.transaction():
        # Even CREATE TABLE IF NOT EXISTS races with itself; the lock serialises gateways.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
    for migration in migrations(directory):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            done = await conn.fetchval(
                "SELECT 1 FROM schema_migrations WHERE version = $1", migration.version
            )
            if done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied.append(migration.version)
            log.info("migration_applied", version=migration.version, name=migration.name)
    return applied


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Nothing to reset beyond asyncpg's own rollback (see ``create_pool``)."""


async def create_pool(
    dsn: str, *, min_size: int, max_size: int, server_settings: dict[str, str] | None = None
) -> asyncpg.Pool:
    """Open a connection pool, or raise DatabaseUnavailableError with the cause."""
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=30,
            # Plans are cached per connection; the hot statements are few and stable.
            statement_cache_size=256,
            # asyncpg still rolls back an open transaction on release; the default reset
            # adds a round trip per use (RESET ALL, UNLISTEN, advisory unlock) for session
            # state this code never leaves behind: every setting and advisory lock it takes
            # is transaction-scoped (set_config(..., true), pg_advisory_xact_lock).
            reset=_keep_session,
            server_settings=server_settings,
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailableError(f"cannot connect to PostgreSQL: {exc}") from exc
    assert pool is not None  # noqa: S101  (create_pool returns None only when called lazily)
    return pool
