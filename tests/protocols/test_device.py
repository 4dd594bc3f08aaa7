"""The reference machine (protocols/device.py) driven through the wire by a fake gateway."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from protocols.codec import FrameKey, decode, encode
from protocols.device import DeviceSettings, LogEntry, MemoryStore, MotorReport
from protocols.frames import (
    AckCode,
    ConfigAck,
    ConfigStatus,
    Direction,
    FailReason,
    Heartbeat,
    Hello,
    Outcome,
    Presence,
    Reading,
    ReadingKind,
    ResultAck,
    Telemetry,
    Time,
    Vend,
    VendAck,
    VendResult,
    VendState,
)
from tests.protocols.machine_harness import (
    DROPPED,
    JAMMED,
    KEY,
    Harness,
    only,
    single_ack,
    slot_config,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

NO_DROP = MotorReport(dropped=False, motor_ms=3_000)


class PowerLossError(Exception):
    """The simulated power cut inside a store write."""


@dataclass
class JournalStore(MemoryStore):
    """A MemoryStore that journals every entry written and can lose power before one."""

    journal: list[LogEntry] = field(default_factory=list)
    crash_before: VendState | None = None

    def write_entry(self, entry: LogEntry) -> None:
        """Write one entry, or lose power just before writing a ``crash_before`` entry."""
        if entry.state is self.crash_before:
            self.crash_before = None
            raise PowerLossError
        self.journal.append(entry)
        super().write_entry(entry)


def started(*, log_capacity: int = 256, log_grace_s: int = 600) -> Harness:
    """Return a harness connected, clock-synced and configured with slots 1-3."""
    h = Harness(settings=DeviceSettings(log_capacity=log_capacity, log_grace_s=log_grace_s))
    h.start()
    return h


# mypy narrows attribute reads after an assert and would call later asserts unreachable;
# reading machine state through a call keeps each check independent.
def synced(h: Harness) -> bool:
    """Return whether the machine's clock is synced."""
    return h.device.clock_synced


def active(h: Harness) -> int | None:
    """Return the vend the machine is dispensing."""
    return h.device.active_vend


def in_service(h: Harness, slot: int) -> bool:
    """Return whether ``slot`` may vend."""
    return h.device.slots[slot].enabled


def step_clock(h: Harness, wall_ms: int) -> None:
    """Reconnect and let the gateway tell the machine a different wall-clock time."""
    h.device.disconnected()
    (hello,) = only(h.connect(sync=False), Hello)
    h.answer_time(hello, wall_ms=wall_ms)
    assert synced(h)


def vend_and_settle(h: Harness, vend_id: int, **fields: int) -> None:
    """Vend, finish with a drop, and acknowledge the result."""
    assert single_ack(h.vend(vend_id, **fields)).code is AckCode.ACCEPTED
    h.finish(vend_id)
    h.ack_result(vend_id)


# --- connection and the happy path ------------------------------------------------------------


def test_will_and_connect_announce_presence_and_hello() -> None:
    """The will is offline Presence for the next session; connect sends Presence and Hello."""
    h = Harness()
    will = decode(h.device.will(), KEY, direction=Direction.UP)
    assert isinstance(will, Presence)
    assert (will.online, will.session, will.boot) == (False, 1, 1)
    frames = h.connect(sync=False)
    assert h.status == [Presence(boot=1, seq=h.status[0].seq, session=1, online=True)]
    (hello,) = only(frames, Hello)
    assert (hello.config_version, hello.firmware) == (0, h.settings.firmware)
    assert not synced(h)


def test_happy_path_vend_from_connect_to_result_ack() -> None:
    """Connect, sync, configure, vend, dispense and ResultAck: one motor turn, re-sends stop."""
    h = Harness()
    h.connect()
    assert synced(h)
    assert h.device.clock_ms(h.raw_ms) == h.wall_ms
    (config_ack,) = only(h.configure(), ConfigAck)
    assert config_ack.status is ConfigStatus.APPLIED

    ack = single_ack(h.vend(1))
    assert (ack.code, ack.duplicate, ack.attempt) == (AckCode.ACCEPTED, False, 1)
    assert [m.vend_id for m in h.motors] == [1]
    entry = h.device.log_entry(1)
    assert entry is not None
    assert entry.state is VendState.DISPENSING
    assert active(h) == 1

    h.advance(1_800)
    (result,) = only(h.finish(1, DROPPED), VendResult)
    assert result.dispense.outcome is Outcome.DISPENSED
    assert result.dispense.drop_detected
    assert active(h) is None
    assert h.device.slots[1].stock == 4

    h.ack_result(1)
    entry = h.device.log_entry(1)
    assert entry is not None
    assert entry.result_acked
    assert entry.evictable
    resent = [f for _ in range(120) for f in only(h.tick(1_000), VendResult)]
    assert resent == []
    assert h.motor_count(1) == 1


def test_accepted_vend_is_durable_before_ack_and_motor() -> None:
    """An accepted vend is written ACCEPTED then DISPENSING before the VendAck and StartMotor."""
    store = JournalStore()
    h = Harness(store=store)
    h.start()
    writes_before = len(store.journal)
    h.vend(1)
    assert [e.state for e in store.journal[writes_before:]] == [
        VendState.ACCEPTED,
        VendState.DISPENSING,
    ]
    assert store.log[1].state is VendState.DISPENSING


