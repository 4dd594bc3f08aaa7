"""The pieces the end-to-end tests put together around a real broker and a real database.

- `Receiver`: a payment backend's webhook endpoint (aiohttp on 127.0.0.1) that checks every
  signature with `gateway.webhooks.verify` and records events by event id.
- `Sniffer`: the test's own MQTT client. It watches every machine's ``up`` and ``down``
  topics without taking part in the gateways' shared subscription, and publishes on ``down``
  (replayed frames).
- `Api`: the payment backend's side of the HTTP API.
- `running_gateway` (in this process) and `GatewayProcess` (``vendgate run`` in a child
  process, for SIGKILL), and `pipeline`, which starts everything in order for one test.
- `Diagnostics`: the log files and tasks to look at when a wait fails, so a failing test
  says what it waited for and shows the tail of the gateway's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from gmqtt import Client, Subscription
from gmqtt.mqtt.constants import MQTTv50

from gateway.app import Gateway
from gateway.config import Config, load_config
from gateway.embedded import Mosquitto
from gateway.simulator import Fleet, FleetSettings
from gateway.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, verify
from protocols.codec import FrameKey, decode, encode
from protocols.errors import ProtocolError
from protocols.frames import Config as ConfigFrame
from protocols.frames import Direction, Frame
from protocols.topics import Channel, Topics

MASTER_SECRET: Final = bytes(range(32))
WEBHOOK_SECRET: Final = "integration-webhook-secret"  # noqa: S105  (a test-only key)
#: How long any single wait may take before the test fails with a diagnosis.
TIMEOUT: Final = 15.0
POLL_S: Final = 0.05
HOST: Final = "127.0.0.1"

F = TypeVar("F", bound=Frame)
_TERMINAL_WAIT_S: Final = 15.0


# ---------------------------------------------------------------------------------------------
# Diagnostics and waiting


def tail(path: Path, lines: int = 60) -> str:
    """Return the last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass(slots=True)
class Diagnostics:
    """What to show when a test fails: log tails, and tasks whose death fails it at once."""

    logs: list[Path] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    broker: Mosquitto | None = None

    def report(self, lines: int = 60) -> str:
        """Return the tails of every log, labelled."""
        parts = [
            f"--- {path.name} (last {lines} lines) ---\n{tail(path, lines)}" for path in self.logs
        ]
        if self.broker is not None:
            parts.append(f"--- mosquitto ---\n{self.broker.log_tail(20)}")
        return "\n".join(parts)

    def fail(self, what: str) -> NoReturn:
        """Fail the test with ``what`` and the log tails."""
        pytest.fail(f"{what}\n\n{self.report()}", pytrace=False)

    def check_alive(self) -> None:
        """Fail at once if a watched task (the gateway) has died."""
        for task in self.tasks:
            if task.done():
                exc = None if task.cancelled() else task.exception()
                self.fail(f"{task.get_name()} stopped unexpectedly: {exc!r}")

    async def eventually(
        self,
        check: Callable[[], bool | Awaitable[bool]],
        what: str | Callable[[], str],
        within: float = TIMEOUT,
    ) -> None:
        """Wait until ``check()`` holds; fail with ``what`` and the log tails after ``within`` s.

        ``what`` may be a function, called at the failure to describe the state reached.
        """
        deadline = time.monotonic() + within
        while True:
            self.check_alive()
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            if time.monotonic() > deadline:
                described = what() if callable(what) else what
                self.fail(f"timed out after {within} s waiting for {described}")
            await asyncio.sleep(POLL_S)


