"""Measure what the fleet simulator costs: connecting, idling, and answering vends.

The performance goal: 10,000 simulated machines must not take more than one core at 1,000
vends/s, so that the simulator stays cheap next to the gateway it drives. This benchmark runs
`gateway.simulator.Fleet` in this process against a private Mosquitto (persistence off) and
measures this process's CPU time (``time.process_time``: the broker and the stand-in run in
other processes and are not counted):

* connect: wall time for ``--machines`` machines to connect (CONNECT/CONNACK, SUBSCRIBE/SUBACK,
  Presence and Hello each), the time `Fleet.__aenter__` takes;
* idle: CPU over ``--idle-s`` seconds with nothing but heartbeats (every 30 s per machine),
  the device ticks and the keep-alive scan, as a fraction of one core and in µs of CPU per
  machine-second;
* vends: CPU while a stand-in gateway sends ``--rate`` valid ``Vend`` frames a second, round
  robin over the machines, with ``dispense_ms`` 0: each one is PUBACKed, verified, logged,
  acknowledged (VendAck), dispensed (a dispense-log line at start and end), reported
  (VendResult) and settled (ResultAck), as a fraction of one core, measured after a warm-up.

The stand-in gateway is a child process (``--standin``), a minimal MQTT 5 client on
`protocols.mqtt5` that answers Hello and time requests with ``Time`` (a machine refuses vends
until its clock is synced), answers every ``VendResult`` with ``ResultAck`` (or the machines
would keep re-sending results), and sends the vends on command. Reported: the median of
``--runs`` idle and vend windows, with the broker's and the stand-in's CPU for context (on a
small host they share its cores with the fleet).

``--simulator`` takes another implementation of the same module, as a file, to compare, e.g.
the gmqtt-based one this module's client replaced::

    git show <commit>:gateway/simulator.py > /tmp/sim_gmqtt.py
    python -m benchmarks.simulator_fleet --simulator /tmp/sim_gmqtt.py

    python -m benchmarks.simulator_fleet [--machines 10000] [--rate 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from gateway.benchkit import cpu_seconds
from gateway.embedded import Mosquitto
from gateway.logs import configure_logging
from protocols import mqtt5
from protocols.codec import FrameKey, decode, encode
from protocols.errors import ProtocolError
from protocols.frames import Direction, Heartbeat, Hello, ResultAck, Time, Vend, VendAck, VendResult
from protocols.topics import DEFAULT_PREFIX, Channel, Topics

READY_MARK = "STANDIN-READY"
RESULT_MARK = "STANDIN-RESULT "
VEND_TICK_S = 0.005  # the stand-in sends the vends due every 5 ms
VEND_DEADLINE_S = 60
STANDIN_KEEPALIVE_S = 60
SYNC_TIMEOUT_S = 120.0


# --- the stand-in gateway (a child process) ---


class _StandInLink(asyncio.Protocol):
    """A bare MQTT 5 client: QoS 0 in, QoS 1 out within the broker's receive maximum."""

    def __init__(self, on_message: Callable[[str, bytes], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._reader = mqtt5.Reader()
        self._transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self.connack: asyncio.Future[mqtt5.ConnAck] = self._loop.create_future()
        self.suback: asyncio.Future[tuple[int, ...]] = self._loop.create_future()
        self.lost: asyncio.Future[Exception | None] = self._loop.create_future()
        self._in_flight: set[int] = set()
        self._backlog: deque[tuple[str, bytes]] = deque()
        self._next_id = 0
        self.quota = 0xFFFF
        self.max_backlog = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101  (a stream connection)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def data_received(self, data: bytes) -> None:
        for packet in self._reader.feed(data):
            if isinstance(packet, mqtt5.Publish):
                if packet.qos:
                    self.write(mqtt5.puback(packet.packet_id))
                self._on_message(packet.topic, packet.payload)
            elif isinstance(packet, mqtt5.PubAck):
                self._in_flight.discard(packet.packet_id)
                while self._backlog and len(self._in_flight) < self.quota:
                    self._send(*self._backlog.popleft())
            elif isinstance(packet, mqtt5.ConnAck):
                self.connack.set_result(packet)
            elif isinstance(packet, mqtt5.SubAck):
                self.suback.set_result(packet.reason_codes)
            elif isinstance(packet, mqtt5.Disconnect):
                raise ConnectionError(f"the broker disconnected: {packet.reason_code:#x}")

    def write(self, data: bytes) -> None:
        if not self._chunks:
            self._loop.call_soon(self._flush)
        self._chunks.append(data)

    def _flush(self) -> None:
        data = b"".join(self._chunks)
        self._chunks.clear()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1, or queue it while the broker's receive maximum is in flight."""
        if len(self._in_flight) < self.quota:
            self._send(topic, payload)
        else:
            self._backlog.append((topic, payload))
            self.max_backlog = max(self.max_backlog, len(self._backlog))

    def _send(self, topic: str, payload: bytes) -> None:
        while True:
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in self._in_flight:
                break
        self._in_flight.add(self._next_id)
        self.write(mqtt5.publish(topic, payload, qos=1, packet_id=self._next_id))


class _StandIn:
    """Answers Hello and time requests with Time and results with ResultAck; sends vends."""

    def __init__(self, secret: bytes, machine_ids: list[str], slots: int) -> None:
        self.secret = secret
        self.machine_ids = machine_ids
        self.slots = slots
        self.topics = Topics(DEFAULT_PREFIX)
        self.down = {m: self.topics.topic(m, Channel.DOWN) for m in machine_ids}
        self.keys: dict[str, FrameKey] = {}
        self.counts: Counter[str] = Counter()
        self.link: _StandInLink | None = None

    def key(self, machine_id: str) -> FrameKey:
        key = self.keys.get(machine_id)
        if key is None:
            key = self.keys[machine_id] = FrameKey.derive(self.secret, machine_id)
        return key

    def send(self, machine_id: str, frame: Time | ResultAck | Vend) -> None:
        assert self.link is not None  # noqa: S101  (connected before anything arrives)
        self.link.publish(self.down[machine_id], encode(frame, self.key(machine_id)))

    def on_message(self, topic: str, payload: bytes) -> None:
        machine_id = topic.split("/")[2]
        try:
            frame = decode(payload, self.key(machine_id), direction=Direction.UP)
        except ProtocolError:
            self.counts["bad_frames"] += 1
            return
        now_ms = int(time.time() * 1000)
        match frame:
            case Hello() | Heartbeat(want_time=True):
                self.counts["time_requests"] += 1
                self.send(machine_id, Time(now_ms, frame.boot, frame.seq))
            case VendAck():
                self.counts[f"vend_ack_{frame.code.name.lower()}"] += 1
            case VendResult():
                self.counts["vend_results"] += 1
                self.send(machine_id, ResultAck(vend_id=frame.vend_id))
            case Heartbeat():
                self.counts["heartbeats"] += 1
            case _:
                self.counts[type(frame).__name__] += 1

    async def vend(self, rate: float, seconds: float) -> dict[str, Any]:
        """Send ``rate`` vends a second for ``seconds``, round robin over the machines."""
        before = Counter(self.counts)
        loop = asyncio.get_running_loop()
        machines = self.machine_ids
        start = loop.time()
        sent = 0
        total = int(rate * seconds)
        while sent < total:
            due = min(total, int((loop.time() - start) * rate) + 1)
            deadline = int(time.time()) + VEND_DEADLINE_S
            while sent < due:
                machine_id = machines[sent % len(machines)]
                vend = Vend(
                    vend_id=secrets.randbits(63),
                    slot=sent // len(machines) % self.slots + 1,
                    price=100,
                    deadline=deadline,
                    attempt=1,
                )
                self.send(machine_id, vend)
                sent += 1
            await asyncio.sleep(VEND_TICK_S)
        elapsed = loop.time() - start
        await asyncio.sleep(1.0)  # the last answers
        counts = {k: v - before.get(k, 0) for k, v in self.counts.items() if v != before.get(k)}
        return {"sent": sent, "send_s": elapsed, "counts": counts}


async def _standin_main(args: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    width = max(4, len(str(args["machines"])))
    machine_ids = [f"{args['id_prefix']}{i + 1:0{width}d}" for i in range(args["machines"])]
    standin = _StandIn(bytes.fromhex(args["secret"]), machine_ids, args["slots"])
    link = _StandInLink(standin.on_message)
    standin.link = link
    await loop.create_connection(lambda: link, args["host"], args["port"])
    link.write(
        mqtt5.connect(
            f"bench-standin-{secrets.token_hex(4)}",
            clean_start=True,
            keepalive_s=STANDIN_KEEPALIVE_S,
        )
    )
    connack = await link.connack
    if connack.reason_code >= 0x80:
        raise RuntimeError(f"CONNACK {mqtt5.reason_name(connack.reason_code)}")
    link.quota = connack.receive_maximum
    link.write(mqtt5.subscribe(1, [(standin.topics.filter(Channel.UP), 0)]))
    await link.suback

    async def keep_alive() -> None:
        while True:
            await asyncio.sleep(STANDIN_KEEPALIVE_S / 2)
            link.write(mqtt5.pingreq())

    pinger = asyncio.create_task(keep_alive())
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print(READY_MARK, flush=True)
    while line := await stdin.readline():
        command = json.loads(line)
        if command["cmd"] == "vend":
            result = await standin.vend(command["rate"], command["seconds"])
            result["max_backlog"] = link.max_backlog
            print(RESULT_MARK + json.dumps(result), flush=True)
        elif command["cmd"] == "counts":
            print(RESULT_MARK + json.dumps(dict(standin.counts)), flush=True)
        else:
            break
    pinger.cancel()
    link.write(mqtt5.disconnect())


# --- the fleet (this process) ---


class _Child:
    """The stand-in process and its command pipe."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None  # noqa: S101  (PIPE was asked for)
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()
        return await self._result()

    async def _result(self) -> dict[str, Any]:
        assert self.process.stdout is not None  # noqa: S101  (PIPE was asked for)
        while line := await self.process.stdout.readline():
            text = line.decode()
            if text.startswith(RESULT_MARK):
                result: dict[str, Any] = json.loads(text[len(RESULT_MARK) :])
                return result
        raise RuntimeError("the stand-in exited")

    async def ready(self) -> None:
        assert self.process.stdout is not None  # noqa: S101  (PIPE was asked for)
        while line := await self.process.stdout.readline():
            if line.decode().strip() == READY_MARK:
                return
        raise RuntimeError("the stand-in exited before it was ready")

    async def stop(self) -> None:
        if self.process.returncode is None:
            assert self.process.stdin is not None  # noqa: S101  (PIPE was asked for)
            with contextlib.suppress(ConnectionError):
                self.process.stdin.write(b'{"cmd": "quit"}\n')
                await self.process.stdin.drain()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


class _Clocks:
    """CPU seconds of this process, the broker and the stand-in, and wall time, at one instant."""

    def __init__(self, pids: tuple[int, int]) -> None:
        self.wall = time.perf_counter()
        self.fleet = time.process_time()
        self.fleet_system = os.times().system
        self.others = tuple(cpu_seconds(pid) for pid in pids)


def _cores(start: _Clocks, end: _Clocks) -> dict[str, float]:
    wall = end.wall - start.wall
    broker, standin = ((b - a) / wall for a, b in zip(start.others, end.others, strict=True))
    return {
        "wall_s": wall,
        "fleet": (end.fleet - start.fleet) / wall,
        "fleet_system": (end.fleet_system - start.fleet_system) / wall,  # in the kernel
        "broker": broker,
        "standin": standin,
    }


def _load_simulator(spec: str) -> ModuleType:
    if not spec.endswith(".py"):
        return importlib.import_module(spec)
    location = importlib.util.spec_from_file_location("simulator_under_test", spec)
    if location is None or location.loader is None:
        raise SystemExit(f"cannot load {spec}")
    module = importlib.util.module_from_spec(location)
    sys.modules[location.name] = module  # dataclasses look their module up while defining
    location.loader.exec_module(module)
    return module


async def _wait_synced(fleet: Any, timeout_s: float) -> int:  # noqa: ANN401  (either module)
    """Wait until every machine's clock is synced (Time answered); return how many are."""
    deadline = time.monotonic() + timeout_s
    while True:
        devices = [fleet.device(m) for m in fleet.machine_ids]
        synced = sum(1 for d in devices if d is not None and d.clock_synced)
        if synced == len(devices) or time.monotonic() > deadline:
            return synced
        await asyncio.sleep(1.0)


async def _main(args: argparse.Namespace) -> None:  # noqa: PLR0915  (one straight run)
    simulator = _load_simulator(args.simulator)
    secret = secrets.token_bytes(32)
    print(
        f"simulator {args.simulator}: {args.machines} machines, {args.rate} vends/s, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    idle: list[dict[str, float]] = []
    vends: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="vendgate-bench-fleet-") as work:
        broker = Mosquitto(
            Path(work) / "mosquitto", persistence=False, extra_config="max_queued_messages 0"
        )
        await broker.start()
        child: _Child | None = None
        try:
            settings = simulator.FleetSettings(
                broker_host=broker.host,
                broker_port=broker.port,
                master_secret=secret,
                machines=args.machines,
                slots=args.slots,
                dispense_ms=0,
                dispense_jitter_ms=0,
                connect_concurrency=args.connect_concurrency,
                connect_timeout_s=args.connect_timeout_s,
                dispense_log=None if args.no_dispense_log else Path(work) / "dispenses.jsonl",
            )
            standin_args = {
                "host": broker.host,
                "port": broker.port,
                "secret": secret.hex(),
                "machines": args.machines,
                "id_prefix": settings.id_prefix,
                "slots": args.slots,
            }
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "benchmarks.simulator_fleet",
                "--standin",
                json.dumps(standin_args),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            child = _Child(process)
            await child.ready()
            broker_process = broker._process  # noqa: SLF001  (its pid, for its CPU time)
            assert broker_process is not None  # noqa: S101  (started above)
            pids = (broker_process.pid, process.pid)

            started, cpu = time.perf_counter(), time.process_time()
            async with simulator.Fleet(settings) as fleet:
                connect_s = time.perf_counter() - started
                connect_cpu = time.process_time() - cpu
                print(
                    f"connect: {args.machines} machines in {connect_s:.1f} s "
                    f"({args.machines / connect_s:.0f}/s, {connect_cpu:.1f} s CPU)",
                    flush=True,
                )
                fleet.configure_locally()
                synced = await _wait_synced(fleet, SYNC_TIMEOUT_S)
                print(f"clocks synced: {synced} of {args.machines}", flush=True)
                for run in range(args.runs):
                    await asyncio.sleep(args.settle_s)
                    start = _Clocks(pids)
                    await asyncio.sleep(args.idle_s)
                    result = _cores(start, _Clocks(pids))
                    idle.append(result)
                    per_machine_us = result["fleet"] / args.machines * 1e6
                    print(
                        f"run {run + 1} idle: fleet {result['fleet']:.3f} cores "
                        f"({per_machine_us:.2f} µs CPU per machine-second, "
                        f"{result['fleet_system']:.3f} in the kernel); broker "
                        f"{result['broker']:.3f}, stand-in {result['standin']:.3f} cores",
                        flush=True,
                    )

                    before = dict(fleet.stats)
                    command = {
                        "cmd": "vend",
                        "rate": args.rate,
                        "seconds": args.warmup_s + args.vend_s,
                    }
                    answer = asyncio.create_task(child.ask(command))
                    await asyncio.sleep(args.warmup_s)
                    start, turns = _Clocks(pids), fleet.stats["motor_turns"]
                    await asyncio.sleep(args.vend_s)
                    end, turns = _Clocks(pids), fleet.stats["motor_turns"] - turns
                    report = await answer
                    result = _cores(start, end)
                    result["turns_per_s"] = turns / result["wall_s"]
                    vends.append(result)
                    counts = report["counts"]
                    after = {k: v - before[k] for k, v in fleet.stats.items() if v != before[k]}
                    print(
                        f"run {run + 1} vends: fleet {result['fleet']:.3f} cores "
                        f"({result['fleet_system']:.3f} in the kernel) at "
                        f"{result['turns_per_s']:.0f} motor turns/s (sent "
                        f"{report['sent'] / report['send_s']:.0f} vends/s); broker "
                        f"{result['broker']:.3f}, stand-in {result['standin']:.3f} cores\n"
                        f"    stand-in saw {counts}; fleet stats {after}",
                        flush=True,
                    )
                started = time.perf_counter()
            print(f"disconnect: {time.perf_counter() - started:.1f} s", flush=True)
        finally:
            if child is not None:
                await child.stop()
            await broker.stop()

    def median(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    print(f"median of {args.runs} ({args.simulator}, {args.machines} machines):")
    print(
        f"  connect {connect_s:.1f} s; idle {median(idle, 'fleet'):.3f} cores "
        f"({median(idle, 'fleet') / args.machines * 1e6:.2f} µs CPU per machine-second); "
        f"{args.rate:g} vends/s: {median(vends, 'fleet'):.3f} cores "
        f"({median(vends, 'turns_per_s'):.0f} motor turns/s; broker "
        f"{median(vends, 'broker'):.3f}, stand-in {median(vends, 'standin'):.3f} cores)"
    )


def main() -> None:
    """Run the benchmark, or, with --standin, be the stand-in gateway process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="vends per second")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=30.0, help="each idle window")
    parser.add_argument("--vend-s", type=float, default=30.0, help="each measured vend window")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="vends before measuring")
    parser.add_argument("--settle-s", type=float, default=5.0, help="quiet before idling")
    parser.add_argument("--slots", type=int, default=10)
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument("--connect-timeout-s", type=float, default=600.0)
    parser.add_argument("--no-dispense-log", action="store_true", help="no dispense log file")
    parser.add_argument(
        "--simulator", default="gateway.simulator", help="a module name, or a .py file"
    )
    parser.add_argument("--standin", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.standin:
        configure_logging("warning", "console", sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_standin_main(json.loads(args.standin)))
        return
    configure_logging("warning", "console")
    logging.getLogger("gmqtt").setLevel(logging.ERROR)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
