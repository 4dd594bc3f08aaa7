"""The pure parts of `vendgate bench` (profiles vends and mixed): ratios, findings, report."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest

from gateway import bench
from gateway.cli import build_parser


def _telemetry(**changes: Any) -> dict[str, Any]:
    """Return a result's ``telemetry`` as `bench.telemetry_result` builds it: none sent."""
    telemetry: dict[str, Any] = {
        "msgs": 0,
        "rows": 0,
        "mps": 0.0,
        "rows_s": 0.0,
        "window_s": 0.0,
        "rate": 0.0,
        "readings_per_frame": 4,
        "events": 0,
        "published": 0,
        "unsent": 0,
        "fleet_publish_mps": None,
        "lost": 0,
        "duplicated": 0,
        "unexpected": 0,
        "durable_in_time": True,
    }
    telemetry.update(changes)
    return telemetry


def _mixed(**changes: Any) -> dict[str, Any]:
    """Return a mixed-profile result: open loop at 200 vends/s, 1,000 frames/s of telemetry."""
    telemetry = _telemetry(
        msgs=10000,
        rows=40000,
        mps=1000.0,
        rows_s=4000.0,
        window_s=10.0,
        rate=1000.0,
        published=10000,
        fleet_publish_mps=999.9,
    )
    result = _result(profile="mixed", telemetry=telemetry)
    result["settings"] = {**result["settings"], "rate": 200.0, "telemetry_rate": 1000.0}
    result["ratios"] = bench.ratios(result["throughput_vps"], result["limits"], telemetry)
    result.update(changes)
    return result


def _result(**changes: Any) -> dict[str, Any]:
    """Return a result as `bench._report` builds it, by hand: two gateways, limits measured."""
    result: dict[str, Any] = {
        "profile": "vends",
        "machines": 50,
        "vends_requested": 1000,
        "vends_accepted": 1000,
        "vends_dispensed": 998,
        "vends_not_dispensed": 2,
        "vends_unknown": 0,
        "duplicates": 0,
        "lost": 0,
        "conflicts": 0,
        "webhooks_missing": 0,
        "webhook_duplicate_events": 0,
        "problems": [],
        "webhook_bad_signatures": 0,
        "throughput_vps": 400.0,
        "latency_ms": {"p50": 120.5, "p95": 300.0, "p99": 410.2, "mean": 150.1},
        "latency_stages_ms": {
            "accepted_to_sent": {"p50": 100.0, "p99": 380.0, "vends": 1000},
            "sent_to_final": {"p50": 20.5, "p99": 30.0, "vends": 1000},
        },
        "gateway_cpu_us_per_vend": 1500.0,
        "gateway_cpu_s": 1.5,
        "gateway_rss_mb": 107.0,
        "elapsed_s": 3.2,
        "load": {
            "accepted": 1000,
            "statuses": {"202": 1000},
            "elapsed_s": 2.0,
            "post_rps": 500.0,
            "post_p99_ms": 90.0,
            "gateways": 2,
        },
        "settled_in_time": True,
        "settings": {
            "rate": None,
            "concurrency": 64,
            "dispense_ms": 0,
            "deadline_s": 60,
            "slots": 10,
            "gateways": 2,
            "limits": True,
            "broker": "embedded",
            "database": "embedded",
        },
        "workdir": "bench-work",
        "gateways": 2,
        "gateway_cpu_s_each": [0.9, 0.6],
        "gateway_rss_mb_each": [53.5, 53.5],
        "fleet_cpu_s": 0.25,
        "loadgen_cpu_s": 0.4,
        "cpu_window_s": 2.5,
        "cpu_cores_busy": {
            "gateways": 0.6,
            "gateway_each": [0.36, 0.24],
            "fleet": 0.1,
            "loadgen": 0.2,
            "host": 1.2,
            "other": 0.34,
            "host_cpus": 2,
        },
        "limits": {
            "http_rps": 5000.0,
            "http": {
                "rps": 5000.0,
                "requests": 1000,
                "answered_202": 1000,
                "statuses": {"202": 1000},
                "elapsed_s": 0.2,
                "post_p99_ms": 30.0,
                "rate": None,
                "concurrency": 64,
                "server": "aiohttp, one process",
                "server_cpu_s": 0.08,
                "server_cpu_us_per_request": 80.0,
                "loadgen_cpu_s": 0.19,
                "loadgen_cores": 0.95,
            },
            "mqtt_raw_ingest_mps": 200000.0,
            "pg_copy_rows_s": 150000.0,
            "mqtt_raw": {
                "mps": 200000.0,
                "receive_maximum": 1000,
                "live": {"mps": 12000.0, "received": 10000},
                "drain": {"mps": 25000.0, "received": 10000},
                "drain_codec": {"mps": 200000.0, "received": 10000},
            },
            "pg_copy": {
                "rows_s": 150000.0,
                "rows": 40000,
                "batch_rows": 5000,
                "into": "scratch partition",
            },
        },
        "telemetry": _telemetry(),
        "telemetry_lost": 0,
        "telemetry_duplicated": 0,
        "ratios": {
            "vps_over_http_rps": 0.08,
            "telemetry_mps_over_mqtt_raw_ingest_mps": None,
            "telemetry_rows_s_over_pg_copy_rows_s": None,
        },
        "target_us_per_vend": 250,
        "meets_target": False,
        "passed": True,
    }
    result.update(changes)
    result["bottlenecks"] = bench.bottlenecks(result)
    return result


