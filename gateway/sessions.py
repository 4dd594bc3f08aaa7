"""Machine presence and session history: who is online, since when, and why they left.

A *session* is one stretch of time during which the gateway holds a machine to be online; its
row in ``machine_sessions`` carries an id the gateway chooses (uuid4) and, once a ``Presence``
frame names it, the machine's own session number (SPEC §5.2, ``Presence``). The module has a
pure core, :class:`PresenceTracker` (state machine, ordering, timeouts; time is an argument),
and an I/O shell, :class:`PresenceService`, that feeds it, saves what changed in batches and
runs the timeouts (house style #1, #4).

The rule for online
-------------------

Frames of one machine are ordered by (``boot``, ``seq``), except the last will: it is built
before the session's frames are numbered and carries ``seq`` 0, so presence frames are ordered
by (``boot``, ``session``, online before offline) instead (SPEC §3.3, §5.2). A frame is
*stale* if it is not newer than what was seen: a non-presence frame whose (boot, seq) is not
above the newest seen, a presence frame whose (boot, session, online before offline) is not
above the newest presence seen, or any frame from a boot older than the newest boot seen.
Stale frames change nothing and are counted.

1. Any fresh frame other than ``Presence(online=False)``, while the machine is offline,
   brings it online and opens a session, whatever the frame (a ``Hello`` may overtake the
   ``Presence`` it follows, since they travel on different topics). While online, a fresh
   frame from a boot newer than the open session's ends that session as ``superseded`` and
   opens a new one.
2. ``Presence(online=True, session=S)``, fresh, while online: if the open session has no
   number yet, is of the same boot and was opened by a frame numbered after this presence, it
   is the session this presence announces (its ``Hello`` overtook it): the session adopts S.
   Otherwise S is newer than the open session, which ends as ``superseded``, and S opens.
   While offline, it opens S.
3. ``Presence(online=False, session=S)``, fresh, while online, ends the open session: as
   ``last_will`` if ``seq`` is 0, else as ``clean``. A fresh will is always at or after the
   open session (a session with no number yet matches any); a will for a newer session than
   the open one also ends it: that session started and died while the gateway did not see
   it. The one exception: a clean goodbye numbered before the frame that opened the session
   ended an earlier session, so it changes nothing. A retained will of an earlier session,
   replayed on subscribe or delivered late, is stale.
4. A machine is offline only after its will, its clean goodbye, or ``heartbeat_timeout_s``
   (75 s, 2.5 heartbeat intervals) without any frame: the session then ends as
   ``heartbeat_timeout``, dated at the last frame seen. One lost heartbeat is not offline.
5. Every fresh frame except a will sets ``last_seen`` (a will is sent by the broker, maybe a
   keep-alive and a half after the machine went silent, so it proves nothing about when the
   machine was last there); every fresh frame moves ``boot`` forward. ``Hello`` sets the
   firmware, ``Heartbeat`` the signal strength.

Known limits: the tracker sees only the frames that reach this gateway. With MQTT 5 shared
subscriptions (§3.4) one machine's frames are spread over the gateways of the group; the
service re-reads ``machines.last_seen`` before a timeout so that a machine heard by another
gateway is not declared gone, but two gateways that each see a machine come online each open
their own session row for it.
"""

from __future__ import annotations

import asyncio
import enum
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Final, NamedTuple

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.config import SessionsConfig
from gateway.logs import get_logger
from gateway.store import sessions as store
from gateway.store.writer import unavailable
from protocols.frames import FRAME_TYPES, Heartbeat, Hello, Presence, UplinkFrame

__all__ = [
    "TRANSITIONS",
    "Connected",
    "Cue",
    "Disconnected",
    "EndReason",
    "HeartbeatGap",
    "Ignored",
    "MachinePresence",
    "Numbered",
    "Phase",
    "PresenceChanges",
    "PresenceEvent",
    "PresenceService",
    "PresenceTracker",
    "SessionMetrics",
    "SessionRecord",
    "Step",
]

log = get_logger("gateway.sessions")

#: A stored last_seen counts as newer than ours only past this margin: timestamptz keeps
#: microseconds, so our own value read back may differ from the float we wrote by rounding.
_SEEN_MARGIN_S: Final = 1e-3


# --- the state machine -----------------------------------------------------------------------


class Phase(enum.Enum):
    """Whether the gateway holds a machine to be online (it has an open session) or not."""

    OFFLINE = "offline"
    ONLINE = "online"


