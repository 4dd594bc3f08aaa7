"""``vendgate bench --profile telemetry``: Telemetry frames over MQTT to durable rows.

Processes, all separate: a private Mosquitto and PostgreSQL (``benchkit.start_services``),
the gateway (``vendgate run``), and a load generator (``python -m gateway.bench_telemetry
gen``) that publishes ``Telemetry`` frames at QoS 1 for M registered machines, on each
machine's uplink topic, as fast as it can (or at ``--rate``). The frames are built from a
seeded plan and encoded with each machine's key before the timed part; a few gmqtt clients
publish for all the machines (the embedded broker has no ACLs), each with a bounded window
of unacknowledged PUBLISHes. Each machine is published by one client only, so its ``seq``
reaches the broker in increasing order.

Measured, once every row is durable (counts polled) or nothing moved for ``stall_s``:

* ``mps``: frames durable (``telemetry_frames``) per second, from the first PUBLISH to the
  poll that saw the last of them; ``gateway_cpu_us_per_msg``: the gateway process's own
  CPU time (/proc) over the same span, divided by the messages sent;
* exactly-once: the rows stored for the run's machines, keyed (machine, boot, seq, idx),
  against the plan: a key stored more than once is duplicated, a key missing is lost, a
  stored key the plan does not have is unexpected, a row whose content differs is
  mismatched;
* two limits, in the same run against the same broker and database, while the gateway is
  idle: ``mqtt_raw_ingest_mps``, one bare client (``raw`` child) receiving the same
  pre-encoded messages, published by the same generator on another topic prefix, and doing
  nothing with them but the PUBACK: the fastest of gmqtt through a shared subscription like
  the gateway's while the generator publishes (``live``), gmqtt taking them queued
  (``drain``), and protocols.mqtt5 on a bare transport taking them queued (``drain_codec``,
  the fastest receiver we have); and
  ``pg_copy_rows_s``, a ``copy`` child writing the same rows with ``copy_records_to_table``
  into the same tables (a scratch partition, dropped afterwards), one transaction per
  ``telemetry.batch_rows`` rows.

The vend benchmark (gateway/bench.py, profiles ``vends`` and ``mixed``) measures the same two
limits with `measure_limits`, a generator of its own for a plan shaped like its fleet's frames.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import asyncpg
import gmqtt
from gmqtt.mqtt.constants import MQTTv50

from gateway.benchkit import (
    cpu_seconds,
    register_machines,
    rss_mb,
    start_gateway,
    start_services,
    stop_process,
)
from gateway.config import mqtt_address
from gateway.keys import KeyRing
from gateway.logs import configure_logging
from protocols import mqtt5
from protocols.codec import encode
from protocols.frames import Event, Reading, ReadingKind, Telemetry
from protocols.topics import QOS, Channel, Topics

READY_MARK: Final = "READY "
DONE_MARK: Final = "DONE "
RESULT_MARK: Final = "RESULT "
TARGET_US_PER_MSG: Final = 30
BOOT: Final = 1
FRAME_INTERVAL_MS: Final = 10_000  # each frame covers ten seconds of the machine's clock
SLOTS: Final = 40
EVENT_CODES: Final = ("EJC", "EJL", "EGS", "XSD")
# The gateway's MqttSettings.receive_maximum: the raw client gets the same window.
RECEIVE_MAXIMUM: Final = 1000
# Mosquitto's max_queued_messages in gateway/embedded.py: a burst larger than this, sent
# faster than the gateway takes it, is dropped by the broker, not by the gateway.
BROKER_QUEUE: Final = 100_000
SCRATCH_DAY: Final = datetime(2099, 1, 1, 12, tzinfo=UTC)
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
READING_COLUMNS: Final = (
    "received_at",
    "machine_id",
    "boot",
    "seq",
    "idx",
    "at",
    "kind",
    "slot",
    "value",
)
EVENT_COLUMNS: Final = (
    "received_at",
    "machine_id",
    "boot",
    "seq",
    "idx",
    "at",
    "code",
    "slot",
    "active",
)


@dataclass
class TelemetrySettings:
    """What to run."""

    machines: int = 1000
    messages: int = 20_000
    readings: int = 4  # per frame
    event_every: int = 10  # about one frame in this many carries an event
    publishers: int = 4  # gmqtt clients in the generator
    window: int = 500  # unacknowledged PUBLISHes per client
    rate: float | None = None  # messages/s, open loop; None: as fast as possible
    settle_timeout_s: float = 120.0  # after the last PUBACK
    stall_s: float = 15.0  # give up waiting when no frame became durable for this long
    limits: bool = True
    inject_loss: int = 0  # testing: count this many frames as sent but never publish them
    republish: int = 0  # publish this many frames a second time (QoS 1 redelivery)
    seed: int = 1
    topic_prefix: str = "vg"
    batch_rows: int = 5000  # the copy limit's transaction size (telemetry.batch_rows)
    gateway_settings: list[str] = field(default_factory=list)  # --set for the gateway
    broker: str | None = None
    dsn: str | None = None
    workdir: Path | None = None


# --- the plan: the same frames, rebuilt identically by every process -----------------------


@dataclass(frozen=True)
class Plan:
    """The frames of one run, in publishing order; a pure function of these fields."""

    id_prefix: str
    machines: int
    messages: int
    readings: int
    event_every: int
    seed: int
    t0_ms: int

    def machine_id(self, index: int) -> str:
        """Return the id of machine ``index``."""
        return f"{self.id_prefix}-{index:06d}"

    def machine_ids(self) -> list[str]:
        """Return every machine id, by index."""
        return [self.machine_id(i) for i in range(self.machines)]

    def frames(self) -> Iterator[tuple[int, Telemetry]]:
        """Yield (machine index, frame): round robin over the machines, seq from 1."""
        rng = random.Random(self.seed)  # noqa: S311  (load content, not security)
        per_machine = math.ceil(self.messages / self.machines)
        seqs = [0] * self.machines
        for k in range(self.messages):
            m = k % self.machines
            seqs[m] += 1
            seq = seqs[m]
            # The last frame of each machine ends at t0: a batch reports the past.
            t0 = self.t0_ms - (per_machine - seq + 1) * FRAME_INTERVAL_MS
            readings = [
                Reading(0, ReadingKind.TEMPERATURE, None, 400 + rng.randint(-60, 60)),
                Reading(200, ReadingKind.RSSI, None, -65 + rng.randint(-20, 20)),
            ]
            readings.extend(
                Reading(400 + 100 * i, ReadingKind.STOCK, rng.randint(1, SLOTS), rng.randint(0, 12))
                for i in range(max(0, self.readings - 2))
            )
            events: tuple[Event, ...] = ()
            if rng.randrange(self.event_every) == 0:
                code = rng.choice(EVENT_CODES)
                slot = None if code == "EGS" else rng.randint(1, SLOTS)
                events = (
                    Event(rng.randint(0, FRAME_INTERVAL_MS - 1), code, slot, rng.random() < 0.5),
                )
            yield m, Telemetry(BOOT, seq, t0, tuple(readings[: self.readings]), events)

    def skipped(self, count: int) -> set[int]:
        """Return the plan positions an injected loss of ``count`` frames leaves out."""
        count = min(count, self.messages)
        return {i * self.messages // count for i in range(count)} if count else set()


def frame_rows(
    machine_id: str, frame: Telemetry, received_at: datetime | None
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Return a frame's reading and event rows in the column order of the tables.

    Rows are numbered readings first, then events (SPEC §5.2, Telemetry); ``at`` is the
    machine's clock, ``t0_ms + dt_ms``.
    """
    t0 = EPOCH + timedelta(milliseconds=frame.t0_ms)  # exact, unlike a float of seconds

    def at(dt_ms: int) -> datetime:
        return t0 + timedelta(milliseconds=dt_ms)

    readings = [
        (
            received_at,
            machine_id,
            frame.boot,
            frame.seq,
            i,
            at(r.dt_ms),
            int(r.kind),
            r.slot,
            r.value,
        )
        for i, r in enumerate(frame.readings)
    ]
    base = len(frame.readings)
    events = [
        (
            received_at,
            machine_id,
            frame.boot,
            frame.seq,
            base + j,
            at(e.dt_ms),
            e.code,
            e.slot,
            e.active,
        )
        for j, e in enumerate(frame.events)
    ]
    return readings, events