def test_status_query_without_vend_id_reports_machine_status() -> None:
    """A StatusQuery without a vend id answers with active vend, config version and clock."""
    h = started()
    h.vend(5)
    reply = h.query()
    assert reply.vend_id is None
    assert reply.vend_state is VendState.NOT_SEEN
    assert (reply.active_vend, reply.config_version) == (5, 1)
    assert reply.clock_ms == h.wall_ms


def test_status_query_reports_a_vend_in_progress_and_done() -> None:
    """A StatusQuery for a logged vend answers its state, and the dispense record once DONE."""
    h = started()
    deadline = h.now_s() + 120
    h.vend(1, deadline=deadline)
    reply = h.query(1, deadline)
    assert (reply.vend_state, reply.code, reply.dispense) == (
        VendState.DISPENSING,
        AckCode.ACCEPTED,
        None,
    )
    h.finish(1)
    reply = h.query(1, deadline)
    assert reply.vend_state is VendState.DONE
    assert reply.dispense is not None
    assert reply.dispense.outcome is Outcome.DISPENSED


@pytest.mark.parametrize(
    ("drop_sensor", "report", "outcome", "reason", "drop_detected"),
    [
        (True, DROPPED, Outcome.DISPENSED, FailReason.NONE, True),
        (True, NO_DROP, Outcome.FAILED, FailReason.NO_DROP, False),
        (True, JAMMED, Outcome.FAILED, FailReason.JAM, False),
        (
            True,
            MotorReport(dropped=True, motor_ms=9, fault=FailReason.MOTOR_FAULT),
            Outcome.DISPENSED,
            FailReason.NONE,
            True,
        ),
        (False, NO_DROP, Outcome.DISPENSED, FailReason.NONE, False),
        (False, DROPPED, Outcome.DISPENSED, FailReason.NONE, False),
        (False, JAMMED, Outcome.UNCERTAIN, FailReason.JAM, False),
        (
            False,
            MotorReport(dropped=False, motor_ms=0, fault=FailReason.MOTOR_FAULT),
            Outcome.FAILED,
            FailReason.MOTOR_FAULT,
            False,
        ),
        (
            True,
            MotorReport(dropped=False, motor_ms=2_000, fault=FailReason.SENSOR_FAULT),
            Outcome.UNCERTAIN,
            FailReason.SENSOR_FAULT,
            False,
        ),
    ],
)
def test_result_is_judged_by_drop_sensor_then_fault(
    drop_sensor: bool,
    report: MotorReport,
    outcome: Outcome,
    reason: FailReason,
    drop_detected: bool,
) -> None:
    """FAILED needs proof: a working sensor that saw nothing, or a motor that never moved."""
    h = Harness()
    h.connect()
    h.configure(slots=[slot_config(1, drop_sensor=drop_sensor)])
    h.vend(1)
    (result,) = only(h.finish(1, report), VendResult)
    assert (result.dispense.outcome, result.dispense.reason) == (outcome, reason)
    assert result.dispense.drop_detected is drop_detected
    assert result.dispense.motor_ms == report.motor_ms
    assert result.dispense.retries == report.retries


# --- refusals ---------------------------------------------------------------------------------


def test_unsynced_clock_refuses_transiently_and_logs_nothing() -> None:
    """Without a Time frame a vend is refused CLOCK_UNSYNCED, even if also expired or unknown."""
    h = Harness()
    h.connect(sync=False)
    h.configure()
    ack = single_ack(h.vend(1, slot=42, deadline=h.now_s() - 10))
    assert ack.code is AckCode.CLOCK_UNSYNCED
    assert ack.code.is_transient
    assert h.device.log_entry(1) is None
    assert h.motors == []


def test_expired_deadline_is_a_final_logged_refusal() -> None:
    """A vend whose deadline the device clock has reached is refused EXPIRED and logged."""
    h = started()
    deadline = h.now_s()
    ack = single_ack(h.vend(1, deadline=deadline))
    assert ack.code is AckCode.EXPIRED
    assert ack.code.is_final_refusal
    entry = h.device.log_entry(1)
    assert entry is not None
    assert (entry.state, entry.code) == (VendState.REJECTED, AckCode.EXPIRED)
    step_clock(h, (deadline - 60) * 1000)
    again = single_ack(h.vend(1, deadline=deadline, attempt=2))
    assert (again.code, again.duplicate) == (AckCode.EXPIRED, True)
    assert h.motors == []


def test_expiry_boundary_is_the_deadline_second() -> None:
    """A deadline one second ahead is accepted; one equal to the current second is not."""
    h = started()
    h.advance(1_000 - h.wall_ms % 1_000)  # on a whole second, so the boundary is exact
    assert single_ack(h.vend(1, deadline=h.now_s())).code is AckCode.EXPIRED
    assert single_ack(h.vend(2, deadline=h.now_s() + 1)).code is AckCode.ACCEPTED


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ("unknown", AckCode.UNKNOWN_SLOT),
        ("disabled", AckCode.SLOT_DISABLED),
        ("empty", AckCode.SLOT_EMPTY),
    ],
)
def test_slot_refusals_are_final_and_logged(setup: str, code: AckCode) -> None:
    """A vend for an unknown, disabled or empty slot is refused finally, logged, and repeatable."""
    h = started()
    slot = 9 if setup == "unknown" else 2
    if setup == "disabled":
        h.device.slots[2].enabled = False
    if setup == "empty":
        h.device.slots[2].stock = 0
    ack = single_ack(h.vend(1, slot=slot))
    assert ack.code is code
    assert ack.code.is_final_refusal
    entry = h.device.log_entry(1)
    assert entry is not None
    assert (entry.state, entry.code) == (VendState.REJECTED, code)
    h.device.restock(2, 5)  # the slot is fine now...
    again = single_ack(h.vend(1, slot=slot, attempt=2))
    assert (again.code, again.duplicate) == (code, True)  # ...but the answer stays final
    assert h.motors == []