class Cue(enum.Enum):
    """What one frame (or a silence) means for presence, once ordered against what was seen."""

    STALE = "stale"  # not newer than what was seen: ignored and counted
    FRAME = "frame"  # a fresh frame that is not presence, from the boot seen last
    REBOOT = "reboot"  # a fresh frame that is not presence, from a newer boot
    ANNOUNCE = "announce"  # Presence(online) for a session newer than the open one
    ADOPT = "adopt"  # Presence(online) naming the open session that had no number yet
    GOODBYE = "goodbye"  # Presence(offline) with a real seq: a clean disconnect
    WILL = "will"  # Presence(offline) with seq 0: the broker published the last will
    EARLIER_GOODBYE = "earlier_goodbye"  # a goodbye numbered before the open session began
    SILENCE = "silence"  # no frame for heartbeat_timeout_s


class EndReason(enum.StrEnum):
    """Why a session ended; the values of ``machine_sessions.end_reason``."""

    CLEAN = "clean"
    LAST_WILL = "last_will"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    SUPERSEDED = "superseded"


@dataclass(frozen=True, slots=True)
class Step:
    """What a cue does in a phase: end the open session, open one, or number it; then where."""

    then: Phase
    ends: EndReason | None = None
    opens: bool = False
    adopts: bool = False


P, C = Phase, Cue

#: (phase, cue) -> step. Every pair is here, so a frame can never fall through unhandled.
TRANSITIONS: Final[dict[tuple[Phase, Cue], Step]] = {
    (P.OFFLINE, C.STALE): Step(P.OFFLINE),
    (P.OFFLINE, C.FRAME): Step(P.ONLINE, opens=True),
    (P.OFFLINE, C.REBOOT): Step(P.ONLINE, opens=True),
    (P.OFFLINE, C.ANNOUNCE): Step(P.ONLINE, opens=True),
    (P.OFFLINE, C.ADOPT): Step(P.ONLINE, opens=True),  # not produced: adopting needs a session
    (P.OFFLINE, C.GOODBYE): Step(P.OFFLINE),  # noted, so that older presence becomes stale
    (P.OFFLINE, C.WILL): Step(P.OFFLINE),
    (P.OFFLINE, C.EARLIER_GOODBYE): Step(P.OFFLINE),
    (P.OFFLINE, C.SILENCE): Step(P.OFFLINE),  # not produced: only online machines time out
    (P.ONLINE, C.STALE): Step(P.ONLINE),
    (P.ONLINE, C.FRAME): Step(P.ONLINE),
    (P.ONLINE, C.REBOOT): Step(P.ONLINE, ends=EndReason.SUPERSEDED, opens=True),
    (P.ONLINE, C.ANNOUNCE): Step(P.ONLINE, ends=EndReason.SUPERSEDED, opens=True),
    (P.ONLINE, C.ADOPT): Step(P.ONLINE, adopts=True),
    (P.ONLINE, C.GOODBYE): Step(P.OFFLINE, ends=EndReason.CLEAN),
    (P.ONLINE, C.WILL): Step(P.OFFLINE, ends=EndReason.LAST_WILL),
    (P.ONLINE, C.EARLIER_GOODBYE): Step(P.ONLINE),
    (P.ONLINE, C.SILENCE): Step(P.OFFLINE, ends=EndReason.HEARTBEAT_TIMEOUT),
}


# --- records and events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One row of ``machine_sessions``; times are unix seconds."""

    session_id: uuid.UUID
    machine_id: str
    boot: int
    session: int | None  # the machine's own number; None until a Presence names it
    connected_at: float
    disconnected_at: float | None = None
    end_reason: EndReason | None = None


@dataclass(frozen=True, slots=True)
class MachinePresence:
    """What the gateway knows of one machine's presence; times are unix seconds.

    ``session``, ``session_id`` and ``connected_at`` describe the open session while
    ``online``, and the last one after it ended.
    """

    machine_id: str
    online: bool = False
    last_seen: float | None = None
    firmware: str | None = None
    boot: int | None = None
    session: int | None = None
    session_id: uuid.UUID | None = None
    connected_at: float | None = None
    rssi: int | None = None
    last_heartbeat_at: float | None = None


