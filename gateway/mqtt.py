"""The gateway's MQTT 5 link: the only module that imports gmqtt.

`MqttLink` connects, subscribes, hands every message to one async handler, acknowledges a
QoS 1 message only when the handler has returned, and reconnects by itself. Everything gmqtt
does is hidden behind it, so the client library can be swapped without touching callers.

How it uses gmqtt (0.8), and why:

* One gmqtt ``Client`` per network connection. gmqtt's own reconnect is switched off
  (`_OneConnectionClient.reconnect`); `MqttLink` reconnects with a fresh client and its own
  jittered backoff. A PUBACK can then only ever be written to the connection its PUBLISH came
  on: the broker redelivers what a dead connection left unacknowledged (MQTT 5 §4.4), and a
  late PUBACK cannot acknowledge the redelivered copy before it has been handled.
* ``optimistic_acknowledgement=False`` with an async ``on_message``: gmqtt sends the PUBACK,
  with the reason code ``on_message`` returns, once that coroutine has finished.
* gmqtt does not say when a PUBLISH of ours is acknowledged. It keeps unacknowledged packets
  in a pluggable store and removes them on PUBACK; `_PubackWaiters` is that store, with a
  future per packet id. (gmqtt ignores the PUBACK reason code, so a refusal such as 0x87
  "not authorized" is indistinguishable from success here.)
* Per message, the only task is the one gmqtt creates for ``on_message``: the handler runs in
  it, and the link never cancels it while its connection is open (see `MqttLink._receive`).
  Outgoing packets go through `_WriteBuffer`, one ``transport.write`` per loop iteration.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import gmqtt
from gmqtt.mqtt.constants import MQTTv50

from gateway.errors import BrokerUnavailableError, ConfigError, GatewayError, ShuttingDownError
from gateway.logs import get_logger

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

__all__ = ["MessageHandler", "MqttLink", "MqttSettings"]

MessageHandler = Callable[[str, bytes], Awaitable[None]]
"""Called with (topic, payload) for every message; the topic is the real one, not a filter."""

_PUBACK_SUCCESS: Final = 0
# MQTT 5 §3.2.2.2: CONNACK refusals that retrying with the same settings cannot fix (bad
# credentials, not authorised, banned, malformed, unsupported...). Same list as gmqtt's.
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
# Called only inside gmqtt's tasks, where it never returns None.
_current_task: Final[Callable[[], asyncio.Task[Any]]] = asyncio.current_task  # type: ignore[assignment]
_MAX_EXPONENT: Final = 30


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
    # iteration last a second, and every HTTP request needs several iterations.
    handlers_per_iteration: int = 64


class _End(enum.Enum):
    """Why a connection is being retired."""

    LOST = "lost"  # the broker or the network closed it
    RECYCLE = "recycle"  # a handler failed retriably: reconnect so the broker redelivers
    SHUTDOWN = "shutdown"  # the link is closing


def _as_int(value: Any) -> int:  # noqa: ANN401 -- gmqtt hands out untyped values
    # gmqtt's property values come as one-element lists; flags come as plain ints.
    if isinstance(value, list | tuple):
        value = value[0]
    return int(value)


class _WriteBuffer:
    """Sends what gmqtt writes during one event-loop iteration with one ``transport.write``.

    gmqtt writes every packet as soon as it is built; with ``optimistic_acknowledgement=False``
    each PUBACK is a write, hence a ``send`` system call, of its own. This replaces the
    protocol's ``write_data``, through which gmqtt 0.8 writes every packet (the one other
    path, ``MQTTConnection.send_package``, replays stored QoS packets, of which
    `_PubackWaiters` never has any): packets are kept in order and sent together from a
    ``call_soon`` callback. ``MQTTConnection.close`` is wrapped to send them first, so the
    DISCONNECT written just before it, and anything before that, still go out. What is
    written once the transport is closing is dropped, as gmqtt does (without its warning:
    a late PUBACK on a closed connection is expected here, see `MqttLink._receive`).
    """

    __slots__ = ("_chunks", "_connection", "_loop", "_transport")

    def __init__(self, connection: Any) -> None:  # noqa: ANN401 -- gmqtt's MQTTConnection
        self._connection = connection
        # gmqtt 0.8 internals (the dependency is pinned below 0.9).
        self._transport: asyncio.Transport = connection._transport  # noqa: SLF001
        self._loop = asyncio.get_running_loop()
        self._chunks: list[bytes] = []
        connection._protocol.write_data = self.write  # noqa: SLF001
        close = connection.close

        async def close_after_flush() -> None:
            self.flush()
            await close()

        connection.close = close_after_flush

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
        # Read by gmqtt's keepalive timer: a PINGREQ is due only after a quiet spell.
        self._connection._last_data_out = time.monotonic()  # noqa: SLF001
        if not self._transport.is_closing():
            self._transport.write(data)


class _OneConnectionClient(gmqtt.Client):  # type: ignore[misc] # gmqtt ships no types
    """A gmqtt client used for exactly one network connection."""

    async def reconnect(self, delay: bool = False) -> None:  # noqa: ARG002
        # gmqtt schedules this itself on connection loss and on retryable CONNACK refusals.
        # Doing nothing leaves reconnecting to MqttLink, which needs a fresh connection (and
        # a fresh client) each time; two reconnect loops would take the session from each
        # other. (stop_reconnect() is not enough: it still allows one attempt.)
        return

    async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        # Called by connect() (and by reconnect(), which does nothing here) before the
        # CONNECT packet is written: every packet of the connection goes through the buffer.
        connection = await super()._create_connection(*args, **kwargs)
        _WriteBuffer(connection)
        return connection


class _PubackWaiters:
    """gmqtt's store of unacknowledged outgoing PUBLISH packets, resolving a future on PUBACK.

    gmqtt calls `push_message` synchronously inside ``Client.publish`` and
    `remove_message_by_mid` on PUBACK. It would replay stored packets after a reconnect;
    a client here never reconnects, and publishers re-send on the next connection instead.
    """

    def __init__(self) -> None:
        self._waiting: dict[int, asyncio.Future[bool]] = {}
        self._last: asyncio.Future[bool] | None = None
        self._released = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()

    # --- the interface gmqtt's Client uses ---

    def push_message(self, mid: int, raw_package: bytes) -> None:  # noqa: ARG002
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[mid] = future
        self._last = future
        self._empty.clear()

    def remove_message_by_mid(self, mid: int) -> None:
        future = self._waiting.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(True)
        self._released.set()
        if not self._waiting:
            self._empty.set()

    @property
    def is_empty(self) -> bool:
        return not self._waiting

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def clear(self) -> None:
        self.release_all()

    def get_all(self) -> list[tuple[int, bytes]]:
        return []

    # --- for MqttLink ---

    def take_last(self) -> asyncio.Future[bool]:
        """Return the future of the packet the last ``Client.publish`` stored."""
        future, self._last = self._last, None
        if future is None:
            raise RuntimeError("gmqtt did not store the QoS 1 packet it sent")
        return future

    async def wait_released(self) -> None:
        """Wait until a packet id is freed (a PUBACK arrives, or the connection ends)."""
        self._released.clear()
        await self._released.wait()

    def release_all(self) -> None:
        """Resolve every waiter with False: the connection is gone, publish again elsewhere."""
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_result(False)
        self._released.set()
        self._empty.set()


_Receive = Callable[
    ["_Connection", object, str | bytes, bytes, int, object], Coroutine[Any, Any, int]
]


class _Connection:
    """One network connection to the broker, on its own single-use gmqtt client."""

    def __init__(
        self,
        settings: MqttSettings,
        receive: _Receive,
        log: FilteringBoundLogger,
        *,
        clean_start: bool,
    ) -> None:
        self.acks = _PubackWaiters()
        # Whether new messages may start handlers; once retiring they stay unacknowledged.
        self.accepting = True
        # gmqtt's tasks now running the handler. At most one connection at a time has any
        # (a connection is retired before the next one is opened), so `running` is also the
        # link's count of handlers in flight, kept at or below receive_maximum.
        self.handling: set[asyncio.Task[Any]] = set()
        self.running = 0  # handlers running, plus slots handed to a waiter not yet started
        self.slot_waiters: deque[asyncio.Future[bool]] = deque()
        self.drained: asyncio.Future[None] | None = None  # set when `running` drops to 0
        self.session_present = False
        self.unacked = 0  # QoS 1 messages received and not yet acknowledged
        self.overrun_logged = False
        self.ended = asyncio.Event()
        self.end_reason = _End.LOST
        self.closed = asyncio.Event()
        self._log = log
        self._subacks: dict[int, asyncio.Future[tuple[int, ...]]] = {}
        self._client: Any = _OneConnectionClient(
            settings.client_id,
            clean_session=clean_start,
            optimistic_acknowledgement=False,
            persistent_storage=self.acks,
            # CONNECT properties (MQTT 5 §3.1.2.11).
            session_expiry_interval=settings.session_expiry_s,
            receive_maximum=settings.receive_maximum,
        )
        if settings.username is not None:
            self._client.set_auth_credentials(settings.username, settings.password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        # gmqtt calls it as receive(self, client, topic, payload, qos, properties) and runs
        # the coroutine in a task of its own, which writes the PUBACK once it has returned.
        self._client.on_message = functools.partial(receive, self)

    async def open(
        self,
        settings: MqttSettings,
        subscriptions: Sequence[tuple[str, int]],
        *,
        replay_retained: bool = True,
    ) -> None:
        """Connect and subscribe; raises OSError, TimeoutError or gmqtt.MQTTConnectError."""
        await self._client.connect(
            settings.host, settings.port, keepalive=settings.keepalive_s, version=MQTTv50
        )
        if not subscriptions:
            return
        if self.ended.is_set():
            raise ConnectionError("connection lost before SUBSCRIBE")
        # Subscribe on every connection, not only when the broker lost the session
        # (session_present = 0): it costs one round trip, picks up filters added since the
        # session was created, and Mosquitto 2.0.11 restores sessions after a restart but
        # not their shared subscriptions (measured: session_present = 1, yet messages
        # published before we subscribe again are dropped). Shared filters
        # ("$share/group/...", MQTT 5 §4.8.2) go through gmqtt unchanged.
        mid = self._client.subscribe(
            [
                gmqtt.Subscription(
                    topic,
                    qos=qos,
                    retain_handling_options=(
                        _RETAIN_ALWAYS
                        if replay_retained and not topic.startswith(_SHARED_PREFIX)
                        else _RETAIN_IF_NEW
                    ),
                )
                for topic, qos in subscriptions
            ]
        )
        suback: asyncio.Future[tuple[int, ...]] = asyncio.get_running_loop().create_future()
        self._subacks[_as_int(mid)] = suback
        codes = await suback
        refused = [
            (topic, code)
            for (topic, _), code in zip(subscriptions, codes, strict=False)
            if code >= 0x80
        ]
        if refused:
            raise _SubscriptionRefusedError(refused)

    def usable(self) -> bool:
        """Whether publishing on this connection can still work."""
        return not self.closed.is_set() and not (
            self.ended.is_set() and self.end_reason is _End.LOST
        )

    def stop_accepting(self) -> None:
        """Start no more handlers; messages waiting for a slot stay unacknowledged."""
        self.accepting = False
        waiters, self.slot_waiters = self.slot_waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(False)

    def take_slot(self, cap: int) -> bool:
        """Count one more handler running if accepting and below `cap`; say whether."""
        if self.accepting and self.running < cap:
            self.running += 1
            return True
        return False

    def release_slot(self) -> None:
        """Pass the slot of a handler that is done (or of an unused one) on, or free it."""
        waiters = self.slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # not cancelled
                waiter.set_result(True)  # `running` stays: the slot changes hands
                return
        self.running -= 1
        if not self.running and self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def end(self, reason: _End) -> None:
        if not self.ended.is_set():
            self.end_reason = reason
            self.ended.set()

    async def close(self) -> None:
        """Disconnect (the session stays, MQTT 5 §3.1.2.11.2) and close the socket."""
        try:
            # A lost connection has no socket left to write a DISCONNECT to.
            if not (self.ended.is_set() and self.end_reason is _End.LOST):
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await self._client.disconnect()
        except (OSError, TimeoutError) as exc:
            self._log.debug("mqtt.close_failed", error=repr(exc))
        finally:
            self.acks.release_all()
            self.closed.set()

    def publish(
        self, topic: str, payload: bytes, qos: int, *, retain: bool, properties: dict[str, int]
    ) -> asyncio.Future[bool] | None:
        """Write a PUBLISH; for QoS 1 return a future that says whether it was acknowledged.

        Raises OverflowError when every packet id is in use: gmqtt sizes its id pool from the
        broker's Receive Maximum (MQTT 5 §4.9), which caps our QoS 1 messages awaiting PUBACK.
        """
        if not self.usable():
            gone: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            gone.set_result(False)
            return gone
        self._client.publish(topic, payload, qos=qos, retain=retain, **properties)
        return self.acks.take_last() if qos else None

    # --- gmqtt callbacks: the first argument is the client ---

    def _on_connect(self, _client: object, flags: object, _rc: object, _props: object) -> None:
        self.session_present = bool(_as_int(flags))

    def _on_disconnect(self, _client: object, _packet: object, _exc: object = None) -> None:
        self.end(_End.LOST)
        for future in self._subacks.values():
            if not future.done():
                future.set_exception(ConnectionError("connection lost before SUBACK"))
        self._subacks.clear()

    def _on_subscribe(self, _client: object, mid: object, codes: object, _props: object) -> None:
        future = self._subacks.pop(_as_int(mid), None)
        if future is not None and not future.done() and isinstance(codes, tuple | list):
            future.set_result(tuple(int(code) for code in codes))


class _SubscriptionRefusedError(Exception):
    def __init__(self, refused: list[tuple[str, int]]) -> None:
        super().__init__(refused)
        self.refused = refused

    def __str__(self) -> str:
        return ", ".join(f"{topic!r} (reason 0x{code:02x})" for topic, code in self.refused)


class MqttLink:
    """A self-healing MQTT 5 connection that acknowledges messages after handling them.

    Use as ``async with MqttLink(settings, handler, subscriptions) as link``. A QoS 1
    message is acknowledged when ``handler`` returns, or when it raises an error that is not
    retriable (logged and counted: retrying cannot help, and an unacknowledged message holds
    a slot of the receive window). A `GatewayError` with ``retriable = True`` leaves the
    message unacknowledged and makes the link reconnect after a backoff, so that the broker
    delivers it again (MQTT 5 §4.4).

    In flight: the broker must not send more than ``receive_maximum`` unacknowledged QoS 1
    messages (MQTT 5 §3.1.2.11.3, §4.9), and a message stays unacknowledged until its
    handler is done, so the broker's window bounds the handlers in flight. Mosquitto 2.0
    overshoots that window once PUBACKs start flowing (eclipse-mosquitto/mosquitto#2301;
    measured here: 345 in flight for a window of 5), so the link also caps running handlers
    at ``receive_maximum`` itself; messages beyond the cap wait, unacknowledged, for a slot.

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
        # gmqtt runs each on_message in a task of its own and keeps no reference to it:
        # how many are inside `_receive`, and a future for close to wait on them.
        self._inside = 0
        self._all_returned: asyncio.Future[None] | None = None
        # Admission of handlers per loop iteration (MqttSettings.handlers_per_iteration).
        self._per_iteration = settings.handlers_per_iteration
        self._admitted = 0
        self._iteration_scheduled = False
        self._admission: collections.deque[asyncio.Future[None]] = collections.deque()
        # Admitted from the queue but not yet resumed: later arrivals must not overtake them
        # (messages start in the order they arrived).
        self._woken = 0
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
        properties: dict[str, int] = {}
        if message_expiry_s is not None:
            # MQTT 5 §3.3.2.3.3: the broker drops the message once this many seconds have
            # passed without delivering it (SPEC §3.5: a Vend's time left to its deadline).
            properties["message_expiry_interval"] = message_expiry_s
        deadline = asyncio.get_running_loop().time() + self.settings.publish_timeout_s
        while True:
            conn = await self._connection(deadline)
            try:
                acked = conn.publish(topic, payload, qos, retain=retain, properties=properties)
            except OverflowError:
                await self._before(deadline, conn.acks.wait_released(), "free packet id")
                continue
            if acked is None or await self._before(deadline, acked, "PUBACK"):
                self._counts["published"] += 1
                return
            # The connection ended before the PUBACK: send it again on the next one.

    # --- receiving ---

    # One coroutine on purpose: every coroutine or call more is paid on every message.
    async def _receive(  # noqa: PLR0912, PLR0915
        self,
        conn: _Connection,
        _client: object,
        topic: str | bytes,
        payload: bytes,
        qos: int,
        _props: object,
    ) -> int:
        """Run the handler for one message; return the PUBACK reason code for gmqtt.

        This is the hot path (thousands of messages a second): it runs in the task gmqtt
        creates for the message, and costs no other task, lock or callback when the
        handler has a free slot. gmqtt writes a PUBACK whenever this returns (for QoS 1),
        and calls ``result()`` in a done-callback, so it must neither raise nor end
        cancelled: an exception there ends up in the event loop's exception handler.
        """
        self._received += 1
        self._inside += 1
        if qos:
            conn.unacked += 1
            if conn.unacked > self._receive_maximum:
                self._note_overrun(conn)
        try:
            if self._admitted < self._per_iteration and not self._admission and not self._woken:
                self._admitted += 1
                if not self._iteration_scheduled:
                    self._next_iteration()
            else:
                await self._admitted_later()
            if conn.take_slot(self._receive_maximum) or (
                conn.accepting and await self._wait_for_slot(conn)
            ):
                if isinstance(topic, bytes):  # gmqtt passes bytes when not valid UTF-8
                    topic = topic.decode("utf-8", errors="replace")
                # Unnamed (gmqtt names it "Task-N"; its coroutine, MqttLink._receive, shows
                # in a task dump): renaming it would cost a call per message.
                task = _current_task()
                handling = conn.handling
                handling.add(task)
                try:
                    await self._handler(topic, payload)
                except asyncio.CancelledError:
                    # The link cancels a handler only once its connection is closed (see
                    # _retire), so that no PUBACK for it can reach the broker. Not
                    # re-raised: gmqtt's task must end normally (see above), and it does
                    # right away, the PUBACK it then writes going nowhere.
                    if not conn.closed.is_set():
                        raise
                    task.uncancel()
                    acked = False
                except Exception as exc:  # noqa: BLE001 -- a faulty handler must not stop the link
                    acked = self._handler_failed(conn, topic, qos, exc)
                else:
                    self._handled += 1
                    self._retriable_streak = 0
                    acked = True
                finally:
                    handling.discard(task)
                    if conn.slot_waiters or conn.drained is not None:
                        conn.release_slot()
                    else:
                        conn.running -= 1
                if acked:
                    return _PUBACK_SUCCESS
            if qos == 0:
                return _PUBACK_SUCCESS  # nothing to acknowledge; gmqtt ignores the result
            # Leave it unacknowledged. An error reason code in the PUBACK would not do: it
            # still completes the QoS 1 flow and the broker drops the message (checked with
            # Mosquitto 2.0). Without a PUBACK the broker redelivers it on the next
            # connection of this session (MQTT 5 §4.4); meanwhile it holds one slot of our
            # Receive Maximum. Return only once the connection is closed, when gmqtt's
            # write goes nowhere (_WriteBuffer drops it).
            await conn.closed.wait()
            return _PUBACK_SUCCESS
        finally:
            if qos:
                conn.unacked -= 1
            self._inside -= 1
            if self._all_returned is not None and not self._inside:
                returned, self._all_returned = self._all_returned, None
                if not returned.done():  # not cancelled
                    returned.set_result(None)

    def _next_iteration(self) -> None:
        self._iteration_scheduled = True
        asyncio.get_running_loop().call_soon(self._new_iteration)

    def _new_iteration(self) -> None:
        """Admit the next handlers; runs once per loop iteration while messages arrive."""
        self._iteration_scheduled = False
        self._admitted = 0
        waiting = self._admission
        while waiting and self._admitted < self._per_iteration:
            waiter = waiting.popleft()
            if not waiter.done():  # not cancelled
                waiter.set_result(None)
                self._admitted += 1
                self._woken += 1
        if self._admitted:
            self._next_iteration()

    async def _admitted_later(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._admission.append(waiter)
        if not self._iteration_scheduled:
            self._next_iteration()
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.cancelled():
                self._woken -= 1  # woken just as it was cancelled
            raise
        self._woken -= 1

    async def _wait_for_slot(self, conn: _Connection) -> bool:
        """Wait until a running handler hands over its slot; False if none is to be used."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        conn.slot_waiters.append(waiter)
        try:
            given = await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                with contextlib.suppress(ValueError):
                    conn.slot_waiters.remove(waiter)
            elif waiter.result():
                conn.release_slot()  # handed over just as the task was cancelled
            raise
        if given and not conn.accepting:  # it may have changed since the slot was handed over
            conn.release_slot()
            return False
        return given

    def _handler_failed(self, conn: _Connection, topic: str, qos: int, exc: Exception) -> bool:
        """Count and log a handler's error; return whether the message may be acknowledged."""
        self._counts["handler_errors"] += 1
        if not isinstance(exc, GatewayError) or not exc.retriable or qos == 0:
            self._log.error("mqtt.handler_failed", topic=topic, exc_info=exc)
            return True
        self._counts["left_unacked"] += 1
        self._retriable_streak += 1
        self._log.warning(
            "mqtt.handler_failed_retriable",
            topic=topic,
            error=str(exc),
            error_type=type(exc).__name__,
        )
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
                self._receive,
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
                await conn.open(
                    self.settings, self._subscriptions, replay_retained=not self._subscribed
                )
            self._subscribed = True
        except gmqtt.MQTTConnectError as exc:
            code = _as_int(exc.args[0]) if exc.args else 0
            if code in _PERMANENT_CONNACK_CODES:
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
            conn.acks.release_all()  # publishers waiting for a PUBACK re-send elsewhere
        try:
            if conn.running:
                # Handlers may still publish (and, unless the connection was lost, acknowledge).
                conn.drained = asyncio.get_running_loop().create_future()
                await asyncio.wait({conn.drained}, timeout=self.settings.drain_timeout_s)
        finally:
            if self._conn is conn:
                await self._set_connection(None)
            # Close first, then cancel what is still running: the PUBACK gmqtt writes when
            # a cancelled handler's task returns then goes nowhere, even if the handler
            # swallowed the cancellation, and the broker delivers the message again.
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
        """Wait for the supervisor (it retires the connection), then for gmqtt's tasks."""
        if self._tg is None:
            return
        try:
            await self._tg.__aexit__(exc_type, exc, traceback)
        finally:
            # They return as soon as their connection is closed.
            if self._inside:
                returned = self._all_returned = asyncio.get_running_loop().create_future()
                await returned

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
