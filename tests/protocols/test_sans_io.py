"""protocols/ stays sans-I/O: it imports no networking, event loop or database library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import protocols

FORBIDDEN = {
    "asyncio",
    "socket",
    "selectors",
    "ssl",
    "threading",
    "subprocess",
    "gmqtt",
    "aiomqtt",
    "paho",
    "aiohttp",
    "asyncpg",
    "psycopg",
    "gateway",
}
SOURCES = sorted(Path(protocols.__file__).parent.rglob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_scan_sees_the_package() -> None:
    """The scan covers the codec, the frames and the reference device."""
    names = {p.name for p in SOURCES}
    assert {"codec.py", "frames.py", "device.py", "schema.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_module_imports_no_io_library(path: Path) -> None:
    """No module under protocols/ imports an I/O, MQTT, HTTP or database library, or the gateway."""
    assert _imported_roots(path) & FORBIDDEN == set()
