"""Machine presence: the pure tracker (ordering, sessions, timeouts) and saving it to PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.config import SessionsConfig
from gateway.errors import DatabaseUnavailableError
from gateway.sessions import (
    TRANSITIONS,
    Connected,
    Cue,
    Disconnected,
    EndReason,
    HeartbeatGap,
    Ignored,
    MachinePresence,
    Numbered,
    Phase,
    PresenceChanges,
    PresenceEvent,
    PresenceService,
    PresenceTracker,
    SessionMetrics,
    SessionRecord,
)
from gateway.store import db, machines
from gateway.store import sessions as store
from protocols.codec import FrameKey, decode
from protocols.device import Device, MemoryStore, Publish
from protocols.frames import Direction, Heartbeat, Hello, Presence, Telemetry, UplinkFrame

START = 1_700_000_000.0
M = "VM-1"


# --- helpers ---------------------------------------------------------------------------------


@dataclass
class FakeClock:
    """Unix seconds that move only when a test says so."""

    now: float = START

    def __call__(self) -> float:
        """Return the current fake time."""
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock forward and return the new time."""
        self.now += seconds
        return self.now


def _ids() -> Iterator[uuid.UUID]:
    return (uuid.UUID(int=n) for n in itertools.count(1))


def _tracker(clock: FakeClock) -> PresenceTracker:
    return PresenceTracker(clock, heartbeat_timeout_s=75.0, new_id=_ids().__next__)


def online(boot: int, seq: int, session: int) -> Presence:
    return Presence(boot=boot, seq=seq, session=session, online=True)


def goodbye(boot: int, seq: int, session: int) -> Presence:
    return Presence(boot=boot, seq=seq, session=session, online=False)


def will(boot: int, session: int) -> Presence:
    return Presence(boot=boot, seq=0, session=session, online=False)


def hello(boot: int, seq: int, firmware: str = "fw/1") -> Hello:
    return Hello(boot=boot, seq=seq, firmware=firmware, config_version=0, clock_ms=0)


def beat(boot: int, seq: int, rssi: int = -70) -> Heartbeat:
    return Heartbeat(boot=boot, seq=seq, clock_ms=0, rssi=rssi, uptime_s=0, want_time=False)


