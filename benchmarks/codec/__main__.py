"""Measure frame sizes and the median cost of encode+MAC and decode+verify.

Each measurement runs ``--batches`` batches of ``--ops`` operations and reports
the median of the per-operation batch means, with the 10th and 90th percentile
batches to show the spread on a shared machine. Batches are timed in CPU time of
the benchmark's thread: the budgets are CPU time, and on a shared machine wall
time would also count the time other processes held the CPU. Baselines (one
HMAC, one msgpack pack/unpack of the same body) are measured in the same run so
the codec's own overhead can be read as a ratio.

The uplink frames the gateway decodes most (telemetry above all: the gateway's
budget is about 30 us of CPU per telemetry message, receive to store) are then
decoded again in ``--runs`` interleaved runs, direction UP enforced as on the
gateway's ``up`` subscription; the report gives the median of the runs' medians
and the slowest and fastest run.
"""

from __future__ import annotations

import argparse
import hmac
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from hashlib import sha256
from pathlib import Path

import msgpack

from protocols.codec import FrameKey, decode, derive_machine_key, encode, encode_body
from protocols.frames import (
    AckCode,
    Direction,
    Dispense,
    Event,
    FailReason,
    Frame,
    Heartbeat,
    Outcome,
    Reading,
    ReadingKind,
    Telemetry,
    Vend,
    VendAck,
    VendResult,
)

TARGET_VEND_BYTES = 64
TARGET_US = 10.0
#: The telemetry frame the gateway sees most: 4 readings, and an event in 1 frame of 10.
TARGET_TELEMETRY = "Telemetry(4 readings + 1 event)"
#: Frames timed again in the decode runs, in the order they are reported.
DECODE_FRAMES = (
    "VendAck",
    "Heartbeat",
    "Telemetry(4 readings)",
    TARGET_TELEMETRY,
    "Telemetry(10 readings)",
)


def _readings(count: int) -> tuple[Reading, ...]:
    """Return readings as the reference machine batches them: temperature, RSSI, stock per slot."""
    first = (
        Reading(0, ReadingKind.TEMPERATURE, None, 415),
        Reading(200, ReadingKind.RSSI, None, -67),
    )
    stock = tuple(Reading(400 + 100 * i, ReadingKind.STOCK, i + 1, 7) for i in range(count - 2))
    return (first + stock)[:count]


def _frames() -> dict[str, Frame]:
    deadline = int(time.time()) + 60
    return {
        "Vend": Vend(0x0123456789ABCDEF, 12, 350, deadline, 1),
        "Vend(max)": Vend(2**64 - 1, 255, 2**32 - 1, 2**32 - 1, 255),
        "VendAck": VendAck(1_000_001, 123_456, 0x0123456789ABCDEF, 1, AckCode.ACCEPTED, False),  # noqa: FBT003
        "VendResult": VendResult(
            1_000_001,
            123_457,
            0x0123456789ABCDEF,
            Dispense(Outcome.DISPENSED, FailReason.NONE, True, 1840, 0),  # noqa: FBT003
        ),
        "Heartbeat": Heartbeat(1_000_001, 123_459, deadline * 1000, -67, 86_400, False),  # noqa: FBT003
        "Telemetry(4 readings)": Telemetry(1_000_001, 123_460, deadline * 1000, _readings(4), ()),
        TARGET_TELEMETRY: Telemetry(
            1_000_001,
            123_461,
            deadline * 1000,
            _readings(4),
            (Event(1_234, "EJC", 3, True),),  # noqa: FBT003
        ),
        "Telemetry(10 readings)": Telemetry(
            1_000_001,
            123_458,
            deadline * 1000,
            tuple(Reading(i * 100, ReadingKind.TEMPERATURE, None, 415 + i) for i in range(10)),
            (),
        ),
    }


WARMUP_BATCHES = 3


