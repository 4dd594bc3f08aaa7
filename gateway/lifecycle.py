"""The vend state machine: every state, every event, one transition table.

Everything that decides how a vend moves lives in this module (house style #3):
which event may move a vend from which state to which, what counts as final,
which webhook a state change emits, and the timing policy (re-sends, the
moment a silent vend becomes unknown, status-query pacing). It is pure: time
is an argument, nothing here does I/O.

States (SPEC §6, docs/architecture.md)::

    accepted ──published──▶ sent ──ack accepted──▶ acknowledged ──result──▶ dispensed | failed
        │                    │ ╲                         │
        │                    │  ╲──ack refused──▶ rejected
        │                    │   ╲──result────────▶ dispensed | failed   (the ack was lost)
        │                    └──no ack by deadline+T──▶ unknown ◀──no result in time──┘
        └──deadline passed, never published──▶ expired ◀──machine proves it (tombstone)── unknown

``unknown`` is settled by the machine (a late result, or a status reply that proves the
outcome) or by an operator; a late acknowledgement does not move it back (that would
let a vend cycle between unknown and acknowledged, and emit "unknown" twice).
``failed``, ``rejected`` and ``expired`` are "not dispensed" and are reported as
refund-required.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Final


class VendStatus(enum.StrEnum):
    """Where a vend is in its life."""

    ACCEPTED = "accepted"
    SENT = "sent"
    ACKNOWLEDGED = "acknowledged"
    DISPENSED = "dispensed"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    UNKNOWN = "unknown"

    @property
    def is_final(self) -> bool:
        """True when nothing can change the vend any more."""
        return self in FINAL

    @property
    def settled(self) -> bool:
        """True when the machine's queue may move on: final, or unknown (SPEC §6.1)."""
        return self in FINAL or self is VendStatus.UNKNOWN

    @property
    def outcome(self) -> str | None:
        """The outcome reported to the backend: dispensed, not_dispensed, or None."""
        if self is VendStatus.DISPENSED:
            return "dispensed"
        if self in NOT_DISPENSED:
            return "not_dispensed"
        return None


class VendEvent(enum.StrEnum):
    """What can happen to a vend; each name says who or what caused it."""

    PUBLISHED = "published"  # the first Vend frame was handed to the broker
    ACK_ACCEPTED = "ack_accepted"  # VendAck ACCEPTED (SPEC §6.3)
    ACK_REFUSED = "ack_refused"  # VendAck with a final refusal code
    RESULT_DISPENSED = "result_dispensed"  # VendResult, or StatusReply DONE, DISPENSED
    RESULT_FAILED = "result_failed"  # ... FAILED: provably not dispensed
    RESULT_UNCERTAIN = "result_uncertain"  # ... UNCERTAIN: the machine cannot tell
    PROVEN_NOT_SENT = "proven_not_sent"  # deadline passed before the first publish
    PROVEN_EXPIRED = "proven_expired"  # StatusReply: tombstone, or FORGOTTEN with no result
    NO_ACK = "no_ack"  # deadline + tolerance passed without any VendAck
    NO_RESULT = "no_result"  # acknowledged, no result by deadline + dispense allowance
    OPERATOR_DISPENSED = "operator_dispensed"  # an operator settled an unknown vend
    OPERATOR_NOT_DISPENSED = "operator_not_dispensed"


S, E = VendStatus, VendEvent

FINAL: Final = frozenset({S.DISPENSED, S.FAILED, S.REJECTED, S.EXPIRED})
NOT_DISPENSED: Final = frozenset({S.FAILED, S.REJECTED, S.EXPIRED})
ACTIVE: Final = frozenset({S.ACCEPTED, S.SENT, S.ACKNOWLEDGED, S.UNKNOWN})