def only(events: Sequence[PresenceEvent], kind: type[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


# --- the pure tracker ------------------------------------------------------------------------


def test_transition_table_covers_every_phase_and_cue() -> None:
    """Every (phase, cue) pair has a step, and only ONLINE steps end a session."""
    assert set(TRANSITIONS) == set(itertools.product(Phase, Cue))
    for (phase, _cue), step in TRANSITIONS.items():
        if step.ends is not None:
            assert phase is Phase.ONLINE


def test_presence_hello_heartbeats_then_will() -> None:
    """A connect opens one session numbered by its Presence; the will ends it as last_will."""
    clock = FakeClock()
    t = _tracker(clock)
    (opened,) = t.observe(M, online(1, 1, 1))
    assert isinstance(opened, Connected)
    assert opened.session.session == 1
    assert t.observe(M, hello(1, 2, "fw/2")) == ()
    clock.advance(30)
    assert t.observe(M, beat(1, 3, rssi=-60)) == ()
    clock.advance(31)
    assert t.observe(M, beat(1, 4, rssi=-61)) == (HeartbeatGap(M, 31.0),)
    view = t.get(M)
    assert view is not None
    assert (view.online, view.firmware, view.rssi, view.boot, view.session) == (
        True,
        "fw/2",
        -61,
        1,
        1,
    )
    assert view.last_seen == view.last_heartbeat_at == START + 61
    assert t.online_count() == 1
    clock.advance(40)
    (closed,) = t.observe(M, will(1, 1))
    assert isinstance(closed, Disconnected)
    assert closed.reason is EndReason.LAST_WILL
    assert closed.session.session_id == opened.session.session_id
    assert closed.session.disconnected_at == START + 101
    view = t.get(M)
    assert view is not None
    assert not view.online
    assert view.last_seen == START + 61  # a will is not a sign of life
    assert view.session_id == opened.session.session_id  # the last session stays named
    assert t.online_count() == 0
    assert not t.is_online(M)


def test_clean_goodbye_ends_the_session_as_clean() -> None:
    """Presence(online=False) with a real seq is a clean disconnect; its will is then stale."""
    t = _tracker(FakeClock())
    t.observe(M, online(1, 1, 1))
    t.observe(M, hello(1, 2))
    (closed,) = t.observe(M, goodbye(1, 3, 1))
    assert isinstance(closed, Disconnected)
    assert closed.reason is EndReason.CLEAN
    # The broker keeps the will of the same session; it must not end anything again.
    assert t.observe(M, will(1, 1)) == (Ignored(M, "Presence"),)


def test_replayed_will_of_an_older_session_is_ignored() -> None:
    """A retained will of session 1 delivered after session 2 opened leaves the machine online."""
    t = _tracker(FakeClock())
    t.observe(M, online(1, 1, 1))
    t.observe(M, hello(1, 2))
    events = t.observe(M, online(1, 5, 2))  # reconnected; the will of session 1 is late
    assert [type(e) for e in events] == [Disconnected, Connected]
    assert events[0].reason is EndReason.SUPERSEDED  # type: ignore[union-attr]  # checked above
    assert t.observe(M, will(1, 1)) == (Ignored(M, "Presence"),)
    assert t.is_online(M)
    open_session = t.open_session(M)
    assert open_session is not None
    assert open_session.session == 2


def test_hello_overtaking_presence_gives_one_session_with_the_number() -> None:
    """A Hello that arrives before its Presence opens the session; the Presence only numbers it."""
    t = _tracker(FakeClock())
    (opened,) = t.observe(M, hello(1, 2))
    assert isinstance(opened, Connected)
    assert opened.session.session is None
    (numbered,) = t.observe(M, online(1, 1, 1))
    assert isinstance(numbered, Numbered)
    open_session = t.open_session(M)
    assert open_session is not None
    assert (open_session.session_id, open_session.session) == (opened.session.session_id, 1)
    assert numbered.session == open_session
    view = t.get(M)
    assert view is not None
    assert view.session == 1
    machines_changed, sessions_changed = t.take_changes()
    assert [s.session for s in sessions_changed] == [1]
    assert [m.session for m in machines_changed] == [1]
    (closed,) = t.observe(M, will(1, 1))
    assert isinstance(closed, Disconnected)
    assert closed.session.session_id == opened.session.session_id


def test_reboot_supersedes_the_open_session() -> None:
    """A frame from a newer boot ends the open session as superseded and opens another."""
    t = _tracker(FakeClock())
    t.observe(M, online(1, 1, 3))
    t.observe(M, beat(1, 9))
    events = t.observe(M, hello(2, 2))  # the Hello of boot 2 overtook its Presence
    closed, opened = events
    assert isinstance(closed, Disconnected)
    assert closed.reason is EndReason.SUPERSEDED
    assert isinstance(opened, Connected)
    assert (opened.session.boot, opened.session.session) == (2, None)
    # Boot 1 is over: its late frames, even its will, are stale before boot 2 has a number.
    assert t.observe(M, beat(1, 10)) == (Ignored(M, "Heartbeat"),)
    assert t.observe(M, will(1, 3)) == (Ignored(M, "Presence"),)
    assert only(t.observe(M, online(2, 1, 1)), Numbered)  # adopted, not a new session
    open_session = t.open_session(M)
    assert open_session is not None
    assert (open_session.boot, open_session.session) == (2, 1)


def test_presence_of_a_newer_boot_supersedes() -> None:
    """Presence(online) of a newer boot ends the open session as superseded."""
    t = _tracker(FakeClock())
    t.observe(M, online(4, 1, 2))
    closed, opened = t.observe(M, online(5, 1, 1))
    assert isinstance(closed, Disconnected)
    assert closed.reason is EndReason.SUPERSEDED
    assert isinstance(opened, Connected)
    assert (opened.session.boot, opened.session.session) == (5, 1)


def test_heartbeat_timeout_and_recovery() -> None:
    """One lost heartbeat is not offline; 75 s of silence is, and the next frame reopens."""
    clock = FakeClock()
    t = _tracker(clock)
    t.observe(M, online(1, 1, 1))
    t.observe(M, beat(1, 2))
    last = clock.now
    clock.advance(61)  # one heartbeat lost
    assert t.expire(clock.now) == []
    assert t.observe(M, beat(1, 4)) == (HeartbeatGap(M, 61.0),)
    last = clock.now
    clock.advance(74)
    assert t.expire(clock.now) == []
    clock.advance(1)
    (closed,) = t.expire(clock.now)
    assert isinstance(closed, Disconnected)
    assert closed.reason is EndReason.HEARTBEAT_TIMEOUT
    assert closed.session.disconnected_at == last  # dated at the last frame seen
    assert t.expire(clock.now + 100) == []
    # The retained Presence replayed on a resubscribe says nothing new: still offline.
    assert t.observe(M, online(1, 1, 1)) == (Ignored(M, "Presence"),)
    assert not t.is_online(M)
    (opened,) = t.observe(M, beat(1, 7))
    assert isinstance(opened, Connected)
    assert opened.session.session_id != closed.session.session_id
    assert t.is_online(M)


def test_will_for_a_newer_session_ends_the_open_one() -> None:
    """A will of a session never seen open ends the open one; that session's Presence is stale."""
    t = _tracker(FakeClock())
    t.observe(M, online(1, 1, 1))
    (closed,) = t.observe(M, will(1, 2))
    assert isinstance(closed, Disconnected)
    assert closed.reason is EndReason.LAST_WILL
    assert t.observe(M, online(1, 6, 2)) == (Ignored(M, "Presence"),)
    assert not t.is_online(M)
    (opened,) = t.observe(M, online(1, 9, 3))
    assert isinstance(opened, Connected)


def test_duplicates_are_ignored() -> None:
    """A QoS 1 redelivery of a frame changes nothing and is counted as stale."""
    clock = FakeClock()
    t = _tracker(clock)
    t.observe(M, online(1, 1, 1))
    t.observe(M, beat(1, 2))
    t.take_changes()
    clock.advance(5)
    assert t.observe(M, beat(1, 2)) == (Ignored(M, "Heartbeat"),)
    assert t.observe(M, online(1, 1, 1)) == (Ignored(M, "Presence"),)
    assert t.take_changes() == ((), ())


def test_goodbye_of_an_earlier_connection_does_not_end_the_new_one() -> None:
    """A late clean goodbye numbered before the frame that opened the session changes nothing."""
    clock = FakeClock()
    t = _tracker(clock)
    t.observe(M, online(1, 1, 3))
    clock.advance(80)
    t.expire(clock.now)
    # Session 3 closed cleanly at seq 40 and session 4 began at 41, but the Hello came first.
    (opened,) = t.observe(M, hello(1, 42))
    assert isinstance(opened, Connected)
    assert t.observe(M, goodbye(1, 40, 3)) == ()
    assert [type(e) for e in t.observe(M, online(1, 41, 4))] == [Numbered]
    open_session = t.open_session(M)
    assert open_session is not None
    assert (open_session.session_id, open_session.session) == (opened.session.session_id, 4)


def test_load_keeps_open_sessions_and_delays_their_timeout() -> None:
    """Loaded online machines keep their session; silence counts from the load at the earliest."""
    clock = FakeClock()
    sid = uuid.uuid4()
    t = _tracker(clock)
    loaded = t.load(
        [
            MachinePresence(  # online, but last seen long before this gateway started
                M,
                online=True,
                last_seen=START - 500,
                firmware="fw",
                boot=7,
                session=2,
                session_id=sid,
                connected_at=START - 900,
                rssi=-80,
            ),
            MachinePresence(
                "VM-2", last_seen=START - 50, boot=3, session=1, session_id=uuid.uuid4()
            ),
        ]
    )
    assert loaded == 2
    assert t.online_count() == 1
    assert t.is_online(M)
    assert not t.is_online("VM-2")
    assert t.expire(clock.now) == []
    assert t.observe(M, online(7, 1, 2)) == (Ignored(M, "Presence"),)  # the retained replay
    assert t.observe(M, will(7, 1)) == (Ignored(M, "Presence"),)
    assert t.observe("VM-2", online(3, 1, 1)) == (Ignored("VM-2", "Presence"),)
    clock.advance(75)
    (closed,) = t.expire(clock.now)
    assert isinstance(closed, Disconnected)
    assert closed.session.session_id == sid
    assert closed.session.disconnected_at == START - 500
    assert t.take_changes().machines == (t.get(M),)


def test_changes_hold_the_latest_state_and_survive_a_failed_save() -> None:
    """take_changes returns each machine and session once, and restore never undoes newer state."""
    clock = FakeClock()
    t = _tracker(clock)
    t.observe(M, hello(1, 2))
    t.observe(M, online(1, 1, 1))
    t.observe("VM-2", online(1, 1, 1))
    assert (t.pending, [t.pending_since]) == (4, [START])  # a list: mypy keeps no narrowing
    taken = t.take_changes()
    assert sorted(m.machine_id for m in taken.machines) == [M, "VM-2"]
    assert len(taken.sessions) == 2
    assert (t.pending, t.pending_since) == (0, None)
    clock.advance(10)
    (closed,) = t.observe(M, will(1, 1))
    t.restore(taken)  # the save failed; the will came meanwhile
    assert t.pending_since == START
    again = t.take_changes()
    by_id = {s.session_id: s for s in again.sessions}
    assert isinstance(closed, Disconnected)
    assert by_id[closed.session.session_id].end_reason is EndReason.LAST_WILL
    assert {m.machine_id: m.online for m in again.machines} == {M: False, "VM-2": True}


def test_refresh_postpones_the_timeout() -> None:
    """A machine another gateway heard recently is not timed out."""
    clock = FakeClock()
    t = _tracker(clock)
    t.observe(M, online(1, 1, 1))
    clock.advance(80)
    assert t.due(clock.now) == [M]
    assert t.refresh(M, START + 60)
    assert not t.refresh(M, START + 60)
    assert t.due(clock.now) == []
    assert t.expire(clock.now, [M]) == []
    view = t.get(M)
    assert view is not None
    assert view.last_seen == START + 60


def telemetry(boot: int, seq: int) -> Telemetry:
    return Telemetry(boot=boot, seq=seq, t0_ms=0, readings=(), events=())


def test_common_frames_skip_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh Telemetry and Heartbeat frames of an online machine never reach the table."""
    clock = FakeClock()
    t = _tracker(clock)
    t.observe(M, online(1, 1, 1))
    t.observe(M, hello(1, 2, "fw/3"))
    t.take_changes()

    def no_table(*_: object) -> Cue:
        raise AssertionError("the table was consulted")

    monkeypatch.setattr("gateway.sessions._cue", no_table)
    clock.advance(1)
    assert t.observe(M, telemetry(1, 3)) == ()
    clock.advance(30)
    assert t.observe(M, beat(1, 4, rssi=-55)) == ()
    clock.advance(30)
    assert t.observe(M, beat(1, 6, rssi=-56)) == (HeartbeatGap(M, 30.0),)
    view = t.get(M)
    assert view is not None
    assert (view.online, view.boot, view.session, view.firmware, view.rssi) == (
        True,
        1,
        1,
        "fw/3",
        -56,
    )
    assert view.last_seen == view.last_heartbeat_at == START + 61
    assert t.take_changes() == ((view,), ())
    monkeypatch.undo()
    assert t.observe(M, telemetry(1, 5)) == (Ignored(M, "Telemetry"),)  # stale: via the table


def test_views_are_snapshots_and_a_machine_is_marked_once_per_take() -> None:
    """A view read earlier never changes; many frames leave one pending change per machine."""
    clock = FakeClock()
    t = _tracker(clock)
    t.observe(M, online(1, 1, 1))
    t.take_changes()
    before = t.get(M)
    for seq in range(2, 102):
        clock.advance(1)
        t.observe(M, beat(1, seq, rssi=-seq) if seq % 10 == 0 else telemetry(1, seq))
    assert before is not None
    assert before.last_seen == START
    assert (t.pending, t.pending_since) == (1, START + 1)
    (taken,), sessions = t.take_changes()
    assert sessions == ()
    assert taken == t.get(M)
    assert (taken.last_seen, taken.last_heartbeat_at, taken.rssi) == (START + 100, START + 99, -100)
    assert t.observe(M, telemetry(1, 200)) == ()  # the clock did not move: nothing changed
    assert t.pending == 0
    clock.advance(1)
    t.observe(M, telemetry(1, 201))
    assert t.take_changes().machines == (t.get(M),)
    failed = PresenceChanges((taken,), ())
    t.restore(failed)
    clock.advance(1)
    t.observe(M, telemetry(1, 202))
    assert t.pending == 1
    assert t.take_changes().machines == (t.get(M),)


# --- property: the fast path is the table --------------------------------------------------------

MACHINES = (M, "VM-2")
_LOADED = st.builds(
    MachinePresence,
    machine_id=st.sampled_from(MACHINES),
    online=st.booleans(),
    last_seen=st.sampled_from([None, START - 500, START - 10, START + 10]),
    firmware=st.sampled_from([None, "fw/1"]),
    boot=st.sampled_from([None, 1, 2]),
    session=st.sampled_from([None, 1, 2]),
    session_id=st.sampled_from([None, uuid.UUID(int=1000), uuid.UUID(int=1001)]),
    connected_at=st.sampled_from([None, START - 900]),
    rssi=st.sampled_from([None, -70]),
)
_KINDS = ["telemetry"] * 4 + ["heartbeat"] * 3 + ["hello", "online", "offline", "will"]


def _frame(
    data: st.DataObject, machine: str, boots: dict[str, int], seqs: dict[str, int]
) -> UplinkFrame:
    boot = max(1, boots[machine] + data.draw(st.sampled_from([0, 0, 0, 0, 0, 1, -1])))
    if boot > boots[machine]:
        boots[machine], seqs[machine] = boot, 0
    if data.draw(st.integers(0, 3)):  # mostly the next frame, else a late or duplicate one
        seq = seqs[machine] + 1
    else:
        seq = data.draw(st.integers(0, seqs[machine] + 2))
    seqs[machine] = max(seqs[machine], seq)
    session = data.draw(st.integers(1, 3))
    kind = data.draw(st.sampled_from(_KINDS))
    if kind == "telemetry":
        return telemetry(boot, seq)
    if kind == "heartbeat":
        return beat(boot, seq, rssi=data.draw(st.sampled_from([-60, -70])))
    if kind == "hello":
        return hello(boot, seq, data.draw(st.sampled_from(["fw/1", "fw/2"])))
    if kind == "will":
        return will(boot, session)
    return Presence(boot=boot, seq=seq, session=session, online=kind == "online")


def _assert_same(fast: PresenceTracker, table: PresenceTracker) -> None:
    for machine in MACHINES:
        assert fast._tracks.get(machine) == table._tracks.get(machine)  # hidden state too
        assert fast.get(machine) == table.get(machine)
        assert fast.open_session(machine) == table.open_session(machine)
        assert fast.is_online(machine) == table.is_online(machine)
    assert fast.online_count() == table.online_count()
    assert (fast.pending, fast.pending_since) == (table.pending, table.pending_since)


def _but_last_seen(view: MachinePresence | None) -> MachinePresence | None:
    return None if view is None else replace(view, last_seen=None)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_path_agrees_with_the_table(data: st.DataObject) -> None:
    """With and without the fast path, any frames give the same events, views and changes."""
    clock = FakeClock()
    fast = _tracker(clock)
    table = PresenceTracker(
        clock, heartbeat_timeout_s=75.0, new_id=_ids().__next__, fast_path=False
    )
    assert fast._fast_path
    assert not table._fast_path
    rows = data.draw(st.lists(_LOADED, max_size=2, unique_by=lambda row: row.machine_id))
    assert fast.load(rows) == table.load(rows)
    saved = {m: view for m in MACHINES if (view := fast.get(m)) is not None}
    boots = {m: next((r.boot or 1 for r in rows if r.machine_id == m), 1) for m in MACHINES}
    seqs = dict.fromkeys(MACHINES, 0)
    for _ in range(data.draw(st.integers(1, 60))):
        op = data.draw(st.sampled_from(["frame"] * 8 + ["clock", "expire", "take", "refresh"]))
        machine = data.draw(st.sampled_from(MACHINES))
        if op == "frame":
            frame = _frame(data, machine, boots, seqs)
            assert fast.observe(machine, frame) == table.observe(machine, frame)
        elif op == "clock":
            clock.advance(data.draw(st.sampled_from([0.0, 1.0, 30.0, 80.0])))
        elif op == "expire":
            assert fast.expire(clock.now) == table.expire(clock.now)
        elif op == "take":
            changes = fast.take_changes()
            assert changes == table.take_changes()
            if data.draw(st.booleans()):  # a failed save
                fast.restore(changes)
                table.restore(changes)
            else:
                saved.update((view.machine_id, view) for view in changes.machines)
        else:
            seen_at = clock.now - data.draw(st.sampled_from([0.0, 10.0, 100.0]))
            assert fast.refresh(machine, seen_at) == table.refresh(machine, seen_at)
        _assert_same(fast, table)
    changes = fast.take_changes()
    assert changes == table.take_changes()
    saved.update((view.machine_id, view) for view in changes.machines)
    # Every change was saved, except a last_seen moved by refresh: the database had it first.
    for machine in MACHINES:
        assert _but_last_seen(saved.get(machine)) == _but_last_seen(fast.get(machine))


# --- property: any interleaving of a reference machine's frames ------------------------------

KEY = FrameKey(bytes(range(32)))
OPS = st.sampled_from(["connect", "beat", "beat", "beat", "goodbye", "drop", "reboot"])


@dataclass
class _Machine:
    """Drives the reference Device; ``sent`` is what the broker delivers, in its order."""

    store: MemoryStore = field(default_factory=MemoryStore)
    now_ms: int = 1_000_000
    sent: list[UplinkFrame] = field(default_factory=list)
    connects: list[tuple[int, int]] = field(default_factory=list)  # (boot, session) opened
    ends: list[EndReason] = field(default_factory=list)
    device: Device = field(init=False)
    will: bytes | None = None
    session: int = 0

    def __post_init__(self) -> None:
        self.device = Device("vm-prop", KEY, self.store, now_ms=self.now_ms)

    def _emit(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Publish) and isinstance(action.frame, UplinkFrame):
                self.sent.append(action.frame)

    def _lose_connection(self) -> None:
        assert self.will is not None
        frame = decode(self.will, KEY, direction=Direction.UP)
        assert isinstance(frame, UplinkFrame)
        self.sent.append(frame)
        self.device.disconnected()
        self.will = None
        self.ends.append(EndReason.LAST_WILL)

    def run(self, op: str) -> None:
        self.now_ms += 1_000
        if op == "connect" and self.will is None:
            self.will = self.device.will()
            self._emit(self.device.connected(self.now_ms))
            self.session += 1
            self.connects.append((self.device.boot, self.session))
        elif op == "beat" and self.will is not None:
            self.now_ms += 30_000
            self._emit(self.device.tick(self.now_ms))
        elif op == "goodbye" and self.will is not None:
            self._emit(self.device.disconnecting())
            self.will = None
            self.ends.append(EndReason.CLEAN)
        elif op == "drop" and self.will is not None:
            self._lose_connection()
        elif op == "reboot":
            if self.will is not None:
                self._lose_connection()
            self.device = Device("vm-prop", KEY, self.store, now_ms=self.now_ms)
            self.session = 0


def _check_invariants(t: PresenceTracker, records: dict[uuid.UUID, SessionRecord]) -> None:
    """At most one open session, no overlap, and online exactly when a session is open."""
    mine = sorted(
        (r for r in records.values() if r.machine_id == M),
        key=lambda r: (r.connected_at, r.disconnected_at is None),
    )
    open_rows = [r for r in mine if r.disconnected_at is None]
    assert len(open_rows) <= 1
    for earlier, later in itertools.pairwise(mine):
        assert earlier.disconnected_at is not None
        assert earlier.disconnected_at <= later.connected_at
    view = t.get(M)
    is_open = t.open_session(M)
    assert t.is_online(M) == (is_open is not None) == bool(open_rows)
    if is_open is not None:
        assert open_rows == [is_open]
        assert view is not None
        assert view.online
        assert view.session_id == is_open.session_id
    assert t.online_count() == int(t.is_online(M))


def _feed(records: dict[uuid.UUID, SessionRecord], events: Sequence[PresenceEvent]) -> None:
    for event in events:
        if isinstance(event, Connected | Disconnected | Numbered):
            records[event.session.session_id] = event.session


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(OPS, max_size=40))
def test_in_order_delivery_mirrors_the_machine(ops: list[str]) -> None:
    """Delivered in order and never silent for long, sessions match the machine's connections."""
    machine = _Machine()
    for op in ops:
        machine.run(op)
    clock = FakeClock()
    t = _tracker(clock)
    records: dict[uuid.UUID, SessionRecord] = {}
    for frame in machine.sent:
        clock.advance(1)
        _feed(records, t.observe(M, frame))
        _check_invariants(t, records)
    sessions = sorted(records.values(), key=lambda r: r.connected_at)
    assert [(r.boot, r.session) for r in sessions] == machine.connects
    # In order, every session ends by its own will or goodbye, never superseded.
    assert [r.end_reason for r in sessions if r.end_reason is not None] == machine.ends


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), ops=st.lists(OPS, max_size=30))
def test_any_interleaving_keeps_sessions_consistent(data: st.DataObject, ops: list[str]) -> None:
    """Reordered, duplicated and delayed frames never give two open or overlapping sessions."""
    machine = _Machine()
    for op in ops:
        machine.run(op)
    frames = list(machine.sent)
    frames += data.draw(st.lists(st.sampled_from(frames), max_size=5)) if frames else []
    frames = data.draw(st.permutations(frames))
    clock = FakeClock()
    t = _tracker(clock)
    records: dict[uuid.UUID, SessionRecord] = {}
    saved: dict[uuid.UUID, SessionRecord] = {}
    for frame in frames:
        clock.advance(data.draw(st.sampled_from([0.0, 1.0, 30.0, 80.0])))
        if data.draw(st.booleans()):
            _feed(records, t.expire(clock.now))
        _feed(records, t.observe(M, frame))
        _check_invariants(t, records)
        if data.draw(st.booleans()):
            changes = t.take_changes()
            if data.draw(st.booleans()):
                t.restore(changes)  # a failed save
            else:
                saved.update((s.session_id, s) for s in changes.sessions)
    saved.update((s.session_id, s) for s in t.take_changes().sessions)
    assert saved == records  # every session change reaches the database, latest state last


