"""Prometheus metrics of the vend pipeline, on a registry passed down (never the global one).

Labels never carry unbounded values such as vend or machine ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class CountsByLabel(Collector):
    """A Prometheus counter with one label whose values are plain ints in `counts`.

    For the hot path: ``counts[label] = counts.get(label, 0) + 1`` costs a tenth of
    ``Counter.labels(label).inc()``, which takes a lock (measured in the telemetry profile).
    Single-threaded use only, as everything on the event loop is.
    """

    def __init__(
        self, name: str, documentation: str, label: str, registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self.counts: dict[str, int] = {}
        registry.register(self)

    def describe(self) -> Iterable[Metric]:
        """Name the metric without values, for the registry's duplicate check."""
        return [CounterMetricFamily(self._name, self._documentation, labels=[self._label])]

    def collect(self) -> Iterator[Metric]:
        """Return one sample per label value seen."""
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, count in sorted(self.counts.items()):
            family.add_metric([value], count)
        yield family


class VendMetrics:
    """The dispatcher's and uplink's metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.transitions = Counter(
            "vendgate_vend_transitions",
            "Vend state changes, by the state entered.",
            ["state"],
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "vendgate_vend_stage_seconds",
            "Time spent between pipeline stages: accepted_to_sent, sent_to_ack, "
            "ack_to_result, accepted_to_final.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        self.resends = Counter(
            "vendgate_vend_resends", "Vend frames re-sent for want of a VendAck.", registry=registry
        )
        self.status_queries = Counter(
            "vendgate_status_queries", "StatusQuery frames sent.", registry=registry
        )
        self.in_flight = Gauge(
            "vendgate_vends_in_flight",
            "Vends tracked by this gateway that are not final, by state.",
            ["state"],
            registry=registry,
        )
        self.bad_frames = Counter(
            "vendgate_bad_frames",
            "Uplink messages dropped, by reason (malformed, bad_mac, unknown_machine, ...).",
            ["kind"],
            registry=registry,
        )
        self.uplink_frames = CountsByLabel(
            "vendgate_uplink_frames", "Uplink frames accepted, by type.", "type", registry
        )
        self.acks = Counter(
            "vendgate_vend_acks", "VendAck frames received, by code.", ["code"], registry=registry
        )
        self.result_conflicts = Counter(
            "vendgate_result_conflicts",
            "Results that disagree with a committed outcome (should stay 0).",
            registry=registry,
        )
        self.slots_disabled = Counter(
            "vendgate_slots_disabled",
            "Slots taken out of service after planogram.slot_failure_limit failed dispenses "
            "in a row.",
            registry=registry,
        )
