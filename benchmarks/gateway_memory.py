"""Measure the gateway's memory per tracked machine: a fixed base plus a cost per machine.

The performance goal: at most 2 KiB of gateway memory per machine above a fixed base. For each
count N of ``--machines`` (default 0, 1,000, 5,000 and 10,000), a fresh gateway process
(``vendgate run``) starts against a fresh database on one embedded PostgreSQL and a fresh
private Mosquitto (persistence off, so nothing is retained from an earlier point). N machines
are registered in the database before the gateway starts, as a gateway restarting under its
fleet finds them (``--register api``: POSTed to the running gateway instead, as ``vendgate
bench`` does); the gateway's resident set (RSS, /proc) is read

* ``registered``: ``--settle-s`` after it is ready and the machines are registered, before
  any connects (the registry, presence and planogram sync state it loads at start-up);
* ``connected``: ``--settle-s`` after all N simulated machines (the fleet child of ``vendgate
  bench``, at niceness 10) are connected and the gateway has them online
  (``SELECT count(*) FROM machines WHERE online``): each sent its ``Presence`` and ``Hello``
  and got its ``Time``, and every one is in the gateway's presence tracking, key cache,
  topic cache, machine directory and planogram sync cache;
* ``vended``, with ``--vends V``: ``--settle-s`` after V vends, posted by the vend
  benchmark's load generator (closed loop, 64 at a time, round robin over the machines),
  are all settled (N = 0 is skipped: no machine to vend on).

The base and the cost per machine are the least-squares line through the medians of
``--runs`` runs per N; the verdict is on ``connected``. The vend state of a run is per vend,
not per machine, so ``vended`` should differ from ``connected`` by a constant.

``--trace`` runs every gateway under tracemalloc instead (``benchmarks.traced_gateway``)
and prints where the memory per machine was allocated: the difference between the
snapshots of the largest and the smallest N, by source line, divided by the difference in
machines. Traced runs report no RSS fit (tracing itself costs memory), and tracemalloc sees
only Python's allocators: OpenSSL's hash contexts (two per machine in the frame key cache,
about 420 bytes) and the fragmentation that transient objects leave are not in it.

    python -m benchmarks.gateway_memory [--machines 0,1000,5000,10000] [--runs 1]
        [--register database|api] [--vends V] [--settle-s 5]
        [--trace [--trace-frames 1] [--top 25]] [--json PATH] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg

from gateway.bench import start_fleet
from gateway.benchkit import (
    GatewayProcess,
    Services,
    prepare_workdir,
    register_machines,
    rss_mb,
    start_gateway,
    stop_process,
    wait_online,
)
from gateway.embedded import EmbeddedPostgres, Mosquitto
from gateway.logs import configure_logging
from gateway.simulator import FleetSettings
from gateway.store import vends as vends_store

TARGET_KIB_PER_MACHINE: Final = 2.0
KIB_PER_MIB: Final = 1024


@dataclass
class MemorySettings:
    """What to run."""

    machines: tuple[int, ...] = (0, 1000, 5000, 10_000)
    runs: int = 1
    settle_s: float = 5.0
    connect_concurrency: int = 200
    fleet_nice: int = 10
    timeout_s: float = 120.0
    #: "database": inserted before the gateway starts (it loads them); "api": POSTed to the
    #: running gateway, as ``vendgate bench`` does (then its caches fill as machines connect).
    register: str = "database"
    #: After the "connected" reading: this many vends (closed loop, 64 at a time, round robin
    #: over the machines, as ``vendgate bench``), then a "vended" reading once all settled.
    vends: int = 0
    trace: bool = False
    trace_frames: int = 1
    top: int = 25
    workdir: Path | None = None


async def run_memory(settings: MemorySettings) -> dict[str, Any]:
    """Measure every point; return the JSON result (fit or trace report included)."""
    work = settings.workdir or Path(tempfile.mkdtemp(prefix="vendgate-memory-"))
    prepare_workdir(work)
    secret = secrets.token_bytes(32)
    points: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        pg = EmbeddedPostgres(work / "pgdata")
        await pg.start()
        stack.push_async_callback(pg.stop)
        for run in range(settings.runs):
            for machines in settings.machines:
                point = await _measure(pg, work, secret, machines, run, settings)
                print(_point_line(point), flush=True)
                points.append(point)
    result: dict[str, Any] = {
        "machines": list(settings.machines),
        "runs": settings.runs,
        "settle_s": settings.settle_s,
        "register": settings.register,
        "traced": settings.trace,
        "points": points,
        "workdir": str(work) if settings.workdir else None,
    }
    if settings.trace:
        result["trace"] = trace_report(points, settings.top)
    if settings.workdir is None:  # a temporary one: kept only if the run failed
        shutil.rmtree(work, ignore_errors=True)
        for point in points:  # gone with it
            point.pop("snapshot_registered", None)
            point.pop("snapshot_connected", None)
            point.pop("snapshot_vended", None)
    if not settings.trace:
        result["fit"] = {
            phase: fit([(p["machines"], p[f"rss_{phase}_mb"]) for p in points if p["machines"]])
            if phase == "vended"
            else fit([(p["machines"], p[f"rss_{phase}_mb"]) for p in points])
            for phase in ("registered", "connected", "vended")[: 3 if settings.vends else 2]
        }
        slope = result["fit"]["connected"]["kib_per_machine"]
        result["target_kib_per_machine"] = TARGET_KIB_PER_MACHINE
        result["passed"] = slope is not None and slope <= TARGET_KIB_PER_MACHINE
    return result


async def _measure(  # noqa: PLR0917  (one point's inputs, from run_memory only)
    pg: EmbeddedPostgres,
    work: Path,
    secret: bytes,
    machines: int,
    run: int,
    settings: MemorySettings,
) -> dict[str, Any]:
    """Start a broker, a database, a gateway and N machines; read the gateway's RSS."""
    name = f"mem_{machines}_{run}"
    folder = work / name
    prepare_workdir(folder)
    trace_dir = folder / "snapshots"
    async with contextlib.AsyncExitStack() as stack:
        dsn = await pg.create_database(name)
        stack.push_async_callback(pg.drop_database, name)
        broker = Mosquitto(folder / "mosquitto", persistence=False)
        await broker.start()
        stack.push_async_callback(broker.stop)
        services = Services(work=folder, broker=broker, broker_url=broker.url, dsn=dsn)
        names = FleetSettings(
            broker_host="127.0.0.1", broker_port=1, master_secret=secret, machines=max(1, machines)
        )
        machine_ids = [names.machine_id(i) for i in range(machines)]
        if settings.register == "database":
            await register_machines(dsn, machine_ids)
        module, env = "gateway.cli", None
        if settings.trace:
            trace_dir.mkdir()
            module = "benchmarks.traced_gateway"
            env = {
                **os.environ,
                "TRACED_GATEWAY_DIR": str(trace_dir),
                "TRACED_GATEWAY_FRAMES": str(settings.trace_frames),
            }
        gateway = await start_gateway(
            stack,
            services,
            secret,
            # Its own state folder: the MQTT client id of one point is not another's.
            [f"database.data_dir={folder / 'state' / 'pgdata'}"],
            module=module,
            env=env,
        )
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        stack.push_async_callback(pool.close)
        if settings.register == "api":
            await _register(gateway.http_url, machine_ids)

        await asyncio.sleep(settings.settle_s)
        point: dict[str, Any] = {"machines": machines, "run": run}
        point["rss_registered_mb"] = round(rss_mb(gateway.pid), 2)
        if settings.trace:
            point["snapshot_registered"] = str(await _snapshot(gateway, trace_dir, "registered"))

        t0 = time.monotonic()
        if machines:
            await start_fleet(
                stack,
                {
                    "broker": broker.url,
                    "secret": secret.hex(),
                    "machines": machines,
                    "dispense_ms": 0,
                    "slots": 10,
                    "log": str(folder / "dispense.jsonl"),
                    "connect_concurrency": settings.connect_concurrency,
                    "connect_timeout_s": settings.timeout_s,
                    "nice": settings.fleet_nice,
                },
                timeout_s=settings.timeout_s,
                stop_timeout_s=60.0,
            )
        point["online"] = await wait_online(pool, machines, settings.timeout_s)
        point["online_after_s"] = round(time.monotonic() - t0, 1)
        if point["online"] < machines:
            raise RuntimeError(
                f"only {point['online']} of {machines} machines online after "
                f"{settings.timeout_s} s (gateway log: {gateway.log})"
            )
        await asyncio.sleep(settings.settle_s)
        point["rss_connected_mb"] = round(rss_mb(gateway.pid), 2)
        if settings.trace:
            point["snapshot_connected"] = str(await _snapshot(gateway, trace_dir, "connected"))
        if settings.vends and machines:
            await _vend(gateway.http_url, machine_ids, settings.vends, pool, settings.timeout_s)
            await asyncio.sleep(settings.settle_s)
            point["rss_vended_mb"] = round(rss_mb(gateway.pid), 2)
            if settings.trace:
                point["snapshot_vended"] = str(await _snapshot(gateway, trace_dir, "vended"))
        # The gateway first, so that it does not spend the teardown on 10,000 goodbyes.
        await stop_process(gateway.process)
    return point