def test_slot_empty_after_last_item_is_sold() -> None:
    """A slot whose only item was dispensed refuses the next vend SLOT_EMPTY."""
    h = Harness()
    h.connect()
    h.configure(slots=[slot_config(1, capacity=1)])
    vend_and_settle(h, 1)
    assert single_ack(h.vend(2)).code is AckCode.SLOT_EMPTY
    entry = h.device.log_entry(2)
    assert entry is not None
    assert entry.state is VendState.REJECTED


def test_busy_is_transient_and_not_logged() -> None:
    """A second vend while the motor turns is refused BUSY, not logged, and accepted later."""
    h = started()
    h.vend(1)
    ack = single_ack(h.vend(2, slot=2))
    assert ack.code is AckCode.BUSY
    assert ack.code.is_transient
    assert h.device.log_entry(2) is None
    h.finish(1)
    retry = single_ack(h.vend(2, slot=2, attempt=2))
    assert (retry.code, retry.duplicate, retry.attempt) == (AckCode.ACCEPTED, False, 2)
    assert [m.vend_id for m in h.motors] == [1, 2]


def test_refusal_reasons_are_checked_in_order() -> None:
    """EXPIRED beats UNKNOWN_SLOT, SLOT_DISABLED beats SLOT_EMPTY, and all beat BUSY."""
    h = started()
    h.vend(1)  # busy from now on
    h.device.slots[2].enabled = False
    h.device.slots[2].stock = 0
    h.device.slots[3].stock = 0
    past = h.now_s() - 1
    assert single_ack(h.vend(10, slot=9, deadline=past)).code is AckCode.EXPIRED
    assert single_ack(h.vend(11, slot=9)).code is AckCode.UNKNOWN_SLOT
    assert single_ack(h.vend(12, slot=2)).code is AckCode.SLOT_DISABLED
    assert single_ack(h.vend(13, slot=3)).code is AckCode.SLOT_EMPTY
    assert single_ack(h.vend(14, slot=1)).code is AckCode.BUSY


def test_log_full_of_unsettled_entries_refuses_transiently() -> None:
    """With every log entry unsettled a new vend gets LOG_FULL, however much time passes."""
    h = started(log_capacity=2, log_grace_s=60)
    far = h.now_s() + 10_000
    h.vend(1)
    h.finish(1)  # DONE, but the gateway never acknowledged the result
    h.vend(2, slot=2)
    h.finish(2)
    ack = single_ack(h.vend(3, deadline=far))
    assert ack.code is AckCode.LOG_FULL
    assert ack.code.is_transient
    assert h.device.log_entry(3) is None
    h.advance(3_600_000)
    assert single_ack(h.vend(3, deadline=far, attempt=2)).code is AckCode.LOG_FULL
    assert {e.vend_id for e in h.device.log_entries()} == {1, 2}
    assert h.device.log_floor == 0
    h.ack_result(1)
    assert single_ack(h.vend(3, deadline=far, attempt=3)).code is AckCode.ACCEPTED
    assert h.device.log_entry(1) is None
    assert h.motor_count(3) == 1


def test_settled_entry_within_grace_is_not_evicted() -> None:
    """A settled entry stays in the log until its deadline is older than the grace period."""
    h = started(log_capacity=1, log_grace_s=60)
    deadline = h.now_s() + 10
    far = h.now_s() + 10_000
    vend_and_settle(h, 1, deadline=deadline)
    h.advance((10 + 59) * 1000)
    assert single_ack(h.vend(2, deadline=far)).code is AckCode.LOG_FULL
    h.advance(2_000)
    assert single_ack(h.vend(2, deadline=far, attempt=2)).code is AckCode.ACCEPTED
    assert h.device.log_floor == deadline


# --- duplicates, conflicts and lost messages ----------------------------------------------------


def test_duplicate_vend_at_every_stage_never_turns_the_motor_again() -> None:
    """Duplicates before the result, after it and after ResultAck are answered from the log."""
    h = started()
    payload = encode(h.vend_frame(1), KEY)
    deadline = h.now_s() + 120
    h.deliver(payload)

    before = h.deliver(payload)  # broker redelivery while the motor turns
    ack = single_ack(before)
    assert (ack.code, ack.duplicate) == (AckCode.ACCEPTED, True)
    assert only(before, VendResult) == []

    (first,) = only(h.finish(1), VendResult)
    for stage in ("after result", "after ResultAck"):
        frames = h.vend(1, deadline=deadline, attempt=2)
        ack = single_ack(frames)
        assert (ack.code, ack.duplicate, ack.attempt) == (AckCode.ACCEPTED, True, 2), stage
        (again,) = only(frames, VendResult)
        assert again.dispense == first.dispense, stage
        h.ack_result(1)
    assert h.motor_count(1) == 1


def test_lost_vend_ack_is_recovered_by_a_second_attempt() -> None:
    """If the VendAck is lost, attempt 2 is answered duplicate with the same outcome."""
    h = started()
    deadline = h.now_s() + 120
    h.lose_next(VendAck)
    assert only(h.vend(1, deadline=deadline), VendAck) == []
    assert len(h.motors) == 1
    ack = single_ack(h.vend(1, deadline=deadline, attempt=2))
    assert (ack.code, ack.duplicate, ack.attempt) == (AckCode.ACCEPTED, True, 2)
    assert h.motor_count(1) == 1

    h.lose_next(VendAck)
    h.vend(2, slot=9, deadline=deadline)
    ack = single_ack(h.vend(2, slot=9, deadline=deadline, attempt=2))
    assert (ack.code, ack.duplicate) == (AckCode.UNKNOWN_SLOT, True)


def test_lost_vend_result_is_resent_with_backoff_and_on_reconnect() -> None:
    """Tick re-sends an unacknowledged result at 2, 4, 8, 16, 30, 30 s; reconnect at once."""
    h = started()
    h.vend(1)
    h.lose_next(VendResult)
    assert only(h.finish(1), VendResult) == []
    t0 = h.raw_ms
    sent_at = [h.raw_ms - t0 for _ in range(180) if only(h.tick(500), VendResult)]
    assert sent_at == [2_000, 6_000, 14_000, 30_000, 60_000, 90_000]

    h.device.disconnected()
    assert h.tick(60_000) == []  # nothing goes out while offline
    results = only(h.connect(), VendResult)
    assert [r.vend_id for r in results] == [1]
    h.ack_result(1)
    assert [f for _ in range(100) for f in only(h.tick(1_000), VendResult)] == []
    assert len(set(h.results[1])) == 1


@pytest.mark.parametrize("change", ["slot", "price", "deadline"])
def test_same_id_with_different_terms_is_a_conflict(change: str) -> None:
    """A Vend reusing a logged id with another slot, price or deadline gets CONFLICT, unlogged."""
    h = started()
    original = h.vend_frame(1)
    h.send(original)
    changed = {
        "slot": {"slot": 2},
        "price": {"price": original.price + 10},
        "deadline": {"deadline": original.deadline + 1},
    }[change]
    entry_before = h.device.log_entry(1)
    frames = h.vend(1, **{**_vend_fields(original), **changed, "attempt": 2})
    ack = single_ack(frames)
    assert (ack.code, ack.duplicate) == (AckCode.CONFLICT, False)
    assert ack.code.is_advisory
    assert h.device.log_entry(1) == entry_before
    assert h.motor_count(1) == 1


def _vend_fields(vend: Vend) -> dict[str, int]:
    return {"slot": vend.slot, "price": vend.price, "deadline": vend.deadline}


def test_bad_mac_vend_is_answered_once_per_interval_and_never_logged() -> None:
    """A forged Vend gets VendAck(BAD_MAC) at most once per interval and changes nothing."""
    h = started()
    wrong = FrameKey(bytes(32))
    ack = single_ack(h.send(h.vend_frame(1), key=wrong))
    assert (ack.vend_id, ack.code) == (1, AckCode.BAD_MAC)
    assert ack.code.is_advisory
    h.advance(h.settings.bad_mac_answer_interval_ms - 1)
    assert h.send(h.vend_frame(2), key=wrong) == []
    assert h.send(ResultAck(vend_id=2), key=wrong) == []
    h.advance(1)
    assert single_ack(h.send(h.vend_frame(3), key=wrong)).code is AckCode.BAD_MAC
    assert list(h.device.log_entries()) == []
    assert h.motors == []
    assert h.device.counters["bad_mac"] == 4
    assert single_ack(h.vend(1)).code is AckCode.ACCEPTED  # the real one still works


# --- reboot -----------------------------------------------------------------------------------


def test_reboot_while_dispensing_reports_uncertain_power_loss() -> None:
    """A vend left DISPENSING by a reboot becomes UNCERTAIN/POWER_LOSS and is sent on connect."""
    h = started()
    deadline = h.now_s() + 120
    h.vend(1, deadline=deadline)
    h.reboot()
    assert h.device.boot == 2
    entry = h.device.log_entry(1)
    assert entry is not None
    assert entry.state is VendState.DONE
    assert entry.dispense is not None
    assert (entry.dispense.outcome, entry.dispense.reason) == (
        Outcome.UNCERTAIN,
        FailReason.POWER_LOSS,
    )
    (result,) = only(h.connect(), VendResult)
    assert (result.vend_id, result.boot, result.dispense) == (1, 2, entry.dispense)

    assert h.finish(1) == []  # the pre-reboot motor report is stale
    assert h.device.counters["stray_motor_report"] == 1
    frames = h.vend(1, deadline=deadline, attempt=2)
    assert single_ack(frames).duplicate
    assert only(frames, VendResult)[0].dispense.outcome is Outcome.UNCERTAIN
    assert h.motor_count(1) == 1


def test_reboot_between_accept_and_motor_reports_failed_power_loss() -> None:
    """A vend left ACCEPTED (power lost before DISPENSING was written) becomes FAILED/POWER_LOSS."""
    store = JournalStore()
    h = Harness(store=store)
    h.start()
    store.crash_before = VendState.DISPENSING
    with pytest.raises(PowerLossError):
        h.vend(1)
    assert h.motors == []
    assert store.log[1].state is VendState.ACCEPTED
    h.reboot()
    (result,) = only(h.connect(), VendResult)
    assert (result.dispense.outcome, result.dispense.reason) == (
        Outcome.FAILED,
        FailReason.POWER_LOSS,
    )
    frames = h.vend(1, deadline=store.log[1].deadline, attempt=2)
    assert single_ack(frames).duplicate
    assert h.motors == []


