"""The vend state machine's table is complete, consistent and free of dead ends."""

from __future__ import annotations

import random

import pytest

from gateway.lifecycle import (
    ACTIVE,
    FINAL,
    NOT_DISPENSED,
    TRANSITIONS,
    WEBHOOK_EVENTS,
    Timing,
    VendEvent,
    VendStatus,
    next_status,
    sources,
)


def test_only_uncertainty_may_leave_a_vend_where_it_is() -> None:
    """The one self-transition records the machine's UNCERTAIN answer for an unknown vend."""
    loops = [(s, e) for (s, e), t in TRANSITIONS.items() if s is t]
    assert loops == [(VendStatus.UNKNOWN, VendEvent.RESULT_UNCERTAIN)]


def test_final_states_have_no_way_out() -> None:
    """No event moves a vend out of a final state."""
    assert all(state not in FINAL for state, _ in TRANSITIONS)


@pytest.mark.parametrize("event", list(VendEvent))
def test_each_event_has_one_target(event: VendEvent) -> None:
    """Every allowed source of an event leads to the same state (the store relies on it)."""
    assert sources(event), f"{event} is never allowed"
    assert len({next_status(s, event) for s in sources(event)}) == 1


@pytest.mark.parametrize("state", sorted(ACTIVE))
def test_every_active_state_can_reach_both_outcomes(state: VendStatus) -> None:
    """From any non-final state some path leads to dispensed and some to not dispensed."""
    reachable = {state}
    frontier = [state]
    while frontier:
        current = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is current and target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert VendStatus.DISPENSED in reachable
    assert reachable & NOT_DISPENSED


def test_silence_never_settles_a_vend() -> None:
    """Timeouts lead only to unknown; only proof or the machine's answer gives an outcome."""
    timeouts = {VendEvent.NO_ACK, VendEvent.NO_RESULT}
    for (_, event), target in TRANSITIONS.items():
        if event in timeouts:
            assert target is VendStatus.UNKNOWN


def test_only_proof_or_the_machine_makes_a_vend_not_dispensed() -> None:
    """Every way into a not-dispensed state is a machine answer, a proof, or an operator."""
    allowed = {
        VendEvent.ACK_REFUSED,
        VendEvent.RESULT_FAILED,
        VendEvent.PROVEN_EXPIRED,
        VendEvent.PROVEN_NOT_SENT,
        VendEvent.OPERATOR_NOT_DISPENSED,
    }
    assert {e for (_, e), t in TRANSITIONS.items() if t in NOT_DISPENSED} == allowed


def test_operators_settle_only_unknown_vends() -> None:
    """Operator events are allowed from unknown and nowhere else."""
    for event in (VendEvent.OPERATOR_DISPENSED, VendEvent.OPERATOR_NOT_DISPENSED):
        assert sources(event) == {VendStatus.UNKNOWN}


def test_webhooks_cover_every_outcome_and_unknown() -> None:
    """Each final state and unknown emits a webhook; nothing else does."""
    assert set(WEBHOOK_EVENTS) == FINAL | {VendStatus.UNKNOWN}
    assert {WEBHOOK_EVENTS[s] for s in NOT_DISPENSED} == {"vend.not_dispensed"}


def test_outcomes_and_settledness() -> None:
    """Outcomes are dispensed / not_dispensed for final states; unknown is settled, not final."""
    assert VendStatus.DISPENSED.outcome == "dispensed"
    assert all(s.outcome == "not_dispensed" for s in NOT_DISPENSED)
    assert VendStatus.UNKNOWN.outcome is None
    assert VendStatus.UNKNOWN.settled
    assert not VendStatus.UNKNOWN.is_final
    assert not VendStatus.SENT.settled


def test_resend_delay_is_jittered_capped_and_growing() -> None:
    """Re-send waits double from the base up to the cap, each jittered within [50 %, 100 %]."""
    timing = Timing(retry_base_s=0.5, retry_cap_s=8.0)
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(8.0, 0.5 * 2 ** (attempt - 1))
        delays = [timing.resend_delay(attempt, rng) for _ in range(200)]
        assert all(ceiling * 0.5 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.9


def test_deadlines_allow_for_skew_and_dispensing() -> None:
    """No-ack waits for the clock tolerance; no-result also allows for a dispense in progress."""
    timing = Timing(clock_skew_s=5, dispense_allowance_s=60)
    assert timing.ack_deadline(1000) == 1005
    assert timing.result_deadline(1000) == 1065
    assert not timing.query_due(1000, 1004.9)
    assert timing.query_due(1000, 1005)
