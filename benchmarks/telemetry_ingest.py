"""Measure telemetry ingest: messages made durable per second, and gateway CPU per message.

Submits pre-decoded ``Telemetry`` frames (four readings each, an event in every tenth) from many
concurrent submitters, as the MQTT handlers would, through `gateway.telemetry.TelemetryIngest`
into a real PostgreSQL, and reports the process's own CPU time per message
(``time.process_time``: PostgreSQL runs in other processes and is not counted). For comparison
it then times the bare parts on the same rows: building the row tuples, and
``copy_records_to_table`` of pre-built tuples in transactions of ``batch_rows`` rows.

    python -m benchmarks.telemetry_ingest [--dsn postgresql://...] [--messages 100000]

Without ``--dsn`` it starts a private PostgreSQL (pgserver) in a temporary directory. Either
way it works in a fresh database, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from prometheus_client import CollectorRegistry

from gateway.config import TelemetryConfig
from gateway.embedded import EmbeddedPostgres
from gateway.store import db, partitions
from gateway.store.db import Conn
from gateway.store.telemetry import (
    EVENT_COLUMNS,
    EVENTS,
    READING_COLUMNS,
    READINGS,
    copy_rows,
    encode_frame,
)
from gateway.telemetry import TelemetryIngest, TelemetryMetrics
from protocols.frames import Event, Reading, ReadingKind, Telemetry

WARMUP_MESSAGES = 30000


def make_frames(count: int, machines: int, start_seq: int = 1) -> list[tuple[str, Telemetry]]:
    """Return ``count`` (machine id, frame) pairs round-robin over ``machines`` machines."""
    t0 = int(time.time() * 1000)
    frames = []
    for n in range(count):
        seq = start_seq + n // machines
        readings = (
            Reading(0, ReadingKind.TEMPERATURE, None, 400 + n % 50),
            Reading(0, ReadingKind.STOCK, 1 + n % 8, 10 + n % 5),
            Reading(0, ReadingKind.STOCK, 9 + n % 8, 3 + n % 7),
            Reading(250, ReadingKind.RSSI, None, -60 - n % 20),
        )
        events = (Event(120, "EGS", None, active=n % 20 == 0),) if n % 10 == 0 else ()
        frame = Telemetry(1, seq, t0 + n, readings, events)
        frames.append((f"VM-{n % machines:05d}", frame))
    return frames


async def _submit_all(
    ingest: TelemetryIngest, frames: list[tuple[str, Telemetry]], submitters: int
) -> None:
    async def submitter(share: list[tuple[str, Telemetry]]) -> None:
        for machine_id, frame in share:
            await ingest.submit(machine_id, frame)

    async with asyncio.TaskGroup() as group:
        for k in range(submitters):
            group.create_task(submitter(frames[k::submitters]), name=f"bench.submitter.{k}")


async def _count_rows(conn: Conn) -> int:
    readings: int = await conn.fetchval("SELECT count(*) FROM telemetry_readings")
    events: int = await conn.fetchval("SELECT count(*) FROM telemetry_events")
    return readings + events


async def measure_ingest(
    dsn: str, settings: TelemetryConfig, messages: int, submitters: int, flushers: int
) -> dict[str, float]:
    """Run the ingest over ``messages`` frames and return what was measured."""
    pool = await db.create_pool(dsn, min_size=flushers + 1, max_size=flushers + 2)
    registry = CollectorRegistry()
    ingest = TelemetryIngest(pool, settings, TelemetryMetrics(registry), flushers=flushers)
    warmup = make_frames(WARMUP_MESSAGES, 1000)
    frames = make_frames(messages, 1000, start_seq=10_000)
    rows = sum(len(f.readings) + len(f.events) for _, f in frames)
    try:
        async with asyncio.TaskGroup() as group:
            runner = group.create_task(ingest.run(), name="bench.telemetry.run")
            await _submit_all(ingest, warmup, submitters)
            batches_before = registry.get_sample_value("vendgate_telemetry_batches_total") or 0.0
            wall, cpu, usage = time.perf_counter(), time.process_time(), os.times()
            await _submit_all(ingest, frames, submitters)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            after = os.times()
            user, system = after.user - usage.user, after.system - usage.system
            batches = (registry.get_sample_value("vendgate_telemetry_batches_total") or 0.0) - (
                batches_before
            )
            runner.cancel()
        async with pool.acquire() as conn:
            stored = await _count_rows(conn)
    finally:
        await pool.close()
    warm_rows = sum(len(f.readings) + len(f.events) for _, f in warmup)
    return {
        "messages": messages,
        "rows": rows,
        "seconds": wall,
        "msgs_per_s": messages / wall,
        "rows_per_s": rows / wall,
        "cpu_us_per_msg": cpu / messages * 1e6,
        "user_us_per_msg": user / messages * 1e6,
        "system_us_per_msg": system / messages * 1e6,
        "batches": batches,
        "stored_rows_check": stored - warm_rows - rows,
    }


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Row = tuple[object, ...]


def frame_tuples(received: float, machine_id: str, frame: Telemetry) -> tuple[list[Row], list[Row]]:
    """Return a frame's rows as tuples of Python values, as copy_records_to_table takes them."""
    received_at = datetime.fromtimestamp(received, UTC)
    t0 = _EPOCH + timedelta(milliseconds=frame.t0_ms)
    key = (received_at, machine_id, frame.boot, frame.seq)
    readings: list[Row] = [
        (*key, i, t0 + timedelta(milliseconds=r.dt_ms), r.kind, r.slot, r.value)
        for i, r in enumerate(frame.readings)
    ]
    first = len(readings)
    events: list[Row] = [
        (*key, first + i, t0 + timedelta(milliseconds=e.dt_ms), e.code, e.slot, e.active)
        for i, e in enumerate(frame.events)
    ]
    return readings, events