# --- the service on a real PostgreSQL --------------------------------------------------------


async def _prepare(dsn: str, *machine_ids: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await db.migrate(conn)
        for machine_id in machine_ids:
            await machines.register(conn, machine_id)
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    await _prepare(database, "VM-1", "VM-2", "VM-3", "VM-4", "VM-5")
    pool = await db.create_pool(database, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


def _service(
    pool: asyncpg.Pool, clock: FakeClock | None = None, **config: float
) -> PresenceService:
    return PresenceService(
        pool,
        SessionsConfig(**config),
        SessionMetrics(CollectorRegistry()),
        clock=clock or FakeClock(_now()),
    )


def _sample(service: PresenceService, name: str, **labels: str) -> float:
    value = service._metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _now() -> float:
    # Whole seconds, so that sums and differences of test times are exact floats.
    return float(int(time.time()))


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@pytest.mark.integration
@pytest.mark.asyncio
async def test_flush_writes_machines_and_sessions_in_one_batch(database: str) -> None:
    """One flush writes every changed machine and session with a fixed number of statements."""
    await _prepare(database, "VM-1", "VM-2", "VM-3")
    queries: list[str] = []

    async def log_queries(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda q: queries.append(q.query))

    pool = await asyncpg.create_pool(database, min_size=1, max_size=2, init=log_queries)
    try:
        clock = FakeClock(_now())
        service = _service(pool, clock)
        for n, machine_id in enumerate(["VM-1", "VM-2", "VM-3"], start=1):
            service.observe(machine_id, online(4, 1, n))
            service.observe(machine_id, hello(4, 2, f"fw/{n}"))
            service.observe(machine_id, beat(4, 3, rssi=-60 - n))
        service.observe("VM-3", will(4, 3))
        service.observe("VM-unknown", online(1, 1, 1))  # not registered: skipped, not an error
        queries.clear()
        assert await service.flush()
        await asyncio.sleep(0.05)  # asyncpg hands queries to loggers with call_soon
        writes = [q for q in queries if "machine" in q]
        assert len(writes) == 3  # sessions upsert, machines lock, machines update
        assert _sample(service, "vendgate_presence_pending_changes") == 0
        async with pool.acquire() as conn:
            rows = {r["machine_id"]: r for r in await conn.fetch("SELECT * FROM machines")}
            history = await conn.fetch("SELECT * FROM machine_sessions ORDER BY machine_id")
        assert [(r["machine_id"], r["session"], r["end_reason"]) for r in history] == [
            ("VM-1", 1, None),
            ("VM-2", 2, None),
            ("VM-3", 3, "last_will"),
        ]
        vm1 = rows["VM-1"]
        assert (vm1["online"], vm1["firmware"], vm1["boot"], vm1["session"], vm1["rssi"]) == (
            True,
            "fw/1",
            4,
            1,
            -61,
        )
        assert vm1["last_seen"] == _at(clock.now)
        assert vm1["session_id"] == history[0]["session_id"]
        assert not rows["VM-3"]["online"]
        assert rows["VM-3"]["session_id"] == history[2]["session_id"]
        seen = len(queries)
        assert await service.flush()  # nothing left: no statement at all
        await asyncio.sleep(0.05)
        assert queries[seen:] == []
    finally:
        await pool.close()


@pytest.mark.integration
@pytest.mark.asyncio
async def test_restart_continues_the_open_session_and_ends_it(pool: asyncpg.Pool) -> None:
    """A second gateway loading the database continues the open session row and ends it."""
    first = _service(pool)
    first.observe(M, online(2, 1, 5))
    first.observe(M, hello(2, 2))
    assert await first.flush()
    before = first.tracker.get(M)
    assert before is not None

    clock = FakeClock(_now() + 10)
    second = _service(pool, clock)
    assert await second.load() >= 1
    assert second.tracker.is_online(M)
    loaded = second.tracker.get(M)
    assert loaded is not None
    assert (loaded.session_id, loaded.session, loaded.boot, loaded.firmware) == (
        before.session_id,
        5,
        2,
        "fw/1",
    )
    assert _sample(second, "vendgate_machines_online") == 1
    assert second.observe(M, online(2, 1, 5)) == (Ignored(M, "Presence"),)  # retained replay
    (closed,) = second.observe(M, will(2, 5))
    assert isinstance(closed, Disconnected)
    assert closed.session.session_id == before.session_id
    assert await second.flush()
    async with pool.acquire() as conn:
        history = await store.session_history(conn, M, limit=10)
        row = await store.get_machine(conn, M)
    assert len(history) == 1
    assert history[0]["session_id"] == before.session_id
    assert history[0]["end_reason"] == "last_will"
    assert history[0]["disconnected_at"] == _at(clock.now)
    assert row is not None
    assert not row["online"]
    assert row["disconnected_at"] == _at(clock.now)
    assert _sample(second, "vendgate_machine_disconnects_total", reason="last_will") == 1


class _SocketProxy:
    """A Unix-socket relay in front of PostgreSQL that a test can cut and restore."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        host, port = query["host"][0], query["port"][0]
        self._target = str(Path(host) / f".s.PGSQL.{port}")
        self._dir = Path(tempfile.mkdtemp(prefix="vgproxy-"))
        self._path = self._dir / f".s.PGSQL.{port}"
        self.dsn = urlunsplit(
            parts._replace(query=f"host={quote(str(self._dir), safe='/')}&port={port}")
        )
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._accept, path=str(self._path))

    async def cut(self) -> None:
        """Drop every connection and refuse new ones (the socket file stays, unanswered)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def close(self) -> None:
        await self.cut()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self._target)
        self._writers |= {writer, up_writer}
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer), name="test.proxy.up"),
            asyncio.create_task(self._pump(up_reader, writer), name="test.proxy.down"),
        ]
        self._pumps.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)
        self._pumps.difference_update(pumps)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)


