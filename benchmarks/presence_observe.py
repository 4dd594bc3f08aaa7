"""Measure the cost of presence tracking per verified uplink frame.

``PresenceService.observe`` runs for every uplink frame the gateway accepts, so its common case
(a fresh frame, same boot, from a machine already online) must stay within a small share of
the ~30 µs a telemetry message may cost in all. This prints the µs per call of:

* ``PresenceTracker.observe`` with a ``Telemetry`` frame (the common case) and a
  ``Heartbeat`` (signal strength, heartbeat gap);
* ``PresenceService.observe``, what the gateway calls: the tracker plus the metrics;
* ``PresenceTracker.take_changes`` per changed machine, where the saved views are built;
* the bare loop (a no-op function), included in every figure above, for reference.

Every figure is the median of ``--runs`` runs of ``--calls`` calls (time.perf_counter), over
``--machines`` online machines taken round-robin, with the garbage collector off while timing
(as ``timeit`` does). ``--table-only`` times the tracker with its fast path turned off.

    python -m benchmarks.presence_observe [--calls 200000] [--runs 5] [--machines 1000]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.config import SessionsConfig
from gateway.logs import configure_logging
from gateway.sessions import PresenceService, PresenceTracker, SessionMetrics
from protocols.frames import (
    Heartbeat,
    Hello,
    Presence,
    Reading,
    ReadingKind,
    Telemetry,
    UplinkFrame,
)

BOOT = 3
READINGS = (
    Reading(0, ReadingKind.TEMPERATURE, None, 412),
    Reading(0, ReadingKind.STOCK, 1, 12),
    Reading(0, ReadingKind.STOCK, 2, 7),
    Reading(250, ReadingKind.RSSI, None, -67),
)

Batch = list[tuple[str, UplinkFrame]]


class _Fleet:
    """Machines brought online once; hands out batches of fresh frames, round-robin."""

    def __init__(self, machines: int) -> None:
        self.ids = [f"VM-{n:05d}" for n in range(machines)]
        self.seq = 2  # Presence is seq 1, Hello seq 2 (SPEC §5.2)

    def connect(self, observe: Callable[[str, UplinkFrame], object]) -> None:
        for machine_id in self.ids:
            observe(machine_id, Presence(boot=BOOT, seq=1, session=1, online=True))
            observe(machine_id, Hello(BOOT, 2, "fw/1.4.2", 7, 0))

    def batch(self, calls: int, *, heartbeat: bool) -> Batch:
        out: Batch = []
        t0_ms = int(time.time() * 1000)
        for n in range(calls):
            if n % len(self.ids) == 0:
                self.seq += 1
            frame: UplinkFrame
            if heartbeat:
                frame = Heartbeat(BOOT, self.seq, t0_ms + n, -60 - n % 20, n, False)  # noqa: FBT003
            else:
                frame = Telemetry(BOOT, self.seq, t0_ms + n, READINGS, ())
            out.append((self.ids[n % len(self.ids)], frame))
        self.seq += 1  # the next batch starts a new round for every machine
        return out


def _timed(observe: Callable[[str, UplinkFrame], object], batch: Batch) -> float:
    gc.disable()
    try:
        start = time.perf_counter()
        for machine_id, frame in batch:
            observe(machine_id, frame)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return elapsed / len(batch) * 1e6


def _median(samples: Sequence[float]) -> str:
    return f"{statistics.median(samples):6.3f} µs  (runs: {', '.join(f'{s:.3f}' for s in samples)})"


def _service(tracker_options: dict[str, Any]) -> PresenceService:
    # observe() does no I/O: the pool is only used by load, flush and expire, never called here.
    service = PresenceService(
        None,  # type: ignore[arg-type]  # see above: no pool needed to observe
        SessionsConfig(),
        SessionMetrics(CollectorRegistry()),
    )
    service.tracker = PresenceTracker(time.time, **tracker_options)
    return service


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=200_000, help="calls per run (>= 200000)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--table-only", action="store_true", help="turn the fast path off")
    args = parser.parse_args()
    options: dict[str, Any] = {"fast_path": False} if args.table_only else {}
    configure_logging("info", "console")  # as in production: no per-frame debug lines

    def noop(machine_id: str, frame: UplinkFrame) -> None:
        pass

    results: dict[str, list[float]] = {}
    for name, heartbeat in [("Telemetry", False), ("Heartbeat", True)]:
        fleet = _Fleet(args.machines)
        tracker = PresenceTracker(time.time, **options)
        fleet.connect(tracker.observe)
        service = _service(options)
        fleet.connect(service.observe)
        for kind, observe in [
            ("tracker", tracker.observe),
            ("service", service.observe),
            ("bare loop", noop),
        ]:
            key = f"{kind:9} {name}"
            results[key] = []
            for _ in range(args.runs):
                batch = fleet.batch(args.calls, heartbeat=heartbeat)
                results[key].append(_timed(observe, batch))
                if kind == "tracker":
                    tracker.take_changes()
                elif kind == "service":
                    service.tracker.take_changes()

    # take_changes builds the view of every machine changed since the last one: once per
    # machine per flush, whatever the number of frames.
    fleet = _Fleet(args.machines)
    tracker = PresenceTracker(time.time, **options)
    fleet.connect(tracker.observe)
    tracker.take_changes()
    taken: list[float] = []
    for _ in range(args.runs):
        for machine_id, frame in fleet.batch(len(fleet.ids), heartbeat=True):
            tracker.observe(machine_id, frame)
        start = time.perf_counter()
        changes = tracker.take_changes()
        taken.append((time.perf_counter() - start) / len(changes.machines) * 1e6)

    print(
        f"presence observe: {args.calls} calls x {args.runs} runs, {args.machines} machines"
        f"{', fast path off' if args.table_only else ''}; median µs per call"
    )
    for key, samples in results.items():
        print(f"  {key:22} {_median(samples)}")
    print(f"  {'take_changes/machine':22} {_median(taken)}")


if __name__ == "__main__":
    main()