async def _register(http_url: str, machine_ids: list[str]) -> None:
    """``POST /v1/machines`` each id, 32 at a time."""
    sem = asyncio.Semaphore(32)
    async with aiohttp.ClientSession() as session:

        async def register(machine_id: str) -> None:
            async with (
                sem,
                session.post(f"{http_url}/v1/machines", json={"machine_id": machine_id}) as reply,
            ):
                reply.raise_for_status()

        await asyncio.gather(*(register(m) for m in machine_ids))


async def _vend(
    http_url: str, machine_ids: list[str], vends: int, pool: asyncpg.Pool, timeout_s: float
) -> None:
    """Run the vend benchmark's load generator (a child), then wait for every vend to settle."""
    args = {
        "urls": [http_url],
        "machines": machine_ids,
        "vends": vends,
        "rate": None,
        "concurrency": 64,
        "slots": 10,
        "deadline_s": 60,
    }
    load = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.bench",
        "load",
        json.dumps(args),
        stdout=asyncio.subprocess.DEVNULL,
    )
    if await asyncio.wait_for(load.wait(), timeout=timeout_s):
        raise RuntimeError(f"the load generator exited with code {load.returncode}")
    async with pool.acquire() as conn:
        if not await vends_store.wait_settled(conn, timeout_s):
            raise RuntimeError(f"vends not settled after {timeout_s} s")