@pytest.mark.integration
@pytest.mark.asyncio
async def test_unreachable_database_keeps_changes_for_a_later_flush(database: str) -> None:
    """While the database is unreachable flushes fail and keep changes; a later one writes them."""
    await _prepare(database, M)
    proxy = _SocketProxy(database)
    await proxy.start()
    pool = await db.create_pool(proxy.dsn, min_size=1, max_size=2)
    try:
        service = _service(pool)
        service.observe(M, online(1, 1, 1))
        assert await service.flush()
        await proxy.cut()
        service.observe(M, hello(1, 2, "fw/9"))
        service.observe(M, will(1, 1))
        assert not await service.flush()
        assert not await service.flush()
        assert _sample(service, "vendgate_presence_flush_failures_total", kind="unavailable") == 2
        assert _sample(service, "vendgate_presence_pending_changes") == 2
        await proxy.start()
        assert await service.flush()
        assert _sample(service, "vendgate_presence_pending_changes") == 0
        assert _sample(service, "vendgate_presence_flush_lag_seconds") == 0
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), 5)
        await proxy.close()
    conn = await asyncpg.connect(database)
    try:
        row = await conn.fetchrow("SELECT online, firmware FROM machines WHERE machine_id = $1", M)
        ended = await conn.fetchval("SELECT end_reason FROM machine_sessions")
    finally:
        await conn.close()
    assert row is not None
    assert (row["online"], row["firmware"], ended) == (False, "fw/9", "last_will")


