"""Daily partitions of the telemetry and dispense tables: made ahead, dropped whole when expired.

``telemetry_readings``, ``telemetry_events`` and ``dispenses`` are range-partitioned by the
gateway's clock (migration 0004). Each UTC day is one partition named ``<table>_pYYYYMMDD``
covering ``[day 00:00 UTC, day+1 00:00 UTC)``. Retention drops whole partitions, which frees
the space at once and writes no WAL per row; rows are never deleted one by one. The dedup
ledger ``telemetry_frames`` is not partitioned and is trimmed by ``DELETE``: it need only
remember a frame while the broker could redeliver it (the session expiry, an hour).

Creating and dropping partitions take an ``ACCESS EXCLUSIVE`` lock on the parent table, so
every change runs under one transaction-scoped advisory lock (several gateways may do this
at once) and a short ``lock_timeout``: a maintenance run that cannot get its locks gives up
and tries again later rather than queue every COPY behind it. Existing partitions are looked
up without any lock first, so the usual run, where everything already exists, takes none.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Final

import asyncpg

from gateway.config import TelemetryConfig
from gateway.logs import get_logger
from gateway.store.db import Conn
from gateway.store.writer import unavailable

if TYPE_CHECKING:
    from gateway.telemetry import TelemetryMetrics

__all__ = [
    "AHEAD_DAYS",
    "LEDGER_DAYS",
    "PARTITIONED_TABLES",
    "Maintenance",
    "PartitionKeeper",
    "day_of",
    "drop_expired",
    "ensure",
    "partition_day",
    "partition_name",
    "retriable",
    "table_of",
]

#: The tables partitioned by day (migration 0004).
PARTITIONED_TABLES: Final = ("telemetry_readings", "telemetry_events", "dispenses")
#: Partitions are made for today and this many days after, so midnight never finds one missing.
AHEAD_DAYS: Final = 2
#: Ledger entries are kept from midnight UTC this many days before today (24 to 48 hours).
LEDGER_DAYS: Final = 1

_LOCK_ID: Final = 0x74656C65  # "tele": one advisory lock for partition maintenance
_LOCK_TIMEOUT: Final = "5s"
_NAME: Final = re.compile(r"^(?P<table>[a-z_]+)_p(?P<day>\d{8})$")
_RETRY_BASE_S: Final = 1.0
_RETRY_EXPONENT_CAP: Final = 6
log = get_logger("gateway.store.partitions")


def day_of(unix_s: float) -> date:
    """Return the UTC day of a unix time, the day whose partition holds it."""
    return datetime.fromtimestamp(unix_s, UTC).date()


def partition_name(table: str, day: date) -> str:
    """Return the name of ``table``'s partition for ``day``: ``<table>_pYYYYMMDD``."""
    return f"{table}_p{day:%Y%m%d}"


def partition_day(table: str, name: str) -> date | None:
    """Return the day of a partition of ``table`` named by `partition_name`, else None."""
    match = _NAME.match(name)
    if match is None or match["table"] != table:
        return None
    try:
        return datetime.strptime(match["day"], "%Y%m%d").replace(tzinfo=UTC).date()
    except ValueError:
        return None


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _midnight(day: date) -> str:
    # A literal with an explicit offset, so the bound does not depend on the session TimeZone.
    return f"{day.isoformat()} 00:00:00+00"


@asynccontextmanager
async def _maintenance(conn: Conn) -> AsyncIterator[None]:
    """Open a transaction (or a savepoint of the caller's) that holds the maintenance lock.

    The short lock_timeout is put back on the way out: within a caller's transaction (see
    gateway/store/dispenses.py) a released savepoint would otherwise leave it set.
    """
    async with conn.transaction():
        previous = await conn.fetchval(
            "SELECT current_setting('lock_timeout'), set_config('lock_timeout', $1, true),"
            " pg_advisory_xact_lock($2)",
            _LOCK_TIMEOUT,
            _LOCK_ID,
        )
        yield
        await conn.execute("SELECT set_config('lock_timeout', $1, true)", previous)


async def _missing(conn: Conn, names: list[str]) -> list[str]:
    # A scan of pg_class under the statement's snapshot, not to_regclass: the catalog cache
    # behind to_regclass may not have seen partitions another gateway just committed (an
    # advisory lock, unlike a table lock, does not make it catch up).
    rows = await conn.fetch(
        """SELECT n FROM unnest($1::text[]) AS n
            WHERE NOT EXISTS (
                SELECT FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
                 WHERE c.relname = n AND s.nspname = current_schema())""",
        names,
    )
    return [row[0] for row in rows]


async def ensure(
    conn: Conn, days: Iterable[date], *, tables: Sequence[str] = PARTITIONED_TABLES
) -> list[str]:
    """Create the partitions of ``tables`` for ``days`` that do not exist; return their names.

    Idempotent and safe to run from several gateways at once. Runs in its own transaction, or
    in a savepoint of the caller's.
    """
    wanted = {partition_name(table, day): (table, day) for day in set(days) for table in tables}
    if not wanted or not await _missing(conn, sorted(wanted)):
        return []
    async with _maintenance(conn):
        created = await _missing(conn, sorted(wanted))
        for name in created:
            table, day = wanted[name]
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {_quote(name)} PARTITION OF {_quote(table)} "
                f"FOR VALUES FROM ('{_midnight(day)}') TO ('{_midnight(day + timedelta(days=1))}')"
            )
    if created:
        log.info("partitions_created", partitions=created)
    return created


