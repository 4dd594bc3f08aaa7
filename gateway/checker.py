"""The exactly-once checker: three independent records of a run must agree.

- the fleet's dispense log: every motor turn, with the outcome the machine saw;
- the database: every accepted vend and the state it ended in;
- the webhooks the payment backend received, de-duplicated by event id.

The invariants (vending-domain.md): every accepted vend is dispensed at most once; it ends
dispensed, or reported not dispensed, or stays visibly unknown; it is never both; and each
final outcome reaches the backend as one event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.lifecycle import NOT_DISPENSED, VendStatus
from gateway.simulator import DispenseRecord

FINAL_EVENTS = frozenset({"vend.dispensed", "vend.not_dispensed"})


@dataclass(frozen=True, slots=True)
class VendFact:
    """What the database says about one vend."""

    vend_id: str
    wire_id: int
    state: VendStatus


@dataclass(frozen=True, slots=True)
class Verdict:
    """The checker's findings; :attr:`ok` when every invariant holds."""

    by_state: Mapping[VendStatus, int]
    duplicates: int  # vends whose motor turned more than once
    lost: int  # vends neither dispensed, nor reported not dispensed, nor unknown
    conflicts: int  # the motor, the database and the webhooks disagree about an outcome
    unknown: int  # visibly unknown, awaiting the machine or an operator
    webhooks_missing: int  # final vends with no final webhook event
    webhook_duplicates: int  # final webhook events beyond one per vend
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing was dispensed twice, lost, or reported both ways."""
        return self.duplicates == 0 and self.lost == 0 and self.conflicts == 0


def check(
    vends: Iterable[VendFact],
    turns: Iterable[DispenseRecord],
    webhook_events: Iterable[Mapping[str, Any]] = (),
    *,
    expect_webhooks: bool = False,
) -> Verdict:
    """Compare the three records; ``webhook_events`` are unique by event id already."""
    turns = list(turns)
    motor = Counter(t.vend_id for t in turns)
    dispensed_turns = {t.vend_id for t in turns if t.outcome == "DISPENSED"}
    hooks: dict[str, list[str]] = {}
    for event in webhook_events:
        if event["type"] in FINAL_EVENTS:
            hooks.setdefault(event["vend_id"], []).append(event["outcome"])
    by_state: Counter[VendStatus] = Counter()
    problems: list[str] = []
    lost = conflicts = missing = extra = 0
    for vend in vends:
        by_state[vend.state] += 1
        if motor[vend.wire_id] > 1:
            problems.append(f"{vend.vend_id}: motor turned {motor[vend.wire_id]} times")
        if not (vend.state.is_final or vend.state is VendStatus.UNKNOWN):
            lost += 1
            problems.append(f"{vend.vend_id}: still {vend.state}")
        turned = vend.wire_id in dispensed_turns
        if vend.state is VendStatus.DISPENSED and not turned:
            conflicts += 1
            problems.append(f"{vend.vend_id}: dispensed in the database, no dispensing turn")
        if vend.state in NOT_DISPENSED and turned:
            conflicts += 1
            problems.append(f"{vend.vend_id}: reported not dispensed, but the product dropped")
        outcomes = hooks.get(vend.vend_id, [])
        if vend.state.is_final:
            expected = vend.state.outcome
            if any(o != expected for o in outcomes):
                conflicts += 1
                problems.append(f"{vend.vend_id}: webhook says {outcomes}, database {expected}")
            if expect_webhooks and not outcomes:
                missing += 1
                problems.append(f"{vend.vend_id}: no final webhook")
            extra += max(0, len(outcomes) - 1)
    return Verdict(
        by_state=dict(by_state),
        duplicates=sum(1 for n in motor.values() if n > 1),
        lost=lost,
        conflicts=conflicts,
        unknown=by_state[VendStatus.UNKNOWN],
        webhooks_missing=missing,
        webhook_duplicates=extra,
        problems=problems,
    )