def test_reboot_loses_clock_sync_until_a_new_time() -> None:
    """After a reboot vends are refused CLOCK_UNSYNCED until a Time answers a Heartbeat request."""
    h = started()
    h.reboot()
    assert not synced(h)
    assert h.device.config_version == 1
    h.connect(sync=False)
    assert single_ack(h.vend(1)).code is AckCode.CLOCK_UNSYNCED
    assert h.device.log_entry(1) is None
    (beat,) = only(h.tick(h.settings.heartbeat_ms), Heartbeat)
    assert beat.want_time
    h.answer_time(beat)
    assert synced(h)
    assert single_ack(h.vend(1, attempt=2)).code is AckCode.ACCEPTED
    (beat,) = only(h.tick(h.settings.heartbeat_ms), Heartbeat)
    assert not beat.want_time


# --- time sync --------------------------------------------------------------------------------


@pytest.mark.parametrize(("boot_delta", "seq_delta"), [(0, 1), (0, -1), (-1, 0), (1, 0)])
def test_time_with_wrong_echo_is_ignored(boot_delta: int, seq_delta: int) -> None:
    """A Time echoing another (boot, seq) than the outstanding request is ignored."""
    h = Harness()
    (hello,) = only(h.connect(sync=False), Hello)
    h.send(
        Time(now_ms=h.wall_ms, echo_boot=hello.boot + boot_delta, echo_seq=hello.seq + seq_delta)
    )
    assert not synced(h)
    assert h.device.counters["time_unsolicited"] == 1
    h.answer_time(hello)  # the real answer still counts
    assert synced(h)


def test_time_slower_than_max_rtt_is_ignored() -> None:
    """A Time arriving after max_time_rtt_ms is refused, and the request is used up."""
    h = Harness()
    (hello,) = only(h.connect(sync=False), Hello)
    h.answer_time(hello, rtt_ms=h.settings.max_time_rtt_ms + 1)
    assert not synced(h)
    assert h.device.counters["time_too_slow"] == 1
    h.answer_time(hello)
    assert not synced(h)

    h.device.disconnected()
    (hello,) = only(h.connect(sync=False), Hello)
    h.answer_time(hello, rtt_ms=h.settings.max_time_rtt_ms)
    assert synced(h)


def test_unsolicited_time_does_not_move_the_clock() -> None:
    """A Time with no outstanding request (or replaying an answered one) leaves the clock alone."""
    h = Harness()
    (hello,) = only(h.connect(sync=False), Hello)
    h.answer_time(hello)
    before = h.device.clock_ms(h.raw_ms)
    h.send(Time(now_ms=h.wall_ms + 3_600_000, echo_boot=hello.boot, echo_seq=hello.seq))
    assert h.device.clock_ms(h.raw_ms) == before

    fresh = Harness()
    fresh.send(Time(now_ms=fresh.wall_ms, echo_boot=1, echo_seq=1))
    assert not fresh.device.clock_synced


# --- log eviction, tombstones, forgotten ids ------------------------------------------------------


def test_eviction_raises_floor_and_refuses_replay_after_clock_step_back() -> None:
    """An evicted vend replayed after the clock stepped back is refused EXPIRED by the floor."""
    h = started(log_capacity=2, log_grace_s=60)
    old = h.vend_frame(1)  # deadline in 120 s
    old_payload = encode(old, KEY)
    h.deliver(old_payload)
    h.finish(1)
    h.ack_result(1)
    vend_and_settle(h, 2, slot=2, deadline=h.now_s() + 3_600)
    h.advance((120 + 61) * 1000)
    assert single_ack(h.vend(3)).code is AckCode.ACCEPTED  # the log is full: 1 goes
    assert h.device.log_entry(1) is None
    assert h.device.log_floor == old.deadline
    assert h.device.counters["log_evicted"] == 1

    step_clock(h, (old.deadline - 60) * 1000)  # the gateway's clock jumped back
    assert h.device.clock_ms(h.raw_ms) < old.deadline * 1000
    ack = single_ack(h.deliver(old_payload))
    assert (ack.code, ack.duplicate) == (AckCode.EXPIRED, False)
    assert h.device.log_entry(1) is None  # the floor is proof enough; the full log is untouched
    assert h.motor_count(1) == 1
    assert h.query(1, old.deadline).vend_state is VendState.FORGOTTEN


def test_eviction_takes_the_smallest_deadline_first() -> None:
    """When several settled entries may go, the one with the smallest deadline is evicted."""
    h = started(log_capacity=3, log_grace_s=0)
    base = h.now_s()
    vend_and_settle(h, 1, deadline=base + 30)
    vend_and_settle(h, 2, deadline=base + 10)
    vend_and_settle(h, 3, deadline=base + 20)
    h.advance(60_000)
    h.vend(4)
    assert h.device.log_entry(2) is None
    assert h.device.log_floor == base + 10
    assert {e.vend_id for e in h.device.log_entries()} == {1, 3, 4}