@dataclass(frozen=True, slots=True)
class Connected:
    """A session opened."""

    machine_id: str
    session: SessionRecord


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A session ended; ``session`` carries its end time and reason."""

    machine_id: str
    session: SessionRecord
    reason: EndReason


@dataclass(frozen=True, slots=True)
class Numbered:
    """The open session learnt its number from a ``Presence`` that its first frame overtook."""

    machine_id: str
    session: SessionRecord


@dataclass(frozen=True, slots=True)
class Ignored:
    """A stale frame was ignored (a duplicate, a late frame, a replayed retained presence)."""

    machine_id: str
    frame_type: str


@dataclass(frozen=True, slots=True)
class HeartbeatGap:
    """Time between two consecutive heartbeats of one session."""

    machine_id: str
    seconds: float


PresenceEvent = Connected | Disconnected | Numbered | Ignored | HeartbeatGap


class PresenceChanges(NamedTuple):
    """What changed since the last :meth:`PresenceTracker.take_changes`: latest state only."""

    machines: tuple[MachinePresence, ...]
    sessions: tuple[SessionRecord, ...]


Position = tuple[int, int]  # (boot, seq)


@dataclass(slots=True)
class _Track:
    """One machine: its place in the state machine, and what its view says, field by field.

    The fields of :class:`MachinePresence` are plain attributes, written in place: building a
    frozen view per frame (``dataclasses.replace``) cost more than the rest of ``observe``.
    Readers get the immutable snapshot that :attr:`view` builds when asked.

    One is kept per machine, so what it must remember is plain fields rather than objects of
    their own (a tuple is 56 to 64 bytes more per machine, a SessionRecord 88, and the fast
    path would build a tuple per frame): the newest (boot, seq) seen is (``boot``, ``seq``);
    the open session, if ``open_boot`` is not None, is the one the view's ``session``,
    ``session_id`` and ``connected_at`` describe (:attr:`open` builds its record); the frame
    that opened it is (``open_boot``, ``opened_seq``); the newest presence seen is
    (``presence_boot``, ``presence_session``, ``presence_end``).
    """

    machine_id: str
    online: bool = False
    last_seen: float | None = None
    firmware: str | None = None
    boot: int | None = None  # of the newest (boot, seq) seen, wills included; None: none yet
    session: int | None = None
    session_id: uuid.UUID | None = None
    connected_at: float | None = None
    rssi: int | None = None
    last_heartbeat_at: float | None = None
    phase: Phase = Phase.OFFLINE
    open_boot: int | None = None  # of the open session; None: no session is open
    seq: int = 0  # of the newest (boot, seq) seen, once there is one
    opened_seq: int | None = None  # of the frame that opened the session; None if loaded
    presence_boot: int | None = None  # of the newest presence seen; None: none yet
    presence_session: int = 0
    presence_end: int = 0  # 0 online, 1 offline: an online presence orders before its end
    silent_since: float = 0.0  # silence is measured from here (last frame, or gateway start)
    heartbeat_at: float | None = None  # previous heartbeat of the open session
    dirty: bool = False  # in the tracker's dirty machines: changed since the last take

    @classmethod
    def of(cls, row: MachinePresence, silent_since: float) -> _Track:
        return cls(
            row.machine_id,
            row.online,
            row.last_seen,
            row.firmware,
            row.boot,
            row.session,
            row.session_id,
            row.connected_at,
            row.rssi,
            row.last_heartbeat_at,
            silent_since=silent_since,
        )

    @property
    def open(self) -> SessionRecord | None:
        """The open session's record, or None if no session is open."""
        return None if self.open_boot is None else self.open_record()

    def open_record(self) -> SessionRecord:
        """Return the open session's record; call only while one is open."""
        assert self.session_id is not None  # noqa: S101  (set whenever a session opens)
        assert self.connected_at is not None  # noqa: S101
        assert self.open_boot is not None  # noqa: S101
        return SessionRecord(
            self.session_id, self.machine_id, self.open_boot, self.session, self.connected_at
        )

    @property
    def view(self) -> MachinePresence:
        return MachinePresence(
            self.machine_id,
            self.online,
            self.last_seen,
            self.firmware,
            self.boot,
            self.session,
            self.session_id,
            self.connected_at,
            self.rssi,
            self.last_heartbeat_at,
        )


#: The step the fast path of :meth:`PresenceTracker.observe` stands for: it may skip the
#: table only while the table says that a fresh frame of the same boot changes nothing.
_STAY_ONLINE: Final = Step(Phase.ONLINE)
_ONLINE: Final = Phase.ONLINE  # a module global: ``Phase.ONLINE`` costs ~5x more per frame

