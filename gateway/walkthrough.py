"""``vendgate demo --walkthrough``: the wire protocol end to end, in one process, with faults.

This drives the reference machine (:mod:`protocols.device`) through the vend
sequences of SPEC §6 while a small scripted gateway loses, repeats and forges
messages, and prints every frame that crosses the wire. It needs no broker and
no database. It exits non-zero if any vend id turned a motor more than once or
ended with two different outcomes.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from protocols.codec import FrameKey, decode, encode
from protocols.device import Device, MemoryStore, MotorReport, Publish, StartMotor
from protocols.frames import (
    AckCode,
    Config,
    Direction,
    FailReason,
    Frame,
    Hello,
    Outcome,
    ResultAck,
    SlotConfig,
    StatusQuery,
    StatusReply,
    Time,
    Vend,
    VendAck,
    VendResult,
    VendState,
)

START_MS = 1_798_761_600_000  # 2027-01-01T00:00:00Z on the gateway's clock
MACHINE_ID = "VM-DEMO-1"
SKEW_MS = 40_000


def _keep(_frame: Frame) -> bool:
    return False


@dataclass
class Wire:
    """The scripted gateway's side: a clock, the key and what the machine did."""

    out: TextIO
    key: FrameKey
    now_ms: int = START_MS
    uplink: list[Frame] = field(default_factory=list)
    motor_runs: Counter[int] = field(default_factory=Counter)
    outcomes: dict[int, set[Outcome]] = field(default_factory=dict)
    pending_motor: list[StartMotor] = field(default_factory=list)

    def say(self, text: str) -> None:
        """Print a narration line."""
        self.out.write(f"\n# {text}\n")

    def take(self, actions: list[Publish | StartMotor], *, lose: Callable[[Frame], bool]) -> None:
        """Record the machine's actions; ``lose`` picks uplink frames the network drops."""
        for action in actions:
            if isinstance(action, StartMotor):
                self.motor_runs[action.vend_id] += 1
                self.pending_motor.append(action)
                self.out.write(f"   machine: motor turns for vend {action.vend_id:#x}\n")
                continue
            frame = decode(action.payload, self.key, direction=Direction.UP)
            lost = lose(frame)
            mark = "X lost" if lost else ""
            self.out.write(
                f"  <- {action.channel.value:6} {_show(frame)} [{len(action.payload)} B] {mark}\n"
            )
            if isinstance(frame, VendResult):
                self.outcomes.setdefault(frame.vend_id, set()).add(frame.dispense.outcome)
            if not lost:
                self.uplink.append(frame)

    @property
    def machine_ms(self) -> int:
        """The machine's free-running clock, which is SKEW_MS behind the gateway's."""
        return self.now_ms - SKEW_MS

    def send(
        self,
        device: Device,
        frame: Frame,
        *,
        key: FrameKey | None = None,
        lose: Callable[[Frame], bool] = _keep,
    ) -> None:
        """Deliver one downlink frame to the machine and collect its answers."""
        payload = encode(frame, key or self.key)
        forged = " (forged: wrong key)" if key is not None else ""
        self.out.write(f"  -> down   {_show(frame)} [{len(payload)} B]{forged}\n")
        self.take(device.receive(payload, self.machine_ms), lose=lose)

    def last(self, cls: type[Frame]) -> Frame:
        """Return the newest uplink frame of a type the gateway received."""
        return next(f for f in reversed(self.uplink) if isinstance(f, cls))


def _show(frame: Frame) -> str:
    text = repr(frame)
    return text if len(text) <= 150 else text[:147] + "..."


def run(out: TextIO) -> int:
    """Play the scenarios, print them, and return 0 if every invariant held."""
    key = FrameKey(secrets.token_bytes(32))
    wire = Wire(out=out, key=key)
    store = MemoryStore()
    device = Device(MACHINE_ID, key, store, now_ms=wire.machine_ms)
    _connect(wire, device)
    vend_a = _lost_ack_and_result(wire, device)
    vend_b = _jam(wire, device)
    vend_c, reply = _expired_while_offline(wire, device)
    _forged(wire, device)
    device, vend_d = _reboot_mid_vend(wire, device, store)
    return _summary(wire, reply, (vend_a, vend_b, vend_c, vend_d))


