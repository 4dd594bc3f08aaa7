"""Frames of protocol version 1, as frozen dataclasses.

The order of the fields is the order on the wire (SPEC §5). Downlink frames go
from the gateway to a machine; uplink frames from a machine to the gateway and
start with the machine's boot count and a per-boot sequence number.
"""

from __future__ import annotations

import enum
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

from protocols.schema import (
    Bool,
    Enum,
    List,
    Nested,
    Optional,
    Record,
    SInt,
    Str,
    UInt,
    record,
    wire,
)

if TYPE_CHECKING:
    from collections.abc import Callable

PROTOCOL_VERSION = 1

U8, U16, U32, U64 = UInt(8), UInt(16), UInt(32), UInt(64)
I16, I32 = SInt(16), SInt(32)

#: The characters of an event code (SPEC §8).
_EVENT_CODE_CHARS = string.ascii_uppercase + string.digits


class Direction(enum.Enum):
    """Which way a frame travels; decided by its type code (SPEC §4.2)."""

    DOWN = "down"
    UP = "up"

    @classmethod
    def of_type(cls, type_code: int) -> Direction | None:
        """Return the direction a type code belongs to, or None if it is reserved."""
        if 0x01 <= type_code <= 0x3F:
            return cls.DOWN
        if 0x40 <= type_code <= 0x7F:
            return cls.UP
        return None


class AckCode(enum.IntEnum):
    """The machine's answer to a ``Vend`` (SPEC §6.3).

    Codes below 16 are final and logged: a repeat of the vend gets the same
    answer, and a refusal proves the vend will never be dispensed. Codes 16-31
    are transient and not logged: the gateway may retry until the deadline.
    Codes from 32 are advisory: not logged, and never proof of anything, because
    the machine could not trust the frame it answers.
    """

    ACCEPTED = 0
    EXPIRED = 1
    SLOT_EMPTY = 2
    SLOT_DISABLED = 3
    UNKNOWN_SLOT = 4
    BUSY = 16
    LOG_FULL = 17
    CLOCK_UNSYNCED = 18
    BAD_MAC = 32
    CONFLICT = 33

    @property
    def is_final_refusal(self) -> bool:
        """True for a logged refusal: the vend is proven never to be dispensed."""
        return 0 < self < 16

    @property
    def is_transient(self) -> bool:
        """True for a refusal that a later attempt with the same vend id may overcome."""
        return 16 <= self < 32

    @property
    def is_advisory(self) -> bool:
        """True for an answer to a frame the machine could not trust."""
        return self >= 32


class Outcome(enum.IntEnum):
    """How a vend ended on the machine."""

    DISPENSED = 0
    FAILED = 1
    UNCERTAIN = 2


class FailReason(enum.IntEnum):
    """Why a vend failed, or why its outcome is uncertain."""

    NONE = 0
    JAM = 1
    NO_DROP = 2
    MOTOR_FAULT = 3
    SLOT_EMPTY = 4
    POWER_LOSS = 5
    SENSOR_FAULT = 6


class VendState(enum.IntEnum):
    """What a machine's vend log says about one vend id (``StatusReply``)."""

    NOT_SEEN = 0
    REJECTED = 1
    ACCEPTED = 2
    DISPENSING = 3
    DONE = 4
    FORGOTTEN = 5
    MISMATCH = 6


class ConfigStatus(enum.IntEnum):
    """The machine's answer to a ``Config``."""

    APPLIED = 0
    STALE = 1
    INVALID = 2


class ReadingKind(enum.IntEnum):
    """What a telemetry reading measures, and in which unit."""

    TEMPERATURE = 1  # centi-degrees Celsius
    STOCK = 2  # units left in the slot
    RSSI = 3  # dBm


@dataclass(frozen=True, slots=True)
class Frame(Record):
    """Base of every frame: the codec writes version and type code before the fields."""

    TYPE: ClassVar[int] = 0
    DIRECTION: ClassVar[Direction] = Direction.DOWN