#: Frame types the fast path takes: every uplink type but ``Presence`` (ordered by session,
#: rules 2-3) and ``Hello`` (sets the firmware); the fast path handles ``Heartbeat`` itself.
#: Exact types, so that a subclass of one of them could never slip past its own rules.
_FAST_TYPES: Final = frozenset(
    kind
    for kind in FRAME_TYPES.values()
    if issubclass(kind, UplinkFrame)
    and (kind is Heartbeat or not issubclass(kind, Presence | Hello | Heartbeat))
)

#: What observe returns for nearly every frame: shared, and immutable so that it can be.
_NO_EVENTS: Final[tuple[PresenceEvent, ...]] = ()


# --- the pure core ---------------------------------------------------------------------------


class PresenceTracker:
    """Presence of every machine, from its verified uplink frames; see the module docstring.

    Pure: no I/O and no asyncio. ``clock`` returns unix seconds and is read once per frame.
    ``fast_path=False`` sends every frame through the transition table, so that tests can
    check the fast path of :meth:`observe` against it.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        heartbeat_timeout_s: float = 75.0,
        new_id: Callable[[], uuid.UUID] = uuid.uuid4,
        fast_path: bool = True,
    ) -> None:
        self._clock = clock
        self._fast_path = fast_path and TRANSITIONS[(Phase.ONLINE, Cue.FRAME)] == _STAY_ONLINE
        self._timeout_s = heartbeat_timeout_s
        self._new_id = new_id
        self._tracks: dict[str, _Track] = {}
        self._online = 0
        self._dirty_machines: set[str] = set()
        self._dirty_sessions: dict[uuid.UUID, SessionRecord] = {}
        self._dirty_since: float | None = None
        self._taken_since: float | None = None

    # -- readers ----------------------------------------------------------------------------

    def get(self, machine_id: str) -> MachinePresence | None:
        """Return what is known of ``machine_id``, or None if nothing is."""
        track = self._tracks.get(machine_id)
        return None if track is None else track.view

    def is_online(self, machine_id: str) -> bool:
        """Tell whether ``machine_id`` has an open session."""
        track = self._tracks.get(machine_id)
        return track is not None and track.phase is Phase.ONLINE

    def online_count(self) -> int:
        """Return how many machines have an open session."""
        return self._online

    def open_session(self, machine_id: str) -> SessionRecord | None:
        """Return the open session of ``machine_id``, if it is online."""
        track = self._tracks.get(machine_id)
        return None if track is None else track.open

    @property
    def pending(self) -> int:
        """Machines and sessions changed and not yet taken by :meth:`take_changes`."""
        return len(self._dirty_machines) + len(self._dirty_sessions)

    @property
    def pending_since(self) -> float | None:
        """When the oldest change not yet saved was made, or None if there is none."""
        return self._dirty_since

    # -- start-up ---------------------------------------------------------------------------

    def load(self, rows: Iterable[MachinePresence]) -> int:
        """Restore state saved by an earlier gateway; call before the first :meth:`observe`.

        An online row keeps its open session. Its silence is measured from now at the
        earliest, so a restart after a long outage does not time the whole fleet out at once.
        Returns how many machines were loaded.
        """
        now = self._clock()
        count = 0
        for row in rows:
            previous = self._tracks.get(row.machine_id)
            if previous is not None and previous.phase is Phase.ONLINE:
                self._online -= 1
            track = _Track.of(row, silent_since=max(row.last_seen or now, now))
            track.dirty = row.machine_id in self._dirty_machines
            # The newest (boot, seq) seen starts at (row.boot, 0): boot is the row's.
            if row.boot is not None and row.session is not None:
                track.presence_boot, track.presence_session = row.boot, row.session
            if (
                row.online
                and row.session_id is not None
                and row.boot is not None
                and row.connected_at is not None
            ):
                track.phase = Phase.ONLINE
                track.open_boot = row.boot  # with the row's session, session_id, connected_at
                self._online += 1
            else:
                track.online = False
            self._tracks[row.machine_id] = track
            count += 1
        return count

    # -- inputs -----------------------------------------------------------------------------

    def observe(self, machine_id: str, frame: UplinkFrame) -> Sequence[PresenceEvent]:
        """Apply one verified uplink frame of ``machine_id``; return what it caused (a tuple)."""
        now = self._clock()
        track = self._tracks.get(machine_id)
        if track is None:
            track = self._tracks[machine_id] = _Track(machine_id)
        elif self._fast_path and track.phase is _ONLINE:
            # The fast path: nearly every frame is a fresh one, of the boot seen last, from a
            # machine already online. _cue gives it Cue.FRAME, whose step changes nothing
            # (checked in __init__): the open session's fields in the view stay as they are.
            # What is left is rule 5, written out below; any other frame goes on to the table.
            # tests/gateway/test_sessions.py checks the two against each other.
            seq = frame.seq
            if frame.boot == track.boot and seq > track.seq and type(frame) in _FAST_TYPES:
                track.seq = seq
                track.silent_since = now
                # Marked as the table path marks it: once per take, and only if the view
                # changed, which here means last_seen (or a heartbeat's fields).
                if type(frame) is Heartbeat:
                    rssi = frame.rssi
                    if not track.dirty and (
                        track.last_seen != now
                        or track.rssi != rssi
                        or track.last_heartbeat_at != now
                    ):
                        self._mark(track, now)
                    track.last_seen = now
                    track.rssi = rssi
                    track.last_heartbeat_at = now
                    previous, track.heartbeat_at = track.heartbeat_at, now
                    if previous is None:
                        return _NO_EVENTS
                    return (HeartbeatGap(machine_id, now - previous),)
                if not track.dirty and track.last_seen != now:
                    self._mark(track, now)
                track.last_seen = now
                return _NO_EVENTS
        return self._apply(track, frame, now)

    def _apply(self, track: _Track, frame: UplinkFrame, now: float) -> Sequence[PresenceEvent]:
        """Apply ``frame`` through the transition table: every case the fast path leaves."""
        machine_id = track.machine_id
        cue = _cue(track, frame)
        if cue is Cue.STALE:
            return (Ignored(machine_id, type(frame).__name__),)
        before = track.view
        session = frame.session if isinstance(frame, Presence) and frame.online else None
        position = (frame.boot, frame.seq)
        events = self._step(track, cue, now, position, session)
        if track.boot is None or position > (track.boot, track.seq):
            track.boot, track.seq = position
        if isinstance(frame, Presence):
            track.presence_boot = frame.boot
            track.presence_session = frame.session
            track.presence_end = 0 if frame.online else 1
        if cue is not Cue.WILL:
            track.last_seen = now
            track.silent_since = now
        if isinstance(frame, Hello):
            # Interned: a fleet runs a few firmware versions, not one string per machine.
            track.firmware = sys.intern(frame.firmware)
        elif isinstance(frame, Heartbeat):
            track.rssi = frame.rssi
            track.last_heartbeat_at = now
            if track.heartbeat_at is not None:
                events.append(HeartbeatGap(machine_id, now - track.heartbeat_at))
            track.heartbeat_at = now
        if not track.dirty and track.view != before:
            self._mark(track, now)
        return tuple(events)

    def due(self, now: float) -> list[str]:
        """Return the online machines silent for ``heartbeat_timeout_s`` or more at ``now``."""
        return [
            machine_id
            for machine_id, track in self._tracks.items()
            if track.phase is Phase.ONLINE and now - track.silent_since >= self._timeout_s
        ]

    def refresh(self, machine_id: str, seen_at: float) -> bool:
        """Note that another gateway heard ``machine_id`` at ``seen_at``; True if that is news."""
        track = self._tracks.get(machine_id)
        if track is None or seen_at <= track.silent_since + _SEEN_MARGIN_S:
            return False
        track.silent_since = seen_at
        last_seen = track.last_seen
        if last_seen is None or seen_at > last_seen:
            # Not marked dirty: the database already holds this value.
            track.last_seen = seen_at
        return True

    def expire(self, now: float, machine_ids: Collection[str] | None = None) -> list[PresenceEvent]:
        """End the sessions of machines silent for ``heartbeat_timeout_s`` (rule 4).

        With ``machine_ids``, consider only those (the ones whose silence was re-checked).
        """
        candidates = self.due(now) if machine_ids is None else machine_ids
        events: list[PresenceEvent] = []
        for machine_id in candidates:
            track = self._tracks.get(machine_id)
            if track is None or track.phase is not Phase.ONLINE:
                continue
            if now - track.silent_since < self._timeout_s:
                continue
            events.extend(self._step(track, Cue.SILENCE, now, None, None))
            self._mark(track, now)
        return events

    # -- changes ----------------------------------------------------------------------------

    def take_changes(self) -> PresenceChanges:
        """Return what changed since the last call (latest state only) and forget it.

        Give it back with :meth:`restore` if it could not be saved.
        """
        machines: list[MachinePresence] = []
        for machine_id in sorted(self._dirty_machines):
            track = self._tracks[machine_id]
            track.dirty = False
            machines.append(track.view)  # built now: the snapshot of what is saved
        sessions = tuple(self._dirty_sessions.values())
        self._dirty_machines = set()
        self._dirty_sessions = {}
        self._taken_since, self._dirty_since = self._dirty_since, None
        return PresenceChanges(tuple(machines), sessions)

    def restore(self, changes: PresenceChanges) -> None:
        """Put back changes that could not be saved; anything changed since stays newer."""
        for machine in changes.machines:
            self._dirty_machines.add(machine.machine_id)
            self._tracks[machine.machine_id].dirty = True
        for record in changes.sessions:
            self._dirty_sessions.setdefault(record.session_id, record)
        if changes.machines or changes.sessions:
            since = [t for t in (self._dirty_since, self._taken_since) if t is not None]
            self._dirty_since = min(since) if since else self._clock()

    # -- internals --------------------------------------------------------------------------

    def _step(
        self,
        track: _Track,
        cue: Cue,
        now: float,
        position: Position | None,
        session: int | None,
    ) -> list[PresenceEvent]:
        step = TRANSITIONS[(track.phase, cue)]
        events: list[PresenceEvent] = []
        machine_id = track.machine_id
        if step.ends is not None and track.open_boot is not None:
            ended = track.open_record()
            ended_at = now
            if step.ends is EndReason.HEARTBEAT_TIMEOUT:
                # Dated at the last frame: the machine is not known to have been there after.
                ended_at = max(track.last_seen or now, ended.connected_at)
            closed = replace(ended, disconnected_at=ended_at, end_reason=step.ends)
            self._dirty_sessions[closed.session_id] = closed
            events.append(Disconnected(machine_id, closed, step.ends))
            # The view's session fields keep describing the session that ended.
            track.open_boot = None
            track.opened_seq = None
            track.heartbeat_at = None
        if step.opens and position is not None:
            opened = SessionRecord(self._new_id(), machine_id, position[0], session, now)
            self._dirty_sessions[opened.session_id] = opened
            events.append(Connected(machine_id, opened))
            track.open_boot, track.opened_seq = position
            track.session = session
            track.session_id = opened.session_id
            track.connected_at = now
            track.heartbeat_at = None
        if step.adopts and track.open_boot is not None and session is not None:
            track.session = session  # the open session is of this boot: see _cue
            track.opened_seq = None if position is None else position[1]
            numbered = track.open_record()
            self._dirty_sessions[numbered.session_id] = numbered
            events.append(Numbered(machine_id, numbered))
        if track.phase is not step.then:
            self._online += 1 if step.then is Phase.ONLINE else -1
        track.phase = step.then
        track.online = track.open_boot is not None
        return events

    def _mark(self, track: _Track, now: float) -> None:
        if not track.dirty:
            track.dirty = True
            self._dirty_machines.add(track.machine_id)
        if self._dirty_since is None:
            self._dirty_since = now


def _cue(track: _Track, frame: UplinkFrame) -> Cue:
    """Order ``frame`` against what was seen of its machine (module docstring, rules 1-3)."""
    position = (frame.boot, frame.seq)
    boot = track.boot  # with track.seq, the newest (boot, seq) seen, if boot is not None
    open_boot = track.open_boot  # of the open session, if one is (see _Track)
    if isinstance(frame, Presence):
        key = (frame.boot, frame.session, 0 if frame.online else 1)
        if (boot is not None and frame.boot < boot) or (
            track.presence_boot is not None
            and key <= (track.presence_boot, track.presence_session, track.presence_end)
        ):
            return Cue.STALE
        if frame.online:
            if (
                open_boot is not None
                and track.session is None
                and open_boot == frame.boot
                and (track.opened_seq is None or track.opened_seq > frame.seq)
            ):
                return Cue.ADOPT
            return Cue.ANNOUNCE
        if frame.seq == 0:
            return Cue.WILL
        if (
            open_boot is not None
            and track.opened_seq is not None
            and position < (open_boot, track.opened_seq)
        ):
            return Cue.EARLIER_GOODBYE
        return Cue.GOODBYE
    if boot is not None and position <= (boot, track.seq):
        return Cue.STALE
    if boot is not None and frame.boot > boot:
        return Cue.REBOOT
    return Cue.FRAME


# --- metrics ---------------------------------------------------------------------------------

_GAP_BUCKETS = (1, 5, 10, 20, 25, 28, 30, 32, 35, 40, 45, 60, 75, 90, 120, 300)


class SessionMetrics:
    """Presence metrics, on a registry passed down; labels never carry machine ids."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.online = Gauge(
            "vendgate_machines_online",
            "Machines with an open session, as this gateway sees them.",
            registry=registry,
        )
        self.connects = Counter("vendgate_machine_connects", "Sessions opened.", registry=registry)
        self.disconnects = Counter(
            "vendgate_machine_disconnects",
            "Sessions ended, by reason (clean, last_will, heartbeat_timeout, superseded).",
            ["reason"],
            registry=registry,
        )
        self.heartbeat_gap = Histogram(
            "vendgate_heartbeat_gap_seconds",
            "Time between consecutive heartbeats of one session (nominally the interval).",
            buckets=_GAP_BUCKETS,
            registry=registry,
        )
        self.stale = Counter(
            "vendgate_presence_stale_frames",
            "Frames ignored as older than what was seen (duplicates, replayed presence), by type.",
            ["type"],
            registry=registry,
        )
        self.pending = Gauge(
            "vendgate_presence_pending_changes",
            "Machines and sessions changed in memory and not yet saved.",
            registry=registry,
        )
        self.flush_lag = Gauge(
            "vendgate_presence_flush_lag_seconds",
            "Age of the oldest presence change not yet saved (0 when none is).",
            registry=registry,
        )
        self.flush_failures = Counter(
            "vendgate_presence_flush_failures",
            "Presence saves that failed and will be retried, by kind (unavailable, error).",
            ["kind"],
            registry=registry,
        )
        self.timeout_rechecks = Counter(
            "vendgate_presence_timeout_rechecks",
            "Silent machines re-checked against the database before a heartbeat timeout, by "
            "outcome (expired, refreshed: another gateway heard it, deferred: no database).",
            ["outcome"],
            registry=registry,
        )


