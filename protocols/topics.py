"""MQTT topic names, QoS and subscriptions (SPEC §3)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from protocols.codec import check_machine_id

DEFAULT_PREFIX: Final = "vg"
DEFAULT_SHARE_GROUP: Final = "vendgate"


class Channel(enum.Enum):
    """The three topics every machine has, by their last topic level."""

    DOWN = "down"  # gateway -> machine: Vend, ResultAck, StatusQuery, Config, Time
    UP = "up"  # machine -> gateway: every uplink frame but Presence
    STATUS = "status"  # machine -> gateway, retained: Presence, and the last will


_CHANNELS: Final[dict[str, Channel]] = {channel.value: channel for channel in Channel}

#: QoS 1 everywhere (SPEC §3.2): delivery survives reconnects, and duplicates
#: are harmless because every frame is idempotent by its ids.
QOS: Final[dict[Channel, int]] = {Channel.DOWN: 1, Channel.UP: 1, Channel.STATUS: 1}
#: Only the status topic is retained.
RETAIN: Final[dict[Channel, bool]] = {Channel.DOWN: False, Channel.UP: False, Channel.STATUS: True}


def _check_level(name: str, value: str) -> str:
    if not value or any(c in value for c in "/+#\0") or value.startswith("$"):
        raise ValueError(f"{name} {value!r} must be one topic level without / + # or a leading $")
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under one prefix: ``{prefix}/m/{machine_id}/{down|up|status}``."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        _check_level("topic prefix", self.prefix)

    def topic(self, machine_id: str, channel: Channel) -> str:
        """Return the topic of one machine's channel."""
        return f"{self.prefix}/m/{check_machine_id(machine_id)}/{channel.value}"

    def parse(self, topic: str) -> tuple[str, Channel]:
        """Split a topic into (machine id, channel); raise ValueError if it is not ours."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != self.prefix or parts[1] != "m":
            raise ValueError(f"topic {topic!r} is not under {self.prefix}/m/")
        channel = _CHANNELS.get(parts[3])
        if channel is None:
            raise ValueError(f"topic {topic!r} has an unknown channel")
        return check_machine_id(parts[2]), channel

    def filter(self, channel: Channel) -> str:
        """Return the filter matching one channel of every machine."""
        return f"{self.prefix}/m/+/{channel.value}"

    def shared_filter(self, channel: Channel, group: str = DEFAULT_SHARE_GROUP) -> str:
        """Return the MQTT 5 shared-subscription filter gateways use (MQTT 5 §4.8.2)."""
        return f"$share/{_check_level('share group', group)}/{self.filter(channel)}"