NO_TELEMETRY_RATIOS = {
    "telemetry_mps_over_mqtt_raw_ingest_mps": None,
    "telemetry_rows_s_over_pg_copy_rows_s": None,
}


def test_ratio_over_the_http_limit() -> None:
    """Throughput over the bare handler's rate, rounded to three places."""
    assert bench.ratios(400.0, {"http_rps": 5000.0}) == {
        "vps_over_http_rps": 0.08,
        **NO_TELEMETRY_RATIOS,
    }
    assert bench.ratios(266.4, {"http_rps": 3000.0})["vps_over_http_rps"] == 0.089


def test_telemetry_ratios_over_the_mqtt_and_copy_limits() -> None:
    """Durable msg/s over the raw MQTT ingest, rows/s over the bare COPY, three places."""
    limits = {"http_rps": 5000.0, "mqtt_raw_ingest_mps": 200000.0, "pg_copy_rows_s": 150000.0}
    telemetry = {"msgs": 10000, "mps": 1000.0, "rows_s": 4000.0}
    assert bench.ratios(400.0, limits, telemetry) == {
        "vps_over_http_rps": 0.08,
        "telemetry_mps_over_mqtt_raw_ingest_mps": 0.005,
        "telemetry_rows_s_over_pg_copy_rows_s": 0.027,
    }
    # No telemetry in the run (the vends profile): the limits are there, the ratios are not.
    assert bench.ratios(400.0, limits, _telemetry()) == {
        "vps_over_http_rps": 0.08,
        **NO_TELEMETRY_RATIOS,
    }
    # Telemetry, but the limits skipped (--no-limits): no ratio either.
    assert bench.ratios(400.0, dict(bench.NO_LIMITS), telemetry) == {
        "vps_over_http_rps": None,
        **NO_TELEMETRY_RATIOS,
    }


@pytest.mark.parametrize(
    ("throughput", "limits"),
    [
        (400.0, {"http_rps": None}),  # --no-limits
        (400.0, {}),
        (400.0, {"http_rps": 0.0}),  # nothing answered: no division by zero
        (None, {"http_rps": 5000.0}),
    ],
)
def test_ratio_is_none_without_a_limit(throughput: float | None, limits: dict[str, Any]) -> None:
    """A missing, skipped or zero limit gives no ratio, and no error."""
    assert bench.ratios(throughput, limits) == {"vps_over_http_rps": None, **NO_TELEMETRY_RATIOS}