def free_port() -> int:
    """Return a TCP port that was free a moment ago (for a child process to bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------------------------
# The webhook receiver


@dataclass(frozen=True, slots=True)
class Delivery:
    """One POST the receiver accepted."""

    event_id: str
    event_type: str
    vend_id: str
    payload: dict[str, Any]


class Receiver:
    """A payment backend's webhook endpoint: verifies signatures, records events, answers 200.

    Its socket is bound when the receiver is made and listens only from `start`, so the port
    can be given to a gateway while connections to it are still refused.
    """

    def __init__(self, secret: str = WEBHOOK_SECRET) -> None:
        self._secret = secret.encode()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((HOST, 0))
        self.port: int = self._sock.getsockname()[1]
        self._runner: web.AppRunner | None = None
        #: Every accepted POST, duplicates included, in arrival order.
        self.deliveries: list[Delivery] = []
        #: Requests refused because the signature did not verify (or the body was not JSON).
        self.refused: list[str] = []

    @property
    def url(self) -> str:
        """The URL to give the gateway as ``webhook.url``."""
        return f"http://{HOST}:{self.port}/hooks"

    async def start(self) -> None:
        """Start listening on the port chosen at construction."""
        app = web.Application()
        app.router.add_post("/hooks", self._hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, self._sock).start()
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening and close the socket."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._sock.close()

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        header = request.headers.get(SIGNATURE_HEADER, "")
        if not verify(self._secret, header, body, now=time.time()):
            self.refused.append(f"bad signature {header!r}")
            return web.json_response({"error": "bad signature"}, status=401)
        try:
            payload = json.loads(body)
            delivery = Delivery(
                event_id=str(payload["event_id"]),
                event_type=str(payload["type"]),
                vend_id=str(payload["vend_id"]),
                payload=payload,
            )
        except (ValueError, KeyError, TypeError) as exc:
            self.refused.append(f"bad body: {exc!r}")
            return web.json_response({"error": "bad body"}, status=400)
        if request.headers.get(EVENT_ID_HEADER) != delivery.event_id:
            self.refused.append(f"event id header differs from the body: {delivery.event_id}")
            return web.json_response({"error": "event id mismatch"}, status=400)
        self.deliveries.append(delivery)
        return web.json_response({"ok": True})

    def events(self) -> dict[str, Delivery]:
        """Return the events de-duplicated by event id, in order of first arrival."""
        seen: dict[str, Delivery] = {}
        for delivery in self.deliveries:
            seen.setdefault(delivery.event_id, delivery)
        return seen

    def for_vend(self, vend_id: str) -> list[Delivery]:
        """Return one vend's events, de-duplicated, in order of first arrival."""
        return [d for d in self.events().values() if d.vend_id == vend_id]

    def types(self, vend_id: str) -> list[str]:
        """Return the types of one vend's de-duplicated events, in order of first arrival."""
        return [d.event_type for d in self.for_vend(vend_id)]

    def copies(self, event_id: str) -> int:
        """Return how many times one event arrived."""
        return sum(d.event_id == event_id for d in self.deliveries)


# ---------------------------------------------------------------------------------------------
# The test's own MQTT client


@dataclass(frozen=True, slots=True)
class Seen:
    """One frame the sniffer saw on a machine's topic."""

    machine_id: str
    channel: Channel
    frame: Frame
    payload: bytes


