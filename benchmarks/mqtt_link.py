"""Measure the cost of receiving QoS 1 messages: bare gmqtt against `gateway.mqtt.MqttLink`.

This is the measurement behind gateway/mqtt.py dropping gmqtt for its own codec
(protocols/mqtt5.py). Receivers, each acknowledging a message only once it is handled:

* ``bare``: a gmqtt client, ``optimistic_acknowledgement=False``, an async ``on_message``
  (gmqtt runs it in a task per message and writes the PUBACK when it returns);
* ``link``: MqttLink with an ``async def`` handler (a task per message, as the gateway's
  vend path has);
* ``link-sync``: MqttLink with a plain function as the handler (no task: the telemetry path,
  whose handler returns a future shared by a batch, costs about the same per message).

A private Mosquitto runs in a temporary directory. For each run and each receiver, a publisher
in a separate process (a minimal MQTT 5 client on a plain socket, so that it costs the broker
and the machine as little as possible) publishes ``--messages`` small QoS 1 messages as fast as
a window of ``--window`` unacknowledged PUBLISH packets allows. The receiver runs in this
process and acknowledges each message only after an async ``on_message`` (bare gmqtt, with
``optimistic_acknowledgement=False``) or an async handler (MqttLink) has returned. Reported per
receiver: messages per second and this process's CPU time per message (``time.process_time``:
the broker and the publisher run in other processes and are not counted), both measured
between the end of a warm-up and the last message, and the median of ``--runs`` runs.

    python -m benchmarks.mqtt_link [--messages 200000] [--runs 3] [--receivers bare,link]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import gmqtt
from gmqtt.mqtt.constants import MQTTv50

from gateway.embedded import Mosquitto
from gateway.logs import configure_logging
from gateway.mqtt import MessageHandler, MqttLink, MqttSettings
from protocols import mqtt5

RECEIVE_MAXIMUM = 1000  # MqttLink's default, and the broker's max_inflight_messages
PAYLOAD_BYTES = 40  # about a telemetry frame
RESULT_MARK = "RESULT "


# --- the publisher (a child process) ---


def publish(host: str, port: int, topic: str, count: int, window: int) -> dict[str, float]:
    """Publish `count` QoS 1 messages with at most `window` awaiting PUBACK; blocking.

    Packets come from protocols.mqtt5; the PUBLISH is encoded once and only its packet id
    is swapped per message, so that the publisher costs the machine as little as possible.
    """
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(
        mqtt5.connect(f"bench-pub-{uuid.uuid4().hex[:8]}", clean_start=True, keepalive_s=60)
    )
    reader = mqtt5.Reader()
    while not (packets := reader.feed(sock.recv(65536))):
        pass
    connack = packets[0]
    if not isinstance(connack, mqtt5.ConnAck) or connack.reason_code:
        raise RuntimeError(f"CONNACK refused: {connack!r}")
    payload = b"x" * PAYLOAD_BYTES
    template = mqtt5.publish(topic, payload, qos=1, packet_id=0xFFFF)
    # The packet id is the two bytes before the (empty) properties length and the payload.
    cut = len(template) - PAYLOAD_BYTES - 3
    head, tail = template[:cut], template[cut + 2 :]
    ids = [struct.pack("!H", n) for n in range(1, 65536)]
    in_flight: set[int] = set()
    sent = acked = 0
    next_id = 0
    started = time.perf_counter()
    while acked < count:
        burst: list[bytes] = []
        while len(in_flight) < window and sent < count:
            while next_id + 1 in in_flight:
                next_id = (next_id + 1) % 65535
            in_flight.add(next_id + 1)
            burst += (head, ids[next_id], tail)
            next_id = (next_id + 1) % 65535
            sent += 1
        if burst:
            sock.sendall(b"".join(burst))
        data = sock.recv(1 << 18)
        if not data:
            raise ConnectionError("the broker closed the connection")
        for packet in reader.feed(data):
            if isinstance(packet, mqtt5.PubAck):
                in_flight.discard(packet.packet_id)
                acked += 1
    elapsed = time.perf_counter() - started
    sock.sendall(mqtt5.disconnect())
    sock.close()
    return {"published": count, "publish_s": elapsed}


# --- the receivers (this process) ---


class _Counter:
    """Counts messages and notes when the warm-up ended and when the last one arrived."""

    def __init__(self, count: int, warmup: int) -> None:
        self.count = count
        self.warmup = warmup
        self.received = 0
        self.mark: tuple[float, float] | None = None  # (wall, cpu) at the end of the warm-up
        self.end: tuple[float, float] | None = None
        self.done = asyncio.Event()

    def tick(self) -> None:
        self.received += 1
        if self.received == self.warmup:
            self.mark = (time.perf_counter(), time.process_time())
        elif self.received == self.count:
            self.end = (time.perf_counter(), time.process_time())
            self.done.set()


@contextlib.asynccontextmanager
async def _bare(host: str, port: int, topic: str, counter: _Counter) -> AsyncIterator[None]:
    """Run a bare gmqtt client, subscribed, acknowledging after an async on_message."""
    tick = counter.tick

    async def on_message(
        _client: object, _topic: str, _payload: bytes, _qos: int, _props: object
    ) -> int:
        tick()
        return 0

    subscribed = asyncio.Event()
    client = gmqtt.Client(
        f"bench-bare-{uuid.uuid4().hex[:8]}",
        clean_session=True,
        optimistic_acknowledgement=False,
        receive_maximum=RECEIVE_MAXIMUM,
        session_expiry_interval=0,
    )
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    await client.connect(host, port, keepalive=60, version=MQTTv50)
    try:
        client.subscribe(gmqtt.Subscription(topic, qos=1))
        await asyncio.wait_for(subscribed.wait(), timeout=10)
        yield
    finally:
        await client.disconnect()


@contextlib.asynccontextmanager
async def _running_link(
    host: str, port: int, topic: str, name: str, handler: MessageHandler
) -> AsyncIterator[None]:
    """Run an MqttLink, connected and subscribed, with ``handler``."""
    settings = MqttSettings(
        host=host,
        port=port,
        client_id=f"bench-{name}-{uuid.uuid4().hex[:8]}",
        receive_maximum=RECEIVE_MAXIMUM,
        session_expiry_s=0,
        clean_start=True,
    )
    async with MqttLink(settings, handler, [(topic, 1)]):
        yield


def _link(host: str, port: int, topic: str, counter: _Counter) -> AbstractAsyncContextManager[None]:
    """Run an MqttLink with an ``async def`` handler that only counts (a task per message)."""
    tick = counter.tick

    async def handler(_topic: str, _payload: bytes) -> None:
        tick()

    return _running_link(host, port, topic, "link", handler)


def _link_sync(
    host: str, port: int, topic: str, counter: _Counter
) -> AbstractAsyncContextManager[None]:
    """Run an MqttLink whose handler is a plain function: acknowledged when it returns."""
    tick = counter.tick

    def handler(_topic: str, _payload: bytes) -> None:
        tick()

    return _running_link(host, port, topic, "link-sync", handler)


RECEIVERS = {"bare": _bare, "link": _link, "link-sync": _link_sync}


async def _measure(broker: Mosquitto, receiver: str, args: argparse.Namespace) -> dict[str, float]:
    topic = f"bench/{uuid.uuid4().hex[:8]}/m/vm-1/up"
    warmup = min(args.messages // 10, 20000)
    counter = _Counter(args.messages, warmup)
    async with RECEIVERS[receiver](broker.host, broker.port, topic, counter):
        publisher = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.mqtt_link",
            "--publish",
            json.dumps([broker.host, broker.port, topic, args.messages, args.window]),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await publisher.communicate()
        if publisher.returncode != 0:
            raise RuntimeError(f"the publisher failed with status {publisher.returncode}")
        await asyncio.wait_for(counter.done.wait(), timeout=60)
    if counter.mark is None or counter.end is None:
        raise RuntimeError("the receiver missed messages")
    published = json.loads(out.decode().split(RESULT_MARK, 1)[1])
    measured = args.messages - warmup
    wall = counter.end[0] - counter.mark[0]
    cpu = counter.end[1] - counter.mark[1]
    return {
        "msgs_per_s": measured / wall,
        "cpu_us_per_msg": cpu / measured * 1e6,
        # Published and acknowledged by the broker: the receiver may lag behind.
        "published_per_s": args.messages / published["publish_s"],
    }


async def _main(args: argparse.Namespace) -> None:
    receivers = args.receivers.split(",")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in receivers}
    with tempfile.TemporaryDirectory(prefix="vendgate-bench-mqtt-") as work:
        # The publisher runs ahead of the receiver: let the broker queue all it sends (the
        # default configuration drops a subscriber's messages beyond 100000 queued ones).
        broker = Mosquitto(
            Path(work) / "mosquitto", persistence=False, extra_config="max_queued_messages 0"
        )
        await broker.start()
        try:
            for run in range(args.runs):
                for name in receivers:
                    result = await _measure(broker, name, args)
                    results[name].append(result)
                    print(
                        f"run {run + 1} {name:>9}: {result['msgs_per_s']:9.0f} msg/s "
                        f"{result['cpu_us_per_msg']:6.1f} µs CPU/msg "
                        f"(published at {result['published_per_s']:.0f} msg/s)",
                        flush=True,
                    )
        finally:
            await broker.stop()
    print(
        f"median of {args.runs} ({args.messages} messages, window {args.window}, "
        f"{os.cpu_count()} CPUs):"
    )
    for name, runs in results.items():
        rate = statistics.median(r["msgs_per_s"] for r in runs)
        cpu = statistics.median(r["cpu_us_per_msg"] for r in runs)
        print(f"  {name:>9}: {rate:9.0f} msg/s {cpu:6.1f} µs CPU/msg")


def main() -> None:
    """Run the benchmark, or, with --publish, be the publisher process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window", type=int, default=500, help="PUBLISH packets awaiting PUBACK")
    parser.add_argument(
        "--receivers", default="bare,link,link-sync", help="comma-separated: bare, link, link-sync"
    )
    parser.add_argument("--publish", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        host, port, topic, count, window = json.loads(args.publish)
        result = publish(host, port, topic, count, window)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return
    configure_logging("warning", "console")
    logging.getLogger("gmqtt").setLevel(logging.ERROR)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
