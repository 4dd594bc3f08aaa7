"""Pure rules of planogram sync and slot health: no database, no network, time as an argument."""

from __future__ import annotations

import pytest

from gateway.configsync import SyncState, Trigger, push_due
from gateway.http_planogram import parse_if_match, parse_planogram
from gateway.store.planograms import ANY_VERSION, next_version
from gateway.store.slots import SlotEffect, effect_of
from protocols.frames import ConfigStatus, FailReason, SlotConfig

R = FailReason
RESEND_S = 30.0


@pytest.mark.parametrize(
    ("failed", "reason", "effect"),
    [
        (False, R.NONE, SlotEffect.RESET),
        (True, R.JAM, SlotEffect.COUNT),
        (True, R.NO_DROP, SlotEffect.COUNT),
        (True, R.MOTOR_FAULT, SlotEffect.COUNT),
        (True, R.SENSOR_FAULT, SlotEffect.COUNT),
        (True, R.SLOT_EMPTY, SlotEffect.NONE),
        (True, R.POWER_LOSS, SlotEffect.NONE),
        (True, R.NONE, SlotEffect.NONE),  # breaks SPEC §8; changes nothing
    ],
)
def test_which_results_count_against_a_slot(
    failed: bool, reason: FailReason, effect: SlotEffect
) -> None:
    """Broken-mechanism reasons count, a good dispense resets, empty and power loss do neither."""
    assert effect_of(failed=failed, reason=reason) is effect


def test_parse_if_match() -> None:
    """If-Match parses to None, *, or the strong numeric versions it lists."""
    assert parse_if_match(None) is None
    assert parse_if_match(" * ") == ANY_VERSION
    assert parse_if_match('"3"') == frozenset({3})
    assert parse_if_match('"3", W/"4", "abc"') == frozenset({3})


def test_next_version_passes_the_reported_one() -> None:
    """A new version is past both the desired and the reported one, within the column."""
    assert next_version(None, None) == 1
    assert next_version(3, None) == 4
    assert next_version(3, 2) == 4
    assert next_version(None, 5) == 6
    assert next_version(3, 9) == 10
    assert next_version(3, 2**31 - 1) == 4  # a version the column cannot go past is ignored


def test_parse_planogram_returns_wire_records() -> None:
    """A valid body becomes SlotConfig records, updated_by defaulting to api."""
    body = {
        "currency": "EUR",
        "slots": [
            {
                "slot": 0,
                "product_code": "",
                "name": "Wasser",
                "price": 0,
                "capacity": 0,
                "drop_sensor": False,
            }
        ],
    }
    assert parse_planogram(body) == (
        "EUR",
        (SlotConfig(0, "", "Wasser", 0, 0, drop_sensor=False),),
        "api",
    )


def _state(**changes: object) -> SyncState:
    state = SyncState(desired=2, reported=1, sent_at=1000.0, sent_version=2)
    for name, value in changes.items():
        setattr(state, name, value)
    return state


@pytest.mark.parametrize(
    ("state", "trigger", "now", "due"),
    [
        (_state(desired=None), Trigger.NEW_VERSION, 1000.0, False),
        (_state(reported=2), Trigger.NEW_VERSION, 1000.0, False),
        (_state(reported=3), Trigger.HELLO, 1000.0, False),  # ahead: a push would be STALE
        (_state(), Trigger.NEW_VERSION, 1000.0, True),
        (_state(), Trigger.HELLO, 1001.0, True),  # a reconnect may have lost the last send
        (_state(status=ConfigStatus.INVALID), Trigger.HELLO, 1001.0, False),
        (_state(status=ConfigStatus.INVALID), Trigger.HELLO, 1030.0, True),
        (_state(status=ConfigStatus.INVALID), Trigger.RESEND, 1030.0, True),
        (_state(), Trigger.STATUS_REPLY, 1029.9, False),
        (_state(), Trigger.STATUS_REPLY, 1030.0, True),
        (_state(), Trigger.RESEND, 1029.9, False),
        (_state(), Trigger.RESEND, 1030.0, True),
        (_state(sent_version=1), Trigger.RESEND, 1001.0, True),  # never sent this version
        (_state(sent_at=None, sent_version=None), Trigger.RESEND, 1001.0, True),
        (_state(reported=None), Trigger.RESEND, 1030.0, True),
    ],
)
def test_push_due(state: SyncState, trigger: Trigger, now: float, due: bool) -> None:
    """Config is sent for a new version, on Hello, and otherwise every resend_s while behind."""
    assert push_due(state, trigger, now, RESEND_S) is due


def test_frames_older_than_the_latest_report_are_ignored() -> None:
    """(boot, seq) orders reports within a boot; a repeat is ignored; a new boot is taken."""
    state = SyncState()
    assert state.newer(5, 10)
    assert not state.newer(5, 10)
    assert not state.newer(5, 9)
    assert state.newer(5, 11)
    assert state.newer(6, 1)
    assert state.newer(1, 1)  # a replaced module counts from 1 again