@pytest.mark.integration
@pytest.mark.asyncio
async def test_timeout_recheck_sees_another_gateway(pool: asyncpg.Pool) -> None:
    """A silent machine another gateway heard recently keeps its session; later it times out."""
    clock = FakeClock(_now())
    service = _service(pool, clock)
    service.observe(M, online(1, 1, 1))
    assert await service.flush()
    clock.advance(80)
    async with pool.acquire() as conn:  # the other gateway's flush
        await conn.execute(
            "UPDATE machines SET last_seen = $2 WHERE machine_id = $1", M, _at(clock.now - 5)
        )
    assert await service.expire() == []
    assert service.tracker.is_online(M)
    assert _sample(service, "vendgate_presence_timeout_rechecks_total", outcome="refreshed") == 1
    clock.advance(71)
    (closed,) = await service.expire()
    assert isinstance(closed, Disconnected)
    assert closed.reason is EndReason.HEARTBEAT_TIMEOUT
    assert await service.flush()
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM machine_sessions")
        last_seen = await conn.fetchval("SELECT last_seen FROM machines WHERE machine_id = $1", M)
    assert row is not None
    assert row["end_reason"] == "heartbeat_timeout"
    assert row["disconnected_at"] == _at(clock.now - 76)
    assert last_seen == _at(clock.now - 76)  # GREATEST: never moved back