def _time(fn: Callable[[], object], ops: int, batches: int) -> dict[str, float]:
    for _ in range(WARMUP_BATCHES * ops):  # warm caches and the allocator; not measured
        fn()
    means = []
    for _ in range(batches):
        start = time.thread_time_ns()
        for _ in range(ops):
            fn()
        means.append((time.thread_time_ns() - start) / ops / 1000)
    means.sort()
    return {
        "median_us": round(statistics.median(means), 3),
        "p10_us": round(means[len(means) // 10], 3),
        "p90_us": round(means[(len(means) * 9) // 10], 3),
    }


def _decode_runs(
    frames: dict[str, Frame], key: FrameKey, ops: int, batches: int, runs: int
) -> dict[str, object]:
    """Time uplink decode+verify in ``runs`` rounds over all frames, so drift hits them alike."""
    calls = {
        name: partial(decode, encode(frames[name], key), key, direction=Direction.UP)
        for name in DECODE_FRAMES
    }
    medians: dict[str, list[float]] = {name: [] for name in DECODE_FRAMES}
    for _ in range(runs):
        for name, call in calls.items():
            medians[name].append(_time(call, ops, batches)["median_us"])
    return {
        name: {
            "median_us": round(statistics.median(values), 3),
            "fastest_run_us": min(values),
            "slowest_run_us": max(values),
            "runs_us": values,
        }
        for name, values in medians.items()
    }


def run(ops: int, batches: int, runs: int) -> dict[str, object]:
    """Measure everything and return the results as a JSON-ready dict."""
    raw_key = derive_machine_key(b"\x07" * 32, "VM-BENCH")
    key = FrameKey(raw_key)
    frames = _frames()
    results: dict[str, object] = {}
    for name, frame in frames.items():
        data = encode(frame, key)
        body = encode_body(frame)
        items = msgpack.unpackb(body)
        direction = frame.DIRECTION
        results[name] = {
            "bytes": len(data),
            "encode": _time(partial(encode, frame, key), ops, batches),
            "decode": _time(partial(decode, data, key, direction=direction), ops, batches),
            "encode_raw_key": _time(partial(encode, frame, raw_key), ops, batches),
            "baseline_hmac": _time(partial(hmac.digest, raw_key, body, sha256), ops, batches),
            "baseline_packb": _time(partial(msgpack.packb, items), ops, batches),
            "baseline_unpackb": _time(partial(msgpack.unpackb, body), ops, batches),
        }
    return {
        "benchmark": "codec",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "ops_per_batch": ops,
        "batches": batches,
        "frames": results,
        "decode_runs": runs,
        "decode_up": _decode_runs(frames, key, ops, batches, runs),
    }


def _report(doc: dict[str, object]) -> bool:
    frames = doc["frames"]
    assert isinstance(frames, dict)  # noqa: S101  (built by run())
    print(
        f"codec benchmark, Python {doc['python']}, medians of {doc['batches']} batches, "
        "thread CPU time"
    )
    print(
        f"{'frame':32} {'bytes':>5} {'encode us':>10} {'decode us':>10} {'hmac us':>8} "
        f"{'packb us':>8} {'unpackb us':>10}"
    )
    ok = True
    for name, r in frames.items():
        print(
            f"{name:32} {r['bytes']:5d} {r['encode']['median_us']:10.2f} "
            f"{r['decode']['median_us']:10.2f} {r['baseline_hmac']['median_us']:8.2f} "
            f"{r['baseline_packb']['median_us']:8.2f} {r['baseline_unpackb']['median_us']:10.2f}"
        )
    decode_up = doc["decode_up"]
    assert isinstance(decode_up, dict)  # noqa: S101  (built by run())
    print(
        f"\ndecode+verify, direction UP: median of {doc['decode_runs']} runs "
        f"(each the median of {doc['batches']} batches)"
    )
    print(f"{'frame':32} {'bytes':>5} {'decode us':>10} {'fastest':>8} {'slowest':>8}")
    for name, r in decode_up.items():
        print(
            f"{name:32} {frames[name]['bytes']:5d} {r['median_us']:10.2f} "
            f"{r['fastest_run_us']:8.2f} {r['slowest_run_us']:8.2f}"
        )
    vend = frames["Vend"]
    telemetry = decode_up[TARGET_TELEMETRY]["median_us"]
    biggest = frames["Vend(max)"]["bytes"]
    enc, dec = vend["encode"]["median_us"], vend["decode"]["median_us"]
    checks = [
        (
            f"Vend frame <= {TARGET_VEND_BYTES} bytes",
            biggest <= TARGET_VEND_BYTES,
            f"{biggest} bytes at maximum field values, {vend['bytes']} typical",
        ),
        (f"Vend encode+MAC median <= {TARGET_US} us", enc <= TARGET_US, f"{enc} us"),
        (f"Vend decode+verify median <= {TARGET_US} us", dec <= TARGET_US, f"{dec} us"),
        (
            f"{TARGET_TELEMETRY} decode+verify median <= {TARGET_US} us",
            telemetry <= TARGET_US,
            f"{telemetry} us",
        ),
    ]
    for label, passed, detail in checks:
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'}  {label}: {detail}")
    return ok


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table, optionally write JSON; exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(description="vendgate codec benchmark")
    parser.add_argument("--ops", type=int, default=2000, help="operations per batch")
    parser.add_argument("--batches", type=int, default=41, help="batches per measurement")
    parser.add_argument(
        "--runs", type=int, default=5, help="runs of the uplink decode measurements"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    doc = run(args.ops, args.batches, args.runs)
    ok = _report(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