#: (state, event) -> next state. A pair that is not here is not allowed: the vend
#: keeps its state and the event is recorded as ignored (a late or duplicate message).
TRANSITIONS: Final[dict[tuple[VendStatus, VendEvent], VendStatus]] = {
    (S.ACCEPTED, E.PUBLISHED): S.SENT,
    (S.ACCEPTED, E.PROVEN_NOT_SENT): S.EXPIRED,
    (S.SENT, E.ACK_ACCEPTED): S.ACKNOWLEDGED,
    (S.SENT, E.ACK_REFUSED): S.REJECTED,
    (S.SENT, E.RESULT_DISPENSED): S.DISPENSED,
    (S.SENT, E.RESULT_FAILED): S.FAILED,
    (S.SENT, E.RESULT_UNCERTAIN): S.UNKNOWN,
    (S.SENT, E.PROVEN_EXPIRED): S.EXPIRED,
    (S.SENT, E.NO_ACK): S.UNKNOWN,
    (S.ACKNOWLEDGED, E.RESULT_DISPENSED): S.DISPENSED,
    (S.ACKNOWLEDGED, E.RESULT_FAILED): S.FAILED,
    (S.ACKNOWLEDGED, E.RESULT_UNCERTAIN): S.UNKNOWN,
    (S.ACKNOWLEDGED, E.NO_RESULT): S.UNKNOWN,
    (S.UNKNOWN, E.ACK_REFUSED): S.REJECTED,
    (S.UNKNOWN, E.RESULT_DISPENSED): S.DISPENSED,
    (S.UNKNOWN, E.RESULT_FAILED): S.FAILED,
    (S.UNKNOWN, E.PROVEN_EXPIRED): S.EXPIRED,
    # The machine's own "cannot tell" for a vend already unknown: recorded, stays unknown.
    (S.UNKNOWN, E.RESULT_UNCERTAIN): S.UNKNOWN,
    (S.UNKNOWN, E.OPERATOR_DISPENSED): S.DISPENSED,
    (S.UNKNOWN, E.OPERATOR_NOT_DISPENSED): S.FAILED,
}


def next_status(status: VendStatus, event: VendEvent) -> VendStatus | None:
    """Return the state ``event`` moves a vend in ``status`` to, or None if not allowed."""
    return TRANSITIONS.get((status, event))


def sources(event: VendEvent) -> frozenset[VendStatus]:
    """Return the states from which ``event`` is allowed (the compare-and-set guard)."""
    return _SOURCES[event]


_SOURCES: Final = {
    event: frozenset(s for (s, e) in TRANSITIONS if e is event) for event in VendEvent
}

#: Webhook event emitted when a vend enters a state; one per final outcome, one for unknown.
WEBHOOK_EVENTS: Final[dict[VendStatus, str]] = {
    S.DISPENSED: "vend.dispensed",
    S.FAILED: "vend.not_dispensed",
    S.REJECTED: "vend.not_dispensed",
    S.EXPIRED: "vend.not_dispensed",
    S.UNKNOWN: "vend.unknown",
}


# --- timing policy -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    """The timing rules of dispatch, in seconds (from the ``vend`` config section)."""

    retry_base_s: float = 0.5
    retry_cap_s: float = 8.0
    clock_skew_s: float = 5.0
    #: How long after its deadline an accepted vend may still be dispensing (SPEC §6.5).
    dispense_allowance_s: float = 60.0
    query_interval_s: float = 10.0

    def resend_delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Return the wait before re-sending attempt ``attempt + 1`` (jittered, capped)."""
        ceiling = min(self.retry_cap_s, self.retry_base_s * 2.0 ** max(0, attempt - 1))
        draw: float = (rng or random).random()
        return ceiling * (0.5 + 0.5 * draw)

    def ack_deadline(self, deadline: float) -> float:
        """Return when a vend with no VendAck at all becomes unknown."""
        return deadline + self.clock_skew_s

    def result_deadline(self, deadline: float) -> float:
        """Return when an acknowledged vend with no result becomes unknown."""
        return deadline + self.clock_skew_s + self.dispense_allowance_s

    def query_due(self, deadline: float, now: float) -> bool:
        """Tell whether a StatusQuery can prove expiry: the machine's clock is past the deadline."""
        return now >= deadline + self.clock_skew_s
