"""Structured logging: structlog for the gateway, with the stdlib root routed to the same output.

Call `configure_logging` once at start-up (the command line does it from `Config.log`), then
log key-value events through `get_logger`. Bind ``vend_id`` / ``machine_id`` with
`structlog.contextvars.bind_contextvars` when a task starts; every event carries them.

Libraries such as gmqtt, aiohttp and asyncpg log through the stdlib `logging` module. Their
records go through the same processors, renderer and handler as the gateway's own events, so a
library warning is one more JSON line in production rather than a differently shaped line.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Final, TextIO

import structlog

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger, Processor

__all__ = ["configure_logging", "get_logger"]

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_FORMATS: Final = ("auto", "json", "console")
# Names the root handler this module installs, so reconfiguring replaces it and leaves
# handlers that others installed (pytest's log capture, for one) alone.
_HANDLER_NAME: Final = "vendgate"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send structlog events and stdlib log records at `level` or above to `stream`.

    `fmt` is "json", "console", or "auto" (JSON unless `stream` is a terminal). The stream
    defaults to the current `sys.stderr`. Calling again replaces the previous configuration.
    """
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(_LEVELS)}")
    if fmt not in _FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(_FORMATS)}")
    out = sys.stderr if stream is None else stream
    terminal = _is_terminal(out)
    as_json = fmt == "json" or (fmt == "auto" and not terminal)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if as_json:
        # JSON lines carry the traceback as one string field.
        tail: list[Processor] = [structlog.processors.format_exc_info]
        renderer = structlog.processors.JSONRenderer()
    else:
        # ConsoleRenderer formats exceptions itself and warns if format_exc_info ran first.
        tail = []
        renderer = structlog.dev.ConsoleRenderer(colors=terminal)

    # structlog events end in a stdlib record, so one handler writes both kinds of event:
    # lines never interleave mid-write and logger names come from the same place.
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Caching would pin loggers made before a reconfiguration (tests reconfigure).
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,  # for records from libraries' stdlib loggers
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])


def get_logger(name: str) -> FilteringBoundLogger:
    """Return a logger whose events carry ``logger=name``; safe to create at import time."""
    # The lazy proxy reads the configuration when it is used rather than now, so module-level
    # loggers follow a later `configure_logging`. (`bind` on it returns a concrete logger.)
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger
