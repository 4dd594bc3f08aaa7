"""A fake gateway that drives one reference :class:`~protocols.device.Device` in tests.

It holds the fake clocks, the machine's :class:`FrameKey`, encodes downlink frames,
decodes every payload the device publishes with ``direction=Direction.UP`` (so a test
sees only what would really cross the wire), and can lose uplink messages on purpose.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, TypeVar

from protocols.codec import FrameKey, decode, encode
from protocols.device import (
    Device,
    DeviceSettings,
    DeviceStore,
    MemoryStore,
    MotorReport,
    Publish,
    StartMotor,
)
from protocols.frames import (
    Config,
    Direction,
    Dispense,
    FailReason,
    Frame,
    Heartbeat,
    Hello,
    Presence,
    ResultAck,
    SlotConfig,
    StatusQuery,
    StatusReply,
    Time,
    UplinkFrame,
    Vend,
    VendAck,
    VendResult,
)
from protocols.topics import Channel

if TYPE_CHECKING:
    from collections.abc import Iterable

    from protocols.device import Action

T = TypeVar("T", bound=UplinkFrame)

MACHINE_ID = "vm-test-001"
KEY = FrameKey(bytes(range(32)))
#: The gateway's wall clock when a harness starts (unix ms), far from the machine's raw clock.
WALL_START_MS = 1_700_000_000_000
#: The machine's free-running clock when a harness starts.
RAW_START_MS = 5_000
DROPPED = MotorReport(dropped=True, motor_ms=1_800)
JAMMED = MotorReport(dropped=False, motor_ms=4_000, retries=3, fault=FailReason.JAM)


def slot_config(slot: int, *, capacity: int = 5, drop_sensor: bool = True) -> SlotConfig:
    """Return a planogram line with a plausible product in ``slot``."""
    return SlotConfig(
        slot=slot,
        product_code=f"P{slot:03d}",
        name=f"Product {slot}",
        price=150,
        capacity=capacity,
        drop_sensor=drop_sensor,
    )


def only(frames: Iterable[Frame], cls: type[T]) -> list[T]:
    """Return the frames of one type, in order."""
    return [f for f in frames if isinstance(f, cls)]


class Harness:
    """Plays the gateway (and the host firmware) around one device.

    ``raw_ms`` is the machine's free-running clock and ``wall_ms`` the gateway's;
    :meth:`advance` moves both. Everything the device publishes is decoded and kept in
    ``uplink`` (unless lost); every :class:`StartMotor` ever returned, across reboots,
    is kept in ``motors``.
    """

    def __init__(
        self,
        *,
        store: DeviceStore | None = None,
        settings: DeviceSettings | None = None,
        key: FrameKey = KEY,
    ) -> None:
        self.key = key
        self.store: DeviceStore = store if store is not None else MemoryStore()
        self.settings = settings or DeviceSettings()
        self.raw_ms = RAW_START_MS
        self.wall_ms = WALL_START_MS
        self.device = Device(
            MACHINE_ID, key, self.store, now_ms=self.raw_ms, settings=self.settings
        )
        self.uplink: list[UplinkFrame] = []
        self.status: list[Presence] = []
        self.lost: list[UplinkFrame] = []
        self.motors: list[StartMotor] = []
        self.results: defaultdict[int, list[Dispense]] = defaultdict(list)
        self._lose: dict[type[UplinkFrame], int] = {}

    # -- clocks and lifecycle -------------------------------------------------------------------

    def advance(self, ms: int) -> None:
        """Let ``ms`` milliseconds pass on both clocks."""
        self.raw_ms += ms
        self.wall_ms += ms

    def now_s(self) -> int:
        """Return the gateway's wall clock in unix seconds."""
        return self.wall_ms // 1000

    def reboot(self) -> None:
        """Power-cycle the machine: a new :class:`Device` over the same durable store."""
        self.device = Device(
            MACHINE_ID, self.key, self.store, now_ms=self.raw_ms, settings=self.settings
        )

    def connect(self, *, sync: bool = True, rtt_ms: int = 40) -> list[UplinkFrame]:
        """Connect, and unless ``sync`` is False answer the Hello with a Time frame."""
        frames = self.run(self.device.connected(self.raw_ms))
        hellos = only(frames, Hello)
        if sync and hellos:
            frames += self.answer_time(hellos[-1], rtt_ms=rtt_ms)
        return frames

    def answer_time(
        self, request: Hello | Heartbeat, *, rtt_ms: int = 40, wall_ms: int | None = None
    ) -> list[UplinkFrame]:
        """Answer a time request after ``rtt_ms``, telling the machine ``wall_ms`` (default now)."""
        self.advance(rtt_ms // 2)
        now = self.wall_ms if wall_ms is None else wall_ms
        frame = Time(now_ms=now, echo_boot=request.boot, echo_seq=request.seq)
        self.advance(rtt_ms - rtt_ms // 2)
        return self.send(frame)

    def lose_next(self, cls: type[UplinkFrame], count: int = 1) -> None:
        """Lose the next ``count`` uplink frames of type ``cls`` on their way to the gateway."""
        self._lose[cls] = self._lose.get(cls, 0) + count

    # -- gateway to machine ---------------------------------------------------------------------

    def send(self, frame: Frame, *, key: FrameKey | None = None) -> list[UplinkFrame]:
        """Deliver one downlink frame and return the uplink frames the gateway receives."""
        return self.deliver(encode(frame, key or self.key))

    def deliver(self, payload: bytes) -> list[UplinkFrame]:
        """Deliver raw downlink bytes (for example an exact duplicate of an earlier message)."""
        return self.run(self.device.receive(payload, self.raw_ms))

    def configure(self, version: int = 1, slots: Iterable[SlotConfig] = ()) -> list[UplinkFrame]:
        """Send a planogram; by default slots 1-3, five items each, drop sensor on."""
        lines = tuple(slots) or (slot_config(1), slot_config(2), slot_config(3))
        return self.send(Config(version=version, slots=lines))

    def start(self, *, config: bool = True) -> None:
        """Connect, sync the clock and (by default) apply the standard planogram."""
        self.connect()
        if config:
            self.configure()

    def vend_frame(
        self,
        vend_id: int,
        *,
        slot: int = 1,
        price: int = 150,
        deadline: int | None = None,
        attempt: int = 1,
    ) -> Vend:
        """Build a Vend; the deadline defaults to two minutes from the gateway's now."""
        return Vend(
            vend_id=vend_id,
            slot=slot,
            price=price,
            deadline=self.now_s() + 120 if deadline is None else deadline,
            attempt=attempt,
        )

    def vend(self, vend_id: int, **fields: int) -> list[UplinkFrame]:
        """Send a Vend (see :meth:`vend_frame`) and return what came back."""
        return self.send(self.vend_frame(vend_id, **fields))

    def ack_result(self, vend_id: int) -> list[UplinkFrame]:
        """Tell the machine its result for ``vend_id`` is stored."""
        return self.send(ResultAck(vend_id=vend_id))

    def query(self, vend_id: int | None = None, deadline: int | None = None) -> StatusReply:
        """Send a StatusQuery and return the single StatusReply."""
        (reply,) = only(self.send(StatusQuery(vend_id=vend_id, deadline=deadline)), StatusReply)
        return reply

    # -- host to machine ------------------------------------------------------------------------

    def finish(self, vend_id: int, report: MotorReport = DROPPED) -> list[UplinkFrame]:
        """Report that the motor for ``vend_id`` stopped."""
        return self.run(self.device.motor_finished(vend_id, report, self.raw_ms))

    def tick(self, advance_ms: int = 0) -> list[UplinkFrame]:
        """Let time pass, then tick the device."""
        self.advance(advance_ms)
        return self.run(self.device.tick(self.raw_ms))

    # -- machine to gateway ---------------------------------------------------------------------

    def run(self, actions: Iterable[Action]) -> list[UplinkFrame]:
        """Carry out the device's actions; return the uplink frames that were not lost."""
        received: list[UplinkFrame] = []
        for action in actions:
            if isinstance(action, StartMotor):
                self.motors.append(action)
                continue
            frame = self._decode(action)
            if isinstance(frame, VendResult):
                self.results[frame.vend_id].append(frame.dispense)
            if self._lose.get(type(frame), 0) > 0:
                self._lose[type(frame)] -= 1
                self.lost.append(frame)
                continue
            if isinstance(frame, Presence):
                self.status.append(frame)
            else:
                self.uplink.append(frame)
            received.append(frame)
        return received

    def _decode(self, action: Publish) -> UplinkFrame:
        frame = decode(action.payload, self.key, direction=Direction.UP)
        assert isinstance(frame, UplinkFrame)
        assert frame == action.frame, "the payload must say what the device thinks it sent"
        assert (action.channel is Channel.STATUS) == isinstance(frame, Presence)
        return frame

    # -- queries about what happened ------------------------------------------------------------

    def motor_count(self, vend_id: int) -> int:
        """How many times the motor was started for ``vend_id`` (across reboots)."""
        return sum(1 for m in self.motors if m.vend_id == vend_id)


def single_ack(frames: Iterable[Frame]) -> VendAck:
    """Return the one VendAck among ``frames``."""
    (ack,) = only(frames, VendAck)
    return ack
