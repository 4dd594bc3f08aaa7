"""Uplink intake: topic → machine → verified frame → dispatcher.

Bad input from a machine is counted by kind and dropped (its MQTT message is
acknowledged, so the broker does not redeliver it); it never reaches the dispatcher
and never stops the loop. Retriable failures further in (the database is down)
propagate, so the MQTT layer leaves the message unacknowledged for redelivery.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter

from gateway.keys import KeyRing
from gateway.logs import get_logger
from gateway.metrics import VendMetrics
from gateway.store import machines
from gateway.store.writer import GroupCommitter
from protocols.codec import decode
from protocols.errors import ProtocolError
from protocols.frames import Direction, Presence, UplinkFrame
from protocols.topics import Channel, Topics

log = get_logger("gateway.uplink")

FrameSink = Callable[[str, UplinkFrame], Awaitable[None]]


class MachineDirectory:
    """Which machine ids are registered, cached: known ids forever, unknown ones briefly."""

    def __init__(
        self,
        writer: GroupCommitter,
        *,
        negative_ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._writer = writer
        self._known: set[str] = set()
        self._unknown: dict[str, float] = {}
        self._ttl = negative_ttl_s
        self._clock = clock

    async def is_known(self, machine_id: str) -> bool:
        """Return whether ``machine_id`` is registered (one query per id, then cached)."""
        if machine_id in self._known:
            return True
        checked = self._unknown.get(machine_id)
        if checked is not None and self._clock() - checked < self._ttl:
            return False
        found = await self._writer.submit(lambda conn: machines.exists(conn, machine_id))
        if found:
            self._known.add(machine_id)
            self._unknown.pop(machine_id, None)
        else:
            if len(self._unknown) > 100_000:  # bound the negative cache against floods
                self._unknown.clear()
            self._unknown[machine_id] = self._clock()
        return found

    @property
    def known(self) -> set[str]:
        """The ids known to be registered (a fast check before :meth:`is_known`)."""
        return self._known

    def learn(self, machine_id: str) -> None:
        """Record a machine registered through this gateway."""
        self._known.add(machine_id)
        self._unknown.pop(machine_id, None)


class Uplink:
    """The MQTT message handler for uplink and status topics."""

    def __init__(
        self,
        *,
        topics: Topics,
        keys: KeyRing,
        directory: MachineDirectory,
        sink: FrameSink,
        metrics: VendMetrics,
    ) -> None:
        self._topics = topics
        self._keys = keys
        self._directory = directory
        self._sink = sink
        self._metrics = metrics
        # One labelled child per frame type, looked up once: labels() costs more than inc().
        self._counters: dict[type[UplinkFrame], Counter] = {}

    async def handle(self, topic: str, payload: bytes) -> None:
        """Verify one message and pass its frame on; drop and count anything bad."""
        try:
            machine_id, channel = self._topics.parse(topic)
        except ValueError:
            self._drop("bad_topic", topic=topic)
            return
        if channel is Channel.DOWN:
            self._drop("wrong_channel", machine_id=machine_id)
            return
        if not payload:
            return  # a retained status topic being cleared
        if machine_id not in self._directory.known and not await self._directory.is_known(
            machine_id
        ):
            self._drop("unknown_machine", machine_id=machine_id)
            return
        try:
            frame = decode(payload, self._keys.key(machine_id), direction=Direction.UP)
        except ProtocolError as exc:
            self._drop(exc.kind, machine_id=machine_id, error=str(exc))
            return
        assert isinstance(frame, UplinkFrame)  # noqa: S101  (direction=UP guarantees it)
        if (channel is Channel.STATUS) != isinstance(frame, Presence):
            self._drop("wrong_channel", machine_id=machine_id, frame=type(frame).__name__)
            return
        kind = type(frame)
        counter = self._counters.get(kind)
        if counter is None:
            counter = self._counters[kind] = self._metrics.uplink_frames.labels(kind.__name__)
        counter.inc()
        await self._sink(machine_id, frame)

    def _drop(self, kind: str, **context: str) -> None:
        self._metrics.bad_frames.labels(kind).inc()
        log.info("uplink_dropped", kind=kind, **context)