def test_markdown_reports_the_run_the_verdict_the_limit_and_the_cpu() -> None:
    """The report has what ran, the results, the verdict with counts, limits and CPU."""
    text = bench.markdown(_result())
    assert text.startswith("# vendgate vend benchmark\n")
    for section in ("## What ran", "## Results", "## Exactly-once", "## Limits", "## Where"):
        assert section in text
    assert "Exactly-once: **PASS**" in text
    assert "1500.0 µs/vend against a target of 250 µs/vend: **not met**" in text
    assert "2 gateway processes" in text
    assert "closed loop with 64 requests in flight" in text
    assert "50 machines (10 slots, dispense 0 ms); 1000 vends" in text
    assert "| 120.5 / 300.0 / 410.2 ms (150.1 ms) |" in text
    assert "| of which accepted to sent (waiting in the gateway), p50 / p99 | 100.0 / 380.0" in text
    assert "| gateway CPU (sum) | 1.5 s, 1500.0 µs/vend" in text
    assert "| gateway RSS (each = sum) | 53.5 + 53.5 = 107.0 MB |" in text
    assert "dispensed 998, not dispensed 2, unknown 0; duplicates 0, lost 0, conflicts 0" in text
    assert "| 5000.0 requests/s | 0.08 |" in text
    assert "80.0 µs of CPU per request" in text
    # The load generator was saturated in the limit run: the report says so.
    assert "The load generator was CPU-bound here" in text
    assert "| gateway 1 | 0.9 | 0.36 |" in text
    assert "| gateway 2 | 0.6 | 0.24 |" in text
    assert "| fleet (50 machines) | 0.25 | 0.10 |" in text
    assert "| load generator (over its own 2.0 s) | 0.4 | 0.20 |" in text
    assert "| host, every process | | 1.20 of 2 |" in text
    assert "The fleet was not the bottleneck (0.10 of a core)." in text
    assert "The load generator was not the bottleneck (0.20 of a core)." in text
    assert "No process was CPU-bound" in text


def test_markdown_of_a_single_gateway_in_open_loop_without_limits() -> None:
    """One gateway: no sums; open loop: the rate; --no-limits: said, with no ratio."""
    result = _result(
        gateways=1,
        gateway_cpu_s_each=[1.5],
        gateway_rss_mb_each=[53.5],
        gateway_rss_mb=53.5,
        limits=dict(bench.NO_LIMITS),
        ratios=bench.ratios(400.0, dict(bench.NO_LIMITS)),
    )
    result["settings"] = {**result["settings"], "rate": 200.0, "gateways": 1}
    result["cpu_cores_busy"] = {**result["cpu_cores_busy"], "gateway_each": [0.6]}
    text = bench.markdown(result)
    assert "1 gateway process (" in text
    assert "open loop at 200 vends/s (at most 64 requests in flight)" in text
    assert "| gateway CPU | 1.5 s" in text
    assert "| gateway RSS | 53.5 MB |" in text
    assert "Not measured (`--no-limits`)." in text
    assert "| gateway 2 |" not in text


def test_markdown_of_a_failed_run_lists_the_problems() -> None:
    """A duplicate makes the verdict FAIL, and the problems are listed."""
    result = _result(duplicates=1, problems=["vend v-1 dispensed twice"])
    text = bench.markdown(result)
    assert "Exactly-once: **FAIL**" in text
    assert "- vend v-1 dispensed twice" in text
    assert not bench.passed(result)


def test_a_webhook_missing_fails_the_run() -> None:
    """Every outcome must reach the backend: the run fails on one event never delivered."""
    assert bench.passed(_result())
    assert not bench.passed(_result(webhooks_missing=1))


def test_markdown_keeps_to_what_was_measured() -> None:
    """A result without CPU figures says 'not measured' rather than failing."""
    result = _result(gateway_cpu_us_per_vend=None)
    result["cpu_cores_busy"] = {"host_cpus": 2}
    result.pop("fleet_cpu_s")
    text = bench.markdown(result)
    assert "not measured" in text
    assert "The fleet's CPU was not measured." in text