@pytest.mark.integration
@pytest.mark.asyncio
async def test_last_seen_never_moves_back(pool: asyncpg.Pool) -> None:
    """A gateway with an older last_seen does not overwrite a newer one."""
    clock = FakeClock(_now())
    service = _service(pool, clock)
    service.observe(M, online(1, 1, 1))
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE machines SET last_seen = $2 WHERE machine_id = $1", M, _at(clock.now + 60)
        )
    assert await service.flush()
    async with pool.acquire() as conn:
        last_seen = await conn.fetchval("SELECT last_seen FROM machines WHERE machine_id = $1", M)
    assert last_seen == _at(clock.now + 60)


@pytest.mark.integration
@pytest.mark.asyncio
async def test_list_machines_pages_and_filters(pool: asyncpg.Pool) -> None:
    """list_machines pages by machine id and filters on presence; history is newest first."""
    clock = FakeClock(_now())
    service = _service(pool, clock)
    for machine_id in ["VM-2", "VM-4", "VM-5"]:
        service.observe(machine_id, online(1, 1, 1))
    clock.advance(1)
    service.observe("VM-4", goodbye(1, 2, 1))
    clock.advance(1)
    service.observe("VM-4", online(1, 3, 2))
    assert await service.flush()
    async with pool.acquire() as conn:
        first = await store.list_machines(conn, online=None, after=None, limit=2)
        second = await store.list_machines(
            conn, online=None, after=first[-1]["machine_id"], limit=2
        )
        third = await store.list_machines(
            conn, online=None, after=second[-1]["machine_id"], limit=2
        )
        up = await store.list_machines(conn, online=True, after=None, limit=10)
        up_after = await store.list_machines(conn, online=True, after="VM-2", limit=1)
        down = await store.list_machines(conn, online=False, after=None, limit=10)
        history = await store.session_history(conn, "VM-4", limit=10)
        latest = await store.session_history(conn, "VM-4", limit=1)
        missing = await store.get_machine(conn, "VM-9")
        loaded = await store.load_presence(conn)
    assert [r["machine_id"] for r in first + second + third] == [f"VM-{n}" for n in range(1, 6)]
    assert [r["machine_id"] for r in up] == ["VM-2", "VM-4", "VM-5"]
    assert [r["machine_id"] for r in up_after] == ["VM-4"]
    assert [r["machine_id"] for r in down] == ["VM-1", "VM-3"]
    assert up[0]["connected_at"] == _at(clock.now - 2)
    assert down[0]["connected_at"] is None
    assert [(r["session"], r["end_reason"]) for r in history] == [(2, None), (1, "clean")]
    assert [r["session"] for r in latest] == [2]
    assert missing is None
    assert sorted(r["machine_id"] for r in loaded) == ["VM-2", "VM-4", "VM-5"]