class Sniffer:
    """Watches every machine's ``up`` and ``down`` topics; publishes on ``down``.

    Its subscriptions are ordinary (not shared), so it sees a copy of every frame and takes
    nothing away from the gateways (MQTT 5 §4.8.2).
    """

    def __init__(
        self, broker: Mosquitto, secret: bytes = MASTER_SECRET, prefix: str = "vg"
    ) -> None:
        self._broker = broker
        self._secret = secret
        self.topics = Topics(prefix)
        self.seen: list[Seen] = []
        self.undecodable = 0
        self._keys: dict[str, FrameKey] = {}
        self._client: Any = Client(f"test-sniffer-{uuid.uuid4().hex[:8]}")
        self._client.on_message = self._on_message
        self._subacks: dict[int, asyncio.Future[None]] = {}
        self._client.on_subscribe = self._on_subscribe

    def key(self, machine_id: str) -> FrameKey:
        """Return the machine's frame key."""
        if machine_id not in self._keys:
            self._keys[machine_id] = FrameKey.derive(self._secret, machine_id)
        return self._keys[machine_id]

    async def start(self) -> None:
        """Connect and subscribe to every machine's up and down topics."""
        await self._client.connect(self._broker.host, self._broker.port, version=MQTTv50)
        filters = [Subscription(self.topics.filter(c), qos=1) for c in (Channel.UP, Channel.DOWN)]
        mid = self._client.subscribe(filters)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._subacks[int(mid)] = waiter
        await asyncio.wait_for(waiter, TIMEOUT)

    async def stop(self) -> None:
        """Disconnect cleanly."""
        if self._client.is_connected:
            await self._client.disconnect()

    def send(self, machine_id: str, frame: Frame) -> None:
        """Sign ``frame`` with the machine's key and publish it on its ``down`` topic."""
        self.publish_down(machine_id, encode(frame, self.key(machine_id)))

    def publish_down(self, machine_id: str, payload: bytes) -> None:
        """Publish a raw payload on the machine's ``down`` topic (QoS 1), e.g. a replay."""
        self._client.publish(self.topics.topic(machine_id, Channel.DOWN), payload, qos=1)

    def frames(self, kind: type[F], machine_id: str | None = None) -> list[F]:
        """Return the frames of one type seen so far, in arrival order."""
        return [
            s.frame
            for s in self.seen
            if isinstance(s.frame, kind) and machine_id in (None, s.machine_id)
        ]

    def payloads(self, kind: type[Frame], machine_id: str) -> list[bytes]:
        """Return the raw payloads of one frame type seen for one machine."""
        return [
            s.payload for s in self.seen if isinstance(s.frame, kind) and s.machine_id == machine_id
        ]

    def _on_subscribe(self, _client: object, mid: int, _qos: object, _props: object) -> None:
        waiter = self._subacks.pop(int(mid), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_message(
        self, _client: object, topic: str, payload: bytes, _qos: int, _props: object
    ) -> int:
        try:
            machine_id, channel = self.topics.parse(topic)
            direction = Direction.DOWN if channel is Channel.DOWN else Direction.UP
            frame = decode(bytes(payload), self.key(machine_id), direction=direction)
        except (ValueError, ProtocolError):
            self.undecodable += 1
            return 0
        self.seen.append(Seen(machine_id, channel, frame, bytes(payload)))
        return 0


# ---------------------------------------------------------------------------------------------
# The HTTP API, as a payment backend uses it


class Api:
    """The payment backend's client of ``/v1``; every wait fails with the gateway's log."""

    def __init__(self, base_url: str, diagnostics: Diagnostics) -> None:
        self.base_url = base_url
        self.diagnostics = diagnostics
        # A fresh connection per request: a gateway killed with SIGKILL leaves pooled
        # keep-alive connections that would fail the next request.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=10),
        )

    async def close(self) -> None:
        """Close the client session."""
        await self._session.close()

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Send one request; return the status and the JSON body."""
        async with self._session.request(method, self.base_url + path, json=body) as response:
            data = await response.json()
            return response.status, data

    async def metrics(self) -> str:
        """GET /metrics as text."""
        async with self._session.get(self.base_url + "/metrics") as response:
            assert response.status == 200
            return await response.text()

    async def register(self, machine_id: str) -> None:
        """Register a machine (201, or 200 if it was already)."""
        status, body = await self.request("POST", "/v1/machines", {"machine_id": machine_id})
        assert status in (200, 201), body

    async def post_vend(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST /v1/vends with exactly this body."""
        return await self.request("POST", "/v1/vends", body)

    async def create(
        self,
        vend_id: str,
        machine_id: str,
        *,
        slot: int = 1,
        price: int = 100,
        deadline_s: float = 30.0,
    ) -> dict[str, Any]:
        """Create a vend and check that it is accepted (202)."""
        status, body = await self.post_vend(
            {
                "vend_id": vend_id,
                "machine_id": machine_id,
                "slot": slot,
                "price": price,
                "currency": "CNY",
                "deadline_s": deadline_s,
            }
        )
        if status != 202:
            self.diagnostics.fail(f"POST /v1/vends {vend_id}: {status} {body}")
        return body

    async def get(self, vend_id: str) -> dict[str, Any]:
        """GET /v1/vends/{id}, history included."""
        status, body = await self.request("GET", f"/v1/vends/{vend_id}")
        assert status == 200, body
        return body

    async def resolve(
        self, vend_id: str, outcome: str, operator: str, reason: str
    ) -> tuple[int, dict[str, Any]]:
        """Settle an unknown vend as an operator."""
        return await self.request(
            "POST",
            f"/v1/vends/{vend_id}/resolve",
            {"outcome": outcome, "operator": operator, "reason": reason},
        )

    async def wait_state(
        self, vend_id: str, *states: str, within: float = TIMEOUT
    ) -> dict[str, Any]:
        """Wait until the vend is in one of ``states``; return it (with its history)."""
        last: dict[str, Any] = {}

        async def reached() -> bool:
            nonlocal last
            last = await self.get(vend_id)
            return last["state"] in states

        deadline = time.monotonic() + within
        while not await reached():
            self.diagnostics.check_alive()
            if time.monotonic() > deadline:
                steps = [(h["from"], h["to"], h["event"]) for h in last.get("history", [])]
                self.diagnostics.fail(
                    f"vend {vend_id} not {'/'.join(states)} after {within} s: it is "
                    f"{last.get('state')}, history {steps}"
                )
            await asyncio.sleep(POLL_S)
        return last

    async def wait_final(
        self, vend_ids: Iterable[str], within: float = TIMEOUT
    ) -> dict[str, dict[str, Any]]:
        """Wait until every vend is final or unknown (nothing moves it on by itself)."""
        ids = list(vend_ids)
        done: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + within
        while True:
            for vend_id in ids:
                if vend_id not in done:
                    body = await self.get(vend_id)
                    if body["state"] in FINAL_STATES:
                        done[vend_id] = body
            if len(done) == len(ids):
                return done
            self.diagnostics.check_alive()
            if time.monotonic() > deadline:
                pending = {v: (await self.get(v))["state"] for v in ids if v not in done}
                self.diagnostics.fail(f"vends not final after {within} s: {pending}")
            await asyncio.sleep(POLL_S)


