"""MqttLink against a real private Mosquitto (the `mosquitto` fixture), never a mock."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog

from gateway.embedded import Mosquitto
from gateway.errors import (
    BrokerUnavailableError,
    ConfigError,
    FrameRejectedError,
    OverloadedError,
    ShuttingDownError,
)
from gateway.logs import get_logger
from gateway.mqtt import MqttLink, MqttSettings, _Connection

pytestmark = pytest.mark.integration

GROUP = "vendgate"


def _settings(broker: Mosquitto, client_id: str, **overrides: Any) -> MqttSettings:
    values: dict[str, Any] = {
        "host": broker.host,
        "port": broker.port,
        "client_id": client_id,
        "reconnect_base_s": 0.05,
        "reconnect_cap_s": 0.5,
        "connect_timeout_s": 5.0,
        "publish_timeout_s": 10.0,
        "drain_timeout_s": 1.0,
    }
    values.update(overrides)
    return MqttSettings(**values)


class Inbox:
    """A handler that records (topic, payload) pairs."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []

    async def __call__(self, topic: str, payload: bytes) -> None:
        """Record one message."""
        self.items.append((topic, payload))

    @property
    def payloads(self) -> list[bytes]:
        """The payloads received so far, in order."""
        return [payload for _, payload in self.items]


async def _nothing(topic: str, payload: bytes) -> None:
    """Ignore the message: the handler of links that only publish."""


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        # Polling: the predicates read link state and stats, which signal no event.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest_asyncio.fixture(autouse=True)
async def _no_loop_errors() -> AsyncIterator[None]:
    """Fail a test in which the event loop's exception handler was called.

    A done-callback or task of the link that raised, or a handler future whose exception
    nobody retrieved, would only show up here.
    """
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield
        await asyncio.sleep(0.05)  # let the last done-callbacks run
    finally:
        loop.set_exception_handler(previous)
    assert not errors