# --- the orchestrator ------------------------------------------------------------------------


async def run_telemetry(settings: TelemetrySettings) -> dict[str, Any]:
    """Run the whole telemetry benchmark and return the JSON result."""
    work = settings.workdir or Path(tempfile.mkdtemp(prefix="vendgate-bench-telemetry-"))
    secret = secrets.token_bytes(32)
    plan = Plan(
        id_prefix=f"tm{secrets.token_hex(3)}",
        machines=settings.machines,
        messages=settings.messages,
        readings=settings.readings,
        event_every=settings.event_every,
        seed=settings.seed,
        t0_ms=int(time.time() * 1000),
    )
    machine_ids = plan.machine_ids()
    skipped = plan.skipped(settings.inject_loss)
    async with contextlib.AsyncExitStack() as stack:
        services = await start_services(stack, work, broker_url=settings.broker, dsn=settings.dsn)
        # The gateway keeps its MQTT client id in its state folder, next to database.data_dir
        # (unused with a DSN): the work directory, not the current one.
        state = [f"database.data_dir={work / 'gateway-state' / 'pgdata'}"]
        await register_machines(services.dsn, machine_ids)
        gateway = await start_gateway(stack, services, secret, state + settings.gateway_settings)
        pool = await asyncpg.create_pool(services.dsn, min_size=1, max_size=2)
        stack.push_async_callback(pool.close)
        base_frames = await _count_frames(pool)

        gen, encoded = await start_generator(
            stack,
            services.broker_url,
            secret,
            plan,
            publishers=settings.publishers,
            window=settings.window,
            rate=settings.rate,
        )
        assert gen.stdin is not None  # noqa: S101  (PIPE was asked for)
        assert gen.stdout is not None  # noqa: S101

        # --- the measured run: the gateway takes the load ---
        frames_expected = settings.messages - len(skipped)
        cpu_before = cpu_seconds(gateway.pid)
        go_wall = time.time()
        await _send(
            gen.stdin,
            {
                "prefix": settings.topic_prefix,
                "skip": sorted(skipped),
                "republish": settings.republish,
            },
        )
        load_task = asyncio.create_task(
            _read_marked(gen.stdout, DONE_MARK), name="bench.telemetry.load"
        )
        waited = await _wait_durable(
            pool,
            load_task,
            base_frames,
            frames_expected,
            gateway.pid,
            settle_timeout_s=settings.settle_timeout_s,
            stall_s=settings.stall_s,
        )
        load = await load_task
        cpu_s = waited.cpu_at_end - cpu_before
        elapsed = time.time() - go_wall
        rss = rss_mb(gateway.pid)

        expected_rows = _expected_rows(plan)
        async with pool.acquire() as conn:
            verdict = await _verify(conn, machine_ids, expected_rows)

        # --- the limits, with the gateway idle ---
        limits: dict[str, Any] = dict(NO_LIMITS)
        if settings.limits:
            limits = await generator_limits(
                gen,
                services.broker_url,
                services.dsn,
                plan,
                topic_prefix=settings.topic_prefix,
                batch_rows=settings.batch_rows,
                stall_s=settings.stall_s,
                timeout_s=settings.settle_timeout_s + 60,
            )
        await stop_generator(gen)
        log_errors = _count_log_errors(gateway.log)

    return _report(
        settings,
        plan,
        encoded=encoded,
        load=load,
        waited=waited,
        verdict=verdict,
        limits=limits,
        cpu_s=cpu_s,
        rss=rss,
        elapsed=elapsed,
        log_errors=log_errors,
        work=work,
    )


@dataclass
class _Waited:
    """What the durable-rows wait saw."""

    frames: int  # frames of this run in telemetry_frames at the end
    end_wall: float  # the poll that saw the last frame become durable (or the load end)
    cpu_at_end: float  # the gateway's CPU seconds at that poll
    complete: bool
    polls: int