def _vend(wire: Wire, slot: int, price: int, ttl_s: int) -> Vend:
    return Vend(secrets.randbits(64), slot, price, wire.now_ms // 1000 + ttl_s, 1)


def _connect(wire: Wire, device: Device) -> None:
    wire.say("1. The machine connects: presence, Hello, and a Time answering the Hello.")
    wire.out.write(f"#    (the machine's own clock is {SKEW_MS // 1000} s slow until then)\n")
    wire.take(device.connected(wire.machine_ms), lose=_keep)
    hello = wire.last(Hello)
    assert isinstance(hello, Hello)  # noqa: S101  (narrowing for the type checker)
    wire.send(device, Time(wire.now_ms, hello.boot, hello.seq))
    planogram = (
        SlotConfig(1, "CC330", "Coca-Cola 330ml", 300, 8, True),  # noqa: FBT003
        SlotConfig(2, "NFSQ550", "农夫山泉 550ml", 200, 10, True),  # noqa: FBT003
    )
    wire.send(device, Config(1, planogram))


def _lost_ack_and_result(wire: Wire, device: Device) -> Vend:
    wire.say("2. The VendAck is lost: the gateway re-sends, the machine answers from its log.")
    vend = _vend(wire, 1, 300, 60)
    wire.send(device, vend, lose=lambda f: isinstance(f, VendAck))
    wire.now_ms += 1000
    wire.send(device, Vend(vend.vend_id, vend.slot, vend.price, vend.deadline, 2))

    wire.say("3. The drop sensor sees the product; the VendResult is lost, re-sent until acked.")
    motor = wire.pending_motor.pop()
    wire.now_ms += 1800
    report = MotorReport(dropped=True, motor_ms=1800)
    wire.take(
        device.motor_finished(motor.vend_id, report, wire.machine_ms),
        lose=lambda f: isinstance(f, VendResult),
    )
    wire.now_ms += 2000
    wire.take(device.tick(wire.machine_ms), lose=_keep)
    wire.send(device, ResultAck(vend.vend_id))
    wire.now_ms += 60_000
    wire.take(device.tick(wire.machine_ms), lose=_keep)
    return vend


def _jam(wire: Wire, device: Device) -> Vend:
    wire.say("4. A jam: the machine reports FAILED (a refund) and queues an EJC event.")
    vend = _vend(wire, 2, 200, 60)
    wire.send(device, vend)
    motor = wire.pending_motor.pop()
    wire.now_ms += 9000
    report = MotorReport(dropped=False, motor_ms=9000, retries=3, fault=FailReason.JAM)
    wire.take(device.motor_finished(motor.vend_id, report, wire.machine_ms), lose=_keep)
    wire.send(device, ResultAck(vend.vend_id))
    return vend


def _expired_while_offline(wire: Wire, device: Device) -> tuple[Vend, StatusReply]:
    wire.say("5. A vend sent while the link is down passes its deadline. Silence proves nothing,")
    wire.out.write(
        "#    so the gateway asks; the query writes a tombstone: not dispensed, proven.\n"
    )
    vend = _vend(wire, 1, 300, 30)
    wire.out.write(f"  -> down   {_show(vend)}  X lost (machine offline)\n")
    wire.now_ms += 40_000
    wire.send(device, StatusQuery(vend.vend_id, vend.deadline))
    reply = wire.last(StatusReply)
    assert isinstance(reply, StatusReply)  # noqa: S101  (narrowing for the type checker)
    wire.out.write("#    the broker now delivers the stale copy late: refused, no motor.\n")
    wire.send(device, vend)
    return vend, reply


def _forged(wire: Wire, device: Device) -> None:
    wire.say("6. A forged Vend (wrong key): answered BAD_MAC, advisory, never logged.")
    wire.send(device, _vend(wire, 1, 300, 60), key=FrameKey(b"\x00" * 32))


def _reboot_mid_vend(wire: Wire, device: Device, store: MemoryStore) -> tuple[Device, Vend]:
    wire.say("7. Power fails while the motor turns: after reboot the outcome is UNCERTAIN.")
    vend = _vend(wire, 1, 300, 60)
    wire.send(device, vend)
    wire.pending_motor.clear()
    device = Device(MACHINE_ID, wire.key, store, now_ms=wire.machine_ms)
    wire.take(device.connected(wire.machine_ms), lose=_keep)
    wire.send(device, ResultAck(vend.vend_id))
    wire.out.write("#    a late re-send of the same vend is answered from the log: no motor.\n")
    wire.send(device, Vend(vend.vend_id, vend.slot, vend.price, vend.deadline, 2))
    return device, vend


def _summary(wire: Wire, reply: StatusReply, vends: tuple[Vend, ...]) -> int:
    out = wire.out
    out.write("\n# Summary\n")
    ok = True
    expected = {
        vends[0].vend_id: {Outcome.DISPENSED},
        vends[1].vend_id: {Outcome.FAILED},
        vends[3].vend_id: {Outcome.UNCERTAIN},
    }
    for name, vend in zip("ABCD", vends, strict=True):
        runs = wire.motor_runs[vend.vend_id]
        outcomes = wire.outcomes.get(vend.vend_id, set())
        ok &= runs <= 1 and len(outcomes) <= 1 and outcomes == expected.get(vend.vend_id, set())
        shown = ", ".join(o.name for o in outcomes) or "none reported"
        out.write(f"  vend {name}: motor runs {runs}, outcome {shown}\n")
    proven = reply.vend_state is VendState.REJECTED and reply.code is AckCode.EXPIRED
    ok &= proven and wire.motor_runs[vends[2].vend_id] == 0
    out.write(f"  vend C: tombstone proves not dispensed: {'yes' if proven else 'NO'}\n")
    out.write(
        "  invariant (each vend id turns the motor at most once and has one outcome): "
        f"{'holds' if ok else 'VIOLATED'}\n"
    )
    return 0 if ok else 1