async def _snapshot(gateway: GatewayProcess, folder: Path, name: str) -> Path:
    """Ask the traced gateway for a tracemalloc snapshot; return its file once written."""
    target = folder / name
    (folder / "request.partial").write_text(name, encoding="utf-8")
    (folder / "request.partial").rename(folder / "request")
    deadline = time.monotonic() + 120.0
    while not target.exists():
        if gateway.process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no tracemalloc snapshot from the gateway (log: {gateway.log})")
        await asyncio.sleep(0.2)
    return target


# --- the figures -----------------------------------------------------------------------------


def fit(samples: list[tuple[int, float]]) -> dict[str, Any]:
    """Return the least-squares base (MiB) and slope (KiB per machine) of medians per N."""
    by_n: dict[int, list[float]] = {}
    for machines, mib in samples:
        by_n.setdefault(machines, []).append(mib)
    xs = sorted(by_n)
    ys = [statistics.median(by_n[x]) for x in xs]
    if len(xs) < 2:  # a line needs two points
        medians = {str(x): round(y, 2) for x, y in zip(xs, ys, strict=True)}
        return {"base_mb": None, "kib_per_machine": None, "medians_mb": medians}
    slope, intercept = statistics.linear_regression(xs, ys)
    residuals = [round(y - (intercept + slope * x), 2) for x, y in zip(xs, ys, strict=True)]
    return {
        "base_mb": round(intercept, 2),
        "kib_per_machine": round(slope * KIB_PER_MIB, 3),
        "medians_mb": {str(x): round(y, 2) for x, y in zip(xs, ys, strict=True)},
        "residuals_mb": residuals,
    }


_NOISE: Final = (
    tracemalloc.Filter(inclusive=False, filename_pattern=tracemalloc.__file__),
    tracemalloc.Filter(inclusive=False, filename_pattern="<frozen importlib._bootstrap*>"),
    tracemalloc.Filter(inclusive=False, filename_pattern="*/linecache.py"),
)


def _load(path: str) -> tracemalloc.Snapshot:
    return tracemalloc.Snapshot.load(path).filter_traces(_NOISE)


