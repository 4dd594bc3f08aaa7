"""Uplink intake: topic → machine → verified frame → dispatcher.

Bad input from a machine is counted by kind and dropped (its MQTT message is
acknowledged, so the broker does not redeliver it); it never reaches the dispatcher
and never stops the loop. Retriable failures further in (the database is down)
propagate, so the MQTT layer leaves the message unacknowledged for redelivery.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeAlias

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

Outcome: TypeAlias = Awaitable[None] | None
"""What a handler returns: None when done, or what to wait for (gateway/mqtt.py)."""

_PARSED_TOPICS: Final = 1 << 16  # a fleet of 10,000 uses 10,000
_UP: Final = Channel.UP  # a module global: an enum member's lookup costs more per message

FrameSink = Callable[[str, UplinkFrame], Outcome]


class MachineDirectory:
    """Which machine ids are registered, cached: known ids forever, unknown ones briefly.

    `load` reads the whole registry at start-up; afterwards an id not in the cache costs one
    query, shared by every message that asks while it runs (a machine's first burst after a
    gateway start, or after another gateway registered it, would otherwise cost one query
    per message: measured, up to the whole receive window).
    """

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
        self._asking: dict[str, asyncio.Task[bool]] = {}

    async def load(self) -> int:
        """Cache every registered id; return how many."""
        ids = await self._writer.read(machines.all_ids)
        # Interned: the same string as the uplink's, presence's and the planogram sync's.
        self._known.update(map(sys.intern, ids))
        return len(ids)

    async def is_known(self, machine_id: str) -> bool:
        """Return whether ``machine_id`` is registered (one query per id, then cached)."""
        if machine_id in self._known:
            return True
        checked = self._unknown.get(machine_id)
        if checked is not None and self._clock() - checked < self._ttl:
            return False
        asking = self._asking.get(machine_id)
        if asking is None:
            asking = self._asking[machine_id] = asyncio.get_running_loop().create_task(
                self._ask(machine_id), name=f"gateway.uplink.is_known.{machine_id}"
            )
            asking.add_done_callback(functools.partial(self._asked, machine_id))
        # Shielded: a caller that gives up does not cancel the query for the others.
        return await asyncio.shield(asking)

    async def _ask(self, machine_id: str) -> bool:
        found = await self._writer.read(lambda conn: machines.exists(conn, machine_id))
        if found:
            self._known.add(machine_id)
            self._unknown.pop(machine_id, None)
        else:
            if len(self._unknown) > 100_000:  # bound the negative cache against floods
                self._unknown.clear()
            self._unknown[machine_id] = self._clock()
        return found

    def _asked(self, machine_id: str, asking: asyncio.Task[bool]) -> None:
        del self._asking[machine_id]
        if not asking.cancelled():
            asking.exception()  # retrieved: its callers may all have given up

    @property
    def known(self) -> set[str]:
        """The ids known to be registered (a fast check before :meth:`is_known`)."""
        return self._known

    def learn(self, machine_id: str) -> None:
        """Record a machine registered through this gateway."""
        self._known.add(sys.intern(machine_id))
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
        self._frame_counts = metrics.uplink_frames.counts
        # Uplink topics already parsed, to their machine id: every machine publishes on the
        # same topic all day. Only Channel.UP: a status topic carries a few presence frames
        # per connection, not worth a topic string, an id and a tuple per machine kept.
        self._parsed: dict[str, str] = {}

    def handle(self, topic: str, payload: bytes) -> Outcome:
        """Verify one message and pass its frame on; drop and count anything bad.

        Synchronous up to the sink, which says what to wait for, if anything: the MQTT link
        acknowledges the message once that is done. Only a machine id not yet in the
        directory's cache needs a query first.
        """
        machine_id = self._parsed.get(topic)
        if machine_id is not None:
            channel = _UP
        else:
            try:
                machine_id, channel = self._topics.parse(topic)
            except ValueError:
                self._drop("bad_topic", topic=topic)
                return None
            if channel is Channel.DOWN:
                self._drop("wrong_channel", machine_id=machine_id)
                return None
            # One string per machine id, shared by every structure that keeps it (presence,
            # keys, this cache): the topic's own copy would be one more per structure.
            machine_id = sys.intern(machine_id)
            if channel is Channel.UP:
                if len(self._parsed) >= _PARSED_TOPICS:
                    self._parsed.clear()  # bounded against a flood of made-up topics
                self._parsed[topic] = machine_id
        if not payload:
            return None  # a retained status topic being cleared
        if machine_id not in self._directory.known:
            return self._check_machine(machine_id, channel, payload)
        return self._verify(machine_id, channel, payload)

    async def process(self, topic: str, payload: bytes) -> None:
        """`handle`, then wait for what it returned: for callers other than the MQTT link."""
        outcome = self.handle(topic, payload)
        if outcome is not None:
            await outcome

    async def _check_machine(self, machine_id: str, channel: Channel, payload: bytes) -> None:
        if not await self._directory.is_known(machine_id):
            self._drop("unknown_machine", machine_id=machine_id)
            return
        outcome = self._verify(machine_id, channel, payload)
        if outcome is not None:
            await outcome

    def _verify(self, machine_id: str, channel: Channel, payload: bytes) -> Outcome:
        try:
            frame = decode(payload, self._keys.key(machine_id), direction=Direction.UP)
        except ProtocolError as exc:
            self._drop(exc.kind, machine_id=machine_id, error=str(exc))
            return None
        assert isinstance(frame, UplinkFrame)  # noqa: S101  (direction=UP guarantees it)
        if (channel is Channel.STATUS) != isinstance(frame, Presence):
            self._drop("wrong_channel", machine_id=machine_id, frame=type(frame).__name__)
            return None
        counts, name = self._frame_counts, type(frame).__name__
        counts[name] = counts.get(name, 0) + 1
        return self._sink(machine_id, frame)

    def _drop(self, kind: str, **context: str) -> None:
        self._metrics.bad_frames.labels(kind).inc()
        log.info("uplink_dropped", kind=kind, **context)