# --- the I/O shell ---------------------------------------------------------------------------


def _timestamp(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _stored(row: asyncpg.Record) -> MachinePresence:
    """Turn a row of :func:`gateway.store.sessions.load_presence` into what the tracker loads."""
    # Online only with a session row that is still open; anything else loads as offline.
    online = bool(row["online"]) and row["connected_at"] is not None
    online = online and row["disconnected_at"] is None
    firmware = row["firmware"]
    return MachinePresence(
        # Interned, as the uplink interns the ids of topics: one string per machine id and
        # per firmware version, however many structures keep them.
        machine_id=sys.intern(row["machine_id"]),
        online=online,
        last_seen=_timestamp(row["last_seen"]),
        firmware=None if firmware is None else sys.intern(firmware),
        boot=row["session_boot"] if online else row["boot"],
        session=row["session_number"] if online else row["session"],
        session_id=row["session_id"],
        connected_at=_timestamp(row["connected_at"]),
        rssi=row["rssi"],
    )


@dataclass(slots=True)
class _Every:
    interval_s: float
    last: float = field(default=float("-inf"))

    def due(self, now: float) -> bool:
        if now - self.last < self.interval_s:
            return False
        self.last = now
        return True


class PresenceService:
    """Feeds a :class:`PresenceTracker`, saves its changes in batches and runs its timeouts.

    Changes are written every ``flush_interval_s`` in one transaction of set-based statements.
    If the database is unreachable they are kept (only the latest state per machine and per
    session, so memory is bounded by the fleet and by the sessions opened meanwhile) and
    written at a later tick. Once a second the silent machines are re-checked against
    ``machines.last_seen`` (another gateway of a shared subscription may have heard them) and
    the rest time out.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        config: SessionsConfig,
        metrics: SessionMetrics,
        *,
        clock: Callable[[], float] = time.time,
        expire_interval_s: float = 1.0,
    ) -> None:
        self._pool = pool
        self._config = config
        self._metrics = metrics
        self._stale: dict[str, Counter] = {}  # labelled children, looked up once
        self._clock = clock
        self._expire_interval_s = expire_interval_s
        self.tracker = PresenceTracker(clock, heartbeat_timeout_s=config.heartbeat_timeout_s)
        # One flush at a time: two in flight could commit an older snapshot after a newer one.
        self._flush_lock = asyncio.Lock()
        metrics.online.set_function(lambda: float(self.tracker.online_count()))
        metrics.pending.set_function(lambda: float(self.tracker.pending))
        metrics.flush_lag.set_function(self._flush_lag)

    async def load(self) -> int:
        """Restore presence saved by earlier gateways; call before the first frame."""
        try:
            async with self._pool.acquire() as conn:
                rows = await store.load_presence(conn)
        except Exception as exc:
            error = unavailable(exc)
            if error is not None:
                raise error from exc
            raise
        count = self.tracker.load(_stored(row) for row in rows)
        log.info("presence_loaded", machines=count, online=self.tracker.online_count())
        return count

    def observe(self, machine_id: str, frame: UplinkFrame) -> Sequence[PresenceEvent]:
        """Apply one verified uplink frame; cheap and synchronous. Returns what it caused."""
        events = self.tracker.observe(machine_id, frame)
        if events:
            self._count(events)
        return events

    async def run(self) -> None:
        """Save changes every ``flush_interval_s`` and run timeouts every second; forever."""
        expiry = _Every(self._expire_interval_s)
        while True:
            await asyncio.sleep(self._config.flush_interval_s)
            if expiry.due(time.monotonic()):
                await self.expire()
            await self.flush()

    async def flush(self) -> bool:
        """Write what changed in one transaction; False (changes kept) if that failed."""
        async with self._flush_lock:
            changes = self.tracker.take_changes()
            if not (changes.machines or changes.sessions):
                return True
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    await store.write_presence(conn, changes.machines, changes.sessions)
            except asyncio.CancelledError:
                self.tracker.restore(changes)
                raise
            except Exception as exc:  # noqa: BLE001  (never crash: keep the changes, retry)
                self.tracker.restore(changes)
                self._flush_failed(exc, len(changes.machines), len(changes.sessions))
                return False
            return True

    async def expire(self) -> list[PresenceEvent]:
        """End the sessions of machines silent too long, unless another gateway heard them."""
        due = self.tracker.due(self._clock())
        if not due:
            return []
        try:
            async with self._pool.acquire() as conn:
                seen = await store.last_seen(conn, due)
        except Exception as exc:  # noqa: BLE001  (never crash: try again next second)
            # Without the re-check a machine heard only by other gateways would flap; its
            # timeout waits for the database, which is needed to save it anyway.
            self._metrics.timeout_rechecks.labels("deferred").inc(len(due))
            log.warning(
                "presence_recheck_failed",
                machines=len(due),
                error=f"{type(exc).__name__}: {exc}",
                unavailable=unavailable(exc) is not None,
            )
            return []
        refreshed = [
            m for m in due if (t := seen.get(m)) and self.tracker.refresh(m, t.timestamp())
        ]
        if refreshed:
            self._metrics.timeout_rechecks.labels("refreshed").inc(len(refreshed))
        events = self.tracker.expire(self._clock(), due)
        self._metrics.timeout_rechecks.labels("expired").inc(
            sum(isinstance(e, Disconnected) for e in events)
        )
        self._count(events)
        return events

    # -- internals --------------------------------------------------------------------------

    def _count(self, events: Sequence[PresenceEvent]) -> None:
        for event in events:
            if isinstance(event, Connected):
                self._metrics.connects.inc()
                log.debug(
                    "machine_connected", machine_id=event.machine_id, session=event.session.session
                )
            elif isinstance(event, Disconnected):
                self._metrics.disconnects.labels(event.reason.value).inc()
                log.debug(
                    "machine_disconnected", machine_id=event.machine_id, reason=event.reason.value
                )
            elif isinstance(event, Ignored):
                stale = self._stale.get(event.frame_type)
                if stale is None:
                    stale = self._stale[event.frame_type] = self._metrics.stale.labels(
                        event.frame_type
                    )
                stale.inc()
            elif isinstance(event, HeartbeatGap):
                self._metrics.heartbeat_gap.observe(event.seconds)

    def _flush_lag(self) -> float:
        since = self.tracker.pending_since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def _flush_failed(self, exc: Exception, machines: int, sessions: int) -> None:
        error = unavailable(exc)
        if error is not None:
            self._metrics.flush_failures.labels("unavailable").inc()
            log.warning(
                "presence_flush_unavailable", machines=machines, sessions=sessions, error=str(error)
            )
        else:
            self._metrics.flush_failures.labels("error").inc()
            log.warning(
                "presence_flush_failed",
                machines=machines,
                sessions=sessions,
                error=f"{type(exc).__name__}: {exc}",
                exc_info=exc,
            )
