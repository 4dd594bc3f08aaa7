"""MqttLink's own MQTT 5 driver against a real private Mosquitto: handlers, PUBACKs, keepalive.

The handler contract (gateway/mqtt.py): ``handler(topic, payload)`` returns None (acknowledge
now), an asyncio.Future (acknowledge when it completes with a result) or another awaitable (run
in a task). Whether a message was acknowledged is checked the way the broker sees it: the link is
closed, a marker is published, and a link with the same client id resumes the session; whatever
arrives before the marker was left unacknowledged and delivered again (MQTT 5 §4.4).
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Awaitable, Sequence
from pathlib import Path

import pytest
import structlog

from gateway.embedded import Mosquitto
from gateway.errors import (
    BrokerUnavailableError,
    FrameRejectedError,
    GatewayError,
    OverloadedError,
    ShuttingDownError,
)
from gateway.mqtt import MqttLink, MqttSettings
from protocols import mqtt5
from tests.gateway.test_mqtt import (  # _no_loop_errors: autouse here too
    GROUP,
    Inbox,
    _no_loop_errors,  # noqa: F401
    _nothing,
    _settings,
    eventually,
)

pytestmark = pytest.mark.integration

MARKER = b"marker"


@pytest.fixture
def prefix() -> str:
    return f"w{uuid.uuid4().hex[:10]}"


def _share(prefix: str) -> list[tuple[str, int]]:
    return [(f"$share/{GROUP}/{prefix}/m/+/up", 1)]


def _topic(prefix: str) -> str:
    return f"{prefix}/m/vm-1/up"


async def _publish_all(broker: Mosquitto, prefix: str, payloads: Sequence[bytes]) -> None:
    """Publish at QoS 1, in order, from a link of its own."""
    async with MqttLink(_settings(broker, f"{prefix}-pub"), _nothing, []) as pub:
        for payload in payloads:
            await pub.publish(_topic(prefix), payload)


async def _redelivered(
    broker: Mosquitto, settings: MqttSettings, subscriptions: list[tuple[str, int]], prefix: str
) -> list[bytes]:
    """Resume ``settings``' session and return what the broker delivers before a new marker.

    The link that used the session must be closed. The broker sends the messages it still
    awaits a PUBACK for, then its queue, in order: what precedes the marker was never
    acknowledged.
    """
    await _publish_all(broker, prefix, [MARKER])
    inbox = Inbox()
    async with MqttLink(settings, inbox, subscriptions):
        await eventually(lambda: MARKER in inbox.payloads)
    payloads = inbox.payloads
    return payloads[: payloads.index(MARKER)]


@pytest.mark.asyncio
async def test_a_handler_returning_none_gets_every_message_acknowledged(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """A synchronous handler returning None: every message is handled and acknowledged at once.

    The session, resumed after the link closed, holds nothing to deliver again.
    """
    calls: list[bytes] = []

    def record(_topic: str, payload: bytes) -> None:
        calls.append(payload)

    sent = [str(n).encode() for n in range(20)]
    settings = _settings(mosquitto, f"{prefix}-sub")
    link = MqttLink(settings, record, _share(prefix))
    async with link:
        await _publish_all(mosquitto, prefix, sent)
        await eventually(lambda: link.stats["handled"] == len(sent))
    assert calls == sent
    assert link.stats["received"] == len(sent)
    assert link.stats["handler_errors"] == 0
    assert await _redelivered(mosquitto, settings, _share(prefix), prefix) == []


@pytest.mark.asyncio
async def test_a_shared_future_acknowledges_its_messages_only_when_it_completes(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """Messages waiting for one future are not acknowledged before it completes, then all are.

    A first link closes with the shared future still pending: the next link with the same
    client id gets every message again. Its own shared future completes with a result: a third
    resumption of the session gets nothing.
    """
    loop = asyncio.get_running_loop()
    sent = [str(n).encode() for n in range(8)]
    settings = _settings(mosquitto, f"{prefix}-sub", drain_timeout_s=0.2)

    pending: asyncio.Future[None] = loop.create_future()
    first_calls: list[bytes] = []

    def never_done(_topic: str, payload: bytes) -> asyncio.Future[None]:
        first_calls.append(payload)
        return pending

    first = MqttLink(settings, never_done, _share(prefix))
    async with first:
        await _publish_all(mosquitto, prefix, sent)
        await eventually(lambda: first.stats["received"] == len(sent))
        await asyncio.sleep(0.2)  # a PUBACK sent too early would reach the broker by now
        assert first.stats["handled"] == 0
    assert first_calls == sent

    commit: asyncio.Future[None] = loop.create_future()
    second_calls: list[bytes] = []

    def until_commit(_topic: str, payload: bytes) -> asyncio.Future[None]:
        second_calls.append(payload)
        return commit

    second = MqttLink(settings, until_commit, _share(prefix))
    async with second:
        await eventually(lambda: len(second_calls) == len(sent))
        assert sorted(second_calls) == sorted(sent)  # every message came again
        assert second.stats["handled"] == 0
        commit.set_result(None)
        await eventually(lambda: second.stats["handled"] == len(sent))
    # The first link's future completing now acknowledges nothing: its connection is closed.
    pending.set_result(None)
    assert await _redelivered(mosquitto, settings, _share(prefix), prefix) == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "error",
    [ShuttingDownError(), BrokerUnavailableError("connection refused")],
    ids=["shutting-down", "broker-unavailable"],
)
async def test_a_shared_future_failing_retriably_gets_every_message_delivered_again(
    mosquitto: Mosquitto, prefix: str, error: GatewayError
) -> None:
    """A shared future failing with a retriable error leaves all its messages unacknowledged.

    The link reconnects once and the broker delivers each message again; left_unacked counts
    every message of the group.
    """
    assert error.retriable
    loop = asyncio.get_running_loop()
    batch: asyncio.Future[None] = loop.create_future()
    calls: list[bytes] = []

    def batched_the_first_time(_topic: str, payload: bytes) -> asyncio.Future[None] | None:
        calls.append(payload)
        return batch if calls.count(payload) == 1 else None

    sent = [str(n).encode() for n in range(6)]
    settings = _settings(mosquitto, f"{prefix}-sub")
    link = MqttLink(settings, batched_the_first_time, _share(prefix))
    async with link:
        await _publish_all(mosquitto, prefix, sent)
        await eventually(lambda: len(calls) == len(sent))
        batch.set_exception(error)
        # The broker resends right after CONNACK: messages can be handled before the link
        # counts the reconnection (after SUBACK).
        await eventually(
            lambda: link.stats["handled"] == len(sent) and link.stats["reconnects"] == 1
        )
        assert sorted(calls) == sorted(sent + sent)
        assert link.stats["left_unacked"] == len(sent)
        assert link.stats["reconnects"] == 1
        assert link.stats["received"] == 2 * len(sent)
    assert await _redelivered(mosquitto, settings, _share(prefix), prefix) == []


@pytest.mark.asyncio
async def test_a_shared_future_failing_for_good_gets_every_message_acknowledged(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """A shared future failing with a non-retriable error: its messages are all acknowledged.

    handler_errors counts each message; the link does not reconnect and nothing comes again.
    """
    loop = asyncio.get_running_loop()
    batch: asyncio.Future[None] = loop.create_future()
    calls: list[bytes] = []

    def batched(_topic: str, payload: bytes) -> asyncio.Future[None]:
        calls.append(payload)
        return batch

    sent = [str(n).encode() for n in range(6)]
    settings = _settings(mosquitto, f"{prefix}-sub")
    link = MqttLink(settings, batched, _share(prefix))
    async with link:
        await _publish_all(mosquitto, prefix, sent)
        await eventually(lambda: len(calls) == len(sent))
        batch.set_exception(ValueError("a bug in the batch"))
        await eventually(lambda: link.stats["handler_errors"] == len(sent))
        await asyncio.sleep(0.2)  # a redelivery would show up by now
        assert calls == sent
        assert link.stats["left_unacked"] == 0
        assert link.stats["reconnects"] == 0
        assert link.stats["handled"] == 0
    assert await _redelivered(mosquitto, settings, _share(prefix), prefix) == []


@pytest.mark.asyncio
async def test_a_handler_raising_at_once_does_not_stop_later_messages(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """A synchronous handler raising non-retriable errors: counted, acknowledged, flow goes on."""
    handled: list[bytes] = []

    def picky(_topic: str, payload: bytes) -> None:
        if payload == b"bug":
            raise ValueError(payload)
        if payload == b"bad-frame":
            raise FrameRejectedError("vm-1", "bad MAC")
        handled.append(payload)

    sent = [b"good-1", b"bug", b"good-2", b"bad-frame", b"good-3"]
    settings = _settings(mosquitto, f"{prefix}-sub")
    link = MqttLink(settings, picky, _share(prefix))
    async with link:
        await _publish_all(mosquitto, prefix, sent)
        await eventually(lambda: handled == [b"good-1", b"good-2", b"good-3"])
        assert link.stats["handler_errors"] == 2
        assert link.stats["handled"] == 3
        assert link.stats["left_unacked"] == 0
        assert link.stats["reconnects"] == 0
        assert link.connected
    assert await _redelivered(mosquitto, settings, _share(prefix), prefix) == []


@pytest.mark.asyncio
async def test_a_handler_raising_a_retriable_error_at_once_gets_the_message_again(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """A synchronous handler raising a retriable error: not acknowledged, delivered again."""
    calls: list[bytes] = []

    def busy_the_first_time(_topic: str, payload: bytes) -> None:
        calls.append(payload)
        if len(calls) == 1:
            raise OverloadedError("vend queue", 10)

    settings = _settings(mosquitto, f"{prefix}-sub")
    link = MqttLink(settings, busy_the_first_time, _share(prefix))
    async with link:
        await _publish_all(mosquitto, prefix, [b"vend-result"])
        await eventually(lambda: link.stats["handled"] == 1 and link.stats["reconnects"] == 1)
        assert calls == [b"vend-result", b"vend-result"]
        assert link.stats["left_unacked"] == 1
        assert link.stats["reconnects"] == 1
    assert await _redelivered(mosquitto, settings, _share(prefix), prefix) == []


@pytest.mark.asyncio
async def test_handlers_are_called_in_publish_order_whatever_they_return(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """None, shared futures and coroutines mixed: the handler is called in exact publish order.

    A small window (receive_maximum 4) and budget (3 handlers per iteration) make messages
    wait in the connection's inbox; they must still start in order, and all be acknowledged.
    """
    loop = asyncio.get_running_loop()
    calls: list[bytes] = []
    finished: list[bytes] = []
    batch: asyncio.Future[None] | None = None

    async def later(payload: bytes) -> None:
        await asyncio.sleep(0.005 * (int(payload) % 3))
        finished.append(payload)

    def mixed(_topic: str, payload: bytes) -> Awaitable[None] | None:
        nonlocal batch
        calls.append(payload)
        kind = int(payload) % 5
        if kind < 2:  # done at once
            finished.append(payload)
            return None
        if kind < 4:  # two messages in a row share one future, like a telemetry batch
            if batch is None or batch.done():
                batch = loop.create_future()
                loop.call_later(0.01, batch.set_result, None)
            batch.add_done_callback(lambda _: finished.append(payload))
            return batch
        return later(payload)  # a coroutine: runs in a task

    sent = [str(n).encode() for n in range(100)]
    settings = _settings(mosquitto, f"{prefix}-sub", receive_maximum=4, handlers_per_iteration=3)
    link = MqttLink(settings, mixed, [(f"{prefix}/m/+/up", 1)])
    async with link:
        async with MqttLink(_settings(mosquitto, f"{prefix}-pub"), _nothing, []) as pub:
            await asyncio.gather(*(pub.publish(_topic(prefix), body) for body in sent))
        await eventually(lambda: link.stats["handled"] == len(sent), within=10)
        assert calls == sent
        assert sorted(finished) == sorted(sent)
        assert link.stats["handler_errors"] == 0
        assert link.stats["reconnects"] == 0
    assert await _redelivered(mosquitto, settings, [(f"{prefix}/m/+/up", 1)], prefix) == []


@pytest.mark.asyncio
async def test_an_idle_link_pings_and_stays_connected(tmp_path: Path, prefix: str) -> None:
    """With keepalive_s=1 an idle link sends PINGREQs and the broker keeps it for 3 periods."""
    broker = Mosquitto(tmp_path / "broker", extra_config="log_type debug")
    async with broker:
        settings = _settings(broker, f"{prefix}-idle", keepalive_s=1)
        link = MqttLink(settings, _nothing, _share(prefix))
        async with link:
            await asyncio.sleep(3.0)
            assert link.connected
            assert link.stats["reconnects"] == 0
    pings = broker.log_tail(400).count(f"Received PINGREQ from {prefix}-idle")
    assert pings >= 2


@pytest.mark.asyncio
async def test_a_frozen_broker_is_noticed_within_two_keepalive_periods(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """The broker stopped with SIGSTOP: the link drops it within ~2 keepalive periods.

    Nothing but the keepalive can notice: the TCP connection stays up. Once the broker is
    resumed, the link reconnects.
    """
    process = mosquitto._process
    assert process is not None
    settings = _settings(mosquitto, f"{prefix}-sub", keepalive_s=1, connect_timeout_s=1.0)
    link = MqttLink(settings, _nothing, _share(prefix))
    with structlog.testing.capture_logs() as logs:
        async with link:
            await asyncio.sleep(0.5)
            loop = asyncio.get_running_loop()
            os.kill(process.pid, signal.SIGSTOP)
            try:
                frozen_at = loop.time()
                await eventually(lambda: not link.connected, within=4)
                noticed_after = loop.time() - frozen_at
            finally:
                os.kill(process.pid, signal.SIGCONT)
            await eventually(lambda: link.stats["reconnects"] >= 1, within=5)
            assert link.connected
    assert noticed_after < 2.5  # 1.5 periods of silence, checked every half period
    assert any(entry["event"] == "mqtt.keepalive_timeout" for entry in logs)


@pytest.mark.asyncio
async def test_a_publish_the_broker_refuses_raises_at_once(tmp_path: Path, prefix: str) -> None:
    """A PUBACK with reason 0x87 (an ACL denies the topic) fails publish() at once.

    The link stays connected, and a PUBACK with reason 0x10 (no matching subscribers) is a
    success.
    """
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {prefix}/allowed/#\n")
    broker = Mosquitto(tmp_path / "broker", extra_config=f"acl_file {acl}")
    async with broker:
        settings = _settings(broker, f"{prefix}-pub", publish_timeout_s=10.0)
        async with MqttLink(settings, _nothing, []) as link:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(BrokerUnavailableError, match="Not authorized"):
                await link.publish(f"{prefix}/denied/x", b"nope")
            assert loop.time() - started < 1.0
            await link.publish(f"{prefix}/allowed/x", b"fine")  # nobody subscribes: 0x10
            assert link.stats["published"] == 1
            assert link.stats["reconnects"] == 0
            assert link.connected


async def _take_over_once(broker: Mosquitto, client_id: str) -> mqtt5.ConnAck:
    """Connect once with ``client_id`` (taking its session over), then disconnect."""
    reader, writer = await asyncio.open_connection(broker.host, broker.port)
    try:
        writer.write(
            mqtt5.connect(client_id, clean_start=False, keepalive_s=10, session_expiry_s=3600)
        )
        parser = mqtt5.Reader()
        async with asyncio.timeout(5):
            while True:
                data = await reader.read(4096)
                assert data, "the broker closed the connection before CONNACK"
                for packet in parser.feed(data):
                    if isinstance(packet, mqtt5.ConnAck):
                        writer.write(mqtt5.disconnect())
                        await writer.drain()
                        return packet
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_a_session_taken_over_ends_the_connection_and_the_link_reconnects(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """Another connection with the link's client id: the broker drops the link, which reconnects.

    The intruder connects once and leaves, so the link reconnects exactly once, resumes its
    session and receives messages again.
    """
    inbox = Inbox()
    settings = _settings(mosquitto, f"{prefix}-sub")
    link = MqttLink(settings, inbox, _share(prefix))
    with structlog.testing.capture_logs() as logs:
        async with link:
            connack = await _take_over_once(mosquitto, settings.client_id)
            assert connack.reason_code == 0
            assert connack.session_present  # the link's session
            await eventually(lambda: link.stats["reconnects"] >= 1)
            await link.wait_connected(timeout=5)
            await _publish_all(mosquitto, prefix, [b"after"])
            await eventually(lambda: inbox.payloads == [b"after"])
            await asyncio.sleep(0.3)  # a fight over the client id would show up by now
            assert link.stats["reconnects"] == 1
    events = {entry["event"] for entry in logs}
    # Mosquitto 2.0.11 closes the old connection without a DISCONNECT (measured); a broker
    # sending DISCONNECT 0x8E would be logged as mqtt.disconnected_by_broker instead.
    assert events & {"mqtt.connection_lost", "mqtt.disconnected_by_broker"}


# --- bugs found while writing these tests ---------------------------------------------------


@pytest.mark.asyncio
async def test_a_message_over_the_brokers_maximum_packet_size_fails_without_reconnecting(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """publish() of a packet over the Maximum Packet Size in CONNACK fails at once, link intact.

    MQTT 5 §3.2.2.3.6: the client must not send it (the private broker announces 65,536 bytes).
    Mosquitto answers one with DISCONNECT 0x95; a link that sends it anyway, again on every
    reconnection, storms the broker until publish_timeout_s.
    """
    settings = _settings(mosquitto, f"{prefix}-pub", publish_timeout_s=2.0)
    async with MqttLink(settings, _nothing, []) as link:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises((GatewayError, ValueError)):
            await link.publish(_topic(prefix), b"x" * 70_000)
        elapsed = loop.time() - started
        assert link.stats["reconnects"] == 0
        assert elapsed < 1.0
        assert link.connected


@pytest.mark.asyncio
async def test_a_backlog_longer_than_the_keepalive_does_not_drop_a_live_broker(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """Reading paused for a backlog (handlers at their cap) is not a silent broker.

    receive_maximum=1 and a first handler that takes 3 s: the next messages wait in the inbox
    and reading pauses, so the broker's PINGRESPs stay unread in the socket. The broker is
    alive, so the link must stay connected and handle everything. (QoS 0 makes the backlog
    certain; at QoS 1 Mosquitto's overshoot of the receive window does the same.)
    """
    loop = asyncio.get_running_loop()
    calls: list[bytes] = []

    def slow_first(_topic: str, payload: bytes) -> asyncio.Future[None] | None:
        calls.append(payload)
        if len(calls) > 1:
            return None
        done: asyncio.Future[None] = loop.create_future()
        loop.call_later(3.0, done.set_result, None)
        return done

    settings = _settings(mosquitto, f"{prefix}-sub", keepalive_s=1, receive_maximum=1)
    link = MqttLink(settings, slow_first, [(f"{prefix}/m/+/up", 0)])
    with structlog.testing.capture_logs() as logs:
        async with link:
            await _publish_all(mosquitto, prefix, [b"1", b"2", b"3"])
            await eventually(lambda: link.stats["handled"] == 3 or not link.connected, within=5)
            assert [entry for entry in logs if entry["event"] == "mqtt.keepalive_timeout"] == []
            assert link.stats["reconnects"] == 0
            assert link.stats["handled"] == 3
    assert calls == [b"1", b"2", b"3"]


@pytest.mark.asyncio
async def test_a_cancelled_future_gets_its_message_delivered_again(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """A future cancelled by whoever made it: its message is delivered again, as with a retry.

    _future_done leaves it unacknowledged "to let the broker deliver it again", but the broker
    only redelivers on a new connection (MQTT 5 §4.4): without one the message stays stuck,
    holding a slot of the receive window, for the connection's whole life.
    """
    loop = asyncio.get_running_loop()
    calls: list[bytes] = []

    def given_up_the_first_time(_topic: str, payload: bytes) -> asyncio.Future[None] | None:
        calls.append(payload)
        if len(calls) > 1:
            return None
        abandoned: asyncio.Future[None] = loop.create_future()
        loop.call_later(0.05, abandoned.cancel)
        return abandoned

    link = MqttLink(_settings(mosquitto, f"{prefix}-sub"), given_up_the_first_time, _share(prefix))
    async with link:
        await _publish_all(mosquitto, prefix, [b"vend-result"])
        await eventually(lambda: len(calls) == 2, within=3)
        assert link.stats["handled"] == 1


@pytest.mark.asyncio
async def test_handlers_at_the_cap_waiting_for_their_own_pubacks_do_not_deadlock(
    mosquitto: Mosquitto, prefix: str
) -> None:
    """Every handler publishes at QoS 1 and waits for the PUBACK, with more messages than the cap.

    The PUBACKs arrive on the socket the waiting messages do: the link must keep reading
    (a Hello answered by a Time, from thousands of machines at once, deadlocked a link that
    paused reading at its handler cap).
    """
    topic = f"{prefix}/m/vm-1/up"
    replies: list[bytes] = []
    link: MqttLink | None = None

    async def answer(_topic: str, payload: bytes) -> None:
        assert link is not None
        await link.publish(f"{prefix}/m/vm-1/down", payload)
        replies.append(payload)

    settings = _settings(mosquitto, f"{prefix}-sub", receive_maximum=2, publish_timeout_s=5.0)
    link = MqttLink(settings, answer, [(topic, 1)])
    async with link, MqttLink(_settings(mosquitto, f"{prefix}-pub"), _nothing, []) as pub:
        await asyncio.gather(*(pub.publish(topic, f"hello-{n}".encode()) for n in range(300)))
        await eventually(lambda: len(replies) == 300, within=10.0)
        assert link.stats["handler_errors"] == 0
        assert link.stats["reconnects"] == 0
