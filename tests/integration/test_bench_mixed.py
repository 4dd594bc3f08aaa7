"""`vendgate bench --profile mixed`: a small run end to end, and its telemetry check alone."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from gateway import bench, bench_telemetry
from gateway.store import db, partitions
from tests.integration.test_commands import _vendgate

pytestmark = pytest.mark.integration


def test_bench_mixed_stores_vends_and_telemetry_once_and_measures_three_limits(
    tmp_path: Path,
) -> None:
    """5 machines, 20 vends at 20/s while the fleet publishes 50 frames/s: all stored once."""
    out = tmp_path / "mixed.json"
    done = _vendgate(
        "bench",
        "--profile",
        "mixed",
        "--machines",
        "5",
        "--vends",
        "20",
        "--rate",
        "20",
        "--telemetry-rate",
        "50",
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(out),
        cwd=tmp_path,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "exactly-once: PASS" in done.stdout
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["profile"] == "mixed"
    for key in (  # the vends profile's keys stay
        "machines",
        "vends_requested",
        "vends_accepted",
        "vends_dispensed",
        "duplicates",
        "lost",
        "conflicts",
        "throughput_vps",
        "latency_ms",
        "gateway_cpu_us_per_vend",
        "cpu_cores_busy",
    ):
        assert key in result, key
    assert (result["vends_accepted"], result["vends_dispensed"]) == (20, 20)
    assert (result["duplicates"], result["lost"], result["conflicts"]) == (0, 0, 0)

    telemetry = result["telemetry"]
    assert telemetry["published"] >= 20  # about a second of vends at 50 frames/s
    assert telemetry["msgs"] == telemetry["published"]
    assert telemetry["rows"] == 4 * telemetry["msgs"]  # 4 readings a frame, no event
    assert 0 < telemetry["mps"] <= 2 * 50
    assert (result["telemetry_lost"], result["telemetry_duplicated"]) == (0, 0)
    assert telemetry["unexpected"] == 0

    limits = result["limits"]
    for key in ("http_rps", "mqtt_raw_ingest_mps", "pg_copy_rows_s"):
        assert limits[key] > 0, key
    # The HTTP limit is measured in closed loop, not at the run's pace of 20/s: a bare
    # handler answers 20 requests far faster than one second.
    assert limits["http"]["rate"] is None
    assert limits["http_rps"] > 40
    ratios = result["ratios"]
    assert set(ratios) == {
        "vps_over_http_rps",
        "telemetry_mps_over_mqtt_raw_ingest_mps",
        "telemetry_rows_s_over_pg_copy_rows_s",
    }
    assert all(value is not None and value >= 0 for value in ratios.values()), ratios

    report = out.with_suffix(".md").read_text(encoding="utf-8")
    assert report.startswith("# vendgate mixed benchmark")
    assert "Telemetry: published" in report
    assert "MQTT raw ingest" in report


@pytest.mark.asyncio
async def test_the_telemetry_check_finds_lost_copied_and_doubled_frames(database: str) -> None:
    """`check_telemetry` on rows written by hand: each kind of fault is counted once."""
    conn = await asyncpg.connect(database)
    try:
        await db.migrate(conn)
        await partitions.ensure(conn, [datetime.now(UTC).date()])
        since = await conn.fetchval("SELECT now()")
        # Machine a published frames 1..5 (seq 10..14), b frames 1..2 (seq 3..4).
        frames = [("a", 10 + n, n) for n in range(5)] + [("b", 3 + n, n) for n in range(2)]
        # a's frame 3 (seq 12) is lost; b's frame 2 is stored a second time under seq 9 (a
        # re-publish); a's frame 5 misses a reading; a's frame 1 has a reading twice; b has a
        # frame 99 it never published.
        stored = [f for f in frames if f[1] != 12] + [("b", 9, 1), ("b", 20, 98)]
        await conn.executemany(
            "INSERT INTO telemetry_frames (machine_id, boot, seq) VALUES ($1, 1, $2)",
            [(m, seq) for m, seq, _ in stored],
        )
        now = datetime.now(UTC)
        rows = []
        for machine, seq, index in stored:
            readings = list(enumerate(bench.telemetry_readings(index + 1, 4, 10)))
            if (machine, seq) == ("a", 14):
                readings = readings[:3]
            if (machine, seq) == ("a", 10):
                readings.append(readings[1])
            rows += [
                (now, machine, 1, seq, idx, now, int(r.kind), r.slot, r.value)
                for idx, r in readings
            ]
        await conn.copy_records_to_table(
            "telemetry_readings",
            records=rows,
            columns=bench_telemetry.READING_COLUMNS,
        )
    finally:
        await conn.close()
    pool = await db.create_pool(database, min_size=1, max_size=1)
    try:
        published = {"published": 7, "sent": [5, 2], "unsent": []}
        counts = await bench.check_telemetry(pool, ["a", "b"], since, published, 4)
        nothing = await bench.check_telemetry(pool, ["c"], since, {}, 4)
    finally:
        await pool.close()
    assert counts["msgs"] == 8  # 6 of the 7 published, the re-published copy, the stranger
    assert (counts["missing"], counts["incomplete"]) == (1, 1)
    assert (counts["copied"], counts["rows_twice"], counts["unexpected"]) == (1, 1, 1)
    result = bench.telemetry_result(counts, published, rate=1.0, readings=4, durable_in_time=True)
    assert (result["lost"], result["duplicated"]) == (2, 2)
    assert (nothing["msgs"], nothing["readings"], nothing["missing"]) == (0, 0, 0)
