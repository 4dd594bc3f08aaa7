import copy
import inspect
import pickle

import pytest

from gateway import errors
from gateway.errors import (
    BrokerUnavailableError,
    ConfigError,
    ConflictError,
    DatabaseUnavailableError,
    EmbeddedServiceError,
    FrameRejectedError,
    GatewayError,
    NotFoundError,
    OverloadedError,
    PreconditionFailedError,
    PriceMismatchError,
    ShuttingDownError,
    SlotDisabledError,
    SlotNotInPlanogramError,
    SlotRefusedError,
    UnavailableError,
    UnknownMachineError,
    UnknownVendError,
    ValidationError,
    VendConflictError,
)

ERROR_CLASSES = [
    obj for obj in vars(errors).values() if inspect.isclass(obj) and issubclass(obj, BaseException)
]

# (class, http_status, retriable) as the gateway's callers rely on them.
POLICY = [
    (GatewayError, 500, False),
    (ConfigError, 500, False),
    (ValidationError, 422, False),
    (NotFoundError, 404, False),
    (UnknownMachineError, 404, False),
    (UnknownVendError, 404, False),
    (ConflictError, 409, False),
    (VendConflictError, 409, False),
    (SlotRefusedError, 409, False),
    (SlotDisabledError, 409, False),
    (SlotNotInPlanogramError, 409, False),
    (PriceMismatchError, 409, False),
    (PreconditionFailedError, 412, False),
    (UnavailableError, 503, True),
    (BrokerUnavailableError, 503, True),
    (DatabaseUnavailableError, 503, True),
    (EmbeddedServiceError, 500, False),
    (OverloadedError, 503, True),
    (ShuttingDownError, 503, True),
    (FrameRejectedError, 400, False),
]

# One instance of each class, and a piece of data its message must mention.
SAMPLES: list[tuple[GatewayError, str]] = [
    (GatewayError("something broke"), "something broke"),
    (ConfigError("mqtt.url='x': bad", "environment VENDGATE_MQTT_URL", "mqtt.url"), "mqtt.url"),
    (ValidationError("amount", "must be positive"), "amount"),
    (NotFoundError("no such thing"), "no such thing"),
    (UnknownMachineError("m-17"), "m-17"),
    (UnknownVendError("v-42"), "v-42"),
    (ConflictError("already done"), "already done"),
    (VendConflictError("v-42", "already dispensed"), "already dispensed"),
    (PriceMismatchError("m-1", 3, "price 300 differs from 350"), "slot 3: price 300 differs"),
    (SlotRefusedError("m-1", 3, "no"), "machine 'm-1' slot 3: no"),
    (SlotDisabledError("m-1", 3, "disabled after 3 failures"), "disabled after 3 failures"),
    (SlotNotInPlanogramError("m-1", 9, "not in planogram version 2"), "slot 9: not in"),
    (PreconditionFailedError("planogram", "4", "5"), "at version 5, not 4"),
    (UnavailableError("timed out"), "timed out"),
    (BrokerUnavailableError("connection refused"), "MQTT broker"),
    (DatabaseUnavailableError("connection refused"), "database"),
    (EmbeddedServiceError("mosquitto", "not found on PATH"), "not found on PATH"),
    (OverloadedError("vend queue", 1000), "1000"),
    (ShuttingDownError(), "shutting down"),
    (FrameRejectedError("m-17", "bad MAC"), "bad MAC"),
]


def test_every_public_class_is_covered() -> None:
    """The policy table lists exactly the error classes the module defines."""
    assert {cls for cls, _, _ in POLICY} == set(ERROR_CLASSES)
    assert {type(error) for error, _ in SAMPLES} == set(ERROR_CLASSES)
    assert set(errors.__all__) == {cls.__name__ for cls in ERROR_CLASSES}


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_class_shape(cls: type[GatewayError]) -> None:
    """Every error ends in Error, derives from GatewayError and has a one-line docstring."""
    assert cls.__name__.endswith("Error")
    assert issubclass(cls, GatewayError)
    assert cls.__doc__ is not None
    assert "\n" not in cls.__doc__.strip()


@pytest.mark.parametrize(
    ("cls", "status", "retriable"), POLICY, ids=[cls.__name__ for cls, _, _ in POLICY]
)
def test_policy(cls: type[GatewayError], status: int, retriable: bool) -> None:
    """Each class carries its HTTP status (in 400..599) and retriable flag as class attributes."""
    assert 400 <= cls.http_status <= 599
    assert cls.http_status == status
    assert cls.retriable is retriable


def test_policy_is_not_instance_data() -> None:
    """Policy lives on the class, so it is the same for every instance."""
    assert "retriable" not in vars(UnknownMachineError("m-1"))
    assert "http_status" not in vars(UnknownMachineError("m-1"))


@pytest.mark.parametrize(
    ("error", "mention"), SAMPLES, ids=[type(error).__name__ for error, _ in SAMPLES]
)
def test_message_and_round_trip(error: GatewayError, mention: str) -> None:
    """str() names the data, and the error survives pickle and copy with its data and message."""
    assert mention in str(error)
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):  # noqa: S301 -- our own bytes
        assert type(clone) is type(error)
        assert str(clone) == str(error)
        assert vars(clone) == vars(error)


def test_data_lives_in_attributes() -> None:
    """The data a handler needs is in attributes, not only in the message."""
    config = ConfigError("bad", "file /etc/vendgate.toml", "mqtt.url")
    assert (config.source, config.key, config.reason) == (
        "file /etc/vendgate.toml",
        "mqtt.url",
        "bad",
    )
    assert str(config) == "file /etc/vendgate.toml: bad"
    rejected = FrameRejectedError("m-1", "bad MAC")
    assert (rejected.machine_id, rejected.reason) == ("m-1", "bad MAC")
    assert UnknownVendError("v-1").vend_id == "v-1"
    assert ValidationError("amount", "too big").field == "amount"
