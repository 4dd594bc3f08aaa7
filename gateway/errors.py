"""The gateway's error hierarchy.

Every error the gateway raises on purpose derives from `GatewayError`. Data lives in instance
attributes; policy lives in class attributes, so callers decide what to do from the class alone:

* `retriable`: the same request may succeed later unchanged (an HTTP client should retry
  with backoff, a dispatcher may requeue).
* `http_status`: the status the HTTP layer answers with when the error escapes a handler.

Constructors take their data positionally and pass it to `Exception.__init__`, so `args` holds
the data and instances survive `pickle` and `copy`.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BrokerUnavailableError",
    "ConfigError",
    "ConflictError",
    "DatabaseUnavailableError",
    "EmbeddedServiceError",
    "FrameRejectedError",
    "GatewayError",
    "NotFoundError",
    "OverloadedError",
    "PreconditionFailedError",
    "PriceMismatchError",
    "ShuttingDownError",
    "SlotDisabledError",
    "SlotNotInPlanogramError",
    "SlotRefusedError",
    "UnavailableError",
    "UnknownMachineError",
    "UnknownVendError",
    "ValidationError",
    "VendConflictError",
]


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""

    retriable: ClassVar[bool] = False
    http_status: ClassVar[int] = 500


class ConfigError(GatewayError):
    """The configuration could not be read, parsed or validated."""

    def __init__(self, reason: str, source: str, key: str | None = None) -> None:
        super().__init__(reason, source, key)
        self.reason = reason
        self.source = source
        self.key = key

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


class ValidationError(GatewayError):
    """A request field has a value the gateway cannot accept."""

    http_status: ClassVar[int] = 422

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid {self.field}: {self.reason}"


class NotFoundError(GatewayError):
    """The request names something the gateway does not know."""

    http_status: ClassVar[int] = 404


class UnknownMachineError(NotFoundError):
    """No vending machine with this id is registered."""

    def __init__(self, machine_id: str) -> None:
        super().__init__(machine_id)
        self.machine_id = machine_id

    def __str__(self) -> str:
        return f"unknown machine {self.machine_id!r}"


class UnknownVendError(NotFoundError):
    """No vend with this id exists."""

    def __init__(self, vend_id: str) -> None:
        super().__init__(vend_id)
        self.vend_id = vend_id

    def __str__(self) -> str:
        return f"unknown vend {self.vend_id!r}"


class ConflictError(GatewayError):
    """The request contradicts the current state of what it names."""

    http_status: ClassVar[int] = 409


class VendConflictError(ConflictError):
    """The vend exists but is in a state that does not allow the request."""

    def __init__(self, vend_id: str, reason: str) -> None:
        super().__init__(vend_id, reason)
        self.vend_id = vend_id
        self.reason = reason

    def __str__(self) -> str:
        return f"vend {self.vend_id!r} conflicts with the request: {self.reason}"


class SlotRefusedError(ConflictError):
    """A vend refused before it is stored: the slot cannot sell it now at that price."""

    def __init__(self, machine_id: str, slot: int, reason: str) -> None:
        super().__init__(machine_id, slot, reason)
        self.machine_id = machine_id
        self.slot = slot
        self.reason = reason

    def __str__(self) -> str:
        return f"machine {self.machine_id!r} slot {self.slot}: {self.reason}"


class SlotDisabledError(SlotRefusedError):
    """The slot is out of service (failed dispenses, or an operator); see its audit."""


class SlotNotInPlanogramError(SlotRefusedError):
    """The machine has a planogram, and it does not list this slot."""


class PriceMismatchError(SlotRefusedError):
    """The price (or currency) differs from the planogram's for this slot."""


class PreconditionFailedError(GatewayError):
    """A conditional request (If-Match) names a version that is no longer current."""

    http_status: ClassVar[int] = 412

    def __init__(self, what: str, expected: str, current: str) -> None:
        super().__init__(what, expected, current)
        self.what = what
        self.expected = expected
        self.current = current

    def __str__(self) -> str:
        return f"{self.what} is at version {self.current}, not {self.expected}"


class UnavailableError(GatewayError):
    """A service the gateway depends on cannot be reached right now."""

    retriable: ClassVar[bool] = True
    http_status: ClassVar[int] = 503
    service: ClassVar[str] = "a required service"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.service} is unavailable: {self.reason}"


class BrokerUnavailableError(UnavailableError):
    """The MQTT broker cannot be reached or refused the connection."""

    service: ClassVar[str] = "the MQTT broker"


class DatabaseUnavailableError(UnavailableError):
    """PostgreSQL cannot be reached or refused the connection."""

    service: ClassVar[str] = "the database"


class EmbeddedServiceError(GatewayError):
    """A private Mosquitto or PostgreSQL that the gateway runs itself failed to start or stop."""

    # Not an UnavailableError: a missing binary or a broken data directory does not heal on a
    # retry, and it happens at start-up, before any request could be answered with 503.

    def __init__(self, service: str, reason: str) -> None:
        super().__init__(service, reason)
        self.service = service
        self.reason = reason

    def __str__(self) -> str:
        return f"embedded {self.service}: {self.reason}"


class OverloadedError(GatewayError):
    """A bounded queue or concurrency limit is full; the request was not accepted."""

    retriable: ClassVar[bool] = True
    http_status: ClassVar[int] = 503

    def __init__(self, resource: str, limit: int) -> None:
        super().__init__(resource, limit)
        self.resource = resource
        self.limit = limit

    def __str__(self) -> str:
        return f"{self.resource} is full (limit {self.limit}); try again later"


class ShuttingDownError(GatewayError):
    """The gateway has stopped taking new work because it is shutting down."""

    retriable: ClassVar[bool] = True
    http_status: ClassVar[int] = 503

    def __str__(self) -> str:
        return "the gateway is shutting down and takes no new work"


class FrameRejectedError(GatewayError):
    """A frame from a machine failed protocol checks and was dropped."""

    http_status: ClassVar[int] = 400

    def __init__(self, machine_id: str, reason: str) -> None:
        super().__init__(machine_id, reason)
        self.machine_id = machine_id
        self.reason = reason

    def __str__(self) -> str:
        return f"frame from machine {self.machine_id!r} rejected: {self.reason}"