def test_status_query_for_unseen_expired_vend_writes_a_tombstone() -> None:
    """A query about an unseen vend past its deadline logs REJECTED/EXPIRED, binding later Vends."""
    h = started()
    deadline = h.now_s() - 5
    reply = h.query(77, deadline)
    assert (reply.vend_id, reply.vend_state, reply.code) == (
        77,
        VendState.REJECTED,
        AckCode.EXPIRED,
    )
    entry = h.device.log_entry(77)
    assert entry is not None
    assert (entry.slot, entry.price, entry.state) == (None, None, VendState.REJECTED)

    step_clock(h, (deadline - 60) * 1000)  # now the deadline looks 60 s away
    ack = single_ack(h.vend(77, deadline=deadline))
    assert (ack.code, ack.duplicate) == (AckCode.EXPIRED, True)
    # Without the tombstone the same late command would have been dispensed:
    assert single_ack(h.vend(78, deadline=deadline)).code is AckCode.ACCEPTED
    assert h.motor_count(77) == 0


def test_status_query_for_unseen_live_vend_is_not_seen() -> None:
    """A query about an unseen vend whose deadline has not passed answers NOT_SEEN, logs nothing."""
    h = started()
    reply = h.query(5, h.now_s() + 60)
    assert (reply.vend_state, reply.code, reply.dispense) == (
        VendState.NOT_SEEN,
        AckCode.ACCEPTED,
        None,
    )
    assert h.device.log_entry(5) is None
    assert single_ack(h.vend(5, deadline=h.now_s() + 60)).code is AckCode.ACCEPTED


def test_status_query_at_or_below_the_floor_is_forgotten() -> None:
    """A query about an id not in the log with deadline at or below the floor answers FORGOTTEN."""
    h = started(log_capacity=1, log_grace_s=0)
    first_deadline = h.now_s() + 10
    vend_and_settle(h, 1, deadline=first_deadline)
    h.advance(11_000)
    h.vend(2)
    assert h.device.log_floor == first_deadline
    assert h.query(1, first_deadline).vend_state is VendState.FORGOTTEN
    assert h.query(999, first_deadline - 100).vend_state is VendState.FORGOTTEN
    assert h.device.log_entry(999) is None


# --- configuration, slots, telemetry ----------------------------------------------------------


def test_config_stale_invalid_applied_and_durable_across_reboot() -> None:
    """Config versions must grow and name real slots; an applied planogram survives a reboot."""
    h = Harness()
    h.connect()

    def status(version: int, *slots: int) -> tuple[ConfigStatus, int]:
        (ack,) = only(h.configure(version, [slot_config(s) for s in slots]), ConfigAck)
        assert ack.version == version
        return ack.status, ack.current_version

    assert status(2, 1, 2) == (ConfigStatus.APPLIED, 2)
    assert status(2, 1) == (ConfigStatus.STALE, 2)
    assert status(1, 1) == (ConfigStatus.STALE, 2)
    assert status(3, 1, 200) == (ConfigStatus.INVALID, 2)
    assert set(h.device.slots) == {1, 2}
    assert status(4, 1, 2, 60) == (ConfigStatus.APPLIED, 4)

    h.reboot()
    (hello,) = only(h.connect(), Hello)
    assert hello.config_version == 4
    assert set(h.device.slots) == {1, 2, 60}
    assert status(4, 1) == (ConfigStatus.STALE, 4)
    assert single_ack(h.vend(1, slot=60)).code is AckCode.ACCEPTED


def test_repeated_jams_take_slot_out_of_service_until_restock() -> None:
    """After slot_fault_limit jams in a row the slot is disabled; restock() puts it back."""
    h = started()
    limit = h.settings.slot_fault_limit
    for vend_id in range(1, limit + 1):
        assert in_service(h, 1)
        assert single_ack(h.vend(vend_id)).code is AckCode.ACCEPTED
        h.finish(vend_id, JAMMED)
    assert not in_service(h, 1)
    assert single_ack(h.vend(100)).code is AckCode.SLOT_DISABLED
    h.device.restock(1, 5)
    assert in_service(h, 1)
    assert single_ack(h.vend(101)).code is AckCode.ACCEPTED


def test_a_slot_out_of_service_stays_out_across_a_reboot() -> None:
    """A slot disabled by repeated jams is still disabled after a reboot, until restock()."""
    h = started()
    for vend_id in range(1, h.settings.slot_fault_limit + 1):
        h.vend(vend_id)
        h.finish(vend_id, JAMMED)
    h.reboot()
    h.connect()
    assert not in_service(h, 1)
    assert single_ack(h.vend(100)).code is AckCode.SLOT_DISABLED
    h.device.restock(1, 5)
    h.reboot()
    h.connect()
    assert in_service(h, 1)
    assert single_ack(h.vend(101)).code is AckCode.ACCEPTED


def test_a_success_resets_the_consecutive_failure_count() -> None:
    """Failures separated by a successful dispense do not take the slot out of service."""
    h = started()
    reports = [JAMMED, JAMMED, DROPPED, JAMMED, NO_DROP]
    for vend_id, report in enumerate(reports, start=1):
        h.vend(vend_id)
        h.finish(vend_id, report)
    assert in_service(h, 1)
    assert h.device.slots[1].consecutive_failures == 2