def test_bottlenecks_name_saturated_processes_and_the_host() -> None:
    """At least 0.9 of a core is a bound for one process; 90 % of the CPUs for the host."""
    cores = {
        "gateway_each": [0.95, 0.5],
        "fleet": 0.92,
        "loadgen": 0.3,
        "host": 1.85,
        "host_cpus": 2,
    }
    assert bench.bottlenecks({"cpu_cores_busy": cores}) == ["gateway 1", "fleet", "host"]
    assert bench.bottlenecks({"cpu_cores_busy": {**cores, "host": 1.7}})[-1] == "fleet"
    assert bench.bottlenecks({}) == []
    findings = bench.cpu_findings(_result(cpu_cores_busy=cores))
    assert any(line.startswith("Gateway 1 was CPU-bound") for line in findings)
    assert any(line.startswith("The fleet was CPU-bound (0.92") for line in findings)
    assert any("CPUs were saturated, 1.85 cores" in line for line in findings)
    assert not any("No process was CPU-bound" in line for line in findings)


def test_latency_stages_split_accepted_to_final() -> None:
    """Accepted to sent, and sent to the first final state, per vend, in ms."""
    history = [
        ("a", "accepted", 10.0),
        ("a", "sent", 10.5),
        ("a", "acknowledged", 10.6),
        ("a", "dispensed", 10.7),
        ("b", "accepted", 11.0),
        ("b", "sent", 11.1),
        ("b", "expired", 12.1),
        ("c", "accepted", 12.0),  # never sent
    ]
    stages = bench.latency_stages(history)
    assert stages["accepted_to_sent"]["vends"] == 2
    assert stages["accepted_to_sent"]["p99"] == pytest.approx(500.0)
    assert stages["sent_to_final"]["vends"] == 2
    assert stages["sent_to_final"]["p50"] == pytest.approx(200.0, abs=0.1)
    assert stages["sent_to_final"]["p99"] == pytest.approx(1000.0, abs=0.1)
    assert bench.latency_stages([]) == {
        "accepted_to_sent": {"p50": 0.0, "p99": 0.0, "vends": 0},
        "sent_to_final": {"p50": 0.0, "p99": 0.0, "vends": 0},
    }


