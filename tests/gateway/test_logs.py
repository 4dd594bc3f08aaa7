import io
import json
import logging
from datetime import UTC, datetime

import pytest
import structlog

from gateway.logs import configure_logging, get_logger


class TerminalStream(io.StringIO):
    """A string buffer that says it is a terminal."""

    def isatty(self) -> bool:
        """Claim to be a terminal, as stderr is in an interactive shell."""
        return True


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_when_not_a_terminal() -> None:
    """With fmt=auto and a non-TTY stream each event is a JSON line with level, time and context."""
    stream = io.StringIO()
    log = get_logger("gateway.test")  # made before configuration, as module loggers are
    configure_logging("info", "auto", stream)
    structlog.contextvars.bind_contextvars(machine_id="m-17")
    log.info("vend.started", vend_id="v-42", amount=150)
    (event,) = lines(stream)
    assert event["event"] == "vend.started"
    assert event["level"] == "info"
    assert event["logger"] == "gateway.test"
    assert event["machine_id"] == "m-17"
    assert event["vend_id"] == "v-42"
    assert event["amount"] == 150
    timestamp = str(event["timestamp"])
    assert timestamp.endswith("Z")
    parsed = datetime.fromisoformat(timestamp)
    assert parsed.tzinfo is not None
    assert parsed.utcoffset() == UTC.utcoffset(None)


def test_level_is_respected() -> None:
    """Events below the configured level are dropped, for gateway and library loggers alike."""
    stream = io.StringIO()
    configure_logging("warning", "json", stream)
    log = get_logger("gateway.test")
    log.debug("dropped")
    log.info("dropped")
    logging.getLogger("gmqtt").info("dropped")
    log.warning("kept")
    log.error("kept")
    assert [event["event"] for event in lines(stream)] == ["kept", "kept"]


def test_library_records_are_json_too() -> None:
    """Warnings from stdlib loggers (gmqtt, aiohttp) come out as JSON lines with the context."""
    stream = io.StringIO()
    configure_logging("info", "auto", stream)
    structlog.contextvars.bind_contextvars(vend_id="v-1")
    logging.getLogger("gmqtt.client").warning("reconnecting in %d s", 3)
    (event,) = lines(stream)
    assert event == {
        "event": "reconnecting in 3 s",
        "level": "warning",
        "logger": "gmqtt.client",
        "vend_id": "v-1",
        "timestamp": event["timestamp"],
    }


def test_exceptions_are_formatted_in_json() -> None:
    """log.exception puts the traceback into the JSON line as text."""
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        get_logger("gateway.test").exception("vend.failed")
    (event,) = lines(stream)
    assert event["level"] == "error"
    assert "ZeroDivisionError" in str(event["exception"])


@pytest.mark.parametrize(("fmt", "as_json"), [("auto", False), ("console", False), ("json", True)])
def test_format_choice_on_a_terminal(fmt: str, as_json: bool) -> None:
    """On a terminal, auto and console give pretty lines and json still gives JSON."""
    stream = TerminalStream()
    configure_logging("info", fmt, stream)
    get_logger("gateway.test").info("hello", machine_id="m-1")
    output = stream.getvalue()
    assert "hello" in output
    assert "m-1" in output
    assert output.lstrip().startswith("{") is as_json


def test_reconfiguring_replaces_the_handler() -> None:
    """A second configure_logging writes only to the new stream, once per event."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", first)
    configure_logging("info", "json", second)
    get_logger("gateway.test").info("once")
    logging.getLogger("lib").warning("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 2


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a stream the output goes to stderr, never stdout."""
    configure_logging("info", "json")
    get_logger("gateway.test").info("to.stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err)["event"] == "to.stderr"


@pytest.mark.parametrize(("level", "fmt"), [("verbose", "json"), ("info", "xml")])
def test_rejects_unknown_level_or_format(level: str, fmt: str) -> None:
    """An unknown level or format is a ValueError, not a silent default."""
    with pytest.raises(ValueError, match="unknown log"):
        configure_logging(level, fmt, io.StringIO())
