"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from gateway.logs import configure_logging
from tests.integration.harness import Diagnostics


@pytest.fixture
def diagnostics(tmp_path: Path) -> Iterator[Diagnostics]:
    """Send the in-process gateway's logs to a file; on teardown print the tails of all logs."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    log_path = tmp_path / "gateway.log"
    with log_path.open("w", encoding="utf-8") as stream:
        configure_logging("info", "json", stream)
        diag = Diagnostics(logs=[log_path])
        try:
            yield diag
        finally:
            structlog.reset_defaults()
            structlog.contextvars.clear_contextvars()
            for handler in list(root.handlers):
                if handler not in handlers:
                    root.removeHandler(handler)
                    handler.close()
            root.setLevel(level)
            # Captured, so pytest shows it only for a failing test.
            sys.stderr.write(diag.report(lines=80) + "\n")