FINAL_STATES: Final = frozenset({"dispensed", "failed", "rejected", "expired"})


def history(vend: dict[str, Any]) -> list[str]:
    """Return the states a vend went through, from its GET body."""
    return [step["to"] for step in vend["history"]]


# ---------------------------------------------------------------------------------------------
# The database, read directly to relate API vends to the machines' wire ids


async def wire_ids(dsn: str) -> dict[str, int]:
    """Return vend id -> wire id for every stored vend."""
    conn = await asyncpg.connect(dsn)
    try:
        return {
            r["vend_id"]: r["wire_id"]
            for r in await conn.fetch("SELECT vend_id, wire_id FROM vends")
        }
    finally:
        await conn.close()


async def outbox(dsn: str) -> list[asyncpg.Record]:
    """Return every webhook outbox row, in the order the events were written."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT id, event_id, vend_id, event_type, attempts, delivered_at "
            "FROM webhook_outbox ORDER BY id"
        )
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------
# The gateway


def gateway_overrides(
    mqtt_url: str,
    dsn: str,
    *,
    webhook_url: str | None,
    http_port: int = 0,
    extra: Sequence[str] = (),
) -> list[str]:
    """Return ``--set`` overrides with short timings for tests."""
    overrides = [
        f"mqtt.url={mqtt_url}",
        f"database.dsn={dsn}",
        f"security.master_secret={MASTER_SECRET.hex()}",
        f"http.host={HOST}",
        f"http.port={http_port}",
        "vend.retry_base_s=0.1",
        "vend.retry_cap_s=0.5",
        "vend.clock_skew_s=1",
        "webhook.retry_base_s=0.1",
        "webhook.retry_cap_s=0.5",
        "webhook.poll_interval_s=0.2",
        "webhook.timeout_s=2",
    ]
    if webhook_url is not None:
        overrides += [f"webhook.url={webhook_url}", f"webhook.secret={WEBHOOK_SECRET}"]
    return overrides + list(extra)


def gateway_config(overrides: Sequence[str]) -> Config:
    """Resolve a configuration from overrides alone (no file, no environment)."""
    return load_config(path=None, environ={}, overrides=overrides)


@contextlib.asynccontextmanager
async def running_gateway(
    config: Config, state_dir: Path, diagnostics: Diagnostics
) -> AsyncIterator[Gateway]:
    """Run a Gateway in this process until the block ends; its death fails the test."""
    gateway = Gateway(config, state_dir=state_dir)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop), name="gateway")
    ready = asyncio.create_task(gateway.ready.wait(), name="gateway.ready")
    try:
        await asyncio.wait({task, ready}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            if task.done():
                task.result()  # raises the start-up error
            diagnostics.fail(f"the gateway was not ready within {TIMEOUT} s")
        diagnostics.tasks.append(task)
        yield gateway
    finally:
        ready.cancel()
        diagnostics.tasks[:] = [t for t in diagnostics.tasks if t is not task]
        stop.set()
        try:
            await asyncio.wait_for(task, _TERMINAL_WAIT_S)
        except TimeoutError:
            diagnostics.fail("the gateway did not stop within 15 s")


def vendgate_binary() -> str:
    """Return the ``vendgate`` script of the virtualenv running the tests."""
    return str(Path(sys.executable).parent / "vendgate")


class GatewayProcess:
    """``vendgate run`` in a child process, JSON logs to a file, killable with SIGKILL."""

    def __init__(
        self, overrides: Sequence[str], log_path: Path, http_port: int, *, cwd: Path
    ) -> None:
        self.overrides = list(overrides)
        self.log_path = log_path
        self.http_port = http_port
        #: Its working directory, which holds its state folder (``.vendgate``).
        self.cwd = cwd
        self.process: asyncio.subprocess.Process | None = None

    @property
    def http_url(self) -> str:
        """Where its HTTP API listens."""
        return f"http://{HOST}:{self.http_port}"

    async def start(self, diagnostics: Diagnostics) -> None:
        """Spawn it and wait until /readyz answers 200."""
        args = [vendgate_binary(), "--log-format", "json", "--log-level", "info"]
        for item in self.overrides:
            args += ["--set", item]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VENDGATE_")}
        self.cwd.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *[*args, "run"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
            )
        deadline = time.monotonic() + TIMEOUT
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as session:
            while True:
                if self.process.returncode is not None:
                    diagnostics.fail(f"vendgate run exited with {self.process.returncode}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"{self.http_url}/readyz") as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    diagnostics.fail(f"vendgate run not ready within {TIMEOUT} s")
                await asyncio.sleep(POLL_S)

    async def kill(self) -> None:
        """SIGKILL: no shutdown, nothing flushed, as a crash or the OOM killer would."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM and wait for a clean exit; SIGKILL if it takes too long."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), _TERMINAL_WAIT_S)
        except TimeoutError:
            await self.kill()


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    """Return the JSON log lines of one event from a gateway's log file."""
    found = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict) and item.get("event") == event:
                found.append(item)
    return found