def test_jams_are_reported_as_ejc_events_in_telemetry() -> None:
    """A jam records an EJC event for its slot that goes out with the next Telemetry."""
    h = started()
    h.vend(1, slot=2)
    h.advance(1_000)
    h.finish(1, JAMMED)
    frames = h.tick(h.settings.heartbeat_ms)
    (telemetry,) = only(frames, Telemetry)
    assert [(e.code, e.slot, e.active) for e in telemetry.events] == [("EJC", 2, True)]
    assert only(h.tick(h.settings.heartbeat_ms), Telemetry) == []  # sent once

    for vend_id in (2, 3):
        h.vend(vend_id, slot=2)
        h.finish(vend_id, JAMMED)
    reading = Reading(dt_ms=0, kind=ReadingKind.TEMPERATURE, slot=None, value=450)
    (telemetry,) = only(h.run(h.device.report([reading], h.raw_ms)), Telemetry)
    assert telemetry.readings == (reading,)
    assert [e.code for e in telemetry.events] == ["EJC", "EJC", "XSD"]


# --- the invariant, under random delivery --------------------------------------------------------

REPORTS = st.builds(
    MotorReport,
    dropped=st.booleans(),
    motor_ms=st.integers(0, 60_000),
    retries=st.integers(0, 4),
    fault=st.none() | st.sampled_from(FailReason),
)


class VendChaos(RuleBasedStateMachine):
    """Random delivery, loss, duplication, motor reports, reboots and acks against one machine."""

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(settings=DeviceSettings(log_capacity=2, log_grace_s=1))
        self.h.start()
        self.terms: dict[int, Vend] = {}
        self.payloads: list[bytes] = []
        #: vend id -> how many motor starts there had been when it was first refused finally
        self.refused_at: dict[int, int] = {}

    def _vend(self, vend_id: int, attempt: int, lifetime_s: int) -> bytes:
        if vend_id not in self.terms:
            slot = 9 if vend_id == 5 else 1 + vend_id % 3
            self.terms[vend_id] = self.h.vend_frame(
                vend_id, slot=slot, deadline=self.h.now_s() + lifetime_s
            )
        return encode(dataclasses.replace(self.terms[vend_id], attempt=attempt), KEY)

    def _record(self, frames: Iterable[object]) -> None:
        for frame in frames:
            if isinstance(frame, VendAck) and frame.code.is_final_refusal:
                self.refused_at.setdefault(frame.vend_id, len(self.h.motors))

    @rule(
        vend_id=st.integers(1, 5),
        attempt=st.integers(1, 3),
        lifetime_s=st.sampled_from([2, 600]),
    )
    def deliver(self, vend_id: int, attempt: int, lifetime_s: int) -> None:
        """Deliver attempt ``attempt`` of a vend (its terms are fixed by its first delivery)."""
        payload = self._vend(vend_id, attempt, lifetime_s)
        self.payloads.append(payload)
        self._record([*self.h.deliver(payload), *self.h.lost])

    @rule(index=st.integers(0, 1_000))
    def duplicate(self, index: int) -> None:
        """Redeliver the exact bytes of an earlier Vend, as a broker may."""
        if self.payloads:
            self._record([*self.h.deliver(self.payloads[index % len(self.payloads)]), *self.h.lost])

    @rule(kind=st.sampled_from([VendAck, VendResult]), count=st.integers(1, 3))
    def drop(self, kind: type[VendAck | VendResult], count: int) -> None:
        """Lose the next few uplink frames of one kind."""
        self.h.lose_next(kind, count)

    @rule(report=REPORTS)
    def motor_finishes(self, report: MotorReport) -> None:
        """Stop the motor of the vend being dispensed."""
        if self.h.device.active_vend is not None:
            self._record(self.h.finish(self.h.device.active_vend, report))

    @rule(index=st.integers(0, 1_000), report=REPORTS)
    def stray_motor_report(self, index: int, report: MotorReport) -> None:
        """Report a motor stop again, or one from before a reboot."""
        if self.h.motors:
            self.h.finish(self.h.motors[index % len(self.h.motors)].vend_id, report)

    @rule(sync=st.booleans())
    def reboot(self, sync: bool) -> None:
        """Power-cycle the machine over its store and reconnect."""
        self.h.reboot()
        self.h.connect(sync=sync)

    @rule()
    def reconnect(self) -> None:
        """Drop and re-open the MQTT connection, syncing the clock again."""
        self.h.device.disconnected()
        self.h.connect()

    @rule(back_s=st.sampled_from([60, 3_600]))
    def clock_steps_back(self, back_s: int) -> None:
        """Step the gateway's clock back and let the machine resync to it on reconnect."""
        self.h.wall_ms -= back_s * 1000
        self.reconnect()

    @rule(ms=st.sampled_from([500, 2_000, 10_000, 60_000]))
    def tick(self, ms: int) -> None:
        """Let time pass and tick the machine."""
        self.h.tick(ms)

    @rule(vend_id=st.integers(1, 5))
    def result_ack(self, vend_id: int) -> None:
        """Acknowledge the result of a vend, whether or not there is one."""
        self.h.ack_result(vend_id)

    @rule()
    def gateway_catches_up(self) -> None:
        """Acknowledge every result the gateway has received so far."""
        for vend_id in {f.vend_id for f in only(self.h.uplink, VendResult)}:
            self.h.ack_result(vend_id)

    @rule(slot=st.integers(1, 3))
    def restock(self, slot: int) -> None:
        """Refill a slot, putting it back in service."""
        self.h.device.restock(slot, 5)

    @invariant()
    def motor_turns_at_most_once_per_vend(self) -> None:
        """No vend id ever starts the motor twice, across every reboot."""
        turns = Counter(m.vend_id for m in self.h.motors)
        assert all(n == 1 for n in turns.values()), turns
        for vend_id, before in self.refused_at.items():
            later = [m for m in self.h.motors[before:] if m.vend_id == vend_id]
            assert not later, f"vend {vend_id} started after a final refusal"

    @invariant()
    def one_outcome_per_vend(self) -> None:
        """Every VendResult ever sent for one vend id carries the same Dispense."""
        for vend_id, dispenses in self.h.results.items():
            assert len(set(dispenses)) == 1, (vend_id, dispenses)
            assert self.h.motor_count(vend_id) == 1 or all(
                d.reason is FailReason.POWER_LOSS for d in dispenses
            )