@pytest.mark.parametrize(("machines", "gateways"), [(50, 2), (1, 2), (4, 2), (5, 3), (50, 1)])
def test_requests_spread_evenly_and_every_machine_meets_every_gateway(
    machines: int, gateways: int
) -> None:
    """Round robin over the gateways, without tying a machine to one of them."""
    requests = machines * gateways * 4
    share = Counter(bench.gateway_of(i, gateways, machines) for i in range(requests))
    assert share == dict.fromkeys(range(gateways), requests // gateways)
    for machine in range(machines):
        met = {bench.gateway_of(i, gateways, machines) for i in range(machine, requests, machines)}
        assert met == set(range(gateways))


def test_summary_adds_the_processes_and_the_limit() -> None:
    """The printed summary keeps its first lines and adds CPU per process and the limit."""
    result = _result()
    text = bench.summary(result)
    assert text.splitlines()[0].startswith("machines 50, vends accepted 1000")
    assert "gateways 2 (CPU 1.5 s, each [0.9, 0.6] s" in text
    assert "fleet CPU 0.25 s (0.10 core)" in text
    assert "limit: bare aiohttp 5000.0 requests/s; vends/s over it 0.08" in text
    assert "telemetry: 0 msgs, 0 rows durable, 0.0 msg/s" in text
    assert (
        "limits: MQTT raw ingest 200000.0 msg/s, PostgreSQL COPY 150000.0 rows/s; "
        "no telemetry in this run to compare"
    ) in text
    old = copy.deepcopy(result)
    for key in ("gateways", "cpu_cores_busy", "limits", "ratios", "telemetry"):
        old.pop(key)
    assert len(bench.summary(old).splitlines()) == 4  # a result from before these keys


def test_bench_arguments_for_gateways_and_limits() -> None:
    """--gateways N (at least 1) and --no-limits reach the vends profile."""
    parser = build_parser()
    args = parser.parse_args(["bench", "--gateways", "3", "--no-limits"])
    assert (args.profile, args.gateways, args.limits) == ("vends", 3, False)
    defaults = parser.parse_args(["bench"])
    assert (defaults.gateways, defaults.limits) == (1, True)
    assert defaults.telemetry_rate is None  # the profile decides: 0 for vends, 1000 for mixed
    telemetry = parser.parse_args(["bench", "--profile", "telemetry", "--no-limits"])
    assert telemetry.limits is False
    mixed = parser.parse_args(["bench", "--profile", "mixed", "--telemetry-rate", "50"])
    assert (mixed.profile, mixed.telemetry_rate, mixed.readings) == ("mixed", 50.0, 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--telemetry-rate", "-1"])
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--gateways", "0"])


def test_latency_findings_name_the_wait_before_sending() -> None:
    """A wait before sending that dominates the latency is called out, more with gateways."""
    assert bench.latency_findings(_result()) == []  # 100 ms waiting: nothing to say
    stages = {
        "accepted_to_sent": {"p50": 27000.0, "p99": 58000.0, "vends": 1000},
        "sent_to_final": {"p50": 24.0, "p99": 270.0, "vends": 1000},
    }
    findings = bench.latency_findings(_result(latency_stages_ms=stages))
    assert findings[0].startswith("Most of the latency was spent before the vend was sent")
    assert "With 2 gateways" in findings[1]
    assert len(bench.latency_findings(_result(latency_stages_ms=stages, gateways=1))) == 1
    assert "queued in the gateway" in bench.markdown(_result(latency_stages_ms=stages))


def test_a_busy_host_is_said_to_slow_the_processes() -> None:
    """Between 70 % and 90 % of the host busy: no process bound, but they competed."""
    result = _result()
    result["cpu_cores_busy"] = {**result["cpu_cores_busy"], "host": 1.6}
    result["bottlenecks"] = bench.bottlenecks(result)
    findings = bench.cpu_findings(result)
    assert any(line.startswith("The host was busy, 1.60 of 2 cores") for line in findings)
    assert any("slowed each other down" in line for line in findings)
    assert not any(line.startswith("No process was CPU-bound") for line in findings)


def test_markdown_of_a_mixed_run_shows_the_telemetry_its_check_and_its_limits() -> None:
    """Profile mixed: the telemetry sent, durable and checked, and its two limits with ratios."""
    text = bench.markdown(_mixed())
    assert text.startswith("# vendgate mixed benchmark (vends and telemetry)\n")
    assert "Exactly-once: **PASS**" in text
    assert (
        "- The fleet also published `Telemetry` frames (QoS 1, 4 readings each), open loop at "
        "1000 frames/s in total"
    ) in text
    assert "10000 published, at 999.9 frames/s" in text
    assert "| telemetry durable: messages / rows | 10000 / 40000 |" in text
    assert (
        "| telemetry rate, start to last durable frame (10.0 s) | 1000.0 msg/s, 4000.0 rows/s |"
    ) in text
    assert (
        "Telemetry: published 10000, durable 10000 frames (40000 rows); lost 0, duplicated 0"
        in (text)
    )
    assert "MQTT raw ingest: one bare client receiving 10000 `Telemetry` frames" in text
    assert "(12000.0 msg/s), gmqtt taking them queued (25000.0 msg/s)" in text
    assert "| 200000.0 msg/s | 0.005 |" in text
    assert "40000 rows into the telemetry tables, scratch partition, 5000 rows per" in text
    assert "| 150000.0 rows/s | 0.027 |" in text
    assert "paced at 1000 frames/s (open loop)" in text
    assert "no telemetry in this run" not in text


def test_markdown_of_a_vend_run_has_the_telemetry_limits_without_ratios() -> None:
    """Profile vends: no telemetry sent, zeros shown, the limits measured and no ratio."""
    text = bench.markdown(_result())
    assert "- No telemetry was published (`--telemetry-rate 0`)." in text
    assert "| telemetry durable: messages / rows | 0 / 0 |" in text
    assert "| 200000.0 msg/s | none: no telemetry in this run |" in text
    assert "| 150000.0 rows/s | none: no telemetry in this run |" in text
    assert "paced at" not in text


def test_telemetry_lost_or_duplicated_fails_the_run() -> None:
    """A frame lost or stored twice fails exactly-once like a vend duplicate; both named."""
    assert bench.passed(_mixed())
    for key, sentence in (
        ("lost", "2 telemetry frames published by the fleet and not stored (whole)"),
        ("duplicated", "2 telemetry frames stored more than once"),
    ):
        telemetry = {**_mixed()["telemetry"], key: 2}
        result = _mixed(telemetry=telemetry, **{f"telemetry_{key}": 2})
        assert not bench.passed(result)
        assert bench.telemetry_problems(telemetry) == [sentence]
        assert "Exactly-once: **FAIL**" in bench.markdown(result)
    unexpected = {**_mixed()["telemetry"], "unexpected": 1}
    assert not bench.passed(_mixed(telemetry=unexpected))
    late = _telemetry(msgs=90, published=100, durable_in_time=False)
    assert bench.telemetry_problems(late) == [
        "only 90 of 100 telemetry frames published became durable"
    ]
    # A result from before the telemetry keys still passes on its vend counts.
    old = _result()
    for key in ("telemetry", "telemetry_lost", "telemetry_duplicated"):
        old.pop(key)
    assert bench.passed(old)


def test_telemetry_result_from_the_counts() -> None:
    """Rates over the window; lost = missing + incomplete; duplicated = copied + rows twice."""
    counts = {
        "msgs": 1000,
        "readings": 4000,
        "events": 2,
        "window_s": 2.5,
        "published": 1003,
        "missing": 2,
        "incomplete": 1,
        "copied": 1,
        "rows_twice": 3,
        "unexpected": 0,
    }
    fleet = {"published": 1003, "sent": [500, 504], "unsent": [[1, 7]], "publish_mps": 401.2}
    t = bench.telemetry_result(counts, fleet, rate=400.0, readings=4, durable_in_time=False)
    assert (t["msgs"], t["rows"], t["mps"], t["rows_s"]) == (1000, 4002, 400.0, 1600.8)
    assert (t["lost"], t["duplicated"], t["unexpected"]) == (3, 4, 0)
    assert (t["published"], t["unsent"], t["fleet_publish_mps"]) == (1003, 1, 401.2)
    assert t["durable_in_time"] is False
    # No telemetry at all: zeros, and a rate of 0.0 rather than a division by zero.
    none = {"msgs": 0, "readings": 0, "events": 0, "window_s": None}
    t = bench.telemetry_result(none, {}, rate=0.0, readings=4, durable_in_time=True)
    assert (t["msgs"], t["rows"], t["mps"], t["rows_s"], t["lost"]) == (0, 0, 0.0, 0.0, 0)


def test_expected_frames_are_every_number_built_less_the_unsent() -> None:
    """Machine m built frames 1..sent[m]; the unsent ones are not expected in the database."""
    machines, numbers = bench.expected_frames(["a", "b", "c"], [2, 3, 0], [(1, 2)])
    assert list(zip(machines, numbers, strict=True)) == [("a", 1), ("a", 2), ("b", 1), ("b", 3)]


@pytest.mark.parametrize("count", [1, 2, 4, 10])
def test_the_fleet_numbers_each_frame_in_reading_0(count: int) -> None:
    """Reading 0's value is the frame's number; the others are plausible and in range."""
    for number in (1, 2, 77, 100_000):
        readings = bench.telemetry_readings(number, count, slots=10)
        assert len(readings) == count
        assert readings[0].value == number
        assert all(r.slot is None or 1 <= r.slot <= 10 for r in readings)
        assert all(r.check() is None for r in readings)


def test_summary_of_a_mixed_run_adds_telemetry_and_its_limits() -> None:
    """The summary says what telemetry was stored and how it compares with its limits."""
    text = bench.summary(_mixed())
    assert (
        "telemetry: 10000 msgs, 40000 rows durable, 1000.0 msg/s (published 10000 at 1000/s); "
        "lost 0, duplicated 0"
    ) in text
    assert "PostgreSQL COPY 150000.0 rows/s; telemetry over them 0.005 and 0.027" in text