def measure_encoding(frames: list[tuple[str, Telemetry]]) -> tuple[float, float]:
    """Return CPU us per message to encode binary COPY rows, and to build tuples instead."""
    now = time.time()
    cpu = time.process_time()
    for machine_id, frame in frames:
        encode_frame(now, machine_id, frame)
    binary = time.process_time() - cpu
    cpu = time.process_time()
    for machine_id, frame in frames:
        frame_tuples(now, machine_id, frame)
    tuples = time.process_time() - cpu
    return binary / len(frames) * 1e6, tuples / len(frames) * 1e6


async def measure_raw_copy(
    dsn: str, frames: list[tuple[str, Telemetry]], batch_rows: int, *, binary: bool
) -> dict[str, float]:
    """COPY the same rows, prepared beforehand, in transactions of about ``batch_rows`` rows.

    ``binary`` copies the bytes of `encode_frame` with copy_to_table; otherwise tuples of Python
    values with copy_records_to_table. No ledger, no queue: the bare COPY.
    """
    now = time.time()
    rows = sum(len(f.readings) + len(f.events) for _, f in frames)
    per_batch = max(1, batch_rows * len(frames) // rows)
    batches: list[tuple[list[Row] | list[bytes], list[Row] | list[bytes]]] = []
    for k in range(0, len(frames), per_batch):
        part = frames[k : k + per_batch]
        if binary:
            encoded = [encode_frame(now, m, f) for m, f in part]
            batches.append(([e[0] for e in encoded], [e[2] for e in encoded if e[3]]))
        else:
            tuples = [frame_tuples(now, m, f) for m, f in part]
            batches.append(([r for t in tuples for r in t[0]], [r for t in tuples for r in t[1]]))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE telemetry_readings, telemetry_events")
        wall, cpu = time.perf_counter(), time.process_time()
        for readings, events in batches:
            async with conn.transaction():
                if binary:
                    await copy_rows(conn, READINGS, READING_COLUMNS, readings)  # type: ignore[arg-type]  # bytes when binary
                    if events:
                        await copy_rows(conn, EVENTS, EVENT_COLUMNS, events)  # type: ignore[arg-type]  # bytes when binary
                else:
                    await conn.copy_records_to_table(
                        READINGS, records=readings, columns=READING_COLUMNS
                    )
                    if events:
                        await conn.copy_records_to_table(
                            EVENTS, records=events, columns=EVENT_COLUMNS
                        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await conn.close()
    return {
        "rows": rows,
        "seconds": wall,
        "rows_per_s": rows / wall,
        "cpu_us_per_row": cpu / rows * 1e6,
        "cpu_us_per_msg": cpu / len(frames) * 1e6,
    }


def _database_dsn(server_dsn: str, name: str) -> str:
    parts = urlsplit(server_dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def run(args: argparse.Namespace) -> None:
    """Set up a database, run every measurement and print the numbers."""
    workdir: Path | None = None
    server: EmbeddedPostgres | None = None
    dsn = args.dsn
    if dsn is None:
        workdir = Path(tempfile.mkdtemp(prefix="vendgate-bench-pg-"))
        workdir.chmod(0o755)  # run as root, pgserver's own user must reach the data directory
        server = EmbeddedPostgres(workdir / "data")
        dsn = await server.start()
    name = f"bench_telemetry_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        bench_dsn = _database_dsn(dsn, name)
        conn = await asyncpg.connect(bench_dsn)
        try:
            await db.migrate(conn)
            today = partitions.day_of(time.time())
            await partitions.ensure(conn, [today, today + timedelta(days=1)])
        finally:
            await conn.close()
        settings = replace(TelemetryConfig(), batch_rows=args.batch_rows, max_age_s=args.max_age_s)
        print(
            f"telemetry ingest: {args.messages} messages, {args.submitters} submitters, "
            f"batch_rows={settings.batch_rows}, max_age_s={settings.max_age_s}, "
            f"queue_messages={settings.queue_messages}"
        )
        for flushers in args.flushers:
            for _ in range(args.repeat):
                r = await measure_ingest(
                    bench_dsn, settings, args.messages, args.submitters, flushers
                )
                print(
                    f"ingest  flushers={flushers}: {r['messages']:.0f} msgs, {r['rows']:.0f} rows "
                    f"in {r['seconds']:.2f} s: {r['msgs_per_s']:,.0f} msgs/s, "
                    f"{r['rows_per_s']:,.0f} rows/s, CPU {r['cpu_us_per_msg']:.1f} us/msg "
                    f"(user {r['user_us_per_msg']:.1f}, system {r['system_us_per_msg']:.1f}), "
                    f"{r['batches']:.0f} batches, "
                    f"rows missing or extra: {r['stored_rows_check']:.0f}"
                )
        frames = make_frames(args.messages, 1000)
        binary, tuples = measure_encoding(frames)
        print(
            f"row encoding alone: binary COPY rows {binary:.1f} us/msg, "
            f"tuples of Python values {tuples:.1f} us/msg"
        )
        for _ in range(args.repeat):
            for binary, label in (
                (False, "raw copy_records_to_table, tuples built beforehand"),
                (True, "raw binary copy_to_table, rows encoded beforehand"),
            ):
                raw = await measure_raw_copy(bench_dsn, frames, settings.batch_rows, binary=binary)
                print(
                    f"{label}: {raw['rows']:.0f} rows in {raw['seconds']:.2f} s: "
                    f"{raw['rows_per_s']:,.0f} rows/s, CPU {raw['cpu_us_per_row']:.2f} us/row "
                    f"= {raw['cpu_us_per_msg']:.1f} us/msg"
                )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        if server is not None:
            await server.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description="vendgate telemetry ingest benchmark")
    parser.add_argument("--dsn", help="PostgreSQL server DSN (default: a private pgserver)")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--submitters", type=int, default=1000, help="concurrent submit loops")
    parser.add_argument("--batch-rows", type=int, default=TelemetryConfig().batch_rows)
    parser.add_argument("--max-age-s", type=float, default=TelemetryConfig().max_age_s)
    parser.add_argument(
        "--flushers", type=int, nargs="+", default=[1, 2], help="flusher counts to compare"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement")
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