@pytest.mark.integration
@pytest.mark.asyncio
async def test_run_flushes_on_its_own_and_stops_on_cancel(pool: asyncpg.Pool) -> None:
    """The run loop saves changes every flush interval until cancelled; a final flush is clean."""
    service = _service(pool, flush_interval_s=0.01)
    service.observe(M, online(1, 1, 1))
    task = asyncio.create_task(service.run(), name="test.sessions.run")
    try:
        async with pool.acquire() as conn:
            for _ in range(500):
                if await conn.fetchval("SELECT online FROM machines WHERE machine_id = $1", M):
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the run loop never saved the session")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    service.observe(M, will(1, 1))
    assert await service.flush()
    async with pool.acquire() as conn:
        assert not await conn.fetchval("SELECT online FROM machines WHERE machine_id = $1", M)


@pytest.mark.integration
@pytest.mark.asyncio
async def test_an_ended_session_stays_ended(pool: asyncpg.Pool) -> None:
    """A gateway that still holds a session open does not reopen it after another ended it."""
    sid = uuid.uuid4()
    start = _now()
    opened = SessionRecord(sid, M, 1, None, start)
    ended = SessionRecord(sid, M, 1, None, start, start + 9, EndReason.CLEAN)
    numbered = SessionRecord(sid, M, 1, 2**31, start)  # larger than the column: kept unknown
    late = SessionRecord(sid, M, 1, 3, start)
    async with pool.acquire() as conn:
        for record in (opened, ended, numbered, late):
            async with conn.transaction():
                await store.write_presence(conn, (), (record,))
        row = await conn.fetchrow("SELECT * FROM machine_sessions")
    assert row is not None
    assert (row["session"], row["disconnected_at"], row["end_reason"]) == (
        3,
        _at(start + 9),
        "clean",
    )