@dataclass(frozen=True, slots=True)
class UplinkFrame(Frame):
    """Base of machine-to-gateway frames: every one carries (boot, seq)."""

    DIRECTION: ClassVar[Direction] = Direction.UP

    boot: int = wire(U32)
    seq: int = wire(U32)


FRAME_TYPES: dict[int, type[Frame]] = {}

F = TypeVar("F", bound=Frame)


def frame(type_code: int) -> Callable[[type[F]], type[F]]:
    """Register a frame class under its type code and collect its wire fields."""

    def register(cls: type[F]) -> type[F]:
        direction = Direction.of_type(type_code)
        if direction is not cls.DIRECTION or type_code in FRAME_TYPES:
            raise TypeError(f"bad type code 0x{type_code:02x} for {cls.__name__}")
        cls.TYPE = type_code
        FRAME_TYPES[type_code] = cls
        return record(cls)

    return register


# --- nested records -------------------------------------------------------------------------


@record
@dataclass(frozen=True, slots=True)
class SlotConfig(Record):
    """One slot of a planogram."""

    slot: int = wire(U8)
    product_code: str = wire(Str(32))
    name: str = wire(Str(64))
    price: int = wire(U32)
    capacity: int = wire(U16)
    drop_sensor: bool = wire(Bool())


@record
@dataclass(frozen=True, slots=True)
class Dispense(Record):
    """What happened when the machine tried to dispense."""

    outcome: Outcome = wire(Enum(Outcome))
    reason: FailReason = wire(Enum(FailReason))
    drop_detected: bool = wire(Bool())
    motor_ms: int = wire(U32)
    retries: int = wire(U8)

    def check(self) -> str | None:
        """Dispensed means no failure reason; failed and uncertain need one."""
        if (self.outcome is Outcome.DISPENSED) != (self.reason is FailReason.NONE):
            return f"outcome {self.outcome.name} with reason {self.reason.name}"
        return None


@record
@dataclass(frozen=True, slots=True)
class Reading(Record):
    """A measured value, ``dt_ms`` after the batch's ``t0_ms``."""

    dt_ms: int = wire(U32)
    kind: ReadingKind = wire(Enum(ReadingKind))
    slot: int | None = wire(Optional(U8))
    value: int = wire(I32)


@record
@dataclass(frozen=True, slots=True)
class Event(Record):
    """An event named by its EVA-DTS code (or a vendgate ``X`` code), ``dt_ms`` after t0."""

    dt_ms: int = wire(U32)
    code: str = wire(Str(8, min_bytes=1))
    slot: int | None = wire(Optional(U8))
    active: bool = wire(Bool())

    def check(self) -> str | None:
        """Require an event code of upper-case ASCII letters and digits."""
        # strip() leaves something exactly when some character is not one of them, at a
        # fifth of the cost of a test per character (events are decoded on the hot path).
        if self.code.strip(_EVENT_CODE_CHARS):
            return f"event code {self.code!r} is not [A-Z0-9]"
        return None


# --- downlink --------------------------------------------------------------------------------


@frame(0x01)
@dataclass(frozen=True, slots=True)
class Vend(Frame):
    """Dispense one product from ``slot``, unless ``deadline`` (unix seconds) has passed."""

    vend_id: int = wire(U64)
    slot: int = wire(U8)
    price: int = wire(U32)
    deadline: int = wire(U32)
    attempt: int = wire(U8)

    def check(self) -> str | None:
        """Require attempts to be numbered from 1."""
        return None if self.attempt >= 1 else "attempt must be at least 1"


@frame(0x02)
@dataclass(frozen=True, slots=True)
class ResultAck(Frame):
    """The gateway has durably stored the result of ``vend_id``; stop re-sending it."""

    vend_id: int = wire(U64)


@frame(0x03)
@dataclass(frozen=True, slots=True)
class StatusQuery(Frame):
    """Ask for the machine's status and, if ``vend_id`` is set, what its log says of it."""

    vend_id: int | None = wire(Optional(U64))
    deadline: int | None = wire(Optional(U32))

    def check(self) -> str | None:
        """Require a vend query to name both the id and its deadline."""
        if (self.vend_id is None) != (self.deadline is None):
            return "vend_id and deadline must both be set or both be nil"
        return None


