"""The gateway's MQTT 5 link: a self-healing connection that acknowledges after handling.

`MqttLink` connects, subscribes, hands every message to one handler, acknowledges a QoS 1
message only when the handler is done with it, and reconnects by itself. The wire format is
`protocols.mqtt5` (sans-I/O); this module is its only driver in the gateway, so the client
can be swapped without touching callers.

Why not gmqtt, which this module used before: receiving is the gateway's hot path (telemetry
arrives at tens of thousands of messages a second), and gmqtt spends a task, a properties
parse and a done-callback on every PUBLISH before the handler sees it. Here one socket read is
parsed in one call (`mqtt5.Reader.feed`) and its messages are handled in a loop: a handler
that finishes at once, or hands back a future, costs no task at all. benchmarks/mqtt_link.py
measures both receivers in one run (docs in README, figures in benchmarks/RESULTS.md).

The handler is called as ``handler(topic, payload)`` and returns one of:

* ``None``: done; the message is acknowledged now (one PUBACK per message, but all the
  PUBACKs of one loop iteration go out in one ``transport.write``);
* an ``asyncio.Future``: acknowledged when it completes with a result (the telemetry ingest
  returns one that completes at commit: no task per message);
* any other awaitable, such as the coroutine an ``async def`` handler returns: it runs in a
  task of its own, and the message is acknowledged when it returns.

An exception, raised at once or from the awaitable, is handled as `MqttLink` describes.

One connection at a time, each with its own `_Connection`: a PUBACK can then only ever be
written to the connection its PUBLISH came on; the broker redelivers what a dead connection
left unacknowledged (MQTT 5 §4.4), and a late PUBACK cannot acknowledge the redelivered copy
before it has been handled.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, cast

from gateway.errors import BrokerUnavailableError, ConfigError, GatewayError, ShuttingDownError
from gateway.logs import get_logger
from protocols import mqtt5

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

__all__ = ["MessageHandler", "MqttLink", "MqttSettings"]

MessageHandler = Callable[[str, bytes], Awaitable[None] | None]
"""Called with (topic, payload) for every message; the topic is the real one, not a filter.
Returns None when done, or an awaitable to wait for (see the module docstring)."""

# MQTT 5 §3.2.2.2: CONNACK refusals that retrying with the same settings cannot fix (bad
# credentials, not authorised, banned, malformed, unsupported...).
_PERMANENT_CONNACK_CODES: Final = frozenset(
    {0x81, 0x82, 0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C, 0x90, 0x95, 0x99, 0x9A, 0x9B, 0x9C, 0x9D}
)
# MQTT 5 §3.3.1.3 Retain Handling. Shared filters: 1, send retained messages only for a new
# subscription (brokers send none to shared subscriptions anyway, §4.8.2). Other filters: 0
# on the link's first connection, so that a starting process reads the retained state (the
# gateway's status filter: every machine's last presence, SPEC §3.4); 1 on reconnections,
# which resume the session, whose queue holds what was published meanwhile: replaying the
# whole fleet's presence after every broker restart would only add a burst to the storm.
_RETAIN_IF_NEW: Final = 1
_RETAIN_ALWAYS: Final = 0
_SHARED_PREFIX: Final = "$share/"
_CLOSE_TIMEOUT_S: Final = 2.0
_MAX_EXPONENT: Final = 30
_PUBACK: Final = mqtt5.puback
_PUBLISH: Final = mqtt5.Publish


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """How to reach the broker and how to behave on it."""

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    # MQTT 5 flow control: at most this many unacknowledged QoS 1 messages in flight to us.
    receive_maximum: int = 1000
    # A persistent session, so uplinks queue at the broker while we reconnect (SPEC §3.5).
    session_expiry_s: int = 3600
    # Only the first connection may start clean; reconnections always resume the session.
    # (Mosquitto 2.0.11 does not restore a session begun with Clean Start = 1 after it
    # restarts, measured; such a session is simply subscribed again.)
    clean_start: bool = False
    reconnect_base_s: float = 0.2
    reconnect_cap_s: float = 10.0
    # One attempt: TCP connect, CONNACK and SUBACK.
    connect_timeout_s: float = 10.0
    # publish(): waiting for a connection plus waiting for the PUBACK.
    publish_timeout_s: float = 10.0
    # How long handlers may run on once their connection ends or the link closes.
    drain_timeout_s: float = 5.0
    # At most this many handlers start in one event-loop iteration. A burst of thousands of
    # messages (a broker restart: every machine reconnecting, the retained presence of the
    # fleet replayed) arrives in a few socket reads; started all at once they would make each
    # iteration last a second, and every HTTP request needs several iterations. The rest wait
    # in the connection's inbox (bounded by the broker's in-flight window: see `_pump`).
    handlers_per_iteration: int = 64
    # The largest packet we accept, announced in CONNECT (MQTT 5 §3.1.2.11.4): the broker
    # drops bigger messages for us instead of sending them.
    max_packet_size: int = mqtt5.DEFAULT_MAX_PACKET


class _End(enum.Enum):
    """Why a connection is being retired."""

    LOST = "lost"  # the broker or the network closed it
    RECYCLE = "recycle"  # a handler failed retriably: reconnect so the broker redelivers
    SHUTDOWN = "shutdown"  # the link is closing


class _ConnectRefusedError(Exception):
    """CONNACK with a reason code of 0x80 or more (MQTT 5 §3.2.2.2)."""

    def __init__(self, code: int, reason: str | None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        detail = f": {self.reason}" if self.reason else ""
        return f"CONNACK reason {mqtt5.reason_name(self.code)}{detail}"


class _PublishRefusedError(Exception):
    """PUBACK with a reason code of 0x80 or more (MQTT 5 §3.4.2.1)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Connection(asyncio.Protocol):
    """One network connection to the broker: the transport, the codec and the inbox.

    Bytes are parsed as they arrive; control packets are dealt with at once, PUBLISH packets
    go to ``inbox`` for the link to start (`MqttLink._pump`). What is written during one
    loop iteration goes out in one ``transport.write``.
    """

    def __init__(
        self,
        settings: MqttSettings,
        pump: Callable[[_Connection], None],
        log: FilteringBoundLogger,
        *,
        clean_start: bool,
    ) -> None:
        self._settings = settings
        self._pump = pump
        self._log = log
        self._clean_start = clean_start
        self._loop = asyncio.get_running_loop()
        self._reader = mqtt5.Reader(settings.max_packet_size)
        self._transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self._last_in = self._last_out = 0.0
        self._keepalive_s = float(settings.keepalive_s)
        self._keepalive: asyncio.TimerHandle | None = None
        self._connack: asyncio.Future[mqtt5.ConnAck] = self._loop.create_future()
        self._subacks: dict[int, asyncio.Future[tuple[int, ...]]] = {}
        # Our QoS 1 PUBLISH packets awaiting their PUBACK, by packet id.
        self._outstanding: dict[int, asyncio.Future[bool]] = {}
        self._send_quota = mqtt5.MAX_PACKET_ID  # the broker's Receive Maximum, from CONNACK
        self._max_out: int | None = None  # the broker's Maximum Packet Size, from CONNACK
        self._next_id = 0
        self._released = asyncio.Event()
        self._lost = asyncio.Event()
        # Messages received and not yet started, in arrival order.
        self.inbox: deque[mqtt5.Publish] = deque()
        # Whether new messages may start handlers; once retiring they stay unacknowledged.
        self.accepting = True
        # Tasks running an awaitable handler; cancelled once the connection is closed.
        self.handling: set[asyncio.Task[None]] = set()
        self.running = 0  # handlers started and not yet done (tasks and futures)
        # The future the last message's handler returned, and the messages waiting for it.
        self.last_future: asyncio.Future[Any] | None = None
        self.last_group: list[tuple[str, int, int]] = []
        self.drained: asyncio.Future[None] | None = None  # set when `running` drops to 0
        self.session_present = False
        self.unacked = 0  # QoS 1 messages received and not yet acknowledged
        self.overrun_logged = False
        self.ended = asyncio.Event()
        self.end_reason = _End.LOST
        self.closed = asyncio.Event()

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport: asyncio's, or uvloop's (which is not an asyncio.Transport
        # subclass, only the same interface).
        self._transport = cast("asyncio.Transport", transport)
        self._last_in = self._loop.time()

    def data_received(self, data: bytes) -> None:
        self._last_in = self._loop.time()
        try:
            packets = self._reader.feed(data)
        except mqtt5.MqttProtocolError as exc:
            self._log.error("mqtt.protocol_violation", error=str(exc), reason=exc.reason_code)
            self.write(mqtt5.disconnect(exc.reason_code))
            self.flush()
            self.abort()
            return
        publish = _PUBLISH
        inbox = self.inbox
        for packet in packets:
            if type(packet) is publish:
                if self.accepting:
                    inbox.append(packet)
                # Otherwise left unacknowledged: the broker delivers it again.
            else:
                self._control(packet)
        if inbox:
            self._pump(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.set()
        self.end(_End.LOST)
        if self._keepalive is not None:
            self._keepalive.cancel()
        error = ConnectionError(f"connection lost: {exc!r}" if exc else "connection closed")
        if not self._connack.done():
            self._connack.set_exception(error)
        for suback in self._subacks.values():
            if not suback.done():
                suback.set_exception(error)
        self._subacks.clear()
        self.release_all()

    def _control(self, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.PubAck):
            future = self._outstanding.pop(packet.packet_id, None)
            if future is not None and not future.done():
                if packet.reason_code >= 0x80:
                    future.set_exception(_PublishRefusedError(packet.reason_code))
                else:
                    future.set_result(True)
            self._released.set()
        elif isinstance(packet, mqtt5.SubAck):
            suback = self._subacks.pop(packet.packet_id, None)
            if suback is not None and not suback.done():
                suback.set_result(packet.reason_codes)
        elif isinstance(packet, mqtt5.ConnAck):
            if not self._connack.done():
                self._connack.set_result(packet)
        elif isinstance(packet, mqtt5.Disconnect):
            self._log.warning(
                "mqtt.disconnected_by_broker",
                reason=mqtt5.reason_name(packet.reason_code),
                detail=packet.reason_string,
            )
            self.abort()
        # PINGRESP: its arrival has already moved _last_in.

    # --- writing ---

    def write(self, data: bytes) -> None:
        chunks = self._chunks
        chunks.append(data)
        if len(chunks) == 1:
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        chunks = self._chunks
        if not chunks:
            return
        data = b"".join(chunks)
        chunks.clear()
        transport = self._transport
        # What is written once the transport is closing is dropped: a late PUBACK on a
        # closed connection is expected (see MqttLink._retire).
        if transport is not None and not transport.is_closing():
            self._last_out = self._loop.time()
            transport.write(data)

    def ack(self, packet_id: int) -> None:
        """Acknowledge a QoS 1 message (PUBACK, reason 0)."""
        self.unacked -= 1
        if not self.closed.is_set():
            self.write(_PUBACK(packet_id))

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # --- the session ---

    async def open(
        self, subscriptions: Sequence[tuple[str, int]], *, replay_retained: bool = True
    ) -> None:
        """Connect and subscribe; raises OSError, TimeoutError or _ConnectRefusedError."""
        settings = self._settings
        await self._loop.create_connection(lambda: self, settings.host, settings.port)
        self.write(
            mqtt5.connect(
                settings.client_id,
                clean_start=self._clean_start,
                keepalive_s=settings.keepalive_s,
                session_expiry_s=settings.session_expiry_s,
                receive_maximum=settings.receive_maximum,
                max_packet_size=settings.max_packet_size,
                username=settings.username,
                password=settings.password,
            )
        )
        connack = await self._connack
        if connack.reason_code >= 0x80:
            raise _ConnectRefusedError(connack.reason_code, connack.reason_string)
        self.session_present = connack.session_present
        self._send_quota = connack.receive_maximum
        self._max_out = connack.maximum_packet_size
        keepalive = connack.server_keep_alive
        if keepalive is not None:
            self._keepalive_s = float(keepalive)
        if self._keepalive_s:
            self._keepalive = self._loop.call_later(self._keepalive_s / 2, self._tick)
        if not subscriptions:
            return
        # Subscribe on every connection, not only when the broker lost the session
        # (session_present = 0): it costs one round trip, picks up filters added since the
        # session was created, and Mosquitto 2.0.11 restores sessions after a restart but
        # not their shared subscriptions (measured: session_present = 1, yet messages
        # published before we subscribe again are dropped).
        packet_id = self._allocate_id()
        suback: asyncio.Future[tuple[int, ...]] = self._loop.create_future()
        self._subacks[packet_id] = suback
        self.write(
            mqtt5.subscribe(
                packet_id,
                [
                    (
                        topic,
                        mqtt5.subscription_options(
                            qos,
                            retain_handling=(
                                _RETAIN_ALWAYS
                                if replay_retained and not topic.startswith(_SHARED_PREFIX)
                                else _RETAIN_IF_NEW
                            ),
                        ),
                    )
                    for topic, qos in subscriptions
                ],
            )
        )
        codes = await suback
        refused = [
            (topic, code)
            for (topic, _), code in zip(subscriptions, codes, strict=False)
            if code >= 0x80
        ]
        if refused:
            raise _SubscriptionRefusedError(refused)

    def _tick(self) -> None:
        """Keep alive (MQTT 5 §3.1.2.10): ping when quiet, give up on a silent broker."""
        now = self._loop.time()
        period = self._keepalive_s
        if now - self._last_in > period * 1.5:
            self._log.warning("mqtt.keepalive_timeout", silent_s=round(now - self._last_in, 1))
            self.abort()
            return
        if now - self._last_out >= period / 2:
            self.write(mqtt5.pingreq())
        self._keepalive = self._loop.call_later(period / 2, self._tick)

    def _allocate_id(self) -> int:
        self._next_id = mqtt5.next_packet_id(self._next_id, self._outstanding, self._subacks)
        return self._next_id

    def usable(self) -> bool:
        """Whether publishing on this connection can still work."""
        return not self.closed.is_set() and not (
            self.ended.is_set() and self.end_reason is _End.LOST
        )

    def stop_accepting(self) -> None:
        """Start no more handlers; messages not yet started stay unacknowledged."""
        self.accepting = False
        self.inbox.clear()

    def end(self, reason: _End) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()

    async def close(self) -> None:
        """Disconnect (the session stays, MQTT 5 §3.1.2.11.2) and close the socket."""
        transport = self._transport
        try:
            if transport is not None and not self._lost.is_set():
                self.write(mqtt5.disconnect())
                self.flush()
                transport.close()
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await self._lost.wait()
        except TimeoutError:
            self._log.debug("mqtt.close_timed_out")
            self.abort()
        finally:
            if self._keepalive is not None:
                self._keepalive.cancel()
            self.release_all()
            self.closed.set()

    def publish(
        self, topic: str, payload: bytes, qos: int, *, retain: bool, message_expiry_s: int | None
    ) -> asyncio.Future[bool] | None:
        """Write a PUBLISH; for QoS 1 return a future that says whether it was acknowledged.

        Raises OverflowError when the broker's Receive Maximum (MQTT 5 §4.9) of our QoS 1
        messages are awaiting their PUBACK, and ValueError for a message larger than the
        broker's Maximum Packet Size (§3.2.2.3.6: the broker would disconnect us, and the
        same message would do it again after every reconnection).
        """
        if not self.usable():
            gone: asyncio.Future[bool] = self._loop.create_future()
            gone.set_result(False)
            return gone
        if qos and len(self._outstanding) >= self._send_quota:
            raise OverflowError("the broker's receive maximum is reached")
        packet_id = self._allocate_id() if qos else 0
        packet = mqtt5.publish(
            topic,
            payload,
            qos=qos,
            packet_id=packet_id,
            retain=retain,
            message_expiry_s=message_expiry_s,
        )
        if self._max_out is not None and len(packet) > self._max_out:
            raise ValueError(
                f"a message of {len(packet)} bytes to {topic!r} exceeds the broker's maximum "
                f"packet size of {self._max_out} bytes"
            )
        self.write(packet)
        if not qos:
            return None
        future: asyncio.Future[bool] = self._loop.create_future()
        self._outstanding[packet_id] = future
        return future

    async def wait_released(self) -> None:
        """Wait until a packet id is freed (a PUBACK arrives, or the connection ends)."""
        self._released.clear()
        await self._released.wait()

    def release_all(self) -> None:
        """Resolve every waiter with False: the connection is gone, publish again elsewhere."""
        waiting, self._outstanding = self._outstanding, {}
        for future in waiting.values():
            if not future.done():
                future.set_result(False)
        self._released.set()


class _PubAckTimeoutError(Exception):
    """No PUBACK before the publish's deadline."""


def _expire(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_exception(_PubAckTimeoutError())


class _SubscriptionRefusedError(Exception):
    def __init__(self, refused: list[tuple[str, int]]) -> None:
        super().__init__(refused)
        self.refused = refused

    def __str__(self) -> str:
        return ", ".join(
            f"{topic!r} (reason {mqtt5.reason_name(code)})" for topic, code in self.refused
        )


class MqttLink:
    """A self-healing MQTT 5 connection that acknowledges messages after handling them.

    Use as ``async with MqttLink(settings, handler, subscriptions) as link``. A QoS 1
    message is acknowledged when ``handler`` is done with it (module docstring: it returned
    None, or what it returned has completed), or when it raises an error that is not
    retriable (logged and counted: retrying cannot help, and an unacknowledged message holds
    a slot of the receive window). A `GatewayError` with ``retriable = True`` leaves the
    message unacknowledged and makes the link reconnect after a backoff, so that the broker
    delivers it again (MQTT 5 §4.4).

    In flight: the broker must not send more than ``receive_maximum`` unacknowledged QoS 1
    messages (MQTT 5 §3.1.2.11.3, §4.9), and a message stays unacknowledged until its
    handler is done, so the broker's window bounds the handlers in flight. Mosquitto 2.0
    overshoots that window once PUBACKs start flowing (eclipse-mosquitto/mosquitto#2301;
    measured here: 345 in flight for a window of 5), so the link also caps running handlers
    at ``receive_maximum`` itself; messages beyond the cap wait, unacknowledged, in the
    connection's inbox until a handler is done.

    Messages start in the order they arrived, at most ``handlers_per_iteration`` per loop
    iteration.

    When a connection ends, its handlers get drain_timeout_s to finish; the connection is
    then closed and the handlers still running are cancelled. Their messages are not
    acknowledged, and the broker delivers them again (to this link or, for a shared
    subscription, another member of the group).
    """

    def __init__(
        self,
        settings: MqttSettings,
        handler: MessageHandler,
        subscriptions: Sequence[tuple[str, int]],
        *,
        logger: FilteringBoundLogger | None = None,
    ) -> None:
        for topic, qos in subscriptions:
            # SPEC §3.2: QoS 1 everywhere. QoS 2 would need a PUBREC after the handler,
            # which this link does not implement.
            if qos not in (0, 1):
                raise ValueError(f"subscription {topic!r}: QoS must be 0 or 1, not {qos}")
        self.settings = settings
        # The two counters every message moves are plain attributes; `stats` merges them in.
        self._received = 0
        self._handled = 0
        self._counts: dict[str, int] = {
            "handler_errors": 0,
            "left_unacked": 0,
            "reconnects": 0,
            "published": 0,
            "broker_overruns": 0,
        }
        self._log = (logger or get_logger(__name__)).bind(
            mqtt_client_id=settings.client_id, broker=f"{settings.host}:{settings.port}"
        )
        self._handler = handler
        self._subscriptions = tuple(subscriptions)
        # The connection publish() may use: set from SUBACK until it is closed.
        self._conn: _Connection | None = None
        self._changed = asyncio.Condition()
        self._closing = False
        self._failure: GatewayError | None = None
        self._retriable_streak = 0
        self._receive_maximum = settings.receive_maximum
        self._tg: asyncio.TaskGroup | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._interruptible = False  # the supervisor is backing off or connecting
        self._ready: asyncio.Future[None] | None = None
        # Admission of handlers per loop iteration (MqttSettings.handlers_per_iteration).
        self._per_iteration = settings.handlers_per_iteration
        self._admitted = 0
        self._iteration_scheduled = False
        self._subscribed = False  # a first connection has subscribed (Retain Handling above)

    @property
    def stats(self) -> dict[str, int]:
        """Counters since the link was made, in a new dict.

        received, handled, handler_errors, left_unacked (retriable errors), reconnects,
        published, broker_overruns (QoS 1 messages beyond receive_maximum unacknowledged
        ones: a broker bug).
        """
        return {"received": self._received, "handled": self._handled, **self._counts}

    @property
    def connected(self) -> bool:
        """Whether the link is connected and subscribed right now."""
        conn = self._conn
        return conn is not None and conn.usable()

    async def __aenter__(self) -> Self:
        """Connect (retrying with backoff) and subscribe; return once both are done."""
        if self._tg is not None:
            raise RuntimeError("an MqttLink can be entered only once")
        self._ready = asyncio.get_running_loop().create_future()
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._supervisor = self._tg.create_task(self._supervise(), name="vendgate.mqtt.supervisor")
        try:
            await self._ready
        except BaseException as exc:
            # Cancelled, or refused for good (the supervisor has returned): clean up, re-raise.
            await self._begin_shutdown()
            cancelled = isinstance(exc, asyncio.CancelledError)
            await self._finish(*((type(exc), exc, exc.__traceback__) if cancelled else (None,) * 3))
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Drain handlers for up to drain_timeout_s, then disconnect; the session persists."""
        await self._begin_shutdown()
        # Not the body's exception: the TaskGroup would abort the drain and wrap the
        # exception in a group. (If the supervisor failed, the group raises that instead.)
        await self._finish(None, None, None)

    # The timeout parameter is the API callers asked for: it turns into BrokerUnavailableError.
    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until connected and subscribed; BrokerUnavailableError after `timeout` s."""
        loop = asyncio.get_running_loop()
        await self._connection(None if timeout is None else loop.time() + timeout)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        message_expiry_s: int | None = None,
    ) -> None:
        """Publish; at QoS 1, return once the broker has acknowledged it (PUBACK).

        Raises BrokerUnavailableError when there is no connection, or no PUBACK, within
        publish_timeout_s. A QoS 1 message whose connection drops before the PUBACK is sent
        again on the next connection, so the broker may receive it twice (SPEC §3.2).
        """
        if qos not in (0, 1):
            raise ValueError(f"QoS must be 0 or 1, not {qos}")
        # message_expiry_s, MQTT 5 §3.3.2.3.3: the broker drops the message once this many
        # seconds have passed without delivering it (SPEC §3.5: a Vend's time left to its
        # deadline).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.publish_timeout_s
        while True:
            conn = self._conn
            if conn is None or self._failure is not None or not conn.usable():
                conn = await self._connection(deadline)
            try:
                acked = conn.publish(
                    topic, payload, qos, retain=retain, message_expiry_s=message_expiry_s
                )
            except OverflowError:
                await self._before(deadline, conn.wait_released(), "free packet id")
                continue
            if acked is None:
                self._counts["published"] += 1
                return
            # A timer that fails the PUBACK's future rather than a timeout scope around the
            # wait: paid on every publish, and a scope does more (reschedules, uncancels).
            timer = loop.call_at(deadline, _expire, acked)
            try:
                if await acked:
                    self._counts["published"] += 1
                    return
            except _PubAckTimeoutError:
                raise BrokerUnavailableError(
                    f"no PUBACK from {self.settings.host}:{self.settings.port} "
                    f"within {self.settings.publish_timeout_s} s"
                ) from None
            except _PublishRefusedError as exc:
                raise BrokerUnavailableError(
                    f"{self.settings.host}:{self.settings.port} refused a message to "
                    f"{topic!r} (PUBACK reason {mqtt5.reason_name(exc.code)})"
                ) from None
            finally:
                timer.cancel()
            # The connection ended before the PUBACK: send it again on the next one.

    # --- receiving ---

    def _pump(self, conn: _Connection) -> None:
        """Start the inbox's messages, in order, as far as the iteration budget and cap allow.

        Called when a read adds messages, when a handler is done (a slot is free) and once
        per loop iteration while messages wait. Reading never pauses: the handlers waiting
        may be waiting for PUBACKs of their own publishes, which arrive on this socket (a
        paused read deadlocked 10,000 machines saying Hello, each answered with a Time). The
        inbox is bounded by the broker's in-flight window instead (QoS 1, receive_maximum,
        plus what Mosquitto overshoots it by).
        """
        inbox = conn.inbox
        cap = self._receive_maximum
        budget = self._per_iteration - self._admitted
        started = 0
        start = self._start
        while inbox and started < budget and conn.running < cap and conn.accepting:
            topic, payload, qos, packet_id, _, _ = inbox.popleft()
            started += 1
            start(conn, topic, payload, qos, packet_id)
        if started:
            self._admitted += started
            if not self._iteration_scheduled:
                self._iteration_scheduled = True
                asyncio.get_running_loop().call_soon(self._new_iteration, conn)

    def _new_iteration(self, conn: _Connection) -> None:
        self._iteration_scheduled = False
        self._admitted = 0
        if conn.inbox:
            self._pump(conn)

    # One method on purpose: every call more is paid on every message.
    def _start(
        self, conn: _Connection, topic: str, payload: bytes, qos: int, packet_id: int
    ) -> None:
        """Run the handler for one message: acknowledge it now, or when it is done."""
        self._received += 1
        if qos:
            conn.unacked += 1
            if conn.unacked > self._receive_maximum:
                self._note_overrun(conn)
        try:
            outcome = self._handler(topic, payload)
        except Exception as exc:  # noqa: BLE001 -- a faulty handler must not stop the link
            if self._handler_failed(conn, topic, qos, exc) and qos:
                conn.ack(packet_id)
            return
        if outcome is None:
            self._handled += 1
            self._retriable_streak = 0
            if qos:
                conn.ack(packet_id)
            return
        conn.running += 1
        if isinstance(outcome, asyncio.Future):
            # Consecutive messages waiting for the same future (a telemetry batch's commit)
            # share one done-callback: a list append each.
            if outcome is conn.last_future and not outcome.done():
                conn.last_group.append((topic, qos, packet_id))
                return
            group = [(topic, qos, packet_id)]
            conn.last_future, conn.last_group = outcome, group
            outcome.add_done_callback(functools.partial(self._future_done, conn, group))
            return
        task = asyncio.get_running_loop().create_task(
            self._await(conn, outcome, topic, qos, packet_id)
        )
        conn.handling.add(task)

    def _future_done(
        self, conn: _Connection, group: list[tuple[str, int, int]], future: asyncio.Future[Any]
    ) -> None:
        """Settle the messages that waited for ``future``: (topic, qos, packet id) each."""
        if conn.last_future is future:
            conn.last_future = None
        if future.cancelled():
            # Whoever made it gave up on it: have the broker deliver the messages again.
            acked = self._abandoned(conn, group[0][0], len(group))
        else:
            error = future.exception()
            if error is None:
                self._handled += len(group)
                self._retriable_streak = 0
                acked = True
            elif isinstance(error, Exception):
                qos = max(qos for _, qos, _ in group)
                acked = self._handler_failed(conn, group[0][0], qos, error, messages=len(group))
            else:
                acked = False
        if acked:
            ack = conn.ack
            for _, qos, packet_id in group:
                if qos:
                    ack(packet_id)
        self._handler_done(conn, len(group))

    async def _await(
        self, conn: _Connection, outcome: Awaitable[None], topic: str, qos: int, packet_id: int
    ) -> None:
        acked = False
        try:
            await outcome
        except asyncio.CancelledError:
            # The link cancels a handler only once its connection is closed (see _retire),
            # so that no PUBACK for it can reach the broker. Otherwise someone else is
            # cancelling this task: let it end cancelled.
            if not conn.closed.is_set():
                self._abandoned(conn, topic, 1)  # cancelled by someone else
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except Exception as exc:  # noqa: BLE001 -- a faulty handler must not stop the link
            acked = self._handler_failed(conn, topic, qos, exc)
        else:
            self._handled += 1
            self._retriable_streak = 0
            acked = True
        finally:
            conn.handling.discard(asyncio.current_task())
            self._handler_done(conn)
        if acked and qos:
            conn.ack(packet_id)

    def _handler_done(self, conn: _Connection, count: int = 1) -> None:
        conn.running -= count
        if conn.inbox and not self._iteration_scheduled:
            self._pump(conn)
        if not conn.running and conn.drained is not None and not conn.drained.done():
            conn.drained.set_result(None)

    def _handler_failed(
        self, conn: _Connection, topic: str, qos: int, exc: Exception, *, messages: int = 1
    ) -> bool:
        """Count and log a handler's error; return whether the message may be acknowledged.

        ``messages`` > 1: the error is shared by that many messages, ``topic`` being the first
        one's; logged once.
        """
        self._counts["handler_errors"] += messages
        if not isinstance(exc, GatewayError) or not exc.retriable or qos == 0:
            self._log.error("mqtt.handler_failed", topic=topic, messages=messages, exc_info=exc)
            return True
        self._counts["left_unacked"] += messages
        self._retriable_streak += 1
        self._log.warning(
            "mqtt.handler_failed_retriable",
            topic=topic,
            messages=messages,
            error=str(exc),
            error_type=type(exc).__name__,
        )
        conn.end(_End.RECYCLE)
        return False

    def _abandoned(self, conn: _Connection, topic: str, messages: int) -> bool:
        """Reconnect so that the broker delivers again what a cancelled handler left.

        Left unacknowledged, a message would otherwise hold a slot of the receive window for
        the connection's whole life (the broker redelivers only on a new one, MQTT 5 §4.4).
        Returns False: not to be acknowledged.
        """
        self._counts["left_unacked"] += messages
        self._log.warning("mqtt.handler_cancelled", topic=topic, messages=messages)
        conn.end(_End.RECYCLE)
        return False

    def _note_overrun(self, conn: _Connection) -> None:
        self._counts["broker_overruns"] += 1
        if not conn.overrun_logged:
            # MQTT 5 §4.9 lets us DISCONNECT with 0x93 here; with Mosquitto 2.0 doing it
            # routinely that would only loop, and the handler cap keeps handlers bounded.
            conn.overrun_logged = True
            self._log.warning(
                "mqtt.broker_exceeded_receive_maximum",
                receive_maximum=self.settings.receive_maximum,
                unacked=conn.unacked,
            )

    # --- connecting ---

    async def _supervise(self) -> None:
        """Keep one connection up: connect, wait for its end, retire it, back off, repeat."""
        attempt = 0
        first = True
        while not self._closing:
            delay = 0.0
            if not first:
                # House style #10: jittered ("full jitter"), capped exponential backoff.
                ceiling = self.settings.reconnect_base_s * 2 ** min(attempt, _MAX_EXPONENT)
                delay = random.uniform(0, min(self.settings.reconnect_cap_s, ceiling))  # noqa: S311
            self._log.info("mqtt.connecting", attempt=attempt, delay_s=round(delay, 3))
            conn = _Connection(
                self.settings,
                self._pump,
                self._log,
                clean_start=first and self.settings.clean_start,
            )
            opened = False
            refusal: _PermanentRefusalError | None = None
            try:
                # Shutdown cancels these two waits (they can be long); never a drain.
                self._interruptible = True
                try:
                    await asyncio.sleep(delay)
                    opened = await self._open(conn, attempt)
                finally:
                    self._interruptible = False
                if opened:
                    await self._serve(conn, reconnected=not first)
            except _PermanentRefusalError as exc:
                refusal = exc
            finally:
                # Also when cancelled: never leave a socket or a handler behind.
                await self._retire(conn)
            if refusal is not None:
                error = ConfigError(str(refusal), f"MQTT broker {self.settings.host}")
                await self._fail(error)
                if first:
                    return  # __aenter__ raises it
                raise error from refusal
            first = False
            if not opened:
                attempt += 1
            elif conn.end_reason is _End.LOST:
                self._log.warning("mqtt.connection_lost")
                attempt = 0
            elif conn.end_reason is _End.RECYCLE:
                # Reconnect so the broker redelivers what a handler could not take yet,
                # backing off further while the failures go on.
                self._log.warning("mqtt.reconnecting_to_redeliver", streak=self._retriable_streak)
                attempt = self._retriable_streak

    async def _open(self, conn: _Connection, attempt: int) -> bool:
        """Connect and subscribe; False (logged) when worth retrying."""
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await conn.open(self._subscriptions, replay_retained=not self._subscribed)
            self._subscribed = True
        except _ConnectRefusedError as exc:
            if exc.code in _PERMANENT_CONNACK_CODES:
                raise _PermanentRefusalError(f"refused the connection: {exc}") from exc
            self._log.warning("mqtt.connect_failed", attempt=attempt, error=str(exc))
            return False
        except _SubscriptionRefusedError as exc:
            raise _PermanentRefusalError(f"refused the subscriptions {exc}") from exc
        except (OSError, TimeoutError) as exc:
            self._log.warning("mqtt.connect_failed", attempt=attempt, error=repr(exc))
            return False
        return True

    async def _serve(self, conn: _Connection, *, reconnected: bool) -> None:
        if reconnected:
            self._counts["reconnects"] += 1
        self._log.info("mqtt.connected", session_present=conn.session_present)
        await self._set_connection(conn)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        if self._closing:  # shutdown began while we were connecting
            conn.end(_End.SHUTDOWN)
        await conn.ended.wait()

    async def _retire(self, conn: _Connection) -> None:
        """Stop taking messages, let handlers finish (drain_timeout_s), then disconnect."""
        conn.stop_accepting()
        if conn.end_reason is _End.LOST:
            await self._set_connection(None)
            conn.release_all()  # publishers waiting for a PUBACK re-send elsewhere
        try:
            if conn.running:
                # Handlers may still publish (and, unless the connection was lost, acknowledge).
                conn.drained = asyncio.get_running_loop().create_future()
                await asyncio.wait({conn.drained}, timeout=self.settings.drain_timeout_s)
        finally:
            if self._conn is conn:
                await self._set_connection(None)
            # Close first, then cancel what is still running: a PUBACK written for a
            # cancelled handler then goes nowhere, even if the handler swallowed the
            # cancellation, and the broker delivers the message again. (A handler's future
            # still pending is left to complete; its PUBACK goes nowhere either.)
            await conn.close()
            if conn.handling:
                pending = set(conn.handling)
                self._log.warning("mqtt.handlers_cancelled", count=len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)

    async def _set_connection(self, conn: _Connection | None) -> None:
        async with self._changed:
            self._conn = conn
            self._changed.notify_all()

    async def _fail(self, error: GatewayError) -> None:
        async with self._changed:
            self._failure = error
            self._changed.notify_all()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)

    async def _begin_shutdown(self) -> None:
        async with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._conn is not None:
            self._conn.end(_End.SHUTDOWN)  # the supervisor drains it and returns
        elif self._interruptible and self._supervisor is not None:
            # Backing off or connecting: nothing to drain, and the wait could be long.
            self._supervisor.cancel()
        # Otherwise it is retiring a connection and stops when that is done.

    async def _finish(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Wait for the supervisor: it retires the connection and its handlers."""
        if self._tg is None:
            return
        await self._tg.__aexit__(exc_type, exc, traceback)

    async def _connection(self, deadline: float | None) -> _Connection:
        """Return the current connection, waiting for one until `deadline` (loop time)."""
        async with self._changed:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._changed.wait_for(
                        lambda: self.connected or self._closing or self._failure is not None
                    )
            except TimeoutError:
                raise BrokerUnavailableError(
                    f"not connected to {self.settings.host}:{self.settings.port}"
                ) from None
            if self._failure is not None:
                raise self._failure
            if self._conn is None or not self._conn.usable():
                raise ShuttingDownError
            return self._conn

    async def _before(self, deadline: float, awaitable: Awaitable[bool | None], what: str) -> bool:
        try:
            async with asyncio.timeout_at(deadline):
                return bool(await awaitable)
        except TimeoutError:
            raise BrokerUnavailableError(
                f"no {what} from {self.settings.host}:{self.settings.port} "
                f"within {self.settings.publish_timeout_s} s"
            ) from None


class _PermanentRefusalError(Exception):
    """The broker refused us in a way that retrying cannot fix."""
