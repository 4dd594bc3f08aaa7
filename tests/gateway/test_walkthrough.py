"""The protocol walkthrough (vendgate demo --walkthrough) plays every scenario and holds."""

from __future__ import annotations

import io

from gateway import walkthrough


def test_walkthrough_plays_all_scenarios_and_the_invariant_holds() -> None:
    """Lost ack, lost result, jam, expiry, forgery and reboot: one motor turn per vend at most."""
    out = io.StringIO()
    assert walkthrough.run(out) == 0
    text = out.getvalue()
    for scene in ("1.", "2.", "3.", "4.", "5.", "6.", "7."):
        assert f"# {scene}" in text
    assert "BAD_MAC" in text
    assert "UNCERTAIN" in text
    assert "tombstone proves not dispensed: yes" in text
    assert (
        "invariant (each vend id turns the motor at most once and has one outcome): holds" in text
    )