@frame(0x04)
@dataclass(frozen=True, slots=True)
class Config(Frame):
    """The desired planogram, replacing the machine's whole configuration."""

    version: int = wire(U32)
    slots: tuple[SlotConfig, ...] = wire(List(Nested(SlotConfig), 128))

    def check(self) -> str | None:
        """Versions start at 1 and each slot appears once."""
        if self.version < 1:
            return "version must be at least 1"
        if len({s.slot for s in self.slots}) != len(self.slots):
            return "a slot appears more than once"
        return None


@frame(0x05)
@dataclass(frozen=True, slots=True)
class Time(Frame):
    """The gateway's clock, answering the uplink frame (echo_boot, echo_seq)."""

    now_ms: int = wire(U64)
    echo_boot: int = wire(U32)
    echo_seq: int = wire(U32)


# --- uplink ----------------------------------------------------------------------------------


@frame(0x40)
@dataclass(frozen=True, slots=True)
class Hello(UplinkFrame):
    """Sent after every MQTT connect: who the machine is and what it has."""

    firmware: str = wire(Str(32))
    config_version: int = wire(U32)
    clock_ms: int = wire(U64)


@frame(0x41)
@dataclass(frozen=True, slots=True)
class VendAck(UplinkFrame):
    """The machine's answer to one ``Vend`` attempt."""

    vend_id: int = wire(U64)
    attempt: int = wire(U8)
    code: AckCode = wire(Enum(AckCode))
    duplicate: bool = wire(Bool())


@frame(0x42)
@dataclass(frozen=True, slots=True)
class VendResult(UplinkFrame):
    """How an accepted vend ended; re-sent until ``ResultAck``."""

    vend_id: int = wire(U64)
    dispense: Dispense = wire(Nested(Dispense))


@frame(0x43)
@dataclass(frozen=True, slots=True)
class StatusReply(UplinkFrame):
    """The answer to a ``StatusQuery``."""

    vend_id: int | None = wire(Optional(U64))
    vend_state: VendState = wire(Enum(VendState))
    code: AckCode = wire(Enum(AckCode))
    dispense: Dispense | None = wire(Optional(Nested(Dispense)))
    active_vend: int | None = wire(Optional(U64))
    config_version: int = wire(U32)
    clock_ms: int = wire(U64)

    def check(self) -> str | None:
        """Require the dispense record on a DONE vend, and only on one."""
        if (self.vend_state is VendState.DONE) != (self.dispense is not None):
            return "dispense is set if and only if vend_state is DONE"
        return None


@frame(0x44)
@dataclass(frozen=True, slots=True)
class ConfigAck(UplinkFrame):
    """The answer to a ``Config``."""

    version: int = wire(U32)
    status: ConfigStatus = wire(Enum(ConfigStatus))
    current_version: int = wire(U32)


@frame(0x45)
@dataclass(frozen=True, slots=True)
class Telemetry(UplinkFrame):
    """A batch of readings and events; rows are identified by (boot, seq, index)."""

    t0_ms: int = wire(U64)
    readings: tuple[Reading, ...] = wire(List(Nested(Reading), 256))
    events: tuple[Event, ...] = wire(List(Nested(Event), 256))


@frame(0x46)
@dataclass(frozen=True, slots=True)
class Heartbeat(UplinkFrame):
    """Sent every heartbeat interval while connected."""

    clock_ms: int = wire(U64)
    rssi: int = wire(I16)
    uptime_s: int = wire(U32)
    want_time: bool = wire(Bool())


@frame(0x47)
@dataclass(frozen=True, slots=True)
class Presence(UplinkFrame):
    """Retained on the status topic: online after connect, offline as the last will."""

    session: int = wire(U32)
    online: bool = wire(Bool())


DownlinkFrame = Vend | ResultAck | StatusQuery | Config | Time
AnyUplinkFrame = (
    Hello | VendAck | VendResult | StatusReply | ConfigAck | Telemetry | Heartbeat | Presence
)