@pytest.mark.integration
@pytest.mark.asyncio
async def test_a_failing_statement_keeps_changes_and_is_counted(pool: asyncpg.Pool) -> None:
    """An error that is not an outage is logged and counted, and the changes wait for a fix."""
    service = _service(pool)
    service.observe(M, online(1, 1, 1))
    async with pool.acquire() as conn:
        await conn.execute("ALTER TABLE machine_sessions RENAME TO machine_sessions_away")
        assert not await service.flush()
        await conn.execute("ALTER TABLE machine_sessions_away RENAME TO machine_sessions")
    assert _sample(service, "vendgate_presence_flush_failures_total", kind="error") == 1
    assert service.tracker.pending == 2
    assert await service.flush()
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM machine_sessions") == 1


@pytest.mark.integration
@pytest.mark.asyncio
async def test_load_from_an_unreachable_database_raises_a_typed_error(database: str) -> None:
    """load() turns a database outage into DatabaseUnavailableError."""
    await _prepare(database, M)
    proxy = _SocketProxy(database)
    await proxy.start()
    pool = await db.create_pool(proxy.dsn, min_size=0, max_size=1)
    try:
        await proxy.cut()
        with pytest.raises(DatabaseUnavailableError):
            await _service(pool).load()
    finally:
        await asyncio.wait_for(pool.close(), 5)
        await proxy.close()