def trace_report(points: list[dict[str, Any]], top: int) -> dict[str, Any]:
    """Compare the largest N's snapshots with the smallest's: where the memory per machine is.

    Uses the first run of each of the two counts; ``per_machine`` divides by their difference.
    """
    first = {p["machines"]: p for p in points if p["run"] == 0}
    low, high = min(first), max(first)
    if high == low:
        return {}
    span = high - low
    report: dict[str, Any] = {"from_machines": low, "to_machines": high}
    for phase in ("registered", "connected", "vended"):
        if f"snapshot_{phase}" not in first[low] or f"snapshot_{phase}" not in first[high]:
            continue
        base = _load(first[low][f"snapshot_{phase}"])
        snap = _load(first[high][f"snapshot_{phase}"])
        key = "traceback" if snap.traceback_limit > 1 else "lineno"
        stats = snap.compare_to(base, key)
        total = sum(s.size_diff for s in stats)
        report[phase] = {
            "bytes_per_machine": round(total / span, 1),
            "top": [
                {
                    "where": _where(s.traceback),
                    "bytes_per_machine": round(s.size_diff / span, 1),
                    "blocks_per_machine": round(s.count_diff / span, 2),
                }
                for s in stats[:top]
            ],
        }
    return report


def _where(traceback: tracemalloc.Traceback) -> str:
    """Frames as ``file:line``, innermost first, with the prefix up to the package cut."""
    frames = []
    for frame in reversed(traceback):  # stored oldest first
        name = frame.filename
        for marker in ("/site-packages/", "/lib/python3"):
            if marker in name:
                name = name.split(marker, 1)[1]
                break
        else:
            name = os.path.relpath(name) if name.startswith("/") else name
        frames.append(f"{name}:{frame.lineno}")
    return " < ".join(frames)


def _point_line(point: dict[str, Any]) -> str:
    vended = point.get("rss_vended_mb")
    return (
        f"N={point['machines']:>6} run {point['run']}: RSS registered "
        f"{point['rss_registered_mb']:.1f} MiB, connected {point['rss_connected_mb']:.1f} MiB "
        f"({point['online']} online after {point['online_after_s']} s)"
        + ("" if vended is None else f", vended {vended:.1f} MiB")
    )


def summary(result: dict[str, Any]) -> str:
    """Return the human summary of a result."""
    lines = []
    if "fit" in result:
        for phase, f in result["fit"].items():
            if f["base_mb"] is None:
                continue
            lines.append(
                f"{phase:>10}: base {f['base_mb']:.1f} MiB + {f['kib_per_machine']:.2f} KiB per "
                f"machine (medians {f['medians_mb']} MiB; residuals {f['residuals_mb']} MiB)"
            )
        verdict = "PASS" if result["passed"] else "FAIL"
        lines.append(
            f"memory: {verdict} (target {result['target_kib_per_machine']} KiB per connected "
            "machine)"
        )
    trace = result.get("trace") or {}
    for phase in ("registered", "connected", "vended"):
        if phase not in trace:
            continue
        t = trace[phase]
        lines.append(
            f"traced, {phase}, N {trace['from_machines']} -> {trace['to_machines']}: "
            f"{t['bytes_per_machine']:.0f} B per machine in Python's allocators; by line:"
        )
        lines.extend(
            f"  {s['bytes_per_machine']:8.1f} B {s['blocks_per_machine']:6.2f} blocks  {s['where']}"
            for s in t["top"]
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print what it measured; exit 1 above the target (untraced)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gateway_memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--machines",
        default="0,1000,5000,10000",
        help="comma-separated machine counts (default 0,1000,5000,10000)",
    )
    parser.add_argument("--runs", type=int, default=1, help="runs per count (median)")
    parser.add_argument(
        "--register",
        choices=("database", "api"),
        default="database",
        help="machines inserted before the gateway starts, or POSTed to it once it runs",
    )
    parser.add_argument(
        "--vends", type=int, default=0, help="then this many vends, and a third reading"
    )
    parser.add_argument("--settle-s", type=float, default=5.0, help="wait before each reading")
    parser.add_argument("--trace", action="store_true", help="tracemalloc: where, not how much")
    parser.add_argument("--trace-frames", type=int, default=1, help="frames per trace")
    parser.add_argument("--top", type=int, default=25, help="source lines to list when tracing")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument(
        "--workdir", type=Path, help="keep the services' files and logs here (default: removed)"
    )
    args = parser.parse_args(argv)
    configure_logging("warning", "console", sys.stderr)
    settings = MemorySettings(
        machines=tuple(int(n) for n in args.machines.split(",")),
        runs=args.runs,
        register=args.register,
        vends=args.vends,
        settle_s=args.settle_s,
        trace=args.trace,
        trace_frames=args.trace_frames,
        top=args.top,
        workdir=args.workdir,
    )
    result = asyncio.run(run_memory(settings))
    print(summary(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if settings.trace or result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