@dataclass(frozen=True, slots=True)
class Maintenance:
    """What one maintenance run changed."""

    created: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    ledger_trimmed: int = 0


async def drop_expired(
    conn: Conn,
    retention_days: int,
    today: date,
    *,
    tables: Sequence[str] = PARTITIONED_TABLES,
) -> Maintenance:
    """Drop partitions whose every row is older than the retention; trim the dedup ledger.

    A partition for day ``d`` is dropped when ``d < today - retention_days``: its newest
    possible row is then at least ``retention_days`` old. Partitions whose names do not parse
    (made by hand, say) are left alone. Ledger entries received before midnight UTC of
    ``today - LEDGER_DAYS`` are deleted.
    """
    cutoff = today - timedelta(days=retention_days)
    async with _maintenance(conn):
        children = await conn.fetch(
            """SELECT p.relname AS parent, c.relname AS child
                 FROM pg_inherits i
                 JOIN pg_class c ON c.oid = i.inhrelid
                 JOIN pg_class p ON p.oid = i.inhparent
                WHERE i.inhparent = ANY($1::text[]::regclass[])
                ORDER BY c.relname""",
            list(tables),
        )
        dropped: list[str] = []
        for row in children:
            day = partition_day(row["parent"], row["child"])
            if day is None:
                log.warning("partition_name_unknown", table=row["parent"], partition=row["child"])
            elif day < cutoff:
                await conn.execute(f"DROP TABLE IF EXISTS {_quote(row['child'])}")
                dropped.append(row["child"])
    # Outside the lock: concurrent deletes from several gateways are harmless, and a large one
    # must not hold up a gateway that needs a partition made.
    status = await conn.execute(
        "DELETE FROM telemetry_frames WHERE received_at < $1::timestamptz",
        datetime.combine(today - timedelta(days=LEDGER_DAYS), datetime.min.time(), UTC),
    )
    trimmed = int(status.rpartition(" ")[2])
    if dropped or trimmed:
        log.info("partitions_expired", dropped=dropped, ledger_trimmed=trimmed)
    return Maintenance(dropped=tuple(dropped), ledger_trimmed=trimmed)


def table_of(name: str) -> str:
    """Return the parent table of a partition named by `partition_name`."""
    return name.rpartition("_p")[0]


class PartitionKeeper:
    """Make tomorrow's partitions and drop expired ones, at start and every interval.

    ``clock`` gives unix seconds and decides what "today" is (a test moves it across days).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: TelemetryConfig,
        metrics: TelemetryMetrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._metrics = metrics
        self._clock = clock

    async def run_once(self) -> Maintenance:
        """Ensure today's and the next `AHEAD_DAYS` partitions, then drop expired ones."""
        today = day_of(self._clock())
        async with self._pool.acquire() as conn:
            created = await ensure(conn, (today + timedelta(days=n) for n in range(AHEAD_DAYS + 1)))
            expired = await drop_expired(conn, self._settings.retention_days, today)
        for name in created:
            self._metrics.partitions_created.labels(table_of(name)).inc()
        for name in expired.dropped:
            self._metrics.partitions_dropped.labels(table_of(name)).inc()
        self._metrics.ledger_trimmed.inc(expired.ledger_trimmed)
        return Maintenance(tuple(created), expired.dropped, expired.ledger_trimmed)

    async def run(self) -> None:
        """Run maintenance now and every ``maintenance_interval_s``, forever.

        A failed run is logged and tried again: sooner, with capped backoff, when the
        database is unreachable or a lock was busy; at the next interval for anything else,
        so a bug here never takes the gateway down.
        """
        interval = self._settings.maintenance_interval_s
        failures = 0
        while True:
            delay = interval
            try:
                await self.run_once()
                failures = 0
            except Exception as exc:  # logged, and tried again; ingest goes on meanwhile
                if not retriable(exc):
                    log.exception("partition_maintenance_failed")
                else:
                    failures += 1
                    delay = min(interval, _backoff(failures))
                    log.warning(
                        "partition_maintenance_retry",
                        attempt=failures,
                        delay_s=round(delay, 3),
                        error=f"{type(exc).__name__}: {exc}",
                    )
            await asyncio.sleep(delay)


def retriable(exc: BaseException) -> bool:
    """Whether a failed maintenance or ingest transaction may simply be tried again.

    True when the database is unreachable (`gateway.store.writer.unavailable`), and for
    transaction rollbacks (class 40: deadlock, serialization failure) and lock timeouts
    (55P03), which are about timing, not about the statement.
    """
    return unavailable(exc) is not None or isinstance(
        exc,
        asyncpg.exceptions.TransactionRollbackError | asyncpg.exceptions.LockNotAvailableError,
    )


def _backoff(attempt: int) -> float:
    # House style #10: uniform(0, base * 2 ** min(attempt, cap)).
    return random.uniform(0, _RETRY_BASE_S * 2 ** min(attempt, _RETRY_EXPONENT_CAP))  # noqa: S311  (jitter, not security)