@pytest.mark.asyncio
async def test_round_trip_at_qos1_gives_the_handler_the_real_topic(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """A QoS 1 message reaches a shared subscriber, whose handler sees the real topic."""
    inbox = Inbox()
    subscriber = MqttLink(
        _settings(mosquitto, f"{prefix}-sub"), inbox, [(f"$share/{GROUP}/{prefix}/m/+/up", 1)]
    )
    async with subscriber, MqttLink(_settings(mosquitto, f"{prefix}-pub"), _nothing, []) as pub:
        assert subscriber.connected
        await pub.publish(f"{prefix}/m/vm-1/up", b"\x01\x02hello")
        await eventually(lambda: subscriber.stats["handled"] == 1)
        assert inbox.items == [(f"{prefix}/m/vm-1/up", b"\x01\x02hello")]
        assert pub.stats["published"] == 1
        assert subscriber.stats["received"] == 1


@pytest.mark.asyncio
async def test_two_links_in_one_shared_group_split_the_messages(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """Two links in the same shared group each get some messages, and every message goes to one."""
    inboxes = [Inbox(), Inbox()]
    share = [(f"$share/{GROUP}/{prefix}/m/+/up", 1)]
    first = MqttLink(_settings(mosquitto, f"{prefix}-a"), inboxes[0], share)
    second = MqttLink(_settings(mosquitto, f"{prefix}-b"), inboxes[1], share)
    async with first, second, MqttLink(_settings(mosquitto, f"{prefix}-p"), _nothing, []) as pub:
        sent = [str(n).encode() for n in range(40)]
        await asyncio.gather(
            *(pub.publish(f"{prefix}/m/vm-{n % 7}/up", body) for n, body in enumerate(sent))
        )
        await eventually(lambda: len(inboxes[0].items) + len(inboxes[1].items) == len(sent))
        await asyncio.sleep(0.2)  # anything delivered twice would show up by now
    received = inboxes[0].payloads + inboxes[1].payloads
    assert sorted(received) == sorted(sent)
    assert inboxes[0].items
    assert inboxes[1].items


@pytest.mark.asyncio
async def test_puback_waits_for_the_handler(mosquitto: Mosquitto, prefix: str) -> None:
    """A message whose handler never finished is redelivered; a handled one is not."""
    started = asyncio.Event()

    async def blocks_on_hold(_topic: str, payload: bytes) -> None:
        if payload == b"hold":
            started.set()
            await asyncio.Event().wait()  # until the link cancels it

    share = [(f"$share/{GROUP}/{prefix}/m/+/up", 1)]
    topic = f"{prefix}/m/vm-1/up"
    settings = _settings(mosquitto, f"{prefix}-sub", drain_timeout_s=0.2)
    async with MqttLink(_settings(mosquitto, f"{prefix}-pub"), _nothing, []) as pub:
        link = MqttLink(settings, blocks_on_hold, share)
        async with link:
            await pub.publish(topic, b"done")
            await eventually(lambda: link.stats["handled"] == 1)
            await pub.publish(topic, b"hold")
            await asyncio.wait_for(started.wait(), 5)
        # The link closed with the handler still running: no PUBACK went out for "hold".
        inbox = Inbox()
        async with MqttLink(settings, inbox, share):
            await eventually(lambda: inbox.payloads == [b"hold"])
            await asyncio.sleep(0.3)
        assert inbox.payloads == [b"hold"]


@pytest.mark.asyncio
@pytest.mark.parametrize("finishes", [True, False], ids=["finishes-late", "cancelled"])
async def test_a_handler_running_when_the_connection_drops_is_not_acknowledged(
    mosquitto: Mosquitto, prefix: str, *, finishes: bool
) -> None:
    """A message whose handler was running when the connection dropped is delivered again.

    Whether the handler finishes while the link drains the lost connection or is cancelled
    after drain_timeout_s, its PUBACK never reaches the broker.
    """
    release = asyncio.Event()
    started = asyncio.Event()
    calls: list[bytes] = []

    async def slow_the_first_time(_topic: str, payload: bytes) -> None:
        calls.append(payload)
        if len(calls) == 1:
            started.set()
            await (release.wait() if finishes else asyncio.Event().wait())

    topic = f"{prefix}/m/vm-1/up"
    drain_s = 10.0 if finishes else 0.3
    settings = _settings(mosquitto, f"{prefix}-sub", drain_timeout_s=drain_s)
    link = MqttLink(settings, slow_the_first_time, [(f"{prefix}/m/+/up", 1)])
    async with link:
        async with MqttLink(_settings(mosquitto, f"{prefix}-pub"), _nothing, []) as pub:
            await pub.publish(topic, b"slow")
        await asyncio.wait_for(started.wait(), 5)
        # The broker saves the session, with its message awaiting our PUBACK, and closes
        # the connection.
        await mosquitto.stop()
        await eventually(lambda: not link.connected)
        release.set()
        if finishes:  # on the lost connection, while the link drains it
            await eventually(lambda: link.stats["handled"] == 1)
        await mosquitto.start()
        await eventually(lambda: link.stats["reconnects"] == 1, within=10)
        await eventually(lambda: calls == [b"slow", b"slow"])
        await asyncio.sleep(0.2)  # a third delivery would show up by now
    assert calls == [b"slow", b"slow"]
    assert link.stats["handled"] == (2 if finishes else 1)


@pytest.mark.asyncio
async def test_packets_written_together_keep_their_order(mosquitto: Mosquitto, prefix: str) -> None:
    """Publishes started in one loop iteration, sent in one write, reach a subscriber in order."""
    inbox = Inbox()
    topic = f"{prefix}/m/vm-1/up"
    sub = MqttLink(_settings(mosquitto, f"{prefix}-sub"), inbox, [(topic, 1)])
    async with sub, MqttLink(_settings(mosquitto, f"{prefix}-pub"), _nothing, []) as pub:
        sent = [str(n).encode() for n in range(300)]
        await asyncio.gather(*(pub.publish(topic, body) for body in sent))
        await eventually(lambda: len(inbox.items) == len(sent))
    assert inbox.payloads == sent


def _unused_pump(*_args: object) -> None:
    raise AssertionError("a connection that subscribes to nothing received a message")


@pytest.mark.asyncio
async def test_packets_written_just_before_closing_still_go_out(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """A PUBLISH written in the same loop iteration as close(), then the DISCONNECT, both go out."""
    inbox = Inbox()
    topic = f"{prefix}/m/vm-1/up"
    async with MqttLink(_settings(mosquitto, f"{prefix}-sub"), inbox, [(topic, 1)]):
        # The link's connection class itself: through MqttLink, some other callback always
        # runs between a publish and the close.
        settings = _settings(mosquitto, f"{prefix}-pub")
        conn = _Connection(settings, _unused_pump, get_logger(__name__), clean_start=True)
        await conn.open([])
        conn.publish(topic, b"last words", 0, retain=False, message_expiry_s=None)
        await conn.close()
        await eventually(lambda: inbox.payloads == [b"last words"])
        # Mosquitto logs "closed its connection" instead when no DISCONNECT came first.
        await eventually(lambda: f"Client {prefix}-pub disconnected." in mosquitto.log_tail())


@pytest.mark.asyncio
async def test_receive_maximum_bounds_concurrent_handlers(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """With receive_maximum=5, no more than 5 handlers run at once, and all 50 messages arrive."""
    running = 0
    peak = 0
    done: list[bytes] = []

    async def slow(_topic: str, payload: bytes) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.05)
        finally:
            running -= 1
        done.append(payload)

    settings = _settings(mosquitto, f"{prefix}-sub", receive_maximum=5)
    sub = MqttLink(settings, slow, [(f"$share/{GROUP}/{prefix}/m/+/up", 1)])
    async with sub, MqttLink(_settings(mosquitto, f"{prefix}-pub"), _nothing, []) as pub:
        sent = [str(n).encode() for n in range(50)]
        await asyncio.gather(*(pub.publish(f"{prefix}/m/vm-1/up", n) for n in sent))
        await eventually(lambda: len(done) == len(sent), within=10)
    assert sorted(done) == sorted(sent)
    assert peak == 5


@pytest.mark.asyncio
async def test_a_burst_starts_a_bounded_number_of_handlers_per_loop_iteration(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """600 queued messages arrive in a few reads; at most 16 start per iteration, in order."""
    iteration = 0
    started: collections.Counter[int] = collections.Counter()
    done: list[bytes] = []
    ticking = True

    def tick() -> None:  # counts event-loop iterations
        nonlocal iteration
        iteration += 1
        if ticking:
            asyncio.get_running_loop().call_soon(tick)

    async def handler(_topic: str, payload: bytes) -> None:
        started[iteration] += 1
        done.append(payload)

    topic_filter = f"{prefix}/m/+/up"
    sub_settings = _settings(mosquitto, f"{prefix}-sub", handlers_per_iteration=16)
    # Subscribe once and leave, so that the burst queues at the broker for this session.
    async with MqttLink(sub_settings, _nothing, [(topic_filter, 1)]):
        pass
    async with MqttLink(_settings(mosquitto, f"{prefix}-pub"), _nothing, []) as pub:
        sent = [str(n).encode() for n in range(600)]
        await asyncio.gather(*(pub.publish(f"{prefix}/m/vm-1/up", n) for n in sent))
    asyncio.get_running_loop().call_soon(tick)
    try:
        async with MqttLink(sub_settings, handler, [(topic_filter, 1)]):
            await eventually(lambda: len(done) == len(sent), within=10)
    finally:
        ticking = False
    assert done == sent  # one publisher, one topic: handlers start in arrival order
    # The tick callback sits somewhere inside each iteration, so one count can take the tail
    # of one iteration and the head of the next: at most twice the limit (ungated: ~570).
    assert max(started.values()) <= 2 * 16
    assert len(started) >= len(sent) // (2 * 16)


@pytest.mark.asyncio
async def test_messages_left_in_flight_at_shutdown_are_delivered_again(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """Messages whose handlers were cut short, or never started, at shutdown come again."""
    quick = 6
    handled: list[bytes] = []

    async def stalls_after_a_few(_topic: str, payload: bytes) -> None:
        if int(payload) >= quick:
            await asyncio.Event().wait()  # until the link cancels it
        handled.append(payload)

    share = [(f"$share/{GROUP}/{prefix}/m/+/up", 1)]
    topic = f"{prefix}/m/vm-1/up"
    # Mosquitto overshoots a small window once PUBACKs flow (see MqttLink), so some
    # messages wait for a handler slot when the link shuts down.
    settings = _settings(mosquitto, f"{prefix}-sub", receive_maximum=2, drain_timeout_s=0.2)
    sent = [str(n).encode() for n in range(30)]
    async with MqttLink(_settings(mosquitto, f"{prefix}-pub"), _nothing, []) as pub:
        link = MqttLink(settings, stalls_after_a_few, share)
        async with link:
            await asyncio.gather(*(pub.publish(topic, body) for body in sent))
            await eventually(lambda: len(handled) == quick)
            await asyncio.sleep(0.2)
        inbox = Inbox()
        async with MqttLink(settings, inbox, share):
            await eventually(lambda: len(inbox.items) == len(sent) - quick)
            await asyncio.sleep(0.2)
    assert sorted(handled + inbox.payloads) == sorted(sent)


@pytest.mark.asyncio
async def test_a_failing_handler_does_not_stop_later_messages(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """Non-retriable handler errors are counted and acknowledged, and later messages still flow."""
    inbox = Inbox()

    async def picky(topic: str, payload: bytes) -> None:
        if payload == b"bug":
            raise ValueError(payload)
        if payload == b"bad-frame":
            raise FrameRejectedError("vm-1", "bad MAC")
        await inbox(topic, payload)

    sub = MqttLink(_settings(mosquitto, f"{prefix}-sub"), picky, [(f"{prefix}/m/+/up", 1)])
    async with sub, MqttLink(_settings(mosquitto, f"{prefix}-pub"), _nothing, []) as pub:
        for payload in (b"bug", b"bad-frame", b"good"):
            await pub.publish(f"{prefix}/m/vm-1/up", payload)
        await eventually(lambda: inbox.payloads == [b"good"])
        await asyncio.sleep(0.2)
        assert sub.stats["handler_errors"] == 2
        assert sub.stats["handled"] == 1
        assert sub.stats["left_unacked"] == 0
        assert sub.stats["reconnects"] == 0
        assert sub.connected


@pytest.mark.asyncio
async def test_a_retriable_error_gets_the_message_delivered_again(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """A retriable GatewayError leaves the message unacknowledged, and the broker redelivers it."""
    inbox = Inbox()
    failures = 0

    async def overloaded_once(topic: str, payload: bytes) -> None:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise OverloadedError("vend queue", 10)
        await inbox(topic, payload)

    share = [(f"$share/{GROUP}/{prefix}/m/+/up", 1)]
    sub = MqttLink(_settings(mosquitto, f"{prefix}-sub"), overloaded_once, share)
    async with sub, MqttLink(_settings(mosquitto, f"{prefix}-pub"), _nothing, []) as pub:
        await pub.publish(f"{prefix}/m/vm-1/up", b"vend-result")
        await eventually(lambda: inbox.payloads == [b"vend-result"])
        # A resumed session's messages may come before the reconnection is counted (SUBACK).
        await eventually(lambda: sub.stats["reconnects"] == 1)
        assert sub.stats["left_unacked"] == 1
        assert sub.stats["received"] == 2


@pytest.mark.asyncio
async def test_links_reconnect_after_a_broker_restart(mosquitto: Mosquitto, prefix: str) -> None:
    """After the broker goes away and comes back, both links reconnect and messages flow again."""
    inbox = Inbox()
    topic = f"{prefix}/m/vm-1/up"
    with structlog.testing.capture_logs() as logs:
        sub = MqttLink(
            _settings(mosquitto, f"{prefix}-sub"), inbox, [(f"$share/{GROUP}/{prefix}/m/+/up", 1)]
        )
        pub = MqttLink(_settings(mosquitto, f"{prefix}-pub", publish_timeout_s=0.5), _nothing, [])
        async with sub, pub:
            await pub.publish(topic, b"before")
            await eventually(lambda: inbox.payloads == [b"before"])
            # The PUBACK leaves a loop iteration or two after the handler returns; stopping
            # the broker before it would rightly get "before" delivered again.
            await asyncio.sleep(0.1)

            await mosquitto.stop()
            await eventually(lambda: not sub.connected and not pub.connected)
            with pytest.raises(BrokerUnavailableError):
                await pub.publish(topic, b"nobody listening")
            await mosquitto.start()
            await sub.wait_connected(timeout=10)
            await pub.wait_connected(timeout=10)
            await pub.publish(topic, b"after")
            await eventually(lambda: inbox.payloads == [b"before", b"after"])

            await mosquitto.restart()
            # Mosquitto 2.0.11 restores sessions but not their shared subscriptions, so a
            # message published before the subscriber has subscribed again is dropped.
            await eventually(lambda: sub.stats["reconnects"] == 2)
            await pub.publish(topic, b"after restart")  # may wait for pub's reconnection
            await eventually(lambda: inbox.payloads[-1] == b"after restart")
    assert sub.stats["reconnects"] == 2
    assert pub.stats["reconnects"] == 2
    attempts = [entry for entry in logs if entry["event"] == "mqtt.connecting"]
    failures = [entry for entry in logs if entry["event"] == "mqtt.connect_failed"]
    assert failures
    assert len(attempts) == 2 + 2 * 2 + len(failures)  # first connects, reconnects, retries


@pytest.mark.asyncio
async def test_message_expiry_drops_a_message_queued_too_long(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """A message with a 1 s expiry queued for a disconnected session is not delivered 2 s later."""
    share = [(f"$share/{GROUP}/{prefix}/m/+/down", 1)]
    topic = f"{prefix}/m/vm-1/down"
    settings = _settings(mosquitto, f"{prefix}-sub")
    async with MqttLink(settings, _nothing, share):
        pass  # the session and its subscription stay at the broker
    async with MqttLink(_settings(mosquitto, f"{prefix}-pub"), _nothing, []) as pub:
        await pub.publish(topic, b"stale", message_expiry_s=1)
        await pub.publish(topic, b"fresh", message_expiry_s=60)
        await pub.publish(topic, b"forever")
    await asyncio.sleep(2.0)
    inbox = Inbox()
    async with MqttLink(settings, inbox, share):
        await eventually(lambda: len(inbox.items) >= 2)
        await asyncio.sleep(0.2)
    # Mosquitto 2.0 honours the expiry: the queued "stale" message was discarded.
    assert inbox.payloads == [b"fresh", b"forever"]


@pytest.mark.asyncio
async def test_closing_while_the_broker_is_down_returns_promptly(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """A link that is backing off between reconnection attempts closes at once when asked."""
    settings = _settings(mosquitto, f"{prefix}-sub", reconnect_base_s=5.0, reconnect_cap_s=30.0)
    link = MqttLink(settings, _nothing, [(f"$share/{GROUP}/{prefix}/m/+/up", 1)])
    async with link:
        await mosquitto.stop()
        await eventually(lambda: not link.connected)
        started = asyncio.get_running_loop().time()
    assert asyncio.get_running_loop().time() - started < 1.0
    with pytest.raises(ShuttingDownError):
        await link.publish(f"{prefix}/m/vm-1/up", b"too late")


@pytest.mark.asyncio
async def test_a_refused_connection_fails_at_once(tmp_path: Path) -> None:
    """A broker refusing the credentials makes entering the link raise ConfigError, no retries."""
    (tmp_path / "passwd").write_text("")  # no users: every login is refused
    refusing = Mosquitto(
        tmp_path / "broker",
        extra_config=f"allow_anonymous false\npassword_file {tmp_path / 'passwd'}",
    )
    async with refusing:
        # A made-up login the broker cannot know.
        settings = _settings(refusing, "intruder", username="u", password="p")  # noqa: S106
        with pytest.raises(ConfigError, match="Not authorized"):
            async with MqttLink(settings, _nothing, [("vg/m/+/up", 1)]):
                pass
