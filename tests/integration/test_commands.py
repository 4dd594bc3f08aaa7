"""The README's commands run for real: the demo and the benchmark, as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.store.db import migrations

pytestmark = pytest.mark.integration


def _vendgate(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603  (our own command, fixed arguments)
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_demo_runs_on_embedded_defaults_and_holds_exactly_once(tmp_path: Path) -> None:
    """`vendgate demo` starts everything itself, vends with faults, and reports exactly-once."""
    done = _vendgate("demo", "--duration", "20", cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "exactly-once: holds" in done.stdout
    assert "dispensed twice:           0" in done.stdout
    dispensed = next(line for line in done.stdout.splitlines() if "dispensed:" in line)
    assert int(dispensed.split()[-1]) > 0


def test_bench_writes_the_json_contract_and_passes(tmp_path: Path) -> None:
    """`vendgate bench` runs gateway, fleet and load as processes and writes every key."""
    out = tmp_path / "bench.json"
    done = _vendgate(
        "bench",
        "--machines",
        "5",
        "--vends",
        "60",
        "--rate",
        "30",
        "--json",
        str(out),
        cwd=tmp_path,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    for key in (
        "machines",
        "vends_requested",
        "vends_accepted",
        "vends_dispensed",
        "vends_not_dispensed",
        "duplicates",
        "lost",
        "conflicts",
        "throughput_vps",
        "gateway_cpu_us_per_vend",
    ):
        assert key in result, key
    assert set(result["latency_ms"]) >= {"p50", "p95", "p99"}
    assert result["vends_accepted"] == 60
    assert result["vends_dispensed"] == 60
    assert (result["duplicates"], result["lost"], result["conflicts"]) == (0, 0, 0)
    assert result["webhooks_missing"] == 0


def test_bench_storm_brings_every_machine_back_and_the_api_answers(tmp_path: Path) -> None:
    """A broker restart under a connected fleet: every machine back, the API answering."""
    out = tmp_path / "storm.json"
    done = _vendgate(
        "bench",
        "--profile",
        "storm",
        "--machines",
        "300",
        "--api-rps",
        "40",
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(out),
        cwd=tmp_path,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "storm: PASS" in done.stdout
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["initial_online"] == 300
    assert result["recovered"] == {"new_sessions": 300, "online": 300}
    assert result["recovered_online_s"] <= 30
    storm = result["api"]["storm"]
    assert storm["requests"] > 0
    assert set(storm["statuses"]) == {"200"}


def test_migrate_applies_the_schema_once(database: str, tmp_path: Path) -> None:
    """`vendgate migrate` applies every migration, and a second run has nothing to do."""
    args = ("--set", f"database.dsn={database}", "migrate")
    first = _vendgate(*args, cwd=tmp_path, timeout=60)
    assert first.returncode == 0, first.stderr[-2000:]
    versions = [m.version for m in migrations()]
    assert f"applied migrations: {versions}" in first.stdout
    second = _vendgate(*args, cwd=tmp_path, timeout=60)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "up to date" in second.stdout


def test_bench_telemetry_stores_every_row_once_and_measures_its_limits(tmp_path: Path) -> None:
    """`vendgate bench --profile telemetry` stores every row once, redeliveries included."""
    out = tmp_path / "telemetry.json"
    done = _vendgate(
        "bench",
        "--profile",
        "telemetry",
        "--machines",
        "20",
        "--messages",
        "3000",
        "--republish",
        "100",
        "--json",
        str(out),
        cwd=tmp_path,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "exactly-once: PASS" in done.stdout
    result = json.loads(out.read_text(encoding="utf-8"))
    for key in ("machines", "elapsed_s", "gateway_cpu_s", "gateway_rss_mb", "settings", "workdir"):
        assert key in result, key
    for key in ("vends_accepted", "throughput_vps", "gateway_cpu_us_per_vend", "latency_ms"):
        assert key in result, key  # the vend benchmark's keys stay, zeroed
    telemetry = result["telemetry"]
    for key in ("msgs", "rows", "rows_expected", "frames_durable", "mps", "lost", "duplicated"):
        assert key in telemetry, key
    assert telemetry["msgs"] == 3000
    assert telemetry["frames_durable"] == 3000
    assert telemetry["rows"] == telemetry["rows_expected"] > 4 * 3000
    assert (telemetry["lost"], telemetry["duplicated"], telemetry["mismatched"]) == (0, 0, 0)
    assert telemetry["republished"] == 100
    assert telemetry["mps"] > 0
    assert telemetry["gateway_cpu_us_per_msg"] > 0
    assert result["limits"]["mqtt_raw_ingest_mps"] > 0
    assert result["limits"]["pg_copy_rows_s"] > 0
    assert set(result["ratios"]) == {"mps_over_mqtt_raw_ingest_mps", "rows_s_over_pg_copy_rows_s"}
    assert result["target_us_per_msg"] == 30
    assert isinstance(result["meets_target"], bool)
    report = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "Limits" in report
    assert "PASS" in report


def test_bench_telemetry_fails_when_rows_are_missing(tmp_path: Path) -> None:
    """Frames counted as sent but never published make the telemetry bench exit 1."""
    out = tmp_path / "telemetry.json"
    done = _vendgate(
        "bench",
        "--profile",
        "telemetry",
        "--machines",
        "5",
        "--messages",
        "500",
        "--inject-loss",
        "7",
        "--no-limits",
        "--json",
        str(out),
        cwd=tmp_path,
        timeout=240,
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "exactly-once: FAIL" in done.stdout
    telemetry = json.loads(out.read_text(encoding="utf-8"))["telemetry"]
    assert telemetry["lost"] >= 7 * 4  # at least the readings of the frames never sent
    assert telemetry["rows"] == telemetry["rows_expected"] - telemetry["lost"]
    assert telemetry["duplicated"] == 0