async def _count_frames(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM telemetry_frames"))


async def _wait_durable(
    pool: asyncpg.Pool,
    load: asyncio.Task[dict[str, Any]],
    base: int,
    expected: int,
    pid: int,
    *,
    settle_timeout_s: float,
    stall_s: float,
) -> _Waited:
    """Poll the frame ledger until every published frame is in it, or nothing moves.

    The poll interval is half the time the remaining frames should take at the rate seen so
    far, between 20 and 250 ms: the last commit is timed to about 20 ms, without a count(*)
    competing with the gateway all through the run. The gateway's CPU is read at every poll
    and kept from the last one that saw progress.
    """
    last = -1
    start = change_wall = time.time()
    cpu_at_change = cpu_seconds(pid)
    polls = 0
    load_done_at: float | None = None
    while True:
        now = time.time()
        cpu = cpu_seconds(pid)
        frames = await _count_frames(pool) - base
        polls += 1
        if frames != last:
            last, change_wall, cpu_at_change = frames, now, cpu
        if frames >= expected:
            return _Waited(frames, change_wall, cpu_at_change, complete=True, polls=polls)
        if load.done():
            if load_done_at is None:
                load_done_at = now
                if frames == 0:  # nothing yet: time from the end of the load, not the go
                    change_wall, cpu_at_change = now, cpu
            if now - change_wall > stall_s or now - load_done_at > settle_timeout_s:
                return _Waited(frames, change_wall, cpu_at_change, complete=False, polls=polls)
        rate = frames / (now - start) if frames > 0 and now > start else 0.0
        remaining_s = (expected - frames) / rate if rate else math.inf
        await asyncio.sleep(min(0.25, max(0.02, remaining_s / 2)))


def _expected_rows(plan: Plan) -> list[tuple[Any, ...]]:
    """Return the plan's rows in the shape of the verification table.

    (machine, boot, seq, idx, table, kind, slot, value, code, active, at).
    """
    out: list[tuple[Any, ...]] = []
    for m, frame in plan.frames():
        readings, events = frame_rows(plan.machine_id(m), frame, None)
        out.extend((*r[1:5], "r", r[6], r[7], r[8], None, None, r[5]) for r in readings)
        out.extend((*e[1:5], "e", None, e[7], None, e[6], e[8], e[5]) for e in events)
    return out


_VERIFY_SETUP: Final = """
CREATE TEMP TABLE bench_expected (
    machine_id text, boot bigint, seq bigint, idx smallint, t text,
    kind smallint, slot smallint, value integer, code text, active boolean, at timestamptz
) ON COMMIT PRESERVE ROWS;
CREATE TEMP TABLE bench_stored AS
    SELECT machine_id, boot, seq, idx, 'r'::text AS t, kind, slot, value,
           NULL::text AS code, NULL::boolean AS active, at
      FROM telemetry_readings WHERE false;
"""
_VERIFY_FILL: Final = """
INSERT INTO bench_stored
    SELECT machine_id, boot, seq, idx, 'r', kind, slot, value, NULL, NULL, at
      FROM telemetry_readings WHERE machine_id = ANY($1::text[])
    UNION ALL
    SELECT machine_id, boot, seq, idx, 'e', NULL, slot, NULL, code, active, at
      FROM telemetry_events WHERE machine_id = ANY($1::text[])
"""
_VERIFY_QUERY: Final = """
WITH keys AS (
    SELECT machine_id, boot, seq, idx, count(*) AS n FROM bench_stored GROUP BY 1, 2, 3, 4
)
SELECT
    (SELECT count(*) FROM bench_stored) AS rows,
    (SELECT count(*) FROM bench_stored WHERE t = 'r') AS readings,
    (SELECT count(*) FROM bench_stored WHERE t = 'e') AS events,
    (SELECT count(*) FROM keys WHERE n > 1) AS duplicated,
    (SELECT coalesce(sum(n - 1), 0) FROM keys WHERE n > 1) AS duplicate_copies,
    (SELECT count(*) FROM bench_expected e WHERE NOT EXISTS (
        SELECT 1 FROM keys k WHERE (k.machine_id, k.boot, k.seq, k.idx)
                                 = (e.machine_id, e.boot, e.seq, e.idx))) AS lost,
    (SELECT count(*) FROM keys k WHERE NOT EXISTS (
        SELECT 1 FROM bench_expected e WHERE (k.machine_id, k.boot, k.seq, k.idx)
                                           = (e.machine_id, e.boot, e.seq, e.idx))) AS unexpected,
    (SELECT count(*) FROM bench_expected e
      WHERE EXISTS (SELECT 1 FROM keys k WHERE (k.machine_id, k.boot, k.seq, k.idx)
                                             = (e.machine_id, e.boot, e.seq, e.idx))
        AND NOT EXISTS (SELECT 1 FROM bench_stored s
                         WHERE (s.machine_id, s.boot, s.seq, s.idx)
                             = (e.machine_id, e.boot, e.seq, e.idx)
                           AND (s.t, s.kind, s.slot, s.value, s.code, s.active)
                               IS NOT DISTINCT FROM
                               (e.t, e.kind, e.slot, e.value, e.code, e.active))) AS mismatched,
    (SELECT count(*) FROM bench_expected e JOIN bench_stored s
        ON (s.machine_id, s.boot, s.seq, s.idx) = (e.machine_id, e.boot, e.seq, e.idx)
       AND s.t = e.t
     WHERE s.at <> e.at) AS at_mismatched,
    (SELECT count(*) FROM telemetry_frames WHERE machine_id = ANY($1::text[])) AS frames
"""


async def _verify(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    machine_ids: list[str],
    expected: list[tuple[Any, ...]],
) -> dict[str, int]:
    """Compare the rows stored for the run's machines with the plan, by key.

    The key is (machine, boot, seq, idx); the work is done in one session's temporary tables
    and only counts come back.
    """
    await conn.execute(_VERIFY_SETUP)
    try:
        await conn.copy_records_to_table("bench_expected", records=expected)
        await conn.execute(_VERIFY_FILL, machine_ids)
        await conn.execute("ANALYZE bench_expected; ANALYZE bench_stored")
        row = await conn.fetchrow(_VERIFY_QUERY, machine_ids)
    finally:
        await conn.execute("DROP TABLE IF EXISTS bench_expected, bench_stored")
    assert row is not None  # noqa: S101  (an aggregate query returns one row)
    return {key: int(value) for key, value in row.items()}


async def raw_limit(
    broker_url: str,
    gen: asyncio.subprocess.Process,
    *,
    expected: int,
    topic_prefix: str,
    stall_s: float,
    timeout_s: float,
) -> dict[str, Any]:
    """Time one bare subscriber taking the generator's messages, on a prefix nobody else reads.

    ``gen`` is a generator child (`start_generator`), ready, publishing ``expected`` messages
    per command. Three runs: ``live``, subscribed through a shared filter like the gateway's
    while the generator publishes (so it can be no faster than the generator); then
    ``drain`` (gmqtt) and ``drain_codec`` (protocols.mqtt5), the messages queued at the broker
    for the client's offline session first, then taken as fast as the client can, from
    CONNECT to the last message. The limit (``mps``) is the fastest of the three.
    """
    assert gen.stdin is not None  # noqa: S101  (start_generator asks for PIPEs)
    assert gen.stdout is not None  # noqa: S101
    gen_in, gen_out = gen.stdin, gen.stdout
    prefix = f"{topic_prefix}raw"
    topics = Topics(prefix)
    runs: dict[str, dict[str, Any]] = {}
    for mode, client, topic_filter in (
        ("live", "gmqtt", topics.shared_filter(Channel.UP, "vendgate-raw")),
        ("drain", "gmqtt", topics.filter(Channel.UP)),
        ("drain_codec", "mqtt5", topics.filter(Channel.UP)),
    ):
        receiver = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.bench_telemetry",
            "raw",
            json.dumps(
                {
                    "broker": broker_url,
                    "mode": mode,
                    "client": client,
                    "filter": topic_filter,
                    "expected": expected,
                    "stall_s": stall_s,
                }
            ),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert receiver.stdin is not None  # noqa: S101  (PIPE was asked for)
            assert receiver.stdout is not None  # noqa: S101
            await asyncio.wait_for(_read_marked(receiver.stdout, READY_MARK), timeout=60)
            await _send(gen_in, {"prefix": prefix, "skip": [], "republish": 0})
            sent = await _read_marked(gen_out, DONE_MARK)
            await _send(receiver.stdin, {"go": True})
            got = await asyncio.wait_for(
                _read_marked(receiver.stdout, RESULT_MARK), timeout=timeout_s
            )
        finally:
            await _finish(receiver)
        start = sent["first_publish_wall"] if mode == "live" else got["connect_wall"]
        window = got["last_wall"] - start if got["received"] else 0.0
        runs[mode] = {
            "mps": round(got["received"] / window, 1) if window > 0 else None,
            "received": got["received"],
            "window_s": round(window, 3),
            "generator_mps": sent["publish_mps"],
            "filter": topic_filter,
            "client": client,
        }
    rates = [r["mps"] for r in runs.values() if r["mps"] is not None]
    return {
        "mps": max(rates) if rates else None,
        "receive_maximum": RECEIVE_MAXIMUM,
        **runs,
    }


async def copy_limit(dsn: str, plan: Plan, batch_rows: int) -> dict[str, Any]:
    """Time a bare ``COPY`` of ``plan``'s rows into the telemetry tables (``copy`` child).

    Through a scratch partition (or table), dropped afterwards, one transaction per
    ``batch_rows`` rows; ``rows_s`` is the limit.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.bench_telemetry",
        "copy",
        json.dumps({"dsn": dsn, "plan": asdict(plan), "batch_rows": batch_rows}),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None  # noqa: S101  (PIPE was asked for)
        result: dict[str, Any] = await asyncio.wait_for(
            _read_marked(process.stdout, RESULT_MARK), timeout=600
        )
    finally:
        await _finish(process)
    return result


NO_LIMITS: Final[dict[str, Any]] = {"mqtt_raw_ingest_mps": None, "pg_copy_rows_s": None}


async def start_generator(
    stack: contextlib.AsyncExitStack,
    broker_url: str,
    secret: bytes,
    plan: Plan,
    *,
    publishers: int,
    window: int,
    rate: float | None,
) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """Start a generator child (``_gen_main``) for ``plan``; return it once it is ready.

    It has encoded every frame and connected its publishers; each command on its stdin
    publishes the plan once. What it said when ready (``encode_s``, ``rows``,
    ``payload_bytes_mean``) comes back with it. ``stack`` stops it if `stop_generator` does not.
    """
    gen = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.bench_telemetry",
        "gen",
        json.dumps(
            {
                "broker": broker_url,
                "secret": secret.hex(),
                "plan": asdict(plan),
                "publishers": publishers,
                "window": window,
                "rate": rate,
            }
        ),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    stack.push_async_callback(stop_process, gen)
    assert gen.stdout is not None  # noqa: S101  (PIPE was asked for)
    encoded = await asyncio.wait_for(_read_marked(gen.stdout, READY_MARK), timeout=600)
    return gen, encoded


async def stop_generator(gen: asyncio.subprocess.Process) -> None:
    """Close the generator's input: it disconnects its publishers and exits."""
    assert gen.stdin is not None  # noqa: S101  (start_generator asks for PIPEs)
    gen.stdin.close()
    await _finish(gen)


async def generator_limits(
    gen: asyncio.subprocess.Process,
    broker_url: str,
    dsn: str,
    plan: Plan,
    *,
    topic_prefix: str,
    batch_rows: int,
    stall_s: float,
    timeout_s: float,
) -> dict[str, Any]:
    """Measure both limits for ``plan``'s messages with a ready generator (`start_generator`).

    ``mqtt_raw_ingest_mps`` (`raw_limit`) and ``pg_copy_rows_s`` (`copy_limit`), with their
    details under ``mqtt_raw`` and ``pg_copy``. Meant for a quiet host: the gateway idle or
    stopped.
    """
    raw = await raw_limit(
        broker_url,
        gen,
        expected=plan.messages,
        topic_prefix=topic_prefix,
        stall_s=stall_s,
        timeout_s=timeout_s,
    )
    copy = await copy_limit(dsn, plan, batch_rows)
    return {
        "mqtt_raw_ingest_mps": raw["mps"],
        "pg_copy_rows_s": copy["rows_s"],
        "mqtt_raw": raw,
        "pg_copy": copy,
    }


async def measure_limits(
    broker_url: str,
    dsn: str,
    plan: Plan,
    *,
    secret: bytes,
    topic_prefix: str = "vg",
    publishers: int = 4,
    window: int = 500,
    batch_rows: int = 5000,
    stall_s: float = 15.0,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """`generator_limits` with a generator of its own, publishing as fast as it can.

    For other profiles (``vends``, ``mixed``): the same two limits as this profile's, for
    ``plan``'s messages, against their broker and database.
    """
    async with contextlib.AsyncExitStack() as stack:
        gen, _ = await start_generator(
            stack, broker_url, secret, plan, publishers=publishers, window=window, rate=None
        )
        limits = await generator_limits(
            gen,
            broker_url,
            dsn,
            plan,
            topic_prefix=topic_prefix,
            batch_rows=batch_rows,
            stall_s=stall_s,
            timeout_s=timeout_s,
        )
        await stop_generator(gen)
    return limits


async def _finish(process: asyncio.subprocess.Process) -> None:
    """Let a child that has said its last line exit by itself; stop it if it does not."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), timeout=10)
    await stop_process(process)


async def _read_marked(stream: asyncio.StreamReader, mark: str) -> dict[str, Any]:
    """Read a child's stdout until a line starting with ``mark``; return its JSON."""
    while line := await stream.readline():
        text = line.decode()
        if text.startswith(mark):
            value: dict[str, Any] = json.loads(text[len(mark) :])
            return value
    raise RuntimeError(f"a bench child exited before its {mark.strip()} line")


async def _send(stdin: asyncio.StreamWriter, command: dict[str, Any]) -> None:
    stdin.write(json.dumps(command).encode() + b"\n")
    await stdin.drain()


def _count_log_errors(path: Path) -> int:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return 0
    return sum(
        1 for line in text.splitlines() if '"level": "error"' in line or '"level":"error"' in line
    )


def _ratio(value: float | None, limit: float | None) -> float | None:
    if value is None or not limit:
        return None
    return round(value / limit, 3)


def _report(
    settings: TelemetrySettings,
    plan: Plan,
    *,
    encoded: dict[str, Any],
    load: dict[str, Any],
    waited: _Waited,
    verdict: dict[str, int],
    limits: dict[str, Any],
    cpu_s: float,
    rss: float,
    elapsed: float,
    log_errors: int,
    work: Path,
) -> dict[str, Any]:
    msgs = settings.messages
    rows_expected = encoded["rows"]
    window = waited.end_wall - load["first_publish_wall"]
    durable = waited.frames
    mps = round(durable / window, 1) if durable and window > 0 else 0.0
    rows_s = round(verdict["rows"] / window, 1) if verdict["rows"] and window > 0 else 0.0
    cpu_us = round(cpu_s * 1e6 / msgs, 1) if msgs else None
    problems = [
        f"{verdict[key]} rows {key}"
        for key in ("lost", "duplicated", "unexpected", "mismatched")
        if verdict[key]
    ]
    if verdict["rows"] != rows_expected:
        problems.append(f"{verdict['rows']} rows stored, {rows_expected} expected")
    if verdict["at_mismatched"]:
        problems.append(f"{verdict['at_mismatched']} rows with another 'at' than t0_ms + dt_ms")
    if not waited.complete:
        problems.append(
            f"only {durable} of {msgs - settings.inject_loss} published frames became durable"
        )
    if log_errors:
        problems.append(f"{log_errors} error lines in the gateway log")
    raw_limit = limits.get("mqtt_raw_ingest_mps")
    copy_limit = limits.get("pg_copy_rows_s")
    telemetry = {
        "msgs": msgs,
        "rows": verdict["rows"],
        "rows_expected": rows_expected,
        "readings": verdict["readings"],
        "events": verdict["events"],
        "frames_durable": verdict["frames"],
        "mps": mps,
        "rows_s": rows_s,
        "window_s": round(window, 3),
        "gateway_cpu_us_per_msg": cpu_us,
        "lost": verdict["lost"],
        "duplicated": verdict["duplicated"],
        "duplicate_copies": verdict["duplicate_copies"],
        "unexpected": verdict["unexpected"],
        "mismatched": verdict["mismatched"],
        "at_mismatched": verdict["at_mismatched"],
        "generator_mps": load["publish_mps"],
        "published": load["published"],
        "republished": load["republished"],
        "injected_loss": settings.inject_loss,
        "payload_bytes_mean": encoded["payload_bytes_mean"],
        "encode_s": encoded["encode_s"],
        "polls": waited.polls,
    }
    result: dict[str, Any] = {
        "profile": "telemetry",
        "machines": settings.machines,
        # The vend benchmark's keys, kept so tools reading either result find them.
        "vends_requested": 0,
        "vends_accepted": 0,
        "vends_dispensed": 0,
        "vends_not_dispensed": 0,
        "vends_unknown": 0,
        "duplicates": verdict["duplicated"],
        "lost": verdict["lost"],
        "conflicts": 0,
        "webhooks_missing": 0,
        "webhook_duplicate_events": 0,
        "problems": problems[:20],
        "webhook_bad_signatures": 0,
        "throughput_vps": 0.0,
        "latency_ms": {"p50": None, "p95": None, "p99": None, "mean": None},
        "gateway_cpu_us_per_vend": None,
        "gateway_cpu_s": round(cpu_s, 3),
        "gateway_rss_mb": round(rss, 1),
        "elapsed_s": round(elapsed, 2),
        "load": load,
        "settled_in_time": waited.complete,
        "telemetry": telemetry,
        "limits": limits,
        "ratios": {
            "mps_over_mqtt_raw_ingest_mps": _ratio(mps, raw_limit),
            "rows_s_over_pg_copy_rows_s": _ratio(rows_s, copy_limit),
        },
        "target_us_per_msg": TARGET_US_PER_MSG,
        "meets_target": cpu_us is not None
        and cpu_us <= TARGET_US_PER_MSG
        and waited.complete
        and verdict["lost"] == 0,
        "settings": {
            "messages": msgs,
            "readings_per_frame": settings.readings,
            "event_every": settings.event_every,
            "publishers": settings.publishers,
            "window": settings.window,
            "rate": settings.rate,
            "settle_timeout_s": settings.settle_timeout_s,
            "stall_s": settings.stall_s,
            "inject_loss": settings.inject_loss,
            "republish": settings.republish,
            "seed": settings.seed,
            "topic_prefix": settings.topic_prefix,
            "machine_id_prefix": plan.id_prefix,
            "copy_batch_rows": settings.batch_rows,
            "gateway_settings": settings.gateway_settings,
            "broker_queue_limit": BROKER_QUEUE,
        },
        "workdir": str(work),
    }
    result["passed"] = passed(result)
    return result


def passed(result: dict[str, Any]) -> bool:
    """Return whether every row sent is stored exactly once, as sent."""
    t = result["telemetry"]
    return bool(
        t["lost"] == 0
        and t["duplicated"] == 0
        and t["unexpected"] == 0
        and t["mismatched"] == 0
        and t["rows"] == t["rows_expected"]
    )


def summary(result: dict[str, Any]) -> str:
    """Return the human summary of a result."""
    t, limits, ratios = result["telemetry"], result["limits"], result["ratios"]
    return (
        f"machines {result['machines']}, messages {t['msgs']} "
        f"(generator {t['generator_mps']} msg/s): rows {t['rows']} of {t['rows_expected']}, "
        f"frames durable {t['frames_durable']}\n"
        f"lost {t['lost']}, duplicated {t['duplicated']}, unexpected {t['unexpected']}, "
        f"mismatched {t['mismatched']}\n"
        f"durable {t['mps']} msg/s ({t['rows_s']} rows/s) over {t['window_s']} s; gateway CPU "
        f"{t['gateway_cpu_us_per_msg']} us/msg (target {result['target_us_per_msg']}: "
        f"{'met' if result['meets_target'] else 'not met'}), RSS {result['gateway_rss_mb']} MB\n"
        f"limits: MQTT raw ingest {limits['mqtt_raw_ingest_mps']} msg/s, "
        f"PostgreSQL COPY {limits['pg_copy_rows_s']} rows/s; ratios "
        f"{ratios['mps_over_mqtt_raw_ingest_mps']} and {ratios['rows_s_over_pg_copy_rows_s']}"
        + ("\nproblems: " + "; ".join(result["problems"]) if result["problems"] else "")
    )


def markdown(result: dict[str, Any]) -> str:
    """Return a short Markdown report of a result."""
    t, limits, ratios, s = (
        result["telemetry"],
        result["limits"],
        result["ratios"],
        result["settings"],
    )
    raw = limits.get("mqtt_raw") or {}
    live, drain = raw.get("live") or {}, raw.get("drain") or {}
    codec = raw.get("drain_codec") or {}
    copy = limits.get("pg_copy") or {}
    verdict = "PASS" if result["passed"] else "FAIL"
    target = "met" if result["meets_target"] else "not met"
    pace = f"at {s['rate']} msg/s" if s["rate"] else "as fast as they could"
    extras = ""
    if s["republish"]:
        extras += f" {s['republish']} frames were published twice (QoS 1 redelivery)."
    if s["inject_loss"]:
        extras += f" {s['inject_loss']} frames were counted as sent but never published (test)."
    ran = (
        f"- {result['machines']} registered machines; {t['msgs']} `Telemetry` frames (QoS 1, "
        f"{s['readings_per_frame']} readings each, an event in about 1 of {s['event_every']}; "
        f"{t['payload_bytes_mean']} bytes on average), encoded with each machine's key before "
        f"the timed part and published by {s['publishers']} gmqtt clients with a window of "
        f"{s['window']} unacknowledged messages each, {pace}.{extras}"
    )
    lines = [
        "# vendgate telemetry benchmark",
        "",
        (
            f"Exactly-once: **{verdict}**. Gateway CPU {t['gateway_cpu_us_per_msg']} µs/msg "
            f"against a target of {result['target_us_per_msg']} µs/msg: **{target}**."
        ),
        "",
        "## What ran",
        "",
        (
            "- A private Mosquitto and PostgreSQL, the gateway (`vendgate run`) and a load "
            f"generator, each its own process (work directory `{result['workdir']}`)."
        ),
        ran,
        (
            "- After the load, the frame ledger was polled until every frame was durable; the "
            "stored rows were then compared with the plan by (machine, boot, seq, idx)."
        ),
        "",
        "## Numbers",
        "",
        "| measure | value |",
        "|---|---|",
        f"| messages sent | {t['msgs']} |",
        f"| generator publish rate | {t['generator_mps']} msg/s |",
        f"| frames durable | {t['frames_durable']} |",
        f"| rows durable / expected | {t['rows']} / {t['rows_expected']} |",
        (
            f"| lost / duplicated / unexpected / mismatched | {t['lost']} / {t['duplicated']} "
            f"/ {t['unexpected']} / {t['mismatched']} |"
        ),
        (
            f"| durable rate, first PUBLISH to last commit ({t['window_s']} s) | {t['mps']} "
            f"msg/s, {t['rows_s']} rows/s |"
        ),
        f"| gateway CPU | {result['gateway_cpu_s']} s, {t['gateway_cpu_us_per_msg']} µs/msg |",
        f"| gateway RSS | {result['gateway_rss_mb']} MB |",
        "",
        "## Limits (same run, same broker and database, gateway idle)",
        "",
        "| limit | value | our rate over it |",
        "|---|---|---|",
        (
            "| MQTT raw ingest: one bare client, same messages, the fastest of gmqtt live "
            f"(`{live.get('filter')}` while the generator publishes: {live.get('mps')} msg/s), "
            f"gmqtt drain (queued first, `{drain.get('filter')}`: {drain.get('mps')} msg/s) "
            f"and protocols.mqtt5 drain ({codec.get('mps')} msg/s) "
            f"| {limits['mqtt_raw_ingest_mps']} msg/s "
            f"| {ratios['mps_over_mqtt_raw_ingest_mps']} |"
        ),
        (
            "| PostgreSQL `copy_records_to_table`, same rows, same tables "
            f"({copy.get('into')}), {copy.get('batch_rows')} rows per transaction "
            f"| {limits['pg_copy_rows_s']} rows/s | {ratios['rows_s_over_pg_copy_rows_s']} |"
        ),
        "",
        (
            "The COPY limit writes rows only; the gateway also records each frame in the "
            "`telemetry_frames` ledger, to skip redelivered frames."
        ),
    ]
    if result["problems"]:
        lines += ["", "## Problems", "", *(f"- {p}" for p in result["problems"])]
    return "\n".join(lines) + "\n"


# --- child processes -------------------------------------------------------------------------


class _Window:
    """gmqtt's store of unacknowledged PUBLISHes, used as a flow-control window.

    gmqtt calls ``push_message`` inside ``Client.publish`` and ``remove_message_by_mid``
    on PUBACK; the publisher waits while ``inflight`` is at the window size.
    """

    def __init__(self) -> None:
        self.inflight = 0
        self.acked = 0
        self.last_ack_wall = 0.0
        self.freed = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()

    def push_message(self, mid: int, raw_package: bytes) -> None:  # noqa: ARG002
        self.inflight += 1
        self._empty.clear()

    def remove_message_by_mid(self, mid: int) -> None:  # noqa: ARG002
        self.inflight -= 1
        self.acked += 1
        self.freed.set()
        if self.inflight <= 0:
            self.last_ack_wall = time.time()
            self._empty.set()

    @property
    def is_empty(self) -> bool:
        return self.inflight <= 0

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def clear(self) -> None:
        self.inflight = 0
        self._empty.set()

    def get_all(self) -> list[tuple[int, bytes]]:
        return []


async def _gen_main(args: dict[str, Any]) -> None:
    """Encode the plan, connect the publishers, then publish once per command on stdin."""
    host, port = mqtt_address(args["broker"])
    plan = Plan(**args["plan"])
    keys = KeyRing(bytes.fromhex(args["secret"]))
    n_pub = max(1, min(args["publishers"], plan.machines))
    started = time.perf_counter()
    machine_ids = plan.machine_ids()
    # Per publisher: (machine index, payload, plan position), in plan order.
    queues: list[list[tuple[int, bytes, int]]] = [[] for _ in range(n_pub)]
    total_bytes = rows = 0
    for k, (m, frame) in enumerate(plan.frames()):
        payload = encode(frame, keys.key(machine_ids[m]))
        queues[m % n_pub].append((m, payload, k))
        total_bytes += len(payload)
        rows += len(frame.readings) + len(frame.events)
    encode_s = time.perf_counter() - started

    clients: list[Any] = []
    windows: list[_Window] = []
    token = secrets.token_hex(3)
    for p in range(n_pub):
        window = _Window()
        client = gmqtt.Client(
            f"vg-bench-pub-{token}-{p}", clean_session=True, persistent_storage=window
        )
        await client.connect(host, port, keepalive=60, version=MQTTv50)
        clients.append(client)
        windows.append(window)
    sys.stdout.write(
        READY_MARK
        + json.dumps(
            {
                "encode_s": round(encode_s, 3),
                "rows": rows,
                "payload_bytes_mean": round(total_bytes / max(1, plan.messages), 1),
            }
        )
        + "\n"
    )
    sys.stdout.flush()

    try:
        while line := await asyncio.to_thread(sys.stdin.readline):
            command = json.loads(line)
            result = await _publish_all(
                clients,
                windows,
                queues,
                Topics(command["prefix"]),
                machine_ids,
                skip=set(command["skip"]),
                republish=command["republish"],
                window_size=args["window"],
                rate=args["rate"],
            )
            sys.stdout.write(DONE_MARK + json.dumps(result) + "\n")
            sys.stdout.flush()
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.disconnect()


async def _publish_all(
    clients: list[Any],
    windows: list[_Window],
    queues: list[list[tuple[int, bytes, int]]],
    topics: Topics,
    machine_ids: list[str],
    *,
    skip: set[int],
    republish: int,
    window_size: int,
    rate: float | None,
) -> dict[str, Any]:
    topic_of = [topics.topic(m, Channel.UP) for m in machine_ids]
    qos = QOS[Channel.UP]
    first: list[float] = []
    published = [0] * len(clients)
    again = [0] * len(clients)
    per_client_rate = rate / len(clients) if rate else None

    async def run(p: int) -> None:
        client, window = clients[p], windows[p]
        # The window cannot exceed the broker's Receive Maximum: gmqtt runs out of ids.
        ids = client._package_handler.id_generator._max  # noqa: SLF001  (gmqtt has no API)
        limit = max(1, min(window_size, ids - 2))
        items = [item for item in queues[p] if item[2] not in skip]
        extra = [item for item in queues[p] if item[2] < republish]
        start = time.perf_counter()
        if not first:
            first.append(time.time())
        for i, (m, payload, _) in enumerate(items + extra):
            while window.inflight >= limit:
                window.freed.clear()
                await window.freed.wait()
            if per_client_rate is not None:
                delay = start + i / per_client_rate - time.perf_counter()
                if delay > 0.001:
                    await asyncio.sleep(delay)
            client.publish(topic_of[m], payload, qos=qos)
            if i < len(items):
                published[p] += 1
            else:
                again[p] += 1
            if i % 64 == 63:
                await asyncio.sleep(0)  # let PUBACKs in between bursts
        await window.wait_empty()

    started = time.perf_counter()
    await asyncio.gather(*(run(p) for p in range(len(clients))))
    elapsed = time.perf_counter() - started
    total = sum(published) + sum(again)
    last_ack = max(w.last_ack_wall for w in windows)
    span = last_ack - first[0] if first else 0.0
    return {
        "published": sum(published),
        "republished": sum(again),
        "first_publish_wall": first[0] if first else time.time(),
        "last_puback_wall": last_ack,
        "elapsed_s": round(elapsed, 3),
        "publish_mps": round(total / span, 1) if span > 0 else None,
        "prefix": topics.prefix,
    }


class _CodecReceiver(asyncio.Protocol):
    """The cheapest receiver we have: protocols.mqtt5 on a bare transport, PUBACK at once."""

    def __init__(self, on_message: Callable[[], None]) -> None:
        self._reader = mqtt5.Reader()
        self._on_message = on_message
        self._transport: asyncio.Transport | None = None
        self.acks: dict[type, asyncio.Future[Any]] = {}

    def expect(self, kind: type) -> asyncio.Future[Any]:
        future = self.acks[kind] = asyncio.get_running_loop().create_future()
        return future

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        out: list[bytes] = []
        on_message, publish, puback = self._on_message, mqtt5.Publish, mqtt5.puback
        for packet in self._reader.feed(data):
            if type(packet) is publish:
                on_message()
                if packet.qos:
                    out.append(puback(packet.packet_id))
            else:
                future = self.acks.pop(type(packet), None)
                if future is not None and not future.done():
                    future.set_result(packet)
        if out and self._transport is not None:
            self._transport.write(b"".join(out))

    def send(self, data: bytes) -> None:
        assert self._transport is not None  # noqa: S101
        self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def _codec_connect(
    host: str,
    port: int,
    client_id: str,
    *,
    clean: bool,
    expiry_s: int,
    on_message: Callable[[], None],
) -> _CodecReceiver:
    receiver = _CodecReceiver(on_message)
    await asyncio.get_running_loop().create_connection(lambda: receiver, host, port)
    connack = receiver.expect(mqtt5.ConnAck)
    receiver.send(
        mqtt5.connect(
            client_id,
            clean_start=clean,
            keepalive_s=60,
            session_expiry_s=expiry_s,
            receive_maximum=RECEIVE_MAXIMUM,
        )
    )
    if (await asyncio.wait_for(connack, 30)).reason_code >= 0x80:
        raise RuntimeError("the broker refused the raw receiver")
    return receiver


class _RawCount:
    """What a raw receiver counts, and how it waits for the end and reports it."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.first = 0.0
        self.last = 0.0
        self.done = asyncio.Event()

    def tick(self) -> None:
        """Count one message."""
        now = time.time()
        if not self.received:
            self.first = now
        self.received += 1
        self.last = now
        if self.received >= self.expected:
            self.done.set()

    async def report(self, connect_wall: float, stall_s: float) -> None:
        """Wait until complete, or until nothing arrived for ``stall_s``; print the result."""
        seen = -1
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), timeout=stall_s)
            if self.received == seen:
                break
            seen = self.received
        result = {
            "received": self.received,
            "connect_wall": connect_wall,
            "first_wall": self.first,
            "last_wall": self.last,
        }
        sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
        sys.stdout.flush()


async def _raw_main(args: dict[str, Any]) -> None:
    """One bare client: subscribe, count messages, acknowledge, nothing else.

    ``client``: ``gmqtt``, or ``mqtt5`` (`_CodecReceiver`). ``live``: stays connected;
    ``drain*``: subscribes on a session that outlives the connection, disconnects so the
    broker queues what is published, and comes back for it on the command from stdin.
    """
    if args["client"] == "mqtt5":
        await _raw_codec_main(args)
        return
    host, port = mqtt_address(args["broker"])
    count = _RawCount(args["expected"])
    drain = args["mode"].startswith("drain")
    subscribed = asyncio.Event()
    client_id = f"vg-bench-raw-{secrets.token_hex(3)}"

    def on_message(_client: object, _topic: str, _payload: bytes, _qos: int, _props: object) -> int:
        count.tick()
        return 0

    def new_client(*, clean: bool) -> Any:  # noqa: ANN401  (gmqtt ships no types)
        client = gmqtt.Client(
            client_id,
            clean_session=clean,
            receive_maximum=RECEIVE_MAXIMUM,
            session_expiry_interval=600 if drain else 0,
        )
        client.on_message = on_message
        client.on_subscribe = lambda *_: subscribed.set()
        return client

    client = new_client(clean=True)
    await client.connect(host, port, keepalive=60, version=MQTTv50)
    client.subscribe(gmqtt.Subscription(args["filter"], qos=1))
    await asyncio.wait_for(subscribed.wait(), timeout=30)
    if drain:
        await client.disconnect()
    sys.stdout.write(READY_MARK + "{}\n")
    sys.stdout.flush()
    await asyncio.to_thread(sys.stdin.readline)  # published (and queued, for drain)
    connect_wall = time.time()
    if drain:
        client = new_client(clean=False)
        await client.connect(host, port, keepalive=60, version=MQTTv50)
    await count.report(connect_wall, args["stall_s"])
    with contextlib.suppress(Exception):
        await client.disconnect()


async def _raw_codec_main(args: dict[str, Any]) -> None:
    """`_raw_main` with `_CodecReceiver`, in the drain mode only."""
    host, port = mqtt_address(args["broker"])
    count = _RawCount(args["expected"])
    client_id = f"vg-bench-raw-{secrets.token_hex(3)}"
    receiver = await _codec_connect(
        host, port, client_id, clean=True, expiry_s=600, on_message=count.tick
    )
    suback = receiver.expect(mqtt5.SubAck)
    receiver.send(mqtt5.subscribe(1, [(args["filter"], mqtt5.subscription_options(1))]))
    await asyncio.wait_for(suback, 30)
    receiver.send(mqtt5.disconnect())
    receiver.close()
    sys.stdout.write(READY_MARK + "{}\n")
    sys.stdout.flush()
    await asyncio.to_thread(sys.stdin.readline)  # published and queued
    connect_wall = time.time()
    receiver = await _codec_connect(
        host, port, client_id, clean=False, expiry_s=0, on_message=count.tick
    )
    await count.report(connect_wall, args["stall_s"])
    receiver.send(mqtt5.disconnect())
    receiver.close()


async def _copy_main(args: dict[str, Any]) -> None:
    """COPY the plan's rows into the telemetry tables, through a scratch partition."""
    plan = Plan(**args["plan"])
    batch_rows: int = args["batch_rows"]
    batches: list[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]] = [([], [])]
    for m, frame in plan.frames():
        readings, events = frame_rows(plan.machine_id(m), frame, SCRATCH_DAY)
        current = batches[-1]
        current[0].extend(readings)
        current[1].extend(events)
        if len(current[0]) + len(current[1]) >= batch_rows:
            batches.append(([], []))
    rows = sum(len(r) + len(e) for r, e in batches)
    token = secrets.token_hex(3)
    conn = await asyncpg.connect(args["dsn"])
    created: list[str] = []
    into = "scratch partition"
    try:
        targets = {}
        for table in ("telemetry_readings", "telemetry_events"):
            scratch = f"{table}_bench_{token}"
            kind = await conn.fetchval(
                "SELECT relkind::text FROM pg_class WHERE oid = $1::regclass", table
            )
            if kind == "p":
                # Rows go through the parent, as the gateway's do, into a day of their own.
                await conn.execute(
                    f"CREATE TABLE {scratch} PARTITION OF {table} "
                    "FOR VALUES FROM ('2099-01-01') TO ('2099-01-02')"
                )
                targets[table] = table
            else:
                await conn.execute(f"CREATE TABLE {scratch} (LIKE {table} INCLUDING ALL)")
                targets[table] = scratch
                into = "scratch table"
            created.append(scratch)
        started = time.perf_counter()
        for readings, events in batches:
            async with conn.transaction():
                if readings:
                    await conn.copy_records_to_table(
                        targets["telemetry_readings"], records=readings, columns=READING_COLUMNS
                    )
                if events:
                    await conn.copy_records_to_table(
                        targets["telemetry_events"], records=events, columns=EVENT_COLUMNS
                    )
        elapsed = time.perf_counter() - started
    finally:
        for scratch in created:
            await conn.execute(f"DROP TABLE IF EXISTS {scratch}")
        await conn.close()
    result = {
        "rows_s": round(rows / elapsed, 1) if elapsed > 0 else None,
        "rows": rows,
        "elapsed_s": round(elapsed, 3),
        "batch_rows": batch_rows,
        "transactions": sum(1 for r, e in batches if r or e),
        "into": into,
    }
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def _child(role: str, raw: str) -> int:
    configure_logging("warning", "json", sys.stderr)  # stdout carries the results
    args = json.loads(raw)
    if role == "gen":
        asyncio.run(_gen_main(args))
    elif role == "raw":
        asyncio.run(_raw_main(args))
    elif role == "copy":
        asyncio.run(_copy_main(args))
    else:
        raise SystemExit(f"unknown role {role!r}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: telemetry bench child processes")
    parser.add_argument("role", choices=["gen", "raw", "copy"])
    parser.add_argument("args")
    ns = parser.parse_args()
    raise SystemExit(_child(ns.role, ns.args))