def test_random_delivery_never_dispenses_twice() -> None:
    """Under random loss, duplication, reboots and ticks each vend turns the motor at most once."""
    run_state_machine_as_test(
        VendChaos,
        settings=settings(max_examples=150, stateful_step_count=40, deadline=None),
    )


@settings(max_examples=200, deadline=None)
@given(
    plan=st.lists(
        st.tuples(
            st.integers(1, 8),  # vend id
            st.sampled_from([2, 30, 600]),  # lifetime of its first delivery, in seconds
            st.integers(0, 120),  # seconds that pass afterwards
            st.sampled_from([0, 0, 20, 45, 600]),  # seconds the machine's clock first steps back
            st.sampled_from(["now", "later", "all"]),  # which results the gateway acks
        ),
        max_size=30,
    )
)
@example(  # 2 is evicted while 1 is unsettled; 1 settles; the clock steps back; 2 replays
    plan=[
        (1, 2, 0, 0, "later"),
        (2, 30, 60, 0, "now"),
        (3, 600, 0, 0, "now"),
        (4, 600, 0, 0, "now"),
        (5, 600, 0, 0, "all"),
        (2, 30, 0, 45, "now"),
    ]
)
def test_replays_across_eviction_and_clock_steps_never_dispense_twice(
    plan: list[tuple[int, int, int, int, str]],
) -> None:
    """Replaying any vend after evictions and clock steps back never starts its motor twice."""
    h = started(log_capacity=3, log_grace_s=1)
    terms: dict[int, Vend] = {}
    unacked: set[int] = set()
    for vend_id, lifetime_s, pause_s, back_s, ack in plan:
        if back_s:
            step_clock(h, h.device.clock_ms(h.raw_ms) - back_s * 1000)
        vend = terms.setdefault(
            vend_id,
            h.vend_frame(vend_id, slot=1 + vend_id % 3, deadline=h.now_s() + lifetime_s),
        )
        frames = h.send(dataclasses.replace(vend, attempt=1 + len(h.uplink) % 5))
        if h.device.active_vend is not None:
            frames += h.finish(vend_id)
        results = {r.vend_id for r in only(frames, VendResult)}
        if ack == "later":
            unacked |= results
        else:
            for done in sorted(results | unacked if ack == "all" else results):
                h.ack_result(done)
            unacked -= results if ack == "now" else unacked
        h.device.restock(1 + vend_id % 3, 5)
        h.advance(pause_s * 1000)
    assert all(n == 1 for n in Counter(m.vend_id for m in h.motors).values())


# --- review follow-ups: mismatched queries, presence numbering, durable stock -----------------


def test_status_query_with_another_deadline_is_a_mismatch_that_settles_nothing() -> None:
    """A query whose deadline differs from the logged vend's gets MISMATCH/CONFLICT, no result."""
    h = started()
    vend = h.vend_frame(1)
    h.send(vend)
    h.finish(1)
    reply = h.query(1, vend.deadline + 1)
    assert reply.vend_state is VendState.MISMATCH
    assert reply.code is AckCode.CONFLICT
    assert reply.dispense is None
    assert h.query(1, vend.deadline).vend_state is VendState.DONE


def test_will_uses_seq_zero_and_clean_disconnect_publishes_offline() -> None:
    """The will is Presence(offline, seq 0) for the next session; disconnecting() publishes one."""
    h = Harness()
    will = decode(h.device.will(), h.key, direction=Direction.UP)
    assert isinstance(will, Presence)
    assert (will.seq, will.session, will.online) == (0, 1, False)
    (online,) = only(h.connect(), Presence)
    assert (online.session, online.online) == (1, True)
    (offline,) = only(h.run(h.device.disconnecting()), Presence)
    assert (offline.session, offline.online) == (1, False)
    assert offline.seq > online.seq
    assert h.tick(h.settings.heartbeat_ms) == []


def test_stock_and_failure_count_survive_a_reboot() -> None:
    """Stock counts down durably and the failures-in-a-row counter is kept across reboots."""
    h = started()
    h.vend(1)
    h.finish(1)
    h.vend(2)
    h.finish(2, JAMMED)
    h.reboot()
    h.connect()
    assert h.device.slots[1].stock == 4
    assert h.device.slots[1].consecutive_failures == 1


def test_an_unsynced_refusal_also_asks_for_the_time_at_most_every_interval() -> None:
    """A CLOCK_UNSYNCED refusal comes with a time request, rate-limited, and Time then works."""
    h = Harness()
    h.connect(sync=False)
    h.configure()
    h.advance(h.settings.time_request_interval_ms)
    frames = h.vend(1)
    assert single_ack(frames).code is AckCode.CLOCK_UNSYNCED
    (request,) = only(frames, Heartbeat)
    assert request.want_time
    assert only(h.vend(2), Heartbeat) == []  # within the interval: no second request
    h.answer_time(request)
    assert synced(h)
    assert single_ack(h.vend(1, attempt=2)).code is AckCode.ACCEPTED