# ---------------------------------------------------------------------------------------------
# The fleet


def fleet_settings(broker: Mosquitto, log_path: Path, **changes: Any) -> FleetSettings:
    """Return fleet settings for tests: short turns, a fast tick, a dispense log."""
    fields: dict[str, Any] = {
        "broker_host": broker.host,
        "broker_port": broker.port,
        "master_secret": MASTER_SECRET,
        "machines": 1,
        "slots": 4,
        "capacity": 100,
        "dispense_ms": 300,
        "dispense_jitter_ms": 50,
        "reboot_ms": 300,
        "tick_ms": 100,
        "dispense_log": log_path,
        **changes,
    }
    return FleetSettings(**fields)


def planogram_body(config: ConfigFrame, currency: str = "CNY") -> dict[str, Any]:
    """Return the ``PUT /v1/machines/{id}/planogram`` body of a ``Config``'s slots."""
    return {
        "currency": currency,
        "updated_by": "integration-test",
        "slots": [
            {
                "slot": s.slot,
                "product_code": s.product_code,
                "name": s.name,
                "price": s.price,
                "capacity": s.capacity,
                "drop_sensor": s.drop_sensor,
            }
            for s in config.slots
        ],
    }


async def provision(fleet: Fleet, api: Api, diagnostics: Diagnostics) -> None:
    """Set every machine's planogram through the API and wait until the gateway pushed it.

    The machines are configured and clock-synced (from the gateway's answer to Hello) before
    the test begins, as a merchant's set-up would leave them.
    """
    config = fleet.settings.planogram()
    versions: dict[str, int] = {}
    for machine_id in fleet.machine_ids:
        status, body = await api.request(
            "PUT", f"/v1/machines/{machine_id}/planogram", planogram_body(config)
        )
        assert status in (200, 201), body
        versions[machine_id] = body["desired_version"]

    def ready() -> bool:
        for machine_id, version in versions.items():
            device = fleet.device(machine_id)
            if device is None or device.config_version != version or not device.clock_synced:
                return False
        return True

    await diagnostics.eventually(ready, "every machine configured and clock-synced")


# ---------------------------------------------------------------------------------------------
# Everything at once, for one test


@dataclass(slots=True)
class Pipeline:
    """A running gateway, fleet, sniffer and webhook receiver for one test."""

    api: Api
    fleet: Fleet
    sniffer: Sniffer
    receiver: Receiver
    gateway: Gateway
    dsn: str
    diagnostics: Diagnostics

    async def turns(self, vend_id: str) -> int:
        """Return how many motor turns the fleet made for an API vend."""
        wire = (await wire_ids(self.dsn))[vend_id]
        return sum(record.vend_id == wire for record in self.fleet.dispenses)

    async def eventually(
        self,
        check: Callable[[], bool | Awaitable[bool]],
        what: str | Callable[[], str],
        within: float = TIMEOUT,
    ) -> None:
        """Wait until ``check()`` holds, or fail with the logs."""
        await self.diagnostics.eventually(check, what, within)

    async def webhooks(self, vend_id: str, *types: str, within: float = TIMEOUT) -> None:
        """Wait until the receiver has exactly these event types for the vend, in order."""
        await self.eventually(
            lambda: self.receiver.types(vend_id) == list(types),
            lambda: f"webhooks {list(types)} for {vend_id}, have {self.receiver.types(vend_id)}",
            within,
        )


@contextlib.asynccontextmanager
async def pipeline(
    broker: Mosquitto,
    dsn: str,
    workdir: Path,
    diagnostics: Diagnostics,
    *,
    fleet: dict[str, Any] | None = None,
    gateway: Sequence[str] = (),
    receiver: Receiver | None = None,
    start_receiver: bool = True,
) -> AsyncIterator[Pipeline]:
    """Start receiver, gateway, machine registrations, sniffer and fleet, in that order.

    Machines are registered before they connect, so the gateway answers their Hello with
    Time; the planogram is sent once they are up. Everything stops in reverse order.
    """
    diagnostics.broker = broker
    hooks = receiver or Receiver()
    settings = fleet_settings(broker, workdir / "dispenses.jsonl", **(fleet or {}))
    overrides = gateway_overrides(broker.url, dsn, webhook_url=hooks.url, extra=gateway)
    sniffer = Sniffer(broker)
    try:
        if start_receiver:
            await hooks.start()
        async with running_gateway(gateway_config(overrides), workdir / "state", diagnostics) as gw:
            assert gw.endpoints is not None
            api = Api(gw.endpoints.http_url, diagnostics)
            try:
                for machine_id in [settings.machine_id(i) for i in range(settings.machines)]:
                    await api.register(machine_id)
                await sniffer.start()
                async with Fleet(settings) as machines:
                    await provision(machines, api, diagnostics)
                    yield Pipeline(api, machines, sniffer, hooks, gw, dsn, diagnostics)
            finally:
                await sniffer.stop()
                await api.close()
    finally:
        await hooks.stop()
