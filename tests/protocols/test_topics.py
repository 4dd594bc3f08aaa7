"""MQTT topic names, filters, QoS and retain flags (SPEC §3)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.topics import (
    DEFAULT_PREFIX,
    DEFAULT_SHARE_GROUP,
    QOS,
    RETAIN,
    Channel,
    Topics,
)

machine_ids = st.text(
    st.sampled_from("abcXYZ0189-_."),
    min_size=1,
    max_size=64,
)
levels = st.text(st.characters(codec="utf-8", exclude_characters="/+#\0"), min_size=1).filter(
    lambda s: not s.startswith("$")
)


@settings(max_examples=200, deadline=None)
@given(prefix=levels, machine_id=machine_ids, channel=st.sampled_from(Channel))
def test_topic_parse_round_trip(prefix: str, machine_id: str, channel: Channel) -> None:
    """parse(topic(id, channel)) gives back the machine id and channel under any valid prefix."""
    topics = Topics(prefix)
    assert topics.parse(topics.topic(machine_id, channel)) == (machine_id, channel)


def test_topic_layout() -> None:
    """Topics are {prefix}/m/{machine_id}/{down|up|status}, with prefix vg by default."""
    assert DEFAULT_PREFIX == "vg"
    topics = Topics()
    assert topics.topic("VM-0001", Channel.DOWN) == "vg/m/VM-0001/down"
    assert topics.topic("VM-0001", Channel.UP) == "vg/m/VM-0001/up"
    assert topics.topic("VM-0001", Channel.STATUS) == "vg/m/VM-0001/status"
    assert Topics("test-42").topic("a.b_c", Channel.UP) == "test-42/m/a.b_c/up"


@pytest.mark.parametrize(
    "topic",
    [
        "other/m/VM-0001/up",
        "vg/x/VM-0001/up",
        "vg/m/VM-0001/sideways",
        "vg/m/VM-0001",
        "vg/m/VM-0001/up/extra",
        "vg/m/VM-0001/up/",
        "/vg/m/VM-0001/up",
        "vg/m/+/up",
        "vg/m//up",
        "vg/m/VM 0001/up",
        "vg/m/VM-é/up",
        f"vg/m/{'x' * 65}/up",
        "",
        "vg",
    ],
)
def test_parse_rejects_foreign_and_malformed_topics(topic: str) -> None:
    """Parsing raises ValueError for topics not under the prefix, unknown channels and bad ids."""
    with pytest.raises(ValueError, match=r"topic|machine id"):
        Topics().parse(topic)


@pytest.mark.parametrize("machine_id", ["", "a/b", "+", "#", "a b", "é", "x" * 65])
def test_topic_rejects_invalid_machine_ids(machine_id: str) -> None:
    """topic() raises ValueError for a machine id outside 1-64 of [A-Za-z0-9._-]."""
    with pytest.raises(ValueError, match="invalid machine id"):
        Topics().topic(machine_id, Channel.UP)


def test_filters() -> None:
    """A filter matches one channel of every machine; a shared one adds $share/{group}/."""
    topics = Topics()
    assert topics.filter(Channel.UP) == "vg/m/+/up"
    assert topics.filter(Channel.STATUS) == "vg/m/+/status"
    assert DEFAULT_SHARE_GROUP == "vendgate"
    assert topics.shared_filter(Channel.UP) == "$share/vendgate/vg/m/+/up"
    assert Topics("t1").shared_filter(Channel.STATUS, "gw") == "$share/gw/t1/m/+/status"


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "$SYS", "$x", "a\0b"])
def test_prefix_must_be_one_plain_level(bad: str) -> None:
    """A prefix that is empty, holds / + # NUL or starts with $ raises ValueError."""
    with pytest.raises(ValueError, match="topic prefix"):
        Topics(bad)


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "$share", "a\0b"])
def test_share_group_must_be_one_plain_level(bad: str) -> None:
    """A share group that is empty, holds / + # NUL or starts with $ raises ValueError."""
    with pytest.raises(ValueError, match="share group"):
        Topics().shared_filter(Channel.UP, bad)


def test_qos_one_everywhere_and_only_status_retained() -> None:
    """Every channel uses QoS 1 (SPEC §3.2) and only the status channel is retained (§3.3)."""
    assert set(QOS) == set(Channel)
    assert set(QOS.values()) == {1}
    assert RETAIN == {Channel.DOWN: False, Channel.UP: False, Channel.STATUS: True}
